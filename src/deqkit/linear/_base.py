"""Common interface of the batched, matrix-free linear solvers.

Every solver in :mod:`deqkit.linear` solves ``B`` independent systems ``A_b x_b = r_b`` at once.
The operator is given only through ``matvec``, a function mapping a ``(B, D)`` tensor to a
``(B, D)`` tensor row by row (row ``b`` of the output depends only on row ``b`` of the input).
In deqkit the operator is usually ``I - J_f^T`` (the implicit backward system) or ``I - J_f``
(a Newton step), applied with one vector-Jacobian or Jacobian-vector product per call.

Stopping is per sample: sample ``b`` has converged when
``||r_b - A_b x_b||_2 <= atol + rtol * ||r_b||_2``.  Converged samples stop changing.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]


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


def _check_tolerances(name: str, rtol: float, atol: float, max_steps: int) -> None:
    for arg, value in (("rtol", rtol), ("atol", atol)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not 0 <= value < float("inf"):
            raise ValueError(
                f"{name}: `{arg}` must be a finite number >= 0, got {value!r}. "
                f"Pass e.g. {arg}=1e-6."
            )
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
        raise ValueError(
            f"{name}: `max_steps` must be a positive int, got {max_steps!r}. "
            "Pass e.g. max_steps=100."
        )
    if rtol == 0 and atol == 0:
        # Allowed (runs exactly max_steps iterations), but say so in the docs of each solver.
        pass


class AbstractLinearSolver(abc.ABC):
    """Base class of the batched linear solvers.

    Subclasses are small frozen dataclasses holding ``rtol``, ``atol`` and ``max_steps``
    and implement :meth:`solve`.

    Example:
        >>> import dataclasses, torch, deqkit as dk
        >>> @dataclasses.dataclass(frozen=True)
        ... class Richardson(dk.AbstractLinearSolver):  # x <- x + (b - A x)
        ...     rtol: float = 1e-10
        ...     atol: float = 0.0
        ...     max_steps: int = 100
        ...     def solve(self, matvec, rhs, x0=None):
        ...         x = torch.zeros_like(rhs) if x0 is None else x0
        ...         for _ in range(self.max_steps):
        ...             x = x + (rhs - matvec(x))
        ...         res = torch.linalg.vector_norm(rhs - matvec(x), dim=1)
        ...         ok = res <= self.atol + self.rtol * torch.linalg.vector_norm(rhs, dim=1)
        ...         nstep = torch.full(ok.shape, self.max_steps)
        ...         return dk.LinearSolution(x, ok, res, nstep, self.max_steps + 1)
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

    @abc.abstractmethod
    def solve(self, matvec: MatVec, rhs: Tensor, x0: Tensor | None = None) -> LinearSolution:
        """Solve ``A x = rhs`` for each row of ``rhs`` (shape ``(B, D)``)."""


def _check_rhs(name: str, rhs: Tensor, x0: Tensor | None) -> None:
    if not isinstance(rhs, Tensor) or rhs.dim() != 2:
        got = tuple(rhs.shape) if isinstance(rhs, Tensor) else type(rhs).__name__
        raise ValueError(f"{name}.solve: `rhs` must be a (B, D) tensor, got {got}.")
    if x0 is not None and (not isinstance(x0, Tensor) or x0.shape != rhs.shape):
        raise ValueError(
            f"{name}.solve: `x0` must have the shape of `rhs` {tuple(rhs.shape)}, "
            f"got {tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__}."
        )


def batched_norm(x: Tensor) -> Tensor:
    """Per-row Euclidean norm of a ``(B, D)`` tensor."""
    return torch.linalg.vector_norm(x, dim=1)


def _check_floating(name: str, rhs: Tensor) -> None:
    if not rhs.dtype.is_floating_point:
        raise ValueError(
            f"{name}.solve: `rhs` must be a real floating-point tensor (float32 or float64), "
            f"got dtype {rhs.dtype}. Convert it first, e.g. rhs.double()."
        )


def _tolerance(rhs: Tensor, rtol: float, atol: float) -> tuple[Tensor, Tensor]:
    """Return ``(||rhs_b||, atol + rtol * ||rhs_b||)`` per sample."""
    bnorm = batched_norm(rhs)
    return bnorm, bnorm * rtol + atol


def _initial_guess(rhs: Tensor, x0: Tensor | None) -> Tensor:
    if x0 is None:
        return torch.zeros_like(rhs)
    return x0.detach().to(dtype=rhs.dtype, device=rhs.device).clone()


class _Operator:
    """Wraps a user ``matvec``: counts calls, checks shapes, detaches the output.

    The solvers run their own arithmetic under ``torch.no_grad()``; the user's ``matvec`` is
    called in the grad mode that was active when ``solve`` was entered, because it may build
    or differentiate a graph itself (e.g. a VJP through ``torch.autograd.grad``).
    """

    __slots__ = ("count", "fn", "grad_enabled", "name", "shape")

    def __init__(self, name: str, fn: MatVec, rhs: Tensor) -> None:
        if not callable(fn):
            raise ValueError(
                f"{name}.solve: `matvec` must be a callable mapping a (B, D) tensor to a "
                f"(B, D) tensor, got {type(fn).__name__}."
            )
        self.name = name
        self.fn = fn
        self.count = 0
        self.grad_enabled = torch.is_grad_enabled()
        self.shape = rhs.shape

    def __call__(self, v: Tensor) -> Tensor:
        with torch.set_grad_enabled(self.grad_enabled):
            out = self.fn(v)
        self.count += 1
        if not isinstance(out, Tensor) or out.shape != self.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"{self.name}.solve: `matvec` must return a tensor of the shape of `rhs` "
                f"{tuple(self.shape)}, got {got}."
            )
        out = out.detach()
        return out if out.dtype == v.dtype else out.to(v.dtype)
