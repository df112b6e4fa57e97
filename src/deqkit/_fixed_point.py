"""``fixed_point``: the functional front door of deqkit.

It normalises the problem once (:mod:`deqkit._problem`), hands the solve to the adjoint, which
runs the iteration engine and attaches its gradient (:mod:`deqkit._primal`), and reports the
result as a :class:`~deqkit.Solution`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch

from ._checks import check_float, check_int
from ._flatten import State
from ._iterate import LoopOptions, LoopOutput
from ._primal import Primal
from ._problem import ToleranceWarning, check_z0, make_problem
from ._solution import RESULTS, Solution, SolverError
from .adjoint._base import AbstractAdjoint, UnsupportedTransformError
from .adjoint._transform import solve_under_transform, transform_active
from .adjoint.implicit import BackwardSolveWarning, ImplicitAdjoint
from .solvers._base import AbstractFixedPointSolver
from .solvers.anderson import Anderson
from .solvers.broyden import Broyden
from .solvers.newton_krylov import NewtonKrylov
from .solvers.picard import Picard

__all__ = ["ToleranceWarning", "fixed_point", "resolve_adjoint", "resolve_solver",
           "warn_deprecated"]

_SOLVER_NAMES: dict[str, type[AbstractFixedPointSolver]] = {
    "picard": Picard,
    "anderson": Anderson,
    "broyden": Broyden,
    "newton_krylov": NewtonKrylov,
}


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn_deprecated(message: str) -> None:
    """Emit a ``DeprecationWarning`` attributed to the first caller outside deqkit (so that it
    is shown for the user's line, whichever layer of the library resolved the argument)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, DeprecationWarning, stacklevel=level)


def resolve_solver(solver: AbstractFixedPointSolver | str | None) -> AbstractFixedPointSolver:
    """Turn ``None``/a solver object (or a deprecated name) into a solver object."""
    if solver is None:
        return Anderson()
    if isinstance(solver, str):
        # Backward compatibility: solver names (deprecated; names become objects only in
        # deqkit.app.names). To be removed in the next release.
        key = solver.lower().replace("-", "_")
        if key not in _SOLVER_NAMES:
            raise ValueError(
                f"Unknown solver {solver!r}; pass a solver object such as dk.Anderson(m=5) "
                f"(the deprecated names are {sorted(_SOLVER_NAMES)})."
            )
        cls = _SOLVER_NAMES[key]
        warn_deprecated(
            f"solver={solver!r} is deprecated and will be removed in the next release; pass "
            f"the solver object solver=dk.{cls.__name__}() instead."
        )
        return cls()  # ~Backward compatibility
    if not isinstance(solver, AbstractFixedPointSolver):
        raise TypeError(
            "`solver` must be a deqkit solver such as dk.Anderson() or dk.Picard(), got "
            f"{type(solver).__name__}."
        )
    return solver


def resolve_adjoint(adjoint: AbstractAdjoint | None) -> AbstractAdjoint:
    """Turn ``None``/an adjoint object into an adjoint object (``ImplicitAdjoint()`` default)."""
    if adjoint is None:
        return ImplicitAdjoint()
    if not isinstance(adjoint, AbstractAdjoint):
        raise TypeError(
            "`adjoint` must be a deqkit adjoint such as dk.ImplicitAdjoint(dk.GMRES()), "
            f"dk.JacobianFreeAdjoint(), dk.PhantomAdjoint() or dk.UnrolledAdjoint(); got "
            f"{type(adjoint).__name__}."
        )
    return adjoint


def _options(max_steps: int, args: tuple[Any, ...], compact: bool | None, compact_ratio: float,
             divergence_ratio: float | None, patience: int | None, trace: bool) -> LoopOptions:
    check_int("", "max_steps", max_steps, 0)
    check_int("", "patience", patience, none=True)
    check_float("", "compact_ratio", compact_ratio, gt=0, le=1)
    check_float("", "divergence_ratio", divergence_ratio, gt=1, none=True)
    return LoopOptions(
        max_steps=max_steps, compact=bool(len(args) > 0 if compact is None else compact),
        compact_ratio=float(compact_ratio), divergence_ratio=divergence_ratio,
        patience=patience, trace=bool(trace),
    )


def fixed_point(
    f: Callable[..., State],
    z0: State,
    solver: AbstractFixedPointSolver | str | None = None,
    adjoint: AbstractAdjoint | None = None,
    max_steps: int = 50,
    *,
    args: tuple[Any, ...] = (),
    throw: bool = True,
    trace: bool = False,
    compact: bool | None = None,
    compact_ratio: float = 0.75,
    divergence_ratio: float | None = 1e4,
    patience: int | None = None,
    adjoint_cache: tuple[Any, torch.Tensor] | None = None,
) -> Solution:
    r"""Find :math:`z^\star = f(z^\star)` for a batch of independent problems, differentiably.

    The forward solve runs without building an autograd graph; the gradient of
    :math:`z^\star` with respect to everything ``f`` closes over (parameters and inputs, not
    ``z0``) is given by ``adjoint``. With the default :class:`~deqkit.ImplicitAdjoint` it is the
    implicit-function-theorem gradient

    .. math::
        \frac{\partial \ell}{\partial \theta}
        = u^\top \frac{\partial f(z^\star,\theta)}{\partial \theta},
        \qquad \big(I - J_f(z^\star)^\top\big)\, u = \frac{\partial \ell}{\partial z^\star},

    whose memory does not depend on the number of forward iterations (Bai, Kolter, Koltun,
    "Deep Equilibrium Models", NeurIPS 2019).

    Stopping is per sample. Sample :math:`b` has converged at iterate :math:`z_k` when its
    residual :math:`r_k = f(z_k) - z_k` is finite and

    .. math::
        \|r_k\| \le \text{atol} + \text{rtol}\; s_k, \qquad
        s_k = \min\Big(\|f(z_k)\|,\ \max\big(s_0,\ s_0 \tfrac{\|r_0\|}{\|r_k\|}\big)\Big),
        \qquad s_0 = \max(\|z_0\|, \|f(z_0)\|)

    (tolerances on the solver; norms over the sample's features). The scale is the usual
    :math:`\|f(z_k)\|` unless the iterate has grown beyond its starting size :math:`s_0` by
    more than its residual has shrunk: an iterate running off to a large norm with a residual
    that does not vanish (a map with no fixed point, e.g. ``z + 1``) cannot meet the test by
    inflating :math:`\|f(z_k)\|`. ``stats["rel_residual"]`` is :math:`\|r_k\| / s_k`, the
    quantity compared with ``rtol``. A sample also stops when its residual is non-finite
    (``nonfinite``), grows above ``divergence_ratio`` times its lowest value, or its
    :math:`\|f(z_k)\|` exceeds ``divergence_ratio`` times the bound
    :math:`\max(s_0, s_0\|r_0\|/\|r_k\|)` (both ``diverged``). A sample that stops keeps its
    value; one that never converges returns its lowest-residual iterate (the last finite one),
    and the returned residuals are those of the returned values.

    Samples must be independent: row :math:`b` of ``f``'s output may depend only on row
    :math:`b` of ``z`` and of ``args``. The first time some samples finish while others go on,
    ``f`` is evaluated once more with the finished rows changed and a
    :class:`ValueError` is raised if the other rows' outputs move (batch statistics,
    ``z.mean(0)``, per-sample tensors captured in a closure); this check runs once per cell
    (module, function or method) and mode, not on every solve.

    Args:
        f: the map. Called as ``f(z, *args)`` with ``z`` shaped like ``z0`` (a tensor or a
            tuple of tensors, leading batch dimension ``B``); must return the same structure.
            Samples must be independent (no batch statistics such as BatchNorm).
        z0: initial guess; a tensor of shape ``(B, ...)`` with at least one feature
            dimension, or a tuple of tensors with leading batch dimension ``B >= 1``.
        solver: a solver object (:class:`~deqkit.Anderson` by default; also a
            :class:`~deqkit.FallbackChain` of solvers, or :class:`~deqkit.FixedSteps` for
            exactly ``max_steps`` updates). The names ``"picard"``, ``"anderson"``,
            ``"broyden"``, ``"newton_krylov"`` are deprecated (``DeprecationWarning``; pass
            ``dk.Picard()`` etc.).
        adjoint: how the solve is run and differentiated (its :meth:`~deqkit.AbstractAdjoint.solve`
            runs the loop). Default: ``ImplicitAdjoint(GMRES())``.
        max_steps: maximum number of solver updates; f is evaluated at most ``max_steps + 1``
            times by Picard/Anderson. Default: 50.
        args: per-sample inputs passed to ``f`` after ``z``: tensors with leading batch
            dimension ``B``, also inside tuples, lists and dicts (sliced with the batch), and
            non-tensor values (passed as they are). Passing inputs here rather than closing
            over them lets the driver drop converged samples from the batch so they stop
            costing compute.
        throw: raise :class:`~deqkit.SolverError` when some sample fails. Default: True.
        trace: record the residual of every step in ``stats["trace"]``. Default: False.
        compact: drop finished samples from the working batch (needs ``args`` to slice).
            Default ``None``: on when ``args`` is given.
        compact_ratio: compact when the unfinished samples are at most this fraction of the
            working batch. Default: 0.75.
        divergence_ratio: a sample whose residual exceeds this multiple of its lowest residual,
            or whose iterate runs off (see above), is stopped as ``diverged``; ``None``
            disables both tests. Default: 1e4.
        patience: stop a sample as ``stagnated`` when its lowest residual has not improved for
            this many consecutive steps (oscillation or stagnation); ``None`` disables the
            test. Default: None.
        adjoint_cache: ``(cache, ids)``: start the implicit backward solve of sample ``b``
            from the adjoint vector stored under ``ids[b]`` (best multiple of it, one extra
            product; see :class:`~deqkit.nn.FixedPointCache`, used here to keep adjoint
            vectors) and store the new one when its solve converged. The same sample's
            adjoint changes slowly across epochs, so a training loop that revisits its data
            may need fewer products; the tolerance is unchanged. Needs an adjoint that uses
            it (:class:`~deqkit.ImplicitAdjoint`). Default: None.

    Returns:
        A :class:`~deqkit.Solution` with ``value``, ``result``, ``stats``.

    Raises:
        SolverError: with ``throw=True`` when some sample did not converge.
        ValueError, TypeError: on invalid arguments.

    Example:
        >>> import torch, deqkit as dk
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <...>
        >>> W = torch.randn(4, 4, dtype=torch.float64)
        >>> W = 0.5 * W / torch.linalg.matrix_norm(W, 2)
        >>> x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
        >>> sol = dk.fixed_point(lambda z: torch.tanh(z @ W.T + x), torch.zeros(3, 4,
        ...                      dtype=torch.float64), solver=dk.Anderson(rtol=1e-10, atol=0))
        >>> sol.result
        <RESULTS.successful: 0>
        >>> sol.value.sum().backward()  # implicit gradient w.r.t. x
        >>> x.grad.shape
        torch.Size([3, 4])
    """
    solver = resolve_solver(solver)
    adjoint = resolve_adjoint(adjoint)
    opts = _options(max_steps, args, compact, compact_ratio, divergence_ratio, patience, trace)
    transformed = transform_active()  # torch.func: the whole solve is one Function
    problem = make_problem(f, z0, args, solver, max_steps, check_values=not transformed)
    _check_adjoint_cache(adjoint_cache, adjoint, problem.z0.shape[0])
    # the batch-independence probe: a row may move by a few times sqrt(eps) (rounding only)
    opts = dataclasses.replace(opts, probe=4.0 * math.sqrt(problem.eps), eps=problem.eps)
    backward: dict[str, Any] = {}
    if transformed:
        primal, value = _under_transform(problem, solver, adjoint, opts, backward)
    else:
        primal = Primal(problem, solver, opts, adjoint_cache)
        value = adjoint.solve(primal, backward)
    if primal.output is None:
        raise RuntimeError(f"{type(adjoint).__name__}.solve did not run the solve "
                           "(call primal.run()).")
    sol = _solution(primal, primal.output, value, backward)
    # a fixed-step solve (no tolerance test) that completed its steps has nothing to fail
    completed = solver.fixed_steps and sol.result is RESULTS.max_steps_reached
    if throw and sol.result is not RESULTS.successful and not completed:
        raise _solver_error(sol, primal.output, solver, max_steps)
    return sol


def _under_transform(problem: Any, solver: AbstractFixedPointSolver, adjoint: AbstractAdjoint,
                     opts: LoopOptions, backward: dict[str, Any]) -> tuple[Primal, Any]:
    """The solve inside ``torch.func`` transforms (see :mod:`deqkit.adjoint._transform`);
    returns the primal to report (the worst of the ``vmap`` slices) and the flat value."""
    if not isinstance(adjoint, ImplicitAdjoint):
        raise UnsupportedTransformError(
            f"{type(adjoint).__name__} under a torch.func transform: only dk.ImplicitAdjoint "
            "defines the derivatives of a solve inside vmap/grad/jvp/jacrev/jacfwd/hessian. "
            "Use it, or torch.autograd (forward_ad, create_graph) with this adjoint.")
    opts = dataclasses.replace(opts, compact=False)

    def run(prob: Any) -> Primal:
        check_z0(prob.z0)
        primal = Primal(prob, solver, opts)
        primal.run()
        return primal

    value, record = solve_under_transform(problem, adjoint, run, backward,
                                          BackwardSolveWarning)
    worst = max(record, key=lambda p: int(p.output.status.max()) if p.output.status.numel()
                else 0)
    return worst, value


def _check_adjoint_cache(cache: Any, adjoint: AbstractAdjoint, batch: int) -> None:
    """``adjoint_cache`` is None or ``(cache, ids)`` with ``batch`` integer ids, for an
    adjoint that uses it."""
    if cache is None:
        return
    ok = (isinstance(cache, tuple) and len(cache) == 2
          and callable(getattr(cache[0], "initial", None))
          and callable(getattr(cache[0], "update", None)))
    if not ok:
        raise TypeError(
            "fixed_point: `adjoint_cache` must be a pair (cache, ids), e.g. "
            "(dk.nn.FixedPointCache(len(train_set)), batch_ids); got "
            f"{type(cache).__name__}.")
    ids = cache[1]
    if (not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64)
            or tuple(ids.shape) != (batch,)):
        got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(
            f"fixed_point: the ids of `adjoint_cache` must be an integer tensor of shape "
            f"({batch},), one id per sample of the batch; got {got}.")
    if not type(adjoint).uses_adjoint_cache:
        raise ValueError(
            f"fixed_point: `adjoint_cache` needs an adjoint with a backward solve to start, "
            f"such as dk.ImplicitAdjoint(); {type(adjoint).__name__} does not use it. Drop "
            "adjoint_cache or change the adjoint.")


def _solution(primal: Primal, loop: LoopOutput, value: torch.Tensor,
              backward: dict[str, Any]) -> Solution:
    status = loop.status
    stats: dict[str, Any] = {
        "nstep": loop.nstep,
        "abs_residual": loop.abs_residual,
        "rel_residual": loop.rel_residual,
        "converged": status == RESULTS.successful.code,
        "status": status,
        "nfev": torch.tensor(loop.nfev + primal.extra_nfev),
        "nfev_samples": torch.tensor(loop.nfev_samples + primal.extra_rows),
        "probe_nfev": torch.tensor(2 if loop.probed else 0),
        **loop.extra,
    }
    if loop.trace is not None:
        stats["trace"] = loop.trace
    worst = int(status.max()) if status.numel() else 0
    return Solution(value=primal.problem.unflatten(value), result=RESULTS.from_code(worst),
                    stats=stats, backward=backward)


def _solver_error(sol: Solution, loop: LoopOutput, solver: AbstractFixedPointSolver,
                  max_steps: int) -> SolverError:
    nbad = int((~sol.stats["converged"]).sum())
    worst = float(loop.rel_residual.nan_to_num(float("inf")).max())
    return SolverError(
        sol.result,
        f"{nbad}/{loop.status.numel()} samples failed; worst rel residual {worst:.3e}; "
        f"solver {solver}, max_steps={max_steps}. Pass throw=False to inspect sol.result "
        "and sol.stats",
    )
