"""Stability benchmark: does regularisation keep a DEQ's forward solve cheap during training?

Trains the same small DEQ classifier on scikit-learn's ``load_digits`` (8x8 images flattened
to 64 features, fixed permutation, 1297/250/250 train/val/test) in three variants:

* ``plain``       -- no regularisation;
* ``jac_reg``     -- + Jacobian regularisation ``gamma * dk.jacobian_frobenius_reg`` at ``z*``
  (every step; Bai, Koltun, Kolter 2021, "Stabilizing Equilibrium Models by Jacobian
  Regularization");
* ``spec_norm``   -- + bounded spectral normalisation ``dk.nn.spectral_norm(W, bound=0.9)``.

Model: ``u = U x + b`` (input injection), ``z* = tanh(W z* + u)`` (the cell is
``dk.zoo.MLPCell``) solved by ``dk.Anderson`` (rtol 1e-4, max_steps 30) with the implicit
adjoint (``dk.ImplicitAdjoint(dk.GMRES())``), logits ``= head(z*)``; Adam. ``W`` is
initialised with a large spectral norm (1.0) so that the plain model drifts towards
non-contractivity as it trains.

Per epoch it records the mean forward steps (training), the backward GMRES iterations and
residual (training), the training loss, the validation accuracy, and a
:func:`deqkit.stability_report` on a fixed validation batch (the first
``--diag-batch`` validation samples; eval-mode forward steps, ``rho(J)`` and ``||J||_2`` at
``z*``, backward convergence).  The epoch time excludes the validation diagnosis.  At the end
it prints Markdown tables and writes ``benchmarks/results/bench_stability.json``.

Usage::

    python benchmarks/bench_stability.py            # full run (a few minutes on 1 core)
    python benchmarks/bench_stability.py --quick    # smoke run (< 40 s)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

import deqkit as dk
from deqkit import stability_report

RESULTS_DIR = Path(__file__).resolve().parent / "results"
VARIANTS = ("plain", "jac_reg", "spec_norm")


def make_cell(width: int, init_norm: float) -> dk.zoo.MLPCell:
    """The zoo's DEQ MLP cell ``f(z, u) = tanh(W z + u)`` (the injection ``u = U x + b`` is
    computed outside), unconstrained, with ``W`` rescaled to spectral norm ``init_norm``."""
    cell = dk.zoo.MLPCell(width, spectral_bound=None)
    with torch.no_grad():
        w = torch.randn(width, width) / math.sqrt(width)
        cell.linear.weight.copy_(init_norm * w / torch.linalg.matrix_norm(w, 2))
    return cell


class Model(nn.Module):
    def __init__(self, width: int, init_norm: float, spec_norm: bool, max_steps: int) -> None:
        super().__init__()
        self.inj = nn.Linear(64, width)
        self.cell = make_cell(width, init_norm)
        if spec_norm:  # bounded after the initial rescaling, as MLPCell(spectral_bound=0.9)
            dk.nn.spectral_norm(self.cell.linear, bound=0.9)
        self.deq = dk.nn.DEQ(
            self.cell,
            solver=dk.Anderson(rtol=1e-4, atol=1e-6, m=5),
            adjoint=dk.ImplicitAdjoint(dk.GMRES(), on_failure="ignore"),
            max_steps=max_steps,
        )
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        u = self.inj(x)
        z = self.deq(u)
        return self.head(z), z, u


def load_data() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.int64)
    perm = torch.from_numpy(np.random.RandomState(0).permutation(len(X)))
    X, y = X[perm], y[perm]
    n_tr, n_va = 1297, 250
    return {
        "train": (X[:n_tr], y[:n_tr]),
        "val": (X[n_tr : n_tr + n_va], y[n_tr : n_tr + n_va]),
        "test": (X[n_tr + n_va :], y[n_tr + n_va :]),
    }


def accuracy(model: Model, X: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        logits, _, _ = model(X)
    model.train()
    return float((logits.argmax(1) == y).float().mean())


def train_epoch(model: Model, opt: torch.optim.Optimizer, variant: str, X: torch.Tensor,
                y: torch.Tensor, gen: torch.Generator,
                args: argparse.Namespace) -> dict[str, list[float]]:
    """One epoch of training; per-step loss, regulariser, forward and backward statistics."""
    model.train()
    perm = torch.randperm(len(X), generator=gen)
    st: dict[str, list[float]] = {k: [] for k in ("loss", "reg", "steps", "fconv", "bsteps",
                                                  "bres", "bconv")}
    for i in range(0, len(X), args.batch_size):
        idx = perm[i : i + args.batch_size]
        logits, z, u = model(X[idx])
        loss = nn.functional.cross_entropy(logits, y[idx])
        total = loss
        if variant == "jac_reg":
            reg = dk.jacobian_frobenius_reg(lambda v, u=u: model.cell(v, u), z)
            total = loss + args.gamma * reg
            st["reg"].append(reg.item())
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        sol = model.deq.last_solution
        assert sol is not None
        st["steps"].append(float(sol.stats["nstep"].float().mean()))
        st["fconv"].append(float(sol.stats["converged"].float().mean()))
        st["loss"].append(loss.item())
        if "nstep" in sol.backward:
            st["bsteps"].append(float(sol.backward["nstep"].float().mean()))
            st["bres"].append(float(sol.backward["residual"].max()))
            st["bconv"].append(float(sol.backward["converged"].float().mean()))
    return st


def _mean(v: list[float]) -> float | None:
    return float(np.mean(v)) if v else None


def epoch_record(epoch: int, st: dict[str, list[float]], val_acc: float, rep: Any,
                 epoch_time: float) -> dict[str, Any]:
    """The history entry of one epoch: training statistics and the validation diagnosis."""
    return {
        "epoch": epoch,
        "train_loss": float(np.mean(st["loss"])),
        "jac_reg": _mean(st["reg"]),
        "fwd_steps": float(np.mean(st["steps"])),
        "fwd_converged": float(np.mean(st["fconv"])),
        "bwd_iters": _mean(st["bsteps"]),
        "bwd_residual_max": float(np.max(st["bres"])) if st["bres"] else None,
        "bwd_converged": _mean(st["bconv"]),
        "val_acc": val_acc,
        "val_fwd_steps": rep.mean_nstep,
        "val_rho_mean": rep.rho_mean,
        "val_rho_max": rep.rho_max,
        "val_norm_mean": rep.norm_mean,
        "val_bwd_converged": 1.0 - rep.n_backward_failed / rep.batch_size,
        "val_warnings": rep.warnings,
        "epoch_time_s": epoch_time,
    }


def run_variant(
    variant: str,
    data: dict[str, tuple[torch.Tensor, torch.Tensor]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    torch.manual_seed(0)
    model = Model(args.width, args.init_norm, variant == "spec_norm", args.max_steps)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    Xtr, ytr = data["train"]
    Xva, yva = data["val"]
    if args.quick:
        Xtr, ytr = Xtr[:512], ytr[:512]
    gen = torch.Generator().manual_seed(1)
    history: list[dict[str, Any]] = []
    print(f"\n== {variant} ==")
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        st = train_epoch(model, opt, variant, Xtr, ytr, gen, args)
        epoch_time = time.perf_counter() - t0
        val_acc = accuracy(model, Xva, yva)
        # diagnosis on the fixed validation set (eval mode), not timed
        model.eval()
        with torch.no_grad():
            u_val = model.inj(Xva[: args.diag_batch])
        rep = stability_report(model.deq, u_val, krylov_dim=args.width)
        model.train()
        rec = epoch_record(epoch, st, val_acc, rep, epoch_time)
        history.append(rec)
        print(
            f"epoch {epoch:2d}  loss {rec['train_loss']:.4f}  fwd steps {rec['fwd_steps']:5.2f}"
            f" (conv {100 * rec['fwd_converged']:.0f}%)  bwd iters {rec['bwd_iters']:5.2f}"
            f" res {rec['bwd_residual_max']:.1e}  rho(J) val {rep.rho_mean:.3f}/"
            f"{rep.rho_max:.3f}  ||J|| {rep.norm_mean:.3f}  val acc {val_acc:.3f}"
            f"  {epoch_time:.1f}s"
        )
    Xte, yte = data["test"]
    final_report = stability_report(
        model.deq.eval(), model.inj(Xva[: args.diag_batch]).detach(), krylov_dim=args.width
    )
    model.train()
    print(final_report)
    return {
        "history": history,
        "test_acc": accuracy(model, Xte, yte),
        "final_report": final_report.to_dict(),
        "total_train_time_s": sum(r["epoch_time_s"] for r in history),
    }


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    cols = [
        ("fwd steps", "fwd_steps", "{:.1f}"),
        ("rho(J) val", "val_rho_mean", "{:.3f}"),
        ("bwd iters", "bwd_iters", "{:.1f}"),
        ("loss", "train_loss", "{:.3f}"),
        ("val acc", "val_acc", "{:.3f}"),
        ("time s", "epoch_time_s", "{:.1f}"),
    ]
    header = ["epoch"] + [f"{v}: {c[0]}" for c in cols for v in results]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    n_epochs = max(len(r["history"]) for r in results.values())
    for e in range(n_epochs):
        row = [str(e + 1)]
        for _, key, fmt in cols:
            for v in results:
                hist = results[v]["history"]
                val = hist[e][key] if e < len(hist) else None
                row.append(fmt.format(val) if val is not None else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def summary_table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| variant | fwd steps first -> last | rho(J) val first -> last | "
        "bwd iters first -> last | final loss | val acc | test acc | train time s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v, r in results.items():
        h0, h1 = r["history"][0], r["history"][-1]
        lines.append(
            f"| {v} | {h0['fwd_steps']:.1f} -> {h1['fwd_steps']:.1f} | "
            f"{h0['val_rho_mean']:.3f} -> {h1['val_rho_mean']:.3f} | "
            f"{h0['bwd_iters']:.1f} -> {h1['bwd_iters']:.1f} | {h1['train_loss']:.3f} | "
            f"{h1['val_acc']:.3f} | {r['test_acc']:.3f} | {r['total_train_time_s']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (< 40 s)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--gamma", type=float, default=2.0, help="Jacobian reg. weight")
    parser.add_argument("--init-norm", type=float, default=1.0, help="initial ||W||_2")
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument(
        "--diag-batch", type=int, default=128, help="fixed validation batch for the diagnosis"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_stability.json")
    args = parser.parse_args()
    if args.epochs is None:
        args.epochs = 2 if args.quick else 20
    torch.set_num_threads(1)
    data = load_data()
    t0 = time.perf_counter()
    results = {v: run_variant(v, data, args) for v in VARIANTS}
    wall = time.perf_counter() - t0
    table = markdown_table(results)
    summary = summary_table(results)
    print("\n" + summary + "\n\n" + table)
    print(f"\ntotal wall time {wall:.1f}s")
    if not args.quick or args.out != RESULTS_DIR / "bench_stability.json":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "environment": {
                "torch": torch.__version__,
                "python": platform.python_version(),
                "machine": platform.machine(),
                "threads": torch.get_num_threads(),
            },
            "wall_time_s": wall,
            "summary_table": summary,
            "epoch_table": table,
            "results": results,
        }
        args.out.write_text(json.dumps(payload, indent=1, allow_nan=False))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
