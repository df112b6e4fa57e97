"""dk.nn.FixedPointCache: warm starts by sample id."""

from __future__ import annotations

import pytest
import torch

import deqkit as dk
from deqkit.nn import FixedPointCache


def _problem(B=6, D=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, D, generator=g, dtype=torch.float64)
    W = 0.8 * W / torch.linalg.matrix_norm(W, 2)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    return (lambda z, x: torch.tanh(z @ W.T + x)), x


def test_unseen_ids_get_the_default_and_seen_ids_their_stored_value():
    cache = FixedPointCache(10)
    default = torch.full((3, 2), -1.0)
    ids = torch.tensor([1, 4, 9])
    assert cache.initial(ids, default) is default  # nothing stored yet
    cache.update(torch.tensor([4, 9]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    out = cache.initial(ids, default)
    assert torch.equal(out, torch.tensor([[-1.0, -1.0], [1.0, 2.0], [3.0, 4.0]]))
    assert len(cache) == 2
    cache.clear()
    assert len(cache) == 0 and torch.equal(cache.initial(ids, default), default)


def test_warm_start_takes_fewer_steps_to_the_same_equilibrium():
    f, x = _problem()
    solver = dk.Picard(rtol=1e-12, atol=0.0)
    cache = FixedPointCache(100)
    ids = torch.tensor([3, 14, 15, 92, 65, 35])
    cold = dk.fixed_point(f, torch.zeros_like(x), solver, max_steps=500, args=(x,))
    cache.update(ids, cold.value, converged=cold.stats["converged"])
    # a slightly different input (the next epoch's weights / the next frame): still closer
    x2 = x + 1e-3 * torch.ones_like(x)
    ref = dk.fixed_point(f, torch.zeros_like(x), solver, max_steps=500, args=(x2,))
    warm = dk.fixed_point(f, cache.initial(ids, torch.zeros_like(x)), solver, max_steps=500,
                          args=(x2,))
    assert bool((warm.stats["nstep"] < ref.stats["nstep"]).all())  # every sample saves steps
    torch.testing.assert_close(warm.value, ref.value, rtol=1e-10, atol=1e-12)


def test_gradients_do_not_depend_on_the_warm_start():
    # z0 carries no gradient: the implicit gradient at the (same) equilibrium is the same.
    _, x = _problem(seed=1)
    W = torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    W = (0.6 * W / torch.linalg.matrix_norm(W, 2)).requires_grad_()

    def f(z, x):
        return torch.tanh(z @ W.T + x)

    solver = dk.Anderson(rtol=1e-12, atol=0.0)
    adjoint = dk.ImplicitAdjoint(dk.GMRES(rtol=1e-12, atol=0.0))
    ids = torch.arange(6)
    cache = FixedPointCache(6)
    grads = []
    for _ in range(2):
        W.grad = None
        sol = dk.fixed_point(f, cache.initial(ids, torch.zeros_like(x)), solver, adjoint,
                             max_steps=200, args=(x,))
        sol.value.square().sum().backward()
        cache.update(ids, sol.value, converged=sol.stats["converged"])
        grads.append((W.grad.clone(), int(sol.stats["nstep"].max())))
    (g_cold, n_cold), (g_warm, n_warm) = grads
    assert n_warm < n_cold
    torch.testing.assert_close(g_warm, g_cold, rtol=1e-9, atol=1e-12)


def test_tuple_states_and_only_converged():
    cache = FixedPointCache(5)
    z = (torch.ones(2, 3), 2 * torch.ones(2, 1, 2))
    cache.update(torch.tensor([0, 1]), z, converged=torch.tensor([True, False]))
    out = cache.initial(torch.tensor([0, 1]), (torch.zeros(2, 3), torch.zeros(2, 1, 2)))
    assert isinstance(out, tuple) and out[1].shape == (2, 1, 2)
    assert torch.equal(out[0], torch.tensor([[1.0, 1, 1], [0, 0, 0]]))  # id 1 not stored
    assert torch.equal(out[1][0], 2 * torch.ones(1, 2))
    assert torch.equal(out[1][1], torch.zeros(1, 2))
    keep_all = FixedPointCache(5, only_converged=False)
    keep_all.update(torch.tensor([0, 1]), z, converged=torch.tensor([True, False]))
    assert len(keep_all) == 2


def test_state_dict_round_trip():
    cache = FixedPointCache(4)
    cache.update(torch.tensor([2]), torch.tensor([[5.0, 6.0]]))
    other = FixedPointCache(4)
    other.load_state_dict(cache.state_dict())
    out = other.initial(torch.tensor([2, 3]), torch.zeros(2, 2))
    assert torch.equal(out, torch.tensor([[5.0, 6.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="capacity"):
        FixedPointCache(5).load_state_dict(cache.state_dict())


def test_bad_arguments_are_rejected_with_clear_errors():
    with pytest.raises(ValueError, match="capacity"):
        FixedPointCache(0)
    cache = FixedPointCache(3)
    z = torch.zeros(2, 4)
    with pytest.raises(TypeError, match="int64 tensor"):
        cache.update(torch.tensor([0.0, 1.0]), z)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        cache.update(torch.tensor([0, 1, 2]), z)
    with pytest.raises(ValueError, match=r"\[0, 3\).*capacity"):
        cache.update(torch.tensor([0, 3]), z)
    with pytest.raises(ValueError, match="duplicates"):
        cache.update(torch.tensor([1, 1]), z)
    cache.update(torch.tensor([0, 1]), z)
    with pytest.raises(ValueError, match="one cache per state layout"):
        cache.initial(torch.tensor([0, 1]), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="converged"):
        cache.update(torch.tensor([0, 1]), z, converged=torch.tensor([True]))
