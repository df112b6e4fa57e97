"""Variational (weight-tied, "locked") dropout for deep equilibrium cells.

Ordinary dropout samples a new mask at every call.  Inside a DEQ the cell is called many
times per forward pass by the fixed-point solver; a fresh mask each time makes ``f`` a
different function at every iteration, so there is no fixed point to converge to.  Variational
dropout (Gal & Ghahramani 2016, "A Theoretically Grounded Application of Dropout in Recurrent
Neural Networks"; used by Bai et al. 2019, "Deep Equilibrium Models") samples one mask per
solve and reuses it on every call, so the cell is one fixed (randomly thinned) function for
the whole solve.

Life cycle: call :func:`reset_dropout` on the model (or :meth:`VariationalDropout.reset_mask`)
once at the start of each forward pass (each solve); the next training-mode call samples the
mask, later calls reuse it.  A change of input shape resamples automatically.  In eval mode
the modules are the identity.
"""

from __future__ import annotations

from torch import Tensor, nn

from .._checks import check_float

__all__ = ["VariationalDropout", "VariationalDropout2d", "reset_dropout", "select_dropout"]


class VariationalDropout(nn.Module):
    r"""Dropout whose mask is sampled once and reused until :meth:`reset_mask`.

    In training mode ``forward(x) = x * m`` with
    ``m = torch.empty_like(x).bernoulli_(1 - p) / (1 - p)`` (inverted dropout, so
    ``E[x * m] = x``) sampled at the first call after a reset, on ``x``'s device and with its
    dtype, for the **full** shape ``(B, ...)`` of ``x`` (each sample and feature its own
    entry).  Later calls reuse ``m``; if the input shape changes, a new mask is sampled; if
    only the device or dtype changes, the same mask is converted.  In eval mode (or with
    ``p == 0``) it is the identity.

    The mask has one row per sample.  If the DEQ solver *compacts* the batch (drops converged
    samples and keeps calling the cell on the remaining rows ``index``), the mask must be
    sliced the same way -- call :meth:`select` (or :func:`select_dropout` on the model) with
    the same ``index``; otherwise the shape change would silently resample a new mask.

    The mask is a non-persistent buffer: it follows ``.to(device)`` but is not saved in the
    ``state_dict``.

    Args:
        p: drop probability in ``[0, 1)`` (default ``0.1``).

    Raises:
        ValueError: ``p`` outside ``[0, 1)``.

    Reference: Gal & Ghahramani (2016), "A Theoretically Grounded Application of Dropout in
        Recurrent Neural Networks" (one mask per sequence), used inside DEQ cells by Bai,
        Kolter, Koltun (2019).

    Example:
        >>> import torch
        >>> drop = VariationalDropout(p=0.5)
        >>> x = torch.ones(2, 4)
        >>> torch.equal(drop(x), drop(x))  # same mask on every call
        True
        >>> drop.reset_mask()  # start of the next solve: a new mask at the next call
        >>> _ = drop.eval(); torch.equal(drop(x), x)
        True
    """

    mask: Tensor | None
    # Inverted dropout with drop probability ``p``: :func:`deqkit.lipschitz_upper_bound` bounds
    # it by ``1/(1-p)`` in training mode and 1 in eval mode, as it does ``nn.Dropout``.
    inverted_dropout = True

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        self.p = check_float(type(self).__name__, "p", p, ge=0, lt=1,
                             example="0.1 (the drop probability)")
        self.register_buffer("mask", None, persistent=False)

    def _mask_shape(self, x: Tensor) -> tuple[int, ...]:
        return tuple(x.shape)

    def _sample_mask(self, x: Tensor) -> Tensor:
        keep = 1.0 - self.p
        return x.new_empty(self._mask_shape(x)).bernoulli_(keep).div_(keep)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        mask = self.mask
        if mask is None or tuple(mask.shape) != self._mask_shape(x):
            mask = self._sample_mask(x)
        elif mask.device != x.device or mask.dtype != x.dtype:
            mask = mask.to(device=x.device, dtype=x.dtype)
        self.mask = mask
        return x * mask

    def reset_mask(self) -> None:
        """Forget the mask; the next training-mode call samples a new one."""
        self.mask = None

    def select(self, index: Tensor | slice | list[int]) -> None:
        """Keep only the mask rows ``index`` (follow a compaction of the batch).

        Args:
            index: anything that indexes the batch dimension: a bool mask of shape ``(B,)``,
                a long tensor or list of row indices, or a slice.  No-op when no mask has been
                sampled yet.
        """
        if self.mask is not None:
            if isinstance(index, Tensor):
                index = index.to(self.mask.device)
            self.mask = self.mask[index]

    def extra_repr(self) -> str:
        return f"p={self.p}"


class VariationalDropout2d(VariationalDropout):
    r"""Channel-wise variational dropout for feature maps ``(B, C, H, W)``.

    Like :class:`VariationalDropout`, but the mask has shape ``(B, C, 1, 1)``: a whole channel
    of a sample is kept or dropped, at every spatial position (as ``nn.Dropout2d``), and the
    same mask is reused on every call until reset.  Also accepts ``(B, C, L)`` or
    ``(B, C, D, H, W)`` inputs (mask ``(B, C, 1, ...)``).

    Args:
        p: drop probability in ``[0, 1)`` (default ``0.1``).

    Raises:
        ValueError: ``p`` outside ``[0, 1)``; (at call time) input with fewer than 3 dims.

    Example:
        >>> import torch
        >>> drop = VariationalDropout2d(p=0.5)
        >>> y = drop(torch.ones(2, 3, 4, 4))
        >>> tuple(drop.mask.shape)
        (2, 3, 1, 1)
    """

    def _mask_shape(self, x: Tensor) -> tuple[int, ...]:
        if x.ndim < 3:
            raise ValueError(
                f"VariationalDropout2d: input must have shape (B, C, H, W) (at least 3 dims), "
                f"got {tuple(x.shape)}. Use VariationalDropout for (B, D) inputs."
            )
        return (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2)


def reset_dropout(module: nn.Module) -> int:
    """Reset the masks of all :class:`VariationalDropout` submodules (``module`` included).

    Call at the start of each DEQ forward pass (each new solve).

    Args:
        module: the model.

    Returns:
        The number of dropout modules reset.

    Example:
        >>> from torch import nn
        >>> reset_dropout(nn.Sequential(nn.Linear(2, 2), VariationalDropout(0.2)))
        1
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"reset_dropout: `module` must be an nn.Module, got {type(module).__name__}."
        )
    count = 0
    for sub in module.modules():
        if isinstance(sub, VariationalDropout):
            sub.reset_mask()
            count += 1
    return count


def select_dropout(module: nn.Module, index: Tensor | slice | list[int]) -> int:
    """Call :meth:`VariationalDropout.select` with ``index`` on every such submodule.

    Use when the solver compacts the batch to the rows ``index``.

    Args:
        module: the model.
        index: the kept batch rows (bool mask, long indices or slice).

    Returns:
        The number of dropout modules visited.

    Example:
        >>> import torch
        >>> drop = VariationalDropout(0.5)
        >>> _ = drop(torch.ones(4, 3))
        >>> select_dropout(drop, torch.tensor([0, 2])); tuple(drop.mask.shape)
        1
        (2, 3)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"select_dropout: `module` must be an nn.Module, got {type(module).__name__}."
        )
    count = 0
    for sub in module.modules():
        if isinstance(sub, VariationalDropout):
            sub.select(index)
            count += 1
    return count
