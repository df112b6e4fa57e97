"""RecyclingGMRES: Krylov subspace recycling across a sequence of batched solves (GCRO)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import deqkit as dk
from deqkit.linear.recycle import RecycledSpace, RecyclingGMRES

F64 = torch.float64


def batched(A: torch.Tensor):
    """``v -> A_b v_b`` for a (B, D, D) stack (or one (D, D) matrix shared by the batch)."""
    if A.dim() == 2:
        return lambda v: v @ A.T
    return lambda v: torch.einsum("bij,bj->bi", A, v)


def true_residual(A: torch.Tensor, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(b - batched(A)(x), dim=1)


def slow_sequence(T: int = 6, B: int = 6, D: int = 80, seed: int = 0):
    """A_t,b = I - J_t,b: a fixed nonsymmetric J0 with four eigenvalues near 0.95 (0.9-0.97)
    and the rest within radius ~0.4, moved a little per step (0.01) and per sample (0.005);
    a new right-hand side every step."""
    g = torch.Generator().manual_seed(seed)
    N = 0.4 * torch.randn(D, D, generator=g, dtype=F64) / D**0.5
    V, _ = torch.linalg.qr(torch.randn(D, 4, generator=g, dtype=F64))
    J0 = N + V @ torch.diag(torch.tensor([0.9, 0.93, 0.95, 0.97], dtype=F64)) @ V.T
    for _ in range(T):
        Et = torch.randn(D, D, generator=g, dtype=F64) / D**0.5
        Eb = torch.randn(B, D, D, generator=g, dtype=F64) / D**0.5
        A = torch.eye(D, dtype=F64) - (J0 + 0.01 * Et + 0.005 * Eb)
        yield A, torch.randn(B, D, generator=g, dtype=F64)


def test_solves_meet_tolerance_against_dense_solve():
    solver = RecyclingGMRES(rtol=1e-9, recycle=4)
    for A, b in slow_sequence(T=4):
        sol = solver.solve(batched(A), b)
        exact = torch.linalg.solve(A, b)
        res = true_residual(A, sol.value, b)
        assert sol.all_converged
        assert bool((res <= 1e-9 * b.norm(dim=1) * (1 + 1e-6)).all())
        # the reported residual is the true one
        torch.testing.assert_close(sol.residual, res, rtol=1e-6, atol=1e-14)
        torch.testing.assert_close(sol.value, exact, rtol=0, atol=1e-6)
    assert solver.space.basis is not None and solver.space.nsolve == 4


@pytest.mark.parametrize("kwargs", [{}, {"restart": 5, "max_steps": 200},
                                    {"orthogonalization": "mgs", "atol": 1e-8}])
def test_first_call_equals_gmres(kwargs):
    A, b = next(slow_sequence(T=1))
    rec = RecyclingGMRES(rtol=1e-10, **kwargs).solve(batched(A), b)
    gm = dk.GMRES(rtol=1e-10, **{"atol": 0.0, **kwargs}).solve(batched(A), b)
    for field in ("value", "residual", "converged", "nstep", "inv_norm"):
        assert torch.equal(getattr(rec, field), getattr(gm, field)), field
    assert rec.nmatvec == gm.nmatvec


def test_recycling_saves_matvecs_on_a_slowly_varying_sequence():
    rec, gm = RecyclingGMRES(rtol=1e-8, recycle=4), dk.GMRES(rtol=1e-8, atol=0.0)
    costs = []
    for A, b in slow_sequence(T=6):
        s_rec, s_gm = rec.solve(batched(A), b), gm.solve(batched(A), b)
        assert s_rec.all_converged and s_gm.all_converged
        assert bool((true_residual(A, s_rec.value, b) <= 1e-8 * b.norm(dim=1) * 1.01).all())
        costs.append((s_rec.nmatvec, s_gm.nmatvec, rec.space.last_setup_matvecs))
    assert costs[0][0] == costs[0][1] and costs[0][2] == 0  # first call: plain GMRES
    assert all(c[2] == 4 for c in costs[1:])  # the k products A Y are counted in nmatvec
    total_rec, total_gm = sum(c[0] for c in costs[1:]), sum(c[1] for c in costs[1:])
    assert total_rec <= 0.85 * total_gm, costs  # measured 0.77
    assert float(rec.space.weights.min()) > 0.9  # the slow space is shared by the samples


def test_gcro_update_leaves_the_residual_orthogonal_to_C(monkeypatch):
    # x + V y - U B y: the residual r - V H y is orthogonal to C by itself; the projection
    # after each restart's true residual only removes rounding
    from deqkit.linear import recycle

    seen, project = [], recycle._Deflation.project

    def spy(self, x, r, rows=None):
        if rows is not None:  # after a restart's true residual
            c = torch.bmm(r.unsqueeze(1), self.C.transpose(1, 2)).squeeze(1)
            seen.append(float((c.norm(dim=1) / x.norm(dim=1)).max()))  # rounding: eps |A| |x|
        return project(self, x, r, rows)

    monkeypatch.setattr(recycle._Deflation, "project", spy)
    solver = RecyclingGMRES(rtol=1e-10, restart=8, max_steps=300, recycle=4)
    for A, b in slow_sequence(T=3):
        assert solver.solve(batched(A), b).all_converged
    assert len(seen) > 5 and max(seen) < 1e-13, seen


def test_reset_forgets_the_space():
    solver = RecyclingGMRES(rtol=1e-10, recycle=3)
    seq = slow_sequence(T=3)
    A, b = next(seq)
    solver.solve(batched(A), b)
    assert solver.space.basis.shape == (80, 3)
    A, b = next(seq)
    solver.solve(batched(A), b)
    assert solver.space.last_setup_matvecs == 3 and solver.space.nsolve == 2
    solver.reset()
    assert solver.space.basis is None and solver.space.nsolve == 0
    A, b = next(seq)
    sol, gm = solver.solve(batched(A), b), dk.GMRES(rtol=1e-10, atol=0.0).solve(batched(A), b)
    assert torch.equal(sol.value, gm.value) and sol.nmatvec == gm.nmatvec


def test_stale_space_is_dropped_when_D_or_dtype_changes():
    solver = RecyclingGMRES(rtol=1e-10, recycle=3)
    A, b = next(slow_sequence(T=1, D=40))
    solver.solve(batched(A), b)
    assert solver.space.basis.shape == (40, 3)
    A2, b2 = next(slow_sequence(T=1, D=30, seed=1))
    sol = solver.solve(batched(A2), b2)  # other D: runs cold, learns a new space
    gm = dk.GMRES(rtol=1e-10, atol=0.0).solve(batched(A2), b2)
    assert torch.equal(sol.value, gm.value) and solver.space.basis.shape == (30, 3)
    A3, b3 = A2.float(), b2.float()
    sol = solver.solve(batched(A3), b3)  # other dtype: same
    assert sol.value.dtype == torch.float32 and solver.space.basis.dtype == torch.float32
    assert sol.nmatvec == dk.GMRES(rtol=1e-10, atol=0.0).solve(batched(A3), b3).nmatvec


def test_copies_made_by_replace_share_the_space():
    solver = RecyclingGMRES(rtol=1e-6)
    other = dataclasses.replace(solver, rtol=0.0, atol=1.0)  # as rtol_from_forward does
    assert other.space is solver.space and other == dataclasses.replace(other)
    assert "space" not in repr(solver)


def test_deflated_guess_alone_is_checked_with_one_true_residual():
    D = 12
    d = torch.linspace(0.05, 1.0, D, dtype=F64)
    solver = RecyclingGMRES(rtol=1e-10, recycle=3)
    solver.space.basis = torch.eye(D, dtype=F64)[:, :3]  # an exact invariant subspace
    b = torch.zeros(2, D, dtype=F64)
    b[0, 0], b[1, :3] = 1.0, torch.tensor([1.0, -2.0, 3.0], dtype=F64)
    sol = solver.solve(lambda v: v * d, b)
    assert sol.all_converged and sol.nstep.tolist() == [0, 0]
    assert sol.nmatvec == 3 + 1  # the products A Y, one true residual
    torch.testing.assert_close(sol.value, b / d)
    assert sol.inv_norm is None  # no estimate with a recycled space


def test_rank_deficient_space_falls_back_to_gmres_for_that_sample():
    D = 10
    solver = RecyclingGMRES(rtol=1e-10, recycle=2)
    solver.space.basis = torch.eye(D, dtype=F64)[:, :2]
    d = torch.stack([torch.linspace(0.5, 1.0, D, dtype=F64)] * 2)
    d[1, 1] = 0.0  # sample 1: singular on the recycled space (A Y rank-deficient)
    b = torch.randn(2, D, dtype=F64, generator=torch.Generator().manual_seed(3))
    b[1, 1] = 0.0  # consistent
    sol = solver.solve(lambda v: v * d, b)
    assert sol.all_converged and torch.isfinite(sol.value).all()
    torch.testing.assert_close(sol.value[0], b[0] / d[0])
    torch.testing.assert_close(sol.value[1, d[1] > 0], b[1, d[1] > 0] / d[1, d[1] > 0])


def test_unconverged_solve_reports_it():
    solver = RecyclingGMRES(rtol=1e-12, max_steps=3, recycle=2)
    for A, b in slow_sequence(T=2):
        sol = solver.solve(batched(A), b)
        assert not bool(sol.converged.any()) and bool((sol.nstep == 3).all())
        torch.testing.assert_close(sol.residual, true_residual(A, sol.value, b))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"recycle": 0}, r"`recycle` must be an int >= 1, got 0\. Pass e\.g\. recycle=4"),
     ({"recycle": 2.0}, r"`recycle` must be an int >= 1, got 2\.0"),
     ({"restart": 0}, r"`restart` must be an int >= 1, got 0"),
     ({"max_steps": -1}, r"`max_steps` must be an int >= 1"),
     ({"rtol": -1e-6}, r"`rtol` must be a finite float >= 0"),
     ({"orthogonalization": "qr"}, r"`orthogonalization` must be one of 'mgs', 'cgs2'"),
     ({"space": {}}, r"`space` must be a RecycledSpace")],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=rf"^RecyclingGMRES: {match}"):
        RecyclingGMRES(**kwargs)


def test_preconditioner_is_refused_clearly():
    assert RecyclingGMRES.supports_preconditioner is False
    b = torch.ones(1, 3, dtype=F64)
    with pytest.raises(ValueError, match="RecyclingGMRES: got a `preconditioner`"):
        RecyclingGMRES().solve(lambda v: 2 * v, b, preconditioner=lambda v: v / 2)
    assert isinstance(RecyclingGMRES().space, RecycledSpace)


def _tanh_grads(adjoint: dk.ImplicitAdjoint, steps: int = 3) -> list[torch.Tensor]:
    """Gradients of a tanh DEQ at a few consecutive parameter values (a tiny training run)."""
    g = torch.Generator().manual_seed(0)
    D, B = 24, 5
    W0 = torch.randn(D, D, generator=g, dtype=F64)
    W0 = 0.9 * W0 / torch.linalg.matrix_norm(W0, 2)
    U = torch.randn(D, 3, generator=g, dtype=F64)
    grads = []
    for t in range(steps):
        W = (W0 * (1 + 0.01 * t)).requires_grad_(True)
        x = torch.randn(B, 3, generator=g, dtype=F64)
        sol = dk.fixed_point(lambda z, W=W, x=x: torch.tanh(z @ W.T + x @ U.T),
                             torch.zeros(B, D, dtype=F64),
                             solver=dk.Anderson(rtol=1e-12, atol=0), adjoint=adjoint)
        (gW,) = torch.autograd.grad(sol.value.pow(3).sum(), W)
        grads.append(gW)
    return grads


@pytest.mark.parametrize("kwargs", [{}, {"reuse_forward": True}, {"rtol_from_forward": True}])
def test_implicit_adjoint_gradient_matches_gmres(kwargs):
    # reuse_forward: the forward's estimate M is composed into the operator (A M, from M g),
    # since RecyclingGMRES refuses preconditioners; rtol_from_forward: per-sample copies of
    # the solver (dataclasses.replace) that share the space
    solver = RecyclingGMRES(rtol=1e-10, recycle=4)
    rec = _tanh_grads(dk.ImplicitAdjoint(solver, **kwargs))
    ref = _tanh_grads(dk.ImplicitAdjoint(dk.GMRES(rtol=1e-10)))
    assert solver.space.nsolve == 3  # the adjoint's solver saw the sequence
    for a, b in zip(rec, ref):
        assert float((a - b).norm() / b.norm()) < 1e-8


@pytest.mark.parametrize("B", [2, 30])  # exact Gram eigh (6 candidates); randomized (90)
def test_pooling_keeps_the_directions_the_samples_share(B):
    from deqkit.linear.recycle import _pool

    g = torch.Generator().manual_seed(1)
    D = 50
    shared, _ = torch.linalg.qr(torch.randn(D, 2, generator=g, dtype=F64))
    mix = torch.randn(B, 2, 2, generator=g, dtype=F64)  # each sample: some basis of span
    own = torch.randn(B, 1, D, generator=g, dtype=F64)  # plus a direction of its own
    cand = torch.cat([mix @ shared.T, own], dim=1)
    cand[0, 2] = 0.0  # a missing candidate (zero row) is ignored
    Y, weights = _pool(cand, 3)
    assert Y.shape == (D, 3)
    torch.testing.assert_close(Y.T @ Y, torch.eye(3, dtype=F64))
    top = Y[:, :2]
    # in the shared span (the randomized iteration: to (lambda_7 / lambda_2)^4.5 ~ 1e-6)
    torch.testing.assert_close(shared @ (shared.T @ top), top, rtol=0, atol=1e-5)
    torch.testing.assert_close(weights[:2], torch.ones(2, dtype=F64))
    assert float(weights[2]) < (0.9 if B == 2 else 0.2)
