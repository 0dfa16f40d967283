"""pallas_kernels.dequant_matmul: the QLoRA forward kernel (interpret mode) against its jnp
reference, the reference against a plain numpy dequantization of bitsandbytes' 4-bit layout,
gradients against jax.grad of the reference, bad shapes, and the Triton lowering for CUDA.

Tolerance of kernel vs reference: both form the same float32 products ``x_k W_kn`` (the
dequantized tiles are bit-identical to the reference's dense W, and bf16/f16 products are exact
in float32) and differ only in the order of the float32 sums (the kernel adds tiles of
``block_k``, XLA's dot has its own order). For any summation order of n terms,
``|fl(sum) - sum| <= gamma_n sum |terms|`` with ``gamma_n = n u / (1 - n u)``, ``u = 2**-24``
(Higham, Accuracy and Stability of Numerical Algorithms, 4.2), so the two results differ by at
most ``2 gamma_{K+r+1} (|x| |W| + |s| |(xA)_c| |B|)``, element by element. A wrong nibble
order, scale block or tile offset moves results by O(|y|), far outside that bound.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.quant import fp4_codebook, nf4_codebook
from pallas_kernels import blockwise as B
from pallas_kernels import dequant_matmul as D

U32 = 2.0**-24
NF4 = np.asarray(nf4_codebook(), np.float32)
FP4 = np.asarray(fp4_codebook(), np.float32)


def _operands(lead, k, n, bs, r, dtype, seed=0, table=NF4):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(lead + (k,)).astype(np.float32)
    codes = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)  # every byte value
    absmax = rng.uniform(0.25, 2.0, (n, k // bs)).astype(np.float32)
    ops = dict(x=jnp.asarray(x, dtype), codes=jnp.asarray(codes), absmax=jnp.asarray(absmax),
               table=jnp.asarray(table))
    if r:
        ops["lora_a"] = jnp.asarray(rng.standard_normal((k, r)) * 0.3, dtype)
        ops["lora_b"] = jnp.asarray(rng.standard_normal((r, n)), dtype)
    return ops


def _numpy_weight(codes, absmax, table, bs):
    """bitsandbytes' 4-bit layout dequantized plainly: W^T[n, 2j] is the high nibble of byte
    (n, j), W^T[n, 2j+1] the low one; value = table[code] * absmax[n, k // bs] in float32.
    Returns W = (W^T)^T, (K, N)."""
    codes = np.asarray(codes)
    n, half = codes.shape
    idx = np.empty((n, 2 * half), np.int64)
    idx[:, 0::2] = codes >> 4  # high nibble first
    idx[:, 1::2] = codes & 0x0F
    scale = np.repeat(np.asarray(absmax, np.float32), bs, axis=1)
    wt = np.asarray(table, np.float32)[idx] * scale  # float32 product, as specified
    return wt.T


def _bound(ops, bs, scale, dt):
    """2 gamma_{K+r+1} (|x| |W| + |s| |(xA)_c| |B|) in float64, (M, N)."""
    x = np.asarray(ops["x"], np.float64).reshape(-1, ops["x"].shape[-1])
    w = _numpy_weight(ops["codes"], ops["absmax"], ops["table"], bs).astype(dt)
    mag = np.abs(x) @ np.abs(np.asarray(w, np.float64))
    n_terms = x.shape[1] + 1
    if "lora_a" in ops:
        xa = np.asarray(jnp.dot(ops["x"].reshape(x.shape), ops["lora_a"],
                                preferred_element_type=jnp.float32).astype(dt), np.float64)
        mag = mag + abs(scale) * np.abs(xa) @ np.abs(np.asarray(ops["lora_b"], np.float64))
        n_terms += ops["lora_a"].shape[1]
    g = n_terms * U32 / (1 - n_terms * U32)
    return 2 * g * mag


def _flat(y):
    return np.asarray(y, np.float64).reshape(-1, y.shape[-1])


# ----------------------------------------------------------------------------- reference

@pytest.mark.parametrize("table", [NF4, FP4], ids=["nf4", "fp4"])
@pytest.mark.parametrize("lora", [False, True])
def test_reference_equals_plain_numpy_dequantization(table, lora):
    bs, scale = 32, 0.75
    ops = _operands((3,), 96, 7, bs, 5 if lora else 0, jnp.float32, seed=1, table=table)
    w = D.dequantize_4bit_weight(ops["codes"], ops["absmax"], ops["table"], block_size=bs)
    w_np = _numpy_weight(ops["codes"], ops["absmax"], table, bs)
    np.testing.assert_array_equal(np.asarray(w), w_np)  # the dequantization is exact
    y = D.dequant_matmul_reference(**ops, block_size=bs, lora_scale=scale)
    x = np.asarray(ops["x"], np.float64)
    want = x @ w_np.astype(np.float64)
    if lora:
        xa = (x @ np.asarray(ops["lora_a"], np.float64)).astype(np.float32)  # (xA)_c, c = f32
        want = want + scale * (xa.astype(np.float64) @ np.asarray(ops["lora_b"], np.float64))
    # the exact sum vs one float32 summation: gamma_n, not 2 gamma_n
    tol = _bound(ops, bs, scale, np.float32) / 2
    assert np.all(np.abs(_flat(y) - want) <= tol)


def test_high_nibble_is_the_even_element():
    # byte 0x1F: element 0 gets code 1, element 1 code 15; absmax per 32-element block
    codes = jnp.full((2, 32), 0x1F, jnp.uint8)
    absmax = jnp.asarray([[1.0, 2.0], [3.0, 4.0]], jnp.float32)
    w = np.asarray(D.dequantize_4bit_weight(codes, absmax, jnp.arange(16.0), block_size=32))
    assert w.shape == (64, 2)
    np.testing.assert_array_equal(w[:4, 0], [1.0, 15.0, 1.0, 15.0])
    np.testing.assert_array_equal(w[32:34, 0], [2.0, 30.0])
    np.testing.assert_array_equal(w[32:34, 1], [4.0, 60.0])


# ----------------------------------------------------------------------------- kernel

# (id, leading dims, K, N, block_size, rank, dtype, kernel kwargs, masked loads in interpret)
CASES = [
    # default (interpret-mode) tiles: one tile over M, N and K; odd N
    ("m1_f32_oddN", (1,), 128, 37, 64, 0, jnp.float32, {}, False),
    # 2 x 3 programs, 4 K steps of 64 > block 32, select lookup
    ("m16_f16_lora_tiles", (16,), 256, 48, 32, 4, jnp.float16,
     dict(block_m=8, block_n=16, block_k=64, lookup=False), False),
    # K steps of 32 < block 128 (a block spans 4 tiles), N and M tails through the GPU's masked
    # loads and stores, gather lookup
    ("b2x3_bf16_lora_oddN_masked", (2, 3), 256, 37, 128, 8, jnp.bfloat16,
     dict(block_m=4, block_n=16, block_k=32, lookup=True), True),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_equals_reference(monkeypatch, case):
    _, lead, k, n, bs, r, dt, kw, masked = case
    monkeypatch.setattr(D, "MASK_IN_INTERPRET", masked)  # the GPU's masked loads/stores
    scale = 0.5
    ops = _operands(lead, k, n, bs, r, dt, seed=k + n)
    y = D.dequant_matmul(**ops, block_size=bs, lora_scale=scale, out_dtype=jnp.float32,
                         interpret=True, **kw)
    ref = D.dequant_matmul_reference(**ops, block_size=bs, lora_scale=scale,
                                     out_dtype=jnp.float32)
    assert y.shape == lead + (n,) and y.dtype == jnp.float32
    err = np.abs(_flat(y) - _flat(ref))
    assert np.all(err <= _bound(ops, bs, scale, np.dtype(dt))), err.max()


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("dt", [jnp.float32, jnp.bfloat16])
def test_gradients_equal_reference_autodiff(dt):
    """d/dx, d/dA, d/dB of <y, g> for a fixed cotangent g: the LoRA cotangents run the
    reference's own expression on the same g (equal); d/dx's base part is the backward kernel
    (dequantizes W^T again, sums over N in tiles, an N tail): the summation-order bound."""
    bs, scale, n = 64, 0.5, 37
    ops = _operands((2, 3), 128, n, bs, 4, dt, seed=7)
    g = jnp.asarray(np.random.default_rng(8).standard_normal((2, 3, n)), dt)
    rest = (ops["codes"], ops["absmax"], ops["table"])

    def loss(fn, **kw):
        def f(x, a, b, absmax):
            y = fn(x, rest[0], absmax, rest[2], block_size=bs, lora_a=a, lora_b=b,
                   lora_scale=scale, **kw)
            return jnp.sum(y.astype(jnp.float32) * g.astype(jnp.float32))
        return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))

    got = loss(D.dequant_matmul, interpret=True, block_m=4, block_n=16, block_k=32)(
        ops["x"], ops["lora_a"], ops["lora_b"], ops["absmax"])
    want = loss(D.dequant_matmul_reference)(ops["x"], ops["lora_a"], ops["lora_b"],
                                            ops["absmax"])
    for a, b in zip(got[:3], want[:3]):
        assert a.dtype == b.dtype == dt and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))  # d/dA
    np.testing.assert_array_equal(np.asarray(got[2]), np.asarray(want[2]))  # d/dB
    # d/dx = g W^T + (LoRA part, identical): N-term sums in another order (+ the final cast
    # to dt: one ulp of dt where the two float32 sums straddle a rounding point)
    w = _numpy_weight(ops["codes"], ops["absmax"], ops["table"], bs).astype(np.dtype(dt))
    mag = np.abs(_flat(g)) @ np.abs(np.asarray(w, np.float64)).T
    gam = (n + 1) * U32 / (1 - (n + 1) * U32)
    ref = _flat(want[0])
    ulp = 0.0 if dt == jnp.float32 else np.abs(ref) * 2.0**-7
    assert np.all(np.abs(_flat(got[0]) - ref) <= 2 * gam * mag + ulp)
    # the quantized base is frozen: zero gradient for absmax in the kernel's custom_vjp
    np.testing.assert_array_equal(np.asarray(got[3]), 0.0)


# ----------------------------------------------------------------------------- bad input

def _bad(**over):
    ops = _operands((2,), 128, 8, 64, 4, jnp.float32)
    ops.update(over)
    return ops


@pytest.mark.parametrize("over,bs,err,match", [
    (dict(x=jnp.zeros((2, 96))), 64, ValueError, r"K = 96 \(shape \(2, 96\)\).*block_size = 64"),
    (dict(x=jnp.zeros((2, 127)), codes=jnp.zeros((8, 63), jnp.uint8)), 64, ValueError,
     "K must be even"),
    (dict(codes=jnp.zeros((8, 128), jnp.uint8)), 64, ValueError, r"codes .*\(N, 64\).*\(8, 128\)"),
    (dict(codes=jnp.zeros((8, 64), jnp.int32)), 64, ValueError, "uint8"),
    (dict(absmax=jnp.zeros((8, 4))), 64, ValueError, r"absmax .*\(8, 2\).*\(8, 4\)"),
    (dict(absmax=jnp.zeros((8, 2), jnp.bfloat16)), 64, ValueError, "bfloat16"),
    (dict(table=jnp.zeros(15)), 64, ValueError, r"table .*\(16,\).*\(15,\)"),
    (dict(lora_a=jnp.zeros((128, 3))), 64, ValueError, r"lora_a .*\(128, 3\) and \(4, 8\)"),
    (dict(lora_b=None), 64, ValueError, "together"),
    (dict(x=jnp.zeros((2, 128), jnp.int32)), 64, TypeError, "int32"),
    ({}, 48, ValueError, "power of two in 32..4096"),
    ({}, 16, ValueError, "power of two in 32..4096"),
])
def test_bad_inputs_raise_naming_shapes(over, bs, err, match):
    ops = _bad(**over)
    for fn in (D.dequant_matmul, D.dequant_matmul_reference):
        with pytest.raises(err, match=match):
            fn(**ops, block_size=bs)


def test_bad_tiles_and_scale_raise():
    ops = _bad()
    with pytest.raises(ValueError, match="block_k = 256 must divide K = 128"):
        D.dequant_matmul(**ops, block_size=64, block_k=256, interpret=True)
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        D.dequant_matmul(**ops, block_size=64, block_n=24, interpret=True)
    with pytest.raises(ValueError, match="Triton"):
        D.dequant_matmul(**ops, block_size=64, block_m=8, interpret=False)
    with pytest.raises(TypeError, match="lora_scale must be a Python number"):
        jax.jit(lambda s: D.dequant_matmul(**ops, block_size=64, lora_scale=s,
                                           interpret=True))(1.0)


# ----------------------------------------------------------------------------- GPU lowering

def test_forward_and_backward_lower_to_triton_for_cuda(monkeypatch):
    """Both kernels (masked N tail, LoRA epilogue, gather lookup, a block spanning tiles)
    lower with Pallas' Triton backend for CUDA (lowered here, not run: no GPU in CI)."""
    monkeypatch.setattr(B, "uses_gpu_asm", lambda interp: not interp)
    ops = _operands((3,), 256, 37, 64, 4, jnp.bfloat16)

    def f(x, a, b):
        y = D.dequant_matmul(x, ops["codes"], ops["absmax"], ops["table"], block_size=64,
                             lora_a=a, lora_b=b, interpret=False, block_k=32)
        return jnp.sum(y.astype(jnp.float32) ** 2)  # squared: the backward needs y

    text = jax.jit(jax.grad(f, argnums=(0, 1, 2))).trace(
        ops["x"], ops["lora_a"], ops["lora_b"]).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 2  # forward + backward kernels
    assert 'name = "dequant_matmul"' in text and 'name = "dequant_matmul_dx"' in text
