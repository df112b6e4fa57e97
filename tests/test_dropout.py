"""Tests of deqkit.nn._dropout: variational (weight-tied) dropout for DEQ cells."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deqkit.nn._dropout import (
    VariationalDropout,
    VariationalDropout2d,
    reset_dropout,
    select_dropout,
)


def test_mask_reused_until_reset():
    torch.manual_seed(0)
    drop = VariationalDropout(p=0.5)
    x = torch.randn(8, 50)
    y1, y2 = drop(x), drop(x)
    assert torch.equal(y1, y2)
    mask = drop.mask
    assert mask is not None
    assert set(mask.unique().tolist()) <= {0.0, 2.0}
    assert 0.3 < float((mask == 0).float().mean()) < 0.7
    torch.testing.assert_close(y1, x * mask)
    # a different input reuses the same mask
    x2 = torch.randn(8, 50)
    torch.testing.assert_close(drop(x2), x2 * mask)
    drop.reset_mask()
    assert drop.mask is None
    y3 = drop(x)
    assert not torch.equal(y1, y3)  # new mask (probability of equality ~ 2^-400)


def test_shape_change_resamples_dtype_change_converts():
    torch.manual_seed(1)
    drop = VariationalDropout(p=0.3)
    drop(torch.ones(4, 6))
    mask = drop.mask.clone()
    drop(torch.ones(5, 6))
    assert drop.mask.shape == (5, 6)
    drop.reset_mask()
    out32 = drop(torch.ones(4, 6))
    out64 = drop(torch.ones(4, 6, dtype=torch.float64))
    assert out64.dtype == torch.float64
    assert drop.mask.dtype == torch.float64
    torch.testing.assert_close(out64, out32.double())
    assert mask.dtype == torch.float32


def test_mask_follows_device_and_dtype_of_input():
    drop = VariationalDropout(p=0.2)
    y = drop(torch.ones(3, 4, dtype=torch.float64))
    assert y.dtype == torch.float64
    assert drop.mask.dtype == torch.float64
    assert drop.mask.device == torch.device("cpu")
    if torch.cuda.is_available():  # pragma: no cover - only with a GPU
        y = drop(torch.ones(3, 4, dtype=torch.float64, device="cuda"))
        assert drop.mask.device.type == "cuda"
    # module.to() moves / converts the stored mask (non-persistent buffer, not in state_dict)
    drop.to(torch.float32)
    assert drop.mask.dtype == torch.float32
    assert "mask" not in drop.state_dict()


def test_eval_and_p_zero_are_identity():
    x = torch.randn(4, 5)
    drop = VariationalDropout(p=0.5).eval()
    assert drop(x) is x
    assert drop.mask is None
    assert VariationalDropout(p=0.0)(x) is x


def test_select_follows_batch_compaction():
    torch.manual_seed(2)
    drop = VariationalDropout(p=0.5)
    x = torch.randn(6, 20)
    full = drop(x)
    keep = torch.tensor([True, False, True, True, False, False])
    drop.select(keep)
    assert drop.mask.shape == (3, 20)
    torch.testing.assert_close(drop(x[keep]), full[keep])
    idx = torch.tensor([2, 0])
    drop.select(idx)
    torch.testing.assert_close(drop(x[keep][idx]), full[keep][idx])
    fresh = VariationalDropout(p=0.5)
    fresh.select(idx)  # no mask yet: no-op
    assert fresh.mask is None


def test_gradient_flows_through_mask():
    torch.manual_seed(3)
    drop = VariationalDropout(p=0.5)
    x = torch.randn(4, 10, requires_grad=True)
    drop(x).sum().backward()
    torch.testing.assert_close(x.grad, drop.mask)


def test_variational_dropout_2d_shares_mask_over_space():
    torch.manual_seed(4)
    drop = VariationalDropout2d(p=0.5)
    x = torch.ones(3, 8, 5, 5)
    y = drop(x)
    assert drop.mask.shape == (3, 8, 1, 1)
    assert torch.equal(y, drop.mask.expand_as(y))
    assert torch.equal(drop(x), y)
    drop.select(torch.tensor([1]))
    assert drop.mask.shape == (1, 8, 1, 1)
    assert drop(torch.ones(1, 8, 5)).shape == (1, 8, 5)  # (B, C, L) also accepted
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        drop(torch.ones(3, 8))


def test_reset_and_select_whole_model():
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Linear(4, 4), VariationalDropout(0.3), nn.Sequential(VariationalDropout2d(0.2))
    )
    model[1](torch.ones(2, 4))
    model[2][0](torch.ones(2, 4, 3, 3))
    assert select_dropout(model, torch.tensor([1])) == 2
    assert model[1].mask.shape == (1, 4)
    assert model[2][0].mask.shape == (1, 4, 1, 1)
    assert reset_dropout(model) == 2
    assert model[1].mask is None
    assert model[2][0].mask is None
    assert reset_dropout(nn.Linear(2, 2)) == 0
    with pytest.raises(TypeError, match="`module`"):
        reset_dropout("model")
    with pytest.raises(TypeError, match="`module`"):
        select_dropout(None, 0)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan"), True, "0.1"])
def test_bad_p(p):
    with pytest.raises(ValueError, match="`p`"):
        VariationalDropout(p)
    with pytest.raises(ValueError, match="`p`"):
        VariationalDropout2d(p)


def test_repr():
    assert "p=0.25" in repr(VariationalDropout(0.25))
