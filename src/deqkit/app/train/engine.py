"""``deqkit train`` and ``deqkit eval``: training loop, metrics, checkpoints, resume."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
import sys
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..config import TrainConfig, from_mapping, resolve_device, validate
from ..files import (
    FAULTS,
    RunError,
    RunLock,
    clean_temp_files,
    os_error_message,
    rewrite_metrics,
    write_file,
)

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)
             if f.default is not dataclasses.MISSING}

CHECKPOINT = "last.pt"
BEST = "best.pt"
CONFIG = "config.json"
# what --resume needs from last.pt besides load_checkpoint's config, model and epoch
RESUME_KEYS = ("optimizer", "scheduler", "history")


class TrainingDiverged(RunError):
    """The training loss became NaN or infinite; the run stopped before saving it."""


# ----------------------------------------------------------------------------- building


def build_model(cfg: TrainConfig, spec: Any) -> nn.Module:
    """Instantiate ``cfg.model`` for the data ``spec``; DEQ models get the solver and adjoint."""
    from ... import zoo

    if cfg.model not in zoo.MODELS:
        raise ValueError(f"unknown model {cfg.model!r}; choose one of {sorted(zoo.MODELS)}.")
    ctor = zoo.MODELS[cfg.model]
    params = inspect.signature(ctor).parameters
    kwargs: dict[str, Any] = dict(cfg.model_args)
    extra = {
        "solver": cfg.build_solver(),
        "adjoint": cfg.build_adjoint(),
        "max_steps": cfg.max_steps,
        "eval_max_steps": cfg.eval_max_steps,
    }
    for key, value in extra.items():
        if key in params and key not in kwargs:
            kwargs[key] = value
    if spec.kind == "text":
        for key, value in (("vocab_size", spec.num_classes), ("block_size", spec.input_shape[0])):
            if key in params and key not in kwargs:
                kwargs[key] = value
    try:
        if spec.kind == "text":
            return ctor(**kwargs)
        return zoo.build_model(cfg.model, spec.input_shape, spec.num_classes, **kwargs)
    except TypeError as err:  # an unknown or mistyped --model-arg
        raise ValueError(f"model {cfg.model!r}: bad model_args {cfg.model_args}: {err}") \
            from None


def solver_stats(model: nn.Module) -> dict[str, float]:
    """Forward/backward statistics of the model's DEQ layer(s) from the last call."""
    out: dict[str, float] = {}
    deq = getattr(model, "deq", None)
    sol = getattr(deq, "last_solution", None)
    if sol is None:
        return out
    st = sol.stats
    out["fwd_steps"] = float(st["nstep"].float().mean())
    out["fwd_steps_max"] = float(st["nstep"].max())
    out["fwd_rel_res"] = float(st["rel_residual"].float().nan_to_num(0).mean())
    out["fwd_converged"] = float(st["converged"].float().mean())
    out["nfev"] = float(st["nfev"])
    if sol.backward:
        bwd = sol.backward
        # a float16 step whose scaled gradient overflowed: the scaler skips it; no solve ran
        overflow = _overflow_mask(bwd, bwd["nstep"].numel(), bwd["nstep"].device)
        out["bwd_overflow"] = float(overflow.float().mean())
        out["bwd_steps"] = float(bwd["nstep"].float().mean())
        res = bwd["residual"].float().reshape(-1)
        res = res[~overflow] if res.numel() == overflow.numel() else res
        out["bwd_residual"] = float(res.mean()) if res.numel() else 0.0
        out["bwd_converged"] = float(bwd["converged"].float().mean())
    return out


def _overflow_mask(backward: dict[str, Any], n: int, device: torch.device) -> Tensor:
    """Per-sample mask of ``backward["nonfinite_grad"]`` (a bool for the whole batch or a
    per-sample bool tensor): samples whose incoming gradient was not finite, so no solve ran."""
    flag = backward.get("nonfinite_grad", False)
    if isinstance(flag, Tensor) and flag.numel() == n:
        return flag.reshape(n).to(device=device, dtype=torch.bool)
    return torch.full((n,), bool(flag), dtype=torch.bool, device=device)


def backward_failures(model: nn.Module) -> int:
    """Samples of the model's last step whose implicit backward solve did not converge.

    0 when no backward solve ran (no DEQ, an adjoint without a linear solve); samples whose
    incoming gradient overflowed (a skipped float16 step) do not count.
    """
    sol = getattr(getattr(model, "deq", None), "last_solution", None)
    bwd = getattr(sol, "backward", None)
    if not bwd or not isinstance(bwd.get("converged"), Tensor):
        return 0
    conv = bwd["converged"].reshape(-1).bool()
    failed = ~conv & ~_overflow_mask(bwd, conv.numel(), conv.device)
    return int(failed.sum())


def random_shift(x: Tensor, max_shift: int) -> Tensor:
    """Data augmentation: roll each sample's last axis (and the second last for images) by a
    random integer in ``[-max_shift, max_shift]`` (torch's global RNG, seeded per epoch)."""
    if max_shift <= 0 or x.dim() < 3:
        return x
    b = x.shape[0]
    dims = [x.dim() - 1] if x.dim() == 3 else [x.dim() - 2, x.dim() - 1]
    for d in dims:
        n = x.shape[d]
        shift = torch.randint(-max_shift, max_shift + 1, (b,))
        idx = (torch.arange(n).unsqueeze(0) - shift.unsqueeze(1)) % n  # (B, n)
        shape = [b] + [1] * (x.dim() - 1)
        shape[d] = n
        x = torch.gather(x, d, idx.view(shape).expand_as(x))
    return x


def autocast(device: torch.device, precision: str) -> Any:
    """The autocast context of a config's ``precision`` (``fp32``: none) on ``device``.

    The DEQ's solver keeps its state and residual norms in float32 under autocast
    (see :func:`deqkit.fixed_point`); only the cell's matmuls/convolutions run in low precision.
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _loss_and_correct(out: Tensor, y: Tensor, text: bool, smoothing: float) -> tuple[Tensor, int]:
    if text:
        out = out.reshape(-1, out.shape[-1])
        y = y.reshape(-1)
    loss = nn.functional.cross_entropy(out, y, label_smoothing=smoothing)
    correct = int((out.argmax(-1) == y).sum())
    return loss, correct


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Any, batch_size: int, text: bool,
             env: Any = None, precision: str = "fp32") -> dict[str, float]:
    """Loss, accuracy (and bpc for text) and mean per-batch solver statistics on ``dataset``.

    With a distributed ``env`` (``deqkit.app.train.distributed.DistEnv``) every rank evaluates its
    chunk of each batch of ``batch_size`` and the numbers are reduced over the ranks; the
    result (on every rank) is that of one process evaluating the whole set.
    """
    if len(dataset) == 0:
        raise ValueError("cannot evaluate an empty split (0 samples): accuracy and loss are "
                         "undefined; give the data a non-empty validation and test split.")
    if env is not None and env.enabled:
        return _evaluate_distributed(model, dataset, batch_size, text, env, precision)
    model.eval()
    device = _model_device(model)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    total, loss_sum, correct = 0, 0.0, 0
    agg: dict[str, float] = {}
    nb = 0
    for x, y in loader:
        loss, c, n = _eval_batch(model, x, y, device, text, precision)
        loss_sum += loss * n
        correct += c
        total += n
        for k, v in solver_stats(model).items():
            agg[k] = agg.get(k, 0.0) + v
        nb += 1
    res = {"loss": loss_sum / max(total, 1), "acc": correct / max(total, 1)}
    if text:
        res["bpc"] = res["loss"] / math.log(2)
    for k, v in agg.items():
        res[k] = v / nb
    return res


def _eval_batch(model: nn.Module, x: Tensor, y: Tensor, device: torch.device, text: bool,
                precision: str) -> tuple[float, int, int]:
    """Mean loss, correct predictions and number of targets of one evaluation batch."""
    x, y = x.to(device), y.to(device)
    with autocast(device, precision):
        out = model(x)
    loss, c = _loss_and_correct(out.float(), y, text, 0.0)
    return float(loss), c, y.numel()


def _evaluate_distributed(model: nn.Module, dataset: Any, batch_size: int, text: bool,
                          env: Any, precision: str = "fp32") -> dict[str, float]:
    from . import distributed as dd

    model = dd.unwrap(model)
    model.eval()
    sampler = dd.GlobalBatchSampler(len(dataset), batch_size, env.rank, env.world_size,
                                    shuffle=False)
    total, loss_sum, correct = 0, 0.0, 0
    rows: list[dict[str, float]] = []
    counts: list[int] = []
    for idx, _ in sampler.batches():
        if not idx:  # a short last batch with fewer samples than ranks
            rows.append({})
            counts.append(0)
            continue
        x, y = dd.fetch(dataset, idx)
        loss, c, n = _eval_batch(model, x, y, env.device, text, precision)
        loss_sum += loss * n
        correct += c
        total += n
        rows.append(solver_stats(model))
        counts.append(n)
    tot = env.all_reduce(torch.tensor([loss_sum, float(correct), float(total)],
                                      dtype=torch.float64))
    loss_sum, correct, total = float(tot[0]), round(float(tot[1])), round(float(tot[2]))
    rows = dd.reduce_batch_stats(env, rows, counts)
    res = {"loss": loss_sum / max(total, 1), "acc": correct / max(total, 1)}
    if text:
        res["bpc"] = res["loss"] / math.log(2)
    agg: dict[str, float] = {}
    for row in rows:
        for k, v in row.items():
            agg[k] = agg.get(k, 0.0) + v
    for k, v in agg.items():
        res[k] = v / max(len(rows), 1)
    return res


# ----------------------------------------------------------------------------- weight EMA


class WeightEMA:
    r"""Exponential moving average of a model's floating-point parameters.

    After the ``t``-th :meth:`update` (one per optimiser step) the average is

    .. math:: \bar w_1 = w_1, \qquad \bar w_t = d\,\bar w_{t-1} + (1 - d)\,w_t,

    the rule of ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn(d)`` (whose
    update function is used here). Unlike ``AveragedModel`` no copy of the module is kept:
    only the averaged tensors, by parameter name, and :meth:`applied` swaps them into the
    model for evaluation. So buffers (dropout masks, spectral-norm vectors) stay the model's
    own, and the averaged tensors go into checkpoints as plain tensors
    (:meth:`state_dict`), which makes ``--resume`` continue the average exactly.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        from torch.optim.swa_utils import get_ema_multi_avg_fn

        self.decay = float(decay)
        self.names = [n for n, p in model.named_parameters() if p.is_floating_point()]
        self.params = {n: p.detach().clone() for n, p in model.named_parameters()
                       if n in self.names}
        self.n_averaged = 0
        self._avg = get_ema_multi_avg_fn(self.decay)

    def _model_params(self, model: nn.Module) -> list[Tensor]:
        named = dict(model.named_parameters())
        return [named[n].detach() for n in self.names]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current parameters into the average (the first call copies)."""
        current = self._model_params(model)
        avg = [self.params[n] for n in self.names]
        if self.n_averaged == 0:
            torch._foreach_copy_(avg, current)
        else:
            self._avg(avg, current, self.n_averaged)
        self.n_averaged += 1

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Any:
        """Within the block the model holds the averaged parameters (restored afterwards)."""
        if self.n_averaged == 0:
            yield model
            return
        current = self._model_params(model)
        saved = [p.clone() for p in current]
        with torch.no_grad():
            torch._foreach_copy_(current, [self.params[n] for n in self.names])
        try:
            yield model
        finally:
            with torch.no_grad():
                torch._foreach_copy_(current, saved)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "n_averaged": self.n_averaged,
                "params": {n: t.clone() for n, t in self.params.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.names) - set(state["params"])
        if missing:
            raise ValueError(f"the checkpoint's weight average lacks {sorted(missing)}.")
        with torch.no_grad():
            for n in self.names:
                self.params[n].copy_(state["params"][n])
        self.n_averaged = int(state["n_averaged"])


def _maybe_ema(ema: WeightEMA | None, model: nn.Module) -> Any:
    return ema.applied(model) if ema is not None else contextlib.nullcontext(model)


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(obj: Any, path: str) -> None:
    """``torch.save`` through :func:`~deqkit.app.files.write_file`: a kill never leaves a
    torn file."""
    write_file(path, lambda fh: torch.save(obj, fh))


def load_checkpoint(path: str) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``: tensors and plain containers only)."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"checkpoint {path!r} could not be loaded safely: {err}") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint {path!r} is not a deqkit checkpoint (not a dict).")
    for key in ("config", "model", "epoch"):
        if key not in ckpt:
            raise ValueError(f"checkpoint {path!r} is not a deqkit checkpoint (no {key!r}).")
    return ckpt


def _best_of(ckpt: dict[str, Any]) -> tuple[float, int]:
    """``(best validation accuracy, its epoch)`` recorded in ``last.pt`` (0: none yet).

    Checkpoints of older versions have no ``best_epoch``: the first epoch of the history
    that reached ``best_val``."""
    best_val = float(ckpt.get("best_val", -1.0))
    if "best_epoch" in ckpt:
        return best_val, int(ckpt["best_epoch"])
    hits = [int(h["epoch"]) for h in ckpt.get("history", []) if h.get("val_acc") == best_val]
    return best_val, (hits[0] if hits else 0)


def _repair_best(run_dir: str, ckpt: dict[str, Any], log: Any) -> tuple[float, int]:
    """Make ``best.pt`` agree with ``last.pt`` after an interruption; the best to track.

    ``last.pt`` is written first, then ``best.pt`` if the epoch is the new best. A kill in
    between leaves a ``best.pt`` behind (or none at all) while ``last.pt`` *is* the best
    state, so ``best.pt`` is rewritten from it, exactly as the uninterrupted run wrote it.
    """
    best_val, best_epoch = _best_of(ckpt)
    path = os.path.join(run_dir, BEST)
    try:
        have = int(load_checkpoint(path)["epoch"]) if os.path.exists(path) else None
    except ValueError:
        have = None
    if best_epoch == 0 or have == best_epoch:
        return best_val, best_epoch
    if best_epoch == int(ckpt["epoch"]):
        save_checkpoint({k: v for k, v in ckpt.items() if k != "warm_start"}, path)
        log(f"rewrote {path} from {CHECKPOINT} (epoch {best_epoch}): the run was interrupted "
            "before it was written")
        return best_val, best_epoch
    # a run of an older deqkit killed between writing last.pt and best.pt: those weights
    # are gone; best.pt goes on from the epoch it holds
    accs = {int(h["epoch"]): float(h["val_acc"]) for h in ckpt.get("history", [])}
    log(f"warning: {path} holds epoch {have} but the best validation accuracy "
        f"({best_val:.4f}) was reached at epoch {best_epoch}, whose weights were not saved; "
        "best.pt keeps the best of the epochs that were")
    if have is None or have not in accs:
        return -1.0, 0
    return accs[have], have


# ----------------------------------------------------------------------------- training


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool):  # type: ignore[no-untyped-def]
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True,
                        file=sys.stderr)
        except ModuleNotFoundError:
            pass
    return iterable


def train(cfg: TrainConfig, *, resume: bool = False, stop_after: int | None = None,
          log: Any = print) -> dict[str, Any]:
    """Train ``cfg`` into ``cfg.run_dir()``; returns the summary (also in summary.json).

    ``stop_after`` ends the run after that many epochs of this invocation (used to test
    resuming); a resumed run continues exactly: per-epoch seeds for shuffling and dropout,
    optimiser and schedule state restored from the checkpoint.

    Started by ``torchrun`` with ``WORLD_SIZE > 1`` the run is data parallel
    (``DistributedDataParallel``; see ``docs/distributed.md``): each rank trains on its chunk
    of every global batch of ``batch_size``, metrics are reduced over the ranks, and only
    rank 0 logs and writes files. Every rank returns the same summary.
    """
    from . import distributed as dd

    FAULTS.reset()
    env = dd.detect(cfg.device)
    lock = RunLock(cfg.run_dir()) if env.is_main else None  # taken in _prepare_run_dir
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


def _prepare_run_dir(cfg: TrainConfig, resume: bool, lock: RunLock,
                     log: Any) -> dict[str, Any] | None:
    """Rank 0: lock the run folder, remove the temporary files of interrupted writes, check
    the folder; the checkpoint to resume from (None: start at epoch 1)."""
    run_dir = cfg.run_dir()
    try:
        os.makedirs(run_dir, exist_ok=True)
        lock.acquire(log)
        removed = clean_temp_files(run_dir)
    except OSError as err:
        raise RunError(os_error_message(getattr(err, "filename", None) or run_dir, err)) \
            from None
    if removed:
        log(f"removed {len(removed)} temporary file(s) of interrupted writes: {removed}")
    ckpt_path = os.path.join(run_dir, CHECKPOINT)
    if not resume:
        if os.path.isfile(ckpt_path):
            raise ValueError(
                f"{run_dir!r} already holds a run ({CHECKPOINT}); pass --resume to continue it "
                "or choose another --out."
            )
        return None
    if not os.path.isfile(ckpt_path):
        config_path = os.path.join(run_dir, CONFIG)
        if not os.path.isfile(config_path):
            raise ValueError(f"--resume: {run_dir!r} holds no run to resume (no {CHECKPOINT}, "
                             f"no {CONFIG}); start it without --resume.")
        _check_same_config(read_run_config(run_dir), cfg, config_path)
        log(f"resuming {run_dir}: no epoch had finished, starting from epoch 1")
        return None
    ckpt = load_checkpoint(ckpt_path)
    missing = [k for k in RESUME_KEYS if k not in ckpt]
    if missing:
        raise ValueError(
            f"checkpoint {ckpt_path!r} lacks {missing}, so the run cannot be resumed from it "
            "(`deqkit eval` can still score it); start a new run with another --out."
        )
    _check_same_config(ckpt["config"], cfg, ckpt_path)
    return ckpt


def _check_same_config(saved: dict[str, Any], cfg: TrainConfig, where: str) -> None:
    diff = {k for k, v in cfg.to_dict().items()
            if k not in ("progress", "plots", "out", "device")
            and saved.get(k, _DEFAULTS.get(k)) != v}
    if diff:
        raise ValueError(
            f"--resume: the config differs from the checkpoint's ({where}) for {sorted(diff)}; "
            "resume with the same settings (or omit them: they are read from the run)."
        )


def read_run_config(run_dir: str) -> dict[str, Any]:
    """The config a run was started with: ``last.pt``'s, or ``config.json`` before the first
    epoch finished (for ``--resume``)."""
    ckpt_path = os.path.join(run_dir, CHECKPOINT)
    if os.path.isfile(ckpt_path):
        return dict(load_checkpoint(ckpt_path)["config"])
    path = os.path.join(run_dir, CONFIG)
    if not os.path.isfile(path):
        raise ValueError(f"--resume: {run_dir!r} holds no run to resume (no {CHECKPOINT}, no "
                         f"{CONFIG}); start it without --resume.")
    try:
        with open(path) as fh:
            values = json.load(fh)
    except (OSError, ValueError) as err:
        raise ValueError(f"--resume: {path!r} could not be read: {err}") from None
    if not isinstance(values, dict):
        raise ValueError(f"--resume: {path!r} does not hold a config (a JSON object).")
    return values


def check_splits(splits: Any, data: str) -> None:
    """Refuse data a run cannot use: an empty split (its accuracy would read 0.0) or class
    labels far beyond the classes present (a label of 1e9 would size the output layer for a
    billion classes: hundreds of GB)."""
    for part in ("train", "val", "test"):
        if len(getattr(splits, part)) == 0:
            raise ValueError(f"data {data!r}: the {part} split is empty (0 samples); training "
                             f"reports {part} metrics, so give it samples (for npz data: "
                             f"non-empty x_{part}/y_{part}, or drop x_val to hold out part of "
                             "the training set).")
    check_labels(splits, data)


def check_labels(splits: Any, data: str) -> None:
    """Refuse class labels far beyond the classes present (see :func:`check_splits`)."""
    k = int(splits.spec.num_classes)
    if splits.spec.kind == "text" or k <= 1024:
        return
    labels = [ds.tensors[1].reshape(-1) for ds in (splits.train, splits.val, splits.test)
              if hasattr(ds, "tensors")]
    present = int(torch.unique(torch.cat(labels)).numel()) if labels else k
    if present * 2 < k:
        raise ValueError(f"data {data!r}: the largest class label is {k - 1}, so the model "
                         f"would get {k} outputs, but only {present} different labels occur; "
                         "labels must be class indices 0..K-1: remap them (e.g. "
                         "numpy.unique(y, return_inverse=True)).")


def _restore(ckpt: dict[str, Any], path: str, model: nn.Module, opt: Any, sched: Any,
             scaler: Any, ema: WeightEMA | None) -> None:
    """Load a checkpoint's states for ``--resume``; a mismatch is a ValueError naming it."""
    parts = [("model", model), ("optimizer", opt), ("scheduler", sched)]
    if ema is not None:
        parts.append(("ema", ema))
    if "scaler" in ckpt:
        parts.append(("scaler", scaler))
    for key, obj in parts:
        try:
            obj.load_state_dict(ckpt[key])
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            what = "is missing" if key not in ckpt else f"does not fit this run: {err}"
            raise ValueError(f"checkpoint {path!r}: {key!r} {what}".replace("\n", " ")) \
                from None


def _diverged_message(loss: float, epoch: int, step: int, cfg: TrainConfig) -> str:
    """What a non-finite loss at (0-based) ``epoch``, 1-based ``step`` means and what to do."""
    path = os.path.join(cfg.run_dir(), CHECKPOINT)
    good = (f"the last good checkpoint is {path!r} (epoch {epoch}; `deqkit eval` scores it, "
            "but resuming it unchanged diverges the same way)" if epoch else
            "no epoch finished, so no checkpoint was written")
    return (f"the training loss became {loss} at epoch {epoch + 1}, step {step}: the run "
            f"diverged and was stopped; {good}. Start a new run (another --out) with a lower "
            f"--lr (now {cfg.lr:g}), a tighter forward solve (--rtol below {cfg.rtol:g}, more "
            f"--max-steps than {cfg.max_steps}) or Jacobian regularisation (--jac-reg 0.5).")


def _train(cfg: TrainConfig, env: Any, lock: RunLock | None, *, resume: bool,
           stop_after: int | None, log: Any) -> dict[str, Any]:
    from ...data import load_dataset
    from . import distributed as dd

    dist_on, main = env.enabled, env.is_main
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = cfg.run_dir()
    ckpt_path = os.path.join(run_dir, CHECKPOINT)
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if dist_on:
        local_bs = dd.local_batch_size(cfg.batch_size, env.world_size)
        # Rank 0 checks the run folder and reads the checkpoint; the others receive it (no
        # shared file system needed), and a failure on rank 0 is raised on every rank.
        ckpt, err = None, None
        if main:
            try:
                ckpt = _prepare_run_dir(cfg, resume, lock, log)
            except (ValueError, RunError) as e:
                err = (type(e) is RunError, str(e))
        ckpt, err = env.broadcast_object((ckpt, err))
        if err is not None:
            raise (RunError if err[0] else ValueError)(err[1])
    else:
        ckpt = _prepare_run_dir(cfg, resume, lock, log)

    start_epoch, history, best_val, best_epoch = 0, [], -1.0, 0
    torch.manual_seed(cfg.seed)
    if dist_on and not main:
        env.barrier()  # rank 0 fills any data cache first
    splits = load_dataset(cfg.data, root=cfg.data_root, seed=cfg.seed, subset=cfg.subset,
                          **cfg.data_args)
    if dist_on and main:
        env.barrier()
    check_splits(splits, cfg.data)
    text = splits.spec.kind == "text"
    device = env.device if dist_on else resolve_device(cfg.device)
    model = build_model(cfg, splits.spec).to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 or name.endswith("bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    elif cfg.optimizer == "adam":
        opt = torch.optim.Adam(groups, lr=cfg.lr)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr)
    steps_per_epoch = math.ceil(len(splits.train) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    ema = WeightEMA(model, cfg.ema) if cfg.ema > 0 else None
    if ckpt is not None:
        _restore(ckpt, os.path.join(run_dir, CHECKPOINT), model, opt, sched, scaler, ema)
        start_epoch = int(ckpt["epoch"])
        history = list(ckpt["history"])[:start_epoch]
        best_val, best_epoch = _best_of(ckpt)
        if main:  # the files after the last finished epoch, as an uninterrupted run left them
            best_val, best_epoch = _repair_best(run_dir, ckpt, log)
            rewrite_metrics(metrics_path, history)
            if cfg.plots:
                from .plots import plot_history

                plot_history(history, run_dir)
        log(f"resuming {run_dir} after epoch {start_epoch}")
    elif main:
        if os.path.exists(metrics_path):
            try:
                os.remove(metrics_path)
            except OSError as err:
                raise RunError(os_error_message(metrics_path, err)) from None
        write_file(os.path.join(run_dir, CONFIG),
                   json.dumps(cfg.to_dict(), indent=2).encode())

    n_params = sum(p.numel() for p in model.parameters())
    log(f"{cfg.model} on {cfg.data}: {n_params:,} parameters, {len(splits.train)} train / "
        f"{len(splits.val)} val / {len(splits.test)} test, {cfg.epochs} epochs -> {run_dir}"
        + (f" ({env.world_size} processes, {env.backend}, {local_bs} samples per process "
           "per step)" if dist_on else ""))
    core = model  # the plain module: checkpoints, solver statistics, regulariser, plots
    deq = getattr(core, "deq", None)
    warm_cache = None
    if cfg.warm_start:
        if deq is None or not hasattr(deq, "warm_start"):
            raise ValueError(
                f"warm_start: model {cfg.model!r} has no DEQ layer to warm-start; use a DEQ "
                "model (e.g. conv_deq) or drop --warm-start."
            )
        if dist_on:
            raise ValueError(
                "warm_start: --warm-start works in single-process training only (each "
                "process would keep its own cache); drop it under torchrun."
            )
        from ...nn import FixedPointCache

        warm_cache = FixedPointCache(len(splits.train))
        if ckpt is not None and ckpt.get("warm_start") is not None:
            warm_cache.load_state_dict(ckpt["warm_start"])
    sampler = None
    if dist_on:
        model = dd.wrap_model(model, env)
        sampler = dd.GlobalBatchSampler(len(splits.train), cfg.batch_size, env.rank,
                                        env.world_size, shuffle=True,
                                        base_seed=cfg.seed * 100_003)
        sampler.check_nonempty("training set")
    train_time = float(ckpt.get("train_time", 0.0)) if ckpt is not None else 0.0
    # process CPU seconds of the training epochs: unlike the wall-clock train_time it is
    # not inflated when other processes compete for the cores
    train_cpu_time = float(ckpt.get("train_cpu_time", 0.0)) if ckpt is not None else 0.0
    last_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, start_epoch + stop_after)
    for epoch in range(start_epoch, last_epoch):
        coin = None
        if dist_on:
            sampler.set_epoch(epoch)
            # augmentation, dropout masks, Hutchinson probes: independent per rank (rank 0
            # draws what a single process would); whether the Jacobian regulariser is used
            # in a step is drawn from a generator shared by all ranks, so they agree.
            torch.manual_seed(cfg.seed * 100_019 + epoch + 1_000_003 * env.rank)
            coin = torch.Generator().manual_seed(cfg.seed * 100_043 + epoch)
            batches: Iterable = ((dd.fetch(splits.train, idx), m, None)
                                 for idx, m in sampler.batches())
        else:
            gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
            torch.manual_seed(cfg.seed * 100_019 + epoch)
            if warm_cache is not None:  # the sample ids of every batch: the cache's keys
                perm = torch.randperm(len(splits.train), generator=gen)
                batches = ((dd.fetch(splits.train, ids.tolist()), None, ids)
                           for ids in perm.split(cfg.batch_size))
            else:
                loader = torch.utils.data.DataLoader(splits.train, batch_size=cfg.batch_size,
                                                     shuffle=True, generator=gen)
                batches = ((xy, None, None) for xy in loader)
        model.train()
        t0, c0 = time.perf_counter(), time.process_time()
        loss_sum, correct, seen, nb = 0.0, 0, 0, 0
        bwd_failed, bwd_failed_steps = 0, 0  # samples / steps with an unconverged backward
        rows: list[dict[str, float]] = []
        counts: list[int] = []
        bar = _progress(batches, steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}",
                        cfg.progress and main)
        for (x, y), global_n, ids in bar:
            x, y = x.to(device), y.to(device)
            if cfg.augment_shift and not text:
                x = random_shift(x, cfg.augment_shift)
            warm = (deq.warm_start(warm_cache, ids) if warm_cache is not None and deq is not None
                    else contextlib.nullcontext())
            with autocast(device, cfg.precision), warm:
                out = model(x)
                loss, c = _loss_and_correct(out.float(), y, text, cfg.label_smoothing)
                total = loss
                if cfg.jac_reg > 0 and deq is not None \
                        and hasattr(deq, "jacobian_regularisation") \
                        and float(torch.rand((), generator=coin)) < cfg.jac_reg_freq:
                    total = total + cfg.jac_reg * deq.jacobian_regularisation()
            if global_n is not None and global_n != cfg.batch_size:
                # DDP averages the ranks' gradients with equal weights: weight each rank's
                # mean by its share of a short last batch so the result is the global mean.
                total = total * (env.world_size * x.shape[0] / global_n)
            opt.zero_grad(set_to_none=True)
            # fp16: scaled loss; a step whose gradients overflow is skipped by the scaler
            # (the implicit backward passes non-finite incoming gradients through unsolved)
            scaler.scale(total).backward()
            if cfg.grad_clip is not None:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            if ema is not None:
                ema.update(core)
            n = y.numel()
            step_loss = float(loss.detach())
            nb += 1
            if not math.isfinite(step_loss):
                raise TrainingDiverged(_diverged_message(step_loss, epoch, nb, cfg))
            loss_sum += step_loss * n
            correct += c
            seen += n
            failed = backward_failures(core)
            bwd_failed += failed
            bwd_failed_steps += failed > 0
            st = solver_stats(core)
            if dist_on and "bwd_residual" in st:
                # the rank's loss is a mean over its chunk, world_size times the global mean's
                # share, and the backward residual is absolute: report it on the global scale
                st["bwd_residual"] /= env.world_size
            rows.append(st)
            counts.append(n)
            if hasattr(bar, "set_postfix"):
                post = {"loss": f"{loss_sum / seen:.3f}", "acc": f"{correct / seen:.3f}"}
                if st:
                    post["steps"] = f"{st['fwd_steps']:.1f}"
                    post["res"] = f"{st['fwd_rel_res']:.1e}"
                bar.set_postfix(post)
            if cfg.log_every and nb % cfg.log_every == 0:
                if dist_on:  # the global batch's loss and statistics
                    t = env.all_reduce(torch.tensor([step_loss * n, float(n)],
                                                    dtype=torch.float64))
                    step_loss = float(t[0] / t[1])
                    st = dd.reduce_batch_stats(env, [st], [n])[0]
                if main:
                    step_rec = {"epoch": epoch + 1, "step": nb, "loss": step_loss, **st}
                    write_file(metrics_path, (json.dumps(step_rec) + "\n").encode(),
                               append=True)
        if dist_on:
            t = env.all_reduce(torch.tensor([loss_sum, correct, seen, bwd_failed,
                                             bwd_failed_steps], dtype=torch.float64))
            loss_sum = float(t[0])
            correct, seen, bwd_failed, bwd_failed_steps = (round(float(v)) for v in t[1:])
            rows = dd.reduce_batch_stats(env, rows, counts)
        agg: dict[str, float] = {}
        for row in rows:
            for k, v in row.items():
                agg[k] = agg.get(k, 0.0) + v
        epoch_time = time.perf_counter() - t0
        epoch_cpu = time.process_time() - c0
        if dist_on:  # the slowest rank's times, the same on every rank
            t = env.all_reduce(torch.tensor([epoch_time, epoch_cpu], dtype=torch.float64), "max")
            epoch_time, epoch_cpu = float(t[0]), float(t[1])
        train_time += epoch_time
        train_cpu_time += epoch_cpu
        train_metrics = {"loss": loss_sum / seen, "acc": correct / seen,
                         **{k: v / nb for k, v in agg.items()}}
        with _maybe_ema(ema, core):
            val = evaluate(core, splits.val, cfg.batch_size, text, env=env,
                           precision=cfg.precision)
        record = {"epoch": epoch + 1, "time": epoch_time, "train_time": train_time,
                  "cpu_time": epoch_cpu, "train_cpu_time": train_cpu_time,
                  **{f"train_{k}": v for k, v in train_metrics.items()},
                  **{f"val_{k}": v for k, v in val.items()}}
        history.append(record)
        line = (f"epoch {epoch + 1:3d}  loss {record['train_loss']:.4f}  "
                f"train acc {record['train_acc']:.4f}  val acc {val['acc']:.4f}")
        if "train_fwd_steps" in record:
            line += (f"  steps {record['train_fwd_steps']:.1f}  "
                     f"res {record['train_fwd_rel_res']:.1e}")
        if bwd_failed:
            line += f"  bwd not converged: {bwd_failed} samples in {bwd_failed_steps} steps"
        log(line + f"  ({epoch_time:.1f}s)")
        improved = val["acc"] > best_val
        if improved:
            best_val, best_epoch = val["acc"], epoch + 1
        if main:
            # Order: the record, last.pt (the commit: an epoch counts once it is in
            # last.pt), then best.pt. A kill before last.pt redoes the epoch on resume (its
            # record is dropped); a kill between last.pt and best.pt leaves last.pt holding
            # the best state, from which the resume rewrites best.pt (_repair_best).
            write_file(metrics_path, (json.dumps(record) + "\n").encode(), append=True)
            state = {"config": cfg.to_dict(), "model": core.state_dict(),
                     "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "epoch": epoch + 1, "history": history, "train_time": train_time,
                     "train_cpu_time": train_cpu_time, "best_val": best_val,
                     "best_epoch": best_epoch, "scaler": scaler.state_dict()}
            if ema is not None:
                state["ema"] = ema.state_dict()
            best_state = dict(state)
            if warm_cache is not None:  # in last.pt only: what --resume needs to be exact
                state["warm_start"] = warm_cache.state_dict()
            save_checkpoint(state, ckpt_path)
            if improved:
                save_checkpoint(best_state, os.path.join(run_dir, BEST))
            if cfg.plots:
                from .plots import plot_history

                plot_history(history, run_dir)
        env.barrier()  # the checkpoint of this epoch is on disk before any rank goes on

    done = len(history) >= cfg.epochs
    summary: dict[str, Any] = {"run_dir": run_dir, "epochs": len(history),
                               "train_time": train_time, "train_cpu_time": train_cpu_time,
                               "complete": done,
                               "parameters": n_params}
    if done:
        with _maybe_ema(ema, core):
            test = evaluate(core, splits.test, cfg.batch_size, text, env=env,
                            precision=cfg.precision)
        summary.update({f"test_{k}": v for k, v in test.items()})
        if history:
            summary["final_val_acc"] = history[-1]["val_acc"]
        if main:
            write_file(os.path.join(run_dir, "summary.json"),
                       json.dumps(summary, indent=2).encode())
            if cfg.plots and deq is not None:
                from .plots import plot_residual_traces

                with _maybe_ema(ema, core):
                    plot_model = core
                    if device.type != "cpu":
                        import copy

                        plot_model = copy.deepcopy(core).cpu()
                    plot_residual_traces(plot_model, splits.test, run_dir)
        log(_summary_table(summary))
    return summary


def _summary_table(summary: dict[str, Any]) -> str:
    rows = [(k, f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in summary.items()]
    w = max(len(k) for k, _ in rows)
    return "\n".join(["| metric | value |", "|---|---|"]
                     + [f"| {k.ljust(w)} | {v} |" for k, v in rows])


def eval_checkpoint(path: str, *, max_steps: int | None = None, split: str = "test",
                    device: str | None = None, log: Any = print) -> dict[str, Any]:
    """``deqkit eval``: test metrics and solver statistics of a checkpoint."""
    from ...data import load_dataset

    ckpt = load_checkpoint(path)
    cfg = from_mapping(dict(ckpt["config"]), source=f"checkpoint {path!r}")
    if max_steps is not None:
        cfg.eval_max_steps = max_steps
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    splits = load_dataset(cfg.data, root=cfg.data_root, seed=cfg.seed, subset=cfg.subset,
                          **cfg.data_args)
    if device is not None:
        cfg.device = device
        validate(cfg)
    check_labels(splits, cfg.data)
    model = build_model(cfg, splits.spec).to(resolve_device(cfg.device))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise ValueError(f"checkpoint {path!r}: 'model' does not fit the model of its config: "
                         + str(err).replace("\n", " ")) from None
    if "ema" in ckpt:  # a run trained with --ema is evaluated with its averaged weights
        ema = WeightEMA(model, float(ckpt["ema"]["decay"]))
        ema.load_state_dict(ckpt["ema"])
        with torch.no_grad():
            named = dict(model.named_parameters())
            for n, t in ema.params.items():
                named[n].copy_(t)
    if max_steps is not None and hasattr(getattr(model, "deq", None), "eval_max_steps"):
        model.deq.eval_max_steps = max_steps
    if split not in ("train", "val", "test"):
        raise ValueError(f"`split` must be train, val or test, got {split!r}.")
    t = time.perf_counter()
    res = evaluate(model, getattr(splits, split), cfg.batch_size, splits.spec.kind == "text",
                   precision=cfg.precision)
    res["seconds"] = time.perf_counter() - t
    res["epoch"] = int(ckpt["epoch"])
    log(f"{cfg.model} on {cfg.data} ({split}, epoch {res['epoch']}, eval max_steps "
        f"{cfg.eval_max_steps}):")
    log(_summary_table(res))
    return res
