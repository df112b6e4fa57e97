"""The multiscale deep equilibrium model (MDEQ): two resolutions solved jointly."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_int
from ..nn._deq import DEQ
from ._common import check_groups, check_in_shape, check_input, check_num_classes, conv_cls, resolve
from ._conv import CELL_INIT_STD, PoolFeatures, ResidualCell, conv_stem, small_init


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
        small_init(self.down[0], init_std)
        small_init(self.up[0], init_std)

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
        self.stem = conv_stem(conv, self.in_shape[0], c0, groups)
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


__all__ = ["MDEQ", "MultiscaleCell"]
