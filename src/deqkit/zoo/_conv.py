"""Convolutional models: the ConvDEQ (ResNet-style cell), the multiscale MDEQ, baselines."""

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
    unrolled_kwargs,
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


def _small_init(conv: nn.Module, std: float = CELL_INIT_STD) -> None:
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
        _small_init(self.conv1, init_std)
        _small_init(self.conv2, init_std)

    def forward(self, z: Tensor, inj: Tensor) -> Tensor:
        y = F.relu(self.gn1(self.conv1(z)))
        if self.drop is not None:
            y = self.drop(y)
        y = self.gn2(self.conv2(y) + inj)
        return self.gn3(F.relu(z + y))


def _stem(
    conv: type[nn.Module], c_in: int, channels: int, groups: int, kernel_size: int = 3,
    stride: int = 1,
) -> nn.Sequential:
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
        self.stem = _stem(conv, self.in_shape[0], channels, groups, stem_kernel, stem_stride)
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
        self.stem = _stem(conv, self.in_shape[0], channels, groups)
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


class MultiscaleCell(nn.Module):
    r"""Two-resolution MDEQ cell: a residual block per branch, then multiscale fusion.

    With state :math:`(z_0, z_1)` at full and half resolution and injections
    :math:`(u_0, u_1)`:

    .. math::
        b_i = \mathrm{Block}_i(z_i, u_i), \qquad
        z_0' = \mathrm{GN}\big(\mathrm{ReLU}(b_0 + \mathrm{up}(b_1))\big), \qquad
        z_1' = \mathrm{GN}\big(\mathrm{ReLU}(b_1 + \mathrm{down}(b_0))\big),

    where :math:`\mathrm{down}` is a stride-2 3x3 conv + GroupNorm and :math:`\mathrm{up}` a
    1x1 conv + GroupNorm followed by nearest interpolation to the full resolution
    (Bai, Koltun, Kolter, "Multiscale Deep Equilibrium Models", NeurIPS 2020).

    Args:
        channels: ``(c0, c1)`` channels of the two branches.
        groups: GroupNorm groups (dividing both).
        spatial: 1 or 2 spatial dimensions.
        init_std: std of the initial conv weights. Default: 0.01.

    Example:
        >>> import torch
        >>> from deqkit.zoo import MultiscaleCell
        >>> cell = MultiscaleCell((8, 16), groups=4)
        >>> z = (torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4))
        >>> [t.shape for t in cell(z, *z)]  # state (z0, z1), injections u0, u1
        [torch.Size([2, 8, 8, 8]), torch.Size([2, 16, 4, 4])]
    """

    def __init__(
        self,
        channels: tuple[int, int],
        groups: int,
        spatial: int = 2,
        init_std: float = CELL_INIT_STD,
    ) -> None:
        super().__init__()
        c0, c1 = channels
        conv = nn.Conv1d if spatial == 1 else nn.Conv2d
        self.block0 = ResidualCell(c0, groups, spatial, init_std=init_std)
        self.block1 = ResidualCell(c1, groups, spatial, init_std=init_std)
        self.down = nn.Sequential(
            conv(c0, c1, 3, stride=2, padding=1, bias=False), nn.GroupNorm(groups, c1)
        )
        self.up = nn.Sequential(conv(c1, c0, 1, bias=False), nn.GroupNorm(groups, c0))
        self.post0 = nn.GroupNorm(groups, c0)
        self.post1 = nn.GroupNorm(groups, c1)
        _small_init(self.down[0], init_std)
        _small_init(self.up[0], init_std)

    def init_state(self, u0: Tensor, u1: Tensor) -> tuple[Tensor, Tensor]:
        """Zero state, one tensor per resolution."""
        return torch.zeros_like(u0), torch.zeros_like(u1)

    def forward(
        self, z: tuple[Tensor, Tensor], u0: Tensor, u1: Tensor
    ) -> tuple[Tensor, Tensor]:
        z0, z1 = z
        b0 = self.block0(z0, u0)
        b1 = self.block1(z1, u1)
        up = F.interpolate(self.up(b1), size=b0.shape[2:], mode="nearest")
        return self.post0(F.relu(b0 + up)), self.post1(F.relu(b1 + self.down(b0)))


class MDEQ(nn.Module):
    r"""Multiscale deep equilibrium classifier (two resolutions solved jointly).

    .. math::
        (u_0, u_1) = \big(\mathrm{stem}(x),\ \mathrm{down}_{\text{in}}(\mathrm{stem}(x))\big),
        \qquad (z_0^\star, z_1^\star) = f\big((z_0^\star, z_1^\star), u_0, u_1\big),
        \qquad \text{logits} = V\,[h_0(z_0^\star); h_1(z_1^\star)] + c,
        \qquad h_i(z) = \mathrm{pool}(\mathrm{ReLU}(P_i z)),

    with :math:`f` the :class:`MultiscaleCell` (per-branch residual blocks and multiscale
    fusion). The state is a **tuple** of a full- and a half-resolution tensor; the core
    flattens it for the solver. Bai, Koltun, Kolter, "Multiscale Deep Equilibrium Models",
    NeurIPS 2020. ``Conv2d`` for ``(C, H, W)`` images, ``Conv1d`` for ``(C, L)`` signals.

    Args:
        in_shape: ``(C, H, W)`` or ``(C, L)``.
        num_classes: number of classes.
        channels: ``(c0, c1)`` channels at full and half resolution. Default: ``(16, 32)``.
        groups: GroupNorm groups (dividing both). Default: 4.
        init_std: std of the cell's initial conv weights. Default: 0.01.
        solver: forward solver. Default: ``dk.Anderson(m=5, rtol=1e-4, atol=1e-6)``.
        adjoint: gradient. Default: ``dk.ImplicitAdjoint(dk.GMRES(rtol=1e-4, max_steps=20))``.
        max_steps: solver budget in training mode. Default: 20.
        eval_max_steps: solver budget in eval mode. Default: 40.
        **deq_kwargs: further keyword arguments of :class:`deqkit.nn.DEQ`.

    Attributes:
        deq: the :class:`deqkit.nn.DEQ` layer (``deq.last_solution.value`` is the tuple).

    Example:
        >>> import torch
        >>> model = MDEQ((1, 8, 8), 10, channels=(4, 8), groups=2)
        >>> model(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
        >>> [tuple(z.shape) for z in model.deq.last_solution.value]
        [(2, 4, 8, 8), (2, 8, 4, 4)]
    """

    def __init__(
        self,
        in_shape: tuple[int, ...],
        num_classes: int,
        channels: tuple[int, int] = (16, 32),
        groups: int = 4,
        init_std: float = CELL_INIT_STD,
        solver: Any = None,
        adjoint: Any = None,
        max_steps: int = 20,
        eval_max_steps: int | None = 40,
        **deq_kwargs: Any,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.in_shape = check_in_shape(owner, in_shape, (2, 3))
        num_classes = check_num_classes(owner, num_classes)
        try:
            c0, c1 = channels
        except (TypeError, ValueError):
            raise ValueError(
                f"{owner}: `channels` must be a pair (full, half resolution), got {channels!r}."
            ) from None
        for c in (c0, c1):
            check_int(owner, "channels", c)
            check_groups(owner, c, groups)
        conv, spatial = conv_cls(owner, len(self.in_shape))
        solver, adjoint = resolve(solver, adjoint)
        self.stem = _stem(conv, self.in_shape[0], c0, groups)
        self.stem_down = nn.Sequential(
            conv(c0, c1, 3, stride=2, padding=1, bias=False), nn.GroupNorm(groups, c1)
        )
        self.deq = DEQ(
            MultiscaleCell((c0, c1), groups, spatial, init_std=init_std),
            solver=solver,
            adjoint=adjoint,
            max_steps=max_steps,
            eval_max_steps=eval_max_steps,
            **deq_kwargs,
        )
        self.features0 = PoolFeatures(conv, c0, 2 * c0)
        self.features1 = PoolFeatures(conv, c1, 2 * c1)
        self.head = nn.Linear(2 * (c0 + c1), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        check_input(type(self).__name__, x, self.in_shape)
        u0 = self.stem(x)
        u1 = self.stem_down(u0)
        z0, z1 = self.deq(u0, u1)
        return self.head(torch.cat([self.features0(z0), self.features1(z1)], dim=1))


__all__ = [
    "MDEQ",
    "ConvDEQ",
    "MultiscaleCell",
    "PoolFeatures",
    "ResNetConv",
    "ResidualCell",
    "UnrolledConv",
]
