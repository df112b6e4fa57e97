"""The one driver loop shared by every fixed-point solver.

It owns: evaluating f, the per-sample stopping test, the lowest-residual iterate, the
non-finite, divergence and runaway checks, per-sample statistics and batch compaction
(dropping finished samples from the working batch when f can be evaluated on a subset). At
most one host synchronisation happens per step (a few more on steps where some sample stops).

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

from ._solution import RESULTS
from .solvers._base import AbstractFixedPointSolver


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
    # (z, f(z)) of the last evaluation with an autograd graph when ``grad_last`` was asked and
    # every returned value is that last iterate (so an adjoint can reuse the evaluation)
    last_eval: tuple[Tensor, Tensor] | None = None
    # whether the batch-independence probe ran (and passed; it raises otherwise)
    probed: bool = False


class BatchCouplingError(ValueError):
    """``f`` computes a sample's output from other samples of the batch (or captured
    per-sample tensors), which per-sample stopping cannot handle honestly."""


def growth_bound(s0: Tensor, s0r0: Tensor, absr: Tensor, fnorm: Tensor, eps: float) -> Tensor:
    """``max(s_0, s_0 ||r_0|| / ||r_k||)``: how large ``||f(z_k)||`` may be and still count
    as the scale of the stopping test (``s_k = min(||f(z_k)||, bound)``). A residual below
    ``eps ||f(z_k)||`` (rounding: in float32, ``z + 1 == z`` once ``|z| > 2^24``) earns about
    as little growth as one at that level (the floor ``||r_k|| + eps ||f(z_k)||``), and
    ``fmax`` ignores the NaN of 0/0."""
    return torch.fmax(s0, s0r0 / torch.add(absr, fnorm, alpha=eps))


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
    ref = torch.linalg.vector_norm(fz[idx], dim=1)
    tiny = torch.finfo(fz.dtype).tiny
    ok = diff <= tol * ref + tiny
    if bool(ok.all()):
        return
    worst = float((diff / ref.clamp_min(tiny)).nan_to_num(float("inf")).max())
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


def iterate(
    fn: Callable[..., Tensor],
    z0: Tensor,
    args: tuple[Any, ...],
    solver: AbstractFixedPointSolver,
    max_steps: int,
    *,
    compact: bool,
    compact_ratio: float,
    divergence_ratio: float | None,
    trace: bool,
    patience: int | None = None,
    grad_last: str | None = None,
    ref: tuple[Tensor, Tensor] | None = None,
    probe: float | None = None,
    slice_args: Callable[[tuple[Any, ...], Tensor], tuple[Any, ...]] | None = None,
    eps: float | None = None,
) -> LoopOutput:
    """Run ``solver`` on ``z = fn(z, *args)`` from ``z0`` (B, D).

    ``args`` are per-sample (batch first) and sliced together with the working batch when
    ``compact`` is True (by ``slice_args(args, rows)``, default: top-level tensors);
    otherwise the full batch is evaluated every step and finished samples simply keep their
    recorded result.

    ``grad_last`` (``"params"`` or ``"z"``): make the last evaluation the step budget allows
    (the one at ``max_steps``) under autograd, with ``z`` a leaf requiring grad for ``"z"``.
    When every returned value is that last iterate, ``LoopOutput.last_eval`` carries the
    evaluation so that the adjoint does not repeat it (training with a step budget that no
    sample beats, e.g. the one-step recipe, saves one evaluation of f per step).

    ``ref``: ``(s_0, ||r_0||)`` per sample, for a retry that must keep the stopping test of
    the first attempt (see the module docstring); computed from ``z0`` when None.

    ``probe``: when not None, the first time some samples finish while others go on, f is
    evaluated once more with the finished rows changed, and the others' outputs must not
    move by more than ``probe`` (relative); :class:`BatchCouplingError` otherwise.

    ``eps``: the unit roundoff of the least precise dtype f computes in (default: that of
    ``z0``), the level below which a residual is rounding (see :func:`growth_bound`).
    """
    B, D = z0.shape
    device = z0.device
    rtol, atol = float(solver.rtol), float(solver.atol)
    # A huge finite ratio still flags inf residuals (inf <= finite is False).
    div = float(divergence_ratio) if divergence_ratio is not None else 1e300
    runaway = divergence_ratio is not None
    differentiable = torch.is_grad_enabled()
    if slice_args is None:
        slice_args = _slice_top_level
    if eps is None:
        eps = torch.finfo(z0.dtype).eps

    counters = {"nfev": 0, "rows": 0}
    work_args = args
    shrunk = [False]

    def call(z: Tensor) -> Tensor:
        counters["nfev"] += 1
        counters["rows"] += z.shape[0]
        try:
            out = fn(z, *work_args)
        except Exception as err:
            if shrunk[0]:
                raise BatchCouplingError(
                    f"`f` failed on the working batch of {z.shape[0]} rows: {err}. "
                    + _shrink_message(B, z.shape[0])
                ) from err
            raise
        if out.shape != z.shape:
            msg = (f"`f` returned {out.shape[0]} rows of {out.shape[1]} values for a state "
                   f"of {z.shape[0]} rows of {z.shape[1]}; it must keep the shape of `z0`.")
            if shrunk[0]:
                raise BatchCouplingError(msg + " " + _shrink_message(B, z.shape[0]))
            raise ValueError(msg)
        return out

    # Global (full-batch) results, written when samples stop.
    out_value = z0.new_zeros(B, D)
    out_abs = z0.new_full((B,), float("nan"))
    out_fn = z0.new_full((B,), float("nan"))  # ||f|| at the returned value (for rel_residual)
    out_nstep = torch.full((B,), max_steps, dtype=torch.int64, device=device)
    out_status = torch.full((B,), RESULTS.max_steps_reached.code, dtype=torch.int64, device=device)
    traces: list[Tensor] = []

    gidx = torch.arange(B, device=device)  # global row of each working row
    active = torch.ones(B, dtype=torch.bool, device=device)
    last: tuple[Tensor, Tensor] | None = None

    def call_last(z: Tensor) -> Tensor:  # the evaluation at max_steps, kept with its graph
        nonlocal last
        zl = z.detach().requires_grad_() if grad_last == "z" else z.detach()
        with torch.enable_grad():
            fl = call(zl)
        last = (zl, fl)
        return fl.detach()

    z = z0
    fz = call_last(z) if grad_last and max_steps == 0 else call(z)
    s0 = s0r0 = s0div = None  # the stopping test's reference, from the first residual
    best_z = z
    best_abs = z0.new_full((B,), float("inf"))
    best_fn = z0.new_ones(B)
    since_best = torch.zeros(B, dtype=torch.int64, device=device) if patience else None
    state = None
    probed = probe is None  # nothing (more) to probe

    all_active = True  # no row of the working batch has stopped: cheaper bookkeeping
    stopped_early = False  # some row stopped before max_steps (no reuse of the last eval)
    reuse_rows: Tensor | None = None  # rows whose returned value is the last iterate
    for k in range(max_steps + 1):
        r = fz - z
        absr = torch.linalg.vector_norm(r, dim=1)
        fnorm = torch.linalg.vector_norm(fz, dim=1)
        if s0 is None:
            ref = ref if ref is not None else _reference(z, absr, fnorm)
            s0, s0r0, s0div = ref[0], ref[0] * ref[1], ref[0] * div
        # provisional (the plain relative test); confirmed with the bounded scale below
        conv = absr <= (fnorm * rtol + atol if atol else fnorm * rtol)
        # NaN/inf residuals and divergence both fail `absr <= div * best`.
        bad = ~(absr <= best_abs * div) if k > 0 else ~torch.isfinite(absr)
        improved = absr < best_abs
        if since_best is not None:  # oscillation / stagnation: no new lowest residual lately
            since_best = torch.where(improved, 0, since_best + 1)
            bad = bad | (since_best >= patience)
        stop = conv | bad
        if runaway and k % 8 == 7:  # now and then: has an iterate grown far beyond its start?
            stop = stop | (fnorm > s0div)
        if not all_active:
            stop = stop & active
        if trace:
            t = z0.new_full((B,), float("nan"))
            t[gidx] = torch.where(active, absr, torch.nan).detach()
            traces.append(t)
        flags = torch.stack(
            (stop.any(), improved.all() if all_active else (improved | ~active).all())
        ).tolist()
        sel = None
        if flags[0]:  # confirm the candidates: bounded scale, finite residual, real runaway
            bound = growth_bound(s0, s0r0, absr, fnorm, eps)
            # (s0 is finite, so is the bound: an inf or NaN residual fails `<=`)
            conv = conv & (absr <= (bound * rtol + atol if atol else bound * rtol))
            if runaway:
                run = fnorm > bound * div
                conv = conv & ~run
                bad = bad | run
            stop = conv | bad
            if not all_active:
                stop = stop & active
            sel = stop.nonzero().squeeze(1)
            flags[0] = sel.numel() > 0
        if last is not None and k == max_steps and not stopped_early:
            # returned value == z for rows that converge here or whose best iterate is z
            reuse_rows = conv | improved  # (no row stopped before: conv is confirmed or empty)
        if flags[1]:  # every unfinished sample improved: no copies (finished rows are unused)
            best_z, best_fn, best_abs = z, fnorm, absr
        else:
            best_z = torch.where(improved.unsqueeze(1), z, best_z)
            best_fn = torch.where(improved, fnorm, best_fn)
            best_abs = torch.where(improved, absr, best_abs)
        if flags[0]:
            g = gidx[sel]
            c = conv[sel]
            val = torch.where(c.unsqueeze(1), z[sel], best_z[sel])
            a = torch.where(conv, absr, best_abs)[sel]  # (vectors: select, then gather once)
            fnn = torch.where(conv, fnorm, best_fn)[sel]
            a_now = absr[sel]
            finite = torch.isfinite(a_now)
            failed_code = torch.where(finite, RESULTS.diverged.code, RESULTS.nonfinite.code)
            if since_best is not None:  # stopped for no progress (and neither ran off)
                stag = finite & (a_now <= best_abs[sel] * div)
                if runaway:
                    stag = stag & ~run[sel]
                failed_code = torch.where(stag, RESULTS.stagnated.code, failed_code)
            code = torch.where(c, RESULTS.successful.code, failed_code)
            if differentiable:
                out_value = out_value.index_copy(0, g, val)
            else:
                out_value.index_copy_(0, g, val)
            out_abs.index_copy_(0, g, a.detach() if differentiable else a)
            out_fn.index_copy_(0, g, fnn.detach() if differentiable else fnn)
            out_nstep.index_fill_(0, g, k)
            out_status.index_copy_(0, g, code)
            active = active & ~stop
            all_active = False
            stopped_early = stopped_early or k < max_steps
            n_active = int(active.sum())
            if n_active == 0:
                break
            if not probed and k < max_steps:  # the first time rows finish while others go on
                wa = work_args
                _probe(lambda zz, wa=wa: fn(zz, *wa), z, active, probe)
                probed = True
            if compact and k < max_steps and n_active <= compact_ratio * active.shape[0]:
                keep = active.nonzero().squeeze(1)
                gidx = gidx[keep]
                z, fz, r = z[keep], fz[keep], r[keep]
                best_z, best_abs, best_fn = best_z[keep], best_abs[keep], best_fn[keep]
                s0, s0r0, s0div = s0[keep], s0r0[keep], s0div[keep]
                if since_best is not None:
                    since_best = since_best[keep]
                active = active[keep]
                all_active = True
                work_args = slice_args(args, gidx)
                shrunk[0] = True
                if state is not None:
                    state = solver.select(state, keep)
        if k == max_steps:
            break
        if state is None:
            state = solver.init(call, z, fz, r, max_steps)
        z_next, fz_next, state = solver.step(call, z, fz, r, state)
        z = z_next
        if fz_next is not None:
            fz = fz_next
        elif grad_last and k + 1 == max_steps and not stopped_early:
            # (after an early stop the adjoint evaluates f itself anyway: no graph here). The
            # graph saves what f's intermediates take during any step: no new memory peak.
            fz = call_last(z)
        else:
            fz = call(z)

    # Samples still active ran out of steps: return their lowest-residual iterate.
    rem = active.nonzero().squeeze(1)
    if rem.numel() > 0:
        g = gidx[rem]
        if differentiable:
            out_value = out_value.index_copy(0, g, best_z[rem])
        else:
            out_value.index_copy_(0, g, best_z[rem])
        a = best_abs[rem]
        out_abs.index_copy_(0, g, a.detach())
        out_fn.index_copy_(0, g, best_fn[rem].detach())
        code = torch.where(torch.isfinite(a), RESULTS.max_steps_reached.code,
                           RESULTS.nonfinite.code)
        if runaway:  # the last iterate ran off: diverged, not merely out of steps
            bound = growth_bound(s0[rem], s0r0[rem], absr[rem], fnorm[rem], eps)
            code = torch.where((fnorm[rem] > bound * div) & torch.isfinite(a),
                               RESULTS.diverged.code, code)
        out_status.index_copy_(0, g, code)
    # the relative residual of every returned value, on the scale of the stopping test
    scale = torch.minimum(out_fn, growth_bound(ref[0], ref[0] * ref[1], out_abs, out_fn, eps))
    out_rel = out_abs / scale.clamp_min(torch.finfo(out_abs.dtype).tiny)
    last_eval = None
    if last is not None and reuse_rows is not None and bool(reuse_rows.all()):
        last_eval = last
    return LoopOutput(
        value=out_value,
        abs_residual=out_abs,
        rel_residual=out_rel,
        nstep=out_nstep,
        status=out_status,
        nfev=counters["nfev"],
        nfev_samples=counters["rows"],
        trace=torch.stack(traces) if trace else None,
        ref=ref,
        last_eval=last_eval,
        probed=probe is not None and probed,
    )


def _reference(z0: Tensor, r0: Tensor, f0: Tensor) -> tuple[Tensor, Tensor]:
    """``(s_0, ||r_0||)`` from the first iterate, its residual norm and ``||f(z_0)||``."""
    if r0.requires_grad:  # (an unrolled solve)
        z0, r0, f0 = z0.detach(), r0.detach(), f0.detach()
    s0 = torch.fmax(torch.linalg.vector_norm(z0, dim=1), f0)
    # a sample whose first evaluation is not finite stops at once (nonfinite); a finite s0
    # keeps every bound finite, so that no residual passes by `inf <= inf`
    return torch.where(torch.isfinite(s0), s0, 0.0), r0


def _slice_top_level(args: tuple[Any, ...], rows: Tensor) -> tuple[Any, ...]:
    return tuple(a[rows] if isinstance(a, Tensor) else a for a in args)
