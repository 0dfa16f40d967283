"""Tree functions on Linen params and NNX State (CharTransformer), rules and their errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from effjax.compress import FakeQuant
from effjax.models import CharTransformer, CharTransformerConfig, next_token_loss
from effjax.peft import (
    LoRA,
    LoRAWeight,
    Unfreeze,
    adapter_paths,
    combine,
    inject,
    is_adapter,
    load_adapters,
    materialize,
    merge,
    save_adapters,
    split,
    summary,
    trainable_mask,
)
from effjax.selection import path_str


def _paths(tree):
    return {path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _randomize_b(tree, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: x.replace(b=jnp.asarray(0.1 * rng.standard_normal(x.b.shape), x.b.dtype))
        if isinstance(x, LoRAWeight) else x, tree, is_leaf=is_adapter)


# ----------------------------------------------------------------------------- Linen
class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(8, name="fc1")(x))
        return nn.Dense(3, name="fc2")(h)


@pytest.fixture(scope="module")
def linen():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 5)), jnp.float32)
    return x, _MLP().init(jax.random.key(0), x)


def test_linen_apply_identity_then_reference(linen):
    x, variables = linen
    rules = {r"params/fc1/kernel": LoRA(rank=2, alpha=4.0),
             r"params/fc2/kernel": LoRA(rank=1, alpha=3.0, rslora=True)}
    tree = inject(variables, rules, key=jax.random.key(0))
    assert set(adapter_paths(tree)) == {"params/fc1/kernel", "params/fc2/kernel"}
    y0 = _MLP().apply(variables, x)
    np.testing.assert_array_equal(np.asarray(_MLP().apply(materialize(tree), x)), np.asarray(y0))
    tree = _randomize_b(tree)
    p = variables["params"]
    n0, n1 = tree["params"]["fc1"]["kernel"], tree["params"]["fc2"]["kernel"]
    h = jax.nn.relu(x @ p["fc1"]["kernel"] + 2.0 * (x @ n0.a) @ n0.b + p["fc1"]["bias"])
    want = h @ p["fc2"]["kernel"] + 3.0 * (h @ n1.a) @ n1.b + p["fc2"]["bias"]
    got = _MLP().apply(materialize(tree), x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(got), np.asarray(y0))


def test_linen_freeze_with_multi_transform(linen):
    x, variables = linen
    tree = inject(variables, {r".*fc1/kernel": LoRA(rank=2), r".*fc2/bias": Unfreeze()},
                  key=jax.random.key(1))
    tree = _randomize_b(tree)
    mask = trainable_mask(tree)
    assert jax.tree.structure(mask) == jax.tree.structure(tree)
    labels = jax.tree.map(lambda m: "train" if m else "freeze", mask)
    opt = optax.multi_transform({"train": optax.adam(1e-2), "freeze": optax.set_to_zero()},
                                labels)
    loss = lambda t: jnp.mean(_MLP().apply(materialize(t), x) ** 2)

    @jax.jit
    def step(t):
        upd, _ = opt.update(jax.grad(loss)(t), opt.init(t), t)
        return optax.apply_updates(t, upd)

    new = step(tree)
    changed = {path_str(p) for (p, a), b in zip(
        jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree.leaves(new))
        if not np.array_equal(np.asarray(a), np.asarray(b))}
    assert changed == {"params/fc1/kernel/a", "params/fc1/kernel/b",
                       "params/fc2/bias/w"}


def test_merge_gives_plain_arrays(linen):
    _, variables = linen
    tree = _randomize_b(inject(variables, {r".*kernel": LoRA(rank=2)}, key=jax.random.key(0)))
    merged = merge(tree)
    assert jax.tree.structure(merged) == jax.tree.structure(variables)
    assert not any(is_adapter(x) for x in jax.tree.leaves(merged, is_leaf=is_adapter))


# ----------------------------------------------------------------------------- NNX
CFG = CharTransformerConfig(vocab_size=11, seq_len=8, width=32, depth=1, heads=2)
NNX_RULES = {
    r"blocks/\d+/(query|key|value)/kernel": LoRA(rank=2, alpha=4.0),  # (32, 2, 16)
    r"blocks/\d+/out/kernel": LoRA(rank=2, alpha=4.0, in_axes=(0, 1)),  # (2, 16, 32)
    r"blocks/\d+/(up|down)/kernel": LoRA(rank=2, alpha=4.0),
    r"head/.*": Unfreeze(),
}
# one block: q, k, v 3 * 2 * (32 + 2 * 16); out 2 * (32 + 32); up/down 2 * 2 * (32 + 128)
NNX_TRAINABLE = (3 * 2 * 64 + 2 * 64 + 2 * 2 * 160) + (32 * 11 + 11)
EINSUM = {"query": "ir,rhd->ihd", "key": "ir,rhd->ihd", "value": "ir,rhd->ihd",
          "out": "hdr,ro->hdo", "up": "ir,ro->io", "down": "ir,ro->io"}


@pytest.fixture(scope="module")
def char():
    model = CharTransformer(CFG, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (4, 8)), jnp.int32)
    return graphdef, params, rest, tokens


def test_nnx_identity_counts_and_reference(char):
    graphdef, params, rest, tokens = char
    tree = inject(params, NNX_RULES, key=jax.random.key(0))
    assert isinstance(tree, nnx.State)
    assert len(adapter_paths(tree)) == 6 + 2
    assert summary(tree).trainable == NNX_TRAINABLE
    assert summary(tree).total == sum(x.size for x in jax.tree.leaves(params)) + \
        NNX_TRAINABLE - (32 * 11 + 11)
    apply = jax.jit(lambda p: nnx.merge(graphdef, p, rest)(tokens))
    y0 = apply(params)
    np.testing.assert_array_equal(np.asarray(apply(materialize(tree))), np.asarray(y0))

    tree = _randomize_b(tree)

    def ref(kp, x):  # W + s * einsum(a, b), the einsum picked by the layer name
        if not isinstance(x, LoRAWeight):
            return x.w if is_adapter(x) else x
        layer = path_str(kp).split("/")[-2]
        return x.w + 2.0 * jnp.einsum(EINSUM[layer], x.a, x.b)

    want = apply(jax.tree_util.tree_map_with_path(ref, tree, is_leaf=is_adapter))
    got = apply(materialize(tree))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(got - y0).max()) > 1e-3


def test_nnx_training_updates_only_adapters(char, tmp_path):
    graphdef, params, rest, tokens = char
    tree = inject(params, NNX_RULES, key=jax.random.key(0))
    trainable, frozen = split(tree)
    assert sum(x.size for x in jax.tree.leaves(trainable)) == NNX_TRAINABLE
    opt = optax.adam(3e-2)
    opt_state = opt.init(trainable)

    def loss(t):
        return next_token_loss(nnx.merge(graphdef, materialize(combine(t, frozen)), rest),
                               tokens)

    @jax.jit
    def step(t, s):
        value, g = jax.value_and_grad(loss)(t)
        u, s = opt.update(g, s, t)
        return optax.apply_updates(t, u), s, value, g

    losses = []
    for _ in range(3):
        trainable, opt_state, value, g = step(trainable, opt_state)
        losses.append(float(value))
    assert _paths(g) == _paths(trainable)
    assert all(p.endswith(("/a", "/b")) or p.startswith("head/") for p in _paths(g))
    assert losses[-1] < losses[0] - 0.05, losses
    trained = combine(trainable, frozen)
    for p, node in adapter_paths(trained).items():  # frozen kernels are the originals
        if isinstance(node, LoRAWeight):
            assert node.w is adapter_paths(tree)[p].w

    save_adapters(tmp_path / "ad", trained)
    back = load_adapters(tmp_path / "ad", params, NNX_RULES)
    assert jax.tree.structure(back) == jax.tree.structure(trained)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(trained)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(loss(split(back)[0])), np.asarray(loss(trainable)))


def test_stacked_linen_scan_kernel():
    """nn.scan-style params (layers, in, out): one adapter per layer via batch_axes=(0,)."""
    rng = np.random.default_rng(0)
    params = {"layers": {"kernel": jnp.asarray(rng.standard_normal((3, 6, 6)), jnp.float32)}}
    x = jnp.asarray(rng.standard_normal((4, 6)), jnp.float32)

    def forward(p):
        h = x
        for i in range(3):
            h = jnp.tanh(h @ p["layers"]["kernel"][i])
        return h

    tree = _randomize_b(inject(params, {r"layers/kernel": LoRA(rank=2, batch_axes=(0,))},
                               key=jax.random.key(0)))
    node = tree["layers"]["kernel"]
    h = x
    for i in range(3):
        h = jnp.tanh(h @ node.w[i] + (8.0 / 2) * (h @ node.a[i]) @ node.b[i])
    np.testing.assert_allclose(np.asarray(forward(materialize(tree))), np.asarray(h),
                               rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- rule errors
@pytest.mark.parametrize("rules,err,msg", [
    ({r"params/fc3/kernel": LoRA()}, ValueError,
     r"rule 'params/fc3/kernel' matches no leaf.*closest paths: 'params/fc\d/kernel'"),
    ({r"fc1/kernel": LoRA()}, ValueError, r"rule 'fc1/kernel' matches no leaf"),
    ({r".*": None, r".*/kernel": LoRA()}, ValueError, r"rule '\.\*/kernel' decides no leaf"),
    ({r"(": LoRA()}, ValueError, "not a valid regex"),
    ({r".*/kernel": FakeQuant()}, TypeError, r"adapter method .* got FakeQuant"),
    ({r".*/kernel": 4}, TypeError, "adapter method"),
    ({}, ValueError, "empty"),
    ("params/fc1/kernel", TypeError, "mapping"),
    ({r".*fc1/bias": LoRA()}, ValueError,
     r"leaf 'params/fc1/bias' \(shape \(8,\), dtype float32\).*LoRA needs at least 2"),
])
def test_rule_errors(linen, rules, err, msg):
    _, variables = linen
    with pytest.raises(err, match=msg):
        inject(variables, rules, key=jax.random.key(0))


def test_sequence_rules_first_match_wins(linen):
    _, variables = linen
    rules = [(r"params/fc1/kernel", LoRA(rank=1)), (r".*kernel", LoRA(rank=3))]
    tree = inject(variables, rules, key=jax.random.key(0))
    assert tree["params"]["fc1"]["kernel"].a.shape == (5, 1)
    assert tree["params"]["fc2"]["kernel"].a.shape == (8, 3)
    assert tree["params"]["fc1"]["bias"] is variables["params"]["fc1"]["bias"]


def test_non_float_leaf_and_double_inject_are_named():
    tree = {"emb": {"ids": jnp.arange(6).reshape(2, 3)}, "w": jnp.ones((2, 2))}
    with pytest.raises(TypeError, match=r"leaf 'emb/ids' \(shape \(2, 3\), dtype int32\)"):
        inject(tree, {r".*": LoRA(rank=1)}, key=jax.random.key(0))
    once = inject(tree, {r"w": LoRA(rank=1)}, key=jax.random.key(0))
    with pytest.raises(TypeError, match=r"leaf 'w'.*already holds a LoRAWeight"):
        inject(once, {r"w": LoRA(rank=1)}, key=jax.random.key(0))
    twice = inject(once, {r"emb/ids": None}, key=jax.random.key(0))  # nodes pass through
    assert twice["w"] is once["w"]


def test_load_rejects_mismatched_rules(linen, tmp_path):
    _, variables = linen
    tree = inject(variables, {r".*fc1/kernel": LoRA(rank=2)}, key=jax.random.key(0))
    save_adapters(tmp_path / "ad", tree)
    with pytest.raises(ValueError, match=r"params/fc1/kernel.*saved as LoRA\(rank=2"):
        load_adapters(tmp_path / "ad", variables, {r".*fc1/kernel": LoRA(rank=4)})
    with pytest.raises(ValueError, match=r"'params/fc2/kernel', which has no stored"):
        load_adapters(tmp_path / "ad", variables, {r".*kernel": LoRA(rank=2)})
    with pytest.raises(ValueError, match="no adapter nodes"):
        save_adapters(tmp_path / "none", variables)


def test_calibrated_methods_get_their_leaf_data_and_missing_data_raises():
    import dataclasses

    from effjax.peft import AdapterMethod, Unfreeze

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class AddData(AdapterMethod):  # toy data-driven method: W' = W + data (via Unfreeze's node)
        calibration = "gradients"

        def adapt(self, key, w, data=None):
            return Unfreeze().adapt(key, w + data)

        def num_trainable(self, shape):
            return int(np.prod(shape))

    params = {"a": {"kernel": jnp.ones((2, 3))}, "b": {"kernel": jnp.ones((2, 3))}}
    calib = {"a/kernel": jnp.full((2, 3), 2.0), "b/kernel": jnp.full((2, 3), 5.0)}
    tree = inject(params, {r".*/kernel": AddData()}, key=jax.random.key(0), calibration=calib)
    out = materialize(tree)
    np.testing.assert_array_equal(np.asarray(out["a"]["kernel"]), 3.0)
    np.testing.assert_array_equal(np.asarray(out["b"]["kernel"]), 6.0)
    with pytest.raises(ValueError, match=r"leaf 'b/kernel'.*needs calibration data \(gradients\)"):
        inject(params, {r".*/kernel": AddData()}, key=jax.random.key(0),
               calibration={"a/kernel": calib["a/kernel"]})
