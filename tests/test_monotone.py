"""Tests of the monotone operator equilibrium layer (monDEQ)."""

from __future__ import annotations

import pytest
import torch

import deqkit as dk
from deqkit.nn._monotone import ForwardBackward, MonotoneDEQ, MonotoneLinear, PeacemanRachford

F64 = torch.float64
TIGHT = 1e-13


def make_layer(n_in=5, width=12, m=0.5, scale=1.0, splitting=None, solver=None, seed=0,
               max_steps=3000, adjoint=None):
    torch.manual_seed(seed)
    layer = MonotoneDEQ(n_in, width, m=m, splitting=splitting, solver=solver,
                        max_steps=max_steps, adjoint=adjoint).double()
    with torch.no_grad():
        layer.linear.A.mul_(scale)
        layer.linear.B.mul_(scale)
        layer.U.bias.normal_()
    return layer


def pre_activation(layer, x, z):
    W = layer.linear.weight().detach()
    return z @ W.T + layer.U(x).detach()


def reference_equilibrium(W, c, alpha=0.5, tol=1e-14, max_iter=20000):
    """Independent solve: Peaceman-Rachford written out densely, then semismooth Newton polish."""
    n = W.shape[0]
    eye = torch.eye(n, dtype=W.dtype)
    M = eye + alpha * (eye - W)
    u = torch.zeros_like(c)
    for _ in range(max_iter):
        z = torch.clamp(u, min=0)
        u_half = 2 * z - u
        z_half = torch.linalg.solve(M, (u_half + alpha * c).T).T
        u_new = 2 * z_half - u_half
        done = (u_new - u).abs().max() <= tol
        u = u_new
        if done:
            break
    z = torch.clamp(u, min=0)
    for _ in range(5):  # Newton on z - ReLU(W z + c) = 0 with the active set fixed
        pre = z @ W.T + c
        F = z - torch.clamp(pre, min=0)
        for b in range(z.shape[0]):
            D = torch.diag((pre[b] > 0).to(W.dtype))
            z[b] = z[b] - torch.linalg.solve(eye - D @ W, F[b])
    return z


# --------------------------------------------------------------------------- parametrisation


@pytest.mark.parametrize("m", [0.05, 0.5])
@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_strong_monotonicity(m, scale):
    torch.manual_seed(1)
    lin = MonotoneLinear(16, m=m).double()
    with torch.no_grad():
        lin.A.mul_(scale)
        lin.B.mul_(scale)
    W = lin.weight().detach()
    S = torch.eye(16, dtype=F64) - W
    eig = torch.linalg.eigvalsh(0.5 * (S + S.T))
    assert float(eig.min()) >= m - 1e-9 * max(1.0, scale**2)
    if scale > 1:
        assert float(torch.linalg.matrix_norm(W, 2)) > 10  # far from contractive
    z = torch.randn(3, 16, dtype=F64)
    torch.testing.assert_close(lin(z), z @ W.T)


def test_resolvent_matches_dense_solve():
    torch.manual_seed(2)
    lin = MonotoneLinear(6, m=0.2).double()
    v = torch.randn(4, 6, dtype=F64)
    alpha = 0.7
    M = (1 + alpha) * torch.eye(6, dtype=F64) - alpha * lin.weight().detach()
    expected = torch.linalg.solve(M, v.T).T
    torch.testing.assert_close(lin.resolvent(v, alpha).detach(), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lin.factorise(alpha)(v).detach(), expected, rtol=1e-12,
                               atol=1e-12)


# --------------------------------------------------------------------------- forward


SPLITTINGS = {
    "fb": lambda: ForwardBackward(alpha="auto", rtol=TIGHT, atol=0),
    "pr": lambda: PeacemanRachford(alpha=1.0, rtol=TIGHT, atol=0),
}


@pytest.mark.parametrize("name", ["fb", "pr"])
def test_unique_equilibrium_from_any_start(name):
    layer = make_layer(scale=1.5, splitting=SPLITTINGS[name](),
                       solver=dk.Anderson(rtol=TIGHT, atol=0))
    x = torch.randn(6, 5, dtype=F64)
    with torch.no_grad():
        z_ref = layer(x)
        assert layer.last_solution.result is dk.RESULTS.successful
        for _ in range(3):
            z = layer(x, z0=3 * torch.randn(6, 12, dtype=F64))
            assert layer.last_solution.result is dk.RESULTS.successful
            torch.testing.assert_close(z, z_ref, rtol=0, atol=1e-9)
    res = z_ref - torch.relu(pre_activation(layer, x, z_ref))
    assert float(res.abs().max()) < 1e-9


def test_fb_and_pr_agree_and_match_dense_reference():
    layer = make_layer(scale=2.0, splitting=SPLITTINGS["pr"]())
    W = layer.linear.weight().detach()
    assert float(torch.linalg.matrix_norm(W, 2)) > 5
    x = torch.randn(5, 5, dtype=F64)
    with torch.no_grad():
        z_pr = layer(x)
        assert layer.last_solution.result is dk.RESULTS.successful
        layer.splitting = SPLITTINGS["fb"]()
        layer.solver = dk.Anderson(rtol=TIGHT, atol=0)
        z_fb = layer(x)
        assert layer.last_solution.result is dk.RESULTS.successful
        z_ref = reference_equilibrium(W, layer.U(x))
    torch.testing.assert_close(z_pr, z_ref, rtol=0, atol=1e-9)
    torch.testing.assert_close(z_fb, z_ref, rtol=0, atol=1e-9)


def test_auto_step_size():
    layer = make_layer(splitting=ForwardBackward(alpha="auto"))
    W = layer.linear.weight().detach()
    L = torch.linalg.matrix_norm(torch.eye(12, dtype=F64) - W, 2)
    assert layer.step_size() == pytest.approx(0.5 / float(L) ** 2)
    assert make_layer(splitting=PeacemanRachford(alpha=0.3)).step_size() == 0.3


def test_picard_on_the_layer_diverges_but_monotone_deq_converges():
    layer = make_layer(width=20, scale=1.0, splitting=PeacemanRachford(rtol=1e-10, atol=0),
                       max_steps=500)
    W = layer.linear.weight().detach()
    assert float(torch.linalg.matrix_norm(W, 2)) > 2
    x = torch.randn(8, 5, dtype=F64)
    c = layer.U(x).detach()
    naive = dk.fixed_point(lambda z, c: torch.relu(z @ W.T + c), torch.zeros(8, 20, dtype=F64),
                           solver=dk.Picard(rtol=1e-10, atol=0), max_steps=500, args=(c,),
                           throw=False)
    assert naive.result is not dk.RESULTS.successful
    with torch.no_grad():
        z = layer(x)
    assert layer.last_solution.result is dk.RESULTS.successful
    assert float((z - torch.relu(z @ W.T + c)).abs().max()) < 1e-8


# --------------------------------------------------------------------------- gradients


def _kink_free(layer, x, margin):
    with torch.no_grad():
        z = layer(x)
        return float(pre_activation(layer, x, z).abs().min()) > margin


def _grads(layer, x, w):
    layer.zero_grad()
    (layer(x) * w).sum().backward()
    assert layer.last_solution.result is dk.RESULTS.successful
    return [p.grad.clone() for p in (layer.U.weight, layer.U.bias, layer.linear.A,
                                     layer.linear.B)]


def _analytic_grads(layer, x, w):
    """dL/dθ from (I - D W)^T v = D w at the reference equilibrium, by autograd through
    z = ReLU(W z* + U x + b) with the linear-system adjoint written out."""
    W = layer.linear.weight()
    c = layer.U(x)
    z = reference_equilibrium(W.detach(), c.detach())
    pre = z @ W.detach().T + c.detach()
    D = (pre > 0).to(F64)
    eye = torch.eye(W.shape[0], dtype=F64)
    # v_b solves (I - D_b W)^T v_b = w_b; the gradient is v_b^T D_b d(W z + c)
    v = torch.stack([torch.linalg.solve((eye - torch.diag(D[b]) @ W.detach()).T, w[b])
                     for b in range(x.shape[0])])
    layer.zero_grad()
    ((D * v) * (z @ W.T + c)).sum().backward()
    return [p.grad.clone() for p in (layer.U.weight, layer.U.bias, layer.linear.A,
                                     layer.linear.B)]


@pytest.mark.parametrize("name", ["fb", "pr"])
def test_implicit_gradient_is_exact(name):
    x = None
    for seed in range(20):
        layer = make_layer(width=8, scale=1.5, splitting=SPLITTINGS[name](), seed=seed,
                           solver=dk.Anderson(rtol=TIGHT, atol=0),
                           adjoint=dk.ImplicitAdjoint(dk.GMRES(rtol=1e-13, atol=0)))
        x = torch.randn(3, 5, dtype=F64)
        if _kink_free(layer, x, 1e-3):
            break
    else:  # pragma: no cover
        pytest.fail("no kink-free instance found")
    w = torch.randn(3, 8, dtype=F64)
    g_gmres = _grads(layer, x, w)
    layer.adjoint = dk.ImplicitAdjoint(dk.Dense())
    g_dense = _grads(layer, x, w)
    g_ref = _analytic_grads(layer, x, w)
    for a, b, r in zip(g_gmres, g_dense, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(a, r, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", ["fb", "pr"])
def test_gradcheck_tiny(name):
    for seed in range(50):
        layer = make_layer(n_in=3, width=4, m=0.5, splitting=SPLITTINGS[name](), seed=seed,
                           solver=dk.Anderson(rtol=TIGHT, atol=0),
                           adjoint=dk.ImplicitAdjoint(dk.Dense()))
        x = torch.randn(2, 3, dtype=F64)
        if _kink_free(layer, x, 1e-2):
            break
    else:  # pragma: no cover
        pytest.fail("no kink-free instance found")
    names = ["U.weight", "U.bias", "linear.A", "linear.B"]
    params = tuple(dict(layer.named_parameters())[k].detach().clone().requires_grad_()
                   for k in names)

    def f(*ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_training_steps_refactorise():
    layer = make_layer(width=8, splitting=PeacemanRachford(rtol=1e-8, atol=0))
    opt = torch.optim.SGD(layer.parameters(), lr=1e-2)
    x = torch.randn(4, 5, dtype=F64)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = layer(x).pow(2).sum()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        assert layer.last_solution.result is dk.RESULTS.successful
    assert losses[-1] < losses[0]


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("build", "exc", "name"),
    [
        (lambda: MonotoneLinear(4, m=0.0), ValueError, "`m`"),
        (lambda: MonotoneLinear(4, m=-1.0), ValueError, "`m`"),
        (lambda: MonotoneLinear(0), ValueError, "`width`"),
        (lambda: MonotoneLinear(4).resolvent(torch.zeros(1, 4), 0.0), ValueError, "`alpha`"),
        (lambda: ForwardBackward(alpha=0.0), ValueError, "`alpha`"),
        (lambda: ForwardBackward(alpha="fast"), ValueError, "`alpha`"),
        (lambda: ForwardBackward(rtol=-1.0), ValueError, "`rtol`"),
        (lambda: PeacemanRachford(alpha=-1.0), ValueError, "`alpha`"),
        (lambda: PeacemanRachford(alpha="auto"), ValueError, "`alpha`"),
        (lambda: PeacemanRachford(atol=float("nan")), ValueError, "`atol`"),
        (lambda: MonotoneDEQ(3, 4, splitting="pr"), TypeError, "`splitting`"),
        (lambda: MonotoneDEQ(3, 4, max_steps=-1), ValueError, "`max_steps`"),
        (lambda: MonotoneDEQ(0, 4), ValueError, "`in_features`"),
        (lambda: MonotoneDEQ(3, 4, m=0), ValueError, "`m`"),
        (lambda: MonotoneDEQ(3, 4, adjoint="implicit"), TypeError, "`adjoint`"),
        (lambda: MonotoneDEQ(3, 4)(torch.zeros(2, 3), z0=torch.zeros(2, 5)), ValueError, "`z0`"),
    ],
)
def test_argument_validation(build, exc, name):
    with pytest.raises(exc, match=name):
        build()


# --------------------------------------------------------------------------- built on DEQ


def test_monotone_deq_is_a_deq_with_eval_budget_warm_start_and_overrides():
    layer = make_layer(splitting=PeacemanRachford(rtol=1e-10, atol=0), max_steps=4)
    assert isinstance(layer, dk.nn.DEQ)
    assert layer.eval_max_steps == 4  # defaults to max_steps
    layer = MonotoneDEQ(5, 12, m=0.5, max_steps=2, eval_max_steps=300,
                        splitting=PeacemanRachford(rtol=1e-10, atol=0)).double()
    assert sorted(layer.state_dict()) == ["U.bias", "U.weight", "linear.A", "linear.B"]
    x = torch.randn(4, 5, dtype=F64)
    layer(x)
    assert int(layer.last_solution.stats["nstep"].max()) == 2
    layer.eval()
    with torch.no_grad():
        z = layer(x)
        assert layer.last_solution.result is dk.RESULTS.successful
        with layer.overrides(eval_max_steps=1, solver=dk.Picard(rtol=1e-10, atol=0)):
            layer(x)
            assert int(layer.last_solution.stats["nstep"].max()) == 1
        assert layer.eval_max_steps == 300
        cache, ids = dk.nn.FixedPointCache(10), torch.arange(4)
        with layer.warm_start(cache, ids):
            layer(x)
        with layer.warm_start(cache, ids):
            z_warm = layer(x)  # starts at the stored u*: converged at once
        assert int(layer.last_solution.stats["nstep"].max()) == 0
    torch.testing.assert_close(z_warm, z, rtol=0, atol=1e-8)


def test_monotone_deq_warns_like_a_deq():
    layer = make_layer(splitting=ForwardBackward(alpha=50.0), max_steps=200)  # FB too large a step
    with pytest.warns(dk.nn.DEQWarning, match="MonotoneDEQ forward"):
        layer(torch.randn(3, 5, dtype=F64))
