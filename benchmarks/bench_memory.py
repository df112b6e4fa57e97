#!/usr/bin/env python
"""Memory of one training step vs the number of forward iterations, per adjoint.

Problem P1 (float32): f(z, x) = tanh(z W^T + x U^T + b), d=256, batch 128, ||W||_2 = 0.9, loss
= sum(z*^2), W requires grad. Every solve runs exactly ``max_steps`` steps (rtol=1e-12, atol=0,
throw=False; float32 cannot reach that tolerance), for ImplicitAdjoint, JacobianFreeAdjoint,
PhantomAdjoint(5) and UnrolledAdjoint, with dk.Picard and dk.Anderson.

Two measurements:

1. Saved-for-backward bytes (deterministic): during the forward pass (solve + loss) a
   ``torch.autograd.graph.saved_tensors_hooks`` pack hook records
   ``t.untyped_storage().nbytes()`` once per storage (de-duplicated by storage data_ptr), and
   the storages of the parameters and inputs (W, U, b, x) are excluded. The hook keeps a
   weak reference to each saved storage, which gives both the total saved during the forward
   pass and the part still held when backward starts (the main table). It does not see
   tensors an autograd.Function keeps as plain ``ctx`` attributes (deqkit's ImplicitAdjoint
   keeps z* that way: one (B, D) tensor, 128 KiB here). The implicit, JFB and one-step
   adjoints take the graph of the driver's evaluation at ``max_steps`` when every returned
   value is that last iterate; here, from 16 steps on, some samples' lowest residual (float32
   plateau) is not at the last step, so that graph is dropped and the adjoint evaluates f
   again: a second, transient graph in the "all storages" table (the held table is flat).
2. Peak RSS delta (noisy): each configuration runs in a fresh subprocess with
   MALLOC_MMAP_THRESHOLD_=65536 (large blocks go back to the OS when freed); after a warm-up
   step the peak (VmHWM) is reset through /proc/self/clear_refs, and the reported value is
   VmHWM after one training step (forward + backward) minus VmRSS before it.

Usage:  .venv/bin/python benchmarks/bench_memory.py [--quick] [--out PATH] [--no-rss]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import deqkit as dk
from _deqbench import RESULTS_DIR, environment, header_lines, make_tanh_problem, md_table
from deqkit.app import names

STEPS = [4, 8, 16, 32, 64]
MIB = 1024.0 * 1024.0


#: Table label -> (registry name, options) of each adjoint compared (deqkit.app.names).
ADJOINT_NAMES: dict[str, tuple[str, dict[str, Any]]] = {
    "ImplicitAdjoint": ("implicit", {"linear_solver": names.build_linear_solver(
        "gmres", rtol=1e-6, atol=0.0)}),
    "JacobianFreeAdjoint": ("jfb", {}),
    "PhantomAdjoint(5)": ("phantom", {"phantom_steps": 5}),
    "UnrolledAdjoint": ("unrolled", {}),
}
ADJOINTS = list(ADJOINT_NAMES)
#: Table label -> registry name of each forward solver (tolerance unreachable in float32).
SOLVER_NAMES = {"Picard": "picard", "Anderson": "anderson"}
SOLVERS = list(SOLVER_NAMES)


def make_adjoint(label: str) -> dk.AbstractAdjoint:
    """The adjoint of table row ``label``, built by the registry."""
    name, options = ADJOINT_NAMES[label]
    return names.build_adjoint(name, **options)


def make_solver(label: str) -> dk.AbstractFixedPointSolver:
    """The forward solver of table row ``label``: every solve runs exactly ``max_steps``."""
    return names.build_solver(SOLVER_NAMES[label], rtol=1e-12, atol=0.0)


def build() -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
    f, x, z0 = make_tanh_problem("gaussian", 0.9, seed=1)
    f.W.requires_grad_(True)
    return f, x, z0, f.W


def training_step(f, x, z0, W, adjoint: str, solver: str, steps: int) -> dk.Solution:
    W.grad = None
    sol = dk.fixed_point(f, z0, make_solver(solver), make_adjoint(adjoint), max_steps=steps,
                         args=(x,), throw=False)
    sol.value.pow(2).sum().backward()
    return sol


def saved_bytes(adjoint: str, solver: str, steps: int) -> dict[str, Any]:
    """Saved-for-backward storages of one forward pass (solve + loss).

    Returns ``bytes``: total of the distinct storages saved during the forward pass (a storage
    saved several times counts once; a new storage that reuses a freed address counts again);
    ``held_bytes``: those still alive when the forward pass returns (what backward uses);
    ``peak_bytes``: the largest live total observed at any pack event."""
    f, x, z0, W = build()
    exclude = {t.untyped_storage().data_ptr() for t in (f.W, f.U, f.b, x, z0)}
    live: dict[int, tuple[int, list[weakref.ref]]] = {}  # data_ptr -> (nbytes, aliases)
    stats = {"total": 0, "peak": 0}

    def live_bytes() -> int:
        return sum(n for n, rs in live.values() if any(r() is not None for r in rs))

    def pack(t: torch.Tensor) -> torch.Tensor:
        # Return a detached alias (same storage): returning ``t`` itself would make saved
        # outputs reference their own grad_fn (a cycle the garbage collector cannot see), which
        # keeps graphs alive and would break the "held" measurement.
        d = t.detach()
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr in exclude:
            return d
        entry = live.get(ptr)
        if entry is None or not any(r() is not None for r in entry[1]):
            live[ptr] = (st.nbytes(), [weakref.ref(d)])
            stats["total"] += st.nbytes()
        else:
            entry[1].append(weakref.ref(d))
        stats["peak"] = max(stats["peak"], live_bytes())
        return d

    W.grad = None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sol = dk.fixed_point(f, z0, make_solver(solver), make_adjoint(adjoint), max_steps=steps,
                             args=(x,), throw=False)
        loss = sol.value.pow(2).sum()
    gc.collect()
    held = live_bytes()
    loss.backward()  # check that the step completes
    return {"bytes": stats["total"], "held_bytes": held, "peak_bytes": stats["peak"],
            "min_nstep": int(sol.stats["nstep"].min()),
            "grad_finite": bool(torch.isfinite(W.grad).all())}


def _status() -> dict[str, int]:
    with open("/proc/self/status") as fh:
        s = fh.read()
    return {k: int(re.search(k + r":\s+(\d+)", s).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


def child(adjoint: str, solver: str, steps: int) -> None:
    torch.set_num_threads(1)
    f, x, z0, W = build()
    training_step(f, x, z0, W, adjoint, solver, 2)  # warm-up (lazy initialisation, kernels)
    training_step(f, x, z0, W, adjoint, solver, 2)
    reset = True
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        reset = False
    before = _status()
    training_step(f, x, z0, W, adjoint, solver, steps)
    after = _status()
    print(json.dumps({"delta": after["VmHWM"] - before["VmRSS"], "hwm_reset": reset,
                      "rss_before": before["VmRSS"]}))


def rss_delta(adjoint: str, solver: str, steps: int) -> dict[str, Any]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", adjoint, solver, str(steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def slope(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares line ys ~ a + b xs; returns (b, a)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return b, my - b * mx


def print_header(env: dict[str, Any], quick: bool, B: int, D: int, state_bytes: int) -> None:
    """The report's title and method notes."""
    print("# deqkit memory benchmark" + (" (--quick)" if quick else ""))
    print()
    print("\n".join(header_lines(env)))
    print(f"- P1 float32: batch {B}, d {D}; one (B, D) state tensor = {state_bytes / MIB:.3f} MiB."
          " Every solve runs exactly max_steps steps (rtol=1e-12, atol=0, throw=False).")
    print("- Saved bytes: storages saved for backward during the forward pass (solve + loss), "
          "recorded by a torch.autograd.graph.saved_tensors_hooks pack hook as "
          "untyped_storage().nbytes(), de-duplicated by storage data_ptr, excluding W, U, b, x, "
          "z0; weak references tell which are still alive when backward starts (\"held\") "
          "and which were freed during the forward pass (counted only in the total). Not seen: "
          "tensors kept as ctx attributes (ImplicitAdjoint's z*, 0.125 MiB). Slopes are "
          "least-squares fits of bytes vs max_steps; 'state tensors/step' divides by one (B, D) "
          "float32 tensor.")
    print("- Peak RSS delta (noisy): fresh subprocess per configuration, "
          "MALLOC_MMAP_THRESHOLD_=65536, peak reset via /proc/self/clear_refs after a warm-up; "
          "VmHWM after one training step minus VmRSS before it. Includes the backward pass "
          "(GMRES basis, etc.) and allocator effects.")
    print()


def measure_adjoint(solver: str, adjoint: str, steps_list: list[int], state_bytes: int,
                    rss_too: bool, results: dict[str, Any]) -> tuple[list[str], ...]:
    """Measure one (solver, adjoint) pair at every step count (appended to
    ``results["configs"]``, slopes to ``results["slopes"]``); return its table rows (held,
    total, RSS)."""
    held, total, rss = [], [], []
    for steps in steps_list:
        s = saved_bytes(adjoint, solver, steps)
        r = rss_delta(adjoint, solver, steps) if rss_too else {}
        results["configs"].append({"solver": solver, "adjoint": adjoint,
                                   "max_steps": steps, "saved": s, "rss": r})
        held.append(float(s["held_bytes"]))
        total.append(float(s["bytes"]))
        rss.append(float(r.get("delta", float("nan"))))
    xs = [float(v) for v in steps_list]
    bh, ah = slope(xs, held)
    bt, _ = slope(xs, total)
    held_row = [adjoint] + [f"{v / MIB:.3f}" for v in held] + [f"{bh / 1024:.1f}",
                                                               f"{bh / state_bytes:.2f}"]
    total_row = [adjoint] + [f"{v / MIB:.3f}" for v in total] + [f"{bt / 1024:.1f}",
                                                                 f"{bt / state_bytes:.2f}"]
    sl = {"held_bytes_per_step": bh, "held_intercept": ah,
          "held_state_tensors_per_step": bh / state_bytes, "saved_total_bytes_per_step": bt}
    rss_row: list[str] = []
    if rss_too:
        ok = [(x_, v) for x_, v in zip(xs, rss) if v == v]
        rb = slope([a for a, _ in ok], [v for _, v in ok])[0] if len(ok) >= 2 else None
        rss_row = [adjoint] + [f"{v / MIB:.2f}" if v == v else "err" for v in rss] + [
            f"{rb / 1024:.1f}" if rb is not None else "-"]
        sl["rss_bytes_per_step"] = rb
    results.setdefault("slopes", {})[f"{solver}/{adjoint}"] = sl
    return held_row, total_row, rss_row


def print_tables(solver: str, steps_list: list[int], held_rows: list[list[str]],
                 total_rows: list[list[str]], rss_rows: list[list[str]]) -> None:
    """The held / total / RSS tables of one forward solver (RSS only when measured)."""
    cols = [f"{s} steps" for s in steps_list]
    slope_cols = ["slope (KiB/step)", "slope (state tensors/step)"]
    print(f"### {solver}: saved-for-backward memory held when backward starts (MiB)")
    print()
    print(md_table(["adjoint", *cols, *slope_cols], held_rows))
    print()
    print(f"### {solver}: all storages saved during the forward pass, incl. transient ones "
          "(MiB)")
    print()
    print(md_table(["adjoint", *cols, *slope_cols], total_rows))
    print()
    if rss_rows:
        print(f"### {solver}: peak RSS delta of one training step (MiB, noisy)")
        print()
        print(md_table(["adjoint", *cols, "slope (KiB/step)"], rss_rows))
        print()
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer configurations (smoke run)")
    ap.add_argument("--out", default=str(RESULTS_DIR / "bench_memory.json"))
    ap.add_argument("--no-rss", action="store_true", help="skip the subprocess RSS measurement")
    ap.add_argument("--child", nargs=3, metavar=("ADJOINT", "SOLVER", "STEPS"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return 0

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    env = environment()
    steps_list = [4, 16, 64] if args.quick else STEPS
    solvers = ["Picard"] if args.quick else list(SOLVERS)
    _, _, z0, _ = build()
    B, D = z0.shape
    state_bytes = B * D * z0.element_size()
    print_header(env, args.quick, B, D, state_bytes)
    results: dict[str, Any] = {"env": env, "quick": args.quick, "steps": steps_list,
                               "state_bytes": state_bytes, "configs": []}
    for solver in solvers:
        rows = [measure_adjoint(solver, adjoint, steps_list, state_bytes, not args.no_rss,
                                results) for adjoint in ADJOINTS]
        held_rows, total_rows, rss_rows = ([r[i] for r in rows if r[i]] for i in range(3))
        print_tables(solver, steps_list, held_rows, total_rows, rss_rows)

    results["elapsed_s"] = time.perf_counter() - t0
    print(f"(total {results['elapsed_s']:.0f} s)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
