"""Tests of deqkit.stability.regularisers: Hutchinson Jacobian penalty, fixed-point correction."""

from __future__ import annotations

import pytest
import torch

from deqkit.stability import fixed_point_correction_loss, jacobian_frobenius_reg

F64 = torch.float64


def tiny_cell(seed=0, batch=3, dim=4):
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(dim, dim, generator=gen, dtype=F64) * 0.8).requires_grad_(True)
    x = torch.randn(batch, dim, generator=gen, dtype=F64)
    z = torch.randn(batch, dim, generator=gen, dtype=F64)

    def f(z_):
        return torch.tanh(z_ @ weight.T + x)

    def exact_jacobians(w):
        # J_b = diag(1 - tanh^2(W z_b + x_b)) W, differentiable in W
        slope = 1 - torch.tanh(z @ w.T + x) ** 2  # (B, D)
        return slope[:, :, None] * w[None]

    return f, z, weight, exact_jacobians


def test_hutchinson_matches_exact_frobenius_norm_within_statistical_error():
    f, z, weight, exact_jacobians = tiny_cell()
    jac = exact_jacobians(weight.detach())
    batch = z.shape[0]
    n = 2000
    exact_per_sample = jac.pow(2).sum(dim=(1, 2))  # ||J_b||_F^2
    # Var ||v^T J||^2 = 2 ||J J^T||_F^2 for Gaussian v
    var_per_sample = 2 * (jac @ jac.transpose(1, 2)).pow(2).sum(dim=(1, 2)) / n
    gen = torch.Generator().manual_seed(123)
    est = jacobian_frobenius_reg(
        f, z, n_samples=n, reduction="none", normalise=False, generator=gen
    )
    assert est.shape == (batch,)
    assert bool(((est - exact_per_sample).abs() <= 4 * var_per_sample.sqrt()).all())
    # default: normalised mean == sum_b ||J_b||_F^2 / numel(z)
    gen = torch.Generator().manual_seed(7)
    default = jacobian_frobenius_reg(f, z, n_samples=n, generator=gen)
    assert default.ndim == 0
    exact = float(exact_per_sample.sum()) / z.numel()
    sd = float(var_per_sample.sum().sqrt()) / z.numel()
    assert abs(float(default.detach()) - exact) <= 4 * sd


def test_hutchinson_gradient_matches_exact_gradient():
    f, z, weight, exact_jacobians = tiny_cell(seed=1)
    gen = torch.Generator().manual_seed(0)
    reg = jacobian_frobenius_reg(f, z, n_samples=2000, generator=gen)
    assert reg.requires_grad
    (g_est,) = torch.autograd.grad(reg, weight)
    exact = exact_jacobians(weight).pow(2).sum() / z.numel()
    (g_exact,) = torch.autograd.grad(exact, weight)
    assert bool(torch.isfinite(g_est).all())
    cos = torch.nn.functional.cosine_similarity(g_est.flatten(), g_exact.flatten(), dim=0)
    assert float(cos) > 0.95
    assert weight.grad is None  # the call itself does not touch .grad


def test_reductions_and_normalisation_are_consistent():
    f, z, _, _ = tiny_cell(seed=2)
    numel, dim = z.numel(), z[0].numel()

    def run(**kw):
        return jacobian_frobenius_reg(
            f, z, n_samples=3, generator=torch.Generator().manual_seed(4), **kw
        )

    raw = run(normalise=False, reduction="none")
    torch.testing.assert_close(run(normalise=True, reduction="none"), raw / dim)
    torch.testing.assert_close(run(), raw.sum() / numel)  # paper / TorchDEQ normalisation
    torch.testing.assert_close(run(normalise=False), raw.sum())  # unnormalised total
    torch.testing.assert_close(run(normalise=False, reduction="mean"), raw.mean())
    torch.testing.assert_close(run(normalise=True, reduction="sum"), raw.sum() / dim)


def test_z_with_and_without_grad_and_precomputed_fz():
    f, z, weight, _ = tiny_cell(seed=3)
    # z without grad: not modified, result still differentiable w.r.t. parameters
    reg = jacobian_frobenius_reg(f, z)
    assert not z.requires_grad
    assert reg.requires_grad
    # z with history: the regulariser back-propagates into it as well
    z0 = z.clone().requires_grad_(True)
    zz = z0 * 1.0
    reg = jacobian_frobenius_reg(f, zz, generator=torch.Generator().manual_seed(1))
    reg.backward()
    assert z0.grad is not None
    assert weight.grad is not None
    # fz precomputed from the same z gives the same value
    zz = z.clone().requires_grad_(True)
    fz = f(zz)
    a = jacobian_frobenius_reg(f, zz, fz=fz, generator=torch.Generator().manual_seed(2))
    b = jacobian_frobenius_reg(f, zz, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b)


def test_works_under_no_grad_and_zero_jacobian():
    f, z, weight, _ = tiny_cell(seed=4)
    with_grad = jacobian_frobenius_reg(f, z, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reg = jacobian_frobenius_reg(f, z, generator=torch.Generator().manual_seed(0))
    assert not reg.requires_grad  # logging mode: no double-backward graph
    torch.testing.assert_close(reg, with_grad.detach())
    zero = jacobian_frobenius_reg(lambda z_: torch.ones_like(z_) * 2, z)
    assert float(zero) == 0.0
    assert weight.grad is None


def test_jacobian_reg_bad_inputs():
    f, z, _, _ = tiny_cell()
    with pytest.raises(ValueError, match="`n_samples`"):
        jacobian_frobenius_reg(f, z, n_samples=0)
    with pytest.raises(ValueError, match="`reduction`"):
        jacobian_frobenius_reg(f, z, reduction="avg")
    with pytest.raises(ValueError, match="`normalise`"):
        jacobian_frobenius_reg(f, z, normalise="yes")
    with pytest.raises(TypeError, match="`f`"):
        jacobian_frobenius_reg(None, z)
    with pytest.raises(TypeError, match="`z`"):
        jacobian_frobenius_reg(f, [1.0])
    with pytest.raises(ValueError, match="`z`"):
        jacobian_frobenius_reg(f, torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="`fz`"):
        jacobian_frobenius_reg(f, z, fz=f(z))
    with pytest.raises(ValueError, match="same shape"):
        jacobian_frobenius_reg(lambda z_: z_[:, :2], z)


# --------------------------------------------------------------- fixed-point correction
def mean_loss(state, target):
    return (state - target).mean()


@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.8, 1.0])
def test_correction_loss_weights(gamma):
    values = [3.0, -1.0, 2.0, 5.0]
    states = [torch.full((2, 3), v, requires_grad=True) for v in values]
    target = torch.zeros(2, 3)
    total = fixed_point_correction_loss(mean_loss, states, target, gamma=gamma)
    k = len(values)
    expected = sum(gamma ** (k - 1 - i) * v for i, v in enumerate(values))
    assert float(total.detach()) == pytest.approx(expected)
    total.backward()
    for i, s in enumerate(states):
        weight = gamma ** (k - 1 - i)
        if weight == 0:
            assert s.grad is None
        else:
            torch.testing.assert_close(s.grad, torch.full((2, 3), weight / 6))


def test_correction_loss_single_state_and_terms():
    state = torch.tensor([1.0, 3.0])
    target = torch.zeros(2)
    assert float(fixed_point_correction_loss(mean_loss, [state], target)) == 2.0
    total, terms = fixed_point_correction_loss(
        mean_loss, (state, 2 * state), target, gamma=0.5, return_terms=True
    )
    assert float(total) == pytest.approx(0.5 * 2.0 + 4.0)
    assert [float(t) for t in terms] == [2.0, 4.0]
    assert float(fixed_point_correction_loss(mean_loss, [state, state], target)) == pytest.approx(
        3.6
    )


def test_correction_loss_bad_inputs():
    s = torch.ones(2)
    with pytest.raises(ValueError, match="`states`"):
        fixed_point_correction_loss(mean_loss, [], s)
    with pytest.raises(TypeError, match="`states`"):
        fixed_point_correction_loss(mean_loss, s, s)
    with pytest.raises(TypeError, match=r"`states\[1\]`"):
        fixed_point_correction_loss(mean_loss, [s, 1.0], s)
    for gamma in (-0.1, 1.5, float("nan"), "0.8"):
        with pytest.raises(ValueError, match="`gamma`"):
            fixed_point_correction_loss(mean_loss, [s], s, gamma=gamma)
    with pytest.raises(TypeError, match="`loss_fn`"):
        fixed_point_correction_loss("mse", [s], s)
    with pytest.raises(TypeError, match="`loss_fn` must return a tensor"):
        fixed_point_correction_loss(lambda a, b: 1.0, [s], s)
