"""A chain of solvers that retries the samples the previous one failed on."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor

from ._base import AbstractFixedPointSolver, FlatFn


@dataclasses.dataclass(frozen=True, init=False)
class FallbackChain(AbstractFixedPointSolver):
    """Try solvers in turn; each retries only the samples its predecessors failed on.

    ``dk.fixed_point(f, z0, solver=dk.FallbackChain(dk.Anderson(), dk.Broyden(),
    dk.Picard(damping=0.5)))`` first runs Anderson on the whole batch; samples that did not
    converge (max steps, stagnation, divergence, non-finite values) are restarted from their
    lowest-residual iterate with Broyden, and so on, each keeping the stopping test (and its
    scale) of the first attempt. When ``args`` are passed the retries run on the failed
    samples only; with a closure the whole batch is recomputed and only the failed samples'
    results are replaced. ``sol.stats["solver_index"]`` records which solver produced each
    sample's result and ``sol.stats["attempts"]`` how many solvers tried it; ``nfev``/
    ``nstep`` add up over the attempts. The residual ``trace`` covers the first solver only.
    Not differentiable by unrolling.

    The chain is a solver whose :meth:`stages` are its members; the engine runs them (it
    has no :meth:`step` of its own). Each member stops by its own tolerances.

    Args:
        *solvers: two or more solver objects, tried in order.
        max_steps: an optional per-solver step budget (a tuple of ints, one per solver);
            by default every solver gets the ``max_steps`` of the call.

    Reference: the "fallback solver" practice of robust nonlinear solvers, e.g. the hybrid
        strategies of Powell (1970), "A hybrid method for nonlinear equations"; here per sample.

    Example:
        >>> import torch, deqkit as dk
        >>> chain = dk.FallbackChain(dk.Picard(rtol=1e-8), dk.Anderson(rtol=1e-8),
        ...                          max_steps=(5, 50))
        >>> b = torch.ones(2, 3)
        >>> sol = dk.fixed_point(lambda z: 0.9 * z + b, torch.zeros_like(b), chain)
        >>> sol.stats["solver_index"].tolist()  # Picard ran out of steps, Anderson finished
        [1, 1]
    """

    solvers: tuple[AbstractFixedPointSolver, ...]
    max_steps: tuple[int, ...] | None
    supports_unrolled = False

    def __init__(
        self, *solvers: AbstractFixedPointSolver, max_steps: tuple[int, ...] | None = None
    ) -> None:
        if len(solvers) < 2:
            raise ValueError(
                f"FallbackChain needs at least two solvers, got {len(solvers)}; pass e.g. "
                "FallbackChain(dk.Anderson(), dk.Broyden())."
            )
        for i, s in enumerate(solvers):
            if not isinstance(s, AbstractFixedPointSolver) or isinstance(s, FallbackChain):
                raise TypeError(
                    f"FallbackChain: solver {i} must be a deqkit solver object (not a chain), "
                    f"got {type(s).__name__}."
                )
        if max_steps is not None:
            if not isinstance(max_steps, tuple) or len(max_steps) != len(solvers):
                raise ValueError(
                    f"FallbackChain: `max_steps` must be a tuple with one int per solver "
                    f"({len(solvers)}), got {max_steps!r}."
                )
            for m in max_steps:
                if isinstance(m, bool) or not isinstance(m, int) or m < 0:
                    raise ValueError(f"FallbackChain: `max_steps` entries must be ints >= 0, "
                                     f"got {max_steps!r}.")
        object.__setattr__(self, "solvers", tuple(solvers))
        object.__setattr__(self, "max_steps", max_steps)

    def stages(self, max_steps: int) -> tuple[tuple[AbstractFixedPointSolver, int], ...]:
        budgets = self.max_steps or (max_steps,) * len(self.solvers)
        return tuple(zip(self.solvers, budgets))

    @property
    def rtol(self) -> float:  # type: ignore[override]
        """The first solver's (each member stops by its own tolerances)."""
        return self.solvers[0].rtol

    @property
    def atol(self) -> float:  # type: ignore[override]
        return self.solvers[0].atol

    def step(self, fn: FlatFn, z: Tensor, fz: Tensor, r: Tensor, state: Any) -> Any:
        raise TypeError("FallbackChain runs its solvers in turn (its stages); it has no step.")
