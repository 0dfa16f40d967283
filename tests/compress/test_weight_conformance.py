"""The weight-format conformance table: every format through the shared checks (jit equals
eager, the rounding bound, orbax round trip, sharded kernels on 8 CPU devices, the gradient of
the on-the-fly contraction, bfloat16 kernels)."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from effjax.compress import FP4, NF4, Int4, Int8, QuantizedWeight, materialize, quantize_params
from effjax.nn._quantized import quantized_einsum
from effjax.quant import weights as wq

ROWS = {
    "nf4-b64-dq": NF4(block_size=64, double_quant=True),
    "nf4-b32": NF4(block_size=32, double_quant=False),
    "fp4-b64-dq": FP4(block_size=64),
    "int8": Int8(),
    "int4-g32-sym": Int4(group_size=32),
    "int4-g32-asym-f16": Int4(group_size=32, symmetric=False, scale_dtype="float16"),
}
W = jax.random.normal(jax.random.key(0), (128, 48))


def _bound(fmt, w):
    """Largest error the format allows per element of the row view ``w.T``, written from the
    format's definition (half the widest gap between neighbouring codes, times the scale)."""
    m = np.asarray(w, np.float32).T
    if isinstance(fmt, (NF4, FP4)):
        table = np.sort(wq.four_bit_table(fmt.kind))
        flat = m.ravel()
        absmax = np.abs(flat.reshape(-1, fmt.block_size)).max(1)
        half_gap = np.diff(table).max() / 2
        extra = 0.0 if not fmt.double_quant else 0.01  # the 8-bit scale's own error (< 1%)
        return np.repeat(absmax * (half_gap + extra), fmt.block_size).reshape(m.shape)
    if isinstance(fmt, Int8):
        return np.abs(m).max(1, keepdims=True) / 127 / 2 * np.ones_like(m)
    g = m.reshape(m.shape[0], -1, fmt.group_size)
    if fmt.symmetric:
        bound = np.abs(g).max(-1, keepdims=True) / 7.5 / 2
    else:  # codes from the float32 d; d and min stored in float16 (relative error 2**-11)
        d = (g.max(-1, keepdims=True) - g.min(-1, keepdims=True)) / 15
        bound = d / 2 + 15 * d * 2.0**-11 + np.abs(g.min(-1, keepdims=True)) * 2.0**-11
    return np.broadcast_to(bound, g.shape).reshape(m.shape)


@pytest.mark.parametrize("name", ROWS)
def test_jit_eager_and_rounding_bound(name):
    fmt = ROWS[name]
    eager = quantize_params({"w": W}, {"w": fmt})
    jitted = jax.jit(lambda p: quantize_params(p, {"w": fmt}))({"w": W})
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 eager, jitted)
    err = np.abs(np.asarray(materialize(eager)["w"]) - np.asarray(W)).T
    bound = _bound(fmt, W)
    assert (err <= bound * (1 + 1e-6) + 1e-7).all(), float((err - bound).max())
    assert err.max() > 0.1 * bound.max()  # the bound is not vacuous


@pytest.mark.parametrize("name", ROWS)
def test_orbax_round_trip(name, tmp_path):
    tree = quantize_params({"w": W, "b": jnp.ones(48)}, {"w": ROWS[name]})
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "q", tree)
        ckpt.wait_until_finished()
        restored = ckpt.restore(tmp_path / "q", jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree))
    assert isinstance(restored["w"], QuantizedWeight) and restored["w"].format == ROWS[name]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 restored, tree)


@pytest.mark.parametrize("axes", ["auto", "explicit"])
@pytest.mark.parametrize("name", ROWS)
def test_sharded_kernel_quantizes_like_one_device(name, axes):
    kind = AxisType.Auto if axes == "auto" else AxisType.Explicit
    mesh = jax.make_mesh((4, 2), ("x", "y"), axis_types=(kind, kind))
    ws = jax.device_put(W, NamedSharding(mesh, P("x", "y")))
    q = jax.jit(lambda p: quantize_params(p, {"w": ROWS[name]}))({"w": ws})
    ref = quantize_params({"w": W}, {"w": ROWS[name]})
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 q, ref)
    dense = jax.jit(materialize)  # both compiled: the same fusion of the scales' arithmetic
    np.testing.assert_array_equal(np.asarray(dense(q)["w"]), np.asarray(dense(ref)["w"]))


@pytest.mark.parametrize("name", ROWS)
def test_on_the_fly_contraction_and_its_gradient(name):
    qw = quantize_params({"w": W.astype(jnp.bfloat16)}, {"w": ROWS[name]})["w"]
    assert qw.materialize().dtype == jnp.bfloat16
    x = jax.random.normal(jax.random.key(1), (3, 128), jnp.float32)
    dense = qw.materialize().astype(jnp.float32)

    def f(x):
        return jnp.sum(jnp.sin(quantized_einsum("bi", "io", "bo", x, qw, dtype=jnp.float32)))

    def f_dense(x):
        return jnp.sum(jnp.sin(x @ dense))

    np.testing.assert_allclose(np.asarray(jax.grad(f)(x)), np.asarray(jax.grad(f_dense)(x)),
                               rtol=1e-5, atol=1e-6)
