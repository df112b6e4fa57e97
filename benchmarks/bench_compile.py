#!/usr/bin/env python
"""Eager vs ``torch.compile``d cell in a DEQ training step (conv cell, implicit backward).

Single-threaded (torch.set_num_threads(1)). One training step = ConvDEQ forward (Anderson,
no compaction so the compiled cell sees one batch size) + cross-entropy + implicit
backward (GMRES) + Adam step. The cell of
``model.deq`` is replaced by ``torch.compile(cell, backend=..., dynamic=False)``; compile time
(first step) is reported separately from the median steady-state step time.

Usage:  .venv/bin/python benchmarks/bench_compile.py [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import deqkit as dk
from _deqbench import RESULTS_DIR, environment, md_table


def make(backend: str | None, seed: int = 0):
    torch.manual_seed(seed)
    model = dk.zoo.ConvDEQ(
        (1, 8, 8), 10, channels=16, groups=4, compact=False,
        solver=dk.Anderson(m=5, rtol=1e-4, atol=1e-6), max_steps=15,
    )
    if backend is not None:
        model.deq.cell = torch.compile(model.deq.cell, backend=backend, dynamic=False)
    return model


def run(backend: str | None, steps: int, batch: int) -> dict:
    torch._dynamo.reset()
    model = make(backend)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    times, nfev = [], []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        nfev.append(int(model.deq.last_solution.stats["nfev"]))
    return {
        "backend": backend or "eager",
        "first_step_s": times[0],
        "median_step_s": statistics.median(times[1:]),
        "min_step_s": min(times[1:]),
        "median_nfev": statistics.median(nfev[1:]),
        "final_loss": float(loss.detach()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps")
    ap.add_argument("--out", default=str(RESULTS_DIR / "bench_compile.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)  # the 2 cores are shared: avoid OpenMP spin-waiting
    steps, batch = (5, 32) if a.quick else (15, 64)
    rows, results = [], []
    for backend in (None, "aot_eager", "inductor"):
        r = run(backend, steps, batch)
        results.append(r)
        rows.append([r["backend"], f"{r['first_step_s']:.2f}", f"{1e3 * r['median_step_s']:.1f}",
                     f"{1e3 * r['min_step_s']:.1f}", r["median_nfev"], f"{r['final_loss']:.4f}"])
    base = results[0]["median_step_s"]
    for row, r in zip(rows, results):
        row.append(f"{base / r['median_step_s']:.2f}x")
    print(md_table(["backend", "first step (s)", "median step (ms)", "min step (ms)",
                    "nfev/step", "final loss", "speed-up"], rows))
    env = environment()
    out = {"env": env, "config": {"steps": steps, "batch": batch, "model": "ConvDEQ(1x8x8, "
           "channels=16, groups=4, compact=False, Anderson m=5 rtol=1e-4, max_steps=15)"},
           "results": results}
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
