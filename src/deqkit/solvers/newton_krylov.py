"""Newton–Krylov: Newton's method with Jacobian-vector products and an inner GMRES."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from .._checks import check_int, check_tolerances
from ..linear import GMRES, AbstractLinearSolver, IdentityMinus, JacobianOperator
from ._base import AbstractFixedPointSolver, FlatFn
from ._linesearch import backtrack


@dataclasses.dataclass(frozen=True)
class NewtonKrylov(AbstractFixedPointSolver):
    r"""Inexact Newton's method on :math:`g(z) = f(z) - z = 0`, matrix-free.

    Each step solves the Newton system with an iterative linear solver whose matrix-vector
    products are Jacobian-vector products of f (forward-mode AD, ``torch.func.jvp``):

    .. math:: (I - J_f(z_k))\, \delta_k = f(z_k) - z_k, \qquad z_{k+1} = z_k + t_k \delta_k.

    Quadratic local convergence when the inner solve is tight; the inner tolerance
    (``linear_solver.rtol``) is the forcing term. Each inner iteration costs one JVP, which is
    counted as one evaluation of f in ``stats["nfev"]`` (a JVP costs about 1.5-3 times f).
    Every op in f must support forward-mode AD. A sample whose inner solve misses its
    tolerance and reduces the Newton residual by less than half takes a plain fixed-point step
    instead (safeguard against near-singular :math:`I - J` away from the solution).

    Args:
        rtol: relative tolerance. Default: 1e-5.
        atol: absolute tolerance. Default: 1e-7.
        linear_solver: inner solver. Default: ``GMRES(rtol=1e-3, atol=0, max_steps=30,
            restart=30)``.
        line_search: backtracking line search on :math:`\|g\|^2`. Default: True.
        max_halvings: maximum step halvings. Default: 4.

    Reference: Knoll & Keyes (2004), "Jacobian-free Newton–Krylov methods: a survey".

    Example:
        >>> import torch, deqkit as dk
        >>> b = torch.ones(2, 3, dtype=torch.float64)
        >>> sol = dk.fixed_point(lambda z: 0.9 * torch.tanh(z) + b, torch.zeros_like(b),
        ...                      solver=dk.NewtonKrylov(rtol=1e-12, atol=0), max_steps=20)
        >>> int(sol.stats["nstep"].max()) <= 6
        True
    """

    rtol: float = 1e-5
    atol: float = 1e-7
    linear_solver: AbstractLinearSolver = dataclasses.field(
        default_factory=lambda: GMRES(rtol=1e-3, atol=0.0, max_steps=30, restart=30)
    )
    line_search: bool = True
    max_halvings: int = 4
    supports_unrolled = False

    def __post_init__(self) -> None:
        check_tolerances("NewtonKrylov", self.rtol, self.atol)
        check_int("NewtonKrylov", "max_halvings", self.max_halvings, 0)
        if not isinstance(self.linear_solver, AbstractLinearSolver):
            raise TypeError(
                "NewtonKrylov: `linear_solver` must be a deqkit linear solver such as "
                f"dk.GMRES(), got {type(self.linear_solver).__name__}."
            )

    def step(
        self, fn: FlatFn, z: Tensor, fz: Tensor, r: Tensor, state: Any
    ) -> tuple[Tensor, Tensor | None, Any]:
        # (I - J) v with J v = torch.func.jvp(fn, (z,), (v,)): one call of fn per product.
        inner = self.linear_solver.solve(IdentityMinus(JacobianOperator(fn, z)), r)
        # Where the inner solve made little progress (I - J nearly singular, e.g. far from the
        # fixed point of a cell that is only locally contractive) its direction is unreliable:
        # take the fixed-point step delta = r = f(z) - z for that sample instead.
        rnorm = torch.linalg.vector_norm(r, dim=1)
        poor = (~inner.converged) & ~(inner.residual <= 0.5 * rnorm)
        delta = torch.where(poor.unsqueeze(1) | ~torch.isfinite(inner.value), r, inner.value)
        if self.line_search:
            z_next, fz_next = backtrack(fn, z, r, delta, self.max_halvings)
            return z_next, fz_next, state
        return z + delta, None, state
