"""Result codes and the :class:`Solution` returned by every solve."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from torch import Tensor


class RESULTS(enum.Enum):
    """Outcome of a solve. Each member's ``message`` names the likely cause and a remedy.

    Per-sample codes are stored in ``sol.stats["status"]`` as ``int64`` using :attr:`code`.
    The batch result is the most severe per-sample code
    (``nonfinite`` > ``diverged`` > ``stagnated`` > ``max_steps_reached`` > ``successful``).

    Example:
        >>> import torch, deqkit as dk
        >>> sol = dk.fixed_point(lambda z: 2 * z + 1, torch.zeros(3, 1), solver=dk.Picard(),
        ...                      max_steps=50, throw=False)  # not a contraction
        >>> sol.result, sol.stats["status"].tolist()
        (<RESULTS.diverged: 3>, [3, 3, 3])
        >>> dk.RESULTS.from_code(1), dk.RESULTS.max_steps_reached.code
        (<RESULTS.max_steps_reached: 1>, 1)
        >>> dk.RESULTS.diverged.message.split(",")[0]
        'The residual ||f(z) - z|| grew far above the lowest value seen'
    """

    successful = 0
    max_steps_reached = 1
    stagnated = 2
    diverged = 3
    nonfinite = 4

    @property
    def code(self) -> int:
        return self.value

    @property
    def message(self) -> str:
        return _MESSAGES[self]

    @classmethod
    def from_code(cls, code: int) -> RESULTS:
        return cls(int(code))


_MESSAGES = {
    RESULTS.successful: "The solve converged for every sample.",
    RESULTS.max_steps_reached: (
        "The maximum number of steps was reached before the tolerance was met. "
        "The map may be only weakly contractive (spectral radius of df/dz close to 1) or the "
        "tolerance too tight for the dtype. Increase `max_steps`, loosen `rtol`/`atol`, use an "
        "accelerated solver (dk.Anderson, dk.Broyden), or regularise the model "
        "(spectral normalisation, Jacobian regularisation)."
    ),
    RESULTS.stagnated: (
        "The residual did not improve on its lowest value for `patience` steps: the iteration "
        "is oscillating or stuck (common when f is barely contractive or not contractive). "
        "Try dk.Anderson or dk.Broyden, damping (dk.Picard(damping=0.5), "
        "dk.Anderson(beta=0.5)), a fallback chain (dk.FallbackChain), or constrain f."
    ),
    RESULTS.diverged: (
        "The residual ||f(z) - z|| grew far above the lowest value seen, or the iterate ran "
        "off to a norm far beyond its start while the residual did not shrink (a map with no "
        "fixed point in reach, e.g. z + 1 or a root problem whose residual never vanishes): "
        "the iteration is diverging, which happens when f is not contractive (Lipschitz "
        "constant >= 1). Check that a fixed point exists (a bounded f, e.g. ending in tanh). "
        "Use damping (dk.Picard(damping=0.5)), a different solver (dk.Broyden, "
        "dk.NewtonKrylov), or constrain f (spectral normalisation, a monotone parametrisation)."
    ),
    RESULTS.nonfinite: (
        "f produced a non-finite value (NaN or inf) during the solve. The returned value for "
        "those samples is their last finite lowest-residual iterate. Check the inputs and the "
        "parameters for NaN/inf, lower the learning rate, or constrain f to be contractive."
    ),
}


class SolverError(RuntimeError):
    """Raised by a solve with ``throw=True`` that did not succeed for every sample.

    Example:
        >>> import torch, deqkit as dk
        >>> try:
        ...     dk.fixed_point(lambda z: 0.99 * z + 1, torch.zeros(2, 1), solver=dk.Picard(),
        ...                    max_steps=5)
        ... except dk.SolverError as err:
        ...     print(err.result)
        RESULTS.max_steps_reached
    """

    def __init__(self, result: RESULTS, detail: str = "") -> None:
        self.result = result
        text = f"deqkit solve failed ({result.name}): {result.message}"
        if detail:
            text = f"{text} [{detail}]"
        super().__init__(text)


@dataclasses.dataclass
class Solution:
    """What a solve returns.

    Attributes:
        value: the equilibrium ``z*`` with the structure of ``z0`` (tensor or tuple of tensors),
            differentiable as the adjoint defines.
        result: the batch :class:`RESULTS` member.
        stats: dictionary of statistics. Per-sample ``(B,)`` tensors: ``"nstep"`` (steps each
            sample used), ``"abs_residual"`` ``||f(z)-z||_2``, ``"rel_residual"``
            ``||f(z)-z|| / s`` with ``s`` the scale of the stopping test (``||f(z)||`` unless
            the iterate ran off; see :func:`~deqkit.fixed_point`), ``"converged"`` (bool),
            ``"status"`` (int codes of :class:`RESULTS`). Batch totals: ``"nfev"`` (batched
            calls of f), ``"nfev_samples"`` (sample-evaluations of f, lower than ``nfev * B``
            when converged samples were dropped from the batch; Newton-Krylov counts each
            Jacobian-vector product as one),
            ``"probe_nfev"`` (evaluations made by the batch-independence check of
            :func:`~deqkit.fixed_point`, not counted in ``nfev``: 2 on the first solve of a
            cell in which some samples finish before others, else 0). With
            ``trace=True``: ``"trace"`` of shape ``(steps, B)`` holding the absolute residual of
            every step (NaN after a sample stopped).
        backward: statistics of the backward pass, filled when it runs (implicit adjoint:
            ``"nstep"``, ``"residual"``, ``"converged"``, ``"nmatvec"``, ``"fallback"``).

    Example:
        >>> import torch, deqkit as dk
        >>> sol = dk.fixed_point(torch.cos, torch.zeros(4, 1, dtype=torch.float64),
        ...                      solver=dk.Anderson(rtol=1e-10, atol=0))
        >>> sol.converged, sol.stats["nstep"].shape, sorted(sol.stats)[:3]
        (True, torch.Size([4]), ['abs_residual', 'converged', 'nfev'])
        >>> print(sol.summary())  # doctest: +ELLIPSIS
        successful: 4/4 converged, steps mean ...
    """

    value: Any
    result: RESULTS
    stats: dict[str, Tensor]
    backward: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def converged(self) -> bool:
        """Whether every sample converged."""
        return self.result is RESULTS.successful

    def summary(self) -> str:
        """A one-line human summary of the solve."""
        s = self.stats
        nstep = s["nstep"].float()
        return (
            f"{self.result.name}: {int(s['converged'].sum())}/{s['converged'].numel()} converged, "
            f"steps mean {nstep.mean():.1f} max {int(s['nstep'].max())}, "
            f"rel residual max {float(s['rel_residual'].max()):.2e}, nfev {int(s['nfev'])}"
        )
