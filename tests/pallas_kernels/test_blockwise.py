"""pallas_kernels.blockwise (interpret mode) == effjax.quant's jnp reference, bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import quant as Q
from pallas_kernels import blockwise as B

CODEBOOKS = {
    "dynamic_signed": (Q.dynamic_codebook(signed=True), False),
    "dynamic_unsigned": (Q.dynamic_codebook(signed=False), True),
    "linear8": (Q.linear_codebook(8), False),
    "adam4_first": (Q.adam4bit_first_moment_codebook(), False),
    "adam4_second": (Q.adam4bit_second_moment_codebook(), True),
}

# (codebook, shape, block_size, dtype, tile_elems): 1-D, non-multiples of the block, leading
# dims, merged short trailing axes (odd last axis: the 4-bit packing outside the kernel), bf16,
# grouped rows.
CASES = [
    ("dynamic_signed", (1000,), 256, jnp.float32, None),
    ("dynamic_signed", (3, 700), 256, jnp.bfloat16, 512),  # 2x2 tiles, ragged at both edges
    ("dynamic_unsigned", (4, 5, 64), 256, jnp.float32, None),
    ("linear8", (2, 300), 128, jnp.float32, None),
    ("adam4_first", (3, 333), 128, jnp.float32, 256),  # several programs along a row
    ("adam4_first", (40, 3), 64, jnp.bfloat16, None),
    ("adam4_second", (2, 3, 130), 128, jnp.float32, None),
    ("adam4_second", (7,), 128, jnp.float32, None),
    # rows grouped into whole blocks (effjax.quant.block_view): pairs of 384-wide rows; merged
    # then grouped; an odd last axis grouped by four (4-bit packing outside the kernel)
    ("dynamic_signed", (6, 384), 256, jnp.float32, None),
    ("adam4_first", (4, 3, 96), 128, jnp.bfloat16, None),
    ("adam4_second", (8, 4, 11), 4, jnp.float32, None),
]


def _data(shape, dtype, unsigned, seed=0):
    x = jax.random.normal(jax.random.key(seed), shape) * 3.0
    x = x * jnp.exp(jax.random.normal(jax.random.key(seed + 1), shape) * 2)  # wide range
    return (jnp.abs(x) if unsigned else x).astype(dtype)


@pytest.mark.parametrize("name,shape,bs,dtype,tile", CASES)
def test_quantize_dequantize_equal_reference(name, shape, bs, dtype, tile):
    cb, unsigned = CODEBOOKS[name]
    x = _data(shape, dtype, unsigned)
    ref = B.quantize_blockwise_reference(x, codebook=cb, block_size=bs)
    got = B.quantize_blockwise(x, codebook=cb, block_size=bs, interpret=True, tile_elems=tile)
    assert got.codes.shape == ref.codes.shape and got.absmax.shape == ref.absmax.shape
    assert (got.shape, got.dtype, got.bits, got.codebook) == (ref.shape, ref.dtype, ref.bits,
                                                               ref.codebook)
    np.testing.assert_array_equal(np.asarray(got.codes), np.asarray(ref.codes))
    np.testing.assert_array_equal(np.asarray(got.absmax), np.asarray(ref.absmax))
    deq = B.dequantize_blockwise(ref, interpret=True, tile_elems=tile)
    want = B.dequantize_blockwise_reference(ref)
    assert deq.dtype == want.dtype == dtype
    np.testing.assert_array_equal(np.asarray(deq, np.float32), np.asarray(want, np.float32))
    # A real round trip: every element within the largest codebook gap times the largest scale.
    gap = np.max(np.diff(np.sort(np.asarray(cb))))
    err = np.abs(np.asarray(deq, np.float32) - np.asarray(x, np.float32))
    assert err.max() <= np.asarray(ref.absmax).max() * gap


def test_nonfinite_blocks_and_zero_blocks_like_reference():
    x = jnp.zeros((2, 512)).at[0, 3].set(jnp.nan).at[1, 300].set(jnp.inf).at[1, 5].set(2.0)
    cb = Q.dynamic_codebook()
    ref = B.quantize_blockwise_reference(x, codebook=cb, block_size=256)
    got = B.quantize_blockwise(x, codebook=cb, block_size=256, interpret=True)
    a = np.asarray(got.absmax)
    assert np.isnan(a[0, 0]) and a[0, 1] == 0 and a[1, 0] == 2.0 and np.isnan(a[1, 1])
    np.testing.assert_array_equal(a, np.asarray(ref.absmax))
    np.testing.assert_array_equal(np.asarray(got.codes), np.asarray(ref.codes))


def test_jit_and_kernel_inside_jit():
    cb = Q.adam4bit_first_moment_codebook()
    x = _data((5, 200), jnp.float32, False, seed=3)
    f = jax.jit(lambda v: B.dequantize_blockwise(
        B.quantize_blockwise(v, codebook=cb, block_size=128, interpret=True), interpret=True))
    want = Q.dequantize_blockwise(Q.quantize_blockwise(x, codebook=cb, block_size=128))
    np.testing.assert_array_equal(np.asarray(f(x)), np.asarray(want))


def test_dequantize_reads_bfloat16_scales_like_reference():
    cb = Q.nf4_codebook()
    q = Q.quantize_blockwise(_data((4, 300), jnp.float32, False, seed=4), codebook=cb,
                             block_size=64, scale_dtype=jnp.bfloat16)
    assert q.absmax.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(B.dequantize_blockwise(q, interpret=True)),
                                  np.asarray(Q.dequantize_blockwise(q)))


def test_dequantize_custom_vjp_equals_reference_grad():
    cb = Q.dynamic_codebook()
    q = Q.quantize_blockwise(_data((3, 300), jnp.float32, False, seed=5), codebook=cb,
                             block_size=256)
    w = _data((3, 300), jnp.float32, False, seed=9)

    def loss(absmax, fn):
        qq = Q.QuantizedArray(codes=q.codes, absmax=absmax, shape=q.shape, dtype=q.dtype,
                              block_size=q.block_size, codebook=q.codebook, bits=q.bits)
        return jnp.sum(fn(qq) * w)

    g_ref = jax.grad(loss)(q.absmax, Q.dequantize_blockwise)
    g_ker = jax.grad(loss)(q.absmax, lambda t: B.dequantize_blockwise(t, interpret=True))
    np.testing.assert_array_equal(np.asarray(g_ker), np.asarray(g_ref))
    assert float(jnp.abs(g_ref).sum()) > 0


def test_bad_inputs_name_shape_and_dtype():
    cb = Q.dynamic_codebook()
    with pytest.raises(TypeError, match=r"int32.*\(3, 4\)"):
        B.quantize_blockwise(jnp.zeros((3, 4), jnp.int32), codebook=cb)
    with pytest.raises(ValueError, match=r"shape \(\)"):
        B.quantize_blockwise(jnp.float32(1.0), codebook=cb)
    with pytest.raises(ValueError, match="block_size"):
        B.quantize_blockwise(jnp.zeros((3, 4)), codebook=cb, block_size=0)
    with pytest.raises(TypeError, match="QuantizedArray"):
        B.dequantize_blockwise(jnp.zeros(3))
