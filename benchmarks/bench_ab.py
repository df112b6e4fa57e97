#!/usr/bin/env python
"""Before/after in one process: the working tree's deqkit against a git revision of it.

The revision's ``src/deqkit`` is exported (``git archive``) into a temporary folder as the
package ``deqkit_base``; both versions then run the same solves, alternating call by call, so
that machine load (this 2-core VM varies by 10-30% between runs) affects both alike. Rows: the
forward solves of ``bench_solvers.py``'s P1 (tanh, d=256, batch 128) and P3 (conv 32ch 8x8,
batch 64) with Picard, Anderson and Broyden at rtol 1e-5, and one float64 training step on P1
(Anderson forward, implicit GMRES backward). Reported: f evaluations, the median and minimum
time of each version and new/base ratios. No timing is asserted anywhere.

Usage:  .venv/bin/python benchmarks/bench_ab.py [--base HEAD] [--repeats 60] [--out PATH]
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _deqbench import (
    RESULTS_DIR,
    ROOT,
    environment,
    header_lines,
    make_conv_problem,
    make_tanh_problem,
    md_table,
)


def export_base(ref: str, into: Path) -> Any:
    """Import ``src/deqkit`` at git revision ``ref`` as the package ``deqkit_base``."""
    tar = subprocess.run(["git", "archive", ref, "src/deqkit"], cwd=ROOT, capture_output=True,
                         check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=tar, check=True)
    pkg = into / "deqkit_base"
    (into / "src" / "deqkit").rename(pkg)
    pattern = re.compile(r"\b(from|import) deqkit\b")
    for path in pkg.rglob("*.py"):
        text = path.read_text()
        path.write_text(pattern.sub(lambda m: f"{m.group(1)} deqkit_base", text))
    sys.path.insert(0, str(into))
    return importlib.import_module("deqkit_base")


def forward_cases(dk: Any) -> dict[str, Callable[[], Any]]:
    cases: dict[str, Callable[[], Any]] = {}
    for pname, (f, x, z0) in (("P1", PROBLEMS["P1"]), ("P3", PROBLEMS["P3"])):
        for sname in ("Picard", "Anderson", "Broyden"):
            solver = getattr(dk, sname)(rtol=1e-5, atol=0.0)
            cases[f"{pname} {sname}"] = (
                lambda f=f, x=x, z0=z0, s=solver: dk.fixed_point(
                    f, z0, s, max_steps=300, args=(x,), throw=False))
    return cases


def train_case(dk: Any) -> Callable[[], Any]:
    f, x, z0 = PROBLEMS["P1-64"]
    W = f.W.clone().requires_grad_()

    def cell(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ W.T + x @ f.U.T + f.b)

    solver = dk.Anderson(rtol=1e-7, atol=0.0)
    adjoint = dk.ImplicitAdjoint(dk.GMRES(rtol=1e-6, atol=0.0))

    def step() -> Any:
        W.grad = None
        sol = dk.fixed_point(cell, z0, solver, adjoint, max_steps=300, args=(x,), throw=False)
        sol.value.square().sum().backward()
        return sol

    return step


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="HEAD", help="git revision to compare against")
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--out", default=str(RESULTS_DIR / "bench_ab.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import deqkit as new

    with tempfile.TemporaryDirectory() as tmp:
        old = export_base(args.base, Path(tmp))
        cases = {"base": {**forward_cases(old), "P1 train step (f64)": train_case(old)},
                 "new": {**forward_cases(new), "P1 train step (f64)": train_case(new)}}
        rows, results = [], []
        for name in cases["new"]:
            times: dict[str, list[float]] = {"base": [], "new": []}
            nfev = {}
            for lib in ("base", "new"):
                for _ in range(2):  # warm-up (and the batch-independence check, once)
                    nfev[lib] = int(_run(cases[lib][name]).stats["nfev"])
            for rep in range(args.repeats):
                for lib in (("base", "new") if rep % 2 else ("new", "base")):
                    t = time.perf_counter()
                    _run(cases[lib][name])
                    times[lib].append(time.perf_counter() - t)
            med = {k: statistics.median(v) for k, v in times.items()}
            low = {k: min(v) for k, v in times.items()}
            res = {"case": name, "nfev_base": nfev["base"], "nfev_new": nfev["new"],
                   "median_base_ms": 1e3 * med["base"], "median_new_ms": 1e3 * med["new"],
                   "min_base_ms": 1e3 * low["base"], "min_new_ms": 1e3 * low["new"],
                   "ratio_median": med["new"] / med["base"], "ratio_min": low["new"] / low["base"]}
            results.append(res)
            rows.append([name, f"{nfev['base']}/{nfev['new']}", f"{res['median_base_ms']:.2f}",
                         f"{res['median_new_ms']:.2f}", f"{res['ratio_median']:.3f}",
                         f"{res['ratio_min']:.3f}"])
            print(f"{name}: new/base {res['ratio_median']:.3f} (min {res['ratio_min']:.3f})",
                  flush=True)
    env = environment()
    print("\n# deqkit before/after (same process, interleaved)\n")
    print("\n".join(header_lines(env)))
    print(f"- base: {args.base}; {args.repeats} interleaved repeats per case; one thread.\n")
    print(md_table(["case", "nfev base/new", "median base (ms)", "median new (ms)",
                    "new/base (median)", "new/base (min)"], rows))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"env": env, "base": args.base, "rows": results},
                                         indent=2))
    print(f"\nwrote {args.out}")
    return 0


def _run(fn: Callable[[], Any]) -> Any:
    if fn.__name__ == "step":
        return fn()
    with torch.no_grad():
        return fn()


PROBLEMS = {
    "P1": make_tanh_problem("gaussian", 0.9),
    "P3": make_conv_problem(),
    "P1-64": make_tanh_problem("gaussian", 0.9, dtype=torch.float64),
}

if __name__ == "__main__":
    sys.exit(main())
