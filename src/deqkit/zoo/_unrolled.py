"""``unrolled``: the weight-tied, backprop-trained baseline of any zoo DEQ model."""

from __future__ import annotations

from typing import Any

from torch import nn

from ._common import unrolled_kwargs


def unrolled(model_cls: type[nn.Module], depth: int, *args: Any, **kwargs: Any) -> nn.Module:
    r"""Build ``model_cls`` as its weight-tied unrolled baseline: the same cell, ``depth`` steps.

    .. math:: z_0 = z_{\text{init}}, \qquad z_{k+1} = f(z_k, x), \quad k < L = \text{depth},

    with ordinary backpropagation through the steps. This is ``model_cls(*args,
    solver=dk.FixedSteps(dk.Picard()), adjoint=dk.UnrolledAdjoint(), max_steps=depth,
    eval_max_steps=depth, **kwargs)``: no tolerance is tested and the output is the last
    iterate; ``model.deq.last_solution`` reports the residual it reached. :class:`UnrolledMLP`
    and :class:`UnrolledConv` are the registered shorthands for :class:`DEQMLP` and
    :class:`ConvDEQ`.

    Args:
        model_cls: a zoo DEQ model class taking ``solver``, ``adjoint``, ``max_steps`` and
            ``eval_max_steps`` (:class:`DEQMLP`, :class:`ConvDEQ`, :class:`MDEQ`,
            :class:`DEQTransformerLM`).
        depth: number of weight-tied steps.
        *args: positional arguments of ``model_cls``.
        **kwargs: its other hyperparameters.

    Reference: Bai, Kolter, Koltun (2019), "Deep Equilibrium Models" (weight-tied unrolled
        baseline).

    Example:
        >>> import torch
        >>> from deqkit.zoo import MDEQ
        >>> model = unrolled(MDEQ, 3, (1, 8, 8), 10, channels=(4, 8), groups=2)
        >>> model(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """
    return model_cls(*args, **unrolled_kwargs(f"unrolled({model_cls.__name__})", depth, kwargs))


__all__ = ["unrolled"]
