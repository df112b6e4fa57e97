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


def check_output(layout: Layout, out: State) -> None:
    """Validate that f's output has the structure of the state (called once per solve)."""
    parts = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    if isinstance(out, (tuple, list)) != layout.is_tuple or len(parts) != len(layout.shapes):
        want = f"a tuple of {len(layout.shapes)} tensors" if layout.is_tuple else "a tensor"
        raise ValueError(
            f"`f` must return the same structure as `z0`: expected {want}"
            f", got {type(out).__name__}"
            f"{' of length ' + str(len(parts)) if isinstance(out, (tuple, list)) else ''}."
        )
    for i, (p, shape) in enumerate(zip(parts, layout.shapes)):
        if not isinstance(p, Tensor) or p.shape[1:] != shape:
            got = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
            raise ValueError(
                f"`f` returned a part {i} of shape {got}; it must keep the shape of z0 "
                f"(batch, {', '.join(map(str, shape))})."
            )


def flat_fn(layout: Layout, f: Callable[..., State]) -> Callable[..., Tensor]:
    """Wrap ``f(z, *args)`` as a map of (B, D) tensors."""

    def g(zf: Tensor, *args: Any) -> Tensor:
        return flatten(layout, f(unflatten(layout, zf), *args))

    return g


def all_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite, in one reduction pass plus one host sync.

    A sum is finite when every entry is; the elementwise test (several passes over ``t``) runs
    only when the sum is not, to tell a non-finite entry from an overflowing sum.
    """
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())
