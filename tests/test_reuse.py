"""Reusing the forward solve in the backward: the solvers' inverse estimates, their plumbing
through the engine, ImplicitAdjoint(reuse_forward / rtol_from_forward), SHINEAdjoint and the
a-posteriori error estimates."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import deqkit as dk
from deqkit._fixed_point import _options
from deqkit._primal import Primal
from deqkit._problem import make_problem
from helpers import F64, contractive_matrix


def _steps(solver, f, z, n):
    """Run ``n`` solver steps by hand; return the state and the (z, r) seen by each step."""
    state, seen, fz = None, [], f(z)
    for _ in range(n):
        r = fz - z
        seen.append((z, r))
        state = state or solver.init(f, z, fz, r, 100)
        z, _, state = solver.step(f, z, fz, r, state)
        fz = f(z)
    return state, seen


def _apply(factors, v):
    U, V = factors
    return v + torch.einsum("bdn,ben,be->bd", U, V, v)


def _linear(d=10, B=3, norm=0.9, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = contractive_matrix(d, norm, gen=g)
    b = torch.randn(B, d, dtype=F64, generator=g)
    inv = torch.linalg.inv(torch.eye(d, dtype=F64) - A)
    return (lambda z: z @ A.T + b), inv


def test_anderson_estimate_is_exact_on_the_history_of_a_linear_map():
    f, inv = _linear()
    solver = dk.Anderson(m=6, rtol=1e-30, atol=0.0, regularisation=0.0)
    state, seen = _steps(solver, f, torch.zeros(3, 10, dtype=F64), 6)
    factors = solver.inverse_estimate(state, torch.arange(3))
    assert factors[0].shape == (3, 10, 5)
    for j in range(len(seen) - 1):  # every residual difference in the history
        w = -(seen[j + 1][1] - seen[j][1])  # (I - A) s
        torch.testing.assert_close(_apply(factors, w), w @ inv.T, rtol=1e-9, atol=1e-12)


def test_broyden_estimate_sign_and_newest_secant_pair_on_a_linear_map():
    f, inv = _linear(seed=1)
    solver = dk.Broyden(rtol=1e-30, atol=0.0)
    state, seen = _steps(solver, f, torch.zeros(3, 10, dtype=F64), 6)
    factors = solver.inverse_estimate(state, torch.arange(3))
    assert factors[0].shape == (3, 10, 5)
    # good Broyden satisfies the newest secant equation exactly (older ones are not inherited)
    w = -(seen[-1][1] - seen[-2][1])
    torch.testing.assert_close(_apply(factors, w), w @ inv.T, rtol=1e-9, atol=1e-12)
    # sign: M = -H approximates (I - A)^{-1}, whose restriction to the explored directions
    # is far closer to M than to -M
    s = seen[-1][0] - seen[-2][0]
    assert (_apply(factors, s) - s @ inv.T).norm() < (-_apply(factors, s) - s @ inv.T).norm()


def _loop(solver, x, compact, keep_inverse=True, d=10):
    W = contractive_matrix(d, 0.9, gen=torch.Generator().manual_seed(3))

    def f(z, x):
        return torch.tanh(z @ W.T + x)

    opts = _options(200, (x,), compact, 0.75, 1e4, None, False)
    primal = Primal(make_problem(f, torch.zeros_like(x), (x,), solver, 200), solver, opts)
    return primal.run(keep_inverse=keep_inverse)


@pytest.mark.parametrize("solver", [dk.Broyden(rtol=1e-9, atol=0), dk.Anderson(rtol=1e-9, atol=0)],
                         ids=repr)
def test_keep_inverse_survives_compaction(solver):
    # samples of very different difficulty finish at different steps, so the batch compacts
    scale = torch.logspace(-4, 1, 6, dtype=F64)[:, None]
    x = scale * torch.randn(6, 10, dtype=F64, generator=torch.Generator().manual_seed(0))
    full, compacted = _loop(solver, x, False), _loop(solver, x, True)
    assert len(set(compacted.nstep.tolist())) > 1
    U, V = compacted.inverse
    assert U.shape[:2] == (6, 10) and U.shape == V.shape
    n = min(U.shape[2], full.inverse[0].shape[2])
    torch.testing.assert_close(U[..., :n], full.inverse[0][..., :n])
    torch.testing.assert_close(V[..., :n], full.inverse[1][..., :n])
    assert _loop(solver, x, True, keep_inverse=False).inverse is None


@pytest.mark.parametrize("solver", [
    dk.Picard(rtol=1e-9, atol=0),
    dk.FallbackChain(dk.Anderson(rtol=1e-9, atol=0), dk.Picard(rtol=1e-9, atol=0)),
    dk.FixedSteps(dk.Anderson(rtol=1e-9, atol=0)),
], ids=lambda s: type(s).__name__)
def test_no_inverse_without_an_estimate(solver):
    x = torch.randn(3, 10, dtype=F64)
    assert _loop(solver, x, True).inverse is None


def test_failed_samples_get_no_estimate():
    x = torch.randn(3, 10, dtype=F64)
    x[1, 0] = float("nan")
    out = _loop(dk.Broyden(rtol=1e-9, atol=0), x, True)
    assert int(out.status[1]) == dk.RESULTS.nonfinite.code
    U, V = out.inverse
    assert bool((U[1] == 0).all() and (V[1] == 0).all()) and bool(U[0].abs().sum() > 0)


# ------------------------------------------------------------------------------ the adjoints


def _cell(tuple_state, seed=0, d=12, B=5, rho=0.9, spread=False):
    """A tanh cell (a tensor state or a (d/2, d/2) tuple) near the linear regime, rho(J) ~ rho;
    ``spread``: inputs of very different sizes (samples finish at different steps)."""
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(d, d, dtype=F64, generator=g) / d**0.5
    W = (rho * W0 / torch.linalg.eigvals(W0).abs().max()).requires_grad_(True)
    x = 0.1 * torch.randn(B, d, dtype=F64, generator=g)
    if spread:
        x = x * torch.logspace(-6, 1, B, dtype=F64)[:, None]
    x.requires_grad_(True)
    h = d // 2
    if not tuple_state:
        return W, x, (lambda z, x: torch.tanh(z @ W.T + x)), torch.zeros(B, d, dtype=F64)

    def f(z, x):
        out = torch.tanh(torch.cat(z, dim=1) @ W.T + x)
        return out[:, :h], out[:, h:]

    return W, x, f, (torch.zeros(B, h, dtype=F64), torch.zeros(B, d - h, dtype=F64))


def _grad(adjoint, solver, tuple_state, seed=0, **cell):
    W, x, f, z0 = _cell(tuple_state, seed, **cell)
    sol = dk.fixed_point(f, z0, solver, adjoint, args=(x,), max_steps=300)
    value = torch.cat(sol.value, dim=1) if tuple_state else sol.value
    target = torch.linspace(-1, 1, value.shape[1], dtype=F64)
    loss = ((value - target) ** 2).sum()
    return torch.autograd.grad(loss, (W, x)), sol


FORWARD = [dk.Broyden(rtol=1e-11, atol=0, memory=60), dk.Anderson(rtol=1e-11, atol=0, m=8)]


@pytest.mark.parametrize("tuple_state", [False, True], ids=["tensor", "tuple"])
@pytest.mark.parametrize("solver", FORWARD, ids=lambda s: type(s).__name__)
def test_reuse_forward_gives_the_cold_gradient(solver, tuple_state):
    tight = dk.GMRES(rtol=1e-11, atol=0)
    cold, _ = _grad(dk.ImplicitAdjoint(tight), solver, tuple_state, spread=True)
    warm, sol = _grad(dk.ImplicitAdjoint(tight, reuse_forward=True), solver, tuple_state,
                      spread=True)
    stats = sol.stats  # samples finished at different steps and the batch was compacted
    assert int(stats["nfev_samples"]) < 5 * int(stats["nfev"]) - 5
    for a, b in zip(warm, cold):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    assert bool(sol.backward["converged"].all())


@pytest.mark.parametrize("linear", [dk.GMRES(rtol=1e-8, atol=0),
                                    dk.Neumann(rtol=1e-8, atol=0, max_steps=500)], ids=repr)
@pytest.mark.parametrize("solver", FORWARD, ids=lambda s: type(s).__name__)
def test_reuse_forward_needs_no_more_products(solver, linear):
    # rho(J) ~ 0.9 at the solution (a tanh cell near its linear regime)
    counts = {}
    for reuse in (False, True):
        _, sol = _grad(dk.ImplicitAdjoint(linear, reuse_forward=reuse), solver, False,
                       seed=1, d=48, B=8, rho=0.92)
        counts[reuse] = sol.backward["nmatvec"]
    print(f"{type(solver).__name__} + {linear}: products cold {counts[False]}, "
          f"reuse {counts[True]}")
    assert counts[True] <= counts[False], counts


@dataclasses.dataclass(frozen=True)
class _Richardson(dk.AbstractLinearSolver):
    """A linear solver written before preconditioners (its `run` takes none)."""

    rtol: float = 1e-10
    atol: float = 0.0
    max_steps: int = 500

    def run(self, op, prepared, rhs, x0):
        x = torch.zeros_like(rhs) if x0 is None else x0.clone()
        tol = self.rtol * rhs.norm(dim=1)
        for _ in range(self.max_steps):
            r = rhs - op(x)
            if bool((r.norm(dim=1) <= tol).all()):
                break
            x = x + r
        res = (rhs - op(x)).norm(dim=1)
        nstep = torch.zeros(rhs.shape[0], dtype=torch.int64)
        return dk.LinearSolution(x, res <= tol, res, nstep, op.count)


def test_reuse_forward_with_a_linear_solver_without_preconditioner_support():
    # the preconditioner is then composed with the operator: (A M^T) y = g from y0 = g
    solver = FORWARD[0]
    cold, sol_cold = _grad(dk.ImplicitAdjoint(_Richardson()), solver, False)
    warm, sol = _grad(dk.ImplicitAdjoint(_Richardson(), reuse_forward=True), solver, False)
    for a, b in zip(warm, cold):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)
    assert sol.backward["nmatvec"] < sol_cold.backward["nmatvec"]


def test_shine_is_exact_on_a_linear_map_after_enough_history():
    d = 5
    A = contractive_matrix(d, 0.8, gen=torch.Generator().manual_seed(2)).requires_grad_(True)
    x = torch.randn(3, d, dtype=F64, generator=torch.Generator().manual_seed(3))
    x.requires_grad_(True)
    solver = dk.Anderson(rtol=1e-13, atol=0, m=d + 3, regularisation=0.0)
    grads = {}
    for name, adj in (("shine", dk.SHINEAdjoint()), ("exact", dk.ImplicitAdjoint(dk.Dense()))):
        sol = dk.fixed_point(lambda z, x: z @ A.T + x, torch.zeros(3, d, dtype=F64), solver,
                             adj, args=(x,), max_steps=100)
        grads[name] = torch.autograd.grad((sol.value**2).sum() + sol.value.sum(), (A, x))
        if name == "shine":
            assert sol.backward["nmatvec"] == 1  # the residual's product only
            assert float(sol.backward["residual"].max()) < 1e-8
    for a, b in zip(grads["shine"], grads["exact"]):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("solver", FORWARD, ids=lambda s: type(s).__name__)
def test_shine_approximates_and_refines_towards_the_exact_gradient(solver):
    exact, _ = _grad(dk.ImplicitAdjoint(dk.GMRES(rtol=1e-12, atol=0)), solver, False)
    errors, cosines = [], []
    for refine in (0, 5, 30):
        got, sol = _grad(dk.SHINEAdjoint(refine=refine), solver, False)
        errors.append(float((got[0] - exact[0]).norm() / exact[0].norm()))
        cosines.append(float(torch.nn.functional.cosine_similarity(
            got[0].flatten(), exact[0].flatten(), dim=0)))
        assert sol.backward["nmatvec"] == refine + 1
        assert sol.backward["residual"].shape == (5,)
    print(f"SHINE {type(solver).__name__}: rel errors {errors}, cosines {cosines}")
    assert cosines[0] > 0.5 and errors[2] < 1e-4 and errors[2] < errors[1] < errors[0]


@pytest.mark.parametrize("solver", [
    dk.Picard(), dk.FallbackChain(dk.Anderson(), dk.Picard()), dk.FixedSteps(dk.Anderson()),
], ids=lambda s: type(s).__name__)
def test_shine_refuses_a_solver_without_an_estimate(solver):
    x = torch.ones(2, 3, dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match=r"Broyden or dk\.Anderson"):
        dk.fixed_point(lambda z, x: 0.5 * z + x, torch.zeros(2, 3, dtype=F64), solver,
                       dk.SHINEAdjoint(), args=(x,), max_steps=10)


# ---------------------------------------------------------------------------- error estimates


def _random_cell(seed):
    g = torch.Generator().manual_seed(seed)
    d = int(torch.randint(8, 25, (1,), generator=g))
    W0 = torch.randn(d, d, dtype=F64, generator=g) / d**0.5
    target = 0.3 + 0.7 * float(torch.rand(1, generator=g, dtype=F64))
    W = target * W0 / torch.linalg.eigvals(W0).abs().max()
    b = 0.5 * torch.randn(d, dtype=F64, generator=g)
    x = torch.randn(4, d, dtype=F64, generator=g).requires_grad_(True)
    return W, b, x, torch.randn(4, d, dtype=F64, generator=g)


def _true_error(seed, adjoint, solver):
    """(true relative error of u, estimate, rho(J)) per sample; dense float64 reference."""
    W, b, x, gz = _random_cell(seed)

    def f(z, x):  # d f / d x = I, so the gradient with respect to x is u itself
        return torch.tanh(z @ W.T + b) + x

    sol = dk.fixed_point(f, torch.zeros_like(x), solver, adjoint, args=(x,), max_steps=300)
    u, = torch.autograd.grad(sol.value, x, gz)
    z = sol.value.detach()
    J = (1 - torch.tanh(z @ W.T + b) ** 2)[:, :, None] * W
    exact = torch.linalg.solve(torch.eye(W.shape[0], dtype=F64) - J.transpose(1, 2), gz)
    rho = torch.linalg.eigvals(J).abs().max(dim=1).values
    err = (u - exact).norm(dim=1) / exact.norm(dim=1)
    return err, sol.backward["grad_error"], rho


@pytest.mark.parametrize("kind", ["reuse", "shine"])
def test_grad_error_bounds_the_true_error(kind):
    ratios, cells = [], set()
    for seed in range(45):
        for rtol, refine in ((1e-2, 1), (1e-4, 6)):
            adj = dk.ImplicitAdjoint(dk.GMRES(rtol=rtol, atol=0), reuse_forward=True) \
                if kind == "reuse" else dk.SHINEAdjoint(refine=refine)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", dk.BackwardSolveWarning)
                err, est, rho = _true_error(seed, adj, dk.Broyden(rtol=1e-12, atol=0))
            use = (rho >= 0.3) & (rho <= 0.95) & (err > 0)
            ratios.append(est[use] / err[use])
            if bool(use.any()):
                cells.add(seed)
    ratio = torch.cat(ratios)
    bound, within = float((ratio >= 1).double().mean()), float((ratio <= 10).double().mean())
    print(f"{kind}: {len(cells)} cells, {ratio.numel()} samples: estimate >= true error in "
          f"{bound:.3f}, within 10x in {within:.3f}, median ratio {float(ratio.median()):.2f}")
    assert len(cells) >= 40
    assert bound >= 0.95 and within >= 0.95


def test_forward_error_and_rtol_from_forward():
    W, b, x, gz = _random_cell(7)

    def f(z, x):
        return torch.tanh(z @ W.T + b) + x

    def run(adjoint, rtol):
        sol = dk.fixed_point(f, torch.zeros_like(x), dk.Broyden(rtol=rtol, atol=0), adjoint,
                             args=(x,), max_steps=300)
        return torch.autograd.grad(sol.value, x, gz)[0], sol

    exact, _ = run(dk.ImplicitAdjoint(dk.GMRES(rtol=1e-13, atol=0)), 1e-13)
    linear = dk.GMRES(rtol=1e-10, atol=0)
    plain, sol_plain = run(dk.ImplicitAdjoint(linear, reuse_forward=True), 1e-5)
    early, sol = run(dk.ImplicitAdjoint(linear, reuse_forward=True, rtol_from_forward=True), 1e-5)
    bw = sol.backward
    assert sol_plain.backward["nmatvec"] > bw["nmatvec"]  # it stops earlier ...
    torch.testing.assert_close(bw["rtol"], torch.fmax(torch.full_like(bw["rtol"], 1e-10),
                                                      0.1 * sol.stats["rel_residual"]))
    assert bool((bw["residual"] <= bw["rtol"] * gz.norm(dim=1) * (1 + 1e-9)).all())
    size = exact.norm(dim=1)
    fwd = bw["forward_error"]
    # ... adding less than the forward error to the gradient (by design about a tenth) ...
    assert bool(((early - plain).norm(dim=1) / size <= 0.2 * fwd).all())
    # ... whose own error is of the order of the forward error estimate
    assert bool(((plain - exact).norm(dim=1) / size <= 3 * fwd).all())


# --------------------------------------------------------------------- the adjoint cache


def _tanh_problem(B=6, D=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = contractive_matrix(D, 0.9, gen=g)
    x = torch.randn(B, D, dtype=F64, generator=g)
    head = torch.randn(D, dtype=F64, generator=g)
    return (lambda z, x: torch.tanh(z @ W.T + x)), x, head


def _cached_grad(f, x, head, scale, adjoint, cache=None):
    xx = x.clone().requires_grad_()
    sol = dk.fixed_point(f, torch.zeros_like(x), dk.Anderson(rtol=1e-11, atol=0), adjoint,
                         max_steps=300, args=(xx,), adjoint_cache=cache)
    (scale * (sol.value @ head) ** 2).sum().backward()
    return xx.grad, sol.backward


@pytest.mark.parametrize("reuse", [False, True])
def test_adjoint_cache_same_gradient_fewer_products(reuse):
    f, x, head = _tanh_problem()
    adj = dk.ImplicitAdjoint(dk.GMRES(rtol=1e-9), reuse_forward=reuse)
    store, ids = dk.nn.FixedPointCache(20), torch.tensor([3, 1, 4, 15, 9, 2])
    first, bwd1 = _cached_grad(f, x, head, 1.0, adj, (store, ids))
    cold, bwd0 = _cached_grad(f, x, head, 1.0, adj)
    assert torch.allclose(first, cold, rtol=0, atol=1e-14)  # nothing stored yet: a cold solve
    assert bwd1["nmatvec"] == bwd0["nmatvec"] and len(store) == 6
    # the incoming gradient changed by a factor 3: the best multiple of the stored vector
    # is the answer, found with the one product that scales it
    again, bwd2 = _cached_grad(f, x, head, 3.0, adj, (store, ids))
    ref, _ = _cached_grad(f, x, head, 3.0, adj)
    assert torch.allclose(again, ref, rtol=1e-8, atol=0)
    assert bwd2["nmatvec"] <= 2 < bwd0["nmatvec"]
    assert bool(bwd2["converged"].all())


def test_adjoint_cache_keeps_the_tolerance_from_a_wrong_vector():
    f, x, head = _tanh_problem(seed=1)
    adj = dk.ImplicitAdjoint(dk.GMRES(rtol=1e-9))
    store, ids = dk.nn.FixedPointCache(6), torch.arange(6)
    junk = torch.randn(6, 12, dtype=F64, generator=torch.Generator().manual_seed(5))
    store.update(ids, 1e3 * junk)  # unrelated vectors, large
    got, bwd = _cached_grad(f, x, head, 1.0, adj, (store, ids))
    ref, _ = _cached_grad(f, x, head, 1.0, dk.ImplicitAdjoint(dk.GMRES(rtol=1e-12)))
    assert bool(bwd["converged"].all())
    assert float(((got - ref).norm(dim=1) / ref.norm(dim=1)).max()) < 1e-7


def test_adjoint_cache_stores_only_converged_solves():
    f, x, head = _tanh_problem(seed=2)
    store, ids = dk.nn.FixedPointCache(6), torch.arange(6)
    adj = dk.ImplicitAdjoint(dk.GMRES(rtol=1e-12, max_steps=2), on_failure="ignore")
    _, bwd = _cached_grad(f, x, head, 1.0, adj, (store, ids))
    assert not bool(bwd["converged"].any()) and len(store) == 0


def test_adjoint_cache_argument_errors():
    f, x, _ = _tanh_problem()
    z0, store = torch.zeros_like(x), dk.nn.FixedPointCache(10)
    with pytest.raises(TypeError, match="adjoint_cache` must be a pair"):
        dk.fixed_point(f, z0, args=(x,), adjoint_cache=store)
    with pytest.raises(ValueError, match=r"shape \(6,\)"):
        dk.fixed_point(f, z0, args=(x,), adjoint_cache=(store, torch.arange(5)))
    with pytest.raises(ValueError, match="JacobianFreeAdjoint does not use it"):
        dk.fixed_point(f, z0, args=(x,), adjoint=dk.JacobianFreeAdjoint(),
                       adjoint_cache=(store, torch.arange(6)))


def test_deq_warm_start_with_an_adjoint_cache():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8).double()
    with torch.no_grad():
        lin.weight.mul_(0.3)
    layer = dk.nn.DEQ(lambda z, x: torch.tanh(lin(z) + x), solver=dk.Anderson(rtol=1e-10),
                      adjoint=dk.ImplicitAdjoint(dk.GMRES(rtol=1e-10)), max_steps=100)
    x, ids = torch.randn(4, 8, dtype=F64), torch.tensor([0, 2, 5, 7])
    store = dk.nn.FixedPointCache(8)
    counts = []
    for _ in range(2):
        with layer.warm_start(None, ids, adjoint_cache=store):
            layer(x).sum().backward()
        counts.append(layer.last_solution.backward["nmatvec"])
    assert len(store) == 4 and counts[1] < counts[0]
    with pytest.raises(ValueError, match="must be two caches"), \
            layer.warm_start(store, ids, adjoint_cache=store):
        pass
    with pytest.raises(ValueError, match="pass `cache`"), layer.warm_start(None, ids):
        pass
    with pytest.raises(TypeError, match=r"`adjoint_cache` must be a dk\.nn\.FixedPointCache"), \
            layer.warm_start(None, ids, adjoint_cache={}):
        pass
