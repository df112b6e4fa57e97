"""Weight-tied unrolled baselines: a zoo DEQ model run for exactly ``depth`` Picard steps.

Every unrolled baseline is built one way, :func:`unrolled_kwargs`: the DEQ model's own
constructor with ``solver=FixedSteps(Picard())``, ``adjoint=UnrolledAdjoint()`` and
``max_steps=eval_max_steps=depth``. :func:`unrolled` does it for any zoo DEQ model class;
:class:`UnrolledMLP` and :class:`UnrolledConv` are the registered shorthands.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .._checks import check_int
from ..adjoint.unrolled import UnrolledAdjoint
from ..solvers.fixed import FixedSteps
from ..solvers.picard import Picard
from ._conv import ConvDEQ
from ._mlp import DEQMLP

#: The DEQ settings an unrolled baseline fixes (passing them raises TypeError).
FIXED_SETTINGS = ("solver", "adjoint", "max_steps", "eval_max_steps")


def unrolled_kwargs(owner: str, depth: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments turning a zoo DEQ model into its weight-tied unrolled baseline:
    ``kwargs`` plus exactly ``depth`` Picard steps (no tolerance test, in training and eval
    mode) and ordinary backpropagation through them.

    Example:
        >>> kw = unrolled_kwargs("Model", 3, {"width": 8})
        >>> type(kw["solver"]).__name__, kw["adjoint"], kw["max_steps"], kw["eval_max_steps"]
        ('FixedSteps', UnrolledAdjoint(), 3, 3)
    """
    check_int(owner, "depth", depth, 1)
    clash = sorted(set(FIXED_SETTINGS) & set(kwargs))
    if clash:
        raise TypeError(
            f"{owner} fixes {clash} (exactly `depth` Picard steps, ordinary backprop); "
            "use the DEQ model itself to choose a solver or an adjoint."
        )
    return dict(
        solver=FixedSteps(Picard()),
        adjoint=UnrolledAdjoint(),
        max_steps=depth,
        eval_max_steps=depth,
        **kwargs,
    )


def unrolled(model_cls: type[nn.Module], depth: int, *args: Any, **kwargs: Any) -> nn.Module:
    r"""Build ``model_cls`` as its weight-tied unrolled baseline: the same cell, ``depth`` steps.

    .. math:: z_0 = z_{\text{init}}, \qquad z_{k+1} = f(z_k, x), \quad k < L = \text{depth},

    with ordinary backpropagation through the steps. This is ``model_cls(*args,
    solver=dk.FixedSteps(dk.Picard()), adjoint=dk.UnrolledAdjoint(), max_steps=depth,
    eval_max_steps=depth, **kwargs)``: no tolerance is tested and the output is the last
    iterate; ``model.deq.last_solution`` reports the residual it reached. :class:`UnrolledMLP`
    and :class:`UnrolledConv` are the registered shorthands for :class:`DEQMLP` and
    :class:`ConvDEQ` (built the same way).

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


class UnrolledMLP(DEQMLP):
    r"""Weight-tied unrolled baseline of :class:`DEQMLP`: the same cell applied ``depth`` times.

    .. math:: z_0 = 0, \quad z_{k+1} = \phi(W z_k + U x + b), \quad \text{logits} = V z_L + c,

    trained with ordinary backpropagation through the ``depth`` steps. It *is* a
    :class:`DEQMLP` with ``solver=dk.FixedSteps(dk.Picard())``, ``max_steps=eval_max_steps=
    depth`` and ``adjoint=dk.UnrolledAdjoint()`` (``model.deq.last_solution`` reports
    ``max_steps_reached`` by design: no tolerance is tested).

    Args:
        in_shape: per-sample input shape.
        num_classes: number of classes.
        depth: number of weight-tied steps :math:`L`. Default: 8.
        **kwargs: the other hyperparameters of :class:`DEQMLP` (``width``,
            ``spectral_bound``, ``activation``); ``solver``, ``adjoint``, ``max_steps`` and
            ``eval_max_steps`` are fixed and raise TypeError.

    Reference: the weight-tied, unrolled network that a DEQ is the infinite-depth limit of: Bai,
        Kolter, Koltun (2019), "Deep Equilibrium Models", section 3.

    Example:
        >>> import torch
        >>> model = UnrolledMLP((5,), 3, depth=4, width=8)
        >>> model(torch.randn(2, 5)).shape, int(model.deq.last_solution.stats["nstep"][0])
        (torch.Size([2, 3]), 4)
    """

    def __init__(
        self, in_shape: tuple[int, ...], num_classes: int, depth: int = 8, **kwargs: Any
    ) -> None:
        super().__init__(in_shape, num_classes, **unrolled_kwargs("UnrolledMLP", depth, kwargs))
        self.depth = depth


class UnrolledConv(ConvDEQ):
    r"""Weight-tied unrolled baseline of :class:`ConvDEQ`: its cell applied ``depth`` times.

    .. math:: z_0 = 0, \quad z_{k+1} = f(z_k, \mathrm{stem}(x)), \quad
        \text{logits} = V\,\mathrm{pool}(z_L) + c,

    with ordinary backpropagation. It *is* a :class:`ConvDEQ` with
    ``solver=dk.FixedSteps(dk.Picard())``, ``max_steps=eval_max_steps=depth`` and
    ``adjoint=dk.UnrolledAdjoint()``.

    Args:
        in_shape: ``(C, H, W)`` or ``(C, L)``.
        num_classes: number of classes.
        depth: number of weight-tied steps. Default: 8.
        **kwargs: the other hyperparameters of :class:`ConvDEQ` (``channels``, ``groups``,
            ``head``, ``init_std``); ``solver``, ``adjoint``, ``max_steps`` and
            ``eval_max_steps`` are fixed and raise TypeError.

    Reference: Bai, Kolter, Koltun (2019), "Deep Equilibrium Models" (weight-tied unrolled
        baseline).

    Example:
        >>> import torch
        >>> UnrolledConv((1, 6, 6), 3, depth=3, channels=4, groups=2)(torch.randn(2, 1, 6, 6)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self, in_shape: tuple[int, ...], num_classes: int, depth: int = 8, **kwargs: Any
    ) -> None:
        super().__init__(in_shape, num_classes, **unrolled_kwargs("UnrolledConv", depth, kwargs))
        self.depth = depth


__all__ = ["FIXED_SETTINGS", "UnrolledConv", "UnrolledMLP", "unrolled", "unrolled_kwargs"]
