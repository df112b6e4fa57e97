"""The state of a :class:`~deqkit.hyperdeq.HyperAnderson` solve and the handle of
:meth:`~deqkit.hyperdeq.HyperAnderson.attach`."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
from torch import Tensor


@dataclasses.dataclass
class HyperState:
    F: Tensor  # (W, m, D) past f(z_i)
    G: Tensor  # (W, m, D) past residuals g_i = f(z_i) - z_i
    H: Tensor  # (W, m, m) Gram matrix G G^T, float64
    Q: Tensor  # (W, m, 2p) compressed residuals (mean and RMS of the learned projection)
    best: Tensor  # (W,) lowest residual norm so far
    fz_best: Tensor  # (W, D) f at the lowest-residual iterate (the safeguard's fallback step)
    # (4, W0, D) scratch of the inference path, W0 the initial width: rows [:W] are used as
    # the batch shrinks, so it is not a batch field (compaction does not copy it)
    work: Tensor | None = dataclasses.field(default=None, metadata={"batch": False})
    lease: Any = dataclasses.field(default=None, metadata={"batch": False})  # gives F, G, work back
    k: int = dataclasses.field(default=0, metadata={"batch": False})


class Attachment:
    """Handle returned by :meth:`HyperAnderson.attach`: the layer's overrides are in force
    from ``attach`` until :meth:`remove` (or the end of a ``with`` block)."""

    def __init__(self, overrides: contextlib.AbstractContextManager[Any]) -> None:
        overrides.__enter__()
        self._overrides: contextlib.AbstractContextManager[Any] | None = overrides

    def remove(self) -> None:
        """Restore the layer's previous solver and initial state (once; later calls do
        nothing)."""
        overrides, self._overrides = self._overrides, None
        if overrides is not None:
            overrides.__exit__(None, None, None)

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def gram_update(H: Tensor, G: Tensor, g: Tensor, slot: int) -> Tensor:
    """``H`` (W, m, m, float64) with row and column ``slot`` set to the inner products of the
    newest residual ``g`` (W, D) with the ``n`` valid residuals ``G`` (W, n, D); out of place
    when the write must stay differentiable (unrolled solves)."""
    n = G.shape[1]
    row = torch.linalg.vecdot(G, g.unsqueeze(1)).to(torch.float64)  # (W, n)
    if torch.is_grad_enabled() and (row.requires_grad or H.requires_grad):
        H = H.clone()
    H[:, slot, :n] = row
    H[:, :n, slot] = row
    return H


__all__ = ["Attachment", "HyperState", "gram_update"]
