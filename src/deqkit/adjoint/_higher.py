r"""Exact higher-order derivatives through the implicit adjoint.

The first-order implicit backward pass solves :math:`(I - J^\top) u = g` and pushes
:math:`u` through one evaluation of :math:`f` at :math:`z^\star`; nothing of it is recorded,
so differentiating the gradient again needs more. Here the backward pass, when asked to
record a graph (``create_graph=True``), is written as differentiable functions of the
equilibrium :math:`z^\star` (the layer's own output, so its dependence on the inputs is again
implicit), of the incoming gradient and of the inputs :math:`p` of :math:`f`:

.. math::
    u = (I - J(z^\star, p)^\top)^{-1} g, \qquad
    \bar p = \partial_p \big[u^\top f(z^\star, p)\big],

where the linear solve is itself an implicit function (:class:`LinearImplicit`): for the
system :math:`A x = b` with :math:`A = I - J^\top` or :math:`I - J`, an incoming
:math:`\bar x` gives :math:`w = A^{-\top} \bar x` (the other system, again a
:class:`LinearImplicit`, so every order is exact) and

.. math:: \bar b = w, \qquad \bar q = \partial_q \big[a^\top J(z, p)\, b\big]
    \quad (q \in \{z, p\};\ (a, b) = (x, w) \text{ for } I - J^\top,\ (w, x)
    \text{ for } I - J).

The partial derivatives in :math:`p` hold :math:`z^\star` fixed; they are computed with
``torch.func`` (an inner transform level), so the outer autograd graph still sees every
dependence on :math:`z^\star` and :math:`p`. The inputs :math:`p` are the tensors requiring
grad that :math:`f` reads: the tensors in ``args`` and the leaves of its graph (parameters,
closed-over leaves) and the non-leaf tensors f closes over (:func:`closed_over`: e.g. a
lambda reading ``x = 2 * w``, or the views ``torch.autograd.functional`` passes).
:class:`Functional` re-evaluates :math:`f` with them replaced, through a
``TorchFunctionMode``; a tensor f reads that is none of these (a non-leaf read from a
global, say) is found when the recorded backward runs (:func:`captured_intermediates`) and
refused with the fix.

Reference: the implicit function theorem applied twice, as in JAX's differentiable
``custom_linear_solve`` and optimistix's ``implicit_jvp``; Blondel et al. (2022),
"Efficient and Modular Implicit Differentiation", NeurIPS.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
import warnings
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from .._recompute import recomputing
from ..linear import FunctionOperator, IdentityMinus


def differentiable_inputs(fz: Tensor, z_req: Tensor, args: tuple[Any, ...],
                          fn: Any = None) -> list[Tensor]:
    """The tensors requiring grad that the evaluation ``fz = fn(z_req, *args)`` depends on:
    those in ``args``, the non-leaf ones ``fn`` closes over (:func:`closed_over`), then the
    leaves its graph reaches other than ``z_req`` (the walk stops at the tensors before)."""
    explicit: dict[int, Tensor] = {}
    for t in [*tree_flatten(args)[0], *closed_over(fn)]:
        if isinstance(t, Tensor) and t.requires_grad:
            explicit.setdefault(id(t), t)
    known = set(explicit) | {id(z_req)}
    stop = {t.grad_fn for t in explicit.values() if t.grad_fn is not None}
    leaves: list[Tensor] = []
    stack, seen = [fz.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen or node in stop:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if var is not None:  # AccumulateGrad: a leaf
            if id(var) not in known:
                known.add(id(var))
                leaves.append(var)
            continue
        stack.extend(n for n, _ in node.next_functions)
    return [*explicit.values(), *leaves]


def closed_over(fn: Any, depth: int = 8, *, every: bool = False,
                slots: list[tuple[Any, str, str, Tensor]] | None = None) -> list[Tensor]:
    """The non-leaf tensors requiring grad that ``fn`` can reach through closures, bound
    methods, ``functools.partial`` and the tensor attributes of modules (e.g. a lambda
    closing over ``x = 2 * w``): the tensors f may read without receiving them. ``every``:
    all floating-point tensors reached, the parameters and buffers of modules included (the
    inputs of a solve under ``torch.func`` transforms). ``slots``: a list that receives
    ``(module, kind, name, tensor)`` for every tensor found held by a module."""
    found: dict[int, Tensor] = {}
    seen: set[int] = set()

    def visit(obj: Any, d: int) -> None:
        if d < 0 or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, Tensor):
            if (obj.is_floating_point() if every
                    else obj.requires_grad and obj.grad_fn is not None):
                found.setdefault(id(obj), obj)
            return
        for child in _children(obj):
            visit(child, d - 1)
        if isinstance(obj, torch.nn.Module):
            held = [("attr", k, v) for k, v in vars(obj).items()
                    if isinstance(v, Tensor) and not k.startswith("_")]
            if every:
                held += [("param", k, v) for k, v in obj._parameters.items() if v is not None]
                held += [("buffer", k, v) for k, v in obj._buffers.items() if v is not None]
            for kind, name, t in held:
                if slots is not None:
                    slots.append((obj, kind, name, t))
                seen.discard(id(t))
                visit(t, d - 1)

    visit(fn, depth)
    return list(found.values())


def _children(obj: Any) -> list[Any]:
    """What a callable or container may read: closure cells, a bound method's object, a
    partial's function and arguments, a module's attributes and submodules."""
    if isinstance(obj, functools.partial):
        return [obj.func, *obj.args, *obj.keywords.values()]
    if inspect.ismethod(obj):
        return [obj.__self__, obj.__func__]
    if isinstance(obj, types.FunctionType):
        return [c.cell_contents for c in obj.__closure__ or () if _filled(c)]
    if isinstance(obj, torch.nn.Module):  # (its tensors: see closed_over)
        plain = [v for k, v in vars(obj).items()
                 if not k.startswith("_") and not isinstance(v, Tensor)]
        return [*plain, *obj._modules.values()]
    if isinstance(obj, (list, tuple)):
        return list(obj[:64])
    if isinstance(obj, dict):
        return list(obj.values())[:64]
    return []


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:  # an empty cell (a name not yet bound)
        return False
    return True


def module_slots(fn: Any, inputs: list[Tensor]) -> list[tuple[Any, str, str, int]]:
    """Where the modules ``fn`` reaches hold ``inputs``: ``(module, kind, name, index)``,
    recorded at forward time so that a later re-evaluation of f puts the same tensors back
    even if the module changed meanwhile (e.g. ``torch.func.functional_call`` restored its
    parameters before the backward pass)."""
    index = {id(t): i for i, t in enumerate(inputs)}
    found: list[tuple[Any, str, str, Tensor]] = []
    closed_over(fn, every=True, slots=found)
    return [(m, kind, name, index[id(t)]) for m, kind, name, t in found if id(t) in index]


@contextlib.contextmanager
def installed(slots: list[tuple[Any, str, str, int]], values: tuple[Tensor, ...] | list[Tensor]
              ) -> Any:
    """Put ``values[index]`` in each module slot for the duration of the block."""
    saved = []
    try:
        for module, kind, name, i in slots:
            store = {"param": module._parameters, "buffer": module._buffers}.get(
                kind, module.__dict__)
            saved.append((store, name, store.get(name)))
            store[name] = values[i]
        yield
    finally:
        for store, name, old in reversed(saved):
            store[name] = old


def _substitute(x: Any, table: dict[int, Tensor]) -> Any:
    """``x`` with its tensors replaced through ``table`` (by identity): plain lists, tuples
    and dicts directly (this runs on every torch call of f), other containers by pytree."""
    if isinstance(x, Tensor):
        return table.get(id(x), x)
    kind = type(x)
    if kind is tuple or kind is list:
        return kind(_substitute(v, table) for v in x)
    if kind is dict:
        return {k: _substitute(v, table) for k, v in x.items()}
    if isinstance(x, (tuple, list, dict)):  # named tuples, OrderedDicts, ...
        return tree_map(lambda t: table.get(id(t), t) if isinstance(t, Tensor) else t, x)
    return x


class _Swap(TorchFunctionMode):
    """Replace tensors by identity in every torch call; optionally record the tensors that
    requiring grad entered a call without being known or produced inside."""

    def __init__(self, table: dict[int, Tensor], record: bool = False) -> None:
        super().__init__()
        self.table, self.record = table, record
        self.produced: list[Any] = []  # kept alive so that their ids stay unique
        self.produced_ids: set[int] = set()
        self.unknown: list[Tensor] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self.record:
            for t in tree_flatten((args, kwargs))[0]:
                if (isinstance(t, Tensor) and t.requires_grad and id(t) not in self.table
                        and id(t) not in self.produced_ids):
                    self.unknown.append(t)
        out = func(*_substitute(args, self.table), **_substitute(kwargs, self.table))
        if self.record:
            self.produced.append(out)
            self.produced_ids.update(id(t) for t in tree_flatten(out)[0]
                                     if isinstance(t, Tensor))
        return out


class Functional:
    """``f(z, *args)`` as a function of ``z`` and its differentiable inputs ``p``:
    ``self(z, *q)`` evaluates ``fn(z, *args)`` with every ``inputs[i]`` replaced by
    ``q[i]`` (where f reads it, by identity; in the module ``slots``, by position)."""

    def __init__(self, fn: Any, args: tuple[Any, ...], inputs: list[Tensor],
                 slots: list[tuple[Any, str, str, int]] | None = None) -> None:
        self.fn, self.args, self.inputs = fn, args, inputs
        self.slots = slots or []

    def __call__(self, z: Tensor, *q: Tensor) -> Tensor:
        with recomputing(), installed(self.slots, q), \
                _Swap({id(p): t for p, t in zip(self.inputs, q)}):
            return self.fn(z, *self.args)


def captured_intermediates(functional: Functional, z: Tensor) -> list[Tensor]:
    """The tensors requiring grad that ``f`` reads but that are neither its inputs nor made
    inside it: non-leaf tensors computed outside f that :func:`closed_over` did not find
    (e.g. read from a global). One evaluation of f."""
    z_chk = z.detach().requires_grad_()
    mode = _Swap({id(p): p for p in functional.inputs} | {id(z_chk): z_chk}, record=True)
    with torch.enable_grad(), recomputing(), installed(functional.slots, functional.inputs), \
            mode:
        functional.fn(z_chk, *functional.args)
    unique: dict[int, Tensor] = {}
    for t in mode.unknown:
        # a tensor that depends on the fresh z_chk was made during the call (e.g. by a
        # torch.func transform inside f, whose results bypass the mode)
        if id(t) not in unique and not _reaches(t, z_chk):
            unique[id(t)] = t
    return list(unique.values())


def _reaches(t: Tensor, leaf: Tensor) -> bool:
    """Whether ``t``'s autograd graph reaches the leaf ``leaf``."""
    stack, seen = [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if getattr(node, "variable", None) is leaf:
            return True
        stack.extend(n for n, _ in node.next_functions)
    return False


class Meta(dict):
    """The settings of a solve passed to an ``autograd.Function``: a dict subclass, which
    ``torch.func`` passes by reference (a plain dict would be rebuilt, losing what the
    solve records in it)."""


class LinearImplicit(torch.autograd.Function):
    r"""``x`` solving :math:`(I - J^\top) x = b` (``transpose``) or :math:`(I - J) x = b` at
    ``z``, differentiable to every order in ``b``, ``z`` and the inputs ``p`` (see the
    module docstring), in reverse and forward mode and under ``torch.func`` transforms
    (``vmap`` solves the slices one by one). ``meta``: ``functional``, ``solver`` (a deqkit
    linear solver), ``transpose``, ``stats`` (a dict for the solve's statistics, or None).
    """

    @staticmethod
    def forward(b: Tensor, z: Tensor, meta: dict[str, Any],  # type: ignore[override]
                *p: Tensor) -> Tensor:
        J = function_jacobian(meta["functional"], z.detach(), [t.detach() for t in p])
        op = IdentityMinus(J)
        sol = meta["solver"].solve(op.T if meta["transpose"] else op, b.detach())
        if meta.get("stats") is not None:
            meta["stats"].update(nstep=sol.nstep, residual=sol.residual,
                                 converged=sol.converged, nmatvec=sol.nmatvec)
        _warn_unconverged(sol, meta)
        return sol.value

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        _, z, meta, *p = inputs
        ctx.meta = meta
        ctx.save_for_backward(output, z, *p)
        ctx.save_for_forward(output, z, *p)

    @staticmethod
    def backward(ctx: Any, xbar: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, z, *p = ctx.saved_tensors
        meta = ctx.meta
        other = Meta(meta, transpose=not meta["transpose"], stats=None)
        w = LinearImplicit.apply(xbar, z, other, *p)
        a, b = (x, w) if meta["transpose"] else (w, x)
        grads = bilinear_partials(meta["functional"], z, p, a, b)
        return (w, grads[0], None, *grads[1:])

    @staticmethod
    def jvp(ctx: Any, b_dot: Tensor | None, z_dot: Tensor | None, _: Any,
            *p_dot: Tensor | None) -> Tensor:
        # A x = b with A = I - J^T (or I - J): x_dot = A^{-1} (b_dot + d[J^T x] (or d[J x]))
        x, z, *p = ctx.saved_tensors
        meta = ctx.meta
        functional, transpose = meta["functional"], meta["transpose"]

        def jx(zz: Tensor, *q: Tensor) -> Tensor:  # J^T x or J x at (zz, q), x fixed
            if transpose:
                return torch.func.vjp(lambda y: functional(y, *q), zz)[1](x)[0]
            return torch.func.jvp(lambda y: functional(y, *q), (zz,), (x,))[1]

        primals = (z, *p)
        tangents = tuple(torch.zeros_like(t) if d is None else d
                         for t, d in zip(primals, (z_dot, *p_dot)))
        rhs = torch.func.jvp(jx, primals, tangents)[1]
        if b_dot is not None:
            rhs = rhs + b_dot
        return LinearImplicit.apply(rhs, z, Meta(meta, stats=None), *p)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], b: Tensor, z: Tensor,
             meta: dict[str, Any], *p: Tensor) -> tuple[Tensor, int]:
        return loop_vmap(LinearImplicit.apply, info, in_dims, (b, z, meta, *p)), 0


def loop_vmap(apply: Any, info: Any, in_dims: tuple[Any, ...], inputs: tuple[Any, ...]
              ) -> Tensor:
    """A ``vmap`` rule that calls ``apply`` on each slice of the batched inputs and stacks
    the results (the solves have data-dependent control flow: no batching rule)."""
    outs = []
    for i in range(info.batch_size):
        sliced = tuple(t.select(d, i) if d is not None and isinstance(t, Tensor) else t
                       for t, d in zip(inputs, in_dims))
        outs.append(apply(*sliced))
    return torch.stack(outs)


def function_jacobian(functional: Functional, z: Tensor, p: list[Tensor]) -> FunctionOperator:
    """The Jacobian of ``y -> functional(y, *p)`` at ``z`` as an operator: ``mv`` by
    ``torch.func.jvp``, ``rmv`` by ``torch.func.vjp`` (one evaluation, reused); no
    ``requires_grad_``, so it works inside ``torch.func`` transforms."""
    vjp_fn: list[Any] = []

    def rmatvec(u: Tensor) -> Tensor:
        if not vjp_fn:
            vjp_fn.append(torch.func.vjp(lambda y: functional(y, *p), z)[1])
        return vjp_fn[0](u.reshape(z.shape))[0].reshape(u.shape)

    def matvec(v: Tensor) -> Tensor:
        out = torch.func.jvp(lambda y: functional(y, *p), (z,), (v.reshape(z.shape),))[1]
        return out.reshape(v.shape)

    return FunctionOperator(matvec, like=z, rmatvec=rmatvec)


def bilinear_partials(functional: Functional, z: Tensor, p: list[Tensor] | tuple[Tensor, ...],
                      a: Tensor, b: Tensor) -> tuple[Tensor, ...]:
    r"""The partial derivatives of :math:`a^\top J(z, p)\, b` in ``z`` and each ``p[i]``
    (``a``, ``b`` held fixed), differentiable in everything at the outer level."""

    def s(zz: Tensor, *q: Tensor) -> Tensor:
        _, vjp = torch.func.vjp(lambda y: functional(y, *q), zz)
        return (vjp(a)[0] * b).sum()

    return torch.func.grad(s, argnums=tuple(range(1 + len(p))))(z, *p)


def input_partials(functional: Functional, z: Tensor, p: list[Tensor], u: Tensor
                   ) -> tuple[Tensor, ...]:
    r""":math:`\partial_p [u^\top f(z, p)]` for each input (``z`` held fixed), differentiable
    in ``z``, ``p`` and ``u`` at the outer level."""
    if not p:
        return ()
    _, vjp = torch.func.vjp(lambda *q: functional(z, *q), *p)
    return vjp(u)


def _warn_unconverged(sol: Any, meta: dict[str, Any]) -> None:
    if sol.all_converged or meta.get("on_failure", "warn") == "ignore":
        return
    msg = (f"higher-order implicit backward: the linear solve {meta['solver']} did not "
           f"converge for {int((~sol.converged).sum())}/{sol.converged.numel()} samples "
           f"(worst residual {float(sol.residual.max()):.3e}); the derivative is inexact.")
    if meta.get("on_failure") == "raise":
        raise RuntimeError(msg)
    warnings.warn(msg, meta.get("warning", RuntimeWarning), stacklevel=3)
