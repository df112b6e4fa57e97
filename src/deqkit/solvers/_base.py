"""The solver protocol shared by every fixed-point solver."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

FlatFn = Callable[[Tensor], Tensor]


class AbstractFixedPointSolver(abc.ABC):
    """Base class of fixed-point solvers for ``z = f(z)`` on a ``(B, D)`` batch.

    A solver is a small immutable configuration (tolerances live on it) plus two methods that
    the driver loop (:func:`deqkit.fixed_point`) calls; the driver owns stopping, statistics,
    the non-finite and divergence checks, per-sample bookkeeping and batch compaction.

    * :meth:`init` builds the solver state from the first iterate.
    * :meth:`step` receives the current iterate ``z``, ``fz = f(z)`` and the residual
      ``r = fz - z`` (all ``(W, D)``, ``W`` the rows still in the working batch) and returns
      ``(z_next, fz_next, state)``; ``fz_next`` is ``f(z_next)`` when the solver already
      evaluated it (e.g. in a line search), else ``None`` and the driver evaluates it.
    * :meth:`select` keeps only some rows of the state when the driver drops converged
      samples from the working batch. The default handles dataclass states whose tensors
      have the batch as first dimension.

    Sample ``b`` has converged when ``||f(z_b) - z_b||_2 <= atol + rtol * s_b``, with the
    scale ``s_b = ||f(z_b)||_2`` unless the iterate ran off (the rule is the driver's, the same
    for every solver, including yours; see :func:`deqkit.fixed_point`).

    To write your own solver, subclass this, declare ``rtol`` and ``atol`` fields (a frozen
    dataclass is the convention) and implement :meth:`step`; keep per-sample quantities in the
    state with the batch first, so that compaction works.

    Example:
        >>> import dataclasses, torch, deqkit as dk
        >>> @dataclasses.dataclass(frozen=True)
        ... class HalfStep(dk.AbstractFixedPointSolver):
        ...     rtol: float = 1e-10
        ...     atol: float = 0.0
        ...     def step(self, fn, z, fz, r, state):
        ...         return z + 0.5 * r, None, state  # the driver evaluates f at the new iterate
        >>> sol = dk.fixed_point(torch.cos, torch.zeros(3, 1, dtype=torch.float64),
        ...                      solver=HalfStep(), max_steps=100)
        >>> sol.result, round(float(sol.value[0]), 6)
        (<RESULTS.successful: 0>, 0.739085)
    """

    rtol: float
    atol: float

    #: Whether :meth:`step` is differentiable with autograd (needed by ``UnrolledAdjoint``).
    supports_unrolled: bool = True
    #: A solver with no tolerance test runs exactly ``max_steps`` updates (see FixedSteps).
    fixed_steps: bool = False

    def stages(self, max_steps: int) -> tuple[tuple[AbstractFixedPointSolver, int], ...]:
        """``((solver, step budget), ...)`` run in turn by the engine, each on the samples the
        ones before failed (:class:`~deqkit.FallbackChain`); an ordinary solver is one
        stage, itself with the call's ``max_steps``."""
        return ((self, max_steps),)

    def init(self, fn: FlatFn, z: Tensor, fz: Tensor, r: Tensor, max_steps: int) -> Any:
        """Build the initial state. The default has no state."""
        return None

    @abc.abstractmethod
    def step(
        self, fn: FlatFn, z: Tensor, fz: Tensor, r: Tensor, state: Any
    ) -> tuple[Tensor, Tensor | None, Any]:
        """One update. See the class docstring."""

    def select(self, state: Any, index: Tensor) -> Any:
        """Keep rows ``index`` of every batch-first tensor of a dataclass state."""
        return select_rows(state, index)

    def inverse_estimate(self, state: Any, rows: Tensor) -> tuple[Tensor, Tensor] | None:
        r"""Low-rank factors ``(U, V)``, each ``(len(rows), D, n)``, of the solver's estimate

        .. math:: M = I + U V^\top \approx (I - J)^{-1}, \qquad J = \partial f/\partial z,

        for the working rows ``rows`` of ``state`` (so :math:`M^\top = I + V U^\top`
        approximates :math:`(I - J^\top)^{-1}`, the implicit backward system's inverse).
        Quasi-Newton solvers build such an estimate as they go; an adjoint may reuse it
        (:class:`~deqkit.SHINEAdjoint`, ``ImplicitAdjoint(reuse_forward=True)``). The engine
        asks for it when a sample's final value is recorded, only with
        ``LoopOptions.keep_inverse``. Returned tensors must be new (not views of a state that
        later steps overwrite). Default: None (no estimate)."""
        return None


def provides_inverse_estimate(solver: AbstractFixedPointSolver) -> bool:
    """Whether ``solver`` overrides :meth:`AbstractFixedPointSolver.inverse_estimate` (wrappers
    such as ``FallbackChain`` and ``FixedSteps`` do not)."""
    return type(solver).inverse_estimate is not AbstractFixedPointSolver.inverse_estimate


def select_rows(state: Any, index: Tensor) -> Any:
    if state is None:
        return None
    if dataclasses.is_dataclass(state):
        changes = {}
        for field in dataclasses.fields(state):
            value = getattr(state, field.name)
            if isinstance(value, Tensor) and value.dim() >= 1 and field.metadata.get("batch", True):
                changes[field.name] = value.index_select(0, index)
        return dataclasses.replace(state, **changes)
    raise TypeError(
        f"Cannot compact a solver state of type {type(state).__name__}: override "
        "`select(state, index)` in the solver, or pass compact=False to fixed_point."
    )


def put_slot(buf: Tensor, slot: int, value: Tensor) -> Tensor:
    """Write ``value`` (W, D) into ``buf[:, slot]``: in place normally, out of place when the
    write must stay differentiable (unrolled solves), so autograd's saved tensors stay valid."""
    if torch.is_grad_enabled() and (value.requires_grad or buf.requires_grad):
        idx = torch.tensor([slot], device=buf.device)
        return buf.index_copy(1, idx, value.unsqueeze(1))
    buf[:, slot].copy_(value)
    return buf
