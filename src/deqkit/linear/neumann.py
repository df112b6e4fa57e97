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
)
from ._operator import AbstractLinearOperator


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
            x0: Tensor | None) -> LinearSolution:
        """Solve ``A x = rhs`` row by row; see the class docstring."""
        B = rhs.shape[0]
        _, tol = _tolerance(rhs, self.rtol, self.atol)
        x = _initial_guess(rhs, x0)
        r = rhs.clone() if x0 is None else rhs - op(x)
        nstep = torch.zeros(B, dtype=torch.int64, device=rhs.device)
        damping = float(self.damping)
        rnorm = batched_norm(r)
        stopped = torch.zeros(B, dtype=torch.bool, device=rhs.device)
        for _ in range(self.max_steps):
            stopped = stopped | (rnorm <= tol) | ~torch.isfinite(rnorm)
            if bool(stopped.all()):  # one host sync per iteration
                break
            x = torch.where(stopped[:, None], x, x + damping * r)
            nstep += ~stopped
            r = torch.where(stopped[:, None], r, rhs - op(x))
            rnorm = batched_norm(r)
        return LinearSolution(
            value=x, converged=rnorm <= tol, residual=rnorm, nstep=nstep, nmatvec=op.count
        )
