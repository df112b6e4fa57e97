"""Validation of :class:`~deqkit.hyperdeq.HyperAnderson`'s settings, done once in its
constructor, with messages that name the argument and the fix."""

from __future__ import annotations

from typing import Any

from .._checks import check_float, check_int, check_tolerances

_OWNER = "HyperAnderson"


def state_shape_of(state_shape: Any) -> tuple[int, ...]:
    """The per-sample state shape as a tuple of positive ints (an int is a vector state)."""
    if isinstance(state_shape, int) and not isinstance(state_shape, bool):
        state_shape = (state_shape,)
    try:
        shape = tuple(state_shape)
    except TypeError:
        shape = ()
    if not shape or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape
    ):
        raise ValueError(
            f"{_OWNER}: `state_shape` must be the per-sample state shape (channels first), "
            f"a tuple of positive ints such as (32, 8, 8) or (128,), got {state_shape!r}."
        )
    if len(shape) > 4:
        raise ValueError(f"{_OWNER}: at most 3 spatial dimensions, got {shape!r}.")
    return shape


def check_settings(shape: tuple[int, ...], in_channels: int, **kw: Any) -> None:
    """Validate the constructor's settings (``kw``: its keyword arguments), naming the
    argument and the fix."""
    check_tolerances(_OWNER, kw["rtol"], kw["atol"])
    for name in ("m", "features"):
        check_int(_OWNER, name, kw[name])
    for name in ("hidden", "init_hidden"):
        check_int(_OWNER, name, kw[name], none=True)
    check_int(_OWNER, "init_layers", kw["init_layers"], 0)
    if kw["init_layers"] and kw["init_hidden"] is None:
        raise ValueError(f"{_OWNER}: `init_layers` > 0 needs `init_hidden` (the width).")
    _check_groups("init_groups", kw["init_groups"], shape[0])
    check_int(_OWNER, "in_channels", in_channels)
    beta_max = kw["beta_max"]
    check_float(_OWNER, "beta_max", beta_max, gt=0)
    check_float(_OWNER, "beta_init", kw["beta_init"], gt=0, lt=beta_max,
                example=f"0.9 (below beta_max={beta_max})")
    check_float(_OWNER, "safeguard", kw["safeguard"], ge=1, none=True)
    check_float(_OWNER, "regularisation", kw["regularisation"], ge=0)
    check_float(_OWNER, "precondition", kw["precondition"], ge=0, lt=1, none=True)
    check_int(_OWNER, "precondition_hidden", kw["precondition_hidden"])
    _check_groups("precondition_groups", kw["precondition_groups"], shape[0])


def _check_groups(name: str, groups: int | None, channels: int) -> None:
    """``groups`` (optional) must be a positive int dividing the state's channels."""
    if groups is None:
        return
    check_int(_OWNER, name, groups)
    if channels % groups:
        raise ValueError(
            f"{_OWNER}: `{name}` ({groups}) must divide the state channels ({channels})."
        )


__all__ = ["check_settings", "state_shape_of"]
