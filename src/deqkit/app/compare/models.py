"""The compared model families, built from the MLP zoo, and their (shared) training loop."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

import deqkit as dk
from deqkit.zoo import DEQMLP, NeuralODEClassifier, ResNetMLP, UnrolledMLP

from .. import names
from ..train import StepInfo, evaluate, fit

#: Model keys -> (family, label). Families follow the document's table columns.
MODELS: dict[str, tuple[str, str]] = {
    "resnet": ("standard", "ResNet (untied, L blocks)"),
    "unrolled": ("standard", "weight-tied, unrolled L times"),
    "node_adjoint": ("ode", "Neural ODE, adjoint"),
    "node_direct": ("ode", "Neural ODE, direct backprop"),
    "deq_implicit": ("deq", "DEQ, implicit (GMRES)"),
    "deq_jfb": ("deq", "DEQ, JFB"),
    "deq_phantom": ("deq", "DEQ, phantom(5, 0.5)"),
    "deq_reuse": ("deq", "DEQ, implicit GMRES preconditioned by the forward's inverse estimate"),
    "deq_shine": ("deq", "DEQ, SHINE (the forward's inverse estimate, 2 refinements)"),
    "deq_reversible": ("deq", "DEQ, reversible (exact backprop by reconstruction)"),
}


def n_params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def deq_adjoint(kind: str, backward_rtol: float = 1e-4, **options: Any) -> dk.AbstractAdjoint:
    """The compared DEQ's adjoint ``kind`` (a :data:`deqkit.app.names.ADJOINTS` name), with
    ``options`` for :func:`deqkit.app.names.build_adjoint` (e.g. ``reuse_forward=True``)."""
    # restart=5: the Krylov basis (restart + 1 state-sized vectors per sample) is the DEQ's
    # only memory beyond one graph of f; GMRES(5) restarted reaches rtol 1e-4 within the 20
    # steps on these contractive cells (backward statistics are recorded in the run)
    gmres = names.build_linear_solver("gmres", rtol=backward_rtol, atol=1e-8, max_steps=20,
                                      restart=5)
    return names.build_adjoint(kind, linear_solver=gmres, phantom_steps=5, phantom_damping=0.5,
                               on_failure="ignore", **options)


def matched_resnet_width(in_shape: tuple[int, ...], num_classes: int, depth: int,
                         target: int) -> int:
    """ResNetMLP width whose parameter count is closest to ``target``."""
    best, best_err = 1, math.inf
    for w in range(2, 1025):
        p = n_params(ResNetMLP(in_shape, num_classes, width=w, depth=depth, activation="tanh"))
        if abs(p - target) < best_err:
            best, best_err = w, abs(p - target)
        if p > target:
            break
    return best


def build_models(
    in_shape: tuple[int, ...],
    num_classes: int,
    width: int = 64,
    depth: int = 8,
    resnet_width: int | None = None,
    ode_rtol: float = 1e-3,
    ode_atol: float = 1e-4,
    deq_max_steps: int = 20,
    only: list[str] | None = None,
    seed: int = 0,
) -> dict[str, nn.Module]:
    """The compared models on one task. All but the ResNet share the cell
    ``f(z, x) = tanh(W z + U x + b)`` of width ``width`` (the ODE integrates
    ``dz/dt = f(z, x) - z`` from ``z(0) = 0`` to ``T = 1``); the ResNet has ``depth`` untied
    pre-norm tanh blocks of width ``resnet_width`` (default: matched to the DEQ's parameter
    count). Each model is initialised from ``seed``."""
    keys = only or list(MODELS)
    ref = DEQMLP(in_shape, num_classes, width=width)
    if resnet_width is None:
        resnet_width = matched_resnet_width(in_shape, num_classes, depth, n_params(ref))
    makers: dict[str, Callable[[], nn.Module]] = {
        "resnet": lambda: ResNetMLP(in_shape, num_classes, width=resnet_width, depth=depth,
                                    activation="tanh"),
        "unrolled": lambda: UnrolledMLP(in_shape, num_classes, depth=depth, width=width),
        "node_adjoint": lambda: NeuralODEClassifier(in_shape, num_classes, width=width,
                                                    rtol=ode_rtol, atol=ode_atol, adjoint=True),
        "node_direct": lambda: NeuralODEClassifier(in_shape, num_classes, width=width,
                                                   rtol=ode_rtol, atol=ode_atol, adjoint=False),
    }
    for kind in ("implicit", "jfb", "phantom"):
        makers[f"deq_{kind}"] = (
            lambda kind=kind: DEQMLP(in_shape, num_classes, width=width,
                                     adjoint=deq_adjoint(kind), max_steps=deq_max_steps)
        )
    # the backward that reuses the forward: Anderson's secant estimate M of (I - J)^-1
    # preconditions GMRES (reuse) or is the gradient itself, refined twice (SHINE)
    reuse = {"deq_reuse": ("implicit", {"reuse_forward": True}),
             "deq_shine": ("shine", {"shine_refine": 2})}
    for key, (kind, opts) in reuse.items():
        makers[key] = (
            lambda kind=kind, opts=opts: DEQMLP(in_shape, num_classes, width=width,
                                                adjoint=deq_adjoint(kind, **opts),
                                                max_steps=deq_max_steps)
        )
    makers["deq_reversible"] = lambda: DEQMLP(
        in_shape, num_classes, width=width, solver=names.build_solver("reversible", beta=0.5),
        adjoint=names.build_adjoint("reversible", reversible_checkpoint=4),
        max_steps=deq_max_steps)
    out = {}
    for k in keys:
        torch.manual_seed(seed)
        out[k] = makers[k]()
    return out


def f_evals(model: nn.Module) -> float:
    """Evaluations of the cell in the latest forward pass (depth for a ResNet)."""
    if isinstance(model, NeuralODEClassifier):
        return float(model.nfe)
    if isinstance(model, ResNetMLP):
        return float(model.depth)
    return float(model.deq.last_solution.stats["nfev"])


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 512) -> float:
    """Accuracy of ``model`` on ``(x, y)`` (the shared evaluation; 0 for no samples)."""
    if len(x) == 0:
        return 0.0
    return evaluate(model, torch.utils.data.TensorDataset(x, y), batch)["acc"]


def train_model(
    model: nn.Module,
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    epochs: int,
    batch: int,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    name: str = "",
    evals_per_epoch: int = 1,
) -> dict[str, Any]:
    """AdamW + cosine schedule, the same for every model (:func:`deqkit.app.train.fit`).
    Returns the history: per-step times and, ``evals_per_epoch`` times per epoch,
    (cumulative training wall time excluding evaluation, validation accuracy)."""
    x, _ = train
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(x) / batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * steps_per_epoch))
    history: list[dict[str, float]] = [{"epoch": 0, "time": 0.0,
                                        "val_acc": accuracy(model, *val)}]
    step_times: list[float] = []
    last = {"loss": float("nan")}

    def on_step(info: StepInfo) -> None:
        step_times.append(info.seconds)
        last["loss"] = info.loss

    def on_epoch(record: dict[str, Any], state: Any) -> None:
        elapsed = sum(step_times)
        history.append({"epoch": record["epoch"], "time": elapsed, "val_acc": record["val_acc"],
                        "loss": last["loss"]})
        if progress:
            progress(f"train {name:<13} epoch {record['epoch']:>3}/{epochs}  loss "
                     f"{last['loss']:.3f}  val acc {record['val_acc']:.3f}  ({elapsed:.1f} s)")

    res = fit(model, torch.utils.data.TensorDataset(*train), epochs=epochs, batch_size=batch,
              optimizer=opt, scheduler=sched, val_data=torch.utils.data.TensorDataset(*val),
              seed=seed, evals_per_epoch=evals_per_epoch, on_step=on_step, on_epoch=on_epoch)
    history += [{"epoch": r["epoch"], "time": r["time"], "val_acc": r["val_acc"],
                 "loss": r["loss"]} for r in res.evals]
    history.sort(key=lambda r: r["epoch"])  # mid-epoch evaluations between the epochs
    return {"history": history, "step_times": step_times, "train_time": sum(step_times)}


__all__ = ["MODELS", "accuracy", "build_models", "f_evals", "matched_resnet_width",
           "n_params", "train_model"]
