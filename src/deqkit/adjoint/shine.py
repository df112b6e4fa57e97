"""SHINE: the backward pass from the forward solver's inverse estimate."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._checks import check_bool, check_int
from ..linear import LowRankUpdate
from ..solvers._base import provides_inverse_estimate
from ._base import OneEvaluation, Primal, has_tangent
from ._reuse import ForwardInfo, error_estimates
from .implicit import _depends_on_more_than, _Implicit


@dataclasses.dataclass(frozen=True)
class SHINEAdjoint(OneEvaluation):
    r"""The SHINE gradient: the backward system solved with the forward solver's estimate of
    the inverse Jacobian (Ramzi, Mannel, Bauschke, Kolter 2022).

    A quasi-Newton forward solver (:class:`~deqkit.Broyden`, :class:`~deqkit.Anderson`)
    builds :math:`M = I + UV^\top \approx (I - J)^{-1}` (see
    :meth:`~deqkit.AbstractFixedPointSolver.inverse_estimate`). SHINE replaces the solve of
    :math:`(I - J^\top) u = g` by

    .. math:: u_0 = M^\top g,

    at no cost in products with :math:`J^\top`, optionally refined by ``refine`` steps of
    preconditioned Richardson iteration (one vector-Jacobian product each)

    .. math:: u_{k+1} = u_k + M^\top \big(g - (I - J^\top) u_k\big).

    The estimate is exact in the directions the forward solve explored (Anderson: every
    stored secant pair; Broyden: the newest one) and the identity elsewhere, so :math:`u_0`
    is the exact adjoint when ``g`` lies in that subspace and only approximate otherwise: a
    cheap, inexact gradient (for an exact one with the same reuse, see
    ``ImplicitAdjoint(reuse_forward=True)``). The refinement converges when
    :math:`\rho(I - M^\top(I - J^\top)) < 1`.

    Statistics in ``sol.backward``: ``nmatvec`` (products with :math:`J^\top`), ``nstep``
    (``refine``), ``residual`` (relative, :math:`\|g - (I - J^\top)u\| / \|g\|` per sample:
    one extra product, only with ``report_residual``), and with it ``grad_error`` and
    ``forward_error`` as in :class:`~deqkit.ImplicitAdjoint`, with
    :math:`\kappa = \|M\|_2` (computed exactly from the low-rank factors); ``inv_norm``.

    Args:
        refine: preconditioned Richardson steps after :math:`u_0`. Default: 0 (pure SHINE).
        report_residual: compute the final residual (one more product) for ``residual``,
            ``grad_error`` and ``forward_error``. Default: True.

    Raises:
        ValueError: when the forward solver has no inverse estimate (only
            :class:`~deqkit.Broyden` and :class:`~deqkit.Anderson` have one; not
            ``FallbackChain`` or ``FixedSteps``).

    Reference: Ramzi, Mannel, Bauschke, Kolter (2022), "SHINE: SHaring the INverse Estimate
    from the forward pass for bi-level optimization and implicit models", ICLR; Fang & Saad
    (2009) for Anderson's multisecant estimate; Broyden (1965).

    Example:
        >>> import torch, deqkit as dk
        >>> A = torch.tensor([[0.5, 0.2], [0.0, 0.3]], dtype=torch.float64)
        >>> x = torch.ones(1, 2, dtype=torch.float64, requires_grad=True)
        >>> sol = dk.fixed_point(lambda z, x: z @ A.T + x, torch.zeros(1, 2, dtype=torch.float64),
        ...                      dk.Anderson(rtol=1e-12, atol=0), dk.SHINEAdjoint(), args=(x,))
        >>> sol.value.sum().backward()  # exact here: the history spans R^2
        >>> I = torch.eye(2, dtype=torch.float64)
        >>> want = torch.linalg.solve(I - A.T, torch.ones(2, dtype=torch.float64))
        >>> torch.allclose(x.grad[0], want), sol.backward["nmatvec"]  # (the residual's product)
        (True, 1)
    """

    refine: int = 0
    report_residual: bool = True
    leaf: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_int("SHINEAdjoint", "refine", self.refine, 0)
        check_bool("SHINEAdjoint", "report_residual", self.report_residual)

    def solve(self, primal: Primal, backward_stats: dict[str, Any]) -> Tensor:
        if not provides_inverse_estimate(primal.solver):
            raise ValueError(
                f"SHINEAdjoint needs a forward solver that estimates the inverse Jacobian: "
                f"dk.Broyden or dk.Anderson (not wrapped in FallbackChain or FixedSteps); got "
                f"{type(primal.solver).__name__}. Use dk.ImplicitAdjoint() for other solvers."
            )
        return super().solve(primal, backward_stats)

    def keeps_inverse(self) -> bool:
        return True

    def attach_output(self, z_in: Tensor, fz: Tensor, backward_stats: dict[str, Any],
                      primal: Any) -> Tensor:
        return self.attach(z_in, fz, backward_stats, forward=ForwardInfo.from_primal(primal))

    def attach(self, z_in: Tensor, fz: Tensor, backward_stats: dict[str, Any], *,
               forward: ForwardInfo | None = None) -> Tensor:
        """The value ``z_in`` with the SHINE gradient through ``fz = f(z_in)``; without
        ``forward`` (or its estimate) :math:`M = I` (Jacobian-free backpropagation)."""
        z_star = z_in.detach()
        if not _depends_on_more_than(fz, z_in) and not has_tangent(fz):
            return z_star
        payload = {"z_star": z_star, "z_req": z_in, "adjoint": self, "stats": backward_stats,
                   "forward": forward}
        return _Implicit.apply(fz, payload)

    def solve_tangent(self, op: Any, rhs: Tensor, stats: dict[str, Any],
                      forward: ForwardInfo | None = None) -> Tensor:
        r"""Forward mode, the transpose of :meth:`solve_backward`: :math:`t = M \dot f`,
        refined by ``refine`` steps :math:`t \leftarrow t + M(\dot f - (I - J)t)`."""
        inv = forward.inverse if forward is not None else None
        M = LowRankUpdate(*inv) if inv is not None else None
        with torch.no_grad():
            t = M.mv(rhs) if M is not None else rhs.clone()
            for _ in range(self.refine):
                r = rhs - op.mv(t)
                t = t + (M.mv(r) if M is not None else r)
        stats["tangent"] = {"nmatvec": self.refine}
        return t.detach()

    def solve_backward(self, op: Any, rhs: Tensor, stats: dict[str, Any],
                       ok: Tensor | None = None, forward: ForwardInfo | None = None) -> Tensor:
        """``u = M^T g``, refined; statistics in ``stats`` (see the class docstring)."""
        P = forward.preconditioner() if forward is not None else None
        with torch.no_grad():
            u = P.mv(rhs) if P is not None else rhs.clone()
        nmatvec = 0
        for _ in range(self.refine):
            r = rhs - op.mv(u).detach()
            with torch.no_grad():
                u = u + (P.mv(r) if P is not None else r)
            nmatvec += 1
        B = rhs.shape[0]
        stats.update(nmatvec=nmatvec, nstep=torch.full((B,), self.refine, dtype=torch.int64,
                                                       device=rhs.device))
        if self.report_residual:
            res = torch.linalg.vector_norm(rhs - op.mv(u).detach(), dim=1)
            stats["nmatvec"] = nmatvec + 1
            gnorm = torch.linalg.vector_norm(rhs, dim=1).clamp_min(torch.finfo(rhs.dtype).tiny)
            stats["residual"] = res / gnorm
            inv = forward.inverse_norm() if forward is not None else None
            stats.update(error_estimates(u, res, forward, inv))
        if ok is not None:
            stats["nonfinite_grad"] = ~ok
        return u.detach()
