"""Convolutional models: the ConvDEQ (ResNet-style cell), its residual cell, the ResNet baseline.

The multiscale MDEQ is in ``_mdeq.py``, the weight-tied unrolled baselines in ``_unrolled.py``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice, check_float, check_int
from ..nn._deq import DEQ
from ..nn._dropout import VariationalDropout2d, reset_dropout
from ._common import (
    check_groups,
    check_in_shape,
    check_input,
    check_num_classes,
    conv_cls,
    resolve,
)

#: Standard deviation of the (small) initial weights of the cells' convolutions.
CELL_INIT_STD = 0.01


def _same_padding(owner: str, kernel_size: Any, dilation: Any) -> int:
    """'same' padding of an odd ``kernel_size`` with ``dilation`` (stride 1)."""
    check_int(owner, "kernel_size", kernel_size)
    check_int(owner, "dilation", dilation)
    if kernel_size % 2 == 0:
        raise ValueError(f"{owner}: `kernel_size` must be odd, got {kernel_size!r}.")
    return dilation * (kernel_size - 1) // 2


def small_init(conv: nn.Module, std: float = CELL_INIT_STD) -> None:
    """Normal(0, ``std``) weights and zero bias: a cell that starts close to a contraction."""
    nn.init.normal_(conv.weight, 0.0, std)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _pool(z: Tensor) -> Tensor:
    """Global average pool over the spatial dimensions: (B, C, ...) -> (B, C)."""
    return z.flatten(2).mean(2)


class PoolFeatures(nn.Module):
    r"""``pool(ReLU(conv1x1(z)))``: (B, C, ...) -> (B, C_out) features for a linear head.

    The 1x1 projection and ReLU come before the global average pool because a GroupNorm-ed
    state has zero mean in each group, so pooling it directly would discard most information.
    """

    def __init__(self, conv: type[nn.Module], channels: int, out_channels: int) -> None:
        super().__init__()
        self.proj = conv(channels, out_channels, 1)

    def forward(self, z: Tensor) -> Tensor:
        return _pool(F.relu(self.proj(z)))


def _features(kind: str, conv: type[nn.Module], channels: int, in_shape: tuple) -> tuple:
    """``(module, n_features)`` for a ``"pool"`` or ``"flatten"`` head."""
    if kind == "pool":
        return PoolFeatures(conv, channels, 2 * channels), 2 * channels
    return nn.Flatten(1), channels * math.prod(in_shape[1:])


class ResidualCell(nn.Module):
    r"""MDEQ/TorchDEQ residual block with input injection, GroupNorm throughout.

    .. math::
        f(z, u) = \mathrm{GN}_3\Big(\mathrm{ReLU}\big(z + \mathrm{GN}_2(
        \mathrm{conv}_2(\mathrm{ReLU}(\mathrm{GN}_1(\mathrm{conv}_1 z))) + u)\big)\Big)

    where :math:`u` is the injected input. The convolutions (3, or 3x3, 'same' padding) start
    with small weights (normal, std ``init_std``) so the block starts close to
    :math:`\mathrm{GN}_3(\mathrm{ReLU}(z + \mathrm{GN}_2(u)))`, a contraction in :math:`z`.
    GroupNorm normalises each sample on its own, so samples stay independent.

    Args:
        channels: number of channels.
        groups: GroupNorm groups (dividing ``channels``).
        spatial: 1 (signals, ``Conv1d``) or 2 (images, ``Conv2d``).
        hidden: channels between the two convolutions. Default: ``channels``.
        init_std: std of the initial conv weights. Default: 0.01.
        kernel_size: odd kernel size of both convolutions ('same' padding). Default: 3.
        dilation: dilation of the first convolution (wider receptive field per step).
            Default: 1.
        dropout: channel-wise variational dropout (:class:`~deqkit.nn.VariationalDropout2d`)
            after :math:`\mathrm{ReLU}(\mathrm{GN}_1(\cdot))`, one mask per solve (call
            :func:`~deqkit.nn.reset_dropout` before each solve). Default: 0.0 (none).

    Reference: the residual cell of Bai, Koltun, Kolter (2020), "Multiscale Deep Equilibrium
        Models" (GroupNorm, input injection), after He et al. (2016), "Deep Residual Learning
        for Image Recognition".

    Example:
        >>> import torch
        >>> from deqkit.zoo import ResidualCell
        >>> cell = ResidualCell(8, groups=2)
        >>> z, u = torch.randn(2, 8, 6, 6), torch.randn(2, 8, 6, 6)
        >>> cell(z, u).shape
        torch.Size([2, 8, 6, 6])
        >>> cell1d = ResidualCell(8, groups=2, spatial=1)
        >>> cell1d(torch.randn(2, 8, 10), torch.randn(2, 8, 10)).shape
        torch.Size([2, 8, 10])
    """

    def __init__(
        self,
        channels: int,
        groups: int,
        spatial: int = 2,
        hidden: int | None = None,
        init_std: float = CELL_INIT_STD,
        kernel_size: int = 3,
        dilation: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        conv = nn.Conv1d if spatial == 1 else nn.Conv2d
        hidden = channels if hidden is None else hidden
        check_groups("ResidualCell", hidden, groups)
        pad1 = _same_padding("ResidualCell", kernel_size, dilation)
        pad2 = _same_padding("ResidualCell", kernel_size, 1)
        dropout = check_float("ResidualCell", "dropout", dropout, ge=0, lt=1)
        self.conv1 = conv(channels, hidden, kernel_size, padding=pad1, dilation=dilation,
                          bias=False)
        self.gn1 = nn.GroupNorm(groups, hidden, affine=True)
        self.drop = VariationalDropout2d(dropout) if dropout > 0 else None
        self.conv2 = conv(hidden, channels, kernel_size, padding=pad2, bias=False)
        self.gn2 = nn.GroupNorm(groups, channels, affine=True)
        self.gn3 = nn.GroupNorm(groups, channels, affine=True)
        small_init(self.conv1, init_std)
        small_init(self.conv2, init_std)

    def forward(self, z: Tensor, inj: Tensor) -> Tensor:
        y = F.relu(self.gn1(self.conv1(z)))
        if self.drop is not None:
            y = self.drop(y)
        y = self.gn2(self.conv2(y) + inj)
        return self.gn3(F.relu(z + y))


def conv_stem(
    conv: type[nn.Module], c_in: int, channels: int, groups: int, kernel_size: int = 3,
    stride: int = 1,
) -> nn.Sequential:
    """The injection: a conv ('same' padding for stride 1) + GroupNorm."""
    return nn.Sequential(
        conv(c_in, channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        nn.GroupNorm(groups, channels),
    )


class ConvDEQ(nn.Module):
    r"""Convolutional deep equilibrium classifier with a ResNet-style cell.

    .. math::
        u = \mathrm{stem}(x), \qquad
        z^\star = \mathrm{GN}_3\Big(\mathrm{ReLU}\big(z^\star + \mathrm{GN}_2(
        \mathrm{conv}_2(\mathrm{ReLU}(\mathrm{GN}_1(\mathrm{conv}_1 z^\star))) + u)\big)\Big),
        \qquad \text{logits} = V\,\mathrm{pool}(\mathrm{ReLU}(P z^\star)) + c,

    the residual block of MDEQ/TorchDEQ (Bai, Koltun, Kolter, "Multiscale Deep Equilibrium
    Models", NeurIPS 2020) at a single resolution (:class:`ResidualCell`). The injection
    :math:`u` (3x3 conv + GroupNorm) is computed once, outside the solve. ``Conv2d`` is used
    for ``(C, H, W)`` images and ``Conv1d`` for ``(C, L)`` signals. The head is a 1x1 conv
    + ReLU, a global average pool and a linear layer (``head="pool"``, see
    :class:`PoolFeatures`) or flatten + linear (``head="flatten"``,
    the default: on 8x8 digits the pooled head trained far worse in a quick check).

    Args:
        in_shape: ``(C, H, W)`` or ``(C, L)``.
        num_classes: number of classes.
        channels: state channels. Default: 32.
        groups: GroupNorm groups. Default: 8.
        head: ``"flatten"`` or ``"pool"``. Default: ``"flatten"`` (best on small inputs such
            as 8x8 digits or 40-sample signals; ``"pool"`` for large inputs).
        init_std: std of the cell's initial conv weights. Default: 0.01.
        solver: forward solver. Default: ``dk.Anderson(m=5, rtol=1e-4, atol=1e-6)``.
        adjoint: gradient. Default: ``dk.ImplicitAdjoint(dk.GMRES(rtol=1e-4, max_steps=20))``.
        max_steps: solver budget in training mode. Default: 15.
        eval_max_steps: solver budget in eval mode. Default: 40.
        kernel_size: odd kernel size of the cell's convolutions. Default: 3.
        dilation: dilation of the cell's first convolution. Default: 1.
        stem_kernel: odd kernel size of the stem (injection) convolution. Default: 3.
        stem_stride: stride of the stem convolution; 2 halves each spatial size of the state
            (cheaper solves, fewer flattened features). Default: 1.
        dropout: channel-wise variational dropout inside the cell (one mask per solve, see
            :class:`ResidualCell`). Default: 0.0.
        head_dropout: dropout on the head's features before the linear layer. Default: 0.0.
        **deq_kwargs: further keyword arguments of :class:`deqkit.nn.DEQ`.

    Attributes:
        deq: the :class:`deqkit.nn.DEQ` layer (``deq.last_solution.stats``).

    Example:
        >>> import torch
        >>> model = ConvDEQ((1, 8, 8), 10, channels=8, groups=2)
        >>> model(torch.randn(2, 1, 8, 8)).shape, model.deq.last_solution.result
        (torch.Size([2, 10]), <RESULTS.successful: 0>)
        >>> ConvDEQ((1, 40), 10, channels=8, groups=2)(torch.randn(2, 1, 40)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_shape: tuple[int, ...],
        num_classes: int,
        channels: int = 32,
        groups: int = 8,
        head: str = "flatten",
        init_std: float = CELL_INIT_STD,
        solver: Any = None,
        adjoint: Any = None,
        max_steps: int = 15,
        eval_max_steps: int | None = 40,
        kernel_size: int = 3,
        dilation: int = 1,
        stem_kernel: int = 3,
        stem_stride: int = 1,
        dropout: float = 0.0,
        head_dropout: float = 0.0,
        **deq_kwargs: Any,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.in_shape = check_in_shape(owner, in_shape, (2, 3))
        num_classes = check_num_classes(owner, num_classes)
        channels = check_int(owner, "channels", channels)
        check_groups(owner, channels, groups)
        conv, spatial = conv_cls(owner, len(self.in_shape))
        check_choice(owner, "head", head, ("pool", "flatten"))
        _same_padding(owner, stem_kernel, 1)
        check_int(owner, "stem_stride", stem_stride)
        head_dropout = check_float(owner, "head_dropout", head_dropout, ge=0, lt=1)
        solver, adjoint = resolve(solver, adjoint)
        self.stem = conv_stem(conv, self.in_shape[0], channels, groups, stem_kernel, stem_stride)
        # spatial shape of the state after the (possibly strided) stem
        state_shape = (
            channels,
            *((n + 2 * (stem_kernel // 2) - stem_kernel) // stem_stride + 1
              for n in self.in_shape[1:]),
        )
        self.deq = DEQ(
            ResidualCell(
                channels, groups, spatial, init_std=init_std, kernel_size=kernel_size,
                dilation=dilation, dropout=dropout,
            ),
            solver=solver,
            adjoint=adjoint,
            max_steps=max_steps,
            eval_max_steps=eval_max_steps,
            **deq_kwargs,
        )
        self.features, n_feat = _features(head, conv, channels, state_shape)
        self.head_drop = nn.Dropout(head_dropout) if head_dropout > 0 else None
        self.head = nn.Linear(n_feat, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        check_input(type(self).__name__, x, self.in_shape)
        if self.deq.cell.drop is not None:
            reset_dropout(self.deq.cell)  # one variational mask per solve
        z = self.features(self.deq(self.stem(x)))
        if self.head_drop is not None:
            z = self.head_drop(z)
        return self.head(z)


class ResNetConv(nn.Module):
    r"""Explicit (untied) convolutional ResNet baseline matching :class:`ConvDEQ`'s cell.

    .. math:: u = \mathrm{stem}(x), \quad z_0 = 0, \quad z_{l+1} = f_l(z_l, u), \quad
        \text{logits} = V\,\mathrm{pool}(z_L) + c,

    where each :math:`f_l` is a :class:`ResidualCell` with its own weights (input injected at
    every block, as in the DEQ).

    Args:
        in_shape: ``(C, H, W)`` or ``(C, L)``.
        num_classes: number of classes.
        channels: channels. Default: 32.
        depth: number of blocks :math:`L`. Default: 4.
        groups: GroupNorm groups. Default: 8.
        head: ``"flatten"`` or ``"pool"``. Default: ``"flatten"`` (best on small inputs such
            as 8x8 digits or 40-sample signals; ``"pool"`` for large inputs).
        init_std: std of the blocks' initial conv weights. Default: 0.01.

    Reference: He et al. (2016), "Deep Residual Learning for Image Recognition".

    Example:
        >>> import torch
        >>> ResNetConv((1, 6, 6), 3, channels=4, depth=2, groups=2)(torch.randn(2, 1, 6, 6)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        in_shape: tuple[int, ...],
        num_classes: int,
        channels: int = 32,
        depth: int = 4,
        groups: int = 8,
        head: str = "flatten",
        init_std: float = CELL_INIT_STD,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.in_shape = check_in_shape(owner, in_shape, (2, 3))
        num_classes = check_num_classes(owner, num_classes)
        channels = check_int(owner, "channels", channels)
        self.depth = check_int(owner, "depth", depth, 1)
        check_groups(owner, channels, groups)
        conv, spatial = conv_cls(owner, len(self.in_shape))
        check_choice(owner, "head", head, ("pool", "flatten"))
        self.stem = conv_stem(conv, self.in_shape[0], channels, groups)
        self.blocks = nn.ModuleList(
            ResidualCell(channels, groups, spatial, init_std=init_std) for _ in range(depth)
        )
        self.features, n_feat = _features(head, conv, channels, self.in_shape)
        self.head = nn.Linear(n_feat, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        check_input(type(self).__name__, x, self.in_shape)
        u = self.stem(x)
        z = torch.zeros_like(u)
        for block in self.blocks:
            z = block(z, u)
        return self.head(self.features(z))


__all__ = [
    "CELL_INIT_STD",
    "ConvDEQ",
    "PoolFeatures",
    "ResNetConv",
    "ResidualCell",
    "conv_stem",
    "small_init",
]
