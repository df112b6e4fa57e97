"""Small classification benchmarks that need no download: digits and MNIST-1D."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np

from ._core import Splits, cache_dir, check_options, make_splits, require, split_permutation

DIGITS_SIZES = (1297, 250, 250)  # train / val / test, of 1797


def load_digits(*, root=None, seed: int = 0, subset: int | None = None, **options) -> Splits:
    """scikit-learn's 8x8 digits (1797 images, 10 classes).

    Pixels are scaled to [0, 1] and standardised with the training split's mean and
    std (one scalar: a single channel). A permutation drawn from ``seed`` assigns
    1297 / 250 / 250 samples to train / val / test. Shape ``(1, 8, 8)`` (kind
    ``"image"``), or ``(64,)`` (kind ``"vector"``) with ``flatten=True``.
    """
    opts = check_options("digits", options, {"flatten": False})
    datasets = require("sklearn.datasets", "the 'digits' dataset")
    bunch = datasets.load_digits()
    x = (np.asarray(bunch.images, dtype=np.float32) / 16.0)[:, None]  # (N, 1, 8, 8)
    y = np.asarray(bunch.target, dtype=np.int64)
    n_train, n_val, n_test = DIGITS_SIZES
    perm = np.random.default_rng(seed).permutation(len(y))
    idx = {
        "train": perm[:n_train],
        "val": perm[n_train : n_train + n_val],
        "test": perm[n_train + n_val : n_train + n_val + n_test],
    }
    arrays = {f"{k}_{p}": a[i] for p, i in idx.items() for k, a in (("x", x), ("y", y))}
    return make_splits(
        "digits",
        "image",
        arrays,
        10,
        subset=subset,
        flatten=bool(opts["flatten"]),
        info={f"{p}_index": i for p, i in idx.items()},
    )


MNIST1D_VAL = 500


def load_mnist1d(*, root=None, seed: int = 0, subset: int | None = None, **options) -> Splits:
    """MNIST-1D (Greydanus, 2020), generated locally with the ``mnist1d`` package.

    The package's default arguments (``get_dataset_args()``: 5000 signals of length 40,
    generator seed 42, 80/20 split) give 4000 training and 1000 test signals. The test
    split is that default 1000-sample test set, the one the package's published
    baselines use (MLP ~68%, CNN ~94%, GRU ~91% accuracy). The last 500 of a permutation
    of the 4000 training signals drawn from ``seed`` are held out for validation
    (3500 / 500 / 1000). Values are standardised with the training split's mean and
    std. Shape ``(1, 40)`` (kind ``"sequence"``), or ``(40,)`` with ``flatten=True``.

    Options: ``flatten`` (False); ``data_seed`` (42: the generator's seed; other values
    give a different, equally deterministic data set); ``cache`` (True: keep the
    generated arrays as ``mnist1d_seed{data_seed}.npz`` under ``root``, else
    ``$DEQKIT_CACHE``, else ``~/.cache/deqkit``; an unwritable cache is skipped).
    Nothing is downloaded.
    """
    opts = check_options("mnist1d", options, {"flatten": False, "data_seed": 42, "cache": True})
    raw = _mnist1d_arrays(int(opts["data_seed"]), root, bool(opts["cache"]))
    x = raw["x"].astype(np.float32)[:, None]  # (4000, 1, 40)
    y = raw["y"].astype(np.int64)
    train_idx, val_idx = split_permutation(len(y), MNIST1D_VAL, seed)
    arrays = {
        "x_train": x[train_idx],
        "y_train": y[train_idx],
        "x_val": x[val_idx],
        "y_val": y[val_idx],
        "x_test": raw["x_test"].astype(np.float32)[:, None],
        "y_test": raw["y_test"].astype(np.int64),
    }
    info = {
        "train_index": train_idx,
        "val_index": val_idx,
        "test_index": np.arange(len(raw["y_test"])),
    }
    return make_splits(
        "mnist1d",
        "sequence",
        arrays,
        10,
        subset=subset,
        flatten=bool(opts["flatten"]),
        info=info,
    )


def _mnist1d_arrays(data_seed: int, root, cache: bool) -> dict[str, np.ndarray]:
    keys = ("x", "y", "x_test", "y_test")
    path = cache_dir(root) / f"mnist1d_seed{data_seed}.npz"
    if cache and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in keys}
        except (OSError, KeyError, ValueError):
            pass  # a corrupt cache is regenerated below
    data = require("mnist1d.data", "the 'mnist1d' dataset")
    args = data.get_dataset_args()
    args.seed = data_seed
    # make_dataset seeds the global NumPy and `random` generators: restore them after.
    np_state, py_state = np.random.get_state(), random.getstate()  # noqa: NPY002
    try:
        generated = data.make_dataset(args)
    finally:
        np.random.set_state(np_state)  # noqa: NPY002
        random.setstate(py_state)
    arrays = {k: np.asarray(generated[k]) for k in keys}
    if cache:
        _save_quietly(path, arrays)
    return arrays


def _save_quietly(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
