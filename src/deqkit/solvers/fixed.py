"""A fixed number of solver updates, with no tolerance test."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor

from ._base import AbstractFixedPointSolver, FlatFn
from .picard import Picard


@dataclasses.dataclass(frozen=True)
class FixedSteps(AbstractFixedPointSolver):
    """Run ``solver`` for exactly ``max_steps`` updates: no tolerance test, no early stop.

    A weight-tied network of fixed depth (``dk.FixedSteps(dk.Picard())`` with ``max_steps=L``
    is ``L`` applications of the cell), or a fixed compute budget. The residual of the
    returned value is still measured and reported (``stats["abs_residual"]``). No tolerance is
    claimed, so a sample that completes its steps is reported ``max_steps_reached`` (never
    ``successful``, never ``converged``), and ``throw=True`` raises only for a sample that became
    non-finite or (with ``divergence_ratio`` set) diverged. The returned value is the last
    iterate (not the lowest-residual one: that is what a fixed-depth network computes).

    Args:
        solver: the solver whose steps run (its tolerances are not used). Default:
            ``dk.Picard()``.

    Example:
        >>> import torch, deqkit as dk
        >>> x = torch.ones(1, 2, dtype=torch.float64)
        >>> sol = dk.fixed_point(lambda z: 0.5 * z + x, torch.zeros_like(x), dk.FixedSteps(),
        ...                      max_steps=3)
        >>> sol.value  # 1 + 0.5 + 0.25: three steps, whatever the residual
        tensor([[1.7500, 1.7500]], dtype=torch.float64)
    """

    solver: AbstractFixedPointSolver = dataclasses.field(default_factory=Picard)
    fixed_steps = True

    def __post_init__(self) -> None:
        if not isinstance(self.solver, AbstractFixedPointSolver) or self.solver.fixed_steps \
                or len(self.solver.stages(1)) != 1:
            raise TypeError(
                "FixedSteps: `solver` must be one deqkit solver such as dk.Picard() or "
                f"dk.Anderson(m=5) (not a chain), got {self.solver!r}."
            )

    @property
    def rtol(self) -> float:  # type: ignore[override]
        return 0.0

    @property
    def atol(self) -> float:  # type: ignore[override]
        return 0.0

    @property
    def supports_unrolled(self) -> bool:  # type: ignore[override]
        return self.solver.supports_unrolled

    def init(self, fn: FlatFn, z: Tensor, fz: Tensor, r: Tensor, max_steps: int) -> Any:
        return self.solver.init(fn, z, fz, r, max_steps)

    def step(self, fn: FlatFn, z: Tensor, fz: Tensor, r: Tensor,
             state: Any) -> tuple[Tensor, Tensor | None, Any]:
        return self.solver.step(fn, z, fz, r, state)

    def select(self, state: Any, index: Tensor) -> Any:
        return self.solver.select(state, index)
