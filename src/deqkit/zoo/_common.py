"""Shared helpers of the model zoo: argument checks and the default solver/adjoint."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .._checks import check_choice, check_int
from .._fixed_point import resolve_solver
from ..adjoint._base import AbstractAdjoint
from ..adjoint.implicit import ImplicitAdjoint
from ..linear.gmres import GMRES
from ..solvers.anderson import Anderson

#: Forward solver used by the zoo's DEQ models when ``solver=None``.
DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-6


def default_solver() -> Anderson:
    """``dk.Anderson(m=5, rtol=1e-4, atol=1e-6)``: the zoo's default forward solver.

    Example:
        >>> from deqkit.zoo import default_solver
        >>> default_solver()
        Anderson(rtol=0.0001, atol=1e-06, m=5, beta=1.0, regularisation=1e-08)
    """
    return Anderson(m=5, rtol=DEFAULT_RTOL, atol=DEFAULT_ATOL)


def default_adjoint() -> ImplicitAdjoint:
    """``dk.ImplicitAdjoint(dk.GMRES(rtol=1e-4, atol=1e-8, max_steps=20, restart=20),
    on_failure="ignore")``: the zoo's default backward pass (failures are recorded in
    ``model.deq.last_solution.backward["converged"]`` rather than warned about at every
    training step).

    Example:
        >>> from deqkit.zoo import default_adjoint
        >>> adjoint = default_adjoint()
        >>> adjoint.linear_solver.max_steps, adjoint.on_failure
        (20, 'ignore')
    """
    return ImplicitAdjoint(
        GMRES(rtol=1e-4, atol=1e-8, max_steps=20, restart=20), on_failure="ignore"
    )


def check_in_shape(owner: str, in_shape: Any, ranks: tuple[int, ...] = (1, 2, 3)) -> tuple:
    """Validate a per-sample input shape and return it as a tuple of ints."""
    try:
        shape = tuple(in_shape)
    except TypeError:
        shape = None
    if (
        shape is None
        or len(shape) not in ranks
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)
    ):
        raise ValueError(
            f"{owner}: `in_shape` must be the per-sample input shape, a tuple of {ranks} "
            f"positive ints ((F,) vectors, (C, L) signals, (C, H, W) images), got {in_shape!r}."
        )
    return shape


def check_num_classes(owner: str, num_classes: Any) -> int:
    return check_int(owner, "num_classes", num_classes, 1)


def check_input(owner: str, x: Tensor, in_shape: tuple) -> None:
    if tuple(x.shape[1:]) != tuple(in_shape):
        raise ValueError(
            f"{owner}: expected input of shape (B, {', '.join(map(str, in_shape))}), got "
            f"{tuple(x.shape)}."
        )


def resolve(solver: Any, adjoint: Any) -> tuple[Any, AbstractAdjoint]:
    """Zoo defaults for ``solver``/``adjoint`` when they are ``None``."""
    solver = default_solver() if solver is None else resolve_solver(solver)
    adjoint = default_adjoint() if adjoint is None else adjoint
    return solver, adjoint


def activation(owner: str, name: str) -> nn.Module:
    table = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}
    return table[check_choice(owner, "activation", name, sorted(table))]()


def conv_cls(owner: str, rank: int) -> tuple[type[nn.Module], int]:
    """``(Conv1d or Conv2d, spatial rank)`` for a per-sample input rank of 2 or 3."""
    if rank == 2:
        return nn.Conv1d, 1
    if rank == 3:
        return nn.Conv2d, 2
    raise ValueError(
        f"{owner}: convolutional models need (C, L) signals or (C, H, W) images, got a "
        f"per-sample rank of {rank}."
    )


def check_groups(owner: str, channels: int, groups: int) -> None:
    check_int(owner, "groups", groups, 1)
    if channels % groups:
        raise ValueError(
            f"{owner}: GroupNorm needs `channels` ({channels}) divisible by `groups` ({groups})."
        )
