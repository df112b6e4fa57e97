"""The iteration engine: one short loop over a solver's steps, and a ledger that keeps the
per-sample books of a solve.

The loop (:func:`iterate`) evaluates f, hands each residual to the :class:`Ledger`, lets the
solver step, and drops finished samples from the working batch when f can be evaluated on a
subset. The ledger owns the stopping test, the lowest-residual iterate, the failure codes,
compaction of its own state and the residual trace. At most one host synchronisation happens
per step (a few more on steps where some sample stops). :func:`run_stages` runs a solver's
stages (one for an ordinary solver, several for :class:`~deqkit.FallbackChain`), each on the
samples its predecessors failed.

The stopping test (documented in :func:`deqkit.fixed_point`): sample ``b`` has converged at
iterate ``z_k`` when its residual ``r_k = f(z_k) - z_k`` is finite and

    ||r_k|| <= atol + rtol * s_k,   s_k = min(||f(z_k)||, max(s_0, s_0 ||r_0|| / ||r_k||)),

with ``s_0 = max(||z_0||, ||f(z_0)||)`` and ``r_0`` fixed by the first evaluation. The scale
is ``||f(z_k)||`` (the usual relative test) as long as the iterate has not grown beyond its
starting size by more than its residual has shrunk: an iterate that runs off to a large norm
with a residual that does not vanish (a map with no fixed point) cannot satisfy the test by
inflating ``||f(z_k)||``. Such a sample is stopped as ``diverged`` once ``||f(z_k)||`` exceeds
``divergence_ratio`` times that bound.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._flatten import slice_args
from ._ledger import Ledger
from ._solution import RESULTS
from .solvers._base import AbstractFixedPointSolver

SliceArgs = Callable[[tuple[Any, ...], Tensor], tuple[Any, ...]]


@dataclasses.dataclass
class LoopOutput:
    value: Tensor  # (B, D)
    abs_residual: Tensor  # (B,)
    rel_residual: Tensor  # (B,)
    nstep: Tensor  # (B,) int64
    status: Tensor  # (B,) int64, RESULTS codes
    nfev: int
    nfev_samples: int
    trace: Tensor | None
    # (s_0, ||r_0||) per sample: the reference of the stopping test (kept by retries)
    ref: tuple[Tensor, Tensor]
    # (z, f(z)) of the last evaluation with an autograd graph when ``graph`` was asked and
    # every returned value is that last iterate (so an adjoint can reuse the evaluation)
    last_eval: tuple[Tensor, Tensor] | None = None
    # whether the batch-independence probe ran (and passed; it raises otherwise)
    probed: bool = False
    # statistics of a solve in stages (FallbackChain): "solver_index", "attempts"
    extra: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    # with ``keep_inverse``: the solver's estimate M = I + U V^T of (I - J)^{-1} at each
    # returned value, (U, V) each (B, D, n) (zero-padded; zero: no estimate); None when the
    # solver has none (Picard, FixedSteps, FallbackChain) or it was not asked for
    inverse: tuple[Tensor, Tensor] | None = None


@dataclasses.dataclass(frozen=True)
class LoopOptions:
    """How a solve is run, whatever the solver (the keyword arguments of fixed_point)."""

    max_steps: int
    compact: bool
    compact_ratio: float = 0.75
    divergence_ratio: float | None = 1e4
    patience: int | None = None
    trace: bool = False
    # batch-independence probe: allowed relative change of a row (None: no probe)
    probe: float | None = None
    # unit roundoff of the least precise dtype f computes in (None: that of z0)
    eps: float | None = None
    slice_args: SliceArgs = slice_args
    # keep the solver's inverse estimate of each sample (AbstractFixedPointSolver.
    # inverse_estimate) in LoopOutput.inverse: 2 B D n extra floats, only when asked
    keep_inverse: bool = False


class BatchCouplingError(ValueError):
    """``f`` computes a sample's output from other samples of the batch (or captured
    per-sample tensors), which per-sample stopping cannot handle honestly."""


# ------------------------------------------------------------------------------- evaluation


class Evaluator:
    """Calls ``fn(z, *args)`` on the working batch: counts the calls, checks the shape, keeps
    the args sliced with the batch, explains failures after the batch shrank, and can make an
    evaluation under autograd (the last one, for an adjoint to reuse)."""

    def __init__(self, fn: Callable[..., Tensor], args: tuple[Any, ...], batch: int,
                 slice_args: SliceArgs) -> None:
        self.fn, self.args, self.work_args = fn, args, args
        self.batch, self.slice_args = batch, slice_args
        self.nfev = self.rows = 0
        self.shrunk = False
        self.last: tuple[Tensor, Tensor] | None = None

    def __call__(self, z: Tensor) -> Tensor:
        self.nfev += 1
        self.rows += z.shape[0]
        try:
            out = self.fn(z, *self.work_args)
        except Exception as err:
            if self.shrunk:
                raise BatchCouplingError(
                    f"`f` failed on the working batch of {z.shape[0]} rows: {err}. "
                    + _shrink_message(self.batch, z.shape[0])
                ) from err
            raise
        if out.shape != z.shape:
            msg = (f"`f` returned {out.shape[0]} rows of {out.shape[1]} values for a state "
                   f"of {z.shape[0]} rows of {z.shape[1]}; it must keep the shape of `z0`.")
            if self.shrunk:
                raise BatchCouplingError(msg + " " + _shrink_message(self.batch, z.shape[0]))
            raise ValueError(msg)
        return out

    def with_graph(self, z: Tensor, graph: str) -> Tensor:
        """Evaluate under autograd (``graph="z"``: from a leaf ``z`` requiring grad) and keep
        ``(z, f(z))`` as :attr:`last`; return ``f(z)`` detached."""
        zl = z.detach().requires_grad_() if graph == "z" else z.detach()
        with torch.enable_grad():
            fl = self(zl)
        self.last = (zl, fl)
        return fl.detach()

    def select(self, gidx: Tensor) -> None:
        """Keep the args of the global rows ``gidx`` (the working batch shrank)."""
        self.work_args = self.slice_args(self.args, gidx)
        self.shrunk = True

    def probe(self, z: Tensor, rows: Tensor, tol: float) -> None:
        _probe(lambda zz, wa=self.work_args: self.fn(zz, *wa), z, rows, tol)


def _shrink_message(batch: int, width: int) -> str:
    return (
        f"The working batch shrank from {batch} to {width} rows because some samples had "
        "finished (converged samples leave the batch so that they stop costing compute). f "
        "must therefore compute each sample from its own row of `z` and of the tensors in "
        "`args` only. If f captures per-sample tensors in its closure (e.g. `lambda z: "
        "cell(z, x)`), pass them as inputs instead: fixed_point(lambda z, x: cell(z, x), z0, "
        "args=(x,)); or pass compact=False to keep the batch whole."
    )


def _probe(fn: Callable[[Tensor], Tensor], z: Tensor, rows: Tensor, tol: float) -> None:
    """Raise :class:`BatchCouplingError` when the outputs of the rows ``rows`` (a mask) move
    when the other rows of ``z`` change. ``fn`` runs twice from the same random state (a
    stochastic f, e.g. with dropout, compares like for like), which is restored afterwards
    and is not counted in the statistics, so that the solve is unchanged by the probe."""
    devices = [z.device] if z.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        cpu = torch.get_rng_state()
        dev = torch.cuda.get_rng_state(z.device) if devices else None
        fz = fn(z)
        torch.set_rng_state(cpu)
        if dev is not None:
            torch.cuda.set_rng_state(dev, z.device)
        fp = fn(torch.where(rows.unsqueeze(1), z, -z - 1.0))
    idx = rows.nonzero().squeeze(1)
    diff = torch.linalg.vector_norm(fp[idx] - fz[idx], dim=1)
    size = torch.linalg.vector_norm(fz[idx], dim=1)
    tiny = torch.finfo(fz.dtype).tiny
    if bool((diff <= tol * size + tiny).all()):
        return
    worst = float((diff / size.clamp_min(tiny)).nan_to_num(float("inf")).max())
    raise BatchCouplingError(
        f"`f` couples the samples of the batch: the output of a sample that is still being "
        f"solved changed (relative change up to {worst:.2e}) when the values of samples that "
        "had already finished were changed. deqkit stops each sample separately (finished "
        "samples keep their value, or leave the working batch), so each row of the output "
        "must depend only on the same row of `z` and of `args`: no batch statistics "
        "(BatchNorm in training mode, z.mean(0)), no captured per-sample tensors, and `z0` "
        "with one problem per row. To solve one coupled problem, make it a batch of one: "
        "z0.reshape(1, -1) (and args with a leading dimension of 1); dk.nn.DEQ does this "
        "itself for cells with BatchNorm in training mode."
    )


# ------------------------------------------------------------------------------------- loop


def iterate(
    fn: Callable[..., Tensor],
    z0: Tensor,
    args: tuple[Any, ...],
    solver: AbstractFixedPointSolver,
    opts: LoopOptions,
    *,
    graph: str | None = None,
    ref: tuple[Tensor, Tensor] | None = None,
) -> LoopOutput:
    """Run ``solver`` on ``z = fn(z, *args)`` from ``z0`` (B, D) for at most
    ``opts.max_steps`` updates.

    ``args`` are per-sample (batch first) and sliced together with the working batch when
    ``opts.compact`` is True (by ``opts.slice_args``); otherwise the full batch is evaluated
    every step and finished samples simply keep their recorded result.

    ``graph`` (``"params"`` or ``"z"``): make the last evaluation the step budget allows
    under autograd (from a leaf ``z`` requiring grad for ``"z"``). When every returned value
    is that last iterate, ``LoopOutput.last_eval`` carries it, so that an adjoint does not
    evaluate f again (a training solve that runs to its budget saves one evaluation).

    ``ref``: ``(s_0, ||r_0||)`` per sample, for a retry that keeps the stopping test of the
    first attempt (see the module docstring); computed from ``z0`` when None.

    ``opts.probe``: when not None, the first time some samples finish while others go on, f
    is evaluated again with the finished rows changed, and the others' outputs must not move
    by more than ``probe`` (relative): :class:`BatchCouplingError` otherwise.
    """
    led = Ledger(z0, solver, opts, ref)
    ev = Evaluator(fn, args, z0.shape[0], opts.slice_args)
    max_steps, probed, state = opts.max_steps, opts.probe is None, None
    z = z0
    fz = ev.with_graph(z, graph) if graph and max_steps == 0 else ev(z)
    for k in range(max_steps + 1):
        sel = led.observe(k, z, fz)
        if sel is not None:
            n_active = led.record(k, sel, z, state)
            if n_active == 0:
                break
            if not probed and k < max_steps:  # the first time rows finish while others go on
                ev.probe(z, led.active, opts.probe)
                probed = True
            keep = led.compact(k, n_active)
            if keep is not None:
                z, fz = z[keep], fz[keep]
                ev.select(led.gidx)
                if state is not None:
                    state = solver.select(state, keep)
        if k == max_steps:
            break
        if state is None:
            state = solver.init(ev, z, fz, led.r, max_steps)
        z, fz_next, state = solver.step(ev, z, fz, led.r, state)
        if fz_next is not None:
            fz = fz_next
        elif graph and k + 1 == max_steps and not led.stopped_early:
            # (after an early stop the adjoint evaluates f itself anyway: no graph here). The
            # graph saves what f's intermediates take during any step: no new memory peak.
            fz = ev.with_graph(z, graph)
        else:
            fz = ev(z)
    led.keep_inverse(state)  # (with keep_inverse: the rows that ran out of steps)
    value, absr, rel, nstep, status, trace = led.finish()
    reuse = ev.last is not None and led.reuse_rows is not None and bool(led.reuse_rows.all())
    return LoopOutput(value=value, abs_residual=absr, rel_residual=rel, nstep=nstep,
                      status=status, nfev=ev.nfev, nfev_samples=ev.rows, trace=trace,
                      ref=led.ref, last_eval=ev.last if reuse else None,
                      probed=opts.probe is not None and probed, inverse=led.inverse_output())


def run_stages(
    fn: Callable[..., Tensor],
    z0: Tensor,
    args: tuple[Any, ...],
    solver: AbstractFixedPointSolver,
    opts: LoopOptions,
    *,
    graph: str | None = None,
) -> LoopOutput:
    """Run ``solver.stages(max_steps)`` in turn: the first on the whole batch, each next one on
    the samples all before it failed, restarted from their lowest-residual iterate with the
    stopping test of the first attempt. One stage (every ordinary solver) is :func:`iterate`."""
    stages = solver.stages(opts.max_steps)
    if len(stages) > 1:  # (each stage's estimate would describe a different restart: none)
        opts = dataclasses.replace(opts, keep_inverse=False)
    first, budget = stages[0]
    loop = iterate(fn, z0, args, first, dataclasses.replace(opts, max_steps=budget),
                   graph=graph if len(stages) == 1 else None)
    if len(stages) == 1:
        return loop
    B = z0.shape[0]
    index = torch.zeros(B, dtype=torch.int64, device=z0.device)
    attempts = torch.ones(B, dtype=torch.int64, device=z0.device)
    s0, r0 = loop.ref
    for i, (stage, budget) in enumerate(stages[1:], start=1):
        failed = (loop.status != RESULTS.successful.code).nonzero().squeeze(1)
        if failed.numel() == 0:
            break
        sub_opts = dataclasses.replace(opts, max_steps=budget, trace=False, probe=None)
        if opts.compact:  # the retry runs on the failed samples only
            slicer = opts.slice_args
            sub = iterate(fn, loop.value[failed], slicer(args, failed), stage, sub_opts,
                          ref=(s0[failed], r0[failed]))
            pick: Tensor | slice = slice(None)
        else:  # a closure cannot be evaluated on a subset: rerun all, keep the failed rows
            sub = iterate(fn, loop.value, args, stage, sub_opts, ref=(s0, r0))
            pick = failed
        _merge(loop, sub, failed, pick)
        index[failed] = i
        attempts[failed] += 1
    loop.extra = {"solver_index": index, "attempts": attempts}
    return loop


def _merge(loop: LoopOutput, sub: LoopOutput, rows: Tensor, pick: Tensor | slice) -> None:
    """Replace the results of ``rows`` of ``loop`` by those of a retry (its rows ``pick``)."""
    for name in ("value", "abs_residual", "rel_residual", "status"):
        getattr(loop, name)[rows] = getattr(sub, name)[pick]
    loop.nstep[rows] += sub.nstep[pick]
    loop.nfev += sub.nfev
    loop.nfev_samples += sub.nfev_samples
