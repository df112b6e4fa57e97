"""The one driver loop shared by every fixed-point solver.

It owns: evaluating f, the per-sample stopping test, the lowest-residual iterate, the
non-finite and divergence checks, per-sample statistics and batch compaction (dropping
finished samples from the working batch when f can be evaluated on a subset). At most one
host synchronisation happens per step (two on steps where some sample stops).
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
    # (z, f(z)) of the last evaluation with an autograd graph when ``grad_last`` was asked and
    # every returned value is that last iterate (so an adjoint can reuse the evaluation)
    last_eval: tuple[Tensor, Tensor] | None = None


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
) -> LoopOutput:
    """Run ``solver`` on ``z = fn(z, *args)`` from ``z0`` (B, D).

    ``args`` are per-sample tensors (batch first) sliced together with the working batch when
    ``compact`` is True; otherwise the full batch is evaluated every step and finished samples
    simply keep their recorded result.

    ``grad_last`` (``"params"`` or ``"z"``): make the last evaluation the step budget allows
    (the one at ``max_steps``) under autograd, with ``z`` a leaf requiring grad for ``"z"``.
    When every returned value is that last iterate, ``LoopOutput.last_eval`` carries the
    evaluation so that the adjoint does not repeat it (training with a step budget that no
    sample beats, e.g. the one-step recipe, saves one evaluation of f per step).
    """
    B, D = z0.shape
    device = z0.device
    rtol, atol = float(solver.rtol), float(solver.atol)
    # A huge finite ratio still flags inf residuals (inf <= finite is False).
    div = float(divergence_ratio) if divergence_ratio is not None else 1e300
    differentiable = torch.is_grad_enabled()

    counters = {"nfev": 0, "rows": 0}
    work_args = args

    def call(z: Tensor) -> Tensor:
        counters["nfev"] += 1
        counters["rows"] += z.shape[0]
        return fn(z, *work_args)

    # Global (full-batch) results, written when samples stop.
    out_value = z0.new_zeros(B, D)
    out_abs = z0.new_full((B,), float("nan"))
    out_rel = z0.new_full((B,), float("nan"))
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
    best_z = z
    best_abs = z0.new_full((B,), float("inf"))
    best_fn = z0.new_ones(B)
    since_best = torch.zeros(B, dtype=torch.int64, device=device) if patience else None
    state = None

    all_active = True  # no row of the working batch has stopped: cheaper bookkeeping
    stopped_early = False  # some row stopped before max_steps (no reuse of the last eval)
    reuse_rows: Tensor | None = None  # rows whose returned value is the last iterate
    for k in range(max_steps + 1):
        r = fz - z
        absr = torch.linalg.vector_norm(r, dim=1)
        fnorm = torch.linalg.vector_norm(fz, dim=1)
        conv = absr <= (fnorm * rtol + atol if atol else fnorm * rtol)
        # NaN/inf residuals and divergence both fail `absr <= div * best`.
        bad = ~(absr <= best_abs * div) if k > 0 else ~torch.isfinite(absr)
        improved = absr < best_abs
        if since_best is not None:  # oscillation / stagnation: no new lowest residual lately
            since_best = torch.where(improved, 0, since_best + 1)
            bad = bad | (since_best >= patience)
        stop = conv | bad
        if not all_active:
            stop = stop & active
        if trace:
            t = z0.new_full((B,), float("nan"))
            t[gidx] = torch.where(active, absr, torch.nan).detach()
            traces.append(t)
        flags = torch.stack(
            (stop.any(), improved.all() if all_active else (improved | ~active).all())
        ).tolist()
        if last is not None and k == max_steps and not stopped_early:
            # returned value == z for rows that converge here or whose best iterate is z
            reuse_rows = conv | improved
        if flags[1]:  # every unfinished sample improved: no copies (finished rows are unused)
            best_z, best_fn, best_abs = z, fnorm, absr
        else:
            best_z = torch.where(improved.unsqueeze(1), z, best_z)
            best_fn = torch.where(improved, fnorm, best_fn)
            best_abs = torch.where(improved, absr, best_abs)
        if flags[0]:
            sel = stop.nonzero().squeeze(1)
            g = gidx[sel]
            c = conv[sel]
            c2 = c.unsqueeze(1)
            val = torch.where(c2, z[sel], best_z[sel])
            a = torch.where(c, absr[sel], best_abs[sel])
            fnn = torch.where(c, fnorm[sel], best_fn[sel])
            finite = torch.isfinite(absr[sel])
            failed_code = torch.where(finite, RESULTS.diverged.code, RESULTS.nonfinite.code)
            if since_best is not None:
                stag = finite & (absr[sel] <= best_abs[sel] * div)  # stopped for no progress
                failed_code = torch.where(stag, RESULTS.stagnated.code, failed_code)
            code = torch.where(c, RESULTS.successful.code, failed_code)
            if differentiable:
                out_value = out_value.index_copy(0, g, val)
            else:
                out_value.index_copy_(0, g, val)
            out_abs.index_copy_(0, g, a.detach())
            out_rel.index_copy_(0, g, (a / fnn.clamp_min(torch.finfo(a.dtype).tiny)).detach())
            out_nstep.index_fill_(0, g, k)
            out_status.index_copy_(0, g, code)
            active = active & ~stop
            all_active = False
            stopped_early = stopped_early or k < max_steps
            n_active = int(active.sum())
            if n_active == 0:
                break
            if compact and n_active <= compact_ratio * active.shape[0]:
                keep = active.nonzero().squeeze(1)
                gidx = gidx[keep]
                z, fz, r = z[keep], fz[keep], r[keep]
                best_z, best_abs, best_fn = best_z[keep], best_abs[keep], best_fn[keep]
                if since_best is not None:
                    since_best = since_best[keep]
                active = active[keep]
                all_active = True
                work_args = tuple(a[gidx] if isinstance(a, Tensor) else a for a in args)
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
        out_rel.index_copy_(0, g, (a / best_fn[rem].clamp_min(torch.finfo(a.dtype).tiny)).detach())
        bad_rem = ~torch.isfinite(a)
        if bool(bad_rem.any()):
            out_status.index_copy_(
                0, g, torch.where(bad_rem, RESULTS.nonfinite.code, RESULTS.max_steps_reached.code)
            )
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
        last_eval=last_eval,
    )
