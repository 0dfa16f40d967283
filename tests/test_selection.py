"""effjax.selection: paths, ordered rules, closest-path suggestions, rewrite, and that every
rewriter goes through it (same errors from inject, fake_quantize_params and calibrate)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.tree_util import DictKey, GetAttrKey, SequenceKey

from effjax import selection
from effjax.compress import FakeQuant, fake_quantize_params
from effjax.peft import LoRA, inject

# A BERT-like tree: HF module names would be q_proj / v_proj, this model says query / value.
BERT = [f"encoder/layer/{i}/attention/{m}/{p}" for i in range(6)
        for m in ("query", "key", "value", "output") for p in ("kernel", "bias")] + \
    ["embeddings/word/embedding", "pooler/dense/kernel", "pooler/dense/bias"]


def _tree(paths):
    tree: dict = {}
    for p in paths:
        node = tree
        *parents, last = p.split("/")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = jnp.ones((4, 4)) if last in ("kernel", "embedding") else jnp.ones(4)
    return tree


def test_path_str_of_key_paths_and_module_paths():
    assert selection.path_str((DictKey("params"), DictKey("Dense_0"), DictKey("kernel"))) == \
        "params/Dense_0/kernel"
    assert selection.path_str((GetAttrKey("layers"), SequenceKey(2), GetAttrKey("w"),
                               GetAttrKey("value"))) == "layers/2/w"
    assert selection.path_str(("blocks", 0, "query")) == "blocks/0/query"


@pytest.mark.parametrize("pattern,want", [
    # HF-style names: suggested by the last components, one per repeated layer
    (r".*/q_proj/kernel", ["encoder/layer/0/attention/query/kernel"]),
    (r".*/v_proj/kernel", ["encoder/layer/0/attention/value/kernel"]),
    (r"encoder/layer/\d+/attention/qeury/kernel", ["encoder/layer/0/attention/query/kernel"]),
    (r".*/o_proj/bias", ["encoder/layer/0/attention/output/bias"]),
])
def test_closest_paths_compare_last_components(pattern, want):
    got = selection.closest_paths(pattern, BERT, n=3)
    assert got[: len(want)] == want
    # one suggestion per repeated layer: no two suggestions differ only by a layer index
    keys = [re.sub(r"/\d+/", "/*/", p) for p in got]
    assert len(set(keys)) == len(keys)


def test_closest_paths_not_alphabetical():
    # Alphabetically 'embeddings/...' would come first; by components the kernels do.
    got = selection.closest_paths(r".*/q_proj/kernel", BERT, n=5)
    assert "embeddings/word/embedding" not in got
    assert all(p.endswith("/kernel") for p in got[:4])


def test_rule_error_names_rule_and_suggests_paths():
    with pytest.raises(ValueError, match=r"rule '\.\*/q_proj/kernel' matches no leaf path of "
                       r"the 51 candidates.*closest paths: "
                       r"'encoder/layer/0/attention/query/kernel'"):
        inject(_tree(BERT), {r".*/q_proj/kernel": LoRA(rank=2)}, key=jax.random.key(0))


def test_bare_module_name_rule_says_how_to_write_it():
    tree = _tree(["layers/0/q_proj/kernel", "layers/0/q_proj/bias"])
    with pytest.raises(ValueError, match=re.escape("write r'.*/q_proj/kernel'")):
        inject(tree, {"q_proj": LoRA(rank=1)}, key=jax.random.key(0))


def test_every_rewriter_reports_the_same_unmatched_rule():
    tree = _tree(BERT)
    msgs = []
    for run in (lambda: inject(tree, {r".*/qery/kernel": LoRA(rank=2)}, key=jax.random.key(0)),
                lambda: fake_quantize_params(tree, {r".*/qery/kernel": FakeQuant(bits=4)}),
                lambda: selection.rewrite(tree, {r".*/qery/kernel": 1}, lambda p, x, v: x)):
        with pytest.raises(ValueError) as e:
            run()
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1] == msgs[2]
    assert "'encoder/layer/0/attention/query/kernel'" in msgs[0]


def test_rewrite_first_rule_wins_and_none_excludes():
    tree = {"a": {"kernel": jnp.ones(2)}, "b": {"kernel": jnp.ones(2)}, "c": jnp.ones(2)}
    out = selection.rewrite(tree, {r"a/.*": None, r".*kernel": 3.0, r"c": 5.0},
                            lambda path, x, v: x * v)
    np.testing.assert_array_equal(out["a"]["kernel"], [1.0, 1.0])
    np.testing.assert_array_equal(out["b"]["kernel"], [3.0, 3.0])
    np.testing.assert_array_equal(out["c"], [5.0, 5.0])


def test_rewrite_errors_name_the_leaf():
    tree = {"emb": {"ids": jnp.arange(4)}, "w": jnp.ones((2, 3))}
    with pytest.raises(TypeError, match=r"leaf 'emb/ids' \(shape \(4,\), dtype int32\), rule "
                       r"'emb/ids'.*not a floating array"):
        selection.rewrite(tree, {"emb/ids": 1}, lambda p, x, v: x, floating=True)

    def bad(path, x, v):
        raise ValueError("no good")

    with pytest.raises(ValueError, match=r"leaf 'w' \(shape \(2, 3\), dtype float32\), rule "
                       r"'w': no good"):
        selection.rewrite(tree, {"w": 1}, bad)


@pytest.mark.parametrize("rules,err,msg", [
    ({}, ValueError, "empty"),
    ("w", TypeError, "mapping"),
    ([("w",)], TypeError, r"sequence of .* item 0 is tuple \('w',\)"),
    ({1: 2}, TypeError, "regex strings"),
    ({"(": 1.0}, ValueError, "not a valid regex"),
    ({"w": "x"}, TypeError, r"rule 'w': value must be float or None, got str 'x'"),
    ({"w": complex}, TypeError, r"rule 'w': got the class complex, not float; pass an instance"),
])
def test_compile_rules_rejects_bad_rules(rules, err, msg):
    with pytest.raises(err, match=msg):
        selection.compile_rules(rules, accept=float)


def test_compiled_rules_pass_through():
    rules = selection.compile_rules([("a", 1.0), ("b", None)])
    assert selection.compile_rules(rules) is rules
    assert [r.pattern for r in rules] == ["a", "b"] and rules[1].value is None


def test_selector():
    assert selection.selector(None)("anything", None)
    assert selection.selector(r"a/\d")("a/1", None) and not selection.selector(r"a/\d")("a/12",
                                                                                        None)
    pred = lambda path, obj: obj == 1
    assert selection.selector(pred) is pred
    with pytest.raises(TypeError, match="where must be"):
        selection.selector(3)


def test_inject_refuses_an_nnx_module_and_says_what_to_pass():
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=re.escape("nnx.split(model, nnx.Param, ...)")):
        inject(model, {r"kernel": LoRA(rank=1)}, key=jax.random.key(0))
