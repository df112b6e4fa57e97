"""The training engine: `fit` in memory, run extension, clear errors before anything is
written, plots at the end, metrics, TensorBoard, `deqkit eval RUN`."""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
from types import SimpleNamespace

import pytest
import torch

from deqkit.app.config import TrainConfig
from deqkit.app.main import main
from deqkit.app.train import (
    FitState,
    StepOptions,
    eval_checkpoint,
    evaluate,
    fit,
    load_checkpoint,
    plot_run,
    solver_stats,
    train,
)

pytest.importorskip("sklearn")

QUICK = dict(model="deq_mlp", data="digits", subset=128, epochs=2, batch_size=32,
             progress=False, plots=False, max_steps=8, eval_max_steps=10, device="cpu",
             model_args={"width": 16}, lr=1e-2)
quiet = lambda *_: None  # noqa: E731


def _cfg(tmp_path, name, **kw):
    return TrainConfig(**{**QUICK, "out": str(tmp_path / name), **kw})


def _records(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _untimed(recs):
    return [{k: v for k, v in r.items() if "time" not in k} for r in recs]


def _data(n=48, d=6, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(n, d, generator=g),
                                          torch.randint(0, k, (n,), generator=g))


# ----------------------------------------------------------------------------- fit in memory


def test_fit_in_memory_with_a_custom_loss_and_evaluations_within_epochs():
    """A loss in bits plugs in (training and evaluation use it); three evaluations per epoch
    (two within, one at its end); one time per step; the weights change."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    before = model.weight.detach().clone()
    seen = []

    def bits(out, y):
        seen.append(torch.is_grad_enabled())
        loss = torch.nn.functional.cross_entropy(out, y) / math.log(2)
        return loss, int((out.argmax(-1) == y).sum())

    data = _data()
    res = fit(model, data, epochs=2, batch_size=8, lr=1e-2, loss_fn=bits, val_data=data,
              evals_per_epoch=3)
    assert [r["epoch"] for r in res.history] == [1, 2] and res.state.step == 12
    assert len(res.step_times) == 12 and all(t > 0 for t in res.step_times)
    assert [r["epoch"] for r in res.evals] == pytest.approx([1 / 3, 2 / 3, 4 / 3, 5 / 3])
    assert True in seen and False in seen  # the training steps and the evaluations
    ce = evaluate(model, data, 8)["loss"]  # the default loss, in nats
    assert res.history[-1]["val_loss"] == pytest.approx(ce / math.log(2), rel=1e-6)
    assert not torch.equal(model.weight, before)


def test_fit_continued_from_its_state_equals_one_fit():
    """Two epochs, or one epoch then a fit from the returned state with the same optimiser:
    bit for bit the same weights and records (per-epoch seeds for shuffling)."""
    def make():
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Dropout(0.3),
                                    torch.nn.Linear(8, 3))
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    data = _data()
    a, opt_a = make()
    whole = fit(a, data, epochs=2, batch_size=10, optimizer=opt_a, val_data=data, seed=3)
    b, opt_b = make()
    half = fit(b, data, epochs=2, batch_size=10, optimizer=opt_b, val_data=data, seed=3,
               stop_after=1)
    assert half.state.epoch == 1
    rest = fit(b, data, epochs=2, batch_size=10, optimizer=opt_b, val_data=data, seed=3,
               state=FitState(**vars(half.state)))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert _untimed(whole.history) == _untimed(rest.history)


def test_fit_stops_when_on_step_says_so_and_clips_gradients():
    model = torch.nn.Linear(6, 3)
    calls = []
    res = fit(model, _data(), epochs=100, batch_size=8, drop_last=True,
              options=StepOptions(grad_clip=1e-3),
              on_step=lambda info: calls.append(info.global_step) or info.global_step == 5)
    assert res.stopped and calls == [1, 2, 3, 4, 5] and res.history == []


# ----------------------------------------------------------------------------- extending a run


def test_extending_a_constant_schedule_run_is_exact(tmp_path):
    """4 epochs, then --resume --epochs 6, is bit for bit the 6-epoch run (weights, optimiser,
    records); a finished run resumed with its own epochs says so and trains nothing."""
    full = train(_cfg(tmp_path, "six", epochs=6, schedule="constant"), log=quiet)
    out = tmp_path / "four"
    train(_cfg(tmp_path, "four", epochs=4, schedule="constant"), log=quiet)
    lines = []
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    ckpt = load_checkpoint(str(out / "last.pt"))
    assert ckpt["epoch"] == 4  # finished: nothing retrained
    lines = []
    train(_cfg(tmp_path, "four", epochs=4, schedule="constant"), resume=True, log=lines.append)
    finished = [ln for ln in lines if "is finished" in ln]
    assert len(finished) == 1 and "--resume --epochs N (N > 4)" in finished[0]
    assert not any(ln.startswith("epoch") for ln in lines)
    assert main(["train", "--out", str(out), "--resume", "--epochs", "6", "--no-progress"]) == 0
    a = load_checkpoint(str(tmp_path / "six" / "last.pt"))
    b = load_checkpoint(str(out / "last.pt"))
    assert b["epoch"] == 6 and b["config"]["epochs"] == 6
    for key in ("model", "optimizer", "scheduler"):
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)
    assert _untimed(b["history"]) == _untimed(a["history"])
    assert _untimed(_records(out / "metrics.jsonl")) == \
        _untimed(_records(tmp_path / "six" / "metrics.jsonl"))
    assert json.loads((out / "config.json").read_text())["epochs"] == 6
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["test_loss"] == full["test_loss"] and resumed["epochs"] == 6


def test_extending_a_cosine_run_replans_and_says_so(tmp_path):
    cfg = _cfg(tmp_path, "c", epochs=2)
    train(cfg, log=quiet)
    lines = []
    train(_cfg(tmp_path, "c", epochs=4), resume=True, stop_after=1, log=lines.append)
    msg = next(ln for ln in lines if ln.startswith("extending"))
    assert "re-planned over 4 epochs" in msg and "not the same as a 4-epoch run" in msg
    ckpt = load_checkpoint(str(tmp_path / "c" / "last.pt"))
    # 4 steps per epoch: after 3 epochs (12 of 16 steps) the rate of the 4-epoch cosine
    step = ckpt["scheduler"]["last_epoch"]
    assert step == 12
    lr = ckpt["optimizer"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 12 / 16)), rel=1e-12)
    with pytest.raises(ValueError, match="has finished 3 epochs, more than --epochs 2"):
        train(_cfg(tmp_path, "c", epochs=2), resume=True, log=quiet)


# ----------------------------------------------------------------------------- clear errors


def test_resume_errors_name_the_reason(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "none"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "start it without --resume" in err and err.count("\n") == 1
    cfg = _cfg(tmp_path, "r", epochs=1)
    train(cfg, log=quiet)
    last = tmp_path / "r" / "last.pt"
    data = last.read_bytes()
    for content, words in [(b"", "it is empty (0 bytes)"),
                           (data[: len(data) // 2], "it is truncated")]:
        last.write_bytes(content)
        assert main(["train", "--out", str(tmp_path / "r"), "--resume"]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
            train(cfg, resume=True, log=quiet)


@pytest.mark.parametrize("model, data, args, words", [
    ("conv_deq", "text", [], "model 'conv_deq' takes image or sequence data, but 'text' is "
                             "text data of shape (64,); use --model deq_transformer"),
    ("conv_deq", "digits", ["--data-arg", "flatten=true"],
     "but 'digits' is vector data of shape (64,); use --model deq_mlp"),
    ("deq_mlp", "text", [], "use --model deq_transformer"),
    ("nope", "digits", [], "unknown model 'nope'"),
])
def test_a_model_that_does_not_fit_the_data_writes_nothing(tmp_path, capsys, model, data,
                                                            args, words):
    out = tmp_path / "r"
    assert main(["train", "--model", model, "--data", data, *args, "--out", str(out),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1, err
    assert not out.exists()  # no empty run folder


# ----------------------------------------------------------------------------- output


def test_plots_at_the_end_only_and_plot_run(tmp_path, monkeypatch):
    run_module = importlib.import_module("deqkit.app.train.run")
    calls = []
    real = run_module.plot_history
    monkeypatch.setattr(run_module, "plot_history",
                        lambda history, run_dir: calls.append(len(history)) or real(history,
                                                                                    run_dir))
    train(_cfg(tmp_path, "p", epochs=3, plots=True), log=quiet)
    assert calls == [3]  # once, after the last epoch
    run = tmp_path / "p"
    for name in ("curves.png", "solver.png", "residual_traces.png"):
        (run / name).unlink()
    lines = []
    written = plot_run(str(run), log=lines.append)
    assert sorted(os.path.basename(p) for p in written) == ["curves.png",
                                                            "residual_traces.png", "solver.png"]
    assert all((run / n).is_file() for n in ("curves.png", "solver.png", "residual_traces.png"))
    with pytest.raises(ValueError, match=r"no metrics\.jsonl"):
        plot_run(str(tmp_path / "missing"))


def test_first_line_at_once_and_one_line_per_epoch_without_a_terminal(tmp_path, capsys):
    lines = []
    train(_cfg(tmp_path, "a", progress=True), log=lines.append)
    assert lines[0] == "loading data 'digits' ..." and lines[1] == "building model 'deq_mlp' ..."
    assert [ln[:9] for ln in lines if ln.startswith("epoch")] == ["epoch   1", "epoch   2"]
    assert capsys.readouterr().err == ""  # stderr is no terminal here: no progress bar


def test_metrics_maximum_is_a_true_maximum_and_nan_residuals_stay_nan(tmp_path, monkeypatch):
    train(_cfg(tmp_path, "m", log_every=1), log=quiet)
    recs = _records(tmp_path / "m" / "metrics.jsonl")
    for epoch in (1, 2):
        steps = [r for r in recs if r["epoch"] == epoch and "step" in r]
        rec = next(r for r in recs if r["epoch"] == epoch and "step" not in r)
        assert rec["train_fwd_steps_max"] == max(s["fwd_steps_max"] for s in steps)
        assert rec["train_fwd_steps_max"] == int(rec["train_fwd_steps_max"])
        assert rec["train_fwd_steps"] == pytest.approx(
            sum(s["fwd_steps"] for s in steps) / len(steps))
    sol = SimpleNamespace(stats={"nstep": torch.tensor([2, 5]), "nfev": torch.tensor(6),
                                 "rel_residual": torch.tensor([1e-4, float("nan")]),
                                 "converged": torch.tensor([True, False])}, backward=None)
    st = solver_stats(SimpleNamespace(deq=SimpleNamespace(last_solution=sol)))
    assert math.isnan(st["fwd_rel_res"]) and st["fwd_steps_max"] == 5.0


def test_eval_of_a_run_folder_uses_best_then_last(tmp_path):
    train(_cfg(tmp_path, "e"), log=quiet)
    run = tmp_path / "e"
    lines = []
    res = eval_checkpoint(str(run), log=lines.append)
    best_epoch = load_checkpoint(str(run / "best.pt"))["epoch"]
    assert "best.pt" in lines[0] and res["epoch"] == best_epoch
    (run / "best.pt").unlink()
    lines.clear()
    res = eval_checkpoint(str(run), max_steps=3, log=lines.append)
    assert "last.pt" in lines[0] and "no best.pt" in lines[0] and res["epoch"] == 2
    assert any("eval max_steps 3" in ln for ln in lines)
    assert res["fwd_steps_max"] <= 3


def test_eval_budget_uses_the_deq_overrides_when_there(tmp_path):
    from deqkit.app.train.eval_run import eval_budget

    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.deq = SimpleNamespace(eval_max_steps=40)

    model = Plain()
    with eval_budget(model, 7):
        assert model.deq.eval_max_steps == 7
    assert model.deq.eval_max_steps == 40
    used = []

    class WithOverrides:
        eval_max_steps = 40

        def overrides(self, **kw):
            import contextlib

            used.append(kw)
            return contextlib.nullcontext()

    model.deq = WithOverrides()
    with eval_budget(model, 9):
        pass
    assert used == [{"eval_max_steps": 9}] and model.deq.eval_max_steps == 40


# ----------------------------------------------------------------------------- TensorBoard


def test_tensorboard_scalars_match_the_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(_cfg(tmp_path, "tb", tensorboard=True, log_every=2), log=quiet)
    run = tmp_path / "tb"
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    recs = _records(run / "metrics.jsonl")
    epochs = [r for r in recs if "step" not in r]
    got = [(e.step, e.value) for e in acc.Scalars("epoch/train_loss")]
    assert got == [(r["epoch"], pytest.approx(r["train_loss"], rel=1e-6)) for r in epochs]
    assert [e.value for e in acc.Scalars("epoch/val_acc")] == \
        pytest.approx([r["val_acc"] for r in epochs], rel=1e-6)
    steps = [r for r in recs if "step" in r]
    assert [e.step for e in acc.Scalars("step/loss")] == [2, 4, 6, 8] and len(steps) == 4


def test_tensorboard_missing_is_a_clear_error_before_anything_is_written(tmp_path,
                                                                           monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ValueError, match=r"pip install 'deqkit\[tensorboard\]'"):
        train(_cfg(tmp_path, "tb", tensorboard=True), log=quiet)
    assert not (tmp_path / "tb").exists()


def test_compare_builds_its_adjoints_through_the_registry():
    import deqkit as dk
    from deqkit.app.compare.models import deq_adjoint

    adj = deq_adjoint("implicit")
    assert isinstance(adj, dk.ImplicitAdjoint) and adj.linear_solver.restart == 5
    assert isinstance(deq_adjoint("phantom"), dk.PhantomAdjoint)
    with pytest.raises(ValueError, match="did you mean 'jfb'"):
        deq_adjoint("jfbb")


def test_an_interrupt_mid_epoch_leaves_a_run_that_resumes_exactly(tmp_path, monkeypatch):
    """Ctrl-C (KeyboardInterrupt) inside a training step of epoch 2: the lock is released,
    last.pt holds epoch 1, and --resume gives the uninterrupted run's records."""
    evaluate_module = importlib.import_module("deqkit.app.train.evaluate")
    real = evaluate_module.loss_and_correct
    calls = []

    def interrupt_in_epoch_2(*args):
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 6:  # 4 steps per epoch: epoch 2, step 2
                raise KeyboardInterrupt
        return real(*args)

    full = train(_cfg(tmp_path, "full", log_every=1), log=quiet)
    cfg = _cfg(tmp_path, "r", log_every=1)
    monkeypatch.setattr(evaluate_module, "loss_and_correct", interrupt_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, log=quiet)
    monkeypatch.undo()
    run = tmp_path / "r"
    assert load_checkpoint(str(run / "last.pt"))["epoch"] == 1
    assert not (run / "train.lock").exists()
    resumed = train(cfg, resume=True, log=quiet)
    assert resumed["test_loss"] == full["test_loss"]
    assert _untimed(_records(run / "metrics.jsonl")) == \
        _untimed(_records(tmp_path / "full" / "metrics.jsonl"))
