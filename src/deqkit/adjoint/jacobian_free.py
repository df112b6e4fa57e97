"""Jacobian-free backpropagation (JFB)."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor

from ._base import OneEvaluation, first_order, gradient_of

# Backward compatibility: PhantomAdjoint lived here until it moved to ``adjoint/phantom.py``
# (pickles and ``from deqkit.adjoint.jacobian_free import PhantomAdjoint`` keep working).
from .phantom import PhantomAdjoint as PhantomAdjoint

# ~Backward compatibility


@dataclasses.dataclass(frozen=True)
class JacobianFreeAdjoint(OneEvaluation):
    r"""Jacobian-free backpropagation (JFB; Fung et al., AAAI 2022).

    Backpropagates through one application of f at the equilibrium with :math:`z^\star` held
    constant, i.e. replaces :math:`(I - J)^{-1}` by :math:`I`:

    .. math:: \frac{\partial \ell}{\partial\theta} \approx
              \frac{\partial \ell}{\partial z^\star}\,
              \frac{\partial f(z^\star,\theta)}{\partial\theta}.

    Cheapest backward (one VJP), memory of one f graph; a descent direction when f is
    sufficiently contractive. The forward value is :math:`z^\star` itself.

    Example:
        >>> import torch, deqkit as dk
        >>> x = torch.ones(1, 2, dtype=torch.float64, requires_grad=True)
        >>> sol = dk.fixed_point(lambda z: 0.5 * z + x, torch.zeros(1, 2, dtype=torch.float64),
        ...                      adjoint=dk.JacobianFreeAdjoint())
        >>> sol.value.sum().backward()
        >>> x.grad  # JFB: d f / d x = 1 (the exact gradient would be 2)
        tensor([[1., 1.]], dtype=torch.float64)
    """

    def attach(self, z_in: Tensor, fz: Tensor, backward_stats: dict[str, Any]) -> Tensor:
        return z_in.detach() + first_order(gradient_of(fz), self)
