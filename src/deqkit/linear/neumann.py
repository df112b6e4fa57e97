"""Damped Richardson / truncated Neumann series, batched over independent systems."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .._checks import check_float, check_int, check_tolerances
from ._base import (
    AbstractLinearSolver,
    LinearSolution,
    _initial_guess,
    _tolerance,
    batched_norm,
    known_norm,
)
from ._operator import AbstractLinearOperator

_WINDOW = 5  # residual ratios averaged (geometric mean) for the ||A^{-1}|| estimate


@dataclasses.dataclass(frozen=True)
class Neumann(AbstractLinearSolver):
    r"""Damped Richardson iteration (a truncated Neumann series) for ``A_b x_b = r_b``.

    .. math::

        x_{k+1} = x_k + \eta\,(b - A x_k), \qquad
        b - A x_{k+1} = (I - \eta A)(b - A x_k).

    For the DEQ backward system :math:`A = I - K` (:math:`K = J_f^\top`) with
    :math:`\eta = 1` and :math:`x_0 = 0` this is the truncated Neumann series
    :math:`x_k = \sum_{i<k} K^i b`, i.e. the classical fixed-point iteration on the adjoint
    system :math:`u = K u + b`.  It converges for every right-hand side iff the spectral radius
    :math:`\rho(I - \eta A) < 1`, with the residual shrinking by about that factor per step;
    otherwise the sample is reported as not converged (no exception).  One ``matvec`` per
    iteration; the residual is always the true residual.  Each sample stops (its ``x`` stops
    changing) once ``||b - A x|| <= atol + rtol * ||b||``; a sample whose residual becomes
    non-finite also stops.

    **Preconditioned Richardson** (``preconditioner=P``, :math:`P \approx A^{-1}`):
    :math:`x_{k+1} = x_k + \eta\,P (b - A x_k)`, so :math:`r_{k+1} = (I - \eta A P) r_k`; it
    converges iff :math:`\rho(I - \eta A P) < 1` (one product with each of ``A`` and ``P``
    per iteration).  A poor ``P`` is reported as not converged (or a sample stops early on a
    non-finite residual), never silently accepted.

    **Estimate of** :math:`\|A^{-1}\|_2` (``inv_norm``): with :math:`q` the observed residual
    contraction (the geometric mean of the last ``5`` ratios :math:`\|r_{k+1}\|/\|r_k\|` of
    the sample), :math:`\eta / (1 - q)`.  Assumption: :math:`q \approx \|I - \eta A\|_2`
    (for :math:`A = I - J`, :math:`\eta = 1`: :math:`q \approx \|J\|`); then
    :math:`\|A^{-1}\| = \eta \|(I - (I - \eta A))^{-1}\| \le \eta / (1 - q)`.  The observed
    ratio tends to the spectral radius, which is below the norm for nonnormal ``J``, so this
    is an estimate, not a bound; it is raised to at least the lower bound
    :math:`\max_k \|\Delta x_k\| / \|A \Delta x_k\|` seen along the way.  With a
    preconditioner :math:`q` measures :math:`I - \eta A P` and the estimate is multiplied by
    :math:`\|P\|` (exact when ``P`` has a ``norm()``, as :class:`~deqkit.linear.LowRankUpdate`;
    otherwise :math:`\max_k \|P r_k\|/\|r_k\|`).  ``inf`` when :math:`q \ge 1` (no
    contraction), NaN for a sample that took no step.

    Args:
        rtol: relative tolerance, default ``1e-6``.  With ``rtol = atol = 0`` the solver runs
            ``max_steps`` iterations (or stops at an exact solution).
        atol: absolute tolerance, default ``1e-8``.
        max_steps: maximum number of iterations (one ``matvec`` each), default ``100``.
        damping: step size :math:`\eta \in (0, 2]`, default ``1.0``.  The iteration
            converges iff every eigenvalue :math:`\lambda` of ``A`` satisfies
            :math:`|1 - \eta \lambda| < 1`; a smaller step helps when ``A`` has eigenvalues
            with large real part.  For symmetric positive definite ``A`` the optimal value
            is ``2 / (lambda_min + lambda_max)``.

    Reference:
        L. F. Richardson, "The approximate arithmetical solution by finite differences of
        physical problems involving differential equations", Phil. Trans. R. Soc. A 210,
        307-357, 1911.

    Example:
        >>> import torch
        >>> from deqkit.linear import Neumann
        >>> k = torch.tensor([[0.5, -0.25, 0.0]], dtype=torch.float64)  # A = I - diag(k)
        >>> b = torch.ones(1, 3, dtype=torch.float64)
        >>> sol = Neumann(rtol=1e-12, max_steps=200).solve(lambda v: v - k * v, b)
        >>> torch.allclose(sol.value, 1 / (1 - k)), sol.converged.tolist()
        (True, [True])
    """

    rtol: float = 1e-6
    atol: float = 1e-8
    max_steps: int = 100
    damping: float = 1.0

    def __post_init__(self) -> None:
        # rtol = atol = 0 is allowed: exactly max_steps iterations
        check_tolerances("Neumann", self.rtol, self.atol, both_zero=True, example="1e-6")
        check_int("Neumann", "max_steps", self.max_steps, example=100)
        check_float("Neumann", "damping", self.damping, gt=0, le=2,
                    example="1.0 (the plain Neumann series) or a smaller step")

    def run(self, op: AbstractLinearOperator, prepared: object, rhs: Tensor,
            x0: Tensor | None, preconditioner: AbstractLinearOperator | None = None
            ) -> LinearSolution:
        """Solve ``A x = rhs`` row by row; see the class docstring."""
        B = rhs.shape[0]
        _, tol = _tolerance(rhs, self.rtol, self.atol)
        x = _initial_guess(rhs, x0)
        r = rhs.clone() if x0 is None else rhs - op(x)
        nstep = torch.zeros(B, dtype=torch.int64, device=rhs.device)
        damping = float(self.damping)
        rnorm = batched_norm(r)
        history = [rnorm]  # residual norms after each iteration (frozen once a sample stops)
        pnorm = torch.zeros_like(rnorm)  # max ||P r|| / ||r||, a lower estimate of ||P||_2
        lower = torch.zeros_like(rnorm)  # max ||dx|| / ||A dx||, a lower bound of ||A^{-1}||_2
        stopped = torch.zeros(B, dtype=torch.bool, device=rhs.device)
        for _ in range(self.max_steps):
            stopped = stopped | (rnorm <= tol) | ~torch.isfinite(rnorm)
            if bool(stopped.all()):  # one host sync per iteration
                break
            step = r
            if preconditioner is not None:
                step = preconditioner(r)
                ratio = batched_norm(step) / rnorm.clamp_min(torch.finfo(r.dtype).tiny)
                pnorm = torch.where(stopped, pnorm, torch.fmax(pnorm, ratio))
            x = torch.where(stopped[:, None], x, x + damping * step)
            nstep += ~stopped
            r_new = torch.where(stopped[:, None], r, rhs - op(x))
            dr = batched_norm(r - r_new)  # ||A dx|| with dx = damping * step
            ratio = damping * batched_norm(step) / dr
            lower = torch.where(stopped | (dr == 0), lower, torch.fmax(lower, ratio))
            r, rnorm = r_new, batched_norm(r_new)
            history.append(rnorm)
        inv_norm = _inv_norm_estimate(torch.stack(history), nstep, damping)
        if preconditioner is not None:
            exact = known_norm(preconditioner)
            inv_norm = (pnorm if exact is None else exact.to(pnorm.dtype)) * inv_norm
        inv_norm = torch.where(inv_norm.isnan(), inv_norm, torch.fmax(inv_norm, lower))
        return LinearSolution(value=x, converged=rnorm <= tol, residual=rnorm, nstep=nstep,
                              nmatvec=op.count, inv_norm=inv_norm)


def _inv_norm_estimate(history: Tensor, nstep: Tensor, damping: float) -> Tensor:
    r"""``damping / (1 - q)`` per sample, ``q`` the geometric mean of the last (at most
    ``_WINDOW``) residual ratios ``||r_{k+1}|| / ||r_k||`` of the sample's own iterations
    (``history`` is ``(steps + 1, B)``, frozen after a sample stops); ``inf`` if ``q >= 1``,
    NaN for a sample without a step (or a non-finite residual)."""
    n = nstep.clamp_max(history.shape[0] - 1)
    window = n.clamp_max(_WINDOW)
    last = history.gather(0, n[None]).squeeze(0)
    first = history.gather(0, (n - window)[None]).squeeze(0)
    tiny = torch.finfo(history.dtype).tiny
    q = (last.clamp_min(tiny) / first.clamp_min(tiny)) ** (1.0 / window.clamp_min(1))
    est = torch.where(q < 1, damping / (1 - q).clamp_min(tiny), float("inf"))
    # An exact solution in one step (last = 0) says only q ~ 0: the estimate is damping.
    return torch.where((window > 0) & torch.isfinite(q), est, float("nan"))
