"""The ledger of the iteration engine: the per-sample books of one solve (stopping test,
lowest-residual iterate, failure codes, compaction, residual trace).

The stopping test is the one documented in :mod:`deqkit._iterate` and
:func:`deqkit.fixed_point`; :func:`growth_bound` and :func:`reference` compute its scale.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._solution import RESULTS
from .solvers._base import AbstractFixedPointSolver, provides_inverse_estimate

if TYPE_CHECKING:
    from ._iterate import LoopOptions


def growth_bound(s0: Tensor, s0r0: Tensor, absr: Tensor, fnorm: Tensor, eps: float) -> Tensor:
    """``max(s_0, s_0 ||r_0|| / ||r_k||)``: how large ``||f(z_k)||`` may be and still count
    as the scale of the stopping test (``s_k = min(||f(z_k)||, bound)``). A residual below
    ``eps ||f(z_k)||`` (rounding: in float32, ``z + 1 == z`` once ``|z| > 2^24``) earns about
    as little growth as one at that level (the floor ``||r_k|| + eps ||f(z_k)||``), and
    ``fmax`` ignores the NaN of 0/0."""
    return torch.fmax(s0, s0r0 / torch.add(absr, fnorm, alpha=eps))


def reference(z0: Tensor, r0: Tensor, f0: Tensor) -> tuple[Tensor, Tensor]:
    """``(s_0, ||r_0||)`` from the first iterate, its residual norm and ``||f(z_0)||``."""
    if r0.requires_grad:  # (an unrolled solve)
        z0, r0, f0 = z0.detach(), r0.detach(), f0.detach()
    s0 = torch.fmax(torch.linalg.vector_norm(z0, dim=1), f0)
    # a sample whose first evaluation is not finite stops at once (nonfinite); a finite s0
    # keeps every bound finite, so that no residual passes by `inf <= inf`
    return torch.where(torch.isfinite(s0), s0, 0.0), r0


# ----------------------------------------------------------------------------------- ledger


class Ledger:
    """The per-sample books of one solve on a ``(B, D)`` batch.

    :meth:`observe` applies the stopping test to a new residual and returns the working rows
    that stop now; :meth:`record` writes their results; :meth:`compact` drops finished rows
    from the working batch; :meth:`finish` settles the rows that ran out of steps and returns
    the results. Global results live in ``(B,)`` tensors indexed through ``gidx`` (the global
    row of each working row).
    """

    def __init__(self, z0: Tensor, solver: AbstractFixedPointSolver, opts: LoopOptions,
                 ref: tuple[Tensor, Tensor] | None) -> None:
        B, D = z0.shape
        dev = z0.device
        self.max_steps, self.opts, self.ref = opts.max_steps, opts, ref
        self.rtol, self.atol = float(solver.rtol), float(solver.atol)
        self.tested = not solver.fixed_steps  # FixedSteps: no tolerance test
        # what a sample that passes the test is: a fixed-step solve only completes its steps
        self.done_code = RESULTS.successful.code if self.tested \
            else RESULTS.max_steps_reached.code
        # A huge finite ratio still flags inf residuals (inf <= finite is False).
        self.runaway = opts.divergence_ratio is not None
        self.div = float(opts.divergence_ratio) if self.runaway else 1e300
        self.eps = opts.eps if opts.eps is not None else torch.finfo(z0.dtype).eps
        self.differentiable = torch.is_grad_enabled()
        self.out_value = z0.new_zeros(B, D)
        self.out_abs = z0.new_full((B,), float("nan"))
        self.out_fn = z0.new_full((B,), float("nan"))  # ||f|| at the returned value
        self.out_nstep = torch.full((B,), opts.max_steps, dtype=torch.int64, device=dev)
        self.out_status = torch.full((B,), RESULTS.max_steps_reached.code, dtype=torch.int64,
                                     device=dev)
        self.traces: list[Tensor] = []
        self.solver = solver
        self.inverse = InverseBook() if opts.keep_inverse and \
            provides_inverse_estimate(solver) else None
        self.gidx = torch.arange(B, device=dev)
        self.active = torch.ones(B, dtype=torch.bool, device=dev)
        self.all_active = True  # no working row has stopped: cheaper bookkeeping
        self.stopped_early = False  # some row stopped before max_steps
        self.best_z, self.best_abs, self.best_fn = z0, z0.new_full((B,), float("inf")), \
            z0.new_ones(B)
        self.since_best = torch.zeros(B, dtype=torch.int64, device=dev) \
            if opts.patience else None
        self.s0: Tensor | None = None
        self.reuse_rows: Tensor | None = None  # rows whose returned value is the last iterate
        # the latest step's residual, its norms and verdicts (set by observe)
        self.r = self.absr = self.fnorm = self.conv = self.stop = self.run = None

    @property
    def width(self) -> int:
        """Rows of the working batch."""
        return int(self.gidx.shape[0])

    def _start(self, z: Tensor, absr: Tensor, fnorm: Tensor) -> None:
        if self.ref is None:
            self.ref = reference(z, absr, fnorm)
        self.s0, self.s0r0 = self.ref[0], self.ref[0] * self.ref[1]
        self.s0div = self.s0 * self.div

    def observe(self, k: int, z: Tensor, fz: Tensor) -> Tensor | None:
        """Apply the stopping test to ``fz = f(z)`` at step ``k``; return the working rows
        that stop now (None if none) after updating the lowest-residual iterate."""
        self.r = r = fz - z
        self.absr = absr = torch.linalg.vector_norm(r, dim=1)
        self.fnorm = fnorm = torch.linalg.vector_norm(fz, dim=1)
        if self.s0 is None:
            self._start(z, absr, fnorm)
        # provisional (the plain relative test); confirmed with the bounded scale below
        rtol, atol = self.rtol, self.atol
        if self.tested:
            conv = absr <= (fnorm * rtol + atol if atol else fnorm * rtol)
        else:  # a fixed-step solve completes at its last step, with a finite residual
            conv = torch.isfinite(absr) & (k == self.max_steps)
        # NaN/inf residuals and divergence both fail `absr <= div * best`.
        if k == 0 or not self.runaway:
            bad = ~torch.isfinite(absr)
        elif self.tested:  # (a residual of exactly 0 converges before it can be a "best")
            bad = ~(absr <= self.best_abs * self.div)
        else:  # fixed steps (best = the previous iterate): a blow-up within one step; an
            # exact fixed point followed by rounding noise is none
            bad = ~(absr <= torch.fmax(self.best_abs, fnorm * self.eps) * self.div)
        improved = absr < self.best_abs
        if self.since_best is not None:  # oscillation / stagnation: no new lowest residual
            self.since_best = torch.where(improved, 0, self.since_best + 1)
            bad = bad | (self.since_best >= self.opts.patience)
        stop = conv | bad
        if self.runaway and k % 8 == 7:  # now and then: has an iterate grown far off?
            stop = stop | (fnorm > self.s0div)
        if not self.all_active:
            stop = stop & self.active
        if self.opts.trace:
            t = z.new_full((self.out_abs.shape[0],), float("nan"))
            t[self.gidx] = torch.where(self.active, absr, torch.nan).detach()
            self.traces.append(t)
        flags = torch.stack((stop.any(), improved.all() if self.all_active
                             else (improved | ~self.active).all())).tolist()
        sel = self._confirm(conv, bad) if flags[0] else None
        if k == self.max_steps and not self.stopped_early:
            # returned value == z for rows that converge here or whose best iterate is z
            self.reuse_rows = self.conv | improved if sel is not None else improved
        # (a fixed-step solve returns its last iterate: its "best" is the latest finite one,
        # which costs no copy of the state)
        self._update_best(z, improved, flags[1] or not self.tested)
        return sel

    def _confirm(self, conv: Tensor, bad: Tensor) -> Tensor | None:
        """The candidates' final verdict: bounded scale, finite residual, real runaway."""
        absr, fnorm = self.absr, self.fnorm
        bound = growth_bound(self.s0, self.s0r0, absr, fnorm, self.eps)
        if self.tested:  # (s0 is finite, so is the bound: inf or NaN residuals fail `<=`)
            conv = conv & (absr <= (bound * self.rtol + self.atol if self.atol
                                    else bound * self.rtol))
        self.run = None
        if self.runaway:
            self.run = fnorm > bound * self.div
            conv = conv & ~self.run
            bad = bad | self.run
        stop = conv | bad
        if not self.all_active:
            stop = stop & self.active
        self.conv, self.stop = conv, stop
        sel = stop.nonzero().squeeze(1)
        return sel if sel.numel() > 0 else None

    def _update_best(self, z: Tensor, improved: Tensor, all_improved: bool) -> None:
        if all_improved:  # every unfinished sample improved: no copies (finished rows unused)
            self.best_z, self.best_fn, self.best_abs = z, self.fnorm, self.absr
        else:
            self.best_z = torch.where(improved.unsqueeze(1), z, self.best_z)
            self.best_fn = torch.where(improved, self.fnorm, self.best_fn)
            self.best_abs = torch.where(improved, self.absr, self.best_abs)

    def record(self, k: int, sel: Tensor, z: Tensor, state: Any = None) -> int:
        """Write the results of the working rows ``sel`` stopping at step ``k`` (with the
        solver's inverse estimate from ``state`` when asked); return the number of rows still
        active."""
        g = self.gidx[sel]
        self.keep_inverse(state, sel)
        conv = self.conv
        c = conv[sel]
        val = torch.where(c.unsqueeze(1), z[sel], self.best_z[sel])
        a = torch.where(conv, self.absr, self.best_abs)[sel]  # (select, then gather once)
        fnn = torch.where(conv, self.fnorm, self.best_fn)[sel]
        code = torch.where(c, self.done_code, self._failure_codes(sel))
        self._write(g, val, a, fnn)
        self.out_nstep.index_fill_(0, g, k)
        self.out_status.index_copy_(0, g, code)
        self.active = self.active & ~self.stop
        self.all_active = False
        self.stopped_early = self.stopped_early or k < self.max_steps
        return int(self.active.sum())

    def keep_inverse(self, state: Any, sel: Tensor | None = None) -> None:
        """Store the solver's inverse estimate of the working rows ``sel`` (their final value
        is being recorded; compaction may drop their rows next; None: the active rows)."""
        if self.inverse is None or state is None:
            return
        if sel is None:
            sel = self.active.nonzero().squeeze(1)
        if sel.numel() > 0:
            self.inverse.add(self.gidx[sel], self.solver.inverse_estimate(state, sel))

    def inverse_output(self) -> tuple[Tensor, Tensor] | None:
        """The stored estimates as ``(B, D, n)`` factors (after :meth:`finish`)."""
        if self.inverse is None:
            return None
        B, D = self.out_value.shape
        return self.inverse.assemble(B, D, self.out_status)

    def _failure_codes(self, sel: Tensor) -> Tensor:
        a_now = self.absr[sel]
        finite = torch.isfinite(a_now)
        code = torch.where(finite, RESULTS.diverged.code, RESULTS.nonfinite.code)
        if self.since_best is not None:  # stopped for no progress (and neither ran off)
            stag = finite & (a_now <= self.best_abs[sel] * self.div)
            if self.run is not None:
                stag = stag & ~self.run[sel]
            code = torch.where(stag, RESULTS.stagnated.code, code)
        return code

    def _write(self, g: Tensor, val: Tensor, a: Tensor, fnn: Tensor) -> None:
        if self.differentiable:
            self.out_value = self.out_value.index_copy(0, g, val)
            a, fnn = a.detach(), fnn.detach()
        else:
            self.out_value.index_copy_(0, g, val)
        self.out_abs.index_copy_(0, g, a)
        self.out_fn.index_copy_(0, g, fnn)

    def compact(self, k: int, n_active: int) -> Tensor | None:
        """Drop the finished rows from the working batch when few enough remain (and steps
        remain); return the kept working rows, or None."""
        opts = self.opts
        if not opts.compact or k == self.max_steps \
                or n_active > opts.compact_ratio * self.active.shape[0]:
            return None
        keep = self.active.nonzero().squeeze(1)
        self.gidx = self.gidx[keep]
        self.r = self.r[keep]
        self.best_z, self.best_abs = self.best_z[keep], self.best_abs[keep]
        self.best_fn = self.best_fn[keep]
        self.s0, self.s0r0, self.s0div = self.s0[keep], self.s0r0[keep], self.s0div[keep]
        if self.since_best is not None:
            self.since_best = self.since_best[keep]
        self.active = self.active[keep]
        self.all_active = True
        return keep

    def finish(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """Settle the rows that ran out of steps (their lowest-residual iterate); return
        ``(value, abs, rel, nstep, status, trace)``."""
        rem = self.active.nonzero().squeeze(1)
        if rem.numel() > 0:
            a = self.best_abs[rem]
            self._write(self.gidx[rem], self.best_z[rem], a, self.best_fn[rem])
            code = torch.where(torch.isfinite(a), RESULTS.max_steps_reached.code,
                               RESULTS.nonfinite.code)
            if self.runaway:  # the last iterate ran off: diverged, not merely out of steps
                fn = self.fnorm[rem]
                bound = growth_bound(self.s0[rem], self.s0r0[rem], self.absr[rem], fn, self.eps)
                code = torch.where((fn > bound * self.div) & torch.isfinite(a),
                                   RESULTS.diverged.code, code)
            self.out_status.index_copy_(0, self.gidx[rem], code)
        # the relative residual of every returned value, on the scale of the stopping test
        s0, r0 = self.ref
        bound = growth_bound(s0, s0 * r0, self.out_abs, self.out_fn, self.eps)
        scale = torch.minimum(self.out_fn, bound).clamp_min(torch.finfo(s0.dtype).tiny)
        trace = torch.stack(self.traces) if self.opts.trace else None
        return (self.out_value, self.out_abs, self.out_abs / scale, self.out_nstep,
                self.out_status, trace)


class InverseBook:
    """The solver's inverse estimates ``(U, V)`` (``M = I + U V^T``, see
    :meth:`~deqkit.AbstractFixedPointSolver.inverse_estimate`) of the samples recorded so far,
    in chunks of global rows; :meth:`assemble` zero-pads them to a common rank."""

    def __init__(self) -> None:
        self.chunks: list[tuple[Tensor, Tensor, Tensor]] = []

    def add(self, rows: Tensor, factors: tuple[Tensor, Tensor] | None) -> None:
        if factors is not None and factors[0].shape[2] > 0:
            self.chunks.append((rows, factors[0].detach(), factors[1].detach()))

    def assemble(self, B: int, D: int, status: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(U, V)`` of shape ``(B, D, n)``, ``n`` the largest stored rank; zero (``M = I``)
        for samples without an estimate, with non-finite factors, or whose solve failed
        (diverged, non-finite, stagnated: the iterates that built the estimate are not near
        a solution). Samples that ran out of steps keep theirs: it was built from finite
        iterates, and an adjoint that solves to its own tolerance stays exact whatever M."""
        if not self.chunks:
            return None
        n = max(u.shape[2] for _, u, _ in self.chunks)
        like = self.chunks[0][1]
        U, V = like.new_zeros(B, D, n), like.new_zeros(B, D, n)
        for rows, u, v in self.chunks:
            U[rows, :, : u.shape[2]] = u
            V[rows, :, : v.shape[2]] = v
        bad = (status != RESULTS.successful.code) & (status != RESULTS.max_steps_reached.code)
        bad = bad | ~(torch.isfinite(U).all(dim=(1, 2)) & torch.isfinite(V).all(dim=(1, 2)))
        if bool(bad.any()):
            keep = ~bad[:, None, None]
            U, V = torch.where(keep, U, 0.0), torch.where(keep, V, 0.0)
        return U, V


__all__ = ["InverseBook", "Ledger", "growth_bound", "reference"]
