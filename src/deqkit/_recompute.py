"""Whether f is being evaluated again for a backward pass.

The backward passes that re-evaluate f (the recorded implicit backward, the ``torch.func``
path, the reversible adjoint) must see the function the forward solve used: training-time
side effects, such as the power iteration of a spectral-norm parametrization updating its
vectors, must not run again. Code with such side effects checks :func:`active`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

_state = threading.local()


def active() -> bool:
    """True inside :func:`recomputing` (in this thread)."""
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def recomputing() -> Iterator[None]:
    """Mark the evaluations inside as re-evaluations of f for a backward pass."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1
