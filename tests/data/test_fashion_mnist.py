"""The fashion_mnist TFDS builder against the Debian package's idx files read independently."""

import gzip
import os

import numpy as np
import pytest

from effjax.data import load_fashion_mnist_source, to_arrays
from effjax.data.fashion_mnist import find_fashion_mnist, read_idx


def _plain_idx(path, header):  # independent reader: fixed header size, no parsing
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=header)


@pytest.fixture(scope="module")
def arrays(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    return {s: to_arrays(load_fashion_mnist_source(s, data_dir=data_dir))
            for s in ("train", "test")}


def test_matches_idx_files_and_known_class_counts(arrays):
    folder = find_fashion_mnist()
    for split, prefix, n in (("train", "train", 60000), ("test", "t10k", 10000)):
        a = arrays[split]
        assert a["image"].shape == (n, 28, 28) and a["image"].dtype == np.uint8
        order = np.argsort(a["index"])  # TFDS stores records in a shuffled (hashed) order
        np.testing.assert_array_equal(a["index"][order], np.arange(n))
        a = {k: v[order] for k, v in a.items()}
        images = _plain_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), 16)
        labels = _plain_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), 8)
        np.testing.assert_array_equal(a["image"].reshape(-1), images)
        np.testing.assert_array_equal(a["label"], labels)
        # Fashion-MNIST is balanced: 6,000 / 1,000 images per class.
        np.testing.assert_array_equal(np.bincount(a["label"]), np.full(10, n // 10))


def test_read_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + b"abc")  # float32 type code
    with pytest.raises(ValueError, match="not a uint8 idx"):
        read_idx(str(bad))
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as f:
        f.write(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="header says"):
        read_idx(str(short))


def test_missing_files_say_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("EFFJAX_FASHION_MNIST_DIR", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(os.path, "exists", lambda p: False)
    with pytest.raises(FileNotFoundError, match="make fashion-mnist"):
        find_fashion_mnist()
