"""The primal solve handed to an adjoint: the problem, the solver and how to run it.

An adjoint (:class:`~deqkit.AbstractAdjoint`) receives a :class:`Primal` and decides how the
forward solve runs and how it is differentiated: :meth:`Primal.run` runs the iteration engine
(with autograd off, or recorded for unrolling, optionally keeping the last evaluation's
graph), :meth:`Primal.evaluate` evaluates f once more under autograd and :meth:`Primal.f`
applies f to a state. Every evaluation is counted in the solution's ``nfev``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from ._iterate import LoopOptions, LoopOutput, run_stages
from ._problem import Problem, known_separable, remember_separable
from .solvers._base import AbstractFixedPointSolver


class Primal:
    """A forward fixed-point solve, ready to be run by an adjoint.

    Attributes:
        problem: the normalised problem (flat map ``problem.fn(z, *args)`` on ``(B, D)``).
        solver: the fixed-point solver.
        options: the loop options of the call (``max_steps``, compaction, ...).
        differentiable: whether gradients were enabled when the solve was asked for; an
            adjoint attaches a gradient only then.
        output: the :class:`LoopOutput` of the latest :meth:`run` (None before).
        adjoint_cache: ``(cache, ids)`` from :func:`~deqkit.fixed_point`'s
            ``adjoint_cache`` (the samples' stored adjoint vectors), or None.
    """

    def __init__(self, problem: Problem, solver: AbstractFixedPointSolver,
                 options: LoopOptions, adjoint_cache: tuple[Any, Tensor] | None = None) -> None:
        self.problem, self.solver, self.options = problem, solver, options
        self.adjoint_cache = adjoint_cache
        self.differentiable = torch.is_grad_enabled()
        self.output: LoopOutput | None = None
        self.extra_nfev = 0  # evaluations made by the adjoint (evaluate, f)
        self.extra_rows = 0

    @property
    def args(self) -> tuple[Any, ...]:
        return self.problem.args

    @property
    def supports_unrolled(self) -> bool:
        """Whether the solver's steps are differentiable by autograd (``run(unrolled=True)``)."""
        return all(s.supports_unrolled for s, _ in self.solver.stages(self.options.max_steps))

    def run(self, *, graph: str | None = None, unrolled: bool = False,
            keep_inverse: bool = False) -> LoopOutput:
        """Run the forward solve and return its :class:`LoopOutput` (``value`` ``(B, D)``).

        ``graph="params"`` or ``"z"``: make the last evaluation the step budget allows under
        autograd (``"z"``: from a leaf state requiring grad); when every returned value is
        that iterate, ``output.last_eval = (z, f(z))`` carries it (else None).
        ``unrolled=True``: record the whole solve with autograd (no batch compaction).
        ``keep_inverse=True``: keep the solver's estimate of :math:`(I - J)^{-1}` at each
        returned value in ``output.inverse`` (``(U, V)``, each ``(B, D, n)``, ``M = I + U
        V^T``; None for solvers without one; see
        :meth:`~deqkit.AbstractFixedPointSolver.inverse_estimate`).
        """
        opts, prob = self.options, self.problem
        probe = opts.probe if not known_separable(prob.probe_key) else None
        opts = dataclasses.replace(opts, probe=probe, compact=opts.compact and not unrolled,
                                   keep_inverse=keep_inverse)
        if unrolled and not self.supports_unrolled:
            raise ValueError(
                f"{type(self.solver).__name__} cannot be differentiated by unrolling; use "
                "dk.Picard or dk.Anderson with dk.UnrolledAdjoint, or another adjoint."
            )
        with torch.set_grad_enabled(unrolled and self.differentiable), prob.no_autocast():
            out = run_stages(prob.fn, prob.z0, prob.args, self.solver, opts,
                             graph=graph if self.differentiable and not unrolled else None)
        if out.probed:
            remember_separable(prob.probe_key)
        self.output = out
        return out

    def evaluate(self, z: Tensor, *, leaf: bool = False) -> tuple[Tensor, Tensor]:
        """``(z_in, f(z_in))`` under autograd, ``z_in`` = ``z`` detached (a leaf requiring
        grad when ``leaf``): the graph reaches what f closes over and the tensors in args."""
        z_in = z.detach().requires_grad_() if leaf else z.detach()
        with torch.enable_grad():
            return z_in, self.f(z_in)

    def f(self, z: Tensor, *args: Any) -> Tensor:
        """``f(z, *args)`` on the flat view, with the call's args unless others are given
        (counted in ``nfev``)."""
        self.extra_nfev += 1
        self.extra_rows += z.shape[0]
        with self.problem.no_autocast():
            return self.problem.fn(z, *(args or self.problem.args))
