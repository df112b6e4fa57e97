"""The DEQ training schedule (unrolled warm-up, growing budget) and warm starts that keep
budget-limited iterates: the library pieces, the CLI fields, exact resume."""

from __future__ import annotations

import pytest
import torch

import deqkit as dk
from deqkit import RESULTS
from deqkit.app.train import load_checkpoint, train
from deqkit.app.train.run import deq_schedule
from helpers import quick_config, read_records

D = torch.float64


def _linear_layer(max_steps=50):
    """z = A z + x with ||A|| = 0.5: closed forms for unrolled iterates and gradients."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 3, bias=False).double()
    with torch.no_grad():
        lin.weight.mul_(0.5 / torch.linalg.matrix_norm(lin.weight, 2))
    layer = dk.nn.DEQ(lambda z, x: lin(z) + x, solver=dk.Anderson(rtol=1e-12, atol=0),
                      max_steps=max_steps)
    return layer, lin


# ----------------------------------------------------------------------------- DEQSchedule


def test_phases_and_budget_endpoints():
    s = dk.nn.DEQSchedule(total_steps=21, unroll_steps=5, unroll_depth=3, budget_start=2,
                          budget_end=10)
    assert [s.phase(t) for t in (0, 4)] == [("unrolled", 3)] * 2
    assert s.phase(5) == ("equilibrium", 2)  # the first equilibrium step: the start
    assert s.phase(20) == ("equilibrium", 10)  # the last step: the end
    budgets = [s.budget(t, 99) for t in range(5, 21)]
    assert budgets == sorted(budgets) and budgets[0] == 2 and budgets[-1] == 10
    assert s.phase(13) == ("equilibrium", 6)  # halfway: 2 + 8 * 8/15 = 6.27 -> 6
    # no budget: the layer's own max_steps
    plain = dk.nn.DEQSchedule(total_steps=10, unroll_steps=2)
    assert plain.phase(3) == ("equilibrium", None) and plain.budget(3, 17) == 17
    # budget_end defaults to the layer's max_steps
    assert dk.nn.DEQSchedule(total_steps=11, budget_start=1).budget(10, 21) == 21


@pytest.mark.parametrize("kw, match", [
    (dict(total_steps=0), "`total_steps` must be an int >= 1"),
    (dict(total_steps=5, unroll_steps=-1), "`unroll_steps` must be an int >= 0"),
    (dict(total_steps=5, unroll_depth=0), "`unroll_depth` must be an int >= 1"),
    (dict(total_steps=5, budget_start=0), "`budget_start` must be None or an int >= 1"),
    (dict(total_steps=5, budget_end=4), "budget_end=4 needs budget_start"),
])
def test_schedule_rejects_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        dk.nn.DEQSchedule(**kw)


def test_unrolled_phase_is_backprop_through_depth_cell_applications():
    """Warm-up step: z_L = sum_{k<L} A^k x from z0 = 0, and its exact gradient, then the
    layer's own solver, adjoint and budget again."""
    layer, lin = _linear_layer()
    A = lin.weight.detach()
    x = torch.randn(2, 3, dtype=D, requires_grad=True)
    s = dk.nn.DEQSchedule(total_steps=4, unroll_steps=1, unroll_depth=3)
    with s.apply(layer, 0):
        z = layer(x)
        assert isinstance(layer.solver, dk.FixedSteps)
        assert isinstance(layer.adjoint, dk.UnrolledAdjoint) and layer.max_steps == 3
    P = torch.eye(3, dtype=D) + A + A @ A  # z_3 = (I + A + A^2) x
    assert torch.allclose(z, x @ P.T, atol=1e-12)
    z.sum().backward()
    assert torch.allclose(x.grad, torch.ones(2, 3, dtype=D) @ P, atol=1e-12)
    assert layer.last_solution.stats["status"].eq(RESULTS.max_steps_reached.code).all()
    assert isinstance(layer.solver, dk.Anderson) and layer.max_steps == 50
    assert isinstance(layer.adjoint, dk.ImplicitAdjoint)
    x.grad = None
    with s.apply(layer, 1):  # equilibrium: the fixed point (I - A)^-1 x and its gradient
        z = layer(x)
    inv = torch.linalg.inv(torch.eye(3, dtype=D) - A)
    assert torch.allclose(z, x @ inv.T, atol=1e-10)
    z.sum().backward()
    assert torch.allclose(x.grad, torch.ones(2, 3, dtype=D) @ inv, atol=1e-9)


def test_budget_override_is_restored_even_on_error():
    layer, _ = _linear_layer(max_steps=50)
    s = dk.nn.DEQSchedule(total_steps=3, budget_start=1, budget_end=3)
    with s.apply(layer, 0):
        layer(torch.ones(1, 3, dtype=D))
        assert int(layer.last_solution.stats["nstep"].max()) == 1
    with pytest.raises(RuntimeError), s.apply(layer, 2):
        assert layer.max_steps == 3
        raise RuntimeError
    assert layer.max_steps == 50 and layer.eval_max_steps == 50


# ------------------------------------------------------------------ warm starts, unfinished


def test_cache_keeps_unfinished_finite_iterates_only_when_asked():
    ids = torch.arange(4)
    z = torch.tensor([[1.0], [2.0], [float("nan")], [4.0]])
    conv = torch.tensor([True, False, False, False])
    unf = torch.tensor([False, True, True, False])  # sample 3: neither (e.g. diverged)
    strict = dk.nn.FixedPointCache(4)
    strict.update(ids, z, converged=conv, unfinished=unf)
    assert len(strict) == 1
    assert strict.initial(ids, torch.zeros(4, 1)).flatten().tolist() == [1.0, 0.0, 0.0, 0.0]
    keep = dk.nn.FixedPointCache(4, keep_unfinished=True)
    keep.update(ids, z, converged=conv, unfinished=unf)
    # the converged one and the finite unfinished one; never a non-finite value
    assert len(keep) == 2
    assert keep.initial(ids, torch.zeros(4, 1)).flatten().tolist() == [1.0, 2.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="`unfinished` must be a bool tensor of shape"):
        keep.update(ids, z, converged=conv, unfinished=unf[:2])
    with pytest.raises(TypeError, match="`keep_unfinished` must be a bool"):
        dk.nn.FixedPointCache(4, keep_unfinished=1)
    assert "keep_unfinished=True" in repr(keep)


def test_budget_limited_solves_continue_across_calls():
    """With a 2-step budget no solve converges; keeping the unfinished iterates lets each
    call go on from the last one, so the stored state reaches the equilibrium."""
    layer, lin = _linear_layer(max_steps=2)
    layer.solver = dk.Picard(rtol=1e-10, atol=0)
    x = torch.randn(3, 3, dtype=D)
    ids = torch.arange(3)
    exact = x @ torch.linalg.inv(torch.eye(3, dtype=D) - lin.weight.detach()).T
    errs = {}
    for keep in (False, True):
        cache = dk.nn.FixedPointCache(3, keep_unfinished=keep)
        with torch.no_grad():
            for _ in range(30):
                with layer.warm_start(cache, ids):
                    z = layer(x)
        errs[keep] = float((z - exact).norm() / exact.norm())
    assert errs[True] < 1e-6 < 0.05 < errs[False]


# ----------------------------------------------------------------------------- the CLI

def _cfg(tmp_path, name, **kw):
    return quick_config(tmp_path, name, **{"epochs": 3, **kw})


@pytest.mark.parametrize("kw, match", [
    (dict(unroll_warmup=3), "`unroll_warmup` = 3 is invalid: the warm-up must end before"),
    (dict(unroll_warmup=-0.5), "`unroll_warmup` = -0.5 is invalid"),
    (dict(unroll_depth=0), "`unroll_depth` = 0 is invalid"),
    (dict(max_steps_start=11), "must not exceed it; lower --max-steps-start"),
    (dict(max_steps_start=0), "`max_steps_start` = 0 is invalid"),
    (dict(warm_start_unfinished=True), "add --warm-start or drop --warm-start-unfinished"),
])
def test_config_checks(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        _cfg(tmp_path, "x", **kw)


def test_schedule_needs_a_deq_model(tmp_path):
    with pytest.raises(ValueError, match="no DEQ layer to schedule"):
        train(_cfg(tmp_path, "r", model="resnet_mlp", model_args={}, unroll_warmup=1),
              log=lambda *_: None)


def test_deq_schedule_from_config(tmp_path):
    assert deq_schedule(_cfg(tmp_path, "a"), 256) is None
    s = deq_schedule(_cfg(tmp_path, "b", unroll_warmup=1.5, unroll_depth=2,
                          max_steps_start=3), 256)  # 4 steps per epoch, 12 in all
    assert (s.total_steps, s.unroll_steps, s.unroll_depth) == (12, 6, 2)
    assert (s.budget_start, s.budget_end) == (3, 10)


def test_scheduled_run_trains_and_resumes_exactly(tmp_path):
    """Epoch 1 unrolled (no equilibria stored, none converged), then equilibria under a
    growing budget, warm-started with the unfinished iterates kept; a run stopped after
    epoch 1 and resumed is the uninterrupted run."""
    kw = dict(unroll_warmup=1, unroll_depth=3, max_steps_start=2, warm_start=True,
              warm_start_unfinished=True, rtol=1e-5)
    full = train(_cfg(tmp_path, "full", **kw), log=lambda *_: None)
    recs = read_records(tmp_path / "full" / "metrics.jsonl")
    assert full["complete"] and full["test_acc"] > 0.5
    assert recs[0]["train_fwd_converged"] == 0.0 and recs[0]["train_fwd_steps"] == 3.0
    # the budget grows from 2 (the first equilibrium step) to 10 (the last)
    assert 2.0 <= recs[1]["train_fwd_steps"] < recs[2]["train_fwd_steps"] <= 10.0
    part = _cfg(tmp_path, "part", **kw)
    train(part, stop_after=1, log=lambda *_: None)
    ckpt = load_checkpoint(str(tmp_path / "part" / "last.pt"))
    assert ckpt["warm_start"]["seen"] is None or int(ckpt["warm_start"]["seen"].sum()) == 0
    resumed = train(part, resume=True, log=lambda *_: None)
    assert resumed["test_loss"] == full["test_loss"]
    strip = lambda rs: [{k: v for k, v in r.items() if "time" not in k} for r in rs]  # noqa: E731
    assert strip(recs) == strip(read_records(tmp_path / "part" / "metrics.jsonl"))
