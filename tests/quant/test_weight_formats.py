"""effjax.quant.weights against its anchors run on the same inputs (CPU): bitsandbytes 0.50
(``quantize_4bit`` / ``dequantize_4bit`` with and without double quantization,
``int8_vectorwise_quant``), torchao's affine int4 primitives and gguf-py's Q4_1, plus numpy
transcriptions written here. Every comparison is exact (bytes, or float32 values)."""

import bitsandbytes.functional as bnbf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from bitsandbytes.backends.default import ops as bnb_default

from effjax.quant import weights as wq

pytestmark = pytest.mark.peer

# (shape of the row view, block): partial last blocks, odd element counts, rows shorter than a
# block (blocks cross rows), a single element.
CASES = [((64, 33), 32), ((7, 100), 64), ((3, 129), 128), ((5, 1), 256), ((12, 256), 64),
         ((7, 100), 256), ((12, 256), 128), ((3, 129), 32)]

_quantize = jax.jit(wq.quantize_4bit, static_argnames=("kind", "block_size"))
_dequantize = jax.jit(wq.dequantize_4bit, static_argnames=("kind", "block_size", "n"))
_double = jax.jit(wq.double_quantize)


def _bnb(x, kind, block, dq):
    return bnbf.quantize_4bit(torch.from_numpy(x), blocksize=block, compress_statistics=dq,
                              quant_type=kind)


def _np_dequant(packed, absmax, kind, block, n):
    """bitsandbytes' format written plainly: high nibble first, table value times absmax."""
    b = np.asarray(packed).ravel()
    q = np.stack([b >> 4, b & 15], axis=-1).ravel()[:n]
    return wq.four_bit_table(kind)[q] * np.repeat(np.asarray(absmax), block)[:n]


@pytest.mark.parametrize("kind", wq.FOUR_BIT_KINDS)
def test_4bit_bytes_and_absmax_equal_bitsandbytes(kind):
    rng = np.random.default_rng(0)
    for shape, block in CASES:
        x = rng.standard_normal(shape).astype(np.float32)
        packed, state = _bnb(x, kind, block, dq=False)
        ours, absmax = _quantize(jnp.asarray(x), kind=kind, block_size=block)
        np.testing.assert_array_equal(np.asarray(ours), packed.numpy().ravel())
        np.testing.assert_array_equal(np.asarray(absmax), state.absmax.numpy())
        deq = np.asarray(_dequantize(ours, absmax, kind=kind, block_size=block, n=x.size))
        np.testing.assert_array_equal(deq, _np_dequant(packed, state.absmax, kind, block, x.size))


def test_4bit_dequantize_equals_bitsandbytes():
    x = np.random.default_rng(1).standard_normal((12, 256)).astype(np.float32)
    for kind in wq.FOUR_BIT_KINDS:
        packed, state = _bnb(x, kind, 64, dq=False)
        ours, absmax = _quantize(jnp.asarray(x), kind=kind, block_size=64)
        deq = np.asarray(_dequantize(ours, absmax, kind=kind, block_size=64, n=x.size))
        np.testing.assert_array_equal(deq, bnbf.dequantize_4bit(packed, state).numpy().ravel())
    # rows shorter than a block: bnb's native CPU dequantize is wrong there (values off by up
    # to 1.7 for (300, 64) at block 128; its generic torch path and the numpy one above agree
    # with each other and with us)
    x = np.random.default_rng(2).standard_normal((30, 64)).astype(np.float32)
    packed, state = _bnb(x, "nf4", 128, dq=False)
    ours, absmax = _quantize(jnp.asarray(x), kind="nf4", block_size=128)
    deq = np.asarray(_dequantize(ours, absmax, kind="nf4", block_size=128, n=x.size))
    ref = bnb_default._dequantize_4bit_compute(packed.ravel(), state.absmax, state.code, 128,
                                               x.shape, torch.float32)
    np.testing.assert_array_equal(deq, ref.numpy().ravel())


@pytest.mark.parametrize("kind", wq.FOUR_BIT_KINDS)
def test_double_quantization_equals_bitsandbytes(kind):
    rng = np.random.default_rng(3)
    for shape, block in [((64, 33), 32), ((300, 64), 64), ((48, 512), 64), ((7, 100), 256)]:
        x = (rng.standard_normal(shape) * rng.uniform(0.01, 3, (shape[0], 1))).astype(np.float32)
        packed, state = _bnb(x, kind, block, dq=True)
        ours, absmax = _quantize(jnp.asarray(x), kind=kind, block_size=block)
        np.testing.assert_array_equal(np.asarray(ours), packed.numpy().ravel())
        codes, nested, offset = _double(absmax)
        # the offset is a float32 mean in both, summed in different orders (PyTorch's order
        # depends on the CPU's vector width): each within 1.5 ulp of the exact mean
        exact = np.asarray(absmax, np.float64).mean()
        ulp = np.spacing(np.float32(exact))
        assert abs(float(offset) - exact) <= 1.5 * ulp
        assert abs(state.offset.item() - exact) <= 1.5 * ulp
        # with bnb's offset, the nested codes and maxima are bit-identical
        codes, nested, offset = _double(absmax, state.offset.item())
        np.testing.assert_array_equal(np.asarray(codes), state.absmax.numpy())
        np.testing.assert_array_equal(np.asarray(nested), state.state2.absmax.numpy())
        scales = wq.double_dequantize(codes, nested, offset)
        deq = np.asarray(_dequantize(ours, scales, kind=kind, block_size=block, n=x.size))
        bnb_scales = (state.state2.code.numpy()[state.absmax.numpy()]
                      * np.repeat(state.state2.absmax.numpy(), 256)[:state.absmax.numel()]
                      + state.offset.item())
        np.testing.assert_array_equal(np.asarray(scales), bnb_scales)
        np.testing.assert_array_equal(deq, _np_dequant(packed, bnb_scales, kind, block, x.size))


def test_double_quant_codes_follow_bitsandbytes_lookup_table_not_nearest():
    # values within 2e-5 of the offset: bnb's 65536-bin table picks a code that is not the
    # nearest dynamic-map value; we reproduce its choice, byte for byte
    rng = np.random.default_rng(0)
    s = np.float32(1.0) + rng.uniform(-1e-5, 1e-5, 600).astype(np.float32)
    s[0], s[1] = 2.0, 0.0
    q, st = bnbf.quantize_blockwise(torch.from_numpy(s - s.mean(dtype=np.float32)), blocksize=256)
    codes, nested, _ = wq.double_quantize(jnp.asarray(s), s.mean(dtype=np.float32))
    np.testing.assert_array_equal(np.asarray(codes), q.numpy())
    np.testing.assert_array_equal(np.asarray(nested), st.absmax.numpy())


def test_all_zero_blocks_decode_to_zero_and_pad_code_is_zero_value():
    x = np.zeros((4, 128), np.float32)
    x[1] = np.linspace(-1, 1, 128)
    for kind in wq.FOUR_BIT_KINDS:
        packed, state = _bnb(x, kind, 64, dq=False)
        ours, absmax = _quantize(jnp.asarray(x), kind=kind, block_size=64)
        deq = _dequantize(ours, absmax, kind=kind, block_size=64, n=x.size)
        np.testing.assert_array_equal(np.asarray(deq),
                                      _np_dequant(packed, state.absmax, kind, 64, x.size))
        assert not np.asarray(deq).reshape(4, 128)[[0, 2, 3]].any()
    odd, _ = wq.quantize_4bit(jnp.ones(3), kind="nf4", block_size=32)  # pad: NF4's 0 is code 7
    assert np.asarray(odd)[-1] == (15 << 4) | 7


def test_partial_block_divides_like_bitsandbytes():
    # bnb scales full blocks by x * (1 / a) but the partial last block by x / a; pick values
    # where the two roundings differ and land on different sides of an NF4 midpoint
    mids, _ = wq._bounds("nf4")
    a = np.float32(3.0)
    cand = (mids.astype(np.float64)[:, None] * a + np.arange(-40, 41) * 1e-7 * a).ravel()
    cand = cand.astype(np.float32)
    cand = cand[(cand / a > -1) & (cand / a < 1)]
    div_side = (cand / a)[:, None] > mids
    mul_side = (cand * (np.float32(1) / a))[:, None] > mids
    tricky = cand[(div_side != mul_side).any(-1)]
    assert tricky.size > 0
    x = np.concatenate([np.full(64, 0.5, np.float32), [a], tricky]).astype(np.float32)
    packed, _ = _bnb(x, "nf4", 64, dq=False)
    ours, _ = wq.quantize_4bit(jnp.asarray(x), kind="nf4", block_size=64)
    np.testing.assert_array_equal(np.asarray(ours), packed.numpy().ravel())
    jitted, _ = jax.jit(lambda v: wq.quantize_4bit(v, kind="nf4", block_size=64))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(jitted), packed.numpy().ravel())


def test_non_finite_block_decodes_to_nan_only_there():
    x = np.ones((2, 64), np.float32)
    x[1, 3] = np.inf
    ours, absmax = wq.quantize_4bit(jnp.asarray(x), kind="nf4", block_size=64)
    deq = np.asarray(wq.dequantize_4bit(ours, absmax, kind="nf4", block_size=64, n=128))
    assert np.isnan(deq[64:]).all() and (deq[:64] == 1).all()


def test_int8_rows_equal_bitsandbytes_vectorwise():
    x = np.random.default_rng(1).standard_normal((9, 70)).astype(np.float32)
    x[4] = 0.0  # a zero row: zero codes (bnb's 127 / 0 gives NaN codes there)
    q, s = wq.quantize_int8_rows(jnp.asarray(x))
    bq, bs, _ = bnbf.int8_vectorwise_quant(torch.from_numpy(x.copy()))
    keep = np.arange(9) != 4
    np.testing.assert_array_equal(np.asarray(q)[keep], bq.numpy()[keep])
    np.testing.assert_array_equal(np.asarray(s), bs.numpy())
    assert not np.asarray(q)[4].any()
    deq = wq.dequantize_int8_rows(q, s)
    ref = bnbf.int8_vectorwise_dequant(torch.from_numpy(np.asarray(q)), torch.from_numpy(
        np.asarray(s)))
    np.testing.assert_array_equal(np.asarray(deq), ref.numpy())


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_symmetric_equals_torchao(group):
    from torchao.quantization.quant_primitives import (
        MappingType,
        choose_qparams_affine,
        dequantize_affine,
        quantize_affine,
    )
    x = torch.randn(24, 256, generator=torch.Generator().manual_seed(group))
    s, z = choose_qparams_affine(x, MappingType.SYMMETRIC, (1, group), torch.int8,
                                 quant_min=-8, quant_max=7)
    q = quantize_affine(x, (1, group), s, z, torch.int8, -8, 7)
    d = dequantize_affine(q, (1, group), s, z, torch.int8, -8, 7)
    for fn in (wq.quantize_int4_groups, jax.jit(wq.quantize_int4_groups,
                                                static_argnames=("group",))):
        codes, scales, mins = fn(jnp.asarray(x.numpy()), group=group)
        assert mins is None
        np.testing.assert_array_equal(np.asarray(scales), s.numpy())
        np.testing.assert_array_equal(np.asarray(codes).astype(np.int32) - 8, q.numpy())
        np.testing.assert_array_equal(np.asarray(wq.dequantize_int4_groups(codes, scales, None)),
                                      d.numpy())


def test_int4_asymmetric_group32_float16_is_gguf_q4_1():
    import gguf
    x = np.random.default_rng(2).standard_normal((16, 96)).astype(np.float32)
    x[3, :32] = 0.25  # a constant group: d = 0
    raw = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q4_1).reshape(-1, 20)
    codes, d, m = wq.quantize_int4_groups(jnp.asarray(x), group=32, symmetric=False,
                                          scale_dtype=jnp.float16)
    f16 = raw[:, :4].copy().view(np.float16)  # each block: d, then min, as float16
    np.testing.assert_array_equal(np.asarray(d).ravel(), f16[:, 0])
    np.testing.assert_array_equal(np.asarray(m).ravel(), f16[:, 1])
    qs = raw[:, 4:]  # GGUF: element j in the low nibble, j + 16 in the high nibble
    gq = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(16, 96)
    np.testing.assert_array_equal(np.asarray(codes), gq)
    np.testing.assert_array_equal(
        np.asarray(wq.dequantize_int4_groups(codes, d, m)),
        gguf.quants.dequantize(raw.reshape(16, -1), gguf.GGMLQuantizationType.Q4_1))
