"""The training-step half of ``bench_solvers.py``: one implicit training step on P1 in
float64 (forward + implicit backward, loss = sum z*^2, gradient w.r.t. W), deqkit vs TorchDEQ,
compared at the same gradient accuracy (relative error <= 1e-6 against a dense float64
reference). Run through ``bench_solvers.py`` (``--skip-train`` leaves it out)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torchdeq
from torchdeq.solver import get_solver, register_solver
from torchdeq.solver.anderson import anderson_solver

import deqkit as dk
from _deqbench import Timer, fmt_time, make_tanh_problem, md_table, rel_residual
from deqkit.app import names


class CountingBSolver:
    """A TorchDEQ solver wrapper counting calls of the function it is given."""

    def __init__(self, solver: Callable) -> None:
        self.solver, self.calls = solver, 0

    def __call__(self, func: Callable, x0: torch.Tensor, **kwargs: Any) -> Any:
        def counted(y: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return func(y)

        return self.solver(counted, x0, **kwargs)


def dense_reference(f64, W: torch.Tensor, x: torch.Tensor, z0: torch.Tensor) -> dict[str, Any]:
    """z* by a tight solve + two dense Newton refinements; the exact implicit gradient of
    sum(z*^2) w.r.t. W from a dense (I - J)^T solve with J from autograd.functional.jacobian."""
    B, D = z0.shape
    with torch.no_grad():
        sol = dk.fixed_point(f64, z0, dk.Anderson(rtol=1e-14, atol=0.0), max_steps=500,
                             args=(x,), throw=False)
    z = sol.value.detach()
    eye = torch.eye(D, dtype=z.dtype)

    def jac(zz: torch.Tensor) -> torch.Tensor:
        Js = []
        with torch.no_grad():
            for b in range(B):
                xb = x[b : b + 1]
                Js.append(torch.autograd.functional.jacobian(
                    lambda v, xb=xb: f64(v.unsqueeze(0), xb).squeeze(0), zz[b], vectorize=True))
        return torch.stack(Js)

    for _ in range(2):  # Newton refinement with the dense Jacobian
        with torch.no_grad():
            J = jac(z)
            r = f64(z, x) - z
            z = z + torch.linalg.solve(eye - J, r.unsqueeze(2)).squeeze(2)
    J = jac(z)
    res = rel_residual(f64, z, x)
    u = torch.linalg.solve((eye - J).transpose(1, 2), (2 * z).unsqueeze(2)).squeeze(2)
    with torch.enable_grad():
        fz = f64(z, x)
        (g,) = torch.autograd.grad(fz, W, u)
    return {"z": z, "grad": g, "residual": float(res.max())}


Step = Callable[[], dict[str, Any]]
Maker = Callable[..., Step]


class TrainProblem:
    """P1 in float64 with ``W`` trainable, its exact reference gradient, and builders of one
    training step (forward + implicit backward of ``sum(z*^2)``) per library."""

    def __init__(self) -> None:
        f32, x32, z032 = make_tanh_problem("gaussian", 0.9, seed=1)
        self.W = f32.W.double().requires_grad_()
        self.f64 = type(f32)(self.W, f32.U.double(), f32.b.double())
        self.x, self.z0 = x32.double(), z032.double()
        self.ref = dense_reference(self.f64, self.W, self.x, self.z0)
        self.counters: dict[str, CountingBSolver] = {}
        self.counted_f = 0

    def rel_err(self, g: torch.Tensor) -> float:
        g_ref = self.ref["grad"]
        return float(torch.linalg.norm(g - g_ref) / torch.linalg.norm(g_ref))

    def dense_check(self) -> float:
        """Error of deqkit's Dense adjoint against the reference (a cross-check)."""
        self.W.grad = None
        sol = dk.fixed_point(self.f64, self.z0, dk.Anderson(rtol=1e-14, atol=0.0),
                             dk.ImplicitAdjoint(dk.Dense(rtol=1e-12, atol=0.0)), max_steps=500,
                             args=(self.x,), throw=False)
        sol.value.pow(2).sum().backward()
        return self.rel_err(self.W.grad)

    def f_counted(self, z: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        self.counted_f += 1
        return self.f64(z, xx)

    def td_bsolver(self, label: str, solver: Callable) -> str:
        """Register ``solver`` with TorchDEQ behind a call counter; return its key."""
        key = f"bench_{label}"
        self.counters[key] = CountingBSolver(solver)
        register_solver(key, self.counters[key])
        return key

    def deqkit_step(self, tf: float, tb: float, f: Callable | None = None,
                    fwd: str = "anderson", bwd: str = "gmres") -> Step:
        solver = names.build_solver(fwd, rtol=tf, atol=0.0)
        lin = names.build_linear_solver(bwd, rtol=tb, atol=0.0, max_steps=200)
        adjoint = names.build_adjoint("implicit", linear_solver=lin)  # on_failure="ignore"
        f = f or self.f64

        def step() -> dict[str, Any]:
            self.W.grad = None
            s = dk.fixed_point(f, self.z0, solver, adjoint, max_steps=300, args=(self.x,),
                               throw=False)
            s.value.pow(2).sum().backward()
            return {"grad": self.W.grad, "fwd_nfev": int(s.stats["nfev"]),
                    "bwd_matvec": int(s.backward.get("nmatvec", -1))}

        return step

    def torchdeq_step(self, bkey: str, tf: float, tb: float, f: Callable | None = None,
                      fwd: str = "anderson") -> Step:
        deq = torchdeq.get_deq(core="indexing", ift=True, f_solver=fwd, b_solver=bkey,
                               f_max_iter=300, b_max_iter=300, f_tol=tf, b_tol=tb,
                               f_stop_mode="rel", b_stop_mode="rel")
        f = f or self.f64

        def func(z: torch.Tensor) -> torch.Tensor:
            return f(z, self.x)

        def step() -> dict[str, Any]:
            self.W.grad = None
            c0 = self.counters[bkey].calls
            z_out, _info = deq(func, self.z0, solver_kwargs={"lam": 1e-10})
            z_out[-1].pow(2).sum().backward()
            return {"grad": self.W.grad, "bwd_matvec": self.counters[bkey].calls - c0}

        return step


def train_configs(p: TrainProblem, quick: bool) -> list[tuple[str, str, Maker]]:
    """(library, label, step maker) of every configuration compared."""
    b_solvers = {
        "anderson(lam=1e-4)": p.td_bsolver("anderson_lam1e-4", anderson_solver),
        "anderson(lam=1e-10)": p.td_bsolver(
            "anderson_lam1e-10", functools.partial(anderson_solver, lam=1e-10)),
        "broyden": p.td_bsolver("broyden", get_solver("broyden")),
        "fixed_point_iter": p.td_bsolver("fixed_point_iter", get_solver("fixed_point_iter")),
    }
    if quick:
        b_solvers = {k: v for k, v in b_solvers.items()
                     if k in ("anderson(lam=1e-10)", "fixed_point_iter")}
    # Both libraries get their forward and backward choices: on P1 (rho(J*) ~ 0.33) plain
    # fixed-point iteration converges as fast as Anderson in f evaluations, and GMRES on a
    # disc-shaped spectrum of radius rho converges like the Neumann series.
    configs: list[tuple[str, str, Maker]] = [
        ("deqkit", "Anderson(m=5) / ImplicitAdjoint(GMRES)", p.deqkit_step),
        ("deqkit", "Anderson(m=5) / ImplicitAdjoint(Neumann)",
         functools.partial(p.deqkit_step, bwd="neumann")),
        ("deqkit", "Picard / ImplicitAdjoint(GMRES)",
         functools.partial(p.deqkit_step, fwd="picard")),
        ("deqkit", "Picard / ImplicitAdjoint(Neumann)",
         functools.partial(p.deqkit_step, fwd="picard", bwd="neumann")),
    ]
    if quick:
        configs = configs[:2]
    for label, key in b_solvers.items():
        configs.append(("torchdeq", f"anderson(lam=1e-10) / IFT b_solver={label}",
                        functools.partial(p.torchdeq_step, key)))
    configs.append(("torchdeq", "fixed_point_iter / IFT b_solver=fixed_point_iter",
                    functools.partial(p.torchdeq_step, b_solvers["fixed_point_iter"],
                                      fwd="fixed_point_iter")))
    return configs


def search_tolerances(p: TrainProblem, maker: Maker, tols: list[float], target: float,
                      quick: bool) -> tuple[dict[str, Any] | None, int]:
    """The fastest (f tol, b tol) on the grid whose gradient error is <= ``target`` (None if
    none), and the number of steps evaluated."""
    best = None
    n_eval = 0
    for tf in tols:
        # Skip forward tolerances that cannot reach the target even with the tightest b tol.
        g = maker(tf, tols[-1])()["grad"].clone()
        n_eval += 1
        if p.rel_err(g) > target:
            continue
        for tb in tols:
            step = maker(tf, tb)
            out = step()
            n_eval += 1
            err = p.rel_err(out["grad"])
            if err <= target:
                tm = Timer()
                for _ in range(2 if quick else 4):
                    tm.run(step)
                # fastest probe (min over repeats: robust to load from other jobs)
                if best is None or tm.minimum < best["probe_time"]:
                    best = {"tf": tf, "tb": tb, "err": err, "probe_time": tm.minimum}
                break
    return best, n_eval


def time_best(p: TrainProblem, rows: list[dict[str, Any]], repeats: int) -> list[dict[str, Any]]:
    """Interleaved timing of each configuration at its best tolerances, plus one counted run
    for the f-evaluation and matvec counts."""
    steps = {}
    for r in rows:
        if r["best"] is not None:
            steps[r["config"]] = r["maker"](r["best"]["tf"], r["best"]["tb"])
            steps[r["config"]]()  # warm-up
    timers = {k: Timer() for k in steps}
    for _ in range(repeats):
        for k, step in steps.items():
            timers[k].run(step)
    out_rows = []
    for r in rows:
        row = {"lib": r["lib"], "config": r["config"], "search_evals": r["search_evals"]}
        if r["best"] is None:
            row["reached"] = False
            out_rows.append(row)
            continue
        b = r["best"]
        p.counted_f = 0
        info = r["maker"](b["tf"], b["tb"], p.f_counted)()
        row.update(reached=True, f_tol=b["tf"], b_tol=b["tb"], grad_err=p.rel_err(info["grad"]),
                   f_evals=p.counted_f, bwd_matvec=info["bwd_matvec"],
                   lib_fwd_nfev=info.get("fwd_nfev"), time_median=timers[r["config"]].median,
                   time_min=timers[r["config"]].minimum, repeats=repeats)
        out_rows.append(row)
    return out_rows


def train_step_benchmark(repeats: int, quick: bool) -> dict[str, Any]:
    p = TrainProblem()
    dense_check = p.dense_check()
    tols = [1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 3e-7, 1e-7, 3e-8, 1e-8, 3e-9, 1e-9, 1e-10, 1e-11]
    if quick:
        tols = [1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10]
    target = 1e-6
    rows = []
    for lib, label, maker in train_configs(p, quick):
        best, n_eval = search_tolerances(p, maker, tols, target, quick)
        rows.append({"lib": lib, "config": label, "best": best, "search_evals": n_eval,
                     "maker": maker})
    out_rows = time_best(p, rows, repeats)
    td = [r for r in out_rows if r["lib"] == "torchdeq" and r.get("reached")]
    td_best = min(td, key=lambda r: r["time_median"]) if td else None
    td_best_min = min(td, key=lambda r: r["time_min"]) if td else None
    for r in out_rows:
        if r.get("reached") and td_best is not None and td_best_min is not None:
            r["ratio_vs_td_best"] = r["time_median"] / td_best["time_median"]
            r["ratio_vs_td_best_min"] = r["time_min"] / td_best_min["time_min"]
    return {"dtype": "float64", "problem": "P1 (d=256, batch 128, ||W||_2=0.9)",
            "target_grad_err": target, "reference_residual": p.ref["residual"],
            "reference_vs_dk_dense": dense_check, "rows": out_rows,
            "td_best": td_best["config"] if td_best else None}


def train_table(res: dict[str, Any]) -> str:
    headers = ["library", "forward / backward", "f tol", "b tol", "grad rel err",
               "f evals (all)", "bwd VJPs", "step time (median)", "min", "/ TorchDEQ best",
               "/ TorchDEQ best (min)"]
    rows = []
    for r in res["rows"]:
        if not r.get("reached"):
            rows.append([r["lib"], r["config"], "-", "-", "not reached", "-", "-", "-", "-", "-",
                         "-"])
            continue
        rows.append([r["lib"], r["config"], f"{r['f_tol']:.0e}", f"{r['b_tol']:.0e}",
                     f"{r['grad_err']:.2e}", r["f_evals"], r["bwd_matvec"],
                     fmt_time(r["time_median"]), fmt_time(r["time_min"]),
                     f"{r.get('ratio_vs_td_best', float('nan')):.2f}",
                     f"{r.get('ratio_vs_td_best_min', float('nan')):.2f}"])
    return md_table(headers, rows)
