#!/usr/bin/env python
"""Whole training runs, deqkit vs TorchDEQ, side by side in one process (issue 18).

The same ``dk.zoo.ConvDEQ`` (built by the CLI's ``setup.build_model`` from the run's
``TrainConfig``: the digits defaults of ``deqkit train``, and ``configs/mnist1d_deq.toml``)
is trained by both libraries: deqkit through its ``DEQ`` layer, TorchDEQ by wrapping a deep
copy of the same stem, cell and head (identical initial weights) in ``torchdeq.get_deq``.
Both get the CLI's training step (AdamW with weight decay on matrices only, cosine schedule
per step, gradient clipping at ``grad_clip``, random shifts for MNIST-1D), the same batch
order (``GlobalBatchSampler`` seeded as ``deqkit.app.train.fit``) and the same global RNG
seed per epoch. Runs that are compared alternate epoch by epoch (the order flips every
epoch), so load from other processes hits them alike; one torch thread.

Parts (``--parts``, all by default):

* ``search``: a recipe search per library on the validation split (seed ``--search-seed``,
  not a test seed), all recipes of a workload interleaved epoch by epoch. A library's pick is
  the recipe with the least training CPU time to the first epoch whose validation accuracy
  reaches the workload's target, among the recipes whose final validation accuracy is within
  ``SELECT_SLACK`` of that library's best (if none reaches the target: the best final
  validation accuracy).
* ``headline``: each library's pick, digits seeds 0-2 and MNIST-1D seeds 0-1, per epoch: wall
  and CPU time of training (evaluation excluded), forward and backward f evaluations,
  memory, validation and test accuracy; time to first reach the target test accuracy (at
  epoch ends), final accuracy, ratio deqkit / TorchDEQ; "target met" = ratio <= 0.5 and final
  test accuracy >= TorchDEQ's.
* ``profile``: one epoch of training, then per-phase timers over every step of the second
  epoch (batch 64, digits): data, forward (cell calls timed separately from the solver's own
  work), backward, optimizer; torch.profiler's top operators over a few of those steps.
* ``neumann``: deqkit's ``ImplicitAdjoint(Neumann(rtol=1e-4))`` on the digits ConvDEQ next to
  GMRES: per epoch the backward solves' convergence, steps and residuals, the fallback, and
  the spectral radius of J at z* (power iteration on a validation batch), and the error of
  each backward's gradient against a tight GMRES solve on that batch.

Counting: forward hooks on the cell count its calls and the rows (samples) they evaluate,
split into the forward phase (inside ``model(x)``) and the backward phase (after it: e.g.
TorchDEQ's IFT recomputes f(z*) in its backward); every vector-Jacobian product through a
cell output is counted by an identity ``autograd.Function`` the hook puts on that output.
"f evals per sample" = rows / samples. Memory: glibc's heap in use (``mallinfo2``:
``uordblks + hblkhd``, which holds every CPU tensor) sampled before and after each cell call,
at each VJP and after the backward, minus its value at the start of the step; the maximum
over an epoch's steps ("peak step heap"; a warm-start cache is allocated in the first step
that stores into it, so deqkit's epoch-1 peak includes that one-time allocation).

Usage: ``.venv/bin/python benchmarks/bench_train_vs_torchdeq.py [--quick] [--out PATH]
[--parts search,headline,profile,neumann] [--workloads digits,mnist1d] [--picks JSON]``
(full: 38 min on the shared 2-core machine, of which 21 min is the MNIST-1D search;
``--quick``: digits, 2 epochs, 1 seed, 2 recipes per library, ~65 s). ``--picks PATH``
takes the recipes picked by an earlier run's search instead of searching (e.g.
``--parts headline --picks benchmarks/results/bench_train_vs_torchdeq.json``). Writes
``benchmarks/results/bench_train_vs_torchdeq.json`` and the printed tables to the ``.txt``
next to it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import dataclasses
import io
import json
import math
import os
import statistics
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import torch
import torchdeq
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import deqkit as dk
from _deqbench import RESULTS_DIR, ROOT, environment, header_lines, md_table
from deqkit.app import config as appconfig
from deqkit.app.train import distributed as dd
from deqkit.app.train import setup
from deqkit.app.train.evaluate import cross_entropy, evaluate
from deqkit.app.train.fit import solve_context
from deqkit.app.train.run import deq_schedule
from deqkit.app.train.step import random_shift

SELECT_SLACK = {"digits": 0.004, "mnist1d": 0.005}  # final val acc within this of the best
TARGETS = {"digits": 0.99, "mnist1d": 0.975}
SEEDS = {"digits": (0, 1, 2), "mnist1d": (0, 1)}


# ---------------------------------------------------------------------------------------------
# Workloads and recipes
# ---------------------------------------------------------------------------------------------


def base_config(workload: str) -> appconfig.TrainConfig:
    """The CLI's config: ``deqkit train`` defaults for digits, the tuned MNIST-1D file."""
    if workload == "digits":
        values: dict[str, Any] = {"model": "conv_deq", "data": "digits"}
    else:
        values = appconfig.load_file(str(ROOT / "configs" / "mnist1d_deq.toml"))
    values.update(progress=False, plots=False, threads=1)
    return appconfig.from_mapping(appconfig.with_model_preset(values))


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A training recipe: deqkit = ``TrainConfig`` overrides (+ an adjoint object where the
    CLI has no field for it); TorchDEQ = ``get_deq`` keyword arguments over a base."""

    lib: str
    name: str
    cfg: tuple = ()  # deqkit: TrainConfig overrides as (key, value) pairs
    adjoint: str | None = None  # deqkit: a named adjoint object (ADJOINT_OBJECTS)
    td: tuple = ()  # TorchDEQ: get_deq overrides as (key, value) pairs

    def to_dict(self) -> dict[str, Any]:
        return {"lib": self.lib, "name": self.name, "cfg": dict(self.cfg),
                "adjoint": self.adjoint, "td": dict(self.td)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        return cls(d["lib"], d["name"], tuple(d["cfg"].items()), d["adjoint"],
                   tuple(d["td"].items()))


ADJOINT_OBJECTS: dict[str, Callable[[], Any]] = {
    # SHINE without the extra VJP that only reports the backward residual
    "shine_r0_noreport": lambda: dk.SHINEAdjoint(refine=0, report_residual=False),
}


def _dk(name: str, obj: str | None = None, **cfg: Any) -> Recipe:
    return Recipe("deqkit", name, tuple(cfg.items()), obj)


def _td(name: str, **kw: Any) -> Recipe:
    return Recipe("torchdeq", name, td=tuple(kw.items()))


def recipe_grid(workload: str, quick: bool) -> list[Recipe]:
    """The search grid of both libraries (deqkit: the levers it offers; TorchDEQ: Anderson
    and Broyden forward, IFT and phantom backward, tolerances around the CLI's)."""
    w = {"warm_start": True}
    u = {"warm_start": True, "warm_start_unfinished": True}
    if quick:
        return [_dk("implicit GMRES (CLI)"), _dk("JFB + warm", adjoint="jfb", **w),
                _td("anderson / IFT fp", ift=True),
                _td("anderson / JFB (grad 1)", ift=False, grad=1)]
    if workload == "digits":
        dk_grid = [
            _dk("implicit GMRES (CLI)"),
            _dk("implicit GMRES + warm", **w),
            _dk("implicit GMRES(1e-3, 10) + warm", backward_rtol=1e-3, backward_max_steps=10,
                **w),
            _dk("implicit GMRES + reuse_forward + warm", reuse_forward=True, **w),
            _dk("implicit GMRES rtol_from_forward + adjoint cache + warm",
                backward_rtol_from_forward=True, adjoint_cache=True, **w),
            _dk("SHINE r0 (no residual VJP) + warm", "shine_r0_noreport", adjoint="shine", **w),
            _dk("SHINE r2 + warm", adjoint="shine", shine_refine=2, **w),
            _dk("JFB + warm", adjoint="jfb", **w),
            _dk("JFB + warm, rtol 1e-2", adjoint="jfb", rtol=1e-2, **w),
            _dk("JFB + warm, max_steps 8", adjoint="jfb", max_steps=8, **w),
            _dk("phantom(5, 0.5) + warm", adjoint="phantom", **w),
            # budget-limited training: the warm start keeps each sample's unfinished iterate,
            # so the solve goes on across epochs (DEQ flow's fixed-point reuse)
            _dk("JFB + warm (keep unfinished), max_steps 3", adjoint="jfb", rtol=1e-2,
                max_steps=3, **u),
            _dk("JFB + warm (keep unfinished), max_steps 4", adjoint="jfb", rtol=1e-2,
                max_steps=4, **u),
            _dk("JFB + warm (keep unfinished), rtol 1e-2, budget 2->20", adjoint="jfb",
                rtol=1e-2, max_steps_start=2, **u),
            _dk("JFB + warm, rtol 1e-2, unrolled warm-up 1 epoch x3", adjoint="jfb", rtol=1e-2,
                unroll_warmup=1.0, unroll_depth=3, **w),
        ]
        td_grid = [
            _td("anderson / IFT fp", ift=True),
            _td("anderson / IFT fp (b_tol 1e-3, 10 it)", ift=True, b_tol=1e-3, b_max_iter=10),
            _td("anderson / IFT anderson", ift=True, b_solver="anderson"),
            _td("broyden / IFT fp", ift=True, f_solver="broyden"),
            _td("anderson / phantom(5, tau 0.6)", ift=False, grad=5, tau=0.6),
            _td("anderson / JFB (grad 1)", ift=False, grad=1),
            _td("anderson f_tol 1e-2 / JFB (grad 1)", ift=False, grad=1, f_tol=1e-2),
            _td("anderson f_max_iter 8 / JFB (grad 1)", ift=False, grad=1, f_max_iter=8),
            _td("anderson f_max_iter 4 / JFB (grad 1)", ift=False, grad=1, f_max_iter=4),
            _td("anderson f_max_iter 3 / JFB (grad 1)", ift=False, grad=1, f_max_iter=3),
            _td("broyden / JFB (grad 1)", ift=False, grad=1, f_solver="broyden"),
        ]
    else:  # MNIST-1D: the config's backward is already GMRES(1e-3, 10)
        dk_grid = [
            _dk("implicit GMRES (CLI)"),
            _dk("implicit GMRES + warm", **w),
            _dk("implicit Neumann(1e-3, 10) + warm", backward_solver="neumann", **w),
            _dk("SHINE r2 + warm", adjoint="shine", shine_refine=2, **w),
            _dk("JFB + warm", adjoint="jfb", **w),
            _dk("phantom(5, 0.5) + warm", adjoint="phantom", **w),
        ]
        td_grid = [
            _td("anderson / IFT fp", ift=True),
            _td("broyden / IFT fp", ift=True, f_solver="broyden"),
            _td("anderson / phantom(5, tau 0.6)", ift=False, grad=5, tau=0.6),
            _td("anderson / JFB (grad 1)", ift=False, grad=1),
        ]
    return dk_grid + td_grid


def td_kwargs(cfg: appconfig.TrainConfig, recipe: Recipe) -> dict[str, Any]:
    """``get_deq`` arguments: the CLI config's budgets and tolerances (relative stopping, as
    deqkit's rtol), then the recipe's overrides."""
    kw: dict[str, Any] = dict(
        core="indexing", f_solver="anderson", f_max_iter=cfg.max_steps, f_tol=cfg.rtol,
        f_stop_mode="rel", eval_f_max_iter=cfg.eval_max_steps, b_solver="fixed_point_iter",
        b_max_iter=cfg.backward_max_steps, b_tol=cfg.backward_rtol, b_stop_mode="rel",
        ift=False, grad=1, tau=1.0)
    kw.update(dict(recipe.td))
    return kw


# ---------------------------------------------------------------------------------------------
# Counting and memory
# ---------------------------------------------------------------------------------------------


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _heap_reader() -> Callable[[], int]:
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
        fn.restype = _MallInfo2

        def used() -> int:
            m = fn()
            return int(m.uordblks + m.hblkhd)

        used()
        return used
    except (OSError, AttributeError):  # not glibc >= 2.33: no memory numbers
        return lambda: 0


heap_used = _heap_reader()


class _Count(torch.autograd.Function):
    """Identity on a cell output whose backward counts the VJP taken through it."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, meter: Meter) -> torch.Tensor:  # type: ignore[override]
        ctx.meter = meter
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        m = ctx.meter
        if m.on:
            m.c["vjp_calls"] += 1
            m.c["vjp_rows"] += grad.shape[0]
            m.sample()
        return grad, None


class Meter:
    """Cell calls (per phase), rows, VJPs, time inside the cell, heap samples."""

    def __init__(self) -> None:
        self.on = False
        self.phase = "fwd"
        self.c: dict[str, float] = defaultdict(float)
        self.base = 0
        self.peak = 0
        self._t0 = 0.0

    def attach(self, model: nn.Module, cell: nn.Module) -> None:
        model.register_forward_pre_hook(self._model_pre)
        model.register_forward_hook(self._model_post)
        cell.register_forward_pre_hook(self._pre)
        cell.register_forward_hook(self._post)

    def _model_pre(self, *_: Any) -> None:
        self.phase = "fwd"

    def _model_post(self, *_: Any) -> None:
        self.phase = "bwd"

    def sample(self) -> None:
        v = heap_used() - self.base
        if v > self.peak:
            self.peak = v

    def start_step(self) -> None:
        self.base = heap_used()
        self.peak = 0

    def _pre(self, *_: Any) -> None:
        if self.on:
            self.sample()
            self._t0 = time.perf_counter()

    def _post(self, module: nn.Module, args: Any, out: torch.Tensor) -> Any:
        if not self.on:
            return None
        p = self.phase
        self.c[f"{p}_cell_s"] += time.perf_counter() - self._t0
        self.c[f"{p}_calls"] += 1
        self.c[f"{p}_rows"] += out.shape[0]
        self.sample()
        if torch.is_grad_enabled() and out.requires_grad:
            self.c[f"{p}_grad_calls"] += 1
            return _Count.apply(out, self)
        return None


# ---------------------------------------------------------------------------------------------
# Models and runs
# ---------------------------------------------------------------------------------------------


class TorchDEQConvNet(nn.Module):
    """The ConvDEQ's stem, cell, features and head (a deep copy: same initial weights) around
    a TorchDEQ ``get_deq`` layer; the solve starts from zeros as deqkit's does."""

    def __init__(self, dk_model: nn.Module, deq_kwargs: dict[str, Any]) -> None:
        super().__init__()
        src = copy.deepcopy(dk_model)
        if src.head_drop is not None or src.deq.cell.drop is not None:
            raise ValueError("dropout is not mirrored in the TorchDEQ wrapper")
        self.stem, self.cell, self.features, self.head = (src.stem, src.deq.cell,
                                                          src.features, src.head)
        self.deq = torchdeq.get_deq(**deq_kwargs)
        self.last_info: dict[str, Any] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.stem(x)
        cell = self.cell
        z_out, info = self.deq(lambda z: cell(z, u), torch.zeros_like(u))
        self.last_info = info
        return self.head(self.features(z_out[-1]))


_DATA: dict[tuple[str, int], Any] = {}


def data_for(cfg: appconfig.TrainConfig) -> Any:
    key = (cfg.data, cfg.seed)
    if key not in _DATA:
        _DATA[key] = setup.load_data(cfg.data, root=cfg.data_root, seed=cfg.seed,
                                     subset=cfg.subset, data_args=cfg.data_args)
    return _DATA[key]


def dk_config(base: appconfig.TrainConfig, recipe: Recipe, seed: int,
              epochs: int) -> appconfig.TrainConfig:
    return dataclasses.replace(base, seed=seed, epochs=epochs, **dict(recipe.cfg))


def build_pair_model(base: appconfig.TrainConfig, seed: int) -> nn.Module:
    """The CLI's model for ``seed`` (``torch.manual_seed(seed)`` then ``build_model``)."""
    cfg = dataclasses.replace(base, seed=seed)
    torch.manual_seed(cfg.seed)
    return setup.build_model(cfg, data_for(cfg).spec)


class Run:
    """One training run of one library: the CLI's step, counted and timed by phase."""

    def __init__(self, base: appconfig.TrainConfig, recipe: Recipe, seed: int, epochs: int,
                 workload: str) -> None:
        self.recipe, self.seed, self.workload = recipe, seed, workload
        cfg = dk_config(base, recipe, seed, epochs) if recipe.lib == "deqkit" else \
            dataclasses.replace(base, seed=seed, epochs=epochs)
        self.cfg = cfg
        self.splits = data_for(cfg)
        model = build_pair_model(cfg, seed)
        if recipe.lib == "deqkit":
            if recipe.adjoint is not None:
                model.deq.adjoint = ADJOINT_OBJECTS[recipe.adjoint]()
            self.model, self.cell = model, model.deq.cell
        else:
            self.model = TorchDEQConvNet(model, td_kwargs(cfg, recipe))
            self.cell = self.model.cell
        self.meter = Meter()
        self.meter.attach(self.model, self.cell)
        n = len(self.splits.train)
        self.opt = setup.make_optimizer(self.model, cfg.optimizer, cfg.lr, cfg.weight_decay)
        self.steps_per_epoch = math.ceil(n / cfg.batch_size)
        self.sched = setup.make_schedule(self.opt, cfg.schedule, self.steps_per_epoch * epochs)
        self.sampler = dd.GlobalBatchSampler(n, cfg.batch_size, 0, 1, shuffle=True,
                                             base_seed=cfg.seed * 100_003)
        self.warm = dk.nn.FixedPointCache(n, keep_unfinished=cfg.warm_start_unfinished) \
            if recipe.lib == "deqkit" and cfg.warm_start else None
        self.adj_cache = dk.nn.FixedPointCache(n) if recipe.lib == "deqkit" and \
            cfg.adjoint_cache else None
        # the CLI's DEQ schedule (--unroll-warmup, --max-steps-start), by optimiser step
        self.schedule = deq_schedule(cfg, n) if recipe.lib == "deqkit" else None
        self.step = 0
        self.loss_fn = cross_entropy(cfg.label_smoothing)
        self.shift = 0 if self.splits.spec.kind == "text" else cfg.augment_shift
        self.history: list[dict[str, Any]] = []
        self.train_wall = self.train_cpu = 0.0
        self.step_log: list[dict[str, float]] | None = None  # per-step phase times if set

    @property
    def label(self) -> str:
        return f"{self.recipe.lib}: {self.recipe.name}"

    def initial_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def _context(self, ids: torch.Tensor) -> Any:
        """As ``deqkit train``: the schedule's settings of this step, then the warm starts
        (not in the unrolled warm-up)."""
        if self.recipe.lib != "deqkit":
            return contextlib.nullcontext()
        return solve_context(self.model.deq, ids, self.step, schedule=self.schedule,
                             warm_cache=self.warm, adjoint_cache=self.adj_cache)

    def _solver_stats(self) -> dict[str, float]:
        if self.recipe.lib == "deqkit":
            sol = self.model.deq.last_solution
            st = sol.stats
            out = {"fwd_steps": float(st["nstep"].float().mean()),
                   "fwd_rel_res": float(st["rel_residual"].float().mean()),
                   "fwd_converged": float(st["converged"].float().mean())}
            bwd = sol.backward or {}
            if isinstance(bwd.get("converged"), torch.Tensor):
                out["bwd_unconverged"] = float((~bwd["converged"].bool()).float().mean())
            if isinstance(bwd.get("nstep"), torch.Tensor):
                out["bwd_steps"] = float(bwd["nstep"].float().mean())
            return out
        info = self.model.last_info or {}
        out = {}
        if isinstance(info.get("nstep"), torch.Tensor):
            out["fwd_steps"] = float(info["nstep"].float().mean())
        if isinstance(info.get("rel_lowest"), torch.Tensor):
            out["fwd_rel_res"] = float(info["rel_lowest"].float().mean())
        return out

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        cfg, m = self.cfg, self.meter
        self.sampler.set_epoch(epoch)
        torch.manual_seed(cfg.seed * 100_019 + epoch)  # as fit(): augmentation per epoch
        self.model.train()
        m.c = defaultdict(float)
        phase = defaultdict(float)
        stats: dict[str, float] = defaultdict(float)
        peaks: list[int] = []
        loss_sum = correct = seen = 0
        params = [p for p in self.model.parameters() if p.requires_grad]
        c0, t0 = time.process_time(), time.perf_counter()
        for idx, _ in self.sampler.batches():
            ta = time.perf_counter()
            x, y = dd.fetch(self.splits.train, idx)
            ids = torch.tensor(idx, dtype=torch.long)
            if self.shift and x.is_floating_point():
                x = random_shift(x, self.shift)
            m.start_step()
            m.on = True
            tb = time.perf_counter()
            with self._context(ids):
                out = self.model(x)
            loss, c = self.loss_fn(out.float(), y)
            tc = time.perf_counter()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            m.sample()
            m.on = False
            td = time.perf_counter()
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            self.opt.step()
            self.sched.step()
            self.step += 1
            te = time.perf_counter()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise RuntimeError(f"{self.label}: training loss {value} at epoch {epoch + 1}")
            phase["data_s"] += tb - ta
            phase["fwd_s"] += tc - tb
            phase["bwd_s"] += td - tc
            phase["opt_s"] += te - td
            peaks.append(m.peak)
            for k, v in self._solver_stats().items():
                stats[k] += v
            loss_sum += value * y.numel()
            correct += c
            seen += y.numel()
            if self.step_log is not None:
                self.step_log.append({"data": tb - ta, "fwd": tc - tb, "bwd": td - tc,
                                      "opt": te - td, "n": y.numel(),
                                      **{k: float(v) for k, v in m.c.items()}})
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        self.train_wall += wall
        self.train_cpu += cpu
        steps = self.steps_per_epoch
        c = m.c
        rec = {
            "epoch": epoch + 1, "wall_s": wall, "cpu_s": cpu, "train_wall_s": self.train_wall,
            "train_cpu_s": self.train_cpu, "train_loss": loss_sum / seen,
            "train_acc": correct / seen,
            "fwd_f_per_sample": c["fwd_rows"] / seen, "fwd_calls_per_step": c["fwd_calls"] / steps,
            "fwd_grad_calls_per_step": c["fwd_grad_calls"] / steps,
            "bwd_f_per_sample": c["bwd_rows"] / seen,
            "vjp_per_sample": c["vjp_rows"] / seen, "vjp_calls_per_step": c["vjp_calls"] / steps,
            "fwd_cell_s": c["fwd_cell_s"], "bwd_cell_s": c["bwd_cell_s"],
            "peak_heap_mb": max(peaks) / 2**20, "median_step_heap_mb":
                statistics.median(peaks) / 2**20,
            **{k: v for k, v in phase.items()},
            **{k: v / steps for k, v in stats.items()},
        }
        return rec

    def evaluate(self, rec: dict[str, Any]) -> dict[str, Any]:
        self.meter.on = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            val = evaluate(self.model, self.splits.val, self.cfg.batch_size)
            test = evaluate(self.model, self.splits.test, self.cfg.batch_size)
        rec.update(val_acc=val["acc"], val_loss=val["loss"], test_acc=test["acc"],
                   test_loss=test["loss"])
        self.history.append(rec)
        return rec

    def epoch(self, e: int) -> dict[str, Any]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unconverged solves are in the statistics
            rec = self.train_epoch(e)
        return self.evaluate(rec)


def interleave(runs: list[Run], epochs: int, log: Callable[[str], Any]) -> None:
    """Train ``runs`` epoch by epoch, the order rotating every epoch."""
    for e in range(epochs):
        k = e % len(runs)
        order = runs[k:] + runs[:k] if e % 2 == 0 else list(reversed(runs[k:] + runs[:k]))
        for r in order:
            rec = r.epoch(e)
            log(f"  [{r.workload} s{r.seed} e{e + 1} {r.label}: {rec['wall_s']:.1f} s wall, "
                f"{rec['cpu_s']:.1f} s CPU, val {rec['val_acc']:.4f}, test "
                f"{rec['test_acc']:.4f}]")


def first_reach(history: list[dict[str, Any]], key: str, target: float) -> dict[str, Any] | None:
    for rec in history:
        if rec[key] >= target - 1e-12:
            return {"epoch": rec["epoch"], "wall_s": rec["train_wall_s"],
                    "cpu_s": rec["train_cpu_s"]}
    return None


def run_summary(r: Run, target: float) -> dict[str, Any]:
    h = r.history
    n = len(h)
    mean = lambda k: sum(x.get(k, 0.0) for x in h) / n  # noqa: E731
    return {
        "lib": r.recipe.lib, "recipe": r.recipe.name, "seed": r.seed,
        "final_val_acc": h[-1]["val_acc"], "final_test_acc": h[-1]["test_acc"],
        "train_wall_s": r.train_wall, "train_cpu_s": r.train_cpu,
        "val_reach": first_reach(h, "val_acc", target),
        "test_reach": first_reach(h, "test_acc", target),
        "fwd_f_per_sample": mean("fwd_f_per_sample"), "vjp_per_sample": mean("vjp_per_sample"),
        "bwd_f_per_sample": mean("bwd_f_per_sample"),
        "peak_heap_mb": max(x["peak_heap_mb"] for x in h),
        "epochs": h,
    }


def check_same_start(a: Run, b: Run) -> bool:
    """The two runs' models start from identical weights (compared in parameter order)."""
    pa = [p.detach() for p in a.model.parameters()]
    pb = [p.detach() for p in b.model.parameters()]
    return len(pa) == len(pb) and all(torch.equal(x, y) for x, y in zip(pa, pb))


# ---------------------------------------------------------------------------------------------
# Parts
# ---------------------------------------------------------------------------------------------


def pick(rows: list[dict[str, Any]], lib: str, slack: float) -> dict[str, Any]:
    mine = [r for r in rows if r["lib"] == lib]
    best_val = max(r["final_val_acc"] for r in mine)
    ok = [r for r in mine if r["final_val_acc"] >= best_val - slack - 1e-12]
    reached = [r for r in ok if r["val_reach"] is not None]
    if reached:
        return min(reached, key=lambda r: r["val_reach"]["cpu_s"])
    return max(mine, key=lambda r: (r["final_val_acc"], -r["train_cpu_s"]))


def part_search(workload: str, epochs: int, seed: int, quick: bool,
                log: Callable[[str], Any]) -> dict[str, Any]:
    base = base_config(workload)
    grid = recipe_grid(workload, quick)
    runs = [Run(base, rc, seed, epochs, workload) for rc in grid]
    same = all(check_same_start(runs[0], r) for r in runs[1:])
    t0 = time.perf_counter()
    interleave(runs, epochs, log)
    rows = [run_summary(r, TARGETS[workload]) for r in runs]
    picks = {lib: pick(rows, lib, SELECT_SLACK[workload])["recipe"]
             for lib in ("deqkit", "torchdeq")}
    return {"workload": workload, "seed": seed, "epochs": epochs, "same_initial_weights": same,
            "recipes": [rc.to_dict() for rc in grid], "rows": rows, "picks": picks,
            "total_s": time.perf_counter() - t0}


def part_headline(workload: str, epochs: int, seeds: tuple[int, ...], recipes: dict[str, Recipe],
                  log: Callable[[str], Any]) -> dict[str, Any]:
    base = base_config(workload)
    target = TARGETS[workload]
    t0 = time.perf_counter()
    per_seed = []
    for seed in seeds:
        runs = [Run(base, recipes["deqkit"], seed, epochs, workload),
                Run(base, recipes["torchdeq"], seed, epochs, workload)]
        same = check_same_start(*runs)
        interleave(runs, epochs, log)
        dks, tds = (run_summary(r, target) for r in runs)
        per_seed.append({"seed": seed, "same_initial_weights": same, "deqkit": dks,
                         "torchdeq": tds, **compare(dks, tds)})
    return {"workload": workload, "epochs": epochs, "target": target,
            "recipes": {k: v.to_dict() for k, v in recipes.items()}, "seeds": per_seed,
            "summary": summarise(per_seed), "total_s": time.perf_counter() - t0}


def compare(dks: dict[str, Any], tds: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for clock in ("wall_s", "cpu_s"):
        a, b = dks["test_reach"], tds["test_reach"]
        out[f"ratio_{clock}"] = (a[clock] / b[clock]) if a and b else None
    out["ratio_total_cpu"] = dks["train_cpu_s"] / tds["train_cpu_s"]
    out["ratio_total_wall"] = dks["train_wall_s"] / tds["train_wall_s"]
    out["acc_ok"] = dks["final_test_acc"] >= tds["final_test_acc"] - 1e-12
    r = out["ratio_cpu_s"]
    out["target_met"] = bool(r is not None and r <= 0.5 and out["acc_ok"])
    return out


def _median(vals: list[float | None]) -> float | None:
    v = [x for x in vals if x is not None]
    return statistics.median(v) if v else None


def summarise(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "median_ratio_cpu": _median([s["ratio_cpu_s"] for s in per_seed]),
        "median_ratio_wall": _median([s["ratio_wall_s"] for s in per_seed]),
        "median_ratio_total_cpu": _median([s["ratio_total_cpu"] for s in per_seed]),
        "median_test_deqkit": _median([s["deqkit"]["final_test_acc"] for s in per_seed]),
        "median_test_torchdeq": _median([s["torchdeq"]["final_test_acc"] for s in per_seed]),
        "seeds_met": sum(s["target_met"] for s in per_seed), "n_seeds": len(per_seed),
        "reached_deqkit": sum(s["deqkit"]["test_reach"] is not None for s in per_seed),
        "reached_torchdeq": sum(s["torchdeq"]["test_reach"] is not None for s in per_seed),
    }


def part_profile(recipes: list[Recipe], steps_profiled: int,
                 log: Callable[[str], Any]) -> dict[str, Any]:
    """Digits seed 0: epoch 1 normally, epoch 2 with per-step phase timers (all recipes
    interleaved), then torch.profiler over ``steps_profiled`` steps of a third epoch."""
    base = base_config("digits")
    runs = [Run(base, rc, 0, 3, "digits") for rc in recipes]
    interleave(runs, 1, log)
    for r in runs:
        r.step_log = []
        r.epoch(1)
    out = []
    for r in runs:
        logs = r.step_log or []
        n = len(logs)
        tot = {k: sum(s[k] for s in logs) for k in ("data", "fwd", "bwd", "opt")}
        keys = ("fwd_calls", "fwd_rows", "fwd_grad_calls", "bwd_calls", "bwd_rows",
                "vjp_calls", "vjp_rows", "fwd_cell_s", "bwd_cell_s")
        c = {k: logs[-1].get(k, 0.0) for k in keys}  # the meter's totals over the epoch
        samples = sum(s["n"] for s in logs)
        full = [s for s in logs if s["n"] == r.cfg.batch_size]
        med = {k: statistics.median(s[k] for s in full) for k in ("data", "fwd", "bwd", "opt")}
        out.append({
            "label": r.label, "lib": r.recipe.lib, "recipe": r.recipe.name, "steps": n,
            "mean_ms": {k: 1e3 * v / n for k, v in tot.items()},
            "median_ms_full_batches": {k: 1e3 * v for k, v in med.items()},
            "fwd_calls_per_step": c["fwd_calls"] / n,
            "fwd_f_per_sample": c["fwd_rows"] / samples,
            "fwd_grad_calls_per_step": c["fwd_grad_calls"] / n,
            "bwd_calls_per_step": c["bwd_calls"] / n,
            "vjp_calls_per_step": c["vjp_calls"] / n, "vjp_per_sample": c["vjp_rows"] / samples,
            "fwd_cell_ms_per_step": 1e3 * c["fwd_cell_s"] / n,
            "bwd_cell_ms_per_step": 1e3 * c["bwd_cell_s"] / n,
            "fwd_ms_per_cell_call": 1e3 * c["fwd_cell_s"] / max(c["fwd_calls"], 1),
            "fwd_ms_per_sample_row": 1e3 * c["fwd_cell_s"] / max(c["fwd_rows"], 1) * 64,
            "top_ops": profile_ops(r, steps_profiled),
        })
    return {"rows": out}


def profile_ops(r: Run, steps: int) -> list[dict[str, Any]]:
    """torch.profiler over ``steps`` training steps (epoch 3's first batches; the optimiser
    steps too): the top operators by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    r.sampler.set_epoch(2)
    torch.manual_seed(r.cfg.seed * 100_019 + 2)
    r.model.train()
    batches = list(r.sampler.batches())[:steps]
    params = [p for p in r.model.parameters() if p.requires_grad]
    with warnings.catch_warnings(), profile(activities=[ProfilerActivity.CPU]) as prof:
        warnings.simplefilter("ignore")
        for idx, _ in batches:
            x, y = dd.fetch(r.splits.train, idx)
            with r._context(torch.tensor(idx, dtype=torch.long)):
                out = r.model(x)
            loss, _ = r.loss_fn(out.float(), y)
            r.opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            r.opt.step()
            r.sched.step()
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev)
    top = sorted(ev, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
             "share": e.self_cpu_time_total / total, "calls_per_step": e.count / steps}
            for e in top]


def part_neumann(epochs: int, log: Callable[[str], Any]) -> dict[str, Any]:
    """deqkit implicit backward with Neumann(rtol=1e-4) (the CLI's max_steps 20 and the class
    default 100) next to GMRES(rtol=1e-4, 20), digits seed 0, interleaved."""
    base = base_config("digits")
    recipes = [
        _dk("implicit GMRES(1e-4, 20) (CLI)"),
        _dk("implicit Neumann(1e-4, 20)", backward_solver="neumann"),
        _dk("implicit Neumann(1e-4, 100)", backward_solver="neumann", backward_max_steps=100),
    ]
    runs = [Run(base, rc, 0, epochs, "digits") for rc in recipes]
    xv, yv = runs[0].splits.val.tensors
    xb, yb = xv[:64], yv[:64]
    diag: dict[str, list[dict[str, Any]]] = {r.recipe.name: [] for r in runs}
    for e in range(epochs):
        interleave_one(runs, e, log)
        for r in runs:
            diag[r.recipe.name].append(neumann_diag(r, xb, yb))
    rows = [run_summary(r, TARGETS["digits"]) for r in runs]
    return {"rows": rows, "diag": diag}


def interleave_one(runs: list[Run], e: int, log: Callable[[str], Any]) -> None:
    order = runs if e % 2 == 0 else list(reversed(runs))
    for r in order:
        rec = r.epoch(e)
        log(f"  [neumann e{e + 1} {r.label}: {rec['wall_s']:.1f} s, test {rec['test_acc']:.4f}, "
            f"bwd unconverged {rec.get('bwd_unconverged', 0):.2f}]")


def neumann_diag(r: Run, xb: torch.Tensor, yb: torch.Tensor) -> dict[str, Any]:
    """On a validation batch in training mode (the training solver and budget): rho(J) at z*,
    the backward statistics of this run's adjoint, and its gradient's error against a
    tight GMRES adjoint (rtol 1e-8, 300 steps) at the same z*."""
    from _deqbench import spectral_radius_estimate

    model, deq = r.model, r.model.deq
    model.train()
    was = r.meter.on
    r.meter.on = False
    params = [p for p in deq.cell.parameters()]

    def grads(adjoint: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        with warnings.catch_warnings(), deq.overrides(adjoint=adjoint):
            warnings.simplefilter("ignore")
            out = model(xb)
            loss = nn.functional.cross_entropy(out, yb)
            g = torch.autograd.grad(loss, params)
        return torch.cat([x.reshape(-1) for x in g]), dict(deq.last_solution.backward or {})

    g_run, bwd = grads(deq.adjoint)
    g_ref, _ = grads(dk.ImplicitAdjoint(dk.GMRES(rtol=1e-8, atol=0.0, max_steps=300),
                                        on_failure="ignore"))
    with torch.no_grad():
        inj = model.stem(xb)
        z = model.deq(inj)
    rho = spectral_radius_estimate(deq.cell, z.detach(), inj.detach(), k=60)
    r.meter.on = was

    def tmean(key: str) -> float | None:
        v = bwd.get(key)
        return float(v.float().mean()) if isinstance(v, torch.Tensor) else None

    return {
        "rho_median": float(rho.median()), "rho_max": float(rho.max()),
        "frac_rho_ge_1": float((rho >= 1).float().mean()),
        "bwd_converged": tmean("converged"), "bwd_nstep": tmean("nstep"),
        "bwd_residual": tmean("residual"), "bwd_fallback": tmean("fallback"),
        "bwd_nmatvec": bwd.get("nmatvec"),
        "grad_rel_err": float(torch.linalg.vector_norm(g_run - g_ref)
                              / torch.linalg.vector_norm(g_ref)),
        "grad_cos": float(torch.nn.functional.cosine_similarity(g_run, g_ref, dim=0)),
        "grad_norm_ratio": float(torch.linalg.vector_norm(g_run)
                                 / torch.linalg.vector_norm(g_ref)),
    }


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _p(v: float | None, nd: int = 1) -> str:
    return "-" if v is None else f"{100 * v:.{nd}f}"


def _f(v: float | None, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def _reach(r: dict[str, Any] | None) -> str:
    return "-" if r is None else f"e{r['epoch']} / {r['wall_s']:.1f} / {r['cpu_s']:.1f}"


def search_table(s: dict[str, Any]) -> str:
    rows = []
    for r in s["rows"]:
        mark = " **(pick)**" if s["picks"][r["lib"]] == r["recipe"] else ""
        rows.append([r["lib"], r["recipe"] + mark, _p(r["final_val_acc"]),
                     _p(r["final_test_acc"]), _reach(r["val_reach"]),
                     f"{r['train_wall_s']:.1f} / {r['train_cpu_s']:.1f}",
                     _f(r["fwd_f_per_sample"], ".1f"), _f(r["vjp_per_sample"], ".1f"),
                     _f(r["bwd_f_per_sample"], ".1f"), _f(r["peak_heap_mb"], ".1f")])
    return md_table(["lib", "recipe", "final val %", "(final test %)",
                     "val target: epoch / wall s / CPU s", "train wall / CPU s",
                     "fwd f/sample", "VJPs/sample", "bwd f/sample", "peak step heap MB"], rows)


def epoch_table(seed_res: dict[str, Any]) -> str:
    rows = []
    for lib in ("deqkit", "torchdeq"):
        for e in seed_res[lib]["epochs"]:
            rows.append([lib, e["epoch"], f"{e['wall_s']:.2f}", f"{e['cpu_s']:.2f}",
                         f"{e['fwd_s']:.2f} / {e['bwd_s']:.2f} / {e['opt_s']:.2f}",
                         f"{e['fwd_f_per_sample']:.1f}", f"{e['vjp_per_sample']:.1f}",
                         f"{e['bwd_f_per_sample']:.1f}", _f(e.get("fwd_steps"), ".1f"),
                         _f(e.get("bwd_unconverged"), ".2f"), f"{e['peak_heap_mb']:.1f}",
                         _p(e["val_acc"]), _p(e["test_acc"])])
    return md_table(["lib", "epoch", "wall s", "CPU s", "fwd / bwd / opt s", "fwd f/sample",
                     "bwd VJPs/sample", "bwd f/sample", "fwd steps", "bwd unconv.",
                     "peak step heap MB", "val %", "test %"], rows)


def seed_table(h: dict[str, Any]) -> str:
    rows = []
    for s in h["seeds"]:
        d, t = s["deqkit"], s["torchdeq"]
        rows.append([s["seed"], _reach(d["test_reach"]), _reach(t["test_reach"]),
                     _f(s["ratio_wall_s"]), _f(s["ratio_cpu_s"]),
                     f"{d['train_cpu_s']:.1f} / {t['train_cpu_s']:.1f}",
                     _f(s["ratio_total_cpu"]), _p(d["final_test_acc"]), _p(t["final_test_acc"]),
                     "yes" if s["target_met"] else "no"])
    return md_table(["seed", "deqkit: target epoch / wall s / CPU s", "TorchDEQ: same",
                     "ratio wall", "ratio CPU", "total train CPU s dk / td", "ratio total CPU",
                     "final test % dk", "final test % td", "target met"], rows)


def profile_table(p: dict[str, Any]) -> str:
    rows = []
    for r in p["rows"]:
        m = r["median_ms_full_batches"]
        rows.append([r["label"], f"{m['data']:.1f}", f"{m['fwd']:.1f}", f"{m['bwd']:.1f}",
                     f"{m['opt']:.1f}", f"{sum(m.values()):.1f}",
                     f"{r['fwd_calls_per_step']:.1f}", f"{r['fwd_f_per_sample']:.1f}",
                     f"{r['fwd_cell_ms_per_step']:.1f}", f"{r['fwd_ms_per_cell_call']:.2f}",
                     f"{r['vjp_calls_per_step']:.1f}", f"{r['bwd_calls_per_step']:.1f}",
                     f"{r['bwd_cell_ms_per_step']:.1f}"])
    return md_table(["recipe", "data ms", "forward ms", "backward ms", "optimizer ms",
                     "step ms", "fwd cell calls", "fwd f/sample", "fwd ms in cell",
                     "ms per fwd cell call", "bwd VJPs", "bwd cell calls",
                     "bwd ms in cell calls"], rows)


def ops_table(r: dict[str, Any]) -> str:
    return md_table(["operator", "self ms/step", "share", "calls/step"],
                    [[o["op"], f"{o['self_ms_per_step']:.2f}", f"{100 * o['share']:.1f}%",
                      f"{o['calls_per_step']:.1f}"] for o in r["top_ops"]])


def neumann_table(n: dict[str, Any]) -> str:
    rows = []
    for name, recs in n["diag"].items():
        run = next(r for r in n["rows"] if r["recipe"] == name)
        for e, (d, h) in enumerate(zip(recs, run["epochs"])):
            rows.append([name, e + 1, f"{h['wall_s']:.2f}", _f(h.get("bwd_unconverged")),
                         _f(h.get("bwd_steps"), ".1f"), f"{h['vjp_per_sample']:.1f}",
                         f"{d['rho_median']:.3f} / {d['rho_max']:.3f}",
                         _f(d["frac_rho_ge_1"]), _f(d["bwd_residual"], ".1e"),
                         _f(d["bwd_fallback"]), f"{d['grad_rel_err']:.2e}",
                         f"{d['grad_cos']:.3f}", f"{d['grad_norm_ratio']:.2f}",
                         _p(h["test_acc"])])
    return md_table(["backward", "epoch", "wall s", "train bwd unconverged", "train bwd steps",
                     "VJPs/sample", "rho(J*) median / max (val batch)", "frac rho >= 1",
                     "val batch bwd residual (abs)", "fallback", "grad rel err vs GMRES 1e-8",
                     "cos", "|g| / |g_ref|", "test %"], rows)


def report(res: dict[str, Any]) -> str:
    buf = io.StringIO()
    with redirect_stdout(buf):
        a = res["config"]
        print(f"# deqkit vs TorchDEQ: whole training runs ({'quick' if a['quick'] else 'full'} "
              "run)\n")
        print("\n".join(header_lines(res["env"])))
        for line in res.get("provenance", []):  # a file merged from several runs
            print(f"- {line}")
        print("- time = training only (evaluation excluded); 'CPU' = process CPU time (one "
              "torch thread, robust to other processes' load), 'wall' = perf_counter")
        print("- f/sample = cell rows evaluated per training sample (deqkit drops converged "
              "samples); VJPs/sample = vector-Jacobian products through the cell per sample; "
              "bwd f = cell calls in the backward (TorchDEQ's IFT recomputes f(z*)); peak step "
              "heap = max over steps of glibc heap in use above the step's start")
        for wl, s in res.get("search", {}).items():
            print(f"\n## Recipe search: {wl} (seed {s['seed']}, {s['epochs']} epochs, "
                  f"validation target {100 * TARGETS[wl]:.1f}%)\n")
            print(f"Identical initial weights in all runs: {s['same_initial_weights']}. Pick: "
                  f"least training CPU time to the validation target among recipes within "
                  f"{100 * SELECT_SLACK[wl]:.1f} points of the library's best final validation "
                  f"accuracy. Search time {s['total_s']:.0f} s.\n")
            print(search_table(s))
        for wl, h in res.get("headline", {}).items():
            print(f"\n## Headline: {wl}, target test accuracy {100 * h['target']:.1f}%, "
                  f"{h['epochs']} epochs\n")
            print(f"deqkit: {h['recipes']['deqkit']['name']}; TorchDEQ: "
                  f"{h['recipes']['torchdeq']['name']}. Ratio = deqkit / TorchDEQ time to "
                  "first reach the target (test accuracy at epoch ends); target met = CPU "
                  "ratio <= 0.5 and final test accuracy >= TorchDEQ's.\n")
            print(seed_table(h))
            sm = h["summary"]
            print(f"\nmedian ratio CPU {_f(sm['median_ratio_cpu'])}, wall "
                  f"{_f(sm['median_ratio_wall'])}, total training CPU "
                  f"{_f(sm['median_ratio_total_cpu'])}; median final test % deqkit "
                  f"{_p(sm['median_test_deqkit'])} vs TorchDEQ {_p(sm['median_test_torchdeq'])}; "
                  f"reached target: deqkit {sm['reached_deqkit']}/{sm['n_seeds']}, TorchDEQ "
                  f"{sm['reached_torchdeq']}/{sm['n_seeds']}; target met in "
                  f"{sm['seeds_met']}/{sm['n_seeds']} seeds. Part time {h['total_s']:.0f} s.")
            for s in h["seeds"]:
                print(f"\n### {wl} seed {s['seed']}: per epoch (identical initial weights: "
                      f"{s['same_initial_weights']})\n")
                print(epoch_table(s))
        if "profile" in res:
            print("\n## Profile of a training step (digits, batch 64, second epoch)\n")
            print("Medians over the epoch's full batches (timers around each phase); cell "
                  "calls and the time inside them from the hooks.\n")
            print(profile_table(res["profile"]))
            for r in res["profile"]["rows"]:
                print(f"\n### Top operators (torch.profiler, self CPU): {r['label']}\n")
                print(ops_table(r))
        if "neumann" in res:
            print("\n## Neumann backward on the digits ConvDEQ (deqkit, seed 0)\n")
            print(neumann_table(res["neumann"]))
        print(f"\nload average at end: {[round(v, 2) for v in os.getloadavg()]}; total "
              f"{res['total_s']:.0f} s")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="digits, 2 epochs, 1 seed (< 2 min)")
    ap.add_argument("--out", default=str(RESULTS_DIR / "bench_train_vs_torchdeq.json"))
    ap.add_argument("--parts", default="search,headline,profile,neumann")
    ap.add_argument("--workloads", default="digits,mnist1d")
    ap.add_argument("--search-seed", type=int, default=100)
    ap.add_argument("--search-epochs-mnist1d", type=int, default=None,
                    help="epochs of the MNIST-1D search (default: the config's 20)")
    ap.add_argument("--picks", default=None, help="JSON of an earlier run: reuse its picks")
    ap.add_argument("--seeds", default=None,
                    help="headline seeds, e.g. 0,1,2,3,4 (default: digits 0-2, MNIST-1D 0-1)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    env = environment()
    parts = set(a.parts.split(","))
    workloads = ["digits"] if a.quick else a.workloads.split(",")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    res: dict[str, Any] = {"env": env, "config": vars(a), "search": {}, "headline": {}}
    earlier = json.loads(Path(a.picks).read_text()) if a.picks else None
    for wl in workloads:
        cfg_epochs = base_config(wl).epochs
        epochs = 2 if a.quick else cfg_epochs
        grid = {rc.name: rc for rc in recipe_grid(wl, a.quick)}
        picks: dict[str, Recipe] = {}
        if "search" in parts:
            s_epochs = epochs if wl == "digits" or a.quick else (a.search_epochs_mnist1d
                                                                   or epochs)
            log(f"search {wl}: {len(grid)} recipes, {s_epochs} epochs")
            s = part_search(wl, s_epochs, a.search_seed, a.quick, log)
            res["search"][wl] = s
            picks = {lib: grid[name] for lib, name in s["picks"].items()}
        elif earlier is not None and wl in earlier.get("headline", {}):
            picks = {lib: Recipe.from_dict(d)
                     for lib, d in earlier["headline"][wl]["recipes"].items()}
        elif earlier is not None and wl in earlier.get("search", {}):
            picks = {lib: grid[name] for lib, name in earlier["search"][wl]["picks"].items()}
        if "headline" in parts:
            if not picks:
                raise SystemExit(f"no picks for {wl}: run the search part or pass --picks")
            seeds = (0,) if a.quick else SEEDS[wl]
            if a.seeds:
                seeds = tuple(int(v) for v in a.seeds.split(","))
            log(f"headline {wl}: {picks['deqkit'].name} vs {picks['torchdeq'].name}")
            res["headline"][wl] = part_headline(wl, epochs, seeds, picks, log)
    if "profile" in parts:
        base_grid = {rc.name: rc for rc in recipe_grid("digits", a.quick)}
        prof = [base_grid["implicit GMRES (CLI)"], base_grid["anderson / IFT fp"]]
        if "digits" in res["headline"]:
            for d in res["headline"]["digits"]["recipes"].values():
                rc = Recipe.from_dict(d)
                if rc not in prof:
                    prof.append(rc)
        log("profile: " + "; ".join(rc.name for rc in prof))
        res["profile"] = part_profile(prof, 3 if a.quick else 8, log)
    if "neumann" in parts:
        log("neumann")
        res["neumann"] = part_neumann(1 if a.quick else 8, log)
    res["total_s"] = time.perf_counter() - t_start
    text = report(res)
    print(text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1, default=str))
    Path(a.out).with_suffix(".txt").write_text(text)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
