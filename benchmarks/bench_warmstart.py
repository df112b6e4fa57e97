#!/usr/bin/env python
"""Warm starts across epochs (``dk.nn.FixedPointCache``) vs cold starts, training a conv DEQ.

``dk.zoo.ConvDEQ((1, 8, 8), 10)`` (defaults: Anderson, rtol 1e-3, 20 training steps, implicit
GMRES backward) on scikit-learn's digits, AdamW lr 3e-3 with a cosine schedule, batch 64,
``--epochs`` epochs, one thread, the same seed and batch order for both runs. The warm run
starts every training solve from the sample's equilibrium of the previous epoch (by dataset
index; ``only_converged``: a failed solve is never a start point), the cold run from the
model's zero state. Reported per epoch: mean forward solver steps per sample, fraction of
samples that converged within the training budget, and CPU time; at the end the test accuracy
(evaluation always starts cold: test samples are new) and total training time.

Usage: ``.venv/bin/python benchmarks/bench_warmstart.py [--epochs 12] [--seed 0]``
(about a minute). Writes ``benchmarks/results/bench_warmstart.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import deqkit as dk
from _deqbench import RESULTS_DIR, environment, md_table
from deqkit.data import load_dataset


def run(splits: Any, epochs: int, seed: int, warm: bool) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = dk.zoo.ConvDEQ((1, 8, 8), 10)
    xtr, ytr = splits.train.tensors
    n = len(xtr)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * math.ceil(n / 64))
    gen = torch.Generator().manual_seed(seed)
    cache = dk.nn.FixedPointCache(n) if warm else None
    per_epoch = []
    model.train()
    for _ in range(epochs):
        steps, conv, seen, c0 = 0.0, 0.0, 0, time.process_time()
        for ids in torch.randperm(n, generator=gen).split(64):
            xb, yb = xtr[ids], ytr[ids]
            inj = model.stem(xb)
            z0 = model.deq.init_state(inj)
            if cache is not None:
                z0 = cache.initial(ids, z0)
            z = model.deq(inj, z0=z0)
            loss = torch.nn.functional.cross_entropy(model.head(model.features(z)), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            st = model.deq.last_solution.stats
            if cache is not None:
                cache.update(ids, z.detach(), converged=st["converged"])
            steps += float(st["nstep"].float().sum())
            conv += float(st["converged"].float().sum())
            seen += len(ids)
        per_epoch.append({"mean_steps": steps / seen, "converged": conv / seen,
                          "cpu_s": time.process_time() - c0})
    model.eval()
    xte, yte = splits.test.tensors
    with torch.no_grad():
        acc = float((model(xte).argmax(1) == yte).float().mean())
    return {"epochs": per_epoch, "test_acc": acc,
            "train_cpu_s": sum(e["cpu_s"] for e in per_epoch),
            "mean_steps": sum(e["mean_steps"] for e in per_epoch) / epochs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS_DIR / "bench_warmstart.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    env = environment()
    splits = load_dataset("digits", seed=a.seed)
    res = {name: run(splits, a.epochs, a.seed, warm) for name, warm in
           (("cold", False), ("warm", True))}
    rows = []
    for e in range(a.epochs):
        c, w = res["cold"]["epochs"][e], res["warm"]["epochs"][e]
        rows.append([e + 1, f"{c['mean_steps']:.1f}", f"{w['mean_steps']:.1f}",
                     f"{c['converged']:.2f}", f"{w['converged']:.2f}",
                     f"{c['cpu_s']:.2f}", f"{w['cpu_s']:.2f}"])
    print(f"# Warm starts across epochs: ConvDEQ on digits, {a.epochs} epochs, seed {a.seed}\n")
    print(md_table(["epoch", "steps cold", "steps warm", "converged cold", "converged warm",
                    "CPU s cold", "CPU s warm"], rows))
    c, w = res["cold"], res["warm"]
    print(f"\ncold: mean steps {c['mean_steps']:.2f}, train CPU {c['train_cpu_s']:.1f} s, "
          f"test acc {c['test_acc']:.4f}")
    print(f"warm: mean steps {w['mean_steps']:.2f}, train CPU {w['train_cpu_s']:.1f} s, "
          f"test acc {w['test_acc']:.4f}")
    print(f"warm / cold: steps {w['mean_steps'] / c['mean_steps']:.2f}x, "
          f"CPU time {w['train_cpu_s'] / c['train_cpu_s']:.2f}x")
    out = {"env": env, "config": vars(a), **res}
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
