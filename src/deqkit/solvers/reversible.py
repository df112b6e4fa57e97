"""The algebraically reversible fixed-point iteration of reversible DEQs."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from .._checks import check_float, check_tolerances
from ._base import AbstractFixedPointSolver, FlatFn


@dataclasses.dataclass
class ReversibleState:
    """The second state ``y`` of the coupled iteration, ``(B, D)``."""

    y: Tensor


@dataclasses.dataclass(frozen=True)
class Reversible(AbstractFixedPointSolver):
    r"""Algebraically reversible fixed-point iteration (McCallum, Arora, Foster 2025).

    Two coupled states, :math:`y_0 = z_0`:

    .. math::
        y_{n+1} = (1-\beta)\, y_n + \beta f(z_n), \qquad
        z_{n+1} = (1-\beta)\, z_n + \beta f(y_{n+1}).

    Each step can be undone exactly in exact arithmetic,
    :math:`z_n = (z_{n+1} - \beta f(y_{n+1}))/(1-\beta)`,
    :math:`y_n = (y_{n+1} - \beta f(z_n))/(1-\beta)`, so :class:`~deqkit.ReversibleAdjoint`
    backpropagates through the iterations actually run without storing them. Two evaluations
    of f per step; the returned value is :math:`z_n`, whose residual
    :math:`f(z_n) - z_n` is the stopping test (per sample, the driver's rule). A fixed point
    of f is a fixed point of the pair; with f a contraction the iteration converges for
    :math:`\beta \in (0, 1)`, the paper's range is :math:`(0, 2)`, and :math:`\beta = 1` is
    not reversible.

    Reconstruction divides by :math:`1 - \beta` twice per step: rounding errors grow by
    about :math:`1/|1-\beta|^2` per step, less what the contraction of f removes. Small
    :math:`\beta` and few steps keep it exact to working precision; see
    :class:`~deqkit.ReversibleAdjoint` for the measured regime and exact checkpoints.

    Used with any adjoint: ``UnrolledAdjoint`` backpropagates through the same steps with
    stored iterates (the reference the reversible backward is tested against).

    Args:
        beta: :math:`\beta \in (0, 2)`, :math:`\beta \ne 1`. Default: 0.5.
        rtol: relative tolerance. Default: 1e-5.
        atol: absolute tolerance. Default: 1e-7.

    Reference: S. McCallum, K. Arora, J. Foster (2025), "Reversible Deep Equilibrium
    Models", arXiv:2509.12917.

    Example:
        >>> import torch, deqkit as dk
        >>> sol = dk.fixed_point(torch.cos, torch.zeros(1, 1, dtype=torch.float64),
        ...                      solver=dk.Reversible(beta=0.5, rtol=1e-10, atol=0),
        ...                      max_steps=100)
        >>> round(float(sol.value), 6)
        0.739085
    """

    beta: float = 0.5
    rtol: float = 1e-5
    atol: float = 1e-7

    def __post_init__(self) -> None:
        check_tolerances("Reversible", self.rtol, self.atol)
        check_float("Reversible", "beta", self.beta, gt=0, lt=2)
        if self.beta == 1.0:
            raise ValueError(
                "Reversible: `beta` = 1.0 is not reversible (each step divides by 1 - beta); "
                "pick beta in (0, 1) or (1, 2), e.g. 0.5.")

    def init(self, fn: FlatFn, z: Tensor, fz: Tensor, r: Tensor, max_steps: int) -> Any:
        return ReversibleState(y=z.clone())

    def step(self, fn: FlatFn, z: Tensor, fz: Tensor, r: Tensor, state: Any
             ) -> tuple[Tensor, Tensor | None, Any]:
        y = torch.lerp(state.y, fz, self.beta)
        z_next = torch.lerp(z, fn(y), self.beta)
        return z_next, None, ReversibleState(y=y)
