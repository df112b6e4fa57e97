#!/usr/bin/env python
"""Reversible equilibrium solving (issue 19): where the reconstruction is exact, and what a
training step costs.

1. Regime: a tanh cell ``tanh(z W^T + x)`` with ||W||_2 = 0.7 (D = 32, B = 8), the
   reversible iteration run for exactly N steps (``dk.FixedSteps(dk.Reversible(beta))``),
   backward by ``dk.ReversibleAdjoint`` without and with checkpoints every 5 steps. Reported:
   the reconstruction error the backward measures (``sol.backward["reconstruction_error"]``,
   max over the batch) and the relative error of the weight gradient against
   ``dk.UnrolledAdjoint`` through the same steps (the exact gradient of the same computation,
   in the same dtype), in float64 and float32.
2. Cost of one training step (a ``dk.zoo.ConvDEQ`` on digits-sized inputs, B = 32, float32)
   at an equal forward budget of 16 evaluations of f: reversible (8 steps, checkpoints every
   4) vs Anderson (16 steps) with the implicit GMRES backward vs unrolled backprop through the
   same 8 reversible steps; f evaluations forward/backward, median time, and the bytes kept
   for the backward (autograd's saved tensors plus the reversible adjoint's stored states).

Usage: ``.venv/bin/python benchmarks/bench_reversible.py [--quick] [--out PATH]``
(~1 min, --quick ~15 s). Writes ``benchmarks/results/bench_reversible.json`` and the
printed tables to the ``.txt`` next to it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import deqkit as dk

RESULTS = Path(__file__).resolve().parent / "results"


def regime_row(beta: float, steps: int, dtype: torch.dtype, every: int | None) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(32, 32, dtype=torch.float64, generator=g)
    W = (0.7 * W / torch.linalg.matrix_norm(W, 2)).to(dtype).requires_grad_()
    x = torch.randn(8, 32, generator=g, dtype=torch.float64).to(dtype)
    solver = dk.FixedSteps(dk.Reversible(beta=beta))

    def grad(adjoint: dk.AbstractAdjoint) -> tuple[torch.Tensor, dict[str, Any]]:
        sol = dk.fixed_point(lambda z, x: torch.tanh(z @ W.T + x), torch.zeros_like(x), solver,
                             adjoint, args=(x,), max_steps=steps, throw=False)
        (gW,) = torch.autograd.grad(sol.value.square().sum(), W)
        return gW, sol.backward

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g_rev, bwd = grad(dk.ReversibleAdjoint(checkpoint_every=every, on_error="ignore"))
    g_ref, _ = grad(dk.UnrolledAdjoint())
    rel = float((g_rev - g_ref).norm() / g_ref.norm())
    return {"beta": beta, "steps": steps, "dtype": str(dtype).split(".")[-1],
            "checkpoint_every": every, "reconstruction_error":
            float(bwd["reconstruction_error"].nan_to_num(float("inf")).max()),
            "grad_rel_error": rel if rel == rel else float("inf"),
            "stored_states": bwd["stored_states"]}


def regime(quick: bool) -> list[dict[str, Any]]:
    betas = (0.5,) if quick else (0.2, 0.5, 0.8, 1.5)
    steps = (5, 20) if quick else (5, 10, 20, 40)
    rows = []
    for dtype in (torch.float64, torch.float32):
        for beta in betas:
            for n in steps:
                for every in (None, 5):
                    rows.append(regime_row(beta, n, dtype, every))
    return rows


class Saved:
    """Bytes of the tensors autograd saves for the backward inside the block."""

    def __init__(self) -> None:
        self.bytes = 0

    def __enter__(self) -> Saved:
        def pack(t: torch.Tensor) -> torch.Tensor:
            self.bytes += t.numel() * t.element_size()
            return t

        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


def step_costs(repeats: int) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = dk.zoo.ConvDEQ((1, 8, 8), num_classes=10)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    rev = dk.Reversible(beta=0.5)
    configs = {
        "reversible 8 steps, ReversibleAdjoint(checkpoint_every=4)":
            dict(solver=dk.FixedSteps(rev), adjoint=dk.ReversibleAdjoint(checkpoint_every=4),
                 max_steps=8),
        "Anderson 16 steps, implicit GMRES(rtol 1e-4)":
            dict(solver=dk.FixedSteps(dk.Anderson(m=5)),
                 adjoint=dk.ImplicitAdjoint(dk.GMRES(rtol=1e-4), on_failure="ignore"),
                 max_steps=16),
        "reversible 8 steps, UnrolledAdjoint": dict(solver=dk.FixedSteps(rev),
                                                    adjoint=dk.UnrolledAdjoint(), max_steps=8),
    }
    rows = []
    times: dict[str, list[float]] = {k: [] for k in configs}
    info: dict[str, dict[str, Any]] = {}
    for r in range(repeats + 1):
        for name, kw in configs.items():
            with model.deq.overrides(**kw, throw=False):
                t = time.perf_counter()
                with Saved() as saved:  # (the forward: what it keeps for the backward)
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                dt = time.perf_counter() - t
            sol = model.deq.last_solution
            if r:
                times[name].append(dt)
            state = sol.value[0] if isinstance(sol.value, tuple) else sol.value
            stored = sol.backward.get("stored_states", 0) * state.numel() * state.element_size()
            unrolled = isinstance(kw["adjoint"], dk.UnrolledAdjoint)
            info[name] = {"fwd_nfev": int(sol.stats["nfev"]),
                          "bwd_vjps": "through the graph" if unrolled else
                          int(sol.backward.get("nmatvec", 0)) + 1,
                          "saved_bytes": saved.bytes + stored}
    for name in configs:
        rows.append({"config": name, "ms": 1e3 * statistics.median(times[name]), **info[name]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "bench_reversible.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    reg = regime(a.quick)
    lines = ["## Regime: tanh cell ||W|| = 0.7, D 32, B 8 (errors: max over the batch)", "",
             "| dtype | beta | steps | checkpoints | reconstruction error | gradient rel. error "
             "vs unrolled | stored states |", "|---|---|---|---|---|---|---|"]
    for r in reg:
        lines.append(f"| {r['dtype']} | {r['beta']} | {r['steps']} | "
                     f"{r['checkpoint_every'] or '-'} | {r['reconstruction_error']:.1e} | "
                     f"{r['grad_rel_error']:.1e} | {r['stored_states']} |")
    costs = step_costs(2 if a.quick else 7)
    lines += ["", "## One training step, ConvDEQ digits-sized, B 32, float32, 16 forward "
              "evaluations (median)", "",
              "| config | ms | fwd f evals | bwd VJPs | saved for backward (bytes) |",
              "|---|---|---|---|---|"]
    for r in costs:
        lines.append(f"| {r['config']} | {r['ms']:.1f} | {r['fwd_nfev']} | {r['bwd_vjps']} | "
                     f"{r['saved_bytes']:,} |")
    text = "\n".join(lines)
    print(text)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "quick": a.quick, "regime": reg,
                               "step_costs": costs}, indent=1))
    out.with_suffix(".txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
