"""Per-sample backtracking (Armijo) line search on the residual norm."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import FlatFn


def backtrack(
    fn: FlatFn, z: Tensor, r: Tensor, direction: Tensor, max_halvings: int, c: float = 1e-4
) -> tuple[Tensor, Tensor]:
    """Find per-sample ``t`` in ``{1, 1/2, 1/4, ...}`` with
    ``||g(z + t d)||^2 <= (1 - 2 c t) ||g(z)||^2`` where ``g(z) = f(z) - z``.

    Every trial evaluates f once on the whole working batch. Samples that never satisfy the
    condition take the smallest step tried. Returns ``(z_next, f(z_next))``.
    """
    g0 = (r * r).sum(dim=1)
    t = torch.ones_like(g0)
    z_new = z + direction
    fz_new = fn(z_new)
    accepted = torch.zeros_like(g0, dtype=torch.bool)
    z_out, fz_out = z_new, fz_new
    for i in range(max_halvings + 1):
        g = fz_new - z_new
        ok = ((g * g).sum(dim=1) <= (1 - 2 * c * t) * g0) & ~accepted
        if i == 0:
            z_out, fz_out = z_new, fz_new
        else:
            take = (ok | (~accepted & torch.tensor(i == max_halvings))).unsqueeze(1)
            z_out = torch.where(take, z_new, z_out)
            fz_out = torch.where(take, fz_new, fz_out)
        accepted = accepted | ok
        if i == max_halvings or bool(accepted.all()):
            break
        t = torch.where(accepted, t, 0.5 * t)
        z_new = z + t.unsqueeze(1) * direction
        fz_new = fn(z_new)
    return z_out, fz_out
