"""Character-level language modelling on a corpus shipped with deqkit."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ._core import DataSpec, Splits, apply_subset, check_options, resolve_path

CORPUS = "shakespeare.txt"
FRACTIONS = (0.90, 0.05, 0.05)


def corpus_text(path: str | Path | None = None) -> str:
    """The shipped corpus (Macbeth and The Tempest, public domain), or a UTF-8 file.

    >>> text = corpus_text()
    >>> text.splitlines()[0], len(text) > 150_000
    ('MACBETH', True)
    """
    if path is None:
        return resources.files("deqkit.data").joinpath("corpus", CORPUS).read_text("utf-8")
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"text corpus {str(p)!r} does not exist or is not a file")
    try:
        return p.read_text("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"text corpus {str(p)!r} is not valid UTF-8: {err}") from None


def encode(text: str, vocab: str) -> torch.Tensor:
    """Character ids (int64) of ``text`` under ``vocab`` (index -> character).

    >>> encode("abba", "ab")
    tensor([0, 1, 1, 0])
    >>> decode(encode("abba", "ab"), "ab")
    'abba'
    """
    lookup = {c: i for i, c in enumerate(vocab)}
    try:
        return torch.tensor([lookup[c] for c in text], dtype=torch.int64)
    except KeyError as err:
        raise ValueError(f"character {err.args[0]!r} is not in the vocabulary") from None


def decode(ids, vocab: str) -> str:
    """Inverse of :func:`encode`: a 1-D sequence of ids back to a string.

    Example:
        >>> from deqkit.data import decode
        >>> decode([2, 0, 1], "abc")
        'cab'
    """
    return "".join(vocab[int(i)] for i in torch.as_tensor(ids).reshape(-1).tolist())


def blocks(ids: np.ndarray, block_size: int, stride: int) -> TensorDataset:
    """(input, target) pairs: ``ids[s:s+B]`` and ``ids[s+1:s+B+1]`` for s = 0, stride, ..."""
    starts = np.arange(0, max(len(ids) - block_size, 0), stride)
    cols = np.arange(block_size)
    x = ids[starts[:, None] + cols] if len(starts) else np.empty((0, block_size), np.int64)
    y = ids[starts[:, None] + cols + 1] if len(starts) else np.empty((0, block_size), np.int64)
    return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))


def load_text(*, root=None, seed: int = 0, subset: int | None = None, **options) -> Splits:
    """Character-level LM data.

    The corpus (by default the shipped ``corpus/shakespeare.txt``; option ``path``: any
    UTF-8 file, relative to ``root`` if given) is split by characters, in order, into
    90% / 5% / 5% train / val / test. The vocabulary is the sorted set of characters of
    the whole corpus. Each split is cut into blocks: inputs are ``block_size`` int64
    character ids and targets the same positions shifted by one. Validation and test
    blocks never overlap; training blocks start every ``stride`` characters (default
    ``block_size``). ``seed`` is unused: the split is fixed.
    """
    opts = check_options("text", options, {"block_size": 64, "stride": None, "path": None})
    block_size, stride = opts["block_size"], opts["stride"] or opts["block_size"]
    for key, value in (("block_size", block_size), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"text option {key} must be a positive int, got {value!r}")
    path = None if opts["path"] is None else resolve_path(str(opts["path"]), root)
    text = corpus_text(path)
    vocab = "".join(sorted(set(text)))
    ids = encode(text, vocab).numpy()
    n_train = int(len(ids) * FRACTIONS[0])
    n_val = int(len(ids) * FRACTIONS[1])
    parts = (ids[:n_train], ids[n_train : n_train + n_val], ids[n_train + n_val :])
    if min(len(p) for p in parts) <= block_size:
        raise ValueError(
            f"text corpus {str(path or CORPUS)!r} is too short ({len(ids)} characters) "
            f"for block_size={block_size}: every split needs more than block_size characters"
        )
    train = blocks(parts[0], block_size, stride)
    keep = apply_subset(subset, len(train))
    train = TensorDataset(*(t[:keep] for t in train.tensors))
    val, test = (blocks(p, block_size, block_size) for p in parts[1:])
    spec = DataSpec("text", "text", (block_size,), len(vocab), vocab)
    info = {"split_chars": (n_train, n_val, len(ids) - n_train - n_val)}
    return Splits(train, val, test, spec, info)
