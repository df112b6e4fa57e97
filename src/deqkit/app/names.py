"""The registry: the one place where names become solvers, adjoints, linear solvers and models.

``deqkit train``, ``deqkit compare``, the benchmarks and the configs all go through these
functions, so a name means the same object everywhere, a misspelt name gets the closest valid
one suggested, and a bad keyword names the object and the keywords it accepts.

Example:
    >>> from deqkit.app import names
    >>> names.build_solver("anderson", rtol=1e-4, m=6).m
    6
    >>> adj = names.build_adjoint("implicit", linear_solver=names.build_linear_solver("gmres"))
    >>> type(adj).__name__, type(adj.linear_solver).__name__
    ('ImplicitAdjoint', 'GMRES')
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

import deqkit as dk
from deqkit import zoo

SOLVERS: dict[str, type[dk.AbstractFixedPointSolver]] = {
    "anderson": dk.Anderson,
    "picard": dk.Picard,
    "broyden": dk.Broyden,
    "newton_krylov": dk.NewtonKrylov,
    "reversible": dk.Reversible,
}
LINEAR_SOLVERS: dict[str, type[dk.AbstractLinearSolver]] = {
    "gmres": dk.GMRES,
    "bicgstab": dk.BiCGStab,
    "neumann": dk.Neumann,
    "dense": dk.Dense,
}
ADJOINTS: dict[str, str] = {
    "implicit": "implicit differentiation, (I - J^T) u = g solved by a linear solver",
    "jfb": "Jacobian-free backprop: the gradient of one last step of f",
    "phantom": "phantom gradient: backprop through a few damped steps from z*",
    "onestep": "one step of f from z* plus a fixed-point residual penalty",
    "unrolled": "backprop through every solver iteration (memory grows with the steps)",
    "shine": "SHINE: u = M^T g from the forward solver's inverse estimate (anderson, broyden), "
             "optionally refined",
    "reversible": "exact backprop through the reversible solver's steps, rebuilt backwards "
                  "(needs --solver reversible; memory independent of the steps)",
}
MODELS = zoo.MODELS


def suggest(name: Any, options: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest option to a misspelt ``name``, or ``""``."""
    close = difflib.get_close_matches(str(name), list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown(kind: str, name: Any, options: Iterable[str]) -> ValueError:
    """The error for a name that is not registered: the closest name and every valid one."""
    options = sorted(options)
    return ValueError(f"unknown {kind} {name!r}{suggest(name, options)}; choose one of "
                      f"{options}.")


def _lookup(kind: str, name: str, table: dict[str, Any]) -> Any:
    key = name.lower().replace("-", "_") if isinstance(name, str) else name
    if key not in table:
        raise unknown(kind, name, table)
    return table[key]


def accepted_keywords(factory: Callable[..., Any]) -> list[str] | None:
    """The keyword arguments ``factory`` accepts, or None when it takes ``**kwargs``."""
    params = inspect.signature(factory).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]


def check_keywords(what: str, factory: Callable[..., Any], kwargs: dict[str, Any],
                   flag: str = "") -> None:
    """Refuse keywords ``factory`` does not take, suggesting the closest accepted one."""
    accepted = accepted_keywords(factory)
    if accepted is None:
        return
    for key in kwargs:
        if key not in accepted:
            where = f" ({flag})" if flag else ""
            raise ValueError(f"{what} has no option {key!r}{where}{suggest(key, accepted)}; "
                             f"its options are {sorted(accepted)}.")


def _call(what: str, factory: Callable[..., Any], kwargs: dict[str, Any], flag: str) -> Any:
    check_keywords(what, factory, kwargs, flag)
    try:
        return factory(**kwargs)
    except TypeError as err:  # a missing or badly typed argument
        raise ValueError(f"{what}: {err}") from None


def build_solver(name: str, **options: Any) -> dk.AbstractFixedPointSolver:
    """The forward solver called ``name`` (one of :data:`SOLVERS`) with ``options``."""
    cls = _lookup("solver", name, SOLVERS)
    return _call(f"solver {name!r} ({cls.__name__})", cls, options, "--solver-arg")


def build_linear_solver(name: str, **options: Any) -> dk.AbstractLinearSolver:
    """The backward linear solver called ``name`` (one of :data:`LINEAR_SOLVERS`)."""
    cls = _lookup("backward solver", name, LINEAR_SOLVERS)
    if cls is dk.Dense:  # a direct solve: tolerances and budgets do not apply
        options = {}
    return _call(f"backward solver {name!r} ({cls.__name__})", cls, options, "")


def build_adjoint(
    name: str,
    *,
    linear_solver: dk.AbstractLinearSolver | None = None,
    phantom_steps: int = 5,
    phantom_damping: float = 0.5,
    residual_weight: float = 1.0,
    reuse_forward: bool = False,
    rtol_from_forward: bool = False,
    shine_refine: int = 0,
    reversible_checkpoint: int = 0,
    on_failure: str = "ignore",
) -> dk.AbstractAdjoint:
    """The adjoint (gradient method) called ``name`` (one of :data:`ADJOINTS`).

    ``linear_solver`` is the implicit adjoint's backward solver (default GMRES); the phantom
    and one-step options apply to those adjoints only; ``reuse_forward`` and
    ``rtol_from_forward`` to the implicit adjoint, ``shine_refine`` to SHINE,
    ``reversible_checkpoint`` (0: none) to the reversible adjoint. Training runs use
    ``on_failure="ignore"``: an unconverged backward solve is counted in the run's metrics
    (``bwd_failed``) instead of warning on every step.
    """
    key = _lookup("adjoint", name, ADJOINTS) and name.lower()
    if key == "jfb":
        return dk.JacobianFreeAdjoint()
    if key == "phantom":
        return dk.PhantomAdjoint(phantom_steps, phantom_damping)
    if key == "unrolled":
        return dk.UnrolledAdjoint()
    if key == "onestep":
        return dk.OneStepAdjoint(residual_weight)
    if key == "shine":
        return dk.SHINEAdjoint(refine=shine_refine)
    if key == "reversible":
        return dk.ReversibleAdjoint(checkpoint_every=reversible_checkpoint or None)
    return dk.ImplicitAdjoint(linear_solver or dk.GMRES(), on_failure=on_failure,
                              reuse_forward=reuse_forward, rtol_from_forward=rtol_from_forward)


def build_model(name: str, in_shape: tuple[int, ...], num_classes: int,
                **kwargs: Any) -> nn.Module:
    """The zoo model called ``name`` (one of :data:`MODELS`) for inputs of ``in_shape``.

    A misspelt hyperparameter is refused with the closest accepted one (``--model-arg``)."""
    factory = _lookup("model", name, MODELS)
    try:
        return zoo.build_model(name, in_shape, num_classes, **kwargs)
    except TypeError as err:  # an unknown hyperparameter, or a value the model refuses
        accepted = zoo.hyperparameters(factory)
        hints = [f"{key!r}{suggest(key, accepted)}" for key in kwargs
                 if key not in accepted and suggest(key, accepted)]
        hint = f" For {', '.join(hints)}." if hints else ""
        raise ValueError(f"model {name!r} (--model-arg): {err}{hint}") from None


__all__ = ["ADJOINTS", "LINEAR_SOLVERS", "MODELS", "SOLVERS", "accepted_keywords",
           "build_adjoint", "build_linear_solver", "build_model", "build_solver",
           "check_keywords", "suggest", "unknown"]
