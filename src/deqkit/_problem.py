"""Normalising a fixed-point problem once per call: checks, the flat ``(B, D)`` view, autocast.

:func:`make_problem` turns ``(f, z0, args)`` into a :class:`Problem`: the state flattened into
the solver's ``(B, D)`` view, ``f`` wrapped to act on it (its first call checked against
``z0``; under autocast only ``f`` runs in reduced precision), the batch-independence check's
settings, and the arguments checked with messages that name the fix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._checks import all_finite
from ._flatten import (
    Layout,
    State,
    check_args,
    check_output,
    flat_fn,
    flatten,
    make_layout,
    unflatten,
)
from .solvers._base import AbstractFixedPointSolver


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


@dataclasses.dataclass
class Problem:
    """A normalised problem: what the engine and the adjoints work on."""

    layout: Layout
    fn: Callable[..., Tensor]  # flat map fn(z, *args) -> (W, D), autocast applied
    z0: Tensor  # (B, D) detached, in the solver dtype
    args: tuple[Any, ...]
    eps: float  # unit roundoff of the least precise dtype f computes in
    probe_key: tuple[Any, Any] | None  # the batch-independence check's cache key
    no_autocast: Callable[[], Any]  # context: the solver's own algebra runs without autocast

    def unflatten(self, flat: Tensor) -> State:
        return unflatten(self.layout, flat)


def make_problem(f: Callable[..., State], z0: State, args: tuple[Any, ...],
                 solver: AbstractFixedPointSolver, max_steps: int, *,
                 check_values: bool = True) -> Problem:
    """Check and normalise ``(f, z0, args)`` for ``solver`` (see :func:`deqkit.fixed_point`);
    ``check_values=False`` skips the checks that read values (under a ``torch.func``
    transform they are made on the unwrapped tensors instead: :func:`check_z0`)."""
    if not callable(f):
        raise TypeError(f"`f` must be callable, got {type(f).__name__}.")
    if not isinstance(args, tuple):
        raise TypeError(f"`args` must be a tuple, got {type(args).__name__}; e.g. args=(x,).")
    layout = make_layout(z0)
    _check_batch(z0, layout.batch)
    check_args(args, layout.batch)
    z0f = flatten(layout, z0).detach()
    if check_values:
        check_z0(z0f)
    probe_key = _probe_key(f)
    amp_dtype, no_autocast = _autocast_split(z0f.device.type)
    _check_tolerance_precision(solver, max_steps, layout.dtypes, amp_dtype)
    if amp_dtype is not None:
        f = _under_autocast(f, z0f.device.type, amp_dtype)
    return Problem(layout=layout, fn=_checked_flat_fn(layout, f), z0=z0f, args=args,
                   eps=_cell_eps(layout, amp_dtype), probe_key=probe_key,
                   no_autocast=no_autocast)


def check_z0(z0f: Tensor) -> None:
    """Refuse a non-finite initial guess."""
    if not all_finite(z0f):
        raise ValueError("`z0` contains NaN or inf; pass a finite initial guess.")


def _checked_flat_fn(layout: Layout, f: Callable[..., State]) -> Callable[..., Tensor]:
    """``f`` on the flat view; its first call is checked against the state's structure."""
    fn = flat_fn(layout, f)
    first = [True]

    def checked(zf: Tensor, *a: Any) -> Tensor:
        if first[0]:
            first[0] = False
            out = f(unflatten(layout, zf), *a)
            check_output(layout, out, zf.shape[0])
            return flatten(layout, out)
        return fn(zf, *a)

    return checked


def _under_autocast(f: Callable[..., State], device_type: str,
                    dtype: torch.dtype) -> Callable[..., State]:
    def g(z: State, *a: Any) -> State:
        with torch.autocast(device_type, dtype=dtype):
            return f(z, *a)

    return g


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


def _cell_eps(layout: Layout, amp_dtype: torch.dtype | None) -> float:
    """The unit roundoff of the least precise dtype f computes in."""
    dtypes = [dt for dt in layout.dtypes if dt.is_floating_point]
    if amp_dtype is not None:
        dtypes.append(amp_dtype)
    return max(torch.finfo(dt).eps for dt in dtypes)


def _check_tolerance_precision(
    solver: AbstractFixedPointSolver, max_steps: int, layout_dtypes: tuple[torch.dtype, ...],
    amp_dtype: torch.dtype | None,
) -> None:
    """Warn when both tolerances are below the unit roundoff of a half-precision (bfloat16,
    float16) dtype the cell computes in, directly or under autocast.

    The iterates then move on the grid of that dtype: the solve either stalls/cycles until
    max_steps or stops at a fixed point of the *rounded* map, which is no closer than ~eps to
    the exact equilibrium, so the tighter tolerance buys no accuracy."""
    dtypes = [dt for dt in layout_dtypes if dt.is_floating_point]
    if amp_dtype is not None:
        dtypes.append(amp_dtype)
    cell_dtype = max(dtypes, key=lambda dt: torch.finfo(dt).eps)  # the least precise one
    eps = torch.finfo(cell_dtype).eps
    if eps < 1e-4:
        # float32/float64: tolerances below eps are a deliberate choice (e.g. forcing a fixed
        # number of steps); the pitfall this guards against is half precision.
        return
    for s, _ in solver.stages(max_steps):
        rtol, atol = float(s.rtol), float(s.atol)
        if max(rtol, atol) < eps and not s.fixed_steps:
            suggest = 10 ** math.ceil(math.log10(eps))
            warnings.warn(
                f"{type(s).__name__}(rtol={rtol:g}, atol={atol:g}) is below the precision of a "
                f"cell computing in {cell_dtype} (eps = {eps:.2g}): the iterates differ from "
                "the exact equilibrium by about eps whatever the tolerance, and the solve may "
                f"cycle until max_steps. Use rtol >= {suggest:g} for this dtype, or compute the "
                "cell in a wider dtype.",
                ToleranceWarning,
                stacklevel=4,
            )
            return


# ---------------------------------------------------------- the batch-independence check

# Callables whose outputs were seen not to couple the samples of a batch (the probe of the
# engine passed): the probe's extra evaluations of f are made once per cell, not per solve.
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


def known_separable(key: tuple[Any, Any] | None) -> bool:
    return key is not None and key[1] in _SEPARABLE.get(key[0], ())


def remember_separable(key: tuple[Any, Any] | None) -> None:
    if key is not None:
        with contextlib.suppress(TypeError):
            _SEPARABLE.setdefault(key[0], set()).add(key[1])
