#!/usr/bin/env python
"""Reproduce the deqkit problems found while writing the benchmarks (evidence for the reports).

1. Per-step overhead of the driver loop and of Anderson (P1 f, exactly 50 steps).
2. NewtonKrylov with its default line search stalls on the P3 conv cell.
3. Broyden's memory restart builds the first new pair from the old inverse estimate
   (secant condition violated); samples blow up on H2.
4. Implicit backward: GMRES overhead vs Neumann on P1 float64.
5. With batch compaction, the reported residual differs from the one recomputed on the full
   batch (float32 GEMM results depend on the batch size): informational, not a bug.

Usage:  .venv/bin/python benchmarks/repro_findings.py   (~1 min)
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from torchdeq.solver import get_solver

import deqkit as dk
from _deqbench import (
    environment,
    header_lines,
    make_conv_problem,
    make_tanh_problem,
    rel_residual,
)


def med(fn: Callable[[], object], n: int = 11) -> float:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def per_step_overhead() -> None:
    print("## 1. Per-step cost beyond f (P1 float32, B=128, D=256, exactly 50 steps)\n")
    f, x, z0 = make_tanh_problem("gaussian", 0.9, seed=1)
    n = 50
    kw = dict(max_steps=n, args=(x,), throw=False, divergence_ratio=None)
    cases = [
        ("deqkit Picard", lambda: dk.fixed_point(f, z0, dk.FixedSteps(dk.Picard()), **kw)),
        ("deqkit Anderson(m=5)",
         lambda: dk.fixed_point(f, z0, dk.FixedSteps(dk.Anderson()), **kw)),
        ("TorchDEQ fixed_point_iter",
         lambda: get_solver("fixed_point_iter")(lambda z: f(z, x), z0, max_iter=n + 1, tol=0.0,
                                                stop_mode="rel")),
        ("TorchDEQ anderson(lam=1e-10)",
         lambda: get_solver("anderson")(lambda z: f(z, x), z0, max_iter=n + 1, tol=0.0,
                                        stop_mode="rel", lam=1e-10)),
    ]
    tfs: dict[str, list[float]] = {name: [] for name, _ in cases}
    ts: dict[str, list[float]] = {name: [] for name, _ in cases}
    with torch.no_grad():
        for _, fn in cases:
            fn()
        for _ in range(15):  # interleaved, so that load bursts hit every case alike
            for name, fn in cases:
                f(z0, x)
                t0 = time.perf_counter()
                f(z0, x)
                f(z0, x)
                tfs[name].append((time.perf_counter() - t0) / 2)
                t0 = time.perf_counter()
                fn()
                ts[name].append(time.perf_counter() - t0)
    for name, _ in cases:
        tf, t = statistics.median(tfs[name]), statistics.median(ts[name])
        extra = (t - (n + 1) * tf) / n
        print(f"- {name:30s} t_f {tf * 1e6:6.0f} us, per step beyond f "
              f"{extra * 1e6:6.0f} us, time/(nfev t_f) {t / ((n + 1) * tf):.2f}")
    print()


def newton_krylov_p3() -> None:
    print("## 2. NewtonKrylov on P3 (conv cell), rtol=1e-5, 20 Newton steps\n")
    f, x, z0 = make_conv_problem(seed=3)
    with torch.no_grad():
        for ls in (True, False):
            t0 = time.perf_counter()
            sol = dk.fixed_point(f, z0, dk.NewtonKrylov(rtol=1e-5, atol=0.0, line_search=ls),
                                 max_steps=20, args=(x,), throw=False, trace=True)
            t = time.perf_counter() - t0
            rel = rel_residual(f, sol.value, x)
            worst = int(rel.argmax())
            tr = sol.stats["trace"][:, worst]
            nbad = int((sol.stats["status"] != 0).sum())
            print(f"- line_search={ls}: {sol.result.name} ({nbad}/{rel.numel()} samples failed), "
                  f"nfev {int(sol.stats['nfev'])}, achieved max rel {float(rel.max()):.2e}, "
                  f"{t:.1f} s; worst sample ({worst}) abs residual per step: "
                  + " ".join(f"{v:.2g}" for v in tr[:21].tolist() if v == v))
    print()


def _hv(U: torch.Tensor, V: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """H x = -x + U^T (V x) per sample: Broyden's inverse-Jacobian estimate H = -I + sum u v^T
    (stored as in ``dk.Broyden``'s state, ``U``/``V`` of shape (B, n, D)) applied to ``x``."""
    if U.shape[1] == 0:
        return -x
    return -x + torch.bmm(torch.linalg.vecdot(V, x.unsqueeze(1)).unsqueeze(1), U).squeeze(1)


def _vh(U: torch.Tensor, V: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x^T H = -x + V^T (U x) per sample (see :func:`_hv`)."""
    if U.shape[1] == 0:
        return -x
    return -x + torch.bmm(torch.linalg.vecdot(U, x.unsqueeze(1)).unsqueeze(1), V).squeeze(1)


def _broyden_restart_fixed() -> type:
    """dk.Broyden whose memory restart computes the new pair relative to H = -I (the variant
    suggested in the report); used only to show the effect of the fix."""
    @dataclasses.dataclass(frozen=True)
    class BroydenRestartFixed(dk.Broyden):
        def step(self, fn, z, fz, r, state):  # type: ignore[no-untyped-def]
            m = state.U.shape[1]
            U, V, n = state.U, state.V, state.n
            if state.k > 0:
                s = z - state.z_prev
                y = r - state.g_prev
                if n == m:  # restart first, then build the pair from H = -I
                    n = 0
                Un, Vn = U[:, :n], V[:, :n]
                hy, sh = _hv(Un, Vn, y), _vh(Un, Vn, s)
                denom = (sh * y).sum(dim=1, keepdim=True)
                scale = sh.norm(dim=1, keepdim=True) * y.norm(dim=1, keepdim=True)
                ok = (denom.abs() > torch.finfo(z.dtype).eps * scale) & torch.isfinite(denom)
                safe = torch.where(ok, denom, torch.ones_like(denom))
                U[:, n].copy_(torch.where(ok, (s - hy) / safe, torch.zeros_like(s)))
                V[:, n].copy_(torch.where(ok, sh, torch.zeros_like(sh)))
                n += 1
            direction = -_hv(U[:, :n], V[:, :n], r)
            direction = torch.where(torch.isfinite(direction), direction, r)
            new = dataclasses.replace(state, U=U, V=V, z_prev=z, g_prev=r, n=n, k=state.k + 1)
            return z + direction, None, new

    return BroydenRestartFixed


def broyden_h2() -> None:
    print("## 3. Broyden memory restart on H2 (symmetric W, rho(J*)~0.95), rtol=1e-6\n")
    f, x, z0 = make_tanh_problem("symmetric", 0.98, input_scale=0.1, bias_scale=0.0, seed=2)
    fixed = _broyden_restart_fixed()
    with torch.no_grad():
        # Secant condition H_{k+1} y_k = s_k at the step where the memory restarts.
        xb = x[:4]

        def fn(v: torch.Tensor) -> torch.Tensor:
            return f(v, xb)

        for cls in (dk.Broyden, fixed):
            solver = cls(rtol=1e-6, atol=0.0, memory=3)
            z = z0[:4].clone()
            fz = fn(z)
            st = solver.init(fn, z, fz, fz - z, 100)
            while True:
                z, _, st = solver.step(fn, z, fz, fz - z, st)
                fz = fn(z)
                if st.n == 3:
                    break
            r = fz - z
            _, _, st2 = solver.step(fn, z, fz, r, st)
            s, y = z - st.z_prev, r - st.g_prev
            hy = _hv(st2.U[:, : st2.n], st2.V[:, : st2.n], y)
            err = (torch.linalg.vector_norm(hy - s, dim=1) / torch.linalg.vector_norm(s, dim=1))
            print(f"- {cls.__name__}(memory=3), step that restarts the memory: secant error "
                  f"||H y - s|| / ||s|| = " + ", ".join(f"{v:.1e}" for v in err.tolist()))
        for cls in (dk.Broyden, fixed):
            for mem in (5, 20, 150):
                sol = dk.fixed_point(f, z0, cls(rtol=1e-6, atol=0.0, memory=mem),
                                     max_steps=150, args=(x,), throw=False)
                bad = (sol.stats["status"] != 0).nonzero().squeeze(1).tolist()
                print(f"- {cls.__name__}(memory={mem}): {sol.result.name}, failed samples "
                      f"{bad}, nfev {int(sol.stats['nfev'])}, mean steps "
                      f"{float(sol.stats['nstep'].float().mean()):.1f}, achieved max rel "
                      f"{float(rel_residual(f, sol.value, x).max()):.2e}")
        sol = dk.fixed_point(f, z0, dk.Broyden(rtol=1e-6, atol=0.0), max_steps=150,
                             args=(x,), throw=False, trace=True, compact=False)
        bad = (sol.stats["status"] != 0).nonzero().squeeze(1)
        if bad.numel():
            tr = sol.stats["trace"][:, int(bad[0])]
            steps = [(k, v) for k, v in enumerate(tr.tolist()) if v == v]
            print(f"- Broyden(memory=20), sample {int(bad[0])}: abs residual by step: "
                  + " ".join(f"{k}:{v:.1e}" for k, v in steps[18:32]))
        sol = dk.fixed_point(f, z0, dk.Broyden(rtol=1e-6, atol=0.0), max_steps=150,
                             args=(x,), throw=False, divergence_ratio=None)
        print(f"- Broyden(memory=20), divergence_ratio=None: {sol.result.name}, nfev "
              f"{int(sol.stats['nfev'])}")
        z, _, _ = get_solver("broyden")(lambda z: f(z, x), z0, max_iter=150, tol=1e-6,
                                        stop_mode="rel", LBFGS_thres=20)
        print(f"- TorchDEQ broyden LBFGS_thres=20 (overwrites the oldest pair): achieved max rel "
              f"{float(rel_residual(f, z, x).max()):.2e}")
    print()


def implicit_backward() -> None:
    print("## 4. Implicit backward on P1 float64 (forward Anderson rtol=3e-7; backward rtol=1e-6)"
          "\n")
    f32, x32, z032 = make_tanh_problem("gaussian", 0.9, seed=1)
    W = f32.W.double().requires_grad_()
    f = type(f32)(W, f32.U.double(), f32.b.double())
    x, z0 = x32.double(), z032.double()
    solvers = {
        "GMRES (default, restart 30)": dk.GMRES(rtol=1e-6, atol=0.0, max_steps=200),
        "GMRES(restart=10)": dk.GMRES(rtol=1e-6, atol=0.0, max_steps=200, restart=10),
        "Neumann": dk.Neumann(rtol=1e-6, atol=0.0, max_steps=200),
    }
    times: dict[str, tuple[list[float], list[float], int]] = {k: ([], [], 0) for k in solvers}
    for _ in range(9):
        for name, ls in solvers.items():
            W.grad = None
            t0 = time.perf_counter()
            sol = dk.fixed_point(f, z0, dk.Anderson(rtol=3e-7, atol=0.0),
                                 dk.ImplicitAdjoint(ls, on_failure="ignore"), max_steps=300,
                                 args=(x,), throw=False)
            t1 = time.perf_counter()
            sol.value.pow(2).sum().backward()
            t2 = time.perf_counter()
            fw, bw, _ = times[name]
            fw.append(t1 - t0)
            bw.append(t2 - t1)
            times[name] = (fw, bw, int(sol.backward.get("nmatvec", -1)))
    zr = z0.clone().requires_grad_()
    out = f(zr, x)
    t_vjp = med(lambda: torch.autograd.grad(out, zr, torch.ones_like(out), retain_graph=True),
                31)
    print(f"- one VJP (retained graph): {t_vjp * 1e3:.2f} ms")
    for name, (fw, bw, nmv) in times.items():
        b = statistics.median(bw)
        print(f"- {name:28s} forward {statistics.median(fw) * 1e3:6.1f} ms, backward "
              f"{b * 1e3:6.1f} ms, matvecs {nmv}, backward beyond VJPs per matvec "
              f"{(b - nmv * t_vjp) / max(nmv, 1) * 1e3:.2f} ms")
    print()


def compaction_residual() -> None:
    print("## 5. Reported vs recomputed residual with batch compaction (H2, Picard, rtol=1e-6)"
          "\n")
    f, x, z0 = make_tanh_problem("symmetric", 0.98, input_scale=0.1, bias_scale=0.0, seed=2)
    with torch.no_grad():
        for compact in (True, False):
            sol = dk.fixed_point(f, z0, dk.Picard(rtol=1e-6, atol=0.0), max_steps=1000,
                                 args=(x,), throw=False, compact=compact)
            rel = rel_residual(f, sol.value, x)
            rep = sol.stats["rel_residual"]
            print(f"- compact={compact}: reported max {float(rep.max()):.4e}, recomputed max "
                  f"{float(rel.max()):.4e}, max |recomputed - reported| / reported "
                  f"{float(((rel - rep).abs() / rep).max()):.3f}")
    print()


def main() -> int:
    torch.set_num_threads(1)
    print("# deqkit findings (evidence)\n")
    print("\n".join(header_lines(environment())))
    print()
    per_step_overhead()
    newton_krylov_p3()
    broyden_h2()
    implicit_backward()
    compaction_residual()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
