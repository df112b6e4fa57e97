"""Picard (damped fixed-point) iteration."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from .._checks import check_float, check_tolerances
from ._base import AbstractFixedPointSolver, FlatFn


@dataclasses.dataclass(frozen=True)
class Picard(AbstractFixedPointSolver):
    r"""Damped fixed-point (Picard / Krasnosel'skii-Mann) iteration.

    .. math:: z_{k+1} = (1 - \lambda)\, z_k + \lambda\, f(z_k)

    With ``damping`` :math:`\lambda = 1` this is plain iteration, which converges linearly with
    rate :math:`L` for an :math:`L`-Lipschitz contraction (Banach). :math:`\lambda < 1` can make
    a non-expansive or mildly oscillating map converge.

    Args:
        rtol: relative tolerance. Default: 1e-5.
        atol: absolute tolerance. Default: 1e-7.
        damping: :math:`\lambda \in (0, 1]`, the weight on :math:`f(z_k)`. Default: 1.0.

    Reference: S. Banach (1922), "Sur les operations dans les ensembles abstraits et leur
        application aux equations integrales" (contraction mapping theorem: the error after k
        steps is at most L^k / (1 - L) times the first step); damped (Krasnosel'skii-Mann)
        iteration: Krasnosel'skii (1955), Mann (1953).

    Example:
        >>> import torch, deqkit as dk
        >>> sol = dk.fixed_point(torch.cos, torch.zeros(1, 1, dtype=torch.float64),
        ...                      solver=dk.Picard(rtol=1e-10, atol=0), max_steps=200)
        >>> round(float(sol.value), 6)
        0.739085
    """

    rtol: float = 1e-5
    atol: float = 1e-7
    damping: float = 1.0

    def __post_init__(self) -> None:
        check_tolerances("Picard", self.rtol, self.atol)
        check_float("Picard", "damping", self.damping, gt=0, le=1)

    def step(
        self, fn: FlatFn, z: Tensor, fz: Tensor, r: Tensor, state: Any
    ) -> tuple[Tensor, Tensor | None, Any]:
        if self.damping == 1.0:
            return fz, None, state
        return torch.lerp(z, fz, self.damping), None, state
