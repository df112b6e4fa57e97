"""Adjoints: how gradients flow through an equilibrium."""

from __future__ import annotations

import abc
import warnings
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import torch
import torch.autograd.forward_ad as fwad
from torch import Tensor

FlatFn = Callable[..., Tensor]


class Primal(Protocol):
    """What an adjoint receives: the forward solve, ready to run (see ``deqkit._primal``).

    ``run(graph=None, unrolled=False)`` runs the solve and returns its output (``.value``:
    the ``(B, D)`` solution, detached unless ``unrolled``; ``.last_eval``: ``(z, f(z))`` of the
    last evaluation under autograd when ``graph`` was asked and every returned value is that
    iterate, else None; ``.inverse``: with ``keep_inverse=True``, the solver's estimate
    ``(U, V)`` of ``(I - J)^{-1} = I + U V^T``, or None). ``evaluate(z, leaf=False)``
    returns ``(z_in, f(z_in))`` under autograd; ``f(z)`` applies f; ``args`` are the call's
    per-sample inputs; ``adjoint_cache`` is the call's ``(cache, ids)`` or None;
    ``differentiable`` says whether gradients were enabled for the call;
    ``solver`` is the forward solver; ``supports_unrolled`` whether the solver's steps are
    differentiable by autograd. Every evaluation is counted in the solution's ``nfev``.
    """

    differentiable: bool
    supports_unrolled: bool
    args: tuple[Any, ...]
    solver: Any
    adjoint_cache: tuple[Any, Tensor] | None

    def run(self, *, graph: str | None = None, unrolled: bool = False,
            keep_inverse: bool = False) -> Any: ...

    def evaluate(self, z: Tensor, *, leaf: bool = False) -> tuple[Tensor, Tensor]: ...

    def f(self, z: Tensor, *args: Any) -> Tensor: ...


class AbstractAdjoint:
    """Base class of the adjoints: each decides how the forward solve is run and how its
    result is differentiated.

    :meth:`solve` receives the :class:`Primal` (the problem, the solver and the loop, ready
    to run) and ``backward_stats``, a dict it may fill when its backward pass runs, and
    returns the ``(B, D)`` solution with the gradient it defines attached. The driver
    (:func:`deqkit.fixed_point`) only calls :meth:`solve`: a new gradient method is one
    subclass, without any change to the driver. When ``primal.differentiable`` is False (no
    gradients asked) an adjoint should just return ``primal.run().value``.

    Example (Jacobian-free backpropagation, written by hand; it reuses the solve's last
    evaluation when the solve ran to its budget, and evaluates f at z* otherwise):

        >>> import torch, deqkit as dk
        >>> class OneStep(dk.AbstractAdjoint):
        ...     def solve(self, primal, backward_stats):
        ...         out = primal.run(graph="params")
        ...         if not primal.differentiable:
        ...             return out.value
        ...         z, fz = out.last_eval or primal.evaluate(out.value)
        ...         return z.detach() + (fz - fz.detach())  # value z*, gradient of one f step
        >>> x = torch.ones(1, 2, dtype=torch.float64, requires_grad=True)
        >>> sol = dk.fixed_point(lambda z: 0.5 * z + x, torch.zeros(1, 2, dtype=torch.float64),
        ...                      adjoint=OneStep())
        >>> sol.value.sum().backward()
        >>> x.grad  # df/dx = 1; the implicit gradient would be 1 / (1 - 0.5) = 2
        tensor([[1., 1.]], dtype=torch.float64)
    """

    #: whether the adjoint starts its backward solve from stored adjoint vectors when
    #: :func:`~deqkit.fixed_point` gets ``adjoint_cache`` (others refuse the argument)
    uses_adjoint_cache: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A subclass written for the interface before `solve` (it defines `apply` only, maybe
        # over a built-in adjoint) keeps its `apply`: give it the compatible `solve`.
        if "apply" in vars(cls) and "solve" not in vars(cls):
            cls.solve = AbstractAdjoint._legacy_solve  # type: ignore[method-assign]

    def solve(self, primal: Primal, backward_stats: dict[str, Any]) -> Tensor:
        """Run the forward solve through ``primal`` and return its ``(B, D)`` solution with
        this adjoint's gradient attached."""
        raise TypeError(f"{type(self).__name__} must implement `solve(primal, stats)`.")

    def _legacy_solve(self, primal: Primal, backward_stats: dict[str, Any]) -> Tensor:
        """``solve`` for a subclass that implements the deprecated ``apply``."""
        warnings.warn(
            f"{type(self).__name__} implements the deprecated `apply(fn, z_star, args, stats)`;"
            " implement `solve(primal, backward_stats)` instead (see dk.AbstractAdjoint). "
            "`apply` keeps working for now.",
            DeprecationWarning,
            stacklevel=3,
        )
        z_star = primal.run().value
        if not primal.differentiable:
            return z_star

        def fn(z: Tensor, *args: Any) -> Tensor:  # counted through the primal
            return primal.f(z, *args)

        return self.apply(fn, z_star.detach(), primal.args, backward_stats)

    def apply(
        self, fn: FlatFn, z_star: Tensor, args: tuple[Any, ...], backward_stats: dict[str, Any]
    ) -> Tensor:
        """Deprecated: the adjoint interface before :meth:`solve` (it received the solved
        ``z_star`` and the flat map ``fn(z, *args)``). Override :meth:`solve` instead."""
        raise NotImplementedError


class HigherOrderError(RuntimeError):
    """A higher-order derivative (``create_graph=True``) was asked through an adjoint whose
    backward pass is not itself differentiated correctly (or, with
    :class:`~deqkit.ImplicitAdjoint`, through a map that closes over a tensor it cannot
    differentiate: computed outside f; pass it in ``args``).

    Example:
        >>> import torch, deqkit as dk
        >>> x = torch.ones(1, 2, dtype=torch.float64, requires_grad=True)
        >>> sol = dk.fixed_point(lambda z: 0.5 * torch.tanh(z) + x,
        ...                      torch.zeros(1, 2, dtype=torch.float64),
        ...                      adjoint=dk.JacobianFreeAdjoint())
        >>> try:
        ...     torch.autograd.grad(sol.value.sum(), x, create_graph=True)
        ... except dk.HigherOrderError as err:
        ...     print(type(err).__name__)
        HigherOrderError
    """


class UnsupportedTransformError(NotImplementedError):
    """A ``torch.func`` transform (``vmap``, ``grad``, ``vjp``, ``jvp``, ``jacrev``,
    ``jacfwd``, ``hessian``) was applied to a solve whose adjoint does not define its
    derivatives there: only :class:`~deqkit.ImplicitAdjoint` does. ``torch.autograd``
    (including ``forward_ad`` and ``create_graph=True``) works with every adjoint.

    Example:
        >>> import torch, deqkit as dk
        >>> def solve(x):
        ...     return dk.fixed_point(lambda z, x: 0.5 * z + x, torch.zeros_like(x), args=(x,),
        ...                           adjoint=dk.JacobianFreeAdjoint()).value.sum()
        >>> try:
        ...     torch.func.grad(solve)(torch.ones(1, 2))
        ... except dk.UnsupportedTransformError as err:
        ...     print(type(err).__name__)
        UnsupportedTransformError
    """


def refuse_higher_order(adjoint: str) -> None:
    """Raise :class:`HigherOrderError` when called in a backward pass that records a graph."""
    if torch.is_grad_enabled():
        raise HigherOrderError(
            f"{adjoint}: higher-order derivatives through an equilibrium are not defined for "
            "this adjoint (its gradient is an approximation whose own derivative would be "
            "wrong, not just inexact). Use dk.ImplicitAdjoint() (exact derivatives of any "
            "order: the backward solve is itself differentiated implicitly) or "
            "dk.UnrolledAdjoint() (exact derivatives of the unrolled solver iterations; "
            "memory grows with the steps), or call backward/autograd.grad without "
            "create_graph=True."
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


def has_tangent(t: Tensor) -> bool:
    """Whether ``t`` carries a forward-mode tangent (``torch.autograd.forward_ad``): the
    solve's inputs were dual tensors."""
    return fwad.unpack_dual(t).tangent is not None


def dual_level_active() -> bool:
    """Whether a ``torch.autograd.forward_ad.dual_level`` is open (True when unknown)."""
    return getattr(fwad, "_current_level", 0) >= 0


def finite_rows(t: Tensor) -> Tensor | None:
    """``None`` when every entry of the ``(B, D)`` tensor ``t`` is finite (one reduction and
    one host sync), else the ``(B,)`` mask of its rows that are entirely finite."""
    if bool(torch.isfinite(t.detach().sum())):
        return None
    return torch.isfinite(t.detach()).all(dim=1)


def gradient_of(fz: Tensor) -> Tensor:
    """``fz - fz.detach()``: zero, carrying ``fz``'s gradient; zero without a gradient in the
    rows where ``fz`` is not finite (those samples keep their last finite iterate as value:
    their gradient is not defined, and the parameters' gradients may then be non-finite)."""
    d = fz - fz.detach()
    ok = finite_rows(fz)
    return d if ok is None else torch.where(ok.unsqueeze(1), d, 0.0)


class OneEvaluation(AbstractAdjoint, abc.ABC):
    """Adjoints defined by one evaluation of f at the solution ``z*`` under autograd
    (implicit, Jacobian-free, one-step): :meth:`solve` asks the loop for a graph at its last
    step and reuses that evaluation when every returned value is the last iterate (a solve
    that ran to its budget), evaluating f at ``z*`` otherwise; :meth:`attach` then builds the
    returned value from ``(z_in, f(z_in))``."""

    #: evaluate f from a leaf ``z*`` requiring grad (the implicit adjoint's VJPs in z)
    leaf: ClassVar[bool] = False
    #: take the loop's last evaluation when it is at the returned values (False: always
    #: evaluate f at z* again; the values and gradients are the same)
    reuse: ClassVar[bool] = True

    def solve(self, primal: Primal, backward_stats: dict[str, Any]) -> Tensor:
        graph = ("z" if self.leaf else "params") if self.reuse else None
        keep = self.keeps_inverse() and (primal.differentiable or dual_level_active())
        out = primal.run(graph=graph, keep_inverse=keep)
        # forward mode (dual inputs): the loop's iterates carry the tangent of the algorithm,
        # not of the equilibrium; the adjoint's derivative replaces it, also under no_grad
        if not primal.differentiable and not has_tangent(out.value):
            return out.value
        if out.last_eval is not None:
            z_in, fz = out.last_eval
        else:
            z_in, fz = primal.evaluate(out.value, leaf=self.leaf)
        return self.attach_output(z_in, fz, backward_stats, primal)

    def keeps_inverse(self) -> bool:
        """Whether the forward solve should keep its solver's inverse-Jacobian estimate for
        the backward pass (``LoopOutput.inverse``). Default: False."""
        return False

    def attach_output(self, z_in: Tensor, fz: Tensor, backward_stats: dict[str, Any],
                      primal: Primal) -> Tensor:
        """:meth:`attach`, given also the primal whose solve just ran (``primal.output``: its
        residuals and inverse estimate; ``primal.adjoint_cache``); adjoints that reuse the
        forward solve override it."""
        return self.attach(z_in, fz, backward_stats)

    def apply(
        self, fn: FlatFn, z_star: Tensor, args: tuple[Any, ...], backward_stats: dict[str, Any]
    ) -> Tensor:
        """Deprecated (see :meth:`AbstractAdjoint.apply`): evaluate ``fn`` at ``z_star`` under
        autograd and :meth:`attach`; kept for subclasses that extend it."""
        z = z_star.detach().requires_grad_() if self.leaf else z_star.detach()
        with torch.enable_grad():
            fz = fn(z, *args)
        return self.attach(z, fz, backward_stats)

    @abc.abstractmethod
    def attach(self, z_in: Tensor, fz: Tensor, backward_stats: dict[str, Any]) -> Tensor:
        """The returned value (equal to ``z_in`` up to the adjoint's choice) whose graph
        through ``fz = f(z_in)`` defines the gradient."""
