"""Optimizer states and adapter outputs equal, bit for bit, what the tree before issue 18's
refactor computed (``tests/fixtures/behaviour.py`` says how the fixture was made).

Exception (issue 19): the non-finite rule of ``quantize_state`` (an element whose gradient,
update or any moment is not finite has all its moments reset) adds masks to every quantized
step. No element of the fixture's run is affected (its values are finite), but XLA:CPU then
fuses the SPAM graphs differently and contracts other multiply-adds, so the float leaves of
the two 8-bit SPAM rows moved by at most 0.86 float32 ulps of the leaf's largest magnitude
(measured); their codes, counters and every other row stay bit-identical."""

from __future__ import annotations

import numpy as np
import pytest

from tests.fixtures import behaviour
from tests.peft.conformance_case import collect_cases

_FIXTURE = dict(np.load(behaviour.FIXTURE))
_REFUSED = {"spam_8bit": 2, "stable_spam_8bit": 2}  # row -> ulps of the leaf's max (docstring)


def _assert_same(got: dict[str, np.ndarray], prefix: str, ulps: int = 0):
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
        if ulps and v.dtype.kind == "f" and v.size:
            atol = ulps * float(np.finfo(np.float32).eps) * float(np.abs(v).max())
            np.testing.assert_allclose(g, v, rtol=0, atol=atol, err_msg=k)
        else:
            np.testing.assert_array_equal(g, v, err_msg=k, strict=True)


@pytest.mark.parametrize("name", sorted(behaviour.optimizers()))
def test_optimizer_state_unchanged(name):
    got = behaviour.optim_entries(name, behaviour.optimizers()[name])
    _assert_same(got, f"optim/{name}/", _REFUSED.get(name, 0))


@pytest.mark.parametrize("name", sorted(collect_cases()))
def test_adapter_unchanged(name):
    _assert_same(behaviour.peft_entries(name, collect_cases()[name]), f"peft/{name}/")


def test_adapted_layers_unchanged():
    _assert_same(behaviour.layer_entries(), "layers/")


def test_fixture_covers_every_optimizer_and_case():
    names = {k.split("/")[1] for k in _FIXTURE if k.startswith(("optim/", "peft/"))}
    assert names == set(behaviour.optimizers()) | set(collect_cases())
