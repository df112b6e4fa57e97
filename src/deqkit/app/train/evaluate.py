"""The one evaluation routine (plain and distributed), losses and solver statistics."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from . import distributed as dd

#: ``loss_fn(output, target) -> (mean loss over the targets, number of correct predictions)``
LossFn = Callable[[Tensor, Tensor], tuple[Tensor, int]]


def loss_and_correct(out: Tensor, y: Tensor, smoothing: float = 0.0) -> tuple[Tensor, int]:
    """Cross-entropy (nats, mean over targets) and the number of correct argmax predictions.

    Outputs with more than two axes (a language model's ``(B, T, vocab)``) are flattened to
    one row per target.
    """
    if out.dim() > 2:
        out = out.reshape(-1, out.shape[-1])
        y = y.reshape(-1)
    loss = nn.functional.cross_entropy(out, y, label_smoothing=smoothing)
    return loss, int((out.argmax(-1) == y).sum())


def cross_entropy(label_smoothing: float = 0.0) -> LossFn:
    """The default :data:`LossFn`: :func:`loss_and_correct` with ``label_smoothing``."""

    def loss_fn(out: Tensor, y: Tensor) -> tuple[Tensor, int]:
        return loss_and_correct(out, y, label_smoothing)

    return loss_fn


def autocast(device: torch.device, precision: str) -> Any:
    """The autocast context of a config's ``precision`` (``fp32``: none) on ``device``.

    The DEQ's solver keeps its state and residual norms in float32 under autocast
    (see :func:`deqkit.fixed_point`); only the cell's matmuls/convolutions run in low precision.
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def solver_stats(model: nn.Module) -> dict[str, float]:
    """Forward/backward statistics of the model's DEQ layer from its last call.

    ``fwd_rel_res`` is the mean relative residual; a NaN residual (a diverged sample) stays
    NaN, so a broken solve shows in the metrics instead of reading as converged.
    """
    out: dict[str, float] = {}
    sol = getattr(getattr(model, "deq", None), "last_solution", None)
    if sol is None:
        return out
    st = sol.stats
    out["fwd_steps"] = float(st["nstep"].float().mean())
    out["fwd_steps_max"] = float(st["nstep"].max())
    out["fwd_rel_res"] = float(st["rel_residual"].float().mean())
    out["fwd_converged"] = float(st["converged"].float().mean())
    out["nfev"] = float(st["nfev"])
    if sol.backward:
        bwd = sol.backward
        # a float16 step whose scaled gradient overflowed: the scaler skips it; no solve ran
        overflow = _overflow_mask(bwd, bwd["nstep"].numel(), bwd["nstep"].device)
        out["bwd_overflow"] = float(overflow.float().mean())
        out["bwd_steps"] = float(bwd["nstep"].float().mean())
        if isinstance(bwd.get("nmatvec"), (int, float)):
            out["bwd_matvecs"] = float(bwd["nmatvec"])
        for key, name in (("residual", "bwd_residual"), ("grad_error", "bwd_grad_error")):
            if isinstance(bwd.get(key), Tensor):  # (SHINE without refinement has none)
                res = bwd[key].float().reshape(-1)
                res = res[~overflow] if res.numel() == overflow.numel() else res
                out[name] = float(res.mean()) if res.numel() else 0.0
        if isinstance(bwd.get("converged"), Tensor):
            out["bwd_converged"] = float(bwd["converged"].float().mean())
        if isinstance(bwd.get("reconstruction_error"), Tensor):  # the reversible backward
            out["bwd_recon_error_max"] = float(bwd["reconstruction_error"].max())
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


def combine_stats(rows: list[dict[str, float]]) -> dict[str, float]:
    """Per-batch statistics -> one row: keys ending in ``_max`` take the maximum over the
    batches (a true maximum), every other key the mean per batch."""
    out: dict[str, float] = {}
    for row in rows:
        for k, v in row.items():
            if k.endswith("_max"):
                out[k] = max(out.get(k, -math.inf), v)
            else:
                out[k] = out.get(k, 0.0) + v
    return {k: v if k.endswith("_max") else v / max(len(rows), 1) for k, v in out.items()}


def _batches(dataset: Any, batch_size: int, env: Any) -> Iterator[list[int]]:
    """This rank's sample indices of every evaluation batch, in order (all of them alone)."""
    if env is not None and env.enabled:
        sampler = dd.GlobalBatchSampler(len(dataset), batch_size, env.rank, env.world_size,
                                        shuffle=False)
        yield from sampler
        return
    for i in range(0, len(dataset), batch_size):
        yield list(range(i, min(i + batch_size, len(dataset))))


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Any, batch_size: int, text: bool = False, *,
             env: Any = None, precision: str = "fp32",
             loss_fn: LossFn | None = None) -> dict[str, float]:
    """Loss, accuracy (and bits per target for ``text``) and solver statistics on ``dataset``.

    ``loss_fn`` defaults to cross-entropy; the loss is averaged over every target (every
    character of a language model). Solver statistics are means per batch (``*_max``: the
    maximum). With a distributed ``env`` (:class:`~deqkit.app.train.distributed.DistEnv`)
    every rank evaluates its chunk of each batch and the numbers are reduced over the ranks:
    the result, on every rank, is that of one process evaluating the whole set.

    Example:
        >>> import torch
        >>> data = torch.utils.data.TensorDataset(torch.randn(10, 4), torch.arange(10) % 3)
        >>> res = evaluate(torch.nn.Linear(4, 3), data, batch_size=4)
        >>> sorted(res), 0.0 <= res["acc"] <= 1.0
        (['acc', 'loss'], True)
    """
    if len(dataset) == 0:
        raise ValueError("cannot evaluate an empty split (0 samples): accuracy and loss are "
                         "undefined; give the data a non-empty validation and test split.")
    env = env if env is not None else dd.DistEnv()
    model = dd.unwrap(model)
    model.eval()
    device = env.device if env.enabled else model_device(model)
    loss_fn = loss_fn or cross_entropy()
    loss_sum, correct, total = 0.0, 0, 0
    rows: list[dict[str, float]] = []
    counts: list[int] = []
    for idx in _batches(dataset, batch_size, env):
        if not idx:  # a short last batch with fewer samples than ranks
            rows.append({})
            counts.append(0)
            continue
        x, y = (t.to(device) for t in dd.fetch(dataset, idx))
        with autocast(device, precision):
            out = model(x)
        loss, c = loss_fn(out.float(), y)
        loss_sum += float(loss) * y.numel()
        correct += c
        total += y.numel()
        rows.append(solver_stats(model))
        counts.append(y.numel())
    if env.enabled:
        tot = env.all_reduce(torch.tensor([loss_sum, float(correct), float(total)],
                                          dtype=torch.float64))
        loss_sum, correct, total = float(tot[0]), round(float(tot[1])), round(float(tot[2]))
        rows = dd.reduce_batch_stats(env, rows, counts)
    res = {"loss": loss_sum / max(total, 1), "acc": correct / max(total, 1)}
    if text:
        res["bpc"] = res["loss"] / math.log(2)
    return {**res, **combine_stats(rows)}


__all__ = ["LossFn", "autocast", "backward_failures", "combine_stats", "cross_entropy",
           "evaluate", "loss_and_correct", "model_device", "solver_stats"]
