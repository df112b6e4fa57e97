"""Shared types and helpers of :mod:`deqkit.data`."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

EXTRA_HINT = "pip install 'deqkit[data]'"


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about a data set.

    ``kind`` is ``"vector"`` (inputs ``(D,)``), ``"image"`` (``(C, H, W)``),
    ``"sequence"`` (a 1-D signal, channels first: ``(C, L)``) or ``"text"``
    (``(block_size,)`` int64 character ids). ``num_classes`` is the number of
    classes, or the vocabulary size for text; ``vocab`` maps index -> character.

    >>> DataSpec("toy", "vector", (3,), 2)
    DataSpec(name='toy', kind='vector', input_shape=(3,), num_classes=2, vocab=None)
    """

    name: str
    kind: str
    input_shape: tuple
    num_classes: int
    vocab: str | None = None


@dataclass
class Splits:
    """Train/validation/test ``TensorDataset`` s of ``(inputs, targets)`` plus their spec.

    ``info`` holds what was used to build them: ``mean`` and ``std`` (the
    standardisation statistics, computed on the full training split, before
    ``subset``), and ``train_index`` / ``val_index`` / ``test_index`` (int64 positions
    of each split's samples in the source arrays, where those are meaningful).

    Example:
        >>> from deqkit.data import load_dataset
        >>> splits = load_dataset("digits", seed=0)
        >>> [len(s) for s in (splits.train, splits.val, splits.test)], splits.spec.num_classes
        ([1297, 250, 250], 10)
        >>> x, y = splits.train[0]
        >>> x.shape, y.dtype, sorted(splits.info)[:2]
        (torch.Size([1, 8, 8]), torch.int64, ['mean', 'std'])
    """

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    spec: DataSpec
    info: dict[str, Any] = field(default_factory=dict, repr=False)


def check_options(name: str, options: Mapping[str, Any], allowed: Mapping[str, Any]) -> dict:
    """Merge ``options`` into the defaults ``allowed``; unknown keys raise ValueError."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        known = ", ".join(sorted(allowed)) or "none"
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for dataset {name!r}; "
            f"its options are: {known} (plus root, seed, subset)"
        )
    merged = dict(allowed)
    merged.update(options)
    return merged


def require(module: str, what: str):
    """Import ``module`` lazily, with an ImportError that names the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{what} needs the optional package {module.split('.')[0]!r}: {EXTRA_HINT}"
        ) from err


def cache_dir(root: str | os.PathLike | None) -> Path:
    """``root``, else ``$DEQKIT_CACHE``, else ``~/.cache/deqkit``."""
    if root is not None:
        return Path(root)
    env = os.environ.get("DEQKIT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "deqkit"


def resolve_path(path: str, root: str | os.PathLike | None) -> Path:
    p = Path(path).expanduser()
    if root is not None and not p.is_absolute():
        p = Path(root) / p
    return p


def split_permutation(n: int, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded permutation of ``range(n)``: (first ``n - n_val``, last ``n_val``)."""
    perm = np.random.default_rng(seed).permutation(n)
    return perm[: n - n_val], perm[n - n_val :]


def channel_stats(x: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean/std shaped to broadcast over one sample.

    Images and sequences: one value per channel (axis 1). Vectors: one per feature.
    A zero std is replaced by 1 (constant features are only centred).
    """
    x = x.astype(np.float64, copy=False)
    if kind in ("image", "sequence"):
        axes = tuple(i for i in range(x.ndim) if i != 1)
        shape = (x.shape[1],) + (1,) * (x.ndim - 2)
        mean = x.mean(axis=axes).reshape(shape)
        std = x.std(axis=axes).reshape(shape)
    else:
        mean = x.mean(axis=0)
        std = x.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)


def make_splits(
    name: str,
    kind: str,
    arrays: Mapping[str, np.ndarray],
    num_classes: int,
    *,
    subset: int | None,
    flatten: bool = False,
    info: dict | None = None,
) -> Splits:
    """Standardise with train statistics, apply ``subset``, wrap in TensorDatasets.

    ``arrays`` has float ``x_train, x_val, x_test`` and integer ``y_*``. Statistics are
    pooled according to ``kind``; ``flatten=True`` then reshapes every sample to a
    vector (kind ``"vector"``), so flattening never changes the values.
    """
    x_train = arrays["x_train"]
    mean, std = channel_stats(x_train, kind)
    out = {}
    for part in ("train", "val", "test"):
        x = (arrays[f"x_{part}"].astype(np.float32) - mean) / std
        if flatten:
            x = x.reshape(len(x), -1)
        y = np.asarray(arrays[f"y_{part}"], dtype=np.int64)
        out[part] = (x.astype(np.float32, copy=False), y)
    if flatten:
        kind = "vector"
    x, y = out["train"]
    keep = apply_subset(subset, len(y))
    out["train"] = (x[:keep], y[:keep])
    info = dict(info or {})
    info.update(mean=torch.from_numpy(np.array(mean)), std=torch.from_numpy(np.array(std)))
    if "train_index" in info:
        info["train_index"] = info["train_index"][:keep]
    for key in ("train_index", "val_index", "test_index"):
        if key in info:
            info[key] = torch.as_tensor(np.asarray(info[key], dtype=np.int64))
    spec = DataSpec(name, kind, tuple(out["test"][0].shape[1:]), int(num_classes))
    return Splits(*(to_dataset(*out[p]) for p in ("train", "val", "test")), spec, info)


def apply_subset(subset: int | None, n: int) -> int:
    if subset is None:
        return n
    if isinstance(subset, bool) or not isinstance(subset, int | np.integer) or subset < 1:
        raise ValueError(f"subset must be a positive int or None, got {subset!r}")
    return min(int(subset), n)


def to_dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y))


Loader = Callable[..., Splits]
