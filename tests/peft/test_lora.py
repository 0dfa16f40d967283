"""LoRA specifics: init distributions, axes and stacked kernels, sharding, config errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from effjax.peft import KernelLayout, LoRA, inject, leaf_key, materialize


def _node(method, shape, seed=0, dtype=jnp.float32):
    w = jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)
    return method.adapt(jax.random.key(seed), w)


def test_scale_lora_and_rslora():
    assert LoRA(rank=8, alpha=16).scale == 2.0
    assert LoRA(rank=16, alpha=8, rslora=True).scale == 2.0  # 8 / sqrt(16)
    assert LoRA(rank=3, alpha=1.5, rslora=True).scale == pytest.approx(1.5 / math.sqrt(3))


@pytest.mark.parametrize("shape,kwargs,n_in", [
    ((256, 64), {}, 256),
    ((64, 8, 16), {"in_axes": (0, 1)}, 512),  # attention output (heads, head_dim, d)
    ((4, 128, 32), {"batch_axes": (0,)}, 128),
])
def test_kaiming_init_is_uniform_with_bound_one_over_sqrt_fan_in(shape, kwargs, n_in):
    node = _node(LoRA(rank=16, **kwargs), shape)
    a = np.asarray(node.a).ravel()
    bound = 1.0 / math.sqrt(n_in)  # torch kaiming_uniform_(a=sqrt(5)): gain*sqrt(3/fan_in)
    assert np.all(np.abs(a) <= bound)
    assert np.abs(a).max() > 0.97 * bound
    assert a.std() == pytest.approx(bound / math.sqrt(3), rel=0.05)  # U(-c, c): std c/sqrt(3)
    np.testing.assert_array_equal(np.asarray(node.b), 0.0)


@pytest.mark.parametrize("rank", [4, 16])
def test_gaussian_init_has_std_one_over_rank(rank):
    node = _node(LoRA(rank=rank, init="gaussian"), (512, 64))
    a = np.asarray(node.a).ravel()
    assert a.std() == pytest.approx(1.0 / rank, rel=0.05)
    assert abs(a.mean()) < 4 * (1.0 / rank) / math.sqrt(a.size)
    np.testing.assert_array_equal(np.asarray(node.b), 0.0)


def test_stacked_kernel_gets_one_independent_adapter_per_slice():
    shape = (3, 16, 12)
    node = _node(LoRA(rank=2, alpha=2.0, batch_axes=(0,), init="gaussian"), shape)
    assert node.a.shape == (3, 16, 2) and node.b.shape == (3, 2, 12)
    a = np.asarray(node.a)
    assert not np.allclose(a[0], a[1]) and not np.allclose(a[1], a[2])
    rng = np.random.default_rng(1)
    b = rng.standard_normal(node.b.shape).astype(np.float32)
    node = node.replace(b=jnp.asarray(b))
    got = np.asarray(node.materialize())
    w = np.asarray(node.w)
    for i in range(3):  # slice i: W_i + (alpha / r) a_i @ b_i
        np.testing.assert_allclose(got[i], w[i] + 1.0 * a[i] @ b[i], rtol=1e-5, atol=1e-5)


def test_layout_defaults_and_explicit_axes():
    lay = KernelLayout.resolve((16, 4, 8))
    assert (lay.in_axes, lay.out_axes, lay.batch_axes) == ((0,), (1, 2), ())
    lay = KernelLayout.resolve((4, 8, 16), out_axes=-1)
    assert (lay.in_axes, lay.out_axes) == ((0, 1), (2,))
    lay = KernelLayout.resolve((2, 4, 8, 16), batch_axes=0, in_axes=(1, 2))
    assert (lay.batch_shape, lay.n_in, lay.n_out) == ((2,), 32, 16)
    w = jnp.arange(2 * 4 * 8 * 16.0).reshape(2, 4, 8, 16)
    m = lay.to_matrix(w)
    assert m.shape == (2, 32, 16)
    np.testing.assert_array_equal(np.asarray(m[1, 3 * 8 + 5]), np.asarray(w[1, 3, 5]))
    np.testing.assert_array_equal(np.asarray(lay.from_matrix(m)), np.asarray(w))


@pytest.mark.parametrize("kwargs,shape,msg", [
    ({}, (5,), "non-batch axes"),
    ({"batch_axes": (0,)}, (3, 5), "non-batch axes"),
    ({"in_axes": (0,), "out_axes": (0, 1)}, (3, 4), "disjoint"),
    ({"in_axes": (0, 1)}, (3, 4), "disjoint"),
    ({"in_axes": (2,)}, (3, 4), "out of range"),
    ({"in_axes": (0,), "batch_axes": (0,)}, (3, 4, 5), "overlaps"),
    ({"in_axes": (0, 0)}, (3, 4, 5), "repeats"),
])
def test_bad_layouts_raise_naming_the_leaf(kwargs, shape, msg):
    params = {"blk": {"kernel": jnp.ones(shape, jnp.bfloat16)}}
    with pytest.raises(ValueError, match=msg) as e:
        inject(params, {r"blk/kernel": LoRA(rank=2, **kwargs)}, key=jax.random.key(0))
    assert "'blk/kernel'" in str(e.value) and str(shape) in str(e.value)
    assert "bfloat16" in str(e.value)


@pytest.mark.parametrize("kwargs,err", [
    ({"rank": 0}, ValueError), ({"rank": 2.0}, TypeError), ({"rank": True}, TypeError),
    ({"alpha": "8"}, TypeError), ({"alpha": float("nan")}, ValueError),
    ({"init": "xavier"}, ValueError), ({"rslora": 1}, TypeError),
    ({"dtype": jnp.int8}, TypeError), ({"in_axes": "0"}, TypeError),
    ({"batch_axes": (0.5,)}, TypeError),
])
def test_bad_configs_raise(kwargs, err):
    with pytest.raises(err):
        LoRA(**kwargs)


def test_config_is_hashable_and_normalized():
    a, b = LoRA(rank=2, in_axes=[0, 1], dtype="bfloat16"), LoRA(rank=2, in_axes=(0, 1),
                                                                  dtype=jnp.bfloat16)
    assert a == b and hash(a) == hash(b) and a.in_axes == (0, 1)


def test_adapter_dtype():
    assert _node(LoRA(rank=2), (4, 3), dtype=jnp.float16).a.dtype == jnp.float32
    node = _node(LoRA(rank=2, dtype=jnp.bfloat16), (4, 3))
    assert node.a.dtype == node.b.dtype == jnp.bfloat16
    assert node.materialize().dtype == jnp.float32


def test_leaf_keys_depend_only_on_the_path():
    params = {"x": {"kernel": jnp.ones((8, 4))}, "y": {"kernel": jnp.ones((8, 4))}}
    key = jax.random.key(7)
    one = inject(params, {r"x/kernel": LoRA(rank=2)}, key=key)
    both = inject(params, {r".*/kernel": LoRA(rank=2)}, key=key)
    np.testing.assert_array_equal(np.asarray(one["x"]["kernel"].a),
                                  np.asarray(both["x"]["kernel"].a))
    assert not np.allclose(np.asarray(both["x"]["kernel"].a), np.asarray(both["y"]["kernel"].a))
    direct = LoRA(rank=2).adapt(leaf_key(key, "x/kernel"), params["x"]["kernel"])
    np.testing.assert_array_equal(np.asarray(direct.a), np.asarray(one["x"]["kernel"].a))


@pytest.mark.parametrize("axes,spec,a_spec,b_spec", [
    (("x",), PartitionSpec(None, "x"), (None, None), (None, "x")),
    (("x",), PartitionSpec("x", None), ("x", None), (None, None)),
    (("x", "y"), PartitionSpec("x", "y"), ("x", None), (None, "y")),
])
def test_sharded_kernel_keeps_sharding_and_materializes_under_jit(axes, spec, a_spec, b_spec):
    assert jax.device_count() == 8
    mesh_shape = (8,) if len(axes) == 1 else (2, 4)
    mesh = Mesh(np.array(jax.devices()).reshape(mesh_shape), axes)
    rng = np.random.default_rng(0)
    w_host = rng.standard_normal((16, 32)).astype(np.float32)
    w = jax.device_put(w_host, NamedSharding(mesh, spec))
    tree = inject({"k": w}, {"k": LoRA(rank=4, alpha=8.0)}, key=jax.random.key(0))
    node = tree["k"]
    assert node.w is w
    assert node.a.sharding == NamedSharding(mesh, PartitionSpec(*a_spec))
    assert node.b.sharding == NamedSharding(mesh, PartitionSpec(*b_spec))
    b_host = rng.standard_normal((4, 32)).astype(np.float32)
    tree = {"k": node.replace(b=jax.device_put(b_host, node.b.sharding))}
    out = jax.jit(materialize)(tree)["k"]
    want = w_host + 2.0 * np.asarray(node.a) @ b_host
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)
    assert out.sharding.is_equivalent_to(w.sharding, 2)
    grads = jax.jit(jax.grad(lambda n: jnp.sum(materialize(n)["k"] ** 2)))(tree)
    assert grads["k"].a.shape == (16, 4) and np.all(np.isfinite(np.asarray(grads["k"].a)))
