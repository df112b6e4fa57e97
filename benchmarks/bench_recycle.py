#!/usr/bin/env python
"""Krylov subspace recycling across training steps for the implicit backward solve.

Does ``RecyclingGMRES`` (GCRO with a recycled subspace Y, D x k, shared by the batch and
carried from one training step's backward solve to the next) cut the backward's matvecs
(VJPs) at equal accuracy, compared with cold ``GMRES``?

(a) ``dk.zoo.ConvDEQ((1, 8, 8), 10)`` trained on digits with Adam (lr 1e-3, batch 64, its
default Anderson forward): ``--warmup`` steps first (the backward systems get harder as
training makes J less contractive), then ``--steps`` measured steps. At each measured step the
training backward system (I - J^T) u = g at z* is solved, in the same process and round-robin,
by cold GMRES and by RecyclingGMRES k = 2, 4, 8 (each recycler sees the whole sequence), all
to the same rtol with atol 0; the cold GMRES solution trains the model, so the sequence of
systems is the same for every method. (b) a synthetic slowly varying float64 sequence:
A_t,b = I - J_t,b with J_t,b = J0 + 0.01 E_t + 0.005 E_t,b, J0 nonsymmetric with four
eigenvalues in 0.90-0.97 and the rest within radius ~0.5, a new right-hand side each step.

Reported per method, over the steps after the first (on the first every recycler is plain
GMRES): VJPs per solve (the recyclers' include the k products A Y), the ratio against cold
GMRES, the fraction of a recycler's VJPs spent on A Y, wall time per solve (median of
``--repeats`` round-robin repeats; a recycler's state is restored between repeats so each
repeat solves the same system from the same space) and the time beyond the VJPs themselves
(solve time minus VJPs x the step's measured time of one VJP: Gram-Schmidt, the recycler's
extraction and pooling), the true relative residual ||g - A u|| / ||g|| (max over the batch,
one extra uncounted product) and, where cheap, the relative error of u against a float64
reference (dense LU for (b); for (a) float64 GMRES, rtol 1e-12, on a float64 copy of the cell
at the float32 z*, on every ``--ref-every``-th step).

Usage: ``.venv/bin/python benchmarks/bench_recycle.py [--quick] [--out PATH]`` (full ~3 min,
--quick < 30 s). Writes ``benchmarks/results/bench_recycle.json`` and the printed tables to
the ``.txt`` next to it.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import deqkit as dk
from _deqbench import (
    RESULTS_DIR,
    environment,
    fmt_time,
    header_lines,
    md_table,
    spectral_radius_estimate,
)
from deqkit.data import load_dataset
from deqkit.linear.recycle import RecyclingGMRES

KS = (2, 4, 8)
CONV_RTOLS = (1e-4, 1e-5, 1e-6)  # float32: 1e-4 is the zoo's training default; 1e-6 is
# near the float32 floor of the true residual, where a hard sample can stagnate
SYN_RTOL = 1e-8
MAX_STEPS, RESTART = 300, 30


def make_methods(rtol: float) -> dict[str, Any]:
    out: dict[str, Any] = {"GMRES": dk.GMRES(rtol=rtol, atol=0.0, max_steps=MAX_STEPS,
                                             restart=RESTART)}
    for k in KS:
        out[f"recycle k={k}"] = RecyclingGMRES(rtol=rtol, atol=0.0, max_steps=MAX_STEPS,
                                               restart=RESTART, recycle=k)
    return out


# ---------------------------------------------------------------------------------------------
# Measuring one system with every method
# ---------------------------------------------------------------------------------------------


def _snapshot(solver: Any) -> Any:
    space = getattr(solver, "space", None)
    return None if space is None else copy.copy(space)


def _restore(solver: Any, saved: Any) -> None:
    if saved is not None:
        for f in ("basis", "weights", "nsolve", "last_setup_matvecs"):
            setattr(solver.space, f, getattr(saved, f))


def vjp_time(op: Any, rhs: torch.Tensor, n: int = 3) -> float:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        op(rhs)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def measure_system(methods: dict[str, Any], op: Callable[[torch.Tensor], torch.Tensor],
                   rhs: torch.Tensor, repeats: int, ref: torch.Tensor | None = None,
                   ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Solve ``op u = rhs`` with every method, round-robin ``repeats`` times (recyclers'
    spaces restored between repeats, the last repeat's kept). Returns per-method records and
    the methods' last solutions."""
    times: dict[str, list[float]] = {n: [] for n in methods}
    sols: dict[str, Any] = {}
    setup: dict[str, int] = {}
    for rep in range(repeats):
        for name, solver in methods.items():
            saved = _snapshot(solver)
            t0 = time.perf_counter()
            sol = solver.solve(op, rhs)
            times[name].append(time.perf_counter() - t0)
            setup[name] = getattr(getattr(solver, "space", None), "last_setup_matvecs", 0)
            if rep < repeats - 1:
                _restore(solver, saved)
            sols[name] = sol
    t_mv = vjp_time(op, rhs)
    gnorm = torch.linalg.vector_norm(rhs, dim=1).clamp_min(1e-300)
    out = {}
    for name, sol in sols.items():
        with torch.no_grad():
            res = torch.linalg.vector_norm(rhs - op(sol.value), dim=1) / gnorm
        t = statistics.median(times[name])
        rec = {"vjps": int(sol.nmatvec), "setup": int(setup[name]),
               "nstep_mean": float(sol.nstep.double().mean()), "nstep_max": int(sol.nstep.max()),
               "converged": float(sol.converged.double().mean()),
               "rel_res_max": float(res.max()), "rel_res_median": float(res.median()),
               "time": t, "times": times[name], "t_vjp": t_mv,
               "overhead": t - sol.nmatvec * t_mv}
        space = getattr(methods[name], "space", None)
        if space is not None and space.weights is not None:
            rec["pool_weights"] = [round(float(w), 4) for w in space.weights]
        if ref is not None:
            u, r = sol.value.double(), ref.double()
            rec["rel_err_u"] = float((u - r).norm() / r.norm())
        out[name] = rec
    return out, sols


class Tee(dk.AbstractLinearSolver):
    """The training backward's linear solver: at a measured step it solves the system with
    every method of every level (``measure_system``) and returns the cold GMRES solution of
    the tightest level; otherwise it runs that GMRES alone. ``context``: what the float64
    reference needs (set per step)."""

    def __init__(self, levels: dict[float, dict[str, Any]], repeats: int) -> None:
        self.rtol, self.atol, self.max_steps = min(levels), 0.0, MAX_STEPS
        self.levels, self.repeats = levels, repeats
        self.train_solver = levels[min(levels)]["GMRES"]
        self.measure = False
        self.context: dict[str, Any] | None = None
        self.records: dict[float, list[dict[str, Any]]] = {r: [] for r in levels}

    def __repr__(self) -> str:
        return "Tee(GMRES, recyclers)"

    def solve(self, matvec: Any, rhs: torch.Tensor, x0: Any = None,
              preconditioner: Any = None) -> dk.LinearSolution:
        assert x0 is None and preconditioner is None
        op = matvec.mv if hasattr(matvec, "mv") else matvec
        if not self.measure:
            return self.train_solver.solve(op, rhs)
        ref = reference_conv(self.context, rhs) if self.context is not None else None
        out = None
        for rtol, methods in self.levels.items():
            rec, sols = measure_system(methods, op, rhs, self.repeats, ref)
            self.records[rtol].append(rec)
            if methods["GMRES"] is self.train_solver:
                out = sols["GMRES"]
        return out


def reference_conv(ctx: dict[str, Any], rhs: torch.Tensor) -> torch.Tensor:
    """u* = (I - J^T)^{-1} g in float64 (cell copied to float64, at the float32 z*)."""
    cell64 = copy.deepcopy(ctx["cell"]).double()
    z64, inj64, g64 = ctx["z"].double(), ctx["inj"].double(), rhs.double()
    B = z64.shape[0]
    _, vjp_fn = torch.func.vjp(lambda zz: cell64(zz, inj64), z64)

    def op(v: torch.Tensor) -> torch.Tensor:
        return v - vjp_fn(v.reshape(z64.shape))[0].reshape(B, -1)

    return dk.GMRES(rtol=1e-12, atol=0.0, max_steps=2000, restart=60).solve(op, g64).value


# ---------------------------------------------------------------------------------------------
# (a) digits ConvDEQ trained with Adam
# ---------------------------------------------------------------------------------------------


def digits_sequence(warmup: int, steps: int, repeats: int, ref_every: int,
                    seed: int = 0) -> list[dict[str, Any]]:
    splits = load_dataset("digits", seed=seed)
    torch.manual_seed(seed)
    tee = Tee({r: make_methods(r) for r in CONV_RTOLS}, repeats)
    model = dk.zoo.ConvDEQ((1, 8, 8), 10,
                           adjoint=dk.ImplicitAdjoint(tee, on_failure="ignore"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xtr, ytr = splits.train.tensors
    gen = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(xtr), generator=gen)
                       for _ in range((warmup + steps) * 64 // len(xtr) + 1)])
    losses, fwd_steps, t0, t_warm = [], [], time.perf_counter(), 0.0
    for step in range(warmup + steps):
        ids = order[step * 64 : (step + 1) * 64]
        xb, yb = xtr[ids], ytr[ids]
        inj = model.stem(xb)
        z = model.deq(inj)
        loss = torch.nn.functional.cross_entropy(model.head(model.features(z)), yb)
        i = step - warmup
        tee.measure, tee.context = i >= 0, None
        if i >= 0 and ref_every > 0 and (i % ref_every == 0 or i == steps - 1):
            tee.context = {"cell": model.deq.cell, "z": z.detach(), "inj": inj.detach()}
        if i == steps - 1:
            rho = spectral_radius_estimate(model.deq.cell, z.detach(), inj.detach(), k=60)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        fwd_steps.append(float(model.deq.last_solution.stats["nstep"].double().mean()))
        if i == -1:
            t_warm = time.perf_counter() - t0
    with torch.no_grad():
        model.eval()
        xte, yte = splits.test.tensors
        acc = float((model(xte).argmax(1) == yte).double().mean())
    note = (f"dk.zoo.ConvDEQ((1, 8, 8), 10), Adam lr 1e-3, batch 64, {warmup} warm-up "
            f"({t_warm:.0f} s) + {steps} measured steps, loss {losses[0]:.2f} -> "
            f"{losses[-1]:.2f}, test acc after {acc:.3f}, forward Anderson steps "
            f"{statistics.mean(fwd_steps[warmup:]):.1f}; rho(J*) at the last step: median "
            f"{float(rho.median()):.3f}, max {float(rho.max()):.3f}")
    return [{"name": f"digits ConvDEQ, rtol {r:.0e}", "D": int(z[0].numel()), "batch": 64,
             "dtype": "float32", "rtol": r, "warmup": warmup, "steps": steps,
             "loss_first": losses[0], "loss_last": losses[-1], "test_acc_after": acc,
             "rho_J_median": float(rho.median()), "rho_J_max": float(rho.max()),
             "records": tee.records[r], "note": note} for r in CONV_RTOLS]


# ---------------------------------------------------------------------------------------------
# (b) synthetic slowly varying sequence
# ---------------------------------------------------------------------------------------------


def synthetic_sequence(steps: int, repeats: int, D: int, B: int, seed: int = 0) -> dict[str, Any]:
    F = torch.float64
    g = torch.Generator().manual_seed(seed)
    # J0 = Q T Q^T, T upper triangular: eigenvalues exactly diag(T) (four slow ones, the bulk
    # uniform in [-0.5, 0.5]), nonnormal through T's strictly upper part
    lam = torch.cat([torch.tensor([0.9, 0.93, 0.95, 0.97], dtype=F),
                     0.5 * (2 * torch.rand(D - 4, generator=g, dtype=F) - 1)])
    T = torch.diag(lam) + 0.3 * torch.triu(torch.randn(D, D, generator=g, dtype=F), 1) / D**0.5
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=F))
    J0 = Q @ T @ Q.T
    methods = make_methods(SYN_RTOL)
    records = []
    eye = torch.eye(D, dtype=F)
    for _ in range(steps):
        Et = torch.randn(D, D, generator=g, dtype=F) / D**0.5
        Eb = torch.randn(B, D, D, generator=g, dtype=F) / D**0.5
        A = eye - (J0 + 0.01 * Et + 0.005 * Eb)
        b = torch.randn(B, D, generator=g, dtype=F)
        ref = torch.linalg.solve(A, b)

        def op(v: torch.Tensor, A: torch.Tensor = A) -> torch.Tensor:
            return torch.bmm(A, v.unsqueeze(2)).squeeze(2)

        rec, _ = measure_system(methods, op, b, repeats, ref)
        records.append(rec)
    smin = float(torch.linalg.svdvals(eye - J0)[-1])
    return {"name": "synthetic", "D": D, "batch": B, "dtype": "float64", "rtol": SYN_RTOL,
            "steps": steps, "records": records,
            "note": f"A = I - (J0 + 0.01 E_t + 0.005 E_t,b), J0 = Q T Q^T with eigenvalues "
                    f"0.90, 0.93, 0.95, 0.97 and {D - 4} uniform in [-0.5, 0.5], D {D}, batch "
                    f"{B}; sigma_min(I - J0) {smin:.3f}"}


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def summarise(block: dict[str, Any]) -> list[dict[str, Any]]:
    """Per method over the steps after the first: means, ratios against cold GMRES."""
    recs = block["records"][1:] or block["records"]
    names = list(recs[0])
    base_v = sum(r["GMRES"]["vjps"] for r in recs)
    base_t = sum(r["GMRES"]["time"] for r in recs)
    out = []
    for n in names:
        v = sum(r[n]["vjps"] for r in recs)
        t = sum(r[n]["time"] for r in recs)
        errs = [r[n]["rel_err_u"] for r in recs if "rel_err_u" in r[n]]
        w = recs[-1][n].get("pool_weights")
        out.append({
            "sequence": block["name"], "method": n, "solves": len(recs),
            "vjps_per_solve": v / len(recs), "vjps_ratio": v / base_v,
            "vjps_median": statistics.median(r[n]["vjps"] for r in recs),
            "vjps_max": max(r[n]["vjps"] for r in recs),
            "nstep_max_mean": statistics.mean(r[n]["nstep_max"] for r in recs),
            "ay_fraction": sum(r[n]["setup"] for r in recs) / v,
            "nstep_mean": statistics.mean(r[n]["nstep_mean"] for r in recs),
            "time_per_solve": t / len(recs), "time_ratio": t / base_t,
            "overhead_per_solve": statistics.mean(r[n]["overhead"] for r in recs),
            "t_vjp": statistics.median(r[n]["t_vjp"] for r in recs),
            "rel_res_max": max(r[n]["rel_res_max"] for r in recs),
            "converged_min": min(r[n]["converged"] for r in recs),
            "rel_err_u_max": max(errs) if errs else None, "n_ref": len(errs),
            "pool_weights_last": w,
        })
    return out


def summary_table(rows: list[dict[str, Any]]) -> str:
    return md_table(
        ["sequence", "method", "solves", "VJPs/solve", "vs GMRES", "median (max)", "A Y share",
         "steps/sample (slowest)", "time/solve", "vs GMRES", "non-VJP time/solve",
         "max rel residual", "converged", "max rel err u (n)", "pool weights (last)"],
        [[r["sequence"], r["method"], r["solves"], f"{r['vjps_per_solve']:.1f}",
          f"{r['vjps_ratio']:.2f}x", f"{r['vjps_median']:g} ({r['vjps_max']})",
          f"{r['ay_fraction']:.0%}", f"{r['nstep_mean']:.1f} ({r['nstep_max_mean']:.1f})",
          fmt_time(r["time_per_solve"]), f"{r['time_ratio']:.2f}x",
          fmt_time(r["overhead_per_solve"]), f"{r['rel_res_max']:.1e}",
          f"{r['converged_min']:.2f}",
          "-" if r["rel_err_u_max"] is None else f"{r['rel_err_u_max']:.1e} ({r['n_ref']})",
          "-" if not r["pool_weights_last"] else
          ", ".join(f"{w:.2f}" for w in r["pool_weights_last"])] for r in rows])


def per_step_table(block: dict[str, Any]) -> str:
    names = list(block["records"][0])
    rows = [[i, *(r[n]["vjps"] for n in names)] for i, r in enumerate(block["records"])]
    return md_table(["step", *[f"{n} VJPs" for n in names]], rows)


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run (< 30 s)")
    ap.add_argument("--out", default=str(RESULTS_DIR / "bench_recycle.json"))
    ap.add_argument("--warmup", type=int, default=None, help="unmeasured training steps")
    ap.add_argument("--steps", type=int, default=None, help="measured training steps")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--ref-every", type=int, default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    env = environment()
    warmup = a.warmup if a.warmup is not None else (5 if a.quick else 150)
    steps = a.steps if a.steps is not None else (4 if a.quick else 16)
    repeats = a.repeats or (1 if a.quick else 3)
    ref_every = a.ref_every if a.ref_every is not None else (0 if a.quick else 5)
    blocks = digits_sequence(warmup, steps, repeats, ref_every)
    print(f"  [digits: {time.perf_counter() - t_start:.1f} s]", file=sys.stderr, flush=True)
    t1 = time.perf_counter()
    blocks.append(synthetic_sequence(4 if a.quick else 12, repeats, 128 if a.quick else 256,
                                     8 if a.quick else 32))
    print(f"  [synthetic: {time.perf_counter() - t1:.1f} s]", file=sys.stderr, flush=True)
    rows = [r for b in blocks for r in summarise(b)]

    buf = io.StringIO()
    with redirect_stdout(buf):
        mode = "quick" if a.quick else "full"
        print(f"# Krylov subspace recycling for the implicit backward ({mode} run)\n")
        print("\n".join(header_lines(env)))
        print(f"- methods: cold dk.GMRES and RecyclingGMRES k = {', '.join(map(str, KS))}, "
              f"restart {RESTART}, max_steps {MAX_STEPS}, atol 0, the same rtol per sequence; "
              f"time: median of {repeats} round-robin repeats per system")
        notes: dict[str, list[dict[str, Any]]] = {}
        for b in blocks:
            notes.setdefault(b["note"], []).append(b)
        for note, bs in notes.items():
            rtols = ", ".join(f"{b['rtol']:.0e}" for b in bs)
            print(f"- {bs[0]['name'].split(',')[0]}: {note}; {bs[0]['dtype']}, rtol {rtols}")
        print("\n## Per solve, over the steps after the first (the first is plain GMRES for "
              "every recycler)\n")
        print("VJPs: batched operator products (vector-Jacobian products for the DEQ) per "
              "backward solve, the recyclers' k products A Y included (mean; 'vs GMRES': "
              "ratio of the sums; median and max over the solves); 'A Y share': their "
              "fraction of the recycler's VJPs; steps/sample: Arnoldi steps per sample, mean "
              "(and the slowest sample's, which sets the batch's VJPs, averaged over the "
              "solves); 'non-VJP time': solve time minus VJPs x the "
              "measured time of one VJP (orthogonalisation, extraction, pooling); max rel "
              "residual: true ||g - A u|| / ||g|| over all samples and solves; rel err u: "
              "against the float64 reference (number of solves with one); pool weights: how "
              "shared each recycled direction was over the batch (1 = in every sample's "
              "candidate space).\n")
        print(summary_table(rows))
        for b in blocks:
            print(f"\n## VJPs per step: {b['name']}\n")
            print(per_step_table(b))
        print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    text = buf.getvalue()
    print(text)
    out = {"env": env, "config": {**vars(a), "warmup": warmup, "steps": steps,
                                  "repeats": repeats, "ref_every": ref_every, "ks": KS,
                                  "restart": RESTART, "max_steps": MAX_STEPS},
           "summary": rows, "blocks": blocks, "total_s": time.perf_counter() - t_start}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    Path(a.out).with_suffix(".txt").write_text(text)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
