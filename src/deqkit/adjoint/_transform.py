r"""The solve under ``torch.func`` transforms (``vmap``, ``grad``, ``vjp``, ``jvp``,
``jacrev``, ``jacfwd``, ``hessian``).

A transform wraps the tensors it differentiates or batches; an ``autograd.Function`` sees them
unwrapped only if they are its explicit inputs. Here the whole solve is one Function,
:class:`SolveFunction`, whose inputs are the initial state and every floating-point tensor
the map can read (``args``, closed-over tensors, module parameters and buffers:
:func:`~deqkit.adjoint._higher.closed_over`); inside, the map is evaluated with them
replaced by the unwrapped ones (:class:`~deqkit.adjoint._higher.Functional`). Its rules:

* backward: :math:`u = (I - J^\top)^{-1} g` by a
  :class:`~deqkit.adjoint._higher.LinearImplicit` solve and :math:`\bar p =
  \partial_p[u^\top f(z^\star, p)]` (every order, as in the recorded implicit backward);
* forward mode: :math:`\dot z = (I - J)^{-1}\, \partial_p f\, \dot p`;
* ``vmap``: when only the initial state and the per-sample ``args`` are batched (the
  weights are shared), the problems are independent samples of one map and are solved as
  one batch of N * B samples; otherwise (an ensemble of weights) the slices are solved one
  after the other (the solver's per-sample stopping is data-dependent control flow, which
  has no batching rule).

Only :class:`~deqkit.ImplicitAdjoint` defines these derivatives; the batch is not compacted.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

from ._higher import (
    Functional,
    LinearImplicit,
    Meta,
    closed_over,
    input_partials,
    loop_vmap,
    module_slots,
)


def transform_active() -> bool:
    """Whether a ``torch.func`` transform is running (its interpreter stack is not empty)."""
    try:
        from torch._C._functorch import peek_interpreter_stack
    except ImportError:  # pragma: no cover - a torch without functorch
        return False
    return peek_interpreter_stack() is not None


def transform_inputs(problem: Any) -> tuple[list[Tensor], int]:
    """The floating-point tensors the flat map of ``problem`` can read: those in its
    ``args`` (first; their number is returned too) and those its closures, partials and
    modules reach."""
    found: dict[int, Tensor] = {}
    for t in tree_flatten(problem.args)[0]:
        if isinstance(t, Tensor) and t.is_floating_point():
            found.setdefault(id(t), t)
    n_args = len(found)
    for t in closed_over(problem.fn, every=True):
        if t.is_floating_point():
            found.setdefault(id(t), t)
    return list(found.values()), n_args


class SolveFunction(torch.autograd.Function):
    """``z*`` (flat ``(B, D)``) of the problem in ``meta``, from ``z0`` and the map's
    inputs ``p``; ``meta``: ``problem``, ``solver``, ``options``, ``adjoint``,
    ``functional``, ``run`` (a callable making and running the :class:`Primal`),
    ``record`` (a list receiving each solve's primal)."""

    @staticmethod
    def forward(z0: Tensor, meta: dict[str, Any], *p: Tensor) -> Tensor:  # type: ignore[override]
        functional = meta["functional"]
        problem = dataclasses.replace(meta["problem"], z0=z0, args=(),
                                      fn=lambda z: functional(z, *p))
        primal = meta["run"](problem)
        meta["record"].append(primal)
        return primal.output.value

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        _, meta, *p = inputs
        ctx.meta = meta
        ctx.save_for_backward(output, *p)
        ctx.save_for_forward(output, *p)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        z, *p = ctx.saved_tensors
        u = LinearImplicit.apply(g, z, _linear_meta(ctx.meta, transpose=True), *p)
        return (None, None, *input_partials(ctx.meta["functional"], z, p, u))

    @staticmethod
    def jvp(ctx: Any, _z0_dot: Any, _meta: Any, *p_dot: Tensor | None) -> Tensor:
        z, *p = ctx.saved_tensors
        functional = ctx.meta["functional"]
        tangents = tuple(torch.zeros_like(t) if d is None else d for t, d in zip(p, p_dot))
        rhs = torch.func.jvp(lambda *q: functional(z, *q), tuple(p), tangents)[1]
        return LinearImplicit.apply(rhs, z, _linear_meta(ctx.meta, transpose=False), *p)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], z0: Tensor, meta: dict[str, Any],
             *p: Tensor) -> tuple[Tensor, int]:
        n = meta["n_args"]
        if any(d is not None for d in in_dims[2 + n:]):  # batched weights: slice by slice
            return loop_vmap(SolveFunction.apply, info, in_dims, (z0, meta, *p)), 0
        # only the initial state and the per-sample args are batched: the problems are
        # independent samples of one map, so solve them as one batch of N * B samples
        N = info.batch_size

        def fold(t: Tensor, d: int | None) -> Tensor:
            t = t.expand(N, *t.shape) if d is None else t.movedim(d, 0)
            return t.reshape(N * t.shape[1], *t.shape[2:])

        args = [fold(t, d) for t, d in zip(p[:n], in_dims[2:2 + n])]
        out = SolveFunction.apply(fold(z0, in_dims[0]), meta, *args, *p[n:])
        return out.reshape(N, -1, *out.shape[1:]), 0


def _linear_meta(meta: dict[str, Any], *, transpose: bool) -> dict[str, Any]:
    adjoint = meta["adjoint"]
    return Meta(functional=meta["functional"], solver=adjoint.linear_solver,
                transpose=transpose, stats=meta["backward"] if transpose else None,
                on_failure=adjoint.on_failure, warning=meta["warning"])


def solve_under_transform(problem: Any, adjoint: Any, run: Any, backward: dict[str, Any],
                          warning: type) -> tuple[Tensor, list[Any]]:
    """Run the solve of ``problem`` as a :class:`SolveFunction` (``run(problem)`` makes and
    runs the primal); returns the flat value and the primals of the solves that ran (one,
    or one per ``vmap`` slice)."""
    inputs, n_args = transform_inputs(problem)
    functional = Functional(problem.fn, problem.args, inputs, module_slots(problem.fn, inputs))
    record: list[Any] = []
    meta = Meta(problem=problem, functional=functional, adjoint=adjoint, run=run,
                record=record, backward=backward, warning=warning, n_args=n_args)
    value = SolveFunction.apply(problem.z0, meta, *inputs)
    return value, record
