"""Phantom gradients: a few damped iterations from the equilibrium, backpropagated."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from .._checks import check_float, check_int
from ._base import AbstractAdjoint, Primal, first_order, gradient_of, has_tangent


@dataclasses.dataclass(frozen=True)
class PhantomAdjoint(AbstractAdjoint):
    r"""Unrolling-based phantom gradient (Geng et al., "On Training Implicit Models", 2021).

    From :math:`z_0 = z^\star` (held constant) run ``steps`` damped iterations with autograd,

    .. math:: z_{i+1} = (1-\lambda)\, z_i + \lambda\, f(z_i), \qquad i < k,

    and use the gradient of :math:`z_k`. At an exact fixed point this equals
    :math:`\lambda \sum_{j<k} ((1-\lambda) I + \lambda J^\top)^j g` pushed through
    :math:`\partial f/\partial\theta`: a truncated, damped Neumann series of the implicit
    gradient. ``steps=1, damping=1`` is JFB. Memory grows with ``steps``, not with the number
    of forward iterations. The forward value is :math:`z^\star`.

    Args:
        steps: unrolled steps :math:`k`. Default: 5.
        damping: :math:`\lambda \in (0, 1]`. Default: 0.5.

    Example:
        >>> import torch, deqkit as dk
        >>> x = torch.ones(1, 2, dtype=torch.float64, requires_grad=True)
        >>> sol = dk.fixed_point(lambda z: 0.5 * z + x, torch.zeros(1, 2, dtype=torch.float64),
        ...                      adjoint=dk.PhantomAdjoint(steps=5, damping=1.0))
        >>> sol.value.sum().backward()
        >>> x.grad  # 1 + 0.5 + ... + 0.5**4; the implicit gradient is 2
        tensor([[1.9375, 1.9375]], dtype=torch.float64)
    """

    steps: int = 5
    damping: float = 0.5

    def __post_init__(self) -> None:
        check_int("PhantomAdjoint", "steps", self.steps)
        check_float("PhantomAdjoint", "damping", self.damping, gt=0, le=1)

    def solve(self, primal: Primal, backward_stats: dict[str, Any]) -> Tensor:
        z0 = primal.run().value
        if not primal.differentiable and not has_tangent(z0):
            return z0
        z0 = z0.detach()  # held constant (also drops the iterations' forward-mode tangent)
        z = z0
        with torch.enable_grad():
            for _ in range(self.steps):
                fz = primal.f(z)
                z = fz if self.damping == 1.0 else torch.lerp(z, fz, self.damping)
        return z0 + first_order(gradient_of(z), self)

