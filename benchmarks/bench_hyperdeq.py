"""HyperDEQ benchmark: a learned solver (``HyperAnderson``) vs tuned Anderson on a trained DEQ.

Bai, Koltun, Kolter, "Neural Deep Equilibrium Solvers", ICLR 2022. Steps:

1. train ``dk.zoo.ConvDEQ((1, 8, 8), 10)`` (defaults) on ``digits`` (AdamW, lr 3e-3, cosine,
   batch 64, ``--epochs`` epochs), then freeze it;
2. tune ``dk.Anderson`` from a zero start on the test set over ``m in {3, 5, 8}``,
   ``beta in {1.0, 0.8}`` (best = fewest mean f evaluations to rel. residual 1e-4);
3. train a ``HyperAnderson`` (learned initialiser + learned Anderson weights/damping) with
   ``train_hyper_solver`` on the training injections ``model.stem(x)``: first the initialiser
   alone (``--init-layers`` 3x3 conv + GroupNorm + ReLU layers, ``--init-hidden`` wide)
   regresses tightly solved equilibria z* (``--pretrain-steps``; with
   ``--pretrain-cell-steps 1`` the target is fitted by f(z0), the solve's first, counted,
   step), then everything is trained
   jointly on the unrolled solve (``--hyper-steps``, ``--unroll``); the initialiser calls no
   f, so ``nstep + 1`` counts every f evaluation;
4. on the test set, per solver: mean f evaluations per sample (``nstep + 1``, from the
   driver's per-sample statistics, one solve per tolerance with ``atol=0``) to reach relative
   residual 1e-3 and 1e-4, the fraction that got there within ``--max-steps``, the wall time
   of the 1e-4 solve, and the test accuracy of the head on each solver's output.

Also reported (ablations): Anderson from the predicted initial state (initialiser only) and
the untrained ``HyperAnderson`` (= Anderson with beta 0.9 from a zero start).

Prints a Markdown table and writes ``benchmarks/results/bench_hyperdeq.json``.
Usage: ``python benchmarks/bench_hyperdeq.py [--epochs 7] [--hyper-steps 300]
[--pretrain-steps 1000] [--init-layers 2] [--quick]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

import deqkit as dk
from deqkit.data import load_dataset
from deqkit.solvers.hyper import HyperAnderson, train_hyper_solver

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _deqbench import RESULTS_DIR, environment

TOLS = {"1e-3": 1e-3, "1e-4": 1e-4}


def batches(x: torch.Tensor, y: torch.Tensor | None, size: int, gen: torch.Generator | None):
    idx = torch.randperm(x.shape[0], generator=gen) if gen is not None else torch.arange(len(x))
    for i in range(0, x.shape[0], size):
        j = idx[i : i + size]
        yield x[j], (None if y is None else y[j])


def train_model(splits: Any, epochs: int, seed: int) -> tuple[torch.nn.Module, float]:
    torch.manual_seed(seed)
    model = dk.zoo.ConvDEQ((1, 8, 8), 10)
    xtr, ytr = splits.train.tensors
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    steps = epochs * math.ceil(len(xtr) / 64)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for xb, yb in batches(xtr, ytr, 64, gen):
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval(), time.perf_counter() - t0


def solve(model: Any, u: torch.Tensor, z0: torch.Tensor, solver: Any, max_steps: int) -> Any:
    with torch.no_grad():
        return dk.fixed_point(
            model.deq.cell, z0, solver=solver, max_steps=max_steps, args=(u,), throw=False
        )


def evaluate(
    model: Any,
    u: torch.Tensor,
    y: torch.Tensor,
    make_solver: Any,
    start: Any,
    max_steps: int,
) -> dict[str, Any]:
    """Per tolerance: mean f evals per sample to reach it, fraction reached, wall time, acc."""
    out: dict[str, Any] = {}
    for name, tol in TOLS.items():
        solver = make_solver(tol)
        t0 = time.perf_counter()
        with torch.no_grad():
            z0 = start(u)
            sol = solve(model, u, z0, solver, max_steps)
        wall = time.perf_counter() - t0
        conv = sol.stats["converged"]
        nfev = (sol.stats["nstep"] + 1).double()
        with torch.no_grad():
            acc = (model.head(model.features(sol.value)).argmax(1) == y).double().mean()
        out[name] = {
            "mean_nfev": float(nfev.mean()),
            "mean_nfev_converged": float(nfev[conv].mean()) if bool(conv.any()) else None,
            "converged": float(conv.double().mean()),
            "wall_s": wall,
            "accuracy": float(acc),
            "total_nfev_rows": int(sol.stats["nfev_samples"]),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=7)
    ap.add_argument("--hyper-steps", type=int, default=300)
    ap.add_argument("--unroll", type=int, default=12)
    ap.add_argument("--hyper-lr", type=float, default=3e-3)
    ap.add_argument("--loss", default="log", choices=("relative", "log"))
    ap.add_argument("--init-groups", type=int, default=8)
    ap.add_argument(
        "--init-weight", type=float, default=0.0,
        help="joint-phase weight of ||z0 - z*|| (0: z0 is fitted for the first step f(z0))",
    )
    ap.add_argument("--init-layers", type=int, default=2,
                    help="3x3 conv+GN+ReLU layers of the initialiser (0: depthwise+pointwise)")
    ap.add_argument("--init-hidden", type=int, default=32)
    ap.add_argument("--pretrain-steps", type=int, default=1000,
                    help="initialiser-only regression steps on z* before the joint training")
    ap.add_argument(
        "--pretrain-cell-steps",
        type=int,
        default=1,
        help="fit f^c(z0) to z* in the pretraining (the solve's own first plain step(s))",
    )
    ap.add_argument("--max-steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="2 epochs, 40 solver steps")
    ap.add_argument("--out", default=str(RESULTS_DIR / "bench_hyperdeq.json"))
    a = ap.parse_args()
    if a.quick:
        a.epochs, a.hyper_steps, a.pretrain_steps = 2, 40, 100
    torch.set_num_threads(1)
    env = environment()
    splits = load_dataset("digits", seed=a.seed)

    model, model_time = train_model(splits, a.epochs, a.seed)
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    n_model = sum(p.numel() for p in model.parameters())
    before = copy.deepcopy(model.state_dict())
    xte, yte = splits.test.tensors
    xtr, _ = splits.train.tensors
    with torch.no_grad():
        acc_default = float((model(xte).argmax(1) == yte).double().mean())
        u_te = model.stem(xte)
        u_tr = [model.stem(xb) for xb, _ in batches(xtr, None, 64, None)]
    zeros = torch.zeros_like
    print(f"model: {n_model} parameters, trained in {model_time:.1f} s, test acc "
          f"{acc_default:.4f} (default solver)", flush=True)

    rows: dict[str, Any] = {}
    grid = {}
    for m in (3, 5, 8):
        for beta in (1.0, 0.8):
            res = evaluate(
                model, u_te, yte,
                lambda tol, m=m, beta=beta: dk.Anderson(m=m, beta=beta, rtol=tol, atol=0),
                zeros, a.max_steps,
            )
            grid[f"m={m},beta={beta}"] = res
            print(f"Anderson m={m} beta={beta}: "
                  + ", ".join(f"{t}: {r['mean_nfev']:.2f}" for t, r in res.items()), flush=True)

    def key(r: dict) -> tuple:
        return (-r["1e-4"]["converged"], r["1e-4"]["mean_nfev"], r["1e-3"]["mean_nfev"])

    best_name = min(grid, key=lambda k: key(grid[k]))
    rows[f"Anderson ({best_name}), zero start [tuned]"] = grid[best_name]
    bm = int(best_name.split(",")[0].split("=")[1])
    bb = float(best_name.split(",")[1].split("=")[1])

    torch.manual_seed(a.seed)
    solver = HyperAnderson(
        tuple(u_te.shape[1:]), m=5, init_groups=a.init_groups, init_layers=a.init_layers,
        init_hidden=a.init_hidden,
    )
    n_solver = sum(p.numel() for p in solver.parameters())
    n_init = sum(p.numel() for p in solver.init_map.parameters())

    def hyper_maker(tol: float) -> HyperAnderson:
        solver.rtol, solver.atol = tol, 0.0
        return solver

    rows["HyperAnderson untrained, zero start"] = evaluate(
        model, u_te, yte, hyper_maker, zeros, a.max_steps
    )
    log_every = max(1, a.hyper_steps // 10)

    def cb(i: int, v: float) -> None:
        if i % log_every == 0 or i == a.hyper_steps - 1:
            print(f"  hyper step {i}: loss {v:.4f}", flush=True)

    gen = torch.Generator().manual_seed(a.seed + 1)

    class Shuffled:
        def __iter__(self):
            for i in torch.randperm(len(u_tr), generator=gen).tolist():
                yield u_tr[i]

    train = train_hyper_solver(
        model.deq, Shuffled(), solver, steps=a.hyper_steps, k=a.unroll, lr=a.hyper_lr,
        loss=a.loss, init_weight=a.init_weight, callback=cb,
        init_pretrain_steps=a.pretrain_steps,
        init_pretrain_cell_steps=a.pretrain_cell_steps,
    )
    pre_time = train["pretrain"]["time_s"] if "pretrain" in train else 0.0
    solver.eval()
    unchanged = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    no_grad = all(p.grad is None for p in model.parameters())
    print(f"solver trained in {train['time_s']:.1f} s (initialiser pretraining "
          f"{pre_time:.1f} s); model unchanged: {unchanged}, "
          f"no grads: {no_grad}", flush=True)

    with torch.no_grad():
        z0 = solver.initial_state(u_te)
        ref = solve(model, u_te, zeros(u_te), dk.Anderson(m=5, rtol=1e-6, atol=0), 200).value
        init_err = float(
            ((z0 - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).mean()
        )
        z1 = model.deq.cell(z0, u_te)  # the solve's first (counted) step
        step1_err = float(
            ((z1 - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).mean()
        )

    rows[f"Anderson ({best_name}), predicted z0"] = evaluate(
        model, u_te, yte, lambda tol: dk.Anderson(m=bm, beta=bb, rtol=tol, atol=0),
        solver.initial_state, a.max_steps,
    )
    rows["HyperAnderson (trained), predicted z0"] = evaluate(
        model, u_te, yte, hyper_maker, solver.initial_state, a.max_steps
    )
    base = rows[f"Anderson ({best_name}), zero start [tuned]"]
    hyp = rows["HyperAnderson (trained), predicted z0"]
    speedup = {t: base[t]["mean_nfev"] / hyp[t]["mean_nfev"] for t in base}
    acc_delta = {t: hyp[t]["accuracy"] - base[t]["accuracy"] for t in base}
    met = all(s >= 2.0 for s in speedup.values()) and all(
        abs(d) <= 0.005 for d in acc_delta.values()
    ) and all(hyp[t]["converged"] >= base[t]["converged"] for t in base)

    lines = [
        "| solver | f evals to 1e-3 | f evals to 1e-4 | reached 1e-4 | wall 1e-4 (s) | "
        "test acc (1e-4) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['1e-3']['mean_nfev']:.2f} | {r['1e-4']['mean_nfev']:.2f} | "
            f"{r['1e-4']['converged']:.3f} | {r['1e-4']['wall_s']:.3f} | "
            f"{r['1e-4']['accuracy']:.4f} |"
        )
    table = "\n".join(lines)
    summary = (
        f"model {n_model} params (trained {model_time:.1f} s, default-solver test acc "
        f"{acc_default:.4f}); HyperAnderson {n_solver} extra params "
        f"({100 * n_solver / n_model:.2f}% of the model; initialiser {n_init}), trained "
        f"{train['time_s']:.1f} s ({a.pretrain_steps} initialiser pretraining steps, "
        f"{a.hyper_steps} joint steps, unroll {a.unroll}); initial-state "
        f"rel. error {init_err:.3f} (after the first plain step f(z0): {step1_err:.3f}); "
        "f-eval reduction vs tuned Anderson: "
        + ", ".join(f"{t}: {s:.2f}x" for t, s in speedup.items())
        + f"; target (>= 2x at both tolerances, accuracy unchanged) met: {met}"
    )
    print()
    print(table)
    print()
    print(summary)

    out = {
        "environment": env,
        "config": vars(a),
        "model": {"parameters": n_model, "train_time_s": model_time,
                  "test_accuracy_default_solver": acc_default},
        "hyper_solver": {"parameters": n_solver, "initialiser_parameters": n_init,
                         "percent_of_model": 100 * n_solver / n_model,
                         "train_time_s": train["time_s"],
                         "pretrain_time_s": pre_time,
                         "pretrain_loss_last": (train["pretrain"]["loss"][-1]
                                                if "pretrain" in train else None),
                         "loss_first": train["loss"][0],
                         "loss_last": train["loss"][-1],
                         "initial_state_rel_error": init_err,
                         "first_step_rel_error": step1_err,
                         "model_unchanged": unchanged, "model_grads_none": no_grad},
        "anderson_grid": grid,
        "tuned_anderson": best_name,
        "rows": rows,
        "speedup_nfev": speedup,
        "accuracy_delta": acc_delta,
        "target_met": met,
        "table": table,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
