"""Conversion between user states (a tensor or a tuple of tensors) and the solver's (B, D) view."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

State = Any  # Tensor | tuple[Tensor, ...]


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a state is laid out in the flat (B, D) solver view."""

    is_tuple: bool
    shapes: tuple[torch.Size, ...]  # per-part shapes without the batch dimension
    dtypes: tuple[torch.dtype, ...]
    sizes: tuple[int, ...]
    batch: int
    solver_dtype: torch.dtype

    @property
    def width(self) -> int:
        return sum(self.sizes)


def _solver_dtype(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    # Solver state is kept in float32 at least, even for bf16/fp16 cells.
    out = torch.float32
    for dt in dtypes:
        out = torch.promote_types(out, dt)
    return out


def make_layout(z0: State, arg_name: str = "z0") -> Layout:
    parts = tuple(z0) if isinstance(z0, (tuple, list)) else (z0,)
    if len(parts) == 0:
        raise ValueError(f"`{arg_name}` is an empty tuple; pass a tensor or a tuple of tensors.")
    for i, p in enumerate(parts):
        if not isinstance(p, Tensor):
            raise TypeError(
                f"`{arg_name}` must be a tensor or a tuple of tensors, got "
                f"{type(p).__name__} at position {i}."
            )
        if p.dim() < 1:
            raise ValueError(
                f"`{arg_name}` must have a leading batch dimension; got a 0-d tensor. "
                "Use z0.reshape(1, -1) for a single problem."
            )
        if not (p.is_floating_point() or p.is_complex()):
            raise TypeError(f"`{arg_name}` must be floating point, got dtype {p.dtype}.")
        if p.is_complex():
            raise TypeError(f"`{arg_name}`: complex states are not supported (got {p.dtype}).")
    batch = parts[0].shape[0]
    for i, p in enumerate(parts):
        if p.shape[0] != batch:
            raise ValueError(
                f"`{arg_name}`: all parts must share the batch size; part 0 has {batch}, "
                f"part {i} has {p.shape[0]}."
            )
    shapes = tuple(p.shape[1:] for p in parts)
    dtypes = tuple(p.dtype for p in parts)
    sizes = tuple(int(torch.Size(s).numel()) for s in shapes)
    return Layout(
        is_tuple=isinstance(z0, (tuple, list)),
        shapes=shapes,
        dtypes=dtypes,
        sizes=sizes,
        batch=batch,
        solver_dtype=_solver_dtype(dtypes),
    )


def flatten(layout: Layout, z: State) -> Tensor:
    """User state -> (B, D) tensor in the solver dtype (a view when no cast/concat is needed)."""
    if not layout.is_tuple:
        z = (z,)
    flat = [p.reshape(p.shape[0], -1) for p in z]
    out = flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)
    if out.dtype != layout.solver_dtype:
        out = out.to(layout.solver_dtype)
    return out


def unflatten(layout: Layout, flat: Tensor) -> State:
    """(B, D) tensor -> user state (views of ``flat``, cast back to the state's dtypes)."""
    b = flat.shape[0]
    if len(layout.sizes) == 1:
        parts = (flat,)
    else:
        parts = torch.split(flat, layout.sizes, dim=1)
    out = []
    for p, shape, dt in zip(parts, layout.shapes, layout.dtypes):
        p = p.reshape(b, *shape)
        if p.dtype != dt:
            p = p.to(dt)
        out.append(p)
    return tuple(out) if layout.is_tuple else out[0]


class StateShapeError(ValueError):
    """``f`` returned a state whose structure, shape or dtype does not match ``z0``."""


def check_output(layout: Layout, out: State, batch: int | None = None) -> None:
    """Validate that f's output has the structure, batch size (``batch``: the rows f was
    given; default the state's) and shapes of the state, in no wider a dtype than the
    solver's (called on f's first evaluation of a solve)."""
    batch = layout.batch if batch is None else batch
    parts = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    if isinstance(out, (tuple, list)) != layout.is_tuple or len(parts) != len(layout.shapes):
        want = f"a tuple of {len(layout.shapes)} tensors" if layout.is_tuple else "a tensor"
        raise StateShapeError(
            f"`f` must return the same structure as `z0`: expected {want}"
            f", got {type(out).__name__}"
            f"{' of length ' + str(len(parts)) if isinstance(out, (tuple, list)) else ''}."
        )
    wide = layout.solver_dtype
    for i, (p, shape) in enumerate(zip(parts, layout.shapes)):
        if not isinstance(p, Tensor) or p.dim() == 0 or p.shape[1:] != shape \
                or p.shape[0] != batch:
            got = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
            raise StateShapeError(
                f"`f` returned a part {i} of shape {got}; it must keep the shape of z0 "
                f"{(batch, *shape)} (batch {batch} first)."
            )
        if p.is_floating_point() and torch.promote_types(p.dtype, wide) != wide:
            raise StateShapeError(
                f"`f` returned {p.dtype} (part {i}) for a state `z0` of "
                f"{layout.dtypes[i]}: the solver, which computes in {wide}, would round f's "
                f"output down at every step. Pass `z0` in {p.dtype} (e.g. "
                f"z0.to({p.dtype})), or make f compute in {layout.dtypes[i]}."
            )


def flat_fn(layout: Layout, f: Callable[..., State]) -> Callable[..., Tensor]:
    """Wrap ``f(z, *args)`` as a map of (B, D) tensors."""

    def g(zf: Tensor, *args: Any) -> Tensor:
        return flatten(layout, f(unflatten(layout, zf), *args))

    return g


def check_args(args: tuple[Any, ...], batch: int) -> None:
    """Check that every tensor in ``args``, at any depth of tuples, lists and dicts, is
    per-sample (leading dimension ``batch``)."""

    def visit(a: Any, path: str) -> None:
        if isinstance(a, Tensor):
            if a.dim() == 0 or a.shape[0] != batch:
                raise ValueError(
                    f"`{path}` has shape {tuple(a.shape)}, but tensors in `args` (also inside "
                    f"lists, tuples and dicts) must be per-sample with leading batch dimension "
                    f"{batch}: they are sliced with the batch when finished samples leave it. "
                    "Close over shared tensors (e.g. weights) in `f` instead."
                )
        elif isinstance(a, dict):
            for key, v in a.items():
                visit(v, f"{path}[{key!r}]")
        elif isinstance(a, (tuple, list)):
            for j, v in enumerate(a):
                visit(v, f"{path}[{j}]")

    for i, a in enumerate(args):
        visit(a, f"args[{i}]")


def slice_args(args: tuple[Any, ...], rows: Tensor) -> tuple[Any, ...]:
    """Rows ``rows`` of every tensor in ``args`` (at any depth of tuples, lists, dicts and
    named tuples; other values are passed through)."""

    def take(a: Any) -> Any:
        if isinstance(a, Tensor):
            return a[rows]
        if isinstance(a, dict):
            return type(a)((k, take(v)) for k, v in a.items())
        if isinstance(a, tuple) and hasattr(a, "_fields"):  # a named tuple
            return type(a)(*(take(v) for v in a))
        if isinstance(a, (tuple, list)):
            return type(a)(take(v) for v in a)
        return a

    return tuple(take(a) for a in args)
