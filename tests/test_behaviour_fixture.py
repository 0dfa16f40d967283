"""Optimizer states and adapter outputs equal, bit for bit, what the tree before issue 18's
refactor computed (``tests/fixtures/behaviour.py`` says how the fixture was made)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.fixtures import behaviour
from tests.peft.conformance_case import collect_cases

_FIXTURE = dict(np.load(behaviour.FIXTURE))


def _assert_same(got: dict[str, np.ndarray], prefix: str):
    want = {k: v for k, v in _FIXTURE.items() if k.startswith(prefix)}
    assert want, f"the fixture has no entries under {prefix!r}"
    assert sorted(got) == sorted(want), "the state's structure changed"
    for k, v in want.items():
        g = got[k]
        assert g.shape == v.shape, k
        if v.dtype.kind == "V":  # bfloat16 is stored by npz as raw 2-byte values
            assert str(g.dtype) == "bfloat16" and v.dtype.itemsize == 2, (k, g.dtype)
            assert g.tobytes() == v.tobytes(), k
            continue
        assert g.dtype == v.dtype, (k, g.dtype, v.dtype)
        np.testing.assert_array_equal(g, v, err_msg=k, strict=True)


@pytest.mark.parametrize("name", sorted(behaviour.optimizers()))
def test_optimizer_state_unchanged(name):
    got = behaviour.optim_entries(name, behaviour.optimizers()[name])
    _assert_same(got, f"optim/{name}/")


@pytest.mark.parametrize("name", sorted(collect_cases()))
def test_adapter_unchanged(name):
    _assert_same(behaviour.peft_entries(name, collect_cases()[name]), f"peft/{name}/")


def test_adapted_layers_unchanged():
    _assert_same(behaviour.layer_entries(), "layers/")


def test_fixture_covers_every_optimizer_and_case():
    names = {k.split("/")[1] for k in _FIXTURE if k.startswith(("optim/", "peft/"))}
    assert names == set(behaviour.optimizers()) | set(collect_cases())
