"""One-step adjoint: return and differentiate one more application of f (with a fixed-point
residual penalty)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from .._checks import check_float
from ._base import OneEvaluation, finite_rows, first_order


class _AddToObjective(torch.autograd.Function):
    """Identity on ``x`` whose backward also differentiates the scalar ``extra`` with weight 1,
    i.e. adds ``extra`` to whatever objective is back-propagated through ``x``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, extra: Tensor) -> Tensor:  # type: ignore[override]
        ctx.extra_like = (extra.shape, extra.dtype, extra.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        shape, dtype, device = ctx.extra_like
        return grad, torch.ones(shape, dtype=dtype, device=device)


@dataclasses.dataclass(frozen=True)
class OneStepAdjoint(OneEvaluation):
    r"""Differentiate one more application of the cell at the solver's iterate, and return it.

    With :math:`\hat z` the (detached) result of the forward solve, the layer returns

    .. math:: z_{\text{out}} = f(\hat z, u; \theta),

    differentiated with :math:`\hat z` held constant (one step of truncated backpropagation).
    Unlike :class:`~deqkit.JacobianFreeAdjoint`, which returns :math:`\hat z` but takes the
    gradient of :math:`f(\hat z)`, the value and the gradient belong to the same function, so
    the gradient is exact for what the loss sees even when the training solve is short and
    :math:`\hat z` is only near the equilibrium. At an equilibrium both coincide. Memory: one
    graph of ``f``; cost: one differentiable evaluation of ``f``, none when the solve runs to
    its step budget and returns its last iterate (the typical short training solve): the
    driver then evaluates :math:`f(\hat z)` under autograd once, for its residual check and
    for this adjoint alike.

    ``residual_weight`` :math:`\lambda > 0` adds :math:`\lambda\,\overline{r^2}` to the
    objective, with :math:`r_b = \|f(\hat z_b) - \hat z_b\| / \|f(\hat z_b)\|` the relative
    residual of sample :math:`b` (batch mean; gradient through :math:`f(\hat z)`): a penalty
    that is free to compute and keeps the map contractive along the solver's path, so the
    output of a short training solve stays close to the converged fixed point used in
    evaluation. The term enters through the backward pass (the returned value is unchanged):
    it is added to any loss back-propagated through the layer's output, unscaled, so with a
    loss scaler (float16) its relative weight shrinks by the scale factor.

    Args:
        residual_weight: :math:`\lambda \ge 0`. Default: 1.0.

    References: Fung et al. (2022), "JFB: Jacobian-Free Backpropagation for Implicit Networks"
        (one-step gradients); Bai, Koltun, Kolter (2022), "Deep Equilibrium Optical Flow
        Estimation" (fixed-point correction: supervising short solves); in deqkit the DEQ
        transformer LM trains with one Picard step and this adjoint, and is evaluated at the
        equilibrium (``benchmarks/bench_lm.py``).

    Example:
        >>> import torch, deqkit as dk
        >>> x = torch.ones(1, 2, dtype=torch.float64, requires_grad=True)
        >>> sol = dk.fixed_point(lambda z: 0.5 * z + x, torch.zeros(1, 2, dtype=torch.float64),
        ...                      adjoint=dk.OneStepAdjoint(residual_weight=0.0))
        >>> sol.value.sum().backward()
        >>> x.grad  # d f / d x = 1 with z held constant (the exact gradient would be 2)
        tensor([[1., 1.]], dtype=torch.float64)
    """

    residual_weight: float = 1.0

    def __post_init__(self) -> None:
        check_float("OneStepAdjoint", "residual_weight", self.residual_weight, ge=0,
                    finite=False, example=1.0)

    def attach(self, z_in: Tensor, fz: Tensor, backward_stats: dict[str, Any]) -> Tensor:
        z = z_in.detach()
        # rows where f(z) is not finite return their last finite iterate z (no gradient)
        ok = finite_rows(fz)
        if self.residual_weight > 0 and fz.requires_grad:
            tiny = torch.finfo(fz.dtype).tiny
            rel2 = (fz - z).square().sum(1) / fz.detach().square().sum(1).clamp_min(tiny)
            if ok is not None:
                rel2 = torch.where(ok, rel2, 0.0)
            fz = _AddToObjective.apply(fz, self.residual_weight * rel2.mean())
        if ok is not None:
            fz = torch.where(ok.unsqueeze(1), fz, z)
        return first_order(fz, self)
