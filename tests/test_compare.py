"""Tests of ``deqkit compare`` (src/deqkit/compare): each measurement on tiny inputs."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

import deqkit as dk
from deqkit.app.compare import (
    add_compare_parser,
    deq_gradient_accuracy,
    effective_depth,
    explicit_gradient_accuracy,
    fit_slope,
    forced_steps,
    forward_cost,
    gradient_error,
    homeomorphism_experiment,
    memory_of,
    memory_sweep,
    ode_gradient_accuracy,
    peak_from_events,
    peak_live_bytes,
    quiet_profiler,
    saved_tensor_bytes,
    training_speed,
    verify_peak_method,
)
from deqkit.app.compare.models import build_models, train_model
from deqkit.zoo import DEQMLP, NeuralODEClassifier, ResNetMLP, UnrolledMLP

MIB = 1 << 20


def test_peak_live_bytes_sees_known_allocation():
    def alloc():
        t = torch.ones(MIB // 4)  # 1 MiB of float32
        return float(t.sum())

    peak, out = peak_live_bytes(alloc)
    assert out == MIB // 4
    assert MIB <= peak < 2 * MIB
    assert verify_peak_method()["ok"]


def test_peak_live_bytes_two_live_tensors_and_a_freed_one():
    def alloc():
        a = torch.ones(MIB // 4)
        b = torch.ones(MIB // 2)  # 2 MiB, while a is alive: peak >= 3 MiB
        del a
        c = torch.ones(MIB // 8)
        return float(b[0] + c[0])

    peak, _ = peak_live_bytes(alloc)
    assert 3 * MIB <= peak < 4 * MIB


def test_quiet_profiler_drops_profiler_lines_only(capfd):
    peak_live_bytes(lambda: torch.ones(16))
    assert "profiler_st" not in capfd.readouterr().err  # kineto's start/stop lines
    with quiet_profiler():
        os.write(2, b"USDT: SyncActivityProfilerHandler.cpp:52] profiler_start\n")
        os.write(2, b"a real error\n")
    err = capfd.readouterr().err
    assert "a real error" in err and "SyncActivityProfilerHandler" not in err


def test_forced_steps_runs_exactly_l_steps_and_restores_the_layer():
    model = DEQMLP((6,), 3, width=8)
    forced = forced_steps(model, 7, "picard", backward="neumann")
    x = torch.randn(5, 6)
    forced.train()
    forced(x).sum().backward()
    assert forced.deq.last_solution.stats["nstep"].tolist() == [7] * 5
    layer = forced.model.deq  # a copy: its own settings are back after the call
    assert type(layer.solver) is type(model.deq.solver)
    assert layer.max_steps == model.deq.max_steps and layer.adjoint == model.deq.adjoint
    assert forced.model is not model and model.deq.last_solution is None


def test_peak_from_events_running_sum():
    assert peak_from_events([(0, 10), (1, 5), (2, -10), (3, 20), (4, -25)]) == 25
    assert peak_from_events([(3, -4), (1, 8), (2, 4)]) == 12  # sorted by time first
    assert peak_from_events([]) == 0


def test_saved_tensor_bytes_matches_analytic_size():
    x = torch.randn(8, 16, requires_grad=True)

    def chain():
        z = x
        for _ in range(3):
            z = torch.exp(z)  # exp saves its output: one (8, 16) float32 tensor = 512 bytes
        return z.sum()

    nbytes, out = saved_tensor_bytes(chain, exclude=[x])
    assert nbytes == 3 * 8 * 16 * 4
    out.backward()  # the graph still works through the hooks' aliases
    assert x.grad is not None
    # x * x saves x twice: one storage, excluded -> 0; not excluded -> 512
    assert saved_tensor_bytes(lambda: (x * x).sum(), exclude=[x])[0] == 0
    assert saved_tensor_bytes(lambda: (x * x).sum())[0] == 512


def test_saved_tensor_bytes_ignores_dropped_graphs():
    x = torch.randn(8, 16, requires_grad=True)

    def fn():
        _ = torch.exp(x).sum()  # graph built and dropped: not held at the end
        return torch.exp(x).sum()

    assert saved_tensor_bytes(fn, exclude=[x])[0] == 512


def test_fit_slope_recovers_known_slope():
    xs = [4, 8, 16, 32, 64]
    fit = fit_slope(xs, [3.5 * x + 100 for x in xs])
    assert fit["slope"] == pytest.approx(3.5)
    assert fit["intercept"] == pytest.approx(100)
    assert fit["r2"] == pytest.approx(1.0)
    assert fit_slope([1, 2, 3], [5, 5, 5])["slope"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        fit_slope([1], [1])


def test_deq_memory_flat_while_unrolled_grows():
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    deq = DEQMLP((6,), 3, width=16)
    factories = {
        "unrolled": lambda L: UnrolledMLP((6,), 3, depth=L, width=16),
        "deq": lambda L: forced_steps(deq, L, "picard"),
    }
    res = memory_sweep(factories, [2, 4, 8], x, y)
    d, u = res["deq"], res["unrolled"]
    assert d["fit"]["saved_bytes"]["slope"] == pytest.approx(0.0, abs=1e-6)
    assert [r["steps_used"] for r in d["rows"]] == [2, 4, 8]  # all steps forced
    lo, hi = d["rows"][0]["peak_train_bytes"], d["rows"][-1]["peak_train_bytes"]
    assert abs(hi - lo) <= 0.1 * lo
    assert u["fit"]["saved_bytes"]["slope"] >= 16 * 16 * 4 * (1 - 1e-9)  # >= a state per step
    assert u["rows"][-1]["saved_bytes"] > u["rows"][0]["saved_bytes"]
    assert u["fit"]["peak_train_bytes"]["r2"] > 0.95


def test_memory_of_reports_all_measures():
    m = ResNetMLP((6,), 3, width=8, depth=2)
    r = memory_of(m, list(m.parameters()), torch.randn(4, 6), torch.randint(0, 3, (4,)))
    assert set(r) == {"saved_bytes", "peak_infer_bytes", "peak_train_bytes"}
    assert r["peak_train_bytes"] >= r["saved_bytes"] > 0


def test_homeomorphism_case_ode_fails_resnet_and_deq_succeed():
    res = homeomorphism_experiment(steps=100, n=128)
    m = res["models"]
    assert res["order_preserving_bound"] == pytest.approx(1 / 3, abs=0.05)
    assert m["neural_ode"]["mse"] > 0.2
    assert m["neural_ode"]["order_preserving"]
    assert m["resnet"]["mse"] < 0.05
    assert m["deq"]["mse"] < 0.05


def test_gradient_error_identical_and_scaled():
    g = [torch.randn(3, 4), torch.randn(5)]
    e = gradient_error(g, [t.clone() for t in g])
    assert e["rel_err"] == 0.0
    assert e["cosine"] == pytest.approx(1.0)
    e2 = gradient_error([2 * t for t in g], g)
    assert e2["rel_err"] == pytest.approx(1.0)
    assert e2["cosine"] == pytest.approx(1.0)


def test_deq_gradient_error_decreases_with_tighter_backward_tolerance():
    model = DEQMLP((6,), 3, width=12)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    res = deq_gradient_accuracy(model, x, y, tolerances=(1e-2, 1e-5, 1e-8), repeats=1)
    gm = [r for r in res["rows"] if r["method"] == "implicit GMRES"]
    errs = [r["rel_err"] for r in gm]
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 1e-6
    assert res["forward_rel_residual"] < 1e-10
    names = {r["method"] for r in res["rows"]}
    assert {"JFB", "phantom(5, 0.5)"} <= names


def test_ode_gradient_error_decreases_with_tolerance():
    model = NeuralODEClassifier((6,), 3, width=8)
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    res = ode_gradient_accuracy(model, x, y, tolerances=(1e-2, 1e-8))
    for meth in ("odeint_adjoint", "odeint direct"):
        lo, hi = [r["rel_err"] for r in res["rows"] if r["method"] == meth]
        assert hi < lo
        assert hi < 1e-5


def test_explicit_gradient_accuracy_is_rounding_level():
    m = ResNetMLP((6,), 3, width=8, depth=2)
    e = explicit_gradient_accuracy(m, torch.randn(4, 6), torch.randint(0, 3, (4,)))
    assert e["rel_err"] < 1e-5


def test_forward_cost_and_effective_depth():
    x = torch.randn(10, 6)
    res = ResNetMLP((6,), 3, width=8, depth=3)
    assert forward_cost(res, x, repeats=2)["f_evals"] == 3
    assert effective_depth(res, x)["mean"] == 3
    unr = UnrolledMLP((6,), 3, depth=4, width=8)
    assert effective_depth(unr, x)["mean"] == 4
    deq = DEQMLP((6,), 3, width=8, solver=dk.Picard(rtol=1e-4, atol=0.0))
    fc = forward_cost(deq, x, repeats=2)
    assert fc["f_evals"] >= 2 and fc["infer_s_per_sample"] > 0
    d = effective_depth(deq, x, batch=4)
    assert 1 <= d["mean"] <= d["max"] <= 50 and d["converged_frac"] == 1.0
    node = NeuralODEClassifier((6,), 3, width=8)
    assert effective_depth(node, x)["mean"] >= 6  # dopri5: at least one step


def test_training_speed_time_to_target():
    tr = {"history": [{"time": 0.0, "val_acc": 0.1}, {"time": 1.5, "val_acc": 0.7},
                      {"time": 3.0, "val_acc": 0.96}],
          "step_times": [0.1, 0.3, 0.2], "train_time": 3.0}
    sp = training_speed(tr, 0.95)
    assert sp["time_to_target_s"] == 3.0 and sp["step_s_median"] == pytest.approx(0.2)
    assert training_speed(tr, 0.99)["time_to_target_s"] is None


def test_models_share_budget_and_train():
    ms = build_models((6,), 3, width=8, depth=2)
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in ms.items()}
    assert len({counts[k] for k in counts if k != "resnet"}) == 1
    assert abs(counts["resnet"] - counts["deq_implicit"]) <= 0.25 * counts["deq_implicit"]
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    tr = train_model(ms["deq_jfb"], (x, y), (x, y), epochs=1, batch=16)
    assert len(tr["step_times"]) == 2 and len(tr["history"]) == 2


def test_compare_command_end_to_end(tmp_path):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_compare_parser(sub)
    out = tmp_path / "cmp"
    args = parser.parse_args([
        "compare", "--quick", "--subset", "48", "--epochs", "1", "--width", "8", "--depth",
        "2", "--sweep", "2,4", "--tols", "1e-2,1e-8", "--homeo-steps", "3", "--out", str(out),
        "--no-progress",
    ])
    assert args.func(args) == 0
    for name in ("compare.md", "compare.json", "memory.png", "gradients.png", "accuracy.png"):
        assert (out / name).stat().st_size > 0
    res = json.loads((out / "compare.json").read_text())
    assert set(res["models"]) == {"resnet", "unrolled", "node_adjoint", "node_direct",
                                  "deq_implicit", "deq_jfb", "deq_phantom", "deq_reuse",
                                  "deq_shine", "deq_reversible"}
    md = (out / "compare.md").read_text()
    for prop in ("Forward computation", "Memory (forward)", "Memory (backward)",
                 "Effective depth", "Expressiveness", "Training speed", "Gradient accuracy",
                 "Final test accuracy", "Homeomorphism (no crossing)"):
        assert prop in md
    assert "## Methods" in md and "profiler" in md


def test_forward_reuse_rows_reuse_the_forward_and_match_the_implicit_gradient():
    ms = build_models((6,), 3, width=8, depth=2, only=["deq_implicit", "deq_reuse", "deq_shine"])
    assert ms["deq_reuse"].deq.adjoint.reuse_forward
    assert isinstance(ms["deq_shine"].deq.adjoint, dk.SHINEAdjoint)
    torch.manual_seed(1)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    grads = {}
    for k, m in ms.items():
        m.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        grads[k] = torch.cat([p.grad.flatten() for p in m.parameters()])
    ref = grads["deq_implicit"]
    # same initial weights (seeded per model); reuse solves to the same tolerance, SHINE is an
    # approximation refined twice: close but not equal
    assert torch.allclose(grads["deq_reuse"], ref, rtol=1e-2, atol=1e-4)
    rel = (grads["deq_shine"] - ref).norm() / ref.norm()
    assert 0 < rel < 0.5
