r"""The unrolled solver loss of :func:`~deqkit.hyperdeq.train_hyper_solver` (HyperDEQ).

Bai, Koltun, Kolter, "Neural Deep Equilibrium Solvers", ICLR 2022: a solver is trained on
its own quality, the residuals along ``k`` unrolled steps from the learned initial state.
The steps run in the core iteration engine (:func:`deqkit._iterate.iterate`): the solver is
wrapped in :class:`_Observed`, which adds each iterate's loss term from the residual the
engine hands to the step, and in :class:`~deqkit.FixedSteps` (exactly ``k`` updates).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .._iterate import LoopOptions, iterate
from ..solvers._base import AbstractFixedPointSolver, FlatFn
from ..solvers.fixed import FixedSteps

_TAU = 0.25  # smoothing (decades) of the hinge of loss="tolerance"


@dataclasses.dataclass(frozen=True)
class _Observed(AbstractFixedPointSolver):
    """``solver``, with ``observe(z, f(z), r)`` called before each of its steps."""

    solver: AbstractFixedPointSolver
    observe: Callable[[Tensor, Tensor, Tensor], None]

    @property
    def rtol(self) -> float:  # type: ignore[override]
        return self.solver.rtol

    @property
    def atol(self) -> float:  # type: ignore[override]
        return self.solver.atol

    def init(self, fn: FlatFn, z: Tensor, fz: Tensor, r: Tensor, max_steps: int) -> Any:
        return self.solver.init(fn, z, fz, r, max_steps)

    def step(self, fn: FlatFn, z: Tensor, fz: Tensor, r: Tensor,
             state: Any) -> tuple[Tensor, Tensor | None, Any]:
        self.observe(z, fz, r)
        return self.solver.step(fn, z, fz, r, state)

    def select(self, state: Any, index: Tensor) -> Any:
        return self.solver.select(state, index)


@dataclasses.dataclass(frozen=True)
class UnrolledLoss:
    r"""The loss of ``k`` unrolled solver steps from :math:`z^{[0]}`:

    .. math::
        \mathcal L = \sum_{i=0}^{k} \ell\Big(\frac{\|f(z^{[i]}) - z^{[i]}\|}
        {\|f(z^{[i]})\|}\Big)
        + w_0 \frac{\|z^{[0]} - z^\star\|}{\|z^\star\|}
        + w_z \sum_{i=1}^{k} \frac{\|z^{[i]} - z^\star\|}{\|z^\star\|},

    averaged over the batch, :math:`\ell` given by ``kind`` (see
    :func:`~deqkit.hyperdeq.train_hyper_solver`).
    """

    kind: str  # "relative", "log" or "tolerance"
    log_tols: tuple[float, ...]  # log10 of the target tolerances (kind="tolerance")
    init_weight: float  # w_0
    target_weight: float  # w_z

    def residual_term(self, r: Tensor, fz: Tensor) -> Tensor:
        r""":math:`\ell(\|r\| / \|f(z)\|)` per sample, ``r = f(z) - z``."""
        rel = torch.linalg.vector_norm(r, dim=1) / torch.linalg.vector_norm(
            fz, dim=1
        ).clamp_min(1e-12)
        if self.kind == "log":
            return rel.clamp_min(1e-12).log()
        if self.kind == "tolerance":
            lr10 = rel.clamp_min(1e-12).log10()
            return sum(_TAU * F.softplus((lr10 - lt) / _TAU) for lt in self.log_tols)
        return rel

    def __call__(self, cell: Callable[..., Tensor], solver: AbstractFixedPointSolver,
                 z0: Tensor, xs: tuple[Tensor, ...], k: int,
                 z_star: Tensor | None) -> Tensor:
        """The loss (a scalar with its graph) of ``k`` steps of ``solver`` on
        ``cell(z, *xs)`` from ``z0`` (B, ...), through ``z0`` and the solver's parameters;
        ``z_star`` (shaped like ``z0``) is needed when a weight is non-zero."""
        shape = z0.shape
        z = z0.reshape(shape[0], -1)
        dist = _distance(z_star, shape[0])
        acc = [z.new_zeros(()), 0]  # the running total, the iterate's index
        if self.init_weight > 0:
            acc[0] = acc[0] + self.init_weight * dist(z).mean()

        def observe(zi: Tensor, fz: Tensor, r: Tensor) -> None:
            acc[0] = acc[0] + self.residual_term(r, fz).mean()
            if self.target_weight > 0 and acc[1] > 0:
                acc[0] = acc[0] + self.target_weight * dist(zi).mean()
            acc[1] += 1

        last: list[tuple[Tensor, Tensor]] = []

        def fn(zf: Tensor, *a: Tensor) -> Tensor:
            fz = cell(zf.view(shape), *a).reshape(shape[0], -1)
            last[:] = [(zf, fz)]
            return fz

        opts = LoopOptions(max_steps=k, compact=False, divergence_ratio=None)
        with torch.enable_grad():
            iterate(fn, z, xs, FixedSteps(_Observed(solver, observe)), opts)
            zk, fzk = last[0]  # the last iterate has no step: its terms are added here
            observe(zk, fzk, fzk - zk)
        return acc[0]


def _distance(z_star: Tensor | None, batch: int) -> Callable[[Tensor], Tensor]:
    r"""``z -> ||z - z*|| / ||z*||`` per sample (flat ``(B, D)`` ``z``)."""
    if z_star is None:
        def missing(z: Tensor) -> Tensor:
            raise ValueError("UnrolledLoss: a non-zero weight needs `z_star`.")
        return missing
    zs = z_star.reshape(batch, -1)
    zs_norm = torch.linalg.vector_norm(zs, dim=1).clamp_min(1e-12)
    return lambda z: torch.linalg.vector_norm(z - zs, dim=1) / zs_norm


__all__ = ["UnrolledLoss"]
