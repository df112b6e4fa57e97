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

from ._config import TrainConfig, from_mapping, resolve_device, validate

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)
             if f.default is not dataclasses.MISSING}

CHECKPOINT = "last.pt"
BEST = "best.pt"


# ----------------------------------------------------------------------------- building


def build_model(cfg: TrainConfig, spec: Any) -> nn.Module:
    """Instantiate ``cfg.model`` for the data ``spec``; DEQ models get the solver and adjoint."""
    from .. import zoo

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
            return ctor(**kwargs)
        except TypeError as err:
            raise ValueError(f"model {cfg.model!r}: bad model_args {cfg.model_args}: {err}") \
                from None
    return zoo.build_model(cfg.model, spec.input_shape, spec.num_classes, **kwargs)


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
        overflow = bool(sol.backward.get("nonfinite_grad", False))
        # a float16 step whose scaled gradient overflowed: the scaler skips it; no solve ran
        out["bwd_overflow"] = float(overflow)
        out["bwd_steps"] = float(sol.backward["nstep"].float().mean())
        out["bwd_residual"] = 0.0 if overflow else float(sol.backward["residual"].float().mean())
        out["bwd_converged"] = float(sol.backward["converged"].float().mean())
    return out


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

    With a distributed ``env`` (``deqkit.cli._distributed.DistEnv``) every rank evaluates its
    chunk of each batch of ``batch_size`` and the numbers are reduced over the ranks; the
    result (on every rank) is that of one process evaluating the whole set.
    """
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
    from . import _distributed as dd

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


def _atomic_save(obj: Any, path: str) -> None:
    """Write to a temporary file, fsync, then rename: a kill never leaves a torn file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def load_checkpoint(path: str) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``: tensors and plain containers only)."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"checkpoint {path!r} could not be loaded safely: {err}") from None
    for key in ("config", "model", "epoch"):
        if key not in ckpt:
            raise ValueError(f"checkpoint {path!r} is not a deqkit checkpoint (no {key!r}).")
    return ckpt


def _append_jsonl(path: str, record: dict[str, Any]) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _truncate_jsonl(path: str, max_epoch: int) -> None:
    """On resume, drop records of epochs after the checkpoint (an interrupted epoch)."""
    if not os.path.isfile(path):
        return
    with open(path) as fh:
        lines = [ln for ln in fh if ln.strip()]
    keep = []
    for ln in lines:
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            continue  # a torn last line
        if rec.get("epoch", 0) <= max_epoch:
            keep.append(ln if ln.endswith("\n") else ln + "\n")
    with open(path, "w") as fh:
        fh.writelines(keep)


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
    from . import _distributed as dd

    env = dd.detect(cfg.device)
    try:
        summary = _train(cfg, env, resume=resume, stop_after=stop_after,
                         log=log if env.is_main else (lambda *a, **k: None))
    except BaseException:
        dd.shutdown(env, barrier=False)  # the other ranks may not reach a barrier
        raise
    dd.shutdown(env)
    return summary


def _prepare_run_dir(cfg: TrainConfig, resume: bool) -> dict[str, Any] | None:
    """Checks of the run folder (rank 0); the checkpoint to resume from, if any."""
    run_dir = cfg.run_dir()
    ckpt_path = os.path.join(run_dir, CHECKPOINT)
    os.makedirs(run_dir, exist_ok=True)
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        saved = ckpt["config"]
        mine = cfg.to_dict()
        diff = {k: (saved.get(k), v) for k, v in mine.items()
                if k not in ("progress", "plots", "out", "device")
                and saved.get(k, _DEFAULTS.get(k)) != v}
        if diff:
            raise ValueError(
                f"--resume: the config differs from the checkpoint's for {sorted(diff)}; "
                "resume with the same settings (or omit them: they are read from the run)."
            )
        return ckpt
    if os.path.isfile(ckpt_path):
        raise ValueError(
            f"{run_dir!r} already holds a run ({CHECKPOINT}); pass --resume to continue it or "
            "choose another --out."
        )
    return None


def _train(cfg: TrainConfig, env: Any, *, resume: bool, stop_after: int | None,
           log: Any) -> dict[str, Any]:
    from ..data import load_dataset
    from . import _distributed as dd

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
                ckpt = _prepare_run_dir(cfg, resume)
            except ValueError as e:
                err = str(e)
        ckpt, err = env.broadcast_object((ckpt, err))
        if err is not None:
            raise ValueError(err)
    else:
        ckpt = _prepare_run_dir(cfg, resume)

    start_epoch, history, best_val = 0, [], -1.0
    torch.manual_seed(cfg.seed)
    if dist_on and not main:
        env.barrier()  # rank 0 fills any data cache first
    splits = load_dataset(cfg.data, root=cfg.data_root, seed=cfg.seed, subset=cfg.subset,
                          **cfg.data_args)
    if dist_on and main:
        env.barrier()
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
        model.load_state_dict(ckpt["model"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        if "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch = int(ckpt["epoch"])
        history = list(ckpt.get("history", []))
        best_val = float(ckpt.get("best_val", -1.0))
        if main:
            _truncate_jsonl(metrics_path, start_epoch)
        log(f"resuming {run_dir} after epoch {start_epoch}")
    elif main:
        if os.path.exists(metrics_path):
            os.remove(metrics_path)
        with open(os.path.join(run_dir, "config.json"), "w") as fh:
            json.dump(cfg.to_dict(), fh, indent=2)

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
        from ..nn import FixedPointCache

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
            loss_sum += float(loss.detach()) * n
            correct += c
            seen += n
            nb += 1
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
                step_loss = float(loss.detach())
                if dist_on:  # the global batch's loss and statistics
                    t = env.all_reduce(torch.tensor([step_loss * n, float(n)],
                                                    dtype=torch.float64))
                    step_loss = float(t[0] / t[1])
                    st = dd.reduce_batch_stats(env, [st], [n])[0]
                if main:
                    _append_jsonl(metrics_path, {"epoch": epoch + 1, "step": nb,
                                                 "loss": step_loss, **st})
        if dist_on:
            t = env.all_reduce(torch.tensor([loss_sum, float(correct), float(seen)],
                                            dtype=torch.float64))
            loss_sum, correct, seen = float(t[0]), round(float(t[1])), \
                round(float(t[2]))
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
        log(line + f"  ({epoch_time:.1f}s)")
        if main:
            _append_jsonl(metrics_path, record)
            state = {"config": cfg.to_dict(), "model": core.state_dict(),
                     "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "epoch": epoch + 1, "history": history, "train_time": train_time,
                     "train_cpu_time": train_cpu_time,
                     "best_val": max(best_val, val["acc"]), "scaler": scaler.state_dict()}
            if ema is not None:
                state["ema"] = ema.state_dict()
            best_state = dict(state)
            if warm_cache is not None:  # in last.pt only: what --resume needs to be exact
                state["warm_start"] = warm_cache.state_dict()
            _atomic_save(state, ckpt_path)
            if val["acc"] > best_val:
                _atomic_save(best_state, os.path.join(run_dir, BEST))
            if cfg.plots:
                from ._plots import plot_history

                plot_history(history, run_dir)
        best_val = max(best_val, val["acc"])
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
            with open(os.path.join(run_dir, "summary.json"), "w") as fh:
                json.dump(summary, fh, indent=2)
            if cfg.plots and deq is not None:
                from ._plots import plot_residual_traces

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
    from ..data import load_dataset

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
    model = build_model(cfg, splits.spec).to(resolve_device(cfg.device))
    model.load_state_dict(ckpt["model"])
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
