"""``fixed_point``: the functional front door of deqkit."""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._flatten import (
    State,
    all_finite,
    check_args,
    check_output,
    flat_fn,
    flatten,
    make_layout,
    slice_args,
    unflatten,
)
from ._iterate import LoopOutput, iterate
from ._solution import RESULTS, Solution, SolverError
from .adjoint._base import AbstractAdjoint
from .adjoint.implicit import ImplicitAdjoint
from .solvers._base import AbstractFixedPointSolver
from .solvers.anderson import Anderson
from .solvers.broyden import Broyden
from .solvers.fallback import FallbackChain
from .solvers.newton_krylov import NewtonKrylov
from .solvers.picard import Picard

_SOLVER_NAMES: dict[str, type[AbstractFixedPointSolver]] = {
    "picard": Picard,
    "anderson": Anderson,
    "broyden": Broyden,
    "newton_krylov": NewtonKrylov,
}


def resolve_solver(
    solver: AbstractFixedPointSolver | FallbackChain | str | None,
) -> AbstractFixedPointSolver | FallbackChain:
    """Turn ``None``/a string shorthand/a solver object into a solver object."""
    if solver is None:
        return Anderson()
    if isinstance(solver, FallbackChain):
        return solver
    if isinstance(solver, str):
        key = solver.lower().replace("-", "_")
        if key not in _SOLVER_NAMES:
            raise ValueError(
                f"Unknown solver {solver!r}; choose one of {sorted(_SOLVER_NAMES)} or pass a "
                "solver object such as dk.Anderson(m=5)."
            )
        return _SOLVER_NAMES[key]()
    if not isinstance(solver, AbstractFixedPointSolver):
        raise TypeError(
            "`solver` must be a deqkit solver (e.g. dk.Anderson(), dk.Picard()) or one of "
            f"{sorted(_SOLVER_NAMES)}, got {type(solver).__name__}."
        )
    return solver


def _autocast_split(device_type: str) -> tuple[torch.dtype | None, Any]:
    """``(dtype, off)``: the active autocast dtype for ``device_type`` (None when autocast is
    off) and a context manager factory that disables autocast for the solver's own algebra."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        enabled = torch.is_autocast_enabled() if device_type == "cuda" else (
            torch.is_autocast_cpu_enabled())
    if not enabled:
        return None, contextlib.nullcontext
    dtype = torch.get_autocast_dtype(device_type)
    return dtype, lambda: torch.autocast(device_type, enabled=False)


class ToleranceWarning(UserWarning):
    """The solver tolerance is below what the cell's floating-point precision can reach.

    Raised once per :func:`fixed_point` call when ``max(rtol, atol)`` is below the machine
    epsilon of a half-precision cell (bfloat16: 2^-7, float16: 2^-10, also under autocast):
    such a solve cannot meet its tolerance and would cycle until ``max_steps``.

    Example:
        >>> import warnings, torch, deqkit as dk
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     sol = dk.fixed_point(torch.cos, torch.zeros(2, 1, dtype=torch.bfloat16),
        ...                          solver=dk.Picard(rtol=1e-6, atol=0), throw=False)
        >>> caught[0].category.__name__
        'ToleranceWarning'
    """


def _check_tolerance_precision(
    solver: Any, layout_dtypes: tuple[torch.dtype, ...], amp_dtype: torch.dtype | None
) -> None:
    """Warn when both tolerances are below the unit roundoff of a half-precision (bfloat16,
    float16) dtype the cell computes in, directly or under autocast.

    The iterates then move on the grid of that dtype: the solve either stalls/cycles until
    max_steps or stops at a fixed point of the *rounded* map, which is no closer than ~eps to
    the exact equilibrium, so the tighter tolerance buys no accuracy."""
    dtypes = [dt for dt in layout_dtypes if dt.is_floating_point]
    if amp_dtype is not None:
        dtypes.append(amp_dtype)
    if not dtypes:
        return
    cell_dtype = max(dtypes, key=lambda dt: torch.finfo(dt).eps)  # the least precise one
    eps = torch.finfo(cell_dtype).eps
    if eps < 1e-4:
        # float32/float64: tolerances below eps are a deliberate choice (e.g. forcing a fixed
        # number of steps); the pitfall this guards against is half precision.
        return
    solvers = solver.solvers if isinstance(solver, FallbackChain) else (solver,)
    for s in solvers:
        rtol, atol = float(s.rtol), float(s.atol)
        if max(rtol, atol) < eps:
            suggest = 10 ** math.ceil(math.log10(eps))
            warnings.warn(
                f"{type(s).__name__}(rtol={rtol:g}, atol={atol:g}) is below the precision of a "
                f"cell computing in {cell_dtype} (eps = {eps:.2g}): the iterates differ from "
                "the exact equilibrium by about eps whatever the tolerance, and the solve may "
                f"cycle until max_steps. Use rtol >= {suggest:g} for this dtype, or compute the "
                "cell in a wider dtype.",
                ToleranceWarning,
                stacklevel=3,
            )
            return


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")


def _run_chain(
    fn: Callable[..., Tensor],
    z0f: Tensor,
    args: tuple[Any, ...],
    chain: FallbackChain,
    max_steps: int,
    **kw: Any,
) -> tuple[LoopOutput, Tensor, Tensor]:
    budgets = chain.max_steps or (max_steps,) * len(chain.solvers)
    loop = iterate(fn, z0f, args, chain.solvers[0], budgets[0], **kw)
    B = z0f.shape[0]
    s0, r0 = loop.ref
    solver_index = torch.zeros(B, dtype=torch.int64, device=z0f.device)
    attempts = torch.ones(B, dtype=torch.int64, device=z0f.device)
    kw = {**kw, "trace": False, "probe": None}
    sliceable = kw["compact"]
    for i, solver in enumerate(chain.solvers[1:], start=1):
        failed = (loop.status != RESULTS.successful.code).nonzero().squeeze(1)
        if failed.numel() == 0:
            break
        if sliceable:
            # the retry keeps each sample's stopping test (the scale of its first attempt)
            sub = iterate(fn, loop.value[failed], slice_args(args, failed), solver,
                          budgets[i], ref=(s0[failed], r0[failed]), **kw)
            pick = slice(None)
        else:  # a closure cannot be evaluated on a subset: rerun all, keep the failed rows
            sub = iterate(fn, loop.value, args, solver, budgets[i], ref=(s0, r0), **kw)
            pick = failed
        loop.value[failed] = sub.value[pick]
        loop.abs_residual[failed] = sub.abs_residual[pick]
        loop.rel_residual[failed] = sub.rel_residual[pick]
        loop.status[failed] = sub.status[pick]
        loop.nstep[failed] += sub.nstep[pick]
        loop.nfev += sub.nfev
        loop.nfev_samples += sub.nfev_samples
        solver_index[failed] = i
        attempts[failed] += 1
    return loop, solver_index, attempts


def _reuse_mode(adjoint: AbstractAdjoint) -> str | None:
    """``adjoint.reuse_eval``, unless a subclass overrides ``apply`` below the class that
    pairs ``apply`` with ``apply_evaluated`` (its own ``apply`` must then run)."""
    mode = adjoint.reuse_eval
    if mode is None:
        return None
    for klass in type(adjoint).__mro__:
        if "apply" in vars(klass):
            return mode if "reuse_eval" in vars(klass) or "apply_evaluated" in vars(klass) \
                else None
    return None


def _check_batch(z0: State, batch: int) -> None:
    if batch == 0:
        raise ValueError(
            "`z0` has batch size 0: there is nothing to solve. Skip the call for an empty "
            "batch (e.g. `if x.shape[0] == 0: return x.new_zeros(...)`)."
        )
    if isinstance(z0, Tensor) and z0.dim() == 1:
        raise ValueError(
            f"`z0` has shape {tuple(z0.shape)}: deqkit reads the first dimension as the batch, "
            "so this is {0} independent scalar problems, each stopped on its own. Give it a "
            "feature dimension: z0.reshape(-1, 1) for {0} scalar problems, or "
            "z0.reshape(1, -1) for one problem of {0} unknowns.".format(z0.shape[0])
        )


# Callables whose outputs were seen not to couple the samples of a batch (the probe of
# ``iterate`` passed): the probe's extra evaluation of f is made once per cell, not per solve.
_SEPARABLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _probe_key(f: Any) -> tuple[Any, Any] | None:
    """``(owner, detail)``: a weakly referenceable owner (the module, function, or a bound
    method's object) and what distinguishes its calls (a module's training mode)."""
    f = inspect.unwrap(f)  # e.g. root_find's z + F(z) wrapper names F as __wrapped__
    owner, detail = f, None
    if inspect.ismethod(f):
        owner, detail = f.__self__, f.__func__
    if isinstance(owner, torch.nn.Module):
        detail = (detail, owner.training)
    try:
        weakref.ref(owner)
    except TypeError:
        return None
    return owner, detail


def _known_separable(key: tuple[Any, Any] | None) -> bool:
    return key is not None and key[1] in _SEPARABLE.get(key[0], ())


def _remember_separable(key: tuple[Any, Any] | None) -> None:
    if key is not None:
        with contextlib.suppress(TypeError):
            _SEPARABLE.setdefault(key[0], set()).add(key[1])


def _cell_eps(layout: Any, amp_dtype: torch.dtype | None) -> float:
    """The unit roundoff of the least precise dtype f computes in."""
    dtypes = [dt for dt in layout.dtypes if dt.is_floating_point]
    if amp_dtype is not None:
        dtypes.append(amp_dtype)
    return max(torch.finfo(dt).eps for dt in dtypes)


def fixed_point(
    f: Callable[..., State],
    z0: State,
    solver: AbstractFixedPointSolver | FallbackChain | str | None = None,
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
        solver: a solver object (:class:`~deqkit.Anderson` by default), a
            :class:`~deqkit.FallbackChain` of solvers, or a name (``"picard"``,
            ``"anderson"``, ``"broyden"``, ``"newton_krylov"``).
        adjoint: how gradients flow through :math:`z^\star`.
            Default: ``ImplicitAdjoint(GMRES())``.
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
    if not callable(f):
        raise TypeError(f"`f` must be callable, got {type(f).__name__}.")
    solver = resolve_solver(solver)
    if adjoint is None:
        adjoint = ImplicitAdjoint()
    elif not isinstance(adjoint, AbstractAdjoint):
        raise TypeError(
            "`adjoint` must be a deqkit adjoint such as dk.ImplicitAdjoint(dk.GMRES()), "
            f"dk.JacobianFreeAdjoint(), dk.PhantomAdjoint() or dk.UnrolledAdjoint(); got "
            f"{type(adjoint).__name__}."
        )
    _check_int("max_steps", max_steps, 0)
    if patience is not None:
        _check_int("patience", patience, 1)
    if not isinstance(args, tuple):
        raise TypeError(f"`args` must be a tuple, got {type(args).__name__}; e.g. args=(x,).")
    if not isinstance(compact_ratio, (int, float)) or not 0 < compact_ratio <= 1:
        raise ValueError(f"`compact_ratio` must be in (0, 1], got {compact_ratio!r}.")
    if divergence_ratio is not None and not (
        isinstance(divergence_ratio, (int, float)) and divergence_ratio > 1
    ):
        raise ValueError(f"`divergence_ratio` must be > 1 or None, got {divergence_ratio!r}.")

    layout = make_layout(z0)
    _check_batch(z0, layout.batch)
    check_args(args, layout.batch)
    if compact is None:
        compact = len(args) > 0
    unrolled = adjoint.unrolled
    chain = isinstance(solver, FallbackChain)
    if unrolled:
        compact = False
        if chain or not solver.supports_unrolled:
            raise ValueError(
                f"{type(solver).__name__} cannot be differentiated by unrolling; use "
                "dk.Picard or dk.Anderson with dk.UnrolledAdjoint, or another adjoint."
            )
    z0f = flatten(layout, z0).detach()
    if not all_finite(z0f):
        raise ValueError("`z0` contains NaN or inf; pass a finite initial guess.")
    # Under autocast only f runs in reduced precision; the solver's own algebra (Anderson's
    # Gram matrix and mixing, norms, GMRES) stays in the float32+ solver dtype.
    probe_key = _probe_key(f)
    amp_dtype, no_autocast = _autocast_split(z0f.device.type)
    _check_tolerance_precision(solver, layout.dtypes, amp_dtype)
    if amp_dtype is not None:
        user_f, device_type = f, z0f.device.type

        def f(z: State, *a: Any) -> State:
            with torch.autocast(device_type, dtype=amp_dtype):
                return user_f(z, *a)

    fn = flat_fn(layout, f)

    first = [True]

    def checked_fn(zf: Tensor, *a: Any) -> Tensor:
        if first[0]:
            first[0] = False
            out = f(unflatten(layout, zf), *a)
            check_output(layout, out)
            return flatten(layout, out)
        return fn(zf, *a)

    eps = _cell_eps(layout, amp_dtype)
    # batch-independence probe: a row may move by a few times sqrt(eps) (rounding only)
    probe = None if _known_separable(probe_key) else 4.0 * math.sqrt(eps)

    loop_kw = dict(
        compact=bool(compact),
        compact_ratio=float(compact_ratio),
        divergence_ratio=divergence_ratio,
        trace=trace,
        patience=patience,
        slice_args=slice_args,
        eps=eps,
    )
    # adjoints that evaluate f once at z* can take the driver's evaluation at the step budget
    reuse = _reuse_mode(adjoint) if torch.is_grad_enabled() and not unrolled else None
    with torch.set_grad_enabled(unrolled and torch.is_grad_enabled()), no_autocast():
        if chain:
            loop, solver_index, attempts = _run_chain(
                checked_fn, z0f, args, solver, max_steps, probe=probe, **loop_kw
            )
        else:
            loop = iterate(checked_fn, z0f, args, solver, max_steps, grad_last=reuse,
                           probe=probe, **loop_kw)
    if loop.probed:
        _remember_separable(probe_key)
    status = loop.status
    worst = int(status.max()) if status.numel() else 0
    result = RESULTS.from_code(worst)
    stats: dict[str, Any] = {
        "nstep": loop.nstep,
        "abs_residual": loop.abs_residual,
        "rel_residual": loop.rel_residual,
        "converged": status == RESULTS.successful.code,
        "status": status,
        "nfev": torch.tensor(loop.nfev),
        "nfev_samples": torch.tensor(loop.nfev_samples),
        "probe_nfev": torch.tensor(2 if loop.probed else 0),
    }
    if loop.trace is not None:
        stats["trace"] = loop.trace
    if chain:
        stats["solver_index"] = solver_index
        stats["attempts"] = attempts
    value = loop.value
    sol = Solution(value=None, result=result, stats=stats)
    if not unrolled and torch.is_grad_enabled():
        if loop.last_eval is not None:  # the driver's last evaluation, made with a graph
            value = adjoint.apply_evaluated(*loop.last_eval, sol.backward)
        else:
            with no_autocast():
                value = adjoint.apply(fn, value.detach(), args, sol.backward)
            stats["nfev"] = stats["nfev"] + adjoint.forward_nfev
            stats["nfev_samples"] = stats["nfev_samples"] + adjoint.forward_nfev * layout.batch
    sol.value = unflatten(layout, value)
    if throw and result is not RESULTS.successful:
        nbad = int((status != RESULTS.successful.code).sum())
        raise SolverError(
            result,
            f"{nbad}/{layout.batch} samples failed; worst rel residual "
            f"{float(loop.rel_residual.nan_to_num(float('inf')).max()):.3e}; solver "
            f"{solver}, "
            f"max_steps={max_steps}. Pass throw=False to inspect sol.result and sol.stats",
        )
    return sol
