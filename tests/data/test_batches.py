"""The batch iterator: coverage, determinism, epochs, remainders and bad input."""

import itertools

import numpy as np
import pytest

from effjax.data import batches, num_batches

DATA = {"x": np.arange(23), "y": np.arange(23) * 10}


@pytest.mark.parametrize("n,bs,drop,expected", [
    (23, 5, True, 4), (23, 5, False, 5), (20, 5, True, 4), (20, 5, False, 4), (3, 5, False, 1)])
def test_num_batches(n, bs, drop, expected):
    assert num_batches(n, bs, drop_remainder=drop) == expected


@pytest.mark.parametrize("shuffle", [True, False])
def test_each_epoch_is_a_permutation_without_remainder(shuffle):
    got = list(batches(DATA, 5, seed=3, epochs=2, shuffle=shuffle, drop_remainder=False))
    assert [len(b["x"]) for b in got] == [5, 5, 5, 5, 3] * 2
    for epoch in (got[:5], got[5:]):
        xs = np.concatenate([b["x"] for b in epoch])
        assert sorted(xs.tolist()) == list(range(23))
        assert all(np.array_equal(b["y"], b["x"] * 10) for b in epoch)  # rows stay aligned
        assert np.array_equal(xs, np.arange(23)) != shuffle


def test_drop_remainder_gives_fixed_shapes():
    got = list(batches(DATA, 5, epochs=3))
    assert len(got) == 12 and {b["x"].shape for b in got} == {(5,)}


def test_deterministic_by_seed_and_epochs_differ():
    run = lambda seed: [b["x"].tolist() for b in batches(DATA, 5, seed=seed, epochs=2)]
    assert run(7) == run(7)
    assert run(7) != run(8)
    first, second = run(7)[:4], run(7)[4:]
    assert first != second


def test_resume_at_epoch_matches_uninterrupted_run():
    full = [b["x"].tolist() for b in batches(DATA, 5, seed=1, epochs=3)]
    resumed = [b["x"].tolist() for b in batches(DATA, 5, seed=1, epochs=2, start_epoch=1)]
    assert resumed == full[4:]


def test_forever():
    got = list(itertools.islice(batches(DATA, 5, epochs=None), 13))
    assert len(got) == 13


@pytest.mark.parametrize("kwargs,data", [
    (dict(batch_size=0), DATA),
    (dict(batch_size=5, epochs=-1), DATA),
    (dict(batch_size=50), DATA),
    (dict(batch_size=5), {"x": np.arange(4), "y": np.arange(5)}),
    (dict(batch_size=5), {}),
])
def test_bad_input(kwargs, data):
    with pytest.raises(ValueError):
        next(batches(data, **kwargs))
