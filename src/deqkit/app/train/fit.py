"""The training loop: epochs of :func:`~deqkit.app.train.step.train_step`, evaluations, records.

``fit`` serves ``deqkit train`` (through callbacks that write the run folder), ``deqkit
compare`` and the benchmarks (in memory). Its batches and seeds depend only on ``seed`` and
the epoch, so a run continued from a :class:`FitState` is the run that never stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from . import distributed as dd
from .ema import WeightEMA, averaged
from .evaluate import (
    LossFn,
    backward_failures,
    combine_stats,
    cross_entropy,
    evaluate,
    model_device,
    solver_stats,
)
from .step import StepOptions, Trainer, TrainingDiverged, train_step


@dataclasses.dataclass
class FitState:
    """Where a fit stands: finished ``epoch`` s, optimiser ``step`` s, their records and
    cumulative training times (wall and process CPU seconds, evaluation excluded)."""

    epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    train_time: float = 0.0
    train_cpu_time: float = 0.0


@dataclasses.dataclass
class StepInfo:
    """What an ``on_step`` callback sees after every optimiser step."""

    epoch: int  # 0-based
    step: int  # 1-based, within the epoch
    global_step: int
    loss: float
    n: int  # targets in this rank's batch
    stats: dict[str, float]
    seconds: float  # the step's wall time (forward, backward, update)


@dataclasses.dataclass
class FitResult:
    """``history``: one record per finished epoch; ``evals``: the mid-epoch evaluations of
    ``evals_per_epoch``; ``step_times``: wall seconds of every step; ``stopped``: an
    ``on_step`` callback ended the fit."""

    state: FitState
    history: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    step_times: list[float]
    stopped: bool = False


@dataclasses.dataclass
class _Loop:
    """The fixed parts of one fit, shared by its epochs."""

    trainer: Trainer
    train_data: Any
    val_data: Any
    batch_size: int
    epochs: int
    seed: int
    env: dd.DistEnv
    device: torch.device
    text: bool
    sampler: dd.GlobalBatchSampler
    evals_per_epoch: int
    warm_cache: Any
    adjoint_cache: Any
    schedule: Any  # a dk.nn.DEQSchedule of the model's `deq` layer, or None
    on_step: Callable[[StepInfo], Any] | None
    progress: bool
    log: Callable[[str], Any]


def _epoch_batches(loop: _Loop, epoch: int) -> tuple[Iterator[Any], torch.Generator | None]:
    """This rank's batches ``(x, y, global batch size, sample ids)`` of ``epoch`` and the
    generator deciding the Jacobian regulariser (None: torch's global RNG)."""
    env, seed = loop.env, loop.seed
    loop.sampler.set_epoch(epoch)
    coin = None
    if env.enabled:
        # augmentation, dropout masks, Hutchinson probes: independent per rank (rank 0
        # draws what a single process would); whether the Jacobian regulariser is used in
        # a step is drawn from a generator shared by all ranks, so they agree.
        torch.manual_seed(seed * 100_019 + epoch + 1_000_003 * env.rank)
        coin = torch.Generator().manual_seed(seed * 100_043 + epoch)
    else:
        torch.manual_seed(seed * 100_019 + epoch)
    batches = ((dd.fetch(loop.train_data, idx), m, torch.tensor(idx, dtype=torch.long))
               for idx, m in loop.sampler.batches())
    return batches, coin


def _progress(iterable: Iterable[Any], total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar on a terminal's stderr; the plain iterable otherwise."""
    if enabled and sys.stderr.isatty():
        try:
            from tqdm.auto import tqdm

            return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True,
                        file=sys.stderr)
        except ModuleNotFoundError:
            pass
    return iterable


def _mid_eval(loop: _Loop, epoch: int, j: int, n_steps: int, state: FitState,
              step_time: float, loss: float) -> dict[str, Any] | None:
    """The mid-epoch evaluation after step ``j`` (0-based) when one is due."""
    every = max(1, n_steps // max(1, loop.evals_per_epoch))
    if loop.val_data is None or (j + 1) % every or j + 1 >= n_steps:
        return None
    with averaged(loop.trainer.ema, loop.trainer.core):
        val = evaluate(loop.trainer.core, loop.val_data, loop.batch_size, loop.text,
                       env=loop.env, precision=loop.trainer.options.precision,
                       loss_fn=loop.trainer.loss_fn)
    loop.trainer.model.train()
    return {"epoch": epoch + (j + 1) / n_steps, "step": state.step, "time": step_time,
            "loss": loss, **{f"val_{k}": v for k, v in val.items()}}


def _one_step(loop: _Loop, x: Any, y: Any, m: int, ids: Any, coin: Any,
              step: int) -> tuple[float, int]:
    """Training step ``step`` (global, 0-based) of this rank's chunk (DDP: weighted by its
    share of a short batch), the DEQ solved as the schedule says."""
    tr, env = loop.trainer, loop.env
    share = 1.0
    if env.enabled and m != loop.batch_size:
        # DDP averages the ranks' gradients with equal weights: weight each rank's mean by
        # its share of a short last batch so the result is the global mean.
        share = env.world_size * x.shape[0] / m
    return train_step(tr, x, y, device=loop.device, coin=coin, share=share,
                      context=solve_context(getattr(tr.core, "deq", None), ids, step,
                                            schedule=loop.schedule,
                                            warm_cache=loop.warm_cache,
                                            adjoint_cache=loop.adjoint_cache))


@contextlib.contextmanager
def solve_context(deq: Any, ids: Any, step: int, *, schedule: Any = None,
                  warm_cache: Any = None, adjoint_cache: Any = None) -> Iterator[None]:
    """Around a training forward pass of a model whose DEQ layer is ``deq``: the settings
    ``schedule`` (a :class:`~deqkit.nn.DEQSchedule`, or None) gives optimiser step ``step``,
    then the warm starts of the samples ``ids`` from ``warm_cache``/``adjoint_cache``
    (skipped in the unrolled warm-up, which starts from the initial state and whose iterates
    are no equilibria to store)."""
    with contextlib.ExitStack() as stack:
        if schedule is not None:
            stack.enter_context(schedule.apply(deq, step))
        caches = warm_cache is not None or adjoint_cache is not None
        if caches and not (schedule is not None and schedule.unrolled(step)):
            stack.enter_context(deq.warm_start(warm_cache, ids, adjoint_cache=adjoint_cache))
        yield


@dataclasses.dataclass
class _Totals:
    """One epoch's sums on this rank (then, after :meth:`reduce`, over all ranks)."""

    loss: float = 0.0  # sum of the per-step mean losses weighted by their targets
    correct: int = 0
    seen: int = 0
    bwd_failed: int = 0  # samples with an unconverged backward solve
    bwd_failed_steps: int = 0
    rows: list[dict[str, float]] = dataclasses.field(default_factory=list)
    counts: list[int] = dataclasses.field(default_factory=list)
    eval_time: float = 0.0  # mid-epoch evaluations, left out of the epoch's time
    stopped: bool = False

    def add(self, loss: float, correct: int, n: int, failed: int,
            stats: dict[str, float]) -> None:
        self.loss += loss * n
        self.correct += correct
        self.seen += n
        self.bwd_failed += failed
        self.bwd_failed_steps += failed > 0
        self.rows.append(stats)
        self.counts.append(n)

    def reduce(self, env: dd.DistEnv) -> None:
        """Sums over the ranks; per-step statistics of the global batches."""
        if not env.enabled:
            return
        t = env.all_reduce(torch.tensor([self.loss, self.correct, self.seen, self.bwd_failed,
                                         self.bwd_failed_steps], dtype=torch.float64))
        self.loss = float(t[0])
        self.correct, self.seen, self.bwd_failed, self.bwd_failed_steps = (
            round(float(v)) for v in t[1:])
        self.rows = dd.reduce_batch_stats(env, self.rows, self.counts)


def _step_stats(loop: _Loop) -> dict[str, float]:
    st = solver_stats(loop.trainer.core)
    if loop.env.enabled and "bwd_residual" in st:
        # the rank's loss is a mean over its chunk, world_size times the global mean's
        # share, and the backward residual is absolute: report it on the global scale
        st["bwd_residual"] /= loop.env.world_size
    return st


def _run_epoch(loop: _Loop, epoch: int, state: FitState, result: FitResult) -> _Totals:
    """Train one epoch (with its mid-epoch evaluations); this rank's totals."""
    batches, coin = _epoch_batches(loop, epoch)
    n_steps = len(loop.sampler)
    tot, step_time = _Totals(), sum(result.step_times)
    loop.trainer.model.train()
    bar = _progress(batches, n_steps, f"epoch {epoch + 1}/{loop.epochs}", loop.progress)
    for j, ((x, y), m, ids) in enumerate(bar):
        t0 = time.perf_counter()
        try:
            loss, correct = _one_step(loop, x, y, m, ids, coin, state.step)
        except TrainingDiverged as err:
            err.epoch, err.step = epoch, j + 1
            raise
        dt = time.perf_counter() - t0
        result.step_times.append(dt)
        step_time += dt
        state.step += 1
        st = _step_stats(loop)
        tot.add(loss, correct, y.numel(), backward_failures(loop.trainer.core), st)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{tot.loss / tot.seen:.3f}")
        if loop.on_step is not None and loop.on_step(
                StepInfo(epoch, j + 1, state.step, loss, y.numel(), st, dt)):
            tot.stopped = True
            return tot
        t1 = time.perf_counter()
        rec = _mid_eval(loop, epoch, j, n_steps, state, step_time, loss)
        if rec is not None:
            result.evals.append(rec)
            tot.eval_time += time.perf_counter() - t1
    return tot


def _epoch_record(loop: _Loop, epoch: int, tot: _Totals, times: tuple[float, float],
                  state: FitState) -> dict[str, Any]:
    """Reduce the epoch's totals over the ranks, validate, and build its record."""
    env = loop.env
    epoch_time, epoch_cpu = times
    tot.reduce(env)
    if env.enabled:  # the slowest rank's times, the same on every rank
        t = env.all_reduce(torch.tensor([epoch_time, epoch_cpu], dtype=torch.float64), "max")
        epoch_time, epoch_cpu = float(t[0]), float(t[1])
    state.train_time += epoch_time
    state.train_cpu_time += epoch_cpu
    train = {"loss": tot.loss / tot.seen, "acc": tot.correct / tot.seen,
             **combine_stats(tot.rows)}
    val: dict[str, float] = {}
    if loop.val_data is not None:
        with averaged(loop.trainer.ema, loop.trainer.core):
            val = evaluate(loop.trainer.core, loop.val_data, loop.batch_size, loop.text,
                           env=env, precision=loop.trainer.options.precision,
                           loss_fn=loop.trainer.loss_fn)
    return {"epoch": epoch + 1, "time": epoch_time, "train_time": state.train_time,
            "cpu_time": epoch_cpu, "train_cpu_time": state.train_cpu_time,
            **{f"train_{k}": v for k, v in train.items()},
            **{f"val_{k}": v for k, v in val.items()}}


def _epoch_line(record: dict[str, Any], tot: _Totals) -> str:
    line = (f"epoch {record['epoch']:3d}  loss {record['train_loss']:.4f}  "
            f"train acc {record['train_acc']:.4f}")
    if "val_acc" in record:
        line += f"  val acc {record['val_acc']:.4f}"
    if "train_fwd_steps" in record:
        line += (f"  steps {record['train_fwd_steps']:.1f}  "
                 f"res {record['train_fwd_rel_res']:.1e}")
    if tot.bwd_failed:
        line += (f"  bwd not converged: {tot.bwd_failed} samples in "
                 f"{tot.bwd_failed_steps} steps")
    return line + f"  ({record['time']:.1f}s)"


def fit(model: nn.Module, train_data: Any, *, epochs: int, batch_size: int,
        optimizer: torch.optim.Optimizer | None = None, lr: float = 1e-3,
        scheduler: Any = None, loss_fn: LossFn | None = None, val_data: Any = None,
        text: bool = False, options: StepOptions | None = None, ema: WeightEMA | None = None,
        scaler: Any = None, seed: int = 0, env: dd.DistEnv | None = None,
        state: FitState | None = None, stop_after: int | None = None,
        evals_per_epoch: int = 1, drop_last: bool = False, warm_cache: Any = None,
        adjoint_cache: Any = None, schedule: Any = None,
        on_step: Callable[[StepInfo], Any] | None = None,
        on_epoch: Callable[[dict[str, Any], FitState], Any] | None = None,
        progress: bool = False, log: Callable[[str], Any] | None = None) -> FitResult:
    """Train ``model`` on ``train_data`` for ``epochs`` epochs of ``batch_size`` samples.

    Epoch ``e`` shuffles with ``Generator().manual_seed(seed * 100_003 + e)`` and seeds the
    global RNG with ``seed * 100_019 + e``, so continuing from ``state`` (its ``epoch``,
    ``step``, ``history`` and times, with the optimiser, scheduler and EMA restored) gives the
    run that never stopped. After each epoch the model (with ``ema``'s average applied) is
    evaluated on ``val_data`` (if given), the record is logged, appended to the history and
    passed to ``on_epoch(record, state)`` (checkpointing). ``on_step(info)`` runs after every
    step; a true return value ends the fit (a time budget). ``evals_per_epoch > 1`` adds
    evaluations within each epoch (``FitResult.evals``; ``time`` there is the sum of the
    step times so far). ``scheduler`` steps once per optimiser step. ``optimizer`` defaults
    to AdamW at ``lr``, ``loss_fn`` to cross-entropy (see :data:`LossFn`); ``text`` adds bits
    per target to the evaluations. ``env`` (:func:`~deqkit.app.train.distributed.detect`)
    makes it data parallel: each rank trains on its chunk of every global batch.
    ``warm_cache``/``adjoint_cache`` (:class:`~deqkit.nn.FixedPointCache`, sized to the
    training set) warm-start the model's ``deq`` layer's forward/backward solves by sample
    (:meth:`~deqkit.nn.DEQ.warm_start`). ``schedule`` (a :class:`~deqkit.nn.DEQSchedule`
    over the run's steps) solves that layer as the schedule says at each optimiser step
    (unrolled warm-up, growing budget); warm starts are skipped in the unrolled steps.

    Example:
        >>> import torch
        >>> data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.arange(32) % 2)
        >>> res = fit(torch.nn.Linear(4, 2), data, epochs=2, batch_size=8, val_data=data,
        ...           log=lambda s: None)
        >>> [r["epoch"] for r in res.history], res.state.step, len(res.step_times)
        ([1, 2], 8, 8)
    """
    env = env or dd.DistEnv()
    state = state or FitState()
    core = dd.unwrap(model)
    sampler = dd.GlobalBatchSampler(len(train_data), batch_size, env.rank, env.world_size,
                                    shuffle=True, base_seed=seed * 100_003, drop_last=drop_last)
    if env.enabled:
        sampler.check_nonempty("training set")
    trainer = Trainer(dd.wrap_model(core, env),
                      optimizer or torch.optim.AdamW(core.parameters(), lr=lr), scheduler,
                      scaler, loss_fn or cross_entropy(),
                      ema, options or StepOptions(), core)
    loop = _Loop(trainer, train_data, val_data, batch_size, epochs, seed, env,
                 env.device if env.enabled else model_device(core), text, sampler,
                 evals_per_epoch, warm_cache, adjoint_cache, schedule, on_step,
                 progress and env.is_main,
                 log or (lambda *_: None))
    result = FitResult(state, state.history, [], [])
    last = epochs if stop_after is None else min(epochs, state.epoch + stop_after)
    for epoch in range(state.epoch, last):
        t0, c0 = time.perf_counter(), time.process_time()
        tot = _run_epoch(loop, epoch, state, result)
        if tot.stopped:
            result.stopped = True
            break
        times = (time.perf_counter() - t0 - tot.eval_time, time.process_time() - c0)
        record = _epoch_record(loop, epoch, tot, times, state)
        state.history.append(record)
        state.epoch = epoch + 1
        loop.log(_epoch_line(record, tot))
        if on_epoch is not None:
            on_epoch(record, state)
        env.barrier()  # the checkpoint of this epoch is on disk before any rank goes on
    return result


__all__ = ["FitResult", "FitState", "StepInfo", "fit", "solve_context"]
