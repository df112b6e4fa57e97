r"""Hypernetworks: a network that generates the parameters of another network.

A hypernetwork (Ha, Dai, Le 2016, "HyperNetworks", arXiv:1609.09106) maps a context vector
``c`` to the parameters ``theta(c)`` of a *target* network ``f``; the composed model is

.. math::

    y = f(x;\, \theta(c)), \qquad
    \theta(c) = b + W_{\text{head}}\, g(c),

where ``g`` is an MLP trunk and ``W_head, b`` a linear output head.  Differentiating through
the composition is plain autograd, but the generated weights are activations of the graph:
unless care is taken, all of them are stored for the backward pass (once per context in a
batch of contexts).  :class:`HyperNetwork` offers a *chunked* mode that generates the weights
block by block and, for an :class:`torch.nn.Sequential` target, layer by layer under
:func:`torch.utils.checkpoint.checkpoint`, so no generated weight is kept for the backward.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.utils.checkpoint import checkpoint

from .._checks import check_float, check_int

__all__ = ["HyperNetwork"]


class _Slot(NamedTuple):
    name: str  # name relative to the module it is applied to
    shape: torch.Size
    offset: int  # offset in the flat generated vector of the owning block
    numel: int


class _Block(NamedTuple):
    """One child of a Sequential target with the generated rows ``[start, stop)``."""

    module: nn.Module
    slots: tuple[_Slot, ...]
    start: int
    stop: int


def _map_tensors(fn, out: Any) -> Any:
    if isinstance(out, Tensor):
        return fn(out)
    if isinstance(out, tuple | list):
        return type(out)(_map_tensors(fn, o) for o in out)
    if isinstance(out, dict):
        return {k: _map_tensors(fn, v) for k, v in out.items()}
    return out


def _unflatten(flat: Tensor, slots: Sequence[_Slot], offset: int = 0) -> dict[str, Tensor]:
    lead = flat.shape[:-1]
    return {
        s.name: flat.narrow(-1, s.offset - offset, s.numel).reshape(lead + s.shape) for s in slots
    }


def _is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _generated_names(
    owner: str, target: nn.Module, named: dict[str, nn.Parameter], params: list[str] | None
) -> list[str]:
    """The names of the parameters to generate, in the target's order, checked: all of them
    for ``params=None``, floating point, one dtype and device."""
    if not named:
        raise ValueError(f"{owner}: `target` has no parameters to generate.")
    if params is None:
        names = list(named)
    else:
        if isinstance(params, str) or not all(isinstance(p, str) for p in params):
            raise TypeError(
                f"{owner}: `params` must be a list of parameter names (str), got {params!r}."
            )
        if len(params) == 0:
            raise ValueError(f"{owner}: `params` is empty; pass None to generate all.")
        if len(set(params)) != len(params):
            raise ValueError(f"{owner}: `params` has duplicate names: {params!r}.")
        unknown = [p for p in params if p not in named]
        if unknown:
            raise ValueError(
                f"{owner}: unknown parameter name(s) {unknown} for target "
                f"{type(target).__name__}; available: {list(named)}."
            )
        wanted = set(params)
        names = [n for n in named if n in wanted]  # target order
    first = named[names[0]]
    if not first.is_floating_point():
        raise ValueError(f"{owner}: generated parameters must be floating point.")
    for n in names:
        if named[n].dtype != first.dtype or named[n].device != first.device:
            raise ValueError(
                f"{owner}: all generated parameters must share dtype and device; "
                f"{names[0]!r} is {first.dtype}/{first.device}, {n!r} is "
                f"{named[n].dtype}/{named[n].device}."
            )
    return names


def _init_head(head: nn.Linear, targets: list[Tensor], init_scale: float) -> None:
    """Head bias = the target tensors' initial values (the learned base); head weight row
    ``i`` ~ N(0, (init_scale * s_i)^2 / h), ``s_i`` the RMS of the tensor output ``i`` belongs
    to (the mean RMS of the others for an all-zero tensor)."""
    width = head.in_features
    factory = {"dtype": head.weight.dtype, "device": head.weight.device}
    with torch.no_grad():
        rms = [t.detach().float().pow(2).mean().sqrt().item() for t in targets]
        nonzero = [r for r in rms if r > 0]
        fallback = sum(nonzero) / len(nonzero) if nonzero else 1.0
        scales = torch.cat(
            [
                torch.full((t.numel(),), r if r > 0 else fallback, **factory)
                for t, r in zip(targets, rms)
            ]
        )
        head.bias.copy_(torch.cat([t.detach().reshape(-1) for t in targets]))
        w = torch.randn(head.out_features, width, **factory) * (init_scale / math.sqrt(width))
        head.weight.copy_(w * scales[:, None])


class HyperNetwork(nn.Module):
    r"""Generate (some of) the parameters of ``target`` from a context vector.

    The generated parameters are the flat vector

    .. math::

        \theta(c) = b + W\, g(c) \in \mathbb{R}^P, \qquad
        g = (\tanh \circ L_{\text{depth}}) \circ \dots \circ (\tanh \circ L_1),

    split and reshaped into the target's parameter tensors (in ``target.named_parameters()``
    order).  ``forward(c, *inputs)`` returns ``target(*inputs)`` evaluated with ``theta(c)``
    through :func:`torch.func.functional_call`.

    **Initialisation.**  The head bias ``b`` is initialised to the target's own initial
    parameters (a *learned base*), and the head weight ``W`` to small Gaussian entries, row
    ``i`` scaled by the RMS ``s_i`` of the target tensor that output ``i`` belongs to:
    ``W_ij ~ N(0, (init_scale * s_i)^2 / h)`` (``h`` = trunk width).  Since the trunk features
    are ``O(1)`` (``tanh``), at the start ``theta(c) = theta_0 + delta(c)`` with
    ``|delta| ~ init_scale * s``: the generated weights have the target's default init scale
    and depend on ``c`` by a relative ``init_scale``.  ``init_scale = 0`` gives a zero head
    weight (``theta(c) = theta_0`` for all ``c`` at the start; it still trains, since the
    head weight's gradient ``dL/dtheta * g(c)^T`` is non-zero).  A target tensor that is all
    zeros uses the mean RMS of the other generated tensors as ``s``.

    **Which parameters.**  ``params=None`` generates all of them; otherwise only the named
    ones.  The generated ones are *removed* from the target's parameters (``target`` is
    modified in place): each becomes a non-persistent buffer holding its initial value, so
    ``target`` still runs on its own and ``HyperNetwork.parameters()`` is exactly the trunk,
    the head and the target's non-generated parameters (which stay ordinary trainable
    parameters, shared by all contexts).

    **Shared vs per-sample weights.**  ``context`` of shape ``(context_dim,)``: one set of
    weights for the whole call; the inputs are passed unchanged.  ``context`` of shape
    ``(B, context_dim)``: sample ``b`` uses its own weights ``theta(c_b)``; every input must
    have leading dimension ``B``, and the target is applied per sample with
    :func:`torch.func.vmap` over (weights, inputs), each call seeing a batch of one
    (``x[b].unsqueeze(0)``, the output's leading 1 removed).  Modules that use batch
    statistics (``BatchNorm`` in training mode) are therefore not supported per sample.

    **Chunked generation** (``chunk_size`` set).  The head's rows are evaluated in blocks of
    ``chunk_size`` outputs (``F.linear(g, W[s:e], b[s:e])``), so no single head matmul
    produces more than ``chunk_size`` outputs per context.  If ``target`` is a plain
    :class:`torch.nn.Sequential`, the weights of each child are generated just before the
    child is applied, inside a :func:`torch.utils.checkpoint.checkpoint` segment
    (``use_reentrant=False``) that covers "generate this child's weights, apply the child":

    * *saved* for the backward: the trunk features ``g(c)`` and each child's input (held by
      the checkpoint), plus whatever the parameter-free children save;
    * *not saved*: any generated weight and any activation inside a parametrised child.  The
      backward re-generates one child's weights at a time (and recomputes that child), so
      the extra memory at any moment of the backward is one child's weights and activations,
      not all of them.  The price is one extra head evaluation and child forward per child,
      plus one head-sized gradient buffer per child (the backward of slicing the head's rows;
      about 3x the unchunked step time in ``benchmarks/bench_hyper_memory.py``).

    For any other target the whole "generate blockwise + call the target" is one checkpoint
    segment: nothing generated is stored between the forward and the backward, but the
    backward regenerates all weights at once, so the peak during the backward is not
    reduced.  With ``chunk_size=None`` (default) the weights are generated by one head
    matmul and autograd stores them (they are inputs of the target's ops) until the backward.
    Both modes compute the same function and the same gradients up to round-off.

    Tied (shared) parameters of the target are generated once, under their first name.

    Args:
        target: the network whose parameters are generated.  Its generated parameters are
            turned into buffers (see above); its non-generated ones are kept.
        context_dim: size of the context vector (``> 0``).
        params: names (as in ``target.named_parameters()``) of the parameters to generate;
            ``None`` (default) generates all.
        hidden: width of the trunk's hidden layers (default ``64``).
        depth: number of ``Linear + tanh`` layers in the trunk (default ``2``); ``0`` makes
            the head act on the context directly.
        chunk_size: number of generated outputs per head block, enabling the chunked,
            checkpointed mode; ``None`` (default) generates everything at once.  Can be
            changed later through the attribute of the same name.
        init_scale: relative size of the initial context-dependent part of the weights
            (default ``0.1``; ``0`` = zero head weight).

    Raises:
        ValueError: ``target`` has no parameters, ``params`` is empty, has duplicates or
            names a parameter ``target`` does not have, or an invalid hyperparameter.
        TypeError: ``target`` is not an ``nn.Module`` or ``params`` is not a list of str.

    Reference: Ha, Dai, Le (2017), "HyperNetworks", ICLR; von Oswald et al. (2020), "Continual
        learning with hypernetworks" (chunked weight generation).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> target = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> hyper = HyperNetwork(target, context_dim=3, hidden=16)
        >>> hyper(torch.randn(3), torch.randn(5, 2)).shape  # one context for the batch
        torch.Size([5, 1])
        >>> hyper(torch.randn(4, 3), torch.randn(4, 10, 2)).shape  # one context per sample
        torch.Size([4, 10, 1])
        >>> {k: tuple(v.shape) for k, v in hyper.generate(torch.randn(3)).items()}
        {'0.weight': (8, 2), '0.bias': (8,), '2.weight': (1, 8), '2.bias': (1,)}
    """

    def __init__(
        self,
        target: nn.Module,
        context_dim: int,
        params: list[str] | None = None,
        hidden: int = 64,
        depth: int = 2,
        chunk_size: int | None = None,
        init_scale: float = 0.1,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if not isinstance(target, nn.Module):
            raise TypeError(f"{name}: `target` must be an nn.Module, got {type(target).__name__}.")
        check_int(name, "context_dim", context_dim)
        check_int(name, "hidden", hidden)
        check_int(name, "depth", depth, 0)
        check_float(name, "init_scale", init_scale, ge=0)

        named = dict(target.named_parameters())
        names = _generated_names(name, target, named, params)
        slots, offset = [], 0
        for n in names:
            p = named[n]
            slots.append(_Slot(n, p.shape, offset, p.numel()))
            offset += p.numel()
        self._slots: tuple[_Slot, ...] = tuple(slots)
        self.context_dim = context_dim
        self.num_generated = offset
        first = named[names[0]]
        factory = {"dtype": first.dtype, "device": first.device}

        layers: list[nn.Module] = []
        width = context_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden, **factory), nn.Tanh()]
            width = hidden
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Linear(width, offset, **factory)
        _init_head(self.head, [named[n] for n in names], init_scale)

        # The generated parameters stop being parameters of the target.
        for n in names:
            mod_name, _, leaf = n.rpartition(".")
            mod = target.get_submodule(mod_name)
            p = mod._parameters.pop(leaf)
            mod.register_buffer(leaf, p.detach().clone(), persistent=False)
        self.target = target

        self._blocks: tuple[_Block, ...] | None = self._plan_blocks(target, self._slots)
        self.chunk_size = chunk_size

    # ------------------------------------------------------------------ configuration
    @property
    def chunk_size(self) -> int | None:
        return self._chunk_size

    @chunk_size.setter
    def chunk_size(self, value: int | None) -> None:
        check_int(type(self).__name__, "chunk_size", value, none=True)
        self._chunk_size = value

    @property
    def generated_names(self) -> tuple[str, ...]:
        """Names (in the target) of the generated parameters, in generation order."""
        return tuple(s.name for s in self._slots)

    @staticmethod
    def _plan_blocks(target: nn.Module, slots: Sequence[_Slot]) -> tuple[_Block, ...] | None:
        """Group the slots by direct child of a plain Sequential (contiguous rows), else None."""
        if not _is_plain_sequential(target):
            return None
        blocks, k = [], 0
        for child_name, child in target.named_children():
            prefix = child_name + "."
            start = slots[k].offset if k < len(slots) else 0
            own = []
            while k < len(slots) and slots[k].name.startswith(prefix):
                s = slots[k]
                own.append(_Slot(s.name[len(prefix) :], s.shape, s.offset, s.numel))
                k += 1
            stop = own[-1].offset + own[-1].numel if own else start
            blocks.append(_Block(child, tuple(own), start, stop))
        if k != len(slots):  # a generated name not under a child in order: no layer plan
            return None
        return tuple(blocks)

    def extra_repr(self) -> str:
        return (
            f"context_dim={self.context_dim}, generated={len(self._slots)} tensors / "
            f"{self.num_generated} values, chunk_size={self.chunk_size}"
        )

    # ------------------------------------------------------------------ helpers
    def _check_context(self, context: Tensor, inputs: Sequence[Any]) -> bool:
        name = type(self).__name__
        if not isinstance(context, Tensor):
            raise TypeError(f"{name}: `context` must be a Tensor, got {type(context).__name__}.")
        if context.ndim not in (1, 2) or context.shape[-1] != self.context_dim:
            raise ValueError(
                f"{name}: `context` must have shape ({self.context_dim},) (one context for "
                f"all inputs) or (B, {self.context_dim}) (one per sample), got "
                f"{tuple(context.shape)}."
            )
        batched = context.ndim == 2
        if batched:
            B = context.shape[0]
            for i, x in enumerate(inputs):
                if not isinstance(x, Tensor) or x.ndim == 0 or x.shape[0] != B:
                    shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                    raise ValueError(
                        f"{name}: with a batch of contexts of shape {tuple(context.shape)}, "
                        f"every input must be a Tensor with leading dimension {B}; input {i} "
                        f"is {shape}."
                    )
        return batched

    def _head_rows(self, h: Tensor, start: int, stop: int) -> Tensor:
        """Rows ``[start, stop)`` of the head, evaluated in blocks of ``chunk_size``."""
        W, b = self.head.weight, self.head.bias
        if (start, stop) != (0, W.shape[0]):
            # one slice per call: each slice's backward materialises a head-sized gradient,
            # so slicing per block would cost that once per block
            W, b = W[start:stop], b[start:stop]
        cs = self.chunk_size or (stop - start)
        if stop - start <= cs:
            return F.linear(h, W, b)
        parts = [F.linear(h, w, c) for w, c in zip(W.split(cs), b.split(cs))]
        return torch.cat(parts, dim=-1)

    @staticmethod
    def _call_module(module: nn.Module, params: dict[str, Tensor], inputs: tuple, batched: bool):
        if not batched:
            return functional_call(module, params, inputs)

        def one(p: dict[str, Tensor], *xs: Tensor):
            out = functional_call(module, p, tuple(x.unsqueeze(0) for x in xs))
            return _map_tensors(lambda t: t.squeeze(0), out)

        return vmap(one)(params, *inputs)

    def _generate_and_call(self, batched: bool, h: Tensor, *inputs: Any):
        flat = self._head_rows(h, 0, self.num_generated)
        return self._call_module(self.target, _unflatten(flat, self._slots), inputs, batched)

    def _block_forward(self, block: _Block, batched: bool, h: Tensor, x: Tensor) -> Tensor:
        flat = self._head_rows(h, block.start, block.stop)
        return self._call_module(
            block.module, _unflatten(flat, block.slots, block.start), (x,), batched
        )

    # ------------------------------------------------------------------ public API
    def generate(self, context: Tensor) -> dict[str, Tensor]:
        """Generated parameters for ``context``.

        Args:
            context: ``(context_dim,)`` or ``(B, context_dim)``.

        Returns:
            ``{name: tensor}`` in the target's naming, each of the parameter's shape, with a
            leading ``B`` for a batch of contexts.  Blockwise if ``chunk_size`` is set.
        """
        self._check_context(context, ())
        h = self.trunk(context)
        return _unflatten(self._head_rows(h, 0, self.num_generated), self._slots)

    def forward(self, context: Tensor, *inputs: Any) -> Any:
        """Evaluate ``target(*inputs)`` with the parameters generated from ``context``.

        Args:
            context: ``(context_dim,)`` (shared weights) or ``(B, context_dim)`` (per-sample
                weights; every input then has leading dimension ``B``).
            *inputs: the target's positional inputs.

        Returns:
            The target's output (per sample stacked along dim 0 for a batch of contexts).
        """
        batched = self._check_context(context, inputs)
        h = self.trunk(context)
        if self.chunk_size is None:
            return self._generate_and_call(batched, h, *inputs)
        grad = torch.is_grad_enabled()
        if self._blocks is None:
            fn = functools.partial(self._generate_and_call, batched)
            if not grad:
                return fn(h, *inputs)
            return checkpoint(fn, h, *inputs, use_reentrant=False)
        if len(inputs) != 1:
            raise ValueError(
                f"{type(self).__name__}: a Sequential target takes exactly one input, "
                f"got {len(inputs)}."
            )
        (x,) = inputs
        for block in self._blocks:
            if not block.slots:  # parameter-free (or non-generated) child
                x = self._call_module(block.module, {}, (x,), batched)
            elif grad:
                fn = functools.partial(self._block_forward, block, batched)
                x = checkpoint(fn, h, x, use_reentrant=False)
            else:
                x = self._block_forward(block, batched, h, x)
        return x
