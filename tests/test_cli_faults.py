"""`deqkit train` loses nothing when killed: fault injection at every instant of every write,
the run lock, clear errors for disk full / read-only folders / diverged losses / bad inputs."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from deqkit.app import files as _files
from deqkit.app.config import TrainConfig
from deqkit.app.main import main
from deqkit.app.train import TrainingDiverged, evaluate, load_checkpoint, train

pytest.importorskip("sklearn")

# 3 epochs whose validation accuracy improves, improves, drops (so best.pt is written twice,
# once over an older best, and one epoch writes none); one --log-every record per epoch;
# warm starts (last.pt only) and a weight average (both checkpoints); on the CPU, where
# training is deterministic and a process may fork
TINY = dict(model="deq_mlp", data="digits", subset=64, epochs=3, batch_size=32, lr=0.1, seed=1,
            device="cpu", progress=False, plots=False, max_steps=5, eval_max_steps=5,
            model_args={"width": 16}, log_every=2, warm_start=True, ema=0.5)
QUICK = dict(TINY, log_every=0, warm_start=False, ema=0.0)

# Runs in a fresh interpreter that never starts a thread or runs autograd itself, so it can
# fork safely: a forked reference run, then for every (write, instant) a forked child killed
# there by the fault hook, and a forked `deqkit train --resume` (or a fresh start when not
# even config.json was written, which is what --resume then asks for).
_DRIVER = textwrap.dedent("""
    import json, os, sys, traceback
    import torch
    torch.set_num_threads(1)
    from deqkit.app.main import main
    from deqkit.app import files as _files
    from deqkit.app.config import TrainConfig
    from deqkit.app.train import train

    base, kw = sys.argv[1], json.loads(sys.argv[2])
    quiet = lambda *a, **k: None

    def forked(fn, fault=None):
        pid = os.fork()
        if pid == 0:
            os.environ.pop(_files.FAULT_ENV, None)
            if fault:
                os.environ[_files.FAULT_ENV] = fault
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # stdout carries the result
            code = 3
            try:
                code = fn()
            except BaseException:
                traceback.print_exc()
            os._exit(code)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    def run(cfg):
        train(cfg, log=quiet)
        return 0

    def reference():  # in a child too: autograd must not run here before a fork (CUDA hosts)
        train(TrainConfig(**kw, out=os.path.join(base, "ref")), log=quiet)
        with open(os.path.join(base, "writes.json"), "w") as fh:
            json.dump(_files.FAULTS.log, fh)
        return 0

    # warm up here (imports, data, a forward without autograd) so each child starts warm
    from deqkit.app.train import build_model
    from deqkit.data import load_dataset
    cfg0 = TrainConfig(**kw)
    splits = load_dataset(cfg0.data, seed=cfg0.seed, subset=cfg0.subset)
    model = build_model(cfg0, splits.spec)
    with torch.no_grad():
        model(splits.train.tensors[0][:2])
    torch.optim.AdamW(model.parameters())
    assert forked(reference, "log") == 0
    with open(os.path.join(base, "writes.json")) as fh:
        writes = json.load(fh)
    cases = []
    for i, (kind, name) in enumerate(writes):
        for instant in _files.INSTANTS[kind]:
            out = os.path.join(base, f"w{i}-{instant}")
            cfg = TrainConfig(**kw, out=out)
            killed = forked(lambda: run(cfg), f"{i}:{instant}")
            resumed = forked(lambda: main(["train", "--out", out, "--resume"]))
            fresh = None
            if resumed == 2:  # nothing to resume: start again
                fresh = forked(lambda: run(cfg))
            cases.append(dict(out=out, write=i, name=name, instant=instant, killed=killed,
                              resumed=resumed, fresh=fresh))
    print(json.dumps({"writes": writes, "cases": cases}))
""")


def _records(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _same(a, b, where=""):
    """Equal up to timings and the run folder's name; tensors bit for bit."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            if "time" not in str(k) and k not in ("out", "run_dir"):
                _same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    else:
        assert a == b, (where, a, b)


def _assert_same_run(ref, out):
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref))  # no lock, no temporary file
    for name in ("last.pt", "best.pt"):
        _same(torch.load(os.path.join(ref, name), weights_only=True),
              torch.load(os.path.join(out, name), weights_only=True), name)
    strip = lambda recs: [{k: v for k, v in r.items() if "time" not in k} for r in recs]  # noqa: E731
    assert strip(_records(os.path.join(out, "metrics.jsonl"))) == \
        strip(_records(os.path.join(ref, "metrics.jsonl")))
    with open(os.path.join(ref, "summary.json")) as fa, open(os.path.join(out, "summary.json")) \
            as fb:
        _same(json.load(fa), json.load(fb), "summary")
    with open(os.path.join(ref, "config.json")) as fa, open(os.path.join(out, "config.json")) \
            as fb:
        _same(json.load(fa), json.load(fb), "config")


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux", reason="uses fork")
def test_kill_at_every_write_instant_then_resume_equals_uninterrupted(tmp_path):
    """Kill the run at every instant of every durable write (before it, temporary file
    written, renamed, folder synced; half a metrics record written), resume, and compare
    best.pt, last.pt, metrics.jsonl (every epoch exactly once), summary.json and the folder's
    file list with an uninterrupted run's."""
    proc = subprocess.run([sys.executable, "-c", _DRIVER, str(tmp_path), json.dumps(TINY)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    names = [name for _, name in result["writes"]]
    assert names.count("last.pt") == 3 and names.count("metrics.jsonl") == 6
    assert names[0] == "config.json" and names[-1] == "summary.json"
    # the settings are chosen so that best.pt is written over an older best (epochs 1 and 2
    # improve, 3 does not: one epoch writes none); should numerics move, keep >= 2 writes
    assert names.count("best.pt") >= 2, names
    ref = tmp_path / "ref"
    assert [r["epoch"] for r in _records(ref / "metrics.jsonl") if "step" not in r] == [1, 2, 3]
    for case in result["cases"]:
        assert case["killed"] == 137, (case, proc.stderr[-3000:])  # the hook fired there
        # --resume refuses only when not even config.json was written; a fresh start then
        no_run = case["write"] == 0 and case["instant"] in ("before", "tmp")
        assert (case["resumed"], case["fresh"]) == ((2, 0) if no_run else (0, None)), \
            (case, proc.stderr[-3000:])
        _assert_same_run(ref, case["out"])


def _tiny(tmp_path, name="r", **kw):
    return TrainConfig(**{**QUICK, "out": str(tmp_path / name), **kw})


def test_kill_between_last_and_best_repairs_best(tmp_path):
    """The kill -9 that left a finished run without best.pt: last.pt of the final epoch
    claims a new best, best.pt was never written. --resume rewrites best.pt from last.pt."""
    ref = train(_tiny(tmp_path, "ref", epochs=1), log=lambda *_: None)
    train(_tiny(tmp_path, "r", epochs=1), log=lambda *_: None)
    run = tmp_path / "r"
    (run / "best.pt").unlink()
    (run / "summary.json").unlink()
    lines = []
    summary = train(_tiny(tmp_path, "r", epochs=1), resume=True, log=lines.append)
    assert any("rewrote" in ln and "best.pt" in ln for ln in lines)
    _same(load_checkpoint(str(tmp_path / "ref" / "best.pt")),
          load_checkpoint(str(run / "best.pt")))
    assert summary["test_acc"] == ref["test_acc"]


def test_legacy_stale_best_is_reported_and_tracking_restarts(tmp_path):
    """A run of an older deqkit killed between last.pt and best.pt, then trained on: the best
    epoch's weights are gone. The resume says so and best.pt tracks the epochs it has."""
    cfg = _tiny(tmp_path, "r")
    train(cfg, log=lambda *_: None)
    run = tmp_path / "r"
    last = torch.load(run / "last.pt", weights_only=True)
    best = torch.load(run / "best.pt", weights_only=True)
    assert (last["epoch"], last["best_epoch"], best["epoch"]) == (3, 2, 2)
    best["epoch"] = 1  # as if best.pt had missed epoch 2's write
    torch.save(best, run / "best.pt")
    del last["best_epoch"]  # and last.pt came from a version without best_epoch
    torch.save(last, run / "last.pt")
    lines = []
    train(cfg, resume=True, log=lines.append)  # the run is complete: only the checks run
    assert any("warning" in ln and "epoch 2" in ln and "not saved" in ln for ln in lines)
    assert torch.load(run / "best.pt", weights_only=True)["epoch"] == 1  # left as it is


def test_resume_rewrites_metrics_atomically(tmp_path, monkeypatch):
    """--resume rewrites metrics.jsonl through a temporary file and a rename: killed in the
    middle, the old file is intact; the torn line and the interrupted epoch's records go."""
    cfg = _tiny(tmp_path, "r", log_every=1)
    train(cfg, stop_after=1, log=lambda *_: None)
    path = tmp_path / "r" / "metrics.jsonl"
    before = path.read_text()
    with open(path, "a") as fh:  # an interrupted epoch 2: a step record and a torn line
        fh.write(json.dumps({"epoch": 2, "step": 1, "loss": 1.0}) + "\n" + '{"epoch": 2, "ti')

    def die(*args, **kwargs):
        raise KeyboardInterrupt  # stands for the kill, after the temporary file was written

    monkeypatch.setattr(_files.os, "replace", die)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, resume=True, log=lambda *_: None)
    assert path.read_text().startswith(before)  # nothing of the old file was lost
    assert not [n for n in os.listdir(tmp_path / "r") if ".tmp-" in n]
    monkeypatch.undo()
    train(cfg, resume=True, log=lambda *_: None)
    recs = _records(path)
    assert [(r["epoch"], r.get("step")) for r in recs] == \
        [(1, 1), (1, 2), (1, None), (2, 1), (2, 2), (2, None), (3, 1), (3, 2), (3, None)]


def test_temp_files_of_killed_writes_are_removed(tmp_path):
    cfg = _tiny(tmp_path, "r")
    train(cfg, stop_after=1, log=lambda *_: None)
    run = tmp_path / "r"
    for name in ("last.pt.tmp-12345", "best.pt.tmp-99", "metrics.jsonl.tmp-7"):
        (run / name).write_bytes(b"half a file")
    (run / "notes.tmp-x").write_text("not ours")
    lines = []
    train(cfg, resume=True, log=lines.append)
    assert sorted(os.listdir(run)) == ["best.pt", "config.json", "last.pt", "metrics.jsonl",
                                       "notes.tmp-x", "summary.json"]
    assert any("removed 3 temporary file(s)" in ln for ln in lines)


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "the disk is full"),
                                         (errno.EROFS, "the file system is read-only")])
def test_disk_full_and_read_only_folder_are_one_clear_line(tmp_path, monkeypatch, capsys,
                                                           code, words):
    """A failing write ends `deqkit train` with one line naming the file, the cause and the
    fix (exit status 1), and leaves no temporary file."""
    real_fsync = os.fsync

    def failing_fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith("last.pt"):
            raise OSError(code, os.strerror(code))
        return real_fsync(fd)

    monkeypatch.setattr(_files.os, "fsync", failing_fsync)
    out = tmp_path / "r"
    rc = main(["train", "--model", "deq_mlp", "--subset", "64", "--epochs", "1",
               "--model-arg", "width=16", "--no-progress", "--no-plots", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert f"cannot write {str(out / 'last.pt')!r}: {words}" in err
    assert ("--resume" if code == errno.ENOSPC else "writable folder") in err
    assert not [n for n in os.listdir(out) if ".tmp-" in n or n == "train.lock"]


def test_read_only_run_folder_at_start(tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), args[0])

    with monkeypatch.context() as m:
        m.setattr(_files.os, "open", refuse)
        assert main(["train", "--out", str(tmp_path / "ro"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "read-only" in err and "train.lock" in err


_HOLD = textwrap.dedent("""
    import sys, time
    from deqkit.app.files import RunLock
    lock = RunLock(sys.argv[1])
    lock.acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


@pytest.mark.skipif(sys.platform != "linux", reason="flock and SIGKILL")
def test_second_train_on_the_same_folder_is_refused_and_stale_lock_taken_over(tmp_path,
                                                                              capsys):
    out = tmp_path / "r"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        argv = ["train", "--model", "deq_mlp", "--subset", "64", "--epochs", "1",
                "--model-arg", "width=16", "--no-progress", "--no-plots", "--out", str(out)]
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert f"in use by process {holder.pid}" in err and err.count("\n") == 1
        assert not (out / "config.json").exists()  # the refused run wrote nothing
    finally:
        holder.kill()  # SIGKILL: the lock file stays, naming a dead process
        holder.wait()
        holder.stdout.close()
    assert (out / "train.lock").read_text().strip() == str(holder.pid)
    assert main(argv) == 0
    captured = capsys.readouterr().out
    assert f"taking over the stale lock of process {holder.pid}" in captured
    assert not (out / "train.lock").exists()


def test_lock_without_flock_uses_an_exclusive_create(tmp_path, monkeypatch):
    """Where fcntl is missing the lock is an O_EXCL file: a second taker is refused and told
    how to clear a leftover; release removes it."""
    monkeypatch.setattr(_files, "fcntl", None)
    first, second = _files.RunLock(str(tmp_path)), _files.RunLock(str(tmp_path))
    first.acquire(log=lambda *_: None)
    with pytest.raises(_files.RunError, match=rf"in use by process {os.getpid()}.*delete"):
        second.acquire(log=lambda *_: None)
    first.release()
    assert not (tmp_path / "train.lock").exists()
    second.acquire(log=lambda *_: None)
    second.release()


def test_lock_is_released_after_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        train(_tiny(tmp_path, "r", model="nope"), log=lambda *_: None)
    assert not (tmp_path / "r" / "train.lock").exists()
    train(_tiny(tmp_path, "r", epochs=1), log=lambda *_: None)


def test_nonfinite_loss_stops_with_a_clear_message(tmp_path, monkeypatch, capsys):
    """A NaN loss in epoch 2 stops the run (no NaN epoch is recorded or saved) and the error
    names the epoch, the step, the last good checkpoint and the remedies."""
    import importlib

    tr = importlib.import_module("deqkit.app.train.evaluate")  # the module, not the function

    real = tr.loss_and_correct
    calls = []

    def nan_in_epoch_2(*args):
        loss, c = real(*args)
        if torch.is_grad_enabled():  # a training step, not an evaluation
            calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), c  # epoch 2, step 1

    monkeypatch.setattr(tr, "loss_and_correct", nan_in_epoch_2)
    cfg = _tiny(tmp_path, "r")
    with pytest.raises(TrainingDiverged) as info:
        train(cfg, log=lambda *_: None)
    msg = str(info.value)
    last = str(tmp_path / "r" / "last.pt")
    for part in ("nan at epoch 2, step 1", f"last good checkpoint is {last!r} (epoch 1",
                 "lower --lr (now 0.1)", "--rtol", "--jac-reg"):
        assert part in msg, part
    assert load_checkpoint(last)["epoch"] == 1
    assert [r["epoch"] for r in _records(tmp_path / "r" / "metrics.jsonl")] == [1]
    assert not (tmp_path / "r" / "train.lock").exists()
    # the command line: one line, exit status 1, even when no epoch finished
    monkeypatch.setattr(tr, "loss_and_correct", lambda *a: (real(*a)[0] * float("inf"), 0))
    rc = main(["train", "--model", "deq_mlp", "--subset", "64", "--model-arg", "width=16",
               "--no-progress", "--no-plots", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "no checkpoint was written" in err


def test_backward_failures_are_counted_on_the_console(tmp_path):
    """One GMRES iteration at a 1e-6 tolerance: every backward solve fails; the epoch line
    says how many samples (and steps) had an unconverged backward solve."""
    lines = []
    train(_tiny(tmp_path, "r", epochs=1, backward_max_steps=1, backward_rtol=1e-6),
          log=lines.append)
    epoch_line = next(ln for ln in lines if ln.startswith("epoch   1"))
    assert "bwd not converged: 64 samples in 2 steps" in epoch_line
    lines.clear()
    train(_tiny(tmp_path, "ok", epochs=1, backward_max_steps=50), log=lines.append)
    assert "bwd not converged" not in next(ln for ln in lines if ln.startswith("epoch   1"))


def test_backward_failures_accept_per_sample_overflow_flags():
    """`sol.backward["nonfinite_grad"]` as a bool or a per-sample tensor: overflowed samples
    are not solve failures, and solver_stats reads both forms."""
    from types import SimpleNamespace

    from deqkit.app.train import backward_failures, solver_stats

    stats = {"nstep": torch.tensor([3, 3, 3, 3]), "rel_residual": torch.zeros(4),
             "converged": torch.ones(4, dtype=torch.bool), "nfev": torch.tensor(4)}
    bwd = {"nstep": torch.tensor([5, 0, 5, 5]), "residual": torch.tensor([1.0, float("inf"),
                                                                          3.0, 2.0]),
           "converged": torch.tensor([True, False, False, True])}
    for flag, failures, overflow, residual in [
            (torch.tensor([False, True, False, False]), 1, 0.25, 2.0),
            (False, 2, 0.0, float("inf")), (True, 0, 1.0, 0.0)]:
        model = SimpleNamespace(deq=SimpleNamespace(last_solution=SimpleNamespace(
            stats=stats, backward={**bwd, "nonfinite_grad": flag})))
        assert backward_failures(model) == failures
        st = solver_stats(model)
        assert st["bwd_overflow"] == overflow and st["bwd_residual"] == residual


@pytest.mark.parametrize("flag, value, words", [
    ("--lr", "inf", "config `lr` = inf is invalid: expected a finite number"),
    ("--rtol", "inf", "config `rtol` = inf is invalid: expected a finite number"),
    ("--lr", "nan", "config `lr` = nan is invalid"),
])
def test_infinite_settings_are_rejected(tmp_path, capsys, flag, value, words):
    assert main(["train", flag, value, "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_config_out_must_be_a_path(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("out = 5\n")
    for extra in ([], ["--resume"]):
        assert main(["train", "--config", str(cfg), *extra]) == 2
        err = capsys.readouterr().err
        assert "config `out` = 5 is invalid: expected a folder path" in err, extra


def _npz(path, **arrays):
    import numpy as np

    rng = np.random.default_rng(0)
    base = dict(x_train=rng.random((20, 6)), y_train=np.arange(20) % 3,
                x_test=rng.random((5, 6)), y_test=np.arange(5) % 3)
    np.savez(path, **{**base, **arrays})
    return f"npz:{path}"


def test_huge_label_and_empty_test_split_are_clear_errors(tmp_path, capsys):
    import numpy as np

    y = np.arange(20) % 3
    y[4] = 10**9  # would be a 10^9-way output layer: hundreds of GB
    for data, words in [
            (_npz(tmp_path / "big.npz", y_train=y), "the largest class label is 1000000000"),
            (_npz(tmp_path / "empty.npz", x_test=np.zeros((0, 6)), y_test=np.zeros(0, int)),
             "the test split is empty (0 samples)")]:
        assert main(["train", "--model", "deq_mlp", "--data", data, "--no-progress",
                     "--out", str(tmp_path / "r"), "--epochs", "1"]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
    assert main(["train", "--model", "deq_mlp", "--data", _npz(tmp_path / "ok.npz"),
                 "--no-progress", "--no-plots", "--out", str(tmp_path / "ok"),
                 "--epochs", "1"]) == 0
    capsys.readouterr()
    empty = torch.utils.data.TensorDataset(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="cannot evaluate an empty split"):
        evaluate(torch.nn.Linear(6, 3), empty, 4, False)  # `deqkit eval --split` of one


def test_checkpoint_without_optimizer_is_a_clear_error(tmp_path, capsys):
    cfg = _tiny(tmp_path, "r")
    train(cfg, stop_after=1, log=lambda *_: None)
    path = tmp_path / "r" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    del ckpt["optimizer"]
    torch.save(ckpt, path)
    assert main(["train", "--out", str(tmp_path / "r"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "lacks ['optimizer']" in err and "cannot be resumed" in err
    assert err.count("\n") == 1
    ckpt = torch.load(path, weights_only=True)
    ckpt["optimizer"] = {"state": {}, "param_groups": []}
    torch.save(ckpt, path)
    assert main(["train", "--out", str(tmp_path / "r"), "--resume"]) == 2
    assert "'optimizer' does not fit this run" in capsys.readouterr().err


def test_resume_before_the_first_epoch_finished_starts_over(tmp_path):
    """Killed during epoch 1 (config.json written, no last.pt): --resume starts from epoch 1;
    with not even config.json there it says there is nothing to resume."""
    out = tmp_path / "r"
    out.mkdir()
    assert main(["train", "--out", str(out), "--resume"]) == 2
    cfg = _tiny(tmp_path, "r", epochs=1)
    (out / "config.json").write_text(json.dumps(cfg.to_dict()))
    (out / "metrics.jsonl").write_text('{"epoch": 1, "step": 1, "loss": 2.0}\n{"epo')
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert [r["epoch"] for r in _records(out / "metrics.jsonl")] == [1]
