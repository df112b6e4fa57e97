"""What a training run is built from: data, model (through :mod:`deqkit.app.names`),
optimiser parameter groups, learning-rate schedule, gradient scaler."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from deqkit import zoo

from .. import names

# the data kinds (deqkit.data.DataSpec.kind) each zoo family takes: the language models read
# character ids, the convolutional models (C, H, W) images or (C, L) signals, the others any
# real-valued input (flattened)
_LANGUAGE = (zoo.DEQTransformerLM, zoo.TransformerLM)
_CONV = (zoo.ConvDEQ, zoo.MDEQ, zoo.ResNetConv, zoo.UnrolledConv)


def data_kinds(model: str) -> tuple[str, ...]:
    """The data kinds (``DataSpec.kind``) the zoo model called ``model`` accepts."""
    factory = names.MODELS[model]
    if isinstance(factory, type) and issubclass(factory, _LANGUAGE):
        return ("text",)
    if isinstance(factory, type) and issubclass(factory, _CONV):
        return ("image", "sequence")
    return ("vector", "image", "sequence")


def check_model_fits_data(model: str, spec: Any) -> None:
    """Refuse a model that cannot read the data, naming the models that can."""
    if model not in names.MODELS:
        raise names.unknown("model", model, names.MODELS)
    kinds = data_kinds(model)
    if spec.kind in kinds:
        return
    fits = [m for m in sorted(names.MODELS) if spec.kind in data_kinds(m)]
    deqs = [m for m in fits if m.startswith(("deq", "conv_deq", "mdeq"))]
    raise ValueError(
        f"model {model!r} takes {' or '.join(kinds)} data, but {spec.name!r} is {spec.kind} "
        f"data of shape {tuple(spec.input_shape)}; use --model {(deqs or fits)[0]} (models for "
        f"{spec.kind} data: {', '.join(fits)})."
    )


def load_data(data: str, *, root: str | None, seed: int, subset: int | None,
              data_args: dict[str, Any]) -> Any:
    """The run's splits, checked (:func:`check_splits`)."""
    from deqkit.data import load_dataset

    splits = load_dataset(data, root=root, seed=seed, subset=subset, **data_args)
    check_splits(splits, data)
    return splits


def check_splits(splits: Any, data: str) -> None:
    """Refuse data a run cannot use: an empty split (its accuracy would read 0.0) or class
    labels far beyond the classes present (:func:`check_labels`)."""
    for part in ("train", "val", "test"):
        if len(getattr(splits, part)) == 0:
            raise ValueError(f"data {data!r}: the {part} split is empty (0 samples); training "
                             f"reports {part} metrics, so give it samples (for npz data: "
                             f"non-empty x_{part}/y_{part}, or drop x_val to hold out part of "
                             "the training set).")
    check_labels(splits, data)


def check_labels(splits: Any, data: str) -> None:
    """Refuse class labels far beyond the classes present (a label of 1e9 would size the
    output layer for a billion classes: hundreds of GB)."""
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


def build_model(cfg: Any, spec: Any) -> nn.Module:
    """``cfg.model`` (a :class:`~deqkit.app.config.TrainConfig`) for the data ``spec``; DEQ
    models get the config's solver, adjoint and step budgets unless ``model_args`` sets them."""
    check_model_fits_data(cfg.model, spec)
    accepted = zoo.hyperparameters(names.MODELS[cfg.model])
    kwargs: dict[str, Any] = dict(cfg.model_args)
    extra = {"solver": cfg.build_solver, "adjoint": cfg.build_adjoint,
             "max_steps": lambda: cfg.max_steps, "eval_max_steps": lambda: cfg.eval_max_steps}
    for key, make in extra.items():
        if key in accepted and key not in kwargs:
            kwargs[key] = make()
    return names.build_model(cfg.model, tuple(spec.input_shape), spec.num_classes, **kwargs)


def make_optimizer(model: nn.Module, name: str, lr: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """AdamW/Adam/SGD(Nesterov 0.9); weight decay on matrices only (not biases/norms)."""
    decay, no_decay = [], []
    for pname, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 or pname.endswith("bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr)


def schedule_factor(kind: str, total_steps: int) -> Callable[[int], float]:
    """The learning-rate factor at optimiser step ``s``: constant 1, or a cosine from 1 to 0
    over ``total_steps``."""
    if kind == "cosine":
        return lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps))
    return lambda s: 1.0


def make_schedule(opt: torch.optim.Optimizer, kind: str,
                  total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR`` of :func:`schedule_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(opt, schedule_factor(kind, total_steps))


def replan_schedule(opt: torch.optim.Optimizer, sched: Any) -> list[float]:
    """After loading a checkpoint into ``sched`` (whose factor was built for a new total):
    set the optimiser's learning rates to the factor at the current step; the new rates."""
    step = sched.last_epoch
    rates = [base * factor(step) for base, factor in zip(sched.base_lrs, sched.lr_lambdas)]
    for group, lr in zip(opt.param_groups, rates):
        group["lr"] = lr
    sched._last_lr = list(rates)
    return rates


def make_scaler(device: torch.device, precision: str) -> Any:
    """A ``GradScaler``, enabled for fp16 only."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


__all__ = ["build_model", "check_labels", "check_model_fits_data", "check_splits",
           "data_kinds", "load_data", "make_optimizer", "make_scaler", "make_schedule",
           "replan_schedule", "schedule_factor"]
