"""Name -> model registry of the zoo."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from ._conv import ConvDEQ, ResNetConv
from ._mdeq import MDEQ
from ._mlp import DEQMLP, MonotoneClassifier, ResNetMLP
from ._ode import NeuralODEClassifier
from ._transformer import DEQTransformerLM, TransformerLM, _LanguageModel
from ._unrolled import FIXED_SETTINGS, UnrolledConv, UnrolledMLP

#: Registered model constructors by name. Classifiers are called as
#: ``cls(in_shape, num_classes, **hyperparameters)``; the language models
#: (``"deq_transformer"``, ``"transformer"``) as ``cls(vocab_size=num_classes,
#: block_size=in_shape[0], **hyperparameters)`` by :func:`build_model`.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "deq_mlp": DEQMLP,
    "conv_deq": ConvDEQ,
    "mdeq": MDEQ,
    "deq_transformer": DEQTransformerLM,
    "monotone": MonotoneClassifier,
    "resnet_mlp": ResNetMLP,
    "resnet_conv": ResNetConv,
    "unrolled_mlp": UnrolledMLP,
    "unrolled_conv": UnrolledConv,
    "node": NeuralODEClassifier,
    "transformer": TransformerLM,
}


# models whose **deq_kwargs go to dk.nn.DEQ, and the names it accepts there
_FORWARDS_DEQ_KWARGS = (DEQMLP, ConvDEQ, MDEQ, DEQTransformerLM)
_DEQ_EXTRA = ("throw", "compact", "trace", "compact_ratio", "divergence_ratio", "patience")


def hyperparameters(factory: Callable[..., Any]) -> dict[str, Any]:
    """Keyword hyperparameters accepted by a model constructor, with their defaults.

    Follows ``**kwargs`` up the class hierarchy (e.g. :class:`UnrolledMLP` accepts the
    hyperparameters of :class:`DEQMLP` it does not fix); positional inputs (``in_shape``,
    ``num_classes``, ``vocab_size``) are left out. A value of ``inspect.Parameter.empty``
    means "no default".

    Example:
        >>> sorted(hyperparameters(ResNetMLP))
        ['activation', 'depth', 'width']
    """
    out: dict[str, Any] = {}
    classes = factory.__mro__ if isinstance(factory, type) else (factory,)
    fixed = {"in_shape", "num_classes", "vocab_size", "self"}
    if isinstance(factory, type) and issubclass(factory, (UnrolledMLP, UnrolledConv)):
        fixed |= set(FIXED_SETTINGS)
    for cls in classes:
        init = cls.__init__ if isinstance(cls, type) else cls
        if isinstance(cls, type) and (cls is nn.Module or "__init__" not in vars(cls)):
            continue
        more = False
        for name, p in inspect.signature(init).parameters.items():
            if p.kind is p.VAR_KEYWORD:
                more = True
            elif p.kind is not p.VAR_POSITIONAL and name not in fixed:
                out.setdefault(name, p.default)
        if not more or not isinstance(cls, type):
            break
    return out


def build_model(
    name: str, in_shape: tuple[int, ...], num_classes: int, **kwargs: Any
) -> nn.Module:
    """Build a registered model by name.

    Args:
        name: one of :data:`MODELS`.
        in_shape: per-sample input shape; for the language models ``(T,)`` with ``T`` used as
            ``block_size`` (unless ``block_size`` is given).
        num_classes: number of classes (the vocabulary size for the language models).
        **kwargs: hyperparameters of the model.

    Raises:
        ValueError: unknown name (the message lists the registered names).
        TypeError: unknown hyperparameters (the message names them and the accepted ones).

    Example:
        >>> import torch
        >>> model = build_model("deq_mlp", (4,), 3, width=8)
        >>> model(torch.randn(2, 4)).shape
        torch.Size([2, 3])
        >>> build_model("deq_mlp", (4,), 3, widht=8)
        Traceback (most recent call last):
        ...
        TypeError: build_model('deq_mlp'): unknown hyperparameter(s) ['widht']; ...
    """
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; registered models: {sorted(MODELS)}.")
    factory = MODELS[name]
    accepted = hyperparameters(factory)
    is_lm = isinstance(factory, type) and issubclass(factory, _LanguageModel)
    if isinstance(factory, type) and issubclass(factory, _FORWARDS_DEQ_KWARGS):
        accepted = {**dict.fromkeys(_DEQ_EXTRA), **accepted}
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(
            f"build_model({name!r}): unknown hyperparameter(s) {unknown}; "
            f"{factory.__name__} accepts {sorted(accepted)}."
        )
    if is_lm:
        shape = tuple(in_shape)
        if "block_size" not in kwargs:
            if len(shape) != 1:
                raise ValueError(
                    f"build_model({name!r}): a language model's `in_shape` is (T,), "
                    f"got {in_shape!r}."
                )
            kwargs["block_size"] = shape[0]
        return factory(vocab_size=num_classes, **kwargs)
    return factory(in_shape, num_classes, **kwargs)


__all__ = ["MODELS", "build_model", "hyperparameters"]
