"""Dense direct solve: the exact reference for small systems."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ._base import (
    AbstractLinearSolver,
    LinearSolution,
    MatVec,
    _check_floating,
    _check_rhs,
    _check_tolerances,
    _initial_guess,
    _Operator,
    _tolerance,
    batched_norm,
)


@dataclasses.dataclass(frozen=True)
class Dense(AbstractLinearSolver):
    r"""Materialise each sample's matrix and solve it directly.

    The ``D x D`` matrix of every sample is assembled column by column,
    :math:`A_b e_j = \text{matvec}(e_j)_b`, with ``D`` batched ``matvec`` calls on unit
    vectors, and the systems are solved with :func:`torch.linalg.solve` (LU with partial
    pivoting) in the dtype of ``rhs``.  Singular samples fall back to the minimum-norm
    least-squares solution :math:`A_b^+ r_b` (and are reported as not converged unless that
    solves the system).  The residual :math:`\|r_b - A_b x_b\|_2` is computed from the dense
    matrix; ``rtol`` and ``atol`` are only used to report ``converged``.  If ``x0`` is given,
    samples whose ``x0`` already meets the tolerance keep it and report ``nstep = 0`` (as do
    samples with a zero right-hand side); the others report ``nstep = 1``.

    Cost: ``D`` matvecs, ``O(B D^2)`` memory and ``O(B D^3)`` time, so this is a reference for
    tests and small problems, not for training.

    Args:
        rtol: relative tolerance used for ``converged``, default ``1e-6``.
        atol: absolute tolerance used for ``converged``, default ``1e-8``.
        max_steps: unused (kept for a uniform interface), default ``100``.
        max_size: largest allowed ``D``, default ``4096``; larger systems raise
            :class:`ValueError`.

    Reference: the direct solve of the implicit-function-theorem system (I - J^T) u = g, as in
        Bai, Kolter, Koltun (2019), "Deep Equilibrium Models"; LU factorisation via
        torch.linalg.solve (Golub & Van Loan, "Matrix Computations", ch. 3).

    Example:
        >>> import torch
        >>> from deqkit.linear import Dense
        >>> d = torch.tensor([[1.0, 2.0, 4.0]], dtype=torch.float64)
        >>> sol = Dense().solve(lambda v: d * v, torch.ones(1, 3, dtype=torch.float64))
        >>> sol.value
        tensor([[1.0000, 0.5000, 0.2500]], dtype=torch.float64)
        >>> sol.nmatvec
        3
    """

    rtol: float = 1e-6
    atol: float = 1e-8
    max_steps: int = 100
    max_size: int = 4096

    def __post_init__(self) -> None:
        _check_tolerances("Dense", self.rtol, self.atol, self.max_steps)
        n = self.max_size
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(
                f"Dense: `max_size` must be a positive int, got {n!r}. Pass e.g. max_size=4096."
            )

    def solve(self, matvec: MatVec, rhs: Tensor, x0: Tensor | None = None) -> LinearSolution:
        """Solve ``A x = rhs`` row by row; see the class docstring."""
        _check_rhs("Dense", rhs, x0)
        _check_floating("Dense", rhs)
        size = rhs.shape[1]
        if size > self.max_size:
            raise ValueError(
                f"Dense: the system size D={size} exceeds `max_size`={self.max_size} "
                f"(the matrices would need {rhs.shape[0]}x{size}x{size} entries). Use an "
                f"iterative solver (GMRES, BiCGStab) or raise it, e.g. Dense(max_size={size})."
            )
        op = _Operator("Dense", matvec, rhs)
        with torch.no_grad():
            return self._solve(op, rhs.detach(), x0)

    def _solve(self, op: _Operator, rhs: Tensor, x0: Tensor | None) -> LinearSolution:
        _, tol = _tolerance(rhs, self.rtol, self.atol)
        A = _assemble(op, rhs)
        x_init = _initial_guess(rhs, x0)
        r_init = rhs - _bmv(A, x_init)
        keep = batched_norm(r_init) <= tol
        x, info = torch.linalg.solve_ex(A, rhs)
        bad = info != 0
        if bool(bad.any()):
            x = torch.where(bad[:, None], _bmv(torch.linalg.pinv(A), rhs), x)
        x = torch.where(keep[:, None], x_init, x)
        res = batched_norm(rhs - _bmv(A, x))
        nstep = (~keep).to(torch.int64)
        return LinearSolution(
            value=x, converged=res <= tol, residual=res, nstep=nstep, nmatvec=op.count
        )


def _assemble(matvec: MatVec, rhs: Tensor) -> Tensor:
    """The ``(B, D, D)`` matrices of ``matvec``, built from ``D`` calls on unit vectors."""
    B, D = rhs.shape
    A = rhs.new_empty(B, D, D)
    e = torch.zeros_like(rhs)
    for j in range(D):
        e[:, j] = 1.0
        A[:, :, j] = matvec(e.clone())  # clone: matvec may return (a view of) its input
        e[:, j] = 0.0
    return A


def _bmv(A: Tensor, x: Tensor) -> Tensor:
    return torch.bmm(A, x.unsqueeze(2)).squeeze(2)
