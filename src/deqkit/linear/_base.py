"""The solve template shared by the batched, matrix-free linear solvers.

Every solver in :mod:`deqkit.linear` solves ``B`` independent systems ``A_b x_b = r_b`` at once.
The operator is an :class:`~deqkit.linear.AbstractLinearOperator` or a plain ``matvec``
function mapping a ``(B, D)`` tensor to a ``(B, D)`` tensor row by row (row ``b`` of the output
depends only on row ``b`` of the input).  In deqkit the operator is usually ``I - J_f^T`` (the
implicit backward system) or ``I - J_f`` (a Newton step), applied with one vector-Jacobian or
Jacobian-vector product per call.

:class:`AbstractLinearSolver` owns the checks, the operator wrapping, the grad mode and the
matvec count (``solve = init + compute``); a solver implements only ``prepare`` (per-operator
work, e.g. a factorisation) and ``run`` (one right-hand side).

Stopping is per sample: sample ``b`` has converged when
``||r_b - A_b x_b||_2 <= atol + rtol * ||r_b||_2``.  Converged samples stop changing.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import torch
from torch import Tensor

from ._operator import AbstractLinearOperator, FunctionOperator, MatVec


@dataclasses.dataclass
class LinearSolution:
    """Result of a batched linear solve.

    Attributes:
        value: the solution ``x``, shape ``(B, D)``.
        converged: ``(B,)`` bool, whether each sample met its tolerance.
        residual: ``(B,)`` true or estimated residual norm ``||r - A x||_2`` per sample.
        nstep: ``(B,)`` int64, iterations each sample used before it stopped.
        nmatvec: total number of batched ``matvec`` calls.

    Example:
        >>> import torch, deqkit as dk
        >>> A = torch.tensor([[2.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
        >>> rhs = torch.ones(3, 2, dtype=torch.float64)  # three systems A x = (1, 1)
        >>> sol = dk.GMRES(rtol=1e-12).solve(lambda v: v @ A.T, rhs)
        >>> sol.value[0], sol.converged.tolist(), sol.all_converged
        (tensor([0.5000, 0.2500], dtype=torch.float64), [True, True, True], True)
    """

    value: Tensor
    converged: Tensor
    residual: Tensor
    nstep: Tensor
    nmatvec: int

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())


class AbstractLinearSolver(abc.ABC):
    """Base class of the batched linear solvers: one ``solve`` template, two hooks.

    Subclasses are small frozen dataclasses holding ``rtol``, ``atol`` and ``max_steps``. The
    base class runs every solve the same way (after lineax's ``init``/``compute`` split):

    - :meth:`solve` ``(matvec, rhs, x0=None)``: checks ``rhs`` and ``x0``, wraps a plain
      ``matvec`` callable into a :class:`~deqkit.linear.FunctionOperator`, then
      ``compute(init(operator), rhs, x0)``;
    - :meth:`init` ``(operator)``: the per-operator work (the :meth:`prepare` hook, e.g.
      :class:`~deqkit.linear.Dense` assembles and LU-factorises the matrices once), returned
      as a :class:`LinearSolverState` that serves any number of right-hand sides;
    - :meth:`compute` ``(state, rhs, x0=None)``: one right-hand side (the :meth:`run` hook).

    The hooks receive the operator wrapped so that each product is counted (``op.count``),
    shape-checked, detached and computed in the grad mode of the caller of ``init``/``compute``
    (a product may itself differentiate a graph, e.g. a VJP); the solver's own arithmetic runs
    under ``torch.no_grad()``.  A subclass that overrides :meth:`solve` instead (the interface
    before ``init``/``compute`` existed) keeps working, also when given an operator, since
    operators are callable.

    Example:
        >>> import dataclasses, torch, deqkit as dk
        >>> @dataclasses.dataclass(frozen=True)
        ... class Richardson(dk.AbstractLinearSolver):  # x <- x + (b - A x)
        ...     rtol: float = 1e-10
        ...     atol: float = 0.0
        ...     max_steps: int = 100
        ...     def run(self, op, prepared, rhs, x0):
        ...         x = torch.zeros_like(rhs) if x0 is None else x0
        ...         for _ in range(self.max_steps):
        ...             x = x + (rhs - op(x))
        ...         res = torch.linalg.vector_norm(rhs - op(x), dim=1)
        ...         ok = res <= self.atol + self.rtol * torch.linalg.vector_norm(rhs, dim=1)
        ...         nstep = torch.full(ok.shape, self.max_steps)
        ...         return dk.LinearSolution(x, ok, res, nstep, op.count)
        >>> x = torch.ones(2, 3, dtype=torch.float64, requires_grad=True)
        >>> sol = dk.fixed_point(lambda z: 0.5 * z + x, torch.zeros(2, 3, dtype=torch.float64),
        ...                      adjoint=dk.ImplicitAdjoint(Richardson()))
        >>> sol.value.sum().backward()
        >>> x.grad  # (1 - 0.5)^{-1} = 2
        tensor([[2., 2., 2.],
                [2., 2., 2.]], dtype=torch.float64)
    """

    rtol: float
    atol: float
    max_steps: int

    def solve(self, matvec: AbstractLinearOperator | MatVec, rhs: Tensor,
              x0: Tensor | None = None) -> LinearSolution:
        """Solve ``A x = rhs`` for each row of ``rhs`` (shape ``(B, D)``).

        ``matvec`` is the operator: an :class:`~deqkit.linear.AbstractLinearOperator` or a
        callable ``v -> A v``; ``x0`` an optional initial guess of the shape of ``rhs``.
        ``nmatvec`` of the result counts the products of the per-operator and the
        per-vector work together.
        """
        name = type(self).__name__
        _check_rhs(f"{name}.solve", rhs, x0)
        state = self.init(_as_operator(name, matvec, rhs))
        sol = self.compute(state, rhs, x0)
        return dataclasses.replace(sol, nmatvec=state.nmatvec + sol.nmatvec)

    def init(self, operator: AbstractLinearOperator) -> LinearSolverState:
        """Do the per-operator work once; pass the state to :meth:`compute` for each ``rhs``."""
        name = type(self).__name__
        if not isinstance(operator, AbstractLinearOperator):
            raise TypeError(
                f"{name}.init: `operator` must be a deqkit linear operator, got "
                f"{type(operator).__name__}. Wrap a function as FunctionOperator(matvec, like=rhs) "
                "or a (B, D, D) matrix as MatrixOperator(matrix)."
            )
        op = _Counted(name, operator)
        with torch.no_grad():
            prepared = self.prepare(op)
        return LinearSolverState(operator=operator, prepared=prepared, nmatvec=op.count)

    def compute(self, state: LinearSolverState, rhs: Tensor,
                x0: Tensor | None = None) -> LinearSolution:
        """Solve for one ``rhs`` with the operator prepared by :meth:`init`."""
        name = type(self).__name__
        _check_rhs(f"{name}.compute", rhs, x0)
        if tuple(rhs.shape) != tuple(state.operator.shape):
            raise ValueError(
                f"{name}.compute: `rhs` must have the shape of the operator's vectors "
                f"{tuple(state.operator.shape)}, got {tuple(rhs.shape)}."
            )
        op = _Counted(name, state.operator)
        with torch.no_grad():
            return self.run(op, state.prepared, rhs.detach(), x0)

    def prepare(self, op: AbstractLinearOperator) -> Any:
        """Hook: per-operator work (no ``rhs`` yet). The default prepares nothing."""
        return None

    def run(self, op: AbstractLinearOperator, prepared: Any, rhs: Tensor,
            x0: Tensor | None) -> LinearSolution:
        """Hook: the algorithm, for one detached ``rhs`` under ``torch.no_grad()``.

        ``op(v)`` applies the (counted) operator, ``prepared`` is what :meth:`prepare`
        returned, ``x0`` the caller's initial guess or ``None``; report ``op.count``
        as ``nmatvec``.
        """
        raise NotImplementedError(
            f"{type(self).__name__}: a linear solver implements `run(op, prepared, rhs, x0)` "
            "(and optionally `prepare(op)`), or overrides `solve(matvec, rhs, x0)`."
        )


@dataclasses.dataclass(frozen=True)
class LinearSolverState:
    """What :meth:`AbstractLinearSolver.init` prepared for one operator.

    Attributes:
        operator: the operator (as given to ``init``).
        prepared: the solver's per-operator data (``None`` for the iterative solvers; the
            matrices and their LU factors for :class:`~deqkit.linear.Dense`).
        nmatvec: the operator products ``init`` spent.

    Example:
        >>> import torch
        >>> from deqkit.linear import Dense, MatrixOperator
        >>> A = MatrixOperator(torch.diag(torch.tensor([2.0, 4.0], dtype=torch.float64))[None])
        >>> solver = Dense()
        >>> state = solver.init(A)  # assembles and factorises once ...
        >>> b = torch.ones(1, 2, dtype=torch.float64)
        >>> [solver.compute(state, rhs).value.tolist() for rhs in (b, 2 * b)]  # ... reused
        [[[0.5, 0.25]], [[1.0, 0.5]]]
        >>> state.nmatvec
        2
    """

    operator: AbstractLinearOperator
    prepared: Any
    nmatvec: int


def _as_operator(name: str, operator: object, rhs: Tensor) -> AbstractLinearOperator:
    if isinstance(operator, AbstractLinearOperator):
        return operator
    if not callable(operator):
        raise ValueError(
            f"{name}.solve: `matvec` must be a callable mapping a (B, D) tensor to a "
            f"(B, D) tensor, or a deqkit linear operator, got {type(operator).__name__}."
        )
    return FunctionOperator(operator, like=rhs)


def _check_rhs(where: str, rhs: Tensor, x0: Tensor | None) -> None:
    if not isinstance(rhs, Tensor) or rhs.dim() != 2:
        got = tuple(rhs.shape) if isinstance(rhs, Tensor) else type(rhs).__name__
        raise ValueError(f"{where}: `rhs` must be a (B, D) tensor, got {got}.")
    if not rhs.dtype.is_floating_point:
        raise ValueError(
            f"{where}: `rhs` must be a real floating-point tensor (float32 or float64), "
            f"got dtype {rhs.dtype}. Convert it first, e.g. rhs.double()."
        )
    if x0 is not None and (not isinstance(x0, Tensor) or x0.shape != rhs.shape):
        raise ValueError(
            f"{where}: `x0` must have the shape of `rhs` {tuple(rhs.shape)}, "
            f"got {tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__}."
        )


def batched_norm(x: Tensor) -> Tensor:
    """Per-row Euclidean norm of a ``(B, D)`` tensor."""
    return torch.linalg.vector_norm(x, dim=1)


def _tolerance(rhs: Tensor, rtol: float, atol: float) -> tuple[Tensor, Tensor]:
    """Return ``(||rhs_b||, atol + rtol * ||rhs_b||)`` per sample."""
    bnorm = batched_norm(rhs)
    return bnorm, bnorm * rtol + atol


def _initial_guess(rhs: Tensor, x0: Tensor | None) -> Tensor:
    if x0 is None:
        return torch.zeros_like(rhs)
    return x0.detach().to(dtype=rhs.dtype, device=rhs.device).clone()


class _Counted(AbstractLinearOperator):
    """An operator as a solver applies it: counts products, checks shapes, detaches.

    The solvers run their own arithmetic under ``torch.no_grad()``; the operator is applied in
    the grad mode that was active when ``init``/``compute`` was entered, because it may build
    or differentiate a graph itself (e.g. a VJP through ``torch.autograd.grad``).
    """

    def __init__(self, name: str, operator: AbstractLinearOperator) -> None:
        self.name, self.operator = name, operator
        self.count = 0
        self.grad_enabled = torch.is_grad_enabled()

    shape = property(lambda self: self.operator.shape)
    dtype = property(lambda self: self.operator.dtype)
    device = property(lambda self: self.operator.device)

    def mv(self, v: Tensor) -> Tensor:
        with torch.set_grad_enabled(self.grad_enabled):
            out = self.operator.mv(v)
        self.count += 1
        if not isinstance(out, Tensor) or out.shape != v.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"{self.name}.solve: `matvec` must return a tensor of the shape of `rhs` "
                f"{tuple(v.shape)}, got {got}."
            )
        out = out.detach()
        return out if out.dtype == v.dtype else out.to(v.dtype)
