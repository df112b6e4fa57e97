"""Data sets for deep equilibrium models, as ``TensorDataset`` splits.

All loaders work offline and are deterministic for a given ``seed``. Inputs are
float32 (int64 character ids for ``"text"``), targets int64. Optional packages
(scikit-learn for ``"digits"``, ``mnist1d`` for ``"mnist1d"``, Pillow for
``"folder:"``) are imported only when needed: ``pip install 'deqkit[data]'``.

>>> from deqkit.data import available_datasets, load_dataset
>>> available_datasets()
['digits', 'mnist1d', 'text', 'npz:PATH', 'folder:PATH']
>>> splits = load_dataset("text", block_size=32)
>>> splits.spec.kind, splits.spec.input_shape, splits.spec.num_classes == len(splits.spec.vocab)
('text', (32,), True)
>>> x, y = splits.train[0]
>>> bool((x[1:] == y[:-1]).all())
True

CIFAR-10: convert the official python batches once with :func:`cifar10_to_npz`, then
``load_dataset("npz:cifar10.npz")``.
"""

from __future__ import annotations

import os

from ._arrays import cifar10_to_npz, load_folder, load_npz
from ._builtin import load_digits, load_mnist1d
from ._core import DataSpec, Splits
from ._text import corpus_text, decode, encode, load_text

__all__ = [
    "DataSpec",
    "Splits",
    "available_datasets",
    "cifar10_to_npz",
    "corpus_text",
    "decode",
    "encode",
    "load_dataset",
]

_NAMED = {"digits": load_digits, "mnist1d": load_mnist1d, "text": load_text}
_PREFIXED = {"npz": load_npz, "folder": load_folder}


def available_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset` (``PATH`` stands for a file or folder).

    Example:
        >>> from deqkit.data import available_datasets
        >>> available_datasets()
        ['digits', 'mnist1d', 'text', 'npz:PATH', 'folder:PATH']
    """
    return [*_NAMED, *(f"{p}:PATH" for p in _PREFIXED)]


def load_dataset(
    name: str,
    *,
    root: str | os.PathLike | None = None,
    seed: int = 0,
    subset: int | None = None,
    **options,
) -> Splits:
    """Load a data set as train / val / test ``TensorDataset`` s plus a :class:`DataSpec`.

    ``name``: ``"digits"``, ``"mnist1d"``, ``"text"``, ``"npz:PATH"`` or
    ``"folder:PATH"``. ``root``: cache folder (mnist1d) and base of relative paths.
    ``seed``: fixes every random split. ``subset=N`` keeps the first N training
    samples (standardisation statistics still come from the full training split).
    ``options`` are per data set (e.g. ``flatten=True``, ``block_size=64``); an unknown
    name or option raises ValueError listing what is accepted.

    >>> load_dataset("imagenet")
    Traceback (most recent call last):
    ...
    ValueError: unknown dataset 'imagenet'; available: digits, mnist1d, text, npz:PATH, folder:PATH
    """
    if not isinstance(name, str):
        raise ValueError(f"dataset name must be a str, got {type(name).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    kw = dict(root=root, seed=seed, subset=subset, **options)
    if name in _NAMED:
        return _NAMED[name](**kw)
    prefix, sep, path = name.partition(":")
    if sep and prefix in _PREFIXED:
        if not path:
            raise ValueError(f"dataset {name!r} needs a path after '{prefix}:'")
        return _PREFIXED[prefix](path, **kw)
    raise ValueError(f"unknown dataset {name!r}; available: {', '.join(available_datasets())}")
