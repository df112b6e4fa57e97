"""Implicit layers beyond fixed points: ``root_find`` and ``minimise``."""

from __future__ import annotations

import pytest
import torch

import deqkit as dk
from deqkit._minimise import minimise
from deqkit._root_find import root_find

F64 = torch.float64


def newton(rtol=1e-13):
    """Newton with an (almost) exact inner solve: quadratic convergence to machine precision."""
    return dk.NewtonKrylov(
        rtol=rtol, atol=0, linear_solver=dk.GMRES(rtol=1e-12, atol=0, max_steps=60, restart=60)
    )


def tight_adjoint():
    return dk.ImplicitAdjoint(dk.GMRES(rtol=1e-13, atol=0, max_steps=100), on_failure="raise")


# ---------------------------------------------------------------- root_find


def test_sqrt_by_newton_value_and_gradient():
    a = (torch.rand(16, 1, dtype=F64) * 10 + 0.1).requires_grad_()
    sol = root_find(lambda z: z * z - a, torch.ones(16, 1, dtype=F64), solver=newton(1e-14))
    assert sol.result is dk.RESULTS.successful
    root = a.detach().sqrt()
    torch.testing.assert_close(sol.value.detach(), root, rtol=0, atol=1e-12)
    assert int(sol.stats["nstep"].max()) <= 10  # quadratic convergence
    (grad,) = torch.autograd.grad(sol.value.sum(), a)
    torch.testing.assert_close(grad, 0.5 / root, rtol=1e-12, atol=0)


def test_sqrt_defaults_and_args_with_broyden():
    a = torch.rand(8, 1, dtype=F64) + 0.5
    sol = root_find(lambda z: z * z - a, torch.ones(8, 1, dtype=F64))  # NewtonKrylov default
    torch.testing.assert_close(sol.value, a.sqrt(), rtol=1e-4, atol=0)
    a.requires_grad_()
    sol = root_find(
        lambda z, s: z * z - s,
        torch.ones(8, 1, dtype=F64),
        args=(a,),
        solver=dk.Broyden(rtol=1e-13, atol=0),
        adjoint=tight_adjoint(),
    )
    torch.testing.assert_close(sol.value.detach(), a.detach().sqrt(), rtol=1e-12, atol=0)
    (grad,) = torch.autograd.grad(sol.value.sum(), a)
    torch.testing.assert_close(grad, 0.5 / a.detach().sqrt(), rtol=1e-10, atol=0)


def test_sqrt_gradcheck():
    a = torch.tensor([[0.7], [2.0], [3.5]], dtype=F64, requires_grad=True)

    def layer(a):
        return root_find(
            lambda z: z * z - a,
            torch.ones(3, 1, dtype=F64),
            solver=newton(),
            adjoint=tight_adjoint(),
        ).value

    assert torch.autograd.gradcheck(layer, (a,))


def test_fixed_point_as_root_matches_fixed_point():
    B, d, n = 5, 6, 3
    W = torch.randn(d, d, dtype=F64)
    W = (0.6 * W / torch.linalg.matrix_norm(W, 2)).requires_grad_()
    U = torch.randn(d, n, dtype=F64, requires_grad=True)
    b = torch.randn(d, dtype=F64, requires_grad=True)
    x = torch.randn(B, n, dtype=F64, requires_grad=True)
    params = (W, U, b, x)

    def f(z):
        return torch.tanh(z @ W.T + x @ U.T + b)

    z0 = torch.zeros(B, d, dtype=F64)
    ref = dk.fixed_point(f, z0, dk.Anderson(rtol=1e-14, atol=0), tight_adjoint(), max_steps=200)
    sol = root_find(lambda z: f(z) - z, z0, newton(), tight_adjoint())
    torch.testing.assert_close(sol.value, ref.value, rtol=0, atol=1e-12)
    cot = torch.randn(B, d, dtype=F64)
    g_ref = torch.autograd.grad((ref.value * cot).sum(), params)
    g_root = torch.autograd.grad((sol.value * cot).sum(), params)
    for gr, gs in zip(g_ref, g_root):
        torch.testing.assert_close(gs, gr, rtol=0, atol=1e-9)


def test_root_find_tuple_state():
    a = torch.rand(4, 2, dtype=F64) + 0.5
    c = torch.rand(4, 3, dtype=F64) + 0.5

    def F(z):
        u, v = z
        return u * u - a, v * v * v - c

    z0 = (torch.ones(4, 2, dtype=F64), torch.ones(4, 3, dtype=F64))
    u, v = root_find(F, z0, solver=newton()).value
    torch.testing.assert_close(u, a.sqrt(), rtol=1e-12, atol=0)
    torch.testing.assert_close(v, c ** (1 / 3), rtol=1e-12, atol=0)


# ---------------------------------------------------------------- minimise


def ridge_problem(B=8, n=6, m=10):
    A = torch.randn(m, n, dtype=F64, requires_grad=True)
    y = torch.randn(B, m, dtype=F64, requires_grad=True)
    lam = torch.tensor(0.3, dtype=F64, requires_grad=True)
    return A, y, lam


def ridge_energy(A, lam):
    return lambda z, y: ((z @ A.T - y) ** 2).sum(1) + lam * (z**2).sum(1)


def ridge_closed_form(A, y, lam):
    n = A.shape[1]
    return torch.linalg.solve(A.T @ A + lam * torch.eye(n, dtype=A.dtype), (y @ A).T).T


def test_ridge_layer_matches_closed_form():
    A, y, lam = ridge_problem()
    z0 = torch.zeros(y.shape[0], A.shape[1], dtype=F64)
    sol = minimise(ridge_energy(A, lam), z0, newton(), tight_adjoint(), args=(y,))
    assert sol.result is dk.RESULTS.successful
    ref = ridge_closed_form(A, y, lam)
    torch.testing.assert_close(sol.value, ref, rtol=0, atol=1e-10)
    assert int(sol.stats["nstep"].max()) <= 3  # a quadratic: one exact Newton step
    cot = torch.randn_like(ref)
    g_ref = torch.autograd.grad((ref * cot).sum(), (A, y, lam))
    g_sol = torch.autograd.grad((sol.value * cot).sum(), (A, y, lam))
    for gr, gs in zip(g_ref, g_sol):
        torch.testing.assert_close(gs, gr, rtol=0, atol=1e-9)
    assert bool(sol.backward["converged"].all())


def test_ridge_layer_default_solver_and_broyden():
    A, y, lam = ridge_problem()
    z0 = torch.zeros(y.shape[0], A.shape[1], dtype=F64)
    ref = ridge_closed_form(A, y, lam).detach()
    sol = minimise(ridge_energy(A, lam), z0, args=(y,))  # NewtonKrylov() + ImplicitAdjoint
    scale = float(ref.norm(dim=1).max())
    assert float((sol.value.detach() - ref).norm(dim=1).max()) < 1e-3 * scale
    sol.value.sum().backward()
    assert A.grad is not None and y.grad is not None and lam.grad is not None
    sol = minimise(
        ridge_energy(A, lam), z0, dk.Broyden(rtol=1e-12, atol=0), args=(y,), max_steps=100
    )
    torch.testing.assert_close(sol.value.detach(), ref, rtol=0, atol=1e-9)


def test_minimise_with_gradient_descent_solvers():
    """minimise iterates on z - grad E(z): Picard is unit-step gradient descent, Anderson
    accelerates it; both converge when the Hessian's eigenvalues lie in (0, 2)."""
    Q = torch.randn(5, 5, dtype=F64)
    Q = Q @ Q.T
    Q = 0.5 * torch.eye(5, dtype=F64) + Q / torch.linalg.matrix_norm(Q, 2)  # spectrum in [.5, 1.5]
    c = torch.randn(4, 5, dtype=F64, requires_grad=True)
    ref = torch.linalg.solve(Q, c.T).T
    for solver in (dk.Picard(rtol=1e-12, atol=0), dk.Anderson(rtol=1e-12, atol=0)):
        sol = minimise(
            lambda z: 0.5 * ((z @ Q) * z).sum(1) - (c * z).sum(1),
            torch.zeros(4, 5, dtype=F64),
            solver,
            tight_adjoint(),
            max_steps=200,
        )
        torch.testing.assert_close(sol.value, ref, rtol=0, atol=1e-10)
        (g,) = torch.autograd.grad(sol.value.sum(), c)
        torch.testing.assert_close(
            g, torch.linalg.solve(Q, torch.ones(5, 4, dtype=F64)).T, rtol=0, atol=1e-10
        )


def test_softmax_as_entropy_regularised_argmin():
    """softmax(x) = argmin_{p in simplex} <p, log p> - <x, p>. Stationarity of the Lagrangian
    gives p = exp(x - 1 - nu) with the multiplier nu of sum(p) = 1 minimising the strictly
    convex, unconstrained dual sum_i exp(x_i - 1 - nu) + nu (one scalar per sample)."""
    B, n = 6, 5
    x = (2 * torch.randn(B, n, dtype=F64)).requires_grad_()

    def dual(nu, x):
        return torch.exp(x - 1 - nu).sum(1) + nu.squeeze(1)

    # Start left of the root nu* = logsumexp(x) - 1 >= max(x) - 1: no overflow, monotone Newton.
    nu0 = x.detach().amax(1, keepdim=True) - 1
    sol = minimise(dual, nu0, newton(), tight_adjoint(), args=(x,))
    p = torch.exp(x - 1 - sol.value)
    ref = torch.softmax(x, dim=1)
    torch.testing.assert_close(p, ref, rtol=0, atol=1e-12)
    cot = torch.randn(B, n, dtype=F64)
    (g_ref,) = torch.autograd.grad((ref * cot).sum(), x)
    (g_sol,) = torch.autograd.grad((p * cot).sum(), x)
    torch.testing.assert_close(g_sol, g_ref, rtol=0, atol=1e-9)


def test_barrier_projection_onto_positive_orthant():
    """z* = argmin 0.5 ||z - v||^2 - mu sum log z  =>  z* = (v + sqrt(v^2 + 4 mu)) / 2."""
    v = torch.randn(6, 4, dtype=F64, requires_grad=True)
    mu = torch.tensor(0.5, dtype=F64, requires_grad=True)

    def energy(z, v):
        return 0.5 * ((z - v) ** 2).sum(1) - mu * torch.log(z).sum(1)

    # Start left of the root: F = z - v - mu/z is increasing and concave, so Newton steps from
    # below stay below the root and inside the domain z > 0.
    sol = minimise(
        energy, torch.full((6, 4), 1e-2, dtype=F64), newton(), tight_adjoint(), args=(v,)
    )
    ref = 0.5 * (v + torch.sqrt(v * v + 4 * mu))
    torch.testing.assert_close(sol.value, ref, rtol=0, atol=1e-12)
    cot = torch.randn(6, 4, dtype=F64)
    g_ref = torch.autograd.grad((ref * cot).sum(), (v, mu))
    g_sol = torch.autograd.grad((sol.value * cot).sum(), (v, mu))
    for gr, gs in zip(g_ref, g_sol):
        torch.testing.assert_close(gs, gr, rtol=0, atol=1e-9)


def test_minimise_gradcheck_strongly_convex_quartic():
    L = torch.randn(2, 2, dtype=F64, requires_grad=True)
    c = torch.randn(2, 2, dtype=F64, requires_grad=True)

    def layer(L, c):
        Q = L @ L.T + torch.eye(2, dtype=F64)

        def energy(z):
            return 0.5 * ((z @ Q) * z).sum(1) + 0.25 * (z**4).sum(1) - (c * z).sum(1)

        return minimise(energy, torch.zeros(2, 2, dtype=F64), newton(), tight_adjoint()).value

    assert torch.autograd.gradcheck(layer, (L, c))


def test_minimise_tuple_state():
    t = torch.randn(3, 2, dtype=F64)
    s = torch.randn(3, 4, dtype=F64)

    def energy(z):
        u, v = z
        return ((u - t) ** 2).sum(1) + 2 * ((v - s) ** 2).sum(1) + 0.1 * (u.sum(1) ** 2)

    z0 = (torch.zeros(3, 2, dtype=F64), torch.zeros(3, 4, dtype=F64))
    u, v = minimise(energy, z0, newton()).value
    torch.testing.assert_close(v, s, rtol=0, atol=1e-12)
    # (I + 0.1 * 11^T) u = t
    M = torch.eye(2, dtype=F64) + 0.1 * torch.ones(2, 2, dtype=F64)
    torch.testing.assert_close(u, torch.linalg.solve(M, t.T).T, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "energy",
    [
        lambda z: (z**2).sum(),  # a scalar
        lambda z: (z**2).sum(1, keepdim=True),  # (B, 1)
        lambda z: z**2,  # (B, D)
    ],
)
def test_minimise_rejects_non_per_sample_energy(energy):
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        minimise(energy, torch.zeros(3, 2, dtype=F64))


@pytest.mark.parametrize("width", [3, 1])  # 1 would broadcast silently in z + F(z)
def test_root_find_rejects_shape_changing_residual(width):
    with pytest.raises(ValueError, match="same structure and shape"):
        root_find(lambda z: z.new_ones(z.shape[0], width), torch.zeros(4, 2, dtype=F64))


def test_root_find_rejects_structure_change_and_non_callable():
    with pytest.raises(ValueError, match="same structure and shape"):
        root_find(lambda z: z[0], (torch.zeros(4, 2, dtype=F64), torch.zeros(4, 2, dtype=F64)))
    with pytest.raises(TypeError, match="callable"):
        root_find(None, torch.zeros(4, 2, dtype=F64))
    with pytest.raises(TypeError, match="callable"):
        minimise(3.0, torch.zeros(4, 2, dtype=F64))


def test_root_find_failure_raises_solver_error():
    # z^2 + 1 has no real root.
    with pytest.raises(dk.SolverError):
        root_find(lambda z: z * z + 1, torch.ones(2, 1, dtype=F64), max_steps=5)
