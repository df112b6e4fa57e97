"""Mixed precision: bf16 autocast cells inside ``dk.fixed_point`` and ``dk.nn.DEQ``."""

from __future__ import annotations

import pytest
import torch

import deqkit as dk

BF16 = torch.autocast("cpu", dtype=torch.bfloat16)
BF16_RTOL = 2e-2  # above bf16's unit roundoff 2**-7: tighter buys no accuracy


class Cell(torch.nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(width, width)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(0.5 * self.lin(z) + x)


def _solve(cell, x, z0_dtype=torch.float32, rtol=BF16_RTOL):
    return dk.fixed_point(
        cell,
        torch.zeros(x.shape, dtype=z0_dtype),
        solver=dk.Anderson(m=4, rtol=rtol, atol=0),
        adjoint=dk.ImplicitAdjoint(dk.GMRES(rtol=1e-2, max_steps=20), on_failure="ignore"),
        max_steps=30,
        args=(x,),
        throw=False,
    )


@pytest.mark.parametrize("z0_dtype", [torch.float32, torch.bfloat16])
def test_fixed_point_under_autocast_keeps_float32_solver_state(z0_dtype):
    torch.manual_seed(0)
    cell = Cell()
    x = torch.randn(6, 16, requires_grad=True)
    seen = []

    def f(z, a):
        seen.append(cell.lin(z).dtype)  # the cell's matmul runs in bf16
        return cell(z, a)

    with BF16:
        sol = _solve(f, x, z0_dtype)
    assert set(seen) == {torch.bfloat16}  # the cell really ran in bf16
    assert sol.result is dk.RESULTS.successful
    for key in ("abs_residual", "rel_residual"):
        assert sol.stats[key].dtype == torch.float32
    assert sol.value.dtype == z0_dtype
    # implicit backward through the bf16 cell: close to the float32 gradient
    sol.value.float().square().sum().backward()
    g_bf16, x.grad = x.grad.clone(), None
    sol32 = _solve(cell, x, rtol=1e-6)
    sol32.value.square().sum().backward()
    assert torch.isfinite(g_bf16).all()
    rel = (g_bf16 - x.grad).norm() / x.grad.norm()
    assert rel < 5e-2, rel
    assert (sol.value.float() - sol32.value).abs().max() < 5e-2


def test_deq_layer_under_autocast():
    torch.manual_seed(0)
    cell = Cell()
    layer = dk.nn.DEQ(
        cell,
        solver=dk.Anderson(rtol=BF16_RTOL, atol=0),
        adjoint=dk.ImplicitAdjoint(dk.GMRES(rtol=1e-2), on_failure="ignore"),
        max_steps=30,
    )
    x = torch.randn(5, 16)
    with BF16:
        z = layer(x)
        loss = z.float().square().mean()
    loss.backward()
    sol = layer.last_solution
    assert sol.stats["abs_residual"].dtype == torch.float32
    assert z.dtype == torch.float32  # state shaped (and typed) like the float32 input
    assert cell.lin.weight.grad is not None and torch.isfinite(cell.lin.weight.grad).all()


def _train_digits(autocast: bool) -> float:
    datasets = pytest.importorskip("sklearn.datasets")
    X, y = datasets.load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(X), generator=g)
    tr, te = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    # float32: the zoo's default solver; bf16: a tolerance the bf16 cell can meet
    solver = dk.Anderson(m=5, rtol=BF16_RTOL, atol=0) if autocast else None
    model = dk.zoo.DEQMLP((64,), 10, width=32, solver=solver, max_steps=12, eval_max_steps=20)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else None
    for _ in range(4):
        order = tr[torch.randperm(len(tr), generator=g)]
        for i in range(0, len(order), 100):
            idx = order[i : i + 100]
            opt.zero_grad()
            if ctx is None:
                loss = torch.nn.functional.cross_entropy(model(X[idx]), y[idx])
            else:
                with ctx():
                    logits = model(X[idx])
                loss = torch.nn.functional.cross_entropy(logits.float(), y[idx])
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        if ctx is None:
            pred = model(X[te]).argmax(1)
        else:
            with ctx():
                pred = model(X[te]).argmax(1)
    assert model.deq.last_solution.stats["abs_residual"].dtype == torch.float32
    return float((pred == y[te]).float().mean()) * 100


def test_digits_bf16_autocast_matches_float32_accuracy():
    acc32 = _train_digits(autocast=False)
    acc16 = _train_digits(autocast=True)
    assert acc32 > 85, acc32
    assert acc16 >= acc32 - 1.0, (acc16, acc32)


def test_tolerance_below_dtype_precision_warns():
    import deqkit._fixed_point as fp
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with BF16, pytest.warns(fp.ToleranceWarning, match="bfloat16"):
        _solve(lambda z, a: torch.tanh(0.5 * lin(z) + a), x, rtol=1e-5)


def test_grad_scaler_overflow_skips_the_step_without_a_solve():
    """An overflowed scaled gradient reaches the parameters as inf/NaN (no linear solve, no
    warning) so ``GradScaler`` skips the optimiser step and lowers its scale; a finite scale
    then trains normally and the scaled implicit gradient equals the unscaled one."""
    torch.manual_seed(0)
    cell = Cell(8)
    x = torch.randn(4, 8)
    opt = torch.optim.SGD(cell.parameters(), lr=0.1)
    before = [p.detach().clone() for p in cell.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)  # loss * scale overflows fp32
    adj = dk.ImplicitAdjoint(dk.GMRES(rtol=1e-6), on_failure="raise")
    sol = dk.fixed_point(cell, torch.zeros(4, 8), solver=dk.Anderson(rtol=1e-6, atol=0),
                         adjoint=adj, args=(x,), max_steps=60)
    scaler.scale(sol.value.square().sum() * 4.0).backward()
    assert bool(sol.backward["nonfinite_grad"].all()) and sol.backward["nmatvec"] == 0
    assert not all(bool(p.grad.isfinite().all()) for p in cell.parameters())
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(cell.parameters(), before))  # skipped
    assert scaler.get_scale() == 2.0**126

    def grads(scale):
        cell.zero_grad()
        s = dk.fixed_point(cell, torch.zeros(4, 8), solver=dk.Anderson(rtol=1e-6, atol=0),
                           adjoint=adj, args=(x,), max_steps=60)
        (s.value.square().sum() * scale).backward()
        assert not bool(s.backward["nonfinite_grad"].any())
        return [p.grad / scale for p in cell.parameters()]

    for g1, g2 in zip(grads(1.0), grads(2.0**16)):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)
