"""Gradients through the equilibrium: exact answers, gradcheck, cross-checks, memory."""

from __future__ import annotations

import warnings

import pytest
import torch

import deqkit as dk
from helpers import (
    F64,
    contractive_matrix,
    linear_fixed_point,
    linear_problem,
    tight_linear_solvers,
)

TIGHT = dk.Anderson(rtol=1e-13, atol=0)


@pytest.mark.parametrize("linear_solver", tight_linear_solvers(), ids=repr)
def test_implicit_gradient_of_linear_deq_matches_closed_form(linear_solver):
    W, U, b, x = linear_problem(B=4, d=7, n=3, norm=0.8)
    W.requires_grad_(True)
    U.requires_grad_(True)
    x.requires_grad_(True)
    b.requires_grad_(True)
    target = torch.randn(4, 7, dtype=F64)

    def loss_of(z):
        return ((z - target) ** 2).sum() + z.sum() ** 2

    sol = dk.fixed_point(lambda z, x: z @ W.T + x @ U.T + b, torch.zeros(4, 7, dtype=F64), TIGHT,
                         adjoint=dk.ImplicitAdjoint(linear_solver), args=(x,), max_steps=500)
    got = torch.autograd.grad(loss_of(sol.value), (W, U, b, x))
    want = torch.autograd.grad(loss_of(linear_fixed_point(W, U, b, x)), (W, U, b, x))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)
    assert bool(sol.backward["converged"].all())
    assert sol.backward["nmatvec"] >= 1


def _tanh_problem(seed=0, d=4, B=3, norm=0.6):
    g = torch.Generator().manual_seed(seed)
    W = contractive_matrix(d, norm, gen=g).requires_grad_(True)
    x = torch.randn(B, d, dtype=F64, generator=g).requires_grad_(True)
    return W, x


def test_gradcheck_implicit():
    W, x = _tanh_problem()

    def fun(W, x):
        sol = dk.fixed_point(lambda z, x: torch.tanh(z @ W.T + x), torch.zeros(3, 4, dtype=F64),
                             TIGHT, adjoint=dk.ImplicitAdjoint(dk.GMRES(rtol=1e-13, atol=0)),
                             args=(x,), max_steps=200)
        return sol.value

    assert torch.autograd.gradcheck(fun, (W, x), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_tuple_state_closure():
    W, x = _tanh_problem(seed=1, d=3, B=2)
    V = contractive_matrix(3, 0.3, gen=torch.Generator().manual_seed(9)).requires_grad_(True)

    def fun(W, V, x):
        def f(z):
            a, b = z
            return torch.tanh(a @ W.T + 0.2 * b + x), torch.tanh(a @ V.T)

        z0 = (torch.zeros(2, 3, dtype=F64), torch.zeros(2, 3, dtype=F64))
        sol = dk.fixed_point(f, z0, TIGHT, max_steps=300,
                             adjoint=dk.ImplicitAdjoint(dk.GMRES(rtol=1e-13, atol=0)))
        return sol.value

    assert torch.autograd.gradcheck(fun, (W, V, x), eps=1e-6, atol=1e-7, rtol=1e-5)


def _grads(adjoint, solver=TIGHT, max_steps=300, seed=2, norm=0.85):
    W, x = _tanh_problem(seed=seed, d=6, B=4, norm=norm)
    sol = dk.fixed_point(lambda z, x: torch.tanh(z @ W.T + x), torch.zeros(4, 6, dtype=F64),
                         solver, adjoint=adjoint, args=(x,), max_steps=max_steps, throw=False)
    loss = (sol.value.sin() * torch.arange(6, dtype=F64)).sum()
    return torch.autograd.grad(loss, (W, x)), sol, (W, x)


def _dense_reference(W, x):
    """Implicit gradient from dense per-sample Jacobians, independent of deqkit's adjoints."""
    W, x = W.detach(), x.detach()
    with torch.no_grad():
        z = dk.fixed_point(lambda z: torch.tanh(z @ W.T + x), torch.zeros_like(x), TIGHT,
                           max_steps=500).value
    Wr, xr = W.clone().requires_grad_(), x.clone().requires_grad_()
    zr = z.clone().requires_grad_()
    fz = torch.tanh(zr @ Wr.T + xr)
    g = (torch.cos(z) * torch.arange(6, dtype=F64))
    us = []
    for i in range(z.shape[0]):
        J = torch.autograd.functional.jacobian(lambda v, i=i: torch.tanh(v @ W.T + x[i]), z[i])
        us.append(torch.linalg.solve((torch.eye(6, dtype=F64) - J).T, g[i]))
    u = torch.stack(us)
    return torch.autograd.grad(fz, (Wr, xr), u)


def test_implicit_matches_dense_reference_and_unrolled():
    ref = _dense_reference(*_grads(dk.ImplicitAdjoint(dk.Dense()))[2])
    for adj in (dk.ImplicitAdjoint(dk.Dense()), dk.ImplicitAdjoint(dk.GMRES(rtol=1e-13, atol=0)),
                dk.ImplicitAdjoint(dk.BiCGStab(rtol=1e-13, atol=0))):
        got, _, _ = _grads(adj)
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)
    # Unrolling the converged solve tends to the same gradient.
    for solver in (dk.Picard(rtol=1e-14, atol=0), dk.Anderson(rtol=1e-14, atol=0)):
        got, _, _ = _grads(dk.UnrolledAdjoint(), solver=solver, max_steps=400)
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-9)


def test_unrolled_with_few_steps_differs_from_implicit():
    ref, _, _ = _grads(dk.ImplicitAdjoint(dk.Dense()))
    few, _, _ = _grads(dk.UnrolledAdjoint(), solver=dk.Picard(rtol=1e-14, atol=0), max_steps=3)
    assert (few[0] - ref[0]).norm() > 1e-3 * ref[0].norm()


def test_jacobian_free_equals_its_definition():
    got, sol, (W, x) = _grads(dk.JacobianFreeAdjoint())
    z = sol.value.detach()
    Wr, xr = W.detach().requires_grad_(), x.detach().requires_grad_()
    fz = torch.tanh(z @ Wr.T + xr)  # z* held constant
    want = torch.autograd.grad((fz.sin() * torch.arange(6, dtype=F64)).sum(), (Wr, xr))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    # The forward value is z* itself, not f(z*).
    torch.testing.assert_close(sol.value, z)


@pytest.mark.parametrize(("steps", "damping"), [(1, 1.0), (5, 0.5), (12, 0.8)])
def test_phantom_equals_its_definition(steps, damping):
    got, sol, (W, x) = _grads(dk.PhantomAdjoint(steps, damping))
    z0 = sol.value.detach()
    Wr, xr = W.detach().requires_grad_(), x.detach().requires_grad_()
    z = z0
    for _ in range(steps):
        z = (1 - damping) * z + damping * torch.tanh(z @ Wr.T + xr)
    loss = (z.sin() * torch.arange(6, dtype=F64)).sum()
    want = torch.autograd.grad(loss, (Wr, xr))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_phantom_closed_form_on_linear_map():
    # For f(z) = W z + x at an exact fixed point, the phantom gradient w.r.t. x is
    # lambda * sum_{j<k} ((1-lambda) I + lambda W^T)^j g.
    W, _, _, x = linear_problem(B=2, d=5, n=5, norm=0.7)
    x.requires_grad_(True)
    k, lam = 6, 0.6
    sol = dk.fixed_point(lambda z, x: z @ W.T + x, torch.zeros(2, 5, dtype=F64), TIGHT,
                         adjoint=dk.PhantomAdjoint(k, lam), args=(x,), max_steps=300)
    g = torch.randn(2, 5, dtype=F64)
    (got,) = torch.autograd.grad(sol.value, x, g)
    M = (1 - lam) * torch.eye(5, dtype=F64) + lam * W
    want = sum(lam * g @ torch.linalg.matrix_power(M, j) for j in range(k))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # Many steps converge to the implicit gradient (I - W^T)^{-1} g.
    sol = dk.fixed_point(lambda z, x: z @ W.T + x, torch.zeros(2, 5, dtype=F64), TIGHT,
                         adjoint=dk.PhantomAdjoint(200, 1.0), args=(x,), max_steps=300)
    (got,) = torch.autograd.grad(sol.value, x, g)
    torch.testing.assert_close(got, torch.linalg.solve(torch.eye(5, dtype=F64) - W.T, g.T).T)


def test_no_gradient_to_z0_and_gradient_to_closure_inputs():
    W, x = _tanh_problem()
    z0 = torch.zeros(3, 4, dtype=F64, requires_grad=True)
    sol = dk.fixed_point(lambda z: torch.tanh(z @ W.T + x), z0, TIGHT)
    gW, gx, gz0 = torch.autograd.grad(sol.value.sum(), (W, x, z0), allow_unused=True)
    assert gz0 is None
    assert gW is not None and gx is not None and gx.abs().sum() > 0


def test_backward_failure_is_reported():
    args = dict(seed=3, norm=0.95)
    capped = dk.GMRES(rtol=1e-12, atol=0, max_steps=1)
    with pytest.warns(dk.BackwardSolveWarning, match="did not converge"):
        _, sol, _ = _grads(dk.ImplicitAdjoint(capped), **args)
    assert not bool(sol.backward["converged"].all())
    assert bool((sol.backward["nstep"] <= 1).all())
    with pytest.raises(RuntimeError, match="did not converge"):
        _grads(dk.ImplicitAdjoint(capped, on_failure="raise"), **args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g_fb, sol, _ = _grads(
            dk.ImplicitAdjoint(capped, on_failure="ignore", fallback=dk.PhantomAdjoint(7, 0.6)),
            **args)
    assert bool(sol.backward["fallback"].all())
    g_ph, _, _ = _grads(dk.PhantomAdjoint(7, 0.6), **args)
    for a, b in zip(g_fb, g_ph):  # phantom fallback == phantom gradient (at a tight z*)
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_two_calls_before_one_backward():
    # TorchDEQ's hook-based backward broke when one module was called twice before backward.
    W, x = _tanh_problem()
    f = lambda z, x: torch.tanh(z @ W.T + x)  # noqa: E731
    z0 = torch.zeros(3, 4, dtype=F64)
    a = dk.fixed_point(f, z0, TIGHT, args=(x,)).value
    b = dk.fixed_point(f, z0, TIGHT, args=(2 * x,)).value
    (g,) = torch.autograd.grad((a + b).sum(), W)
    ga = torch.autograd.grad(dk.fixed_point(f, z0, TIGHT, args=(x,)).value.sum(), W)[0]
    gb = torch.autograd.grad(dk.fixed_point(f, z0, TIGHT, args=(2 * x,)).value.sum(), W)[0]
    torch.testing.assert_close(g, ga + gb)


def _saved_bytes(adjoint, max_steps, solver=None):
    g = torch.Generator().manual_seed(0)
    W = contractive_matrix(32, 0.999, symmetric=True, gen=g).requires_grad_(True)
    x = (1e-2 * torch.randn(8, 32, dtype=F64, generator=g)).requires_grad_(True)
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sol = dk.fixed_point(lambda z, x: torch.tanh(z @ W.T + x), torch.zeros(8, 32, dtype=F64),
                             solver or dk.Picard(rtol=1e-30, atol=0), adjoint=adjoint, args=(x,),
                             max_steps=max_steps, throw=False)
    assert int(sol.stats["nstep"].min()) == max_steps  # every step ran
    return sum(seen.values())


def test_implicit_memory_constant_in_iterations_unrolled_linear():
    imp = [_saved_bytes(dk.ImplicitAdjoint(), n) for n in (4, 16, 64)]
    unr = [_saved_bytes(dk.UnrolledAdjoint(), n) for n in (4, 16, 64)]
    assert imp[0] == imp[1] == imp[2]
    assert unr[2] > 8 * unr[0] > 0
    assert imp[2] * 20 < unr[2]


def test_unrolled_anderson_memory_per_step_is_a_few_state_tensors():
    # The unrolled Anderson keeps its history as the iterates' own tensors: autograd must not
    # save a copy of the (B, m, D) history buffers at every step.
    solver = dk.Anderson(rtol=1e-30, atol=0, m=5)
    a = _saved_bytes(dk.UnrolledAdjoint(), 16, solver)
    b = _saved_bytes(dk.UnrolledAdjoint(), 48, solver)
    state_bytes = 8 * 32 * 8  # one (B, D) float64 tensor
    per_step = (b - a) / 32 / state_bytes
    assert 1 <= per_step <= 6, per_step  # was 13.5 when the buffers were copied each step


def _without_reuse(adjoint: dk.AbstractAdjoint) -> dk.AbstractAdjoint:
    """The same adjoint with the reuse of the driver's last evaluation switched off."""
    import dataclasses

    cls = type("NoReuse" + type(adjoint).__name__, (type(adjoint),), {"reuse": False})
    return cls(**{fl.name: getattr(adjoint, fl.name) for fl in dataclasses.fields(adjoint)})


def _counted_solve(adjoint, solver, max_steps, x, W):
    calls = [0]

    def f(z, x):
        calls[0] += 1
        return torch.tanh(z @ W.T + x)

    W.grad = x.grad = None
    sol = dk.fixed_point(f, torch.zeros_like(x), solver, adjoint, max_steps=max_steps,
                         args=(x,), throw=False)
    sol.value.sin().sum().backward()
    return calls[0], sol, W.grad.clone(), x.grad.clone()


REUSING_ADJOINTS = [
    dk.OneStepAdjoint(residual_weight=0.5),
    dk.JacobianFreeAdjoint(),
    dk.ImplicitAdjoint(dk.GMRES(rtol=1e-12, atol=0.0)),
]


@pytest.mark.parametrize("adjoint", REUSING_ADJOINTS, ids=lambda a: type(a).__name__)
@pytest.mark.parametrize("max_steps", [0, 1, 3])
def test_last_evaluation_reused_when_the_budget_is_reached(adjoint, max_steps):
    # No sample converges within the budget: the driver's evaluation at max_steps (made under
    # autograd) is the adjoint's evaluation, so f runs once less with the same result.
    torch.manual_seed(0)
    W = torch.randn(5, 5, dtype=torch.float64)
    W = (0.6 * W / torch.linalg.matrix_norm(W, 2)).requires_grad_()
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    solver = dk.Picard(rtol=1e-12, atol=0.0)
    n1, s1, gw1, gx1 = _counted_solve(adjoint, solver, max_steps, x, W)
    n2, s2, gw2, gx2 = _counted_solve(_without_reuse(adjoint), solver, max_steps, x, W)
    assert n1 == max_steps + 1 and n2 == max_steps + 2
    assert int(s1.stats["nfev"]) == n1 and int(s2.stats["nfev"]) == n2
    torch.testing.assert_close(s1.value, s2.value, rtol=1e-13, atol=0.0)
    torch.testing.assert_close(gw1, gw2, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(gx1, gx2, rtol=1e-12, atol=1e-15)
    assert gx1.abs().sum() > 0


@pytest.mark.parametrize("adjoint", REUSING_ADJOINTS, ids=lambda a: type(a).__name__)
def test_last_evaluation_not_reused_when_a_sample_stops_early(adjoint):
    # Row 0 (x = 0) is at its fixed point z = 0 from the start and stops at step 0, so not
    # every returned value is the last iterate: the adjoint evaluates f itself.
    torch.manual_seed(1)
    W = torch.randn(5, 5, dtype=torch.float64)
    W = (0.6 * W / torch.linalg.matrix_norm(W, 2)).requires_grad_()
    x = torch.randn(4, 5, dtype=torch.float64)
    x[0] = 0.0
    x.requires_grad_()
    solver = dk.Picard(rtol=1e-12, atol=0.0)
    n1, s1, gw1, gx1 = _counted_solve(adjoint, solver, 3, x, W)
    n2, _, gw2, gx2 = _counted_solve(_without_reuse(adjoint), solver, 3, x, W)
    assert int(s1.stats["nstep"][0]) == 0 and int(s1.stats["nstep"][1]) == 3
    # + probe_nfev: the batch-independence check of a new f (once per callable)
    assert int(s1.stats["probe_nfev"]) == 2
    assert n1 == n2 == int(s1.stats["nfev"]) + 2
    torch.testing.assert_close(gw1, gw2, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(gx1, gx2, rtol=1e-12, atol=1e-15)


def test_last_evaluation_not_reused_when_the_solver_supplies_f():
    # Broyden with a line search returns f at its new iterate itself: nothing to reuse.
    torch.manual_seed(2)
    W = torch.randn(5, 5, dtype=torch.float64)
    W = (0.6 * W / torch.linalg.matrix_norm(W, 2)).requires_grad_()
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    solver = dk.Broyden(rtol=1e-12, atol=0.0, line_search=True)
    adjoint = dk.ImplicitAdjoint(dk.GMRES(rtol=1e-12, atol=0.0))
    n1, s1, gw1, _ = _counted_solve(adjoint, solver, 2, x, W)
    n2, _, gw2, _ = _counted_solve(_without_reuse(adjoint), solver, 2, x, W)
    assert n1 == n2 == int(s1.stats["nfev"])
    torch.testing.assert_close(gw1, gw2, rtol=1e-12, atol=1e-15)


def test_subclass_overriding_apply_is_not_bypassed_by_the_reuse():
    # A user subclass that overrides apply() must have it called, reuse or not.
    calls = []

    class Logged(dk.JacobianFreeAdjoint):
        def apply(self, fn, z_star, args, backward_stats):
            calls.append(1)
            return super().apply(fn, z_star, args, backward_stats)

    W = torch.eye(3, dtype=torch.float64).mul(0.5).requires_grad_()
    x = torch.ones(2, 3, dtype=torch.float64)
    with pytest.warns(DeprecationWarning, match="implement `solve"):  # the interface before
        sol = dk.fixed_point(lambda z, x: z @ W.T + x, torch.zeros_like(x),
                             dk.Picard(rtol=1e-12, atol=0.0), Logged(), max_steps=2,
                             args=(x,), throw=False)
    sol.value.sum().backward()
    assert calls == [1] and int(sol.stats["nfev"]) == 4 and W.grad is not None


class _Halfway(dk.AbstractAdjoint):
    """A new gradient method in a dozen lines, no driver change: the mean of the implicit
    and the Jacobian-free gradients (u = (g + (I - J^T)^{-1} g) / 2), reusing the driver's
    last evaluation when the solve ran to its budget."""

    def solve(self, primal, backward_stats):
        out = primal.run(graph="z")
        if not primal.differentiable:
            return out.value
        backward_stats["reused"] = out.last_eval is not None
        z, fz = out.last_eval or primal.evaluate(out.value, leaf=True)
        implicit = dk.ImplicitAdjoint(dk.GMRES(rtol=1e-12, atol=0.0)).attach(z, fz, {})
        jfb = dk.JacobianFreeAdjoint().attach(z, fz, {})
        return 0.5 * (implicit + jfb)


@pytest.mark.parametrize("max_steps, reused", [(3, True), (200, False)])
def test_a_user_adjoint_plugs_into_the_driver_and_the_layer(max_steps, reused):
    a = 0.5
    x = torch.ones(2, 3, dtype=torch.float64, requires_grad=True)
    solver = dk.Picard(rtol=1e-13, atol=0.0)
    sol = dk.fixed_point(lambda z, x: a * z + x, torch.zeros_like(x), solver, _Halfway(),
                         max_steps=max_steps, args=(x,), throw=False)
    sol.value.sum().backward()
    assert sol.backward["reused"] is reused
    if reused:  # the solve ran to its budget: f was not evaluated again for the gradient
        assert int(sol.stats["nfev"]) == max_steps + 1
    # d z*/dx: implicit 1 / (1 - a) = 2, Jacobian-free 1: their mean is 1.5
    torch.testing.assert_close(x.grad, torch.full_like(x, 1.5))
    layer = dk.nn.DEQ(lambda z, x: a * z + x, solver=solver, adjoint=_Halfway(),
                      max_steps=max_steps)
    x.grad = None
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 1.5))
