"""``digits``: scikit-learn's 1,797 8x8 handwritten digits as an offline TFDS data set.

Features: ``image`` uint8 ``(8, 8)`` with values 0..16, ``label`` (10 classes) and ``index``
(the row in ``sklearn.datasets.load_digits``, for provenance). Splits: a fixed permutation
(seed 0) gives ``train`` (1,438 = 80%) and ``test`` (359); no example is in both. Stored as
array_record and read with ``tfds.data_source``; TensorFlow is not needed.

Example:
  >>> from effjax.data import load_digits_source
  >>> train = load_digits_source("train")  # doctest: +SKIP
  >>> len(train), sorted(train[0])  # doctest: +SKIP
  (1438, ['image', 'index', 'label'])
"""

from __future__ import annotations

import numpy as np

from effjax._optional import import_optional
from effjax.data._common import prepared_source

# The builders subclass tfds's: effjax.data cannot import without it.
tfds = import_optional("tensorflow_datasets", extra="data", feature="effjax.data",
                       distribution="tensorflow-datasets")

__all__ = ["Digits", "load_digits_source"]

_TRAIN_FRACTION = 0.8


def _sklearn_digits():
    datasets = import_optional("sklearn.datasets", extra="data", feature="the digits data set",
                               distribution="scikit-learn")
    return datasets.load_digits()


def split_indices(n: int) -> dict[str, np.ndarray]:
    """The fixed train/test partition of ``range(n)`` (seed 0)."""
    order = np.random.default_rng(0).permutation(n)
    cut = int(round(_TRAIN_FRACTION * n))
    return {"train": np.sort(order[:cut]), "test": np.sort(order[cut:])}


class Digits(tfds.core.GeneratorBasedBuilder):
    """TFDS builder over ``sklearn.datasets.load_digits`` (no download)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "80/20 split with seed 0."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(8, 8), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=10),
                "index": tfds.features.Scalar(dtype=np.int32),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        data = _sklearn_digits()
        return {name: self._generate_examples(data, idx)
                for name, idx in split_indices(len(data.target)).items()}

    def _generate_examples(self, data, idx):
        for i in idx:
            yield int(i), {"image": data.images[i].astype(np.uint8),
                           "label": int(data.target[i]), "index": np.int32(i)}


def load_digits_source(split: str, *, data_dir: str | None = None):
    """Prepare ``digits`` once under ``data_dir`` and return the random-access source of
    ``split`` (``"train"`` or ``"test"``)."""
    _, source = prepared_source(Digits, split, data_dir)
    return source
