"""Weight number formats, bit-compatible with their anchors: bitsandbytes' 4-bit NF4/FP4 with
double quantization, bitsandbytes' int8 per row, torchao's symmetric int4 and GGUF's Q4_1.

Every function here takes the weight in its **row view** ``(rows, K)`` (or flat): the matrix a
PyTorch ``Linear`` stores, ``[out, in]``, with the contraction axis ``K`` last. For a Flax
kernel ``W[in, out]`` that is ``W.T`` (:mod:`effjax.compress` does the transposition for any
kernel layout); blocks and groups run along ``K``.

**4-bit (NF4, FP4), bitsandbytes 0.50's CPU path transcribed.** The row view is flattened
row-major and cut into blocks of ``block_size`` consecutive elements (a last partial block is
a block of its own; blocks cross rows when ``K % block_size != 0``)::

    absmax_b = max |x_i| over block b
    y_i = clip(x_i * (1 / max(absmax_b, 1e-38)), -1, 1)      (last partial block: x_i / a,
                                                              with a = max(absmax_b, 1e-38),
                                                              stored as its absmax)
    q_i = order[#{j : mid_j < y_i}],   mid = float32 midpoints of the sorted table

so ties go to the lower code. Two codes per byte, element ``2j`` in the high nibble; the packed
array is ``ceil(n / 2)`` bytes (bitsandbytes' ``[(n + 1) // 2, 1]``). Dequantize:
``table[q_i] * absmax_b`` in float32, then cast.

**Double quantization** (bitsandbytes' ``compress_statistics=True``): the float32 block scales
``s`` are stored as ``offset = mean(s)`` and the 8-bit codes of ``s - offset`` with the signed
dynamic map in blocks of 256, recovered as ``dyn[c] * nested_absmax + offset``. The codes are
found as bitsandbytes' CPU kernel finds them: ``v = clip(x * (1 / a), -1, 1)``, a table of
65536 bins over ``[-1, 1]`` (bin ``i`` at ``-1 + 2i / 65535``, mapped to the code whose
float32 midpoints bracket it), bin ``trunc((v + 1) * 0.5 * 65535 + 0.5)``; an all-zero block
gets code 0. ``offset`` is a float32 mean, whose last bit depends on the summation order
(PyTorch's differs between CPUs with AVX2 and AVX-512, and CUDA's from both); given the same
offset the codes and nested scales are bit-identical.

**int8 per row** (bitsandbytes' ``int8_vectorwise_quant``, LLM.int8's weight format):
``s_r = max_k |x_rk|``, ``q = round(x * (127 / s_r))`` (half to even), dequantized as
``q * s_r * fl(1/127)``. A zero row gives zero codes.

**int4 with groups.** Symmetric (torchao's ``choose_qparams_affine`` / ``quantize_affine`` with
``MappingType.SYMMETRIC``, range ``[-8, 7]``): ``s = max(max|x| / 7.5, 2**-126)``,
``q = clip(round(x * (1 / s)), -8, 7)``, ``x ~ q s``. Asymmetric (GGUF's ``Q4_1``, llama.cpp's
``quantize_row_q4_1_ref``): ``d = (max x - min x) / 15``, ``q = min(15, trunc((x - min x)
(1 / d) + 1/2))`` (``1/d := 0`` when ``d = 0``), ``x ~ q d + min x``, with ``d`` and
``min x`` stored in ``scale_dtype`` (GGUF: float16, codes found with the float32 ``d``).
Groups of ``group`` consecutive elements along each row (a last group shorter than ``group``
is a group of its own: SmolLM2's ``K = 576`` in groups of 128 is 4 groups and one of 64;
torchao and GGUF require ``K % group == 0`` and agree exactly where it holds).

References: Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", NeurIPS 2023;
Dettmers et al., "LLM.int8()", NeurIPS 2022; bitsandbytes ``functional.quantize_4bit``,
``backends/default/ops.py``, ``csrc/cpu_ops.cpp``; torchao ``quant_primitives.py``;
ggml ``quantize_row_q4_1_ref``.

Example:
  >>> import jax.numpy as jnp
  >>> x = jnp.linspace(-1.0, 1.0, 128).reshape(2, 64)
  >>> packed, absmax = quantize_4bit(x, kind="nf4", block_size=64)
  >>> packed.shape, absmax.shape
  ((64,), (2,))
  >>> y = dequantize_4bit(packed, absmax, kind="nf4", block_size=64, n=128).reshape(2, 64)
  >>> bool(jnp.abs(y - x).max() < 0.15)  # half the widest NF4 gap (0.72 .. 1.0)
  True
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from effjax.quant import _layout
from effjax.quant.codebooks import dynamic_codebook, fp4_codebook, nf4_codebook

__all__ = ["FOUR_BIT_KINDS", "four_bit_table", "quantize_4bit", "dequantize_4bit",
           "double_quantize", "double_dequantize", "quantize_int8_rows",
           "dequantize_int8_rows", "quantize_int4_groups", "dequantize_int4_groups",
           "pack_nibbles", "unpack_nibbles", "replicated_if_explicit", "DOUBLE_QUANT_BLOCK"]

#: The 4-bit tables bitsandbytes names ``quant_type``.
FOUR_BIT_KINDS = ("nf4", "fp4")
#: Block size of the nested (double) quantization of the scales.
DOUBLE_QUANT_BLOCK = 256
_TINY = np.float32(1e-38)  # bitsandbytes' clamp of a block maximum before dividing by it
_LUT_BINS = 65536


def replicated_if_explicit(x: jax.Array) -> jax.Array:
    """``x`` gathered (replicated on its mesh) when its type is sharded over Explicit mesh
    axes, else ``x``: the row view's transposes and reshapes would need output shardings JAX
    cannot infer there. Quantizing a weight is a one-time step; its arrays come out
    replicated."""
    if _layout.explicit_spec(x) is None:
        return x
    return jax.sharding.reshard(x, NamedSharding(jax.typeof(x).sharding.mesh, PartitionSpec()))


def _divide(x: jax.Array, d) -> jax.Array:
    """``x / d`` correctly rounded: XLA turns a division by a constant into a multiplication
    by its rounded reciprocal (one ulp off for some ``x``), also for a broadcast scalar; a
    full array behind a barrier keeps the division."""
    return x / jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(d, jnp.float32), x.shape))


def four_bit_table(kind: str) -> np.ndarray:
    """bitsandbytes' 16 code values of ``kind`` (``"nf4"`` or ``"fp4"``), float32, in code order.

    Example:
      >>> float(four_bit_table("nf4")[7]), float(four_bit_table("fp4")[3])
      (0.0, 1.0)
    """
    if kind not in FOUR_BIT_KINDS:
        raise ValueError(f"a 4-bit kind is 'nf4' or 'fp4', got {kind!r}")
    table = np.asarray(nf4_codebook() if kind == "nf4" else fp4_codebook(), np.float32)
    return table + np.float32(0.0)  # FP4's code 8 is -0.0 in effjax's codebook, 0.0 in bnb's


@functools.cache
def _bounds(kind: str) -> tuple[np.ndarray, np.ndarray]:
    table = four_bit_table(kind)
    order = np.argsort(table, kind="stable")  # FP4's two zeros: code 0, then code 8 (as bnb)
    s = table[order]
    return ((s[:-1] + s[1:]) / np.float32(2)).astype(np.float32), order.astype(np.uint8)


def pack_nibbles(q: jax.Array) -> jax.Array:
    """Flat 4-bit codes -> bytes, two per byte, element ``2j`` in the high nibble (an odd
    count is padded with a zero code)."""
    q = jnp.ravel(q).astype(jnp.uint8)
    if q.size % 2:
        q = jnp.pad(q, (0, 1))
    return jnp.left_shift(q[0::2], 4) | q[1::2]


def unpack_nibbles(packed: jax.Array, n: int) -> jax.Array:
    """Inverse of :func:`pack_nibbles`: the first ``n`` codes, flat, uint8."""
    packed = jnp.ravel(packed)
    both = jnp.stack([jnp.right_shift(packed, 4), jnp.bitwise_and(packed, 15)], axis=-1)
    return both.reshape(-1)[:n]


def _block_max(xb: jax.Array) -> jax.Array:
    # NaN where a block holds NaN or inf, tested on the elements: XLA:CPU's reduce-max drops
    # NaN in inputs of >= 4096 elements (openxla/xla#21461)
    m = jnp.max(jnp.abs(xb), axis=-1)
    return jnp.where(jnp.all(jnp.isfinite(xb), axis=-1), m, jnp.nan)


def quantize_4bit(x: jax.Array, *, kind: str = "nf4", block_size: int = 64):
    """bitsandbytes' ``quantize_4bit`` of ``x`` flattened row-major (see the module docstring).

    Args:
      x: a float array in the row view (``W.T`` for a Flax kernel ``W[in, out]``).
      kind: ``"nf4"`` or ``"fp4"``.
      block_size: elements per block (bitsandbytes accepts 32 .. 4096, powers of two).

    Returns:
      ``(packed, absmax)``: uint8 ``(ceil(n / 2),)`` and float32 ``(ceil(n / block_size),)``.
    """
    mids, order = _bounds(kind)
    flat = jnp.ravel(x).astype(jnp.float32)
    n = flat.size
    full = n - n % block_size
    scales, scaled = [], []
    if full:
        xb = flat[:full].reshape(-1, block_size)
        a = _block_max(xb)
        scales.append(a)
        scaled.append(jnp.clip(xb * (1.0 / jnp.maximum(a, _TINY))[:, None], -1, 1).ravel())
    if n > full:
        tail = flat[full:]
        a = jnp.maximum(_block_max(tail[None])[0], _TINY)
        scales.append(a[None])
        scaled.append(jnp.clip(_divide(tail, a), -1, 1))
    if not scales:
        return jnp.zeros((0,), jnp.uint8), jnp.zeros((0,), jnp.float32)
    y = jnp.concatenate(scaled)
    if n % 2:  # bitsandbytes pads the scaled values, so the pad gets the code of 0.0
        y = jnp.pad(y, (0, 1))
    idx = jnp.sum(y[:, None] > jnp.asarray(mids), axis=-1)
    q = jnp.asarray(order)[idx]
    return pack_nibbles(q), jnp.concatenate(scales)


def dequantize_4bit(packed: jax.Array, absmax: jax.Array, *, kind: str = "nf4",
                    block_size: int = 64, n: int, dtype=jnp.float32) -> jax.Array:
    """Inverse of :func:`quantize_4bit`: ``table[q] * absmax`` in float32, flat ``(n,)``, cast
    to ``dtype`` (bitsandbytes' ``dequantize_4bit``)."""
    vals = jnp.asarray(four_bit_table(kind))[unpack_nibbles(packed, n)]
    full = n - n % block_size
    out = []
    if full:
        nb = full // block_size
        out.append((vals[:full].reshape(nb, block_size) * absmax[:nb, None]).ravel())
    if n > full:
        out.append(vals[full:] * absmax[-1])
    return (jnp.concatenate(out) if out else vals).astype(dtype)


@functools.cache
def _dq_lut() -> np.ndarray:
    code = np.asarray(dynamic_codebook(signed=True), np.float32)
    mids = (np.float32(0.5) * (code[:-1] + code[1:])).astype(np.float32)
    i = np.arange(_LUT_BINS, dtype=np.float32)
    val = (np.float32(-1.0) + (np.float32(2.0) * i) / np.float32(_LUT_BINS - 1)).astype(np.float32)
    return np.searchsorted(mids, val, side="left").astype(np.uint8)


def _mean(x: jax.Array) -> jax.Array:
    """float32 mean summed in chunks of 256, then over the chunks (within ~1.2 ulp of the
    exact mean; a plain float32 reduction drifts to ~2 ulp on long vectors)."""
    n = x.size
    chunks = jnp.pad(x, (0, -n % 256)).reshape(-1, 256).sum(axis=1)
    return chunks.sum() / n


def double_quantize(scales: jax.Array, offset: jax.Array | None = None):
    """bitsandbytes' double quantization of float32 block scales (module docstring).

    ``offset`` (default: the mean of ``scales``) may be given, e.g. to requantize with a
    checkpoint's own offset.

    Returns:
      ``(codes, nested_absmax, offset)``: uint8 of ``scales``' shape, float32
      ``(ceil(n / 256),)`` over the flattened scales, and a float32 scalar.
    """
    s = jnp.asarray(scales, jnp.float32)
    flat = s.ravel()
    n = flat.size
    offset = _mean(flat) if offset is None else jnp.asarray(offset, jnp.float32)
    x = flat - offset
    nb = -(-n // DOUBLE_QUANT_BLOCK)
    xb = jnp.pad(x, (0, nb * DOUBLE_QUANT_BLOCK - n)).reshape(nb, DOUBLE_QUANT_BLOCK)
    a = _block_max(xb)  # the zero padding never changes a block's maximum
    inv = jnp.where(a > 0, 1.0 / jnp.where(a > 0, a, 1.0), 0.0)
    v = jnp.clip(xb * inv[:, None], -1, 1)
    b = ((v + 1.0) * 0.5) * np.float32(_LUT_BINS - 1) + 0.5
    codes = jnp.asarray(_dq_lut())[jnp.clip(b, 0, _LUT_BINS - 1).astype(jnp.int32)]
    codes = jnp.where((a > 0)[:, None], codes, 0).astype(jnp.uint8)
    return codes.ravel()[:n].reshape(s.shape), a, offset


def double_dequantize(codes: jax.Array, nested_absmax: jax.Array, offset: jax.Array) -> jax.Array:
    """Inverse of :func:`double_quantize`: ``dyn[c] * nested_absmax[i // 256] + offset``."""
    dyn = jnp.asarray(np.asarray(dynamic_codebook(signed=True), np.float32))
    flat = codes.ravel()
    n = flat.size
    nb = nested_absmax.shape[0]
    vals = jnp.pad(dyn[flat], (0, nb * DOUBLE_QUANT_BLOCK - n)).reshape(nb, -1)
    # bitsandbytes rounds the product, then the sum. Eagerly (op by op) so do we; compiled,
    # XLA:CPU may fuse the two into one FMA (1 ulp off in some blocks; the codes are unchanged)
    out = (vals * nested_absmax[:, None]).ravel()[:n] + offset
    return out.reshape(codes.shape)


def quantize_int8_rows(x: jax.Array):
    """bitsandbytes' ``int8_vectorwise_quant`` (no outliers) of a 2-D row view ``(R, K)``.

    Returns ``(q int8 (R, K), row_absmax float32 (R,))``."""
    xf = jnp.asarray(x).astype(jnp.float32)
    s = _block_max(xf)
    q = jnp.round(xf * jnp.where(s > 0, 127.0 / jnp.where(s > 0, s, 1.0), 0.0)[:, None])
    return jnp.clip(q, -127, 127).astype(jnp.int8), s


def dequantize_int8_rows(q: jax.Array, row_absmax: jax.Array, dtype=jnp.float32) -> jax.Array:
    """``q * s * fl(1/127)`` in float32 (bitsandbytes' ``int8_vectorwise_dequant``), cast."""
    out = (q.astype(jnp.float32) * row_absmax[:, None]) * np.float32(7.874015718698502e-3)
    return out.astype(dtype)


def quantize_int4_groups(x: jax.Array, *, group: int, symmetric: bool = True,
                         scale_dtype=jnp.float32):
    """int4 codes of a 2-D row view ``(R, K)`` in groups of ``group`` along ``K`` (a last
    group shorter than ``group`` is a group of its own, with its own scale).

    Returns ``(codes uint8 (R, K) in 0..15, scales (R, ceil(K / group)), mins or None)``:
    symmetric codes are ``q + 8``; ``mins`` (asymmetric) are stored in ``scale_dtype`` like the
    scales.
    """
    xf = jnp.asarray(x).astype(jnp.float32)
    r, k = xf.shape
    pad = -k % group
    if pad:  # repeat each row's last element: a group's max, min and max |x| stay its own
        xf = jnp.pad(xf, ((0, 0), (0, pad)), mode="edge")
    xg = xf.reshape(r, -1, group)
    finite = jnp.all(jnp.isfinite(xg), axis=-1)
    if symmetric:
        s = jnp.maximum(_divide(jnp.max(jnp.abs(xg), axis=-1), 7.5),
                        np.float32(np.finfo(np.float32).tiny))
        s = jnp.where(finite, s, jnp.nan)
        q = jnp.clip(jnp.round(xg * (1.0 / s)[..., None]), -8, 7) + 8
        return q.astype(jnp.uint8).reshape(r, -1)[:, :k], s.astype(scale_dtype), None
    lo, hi = jnp.min(xg, axis=-1), jnp.max(xg, axis=-1)
    d = jnp.where(finite, _divide(hi - lo, 15.0), jnp.nan)
    inv = jnp.where(d == 0, 0.0, 1.0 / jnp.where(d == 0, 1.0, d))
    q = jnp.clip(jnp.trunc((xg - lo[..., None]) * inv[..., None] + np.float32(0.5)), 0, 15)
    q = jnp.where(jnp.isfinite(q), q, 0)
    return (q.astype(jnp.uint8).reshape(r, -1)[:, :k], d.astype(scale_dtype),
            lo.astype(scale_dtype))


def dequantize_int4_groups(codes: jax.Array, scales: jax.Array, mins: jax.Array | None,
                           dtype=jnp.float32, *, group: int | None = None) -> jax.Array:
    """Inverse of :func:`quantize_int4_groups` in float32, cast to ``dtype`` (``group``:
    needed when ``K`` is not a multiple of it; default ``K / scales.shape[-1]``)."""
    r, k = codes.shape
    g = k // scales.shape[-1] if group is None else group
    pad = scales.shape[-1] * g - k
    q = jnp.pad(codes, ((0, 0), (0, pad))) if pad else codes
    q = q.astype(jnp.float32).reshape(r, -1, g)
    s = scales.astype(jnp.float32)[..., None]
    out = (q - 8.0) * s if mins is None else q * s + mins.astype(jnp.float32)[..., None]
    return out.reshape(r, -1)[:, :k].astype(dtype)
