"""Exact higher-order derivatives through the implicit adjoint (issue 17): the recorded
backward pass is itself differentiated implicitly."""

from __future__ import annotations

import pytest
import torch

import deqkit as dk
from helpers import F64, contractive_matrix


def _tight():
    return dict(solver=dk.Anderson(rtol=1e-13, atol=0, m=6),
                adjoint=dk.ImplicitAdjoint(dk.GMRES(rtol=1e-13, atol=0)), max_steps=400)


def _inputs(d=3, B=2, seed=0, rho=0.6):
    g = torch.Generator().manual_seed(seed)
    W = contractive_matrix(d, rho, gen=g).requires_grad_()
    x = torch.randn(B, d, dtype=F64, generator=g, requires_grad=True)
    return x, W


def _z(x, W, tuple_state=False):
    """z* of tanh(z W^T + x): x passed in args, W closed over (a leaf of f's graph)."""
    B, d = x.shape
    if not tuple_state:
        return dk.fixed_point(lambda z, x: torch.tanh(z @ W.T + x),
                              torch.zeros(B, d, dtype=F64), args=(x,), **_tight()).value
    h = d // 2

    def f(z, x):
        out = torch.tanh(torch.cat(z, dim=1) @ W.T + x)
        return out[:, :h], out[:, h:]

    z0 = (torch.zeros(B, h, dtype=F64), torch.zeros(B, d - h, dtype=F64))
    return torch.cat(dk.fixed_point(f, z0, args=(x,), **_tight()).value, dim=1)


@pytest.mark.parametrize("tuple_state", [False, True], ids=["tensor", "tuple"])
def test_gradgradcheck_through_fixed_point(tuple_state):
    x, W = _inputs(d=4 if tuple_state else 3)
    fn = lambda x, W: _z(x, W, tuple_state)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, W))
    assert torch.autograd.gradgradcheck(fn, (x, W))


def test_third_derivatives():
    x, W = _inputs(d=2, B=1)

    def grad_of(x, W):  # the gradient, recorded; gradgradcheck checks its 2nd derivatives
        return torch.autograd.grad(_z(x, W).pow(3).sum(), (x, W), create_graph=True)

    assert torch.autograd.gradgradcheck(grad_of, (x, W))


def test_hessian_equals_the_closed_form_of_a_linear_deq():
    # f(z) = z A(T)^T + x with A = 0.4 tanh(T): z* = (I - A)^{-1} x exactly (dense solve)
    g = torch.Generator().manual_seed(3)
    T = torch.randn(3, 3, dtype=F64, generator=g)
    x = torch.randn(2, 3, dtype=F64, generator=g)
    eye = torch.eye(3, dtype=F64)

    def loss_deq(T, x):  # (A is computed inside f, from the leaf T)
        z = dk.fixed_point(lambda z, x: z @ (0.4 * torch.tanh(T)).T + x, torch.zeros_like(x),
                           args=(x,), **_tight()).value
        return torch.sin(z).sum()

    def loss_dense(T, x):
        A = 0.4 * torch.tanh(T)
        return torch.sin(torch.linalg.solve(eye - A, x.T).T).sum()

    H = torch.autograd.functional.hessian(loss_deq, (T, x))
    H_ref = torch.autograd.functional.hessian(loss_dense, (T, x))
    for row, row_ref in zip(H, H_ref):
        for h, h_ref in zip(row, row_ref):
            torch.testing.assert_close(h, h_ref, rtol=1e-8, atol=1e-10)


def test_hessian_vector_product_equals_finite_differences():
    x, W = _inputs(d=5, B=3, seed=1, rho=0.8)
    v = torch.randn(W.shape, dtype=F64, generator=torch.Generator().manual_seed(2))

    def grad_W(W, create_graph=False):
        (gW,) = torch.autograd.grad(torch.cos(_z(x, W)).sum(), W, create_graph=create_graph)
        return gW

    (hvp,) = torch.autograd.grad((grad_W(W, create_graph=True) * v).sum(), W)
    eps = 1e-5
    with torch.no_grad():
        Wp, Wm = (W + eps * v).requires_grad_(), (W - eps * v).requires_grad_()
    fd = (grad_W(Wp) - grad_W(Wm)) / (2 * eps)
    torch.testing.assert_close(hvp, fd, rtol=1e-6, atol=1e-8)


def test_gradient_penalty_through_a_deq_layer_matches_unrolling():
    # a DEQ layer (parameters of an nn.Module cell) trained with a penalty on the input
    # gradient: loss + ||d loss / d x||^2 needs the second derivative of the equilibrium
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4).double()
    with torch.no_grad():
        lin.weight.mul_(0.5 / torch.linalg.matrix_norm(lin.weight, 2))

    def cell(z, x):
        return torch.tanh(lin(z) + x)

    x = torch.randn(3, 4, dtype=F64, requires_grad=True)

    def penalised(adjoint, solver, steps):
        layer = dk.nn.DEQ(cell, solver=solver, adjoint=adjoint, max_steps=steps, throw=False)
        loss = layer(x).pow(2).sum()
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        return torch.autograd.grad(loss + gx.pow(2).sum(), [*lin.parameters(), x])

    got = penalised(_tight()["adjoint"], dk.Anderson(rtol=1e-13, atol=0), 300)
    # Picard unrolled 90 steps: contraction 0.5, so exact to ~1e-27
    ref = penalised(dk.UnrolledAdjoint(), dk.FixedSteps(dk.Picard()), 90)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_recorded_backward_reports_its_solve():
    x, W = _inputs()
    sol = dk.fixed_point(lambda z, x: torch.tanh(z @ W.T + x), torch.zeros(2, 3, dtype=F64),
                         args=(x,), **_tight())
    (gx,) = torch.autograd.grad(sol.value.sum(), x, create_graph=True)
    assert gx.requires_grad and bool(sol.backward["converged"].all())
    assert sol.backward["nmatvec"] > 0
    # the recorded first derivative is the plain one
    (plain,) = torch.autograd.grad(_z(x, W).sum(), x)
    torch.testing.assert_close(gx.detach(), plain, rtol=1e-10, atol=1e-12)


def test_a_closed_over_intermediate_gets_its_higher_derivatives():
    # f closes over tensors computed outside it from x and W (not leaves, not in args)
    x, W = _inputs(d=3, B=2, seed=4)

    def z_closed(x, W):
        shifted, W2 = 2.0 * x, 0.5 * W
        return dk.fixed_point(lambda z: torch.tanh(z @ W2.T + shifted),
                              torch.zeros(2, 3, dtype=F64), **_tight()).value

    def z_args(x, W):
        return dk.fixed_point(lambda z, s: torch.tanh(z @ (0.5 * W).T + s),
                              torch.zeros(2, 3, dtype=F64), args=(2.0 * x,),
                              **_tight()).value

    assert torch.autograd.gradgradcheck(z_closed, (x, W))
    v = torch.ones(2, 3, dtype=F64)
    h1 = torch.autograd.functional.hvp(lambda x: z_closed(x, W).pow(2).sum(), x, v)[1]
    h2 = torch.autograd.functional.hvp(lambda x: z_args(x, W).pow(2).sum(), x, v)[1]
    torch.testing.assert_close(h1, h2, rtol=1e-9, atol=1e-11)


GLOBAL = {}


def test_a_tensor_f_cannot_reach_is_refused_for_higher_order():
    x, W = _inputs()
    GLOBAL["shift"] = 2.0 * x  # read through a global: not found in f's closure

    def f(z):
        return torch.tanh(z @ W.T + GLOBAL["shift"])

    sol = dk.fixed_point(f, torch.zeros(2, 3, dtype=F64), **_tight())
    (g1,) = torch.autograd.grad(sol.value.sum(), x, retain_graph=True)  # first order: fine
    assert bool(torch.isfinite(g1).all())
    with pytest.raises(dk.HigherOrderError, match="close over it"):
        torch.autograd.grad(sol.value.sum(), x, create_graph=True)


@pytest.mark.parametrize("adjoint", [dk.JacobianFreeAdjoint(), dk.PhantomAdjoint(),
                                     dk.OneStepAdjoint(), dk.SHINEAdjoint()],
                         ids=lambda a: type(a).__name__)
def test_approximate_adjoints_refuse_higher_order(adjoint):
    x, W = _inputs()
    sol = dk.fixed_point(lambda z, x: torch.tanh(z @ W.T + x), torch.zeros(2, 3, dtype=F64),
                         dk.Anderson(rtol=1e-12, atol=0), adjoint, args=(x,))
    with pytest.raises(dk.HigherOrderError, match=r"dk\.ImplicitAdjoint"):
        (g,) = torch.autograd.grad(sol.value.sum(), x, create_graph=True)
        torch.autograd.grad(g.sum(), x)


# ----------------------------------------------------------------- forward mode (forward_ad)

import torch.autograd.forward_ad as fwad  # noqa: E402


def _tangent(fn, x, v, grad_enabled=True):
    with torch.set_grad_enabled(grad_enabled), fwad.dual_level():
        return fwad.unpack_dual(fn(fwad.make_dual(x, v))).tangent


@pytest.mark.parametrize("grad_enabled", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("tuple_state", [False, True], ids=["tensor", "tuple"])
def test_forward_mode_tangent_equals_the_implicit_jacobian(tuple_state, grad_enabled):
    x, W = _inputs(d=4, B=3, seed=5, rho=0.8)
    x = x.detach()
    v = torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(6))
    fn = lambda x: _z(x, W.detach(), tuple_state)  # noqa: E731
    J = torch.autograd.functional.jacobian(fn, x)
    want = torch.einsum("bdce,ce->bd", J, v)
    got = _tangent(fn, x, v, grad_enabled)
    assert got is not None  # (before: the tangent was silently dropped)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("adjoint", [dk.JacobianFreeAdjoint(), dk.PhantomAdjoint(steps=3),
                                     dk.OneStepAdjoint(), dk.SHINEAdjoint(),
                                     dk.SHINEAdjoint(refine=3), dk.UnrolledAdjoint()],
                         ids=lambda a: f"{type(a).__name__}{getattr(a, 'refine', '')}")
def test_forward_mode_matches_each_adjoints_reverse_mode(adjoint):
    # each adjoint defines a Jacobian; forward and reverse mode give the same one
    x, W = _inputs(d=4, B=2, seed=7, rho=0.7)
    x, W = x.detach(), W.detach()
    v = torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(8))

    def fn(x):
        return dk.fixed_point(lambda z, x: torch.tanh(z @ W.T + x), torch.zeros(2, 4, dtype=F64),
                              dk.Anderson(rtol=1e-12, atol=0, m=4), adjoint, args=(x,),
                              max_steps=60, throw=False).value

    J = torch.autograd.functional.jacobian(fn, x)
    want = torch.einsum("bdce,ce->bd", J, v)
    torch.testing.assert_close(_tangent(fn, x, v), want, rtol=1e-9, atol=1e-11)


# ----------------------------------------------------------------- torch.func transforms


@pytest.mark.parametrize("tuple_state", [False, True], ids=["tensor", "tuple"])
def test_torch_func_grad_jacrev_jacfwd_hessian_match_autograd(tuple_state):
    x, W = _inputs(d=4, B=2, seed=9, rho=0.8)
    x, W = x.detach(), W.detach()

    def z(x):
        return _z(x, W, tuple_state)

    def loss(x):
        return torch.sin(z(x)).sum()

    xr = x.clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(loss(xr), xr)
    J_ref = torch.autograd.functional.jacobian(z, x)
    H_ref = torch.autograd.functional.hessian(loss, x)
    close = dict(rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(torch.func.grad(loss)(x), g_ref, **close)
    torch.testing.assert_close(torch.func.jacrev(z)(x), J_ref, **close)
    torch.testing.assert_close(torch.func.jacfwd(z)(x), J_ref, **close)
    torch.testing.assert_close(torch.func.hessian(loss)(x), H_ref, **close)
    v = torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    _, jv = torch.func.jvp(z, (x,), (v,))
    torch.testing.assert_close(jv, torch.einsum("bdce,ce->bd", J_ref, v), **close)
    _, vjp_fn = torch.func.vjp(z, x)
    torch.testing.assert_close(vjp_fn(v)[0], torch.einsum("bdce,bd->ce", J_ref, v), **close)


def test_torch_func_vmap_equals_a_loop_over_inputs_and_over_weights():
    x, W = _inputs(d=3, B=2, seed=10)
    x, W = x.detach(), W.detach()
    xs = torch.randn(4, 2, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    got = torch.func.vmap(lambda x: _z(x, W))(xs)
    torch.testing.assert_close(got, torch.stack([_z(a, W) for a in xs]), rtol=0, atol=1e-12)

    def from_x(x):  # the initial state is batched too (made from the vmapped input)
        return dk.fixed_point(lambda z, x: torch.tanh(z @ W.T + x), 0.1 * x, args=(x,),
                              **_tight()).value

    torch.testing.assert_close(torch.func.vmap(from_x)(xs), torch.stack([_z(a, W) for a in xs]),
                               rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="NaN or inf"):
        torch.func.vmap(from_x)(xs.clone().index_fill_(0, torch.tensor([1]), float("nan")))
    Ws = torch.stack([contractive_matrix(3, 0.6, gen=torch.Generator().manual_seed(s))
                      for s in range(3)])
    got = torch.func.vmap(lambda W: _z(x, W))(Ws)  # an ensemble of closed-over weights
    torch.testing.assert_close(got, torch.stack([_z(x, a) for a in Ws]), rtol=0, atol=1e-12)
    # per-example gradients of an ensemble: vmap over grad
    grads = torch.func.vmap(torch.func.grad(lambda W: _z(x, W).square().sum()))(Ws)
    for Wi, gi in zip(Ws, grads):
        Wi = Wi.clone().requires_grad_()
        (ref,) = torch.autograd.grad(_z(x, Wi).square().sum(), Wi)
        torch.testing.assert_close(gi, ref, rtol=1e-9, atol=1e-11)


class _Cell(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4).double()
        with torch.no_grad():
            self.lin.weight.mul_(0.5 / torch.linalg.matrix_norm(self.lin.weight, 2))

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + x)


def test_torch_func_through_a_deq_module_with_functional_call():
    # the parameters are swapped in for the call only: the backward pass runs after
    # functional_call has put the originals back, and still differentiates the swapped ones
    torch.manual_seed(0)
    layer = dk.nn.DEQ(_Cell(), **_tight())
    x = torch.randn(3, 4, dtype=F64)
    params = {k: 1.1 * v.detach() for k, v in layer.named_parameters()}

    def loss(params):
        return torch.func.functional_call(layer, params, (x,)).pow(2).sum()

    got = torch.func.grad(loss)(params)
    with torch.no_grad():
        for k, v in layer.named_parameters():
            v.copy_(params[k])
    ref = torch.autograd.grad(layer(x).pow(2).sum(), list(layer.parameters()))
    for (name, g), r in zip(got.items(), ref):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11, msg=name)


def test_second_derivative_after_functional_call_restored_the_module():
    torch.manual_seed(1)
    layer = dk.nn.DEQ(_Cell(), **_tight())
    x = torch.randn(3, 4, dtype=F64)
    params = {k: (0.9 * v.detach()).requires_grad_() for k, v in layer.named_parameters()}
    out = torch.func.functional_call(layer, params, (x,))  # module restored on return
    (gW,) = torch.autograd.grad(out.pow(2).sum(), params["cell.lin.weight"], create_graph=True)
    (hb,) = torch.autograd.grad(gW.sum(), params["cell.lin.bias"])
    with torch.no_grad():
        for k, v in layer.named_parameters():
            v.copy_(params[k])
    W, b = layer.cell.lin.weight, layer.cell.lin.bias
    (gW_ref,) = torch.autograd.grad(layer(x).pow(2).sum(), W, create_graph=True)
    (hb_ref,) = torch.autograd.grad(gW_ref.sum(), b)
    torch.testing.assert_close(hb, hb_ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("adjoint", [dk.JacobianFreeAdjoint(), dk.PhantomAdjoint(),
                                     dk.OneStepAdjoint(), dk.SHINEAdjoint(),
                                     dk.UnrolledAdjoint()], ids=lambda a: type(a).__name__)
def test_torch_func_with_other_adjoints_is_refused_clearly(adjoint):
    x, W = _inputs()
    x, W = x.detach(), W.detach()

    def loss(x):
        return dk.fixed_point(lambda z, x: torch.tanh(z @ W.T + x), torch.zeros(2, 3, dtype=F64),
                              dk.Anderson(rtol=1e-10, atol=0), adjoint, args=(x,)).value.sum()

    with pytest.raises(dk.UnsupportedTransformError, match=r"only dk\.ImplicitAdjoint"):
        torch.func.grad(loss)(x)


def test_torch_func_hessian_through_minimise():
    # dk.minimise's map itself uses torch.func.grad: transforms nest inside the solve
    g = torch.Generator().manual_seed(3)
    A = torch.randn(3, 8, 4, dtype=F64, generator=g)
    y = torch.randn(3, 8, dtype=F64, generator=g)

    def loss(s):
        lam = s.exp()

        def energy(w, A, y):
            return (torch.einsum("bnp,bp->bn", A, w) - y).square().sum(1) + lam * w.square().sum(1)

        w = dk.minimise(energy, torch.zeros(3, 4, dtype=F64), dk.NewtonKrylov(rtol=1e-12, atol=0),
                        dk.ImplicitAdjoint(dk.GMRES(rtol=1e-12)), args=(A, y)).value
        return w.square().sum()

    s = torch.tensor(0.3, dtype=F64, requires_grad=True)
    (d1,) = torch.autograd.grad(loss(s), s, create_graph=True)
    (d2,) = torch.autograd.grad(d1, s)
    torch.testing.assert_close(torch.func.grad(loss)(s.detach()), d1.detach(), rtol=1e-10, atol=0)
    torch.testing.assert_close(torch.func.hessian(loss)(s.detach()), d2, rtol=1e-9, atol=0)


def test_vmap_over_inputs_with_shared_weights_solves_one_folded_batch():
    x, W = _inputs(d=3, B=2, seed=11)
    x, W = x.detach(), W.detach()
    rows = []

    def f(z, x):
        rows.append(z.shape[0])
        return torch.tanh(z @ W.T + x)

    xs = torch.randn(5, 2, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    got = torch.func.vmap(lambda x: dk.fixed_point(f, torch.zeros(2, 3, dtype=F64), args=(x,),
                                                   **_tight()).value)(xs)
    assert max(rows) == 10  # the 5 problems of 2 samples ran as one batch of 10
    torch.testing.assert_close(got, torch.stack([_z(a, W) for a in xs]), rtol=0, atol=1e-12)
