"""One optimisation step: autocast, loss, Jacobian regulariser, backward, clip, scaler, EMA."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

import torch
from torch import Tensor, nn

from ..files import RunError
from . import distributed as dd
from .ema import WeightEMA
from .evaluate import LossFn, autocast, cross_entropy


class TrainingDiverged(RunError):
    """The training loss became NaN or infinite; the run stopped before saving it.

    ``loss`` is the value, ``epoch`` (0-based) and ``step`` (1-based) where it happened
    (filled in by :func:`~deqkit.app.train.fit`)."""

    def __init__(self, message: str, loss: float = math.nan, epoch: int = 0,
                 step: int = 0) -> None:
        super().__init__(message)
        self.loss, self.epoch, self.step = loss, epoch, step


@dataclasses.dataclass
class StepOptions:
    """How a step trains: ``precision`` (fp32, bf16, fp16 autocast), gradient clipping at
    ``grad_clip`` (None: off), the DEQ's Jacobian regulariser with weight ``jac_reg`` in a
    fraction ``jac_reg_freq`` of the steps, and a random roll of the inputs by up to
    ``augment_shift`` (see :func:`random_shift`)."""

    precision: str = "fp32"
    grad_clip: float | None = None
    jac_reg: float = 0.0
    jac_reg_freq: float = 1.0
    augment_shift: int = 0


@dataclasses.dataclass
class Trainer:
    """What one step updates. ``model`` may be wrapped (DDP); ``core`` is the plain module
    (solver statistics, regulariser, EMA, checkpoints)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    scaler: Any = None
    loss_fn: LossFn = dataclasses.field(default_factory=cross_entropy)
    ema: WeightEMA | None = None
    options: StepOptions = dataclasses.field(default_factory=StepOptions)
    core: nn.Module | None = None

    def __post_init__(self) -> None:
        if self.core is None:
            self.core = dd.unwrap(self.model)
        if self.scaler is None:
            self.scaler = torch.amp.GradScaler("cpu", enabled=False)


def random_shift(x: Tensor, max_shift: int) -> Tensor:
    """Data augmentation: roll each sample's last axis (and the second last for images) by a
    random integer in ``[-max_shift, max_shift]`` (torch's global CPU RNG, seeded per epoch,
    whatever the device of ``x``)."""
    if max_shift <= 0 or x.dim() < 3:
        return x
    b = x.shape[0]
    dims = [x.dim() - 1] if x.dim() == 3 else [x.dim() - 2, x.dim() - 1]
    for d in dims:
        n = x.shape[d]
        shift = torch.randint(-max_shift, max_shift + 1, (b,))
        idx = ((torch.arange(n).unsqueeze(0) - shift.unsqueeze(1)) % n).to(x.device)  # (B, n)
        shape = [b] + [1] * (x.dim() - 1)
        shape[d] = n
        x = torch.gather(x, d, idx.view(shape).expand_as(x))
    return x


def _objective(tr: Trainer, x: Tensor, y: Tensor, coin: torch.Generator | None
               ) -> tuple[Tensor, Tensor, int]:
    """Forward pass: (loss to report, loss to differentiate, correct predictions)."""
    opts, deq = tr.options, getattr(tr.core, "deq", None)
    out = tr.model(x)
    loss, correct = tr.loss_fn(out.float(), y)
    total = loss
    if opts.jac_reg > 0 and deq is not None and hasattr(deq, "jacobian_regularisation") \
            and float(torch.rand((), generator=coin)) < opts.jac_reg_freq:
        total = total + opts.jac_reg * deq.jacobian_regularisation()
    return loss, total, correct


def train_step(tr: Trainer, x: Tensor, y: Tensor, *, device: torch.device,
               coin: torch.Generator | None = None, share: float = 1.0,
               context: Any = None) -> tuple[float, int]:
    """One optimisation step on the batch ``(x, y)``; ``(loss, correct predictions)``.

    ``share`` scales the differentiated loss (a rank's weight in a short last batch under
    DDP); ``coin`` draws whether the Jacobian regulariser is used (the global RNG when None);
    ``context`` wraps the forward pass (a DEQ warm start). Raises :class:`TrainingDiverged`
    on a non-finite loss, after the step (the caller decides what is saved).
    """
    opts = tr.options
    x, y = x.to(device), y.to(device)
    if opts.augment_shift and x.is_floating_point():
        x = random_shift(x, opts.augment_shift)
    with autocast(device, opts.precision), context or contextlib.nullcontext():
        loss, total, correct = _objective(tr, x, y, coin)
    if share != 1.0:
        total = total * share
    tr.optimizer.zero_grad(set_to_none=True)
    # fp16: scaled loss; a step whose gradients overflow is skipped by the scaler
    # (the implicit backward passes non-finite incoming gradients through unsolved)
    tr.scaler.scale(total).backward()
    if opts.grad_clip is not None:
        tr.scaler.unscale_(tr.optimizer)
        nn.utils.clip_grad_norm_(tr.model.parameters(), opts.grad_clip)
    tr.scaler.step(tr.optimizer)
    tr.scaler.update()
    if tr.scheduler is not None:
        tr.scheduler.step()
    if tr.ema is not None:
        tr.ema.update(tr.core)
    value = float(loss.detach())
    if not math.isfinite(value):
        raise TrainingDiverged(f"the training loss became {value}", loss=value)
    return value, correct


__all__ = ["StepOptions", "Trainer", "TrainingDiverged", "random_shift", "train_step"]
