"""Adjoints: how gradients flow through an equilibrium."""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

FlatFn = Callable[..., Tensor]


class AbstractAdjoint(abc.ABC):
    """Base class of the adjoints.

    ``apply(fn, z_star, args, backward_stats)`` receives the solver's equilibrium
    ``z_star`` (a detached ``(B, D)`` tensor), the flat map ``fn(z, *args)`` and returns a
    ``(B, D)`` tensor equal in value to ``z_star`` whose autograd graph defines the gradient.
    ``backward_stats`` is a dict the adjoint may fill when its backward pass runs.
    Adjoints with ``unrolled = True`` are not applied: the driver loop itself runs under
    autograd instead.

    Example:
        >>> import torch, deqkit as dk
        >>> class OneStep(dk.AbstractAdjoint):  # Jacobian-free backpropagation, written by hand
        ...     forward_nfev = 1
        ...     def apply(self, fn, z_star, args, backward_stats):
        ...         with torch.enable_grad():
        ...             fz = fn(z_star, *args)
        ...         return z_star + (fz - fz.detach())  # value z*, gradient of one f step
        >>> x = torch.ones(1, 2, dtype=torch.float64, requires_grad=True)
        >>> sol = dk.fixed_point(lambda z: 0.5 * z + x, torch.zeros(1, 2, dtype=torch.float64),
        ...                      adjoint=OneStep())
        >>> sol.value.sum().backward()
        >>> x.grad  # df/dx = 1; the implicit gradient would be 1 / (1 - 0.5) = 2
        tensor([[1., 1.]], dtype=torch.float64)
    """

    #: When True the forward solve is recorded by autograd (ordinary backprop).
    unrolled: bool = False
    #: Extra evaluations of f made by :meth:`apply` (counted in ``stats["nfev"]``).
    forward_nfev: int = 0
    #: Adjoints whose :meth:`apply` is one evaluation of ``f`` at ``z_star`` with a graph
    #: followed by :meth:`apply_evaluated` set this to ``"params"`` (graph into what ``f``
    #: closes over) or ``"z"`` (``z_star`` also a leaf requiring grad). The driver then makes
    #: its evaluation at the step budget under autograd, and when every returned value is that
    #: last iterate :meth:`apply_evaluated` receives it instead of ``f`` being evaluated again.
    reuse_eval: str | None = None

    @abc.abstractmethod
    def apply(
        self, fn: FlatFn, z_star: Tensor, args: tuple[Any, ...], backward_stats: dict[str, Any]
    ) -> Tensor:
        """Attach the gradient to ``z_star``."""

    def apply_evaluated(
        self, z_in: Tensor, fz: Tensor, backward_stats: dict[str, Any]
    ) -> Tensor:
        """:meth:`apply` given ``fz = f(z_in)`` already evaluated with a graph at
        ``z_in`` (equal in value to ``z_star``; a leaf requiring grad when
        ``reuse_eval == "z"``). Only called on adjoints that set :attr:`reuse_eval`."""
        raise NotImplementedError(f"{type(self).__name__} does not set `reuse_eval`.")


class HigherOrderError(RuntimeError):
    """A higher-order derivative (``create_graph=True``) was asked through an adjoint whose
    backward pass is not itself differentiated correctly.

    Example:
        >>> import torch, deqkit as dk
        >>> x = torch.ones(1, 2, dtype=torch.float64, requires_grad=True)
        >>> sol = dk.fixed_point(lambda z: 0.5 * torch.tanh(z) + x,
        ...                      torch.zeros(1, 2, dtype=torch.float64))
        >>> try:
        ...     torch.autograd.grad(sol.value.sum(), x, create_graph=True)
        ... except dk.HigherOrderError as err:
        ...     print(type(err).__name__)
        HigherOrderError
    """


def refuse_higher_order(adjoint: str) -> None:
    """Raise :class:`HigherOrderError` when called in a backward pass that records a graph."""
    if torch.is_grad_enabled():
        raise HigherOrderError(
            f"{adjoint}: higher-order derivatives through an equilibrium are not implemented "
            "for this adjoint (its backward pass is not differentiated correctly, so a second "
            "derivative would be wrong, not just inexact). Use dk.UnrolledAdjoint() (exact "
            "derivatives of the unrolled solver iterations, any order; memory grows with the "
            "steps), or call backward/autograd.grad without create_graph=True."
        )


class _FirstOrder(torch.autograd.Function):
    """Identity whose backward refuses to be recorded (``create_graph=True``)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, name: str) -> Tensor:  # type: ignore[override]
        ctx.name = name
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        refuse_higher_order(ctx.name)
        return grad, None


def first_order(x: Tensor, adjoint: Any) -> Tensor:
    """``x`` unchanged, but differentiating its gradient again raises
    :class:`HigherOrderError` (naming ``adjoint``) instead of returning a wrong number."""
    if not x.requires_grad:
        return x
    return _FirstOrder.apply(x, type(adjoint).__name__)


def finite_rows(t: Tensor) -> Tensor | None:
    """``None`` when every entry of the ``(B, D)`` tensor ``t`` is finite (one reduction and
    one host sync), else the ``(B,)`` mask of its rows that are entirely finite."""
    if bool(torch.isfinite(t.detach().sum())):
        return None
    return torch.isfinite(t.detach()).all(dim=1)


class _OneEvaluation(AbstractAdjoint):
    """Adjoints whose :meth:`apply` is one evaluation of ``f`` at ``z_star`` with a graph
    (with respect to ``z_star`` too when ``_z_graph``), then
    :meth:`apply_evaluated`; the driver may hand them its own last evaluation instead."""

    reuse_eval: str | None = "params"
    #: evaluate f at a ``z_star`` that requires grad (the implicit adjoint's VJPs in z)
    _z_graph: bool = False

    def apply(
        self, fn: FlatFn, z_star: Tensor, args: tuple[Any, ...], backward_stats: dict[str, Any]
    ) -> Tensor:
        z = z_star.detach()
        if self._z_graph:
            z = z.requires_grad_()
        with torch.enable_grad():
            fz = fn(z, *args)
        return self.apply_evaluated(z, fz, backward_stats)

    @abc.abstractmethod
    def apply_evaluated(self, z_in: Tensor, fz: Tensor, backward_stats: dict[str, Any]) -> Tensor:
        """See :meth:`AbstractAdjoint.apply_evaluated`."""
