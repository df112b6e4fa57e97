"""The multiscale deep equilibrium model (MDEQ): two resolutions solved jointly."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice, check_float, check_int
from ..nn._deq import DEQ
from ..nn._dropout import reset_dropout
from ._common import check_groups, check_in_shape, check_input, check_num_classes, conv_cls, resolve
from ._conv import CELL_INIT_STD, PoolFeatures, ResidualCell, conv_stem, small_init

#: Fusion rules of :class:`MultiscaleCell`.
FUSIONS = ("sum", "normalized")
#: Heads of :class:`MDEQ`.
HEADS = ("flatten", "pool")


def _check_channels(owner: str, channels: Any, groups: Any) -> tuple[int, int]:
    """``channels`` as a pair of ints, each divisible by ``groups``."""
    try:
        c0, c1 = channels
    except (TypeError, ValueError):
        raise ValueError(
            f"{owner}: `channels` must be a pair (full, half resolution) of ints, e.g. "
            f"channels=(16, 32), got {channels!r}."
        ) from None
    for c in (c0, c1):
        check_int(owner, "channels", c)
        check_groups(owner, c, groups)
    return c0, c1


class MultiscaleCell(nn.Module):
    r"""Two-resolution MDEQ cell: a residual block per branch, then multiscale fusion.

    With state :math:`(z_0, z_1)` at full and half resolution and injections
    :math:`(u_0, u_1)`, each branch runs its own :class:`ResidualCell` and then receives the
    other branch, resampled:

    .. math::
        b_i = \mathrm{Block}_i(z_i, u_i), \qquad
        z_0' = b_0 + \mathrm{up}(P\,b_1), \qquad
        z_1' = b_1 + D\,b_0,

    with :math:`P` a 1x1 conv followed by nearest upsampling to the full resolution and
    :math:`D` a stride-2 3x3 conv (``fusion="sum"``, the default). :math:`P` and :math:`D`
    start small (normal, std ``init_std``) and are **not** normalised, so at initialisation
    the cell is two nearly independent residual blocks, each close to a contraction, and the
    coupling grows as training needs it.

    ``fusion="normalized"`` is the fusion of Bai, Koltun, Kolter (2020) as deqkit had it
    before: a GroupNorm after :math:`P` and :math:`D` and a post-fusion ReLU + GroupNorm,
    :math:`z_0' = \mathrm{GN}(\mathrm{ReLU}(b_0 + \mathrm{up}(\mathrm{GN}(P b_1))))`, and
    likewise for :math:`z_1'`. A GroupNorm undoes the small initialisation (it rescales
    :math:`P b_1` to unit variance whatever the size of :math:`P`), so that cell starts with
    full-strength coupling and a Jacobian spectral radius near 1 (see ``docs/guides/mdeq.md``).

    Args:
        channels: ``(c0, c1)`` channels of the two branches.
        groups: GroupNorm groups (dividing both).
        spatial: 1 (signals, ``Conv1d``) or 2 (images, ``Conv2d``). Default: 2.
        init_std: std of the initial conv weights (blocks and fusion). Default: 0.01.
        fusion: ``"sum"`` or ``"normalized"``. Default: ``"sum"``.
        dropout: channel-wise variational dropout inside both residual blocks (one mask per
            solve: call :func:`~deqkit.nn.reset_dropout` before each solve). Default: 0.0.

    Reference: Bai, Koltun, Kolter (2020), "Multiscale Deep Equilibrium Models", NeurIPS.

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
        fusion: str = "sum",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        c0, c1 = _check_channels(owner, channels, groups)
        check_int(owner, "spatial", spatial, 1, maximum=2)
        init_std = check_float(owner, "init_std", init_std, gt=0)
        self.fusion = check_choice(owner, "fusion", fusion, FUSIONS)
        conv = nn.Conv1d if spatial == 1 else nn.Conv2d
        self.block0 = ResidualCell(c0, groups, spatial, init_std=init_std, dropout=dropout)
        self.block1 = ResidualCell(c1, groups, spatial, init_std=init_std, dropout=dropout)
        norm = self.fusion == "normalized"
        # module names as in earlier versions, so their state dicts load with "normalized"
        self.down = nn.Sequential(conv(c0, c1, 3, stride=2, padding=1, bias=False),
                                  *([nn.GroupNorm(groups, c1)] if norm else []))
        self.up = nn.Sequential(conv(c1, c0, 1, bias=False),
                                *([nn.GroupNorm(groups, c0)] if norm else []))
        if norm:
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
        s0 = b0 + F.interpolate(self.up(b1), size=b0.shape[2:], mode="nearest")
        s1 = b1 + self.down(b0)
        if self.fusion == "sum":
            return s0, s1
        return self.post0(F.relu(s0)), self.post1(F.relu(s1))


class MDEQ(nn.Module):
    r"""Multiscale deep equilibrium classifier (two resolutions solved jointly).

    .. math::
        (u_0, u_1) = \big(\mathrm{stem}(x),\ \mathrm{down}_{\text{in}}(\mathrm{stem}(x))\big),
        \qquad (z_0^\star, z_1^\star) = f\big((z_0^\star, z_1^\star), u_0, u_1\big),
        \qquad \text{logits} = V\,[\mathrm{vec}(z_0^\star); \mathrm{vec}(z_1^\star)] + c,

    with :math:`f` the :class:`MultiscaleCell` (a residual block per resolution and
    multiscale fusion) and the input injected at both resolutions. The state is a **tuple** of
    a full- and a half-resolution tensor; the core flattens it for the solver. The default
    head flattens both resolutions into one linear layer (``head="flatten"``, best on small
    inputs such as 8x8 digits or 40-sample signals); ``head="pool"`` is a 1x1 conv + ReLU and
    a global average pool per resolution, :math:`h_i(z) = \mathrm{pool}(\mathrm{ReLU}(P_i z))`,
    concatenated (for large inputs). ``Conv2d`` for ``(C, H, W)`` images, ``Conv1d`` for
    ``(C, L)`` signals. See the guide ``docs/guides/mdeq.md`` for measurements.

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
        head: ``"flatten"`` or ``"pool"``. Default: ``"flatten"``.
        fusion: the cell's fusion, ``"sum"`` or ``"normalized"`` (see
            :class:`MultiscaleCell`). Default: ``"sum"``.
        dropout: channel-wise variational dropout in the cell's blocks (one mask per solve).
            Default: 0.0.
        head_dropout: dropout on the head's features before the linear layer. Default: 0.0.
        **deq_kwargs: further keyword arguments of :class:`deqkit.nn.DEQ`.

    Attributes:
        deq: the :class:`deqkit.nn.DEQ` layer (``deq.last_solution.value`` is the tuple,
            ``deq.last_solution.stats["rel_residual"]`` the per-sample relative residual).

    Reference: Bai, Koltun, Kolter (2020), "Multiscale Deep Equilibrium Models", NeurIPS.

    Example:
        >>> import torch
        >>> model = MDEQ((1, 8, 8), 10, channels=(4, 8), groups=2)
        >>> model(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
        >>> [tuple(z.shape) for z in model.deq.last_solution.value]
        [(2, 4, 8, 8), (2, 8, 4, 4)]
        >>> MDEQ((1, 40), 10, channels=(4, 8), groups=2)(torch.randn(2, 1, 40)).shape
        torch.Size([2, 10])
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
        head: str = "flatten",
        fusion: str = "sum",
        dropout: float = 0.0,
        head_dropout: float = 0.0,
        **deq_kwargs: Any,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.in_shape = check_in_shape(owner, in_shape, (2, 3))
        num_classes = check_num_classes(owner, num_classes)
        c0, c1 = _check_channels(owner, channels, groups)
        conv, spatial = conv_cls(owner, len(self.in_shape))
        self.head_kind = check_choice(owner, "head", head, HEADS)
        check_choice(owner, "fusion", fusion, FUSIONS)
        init_std = check_float(owner, "init_std", init_std, gt=0)
        dropout = check_float(owner, "dropout", dropout, ge=0, lt=1)
        head_dropout = check_float(owner, "head_dropout", head_dropout, ge=0, lt=1)
        solver, adjoint = resolve(solver, adjoint)
        self.stem = conv_stem(conv, self.in_shape[0], c0, groups)
        self.stem_down = nn.Sequential(
            conv(c0, c1, 3, stride=2, padding=1, bias=False), nn.GroupNorm(groups, c1)
        )
        self.deq = DEQ(
            MultiscaleCell((c0, c1), groups, spatial, init_std=init_std, fusion=fusion,
                           dropout=dropout),
            solver=solver,
            adjoint=adjoint,
            max_steps=max_steps,
            eval_max_steps=eval_max_steps,
            **deq_kwargs,
        )
        self._dropout = dropout > 0
        if self.head_kind == "pool":
            self.features0 = PoolFeatures(conv, c0, 2 * c0)
            self.features1 = PoolFeatures(conv, c1, 2 * c1)
            n_feat = 2 * (c0 + c1)
        else:
            full = math.prod(self.in_shape[1:])
            half = math.prod((n + 1) // 2 for n in self.in_shape[1:])  # stride-2, padding 1
            n_feat = c0 * full + c1 * half
        self.head_drop = nn.Dropout(head_dropout) if head_dropout > 0 else None
        self.head = nn.Linear(n_feat, num_classes)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        # a checkpoint of another head/fusion (e.g. of the MDEQ from before the flattened head
        # and the sum fusion became the defaults): say how to rebuild it
        strict, error_msgs = args[1], args[4]
        saved = {"head": "pool" if f"{prefix}features0.proj.weight" in state_dict else "flatten",
                 "fusion": "normalized" if f"{prefix}deq.cell.post0.weight" in state_dict
                 else "sum"}
        built = {"head": self.head_kind, "fusion": self.deq.cell.fusion}
        if strict and saved != built:
            error_msgs.append(
                "MDEQ: the state dict is of an MDEQ with "
                + ", ".join(f"{k}={v!r}" for k, v in saved.items())
                + f", this one has {', '.join(f'{k}={v!r}' for k, v in built.items())}: build "
                "it with the saved values (MDEQ runs from before the flattened head and the sum "
                "fusion became the defaults: --model-arg head=pool --model-arg fusion=normalized)."
            )
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, x: Tensor) -> Tensor:
        check_input(type(self).__name__, x, self.in_shape)
        if self._dropout:
            reset_dropout(self.deq.cell)  # one variational mask per solve
        u0 = self.stem(x)
        u1 = self.stem_down(u0)
        z0, z1 = self.deq(u0, u1)
        if self.head_kind == "pool":
            feats = torch.cat([self.features0(z0), self.features1(z1)], dim=1)
        else:
            feats = torch.cat([z0.flatten(1), z1.flatten(1)], dim=1)
        if self.head_drop is not None:
            feats = self.head_drop(feats)
        return self.head(feats)


__all__ = ["MDEQ", "MultiscaleCell"]
