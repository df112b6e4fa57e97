"""Tests of deqkit.data: built-in loaders, text corpus, npz/folder loaders, CIFAR converter."""

import os
import pickle

import numpy as np
import pytest
import torch

from deqkit.data import (
    DataSpec,
    available_datasets,
    cifar10_to_npz,
    corpus_text,
    decode,
    encode,
    load_dataset,
)


def _sizes(s):
    return len(s.train), len(s.val), len(s.test)


def _check_types(s):
    for ds in (s.train, s.val, s.test):
        x, y = ds.tensors
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert tuple(x.shape[1:]) == s.spec.input_shape
        assert int(y.min()) >= 0 and int(y.max()) < s.spec.num_classes


def _disjoint(s, parts=("train", "val", "test")):
    """No source index in two splits (test indices of npz/mnist1d index x_test, not x_train)."""
    idx = [set(s.info[f"{p}_index"].tolist()) for p in parts]
    for i in range(len(idx)):
        for j in range(i + 1, len(idx)):
            assert not idx[i] & idx[j]
    assert sum(map(len, idx)) == sum(len(getattr(s, p)) for p in parts)


# --- digits -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    return load_dataset("digits")


def test_digits_shapes(digits):
    assert digits.spec == DataSpec("digits", "image", (1, 8, 8), 10)
    assert _sizes(digits) == (1297, 250, 250)
    _check_types(digits)
    _disjoint(digits)


def test_digits_standardised_with_train_stats(digits):
    from sklearn.datasets import load_digits

    x = digits.train.tensors[0]
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std(unbiased=False)) - 1) < 1e-4
    raw = torch.tensor(load_digits().images / 16.0, dtype=torch.float32)
    train_raw = raw[digits.info["train_index"]]
    assert torch.allclose(digits.info["mean"].flatten(), train_raw.mean().reshape(1), atol=1e-6)
    assert torch.allclose(digits.info["std"].flatten(), train_raw.std(unbiased=False).reshape(1))
    test_raw = raw[digits.info["test_index"]][:, None]
    expected = (test_raw - digits.info["mean"]) / digits.info["std"]
    assert torch.allclose(digits.test.tensors[0], expected, atol=1e-5)
    assert abs(float(digits.test.tensors[0].mean())) > 1e-4  # not re-standardised itself


def test_digits_determinism_flatten_subset(digits):
    again = load_dataset("digits", seed=0)
    assert torch.equal(again.train.tensors[0], digits.train.tensors[0])
    other = load_dataset("digits", seed=1)
    assert not torch.equal(other.info["train_index"], digits.info["train_index"])
    flat = load_dataset("digits", flatten=True, subset=100)
    assert flat.spec.kind == "vector" and flat.spec.input_shape == (64,)
    assert _sizes(flat) == (100, 250, 250)
    assert torch.equal(flat.train.tensors[0], digits.train.tensors[0][:100].reshape(100, 64))


# --- mnist1d ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist1d_root(tmp_path_factory):
    pytest.importorskip("mnist1d")
    return tmp_path_factory.mktemp("mnist1d_cache")


def test_mnist1d_shapes_cache_determinism(mnist1d_root):
    state = np.random.get_state()[1].copy()  # noqa: NPY002
    s = load_dataset("mnist1d", root=mnist1d_root)
    assert np.array_equal(np.random.get_state()[1], state)  # noqa: NPY002 (global RNG untouched)
    assert (mnist1d_root / "mnist1d_seed42.npz").is_file()
    assert s.spec == DataSpec("mnist1d", "sequence", (1, 40), 10)
    assert _sizes(s) == (3500, 500, 1000)
    _check_types(s)
    _disjoint(s, ("train", "val"))
    x = s.train.tensors[0]
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std(unbiased=False)) - 1) < 1e-4
    cached = load_dataset("mnist1d", root=mnist1d_root)  # from the .npz
    assert torch.equal(cached.train.tensors[0], x)
    fresh = load_dataset("mnist1d", root=mnist1d_root, cache=False)  # regenerated
    assert torch.equal(fresh.test.tensors[0], s.test.tensors[0])
    other = load_dataset("mnist1d", root=mnist1d_root, seed=3, flatten=True, subset=64)
    assert other.spec.kind == "vector" and other.spec.input_shape == (40,)
    assert _sizes(other) == (64, 500, 1000)
    assert not torch.equal(other.info["val_index"], s.info["val_index"])


# --- text ---------------------------------------------------------------------------


def test_text_corpus_and_blocks():
    text = corpus_text()
    assert 150_000 <= len(text.encode()) <= 300_000
    s = load_dataset("text")
    vocab = s.spec.vocab
    assert set(vocab) == set(text) and len(vocab) == s.spec.num_classes
    assert s.spec.kind == "text" and s.spec.input_shape == (64,)
    assert decode(encode(text[:5000], vocab), vocab) == text[:5000]
    n_train, n_val, n_test = s.info["split_chars"]
    assert n_train + n_val + n_test == len(text) and n_train == int(0.9 * len(text))
    for ds in (s.train, s.val, s.test):
        x, y = ds.tensors
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape
        assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(s.val.tensors[0][0], encode(text[n_train : n_train + 64], vocab))
    assert decode(s.val.tensors[0][1], vocab) == text[n_train + 64 : n_train + 128]
    assert len(s.train) == (n_train - 1) // 64
    half = load_dataset("text", block_size=16, stride=8, subset=10)
    assert _sizes(half)[0] == 10 and half.spec.input_shape == (16,)
    assert torch.equal(half.train.tensors[0][1][:8], half.train.tensors[0][0][8:])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        encode("€", vocab)


def test_text_custom_path(tmp_path):
    (tmp_path / "c.txt").write_text("abcab" * 40)
    s = load_dataset("text", root=tmp_path, path="c.txt", block_size=4)
    assert s.spec.vocab == "abc"
    (tmp_path / "short.txt").write_text("abc")
    with pytest.raises(ValueError, match="too short"):
        load_dataset("text", path=tmp_path / "short.txt")


# --- npz ----------------------------------------------------------------------------


def _write(path, **arrays):
    np.savez(path, **arrays)
    return f"npz:{path}"


def test_npz_images_uint8_nhwc_without_val(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(40, 5, 6, 3), dtype=np.uint8)
    y = np.arange(40) % 4
    name = _write(tmp_path / "img.npz", x_train=x, y_train=y, x_test=x[:7], y_test=y[:7])
    s = load_dataset(name, seed=1)
    assert s.spec == DataSpec(name, "image", (3, 5, 6), 4)
    assert _sizes(s) == (36, 4, 7)
    _check_types(s)
    _disjoint(s, ("train", "val"))
    xt = s.train.tensors[0]
    assert torch.allclose(xt.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(xt.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)
    raw = torch.tensor(x, dtype=torch.float32).permute(0, 3, 1, 2) / 255
    first = raw[s.info["train_index"][0]]
    assert torch.allclose(xt[0], (first - s.info["mean"]) / s.info["std"], atol=1e-5)
    assert torch.equal(s.val.tensors[1], torch.as_tensor(y[s.info["val_index"]]))
    assert not torch.equal(load_dataset(name, seed=2).info["val_index"], s.info["val_index"])
    assert torch.equal(load_dataset(name, seed=1).train.tensors[0], xt)
    flat = load_dataset(name, flatten=True, subset=5)
    assert flat.spec.input_shape == (90,) and _sizes(flat) == (5, 4, 7)


def test_npz_vector_float_with_val(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, [1.0, 5.0, 0.0], size=(30, 3)).astype(np.float64)
    y = (np.arange(30) % 3)[:, None]  # (N, 1) labels are accepted
    name = _write(
        tmp_path / "vec.npz", x_train=x, y_train=y, x_val=x[:5], y_val=y[:5], x_test=x, y_test=y
    )
    s = load_dataset(name)
    assert s.spec.kind == "vector" and s.spec.input_shape == (3,) and s.spec.num_classes == 3
    assert _sizes(s) == (30, 5, 30)
    _check_types(s)
    xt = s.train.tensors[0]
    assert torch.allclose(xt.mean(0), torch.zeros(3), atol=1e-5)
    assert torch.allclose(xt.std(0, unbiased=False), torch.tensor([1.0, 1.0, 0.0]), atol=1e-4)
    assert torch.equal(s.val.tensors[0], xt[:5])


def test_npz_float_images_nchw(tmp_path):
    x = np.random.default_rng(2).random((12, 2, 4, 4)).astype(np.float32)
    y = np.zeros(12, int)
    name = _write(tmp_path / "f.npz", x_train=x, y_train=y, x_test=x, y_test=y + 1)
    s = load_dataset(name, val_fraction=0.25)
    assert s.spec.input_shape == (2, 4, 4) and _sizes(s) == (9, 3, 12) and s.spec.num_classes == 2


def test_npz_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_dataset(f"npz:{tmp_path / 'nope.npz'}")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"junk\.npz"):
        load_dataset(f"npz:{tmp_path / 'junk.npz'}")
    x = np.zeros((4, 2), np.float32)
    name = _write(tmp_path / "partial.npz", x_train=x, y_train=np.zeros(4, int), x_val=x)
    with pytest.raises(ValueError, match=r"partial\.npz.*x_test, y_test, y_val"):
        load_dataset(name)
    name = _write(tmp_path / "bad.npz", x_train=x, y_train=[0, 1], x_test=x, y_test=[0] * 4)
    with pytest.raises(ValueError, match=r"bad\.npz.*y_train has shape \(2,\)"):
        load_dataset(name)
    name = _write(tmp_path / "d3.npz", x_train=x[None], y_train=[0], x_test=x[None], y_test=[0])
    with pytest.raises(ValueError, match="expected 4-D images"):
        load_dataset(name)
    name = _write(tmp_path / "ok.npz", x_train=x, y_train=[0] * 4, x_test=x, y_test=[0] * 4)
    with pytest.raises(ValueError, match="layout"):
        load_dataset(name, layout="NWHC")


# --- CIFAR-10 converter ---------------------------------------------------------------


def _cifar_batch(path, n, seed):
    rng = np.random.default_rng(seed)
    batch = {
        b"batch_label": b"testing batch",
        b"labels": rng.integers(0, 10, n).tolist(),
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [b"img_%d.png" % i for i in range(n)],
    }
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    return batch


def test_cifar10_to_npz(tmp_path):
    src = tmp_path / "cifar-10-batches-py"
    src.mkdir()
    batches = [_cifar_batch(src / f"data_batch_{i}", 3, i) for i in range(1, 3)]
    test = _cifar_batch(src / "test_batch", 2, 9)
    out = cifar10_to_npz(src, tmp_path / "cifar.npz")
    assert out == tmp_path / "cifar.npz"
    with np.load(out) as f:
        assert f["x_train"].shape == (6, 32, 32, 3) and f["x_train"].dtype == np.uint8
        assert f["y_train"].tolist() == batches[0][b"labels"] + batches[1][b"labels"]
        # pixel (row 1, col 2) of image 0: red, green, blue planes of 1024 values each
        rgb = batches[0][b"data"][0, [34, 1024 + 34, 2048 + 34]]
        assert f["x_train"][0, 1, 2].tolist() == rgb.tolist()
        assert f["x_test"].shape == (2, 32, 32, 3) and f["y_test"].tolist() == test[b"labels"]
    s = load_dataset(f"npz:{out}")
    assert s.spec.kind == "image" and s.spec.input_shape == (3, 32, 32)
    assert _sizes(s) == (5, 1, 2)
    (src / "test_batch").unlink()
    with pytest.raises(ValueError, match="test_batch missing"):
        cifar10_to_npz(src, tmp_path / "x.npz")
    (src / "test_batch").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a CIFAR-10 batch"):
        cifar10_to_npz(src, tmp_path / "x.npz")


class _RunsCode:
    """Unpickling this object calls os.system (it would create the marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_unpickler_refuses_code(tmp_path):
    """A crafted batch whose unpickling would run a shell command is refused before any
    code runs: the marker file is never created and the error names the refused global."""
    src = tmp_path / "cifar-10-batches-py"
    src.mkdir()
    _cifar_batch(src / "data_batch_1", 3, 1)
    marker = tmp_path / "pwned"
    evil = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": _RunsCode(marker)}
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        (src / "test_batch").write_bytes(pickle.dumps(evil, protocol=protocol))
        with pytest.raises(ValueError, match=r"not a CIFAR-10 batch.*refused to load "
                                             r"(posix|os|nt)\.system"):
            cifar10_to_npz(src, tmp_path / "x.npz")
        assert not marker.exists()
    assert not (tmp_path / "x.npz").exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_unpickler_reads_genuine_batches(tmp_path, protocol):
    """Batches as CIFAR ships them (protocol 2, bytes keys, arrays referring to
    numpy.core.multiarray as numpy 1.x wrote them) and as numpy 2 writes them still load."""
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(protocol)
    batches = {}
    for name, n in (("data_batch_1", 4), ("test_batch", 2)):
        batch = {b"batch_label": b"training batch 1 of 5", b"labels": [3, 1, 4, 1][:n],
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"filenames": [b"a.png"] * n}
        raw = pickle.dumps(batch, protocol=protocol)
        if protocol == 2:  # the module path of numpy 1.x pickles (text in protocol 2)
            raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            assert b"numpy.core.multiarray" in raw
        (src / name).write_bytes(raw)
        batches[name] = batch
    out = cifar10_to_npz(src, tmp_path / "c.npz")
    with np.load(out) as f:
        assert f["y_train"].tolist() == [3, 1, 4, 1] and f["y_test"].tolist() == [3, 1]
        want = batches["data_batch_1"][b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        assert np.array_equal(f["x_train"], want)


# --- folder -------------------------------------------------------------------------


def test_folder_loader(tmp_path):
    image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for part, n in (("train", 5), ("test", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / part / cls).mkdir(parents=True)
            for i in range(n):
                a = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
                image.fromarray(a).save(tmp_path / part / cls / f"{i}.png")
    s = load_dataset(f"folder:{tmp_path}", seed=0)
    assert s.spec.kind == "image" and s.spec.input_shape == (3, 4, 6) and s.spec.num_classes == 2
    assert _sizes(s) == (9, 1, 4) and s.info["classes"] == ["cat", "dog"]
    assert s.test.tensors[1].tolist() == [0, 0, 1, 1]
    gray = load_dataset(f"folder:{tmp_path}", mode="L", size=(2, 3), flatten=True)
    assert gray.spec.input_shape == (6,)
    with pytest.raises(ValueError, match=r"train.*has no train/ sub-folder"):
        load_dataset(f"folder:{tmp_path / 'train'}")


# --- names and options ----------------------------------------------------------------


def test_names_and_option_errors():
    assert available_datasets() == ["digits", "mnist1d", "text", "npz:PATH", "folder:PATH"]
    with pytest.raises(ValueError, match="unknown dataset 'cifar10'; available: digits"):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="needs a path"):
        load_dataset("npz:")
    with pytest.raises(ValueError, match=r"'blocksize'.*block_size, path, stride"):
        load_dataset("text", blocksize=3)
    with pytest.raises(ValueError, match="subset must be a positive int"):
        load_dataset("text", subset=0)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        load_dataset("text", block_size=0)


def test_missing_optional_package_message(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'deqkit\[data\]'"):
        load_dataset("digits")


def test_import_without_optional_packages():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for m in ('sklearn', 'mnist1d', 'PIL'): sys.modules[m] = None\n"
        "import deqkit.data as d\n"
        "assert d.load_dataset('text').spec.kind == 'text'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
