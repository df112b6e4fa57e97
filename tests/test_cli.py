"""The training command: end to end, resume, config validation, checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from deqkit.app.config import TrainConfig, from_mapping, load_file
from deqkit.app.main import main
from deqkit.app.train import load_checkpoint, train
from helpers import CLI_QUICK, quick_config, read_records

pytest.importorskip("sklearn")

QUICK = CLI_QUICK
_cfg = quick_config
_records = read_records


def _strip_times(recs):
    return [{k: v for k, v in r.items() if "time" not in k} for r in recs]


def test_two_epoch_run_end_to_end(tmp_path):
    summary = train(_cfg(tmp_path, "a", plots=True), log=lambda *_: None)
    run = tmp_path / "a"
    assert summary["complete"] and summary["epochs"] == 2
    assert 0.0 <= summary["test_acc"] <= 1.0 and summary["test_acc"] > 0.3
    recs = _records(run / "metrics.jsonl")
    assert [r["epoch"] for r in recs] == [1, 2]
    assert recs[0]["train_fwd_steps"] > 0 and "val_acc" in recs[0]
    for name in ("config.json", "last.pt", "best.pt", "summary.json", "curves.png",
                 "solver.png", "residual_traces.png"):
        assert (run / name).is_file(), name
    ckpt = load_checkpoint(str(run / "last.pt"))  # weights_only=True round trip
    assert ckpt["epoch"] == 2 and ckpt["config"]["model"] == "deq_mlp"


def test_resume_equals_uninterrupted(tmp_path):
    full = train(_cfg(tmp_path, "full", epochs=3), log=lambda *_: None)
    part = _cfg(tmp_path, "part", epochs=3)
    train(part, stop_after=1, log=lambda *_: None)  # "killed" after epoch 1
    assert load_checkpoint(str(tmp_path / "part" / "last.pt"))["epoch"] == 1
    resumed = train(part, resume=True, log=lambda *_: None)
    assert resumed["test_acc"] == full["test_acc"]
    assert resumed["test_loss"] == pytest.approx(full["test_loss"], rel=0, abs=0)
    a = _strip_times(_records(tmp_path / "full" / "metrics.jsonl"))
    b = _strip_times(_records(tmp_path / "part" / "metrics.jsonl"))
    assert a == b


@pytest.mark.skipif(sys.platform != "linux", reason="uses SIGKILL")
def test_kill_mid_run_then_resume(tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "deqkit", "train", "--model", "deq_mlp", "--data", "digits",
           "--subset", "256", "--epochs", "4", "--max-steps", "10", "--lr", "0.01", "--no-progress",
           "--no-plots", "--model-arg", "width=32", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "last.pt").exists():
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # mid-way through epoch 2 (or later)
    proc.wait()
    ckpt = load_checkpoint(str(out / "last.pt"))  # never torn
    assert 1 <= ckpt["epoch"] <= 4
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert load_checkpoint(str(out / "last.pt"))["epoch"] == 4
    assert [r["epoch"] for r in _records(out / "metrics.jsonl")] == [1, 2, 3, 4]


def test_eval_command_with_larger_budget(tmp_path, capsys):
    train(_cfg(tmp_path, "e"), log=lambda *_: None)
    assert main(["eval", str(tmp_path / "e" / "last.pt"), "--max-steps", "30"]) == 0
    out = capsys.readouterr().out
    assert "eval max_steps 30" in out and "| acc" in out and "fwd_steps" in out


def test_config_file_and_rejections(tmp_path, capsys):
    good = tmp_path / "c.toml"
    good.write_text('model = "deq_mlp"\nepochs = 1\n[model_args]\nwidth = 16\n')
    assert load_file(str(good))["model_args"] == {"width": 16}
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "deq_mlp"\nepoch = 1\n')
    assert main(["train", "--config", str(bad)]) == 2
    assert "unknown key(s) ['epoch']" in capsys.readouterr().err
    broken = tmp_path / "broken.toml"
    broken.write_text('model = "deq_mlp\n')
    assert main(["train", "--config", str(broken)]) == 2
    assert "could not be parsed" in capsys.readouterr().err
    for values, match in [({"lr": -1}, "`lr` = -1"), ({"solver": "newton"}, "`solver`"),
                          ({"epochs": 0}, "`epochs`"), ({"adjoint": "ift"}, "`adjoint`"),
                          ({"jac_reg_freq": 2.0}, "jac_reg_freq")]:
        with pytest.raises(ValueError, match=match):
            from_mapping(values)
    assert main(["train", "--model", "nope", "--out", str(tmp_path / "n"),
                 "--no-progress"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main(["train", "--model", "deq_mlp", "--model-arg", "widht=8", "--no-progress",
                 "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "'widht' (did you mean 'width'?)" in err and err.count("\n") == 1


def test_existing_run_needs_resume_and_corrupt_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, "r", epochs=1)
    train(cfg, log=lambda *_: None)
    with pytest.raises(ValueError, match="--resume"):
        train(cfg, log=lambda *_: None)
    with pytest.raises(ValueError, match="differs from the checkpoint"):
        train(_cfg(tmp_path, "r", epochs=1, lr=5e-3), resume=True, log=lambda *_: None)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be loaded safely"):
        load_checkpoint(str(bad))
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a deqkit checkpoint"):
        load_checkpoint(str(tmp_path / "other.pt"))


def test_random_shift_rolls_each_sample():
    from deqkit.app.train import random_shift

    torch.manual_seed(0)
    x = torch.arange(10.0).repeat(4, 1, 1)  # (4, 1, 10)
    y = random_shift(x, 3)
    for i in range(4):
        k = int(torch.nonzero(y[i, 0] == 0)[0])  # where the original first element went
        k = k if k <= 3 else k - 10
        torch.testing.assert_close(y[i, 0], torch.roll(x[i, 0], k))
    img = torch.randn(2, 1, 5, 5)
    out = random_shift(img, 2)
    assert out.shape == img.shape
    torch.testing.assert_close(out.sum(dim=(2, 3)), img.sum(dim=(2, 3)))  # a permutation
    assert random_shift(torch.randn(3, 7), 2).shape == (3, 7)  # vectors untouched


def test_char_lm_run_reports_bits_per_character(tmp_path):
    cfg = TrainConfig(model="deq_transformer", data="text", subset=64, epochs=1, batch_size=32,
                      progress=False, plots=False, out=str(tmp_path / "lm"),
                      model_args={"d_model": 32, "n_heads": 2, "d_ff": 64})
    summary = train(cfg, log=lambda *_: None)
    assert summary["complete"]
    # bits per character = cross-entropy in nats / ln 2, over every predicted character
    assert summary["test_bpc"] == pytest.approx(summary["test_loss"] / 0.6931471805599453)
    assert 0 < summary["test_bpc"] < 10 and 0 <= summary["test_acc"] <= 1


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_run_and_resume(tmp_path, precision):
    """bf16/fp16 autocast training (fp16 with a GradScaler whose state is checkpointed) learns,
    and resuming it reproduces the uninterrupted run."""
    # bf16's eps is 2^-7: a tolerance below it warns (ToleranceWarning), so ask for 1e-2
    kw = dict(precision=precision, epochs=3, device="cpu",
              rtol=1e-2 if precision == "bf16" else 1e-3)
    full = train(_cfg(tmp_path, "full", **kw), log=lambda *_: None)
    assert full["test_acc"] > 0.5 and all(
        v == v for v in full.values() if isinstance(v, float))  # no NaN anywhere
    part = _cfg(tmp_path, "part", **kw)
    train(part, stop_after=1, log=lambda *_: None)
    ckpt = load_checkpoint(str(tmp_path / "part" / "last.pt"))
    assert ckpt["scaler"]["scale"] > 0 if precision == "fp16" else ckpt["scaler"] == {}
    resumed = train(part, resume=True, log=lambda *_: None)
    assert resumed["test_acc"] == full["test_acc"]
    assert resumed["test_loss"] == full["test_loss"]


def test_device_and_precision_rejected(tmp_path):
    with pytest.raises(ValueError, match="config `precision` = 'fp8'"):
        _cfg(tmp_path, "a", precision="fp8")
    with pytest.raises(ValueError, match="config `device` = 'gpu'"):
        _cfg(tmp_path, "a", device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            train(_cfg(tmp_path, "b", device="cuda"), log=lambda *_: None)


def test_onestep_adjoint_from_config(tmp_path):
    import deqkit as dk

    adj = _cfg(tmp_path, "a", adjoint="onestep", residual_weight=0.5).build_adjoint()
    assert isinstance(adj, dk.OneStepAdjoint) and adj.residual_weight == 0.5
    with pytest.raises(ValueError, match=r"config `residual_weight` = -1\.0"):
        _cfg(tmp_path, "a", adjoint="onestep", residual_weight=-1.0)


def test_model_preset_fills_only_unset_keys(tmp_path, monkeypatch):
    """`deqkit train --model deq_transformer` gets the LM's training recipe (one Picard step,
    one-step adjoint, lr 1e-2) unless a flag sets a key; the resolved values are recorded."""
    seen = {}
    fake = lambda cfg, **kw: seen.setdefault("cfg", cfg)  # noqa: E731
    monkeypatch.setattr("deqkit.app.train.train", fake)  # main.py imports it when it runs
    main(["train", "--model", "deq_transformer", "--data", "text", "--out",
          str(tmp_path / "a")])
    cfg = seen.pop("cfg")
    assert (cfg.solver, cfg.max_steps, cfg.adjoint, cfg.lr) == ("picard", 1, "onestep", 1e-2)
    main(["train", "--model", "deq_transformer", "--data", "text", "--adjoint", "implicit",
          "--lr", "3e-3", "--out", str(tmp_path / "b")])
    cfg = seen.pop("cfg")
    assert (cfg.adjoint, cfg.lr, cfg.solver) == ("implicit", 3e-3, "picard")
    main(["train", "--model", "conv_deq", "--out", str(tmp_path / "c")])
    assert seen.pop("cfg").adjoint == "implicit"  # other models: the plain defaults


def test_ema_weights_are_evaluated_and_equal_the_hand_computed_average(tmp_path, monkeypatch):
    """`ema=d`: after optimiser step t the average is w_1 (t = 1), then d*avg + (1-d)*w_t;
    validation and test run on the average, training goes on from the raw weights, and the
    checkpoint holds both (so `deqkit eval` scores the average)."""
    import importlib

    from torch.optim.optimizer import register_optimizer_step_post_hook

    import deqkit.app.train as tr

    # the modules (the package's `fit` and `evaluate` are the functions)
    fit_module = importlib.import_module("deqkit.app.train.fit")
    run_module = importlib.import_module("deqkit.app.train.run")

    decay = 0.5  # far from 1, so the average differs clearly from the last weights
    steps: list[dict[int, torch.Tensor]] = []  # raw parameters after every optimiser step
    handle = register_optimizer_step_post_hook(
        lambda opt, args, kwargs: steps.append(
            {id(p): p.detach().clone().double().cpu()
             for g in opt.param_groups for p in g["params"]}))
    seen = []  # (optimiser steps so far, parameters the evaluation saw)
    real_evaluate = tr.evaluate

    def spy(model, *args, **kwargs):
        seen.append((len(steps), {n: (id(p), p.detach().clone().double().cpu())
                                  for n, p in model.named_parameters()}))
        return real_evaluate(model, *args, **kwargs)

    monkeypatch.setattr(fit_module, "evaluate", spy)  # validation
    monkeypatch.setattr(run_module, "evaluate", spy)  # test
    try:
        summary = train(_cfg(tmp_path, "ema", ema=decay), log=lambda *_: None)
    finally:
        handle.remove()
    assert len(steps) == 8  # 256 samples / batch 64 x 2 epochs
    assert [n for n, _ in seen] == [4, 8, 8]  # val after each epoch, then test

    def average(t):
        avg = dict(steps[0])
        for w in steps[1:t]:
            avg = {k: decay * avg[k] + (1 - decay) * w[k] for k in avg}
        return avg

    for t, params in seen:
        avg = average(t)
        for name, (pid, value) in params.items():
            torch.testing.assert_close(value, avg[pid], rtol=0, atol=1e-6, msg=name)
        # the average, not the last weights
        assert max(float((v - steps[t - 1][pid]).abs().max()) for pid, v in params.values()) \
            > 1e-3
    ckpt = load_checkpoint(str(tmp_path / "ema" / "last.pt"))
    assert ckpt["ema"]["n_averaged"] == 8 and ckpt["ema"]["decay"] == decay
    last = seen[-1][1]
    for name, value in ckpt["model"].items():  # raw weights restored after evaluation
        if name in last:
            torch.testing.assert_close(value.double(), steps[-1][last[name][0]], rtol=0, atol=0)
            torch.testing.assert_close(ckpt["ema"]["params"][name].double(), last[name][1],
                                       rtol=0, atol=1e-6)
    monkeypatch.undo()
    assert tr.eval_checkpoint(str(tmp_path / "ema" / "last.pt"),
                              log=lambda *_: None)["acc"] == summary["test_acc"]
    assert summary["train_cpu_time"] > 0 and "train_cpu_time" in ckpt["history"][0]


def test_ema_resume_equals_uninterrupted(tmp_path):
    kw = dict(epochs=3, ema=0.9)
    full = train(_cfg(tmp_path, "full", **kw), log=lambda *_: None)
    part = _cfg(tmp_path, "part", **kw)
    train(part, stop_after=1, log=lambda *_: None)
    assert load_checkpoint(str(tmp_path / "part" / "last.pt"))["ema"]["n_averaged"] == 4
    resumed = train(part, resume=True, log=lambda *_: None)
    assert resumed["test_acc"] == full["test_acc"]
    assert resumed["test_loss"] == full["test_loss"]
    assert _strip_times(_records(tmp_path / "full" / "metrics.jsonl")) == \
        _strip_times(_records(tmp_path / "part" / "metrics.jsonl"))
    a = load_checkpoint(str(tmp_path / "full" / "last.pt"))["ema"]
    b = load_checkpoint(str(tmp_path / "part" / "last.pt"))["ema"]
    assert a["n_averaged"] == b["n_averaged"] == 12
    for name, value in a["params"].items():
        torch.testing.assert_close(b["params"][name], value, rtol=0, atol=0)


def test_ema_rejected_values(tmp_path, capsys):
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=rf"config `ema` = {bad!r} is invalid: .*--ema"):
            _cfg(tmp_path, "a", ema=bad)
    with pytest.raises(ValueError, match="`ema` = 'x'"):
        _cfg(tmp_path, "a", ema="x")
    assert main(["train", "--ema", "1", "--out", str(tmp_path / "b"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "`ema` = 1.0 is invalid" in err and "[0, 1)" in err
    cfg = tmp_path / "e.toml"
    cfg.write_text("ema = 0.995\n")
    assert from_mapping(load_file(str(cfg))).ema == 0.995


def test_warm_start_fewer_steps_and_exact_resume(tmp_path):
    # deq_mlp at a tight tolerance so that the training solves take many steps from zero
    kw = dict(epochs=3, warm_start=True, rtol=1e-5, max_steps=30, lr=1e-3)
    full = train(_cfg(tmp_path, "full", **kw), log=lambda *_: None)
    cold = train(_cfg(tmp_path, "cold", **{**kw, "warm_start": False}), log=lambda *_: None)
    warm_recs = _records(tmp_path / "full" / "metrics.jsonl")
    cold_recs = _records(tmp_path / "cold" / "metrics.jsonl")
    # epoch 1 starts cold either way; later epochs start from the stored equilibria
    # (8.3 vs 11.1 steps per sample here)
    assert warm_recs[2]["train_fwd_steps"] < 0.85 * cold_recs[2]["train_fwd_steps"]
    ckpt = load_checkpoint(str(tmp_path / "full" / "last.pt"))
    assert int(ckpt["warm_start"]["seen"].sum()) > 0
    assert "warm_start" not in load_checkpoint(str(tmp_path / "full" / "best.pt"))
    part = _cfg(tmp_path, "part", **kw)
    train(part, stop_after=1, log=lambda *_: None)
    resumed = train(part, resume=True, log=lambda *_: None)
    assert resumed["test_loss"] == full["test_loss"]
    assert _strip_times(_records(tmp_path / "full" / "metrics.jsonl")) == \
        _strip_times(_records(tmp_path / "part" / "metrics.jsonl"))
    assert full["complete"] and cold["complete"] and resumed["test_acc"] == full["test_acc"]


def test_adjoint_cache_run_and_exact_resume(tmp_path):
    kw = dict(epochs=3, adjoint_cache=True, backward_rtol=1e-6, lr=1e-3)
    full = train(_cfg(tmp_path, "full", **kw), log=lambda *_: None)
    recs = _records(tmp_path / "full" / "metrics.jsonl")
    assert all(r["train_bwd_converged"] == 1.0 for r in recs)  # same tolerance as cold
    ckpt = load_checkpoint(str(tmp_path / "full" / "last.pt"))
    assert int(ckpt["adjoint_cache"]["seen"].sum()) > 0
    assert "adjoint_cache" not in load_checkpoint(str(tmp_path / "full" / "best.pt"))
    part = _cfg(tmp_path, "part", **kw)
    train(part, stop_after=1, log=lambda *_: None)
    resumed = train(part, resume=True, log=lambda *_: None)
    assert resumed["test_loss"] == full["test_loss"]
    assert _strip_times(recs) == _strip_times(_records(tmp_path / "part" / "metrics.jsonl"))
    with pytest.raises(ValueError, match="adjoint 'jfb' has none"):
        train(_cfg(tmp_path, "j", adjoint="jfb", adjoint_cache=True), log=lambda *_: None)


def test_warm_start_rejected_without_a_deq(tmp_path, capsys):
    with pytest.raises(ValueError, match="no DEQ layer to warm-start"):
        train(_cfg(tmp_path, "r", model="resnet_mlp", warm_start=True, model_args={}),
              log=lambda *_: None)
    with pytest.raises(ValueError, match="`warm_start` = 'yes'"):
        _cfg(tmp_path, "r2", warm_start="yes")
