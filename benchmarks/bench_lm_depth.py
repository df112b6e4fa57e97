#!/usr/bin/env python
"""Char-level LM on the shipped corpus: DEQ transformer vs explicit depth, equal tokens seen.

Issue 18 (part 2): "DEQ transformers are competitive with explicit-depth transformers while
using O(1) memory", and issue 19 (the reversible solver/adjoint on the char LM).

Every row gets the same number of training steps (``--steps``), the same batch size (32
blocks of 64 characters), the same batch order (a permutation of the training blocks per
pass over the data from ``--seed`` and the pass number, full batches only) and the same
initialisation seed; AdamW (weight decay 0.01 on matrices only), gradient clipping at 1.0,
linear learning-rate warm-up over ``--warmup`` steps then a cosine decay over the steps.
Validation bits per character are evaluated every ``--eval-every`` steps (and at the end);
the state with the best validation bpc is kept in memory and evaluated on test (so
overfitting of the small corpus is handled by early stopping). Training time is process CPU
time of the training steps only (one torch thread), evaluations excluded.

Rows (``--rows``, comma-separated):

* ``L1, L2, L4, L8``: ``TransformerLM`` with that many untied blocks (lr ``--lr``);
* ``deq-onestep``: the zoo recipe of ``DEQTransformerLM`` (one Picard step from zero, then
  ``OneStepAdjoint(residual_weight=1)``), lr ``--deq-lr`` (the reference);
* ``deq-implicit`` / ``deq-phantom`` / ``deq-jfb``: paper-style recipe (Bai et al. 2019,
  2021): for the first ``--unroll-frac`` of the steps the weight-tied cell is unrolled
  ``--unroll-depth`` times from zero with full backpropagation (no solver); afterwards the
  equilibrium is solved with Anderson (m=5, rtol 1e-4) under a step budget that grows linearly
  from ``--budget-start`` to ``--budget-end`` over the remaining steps, with the implicit
  adjoint (GMRES restart 4, at most 16 products), the phantom gradient (5 damped steps) or
  JFB, plus ``--jac-weight`` times the Hutchinson estimate of ||J_f(z*)||_F^2 / D (one probe
  vector, Bai, Koltun, Kolter 2021) and ``--res-weight`` times the squared relative residual
  ||f(z*) - z*||^2 / ||z*||^2, both from one evaluation of the cell at the detached z* of the
  first ``--reg-batch`` (4) sequences of the batch (the double-backward graph of a full batch
  would double the step's memory; the attention of that evaluation uses the math SDPA
  kernel, since the CPU flash kernel's backward is not differentiable);
* ``deq-rev``: the same recipe with ``dk.Reversible(beta=--rev-beta)`` and
  ``dk.ReversibleAdjoint(checkpoint_every=--rev-checkpoint)``; its budget is in reversible
  steps (two cell evaluations each): ``--rev-budget-start`` to ``--rev-budget-end``.

The DEQ rows evaluate with their training solver (tolerance 1e-4) and at most
``--eval-steps`` (50) steps (``--rev-eval-steps``, 100, for the reversible solver, which
converges more slowly than Anderson); the test relative residual and steps are reported.

Memory of one training step (forward + loss + regularisers + backward, the same batch, after
training, in the recipe's final mode), with ``deqkit.app.compare.memory``: peak live bytes
(profiler) and saved-for-backward bytes (parameters and the batch excluded).

Usage:  .venv/bin/python benchmarks/bench_lm_depth.py [--quick] [--steps 2500]
        [--seeds 0,1] [--rows L1,L2,L4,L8,deq-onestep,deq-implicit,deq-rev] [--out PATH]
        [--partial ROWS.jsonl] [--variant NAME] [--from-jsonl A.jsonl,B.jsonl]
        (recipe flags: --jac-weight, --res-weight, --unroll-frac, --budget-start/-end, ...;
        see --help and benchmarks/results/bench_lm_depth.md for the commands of the results)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))

import deqkit as dk
from _deqbench import RESULTS_DIR, cpu_model, md_table
from bench_lm import LN2, MIB, evaluate_lm, quiet_stderr
from deqkit.app.compare.memory import (
    PEAK_METHOD,
    SAVED_METHOD,
    peak_live_bytes,
    saved_tensor_bytes,
)
from deqkit.app.train import make_optimizer, solver_stats
from deqkit.data import load_dataset
from deqkit.nn import reset_dropout
from deqkit.zoo import DEQTransformerLM, TransformerLM

ALL_ROWS = ("L1", "L2", "L4", "L8", "deq-onestep", "deq-implicit", "deq-phantom", "deq-jfb",
            "deq-rev")
DEFAULT_ROWS = "L1,L2,L4,L8,deq-onestep,deq-implicit,deq-rev"
LABELS = {
    "deq-onestep": "DEQ zoo (one-step + penalty)",
    "deq-implicit": "DEQ paper (unroll warm-up, Anderson, implicit)",
    "deq-phantom": "DEQ paper (unroll warm-up, Anderson, phantom-5)",
    "deq-jfb": "DEQ paper (unroll warm-up, Anderson, JFB)",
    "deq-rev": "DEQ paper (unroll warm-up, reversible)",
}


def label(kind: str) -> str:
    return f"Transformer L={kind[1:]}" if kind.startswith("L") else LABELS[kind]


def is_paper(kind: str) -> bool:
    return kind.startswith("deq-") and kind != "deq-onestep"


# ----------------------------------------------------------------------------- models


def build(kind: str, vocab: int, args: argparse.Namespace, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    size = dict(d_model=args.d_model, n_heads=args.n_heads, d_ff=args.d_ff, block_size=64)
    if kind.startswith("L"):
        return TransformerLM(vocab, depth=int(kind[1:]), **size)
    if kind == "deq-onestep":
        return DEQTransformerLM(vocab, adjoint=dk.OneStepAdjoint(1.0), max_steps=1,
                                eval_max_steps=args.eval_steps, **size)
    if kind == "deq-rev":
        solver: Any = dk.Reversible(beta=args.rev_beta, rtol=1e-4, atol=1e-6)
        adjoint: Any = dk.ReversibleAdjoint(checkpoint_every=args.rev_checkpoint,
                                            on_error="ignore")
        start = args.rev_budget_start
        return DEQTransformerLM(vocab, solver=solver, adjoint=adjoint, max_steps=start,
                                eval_max_steps=args.rev_eval_steps, **size)
    else:
        solver = dk.Anderson(m=5, rtol=1e-4, atol=1e-6)
        start = args.budget_start
        adjoint = {
            "deq-implicit": lambda: dk.ImplicitAdjoint(
                dk.GMRES(rtol=1e-4, atol=1e-8, max_steps=16, restart=4), on_failure="ignore"),
            "deq-phantom": lambda: dk.PhantomAdjoint(steps=5, damping=0.5),
            "deq-jfb": dk.JacobianFreeAdjoint,
        }[kind]()
    return DEQTransformerLM(vocab, solver=solver, adjoint=adjoint, max_steps=start,
                            eval_max_steps=args.eval_steps, **size)


def learning_rate(kind: str, args: argparse.Namespace) -> float:
    if kind.startswith("L"):
        return args.lr
    return args.deq_lr if kind == "deq-onestep" else args.paper_lr


def unrolled_logits(model: DEQTransformerLM, idx: torch.Tensor, depth: int) -> torch.Tensor:
    """The weight-tied cell applied ``depth`` times from zero, full backpropagation (the
    warm-up of the DEQ papers: a weight-tied explicit network before the equilibrium)."""
    u = model.embed(idx)
    reset_dropout(model.deq.cell)
    z = torch.zeros_like(u)
    for _ in range(depth):
        z = model.deq.cell(z, u)
    return model.logits(z)


class Recipe:
    """The loss of one training step of a row and its per-step schedule (solve budget,
    warm-up mode)."""

    def __init__(self, kind: str, model: nn.Module, args: argparse.Namespace) -> None:
        self.kind, self.model, self.args = kind, model, args
        self.paper = is_paper(kind)
        self.unroll_steps = round(args.unroll_frac * args.steps) if self.paper else 0
        if kind == "deq-rev":
            self.b0, self.b1 = args.rev_budget_start, args.rev_budget_end
        else:
            self.b0, self.b1 = args.budget_start, args.budget_end
        self.unrolled = False

    def set_step(self, step: int) -> None:
        if not self.paper:
            return
        self.unrolled = step < self.unroll_steps
        rest = max(1, self.args.steps - self.unroll_steps - 1)
        frac = min(1.0, max(0.0, (step - self.unroll_steps) / rest))
        self.model.deq.max_steps = round(self.b0 + frac * (self.b1 - self.b0))

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(total loss, cross-entropy)."""
        model = self.model
        if self.unrolled:
            out = unrolled_logits(model, x, self.args.unroll_depth)  # type: ignore[arg-type]
        else:
            out = model(x)
        ce = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        total = ce
        if self.paper and not self.unrolled and (self.args.jac_weight or self.args.res_weight):
            total = total + self.regulariser()
        return total, ce

    def regulariser(self) -> torch.Tensor:
        """``jac_weight`` x Hutchinson estimate of ||J_f(z*)||_F^2 / D (one probe vector;
        Bai, Koltun, Kolter 2021) + ``res_weight`` x ||f(z*) - z*||^2 / ||z*||^2, both from
        one evaluation of the cell at the detached equilibrium of the first ``--reg-batch``
        sequences (a sub-batch keeps the double-backward graph small)."""
        deq, a = self.model.deq, self.args
        (u,), z = deq._last_call
        k = min(a.reg_batch, z.shape[0])
        u, z = u[:k], z[:k].detach().requires_grad_(a.jac_weight > 0)
        # double backward through attention needs the math SDPA kernel (the CPU flash
        # kernel's backward has no derivative)
        with sdpa_kernel(SDPBackend.MATH):
            fz = deq.cell(z, u)
        reg = fz.new_zeros(())
        if a.jac_weight > 0:
            v = torch.randn_like(fz)
            (vj,) = torch.autograd.grad(fz, z, v, create_graph=True)
            reg = reg + a.jac_weight * vj.pow(2).sum() / v.numel()
        if a.res_weight > 0:
            zd = z.detach()
            reg = reg + a.res_weight * (fz - zd).pow(2).sum() / zd.pow(2).sum().clamp_min(1e-12)
        return reg


# ----------------------------------------------------------------------------- training


def batch_order(n: int, batch: int, seed: int, steps: int) -> list[torch.Tensor]:
    """Indices of every training batch: one permutation per pass from (seed, pass), full
    batches only; the same for every row."""
    out: list[torch.Tensor] = []
    epoch = 0
    while len(out) < steps:
        g = torch.Generator().manual_seed(1000003 * seed + epoch)
        perm = torch.randperm(n, generator=g)
        for i in range(n // batch):
            out.append(perm[i * batch:(i + 1) * batch])
            if len(out) == steps:
                break
        epoch += 1
    return out


def step_memory(recipe: Recipe, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Peak live bytes of one training step (forward, loss, regularisers, backward) and the
    saved-for-backward bytes of its forward."""
    model = recipe.model
    model.train()
    params = list(model.parameters())

    def step() -> float:
        for p in params:
            p.grad = None
        loss, _ = recipe.loss(x, y)
        loss.backward()
        return float(loss.detach())

    step()
    with quiet_stderr():
        peak, _ = peak_live_bytes(step)
    for p in params:
        p.grad = None
    saved, loss = saved_tensor_bytes(lambda: recipe.loss(x, y)[0], exclude=[*params, x, y])
    res = {"peak_bytes": int(peak), "saved_bytes": int(saved),
           "saved_total_bytes": int(saved_tensor_bytes.total)}  # type: ignore[attr-defined]
    del loss
    for p in params:
        p.grad = None
    return res


def run_row(kind: str, seed: int, splits: Any, args: argparse.Namespace,
            log: Any = print) -> dict[str, Any]:
    t_all = time.perf_counter()
    vocab = splits.spec.num_classes
    model = build(kind, vocab, args, seed)
    recipe = Recipe(kind, model, args)
    n_params = sum(p.numel() for p in model.parameters())
    lr = learning_rate(kind, args)
    opt = make_optimizer(model, "adamw", lr, 0.01)
    xs, ys = splits.train.tensors
    order = batch_order(len(xs), args.batch, seed, args.steps)
    params = [p for p in model.parameters()]

    def lr_at(step: int) -> float:
        warm = min(1.0, (step + 1) / args.warmup)
        return lr * warm * 0.5 * (1.0 + math.cos(math.pi * step / args.steps))

    curve: list[dict[str, Any]] = []
    best: dict[str, Any] = {"val_bpc": math.inf, "step": 0, "state": None}
    cpu = 0.0
    ce_sum, ce_n = 0.0, 0
    stats_tail: list[dict[str, float]] = []
    tail_from = int(0.9 * args.steps)
    deq = kind.startswith("deq")

    def validate(step: int) -> None:
        nonlocal ce_sum, ce_n
        v = evaluate_lm(model, splits.val, args.batch)
        point = {"step": step, "tokens": step * args.batch * 64, "val_bpc": v["bpc"],
                 "train_bpc": ce_sum / max(ce_n, 1) / LN2, "cpu_s": cpu}
        if deq:
            point["val_fwd_steps"] = v.get("fwd_steps")
            point["val_rel_res"] = v.get("fwd_rel_res")
            point["train_budget"] = model.deq.max_steps
            point["mode"] = "unrolled" if recipe.unrolled else "equilibrium"
        curve.append(point)
        ce_sum, ce_n = 0.0, 0
        if math.isfinite(v["bpc"]) and v["bpc"] < best["val_bpc"]:
            best.update(val_bpc=v["bpc"], step=step,
                        state=copy.deepcopy(model.state_dict()))
        log(f"  [{label(kind)} s{seed}] step {step}: val {v['bpc']:.3f} train "
            f"{point['train_bpc']:.3f} cpu {cpu:.0f}s"
            + (f" res {v.get('fwd_rel_res', float('nan')):.1e} steps "
               f"{v.get('fwd_steps', float('nan')):.1f}" if deq else ""))

    for step in range(args.steps):
        recipe.set_step(step)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        idx = order[step]
        x, y = xs[idx], ys[idx]
        model.train()
        c0 = time.process_time()
        opt.zero_grad(set_to_none=True)
        loss, ce = recipe.loss(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        cpu += time.process_time() - c0
        ce_v = float(ce.detach())
        ce_sum += ce_v
        ce_n += 1
        if deq and step >= tail_from and not recipe.unrolled:
            st = solver_stats(model)
            if st:
                stats_tail.append(st)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            validate(step + 1)

    final_val = curve[-1]["val_bpc"]
    mem = step_memory(recipe, xs[:args.batch], ys[:args.batch])  # last (equilibrium) mode
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    test = evaluate_lm(model, splits.test, args.batch)
    val = evaluate_lm(model, splits.val, args.batch)
    # slope of the validation curve over its last quarter (bpc per 1000 steps)
    q = [p for p in curve if p["step"] >= 0.75 * args.steps]
    slope = ((q[-1]["val_bpc"] - q[0]["val_bpc"]) / max(q[-1]["step"] - q[0]["step"], 1)
             * 1000 if len(q) >= 2 else float("nan"))
    row: dict[str, Any] = {
        "model": label(kind) + (f" [{args.variant}]" if args.variant else ""), "kind": kind,
        "variant": args.variant, "seed": seed, "lr": lr, "params": n_params,
        "steps": args.steps, "tokens": args.steps * args.batch * 64,
        "train_cpu_s": cpu, "cpu_ms_per_step": cpu / args.steps * 1e3,
        "best_step": best["step"], "best_val_bpc": best["val_bpc"], "final_val_bpc": final_val,
        "val_slope_last_quarter_per_1k": slope,
        "val": val, "test": test, "memory": mem, "curve": curve,
        "wall_s": time.perf_counter() - t_all, "recipe": recipe_flags(kind, args),
    }
    if stats_tail:
        keys = set().union(*stats_tail)
        agg = {}
        for k in sorted(keys):
            vals = [s[k] for s in stats_tail if k in s]
            agg[k] = max(vals) if k.endswith("_max") else sum(vals) / len(vals)
        row["train_stats_last10pct"] = agg
    log(f"{label(kind)} seed {seed}: best val {best['val_bpc']:.3f} @ {best['step']}, test "
        f"{test['bpc']:.3f}, {row['cpu_ms_per_step']:.1f} ms/step, peak "
        f"{mem['peak_bytes'] / MIB:.2f} MiB, saved {mem['saved_bytes'] / MIB:.2f} MiB"
        + (f", test res {test.get('fwd_rel_res', float('nan')):.1e} steps "
           f"{test.get('fwd_steps', float('nan')):.1f}" if deq else ""))
    return row


# ----------------------------------------------------------------------------- reporting


RECIPE_KEYS = ("batch", "warmup", "d_model", "n_heads", "d_ff", "eval_steps")
PAPER_KEYS = ("paper_lr", "unroll_frac", "unroll_depth", "budget_start", "budget_end",
              "jac_weight", "res_weight", "reg_batch")
REV_KEYS = ("rev_beta", "rev_checkpoint", "rev_budget_start", "rev_budget_end",
            "rev_eval_steps")


def recipe_flags(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """The command-line settings that define a row's recipe (stored with the row)."""
    keys = list(RECIPE_KEYS)
    if kind.startswith("L"):
        keys.append("lr")
    elif kind == "deq-onestep":
        keys.append("deq_lr")
    else:
        keys += PAPER_KEYS
        if kind == "deq-rev":
            keys += REV_KEYS
    return {k: getattr(args, k) for k in keys}


def med(vals: list[float]) -> float:
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else float("nan")


def tables(rows: list[dict[str, Any]], kinds: list[str], steps: int) -> str:
    """Markdown tables (medians over seeds, every seed) grouped by row and variant; memory
    ratios against the median of the ``L4`` rows with ``steps`` steps."""
    ref = [r for r in rows if r["kind"] == "L4" and r["steps"] == steps]
    ref_peak = med([r["memory"]["peak_bytes"] for r in ref]) if ref else float("nan")
    ref_saved = med([r["memory"]["saved_bytes"] for r in ref]) if ref else float("nan")
    headers = ["model", "seeds", "params", "test bpc", "best val bpc (step)", "ms/step (CPU)",
               "train CPU s", "peak MiB (x L4)", "saved MiB (x L4)",
               "test rel res / steps", "val slope /1k (last 1/4)"]

    def line(name: str, rs: list[dict[str, Any]], seeds: str) -> list[Any]:
        peak = med([r["memory"]["peak_bytes"] for r in rs])
        saved = med([r["memory"]["saved_bytes"] for r in rs])
        res = "-"
        if rs[0]["kind"].startswith("deq"):
            res = (f"{med([r['test'].get('fwd_rel_res') for r in rs]):.1e} / "
                   f"{med([r['test'].get('fwd_steps') for r in rs]):.1f}")
        return [name, seeds, f"{rs[0]['params']:,}", f"{med([r['test']['bpc'] for r in rs]):.3f}",
                f"{med([r['best_val_bpc'] for r in rs]):.3f} "
                f"({med([r['best_step'] for r in rs]):.0f})",
                f"{med([r['cpu_ms_per_step'] for r in rs]):.1f}",
                f"{med([r['train_cpu_s'] for r in rs]):.0f}",
                f"{peak / MIB:.2f} (x{peak / ref_peak:.2f})",
                f"{saved / MIB:.2f} (x{saved / ref_saved:.2f})", res,
                f"{med([r['val_slope_last_quarter_per_1k'] for r in rs]):+.3f}"]

    medians, per_seed = [], []
    groups: dict[tuple[int, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["steps"], r["kind"], r.get("variant", "")), []).append(r)
    order = {k: i for i, k in enumerate(kinds)}
    for key in sorted(groups, key=lambda g: (g[0] != steps, g[0], order.get(g[1], len(order)),
                                             g[2])):
        rs = sorted(groups[key], key=lambda r: r["seed"])
        name = rs[0]["model"] + (f" ({rs[0]['steps']} steps)" if rs[0]["steps"] != steps
                                 else "")
        medians.append(line(name, rs, ",".join(str(r["seed"]) for r in rs)))
        per_seed += [line(name, [r], str(r["seed"])) for r in rs]
    return ("Medians over seeds:\n\n" + md_table(headers, medians)
            + "\n\nEvery seed:\n\n" + md_table(headers, per_seed))


def environment() -> dict[str, Any]:
    return {"torch": torch.__version__, "deqkit": getattr(dk, "__version__", "?"),
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "loadavg_at_start": [round(v, 2) for v in os.getloadavg()]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 6 steps, rows L1,deq-onestep,deq-implicit,deq-rev")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 2500)")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--rows", default=None, help=f"comma-separated from {ALL_ROWS}")
    ap.add_argument("--eval-every", type=int, default=None, help="default steps / 20")
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--d-ff", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--lr", type=float, default=6e-3, help="explicit rows' peak lr")
    ap.add_argument("--deq-lr", type=float, default=1e-2, help="deq-onestep's peak lr")
    ap.add_argument("--paper-lr", type=float, default=6e-3, help="paper-style DEQ rows' lr")
    ap.add_argument("--unroll-frac", type=float, default=0.2)
    ap.add_argument("--unroll-depth", type=int, default=4)
    ap.add_argument("--budget-start", type=int, default=6)
    ap.add_argument("--budget-end", type=int, default=12)
    ap.add_argument("--rev-beta", type=float, default=0.5)
    ap.add_argument("--rev-checkpoint", type=int, default=4)
    ap.add_argument("--rev-budget-start", type=int, default=4)
    ap.add_argument("--rev-budget-end", type=int, default=8)
    ap.add_argument("--jac-weight", type=float, default=1.0)
    ap.add_argument("--res-weight", type=float, default=1.0)
    ap.add_argument("--reg-batch", type=int, default=4,
                    help="sequences of the batch the regularisers are computed on")
    ap.add_argument("--eval-steps", type=int, default=None,
                    help="DEQ evaluation solve budget (default 50, quick 10)")
    ap.add_argument("--rev-eval-steps", type=int, default=None,
                    help="the reversible DEQ's evaluation budget (default 100, quick 10)")
    ap.add_argument("--variant", default="",
                    help="a name for non-default recipe flags, kept in the rows and the table")
    ap.add_argument("--from-jsonl", default=None,
                    help="comma-separated JSON-lines files of rows (--partial files of earlier "
                         "runs): no training, build the table and the JSON from them")
    ap.add_argument("--out", default=None)
    ap.add_argument("--partial", default=None,
                    help="JSON lines file: rows already there are skipped, new ones appended")
    args = ap.parse_args(argv)
    if args.steps is None:
        args.steps = 6 if args.quick else 2500
    if args.eval_steps is None:
        args.eval_steps = 10 if args.quick else 50
    if args.rev_eval_steps is None:
        args.rev_eval_steps = 10 if args.quick else 100
    if args.rows is None:
        args.rows = "L1,deq-onestep,deq-implicit,deq-rev" if args.quick else DEFAULT_ROWS
    if args.eval_every is None:
        args.eval_every = max(1, args.steps // 20)
    if args.out is None:
        args.out = str(RESULTS_DIR / ("bench_lm_depth_quick.json" if args.quick
                                      else "bench_lm_depth.json"))
    for k in args.rows.split(","):
        if k not in ALL_ROWS:
            ap.error(f"--rows: unknown row {k!r}; choose from {ALL_ROWS}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(1)
    env = environment()
    kinds = args.rows.split(",")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    splits = load_dataset("text", block_size=64, seed=0)
    print(f"# Char-level LM, equal tokens: {args.steps} steps x {args.batch} x 64 characters "
          f"({args.steps * args.batch * 64:,} tokens) per model, seeds {seeds}\n", flush=True)
    if args.from_jsonl:
        rows = []
        for path in args.from_jsonl.split(","):
            with open(path) as fh:
                rows += [json.loads(line) for line in fh if line.strip()]
        return write(args, env, splits, kinds, seeds, rows)
    done: list[dict[str, Any]] = []
    if args.partial and os.path.exists(args.partial):
        with open(args.partial) as fh:
            done = [json.loads(line) for line in fh if line.strip()]
        done = [r for r in done if r.get("steps") == args.steps
                and r.get("variant", "") == args.variant]
    rows = list(done)
    for seed in seeds:
        for kind in kinds:
            if any(r["kind"] == kind and r["seed"] == seed for r in rows):
                continue
            row = run_row(kind, seed, splits, args)
            rows.append(row)
            if args.partial:
                with open(args.partial, "a") as fh:
                    fh.write(json.dumps(row, default=float) + "\n")
    rows = [r for r in rows if r["kind"] in kinds and r["seed"] in seeds]
    return write(args, env, splits, kinds, seeds, rows)


def write(args: argparse.Namespace, env: dict[str, Any], splits: Any, kinds: list[str],
          seeds: list[int], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Print the tables and write the JSON."""
    table = tables(rows, kinds, args.steps)
    print("\n" + table)
    out = {"config": vars(args), "rows_requested": kinds, "seeds": seeds, "environment": env,
           "loadavg_at_end": [round(v, 2) for v in os.getloadavg()],
           "vocab_size": splits.spec.num_classes,
           "splits": {"train": len(splits.train), "val": len(splits.val),
                      "test": len(splits.test)},
           "peak_method": PEAK_METHOD, "saved_method": SAVED_METHOD,
           "rows": rows, "table": table}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=2, default=float)
    print(f"\nwrote {args.out}")
    return out


if __name__ == "__main__":
    main()
