"""User-provided data: ``.npz`` arrays, image folders, and a CIFAR-10 converter."""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path

import numpy as np

from ._core import Splits, check_options, make_splits, require, resolve_path, split_permutation

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff")


def load_npz(path: str, *, root=None, seed: int = 0, subset=None, **options) -> Splits:
    """Arrays from an ``.npz`` with ``x_train, y_train, x_test, y_test`` (+ ``x_val, y_val``).

    Inputs are 4-D images or 2-D vectors. Images: ``uint8`` arrays are read as
    ``(N, H, W, C)`` and divided by 255; float arrays as ``(N, C, H, W)`` already in
    [0, 1] (option ``layout``: ``"auto"``, ``"NHWC"`` or ``"NCHW"`` overrides this).
    Vectors: ``uint8`` is divided by 255. Everything becomes float32 channels-first and
    is standardised with training statistics (per channel for images, per feature for
    vectors). Labels are integers in ``[0, num_classes)``. Without ``x_val``, a seeded
    permutation holds out ``val_fraction`` (0.1) of the training set.
    Options: ``flatten``, ``layout``, ``val_fraction``.
    """
    opts = check_options("npz", options, {"flatten": False, "layout": "auto", "val_fraction": 0.1})
    p = resolve_path(path, root)
    if not p.is_file():
        raise ValueError(f"npz file {str(p)!r} does not exist or is not a file")
    try:
        with np.load(p, allow_pickle=False) as f:
            raw = {k: f[k] for k in f.files}
    except (OSError, ValueError) as err:
        raise ValueError(f"could not read {str(p)!r} as an .npz archive: {err}") from None
    required = ["x_train", "y_train", "x_test", "y_test"]
    missing = [k for k in required if k not in raw]
    if ("x_val" in raw) != ("y_val" in raw):
        missing.append("y_val" if "x_val" in raw else "x_val")
    if missing:
        raise ValueError(
            f"npz file {str(p)!r} lacks array(s) {', '.join(missing)}; it needs "
            f"x_train, y_train, x_test, y_test (and optionally both x_val, y_val); "
            f"it has: {', '.join(sorted(raw)) or 'nothing'}"
        )
    return arrays_to_splits(f"npz:{path}", str(p), raw, seed=seed, subset=subset, **opts)


def arrays_to_splits(name, where, raw, *, seed, subset, flatten, layout, val_fraction) -> Splits:
    if layout not in ("auto", "NHWC", "NCHW"):
        raise ValueError(f"layout must be 'auto', 'NHWC' or 'NCHW', got {layout!r}")
    parts = ["train", "val", "test"] if "x_val" in raw else ["train", "test"]
    xs, ys = {}, {}
    for part in parts:
        xs[part] = _to_float(raw[f"x_{part}"], layout, where, f"x_{part}")
        ys[part] = _to_labels(raw[f"y_{part}"], len(xs[part]), where, f"y_{part}")
    shapes = {xs[p].shape[1:] for p in parts}
    if len(shapes) != 1:
        detail = ", ".join(f"x_{p}: {xs[p].shape[1:]}" for p in parts)
        raise ValueError(f"{where!r}: per-sample shapes differ between splits ({detail})")
    if len(xs["train"]) == 0:
        raise ValueError(f"{where!r}: x_train is empty")
    info = {"test_index": np.arange(len(ys["test"]))}
    if "val" not in xs:
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        n = len(ys["train"])
        n_val = max(1, round(val_fraction * n)) if n > 1 else 0
        if n_val == 0 or n_val >= n:
            raise ValueError(f"{where!r}: too few training samples ({n}) to hold out a val set")
        train_idx, val_idx = split_permutation(n, n_val, seed)
        xs["val"], ys["val"] = xs["train"][val_idx], ys["train"][val_idx]
        xs["train"], ys["train"] = xs["train"][train_idx], ys["train"][train_idx]
        info.update(train_index=train_idx, val_index=val_idx)
    else:
        info.update(train_index=np.arange(len(ys["train"])), val_index=np.arange(len(ys["val"])))
    num_classes = int(max(int(y.max(initial=-1)) for y in ys.values())) + 1
    kind = "image" if xs["train"].ndim == 4 else "vector"
    arrays = {f"x_{p}": xs[p] for p in xs} | {f"y_{p}": ys[p] for p in ys}
    return make_splits(name, kind, arrays, num_classes, subset=subset, flatten=flatten, info=info)


def _to_float(x: np.ndarray, layout: str, where: str, key: str) -> np.ndarray:
    if x.ndim not in (2, 4):
        raise ValueError(
            f"{where!r}: {key} has shape {x.shape}; expected 4-D images (N, H, W, C) uint8 "
            "or (N, C, H, W) float, or 2-D vectors (N, D)"
        )
    if not (np.issubdtype(x.dtype, np.number) and not np.iscomplexobj(x)):
        raise ValueError(f"{where!r}: {key} has dtype {x.dtype}; expected a real number type")
    is_uint8 = x.dtype == np.uint8
    x = x.astype(np.float32) / (255.0 if is_uint8 else 1.0)
    if x.ndim == 4 and (layout == "NHWC" or (layout == "auto" and is_uint8)):
        x = x.transpose(0, 3, 1, 2)
    if not np.isfinite(x).all():
        raise ValueError(f"{where!r}: {key} contains NaN or infinite values")
    return np.ascontiguousarray(x)


def _to_labels(y: np.ndarray, n: int, where: str, key: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"{where!r}: {key} has shape {y.shape}; expected ({n},) class labels")
    is_int = np.issubdtype(y.dtype, np.integer)
    if not is_int and not (np.issubdtype(y.dtype, np.floating) and np.array_equal(y, np.round(y))):
        raise ValueError(f"{where!r}: {key} must hold integer class labels, got {y.dtype}")
    if len(y) and y.min() < 0:
        raise ValueError(f"{where!r}: {key} has negative labels")
    return y.astype(np.int64)


def load_folder(path: str, *, root=None, seed: int = 0, subset=None, **options) -> Splits:
    """Images in ``PATH/train/<class>/*``, ``PATH/test/<class>/*`` (optional ``PATH/val``).

    Needs Pillow. Classes are the sorted sub-folder names of ``train``; files are read in
    sorted order and converted with ``mode`` ("RGB", or "L" for grayscale). All images
    must share a size unless ``size=(H, W)`` resizes them. Then as :func:`load_npz`
    (uint8 HWC, scaled to [0, 1], standardised per channel with training statistics).
    Options: ``flatten``, ``mode``, ``size``, ``val_fraction``.
    """
    opts = check_options(
        "folder", options, {"flatten": False, "mode": "RGB", "size": None, "val_fraction": 0.1}
    )
    image = require("PIL.Image", "the 'folder:' loader (Pillow)")
    base = resolve_path(path, root)
    for part in ("train", "test"):
        if not (base / part).is_dir():
            raise ValueError(f"image folder {str(base)!r} has no {part}/ sub-folder")
    classes = sorted(d.name for d in (base / "train").iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"image folder {str(base / 'train')!r} has no class sub-folders")
    raw = {}
    parts = ["train", "test"] + (["val"] if (base / "val").is_dir() else [])
    for part in parts:
        xs, ys = [], []
        for d in sorted(q for q in (base / part).iterdir() if q.is_dir()):
            if d.name not in classes:
                raise ValueError(f"class folder {str(d)!r} is not among the train classes")
            for f in sorted(q for q in d.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES):
                xs.append(_read_image(image, f, opts["mode"], opts["size"]))
                ys.append(classes.index(d.name))
        if not xs:
            raise ValueError(f"image folder {str(base / part)!r} holds no images")
        if len({a.shape for a in xs}) != 1:
            raise ValueError(
                f"images in {str(base / part)!r} differ in size; pass size=(H, W) to resize"
            )
        raw[f"x_{part}"], raw[f"y_{part}"] = np.stack(xs), np.asarray(ys, np.int64)
    splits = arrays_to_splits(
        f"folder:{path}",
        str(base),
        raw,
        seed=seed,
        subset=subset,
        flatten=opts["flatten"],
        layout="NHWC",
        val_fraction=opts["val_fraction"],
    )
    splits.info["classes"] = classes
    return splits


def _read_image(image, f: Path, mode: str, size) -> np.ndarray:
    try:
        with image.open(f) as im:
            im = im.convert(mode)
            if size is not None:
                im = im.resize((int(size[1]), int(size[0])))
            a = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not read image {str(f)!r}: {err}") from None
    return a[:, :, None] if a.ndim == 2 else a


def cifar10_to_npz(src_dir: str | Path, out_path: str | Path) -> Path:
    """Convert the official CIFAR-10 python batches into an npz for ``"npz:PATH"``.

    ``src_dir`` is the extracted ``cifar-10-batches-py`` folder (``data_batch_1`` ...
    ``data_batch_5``, ``test_batch``; each a pickled dict with ``b"data"``, an
    ``(n, 3072)`` uint8 array of channel-major 32x32 RGB images, and ``b"labels"``).
    Writes ``x_train`` (50000, 32, 32, 3) uint8, ``y_train``, ``x_test``, ``y_test``,
    then: ``load_dataset("npz:" + str(out_path))``. The batches are read by a restricted
    unpickler that admits only numpy arrays and plain containers, so a crafted file raises
    ValueError instead of running code.
    Shell: ``python -c "from deqkit.data import cifar10_to_npz as c;
    c('cifar-10-batches-py', 'cifar10.npz')"``.

    Example:
        >>> import pickle, tempfile
        >>> from pathlib import Path
        >>> import numpy as np
        >>> from deqkit.data import cifar10_to_npz, load_dataset
        >>> src = Path(tempfile.mkdtemp())  # a tiny stand-in for cifar-10-batches-py
        >>> rng = np.random.default_rng(0)
        >>> for name, n in (("data_batch_1", 40), ("test_batch", 10)):
        ...     batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        ...              b"labels": list(range(10)) * (n // 10)}
        ...     _ = (src / name).write_bytes(pickle.dumps(batch))
        >>> out = cifar10_to_npz(src, src / "cifar10.npz")
        >>> splits = load_dataset(f"npz:{out}")
        >>> splits.spec.input_shape, splits.spec.num_classes
        ((3, 32, 32), 10)
    """
    src = Path(src_dir)
    train_files = sorted(src.glob("data_batch_*"), key=lambda q: (len(q.name), q.name))
    test_file = src / "test_batch"
    if not train_files or not test_file.is_file():
        raise ValueError(
            f"{str(src)!r} is not a CIFAR-10 python folder: it needs data_batch_1..5 and "
            f"test_batch (found {len(train_files)} data_batch file(s), "
            f"test_batch {'present' if test_file.is_file() else 'missing'})"
        )
    x_train, y_train = zip(*(_read_cifar_batch(f) for f in train_files))
    x_test, y_test = _read_cifar_batch(test_file)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as fh:  # a file object: np.savez would append ".npz" to a path
        np.savez(
            fh,
            x_train=np.concatenate(x_train),
            y_train=np.concatenate(y_train),
            x_test=x_test,
            y_test=y_test,
        )
    return out


# the globals a CIFAR-10 batch pickle refers to: numpy array, dtype and scalar reconstruction
# (numpy.core in files written by numpy 1.x, numpy._core by numpy 2) and bytes under protocol 2
_CIFAR_GLOBALS = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    *((f"numpy.{c}.multiarray", n) for c in ("core", "_core") for n in ("_reconstruct", "scalar")),
    *((f"numpy.{c}.numeric", "_frombuffer") for c in ("core", "_core")),
})


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR-10 batches hold: dicts, lists, bytes, str, numbers and numpy
    arrays. Any other global (``os.system``, ``builtins.eval``, a class with a malicious
    ``__reduce__``) is refused, so a crafted batch file cannot run code."""

    def find_class(self, module: str, name: str):  # type: ignore[no-untyped-def]
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(
                f"refused to load {module}.{name}: a CIFAR-10 batch holds only numpy arrays, "
                "lists, bytes and numbers (this file is not one, or was crafted to run code)"
            )
        if module.startswith("numpy."):  # whichever of numpy.core / numpy._core exists
            tail = module.split(".")[-1]
            try:
                module = importlib.import_module(f"numpy._core.{tail}").__name__
            except ModuleNotFoundError:
                module = f"numpy.core.{tail}"
        return super().find_class(module, name)


def _read_cifar_batch(f: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(f, "rb") as fh:
            batch = _CifarUnpickler(fh, encoding="bytes").load()
        if not isinstance(batch, dict):
            raise TypeError(f"expected a dict, got {type(batch).__name__}")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as err:  # whatever a damaged or foreign pickle raises
        raise ValueError(f"{str(f)!r} is not a CIFAR-10 batch: {err!r}") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ValueError(
            f"{str(f)!r}: expected data (n, 3072) and n labels, got {data.shape}, {labels.shape}"
        )
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels
