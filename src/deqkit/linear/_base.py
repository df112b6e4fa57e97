"""The solve template shared by the batched, matrix-free linear solvers.

Every solver in :mod:`deqkit.linear` solves ``B`` independent systems ``A_b x_b = r_b`` at once.
The operator is an :class:`~deqkit.linear.AbstractLinearOperator` or a plain ``matvec``
function mapping a ``(B, D)`` tensor to a ``(B, D)`` tensor row by row (row ``b`` of the output
depends only on row ``b`` of the input).  In deqkit the operator is usually ``I - J_f^T`` (the
implicit backward system) or ``I - J_f`` (a Newton step), applied with one vector-Jacobian or
Jacobian-vector product per call.

:class:`AbstractLinearSolver` owns the checks, the operator wrapping, the grad mode and the
matvec count (``solve = init + compute``); a solver implements only ``prepare`` (per-operator
work, e.g. a factorisation) and ``run`` (one right-hand side, with an optional
preconditioner, whose applications the template counts as ``nprecond``).

Stopping is per sample: sample ``b`` has converged when
``||r_b - A_b x_b||_2 <= atol + rtol * ||r_b||_2``.  Converged samples stop changing.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from ._operator import AbstractLinearOperator, FunctionOperator, MatVec


@dataclasses.dataclass
class LinearSolution:
    r"""Result of a batched linear solve.

    Attributes:
        value: the solution ``x``, shape ``(B, D)``.
        converged: ``(B,)`` bool, whether each sample met its tolerance.
        residual: ``(B,)`` true or estimated residual norm ``||r - A x||_2`` per sample.
        nstep: ``(B,)`` int64, iterations each sample used before it stopped.
        nmatvec: total number of batched ``matvec`` calls (products with the operator; the
            preconditioner's products are not among them).
        nprecond: number of batched applications of the preconditioner (``0`` without one).
        inv_norm: ``(B,)`` an *estimate* of :math:`\|A_b^{-1}\|_2` per sample, for an
            a-posteriori error estimate :math:`\|x_b - A_b^{-1} r_b\| \le \|A_b^{-1}\|
            \,\|r_b - A_b x_b\|`, where the solver gets it cheaply (see each solver), NaN for
            a sample that took no step; ``None`` where the solver does not estimate it.

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
    nprecond: int = 0
    inv_norm: Tensor | None = None

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())


class AbstractLinearSolver(abc.ABC):
    """Base class of the batched linear solvers: one ``solve`` template, two hooks.

    Subclasses are small frozen dataclasses holding ``rtol``, ``atol`` and ``max_steps``. The
    base class runs every solve the same way (after lineax's ``init``/``compute`` split):

    - :meth:`solve` ``(matvec, rhs, x0=None, preconditioner=None)``: checks ``rhs`` and
      ``x0``, wraps a plain ``matvec`` callable into a
      :class:`~deqkit.linear.FunctionOperator`, then
      ``compute(init(operator), rhs, x0, preconditioner)``;
    - :meth:`init` ``(operator)``: the per-operator work (the :meth:`prepare` hook, e.g.
      :class:`~deqkit.linear.Dense` assembles and LU-factorises the matrices once), returned
      as a :class:`LinearSolverState` that serves any number of right-hand sides;
    - :meth:`compute` ``(state, rhs, x0=None, preconditioner=None)``: one right-hand side
      (the :meth:`run` hook), with an optional preconditioner :math:`P \approx A^{-1}`
      (checked, counted in ``nprecond``; each solver uses it its standard way).

    The hooks receive the operator wrapped so that each product is counted (``op.count``),
    shape-checked, detached and computed in the grad mode of the caller of ``init``/``compute``
    (a product may itself differentiate a graph, e.g. a VJP); the solver's own arithmetic runs
    under ``torch.no_grad()``.  A subclass that overrides :meth:`solve` instead (the interface
    before ``init``/``compute`` existed) keeps working, also when given an operator, since
    operators are callable.  So does a ``run(op, prepared, rhs, x0)`` hook without the
    ``preconditioner`` parameter; both refuse a preconditioner (``TypeError``) rather than
    ignore it, and report ``supports_preconditioner = False`` (inspected once per class).

    Example:
        >>> import dataclasses, torch, deqkit as dk
        >>> @dataclasses.dataclass(frozen=True)
        ... class Richardson(dk.AbstractLinearSolver):  # x <- x + P (b - A x)
        ...     rtol: float = 1e-10
        ...     atol: float = 0.0
        ...     max_steps: int = 100
        ...     def run(self, op, prepared, rhs, x0, preconditioner=None):
        ...         P = preconditioner or (lambda v: v)
        ...         x = torch.zeros_like(rhs) if x0 is None else x0
        ...         for _ in range(self.max_steps):
        ...             x = x + P(rhs - op(x))
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
        >>> b = torch.ones(1, 2, dtype=torch.float64)
        >>> sol = Richardson(max_steps=1).solve(lambda v: 4 * v, b, preconditioner=lambda v: v / 4)
        >>> sol.value.tolist(), sol.nmatvec, sol.nprecond  # exact P: one step
        ([[0.25, 0.25]], 2, 1)
    """

    rtol: float
    atol: float
    max_steps: int
    #: Whether :meth:`solve`/:meth:`compute` accept a ``preconditioner``: set per subclass
    #: from the signatures of its ``run`` (and of ``solve``, if it overrides it).
    supports_preconditioner: ClassVar[bool] = True
    _run_takes_preconditioner: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Inspected once per class: a hook written before preconditioners existed,
        # run(op, prepared, rhs, x0), or an override of solve(matvec, rhs, x0).
        own_solve = cls.__dict__.get("solve")
        if own_solve is not None and not _accepts_preconditioner(own_solve):
            cls.solve = _refusing_preconditioner(own_solve)  # type: ignore[method-assign]
        cls._run_takes_preconditioner = _accepts_preconditioner(cls.run)
        cls.supports_preconditioner = cls._run_takes_preconditioner and not getattr(
            cls.solve, "refuses_preconditioner", False)

    def solve(self, matvec: AbstractLinearOperator | MatVec, rhs: Tensor,
              x0: Tensor | None = None,
              preconditioner: AbstractLinearOperator | MatVec | None = None) -> LinearSolution:
        """Solve ``A x = rhs`` for each row of ``rhs`` (shape ``(B, D)``).

        ``matvec`` is the operator: an :class:`~deqkit.linear.AbstractLinearOperator` or a
        callable ``v -> A v``; ``x0`` an optional initial guess of the shape of ``rhs``;
        ``preconditioner`` an optional operator or callable ``v -> P v`` with
        :math:`P \approx A^{-1}` (each solver uses it its standard way; see :meth:`compute`).
        ``nmatvec`` of the result counts the products of the per-operator and the
        per-vector work together.
        """
        name = type(self).__name__
        _check_rhs(f"{name}.solve", rhs, x0)
        state = self.init(_as_operator(name, matvec, rhs))
        if preconditioner is None:  # (a subclass may override compute without the argument)
            sol = self.compute(state, rhs, x0)
        else:
            sol = self.compute(state, rhs, x0, preconditioner=preconditioner)
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

    def compute(self, state: LinearSolverState, rhs: Tensor, x0: Tensor | None = None,
                preconditioner: AbstractLinearOperator | MatVec | None = None) -> LinearSolution:
        """Solve for one ``rhs`` with the operator prepared by :meth:`init`.

        ``preconditioner`` (optional): an operator or a callable ``v -> P v`` on ``(B, D)``
        tensors, row by row, approximating :math:`A^{-1}`.  It is checked like the operator
        (shape of its products, an operator's ``shape``), applied in the caller's grad mode,
        detached, and counted in ``nprecond`` of the result (not in ``nmatvec``).  A solver
        whose ``run`` hook does not take a ``preconditioner`` refuses one (``TypeError``; see
        :attr:`supports_preconditioner`) rather than ignore it.
        """
        name = type(self).__name__
        _check_rhs(f"{name}.compute", rhs, x0)
        if tuple(rhs.shape) != tuple(state.operator.shape):
            raise ValueError(
                f"{name}.compute: `rhs` must have the shape of the operator's vectors "
                f"{tuple(state.operator.shape)}, got {tuple(rhs.shape)}."
            )
        op = _Counted(name, state.operator)
        if preconditioner is None:
            with torch.no_grad():
                if self._run_takes_preconditioner:
                    return self.run(op, state.prepared, rhs.detach(), x0, preconditioner=None)
                return self.run(op, state.prepared, rhs.detach(), x0)
        if not self._run_takes_preconditioner:
            raise TypeError(_no_preconditioner(name, "its `run(op, prepared, rhs, x0)` hook"))
        pc = _Counted(name, _as_preconditioner(name, preconditioner, rhs), "preconditioner")
        with torch.no_grad():
            sol = self.run(op, state.prepared, rhs.detach(), x0, preconditioner=pc)
        return dataclasses.replace(sol, nprecond=pc.count)

    def prepare(self, op: AbstractLinearOperator) -> Any:
        """Hook: per-operator work (no ``rhs`` yet). The default prepares nothing."""
        return None

    def run(self, op: AbstractLinearOperator, prepared: Any, rhs: Tensor,
            x0: Tensor | None, preconditioner: AbstractLinearOperator | None = None
            ) -> LinearSolution:
        """Hook: the algorithm, for one detached ``rhs`` under ``torch.no_grad()``.

        ``op(v)`` applies the (counted) operator, ``prepared`` is what :meth:`prepare`
        returned, ``x0`` the caller's initial guess or ``None``, ``preconditioner`` the
        (counted, checked) preconditioner or ``None``; report ``op.count`` as ``nmatvec``
        (the template fills in ``nprecond``).  A ``run`` without the ``preconditioner``
        parameter (the earlier hook) still works: the template then refuses preconditioners.
        """
        raise NotImplementedError(
            f"{type(self).__name__}: a linear solver implements `run(op, prepared, rhs, x0, "
            "preconditioner=None)` (and optionally `prepare(op)`), or overrides "
            "`solve(matvec, rhs, x0)`."
        )


def _accepts_preconditioner(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` has a ``preconditioner`` parameter (or ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature (a builtin): assume the earlier interface
        return False
    return any(p.name == "preconditioner" or p.kind is p.VAR_KEYWORD for p in params)


def _no_preconditioner(name: str, what: str) -> str:
    return (
        f"{name}: got a `preconditioner`, but {what} does not take one (it was written before "
        "preconditioners existed), and it would be ignored. Add a `preconditioner=None` "
        "parameter to the solver and use it, pass none, or check "
        "`solver.supports_preconditioner` first."
    )


def _refusing_preconditioner(solve: Callable[..., LinearSolution]) -> Callable[..., LinearSolution]:
    """Wrap an earlier ``solve(matvec, rhs, x0)`` override: refuse a preconditioner."""

    @functools.wraps(solve)
    def wrapper(self: AbstractLinearSolver, *args: Any, preconditioner: Any = None,
                **kwargs: Any) -> LinearSolution:
        if preconditioner is not None:
            raise TypeError(_no_preconditioner(type(self).__name__, "its `solve` override"))
        return solve(self, *args, **kwargs)

    wrapper.refuses_preconditioner = True  # type: ignore[attr-defined]
    return wrapper


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


def _as_preconditioner(name: str, pc: object, rhs: Tensor) -> AbstractLinearOperator:
    if isinstance(pc, AbstractLinearOperator):
        if tuple(pc.shape) != tuple(rhs.shape):
            raise ValueError(
                f"{name}.solve: `preconditioner` must act on vectors of the shape of `rhs` "
                f"{tuple(rhs.shape)}, got an operator of shape {tuple(pc.shape)}."
            )
        return pc
    if not callable(pc):
        raise ValueError(
            f"{name}.solve: `preconditioner` must be a deqkit linear operator or a callable "
            f"v -> P v mapping a (B, D) tensor to a (B, D) tensor, got {type(pc).__name__}."
        )
    return FunctionOperator(pc, like=rhs)


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


def known_norm(op: AbstractLinearOperator | None) -> Tensor | None:
    """``||op_b||_2`` per sample where the operator gives it cheaply (a ``norm()`` method,
    e.g. :class:`~deqkit.linear.LowRankUpdate`), else ``None``; sees through the counting
    wrapper."""
    inner = op.operator if isinstance(op, _Counted) else op
    norm = getattr(inner, "norm", None)
    return norm() if callable(norm) else None


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

    def __init__(self, name: str, operator: AbstractLinearOperator,
                 what: str = "matvec") -> None:
        self.name, self.operator, self.what = name, operator, what
        self.count = 0
        self.grad_enabled = torch.is_grad_enabled()

    shape = property(lambda self: self.operator.shape)
    dtype = property(lambda self: self.operator.dtype)
    device = property(lambda self: self.operator.device)

    def mv(self, v: Tensor) -> Tensor:
        with torch.set_grad_enabled(self.grad_enabled):
            out = self.operator.mv(v)
        self.count += 1
        if not isinstance(out, Tensor) or out.shape != v.shape or not out.is_floating_point():
            got = f"{out.dtype} {tuple(out.shape)}" if isinstance(out, Tensor) \
                else type(out).__name__
            raise ValueError(
                f"{self.name}.solve: `{self.what}` must return a floating-point tensor of the "
                f"shape of `rhs` {tuple(v.shape)}, got {got}."
            )
        out = out.detach()
        return out if out.dtype == v.dtype else out.to(v.dtype)
