"""Forward solves: exact answers, per-sample stopping, failure reporting."""

from __future__ import annotations

import pytest
import torch

import deqkit as dk
from helpers import F64, contractive_matrix, linear_fixed_point, linear_problem, tight_solvers


@pytest.mark.parametrize("solver", tight_solvers(), ids=repr)
def test_linear_deq_closed_form(solver):
    # z* = (I - W)^{-1} (U x + b) exists and is unique because ||W||_2 < 1 (Banach).
    W, U, b, x = linear_problem(B=5, d=8, n=3, norm=0.8)
    z_true = linear_fixed_point(W, U, b, x)
    sol = dk.fixed_point(
        lambda z, x: z @ W.T + x @ U.T + b, torch.zeros(5, 8, dtype=F64), solver, args=(x,),
        max_steps=400,
    )
    assert sol.result is dk.RESULTS.successful
    torch.testing.assert_close(sol.value, z_true, rtol=0, atol=1e-10)
    # The reported residual is that of the returned value.
    res = (sol.value @ W.T + x @ U.T + b - sol.value).norm(dim=1)
    torch.testing.assert_close(sol.stats["abs_residual"], res, rtol=1e-6, atol=1e-14)
    assert bool((sol.stats["rel_residual"] <= 1e-12).all())


@pytest.mark.parametrize("solver", tight_solvers(1e-11), ids=repr)
def test_nonlinear_solvers_agree(solver):
    g = torch.Generator().manual_seed(1)
    W = contractive_matrix(10, 0.9, symmetric=True, gen=g)
    x = torch.randn(6, 10, dtype=F64, generator=g)
    f = lambda z: torch.tanh(z @ W.T + x)  # noqa: E731
    ref = dk.fixed_point(f, torch.zeros_like(x), dk.Picard(rtol=1e-14, atol=0), max_steps=2000)
    sol = dk.fixed_point(f, torch.zeros_like(x), solver, max_steps=500)
    torch.testing.assert_close(sol.value, ref.value, rtol=0, atol=1e-9)
    assert int(sol.stats["nfev"]) >= int(sol.stats["nstep"].max())


def test_accelerated_solvers_beat_picard_on_hard_problem():
    g = torch.Generator().manual_seed(2)
    W = contractive_matrix(40, 0.98, symmetric=True, gen=g)
    x = 0.1 * torch.randn(4, 40, dtype=F64, generator=g)
    f = lambda z: z @ W.T + x  # noqa: E731  (linear: rho(J) = 0.98)
    steps = {}
    for s in (dk.Picard(rtol=1e-8, atol=0), dk.Anderson(rtol=1e-8, atol=0, m=10),
              dk.Broyden(rtol=1e-8, atol=0)):
        sol = dk.fixed_point(f, torch.zeros_like(x), s, max_steps=2000)
        steps[type(s).__name__] = int(sol.stats["nstep"].max())
    assert steps["Anderson"] * 4 < steps["Picard"]
    assert steps["Broyden"] * 4 < steps["Picard"]


def test_banach_rate_for_picard():
    # For a symmetric contraction with constant L, ||z_k - z*|| <= L^k ||z_0 - z*||.
    L = 0.6
    g = torch.Generator().manual_seed(3)
    W = contractive_matrix(7, L, symmetric=True, gen=g)
    x = torch.randn(3, 7, dtype=F64, generator=g)
    z_true = linear_fixed_point(W, torch.eye(7, dtype=F64), torch.zeros(7, dtype=F64), x)
    z0 = torch.randn(3, 7, dtype=F64, generator=g)
    e0 = (z0 - z_true).norm(dim=1)
    for k in range(1, 15):
        sol = dk.fixed_point(lambda z: z @ W.T + x, z0, dk.Picard(rtol=1e-15, atol=0),
                             max_steps=k, throw=False)
        assert sol.result is dk.RESULTS.max_steps_reached
        ek = (sol.value - z_true).norm(dim=1)
        assert bool((ek <= L**k * e0 * (1 + 1e-9)).all()), k
        assert bool((sol.stats["nstep"] == k).all())


def test_expansive_map_is_reported_diverged():
    f = lambda z: 2.0 * z + 1.0  # noqa: E731  Lipschitz constant 2: no convergence
    z0 = torch.zeros(3, 4, dtype=F64)
    sol = dk.fixed_point(f, z0, dk.Picard(), max_steps=200, throw=False)
    assert sol.result is dk.RESULTS.diverged
    assert not bool(sol.stats["converged"].any())
    assert bool(torch.isfinite(sol.value).all())
    # The returned value is the lowest-residual iterate (here z0, residual 1 per entry).
    torch.testing.assert_close(sol.value, z0)
    torch.testing.assert_close(sol.stats["abs_residual"], torch.full((3,), 2.0, dtype=F64))
    with pytest.raises(dk.SolverError, match="diverged"):
        dk.fixed_point(f, z0, dk.Picard(), max_steps=200)
    with pytest.raises(RuntimeError, match="max_steps"):
        dk.fixed_point(f, z0, dk.Picard(), max_steps=5)  # too few steps to see divergence


def test_nonfinite_sample_is_isolated():
    x = torch.tensor([[0.5], [1.0], [-2.0]], dtype=F64)

    def f(z, x):  # sample with x < 0 produces NaN (log of a negative number)
        return 0.5 * z + torch.log(x.abs() + 1) * torch.sign(x) + torch.where(
            x < 0, torch.log(-torch.ones_like(z)), torch.zeros_like(z))

    sol = dk.fixed_point(f, torch.zeros(3, 1, dtype=F64), dk.Anderson(rtol=1e-10, atol=0),
                         args=(x,), throw=False)
    assert sol.result is dk.RESULTS.nonfinite
    assert sol.stats["status"].tolist() == [0, 0, 4]
    assert bool(torch.isfinite(sol.value).all())
    torch.testing.assert_close(sol.value[:2], 2 * torch.log(x[:2] + 1))
    with pytest.raises(dk.SolverError, match="non-finite"):
        dk.fixed_point(f, torch.zeros(3, 1, dtype=F64), args=(x,))


@pytest.mark.parametrize("use_args", [True, False])
@pytest.mark.parametrize("solver", [dk.Picard(rtol=1e-10, atol=0), dk.Anderson(rtol=1e-10, atol=0),
                                    dk.Broyden(rtol=1e-10, atol=0)], ids=repr)
def test_per_sample_stopping(solver, use_args):
    # Sample 0 is easy (weak coupling), sample 1 hard (strong coupling).
    g = torch.Generator().manual_seed(4)
    W = contractive_matrix(12, 1.0, symmetric=True, gen=g)
    scale = torch.tensor([[0.05], [0.95], [0.5]], dtype=F64)
    x = torch.randn(3, 12, dtype=F64, generator=g)

    def f(z, x, s):
        return torch.tanh(s * (z @ W.T) + x)

    z0 = torch.zeros(3, 12, dtype=F64)
    if use_args:
        sol = dk.fixed_point(f, z0, solver, args=(x, scale), max_steps=500)
    else:
        sol = dk.fixed_point(lambda z: f(z, x, scale), z0, solver, max_steps=500)
    n = sol.stats["nstep"]
    assert int(n[0]) < int(n[2]) < int(n[1])
    for i in range(3):
        alone = dk.fixed_point(lambda z, i=i: f(z, x[i:i + 1], scale[i:i + 1]), z0[i:i + 1],
                               solver, max_steps=500)
        assert int(alone.stats["nstep"][0]) == int(n[i])
        torch.testing.assert_close(sol.value[i:i + 1], alone.value, rtol=0, atol=1e-13)
    if use_args:  # converged samples were dropped from the batch: fewer sample-evaluations
        assert int(sol.stats["nfev_samples"]) < 3 * int(sol.stats["nfev"])
    else:
        assert int(sol.stats["nfev_samples"]) == 3 * int(sol.stats["nfev"])


def test_compaction_saves_evaluations_and_matches_masking():
    g = torch.Generator().manual_seed(5)
    W = contractive_matrix(16, 0.9, gen=g)
    x = torch.randn(32, 16, dtype=F64, generator=g)
    s = torch.linspace(0.05, 1.0, 32, dtype=F64).unsqueeze(1)
    f = lambda z, x, s: torch.tanh(s * (z @ W.T) + x)  # noqa: E731
    z0 = torch.zeros(32, 16, dtype=F64)
    a = dk.fixed_point(f, z0, dk.Anderson(rtol=1e-10, atol=0), args=(x, s), compact=True)
    b = dk.fixed_point(f, z0, dk.Anderson(rtol=1e-10, atol=0), args=(x, s), compact=False)
    torch.testing.assert_close(a.value, b.value, rtol=0, atol=1e-12)
    assert torch.equal(a.stats["nstep"], b.stats["nstep"])
    assert int(a.stats["nfev_samples"]) < 0.8 * int(b.stats["nfev_samples"])


def test_lowest_residual_iterate_returned():
    # Damped rotation by more than 90 degrees: Picard residuals oscillate in size.
    c, s_ = torch.cos(torch.tensor(2.5)), torch.sin(torch.tensor(2.5))
    R = 0.99 * torch.tensor([[c, -s_], [s_, c]], dtype=F64)
    z0 = torch.tensor([[1.0, 0.3]], dtype=F64)
    sol = dk.fixed_point(lambda z: z @ R.T, z0, dk.Picard(rtol=1e-12, atol=0), max_steps=7,
                         throw=False, trace=True)
    tr = sol.stats["trace"][:, 0]
    assert tr.shape == (8,)
    best = int(torch.argmin(tr))
    zs = [z0]
    for _ in range(7):
        zs.append(zs[-1] @ R.T)
    torch.testing.assert_close(sol.value, zs[best])
    torch.testing.assert_close(sol.stats["abs_residual"][0], tr[best])


def test_trace_is_nan_after_stop():
    f = lambda z, s: s * z + 1.0  # noqa: E731
    s = torch.tensor([[0.01], [0.9]], dtype=F64)
    sol = dk.fixed_point(f, torch.zeros(2, 1, dtype=F64), dk.Picard(rtol=1e-8, atol=0),
                         args=(s,), trace=True, max_steps=500)
    tr = sol.stats["trace"]
    n0 = int(sol.stats["nstep"][0])
    assert torch.isfinite(tr[: n0 + 1, 0]).all() and torch.isnan(tr[n0 + 1:, 0]).all()
    assert tr.shape[0] == int(sol.stats["nstep"].max()) + 1


def test_tuple_state():
    g = torch.Generator().manual_seed(6)
    A = contractive_matrix(5, 0.4, gen=g)
    Bm = torch.randn(5, 5, 3, dtype=F64, generator=g) * 0.05
    x = torch.randn(4, 5, dtype=F64, generator=g)

    def f(z):
        a, b = z  # a: (B, 5), b: (B, 3, 2)
        a_new = torch.tanh(a @ A.T + b.sum(-1).sum(-1, keepdim=True) * 0.1 + x)
        b_new = torch.tanh(torch.einsum("bi,ijk->bjk", a, Bm)[:, :3, :2] + 0.3 * b)
        return a_new, b_new

    z0 = (torch.zeros(4, 5, dtype=F64), torch.zeros(4, 3, 2, dtype=F64))
    sol = dk.fixed_point(f, z0, dk.Anderson(rtol=1e-12, atol=0))
    a, b = sol.value
    fa, fb = f((a, b))
    torch.testing.assert_close(fa, a, atol=1e-10, rtol=0)
    torch.testing.assert_close(fb, b, atol=1e-10, rtol=0)
    assert b.shape == (4, 3, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_cells_keep_float32_solver_state(dtype):
    W = contractive_matrix(8, 0.5, dtype=torch.float32)
    x = torch.randn(3, 8)
    seen = []

    def f(z):
        seen.append(z.dtype)
        return torch.tanh(z @ W.T.to(dtype) + x.to(dtype))

    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    sol = dk.fixed_point(f, torch.zeros(3, 8, dtype=dtype), dk.Anderson(rtol=tol, atol=0))
    assert sol.value.dtype == dtype
    assert set(seen) == {dtype}
    assert sol.stats["abs_residual"].dtype == torch.float32


@pytest.mark.parametrize(("name", "cls"), [
    ("picard", "Picard"), ("anderson", "Anderson"), ("broyden", "Broyden"),
    ("newton_krylov", "NewtonKrylov"), ("Newton-Krylov", "NewtonKrylov"),
])
def test_string_solver_names_are_deprecated(name, cls):
    x = torch.randn(2, 3, dtype=F64)
    msg = rf"solver='{name}' is deprecated.*solver=dk\.{cls}\(\)"
    with pytest.warns(DeprecationWarning, match=msg) as caught:
        sol = dk.fixed_point(lambda z: 0.5 * torch.tanh(z) + x, torch.zeros_like(x), name)
    assert sol.result is dk.RESULTS.successful
    assert caught[0].filename == __file__  # attributed to the caller, not to deqkit
    with pytest.warns(DeprecationWarning, match=msg):
        layer = dk.nn.DEQ(lambda z, x: 0.5 * torch.tanh(z) + x, solver=name)
    assert type(layer.solver).__name__ == cls


def test_unknown_solver_name():
    x = torch.randn(2, 3, dtype=F64)
    with pytest.raises(ValueError, match=r"Unknown solver .andersen.*dk\.Anderson.*anderson"):
        dk.fixed_point(lambda z: z, x, "andersen")


class _Custom(dk.AbstractFixedPointSolver):
    """A user-defined solver: Picard with a fixed 0.5 damping, written in a few lines."""

    rtol = 1e-10
    atol = 0.0

    def step(self, fn, z, fz, r, state):
        return z + 0.5 * r, None, state


def test_user_defined_solver_plugs_in():
    x = torch.randn(2, 3, dtype=F64)
    sol = dk.fixed_point(lambda z: 0.5 * z + x, torch.zeros_like(x), _Custom(), max_steps=200)
    torch.testing.assert_close(sol.value, 2 * x)


def test_zero_max_steps_evaluates_initial_guess():
    x = torch.ones(2, 3, dtype=F64)
    sol = dk.fixed_point(lambda z: z, x, max_steps=0)
    assert sol.result is dk.RESULTS.successful
    with torch.no_grad():
        sol = dk.fixed_point(lambda z: 0.5 * z, x, max_steps=0, throw=False)
    assert sol.result is dk.RESULTS.max_steps_reached
    assert int(sol.stats["nfev"]) == 1


def test_anderson_singular_gram_falls_back_to_plain_step():
    # Identical residuals make the Gram matrix exactly singular; with no regularisation the
    # small solve fails and that sample must take a plain step instead of producing NaN.
    # f(z) = z + 1: every residual is the same vector while the f values differ.
    solver = dk.Anderson(m=3, regularisation=0.0)
    z = torch.zeros(2, 4, dtype=F64)
    state = solver.init(None, z, z + 1, torch.ones_like(z), max_steps=10)
    with torch.no_grad():
        for k in range(3):
            z = torch.full((2, 4), float(k), dtype=F64)
            z_next, _, state = solver.step(None, z, z + 1, torch.ones_like(z), state)
    assert bool(torch.isfinite(z_next).all())
    torch.testing.assert_close(z_next, z + 1)  # the plain step from the newest iterate


def test_oscillation_is_reported_as_stagnated():
    # A reflection z -> -z + x is non-expansive (Lipschitz 1): Picard oscillates forever
    # between two points, the residual never improves and never blows up.
    x = torch.ones(2, 3, dtype=F64)
    x[1] = 0.5
    sol = dk.fixed_point(lambda z: -z + x, torch.zeros_like(x), dk.Picard(), max_steps=100,
                         throw=False, patience=5)
    assert sol.result is dk.RESULTS.stagnated
    assert sol.stats["status"].tolist() == [2, 2]
    assert int(sol.stats["nstep"].max()) <= 6
    with pytest.raises(dk.SolverError, match=r"stagnated.*oscillating"):
        dk.fixed_point(lambda z: -z + x, torch.zeros_like(x), dk.Picard(), patience=5)
    # Damping fixes it: z = (z + (-z + x)) / 2 = x / 2 in one step.
    sol = dk.fixed_point(lambda z: -z + x, torch.zeros_like(x), dk.Picard(damping=0.5),
                         patience=5)
    torch.testing.assert_close(sol.value, x / 2)
    # Without patience the same run just reaches max_steps.
    sol = dk.fixed_point(lambda z: -z + x, torch.zeros_like(x), dk.Picard(), max_steps=30,
                         throw=False)
    assert sol.result is dk.RESULTS.max_steps_reached


def _rotation_problem():
    # A contraction with rate 0.995 whose Jacobian has eigenvalues spread around a circle of
    # radius ~0.995: hard for Anderson with a short memory, easy for Newton-Krylov.
    import math

    d = 20
    R = torch.zeros(d, d, dtype=F64)
    for i in range(d // 2):
        th = 0.3 + 2.5 * i / (d // 2)
        R[2 * i:2 * i + 2, 2 * i:2 * i + 2] = torch.tensor(
            [[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    R = 0.995 * R
    x = torch.randn(4, d, dtype=F64, generator=torch.Generator().manual_seed(0))
    return (lambda z, x: torch.tanh(z @ R.T + x)), x


@pytest.mark.parametrize("use_args", [True, False])
def test_fallback_chain_recovers_what_anderson_fails(use_args):
    f, x = _rotation_problem()
    z0 = torch.zeros_like(x)
    anderson = dk.Anderson(rtol=1e-8, atol=0)
    alone = dk.fixed_point(f, z0, anderson, args=(x,), max_steps=50, throw=False)
    assert alone.result is dk.RESULTS.max_steps_reached
    failed = ~alone.stats["converged"]
    chain = dk.FallbackChain(anderson, dk.NewtonKrylov(rtol=1e-8, atol=0), max_steps=(50, 20))
    if use_args:
        sol = dk.fixed_point(f, z0, chain, args=(x,))
    else:
        sol = dk.fixed_point(lambda z: f(z, x), z0, chain)
    assert sol.result is dk.RESULTS.successful
    assert sol.stats["solver_index"].tolist() == failed.long().tolist()
    assert sol.stats["attempts"].tolist() == (1 + failed.long()).tolist()
    ref = dk.fixed_point(f, z0, dk.NewtonKrylov(rtol=1e-12, atol=0), args=(x,), max_steps=30)
    torch.testing.assert_close(sol.value, ref.value, rtol=0, atol=1e-7)
    # Converged-first-time samples keep Anderson's own result.
    torch.testing.assert_close(sol.value[~failed], alone.value[~failed], rtol=0, atol=1e-14)
    assert bool((sol.stats["nstep"][failed] > 50).all())
    with pytest.raises(ValueError, match="at least two solvers"):
        dk.FallbackChain(anderson)
    with pytest.raises(ValueError, match="one int per solver"):
        dk.FallbackChain(anderson, anderson, max_steps=(3,))


def test_broyden_secant_condition_holds_across_memory_restart():
    # After every update (including the one that restarts a full memory) the inverse
    # Jacobian estimate must satisfy the secant condition H y = s for the newest pair.
    from deqkit.solvers.broyden import _hv

    g = torch.Generator().manual_seed(7)
    W = contractive_matrix(12, 0.9, gen=g)
    x = torch.randn(3, 12, dtype=F64, generator=g)

    def f(z):
        return torch.tanh(z @ W.T + x)

    solver = dk.Broyden(memory=3)
    z = torch.zeros_like(x)
    fz = f(z)
    state = solver.init(f, z, fz, fz - z, 50)
    prev_z, prev_r = z, fz - z
    with torch.no_grad():
        for k in range(8):
            z_new, _, state = solver.step(f, z, fz, fz - z, state)
            if k > 0:
                s = z - prev_z
                y = (fz - z) - prev_r
                hy = _hv(state.U[:, :state.n], state.V[:, :state.n], y)
                torch.testing.assert_close(hy, s, rtol=1e-8, atol=1e-10)
            prev_z, prev_r = z, fz - z
            z, fz = z_new, f(z_new)


def test_newton_krylov_safeguard_when_newton_system_is_singular():
    # f(z) = sin(z) + 0.1 has J = cos(0) = 1 at z0 = 0, so I - J is singular there: the inner
    # GMRES cannot solve the Newton system and the solver must fall back to a plain step.
    f = lambda z: torch.sin(z) + 0.1  # noqa: E731
    z0 = torch.zeros(2, 3, dtype=F64)
    sol = dk.fixed_point(f, z0, dk.NewtonKrylov(rtol=1e-12, atol=0), max_steps=40)
    torch.testing.assert_close(f(sol.value), sol.value, rtol=0, atol=1e-11)


def test_anderson_gram_row_forms_agree():
    """The two forms of Anderson's Gram row (vector-matrix on the CPU, matrix-vector on
    accelerators) give the same inner products, also on a strided slice of the history."""
    from deqkit.solvers.anderson import _gram_row

    g = torch.Generator().manual_seed(0)
    G = torch.randn(6, 5, 33, dtype=torch.float64, generator=g)
    r = torch.randn(6, 33, dtype=torch.float64, generator=g)
    for hist in (G, G[:, :3]):
        ref = torch.einsum("wd,wnd->wn", r, hist).unsqueeze(1)
        for matvec in (False, True):
            torch.testing.assert_close(_gram_row(r, hist, matvec), ref, rtol=1e-12, atol=1e-12)


def test_anderson_history_buffers_reused_only_between_finished_solves():
    """CPU solves outside autograd reuse the last finished solve's history buffers (page
    faults); a solve nested inside another one's f gets its own; results are unchanged."""
    from deqkit.solvers import anderson

    torch.manual_seed(0)
    W = 0.4 * torch.randn(6, 6, dtype=torch.float64) / 6 ** 0.5
    b = torch.randn(5, 6, dtype=torch.float64)
    solver = dk.Anderson(m=3, rtol=1e-12, atol=0)

    def solve(f):
        with torch.no_grad():
            return dk.fixed_point(f, torch.zeros_like(b), solver, max_steps=60).value

    def outer(z):  # its f runs an inner solve of the same shape (a nested solve)
        inner = solve(lambda y: torch.tanh(y @ W.T + 0.5 * z))
        return torch.tanh(z @ W.T + b) + 0.1 * inner

    anderson._POOL.clear()
    ref = solve(outer)
    assert len(anderson._POOL) == 1  # the finished solves gave their buffers back
    (F, _), = anderson._POOL.values()
    ptr = F.data_ptr()
    again = solve(outer)  # reuses them (history slots hold stale values of the last solve)
    assert torch.equal(again, ref)
    seen = []
    original = anderson._history_buffers

    def spy(z, fz, m):
        F, G, lease = original(z, fz, m)
        seen.append(F.data_ptr())
        return F, G, lease

    anderson._history_buffers = spy
    try:
        solve(outer)
    finally:
        anderson._history_buffers = original
    assert seen[0] == ptr  # the outer solve got the pooled buffers
    assert len(seen) > 2 and seen[0] not in seen[1:]  # nested solves never share them
    z = torch.zeros_like(b)
    for _ in range(200):  # the fixed point by plain iteration
        z = outer(z)
    assert torch.allclose(ref, z, atol=1e-10)
    with torch.enable_grad():  # differentiable solves never use the pool
        _, _, lease = anderson._history_buffers(b.requires_grad_(), b, 3)
    assert lease is None
