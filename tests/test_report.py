"""Tests of ``deqkit.stability.report.stability_report``."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import deqkit as dk
from deqkit.stability import StabilityReport, stability_report

D = 12
B = 6


class TanhCell(nn.Module):
    def __init__(self, scale: float, seed: int = 0, by_radius: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(D, D, generator=g, dtype=torch.float64)
        if by_radius:  # scale the spectral radius of W (its norm is larger)
            w = scale * w / torch.linalg.eigvals(w).abs().max()
        else:  # scale the spectral norm of W
            w = scale * w / torch.linalg.matrix_norm(w, 2)
        self.W = nn.Parameter(w)
        self.U = nn.Linear(D, D, bias=False, dtype=torch.float64)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.W.T + self.U(x))


def _dense_rho(cell: nn.Module, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    out = []
    for b in range(z.shape[0]):
        jac = torch.autograd.functional.jacobian(
            lambda v, xb=x[b : b + 1]: cell(v[None], xb)[0], z[b]
        )
        out.append(torch.linalg.eigvals(jac).abs().max())
    return torch.stack(out)


def _inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(B, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_contractive_cell_is_healthy() -> None:
    cell = TanhCell(0.5)
    deq = dk.nn.DEQ(cell, solver=dk.Anderson(rtol=1e-8, atol=0), max_steps=50)
    x = _inputs()
    rep = stability_report(deq, x)
    assert isinstance(rep, StabilityReport)
    assert rep.warnings == [] and rep.healthy
    assert rep.result == "successful" and rep.n_max_steps == 0
    assert rep.backward_ran and all(rep.backward_converged)
    assert len(rep.nstep) == B and len(rep.trace) == B
    assert all(len(t) == n + 1 for t, n in zip(rep.trace, rep.nstep))
    # rho agrees with the dense Jacobian's spectral radius at z*
    with torch.no_grad():
        z = deq(x)
    dense = _dense_rho(cell, z, x)
    got = torch.tensor(rep.spectral_radius, dtype=torch.float64)
    torch.testing.assert_close(got, dense, rtol=1e-2, atol=0)
    # ||J|| >= rho, and the conditioning bound dominates the estimate's input
    assert all(s >= r - 1e-8 for s, r in zip(rep.spectral_norm, rep.spectral_radius))
    assert all(s < 0.5 + 1e-6 for s in rep.spectral_norm)
    assert all(ub >= 1.0 for ub in rep.cond_upper_bound)
    assert rep.cond_upper_bound_max < (1 + 0.5) / (1 - 0.5) + 1e-6


def test_nearly_non_contractive_cell_warns_with_remedy() -> None:
    cell = TanhCell(0.99, seed=3, by_radius=True)
    # small inputs keep tanh near its linear regime: rho(J) close to rho(W) = 0.99
    x = 0.01 * _inputs()
    deq = dk.nn.DEQ(cell, solver=dk.Picard(rtol=1e-10, atol=0), max_steps=8)
    rep = stability_report(deq, x, backward_solver=dk.GMRES(max_steps=3, restart=3))
    text = " ".join(rep.warnings)
    assert rep.rho_max >= 0.95
    assert "dk.nn.spectral_norm" in text and "dk.jacobian_frobenius_reg" in text
    assert rep.n_max_steps > 0
    assert f"({rep.n_max_steps}/{B}) hit max_steps" in text
    assert rep.frac_max_steps == pytest.approx(rep.n_max_steps / B)
    assert rep.n_backward_failed > 0
    assert "backward solve did not converge" in text
    assert "WARN" not in str(rep)  # sentences are listed, not shouted
    assert "warnings:" in str(rep)


class LinearCell(nn.Module):
    def __init__(self, radius: float) -> None:
        super().__init__()
        w = torch.randn(D, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        self.W = nn.Parameter(radius * w / torch.linalg.eigvals(w).abs().max())

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return z @ self.W.T + x


def test_non_contractive_cell_warns() -> None:
    deq = dk.nn.DEQ(LinearCell(1.3), solver=dk.Picard(rtol=1e-8, atol=0), max_steps=20)
    rep = stability_report(deq, _inputs())
    assert rep.rho_max == pytest.approx(1.3, rel=1e-6)  # J = W everywhere
    assert rep.cond_estimate_max == float("inf") and rep.cond_upper_bound_max == float("inf")
    text = " ".join(rep.warnings)
    assert ">= 1" in text and "dk.nn.spectral_norm" in text
    assert rep.n_max_steps + rep.n_stagnated + rep.n_diverged + rep.n_nonfinite == B
    assert rep.result != "successful"
    json.dumps(rep.to_dict(), allow_nan=False)


def test_rho_threshold_warning() -> None:
    cell = TanhCell(0.97, seed=4, by_radius=True)
    x = 1e-3 * _inputs()
    deq = dk.nn.DEQ(cell, solver=dk.Anderson(rtol=1e-6, atol=0), max_steps=100)
    rep = stability_report(deq, x)
    dense = _dense_rho(cell, deq(x).detach(), x)
    assert 0.95 <= float(dense.max()) < 1
    assert any("ill-conditioned" in w and "dk.nn.spectral_norm" in w for w in rep.warnings)
    assert rep.rho_max == pytest.approx(float(dense.max()), rel=1e-2)


def test_state_grads_and_attributes_untouched() -> None:
    cell = TanhCell(0.6)
    dk.nn.spectral_norm(cell.U, bound=0.9)
    deq = dk.nn.DEQ(cell, solver=dk.Anderson(rtol=1e-6), max_steps=20)
    x = _inputs().requires_grad_(True)
    # existing gradients (one None, one set) must survive
    cell.W.grad = torch.full_like(cell.W, 3.0)
    before = {k: v.clone() for k, v in deq.state_dict().items()}
    adjoint, kwargs, throw = deq.adjoint, dict(deq.fp_kwargs), deq.throw
    deq.last_solution = None
    rng = torch.get_rng_state()
    rep = stability_report(deq, x, loss_fn=lambda z: z.sum())
    assert rep.backward_ran
    assert torch.equal(cell.W.grad, torch.full_like(cell.W, 3.0))
    assert all(p.grad is None for n, p in deq.named_parameters() if n != "cell.W")
    assert x.grad is None
    assert deq.adjoint is adjoint and deq.fp_kwargs == kwargs and deq.throw is throw
    assert deq.last_solution is None
    assert torch.equal(torch.get_rng_state(), rng)
    after = deq.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_eval_mode_uses_eval_max_steps_and_no_backward_without_grad() -> None:
    cell = TanhCell(0.5).requires_grad_(False)
    deq = dk.nn.DEQ(cell, max_steps=3, eval_max_steps=40).eval()
    rep = stability_report(deq, _inputs())
    assert not rep.training and rep.max_steps == 40
    assert not deq.training
    assert not rep.backward_ran and rep.backward_converged == []
    assert "backward: not run" in str(rep)


def test_str_and_to_dict() -> None:
    deq = dk.nn.DEQ(TanhCell(0.5), solver=dk.Anderson(rtol=1e-6), max_steps=30)
    rep = stability_report(deq, _inputs())
    text = str(rep)
    assert text.startswith("DEQ stability report (6 samples")
    assert "rho(J)" in text and "cond(I - J)" in text and "no warnings" in text
    d = rep.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["batch_size"] == B and isinstance(d["spectral_radius"][0], float)
    assert isinstance(d["trace"][0], list)


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="DEQ"):
        stability_report(TanhCell(0.5), _inputs())  # type: ignore[arg-type]
    deq = dk.nn.DEQ(TanhCell(0.5))
    with pytest.raises(TypeError, match="linear solver"):
        stability_report(deq, _inputs(), backward_solver="gmres")  # type: ignore[arg-type]


def test_monotone_layer_is_refused_with_the_map_to_inspect():
    layer = dk.nn.MonotoneDEQ(3, 6)
    x = torch.randn(4, 3)
    suggested = r"operator splitting.*relu\(layer.linear\(z\) \+ layer.U\(x\)\)"
    with pytest.raises(TypeError, match=suggested):
        dk.stability_report(layer, x)
    z = layer(x).detach()  # the suggested map is the one whose fixed point the layer returns
    assert torch.allclose(torch.relu(layer.linear(z) + layer.U(x)), z, atol=1e-3)
