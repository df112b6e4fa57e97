"""``deqkit eval`` and ``deqkit plot``: a saved run's checkpoint scored, its plots drawn."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..config import from_mapping, resolve_device, validate
from . import checkpoint as ck
from . import setup
from .ema import WeightEMA
from .evaluate import evaluate
from .plots import plot_history, plot_residual_traces

Log = Callable[[str], Any]


def summary_table(summary: dict[str, Any]) -> str:
    """A Markdown table of a summary's values."""
    rows = [(k, f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in summary.items()]
    w = max(len(k) for k, _ in rows)
    return "\n".join(["| metric | value |", "|---|---|"]
                     + [f"| {k.ljust(w)} | {v} |" for k, v in rows])


@contextlib.contextmanager
def eval_budget(model: nn.Module, max_steps: int | None) -> Iterator[None]:
    """Within the block the model's DEQ solves with at most ``max_steps`` in eval mode."""
    deq = getattr(model, "deq", None)
    if max_steps is None or deq is None:
        yield
    elif hasattr(deq, "overrides"):
        with deq.overrides(eval_max_steps=max_steps):
            yield
    elif hasattr(deq, "eval_max_steps"):
        old, deq.eval_max_steps = deq.eval_max_steps, max_steps
        try:
            yield
        finally:
            deq.eval_max_steps = old
    else:
        yield


def _load_for_eval(path: str, device: str | None, log: Log) -> tuple[Any, nn.Module, Any]:
    """The checkpoint's config, its model with the (averaged) weights, and the data."""
    ckpt = ck.load_checkpoint(path)
    cfg = from_mapping(dict(ckpt["config"]), source=f"checkpoint {path!r}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device is not None:
        cfg.device = device
        validate(cfg)
    splits = setup.load_data(cfg.data, root=cfg.data_root, seed=cfg.seed, subset=cfg.subset,
                             data_args=cfg.data_args)
    model = setup.build_model(cfg, splits.spec).to(resolve_device(cfg.device))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise ValueError(f"checkpoint {path!r}: 'model' does not fit the model of its config: "
                         + str(err).replace("\n", " ")) from None
    if "ema" in ckpt:  # a run trained with --ema is evaluated with its averaged weights
        ema = WeightEMA(model, float(ckpt["ema"]["decay"]))
        ema.load_state_dict(ckpt["ema"])
        ema.copy_to(model)
    return (cfg, int(ckpt["epoch"])), model, splits


def eval_checkpoint(path: str, *, max_steps: int | None = None, split: str = "test",
                    device: str | None = None, log: Log = print) -> dict[str, Any]:
    """``deqkit eval``: metrics and solver statistics of a checkpoint, or of a run folder's
    ``best.pt`` (else ``last.pt``); ``max_steps`` overrides the evaluation step budget."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"`split` must be train, val or test, got {split!r}.")
    path = ck.checkpoint_path(path, log)
    (cfg, epoch), model, splits = _load_for_eval(path, device, log)
    t = time.perf_counter()
    with eval_budget(model, max_steps):
        res = evaluate(model, getattr(splits, split), cfg.batch_size,
                       splits.spec.kind == "text", precision=cfg.precision)
    res["seconds"] = time.perf_counter() - t
    res["epoch"] = epoch
    budget = max_steps if max_steps is not None else cfg.eval_max_steps
    log(f"{cfg.model} on {cfg.data} ({split}, epoch {epoch}, eval max_steps {budget}):")
    log(summary_table(res))
    return res





def read_history(run_dir: str) -> list[dict[str, Any]]:
    """The epoch records of ``RUN/metrics.jsonl`` (a running run's too; torn lines skipped)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"{run_dir!r} holds no run (no metrics.jsonl).")
    out = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            with contextlib.suppress(json.JSONDecodeError):
                rec = json.loads(line)
                if isinstance(rec, dict) and "step" not in rec and "epoch" in rec:
                    out.append(rec)
    return out


def plot_run(run_dir: str, *, log: Log = print) -> list[str]:
    """Draw a finished or running run's plots from its files: the curves from
    ``metrics.jsonl``, the residual traces from its best (else last) checkpoint. The paths
    written (none without matplotlib or before the first epoch)."""
    written = plot_history(read_history(run_dir), run_dir)
    if any(os.path.isfile(os.path.join(run_dir, n)) for n in (ck.BEST, ck.CHECKPOINT)):
        path = ck.checkpoint_path(run_dir, lambda *_: None)
        _, model, splits = _load_for_eval(path, "cpu", log)
        traces = plot_residual_traces(model, splits.test, run_dir)
        written += [traces] if traces else []
    for path in written:
        log(f"wrote {path}")
    return written


__all__ = ["eval_budget", "eval_checkpoint", "plot_run", "read_history", "summary_table"]
