"""``fashion_mnist``: Zalando's Fashion-MNIST (60,000 + 10,000 28x28 images, MIT) from the Debian
package ``dataset-fashion-mnist``, as an offline TFDS data set (array_record, no TensorFlow).

The package's idx files are found in ``$EFFJAX_FASHION_MNIST_DIR``, in the folder that
``make fashion-mnist`` unpacks (``~/.cache/effjax/debian/usr/share/datasets/fashion-mnist``), or
in ``/usr/share/datasets/fashion-mnist`` when the package is installed. Features: ``image``
uint8 ``(28, 28)``, ``label`` (10 named classes), ``index`` (row in its idx file).

Example:
  >>> from effjax.data import load_fashion_mnist_source
  >>> test = load_fashion_mnist_source("test")  # doctest: +SKIP
  >>> len(test)  # doctest: +SKIP
  10000
"""

from __future__ import annotations

import gzip
import os

import numpy as np

from effjax._optional import import_optional
from effjax.data._common import prepared_source

# The builders subclass tfds's: effjax.data cannot import without it.
tfds = import_optional("tensorflow_datasets", extra="data", feature="effjax.data",
                       distribution="tensorflow-datasets")

__all__ = ["FashionMnist", "load_fashion_mnist_source", "find_fashion_mnist", "read_idx",
           "CLASS_NAMES"]

CLASS_NAMES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
               "sneaker", "bag", "ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
_INSTALL = ("make fashion-mnist   (runs: apt-get download dataset-fashion-mnist && "
            "dpkg-deb -x dataset-fashion-mnist_*.deb ~/.cache/effjax/debian)")


def find_fashion_mnist() -> str:
    """Folder holding the four idx.gz files, or ``FileNotFoundError`` saying how to get them."""
    candidates = [os.environ.get("EFFJAX_FASHION_MNIST_DIR"),
                  os.path.join(os.path.expanduser("~"), ".cache", "effjax", "debian", "usr",
                               "share", "datasets", "fashion-mnist"),
                  "/usr/share/datasets/fashion-mnist"]
    for folder in candidates:
        if folder and all(os.path.exists(os.path.join(folder, f))
                          for pair in _FILES.values() for f in pair):
            return folder
    raise FileNotFoundError("Fashion-MNIST idx files not found in "
                            f"{[c for c in candidates if c]}; install them with: {_INSTALL}")


def read_idx(path: str) -> np.ndarray:
    """Read a (gzipped) idx file: big-endian magic ``0x0000 08 ndim``, dims, uint8 data."""
    with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
        raw = f.read()
    if raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ValueError(f"{path}: not a uint8 idx file (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims}, file holds {data.size} values")
    return data.reshape(dims)


class FashionMnist(tfds.core.GeneratorBasedBuilder):
    """TFDS builder over the Debian package's idx files (no download)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "The official 60,000 / 10,000 split."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(28, 28), dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                "index": tfds.features.Scalar(dtype=np.int32),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        folder = find_fashion_mnist()
        return {split: self._generate_examples(os.path.join(folder, images),
                                               os.path.join(folder, labels))
                for split, (images, labels) in _FILES.items()}

    def _generate_examples(self, images_path, labels_path):
        images, labels = read_idx(images_path), read_idx(labels_path)
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        for i in range(len(labels)):
            yield i, {"image": images[i], "label": int(labels[i]), "index": np.int32(i)}


def load_fashion_mnist_source(split: str, *, data_dir: str | None = None):
    """Prepare ``fashion_mnist`` once under ``data_dir`` and return the random-access source
    of ``split`` (``"train"`` or ``"test"``)."""
    _, source = prepared_source(FashionMnist, split, data_dir)
    return source
