"""``deqkit train`` and ``deqkit eval``: a run folder around :func:`~deqkit.app.train.fit`.

Order of a run: data and model are built and checked first (a bad config writes nothing),
then the run folder is locked and prepared (resume checks, best.pt repair), then
:func:`~deqkit.app.train.fit` trains with callbacks that append ``metrics.jsonl`` and write
``last.pt``/``best.pt`` after every epoch, and the end writes ``summary.json`` and the plots.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..config import TrainConfig, resolve_device
from ..files import FAULTS, RunError, RunLock, os_error_message, rewrite_metrics, write_file
from . import checkpoint as ck
from . import distributed as dd
from . import setup
from .ema import WeightEMA, averaged
from .eval_run import summary_table
from .evaluate import cross_entropy, evaluate
from .fit import FitState, StepInfo, fit
from .metrics import RunMetrics, check_tensorboard
from .plots import plot_history, plot_residual_traces
from .step import StepOptions, TrainingDiverged

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)
             if f.default is not dataclasses.MISSING}
Log = Callable[[str], Any]


@dataclasses.dataclass
class _Run:
    """One ``deqkit train`` invocation's objects."""

    cfg: TrainConfig
    env: dd.DistEnv
    splits: Any
    model: nn.Module
    device: torch.device
    opt: torch.optim.Optimizer
    sched: Any
    scaler: Any
    ema: WeightEMA | None
    warm_cache: Any
    adjoint_cache: Any
    state: FitState
    metrics: RunMetrics
    log: Log
    best: tuple[float, int] = (-1.0, 0)

    @property
    def run_dir(self) -> str:
        return self.cfg.run_dir()

    @property
    def text(self) -> bool:
        return self.splits.spec.kind == "text"


def train(cfg: TrainConfig, *, resume: bool = False, stop_after: int | None = None,
          log: Log = print) -> dict[str, Any]:
    """Train ``cfg`` into ``cfg.run_dir()``; returns the summary (also in summary.json).

    ``stop_after`` ends the run after that many epochs of this invocation (used to test
    resuming); a resumed run continues exactly: per-epoch seeds for shuffling and dropout,
    optimiser and schedule state restored from the checkpoint. ``resume`` with a larger
    ``cfg.epochs`` extends a run (exactly with ``schedule="constant"``; a cosine is re-planned
    over the new total, see ``docs/guides/training-at-scale.md``).

    Started by ``torchrun`` with ``WORLD_SIZE > 1`` the run is data parallel
    (``DistributedDataParallel``; see ``docs/distributed.md``): each rank trains on its chunk
    of every global batch of ``batch_size``, metrics are reduced over the ranks, and only
    rank 0 logs and writes files. Every rank returns the same summary.
    """
    FAULTS.reset()
    env = dd.detect(cfg.device)
    lock = RunLock(cfg.run_dir()) if env.is_main else None  # taken in prepare_run_dir
    try:
        summary = _train(cfg, env, lock, resume=resume, stop_after=stop_after,
                         log=log if env.is_main else (lambda *a, **k: None))
    except BaseException:
        dd.shutdown(env, barrier=False)  # the other ranks may not reach a barrier
        raise
    finally:
        if lock is not None:
            lock.release()
    dd.shutdown(env)
    return summary


def _build(cfg: TrainConfig, env: dd.DistEnv, log: Log) -> tuple[Any, nn.Module, torch.device]:
    """Data and model, checked, before anything is written."""
    if env.enabled:
        dd.local_batch_size(cfg.batch_size, env.world_size)
    if cfg.tensorboard:
        check_tensorboard()
    device = env.device if env.enabled else resolve_device(cfg.device)
    log(f"loading data {cfg.data!r} ...")
    if env.enabled and not env.is_main:
        env.barrier()  # rank 0 fills any data cache first
    splits = setup.load_data(cfg.data, root=cfg.data_root, seed=cfg.seed, subset=cfg.subset,
                             data_args=cfg.data_args)
    if env.enabled and env.is_main:
        env.barrier()
    log(f"building model {cfg.model!r} ...")
    torch.manual_seed(cfg.seed)
    model = setup.build_model(cfg, splits.spec).to(device)
    for key in ("warm_start", "adjoint_cache"):
        if not getattr(cfg, key):
            continue
        flag = "--" + key.replace("_", "-")
        if not hasattr(getattr(model, "deq", None), "warm_start"):
            raise ValueError(
                f"{key}: model {cfg.model!r} has no DEQ layer to warm-start; use a DEQ "
                f"model (e.g. conv_deq) or drop {flag}.")
        if env.enabled:
            raise ValueError(
                f"{key}: {flag} works in single-process training only (each process would "
                "keep its own cache); drop it under torchrun.")
    if (cfg.unroll_warmup or cfg.max_steps_start is not None) and \
            not hasattr(getattr(model, "deq", None), "overrides"):
        key = "unroll_warmup" if cfg.unroll_warmup else "max_steps_start"
        raise ValueError(
            f"{key}: model {cfg.model!r} has no DEQ layer to schedule; use a DEQ model (e.g. "
            f"conv_deq) or drop --{key.replace('_', '-')}.")
    if cfg.adjoint_cache and cfg.adjoint != "implicit":
        raise ValueError(
            f"adjoint_cache: --adjoint-cache starts the implicit backward solve; adjoint "
            f"{cfg.adjoint!r} has none. Use --adjoint implicit or drop --adjoint-cache.")
    return splits, model, device


def _open_run(cfg: TrainConfig, env: dd.DistEnv, lock: RunLock | None, resume: bool,
              log: Log) -> dict[str, Any] | None:
    """Rank 0 locks and checks the run folder and reads the checkpoint; the other ranks
    receive it (no shared file system needed), and a failure on rank 0 is raised on all."""
    if not env.enabled:
        return ck.prepare_run_dir(cfg.run_dir(), cfg.to_dict(), _DEFAULTS, resume, lock, log)
    ckpt, err = None, None
    if env.is_main:
        try:
            ckpt = ck.prepare_run_dir(cfg.run_dir(), cfg.to_dict(), _DEFAULTS, resume, lock,
                                      log)
        except (ValueError, RunError) as e:
            err = (type(e) is RunError, str(e))
    ckpt, err = env.broadcast_object((ckpt, err))
    if err is not None:
        raise (RunError if err[0] else ValueError)(err[1])
    return ckpt


def _assemble(cfg: TrainConfig, env: dd.DistEnv, splits: Any, model: nn.Module,
              device: torch.device, log: Log) -> _Run:
    """Optimiser, schedule, scaler, weight average, warm-start cache: a fresh run."""
    opt = setup.make_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay)
    steps = len(dd.GlobalBatchSampler(len(splits.train), cfg.batch_size, 0, 1, shuffle=False))
    sched = setup.make_schedule(opt, cfg.schedule, steps * cfg.epochs)
    from deqkit.nn import FixedPointCache

    warm_cache = FixedPointCache(len(splits.train), keep_unfinished=cfg.warm_start_unfinished) \
        if cfg.warm_start else None
    adjoint_cache = FixedPointCache(len(splits.train)) if cfg.adjoint_cache else None
    metrics = RunMetrics(cfg.run_dir(), tensorboard=cfg.tensorboard, enabled=env.is_main)
    return _Run(cfg, env, splits, model, device, opt, sched,
                setup.make_scaler(device, cfg.precision),
                WeightEMA(model, cfg.ema) if cfg.ema > 0 else None, warm_cache, adjoint_cache,
                FitState(),
                metrics, log)


def _resume(run: _Run, ckpt: dict[str, Any]) -> None:
    """Load the checkpoint's states into ``run`` and bring rank 0's files to the state after
    its last finished epoch, as an uninterrupted run left them."""
    path = os.path.join(run.run_dir, ck.CHECKPOINT)
    parts: dict[str, Any] = {"model": run.model, "optimizer": run.opt, "scheduler": run.sched}
    if run.ema is not None:
        parts["ema"] = run.ema
    if "scaler" in ckpt:
        parts["scaler"] = run.scaler
    ck.restore(ckpt, path, parts)
    for key, cache in (("warm_start", run.warm_cache), ("adjoint_cache", run.adjoint_cache)):
        if cache is not None and ckpt.get(key) is not None:
            cache.load_state_dict(ckpt[key])
    done = int(ckpt["epoch"])
    run.state = FitState(done, run.sched.last_epoch, list(ckpt["history"])[:done],
                         float(ckpt.get("train_time", 0.0)),
                         float(ckpt.get("train_cpu_time", 0.0)))
    run.best = ck.best_of(ckpt)
    if run.env.is_main:
        run.best = ck.repair_best(run.run_dir, ckpt, run.log)
        rewrite_metrics(run.metrics.path, run.state.history)
    planned = int(ckpt["config"].get("epochs", run.cfg.epochs))
    if done >= run.cfg.epochs:
        run.log(f"{run.run_dir} is finished ({done} epochs); nothing to train. To train it "
                f"longer: deqkit train --out {run.run_dir} --resume --epochs N (N > {done}).")
    elif planned != run.cfg.epochs:
        _extend(run, done, planned)
    else:
        run.log(f"resuming {run.run_dir} after epoch {done}")


def _extend(run: _Run, done: int, planned: int) -> None:
    """A resumed run with a new ``epochs``: re-plan the schedule and record the new total."""
    cfg = run.cfg
    if cfg.schedule == "cosine":
        rates = setup.replan_schedule(run.opt, run.sched)
        run.log(f"extending {run.run_dir} from {planned} to {cfg.epochs} epochs after epoch "
                f"{done}: the cosine schedule is re-planned over {cfg.epochs} epochs from the "
                f"current step {run.sched.last_epoch} (learning rate now {rates[0]:.3g}); epochs "
                f"1-{done} followed the {planned}-epoch cosine, so this is not the same as a "
                f"{cfg.epochs}-epoch run from scratch")
    else:
        run.log(f"extending {run.run_dir} from {planned} to {cfg.epochs} epochs after epoch "
                f"{done} (constant schedule: the same as a {cfg.epochs}-epoch run)")
    if run.env.is_main:
        ck.write_config(run.run_dir, cfg.to_dict())


def _start_files(run: _Run) -> None:
    """Rank 0, a fresh run: no old metrics, the config first."""
    if not run.env.is_main:
        return
    if os.path.exists(run.metrics.path):
        try:
            os.remove(run.metrics.path)
        except OSError as err:
            raise RunError(os_error_message(run.metrics.path, err)) from None
    ck.write_config(run.run_dir, run.cfg.to_dict())


def _on_step(run: _Run) -> Callable[[StepInfo], None]:
    """The ``log_every`` records (the global batch's loss and statistics under DDP)."""
    every, env = run.cfg.log_every, run.env

    def on_step(info: StepInfo) -> None:
        if not every or info.step % every:
            return
        loss, st = info.loss, info.stats
        if env.enabled:
            t = env.all_reduce(torch.tensor([loss * info.n, float(info.n)],
                                            dtype=torch.float64))
            loss = float(t[0] / t[1])
            st = dd.reduce_batch_stats(env, [st], [info.n])[0]
        run.metrics.write({"epoch": info.epoch + 1, "step": info.step, "loss": loss, **st},
                          global_step=info.global_step)

    return on_step


def _on_epoch(run: _Run) -> Callable[[dict[str, Any], FitState], None]:
    """Rank 0 after each epoch: the record, last.pt (the commit: an epoch counts once it is
    in last.pt), then best.pt. A kill before last.pt redoes the epoch on resume (its record
    is dropped); a kill between last.pt and best.pt leaves last.pt holding the best state,
    from which the resume rewrites best.pt (:func:`~.checkpoint.repair_best`)."""

    def on_epoch(record: dict[str, Any], state: FitState) -> None:
        improved = record["val_acc"] > run.best[0]
        if improved:
            run.best = (record["val_acc"], record["epoch"])
        if not run.env.is_main:
            return
        run.metrics.write(record)
        ckpt = {"config": run.cfg.to_dict(), "model": run.model.state_dict(),
                "optimizer": run.opt.state_dict(), "scheduler": run.sched.state_dict(),
                "epoch": state.epoch, "history": state.history, "train_time": state.train_time,
                "train_cpu_time": state.train_cpu_time, "best_val": run.best[0],
                "best_epoch": run.best[1], "scaler": run.scaler.state_dict()}
        if run.ema is not None:
            ckpt["ema"] = run.ema.state_dict()
        best = dict(ckpt)
        for key, cache in (("warm_start", run.warm_cache), ("adjoint_cache", run.adjoint_cache)):
            if cache is not None:  # in last.pt only: what --resume needs to be exact
                ckpt[key] = cache.state_dict()
        ck.save_checkpoint(ckpt, os.path.join(run.run_dir, ck.CHECKPOINT))
        if improved:
            ck.save_checkpoint(best, os.path.join(run.run_dir, ck.BEST))

    return on_epoch


def deq_schedule(cfg: TrainConfig, n_train: int) -> Any:
    """The :class:`~deqkit.nn.DEQSchedule` of ``--unroll-warmup``, ``--unroll-depth`` and
    ``--max-steps-start`` over the run's optimiser steps (None when neither is set)."""
    if not cfg.unroll_warmup and cfg.max_steps_start is None:
        return None
    from deqkit.nn import DEQSchedule

    per_epoch = len(dd.GlobalBatchSampler(n_train, cfg.batch_size, 0, 1, shuffle=False))
    return DEQSchedule(total_steps=per_epoch * cfg.epochs,
                       unroll_steps=round(cfg.unroll_warmup * per_epoch),
                       unroll_depth=cfg.unroll_depth, budget_start=cfg.max_steps_start,
                       budget_end=cfg.max_steps if cfg.max_steps_start is not None else None)


def _fit(run: _Run, stop_after: int | None) -> None:
    cfg = run.cfg
    opts = StepOptions(cfg.precision, cfg.grad_clip, cfg.jac_reg, cfg.jac_reg_freq,
                       0 if run.text else cfg.augment_shift)
    try:
        fit(run.model, run.splits.train, epochs=cfg.epochs, batch_size=cfg.batch_size,
            optimizer=run.opt, scheduler=run.sched, loss_fn=cross_entropy(cfg.label_smoothing),
            val_data=run.splits.val, text=run.text, options=opts, ema=run.ema,
            scaler=run.scaler, seed=cfg.seed, env=run.env, state=run.state,
            stop_after=stop_after, warm_cache=run.warm_cache,
            adjoint_cache=run.adjoint_cache,
            schedule=deq_schedule(cfg, len(run.splits.train)), on_step=_on_step(run),
            on_epoch=_on_epoch(run), progress=cfg.progress, log=run.log)
    except TrainingDiverged as err:
        raise TrainingDiverged(_diverged_message(err, cfg), err.loss, err.epoch,
                               err.step) from None


def _diverged_message(err: TrainingDiverged, cfg: TrainConfig) -> str:
    """What a non-finite loss at (0-based) ``epoch``, 1-based ``step`` means and what to do."""
    path = os.path.join(cfg.run_dir(), ck.CHECKPOINT)
    good = (f"the last good checkpoint is {path!r} (epoch {err.epoch}; `deqkit eval` scores "
            "it, but resuming it unchanged diverges the same way)" if err.epoch else
            "no epoch finished, so no checkpoint was written")
    return (f"the training loss became {err.loss} at epoch {err.epoch + 1}, step {err.step}: "
            f"the run diverged and was stopped; {good}. Start a new run (another --out) with "
            f"a lower --lr (now {cfg.lr:g}), a tighter forward solve (--rtol below "
            f"{cfg.rtol:g}, more --max-steps than {cfg.max_steps}) or Jacobian regularisation "
            "(--jac-reg 0.5).")


def _finish(run: _Run, n_params: int) -> dict[str, Any]:
    """Test metrics, summary.json and plots (at the end only: never inside the epochs)."""
    cfg, state = run.cfg, run.state
    done = state.epoch >= cfg.epochs
    summary: dict[str, Any] = {"run_dir": run.run_dir, "epochs": state.epoch,
                               "train_time": state.train_time,
                               "train_cpu_time": state.train_cpu_time, "complete": done,
                               "parameters": n_params}
    if done:
        with averaged(run.ema, run.model):
            test = evaluate(run.model, run.splits.test, cfg.batch_size, run.text, env=run.env,
                            precision=cfg.precision)
        summary.update({f"test_{k}": v for k, v in test.items()})
        if state.history:
            summary["final_val_acc"] = state.history[-1]["val_acc"]
        if run.env.is_main:
            write_file(os.path.join(run.run_dir, "summary.json"),
                       json.dumps(summary, indent=2).encode())
    if cfg.plots and run.env.is_main:
        plot_history(state.history, run.run_dir)
        if done:
            with averaged(run.ema, run.model):
                plot_residual_traces(run.model, run.splits.test, run.run_dir)
    if done:
        run.log(summary_table(summary))
    return summary


def _train(cfg: TrainConfig, env: dd.DistEnv, lock: RunLock | None, *, resume: bool,
           stop_after: int | None, log: Log) -> dict[str, Any]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    splits, model, device = _build(cfg, env, log)
    ckpt = _open_run(cfg, env, lock, resume, log)
    run = _assemble(cfg, env, splits, model, device, log)
    try:
        if ckpt is not None:
            _resume(run, ckpt)
        else:
            _start_files(run)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"{cfg.model} on {cfg.data}: {n_params:,} parameters, {len(splits.train)} train / "
            f"{len(splits.val)} val / {len(splits.test)} test, {cfg.epochs} epochs -> "
            f"{run.run_dir}" + (f" ({env.world_size} processes, {env.backend}, "
                                f"{cfg.batch_size // env.world_size} samples per process "
                                "per step)" if env.enabled else ""))
        if run.state.epoch < cfg.epochs:
            _fit(run, stop_after)
        return _finish(run, n_params)
    finally:
        run.metrics.close()


__all__ = ["train"]
