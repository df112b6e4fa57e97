r"""What a backward pass can reuse from the forward solve: the solver's estimate
:math:`M = I + U V^\top \approx (I - J)^{-1}` (as a preconditioner and initial guess of the
transposed system), the forward residual (a tolerance, and the error it already causes) and
the a-posteriori error estimates of the adjoint vector.

Shared by :class:`~deqkit.ImplicitAdjoint` (``reuse_forward``, ``rtol_from_forward``) and
:class:`~deqkit.SHINEAdjoint`.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch
from torch import Tensor

from ..linear import (
    AbstractLinearOperator,
    AbstractLinearSolver,
    FunctionOperator,
    LinearSolution,
    LowRankUpdate,
)

#: the backward tolerance from the forward residual is ``FORWARD_FACTOR`` times the forward
#: relative residual: both errors are amplified by the same ||(I - J)^{-1}||, so the solve
#: then adds at most about a tenth of the error the inexact z* already causes
FORWARD_FACTOR = 0.1


@dataclasses.dataclass
class ForwardInfo:
    """What the forward solve left for the backward pass (per sample, ``(B,)``), with the
    estimate ``M = I + U V^T`` of ``(I - J)^{-1}`` when asked (``inverse``: ``(U, V)``)."""

    abs_residual: Tensor
    rel_residual: Tensor
    z_norm: Tensor
    inverse: tuple[Tensor, Tensor] | None = None
    #: ``(cache, ids)``: where the sample's last adjoint vectors are kept (see
    #: :func:`warm_solve`), or None
    adjoint_cache: tuple[Any, Tensor] | None = None
    _preconditioner: LowRankUpdate | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def from_primal(cls, primal: Any) -> ForwardInfo:
        """What ``primal``'s latest run left (its ``LoopOutput``) and its adjoint cache."""
        out = primal.output
        return cls(abs_residual=out.abs_residual.detach(), rel_residual=out.rel_residual.detach(),
                   z_norm=torch.linalg.vector_norm(out.value.detach(), dim=1),
                   inverse=getattr(out, "inverse", None),
                   adjoint_cache=getattr(primal, "adjoint_cache", None))

    def preconditioner(self) -> LowRankUpdate | None:
        """``M^T = I + V U^T``, the estimate of ``(I - J^T)^{-1}`` (None without one)."""
        if self.inverse is None:
            return None
        if self._preconditioner is None:  # one object: its norm is computed once
            U, V = self.inverse
            self._preconditioner = LowRankUpdate(V, U)
        return self._preconditioner

    def inverse_norm(self) -> Tensor | None:
        """``||M||_2 = ||M^T||_2`` per sample, exactly from the factors (None without an
        estimate)."""
        P = self.preconditioner()
        return None if P is None else P.norm()


def accepts_preconditioner(solver: AbstractLinearSolver) -> bool:
    """Whether ``solver.solve`` takes the ``preconditioner`` keyword (the linear solvers'
    ``supports_preconditioner`` where it exists, else ``solve``'s signature)."""
    known = getattr(solver, "supports_preconditioner", None)
    if known is not None:
        return bool(known)
    try:
        return "preconditioner" in inspect.signature(solver.solve).parameters
    except (TypeError, ValueError):
        return False


def preconditioned_solve(solver: AbstractLinearSolver, op: AbstractLinearOperator, rhs: Tensor,
                         P: AbstractLinearOperator | None) -> LinearSolution:
    r"""Solve ``op u = rhs`` from ``u0 = P rhs`` with the right preconditioner ``P``.

    Through the solver's ``preconditioner`` keyword when it has one; otherwise by composition,
    which any linear solver accepts: solve ``(op P) y = rhs`` from ``y0 = rhs`` and return
    ``u = P y`` (so ``u0 = P rhs``). The residual ``rhs - op P y = rhs - op u`` is the true
    residual of ``u``, so the solver's own tolerance is met by ``u``: the preconditioner
    changes the cost, not the accuracy.
    """
    if P is None:
        return solver.solve(op, rhs)
    if accepts_preconditioner(solver):
        return solver.solve(op, rhs, x0=P.mv(rhs), preconditioner=P)
    composed = FunctionOperator(lambda y: op.mv(P.mv(y)), like=rhs)
    sol = solver.solve(composed, rhs, x0=rhs)
    return dataclasses.replace(sol, value=P.mv(sol.value))


def scaled_solve(solve: Any, solver: AbstractLinearSolver, rhs: Tensor,
                 rtol: Tensor) -> LinearSolution:
    r"""``solve(solver', rhs')`` with a per-sample relative tolerance ``rtol`` ``(B,)``.

    The systems are linear and independent, so scaling row ``b`` by
    :math:`s_b = 1/(\text{atol} + \text{rtol}_b \|g_b\|)` and solving with ``rtol=0,
    atol=1`` is the test :math:`\|g_b - A u_b\| \le \text{atol} + \text{rtol}_b \|g_b\|` for
    every sample; the solution and residual are scaled back. (A linear solver that is not a
    dataclass cannot be copied with other tolerances: it runs to its own, tighter one.)
    """
    if not dataclasses.is_dataclass(solver):  # a solver we cannot copy: its own tolerance
        return solve(solver, rhs)
    gnorm = torch.linalg.vector_norm(rhs, dim=1)
    tol = (float(solver.atol) + rtol * gnorm).clamp_min(torch.finfo(rhs.dtype).tiny)
    scale = tol.reciprocal()
    inner = dataclasses.replace(solver, rtol=0.0, atol=1.0)  # type: ignore[type-var]
    sol = solve(inner, rhs * scale[:, None])
    return dataclasses.replace(sol, value=sol.value / scale[:, None],
                               residual=sol.residual / scale)


def warm_solve(solve: Any, solver: AbstractLinearSolver, op: AbstractLinearOperator,
               rhs: Tensor, rtol: Tensor | None, cache: tuple[Any, Tensor]) -> LinearSolution:
    r"""Solve ``op u = rhs`` starting from each sample's stored adjoint vector, scaled.

    ``cache = (store, ids)``; ``store.initial(ids, zeros)`` gives :math:`c_b` (the adjoint
    vector sample ``ids[b]`` had when it was last solved, zero if none). One product gives
    the best multiple of it, :math:`lpha_b = \langle g_b, A c_b
angle / \|A c_b\|^2`,
    so the start residual :math:`r_b = g_b - lpha_b A c_b` is never larger than
    :math:`\|g_b\|` (a stale vector can only help). The correction solves
    :math:`A d = r` (``solve(solver', r)``, through :func:`scaled_solve`) to the tolerance
    of the original system, :math:`\|g_b - A u_b\| \le 	ext{atol} + 	ext{rtol}_b
    \|g_b\|` (``rtol``: per sample, or the solver's), and :math:`u = lpha c + d`. The
    cost is one product more than a cold solve (none when no sample of the batch has a
    stored vector); ``nmatvec`` counts it.
    """
    store, ids = cache
    c = store.initial(ids, torch.zeros_like(rhs)).to(rhs)
    base = rtol if rtol is not None else torch.full_like(rhs[:, 0], float(solver.rtol))
    if not bool(c.any()):  # nothing stored for this batch: a cold solve
        return solve(solver, rhs) if rtol is None else scaled_solve(solve, solver, rhs, rtol)
    Ac = op.mv(c).detach()
    tiny = torch.finfo(rhs.dtype).tiny
    alpha = (rhs * Ac).sum(1) / (Ac * Ac).sum(1).clamp_min(tiny)
    x0, r0 = alpha[:, None] * c, rhs - alpha[:, None] * Ac
    ratio = torch.linalg.vector_norm(rhs, dim=1) / torch.linalg.vector_norm(r0, dim=1).clamp_min(
        tiny)
    # rtol relative to r0 that is rtol relative to g (at most 1: d = 0 then passes)
    sol = scaled_solve(solve, solver, r0, (base * ratio).clamp(max=1.0))
    return dataclasses.replace(sol, value=x0 + sol.value, nmatvec=sol.nmatvec + 1)


def error_estimates(u: Tensor, residual: Tensor, forward: ForwardInfo | None,
                    inv_norm: Tensor | None) -> dict[str, Tensor]:
    r"""``grad_error`` and ``forward_error`` (see :class:`~deqkit.ImplicitAdjoint`).

    With :math:`\kappa` an estimate of :math:`\|(I - J^\top)^{-1}\|_2 = \|(I - J)^{-1}\|_2`:
    ``grad_error`` :math:`= \kappa \|g - (I - J^\top)u\| / \|u\|` bounds the relative error
    of ``u`` when :math:`\kappa` does (:math:`u^\star - u = (I - J^\top)^{-1} r`), and
    ``forward_error`` :math:`= \kappa \|f(z) - z\| / \|z\|` estimates the relative error of
    the equilibrium itself. NaN where no :math:`\kappa` is known.
    """
    if inv_norm is None:
        inv_norm = u.new_full((u.shape[0],), float("nan"))
    tiny = torch.finfo(u.dtype).tiny
    unorm = torch.linalg.vector_norm(u, dim=1).clamp_min(tiny)
    out = {"inv_norm": inv_norm, "grad_error": inv_norm * residual / unorm}
    if forward is not None:
        out["forward_error"] = inv_norm * forward.abs_residual / forward.z_norm.clamp_min(tiny)
    return out


def combine_inv_norm(*estimates: Tensor | None) -> Tensor | None:
    """The largest of the available estimates of ``||(I - J^T)^{-1}||`` (None if none)."""
    known = [e for e in estimates if e is not None]
    if not known:
        return None
    out = known[0]
    for e in known[1:]:
        out = torch.fmax(out, e)
    return out
