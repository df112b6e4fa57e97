"""Ordinary backpropagation through the solver iterations."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor

from ._base import AbstractAdjoint, Primal


@dataclasses.dataclass(frozen=True)
class UnrolledAdjoint(AbstractAdjoint):
    """Backpropagate through every solver iteration (the reference; O(iterations) memory).

    The forward solve is recorded by autograd, so the gradient is that of the computed
    iterate, which depends on the number of iterations and the solver; it tends to the
    implicit gradient as the solve converges. Works with :class:`~deqkit.Picard` and
    :class:`~deqkit.Anderson`; batch compaction is disabled.

    Reference: backpropagation through the solver iterations, the O(iterations)-memory baseline
        of Bai, Kolter, Koltun (2019), "Deep Equilibrium Models", section 3.

    Example:
        >>> import torch, deqkit as dk
        >>> x = torch.ones(1, 2, dtype=torch.float64, requires_grad=True)
        >>> sol = dk.fixed_point(lambda z: 0.5 * z + x, torch.zeros(1, 2, dtype=torch.float64),
        ...                      solver=dk.FixedSteps(dk.Picard()), max_steps=3,
        ...                      adjoint=dk.UnrolledAdjoint())
        >>> sol.value.sum().backward()
        >>> x.grad  # z_3 = (1 + 0.5 + 0.25) x; the implicit gradient is 2
        tensor([[1.7500, 1.7500]], dtype=torch.float64)
    """

    def solve(self, primal: Primal, backward_stats: dict[str, Any]) -> Tensor:
        return primal.run(unrolled=True).value
