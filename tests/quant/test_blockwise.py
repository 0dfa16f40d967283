"""Block-wise quantization against bitsandbytes, a brute-force nearest search and exact properties.

Every expected value here comes from bitsandbytes (CPU), numpy written in this file (a
brute-force float64 nearest-code search, the documented block layout), or exact math.
"""

import dataclasses
import functools
import math

import bitsandbytes.functional as bnbf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from effjax import quant
from effjax.quant import (
    QuantizedArray,
    block_layout,
    block_view,
    dequantize_blockwise,
    quantize_blockwise,
    scales_shape,
)

CODEBOOKS = {
    "dyn8": quant.dynamic_codebook(signed=True),
    "nf4": quant.nf4_codebook(),
    "fp4": quant.fp4_codebook(),
    "lin4": quant.linear_codebook(4, signed=True),  # no exact zero
    "dyn8u": quant.dynamic_codebook(signed=False),
    "grid8": np.arange(-4, 4, dtype=np.float32) / 4,  # 8 values: still 4-bit codes
    "lin17": np.linspace(-1, 1, 17, dtype=np.float32),  # 17 values: 8-bit codes
}


# ----------------------------------------------------------------- independent references
def _unpack(codes, n):
    """Documented 4-bit packing: element 2j in the high nibble, 2j+1 in the low nibble."""
    c = np.asarray(codes)
    out = np.empty(c.shape[:-1] + (2 * c.shape[-1],), np.uint8)
    out[..., 0::2], out[..., 1::2] = c >> 4, c & 15
    return out[..., :n]


def _values(codes, cb, shape):
    """Codebook values of the codes (unpacking 4-bit codes)."""
    c = np.asarray(codes)
    return cb[_unpack(c, shape[-1]) if len(cb) <= 16 else c]


def _dists(y, cb, chunk=1 << 14):
    """Brute force over every code in float64: (min distance, how many codes attain it)."""
    y, c = np.asarray(y, np.float64).ravel(), np.asarray(cb, np.float64)
    dmin, nmin = np.empty_like(y), np.empty(y.shape, np.int64)
    for s in range(0, y.size, chunk):
        d = np.abs(y[s:s + chunk, None] - c)
        dmin[s:s + chunk] = d.min(axis=1)
        nmin[s:s + chunk] = (d == dmin[s:s + chunk, None]).sum(axis=1)
    return dmin, nmin


def _view(shape, block):
    """The documented blocking view ``(lead, L)``: the fewest trailing axes reaching ``block``
    are merged into L; if L is not a multiple of the block, g = block / gcd(L, block) rows are
    grouped into one when the axis before divides by g."""
    k, length = 1, shape[-1]
    while length < block and k < len(shape):
        k += 1
        length *= shape[-k]
    lead = tuple(shape[:len(shape) - k])
    g = block // math.gcd(length, block)
    if length % block and lead and lead[-1] % g == 0:
        lead, length = lead[:-1] + (lead[-1] // g,), g * length
    return lead, length


def _normalized(x, block):
    """(y, absmax per element) by the documented layout (:func:`_view`), blocks along its last
    axis, y = x * (1 / absmax) in float32 (0 if absmax=0)."""
    x = np.asarray(x, np.float32)
    lead, length = _view(x.shape, block)
    nb = -(-length // block)
    flat = np.zeros(lead + (nb * block,), np.float32)
    flat[..., :length] = x.reshape(lead + (length,))
    b = flat.reshape(lead + (nb, block))
    absmax = np.abs(b).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(absmax > 0, np.float32(1) / absmax, np.float32(0)).astype(np.float32)
    back = lambda a: a.reshape(lead + (-1,))[..., :length].reshape(x.shape)
    return back(b * inv), back(np.broadcast_to(absmax, b.shape))


def _brackets(y, cb):
    """The sorted codebook values just below and above y (equal on a code or out of range)."""
    s = np.unique(np.asarray(cb, np.float32))
    lo = s[np.clip(np.searchsorted(s, y, side="right") - 1, 0, s.size - 1)]
    hi = s[np.clip(np.searchsorted(s, y, side="left"), 0, s.size - 1)]
    return lo, hi


def _half_gap(y, cb):
    """Half the local codebook gap around y (the distance to the end value outside the range)."""
    lo, hi = (a.astype(np.float64) for a in _brackets(y, cb))
    return np.where(hi > lo, (hi - lo) / 2, np.abs(np.asarray(y, np.float64) - lo))


@functools.cache
def _qd(name, block, rounding="nearest"):
    """Jitted (quantize, dequantize), cached so each input shape compiles once per codebook
    (eager dispatch of the 8-bit path costs seconds per new shape on a slow CPU)."""
    def f(x, key=None):
        q = quantize_blockwise(x, codebook=CODEBOOKS[name], block_size=block,
                               rounding=rounding, key=key)
        return q, dequantize_blockwise(q)
    return jax.jit(f)


# ------------------------------------------------------------------ 1. vs bitsandbytes
def _compare_with_bnb(x, signed):
    cb = CODEBOOKS["dyn8" if signed else "dyn8u"]
    q, _ = _qd("dyn8" if signed else "dyn8u", 256)(jnp.asarray(x))
    b_codes, state = bnbf.quantize_blockwise(torch.from_numpy(x.ravel().copy()),
                                             code=torch.from_numpy(cb.copy()), blocksize=256)
    b_deq = bnbf.dequantize_blockwise(b_codes, state).numpy().ravel()
    b_codes = b_codes.numpy()
    np.testing.assert_array_equal(np.asarray(q.absmax).ravel(), state.absmax.numpy())
    y, _ = _normalized(x, 256)
    dmin, nmin = _dists(y, cb)
    ours = np.asarray(q.codes).ravel()
    d_ours = np.abs(cb[ours].astype(np.float64) - y.ravel())
    d_bnb = np.abs(cb[b_codes].astype(np.float64) - y.ravel())
    assert np.array_equal(d_ours, dmin), "our code is not the nearest"
    agree = (d_bnb == dmin) & (nmin == 1)
    np.testing.assert_array_equal(ours[agree], b_codes[agree])
    # our dequantize of bnb's codes and scales equals bnb's dequantize bit for bit
    qb = QuantizedArray(codes=jnp.asarray(b_codes.reshape(x.shape)), absmax=q.absmax,
                        shape=q.shape, dtype=q.dtype, block_size=256, codebook=q.codebook,
                        bits=8)
    np.testing.assert_array_equal(np.asarray(jax.jit(dequantize_blockwise)(qb)).ravel(), b_deq)
    return d_ours, d_bnb, dmin, b_deq


@pytest.mark.peer
@pytest.mark.parametrize("shape", [(100,), (1000,), (3, 512), (4, 256)])
@pytest.mark.parametrize("signed", [True, False])
def test_matches_bitsandbytes(shape, signed):
    x = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
    x = x if signed else np.abs(x)
    _, d_bnb, dmin, _ = _compare_with_bnb(x, signed)
    assert (d_bnb == dmin).mean() > 0.95  # the code-equality check above is not vacuous


@pytest.mark.peer
def test_tiny_values_nearest_where_bitsandbytes_rounds_up():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((4, 256)) * 1e-6).astype(np.float32)
    x[:, 0] = 1.0  # absmax 1: the rest are ~1e-6 of the block absmax
    d_ours, d_bnb, dmin, b_deq = _compare_with_bnb(x, signed=True)
    tiny = np.abs(x.ravel()) < 2.1e-5
    print(f"\ntiny values: bnb not nearest on {np.mean(d_bnb[tiny] > dmin[tiny]):.1%}, "
          f"bnb |value| there {np.unique(np.abs(b_deq[tiny]))}, "
          f"max error ours {d_ours[tiny].max():.3g} vs bnb {d_bnb[tiny].max():.3g} (x absmax)")
    assert tiny.sum() > 1000 and np.array_equal(d_ours[tiny], dmin[tiny])
    assert d_ours[tiny].max() < 1.5e-6  # nearest codes 5.5e-7 / 3.25e-6 apart


@pytest.mark.peer
def test_bitsandbytes_nearest_rate_standard_normal():
    x = np.random.default_rng(0).standard_normal(2**20).astype(np.float32)
    d_ours, d_bnb, dmin, _ = _compare_with_bnb(x, signed=True)
    frac, extra = np.mean(d_bnb > dmin), (d_bnb - dmin).max()
    print(f"\nbnb code not nearest: {frac:.4%} of 2**20 N(0,1) values; "
          f"largest extra error {extra:.3g} x absmax")
    assert frac < 0.01


# --------------------------------------------------------------- 2. properties (hypothesis)
# (shape, block): 1-D shorter than the block, last axes that are non-multiples of the block,
# trailing axes merged ((3, 5, 40) and (2, 200)). Few pairs, so few compilations.
CASES = [((7,), 64), ((600,), 256), ((3, 100), 64), ((2, 300), 256), ((3, 5, 40), 64),
         ((2, 200), 256)]
_mag = st.floats(float(np.float32(1e-6)), 1e4, width=32)
# Magnitudes in [1e-6, 1e4] or exact zeros keep x, 1/absmax and x/absmax normal floats: XLA
# on CPU flushes subnormals to zero, which numpy (the reference) does not.
_elem = st.one_of(st.just(0.0), _mag, _mag.map(lambda v: -v))


@st.composite
def _arrays(draw):
    shape, block = draw(st.sampled_from(CASES))
    x = draw(hnp.arrays(np.float32, shape, elements=_elem))
    return x, block, draw(st.booleans())


@settings(max_examples=30, deadline=None)
@given(_arrays(), st.sampled_from(["dyn8", "nf4", "fp4", "lin4"]))
def test_roundtrip_bound_nearest_and_zeros(case, name):
    x, block, zero_block = case
    if zero_block:  # in every layout the first `block` elements (C order) form one block
        x = x.copy()
        x.reshape(-1)[:block] = 0
    cb = CODEBOOKS[name]
    q, deq = _qd(name, block)(jnp.asarray(x))
    codes, deq = np.asarray(q.codes), np.asarray(deq)
    y, am = _normalized(x, block)
    d_ours = np.abs(_values(codes, cb, x.shape).astype(np.float64) - y)
    assert np.array_equal(d_ours.ravel(), _dists(y, cb)[0])
    assert deq.dtype == np.float32 and deq.shape == x.shape
    # Exact math gives |x - deq| <= half gap * absmax. y = x * (1/absmax) rounds twice and
    # codebook[c] * absmax once in float32 (each <= 2**-24 relative, |y|, |value| <= 1), so the
    # float32 result may exceed that by ~3 * 2**-24 * absmax; 1e-6 * absmax covers it.
    err = np.abs(deq.astype(np.float64) - x)
    assert np.all(err <= am * (_half_gap(y, cb) + 1e-6))
    assert np.all(deq[am == 0] == 0)  # all-zero blocks: exact zeros whatever the codebook
    if 0.0 in cb:
        assert np.all(deq[x == 0] == 0)


@settings(max_examples=30, deadline=None)
@given(hnp.arrays(np.float32, (3, 100), elements=_elem),
       st.sampled_from([jnp.bfloat16, jnp.float16]), st.sampled_from(["dyn8", "nf4"]))
def test_half_precision_inputs(x32, dtype, name):
    block = 64
    x = jnp.asarray(x32).astype(dtype)
    q, out = _qd(name, block)(x)
    assert out.dtype == dtype and q.dtype == dtype and out.shape == x.shape
    x32 = np.asarray(x.astype(jnp.float32))
    y, am = _normalized(x32, block)
    err = np.abs(np.asarray(out.astype(jnp.float32), np.float64) - x32)
    # plus rounding the float32 result to the 16-bit dtype: half an ulp of |value| <= absmax,
    # i.e. <= eps / 2 * absmax
    slack = 1e-6 + float(jnp.finfo(dtype).eps) / 2
    assert np.all(err <= am * (_half_gap(y, CODEBOOKS[name]) + slack))
    assert np.all(np.asarray(out.astype(jnp.float32))[x32 == 0] == 0)


# ------------------------------------------------------------------------------ 3. layout
@pytest.mark.parametrize("shape,name,block,codes_shape,absmax_shape,axes", [
    ((4, 512), "dyn8", 256, (4, 512), (4, 2), 1),
    ((3, 300), "dyn8", 256, (3, 300), (3, 2), 1),
    ((4, 513), "nf4", 256, (4, 257), (4, 3), 1),
    ((1000,), "fp4", 256, (500,), (4,), 1),
    ((512, 8, 64), "dyn8", 256, (512, 8, 64), (512, 2), 2),
    ((512, 8, 64), "nf4", 256, (512, 8, 32), (512, 2), 2),
    ((2, 255), "dyn8", 256, (2, 255), (2,), 2),
    ((7, 5, 3), "lin4", 64, (7, 5, 2), (2,), 3),
    ((5, 3), "dyn8", 256, (5, 3), (1,), 2),
    ((3, 9), "grid8", 8, (3, 5), (3, 2), 1),
    ((3, 9), "lin17", 8, (3, 9), (3, 2), 1),
    # rows grouped so that blocks are whole: 2 rows of 384 = 3 blocks, 4 rows of 576 = 9
    ((6, 384), "dyn8", 256, (6, 384), (3, 3), 1),
    ((8, 576), "nf4", 256, (8, 288), (2, 9), 1),
    ((2, 4, 8, 48), "dyn8", 256, (2, 4, 8, 48), (2, 2, 3), 2),
    ((8, 2, 3), "lin4", 4, (8, 2, 2), (4, 3), 2),  # odd last axis, 4-bit, grouped
    ((5, 384), "dyn8", 256, (5, 384), (5, 2), 1),  # 5 rows: no whole groups of 2, short blocks
])
def test_layout(shape, name, block, codes_shape, absmax_shape, axes):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    q, _ = _qd(name, block)(jnp.asarray(x))
    assert q.codes.shape == codes_shape and q.codes.dtype == jnp.uint8
    assert q.absmax.shape == absmax_shape and q.absmax.dtype == jnp.float32
    assert q.block_axes == axes and q.bits == (4 if len(CODEBOOKS[name]) <= 16 else 8)
    assert q.nbytes == int(np.prod(codes_shape)) + 4 * int(np.prod(absmax_shape))
    if shape == (512, 8, 64):  # a block = 4 consecutive heads of one row
        ref = np.abs(x).reshape(512, 2, 4 * 64).max(-1)
        np.testing.assert_array_equal(np.asarray(q.absmax), ref)
    if shape in [(6, 384), (8, 576)]:  # grouped rows: bitsandbytes' flat blocks
        ref = np.abs(x).reshape(-1, block).max(-1).reshape(absmax_shape)
        np.testing.assert_array_equal(np.asarray(q.absmax), ref)
    assert block_layout(shape, block)[0] == axes
    assert block_view(shape, block) == absmax_shape[:-1] + (
        int(np.prod(shape)) // int(np.prod(absmax_shape[:-1])),)
    assert scales_shape(shape, block) == absmax_shape


@pytest.mark.parametrize("name", ["dyn8", "dyn8u", "nf4", "fp4", "grid8", "lin17"])
def test_nearest_at_every_decision_boundary(name):
    """Each midpoint of adjacent codes rounded to float32 and its two float32 neighbours: the
    inputs where a threshold off by one ulp picks the farther code. Exact ties go up."""
    cb = CODEBOOKS[name]
    s = np.unique(cb).astype(np.float64)
    mid = ((s[:-1] + s[1:]) / 2).astype(np.float32)
    x = np.concatenate([[1.0], mid, np.nextafter(mid, -np.inf), np.nextafter(mid, np.inf)])
    x = x.astype(np.float32)  # absmax 1, so x / absmax == x
    q, _ = _qd(name, x.size)(jnp.asarray(x))
    v = _values(q.codes, cb, x.shape).astype(np.float64)
    np.testing.assert_array_equal(np.abs(v - x), _dists(x, cb)[0])
    tie = mid == (s[:-1] + s[1:]) / 2  # midpoint exact in float32 (all of grid8 and lin17)
    np.testing.assert_array_equal(v[1:mid.size + 1][tie], s[1:][tie])


@pytest.mark.parametrize("name", ["lin4", "fp4"])
@pytest.mark.parametrize("n", [6, 7])
def test_4bit_packing_order(name, n):
    cb = CODEBOOKS[name]
    rng = np.random.default_rng(n)
    ok = [k for k in range(16) if cb[k] != 0]  # fp4 holds 0 and -0: ambiguous code
    k = rng.choice(ok, size=(3, n))
    k[:, 0] = int(np.argmax(cb))  # value 1.0: every row's absmax is 1, so x / absmax == x
    q = quantize_blockwise(jnp.asarray(cb[k]), codebook=cb, block_size=n)
    kp = np.concatenate([k, np.zeros((3, n % 2), k.dtype)], axis=1)
    np.testing.assert_array_equal(np.asarray(q.codes), (kp[:, 0::2] << 4) | kp[:, 1::2])


# -------------------------------------------------------------------------- 4. non-finite
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", ["dyn8", "nf4"])
def test_nonfinite_block_is_nan_neighbours_untouched(bad, name):
    cb = CODEBOOKS[name]
    x = np.random.default_rng(3).standard_normal(1024).astype(np.float32)
    x[300] = bad  # block 1 of 4
    q, deq = _qd(name, 256)(jnp.asarray(x))
    deq, absmax, codes = np.asarray(deq), np.asarray(q.absmax), np.asarray(q.codes)
    assert np.all(np.isnan(deq[256:512])) and np.isnan(absmax[1])
    per = 256 if len(cb) > 16 else 128  # code bytes per block
    for b in (0, 2, 3):
        alone, alone_deq = _qd(name, 256)(jnp.asarray(x[256 * b:256 * (b + 1)]))
        np.testing.assert_array_equal(codes[per * b:per * (b + 1)], np.asarray(alone.codes))
        np.testing.assert_array_equal(absmax[b:b + 1], np.asarray(alone.absmax))
        np.testing.assert_array_equal(deq[256 * b:256 * (b + 1)], np.asarray(alone_deq))
        assert np.all(np.isfinite(deq[256 * b:256 * (b + 1)]))


# ------------------------------------------------------------------ 5. stochastic rounding
@pytest.mark.parametrize("name", ["dyn8", "nf4"])
def test_stochastic_codes_bracket(name):
    cb = CODEBOOKS[name]
    x = np.random.default_rng(5).standard_normal((4, 256)).astype(np.float32)
    q, _ = _qd(name, 256, "stochastic")(jnp.asarray(x), jax.random.key(7))
    v = _values(q.codes, cb, x.shape)
    y, _ = _normalized(x, 256)
    lo, hi = _brackets(y, cb)
    assert np.all((v == lo) | (v == hi))
    inner = hi > lo
    p = (y[inner].astype(np.float64) - lo[inner]) / (hi[inner] - lo[inner])
    ups = np.sum(v[inner] == hi[inner])  # ~ sum of Bernoulli(p): within 5 sigma
    assert abs(ups - p.sum()) < 5 * np.sqrt(np.sum(p * (1 - p)))


def test_stochastic_is_unbiased():
    cb = CODEBOOKS["lin4"]  # gap 2/15 between codes
    frac = np.array([0.0, 0.1, 0.3, 0.5, 0.7, 0.9])
    lo = cb[np.arange(64) % 15]
    x = (lo + np.tile(frac, 11)[:64] * (2 / 15)).astype(np.float32).reshape(2, 32)
    x[:, 0] = [1.0, -1.0]  # absmax 1 in each block, so x / absmax == x
    keys = jax.random.split(jax.random.key(0), 200)
    sample = lambda k: dequantize_blockwise(quantize_blockwise(
        jnp.asarray(x), codebook=cb, block_size=32, rounding="stochastic", key=k))
    mean = np.asarray(jax.vmap(sample)(keys), np.float64).mean(0)
    b_lo, b_hi = _brackets(x, cb)
    gap = (b_hi - b_lo).astype(np.float64)
    p = np.where(gap > 0, (x.astype(np.float64) - b_lo) / np.where(gap > 0, gap, 1), 0)
    se = gap * np.sqrt(p * (1 - p) / len(keys))
    assert np.all(np.abs(mean - x) <= 5 * se + 1e-6)
    assert abs(np.sum(mean - x)) <= 5 * np.sqrt(np.sum(se**2))  # no bias overall either


@pytest.mark.parametrize("x,kwargs,exc", [
    (np.ones(8, np.float32), dict(rounding="stochastic"), ValueError),
    (np.ones(8, np.float32), dict(rounding="up"), ValueError),
    (np.ones(8, np.float32), dict(block_size=0), ValueError),
    (np.ones(8, np.float32), dict(block_size=-4), ValueError),
    (np.ones(8, np.float32), dict(block_size=2.5), ValueError),
    (np.arange(8, dtype=np.int32), {}, TypeError),
    (np.float32(1.0), {}, ValueError),
    (np.ones(8, np.float32), dict(codebook=[0.5]), ValueError),
    (np.ones(8, np.float32), dict(codebook=np.linspace(-1, 1, 257)), ValueError),
    (np.ones(8, np.float32), dict(codebook=[0.0, np.nan]), ValueError),
])
def test_invalid_arguments(x, kwargs, exc):
    kwargs = dict(dict(codebook=CODEBOOKS["dyn8"], block_size=4), **kwargs)
    with pytest.raises(exc):
        quantize_blockwise(jnp.asarray(x), **kwargs)


def test_dequantize_rejects_non_quantized():
    with pytest.raises(TypeError):
        dequantize_blockwise(jnp.ones(4))


def test_dequantize_rejects_scales_of_another_layout():
    """Scales laid out per row (a short last block each, the layout before rows were grouped)
    would broadcast against the grouped blocks: refused, naming the shapes."""
    q = quantize_blockwise(jnp.ones((4, 384)), codebook=CODEBOOKS["dyn8"], block_size=256)
    assert q.absmax.shape == (2, 3)
    old = dataclasses.replace(q, absmax=jnp.ones((4, 2)))
    with pytest.raises(ValueError, match=r"absmax has shape \(4, 2\).*needs \(2, 3\)"):
        dequantize_blockwise(old)


# -------------------------------------------------------------------- 6. jit and pytrees
def test_jit_and_pytree():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 100)).astype(np.float32))
    cb = CODEBOOKS["nf4"]
    eager = quantize_blockwise(x, codebook=cb, block_size=64)
    jitted = jax.jit(lambda a: quantize_blockwise(a, codebook=cb, block_size=64))(x)
    leaves, treedef = jax.tree.flatten(jitted)
    assert isinstance(jitted, QuantizedArray) and treedef == jax.tree.structure(eager)
    assert [a.shape for a in leaves] == [(3, 50), (3, 2)]  # codes and absmax, nothing else
    for a, b in zip(leaves, jax.tree.leaves(eager)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(jax.jit(dequantize_blockwise)(jitted)),
                                  np.asarray(dequantize_blockwise(eager)))
    # a QuantizedArray as jit argument and result, and through tree.map: metadata survives
    for q in (jax.jit(lambda q: q)(jitted), jax.tree.map(lambda a: a + 0, jitted)):
        assert isinstance(q, QuantizedArray)
        assert (q.shape, q.dtype, q.block_size, q.codebook, q.bits) == (
            (3, 100), jnp.float32, 64, tuple(float(v) for v in cb), 4)
    for cb2, block in [(CODEBOOKS["fp4"], 64), (quant.adam4bit_second_moment_codebook(), 64),
                       (cb, 32)]:  # metadata is static: it is part of the treedef
        other = jax.eval_shape(
            lambda a, c=cb2, b=block: quantize_blockwise(a, codebook=c, block_size=b), x)
        assert jax.tree.structure(other) != treedef


def test_huge_block_absmax_is_not_flushed_to_zero():
    # 1/absmax is subnormal above 2**126 and XLA's CPU flushes it to 0; found by a review.
    x = jnp.array([3e38, 1e38, -2e38, 1e37], jnp.float32)
    q = quantize_blockwise(x, codebook=quant.dynamic_codebook(), block_size=4)
    out = np.asarray(dequantize_blockwise(q))
    assert float(q.absmax[0]) == np.float32(3e38)
    np.testing.assert_allclose(out, np.asarray(x), rtol=0.03)


# ------------------------------------------------------------------- 7. bfloat16 scales
def _bf16_neighbours(a):
    """For float32 a >= 0: (the largest bfloat16 < a, the smallest bfloat16 >= a) as float32,
    found from ml_dtypes' round-to-nearest conversion and one step along the bf16 grid."""
    import ml_dtypes

    a = np.asarray(a, np.float32)
    r = a.astype(ml_dtypes.bfloat16)
    bits = r.view(np.uint16).astype(np.int64)
    r32 = r.astype(np.float32)
    up = np.where(r32 >= a, bits, bits + 1)
    below = (up - 1).clip(0).astype(np.uint16).view(ml_dtypes.bfloat16).astype(np.float32)
    return np.where(up > 0, below, -np.inf), up.astype(np.uint16).view(
        ml_dtypes.bfloat16).astype(np.float32)


def test_round_scale_is_the_smallest_bfloat16_not_below():
    rng = np.random.default_rng(11)
    a = np.concatenate([np.float32(10.0) ** rng.uniform(-37, 38, 4000).astype(np.float32),
                        np.array([0, 1, 1.0078125, 2**-126, 1e-40, 3.3895314e38], np.float32)])
    a = a.astype(np.float32)
    got = np.asarray(quant.round_scale(jnp.asarray(a), jnp.bfloat16).astype(jnp.float32))
    below, up = _bf16_neighbours(a)
    np.testing.assert_array_equal(got, up)
    assert np.all(got >= a) and np.all(below < a)
    normal = a >= 2.0**-126  # relative spacing 2**-7 of normal bfloat16 numbers
    assert np.all(got[normal].astype(np.float64)
                  <= a[normal].astype(np.float64) * (1 + 2.0**-7))
    special = quant.round_scale(jnp.array([np.nan, np.inf, 0.0, 3.4e38], jnp.float32),
                                jnp.bfloat16).astype(jnp.float32)
    assert np.isnan(special[0]) and special[1] == np.inf and special[2] == 0
    assert special[3] == np.float32(jnp.finfo(jnp.bfloat16).max)  # capped, never inf
    assert quant.round_scale(jnp.float32(2.5), jnp.float32) == 2.5  # float32: unchanged


@pytest.mark.parametrize("name,shape,block", [("dyn8", (6, 512), 256), ("dyn8u", (4, 300), 256),
                                              ("nf4", (5, 128), 64), ("lin4", (3, 7, 20), 64)])
def test_bfloat16_scales(name, shape, block):
    """Stored scale = smallest bfloat16 >= the block's absmax; codes are the nearest codes of
    x * (1 / scale); the round trip keeps the half-gap bound with the stored scale."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-20, 20, shape[:-1] + (1,)))
    x = x.astype(np.float32)
    if name == "dyn8u":
        x = np.abs(x)
    x.reshape(-1)[:block] = 0  # an all-zero block
    cb = CODEBOOKS[name]
    q = jax.jit(lambda a: quantize_blockwise(a, codebook=cb, block_size=block,
                                             scale_dtype=jnp.bfloat16))(jnp.asarray(x))
    q32 = quantize_blockwise(jnp.asarray(x), codebook=cb, block_size=block)
    assert q.absmax.dtype == jnp.bfloat16 and q.absmax.shape == q32.absmax.shape
    assert q.codes.shape == q32.codes.shape
    assert q.nbytes == q32.nbytes - 2 * q32.absmax.size
    _, am = _normalized(x, block)  # float32 absmax per element
    s = np.broadcast_to(np.asarray(q.absmax.astype(jnp.float32))[..., None],
                        q.absmax.shape + (block,))
    # the scale per element, by the layout of _normalized
    s_el = _expand_scales(s, x.shape, block)
    np.testing.assert_array_equal(s_el, _bf16_neighbours(am)[1])
    with np.errstate(divide="ignore"):
        inv = np.where(s_el > 0, np.float32(1) / s_el, np.float32(0)).astype(np.float32)
    y = (x * inv).astype(np.float32)
    d_ours = np.abs(_values(q.codes, cb, x.shape).astype(np.float64) - y)
    np.testing.assert_array_equal(d_ours.ravel(), _dists(y, cb)[0])
    deq = np.asarray(dequantize_blockwise(q), np.float64)
    assert np.all(np.abs(deq - x) <= s_el * (_half_gap(y, cb) + 1e-6))
    assert np.all(deq.reshape(-1)[:block] == 0)


def _expand_scales(s, shape, block):
    """Per-block scales ``lead + (nblocks, block)`` -> per element of ``shape`` (the layout)."""
    lead, length = _view(shape, block)
    return np.asarray(s).reshape(lead + (-1,))[..., :length].reshape(shape)


def test_bfloat16_scale_saturates_above_the_largest_bfloat16():
    x = jnp.array([3.4e38, -3.39e38, 1.0, 0.0], jnp.float32)
    q = quantize_blockwise(x, codebook=CODEBOOKS["dyn8"], block_size=4,
                           scale_dtype=jnp.bfloat16)
    big = np.float32(jnp.finfo(jnp.bfloat16).max)
    assert float(q.absmax.astype(jnp.float32)[0]) == big
    out = np.asarray(dequantize_blockwise(q), np.float64)
    assert np.isfinite(out).all() and out[0] == big  # saturated, 0.3% low
    assert np.all(np.abs(out[:2] - np.asarray(x[:2], np.float64))
                  <= 2.0**-7 * np.abs(np.asarray(x[:2], np.float64)))


@pytest.mark.parametrize("bad", [jnp.float16, jnp.int8, "float8"])
def test_scale_dtype_must_be_float32_or_bfloat16(bad):
    with pytest.raises(ValueError, match="scale_dtype"):
        quantize_blockwise(jnp.ones(8), codebook=CODEBOOKS["dyn8"], block_size=4,
                           scale_dtype=bad)


# ------------------------------------------------------- 8. the two lookup strategies agree
@pytest.mark.parametrize("name", sorted(CODEBOOKS))
def test_table_and_gather_free_lookups_agree_with_brute_force(name):
    """``tables=True`` (1-D lookup tables: the CPU default) and ``tables=False`` (closed forms
    and compare chains: what the Pallas kernels run) both find the truly nearest code and
    decode it to the codebook's value, on every decision boundary and its neighbours."""
    from effjax.quant import search

    cb = np.asarray(CODEBOOKS[name], np.float32)
    s = np.unique(cb).astype(np.float64)
    mid = ((s[:-1] + s[1:]) / 2).astype(np.float32)
    rng = np.random.default_rng(7)
    y = np.concatenate([s.astype(np.float32), mid, np.nextafter(mid, -np.inf),
                        np.nextafter(mid, np.inf), rng.uniform(-1, 1, 4096).astype(np.float32),
                        np.float32([0.0, -0.0, 1e-30, -1e-30])])
    if cb.min() >= 0:
        y = np.abs(y)
    vals = tuple(float(v) for v in cb)
    sv = search.sorted_values_of(vals)
    dmin = _dists(y, cb)[0]
    got = {}
    for tables in (True, False):
        idx = search.nearest_sorted(jnp.asarray(y), sv, tables=tables)
        codes = search.to_codes(idx, vals, tables=tables)
        v = np.asarray(search.value_at(codes, vals, tables=tables), np.float64)
        np.testing.assert_array_equal(v, cb[np.asarray(codes)])  # decode == the table
        np.testing.assert_array_equal(np.abs(v - y), dmin)  # nearest
        got[tables] = np.asarray(codes)
    np.testing.assert_array_equal(got[True], got[False])


def test_bad_key_and_hand_built_block_size_are_named():
    """Found by experiments/fuzz_api.py: an int key for stochastic rounding and a hand-built
    QuantizedArray with block_size 0 failed inside JAX (invalid key / ZeroDivisionError)."""
    x = jnp.ones((4, 8))
    with pytest.raises(TypeError, match=r"key must be a PRNG key .* got 42 \(int\)"):
        quantize_blockwise(x, codebook=quant.nf4_codebook(), block_size=8,
                           rounding="stochastic", key=42)
    q = quantize_blockwise(x, codebook=quant.nf4_codebook(), block_size=8)
    with pytest.raises(ValueError, match=r"shape \(4, 8\) has block_size 0"):
        dequantize_blockwise(dataclasses.replace(q, block_size=0))
