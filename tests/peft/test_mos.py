"""MoS: the paper's equation written plainly in numpy (torch layout), the routing's four
differentiation strategies, the trainable-parameter formula, gradients through shared shards,
checkpoints and bad configs.

There is no peer library for MoS (not in Hugging Face PEFT); the official code
(Forence1999/MoS, ``modules/Tied_LoRA.py``) needs bitsandbytes 4-bit LLaMA modules, so the
reference here is the paper's construction written out with loops.

Tolerances (float32): numpy float64 references 1e-5.
"""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from effjax.peft import (
    LoRA,
    combine,
    inject,
    load_adapters,
    materialize,
    save_adapters,
    split,
    summary,
)
from effjax.peft.mos import MoS, MoSWeight, mos_routing
from tests.peft.conformance_case import params_for as _params
from tests.peft.conformance_case import paths as _paths
from tests.peft.conformance_case import perturb as _perturb

RULE = r"layer/kernel"
METHOD = MoS(rank=4, pool_rank=2, private_rank=1, num_shards=2, alpha=8.0, batch_axes=0)
SHAPE = (4, 12, 10)  # 4 layers, in 12, out 10


def _tree(method=METHOD, shape=SHAPE, key=1):
    params = _params(shape)
    return params, inject(params, {RULE: method}, key=jax.random.key(key))


def paper_layer_torch(node, s):
    """W0_s^T + (alpha / r) B_s A_s in torch's (out, in) layout, A_s rows and B_s columns
    concatenated from l pool shards (numpy float64)."""
    m = node.method
    r, n_sh = m.rank, m.num_shards
    pa, pb = np.asarray(node.pool_a, np.float64), np.asarray(node.pool_b, np.float64)
    ia, ib = np.asarray(node.idx_a)[s], np.asarray(node.idx_b)[s]
    a_rows = [np.concatenate([pa[ia[k * n_sh + i]] for i in range(n_sh)]) for k in range(r)]
    b_cols = [np.concatenate([pb[ib[k * n_sh + i]] for i in range(n_sh)]) for k in range(r)]
    a_t, b_t = np.stack(a_rows), np.stack(b_cols, axis=1)  # (r, in), (out, r)
    return np.asarray(node.w[s], np.float64).T + m.alpha / r * b_t @ a_t


def test_materialize_is_the_papers_equation_per_layer():
    _, tree = _tree()
    tree = _perturb(tree)
    node = tree["layer"]["kernel"]
    out = np.asarray(materialize(tree)["layer"]["kernel"])
    x = np.random.default_rng(0).standard_normal((12, 3))  # torch's column convention
    for s in range(SHAPE[0]):
        want = paper_layer_torch(node, s)
        np.testing.assert_allclose(out[s].T, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out[s].T @ x, want @ x, rtol=1e-5, atol=1e-4)
    # each layer's update has rank r = 4 although the pools hold rank-2 worth of parameters
    for s in range(SHAPE[0]):
        delta = out[s] - np.asarray(node.w[s])
        assert np.linalg.matrix_rank(delta.astype(np.float64), tol=1e-4) == METHOD.rank


def test_routing_implements_the_four_strategies():
    L, r, e, p, n_sh = 5, 6, 3, 2, 3  # noqa: N806
    idx = np.asarray(mos_routing(jax.random.key(7), L, r, e, p, n_sh))
    public = (e - p) * L * n_sh
    assert idx.shape == (L, r * n_sh)
    for s in range(L):
        shared, private = idx[s, :(r - p) * n_sh], idx[s, (r - p) * n_sh:]
        # subset selection: distinct public shards (no replacement)
        assert len(set(shared)) == shared.size and (shared < public).all()
        # shard privatization: this layer's own block after the public pool
        np.testing.assert_array_equal(private, public + s * p * n_sh + np.arange(p * n_sh))
    # private shards of a layer appear in no other layer
    for s in range(L):
        others = np.delete(idx, s, axis=0)
        assert not set(idx[s, (r - p) * n_sh:]) & set(others.ravel())
    # layers draw different subsets; the pool size is e L l
    assert len({tuple(row[:(r - p) * n_sh]) for row in idx}) == L
    assert idx.max() < e * L * n_sh
    # pair dissociation: A and B routings of a node are independent draws
    _, tree = _tree()
    node = tree["layer"]["kernel"]
    assert not np.array_equal(np.asarray(node.idx_a), np.asarray(node.idx_b))
    # deterministic in the key
    np.testing.assert_array_equal(idx, np.asarray(mos_routing(jax.random.key(7), L, r, e, p,
                                                              n_sh)))


def test_vector_sharding_concatenates_shards_in_order():
    m = MoS(rank=2, pool_rank=2, private_rank=0, num_shards=3, alpha=2.0)
    node = m.adapt(jax.random.key(0), jnp.zeros((6, 3)))
    pool_a = jnp.arange(6 * 2, dtype=jnp.float32).reshape(6, 2)  # S = 6 shards of length 2
    pool_b = jnp.eye(6, 1, dtype=jnp.float32)  # b shards: only shard 0 is nonzero
    idx = jnp.array([5, 0, 3, 1, 2, 4], jnp.int32)  # a_0 = [P5|P0|P3], a_1 = [P1|P2|P4]
    node = node.replace(pool_a=pool_a, pool_b=pool_b, idx_a=idx,
                        idx_b=jnp.array([0, 0, 0, 1, 1, 1], jnp.int32))
    a, b = node.factors()
    np.testing.assert_array_equal(np.asarray(a[:, 0]), [10, 11, 0, 1, 6, 7])
    np.testing.assert_array_equal(np.asarray(a[:, 1]), [2, 3, 4, 5, 8, 9])
    np.testing.assert_array_equal(np.asarray(b), [[1, 1, 1], [0, 0, 0]])
    # W' = 0 + (2 / 2) a_0 b_0^T
    np.testing.assert_array_equal(np.asarray(node.materialize()),
                                  np.outer([10, 11, 0, 1, 6, 7], [1, 1, 1]))


def test_trainable_count_formula_and_savings():
    # e L (n_in + n_out): LoRA of rank e on every layer
    for method, shape in ((METHOD, SHAPE), (MoS(rank=8, pool_rank=1, private_rank=0,
                                                num_shards=4, batch_axes=0), (8, 64, 32))):
        lora = LoRA(rank=method.pool_rank, batch_axes=0).num_trainable(shape)
        assert method.num_trainable(shape) == lora
        assert method.num_trainable(shape) == method.pool_rank * shape[0] * sum(shape[1:])
    # rank 8 per layer for the parameters of LoRA rank 1: 8x fewer than LoRA rank 8
    m = MoS(rank=8, pool_rank=1, private_rank=0, num_shards=4, batch_axes=0)
    assert LoRA(rank=8, batch_axes=0).num_trainable((8, 64, 32)) == 8 * m.num_trainable(
        (8, 64, 32))
    _, tree = _tree()
    assert summary(tree).trainable == 2 * 4 * (12 + 10) == METHOD.num_trainable(SHAPE)


def test_init_identity_and_distribution():
    params, tree = _tree(MoS(rank=8, pool_rank=4, private_rank=2, num_shards=4, batch_axes=0),
                         (8, 64, 32))
    node = tree["layer"]["kernel"]
    assert isinstance(node, MoSWeight)
    assert node.pool_a.shape == (4 * 8 * 4, 16) and node.pool_b.shape == (4 * 8 * 4, 8)
    np.testing.assert_array_equal(np.asarray(node.pool_b), 0.0)
    np.testing.assert_array_equal(np.asarray(materialize(tree)["layer"]["kernel"]),
                                  np.asarray(params["layer"]["kernel"]))
    assert node.pool_a.dtype == jnp.float32 and node.idx_a.dtype == jnp.int32
    node16 = MoS(rank=2, pool_rank=2, private_rank=0).adapt(jax.random.key(0),
                                                            jnp.ones((4, 6), jnp.bfloat16))
    assert node16.pool_a.dtype == node16.pool_b.dtype == jnp.float32
    assert node16.materialize().dtype == jnp.bfloat16
    bound = 1 / np.sqrt(64)  # kaiming-uniform with the fan-in of a whole vector (n_in)
    pa = np.asarray(node.pool_a)
    assert np.abs(pa).max() <= bound and np.abs(pa).max() > 0.99 * bound
    assert pa.std() == pytest.approx(bound / np.sqrt(3), rel=0.05)


def test_gradient_of_a_shard_sums_over_its_uses():
    _, tree = _tree()
    tree = _perturb(tree)
    node = tree["layer"]["kernel"]
    c = jnp.asarray(np.random.default_rng(3).standard_normal(SHAPE), jnp.float32)
    train, frozen = split(tree)
    g = jax.grad(lambda t: jnp.sum(c * materialize(combine(t, frozen))["layer"]["kernel"]))(
        train)["layer"]["kernel"]
    # a shard no layer routes to gets no gradient: reroute every use of shard 0 to shard 1
    rerouted = node.replace(idx_a=jnp.where(node.idx_a == 0, 1, node.idx_a))
    g0 = jax.grad(lambda pa: jnp.sum(c * rerouted.replace(pool_a=pa).materialize()))(
        rerouted.pool_a)
    assert 0 not in set(np.asarray(rerouted.idx_a).ravel())
    np.testing.assert_array_equal(np.asarray(g0[0]), 0.0)
    assert np.abs(np.asarray(g0[1])).max() > 0
    # the gradient of the pools is the sum of each layer's own gradient (loss is a sum)
    total = np.zeros(node.pool_b.shape)
    for s in range(SHAPE[0]):
        gs = jax.grad(lambda pb, s=s: jnp.sum(
            c[s] * node.replace(pool_b=pb).materialize()[s]))(node.pool_b)
        total += np.asarray(gs)
        private = (METHOD.pool_rank - METHOD.private_rank) * SHAPE[0] * 2  # first private
        own = private + s * METHOD.private_rank * 2 + np.arange(METHOD.private_rank * 2)
        others = [o for o in range(private, node.pool_b.shape[0]) if o not in own]
        np.testing.assert_array_equal(np.asarray(gs)[others], 0.0)  # private to layer s
        assert np.abs(np.asarray(gs)[own]).max() > 0
    np.testing.assert_allclose(np.asarray(g.pool_b), total, rtol=1e-5, atol=1e-5)


def test_checkpoint_holds_only_the_pools_and_needs_the_injection_key(tmp_path):
    params, tree = _tree(key=3)
    tree = _perturb(tree)
    save_adapters(tmp_path / "ad", tree)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ck:
        raw = ck.restore(tmp_path / "ad", args=ocp.args.Composite(
            adapters=ocp.args.StandardRestore()))["adapters"]
    assert _paths(raw) == {"layer/kernel/pool_a", "layer/kernel/pool_b"}
    want = np.asarray(materialize(tree)["layer"]["kernel"])
    back = load_adapters(tmp_path / "ad", params, None, key=jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(materialize(back)["layer"]["kernel"]), want)
    other = load_adapters(tmp_path / "ad", params, None, key=jax.random.key(4))
    assert not np.array_equal(np.asarray(other["layer"]["kernel"].idx_a),
                              np.asarray(tree["layer"]["kernel"].idx_a))


def test_errors():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        MoS(rank=0)
    with pytest.raises(ValueError, match="private_rank must be >= 0"):
        MoS(private_rank=-1)
    with pytest.raises(ValueError, match="private_rank=3 must be <= rank=2"):
        MoS(rank=2, pool_rank=4, private_rank=3)
    with pytest.raises(ValueError, match="private_rank=3 must be <= rank=8 and <= pool_rank=2"):
        MoS(rank=8, pool_rank=2, private_rank=3)
    with pytest.raises(TypeError, match="num_shards must be an int"):
        MoS(num_shards=2.0)
    with pytest.raises(ValueError, match="alpha must be finite"):
        MoS(alpha=float("nan"))
    with pytest.raises(ValueError, match=r"num_shards=4 must divide n_out = 10"):
        MoS(rank=2, pool_rank=2, num_shards=4).adapt(jax.random.key(0), jnp.ones((12, 10)))
    with pytest.raises(ValueError, match=r"rank - private_rank <= \(pool_rank - private_rank\) "
                                         r"\* L.*L=1 layers"):
        MoS(rank=8, pool_rank=2).adapt(jax.random.key(0), jnp.ones((12, 10)))
    with pytest.raises(ValueError, match="L=2 layers"):
        MoS(rank=8, pool_rank=2, batch_axes=0).num_trainable((2, 12, 10))
    with pytest.raises(TypeError, match="MoS needs a floating kernel"):
        MoS(rank=1, pool_rank=1).adapt(jax.random.key(0), jnp.ones((4, 2), jnp.int32))
