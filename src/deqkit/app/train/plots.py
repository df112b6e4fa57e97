"""PNG plots of a training run (matplotlib, optional)."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..files import write_file


def _save(fig: Any, path: str) -> None:
    """A PNG written atomically (a kill never leaves a torn image)."""
    write_file(path, lambda fh: fig.savefig(fh, format="png", dpi=110))


def _pyplot():  # type: ignore[no-untyped-def]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        return None
    return plt


def plot_history(history: list[dict[str, Any]], run_dir: str) -> list[str]:
    """Loss/accuracy curves (``curves.png``) and forward steps/residual per epoch
    (``solver.png``) of a run's epoch records; the paths written (none without
    matplotlib)."""
    plt = _pyplot()
    if plt is None or not history:
        return []
    ep = [h["epoch"] for h in history]
    written = []
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(ep, [h["train_loss"] for h in history], label="train")
    ax[0].plot(ep, [h["val_loss"] for h in history], label="val")
    ax[0].set(xlabel="epoch", ylabel="loss", title="loss")
    ax[0].legend()
    ax[1].plot(ep, [h["train_acc"] for h in history], label="train")
    ax[1].plot(ep, [h["val_acc"] for h in history], label="val")
    ax[1].set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    ax[1].legend()
    fig.tight_layout()
    path = os.path.join(run_dir, "curves.png")
    _save(fig, path)
    plt.close(fig)
    written.append(path)
    if "train_fwd_steps" in history[0]:
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
        ax[0].plot(ep, [h["train_fwd_steps"] for h in history], label="train")
        ax[0].plot(ep, [h.get("val_fwd_steps", float("nan")) for h in history], label="val")
        ax[0].set(xlabel="epoch", ylabel="mean forward steps", title="solver steps")
        ax[0].legend()
        ax[1].semilogy(ep, [max(h["train_fwd_rel_res"], 1e-12) for h in history], label="train")
        ax[1].semilogy(ep, [max(h.get("val_fwd_rel_res", 1e-12), 1e-12) for h in history],
                       label="val")
        ax[1].set(xlabel="epoch", ylabel="relative residual", title="forward residual")
        ax[1].legend()
        fig.tight_layout()
        path = os.path.join(run_dir, "solver.png")
        _save(fig, path)
        plt.close(fig)
        written.append(path)
    return written


@torch.no_grad()
def plot_residual_traces(model: Any, dataset: Any, run_dir: str, n: int = 32) -> str | None:
    """Residual trace of every sample of one test batch (the forward solve with trace=True)."""
    plt = _pyplot()
    deq = getattr(model, "deq", None)
    if plt is None or deq is None or not hasattr(deq, "fp_kwargs"):
        return None
    x, _ = next(iter(torch.utils.data.DataLoader(dataset, batch_size=n, shuffle=False)))
    p = next(iter(model.parameters()), None)
    x = x.to(p.device) if p is not None else x
    model.eval()
    old = dict(deq.fp_kwargs)
    deq.fp_kwargs["trace"] = True
    try:
        model(x)
    finally:
        deq.fp_kwargs.clear()
        deq.fp_kwargs.update(old)
    tr = deq.last_solution.stats.get("trace")
    if tr is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.semilogy(tr.float().cpu().numpy(), color="tab:blue", alpha=0.35, lw=1)
    ax.set(xlabel="solver step", ylabel="||f(z) - z||", title="forward residual per sample")
    fig.tight_layout()
    path = os.path.join(run_dir, "residual_traces.png")
    _save(fig, path)
    plt.close(fig)
    return path
