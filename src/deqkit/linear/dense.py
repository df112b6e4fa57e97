"""Dense direct solve: the exact reference for small systems."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .._checks import check_int, check_tolerances
from ._base import (
    AbstractLinearSolver,
    LinearSolution,
    _initial_guess,
    _tolerance,
    batched_norm,
)
from ._operator import AbstractLinearOperator


@dataclasses.dataclass(frozen=True)
class Dense(AbstractLinearSolver):
    r"""Materialise each sample's matrix and solve it directly.

    The ``D x D`` matrix of every sample is assembled column by column,
    :math:`A_b e_j = \text{matvec}(e_j)_b`, with ``D`` batched ``matvec`` calls on unit
    vectors, and LU-factorised with partial pivoting (:func:`torch.linalg.lu_factor_ex`) in
    the operator's dtype.  Both happen once per operator in :meth:`init`; each right-hand side
    then costs two triangular solves (:meth:`compute`; :meth:`solve` does both).  Singular
    samples fall back to the minimum-norm least-squares solution :math:`A_b^+ r_b` (and are
    reported as not converged unless that solves the system).  The residual
    :math:`\|r_b - A_b x_b\|_2` is computed from the dense matrix; ``rtol`` and ``atol`` are
    only used to report ``converged``.  If ``x0`` is given, samples whose ``x0`` already meets
    the tolerance keep it and report ``nstep = 0`` (as do samples with a zero right-hand side);
    the others report ``nstep = 1``.

    A ``preconditioner`` is accepted and ignored (the solve is exact; ``nprecond`` is 0); no
    ``inv_norm`` estimate (``None``).

    Cost: ``D`` matvecs, ``O(B D^2)`` memory and ``O(B D^3)`` time per operator, and
    ``O(B D^2)`` per right-hand side, so this is a reference for tests and small problems, not
    for training.

    Args:
        rtol: relative tolerance used for ``converged``, default ``1e-6``.
        atol: absolute tolerance used for ``converged``, default ``1e-8``.
        max_steps: unused (kept for a uniform interface), default ``100``.
        max_size: largest allowed ``D``, default ``4096``; larger systems raise
            :class:`ValueError`.

    Reference: the direct solve of the implicit-function-theorem system (I - J^T) u = g, as in
        Bai, Kolter, Koltun (2019), "Deep Equilibrium Models"; LU factorisation via
        torch.linalg.lu_factor_ex (Golub & Van Loan, "Matrix Computations", ch. 3).

    Example:
        >>> import torch
        >>> from deqkit.linear import Dense, FunctionOperator
        >>> d = torch.tensor([[1.0, 2.0, 4.0]], dtype=torch.float64)
        >>> sol = Dense().solve(lambda v: d * v, torch.ones(1, 3, dtype=torch.float64))
        >>> sol.value
        tensor([[1.0000, 0.5000, 0.2500]], dtype=torch.float64)
        >>> sol.nmatvec
        3
        >>> state = Dense().init(FunctionOperator(lambda v: d * v, like=d))  # factorise once
        >>> Dense().compute(state, 2 * torch.ones(1, 3, dtype=torch.float64)).value
        tensor([[2.0000, 1.0000, 0.5000]], dtype=torch.float64)
    """

    rtol: float = 1e-6
    atol: float = 1e-8
    max_steps: int = 100
    max_size: int = 4096

    def __post_init__(self) -> None:
        # rtol = atol = 0 is allowed: exactly max_steps iterations
        check_tolerances("Dense", self.rtol, self.atol, both_zero=True, example="1e-6")
        check_int("Dense", "max_steps", self.max_steps, example=100)
        check_int("Dense", "max_size", self.max_size, example=4096)

    def prepare(self, op: AbstractLinearOperator) -> _Factors:
        """Assemble the ``(B, D, D)`` matrices (``D`` products) and LU-factorise them, once."""
        batch, size = op.shape
        if size > self.max_size:
            raise ValueError(
                f"Dense: the system size D={size} exceeds `max_size`={self.max_size} "
                f"(the matrices would need {batch}x{size}x{size} entries). Use an "
                f"iterative solver (GMRES, BiCGStab) or raise it, e.g. Dense(max_size={size})."
            )
        A = op.as_matrix()
        lu, pivots, info = torch.linalg.lu_factor_ex(A)
        singular = info != 0
        pinv = torch.linalg.pinv(A) if bool(singular.any()) else None
        return _Factors(matrix=A, lu=lu, pivots=pivots, singular=singular, pinv=pinv)

    def run(self, op: AbstractLinearOperator, prepared: object, rhs: Tensor,
            x0: Tensor | None, preconditioner: AbstractLinearOperator | None = None
            ) -> LinearSolution:
        """Solve ``A x = rhs`` row by row with the factors; see the class docstring.

        A ``preconditioner`` is accepted and not applied (the solve is exact; ``nprecond``
        is 0)."""
        assert isinstance(prepared, _Factors)  # made by prepare()
        A = prepared.matrix
        if rhs.dtype != A.dtype:  # an operator of another dtype: solve in its dtype
            x0 = None if x0 is None else x0.to(A.dtype)
            sol = self.run(op, prepared, rhs.to(A.dtype), x0)
            return dataclasses.replace(
                sol, value=sol.value.to(rhs.dtype), residual=sol.residual.to(rhs.dtype)
            )
        _, tol = _tolerance(rhs, self.rtol, self.atol)
        x_init = _initial_guess(rhs, x0)
        keep = batched_norm(rhs - _bmv(A, x_init)) <= tol
        x = torch.linalg.lu_solve(prepared.lu, prepared.pivots, rhs.unsqueeze(2)).squeeze(2)
        if prepared.pinv is not None:
            x = torch.where(prepared.singular[:, None], _bmv(prepared.pinv, rhs), x)
        x = torch.where(keep[:, None], x_init, x)
        res = batched_norm(rhs - _bmv(A, x))
        nstep = (~keep).to(torch.int64)
        return LinearSolution(
            value=x, converged=res <= tol, residual=res, nstep=nstep, nmatvec=op.count
        )


@dataclasses.dataclass(frozen=True)
class _Factors:
    """Per-operator state of :class:`Dense`: the matrices and their LU factorisation."""

    matrix: Tensor  # (B, D, D)
    lu: Tensor
    pivots: Tensor
    singular: Tensor  # (B,) bool: exactly singular samples, solved by the pseudo-inverse
    pinv: Tensor | None  # (B, D, D) pseudo-inverses when some sample is singular


def _bmv(A: Tensor, x: Tensor) -> Tensor:
    return torch.bmm(A, x.unsqueeze(2)).squeeze(2)
