"""Adapter checkpoints written by older effjax still load, bit for bit.

``tests/fixtures/adapters_v0/`` holds one checkpoint per case of
:mod:`tests.fixtures.adapters_v0`, written by the tree before adapter configs were saved under
registered names (they store ``{"class": "effjax.peft.<module>.<Class>", ...}``), and the
trainable arrays and materialized kernels they were saved from. Loading each onto a freshly
injected base tree with today's :func:`effjax.peft.load_adapters` must give those arrays and
kernels exactly, with the stored configs or with the original rules.
"""

import jax
import numpy as np
import pytest

from effjax.peft import adapter_paths, load_adapters, read_adapter_config
from tests.fixtures import adapters_v0

CASES = adapters_v0.cases()
EXPECTED = dict(np.load(adapters_v0.EXPECTED))


def test_the_fixture_covers_every_case_and_is_in_the_old_format():
    assert {k.split("/")[0] for k in EXPECTED} == set(CASES)
    methods = set()
    for name, (rules, _) in CASES.items():
        nodes = read_adapter_config(f"{adapters_v0.DIR}/{name}")["nodes"]
        assert set(nodes) == set(rules)
        for cfg in nodes.values():  # the class-path form written before registered names
            assert set(cfg) == {"class", "fields"}, cfg
            assert cfg["class"].startswith("effjax.peft."), cfg
            methods.add(cfg["class"].rpartition(".")[2])
    assert len(methods) == 16  # every method of effjax.peft (Bone is MiSS)


@pytest.mark.parametrize("rules_given", [False, True])
@pytest.mark.parametrize("name", sorted(CASES))
def test_old_checkpoint_loads_bit_for_bit(name, rules_given):
    rules, kind = CASES[name]
    params = adapters_v0.params()
    calib = None if kind is None else adapters_v0.calibration(params)[kind]
    back = load_adapters(f"{adapters_v0.DIR}/{name}", params,
                         adapters_v0.rules_of(rules) if rules_given else None,
                         key=jax.random.key(adapters_v0.KEY), calibration=calib)
    nodes = adapter_paths(back)
    assert set(nodes) == set(rules)
    want = {k: v for k, v in EXPECTED.items() if k.startswith(f"{name}/")}
    got = adapters_v0.entries(name, back)
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        np.testing.assert_array_equal(got[k], v, err_msg=k, strict=True)
    for path, node in nodes.items():  # the stored configs are the ones the rules give
        assert node.method == rules[path]
