"""The compared model families, built from the MLP zoo, and their (shared) training loop."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

import deqkit as dk
from deqkit.zoo import DEQMLP, NeuralODEClassifier, ResNetMLP, UnrolledMLP

#: Model keys -> (family, label). Families follow the document's table columns.
MODELS: dict[str, tuple[str, str]] = {
    "resnet": ("standard", "ResNet (untied, L blocks)"),
    "unrolled": ("standard", "weight-tied, unrolled L times"),
    "node_adjoint": ("ode", "Neural ODE, adjoint"),
    "node_direct": ("ode", "Neural ODE, direct backprop"),
    "deq_implicit": ("deq", "DEQ, implicit (GMRES)"),
    "deq_jfb": ("deq", "DEQ, JFB"),
    "deq_phantom": ("deq", "DEQ, phantom(5, 0.5)"),
}


def n_params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def deq_adjoint(kind: str, backward_rtol: float = 1e-4) -> dk.AbstractAdjoint:
    if kind == "implicit":
        # restart=5: the Krylov basis (restart + 1 state-sized vectors per sample) is the DEQ's
        # only memory beyond one graph of f; GMRES(5) restarted reaches rtol 1e-4 within the 20
        # steps on these contractive cells (backward statistics are recorded in the run)
        return dk.ImplicitAdjoint(
            dk.GMRES(rtol=backward_rtol, atol=1e-8, max_steps=20, restart=5), on_failure="ignore"
        )
    if kind == "jfb":
        return dk.JacobianFreeAdjoint()
    if kind == "phantom":
        return dk.PhantomAdjoint(steps=5, damping=0.5)
    raise ValueError(f"unknown DEQ adjoint {kind!r}")


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


def ode_logits(model: NeuralODEClassifier, x: Tensor, *, adjoint: bool, method: str = "dopri5",
               rtol: float = 1e-3, atol: float = 1e-4,
               options: dict[str, Any] | None = None) -> Tensor:
    """``model``'s forward pass with a chosen integrator (same parameters and dynamics)."""
    import torchdiffeq

    u = model.inject(x.flatten(1))
    z0 = torch.zeros_like(u)
    t = torch.tensor([0.0, model.t_final], dtype=u.dtype)
    model.func.nfe = 0
    kw: dict[str, Any] = dict(rtol=rtol, atol=atol, method=method, options=options)
    if adjoint:
        kw["adjoint_options"] = options and dict(options)
        zT, _ = torchdiffeq.odeint_adjoint(model.func, (z0, u), t,
                                           adjoint_params=tuple(model.func.parameters()), **kw)
    else:
        zT, _ = torchdiffeq.odeint(model.func, (z0, u), t, **kw)
    model.nfe = model.func.nfe
    return model.head(zT[-1])


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 512) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return correct / max(1, len(x))


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
    """AdamW + cosine schedule, the same for every model. Returns the history: per-step times
    and, ``evals_per_epoch`` times per epoch, (cumulative training wall time excluding
    evaluation, validation accuracy)."""
    x, y = train
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(x) / batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * steps_per_epoch))
    gen = torch.Generator().manual_seed(seed)
    step_times: list[float] = []
    history: list[dict[str, float]] = [{"epoch": 0, "time": 0.0,
                                        "val_acc": accuracy(model, *val)}]
    elapsed = 0.0
    loss_v = float("nan")
    every = max(1, steps_per_epoch // max(1, evals_per_epoch))
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for j, i in enumerate(range(0, len(x), batch)):
            idx = perm[i:i + batch]
            t0 = time.perf_counter()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            dt = time.perf_counter() - t0
            step_times.append(dt)
            elapsed += dt
            loss_v = float(loss.detach())
            if (j + 1) % every == 0 and j + 1 < steps_per_epoch:
                history.append({"epoch": epoch - 1 + (j + 1) / steps_per_epoch,
                                "time": elapsed, "val_acc": accuracy(model, *val),
                                "loss": loss_v})
                model.train()
        acc = accuracy(model, *val)
        history.append({"epoch": epoch, "time": elapsed, "val_acc": acc, "loss": loss_v})
        if progress:
            progress(f"train {name:<13} epoch {epoch:>3}/{epochs}  loss {loss_v:.3f}  "
                     f"val acc {acc:.3f}  ({elapsed:.1f} s)")
    return {"history": history, "step_times": step_times, "train_time": elapsed}


__all__ = ["MODELS", "accuracy", "build_models", "f_evals", "matched_resnet_width",
           "n_params", "ode_logits", "train_model"]
