"""Tests of deqkit.stability.parametrizations: bounded spectral norm, weight norm, caching, init."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from deqkit.stability import jacobian_spectral_norm
from deqkit.stability.parametrizations import (
    _SpectralNormBound,
    cached_parametrizations,
    scale_to_contractive,
    spectral_norm,
    weight_norm,
)

F64 = torch.float64
FAST = settings(max_examples=15, deadline=None)


def make_linear(dim_in, dim_out, scale, seed, dtype=F64):
    torch.manual_seed(seed)
    lin = nn.Linear(dim_in, dim_out, dtype=dtype)
    with torch.no_grad():
        lin.weight.mul_(scale)
    return lin


def top_right_singular_vector(weight):
    return torch.linalg.svd(weight.detach())[2][0]


def power_iteration_counter(module, name="weight"):
    counts = []
    param = module.parametrizations[name][0]
    assert isinstance(param, _SpectralNormBound)
    param.register_forward_hook(lambda *args: counts.append(1))
    return counts


# --------------------------------------------------------------------------- spectral_norm
@FAST
@given(
    dim=st.integers(1, 16),
    scale=st.floats(0.05, 10.0),
    seed=st.integers(0, 2**31 - 1),
    train=st.booleans(),
)
def test_spectral_norm_makes_tanh_cell_contractive(dim, scale, seed, train):
    lin = spectral_norm(make_linear(dim, dim, scale, seed), bound=0.9)
    lin.train(train)

    def f(z):
        return torch.tanh(lin(z))

    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(64, dim, generator=gen, dtype=F64) * 3
    b = torch.randn(64, dim, generator=gen, dtype=F64) * 3
    # adversarial pairs along the top singular direction of the constrained weight
    top = top_right_singular_vector(lin.weight)
    a = torch.cat([a, a[:8]])
    b = torch.cat([b, a[:8] + 1e-3 * top])
    with torch.no_grad():
        lhs = (f(a) - f(b)).norm(dim=1)
    rhs = 0.9 * (a - b).norm(dim=1) + 1e-6
    assert bool((lhs <= rhs).all()), float((lhs - rhs).max())
    assert float(torch.linalg.matrix_norm(lin.weight.detach(), ord=2)) <= 0.9 * (1 + 1e-9)


def test_spectral_norm_large_weight_hits_bound_and_small_weight_unchanged():
    big = spectral_norm(make_linear(6, 4, 5.0, 0), bound=0.7)
    norm = torch.linalg.matrix_norm(big.weight.detach(), ord=2)
    assert float(norm) == pytest.approx(0.7, rel=1e-9)

    small = make_linear(6, 4, 1.0, 1)
    with torch.no_grad():
        small.weight.mul_(0.5 / torch.linalg.matrix_norm(small.weight, ord=2))
    original = small.weight.detach().clone()
    spectral_norm(small, bound=0.9)
    for mode in (True, False):
        small.train(mode)
        assert torch.equal(small.weight, original)


def test_spectral_norm_eval_freezes_buffers_train_updates_them():
    lin = spectral_norm(make_linear(5, 5, 3.0, 2, dtype=torch.float32), bound=1.0)
    param = lin.parametrizations.weight[0]
    # the raw weight moves (as during training): the power iteration must track it
    with torch.no_grad():
        lin.parametrizations.weight.original.add_(torch.randn(5, 5))
    lin.eval()
    u0, v0 = param._u.clone(), param._v.clone()
    w1, w2 = lin.weight, lin.weight
    assert torch.equal(w1, w2)
    assert torch.equal(param._u, u0)
    assert torch.equal(param._v, v0)
    lin.train()
    _ = lin.weight
    assert not torch.equal(param._u, u0)


def test_spectral_norm_state_dict_roundtrip_and_gradient():
    lin = spectral_norm(make_linear(4, 3, 4.0, 3), bound=0.5, n_power_iterations=2)
    keys = set(lin.state_dict())
    assert {"parametrizations.weight.0._u", "parametrizations.weight.0._v"} <= keys
    assert "parametrizations.weight.original" in keys
    other = spectral_norm(make_linear(4, 3, 1.0, 99), bound=0.5, n_power_iterations=2)
    other.load_state_dict(lin.state_dict())
    lin.eval()
    other.eval()
    assert torch.equal(lin.weight, other.weight)
    # gradient reaches the raw weight
    lin.train()
    lin(torch.randn(2, 4, dtype=F64)).pow(2).sum().backward()
    grad = lin.parametrizations.weight.original.grad
    assert grad is not None
    assert bool(torch.isfinite(grad).all())
    assert float(grad.abs().sum()) > 0


def test_spectral_norm_convolutions_bound_reshaped_kernel():
    torch.manual_seed(4)
    conv = spectral_norm(nn.Conv2d(3, 5, 3), bound=0.8)
    assert float(torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)) <= 0.8 * (
        1 + 1e-5
    )
    assert conv(torch.randn(2, 3, 6, 6)).shape == (2, 5, 4, 4)
    tconv = spectral_norm(nn.ConvTranspose2d(3, 5, 3), bound=0.8)  # dim=1 by default
    assert tconv.parametrizations.weight[0].dim == 1
    mat = tconv.weight.detach().movedim(1, 0).flatten(1)
    assert float(torch.linalg.matrix_norm(mat, ord=2)) <= 0.8 * (1 + 1e-5)


def test_spectral_norm_power_iteration_warm_up_without_svd(monkeypatch):
    import deqkit.stability.parametrizations as P

    monkeypatch.setattr(P, "_EXACT_INIT_NUMEL", 0)
    lin = spectral_norm(make_linear(8, 8, 3.0, 5), bound=0.9)
    lin.eval()
    norm = float(torch.linalg.matrix_norm(lin.weight.detach(), ord=2))
    assert norm == pytest.approx(0.9, rel=1e-2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bound": 0.0}, "`bound`"),
        ({"bound": float("inf")}, "`bound`"),
        ({"bound": "1"}, "`bound`"),
        ({"n_power_iterations": 0}, "`n_power_iterations`"),
        ({"eps": -1.0}, "`eps`"),
        ({"dim": 2}, "`dim`"),
        ({"name": "nope"}, "nope"),
        ({"name": "bias"}, "2 dimensions"),
    ],
)
def test_spectral_norm_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        spectral_norm(nn.Linear(3, 3), **kwargs)


def test_spectral_norm_not_a_module():
    with pytest.raises(TypeError, match="`module`"):
        spectral_norm(torch.ones(3, 3))


# ----------------------------------------------------------------------------- weight_norm
def test_weight_norm_wraps_torch():
    torch.manual_seed(5)
    lin = nn.Linear(4, 3)
    w0 = lin.weight.detach().clone()
    out = weight_norm(lin)
    assert out is lin
    assert parametrize.is_parametrized(lin, "weight")
    torch.testing.assert_close(lin.weight, w0)
    torch.testing.assert_close(
        lin.parametrizations.weight.original0.detach(), w0.norm(dim=1, keepdim=True)
    )
    whole = weight_norm(nn.Linear(4, 3), dim=None)
    assert whole.parametrizations.weight.original0.shape == ()
    with pytest.raises(ValueError, match="`dim`"):
        weight_norm(nn.Linear(4, 3), dim=3)
    with pytest.raises(ValueError, match="nope"):
        weight_norm(nn.Linear(4, 3), name="nope")


# ---------------------------------------------------------------- cached_parametrizations
def test_cached_parametrizations_runs_power_iteration_once_and_keeps_graph():
    torch.manual_seed(6)
    cell = nn.Sequential(
        spectral_norm(nn.Linear(5, 5), bound=0.9), nn.Tanh(), weight_norm(nn.Linear(5, 5))
    )
    counts = power_iteration_counter(cell[0])
    x = torch.randn(3, 5)
    with cached_parametrizations(cell) as same:
        assert same is cell
        assert len(counts) == 1  # warmed on entry
        z = torch.zeros(3, 5)
        with torch.no_grad():
            for _ in range(29):
                z = cell(z) + x
        out = cell(z) + x  # 30th call, with grad, after the no_grad calls
    assert len(counts) == 1
    out.pow(2).sum().backward()
    grad = cell[0].parametrizations.weight.original.grad
    assert grad is not None
    assert bool(torch.isfinite(grad).all())
    assert float(grad.abs().sum()) > 0
    assert cell[2].parametrizations.weight.original1.grad is not None
    # outside the context, every access recomputes
    cell(z)
    cell(z)
    assert len(counts) == 3


def test_cached_parametrizations_nested_and_validation():
    cell = spectral_norm(nn.Linear(3, 3), bound=0.5)
    counts = power_iteration_counter(cell)
    with cached_parametrizations(cell), cached_parametrizations(cell):
        cell(torch.ones(1, 3))
    assert len(counts) == 1
    with pytest.raises(TypeError, match="`module`"), cached_parametrizations("cell"):
        pass


# ------------------------------------------------------------------- scale_to_contractive
def test_scale_to_contractive_brings_estimate_below_target():
    torch.manual_seed(7)
    weight = torch.randn(12, 12, dtype=F64) * 2.0
    x = torch.randn(4, 12, dtype=F64)

    def f(z):
        return torch.tanh(z @ weight.T + x)

    z = torch.randn(4, 12, dtype=F64)
    before = float(jacobian_spectral_norm(f, z).max())
    assert before > 0.9
    est = scale_to_contractive(f, z, [weight], target=0.9)
    assert est < 0.9
    after = float(jacobian_spectral_norm(f, z, n_iter=1000, tol=0).max())
    assert after < 0.9
    assert est == pytest.approx(after, rel=1e-3)


def test_scale_to_contractive_module_and_no_op():
    torch.manual_seed(8)
    lin = nn.Linear(6, 6)
    with torch.no_grad():
        lin.weight.mul_(0.1)
    w0 = lin.weight.detach().clone()

    def f(z):
        return torch.relu(lin(z))

    est = scale_to_contractive(f, torch.randn(3, 6), lin.weight, target=0.9)
    assert est < 0.9
    assert torch.equal(lin.weight, w0)  # already contractive: unchanged
    assert lin.weight.grad is None


def test_scale_to_contractive_errors():
    weight = torch.eye(3) * 2
    other = torch.ones(3)

    def f(z):
        return z @ weight.T

    z = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="`params`"):
        scale_to_contractive(f, z, [other], max_rounds=2)
    with pytest.raises(ValueError, match="`target`"):
        scale_to_contractive(f, z, [weight], target=0)
    with pytest.raises(ValueError, match="`params`"):
        scale_to_contractive(f, z, [])
    with pytest.raises(TypeError, match="`params`"):
        scale_to_contractive(f, z, [1.0])
    with pytest.raises(ValueError, match="`n_iter`"):
        scale_to_contractive(f, z, [weight], n_iter=0)
