"""Tests of deqkit.stability.diagnostics: Jacobian spectral norm / radius and Lipschitz bounds."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import deqkit.stability.lipschitz as lip
from deqkit.nn._dropout import VariationalDropout
from deqkit.stability import (
    jacobian_spectral_norm,
    jacobian_spectral_radius,
    lipschitz_upper_bound,
)

F64 = torch.float64
FAST = settings(max_examples=15, deadline=None)


def dense_jacobians(f, z):
    """Per-sample dense Jacobians ``(B, D, D)`` of a batched map (test reference)."""
    batch = z.shape[0]
    full = torch.autograd.functional.jacobian(f, z.detach())  # (B, *s, B, *s)
    full = full.reshape(batch, -1, batch, z[0].numel())
    return torch.stack([full[b, :, b, :] for b in range(batch)])


def per_sample_linear(mats):
    """``z -> z_b A_b^T`` for a stack of matrices ``(B, D, D)``."""
    return lambda z: torch.einsum("bij,bj->bi", mats, z)


def with_complex_dominant(dim, gen, radius=2.0, bulk=0.5):
    """Random real ``dim x dim`` matrix whose dominant eigenvalues are a complex pair."""
    blocks = torch.zeros(dim, dim, dtype=F64)
    theta = 1.0 + torch.rand((), generator=gen, dtype=F64).item()
    blocks[0, 0] = blocks[1, 1] = radius * math.cos(theta)
    blocks[0, 1] = -radius * math.sin(theta)
    blocks[1, 0] = radius * math.sin(theta)
    if dim > 2:
        rest = torch.randn(dim - 2, dim - 2, generator=gen, dtype=F64)
        rest = rest / torch.linalg.eigvals(rest).abs().max() * bulk
        blocks[2:, 2:] = rest
    basis = torch.randn(dim, dim, generator=gen, dtype=F64) + 2 * torch.eye(dim, dtype=F64)
    return basis @ blocks @ torch.linalg.inv(basis)


def true_radius(jac):
    return torch.linalg.eigvals(jac).abs().amax(dim=-1)


# ------------------------------------------------------------------------- spectral radius
@FAST
@given(
    batch=st.integers(1, 4),
    dim=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
)
def test_radius_linear_exact_small(batch, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    mats = torch.randn(batch, dim, dim, generator=gen, dtype=F64)
    z = torch.randn(batch, dim, generator=gen, dtype=F64)
    rho = jacobian_spectral_radius(per_sample_linear(mats), z, generator=gen)
    assert rho.shape == (batch,)
    assert rho.dtype == F64
    torch.testing.assert_close(rho, true_radius(mats), rtol=1e-2, atol=1e-12)


@FAST
@given(dim=st.integers(2, 12), seed=st.integers(0, 2**31 - 1))
def test_radius_complex_dominant_pair(dim, seed):
    gen = torch.Generator().manual_seed(seed)
    mat = with_complex_dominant(dim, gen)
    eig = torch.linalg.eigvals(mat)
    assert eig[eig.abs().argmax()].imag.abs() > 0.1  # the case power iteration cannot do
    z = torch.randn(3, dim, generator=gen, dtype=F64)
    rho = jacobian_spectral_radius(lambda z: z @ mat.T, z, generator=gen)
    torch.testing.assert_close(rho, true_radius(mat).expand(3), rtol=1e-2, atol=0)


def test_radius_krylov_smaller_than_dim():
    # D = 80 > krylov_dim = 30: well-separated dominant complex pair is still found
    gen = torch.Generator().manual_seed(0)
    mat = with_complex_dominant(80, gen, radius=2.0, bulk=0.6)
    z = torch.randn(2, 80, generator=gen, dtype=F64)
    rho = jacobian_spectral_radius(lambda z: z @ mat.T, z, krylov_dim=30, generator=gen)
    torch.testing.assert_close(rho, true_radius(mat).expand(2), rtol=1e-2, atol=0)


@FAST
@given(
    batch=st.integers(1, 3),
    dim=st.integers(1, 20),
    scale=st.floats(0.2, 3.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_radius_tanh_cell(batch, dim, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(dim, dim, generator=gen, dtype=F64) * scale / math.sqrt(dim)
    x = torch.randn(batch, dim, generator=gen, dtype=F64)

    def f(z):
        return torch.tanh(z @ weight.T + x)

    z = torch.randn(batch, dim, generator=gen, dtype=F64)
    rho = jacobian_spectral_radius(f, z, generator=gen)
    torch.testing.assert_close(rho, true_radius(dense_jacobians(f, z)), rtol=1e-2, atol=1e-12)


def test_radius_conv_cell_multidim_state():
    gen = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(2, 2, 3, padding=1).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, dtype=F64) * 0.4)
    x = torch.randn(2, 2, 3, 3, generator=gen, dtype=F64)

    def f(z):
        return torch.tanh(conv(z) + x)

    z = torch.randn(2, 2, 3, 3, generator=gen, dtype=F64)  # D = 18 <= krylov_dim: exact
    rho = jacobian_spectral_radius(f, z, generator=gen)
    torch.testing.assert_close(rho, true_radius(dense_jacobians(f, z)), rtol=1e-2, atol=0)
    assert conv.weight.grad is None


def test_radius_breakdown_and_zero_jacobian():
    # identity map: Krylov space of any vector is 1-D, breakdown at the first step
    z = torch.randn(3, 6, dtype=F64)
    torch.testing.assert_close(
        jacobian_spectral_radius(lambda z: 0.7 * z, z), torch.full((3,), 0.7, dtype=F64)
    )
    # diagonal map with repeated eigenvalues
    d = torch.tensor([0.5, 0.5, -0.9, 0.1], dtype=F64)
    rho = jacobian_spectral_radius(lambda z: z * d, torch.randn(2, 4, dtype=F64))
    torch.testing.assert_close(rho, torch.full((2,), 0.9, dtype=F64))
    # nilpotent map: all eigenvalues zero
    nil = torch.triu(torch.randn(5, 5, dtype=F64), diagonal=1)
    rho = jacobian_spectral_radius(lambda z: z @ nil.T, torch.randn(2, 5, dtype=F64))
    assert float(rho.max()) < 1e-3
    # f independent of z / zero Jacobian
    assert torch.equal(
        jacobian_spectral_radius(lambda z: torch.ones_like(z), z), torch.zeros(3, dtype=F64)
    )
    assert torch.equal(jacobian_spectral_radius(lambda z: z * 0.0, z), torch.zeros(3, dtype=F64))


def test_radius_float32_and_no_grad_context():
    gen = torch.Generator().manual_seed(3)
    mat = with_complex_dominant(6, gen).float()
    z = torch.randn(2, 6)
    with torch.no_grad():
        rho = jacobian_spectral_radius(lambda z: z @ mat.T, z)
    assert rho.dtype == torch.float32
    assert not rho.requires_grad
    torch.testing.assert_close(rho, true_radius(mat.double()).float().expand(2), rtol=1e-3, atol=0)


# --------------------------------------------------------------------------- spectral norm
@FAST
@given(
    batch=st.integers(1, 4),
    dim=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
)
def test_norm_linear(batch, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    mats = torch.randn(batch, dim, dim, generator=gen, dtype=F64)
    z = torch.randn(batch, dim, generator=gen, dtype=F64)
    sigma = jacobian_spectral_norm(per_sample_linear(mats), z, n_iter=500, generator=gen)
    exact = torch.linalg.matrix_norm(mats, ord=2)
    torch.testing.assert_close(sigma, exact, rtol=1e-2, atol=1e-12)
    assert bool((sigma <= exact * (1 + 1e-10)).all())  # approaches from below


@FAST
@given(
    batch=st.integers(1, 3),
    dim=st.integers(1, 16),
    scale=st.floats(0.2, 3.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_norm_tanh_cell(batch, dim, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(dim, dim, generator=gen, dtype=F64) * scale / math.sqrt(dim)
    x = torch.randn(batch, dim, generator=gen, dtype=F64)

    def f(z):
        return torch.tanh(z @ weight.T + x)

    z = torch.randn(batch, dim, generator=gen, dtype=F64)
    sigma = jacobian_spectral_norm(f, z, n_iter=500, generator=gen)
    exact = torch.linalg.matrix_norm(dense_jacobians(f, z), ord=2)
    torch.testing.assert_close(sigma, exact, rtol=1e-2, atol=1e-12)


def test_norm_defaults_module_cell_evaluates_once_and_leaves_no_grad():
    torch.manual_seed(0)
    cell = nn.Sequential(nn.Linear(10, 10), nn.Tanh()).double()
    calls = []
    cell.register_forward_hook(lambda *args: calls.append(1))
    z = torch.randn(4, 10, dtype=F64)
    sigma = jacobian_spectral_norm(cell, z)
    assert len(calls) == 1  # one evaluation, Jacobian products from its graph
    assert all(p.grad is None for p in cell.parameters())
    assert not sigma.requires_grad
    exact = torch.linalg.matrix_norm(dense_jacobians(cell, z), ord=2)
    torch.testing.assert_close(sigma, exact, rtol=1e-2, atol=0)
    # z requiring grad is not modified / not given a .grad
    zg = z.clone().requires_grad_(True)
    jacobian_spectral_norm(cell, zg)
    assert zg.grad is None


def test_norm_zero_jacobian_and_generator_reproducible():
    z = torch.randn(2, 3)
    assert torch.equal(jacobian_spectral_norm(lambda z: torch.zeros_like(z), z), torch.zeros(2))
    mat = torch.randn(3, 3)
    a = jacobian_spectral_norm(
        lambda z: z @ mat.T, z, n_iter=3, tol=0, generator=torch.Generator().manual_seed(5)
    )
    b = jacobian_spectral_norm(
        lambda z: z @ mat.T, z, n_iter=3, tol=0, generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("fn", [jacobian_spectral_norm, jacobian_spectral_radius])
def test_bad_inputs(fn):
    z = torch.randn(2, 3)
    with pytest.raises(TypeError, match="`f`"):
        fn("not callable", z)
    with pytest.raises(TypeError, match="`z`"):
        fn(lambda z: z, [[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"`z`.*floating"):
        fn(lambda z: z, torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="`z`"):
        fn(lambda z: z, torch.ones(0, 3))
    with pytest.raises(ValueError, match="same shape"):
        fn(lambda z: z.sum(dim=1), z)


def test_bad_iteration_arguments():
    z = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"`n_iter`.*0"):
        jacobian_spectral_norm(lambda z: z, z, n_iter=0)
    with pytest.raises(ValueError, match="`tol`"):
        jacobian_spectral_norm(lambda z: z, z, tol=-1.0)
    with pytest.raises(ValueError, match="`krylov_dim`"):
        jacobian_spectral_radius(lambda z: z, z, krylov_dim=1.5)


# ------------------------------------------------------------------------ Lipschitz bound
def _random_points_max_jac_norm(model, shape, n=20, seed=0):
    """Largest ||J||_2 of ``model`` over ``n`` random points (a lower bound of its Lipschitz)."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn((n, *shape), generator=gen, dtype=F64) * 2).requires_grad_(True)
    out = model(x).reshape(n, -1)
    rows = [
        torch.autograd.grad(out[:, k].sum(), x, retain_graph=True)[0].reshape(n, -1)
        for k in range(out.shape[1])
    ]
    jac = torch.stack(rows, dim=1)  # (n, out, in): samples are independent
    return float(torch.linalg.matrix_norm(jac, ord=2).max())


def test_lipschitz_linear_chain_is_product():
    torch.manual_seed(0)
    layers = [nn.Linear(5, 7), nn.Linear(7, 4), nn.Linear(4, 6)]
    model = nn.Sequential(layers[0], nn.Sequential(layers[1], nn.Identity()), layers[2])
    expected = math.prod(
        float(torch.linalg.matrix_norm(layer.weight.detach().double(), ord=2)) for layer in layers
    )
    assert lipschitz_upper_bound(model) == pytest.approx(expected, rel=1e-12)
    # a single linear layer: the bound is exact (equals the true Lipschitz constant)
    single = nn.Sequential(layers[0]).double()
    true = _random_points_max_jac_norm(single, (5,), n=1)
    assert lipschitz_upper_bound(single) == pytest.approx(true, rel=1e-10)


def test_lipschitz_bounds_true_constant_mlp():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(6, 8),
        nn.Tanh(),
        nn.Sequential(nn.Linear(8, 8), nn.GELU()),
        nn.Linear(8, 8),
        nn.LeakyReLU(0.1),
        nn.Linear(8, 8),
        nn.SiLU(),
        nn.Dropout(0.3),
        nn.Linear(8, 3),
        nn.Sigmoid(),
    ).double()
    model.eval()
    bound = lipschitz_upper_bound(model)
    assert bound >= _random_points_max_jac_norm(model, (6,)) - 1e-12


def test_lipschitz_bounds_true_constant_conv():
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 2, 3, stride=2, padding=1, padding_mode="circular"),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, 5),
        nn.Tanh(),
    ).double()
    bound = lipschitz_upper_bound(model, input_shape=(2, 6, 6))
    assert bound >= _random_points_max_jac_norm(model, (2, 6, 6)) - 1e-12
    # the conv factor is the exact operator norm of the convolution (not the kernel matrix)
    conv = nn.Conv1d(2, 3, 3, padding=1, bias=False).double()
    exact = _random_points_max_jac_norm(nn.Sequential(conv), (2, 7), n=1)
    assert lipschitz_upper_bound(nn.Sequential(conv), (2, 7)) == pytest.approx(exact, rel=1e-10)


def test_lipschitz_conv_lanczos_path(monkeypatch):
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    exact = lipschitz_upper_bound(nn.Sequential(conv), (2, 5, 5))
    monkeypatch.setattr(lip, "_DENSE_CONV_LIMIT", 0)
    approx = lipschitz_upper_bound(
        nn.Sequential(conv), (2, 5, 5), generator=torch.Generator().manual_seed(0)
    )
    assert exact <= approx <= exact * 1.01


def test_lipschitz_activation_constants():
    lin = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.diag(torch.tensor([2.0, 1.0, 0.5])))
    assert lipschitz_upper_bound(nn.Sequential(lin, nn.Sigmoid())) == pytest.approx(0.5)
    assert lipschitz_upper_bound(nn.Sequential(lin, nn.LeakyReLU(3.0))) == pytest.approx(6.0)
    drop = nn.Sequential(lin, nn.Dropout(0.5), VariationalDropout(0.2))
    assert lipschitz_upper_bound(drop.train()) == pytest.approx(2.0 / 0.5 / 0.8)
    assert lipschitz_upper_bound(drop.eval()) == pytest.approx(2.0)
    # tabulated constants are >= the numerically measured maximal slopes
    x = torch.linspace(-8, 8, 160001, dtype=F64, requires_grad=True)
    for act in [
        nn.GELU(),
        nn.GELU(approximate="tanh"),
        nn.SiLU(),
        nn.SELU(),
        nn.ELU(2.0),
        nn.Softplus(),
        nn.Softsign(),
        nn.Tanhshrink(),
        nn.Hardsigmoid(),
    ]:
        (slope,) = torch.autograd.grad(act(x).sum(), x)
        const = lip._activation_constant(act)
        assert const is not None
        assert float(slope.abs().max()) <= const * (1 + 1e-7), act
        assert float(slope.abs().max()) >= const * 0.99, act


def test_lipschitz_errors():
    with pytest.raises(TypeError, match=r"BatchNorm1d.*LSTM|LSTM.*BatchNorm1d"):
        lipschitz_upper_bound(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.LSTM(2, 2)))
    with pytest.raises(TypeError, match="`module`"):
        lipschitz_upper_bound(lambda x: x)
    with pytest.raises(ValueError, match="input_shape"):
        lipschitz_upper_bound(nn.Sequential(nn.Conv2d(1, 1, 3)))
    with pytest.raises(ValueError, match="input_shape"):
        lipschitz_upper_bound(nn.Sequential(nn.Conv2d(1, 1, 3)), input_shape=(1, -2, 4))
    with pytest.raises(ValueError, match="input_shape"):
        lipschitz_upper_bound(
            nn.Sequential(nn.Conv2d(1, 1, 3), nn.Flatten(), nn.Linear(5, 2)), input_shape=(1, 4, 4)
        )
