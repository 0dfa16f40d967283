"""The digits TFDS builder against scikit-learn's arrays."""

import numpy as np
import pytest
from sklearn.datasets import load_digits

from effjax.data import batches, load_digits_source, to_arrays


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def sources(data_dir):
    return {s: load_digits_source(s, data_dir=data_dir) for s in ("train", "test")}


def test_splits_partition_the_data_and_match_sklearn(sources):
    ref = load_digits()
    arrays = {s: to_arrays(src) for s, src in sources.items()}
    assert len(sources["train"]) == 1438 and len(sources["test"]) == 359
    idx = {s: a["index"] for s, a in arrays.items()}
    assert set(idx["train"]).isdisjoint(idx["test"])
    assert sorted(np.concatenate(list(idx.values())).tolist()) == list(range(1797))
    for a in arrays.values():
        assert a["image"].dtype == np.uint8 and a["image"].shape[1:] == (8, 8)
        np.testing.assert_array_equal(a["image"], ref.images[a["index"]].astype(np.uint8))
        np.testing.assert_array_equal(a["label"], ref.target[a["index"]])
    assert set(arrays["test"]["label"].tolist()) == set(range(10))


def test_feeds_the_batch_iterator(sources):
    arrays = to_arrays(sources["train"])
    got = list(batches(arrays, 128, seed=0, epochs=1))
    assert len(got) == 1438 // 128 and got[0]["image"].shape == (128, 8, 8)


def test_second_load_reads_the_prepared_files(sources, data_dir):
    again = load_digits_source("test", data_dir=data_dir)
    first, second = to_arrays(sources["test"]), to_arrays(again)
    for k in first:
        np.testing.assert_array_equal(first[k], second[k])
