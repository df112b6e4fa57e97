"""Argument validators: the one family every public constructor and function uses.

Each check raises with a message that names the owner (the class or function whose argument
it is), the argument, the value it got and the fix (what the argument must be and, where the
caller gives one, an example to pass)::

    GMRES: `max_steps` must be an int >= 1, got 0. Pass e.g. max_steps=100.

Conventions: bools are not numbers here (``True`` is refused where an int or a float is
expected); NaN is always refused, inf unless ``finite=False`` and the bounds allow it; a number
of the wrong type raises ``ValueError`` like one out of range, so one ``except ValueError``
catches every bad number.  An empty ``owner`` drops the ``"owner: "`` prefix.

This module is at the bottom of the package: it imports only the standard library and torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")

_INF_TOL = "(a tolerance of inf would count every iterate as converged)"


def message(owner: str, arg: str, requirement: str, value: Any, example: Any = None) -> str:
    """The library's wording of a bad argument.

    Example:
        >>> message("Picard", "damping", "in (0, 1]", 2, example=0.5)
        'Picard: `damping` must be in (0, 1], got 2. Pass e.g. damping=0.5.'
    """
    head = f"{owner}: " if owner else ""
    tail = "" if example is None else f" Pass e.g. {arg}={example}."
    return f"{head}`{arg}` must be {requirement}, got {value!r}.{tail}"


def is_number(value: Any) -> bool:
    """Whether ``value`` is an int or a float, not a bool.

    Example:
        >>> is_number(3), is_number(2.5), is_number(True), is_number("1")
        (True, True, False, False)
    """
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(owner: str, arg: str, value: Any, minimum: int = 1, *, maximum: int | None = None,
              none: bool = False, example: Any = None) -> Any:
    """Check that ``value`` is an int in ``[minimum, maximum]`` (or ``None`` if ``none``).

    Returns ``value``. Raises ``ValueError`` otherwise, also for a bool or a float.

    Example:
        >>> check_int("Anderson", "m", 5)
        5
        >>> check_int("Anderson", "m", 0, example=5)
        Traceback (most recent call last):
        ...
        ValueError: Anderson: `m` must be an int >= 1, got 0. Pass e.g. m=5.
    """
    if value is None and none:
        return None
    ok = (isinstance(value, int) and not isinstance(value, bool) and value >= minimum
          and (maximum is None or value <= maximum))
    if not ok:
        rule = f"an int >= {minimum}" if maximum is None else f"an int in [{minimum}, {maximum}]"
        raise ValueError(message(owner, arg, _or_none(rule, none), value, example))
    return value


def check_float(owner: str, arg: str, value: Any, *, gt: float | None = None,
                ge: float | None = None, lt: float | None = None, le: float | None = None,
                finite: bool = True, none: bool = False, example: Any = None) -> Any:
    """Check that ``value`` is a number (int or float, not bool) within the given bounds.

    ``gt``/``ge`` is the open/closed lower bound, ``lt``/``le`` the upper one (give at most
    one of each). NaN is always refused; inf too unless ``finite=False``. ``None`` passes
    when ``none``. Returns ``float(value)`` (or ``None``); raises ``ValueError`` otherwise.

    Example:
        >>> check_float("Picard", "damping", 1, gt=0, le=1)
        1.0
        >>> check_float("Anderson", "regularisation", -1, ge=0, example=1e-8)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Anderson: `regularisation` must be a finite float >= 0, got -1. Pass e.g. ...
        >>> check_float("PhantomAdjoint", "damping", float("nan"), gt=0, le=1)
        Traceback (most recent call last):
        ...
        ValueError: PhantomAdjoint: `damping` must be in (0, 1], got nan.
    """
    if value is None and none:
        return None
    if not (is_number(value) and value == value and (not finite or _finite(value))
            and _within(value, gt, ge, lt, le)):
        rule = _float_rule(gt, ge, lt, le, finite)
        raise ValueError(message(owner, arg, _or_none(rule, none), value, example))
    return float(value)


def check_tolerances(owner: str, rtol: Any, atol: Any, *, both_zero: bool = False,
                     example: str = "1e-5") -> None:
    """Check a solver's ``rtol`` and ``atol``: finite floats >= 0, not both 0 (the solver
    could never stop early) unless ``both_zero``.

    Example:
        >>> check_tolerances("Picard", 1e-5, 0)
        >>> check_tolerances("Picard", 0, 0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Picard: `rtol` and `atol` are both 0, so the solver could never stop ...
    """
    for arg, value in (("rtol", rtol), ("atol", atol)):
        check_float(owner, arg, value, ge=0, example=f"{example} {_INF_TOL}")
    if not both_zero and rtol == 0 and atol == 0:
        raise ValueError(
            f"{owner}: `rtol` and `atol` are both 0, so the solver could never stop before "
            f"max_steps; set at least one of them (e.g. rtol={example})."
        )


def check_choice(owner: str, arg: str, value: T, choices: Sequence[Any], *,
                 example: Any = None) -> T:
    """Check that ``value`` is one of ``choices``; returns it, raises ``ValueError`` otherwise.

    Example:
        >>> check_choice("GMRES", "orthogonalization", "mgs", ("mgs", "cgs2"))
        'mgs'
        >>> check_choice("Cell", "head", "max", ("pool", "flatten"))
        Traceback (most recent call last):
        ...
        ValueError: Cell: `head` must be one of 'pool', 'flatten', got 'max'.
    """
    if value not in choices:
        rule = "one of " + ", ".join(repr(c) for c in choices)
        raise ValueError(message(owner, arg, rule, value, example))
    return value


def check_bool(owner: str, arg: str, value: Any, *,
               error: type[Exception] = TypeError) -> bool:
    """Check that ``value`` is a bool; raises ``error`` (``TypeError`` by default) otherwise.

    Example:
        >>> check_bool("Broyden", "line_search", 1)
        Traceback (most recent call last):
        ...
        TypeError: Broyden: `line_search` must be a bool (True or False), got 1.
    """
    if not isinstance(value, bool):
        raise error(message(owner, arg, "a bool (True or False)", value))
    return value


def all_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite, in one reduction pass plus one host sync.

    A sum is finite when every entry is; the elementwise test (several passes over ``t``) runs
    only when the sum is not, to tell a non-finite entry from an overflowing sum.

    Example:
        >>> all_finite(torch.tensor([1.0, 2.0])), all_finite(torch.tensor([1.0, float("inf")]))
        (True, False)
    """
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _finite(value: int | float) -> bool:
    return isinstance(value, int) or math.isfinite(value)


def _within(value: float, gt: float | None, ge: float | None, lt: float | None,
            le: float | None) -> bool:
    return ((gt is None or value > gt) and (ge is None or value >= ge)
            and (lt is None or value < lt) and (le is None or value <= le))


def _float_rule(gt: float | None, ge: float | None, lt: float | None, le: float | None,
                finite: bool) -> str:
    """``"in (0, 1]"`` for two bounds, ``"a finite float > 0"`` for one."""
    low = f"> {_fmt(gt)}" if gt is not None else f">= {_fmt(ge)}" if ge is not None else ""
    high = f"< {_fmt(lt)}" if lt is not None else f"<= {_fmt(le)}" if le is not None else ""
    if low and high:
        left = "(" if gt is not None else "["
        right = ")" if lt is not None else "]"
        return f"in {left}{low.split()[1]}, {high.split()[1]}{right}"
    kind = "a finite float" if finite else "a float"
    return f"{kind} {low or high}".rstrip()


def _fmt(bound: float | None) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def _or_none(rule: str, none: bool) -> str:
    return f"None or {rule}" if none else rule
