"""``DEQSchedule``: how a DEQ layer is solved at each training step (unrolled warm-up, then
an equilibrium solve under a growing step budget)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

from .._checks import check_int
from ..adjoint.unrolled import UnrolledAdjoint
from ..solvers.fixed import FixedSteps
from ..solvers.picard import Picard


@dataclasses.dataclass(frozen=True)
class DEQSchedule:
    r"""The training schedule of the DEQ papers for a :class:`~deqkit.nn.DEQ` layer, as a
    pure function of the optimiser step (so a resumed or data-parallel run follows it
    exactly).

    1. **Unrolled warm-up** (steps ``0 .. unroll_steps - 1``): the layer is a weight-tied
       network of depth :math:`L` = ``unroll_depth``, :math:`z_L = f^{(L)}(z_0, x)` from the
       layer's initial state, differentiated by ordinary backpropagation
       (``FixedSteps(Picard())`` + :class:`~deqkit.UnrolledAdjoint`; memory
       :math:`O(L)`). This is the "pretraining" of Bai, Kolter & Koltun (2019, 2020): the
       cell first learns a useful map while it is cheap to evaluate and its gradient is exact
       for what is computed.
    2. **Equilibrium** (the remaining steps): the layer's own solver and adjoint, with the
       training step budget growing linearly from ``budget_start`` at the first equilibrium
       step to ``budget_end`` at the last step (``total_steps - 1``):

       .. math:: K_t = \operatorname{round}\Big(K_0 + (K_1 - K_0)
                 \frac{t - t_u}{\max(1,\, T - t_u - 1)}\Big),

       the growing solve budget of Bai et al. (2021, "Stabilizing Equilibrium Models by
       Jacobian Regularization"): early on the weights move fast and an accurate
       equilibrium buys little. ``budget_start=None`` keeps the layer's ``max_steps``.

    The evaluation budget (``eval_max_steps``) is never changed. :meth:`phase` says what a
    step does; :meth:`apply` is the context manager (through :meth:`DEQ.overrides
    <deqkit.nn.DEQ.overrides>`) that a training loop enters around the forward pass.
    ``deqkit train`` builds one from ``--unroll-warmup``, ``--unroll-depth`` and
    ``--max-steps-start`` (and enters :meth:`DEQ.warm_start <deqkit.nn.DEQ.warm_start>` only
    outside the warm-up: an unrolled iterate is no equilibrium to store).

    Args:
        total_steps: optimiser steps of the whole run.
        unroll_steps: steps of the unrolled warm-up. Default: 0 (none).
        unroll_depth: cell applications in the warm-up. Default: 4.
        budget_start: training step budget at the first equilibrium step. Default: None
            (the layer's ``max_steps`` throughout).
        budget_end: the budget at the last step. Default: None (the layer's ``max_steps``).

    Example:
        >>> import torch, deqkit as dk
        >>> layer = dk.nn.DEQ(lambda z, x: 0.5 * z + x, solver=dk.Picard(rtol=1e-8),
        ...                   max_steps=40)
        >>> plan = dk.nn.DEQSchedule(total_steps=10, unroll_steps=2, unroll_depth=3,
        ...                          budget_start=4, budget_end=12)
        >>> [plan.phase(t) for t in (0, 2, 9)]
        [('unrolled', 3), ('equilibrium', 4), ('equilibrium', 12)]
        >>> with plan.apply(layer, 0):
        ...     z = layer(torch.ones(1, 2))  # 1 + 0.5 + 0.25: three cell applications
        >>> z
        tensor([[1.7500, 1.7500]])
    """

    total_steps: int
    unroll_steps: int = 0
    unroll_depth: int = 4
    budget_start: int | None = None
    budget_end: int | None = None

    def __post_init__(self) -> None:
        check_int("DEQSchedule", "total_steps", self.total_steps, 1)
        check_int("DEQSchedule", "unroll_steps", self.unroll_steps, 0)
        check_int("DEQSchedule", "unroll_depth", self.unroll_depth, 1)
        check_int("DEQSchedule", "budget_start", self.budget_start, 1, none=True)
        check_int("DEQSchedule", "budget_end", self.budget_end, 1, none=True)
        if self.budget_end is not None and self.budget_start is None:
            raise ValueError(
                f"DEQSchedule: budget_end={self.budget_end} needs budget_start (the budget "
                "grows from budget_start to budget_end); pass both, or neither to keep the "
                "layer's max_steps.")

    def unrolled(self, step: int) -> bool:
        """Whether optimiser step ``step`` (0-based) is in the unrolled warm-up."""
        return step < self.unroll_steps

    def budget(self, step: int, max_steps: int) -> int:
        """The training step budget of equilibrium step ``step``; ``max_steps`` (the
        layer's) stands in for a missing ``budget_start``/``budget_end``."""
        if self.budget_start is None:
            return max_steps
        end = self.budget_end if self.budget_end is not None else max_steps
        span = max(1, self.total_steps - self.unroll_steps - 1)
        frac = min(1.0, max(0.0, (step - self.unroll_steps) / span))
        return max(1, round(self.budget_start + frac * (end - self.budget_start)))

    def phase(self, step: int, max_steps: int | None = None) -> tuple[str, int | None]:
        """``("unrolled", depth)`` or ``("equilibrium", budget)`` for step ``step``; the
        budget is the layer's ``max_steps`` (None if not given) when no ``budget_start`` is
        set."""
        if self.unrolled(step):
            return "unrolled", self.unroll_depth
        if self.budget_start is None or (self.budget_end is None and max_steps is None):
            return "equilibrium", max_steps
        return "equilibrium", self.budget(step, max_steps)  # type: ignore[arg-type]

    @contextlib.contextmanager
    def apply(self, deq: Any, step: int) -> Iterator[Any]:
        """Within the block, ``deq`` (a :class:`~deqkit.nn.DEQ`) is solved as step ``step``
        of the schedule says; its settings are restored on exit."""
        if self.unrolled(step):
            ctx = deq.overrides(solver=FixedSteps(Picard()), adjoint=UnrolledAdjoint(),
                                max_steps=self.unroll_depth)
        elif self.budget_start is not None:
            ctx = deq.overrides(max_steps=self.budget(step, deq.max_steps))
        else:
            ctx = contextlib.nullcontext(deq)
        with ctx as layer:
            yield layer


__all__ = ["DEQSchedule"]
