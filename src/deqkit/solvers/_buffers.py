"""History buffers reused between solves (Anderson, HyperAnderson).

A fresh buffer the size of a solver's history is paid again in page faults at its first
write: on the CPU, glibc maps large blocks per allocation (a digits ConvDEQ training step:
1,800 minor faults and 2.7 ms of system time per 29 ms step; 200 faults with reuse). A
:class:`BufferPool` hands the buffers of the last finished solve to the next solve of the same
key; a solve holds its set (through its :class:`Lease`, kept in the solver state) until its
last state is dropped, so a solve nested inside another one's ``f`` gets fresh buffers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.autograd import forward_ad


class BufferPool(dict):
    """``key -> buffers`` of finished solves; at most one set (the newest) is kept."""

    def lease(self, key: tuple, make: Callable[[], tuple[Any, ...]]
              ) -> tuple[tuple[Any, ...], Lease]:
        """The pooled buffers of ``key`` (or ``make()``'s) and the lease that returns them."""
        buffers = self.pop(key, None)
        if buffers is None:
            buffers = make()
        return buffers, Lease(self, key, buffers)


class Lease:
    """Owns one solve's buffers; gives them back to its pool when it is dropped."""

    __slots__ = ("buffers", "key", "pool")

    def __init__(self, pool: BufferPool, key: tuple, buffers: tuple[Any, ...]) -> None:
        self.pool, self.key, self.buffers = pool, key, buffers

    def __del__(self) -> None:
        try:
            self.pool.clear()
            self.pool[self.key] = self.buffers
        except Exception:  # (interpreter shutdown)
            pass


def reusable(*tensors: Tensor) -> bool:
    """Whether a solve from ``tensors`` may take pooled buffers: outside autograd,
    compilation and tracing, on plain tensors without forward-mode tangents (a buffer written
    there would carry a graph, a fake tensor or a tangent into the next solve)."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    return all(type(t) is Tensor and forward_ad.unpack_dual(t).tangent is None
               for t in tensors)


__all__ = ["BufferPool", "Lease", "reusable"]
