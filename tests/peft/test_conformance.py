"""Conformance table for effjax.peft adapter methods.

Every method (one row per method and kernel layout) passes the same checks: the
trainable-count formula, identity right after inject, jit, gradients that reach only trainable
leaves (and equal those of a plain einsum reference), merge == materialize, the orbax
round trip, bfloat16 params. A new method adds rows to CASES and a reference to REF.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from effjax.compress import key_path_str
from effjax.peft import (
    LoRA,
    Unfreeze,
    combine,
    inject,
    load_adapters,
    materialize,
    merge,
    save_adapters,
    split,
    summary,
    trainable_mask,
)

# name: (method, kernel shape, trainable count by hand, einsum of the LoRA product or None)
CASES = {
    "lora_2d": (LoRA(rank=3, alpha=6.0), (12, 10), 3 * (12 + 10), "ir,ro->io"),
    "lora_gauss_rs": (LoRA(rank=4, alpha=2.0, init="gaussian", rslora=True), (10, 12),
                      4 * (10 + 12), "ir,ro->io"),
    "lora_qkv": (LoRA(rank=2, alpha=4.0), (16, 4, 8), 2 * (16 + 4 * 8), "ir,rhd->ihd"),
    "lora_out": (LoRA(rank=2, alpha=4.0, in_axes=(0, 1)), (4, 8, 16), 2 * (4 * 8 + 16),
                 "hdr,ro->hdo"),
    "lora_out_by_out_axes": (LoRA(rank=2, alpha=4.0, out_axes=-1), (4, 8, 16),
                             2 * (4 * 8 + 16), "hdr,ro->hdo"),
    "lora_stacked": (LoRA(rank=2, alpha=3.0, batch_axes=(0,)), (3, 12, 10), 3 * 2 * (12 + 10),
                     "lir,lro->lio"),
    "lora_stacked_out": (LoRA(rank=2, alpha=2.0, batch_axes=0, in_axes=(1, 2)), (2, 4, 8, 16),
                         2 * 2 * (4 * 8 + 16), "lhdr,lro->lhdo"),
    "lora_experts_mid": (LoRA(rank=2, alpha=2.0, batch_axes=(1,)), (6, 3, 5),
                         3 * 2 * (6 + 5), "eir,ero->ieo"),
    "lora_experts_last": (LoRA(rank=2, alpha=2.0, batch_axes=-1), (6, 5, 3),
                          3 * 2 * (6 + 5), "eir,ero->ioe"),
    "unfreeze": (Unfreeze(), (6, 5), 30, None),
}
NAMES = list(CASES)


def _scale(method):
    if isinstance(method, Unfreeze):
        return 1.0
    return method.alpha / (np.sqrt(method.rank) if method.rslora else method.rank)


def reference_kernel(name, node):
    """The adapted kernel written plainly: W + s * einsum(a, b) (LoRA) or W (Unfreeze)."""
    method, _, _, eq = CASES[name]
    if eq is None:
        return node.w
    return node.w + _scale(method) * jnp.einsum(eq, node.a, node.b)


def _params(shape, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    return {"layer": {"kernel": jnp.asarray(rng.standard_normal(shape), dtype),
                      "bias": jnp.asarray(rng.standard_normal(shape[-1]), dtype)},
            "other": {"kernel": jnp.asarray(rng.standard_normal((3, 2)), dtype)}}


def _inject(name, dtype=jnp.float32):
    method, shape, _, _ = CASES[name]
    params = _params(shape, dtype)
    return params, inject(params, {r"layer/kernel": method}, key=jax.random.key(1))


def _perturb(tree, seed=2):
    """Give every trainable leaf random values (b = 0 would hide most errors)."""
    trainable, frozen = split(tree)
    rng = np.random.default_rng(seed)
    noisy = jax.tree.map(
        lambda x: jnp.asarray(np.asarray(x, np.float32) + rng.standard_normal(x.shape), x.dtype),
        trainable)
    return combine(noisy, frozen)


def _paths(tree):
    return {key_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("name", NAMES)
def test_trainable_count_formula(name):
    method, shape, expected, _ = CASES[name]
    _, tree = _inject(name)
    trainable, _ = split(tree)
    n_leaves = sum(x.size for x in jax.tree.leaves(trainable))
    assert method.num_trainable(shape) == expected == n_leaves == summary(tree).trainable
    total = sum(x.size for x in jax.tree.leaves(tree))
    assert summary(tree).total == total


@pytest.mark.parametrize("name", NAMES)
def test_materialize_after_inject_is_the_base_exactly(name):
    params, tree = _inject(name)
    out = materialize(tree)
    assert jax.tree.structure(out) == jax.tree.structure(params)
    for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(params)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    if name.startswith("lora"):
        node = tree["layer"]["kernel"]
        np.testing.assert_array_equal(np.asarray(node.b), 0.0)
        assert float(jnp.abs(node.a).max()) > 0


@pytest.mark.parametrize("name", NAMES)
def test_materialize_matches_reference_and_jit(name):
    _, tree = _inject(name)
    tree = _perturb(tree)
    node = tree["layer"]["kernel"]
    want = jax.jit(reference_kernel, static_argnums=0)(name, node)
    got = materialize(tree)["layer"]["kernel"]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    jitted = jax.jit(materialize)(tree)["layer"]["kernel"]
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(got), rtol=1e-6, atol=1e-6)
    # inject itself under jit gives the same tree (rules closed over, key traced)
    method = CASES[name][0]
    params = _params(CASES[name][1])
    eager = inject(params, {r"layer/kernel": method}, key=jax.random.key(5))
    traced = jax.jit(lambda p, k: inject(p, {r"layer/kernel": method}, key=k))(
        params, jax.random.key(5))
    assert jax.tree.structure(traced) == jax.tree.structure(eager)
    for x, y in zip(jax.tree.leaves(traced), jax.tree.leaves(eager)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", NAMES)
def test_grad_reaches_only_trainable_leaves(name):
    _, tree = _inject(name)
    tree = _perturb(tree)
    shape = CASES[name][1]
    c = jnp.asarray(np.random.default_rng(3).standard_normal(shape), jnp.float32)
    trainable, frozen = split(tree)

    def loss(t):
        p = materialize(combine(t, frozen))
        return jnp.sum(c * p["layer"]["kernel"] ** 2) + jnp.sum(p["layer"]["bias"])

    grads = jax.jit(jax.grad(loss))(trainable)
    mask = trainable_mask(tree)
    want_paths = {key_path_str(p) for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]
                  if m}
    assert _paths(grads) == _paths(trainable) == want_paths
    assert want_paths == ({"layer/kernel/w"} if name == "unfreeze" else
                          {"layer/kernel/a", "layer/kernel/b"})

    # reference: the same loss through the plain einsum, differentiated by field
    node = tree["layer"]["kernel"]
    fields = node.trainable_fields

    def ref_loss(*vals):
        n = node.replace(**dict(zip(fields, vals)))
        return jnp.sum(c * reference_kernel(name, n) ** 2)

    ref = jax.jit(jax.grad(ref_loss, argnums=tuple(range(len(fields)))))(
        *[getattr(node, f) for f in fields])
    for f, r in zip(fields, ref):
        g = getattr(grads["layer"]["kernel"], f)
        assert float(jnp.abs(g).max()) > 0
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_merge_equals_materialize(name):
    _, tree = _inject(name)
    tree = _perturb(tree)
    merged, mat = merge(tree), materialize(tree)
    assert jax.tree.structure(merged) == jax.tree.structure(mat)
    for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(mat)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", NAMES)
def test_split_combine_is_an_exact_inverse(name):
    _, tree = _inject(name)
    trainable, frozen = split(tree)
    back = combine(trainable, frozen)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    assert all(x is y for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(tree)))
    assert not set(_paths(trainable)) & set(_paths(frozen))
    assert _paths(trainable) | _paths(frozen) == _paths(tree)


@pytest.mark.parametrize("name", NAMES)
def test_save_load_roundtrip_stores_only_trainable_leaves(name, tmp_path):
    method, shape, expected, _ = CASES[name]
    params, tree = _inject(name)
    tree = _perturb(tree)
    save_adapters(tmp_path / "ad", tree)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ck:  # raw read, no target
        raw = ck.restore(tmp_path / "ad", args=ocp.args.Composite(
            adapters=ocp.args.StandardRestore()))["adapters"]
    trainable, _ = split(tree)
    assert _paths(raw) == _paths(trainable)
    assert sum(np.asarray(x).size for x in jax.tree.leaves(raw)) == expected
    for rules in (None, {r"layer/kernel": method}):
        back = load_adapters(tmp_path / "ad", params, rules)
        assert jax.tree.structure(back) == jax.tree.structure(tree)
        for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_params(name):
    method, shape, _, _ = CASES[name]
    params, tree = _inject(name, jnp.bfloat16)
    node = tree["layer"]["kernel"]
    if name.startswith("lora"):  # PEFT's autocast_adapter_dtype: float32 adapters
        assert node.a.dtype == node.b.dtype == jnp.float32
    out = materialize(tree)
    assert out["layer"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out["layer"]["kernel"], np.float32),
                                  np.asarray(params["layer"]["kernel"], np.float32))
    tree = _perturb(tree)
    node = tree["layer"]["kernel"]
    want = reference_kernel(name, node.replace(w=node.w.astype(jnp.float32))).astype(
        jnp.bfloat16)
    got = materialize(tree)["layer"]["kernel"]
    assert got.dtype == jnp.bfloat16
    # both round the same float32 value to bfloat16: equal up to one bf16 ulp of reassociation
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=2**-7, atol=1e-6)
    assert merge(tree)["layer"]["kernel"].dtype == jnp.bfloat16


def test_checkpoint_is_small_for_a_large_kernel(tmp_path):
    w = jnp.ones((512, 512))
    tree = inject({"k": w}, {"k": LoRA(rank=2)}, key=jax.random.key(0))
    save_adapters(tmp_path / "ad", tree)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp_path / "ad")
               for f in fs)
    assert size < w.nbytes / 20  # 1 MiB kernel; adapters are 2 * 2 * 512 floats = 8 KiB
