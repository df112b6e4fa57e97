"""Reversible equilibrium solving (issue 19): dk.Reversible and dk.ReversibleAdjoint."""

from __future__ import annotations

import warnings

import pytest
import torch

import deqkit as dk
from helpers import F64, contractive_matrix


def _cell(d=6, B=3, seed=0, norm=0.7):
    g = torch.Generator().manual_seed(seed)
    W = contractive_matrix(d, norm, gen=g).requires_grad_()
    x = torch.randn(B, d, dtype=F64, generator=g, requires_grad=True)
    return (lambda z, x: torch.tanh(z @ W.T + x)), W, x


def _solve(f, x, adjoint, solver, steps, z0=None, **kw):
    z0 = torch.zeros_like(x) if z0 is None else z0
    return dk.fixed_point(f, z0, solver, adjoint, args=(x,), max_steps=steps, throw=False, **kw)


@pytest.mark.parametrize("beta, steps", [(0.5, 10), (0.5, 20), (0.3, 30), (1.5, 8)])
def test_gradient_equals_unrolled_backprop_of_the_same_iteration(beta, steps):
    f, W, x = _cell()
    run = dk.Reversible(beta=beta, rtol=1e-30, atol=0)  # (runs every step)
    rev = _solve(f, x, dk.ReversibleAdjoint(), run, steps)
    g_rev = torch.autograd.grad(rev.value.square().sum(), (W, x))
    unr = _solve(f, x, dk.UnrolledAdjoint(), dk.FixedSteps(run), steps)
    g_unr = torch.autograd.grad(unr.value.square().sum(), (W, x))
    torch.testing.assert_close(rev.value, unr.value, rtol=0, atol=1e-13)
    for a, b in zip(g_rev, g_unr):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    assert rev.backward["nfev"] == 2 * steps and rev.backward["stored_states"] == 3


def test_per_sample_stopping_rebuilds_each_samples_own_steps():
    f, W, x = _cell(B=4, seed=1)
    x2 = (x * torch.logspace(-4, 0, 4, dtype=F64)[:, None]).detach().requires_grad_()
    solver = dk.Reversible(beta=0.5, rtol=1e-9, atol=0)
    sol = _solve(f, x2, dk.ReversibleAdjoint(on_error="ignore"), solver, 60)
    steps = sol.stats["nstep"]
    assert len(set(steps.tolist())) > 1 and bool(sol.stats["converged"].all())
    (gW,) = torch.autograd.grad(sol.value.square().sum(), W)
    # reference: each sample alone, unrolled for exactly its own number of steps
    ref = torch.zeros_like(W)
    for b in range(4):
        one = _solve(f, x2[b:b + 1], dk.UnrolledAdjoint(), dk.FixedSteps(solver), int(steps[b]))
        torch.testing.assert_close(one.value, sol.value[b:b + 1], rtol=0, atol=1e-13)
        ref += torch.autograd.grad(one.value.square().sum(), W)[0]
    torch.testing.assert_close(gW, ref, rtol=1e-8, atol=1e-12)


def _reference_error(f, x, beta, steps, every=None):
    """The reconstruction error measured independently: all iterates stored, then rebuilt
    from the last pair with the plain formulas (resetting at the checkpoints)."""
    with torch.no_grad():
        z = torch.zeros_like(x)
        ys, zs = [z.clone()], [z.clone()]
        y = z.clone()
        for _ in range(steps):
            y = torch.lerp(y, f(z, x), beta)
            z = torch.lerp(z, f(y, x), beta)
            ys.append(y)
            zs.append(z)
        scale = zs[-1].norm(dim=1)
        err = torch.zeros(x.shape[0], dtype=F64)
        for n in range(steps - 1, -1, -1):
            z = (z - beta * f(y, x)) / (1 - beta)
            y = (y - beta * f(z, x)) / (1 - beta)
            if n == 0 or (every and n % every == 0):
                for a, b in ((z, zs[n]), (y, ys[n])):
                    den = torch.fmax(b.norm(dim=1), scale)
                    err = torch.fmax(err, (a - b).norm(dim=1) / den)
                y, z = ys[n].clone(), zs[n].clone()
    return err


@pytest.mark.parametrize("every", [None, 5])
def test_reported_reconstruction_error_matches_an_independent_measurement(every):
    f, _, x = _cell(seed=2)
    beta, steps = 0.7, 25
    sol = _solve(f, x, dk.ReversibleAdjoint(checkpoint_every=every, on_error="ignore"),
                 dk.Reversible(beta=beta, rtol=1e-30, atol=0), steps)
    sol.value.sum().backward()
    got = sol.backward["reconstruction_error"]
    want = _reference_error(f, x.detach(), beta, steps, every)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-18)
    if every is None:
        assert float(got.max()) > 1e-6  # this regime is outside the usable one ...
    else:
        assert float(got.max()) < 1e-9  # ... and checkpoints bring it back
        assert sol.backward["stored_states"] == 3 + 2 * ((steps - 1) // every)


def test_outside_the_stable_regime_the_gradient_is_flagged_loudly():
    f, W, x = _cell(seed=3)
    solver = dk.Reversible(beta=0.8, rtol=1e-30, atol=0)
    sol = _solve(f, x, dk.ReversibleAdjoint(), solver, 30)
    with pytest.warns(dk.ReconstructionWarning, match="checkpoint_every"):
        sol.value.sum().backward()
    sol = _solve(f, x, dk.ReversibleAdjoint(on_error="raise"), solver, 30)
    with pytest.raises(RuntimeError, match="Worst error"):
        sol.value.sum().backward()
    # with checkpoints the same solve is exact and silent
    sol = _solve(f, x, dk.ReversibleAdjoint(checkpoint_every=4), solver, 30)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = torch.autograd.grad(sol.value.square().sum(), W)[0]
    unr = _solve(f, x, dk.UnrolledAdjoint(), dk.FixedSteps(solver), 30)
    torch.testing.assert_close(g, torch.autograd.grad(unr.value.square().sum(), W)[0],
                               rtol=1e-7, atol=1e-11)


def test_stored_states_do_not_grow_with_the_steps():
    f, _, x = _cell(seed=4)
    stored = []
    for steps in (5, 20, 40):
        sol = _solve(f, x, dk.ReversibleAdjoint(on_error="ignore"),
                     dk.Reversible(beta=0.3, rtol=1e-30, atol=0), steps)
        sol.value.sum().backward()
        stored.append(sol.backward["stored_states"])
    assert stored == [3, 3, 3]


def test_gradcheck_and_tuple_states():
    g = torch.Generator().manual_seed(5)
    W = contractive_matrix(4, 0.6, gen=g).requires_grad_()
    x = torch.randn(2, 4, dtype=F64, generator=g, requires_grad=True)
    solver = dk.Reversible(beta=0.4, rtol=1e-30, atol=0)

    def z_tensor(x, W):
        return dk.fixed_point(lambda z, x: torch.tanh(z @ W.T + x), torch.zeros(2, 4, dtype=F64),
                              solver, dk.ReversibleAdjoint(), args=(x,), max_steps=12,
                              throw=False).value

    def z_tuple(x, W):
        def f(z, x):
            out = torch.tanh(torch.cat(z, dim=1) @ W.T + x)
            return out[:, :2], out[:, 2:]

        z0 = (torch.zeros(2, 2, dtype=F64), torch.zeros(2, 2, dtype=F64))
        return torch.cat(dk.fixed_point(f, z0, solver, dk.ReversibleAdjoint(), args=(x,),
                                        max_steps=12, throw=False).value, dim=1)

    assert torch.autograd.gradcheck(z_tensor, (x, W))
    assert torch.autograd.gradcheck(z_tuple, (x, W))
    torch.testing.assert_close(z_tensor(x, W), z_tuple(x, W), rtol=0, atol=1e-14)


def test_deq_layer_forward_mode_and_refusals():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4).double()
    with torch.no_grad():
        lin.weight.mul_(0.5 / torch.linalg.matrix_norm(lin.weight, 2))
    layer = dk.nn.DEQ(lambda z, x: torch.tanh(lin(z) + x), solver=dk.Reversible(beta=0.5),
                      adjoint=dk.ReversibleAdjoint(), max_steps=15, throw=False)
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    layer(x).sum().backward()
    assert lin.weight.grad is not None and bool(torch.isfinite(lin.weight.grad).all())
    # forward mode: the tangent of the iterations run (equals the reverse-mode Jacobian)
    import torch.autograd.forward_ad as fwad

    f = lambda z, x: torch.tanh(lin(z) + x)  # noqa: E731
    solver = dk.Reversible(beta=0.5, rtol=1e-30, atol=0)
    v = torch.randn(3, 4, dtype=F64)
    xd = x.detach()
    J = torch.autograd.functional.jacobian(
        lambda x: _solve(f, x, dk.ReversibleAdjoint(), solver, 10).value, xd)
    with fwad.dual_level():
        t = fwad.unpack_dual(_solve(f, fwad.make_dual(xd, v), dk.ReversibleAdjoint(),
                                    solver, 10).value).tangent
    torch.testing.assert_close(t, torch.einsum("bdce,ce->bd", J, v), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"needs the solver dk\.Reversible"):
        _solve(f, x, dk.ReversibleAdjoint(), dk.Anderson(), 10)
    with pytest.raises(ValueError, match="not reversible"):
        dk.Reversible(beta=1.0)
    with pytest.raises(ValueError, match="beta"):
        dk.Reversible(beta=2.5)
    sol = _solve(f, x, dk.ReversibleAdjoint(), solver, 10)
    with pytest.raises(dk.HigherOrderError):
        torch.autograd.grad(sol.value.sum(), x, create_graph=True)


def test_fixed_steps_runs_every_step_and_matches_unrolled():
    f, W, x = _cell(seed=6)
    solver = dk.FixedSteps(dk.Reversible(beta=0.4))  # (its tolerance would stop it early)
    rev = _solve(f, x, dk.ReversibleAdjoint(), solver, 12)
    unr = _solve(f, x, dk.UnrolledAdjoint(), solver, 12)
    assert rev.stats["nstep"].tolist() == [12, 12, 12]
    g1 = torch.autograd.grad(rev.value.square().sum(), W)[0]
    g2 = torch.autograd.grad(unr.value.square().sum(), W)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)


def test_spectral_norm_cell_in_training_mode_backward_sees_the_forwards_function():
    # the power iteration runs once per forward solve (its weight is cached for the solve);
    # the backward's re-evaluations must neither run it again nor change the function
    torch.manual_seed(0)
    model = dk.zoo.DEQMLP((5,), 3, width=8, solver=dk.FixedSteps(dk.Reversible(beta=0.4)),
                          adjoint=dk.ReversibleAdjoint(), max_steps=10).double().train()
    x = torch.randn(4, 5, dtype=F64)
    buffers = [b.clone() for b in model.buffers()]
    out = model(x)
    after_forward = [b.clone() for b in model.buffers()]
    assert any(not torch.equal(a, b) for a, b in zip(buffers, after_forward))
    g_rev = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    for a, b in zip(after_forward, model.buffers()):
        assert torch.equal(a, b)  # the backward left the power-iteration state alone
    for a, b in zip(buffers, model.buffers()):  # the same start for the reference
        b.copy_(a)
    with model.deq.overrides(adjoint=dk.UnrolledAdjoint()):
        g_unr = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
    for a, b in zip(g_rev, g_unr):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
