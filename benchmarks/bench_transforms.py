#!/usr/bin/env python
"""What each derivative through an equilibrium costs (issue 17): first-order backward,
Hessian-vector product (``create_graph=True``), forward mode (``forward_ad``) and the
``torch.func`` transforms, all through ``dk.ImplicitAdjoint(dk.GMRES())``.

Two cells: a tanh MLP cell (D = 64, B = 32, float64, rho(J) ~ 0.9) and a ``dk.zoo.ConvDEQ``
on digits-sized inputs (float32, B = 32, at initialisation). Every row is timed round-robin
with the others (median of ``--repeats``) and reported as a ratio to "forward + backward"
measured in the same run. ``vmap`` solves its slices one by one: compared with stacking the
same problems along the batch dimension.

Usage: ``.venv/bin/python benchmarks/bench_transforms.py [--quick] [--out PATH]``
(~1 min, --quick ~15 s). Writes ``benchmarks/results/bench_transforms.json`` and the printed
table to the ``.txt`` next to it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.autograd.forward_ad as fwad

import deqkit as dk

RESULTS = Path(__file__).resolve().parent / "results"


def mlp_case(B: int = 32, D: int = 64) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(D, D, dtype=torch.float64, generator=g)
    W = (0.9 * W / torch.linalg.eigvals(W).abs().max()).requires_grad_()
    x = torch.randn(B, D, dtype=torch.float64, generator=g)

    def z_of(x: torch.Tensor, W: torch.Tensor = W) -> torch.Tensor:
        return dk.fixed_point(lambda z, x: torch.tanh(z @ W.T + x), torch.zeros_like(x),
                              dk.Anderson(rtol=1e-8, atol=0), dk.ImplicitAdjoint(dk.GMRES(
                                  rtol=1e-8)), max_steps=200, args=(x,)).value

    return {"name": f"tanh MLP cell D={D} B={B} f64", "x": x, "z_of": z_of, "param": W}


def conv_case(B: int = 32) -> dict[str, Any]:
    torch.manual_seed(0)
    model = dk.zoo.ConvDEQ((1, 8, 8), num_classes=10)
    model.deq.adjoint = dk.ImplicitAdjoint(dk.GMRES(rtol=1e-4))
    x = torch.randn(B, 1, 8, 8)
    param = next(p for p in model.deq.parameters() if p.dim() > 1)
    return {"name": f"ConvDEQ digits-sized B={B} f32", "x": x, "z_of": model, "param": param}


def operations(case: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    z_of, x, W = case["z_of"], case["x"], case["param"]
    v = torch.randn_like(W)
    xv = torch.randn_like(x)

    def fwd_bwd() -> None:
        torch.autograd.grad(z_of(x).square().sum(), W)

    def hvp() -> None:
        (g,) = torch.autograd.grad(z_of(x).square().sum(), W, create_graph=True)
        torch.autograd.grad((g * v).sum(), W)

    def forward_mode() -> None:
        with torch.no_grad(), fwad.dual_level():
            assert fwad.unpack_dual(z_of(fwad.make_dual(x, xv))).tangent is not None

    def func_grad() -> None:
        torch.func.grad(lambda x: z_of(x).square().sum())(x)

    def func_jvp() -> None:
        torch.func.jvp(z_of, (x,), (xv,))

    ops = {"forward only (no_grad)": lambda: _no_grad(z_of, x),
           "forward + backward": fwd_bwd,
           "HVP (create_graph)": hvp,
           "forward mode (forward_ad)": forward_mode,
           "torch.func.grad": func_grad,
           "torch.func.jvp": func_jvp}
    if isinstance(z_of, torch.nn.Module):
        return ops
    xs = torch.stack([x[:8] + 0.1 * i for i in range(4)])
    ops["torch.func.vmap (4 x B/4)"] = lambda: torch.func.vmap(z_of)(xs)
    ops["stacked batch (4 x B/4)"] = lambda: _no_grad(z_of, xs.reshape(-1, x.shape[1]))
    return ops


def _no_grad(fn: Callable[[torch.Tensor], Any], x: torch.Tensor) -> Any:
    with torch.no_grad():
        return fn(x)


def time_round_robin(ops: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in ops}
    for fn in ops.values():  # warm-up
        fn()
    for _ in range(repeats):
        for k, fn in ops.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", default=str(RESULTS / "bench_transforms.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    repeats = a.repeats or (3 if a.quick else 7)
    cases = [mlp_case()] if a.quick else [mlp_case(), conv_case()]
    lines, rows = [], []
    for case in cases:
        med = time_round_robin(operations(case), repeats)
        base = med["forward + backward"]
        lines += [f"\n{case['name']} (median of {repeats}, 1 thread)",
                  "| operation | time (ms) | vs forward + backward |", "|---|---|---|"]
        for k, t in med.items():
            lines.append(f"| {k} | {1e3 * t:.1f} | {t / base:.2f}x |")
            rows.append({"case": case["name"], "operation": k, "ms": 1e3 * t,
                         "ratio": t / base})
    text = "\n".join(lines)
    print(text)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {"torch": torch.__version__, "threads": 1, "cpu": platform.processor() or
           platform.machine(), "repeats": repeats, "quick": a.quick}
    out.write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    out.with_suffix(".txt").write_text(text.lstrip() + "\n")


if __name__ == "__main__":
    main()
