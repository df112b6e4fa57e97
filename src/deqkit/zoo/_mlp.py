"""Fully connected models: the DEQ MLP, its explicit (ResNet) baseline, the monDEQ classifier.

The weight-tied unrolled baseline :class:`UnrolledMLP` is in ``_unrolled.py``.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

from .._checks import check_float, check_int
from ..nn._deq import DEQ
from ..nn._monotone import ForwardBackward, MonotoneDEQ, PeacemanRachford
from ..stability import spectral_norm
from ._common import (
    activation as _activation,
)
from ._common import (
    check_in_shape,
    check_input,
    check_num_classes,
    resolve,
)


class MLPCell(nn.Module):
    r"""The DEQ MLP cell :math:`f(z, u) = \phi(W z + u)` (``u = U x + b`` injected).

    Args:
        width: state dimension.
        spectral_bound: bound on :math:`\|W\|_2` enforced by :func:`deqkit.nn.spectral_norm`
            (``None``: unconstrained). Default: 0.9.
        activation: ``"tanh"``, ``"relu"`` or ``"gelu"``. Default: ``"tanh"``.

    Reference: the fully connected DEQ cell of Bai, Kolter, Koltun (2019), "Deep Equilibrium
        Models", with a spectral-norm bound (Miyato et al. 2018) to keep it contractive.

    Example:
        >>> import torch
        >>> from deqkit.zoo import MLPCell
        >>> cell = MLPCell(8, spectral_bound=0.9)
        >>> z, u = torch.zeros(2, 8), torch.randn(2, 8)
        >>> torch.allclose(cell(z, u), torch.tanh(u))  # f(0, u) = tanh(u)
        True
    """

    def __init__(
        self, width: int, spectral_bound: float | None = 0.9, activation: str = "tanh"
    ) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width, bias=False)
        if spectral_bound is not None:
            check_float("MLPCell", "spectral_bound", spectral_bound, gt=0)
            spectral_norm(self.linear, bound=spectral_bound)
        self.act = _activation("MLPCell", activation)

    def forward(self, z: Tensor, inj: Tensor) -> Tensor:
        return self.act(self.linear(z) + inj)


class DEQMLP(nn.Module):
    r"""Fully connected deep equilibrium classifier.

    .. math::
        z^\star = \phi\big(W z^\star + U x + b\big), \qquad
        \text{logits} = V z^\star + c,

    with :math:`\phi` = tanh (or ReLU), :math:`\|W\|_2 \le` ``spectral_bound`` by bounded
    spectral normalisation (:func:`deqkit.nn.spectral_norm`), so with a 1-Lipschitz
    :math:`\phi` the cell is a contraction and the equilibrium exists and is unique. The
    injection :math:`U x + b` is computed once per forward pass, outside the solve, and handed
    to the cell as its input. The input is flattened, so any ``in_shape`` works. Gradients are
    implicit (Bai, Kolter, Koltun, "Deep Equilibrium Models", NeurIPS 2019).

    Args:
        in_shape: per-sample input shape, e.g. ``(64,)`` or ``(1, 8, 8)`` (flattened).
        num_classes: number of classes.
        width: state dimension. Default: 128.
        spectral_bound: bound on :math:`\|W\|_2` (``None``: unconstrained). Default: 0.9.
        activation: ``"tanh"``, ``"relu"`` or ``"gelu"``. Default: ``"tanh"``.
        solver: forward solver. Default: ``dk.Anderson(m=5, rtol=1e-4, atol=1e-6)``.
        adjoint: gradient. Default: ``dk.ImplicitAdjoint(dk.GMRES(rtol=1e-4, max_steps=20))``.
        max_steps: solver budget in training mode. Default: 20.
        eval_max_steps: solver budget in eval mode. Default: 50.
        **deq_kwargs: further keyword arguments of :class:`deqkit.nn.DEQ` (``throw``,
            ``compact``, ``trace``, ``patience``, ...).

    Attributes:
        deq: the :class:`deqkit.nn.DEQ` layer; ``model.deq.last_solution.stats`` holds the
            statistics of the latest solve.

    Example:
        >>> import torch
        >>> model = DEQMLP((1, 8, 8), 10, width=16)
        >>> model(torch.randn(3, 1, 8, 8)).shape
        torch.Size([3, 10])
        >>> model.deq.last_solution.result
        <RESULTS.successful: 0>
    """

    def __init__(
        self,
        in_shape: tuple[int, ...],
        num_classes: int,
        width: int = 128,
        spectral_bound: float | None = 0.9,
        activation: str = "tanh",
        solver: Any = None,
        adjoint: Any = None,
        max_steps: int = 20,
        eval_max_steps: int | None = 50,
        **deq_kwargs: Any,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.in_shape = check_in_shape(owner, in_shape)
        num_classes = check_num_classes(owner, num_classes)
        width = check_int(owner, "width", width)
        solver, adjoint = resolve(solver, adjoint)
        self.inject = nn.Linear(math.prod(self.in_shape), width)
        self.deq = DEQ(
            MLPCell(width, spectral_bound, activation),
            solver=solver,
            adjoint=adjoint,
            max_steps=max_steps,
            eval_max_steps=eval_max_steps,
            **deq_kwargs,
        )
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        check_input(type(self).__name__, x, self.in_shape)
        z = self.deq(self.inject(x.flatten(1)))
        return self.head(z)


class ResNetMLP(nn.Module):
    r"""Explicit (untied) residual MLP baseline with ``depth`` pre-norm blocks.

    .. math::
        h_0 = \phi(U x + b), \qquad
        h_{l+1} = h_l + W^{(2)}_l\, \phi\big(W^{(1)}_l \mathrm{LN}_l(h_l) + b^{(1)}_l\big)
        + b^{(2)}_l, \qquad \text{logits} = V\,\mathrm{LN}(h_L) + c.

    Args:
        in_shape: per-sample input shape (flattened).
        num_classes: number of classes.
        width: hidden width. Default: 128.
        depth: number of residual blocks :math:`L`. Default: 4.
        activation: ``"tanh"``, ``"relu"`` or ``"gelu"``. Default: ``"relu"``.

    Reference: He et al. (2016), "Deep Residual Learning for Image Recognition" (an explicit
        depth-L baseline with untied weights).

    Example:
        >>> import torch
        >>> ResNetMLP((6,), 4, width=8, depth=2)(torch.randn(3, 6)).shape
        torch.Size([3, 4])
    """

    def __init__(
        self,
        in_shape: tuple[int, ...],
        num_classes: int,
        width: int = 128,
        depth: int = 4,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.in_shape = check_in_shape(owner, in_shape)
        num_classes = check_num_classes(owner, num_classes)
        width = check_int(owner, "width", width)
        self.depth = check_int(owner, "depth", depth, 0)
        self.stem = nn.Linear(math.prod(self.in_shape), width)
        self.act = _activation(owner, activation)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(width),
                nn.Linear(width, width),
                _activation(owner, activation),
                nn.Linear(width, width),
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        check_input(type(self).__name__, x, self.in_shape)
        h = self.act(self.stem(x.flatten(1)))
        for block in self.blocks:
            h = h + block(h)
        return self.head(self.norm(h))


class MonotoneClassifier(nn.Module):
    r"""Monotone operator equilibrium network (monDEQ) classifier.

    .. math::
        z^\star = \mathrm{ReLU}(W z^\star + U x + b), \qquad
        \tfrac12\big((I - W) + (I - W)^\top\big) \succeq m I, \qquad
        \text{logits} = V z^\star + c,

    so the equilibrium exists and is unique for every input whatever :math:`\|W\|`
    (Winston & Kolter, "Monotone operator equilibrium networks", NeurIPS 2020). The input is
    flattened and passed to :class:`deqkit.nn.MonotoneDEQ`, which solves an operator splitting
    (Peaceman-Rachford by default) with the core solvers and adjoints.

    Args:
        in_shape: per-sample input shape (flattened).
        num_classes: number of classes.
        width: state dimension. Default: 128.
        m: monotonicity parameter. Default: 0.05.
        splitting: ``dk.nn.PeacemanRachford`` or ``dk.nn.ForwardBackward``.
            Default: ``PeacemanRachford(alpha=1.0)``.
        solver: forward solver on the splitting. Default: ``dk.Anderson(m=5, rtol=1e-4,
            atol=1e-6)``.
        adjoint: gradient. Default: ``dk.ImplicitAdjoint(dk.GMRES(rtol=1e-4, max_steps=20))``.
        max_steps: budget in training mode. Default: 30.
        eval_max_steps: budget in eval mode. Default: 100.
        throw: raise on failed solves. Default: False.

    Attributes:
        deq: the :class:`deqkit.nn.MonotoneDEQ` layer (``deq.last_solution``).

    Example:
        >>> import torch
        >>> model = MonotoneClassifier((6,), 3, width=8)
        >>> model(torch.randn(2, 6)).shape, model.deq.last_solution.result
        (torch.Size([2, 3]), <RESULTS.successful: 0>)
    """

    def __init__(
        self,
        in_shape: tuple[int, ...],
        num_classes: int,
        width: int = 128,
        m: float = 0.05,
        splitting: ForwardBackward | PeacemanRachford | None = None,
        solver: Any = None,
        adjoint: Any = None,
        max_steps: int = 30,
        eval_max_steps: int | None = 100,
        throw: bool = False,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.in_shape = check_in_shape(owner, in_shape)
        num_classes = check_num_classes(owner, num_classes)
        width = check_int(owner, "width", width)
        check_int(owner, "max_steps", max_steps, 0)
        check_int(owner, "eval_max_steps", eval_max_steps, 0, none=True)
        solver, adjoint = resolve(solver, adjoint)
        self.deq = MonotoneDEQ(
            math.prod(self.in_shape),
            width,
            m=m,
            splitting=splitting,
            solver=solver,
            adjoint=adjoint,
            max_steps=max_steps,
            eval_max_steps=eval_max_steps,
            throw=throw,
        )
        self.head = nn.Linear(width, num_classes)

    @property
    def max_steps(self) -> int:
        """The layer's budget in training mode (``self.deq.max_steps``)."""
        return self.deq.max_steps

    @max_steps.setter
    def max_steps(self, value: int) -> None:
        self.deq.max_steps = check_int(type(self).__name__, "max_steps", value, 0)

    @property
    def eval_max_steps(self) -> int:
        """The layer's budget in eval mode (``self.deq.eval_max_steps``)."""
        return self.deq.eval_max_steps

    @eval_max_steps.setter
    def eval_max_steps(self, value: int) -> None:
        self.deq.eval_max_steps = check_int(type(self).__name__, "eval_max_steps", value, 0)

    def forward(self, x: Tensor) -> Tensor:
        check_input(type(self).__name__, x, self.in_shape)
        return self.head(self.deq(x.flatten(1)))


__all__ = ["DEQMLP", "MLPCell", "MonotoneClassifier", "ResNetMLP"]
