#!/usr/bin/env python
"""Implicit backward at equal gradient error: cold GMRES / Neumann vs reusing the forward solve.

Issue 16. For each problem (P1, P3, H2 from ``_deqbench``; a ``dk.zoo.ConvDEQ`` trained on
digits with ``deqkit.app.train.fit``) the forward pass is solved with ``dk.Broyden`` and with
``dk.Anderson(m=5)`` to a fixed tolerance; for an incoming gradient g (a cross-entropy
gradient of a linear head, "loss", and a fixed random vector, "random") the adjoint
u = (I - J^T)^{-1} g at the returned z* is compared with a float64 reference u*. Every
backward method (cold ``GMRES``/``Neumann`` and, when the core has them, ``reuse_forward``
variants, ``SHINEAdjoint(refine=k)``, ``rtol_from_forward``) sweeps its linear tolerance; at
each error level (relative error of u over the batch <= 1e-2, 1e-3, 1e-4) the cheapest point
is kept and timed round-robin with the others of the block. VJPs are counted by a wrapper
on f (every vector-Jacobian product through the kept evaluation f(z*), including the final
one that carries u into the parameters).

Usage: ``.venv/bin/python benchmarks/bench_backward.py [--quick] [--out PATH]``
(full ~5 min, --quick < 1 min). Writes ``benchmarks/results/bench_backward.json`` and the
printed tables to the ``.txt`` next to it.
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import deqkit as dk
from _deqbench import (
    RESULTS_DIR,
    TanhCell,
    environment,
    fmt_time,
    header_lines,
    make_conv_problem,
    make_tanh_problem,
    md_table,
    rel_residual,
    spectral_radius_estimate,
)
from deqkit.app.train import fit
from deqkit.data import load_dataset

LEVELS = (1e-2, 1e-3, 1e-4)
RTOL_GRID = (3e-1, 1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6)
RTOL_GRID_QUICK = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)
FWD_RTOL = 1e-5
GMRES_MAX, NEUMANN_MAX = 300, 2000
SHINE_REFINE = (0, 1, 3, 5)


# ---------------------------------------------------------------------------------------------
# What the core offers (the reuse / SHINE work may land while this runs)
# ---------------------------------------------------------------------------------------------


def features() -> dict[str, bool]:
    fields = getattr(dk.ImplicitAdjoint, "__dataclass_fields__", {})
    return {
        "shine": hasattr(dk, "SHINEAdjoint"),
        "reuse_forward": "reuse_forward" in fields,
        "rtol_from_forward": "rtol_from_forward" in fields,
        "preconditioner": "preconditioner" in getattr(dk.GMRES, "__dataclass_fields__", {})
        or "preconditioner" in inspect.signature(dk.GMRES.solve).parameters,
        "inv_norm": "inv_norm" in getattr(dk.LinearSolution, "__dataclass_fields__", {})
        or hasattr(dk.LinearSolution, "inv_norm"),
    }


def families(feat: dict[str, bool]) -> dict[str, Callable[[float | None], Any]]:
    """Backward methods: name -> adjoint factory of the linear rtol (None: no sweep)."""

    def gmres(r: float | None) -> Any:
        return dk.GMRES(rtol=r if r is not None else 1e-6, atol=0.0, max_steps=GMRES_MAX)

    def neumann(r: float | None) -> Any:
        return dk.Neumann(rtol=r if r is not None else 1e-6, atol=0.0, max_steps=NEUMANN_MAX)

    out: dict[str, Callable[[float | None], Any]] = {
        "GMRES": lambda r: dk.ImplicitAdjoint(gmres(r), on_failure="ignore"),
        "Neumann": lambda r: dk.ImplicitAdjoint(neumann(r), on_failure="ignore"),
    }
    if feat["reuse_forward"]:
        out["GMRES reuse"] = lambda r: dk.ImplicitAdjoint(gmres(r), on_failure="ignore",
                                                          reuse_forward=True)
        out["Neumann reuse"] = lambda r: dk.ImplicitAdjoint(neumann(r), on_failure="ignore",
                                                            reuse_forward=True)
    return out


def single_points(feat: dict[str, bool]) -> dict[str, Callable[[], Any]]:
    """Methods without a tolerance to sweep: SHINE refine k, rtol_from_forward."""
    out: dict[str, Callable[[], Any]] = {}
    if feat["shine"]:
        for k in SHINE_REFINE:
            out[f"SHINE r{k}"] = lambda k=k: dk.SHINEAdjoint(refine=k)
    if feat["rtol_from_forward"]:
        kw = {"reuse_forward": True} if feat["reuse_forward"] else {}
        out["GMRES rtol_from_fwd"] = lambda: dk.ImplicitAdjoint(
            dk.GMRES(atol=0.0, max_steps=GMRES_MAX), on_failure="ignore",
            rtol_from_forward=True, **kw)
    return out


# ---------------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------------


class _Count(torch.autograd.Function):
    """Identity on f's output whose backward counts the VJPs taken through f."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, counter: list[int]) -> torch.Tensor:  # type: ignore[override]
        ctx.counter = counter
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        ctx.counter[0] += 1
        return grad, None


class Probe:
    """``f(z, x) + e``: the gradient of the loss with respect to ``e`` (zeros) is exactly the
    adjoint u = (I - J^T)^{-1} g, whatever the backward method; VJPs through f are counted."""

    def __init__(self, f: Callable[..., torch.Tensor]) -> None:
        self.f = f
        self.counter = [0]

    def __call__(self, z: torch.Tensor, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return _Count.apply(self.f(z, x), self.counter) + e


class Problem:
    def __init__(self, key: str, f: Any, f64: Any, x: torch.Tensor, z0: torch.Tensor,
                 params: list[torch.Tensor], head: Callable[[torch.Tensor], torch.Tensor],
                 labels: torch.Tensor, note: str) -> None:
        self.key, self.f, self.f64, self.x, self.z0 = key, f, f64, x, z0
        self.params, self.head, self.labels, self.note = params, head, labels, note
        self.probe = Probe(f)
        self.D = z0[0].numel()


def _linear_head(d: int, batch: int, seed: int) -> tuple[Callable, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1000)
    H = torch.randn(10, d, generator=g) * (3.0 / d**0.5)
    labels = torch.randint(0, 10, (batch,), generator=g)
    return (lambda z: z.flatten(1) @ H.T), labels


def tanh_problem(key: str, kind: str, norm: float, input_scale: float) -> Problem:
    f, x, z0 = make_tanh_problem(kind, norm, input_scale=input_scale, seed=0)
    f.W.requires_grad_(True)
    f64 = TanhCell(f.W.detach().double(), f.U.double(), f.b.double())
    head, labels = _linear_head(f.W.shape[0], x.shape[0], 0)
    note = {"P1": "Gaussian W, ||W||_2 = 0.9", "H2": "symmetric W, rho(W) = 0.98, input 0.1"}
    return Problem(key, f, f64, x, z0, [f.W], head, labels, note.get(key, ""))


def conv_problem() -> Problem:
    f, x, z0 = make_conv_problem(seed=0)
    f.requires_grad_(True)
    f64 = _module64(f)
    head, labels = _linear_head(z0[0].numel(), x.shape[0], 0)
    return Problem("P3", f, f64, x, z0, list(f.parameters()), head, labels,
                   "tutorial conv cell, 32 ch 8x8, batch 64")


def _module64(m: torch.nn.Module) -> torch.nn.Module:
    import copy

    m64 = copy.deepcopy(m).double()
    m64.requires_grad_(False)
    return m64


def digits_problem(epochs: int, budget_s: float, seed: int = 0) -> tuple[Problem, dict]:
    splits = load_dataset("digits", seed=seed)
    torch.manual_seed(seed)
    model = dk.zoo.ConvDEQ((1, 8, 8), 10)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    steps = epochs * math.ceil(len(splits.train) / 64)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    t0 = time.perf_counter()
    res = fit(model, splits.train, epochs=epochs, batch_size=64, optimizer=opt,
              scheduler=sched, seed=seed,
              on_step=lambda _info: time.perf_counter() - t0 > budget_s)
    train_s = time.perf_counter() - t0
    model.eval()
    xte, yte = splits.test.tensors
    with torch.no_grad():
        acc = float((model(xte).argmax(1) == yte).float().mean())
        xb, yb = xte[:64], yte[:64]
        inj = model.stem(xb)
        z0 = model.deq.init_state(inj)
    cell = model.deq.cell
    cell.requires_grad_(True)
    model.features.requires_grad_(False)
    model.head.requires_grad_(False)

    def head(z: torch.Tensor) -> torch.Tensor:
        return model.head(model.features(z))

    info = {"epochs_done": res.state.epoch, "steps": res.state.step, "train_s": round(train_s, 1),
            "test_acc": acc, "stopped_by_budget": bool(res.stopped)}
    prob = Problem("digits ConvDEQ", cell, _module64(cell), inj.detach(), z0,
                   list(cell.parameters()), head, yb,
                   f"dk.zoo.ConvDEQ((1, 8, 8), 10), {res.state.epoch} epochs, test acc "
                   f"{acc:.3f}, batch 64 test images")
    return prob, info


# ---------------------------------------------------------------------------------------------
# Forward, backward, reference
# ---------------------------------------------------------------------------------------------


def forward(p: Problem, solver: Any, adjoint: Any) -> tuple[Any, torch.Tensor]:
    e = torch.zeros_like(p.z0, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sol = dk.fixed_point(p.probe, p.z0, solver=solver, adjoint=adjoint, max_steps=300,
                             args=(p.x, e), throw=False)
    return sol, e


def backward(p: Problem, sol: Any, e: torch.Tensor,
             g: torch.Tensor) -> tuple[torch.Tensor, int, float]:
    p.probe.counter[0] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        grads = torch.autograd.grad(sol.value, [e, *p.params], g)
        t = time.perf_counter() - t0
    return grads[0], p.probe.counter[0], t


def incoming(p: Problem, z: torch.Tensor, kind: str) -> torch.Tensor:
    """g = dL/dz*: cross-entropy of the head ("loss") or a fixed random vector ("random")."""
    if kind == "random":
        gen = torch.Generator().manual_seed(4242)
        return torch.randn(z.shape, generator=gen, dtype=z.dtype) / z.shape[0]
    zz = z.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = torch.nn.functional.cross_entropy(p.head(zz), p.labels)
        (g,) = torch.autograd.grad(loss, zz)
    return g


def reference(p: Problem, z: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, str]:
    """u* = (I - J^T)^{-1} g in float64 at z (dense for D <= 512, else GMRES rtol 1e-12)."""
    z64, x64, g64 = z.detach().double(), p.x.double(), g.double()
    B = z64.shape[0]
    _, vjp_fn = torch.func.vjp(lambda zz: p.f64(zz, x64), z64)
    if p.D <= 512:
        eye = torch.eye(p.D, dtype=torch.float64)
        cols = [vjp_fn(eye[i].expand(B, -1).reshape(z64.shape).contiguous())[0].reshape(B, -1)
                for i in range(p.D)]
        JT = torch.stack(cols, dim=2)  # JT[b, :, i] = J_b^T e_i
        A = torch.eye(p.D, dtype=torch.float64) - JT
        u = torch.linalg.solve(A, g64.reshape(B, -1)).reshape(z64.shape)
        # cross-check of the two references (the GMRES one is used for D = 2048)
        diff = float((_gmres64(vjp_fn, z64, g64, 1e-12) - u).norm() / u.norm())
        return u, f"dense float64 (J by D VJPs, LU solve; float64 GMRES differs by {diff:.0e})"
    u = _gmres64(vjp_fn, z64, g64, 1e-12)
    return u, "float64 GMRES rtol 1e-12 (restart 60)"


def _gmres64(vjp_fn: Any, z64: torch.Tensor, g64: torch.Tensor, rtol: float) -> torch.Tensor:
    B = z64.shape[0]

    def op(v: torch.Tensor) -> torch.Tensor:
        return v - vjp_fn(v.reshape(z64.shape))[0].reshape(B, -1)

    sol = dk.GMRES(rtol=rtol, atol=0.0, max_steps=3000, restart=60).solve(op, g64.reshape(B, -1))
    return sol.value.reshape(z64.shape)


def _per_sample(u: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    u64, r = u.double().flatten(1), ref.flatten(1)
    return (u64 - r).norm(dim=1) / r.norm(dim=1).clamp_min(1e-300)


def errors(u: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    u64, r = u.double().flatten(1), ref.flatten(1)
    diff = u64 - r
    per = diff.norm(dim=1) / r.norm(dim=1).clamp_min(1e-300)
    cos = float((u64 * r).sum() / (u64.norm() * r.norm()).clamp_min(1e-300))
    return {"rel_err": float(diff.norm() / r.norm()), "rel_err_max_sample": float(per.max()),
            "abs_err": float(diff.norm()), "cos": cos}


def grad_error_field(stats: dict[str, Any]) -> Any:
    if "grad_error" not in stats:
        return None
    v = stats["grad_error"]
    if isinstance(v, torch.Tensor):
        v = v.detach().double()
        return {"max": float(v.max()), "mean": float(v.mean()),
                "rms": float(v.pow(2).mean().sqrt()), "numel": v.numel()}
    try:
        return {"value": float(v)}
    except (TypeError, ValueError):
        return {"repr": repr(v)}


# ---------------------------------------------------------------------------------------------
# One block: problem x forward solver x incoming gradient
# ---------------------------------------------------------------------------------------------


def run_block(p: Problem, fwd_name: str, fwd: Any, gkind: str, fams: dict, singles: dict,
              grid: tuple[float, ...], repeats: int) -> dict[str, Any]:
    sol0, _ = forward(p, fwd, dk.ImplicitAdjoint())
    z = sol0.value.detach()
    g = incoming(p, z, gkind)
    ref, ref_how = reference(p, z, g)
    st = sol0.stats
    block: dict[str, Any] = {
        "problem": p.key, "forward": fwd_name, "g": gkind, "reference": ref_how,
        "fwd_nfev": int(st["nfev"]), "fwd_max_steps": int(st["nstep"].max()),
        "fwd_converged": float(st["converged"].float().mean()),
        "fwd_rel_residual_max": float(rel_residual(p.f, z, p.x).max()),
        "sweep": {}, "singles": {},
    }

    def measure(adj: Any) -> dict[str, Any]:
        sol, e = forward(p, fwd, adj)
        if not torch.equal(sol.value.detach(), z):
            raise RuntimeError("forward not deterministic")
        u, vjps, t = backward(p, sol, e, g)
        bst = sol.backward
        out = {"vjps": vjps, "nmatvec": int(bst.get("nmatvec", -1)) if "nmatvec" in bst else None,
               "converged": float(bst["converged"].float().mean()) if "converged" in bst else None,
               "probe_time": t, **errors(u, ref)}
        ge = grad_error_field(bst)
        if ge is not None:
            out["grad_error"] = ge
            est = bst["grad_error"]
            if isinstance(est, torch.Tensor) and est.numel() == u.shape[0]:
                true = _per_sample(u, ref)
                ratio = est.detach().double().cpu() / true.clamp_min(1e-30)
                fin = ratio[torch.isfinite(ratio)]
                if fin.numel():
                    out["grad_error_ratio"] = {
                        "min": float(fin.min()), "median": float(fin.median()),
                        "max": float(fin.max()), "bounds": float((ratio >= 1).double().mean()),
                        "nonfinite": int((~torch.isfinite(ratio)).sum())}
        for k, v in bst.items():  # anything else the adjoint reports (e.g. nprecond)
            if k in ("nmatvec", "converged", "grad_error") or k in out:
                continue
            if isinstance(v, (int, float, bool)):
                out.setdefault("stats", {})[k] = v
            elif isinstance(v, torch.Tensor) and v.numel() > 0 and not v.is_complex():
                out.setdefault("stats", {})[k] = float(v.double().max())
        return out

    for name, make in fams.items():
        pts, best = [], math.inf
        stall = 0
        for r in grid:
            m = measure(make(r))
            m["rtol"] = r
            pts.append(m)
            if m["rel_err"] <= min(LEVELS) * 0.5:
                break
            stall = stall + 1 if m["rel_err"] > 0.7 * best else 0
            best = min(best, m["rel_err"])
            if stall >= 3:  # error floor (float32) reached
                break
        block["sweep"][name] = pts
    for name, make in singles.items():
        block["singles"][name] = measure(make())

    # the cheapest point of every method at every level
    chosen: dict[str, dict[str, Any]] = {}
    for lvl in LEVELS:
        row = {}
        for name, pts in block["sweep"].items():
            ok = [q for q in pts if q["rel_err"] <= lvl]
            if ok:
                q = min(ok, key=lambda q: (q["vjps"], -q["rtol"]))
                row[name] = {"cfg": (name, q["rtol"]), **q}
        for name, q in block["singles"].items():
            if q["rel_err"] <= lvl:
                row[name] = {"cfg": (name, None), **q}
        chosen[f"{lvl:.0e}"] = row

    # time the distinct configurations round-robin
    cfgs = sorted({r["cfg"] for row in chosen.values() for r in row.values()}
                  | {(n, None) for n in singles}, key=str)
    times: dict[Any, list[float]] = {c: [] for c in cfgs}
    ftimes: dict[Any, list[float]] = {c: [] for c in cfgs}
    for _ in range(repeats):
        for c in cfgs:
            name, r = c
            adj = singles[name]() if r is None and name in singles else fams[name](r)
            t0 = time.perf_counter()
            sol, e = forward(p, fwd, adj)
            ftimes[c].append(time.perf_counter() - t0)
            _, _, t = backward(p, sol, e, g)
            times[c].append(t)
    med = {c: statistics.median(v) for c, v in times.items()}
    # forward time with each adjoint (an adjoint that reuses the forward makes it keep the
    # solver's inverse estimate): median over its timed configurations
    by_method: dict[str, list[float]] = {}
    for c, v in ftimes.items():
        by_method.setdefault(c[0], []).extend(v)
    block["forward_time"] = {n: statistics.median(v) for n, v in by_method.items()}
    for row in chosen.values():
        base = row.get("GMRES")
        for q in row.values():
            q["time"] = med[q["cfg"]]
            q["vjps_vs_gmres"] = q["vjps"] / base["vjps"] if base else None
            q["time_vs_gmres"] = q["time"] / base["time"] if base else None
            q["cfg"] = list(q["cfg"])
    for name, q in block["singles"].items():
        q["time"] = med[(name, None)]
    block["levels"] = chosen
    block["times_all"] = {f"{c[0]}@{c[1]}": v for c, v in times.items()}
    return block


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def _r(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def level_table(blocks: list[dict]) -> str:
    """One row per method: at each level the VJPs and the backward time of its cheapest point,
    with the ratios against cold GMRES at that level."""
    rows = []
    for b in blocks:
        names = list(b["sweep"]) + list(b["singles"])
        for name in names:
            cells = []
            for lvl in b["levels"]:
                q = b["levels"][lvl].get(name)
                if q is None:
                    cells += ["-", "-"]
                    continue
                rt = "" if q.get("rtol") is None else f", rtol {q['rtol']:.0e}"
                cells += [f"{q['vjps']} ({_r(q['vjps_vs_gmres'])}{rt})",
                          f"{fmt_time(q['time'])} ({_r(q['time_vs_gmres'])})"]
            if any(c != "-" for c in cells):
                rows.append([b["problem"], b["forward"], b["g"], name, *cells])
    heads = []
    for lvl in LEVELS:
        heads += [f"VJPs, err<={lvl:.0e}", f"time, err<={lvl:.0e}"]
    return md_table(["problem", "fwd", "g", "method", *heads], rows)


def reach_table(blocks: list[dict]) -> str:
    """Methods that never reached a level: their best error."""
    rows = []
    for b in blocks:
        for name, pts in b["sweep"].items():
            best = min(pts, key=lambda q: q["rel_err"])
            rows.append([b["problem"], b["forward"], b["g"], name, f"{best['rel_err']:.1e}",
                         f"{best['rtol']:.0e}", best["vjps"],
                         f"{best['converged']:.2f}" if best["converged"] is not None else "-"])
    return md_table(["problem", "fwd", "g", "method", "best rel err", "at rtol", "VJPs",
                     "converged"], rows)


def singles_table(blocks: list[dict]) -> str:
    rows = []
    for b in blocks:
        for name, q in b["singles"].items():
            ge = q.get("grad_error")
            ges = "-" if ge is None else ", ".join(f"{k} {v:.1e}" if isinstance(v, float) else
                                                   f"{k} {v}" for k, v in ge.items())
            rows.append([b["problem"], b["forward"], b["g"], name, q["vjps"],
                         f"{q['rel_err']:.1e}", f"{q['rel_err_max_sample']:.1e}",
                         f"{q['cos']:.4f}", fmt_time(q["time"]), ges])
    return md_table(["problem", "fwd", "g", "method", "VJPs", "rel err u", "max sample err",
                     "cos(u, u*)", "time", "reported grad_error"], rows)


def grad_error_table(blocks: list[dict]) -> str:
    """``sol.backward["grad_error"]`` (per sample) against the true per-sample relative error
    of u, over the points of each sweep (and the single points)."""
    rows = []
    for b in blocks:
        entries = [(n, pts) for n, pts in b["sweep"].items()]
        entries += [(n, [q]) for n, q in b["singles"].items()]
        for name, pts in entries:
            rs = [q["grad_error_ratio"] for q in pts if "grad_error_ratio" in q]
            if not rs:
                continue
            rows.append([b["problem"], b["forward"], b["g"], name, len(rs),
                         f"{min(r['min'] for r in rs):.2f}",
                         f"{statistics.median(r['median'] for r in rs):.2f}",
                         f"{max(r['max'] for r in rs):.2f}",
                         f"{min(r['bounds'] for r in rs):.2f}"])
    return md_table(["problem", "fwd", "g", "method", "points", "min est/true",
                     "median est/true", "max est/true", "min fraction bounded (est >= true)"],
                    rows)


def forward_table(blocks: list[dict]) -> str:
    names: list[str] = []
    for b in blocks:
        names += [n for n in b["forward_time"] if n not in names]
    rows = []
    for b in blocks:
        if b["g"] != "loss":
            continue
        base = b["forward_time"].get("GMRES")
        rows.append([b["problem"], b["forward"], *(
            "-" if n not in b["forward_time"] else
            f"{fmt_time(b['forward_time'][n])} "
            f"({_r(b['forward_time'][n] / base if base else None)})" for n in names)])
    return md_table(["problem", "fwd", *names], rows)


def target_table(blocks: list[dict]) -> tuple[str, list[dict]]:
    rows, out = [], []
    for b in blocks:
        for lvl, row in b["levels"].items():
            base = row.get("GMRES")
            new = {n: q for n, q in row.items() if n not in ("GMRES", "Neumann")}
            best = min(new.items(), key=lambda kv: kv[1]["vjps"]) if new else None
            rec = {"problem": b["problem"], "forward": b["forward"], "g": b["g"], "level": lvl,
                   "gmres_vjps": base["vjps"] if base else None,
                   "neumann_vjps": row["Neumann"]["vjps"] if "Neumann" in row else None,
                   "best_new": best[0] if best else None,
                   "best_new_vjps": best[1]["vjps"] if best else None,
                   "ratio": (best[1]["vjps"] / base["vjps"]) if best and base else None,
                   "ratio_solve_only": ((best[1]["vjps"] - 1) / (base["vjps"] - 1))
                   if best and base and base["vjps"] > 1 else None}
            rec["meets_0.5x"] = rec["ratio"] is not None and rec["ratio"] <= 0.5
            out.append(rec)
            rows.append([b["problem"], b["forward"], b["g"], lvl,
                         rec["gmres_vjps"] if base else "-",
                         rec["neumann_vjps"] if rec["neumann_vjps"] is not None else "-",
                         rec["best_new"] or "(none available)",
                         rec["best_new_vjps"] if best else "-", _r(rec["ratio"]),
                         _r(rec["ratio_solve_only"]),
                         {True: "yes", False: "no"}[rec["meets_0.5x"]] if best and base else "-"])
    return md_table(["problem", "fwd", "g", "err <=", "GMRES VJPs", "Neumann VJPs",
                     "best new method", "its VJPs", "/ GMRES", "/ GMRES (excl. final VJP)",
                     "<= 0.5x"], rows), out


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="P1 and P3, Anderson only (< 1 min)")
    ap.add_argument("--out", default=str(RESULTS_DIR / "bench_backward.json"))
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=10, help="ConvDEQ training epochs (full mode)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    env = environment()
    feat = features()
    fams, singles = families(feat), single_points(feat)
    repeats = a.repeats or (3 if a.quick else 7)
    grid = RTOL_GRID_QUICK if a.quick else RTOL_GRID
    solvers = {"Anderson": dk.Anderson(m=5, rtol=FWD_RTOL, atol=0.0)}
    if not a.quick:
        solvers = {"Broyden": dk.Broyden(rtol=FWD_RTOL, atol=0.0), **solvers}

    problems = [tanh_problem("P1", "gaussian", 0.9, 1.0), conv_problem()]
    train_info = None
    if not a.quick:
        problems.insert(1, tanh_problem("H2", "symmetric", 0.98, 0.1))
        conv, train_info = digits_problem(a.epochs, budget_s=60.0)
        problems.append(conv)

    blocks, probs = [], []
    for p in problems:
        with torch.no_grad():
            sol, _ = forward(p, solvers["Anderson"], dk.ImplicitAdjoint())
        rho = spectral_radius_estimate(p.f, sol.value.detach(), p.x, k=60)
        probs.append({"problem": p.key, "D": p.D, "batch": p.z0.shape[0], "note": p.note,
                      "rho_J_median": float(rho.median()), "rho_J_max": float(rho.max())})
        for fname, fs in solvers.items():
            for gk in ("loss", "random"):
                t0 = time.perf_counter()
                blocks.append(run_block(p, fname, fs, gk, fams, singles, grid, repeats))
                print(f"  [{p.key} {fname} g={gk}: {time.perf_counter() - t0:.1f} s]",
                      file=sys.stderr, flush=True)

    buf = io.StringIO()
    with redirect_stdout(buf):
        print(f"# Backward at equal gradient error ({'quick' if a.quick else 'full'} run)\n")
        print("\n".join(header_lines(env)))
        print(f"- core features present: {', '.join(k for k, v in feat.items() if v) or 'none'}"
              f"; absent: {', '.join(k for k, v in feat.items() if not v) or 'none'}")
        print(f"- forward: {', '.join(solvers)} at rtol {FWD_RTOL:g}, atol 0; linear rtol grid "
              f"{', '.join(f'{r:.0e}' for r in grid)}; timing: median of {repeats} round-robin "
              "repeats of the backward call alone (autograd.grad into u and the parameters)")
        if train_info:
            print(f"- digits ConvDEQ training: {train_info}")
        print("\n## Problems\n")
        print(md_table(["problem", "D", "batch", "rho(J*) median", "rho(J*) max", "notes"],
                       [[q["problem"], q["D"], q["batch"], f"{q['rho_J_median']:.3f}",
                         f"{q['rho_J_max']:.3f}", q["note"]] for q in probs]))
        print("\n## Forward solves and references\n")
        print(md_table(["problem", "fwd", "g", "nfev", "max steps", "converged",
                        "max rel residual", "reference u*"],
                       [[b["problem"], b["forward"], b["g"], b["fwd_nfev"], b["fwd_max_steps"],
                         f"{b['fwd_converged']:.2f}", f"{b['fwd_rel_residual_max']:.1e}",
                         b["reference"]] for b in blocks]))
        print("\n## Cheapest configuration per method at each gradient error level\n")
        print("VJPs: vector-Jacobian products through f in the backward call, including the "
              "one that carries u into the parameters. In brackets: ratio against cold GMRES at "
              "the same level, and the linear rtol of the kept point; '-': level not reached; "
              "methods that reach no level are left out (see the tables below).\n")
        print(level_table(blocks))
        print("\n## Most accurate point of each sweep (a sweep stops once below 5e-5 or when "
              "the error stops improving)\n")
        print(reach_table(blocks))
        if singles:
            print("\n## Methods without a tolerance sweep (SHINE, rtol_from_forward)\n")
            print(singles_table(blocks))
        ge = grad_error_table(blocks)
        if ge.count("\n") > 1:
            print("\n## Reported grad_error vs true error\n")
            print("Per sample: reported `sol.backward['grad_error']` / true relative error of "
                  "u; min / median / max over the samples and the points of a sweep "
                  "(per-point values in the JSON).\n")
            print(ge)
        print("\n## Forward solve time with each adjoint (median over the timed runs)\n")
        print(forward_table(blocks))
        tt, targets = target_table(blocks)
        print("\n## Target: backward VJPs <= 0.5x cold GMRES at the same accuracy\n")
        print(tt)
        missing = [k for k, v in feat.items() if not v]
        if missing:
            print(f"\nNot measured (absent from the core at run time): {', '.join(missing)}.")
        print(f"\nload average at end: {[round(v, 2) for v in __import__('os').getloadavg()]}; "
              f"total {time.perf_counter() - t_start:.0f} s")
    text = buf.getvalue()
    print(text)
    out = {"env": env, "config": {**vars(a), "levels": LEVELS, "rtol_grid": grid,
                                  "fwd_rtol": FWD_RTOL, "repeats": repeats},
           "features": feat, "train": train_info, "problems": probs, "blocks": blocks,
           "targets": targets, "total_s": time.perf_counter() - t_start}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    Path(a.out).with_suffix(".txt").write_text(text)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
