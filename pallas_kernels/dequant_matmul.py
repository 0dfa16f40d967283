"""QLoRA's forward as one Pallas kernel: a matmul with a 4-bit block-quantized weight, the
dequantization done tile by tile in registers, plus an optional LoRA term.

The weight format is bitsandbytes' 4-bit layout (NF4 / FP4). A Flax kernel ``W`` of shape
``(K, N)`` (in, out) is stored as its transpose ``W^T`` (``(N, K)``), flattened row-major and
cut into blocks of ``block_size`` consecutive elements; with ``K % block_size == 0`` every row of
``W^T`` holds ``K / block_size`` whole blocks. The arrays are

* ``codes``: uint8 ``(N, K // 2)``, two 4-bit codes a byte, element ``2j`` in the high nibble
  and ``2j + 1`` in the low nibble;
* ``absmax``: float32 ``(N, K // block_size)``, one scale per block;
* ``table``: float32 ``(16,)``, the code values (e.g. ``effjax.quant.nf4_codebook()``),

and the dequantized weight, in float32 and then cast to the compute dtype ``c`` (``x.dtype``):

    W^T[n, k] = c( table[code(n, k)] * absmax[n, k // block_size] )

The kernel computes, accumulating in float32 and casting once at the end:

    y = x W  +  s (x A)_c B          (A: (K, r), B: (r, N); s: ``lora_scale``)

where ``(x A)_c`` is ``x A`` accumulated in float32 and rounded to ``c`` (as a Flax LoRA layer
computing in ``c`` rounds its intermediate). The pure-jnp reference
(:func:`dequant_matmul_reference`) is XLA's dequantize-then-dot: the dense ``W`` materialized,
then ``jnp.dot``.

How the kernel tiles: a program owns a ``(block_m, block_n)`` tile of ``y`` and loops over
``K`` in steps of ``block_k``: it loads ``block_n x block_k / 2`` code bytes, unpacks both
nibbles, looks up the 16 table values (a gather from the 16-entry table compiled on a GPU, a
tree of 15 selects in interpret mode; same values), scales by the block's absmax and contracts
with the ``(block_m, block_k)`` tile of ``x`` in float32. The LoRA term enters in the epilogue:
``(x A)_c`` (``(M, r)``, small) is computed by XLA, and the kernel adds ``s (x A)_c B`` for its
tile of ``B`` before the single store. The dense weight never exists in memory.

Differentiation (``jax.custom_vjp``): gradients flow to ``x``, ``lora_a`` and ``lora_b``. The
quantized base is frozen: ``codes``, ``absmax`` and ``table`` get zero cotangents, as if under
``jax.lax.stop_gradient``. The residuals are the inputs (no dense ``W``): the backward computes
``dy W^T`` with a second kernel that dequantizes the same tiles again (contracting over ``N``),
and the LoRA cotangents with the reference's own expression (``jax.vjp`` of the ``(x A)_c B``
term), so they equal the reference's autodiff.

Exactness (CPU, interpret mode): the dequantized tiles are bit-identical to the reference's
dense ``W`` (a table lookup and one float32 product per element, cast once); the products
``x_k W_kn`` are the same, only the order of the float32 sums differs (tiles of ``block_k`` and
XLA's own order), so ``|y_kernel - y_ref| <= 2 gamma_K (|x| |W| + |s| |(x A)_c| |B|)`` with
``gamma_K = K u / (1 - K u)``, ``u = 2**-24`` (Higham's bound for any summation order); in
practice a few float32 ulps of the row's magnitude.

Backends: ``interpret=None`` interprets on CPU and compiles elsewhere; on NVIDIA GPUs the kernel
is written for Pallas' Triton backend (named explicitly with :func:`compiler_params`, as the
other kernels here): power-of-two tiles of at least 16 (``tl.dot``), no slices of register
values, masked loads and stores where ``M`` or ``N`` are not multiples of the tile. It lowers for
CUDA on CPU (tested); it has not been compiled or timed on a GPU yet
(``experiments/bench_dequant_matmul.py`` is the measurement to run there). TPU: never run.

Reference: Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs" (2023); the
storage format of bitsandbytes' ``quantize_4bit``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import blockwise as bw

__all__ = [
    "dequant_matmul", "dequant_matmul_reference", "dequantize_4bit_weight", "check_operands",
]

_FLOATS = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
#: Triton warps per program on a GPU (not tuned: no GPU run yet).
NUM_WARPS = 4
#: Interpret mode skips the masked loads and stores (it pads partial tiles itself); the tests
#: set this to run the GPU's masked path in interpret mode.
MASK_IN_INTERPRET = False


def _is_pow2(n) -> bool:
    return isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n > 0 \
        and (n & (n - 1)) == 0


# ----------------------------------------------------------------------------- checks

class _Dims(NamedTuple):
    m: int
    k: int
    n: int
    r: int  # LoRA rank (0 without LoRA)


def check_operands(x, codes, absmax, table, *, block_size, lora_a=None, lora_b=None) -> _Dims:
    """Check the shapes and dtypes of :func:`dequant_matmul`'s operands; return ``(M, K, N, r)``.

    Raises ValueError / TypeError naming the offending shape or dtype (the caller can then fall
    back to XLA). ``x`` may have leading batch axes; ``M`` is their product.

    Example:
      >>> import jax.numpy as jnp
      >>> from pallas_kernels.dequant_matmul import check_operands
      >>> check_operands(jnp.zeros((2, 3, 128)), jnp.zeros((10, 64), jnp.uint8),
      ...                jnp.zeros((10, 2)), jnp.zeros(16), block_size=64)
      _Dims(m=6, k=128, n=10, r=0)
    """
    if not _is_pow2(block_size) or not 32 <= block_size <= 4096:
        raise ValueError(f"block_size must be a power of two in 32..4096, got {block_size!r}")
    x, codes, absmax, table = (jnp.asarray(v) if not hasattr(v, "shape") else v
                               for v in (x, codes, absmax, table))
    if x.ndim < 1 or jnp.dtype(x.dtype) not in _FLOATS:
        raise TypeError(f"x must be a float32/bfloat16/float16 array with at least one axis, got "
                        f"shape {tuple(x.shape)} dtype {x.dtype}")
    k = int(x.shape[-1])
    m = int(np.prod(x.shape[:-1], dtype=np.int64))
    if k % 2 or k % block_size:
        raise ValueError(f"x has K = {k} (shape {tuple(x.shape)}): K must be even and a multiple "
                         f"of block_size = {block_size} (whole blocks per row of W^T)")
    if codes.ndim != 2 or codes.shape[1] != k // 2 or jnp.dtype(codes.dtype) != jnp.uint8:
        raise ValueError(f"codes must be uint8 of shape (N, K // 2) = (N, {k // 2}) for x of "
                         f"shape {tuple(x.shape)}, got shape {tuple(codes.shape)} dtype "
                         f"{codes.dtype}")
    n = int(codes.shape[0])
    if tuple(absmax.shape) != (n, k // block_size) or jnp.dtype(absmax.dtype) != jnp.float32:
        raise ValueError(f"absmax must be float32 of shape (N, K // block_size) = "
                         f"{(n, k // block_size)}, got shape {tuple(absmax.shape)} dtype "
                         f"{absmax.dtype}")
    if tuple(table.shape) != (16,) or not jnp.issubdtype(table.dtype, jnp.floating):
        raise ValueError(f"table must be a float array of shape (16,), got shape "
                         f"{tuple(table.shape)} dtype {table.dtype}")
    if m == 0 or n == 0:
        raise ValueError(f"empty operands: x shape {tuple(x.shape)}, codes shape "
                         f"{tuple(codes.shape)}")
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_a and lora_b must be given together")
    r = 0
    if lora_a is not None:
        if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_a.shape[0] != k or \
                lora_b.shape[1] != n or lora_a.shape[1] != lora_b.shape[0] or \
                lora_a.shape[1] == 0:
            raise ValueError(f"lora_a must be (K, r) = ({k}, r) and lora_b (r, N) = (r, {n}), got "
                             f"{tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
        for nm, v in (("lora_a", lora_a), ("lora_b", lora_b)):
            if jnp.dtype(v.dtype) not in _FLOATS:
                raise TypeError(f"{nm} must be float32/bfloat16/float16, got dtype {v.dtype}")
        r = int(lora_a.shape[1])
    return _Dims(m, k, n, r)


# ----------------------------------------------------------------------------- reference

def dequantize_4bit_weight(codes, absmax, table, *, block_size: int, dtype=jnp.float32):
    """The dense Flax kernel ``W`` (``(K, N)``) of the 4-bit format (module docstring):
    ``W[k, n] = dtype(table[code(n, k)] * absmax[n, k // block_size])``, in float32 first.

    Example:
      >>> import jax.numpy as jnp
      >>> from pallas_kernels.dequant_matmul import dequantize_4bit_weight
      >>> codes = jnp.full((1, 16), 0x1F, jnp.uint8)  # codes 1, 15, 1, 15, ...
      >>> w = dequantize_4bit_weight(codes, jnp.full((1, 1), 2.0), jnp.arange(16.0),
      ...                            block_size=32)
      >>> w.shape, w[:4, 0].tolist()
      ((32, 1), [2.0, 30.0, 2.0, 30.0])
    """
    n, half = codes.shape
    both = jnp.stack([jnp.right_shift(codes, 4), jnp.bitwise_and(codes, 15)], axis=-1)
    idx = both.reshape(n, 2 * half).astype(jnp.int32)
    vals = jnp.asarray(table, jnp.float32)[idx]
    wt = (vals.reshape(n, -1, block_size) * absmax.astype(jnp.float32)[..., None])
    return wt.reshape(n, 2 * half).astype(dtype).T


def _lora_term(x2, lora_a, lora_b, scale, dt, precision):
    """``s (x A)_c B`` in float32 (the reference's expression; also the backward's)."""
    xa = jnp.dot(x2, lora_a.astype(dt), precision=precision,
                 preferred_element_type=jnp.float32).astype(dt)
    return scale * jnp.dot(xa, lora_b.astype(dt), precision=precision,
                           preferred_element_type=jnp.float32)


def dequant_matmul_reference(x, codes, absmax, table, *, block_size: int, lora_a=None,
                             lora_b=None, lora_scale: float = 1.0, out_dtype=None,
                             precision=None):
    """Pure-jnp reference of :func:`dequant_matmul`: XLA's dequantize-then-dot.

    ``y = c(W) x + s (x A)_c B`` accumulated in float32, cast to ``out_dtype`` (default
    ``x.dtype``); ``W`` from :func:`dequantize_4bit_weight` in ``c = x.dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> from pallas_kernels.dequant_matmul import dequant_matmul_reference
      >>> codes = jnp.full((3, 32), 0xFF, jnp.uint8)  # every code 15
      >>> y = dequant_matmul_reference(jnp.ones((2, 64)), codes, jnp.ones((3, 1)),
      ...                              jnp.linspace(-1.0, 1.0, 16), block_size=64)
      >>> y.tolist()
      [[64.0, 64.0, 64.0], [64.0, 64.0, 64.0]]
    """
    x = jnp.asarray(x)
    d = check_operands(x, codes, absmax, table, block_size=block_size, lora_a=lora_a,
                       lora_b=lora_b)
    out_dtype = x.dtype if out_dtype is None else jnp.dtype(out_dtype)
    y = _reference_2d(x.reshape(d.m, d.k), codes, absmax, table, lora_a, lora_b,
                      block_size=int(block_size), scale=_scale(lora_scale),
                      out_dtype=jnp.dtype(out_dtype).name, precision=precision)
    return y.reshape(x.shape[:-1] + (d.n,))


@functools.partial(jax.jit, static_argnames=("block_size", "scale", "out_dtype", "precision"))
def _reference_2d(x2, codes, absmax, table, lora_a, lora_b, *, block_size, scale, out_dtype,
                  precision):
    # one XLA program (jitted: eager calls reuse it; inside a jit it is inlined)
    dt = x2.dtype
    w = dequantize_4bit_weight(codes, absmax, table, block_size=block_size, dtype=dt)
    y = jnp.dot(x2, w, precision=precision, preferred_element_type=jnp.float32)
    if lora_a is not None:
        y = y + _lora_term(x2, lora_a, lora_b, scale, dt, precision)
    return y.astype(out_dtype)


def _scale(s) -> float:
    try:
        return float(s)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
            TypeError) as e:
        raise TypeError("lora_scale must be a Python number (a static LoRA hyper-parameter), "
                        f"got {type(s).__name__}") from e


# ----------------------------------------------------------------------------- tile helpers

def compiler_params(interp: bool):
    """Triton parameters when compiled on a GPU (as :func:`pallas_kernels.blockwise.
    compiler_params`: JAX 0.10 would otherwise pick Mosaic GPU), None in interpret mode."""
    return pltriton.CompilerParams(num_warps=NUM_WARPS) if bw.uses_gpu_asm(interp) else None


def _lookup(idx, t_ref, gather: bool):
    """``table[idx]`` (float32) for int32 codes ``idx``: a gather from the 16-entry table ref,
    or a binary tree of 15 selects on the code's 4 bits (same values)."""
    if gather:
        return t_ref[idx].astype(jnp.float32)
    level = [t_ref[v].astype(jnp.float32) for v in range(16)]
    for b in range(4):
        bit = jnp.bitwise_and(jnp.right_shift(idx, b), 1) == 1
        level = [jnp.where(bit, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return jnp.broadcast_to(level[0], idx.shape)


def _dequant_tile(codes, scales, t_ref, dt, gather: bool):
    """A ``(rows, 2 * cols)`` tile of ``W^T`` from ``(rows, cols)`` code bytes and the scales of
    its blocks (``(rows, nb)``; one block may span several tiles: ``nb == 1``)."""
    rows, cols = codes.shape
    c32 = codes.astype(jnp.int32)
    # element 2j = high nibble (join + reshape: Triton's interleave)
    idx = jnp.stack([jnp.right_shift(c32, 4), jnp.bitwise_and(c32, 15)], axis=-1)
    idx = idx.reshape(rows, 2 * cols)
    vals = _lookup(idx, t_ref, gather)
    nb = scales.shape[1]
    if nb == 1:
        w = vals * scales
    else:
        w = (vals.reshape(rows, nb, (2 * cols) // nb) * scales[:, :, None]).reshape(rows, 2 * cols)
    return w.astype(dt)


def _load(ref, mask):
    return ref[...] if mask is None else pltriton.load(ref, mask=mask, other=0)


class _Tiles(NamedTuple):
    bm: int
    bn: int
    bk: int


def _largest_pow2_divisor(k: int, cap: int) -> int:
    b = 1
    while b * 2 <= cap and k % (b * 2) == 0:
        b *= 2
    return b


def _tiles(d: _Dims, interp: bool, block_m, block_n, block_k) -> _Tiles:
    if interp:  # interpret mode runs the grid and the K loop serially: big tiles
        bm = min(bw.pow2_ceil(d.m), 256)
        bn = min(bw.pow2_ceil(d.n), 256)
        bk = _largest_pow2_divisor(d.k, 1024)
    else:  # not tuned on a GPU yet (Triton's tl.dot needs every dimension >= 16); at decode
        # sizes (M <= 16) narrower N tiles give twice the programs over the weight
        bm = min(max(bw.pow2_ceil(d.m), 16), 64)
        bn = 32 if d.m <= 16 else 64
        bk = _largest_pow2_divisor(d.k, 256)
    bm, bn, bk = (v if u is None else u for u, v in ((block_m, bm), (block_n, bn),
                                                      (block_k, bk)))
    for nm, v in (("block_m", bm), ("block_n", bn), ("block_k", bk)):
        if not _is_pow2(v) or v < 2:
            raise ValueError(f"{nm} must be a power of two >= 2, got {v!r}")
        if not interp and v < 16:
            raise ValueError(f"{nm} = {v}: compiled (Triton) tiles need >= 16")
    if d.k % bk:
        raise ValueError(f"block_k = {bk} must divide K = {d.k}")
    return _Tiles(int(bm), int(bn), int(bk))


def _rows_mask(start, total, shape, axis, on):
    if not on:
        return None
    idx = start + jax.lax.broadcasted_iota(jnp.int32, shape, axis)
    return idx < total


def _and(a, b):
    if a is None:
        return b
    return a if b is None else a & b


# ----------------------------------------------------------------------------- kernels

class _Static(NamedTuple):
    """Hashable configuration of one kernel call (the custom_vjp's closure)."""

    dims: _Dims
    r_pad: int
    block_size: int
    tiles: _Tiles
    scale: float
    out_dtype: str
    interp: bool
    gather: bool
    precision: object


def _scale_slice(k0_elem, bk, bs):
    """(start, size) in absmax columns of the blocks covering ``[k0, k0 + bk)``."""
    if bk >= bs:
        return k0_elem // bs, bk // bs
    return k0_elem // bs, 1


def _forward_call(st: _Static, x2, codes, absmax, table, xa, lora_b):
    """``y = x c(W) + s xa B`` with the kernel; ``x2`` (M, K) in c, ``xa`` (M, r_pad) in c."""
    d, (bm, bn, bk), bs = st.dims, st.tiles, st.block_size
    dt = x2.dtype
    has_lora = xa is not None
    masked = (not st.interp) or MASK_IN_INTERPRET
    m_mask, n_mask = masked and d.m % bm != 0, masked and d.n % bn != 0
    nk = d.k // bk

    def kernel(x_ref, c_ref, a_ref, t_ref, *refs):
        if has_lora:
            xa_ref, b_ref, o_ref = refs
        else:
            (o_ref,) = refs
        i, j = pl.program_id(0), pl.program_id(1)
        rm = _rows_mask(i * bm, d.m, (bm, bk), 0, m_mask)
        rn_c = _rows_mask(j * bn, d.n, (bn, bk // 2), 0, n_mask)

        def body(kk, acc):
            k0 = pl.multiple_of(kk * bk, bk)
            xt = _load(x_ref.at[:, pl.ds(k0, bk)], rm)
            ct = _load(c_ref.at[:, pl.ds(pl.multiple_of(kk * (bk // 2), bk // 2), bk // 2)],
                       rn_c)
            s0, ns = _scale_slice(k0, bk, bs)
            rn_s = _rows_mask(j * bn, d.n, (bn, ns), 0, n_mask)
            at = _load(a_ref.at[:, pl.ds(s0, ns)], rn_s)
            w = _dequant_tile(ct, at, t_ref, dt, st.gather)
            return acc + jax.lax.dot_general(xt, w, (((1,), (1,)), ((), ())),
                                             precision=st.precision,
                                             preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, nk, body, jnp.zeros((bm, bn), jnp.float32))
        if has_lora:
            ua = _load(xa_ref, _rows_mask(i * bm, d.m, (bm, st.r_pad), 0, m_mask))
            bt = _load(b_ref, _rows_mask(j * bn, d.n, (st.r_pad, bn), 1, n_mask))
            acc = acc + st.scale * jax.lax.dot_general(
                ua, bt, (((1,), (0,)), ((), ())), precision=st.precision,
                preferred_element_type=jnp.float32)
        out_mask = _and(_rows_mask(i * bm, d.m, (bm, bn), 0, m_mask),
                        _rows_mask(j * bn, d.n, (bm, bn), 1, n_mask))
        bw.store(o_ref, acc.astype(o_ref.dtype), out_mask)

    grid = (pl.cdiv(d.m, bm), pl.cdiv(d.n, bn))
    in_specs = [pl.BlockSpec((bm, d.k), lambda i, j: (i, 0)),
                pl.BlockSpec((bn, d.k // 2), lambda i, j: (j, 0)),
                pl.BlockSpec((bn, d.k // bs), lambda i, j: (j, 0)),
                pl.BlockSpec((16,), lambda i, j: (0,))]
    inputs = [x2, codes, absmax, table.astype(jnp.float32)]
    if has_lora:
        in_specs += [pl.BlockSpec((bm, st.r_pad), lambda i, j: (i, 0)),
                     pl.BlockSpec((st.r_pad, bn), lambda i, j: (0, j))]
        inputs += [xa, lora_b]
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((d.m, d.n), jnp.dtype(st.out_dtype)),
        grid=grid, in_specs=in_specs, out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        interpret=st.interp, compiler_params=compiler_params(st.interp),
        name="dequant_matmul")(*inputs)


def _backward_dx_call(st: _Static, dy, codes, absmax, table, dt):
    """``dy c(W)^T`` (M, K) float32 with the kernel: tiles of ``W^T`` dequantized again (in
    ``c = dt``), contracted over ``N`` (masked past ``N``) in the promoted dtype of ``dy`` and
    ``c`` (a float32 ``dy`` of a bfloat16 ``x`` is not rounded, as in the reference's autodiff)."""
    bdt = jnp.promote_types(dy.dtype, dt)
    d, (bm, bn, bk), bs = st.dims, st.tiles, st.block_size
    masked = (not st.interp) or MASK_IN_INTERPRET
    m_mask = masked and d.m % bm != 0
    n_tail = d.n % bn != 0
    n_steps = pl.cdiv(d.n, bn)
    s_width = bk // bs if bk >= bs else 1

    def kernel(dy_ref, c_ref, a_ref, t_ref, o_ref):
        i = pl.program_id(0)

        def body(nn, acc):
            n0 = pl.multiple_of(nn * bn, bn)
            # past N: zeros (interpret mode pads with NaN, a GPU would read out of bounds)
            dmask = _and(_rows_mask(i * bm, d.m, (bm, bn), 0, m_mask),
                         _rows_mask(n0, d.n, (bm, bn), 1, n_tail))
            cmask = _rows_mask(n0, d.n, (bn, bk // 2), 0, n_tail)
            smask = _rows_mask(n0, d.n, (bn, s_width), 0, n_tail)
            if masked:
                g = _load(dy_ref.at[:, pl.ds(n0, bn)], dmask)
                ct = _load(c_ref.at[pl.ds(n0, bn), :], cmask)
                at = _load(a_ref.at[pl.ds(n0, bn), :], smask)
            else:
                g = dy_ref[:, pl.ds(n0, bn)]
                ct, at = c_ref[pl.ds(n0, bn), :], a_ref[pl.ds(n0, bn), :]
            w = _dequant_tile(ct, at, t_ref, dt, st.gather).astype(bdt)
            if n_tail:
                g = jnp.where(_rows_mask(n0, d.n, (bm, bn), 1, True), g, jnp.zeros_like(g))
                w = jnp.where(_rows_mask(n0, d.n, (bn, bk), 0, True), w, jnp.zeros_like(w))
            return acc + jax.lax.dot_general(g, w, (((1,), (0,)), ((), ())),
                                             precision=st.precision,
                                             preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, n_steps, body, jnp.zeros((bm, bk), jnp.float32))
        bw.store(o_ref, acc, _rows_mask(i * bm, d.m, (bm, bk), 0, m_mask))

    # N rounded up to whole tiles: interpret mode then pads the arrays (dynamic slices of a
    # ref may not run past it); compiled, the masks keep the loads inside N.
    n_full = n_steps * bn
    if bk >= bs:
        a_spec = pl.BlockSpec((n_full, bk // bs), lambda i, kb: (0, kb))
    else:  # a block of W^T spans bs // bk tiles: one absmax column, its element index
        a_spec = pl.BlockSpec((n_full, 1), lambda i, kb: (0, kb // (bs // bk)))
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((d.m, d.k), jnp.float32),
        grid=(pl.cdiv(d.m, bm), d.k // bk),
        in_specs=[pl.BlockSpec((bm, n_full), lambda i, kb: (i, 0)),
                  pl.BlockSpec((n_full, bk // 2), lambda i, kb: (0, kb)),
                  a_spec, pl.BlockSpec((16,), lambda i, kb: (0,))],
        out_specs=pl.BlockSpec((bm, bk), lambda i, kb: (i, kb)),
        interpret=st.interp, compiler_params=compiler_params(st.interp),
        name="dequant_matmul_dx")(dy.astype(bdt), codes, absmax, table.astype(jnp.float32))


def _lora_inputs(st: _Static, x2, lora_a, lora_b):
    """``(x A)_c`` and ``B`` in c, the rank padded with zeros to ``r_pad`` (tl.dot's >= 16)."""
    dt = x2.dtype
    xa = jnp.dot(x2, lora_a.astype(dt), precision=st.precision,
                 preferred_element_type=jnp.float32).astype(dt)
    b = lora_b.astype(dt)
    pad = st.r_pad - st.dims.r
    if pad:
        xa = jnp.pad(xa, ((0, 0), (0, pad)))
        b = jnp.pad(b, ((0, pad), (0, 0)))
    return xa, b


@functools.lru_cache(maxsize=256)
def _make(st: _Static):
    has_lora = st.dims.r > 0

    def run(x2, codes, absmax, table, lora_a, lora_b):
        xa, b = _lora_inputs(st, x2, lora_a, lora_b) if has_lora else (None, None)
        return _forward_call(st, x2, codes, absmax, table, xa, b)

    @jax.custom_vjp
    def f(x2, codes, absmax, table, lora_a, lora_b):
        return run(x2, codes, absmax, table, lora_a, lora_b)

    def fwd(x2, codes, absmax, table, lora_a, lora_b):
        return run(x2, codes, absmax, table, lora_a, lora_b), (x2, codes, absmax, table,
                                                                 lora_a, lora_b)

    def bwd(res, dy):
        x2, codes, absmax, table, lora_a, lora_b = res
        dt = x2.dtype
        dx = _backward_dx_call(st, dy, codes, absmax, table, dt).astype(dt)
        da = db = None
        if has_lora:
            # the reference's own expression, so the same autodiff (y's cast included)
            _, vjp = jax.vjp(lambda x_, a_, b_: _lora_term(x_, a_, b_, st.scale, dt,
                                                           st.precision).astype(st.out_dtype),
                             x2, lora_a, lora_b)
            dxl, da, db = vjp(dy)
            dx = dx + dxl
        zc = np.zeros(codes.shape, jax.dtypes.float0)
        return dx, zc, jnp.zeros_like(absmax), jnp.zeros_like(table), da, db

    f.defvjp(fwd, bwd)
    return jax.jit(f)  # eager calls reuse one compiled program; inside a jit it is inlined


# ----------------------------------------------------------------------------- public

def dequant_matmul(x, codes, absmax, table, *, block_size: int, lora_a=None, lora_b=None,
                   lora_scale: float = 1.0, out_dtype=None, interpret: bool | None = None,
                   block_m: int | None = None, block_n: int | None = None,
                   block_k: int | None = None, lookup: bool | None = None, precision=None):
    """``y = x W + s (x A)_c B`` with ``W`` dequantized tile by tile inside a Pallas kernel.

    ``W^T[n, k] = c(table[code(n, k)] * absmax[n, k // block_size])`` in the compute dtype
    ``c = x.dtype`` (bitsandbytes' 4-bit layout, see the module docstring), products accumulated
    in float32, one cast to ``out_dtype``. Differentiable w.r.t. ``x``, ``lora_a`` and ``lora_b``
    (``jax.custom_vjp``; the quantized base is frozen and gets zero cotangents).

    Args:
      x: ``(..., K)`` float32 / bfloat16 / float16 activations (the compute dtype).
      codes: uint8 ``(N, K // 2)``, element ``2j`` of a row in the high nibble.
      absmax: float32 ``(N, K // block_size)``.
      table: ``(16,)`` code values (NF4, FP4, ...).
      block_size: elements per quantization block, a power of two in 32..4096 dividing K.
      lora_a, lora_b: optional LoRA factors ``(K, r)`` and ``(r, N)`` (cast to ``c``).
      lora_scale: ``s``, a Python number (LoRA's ``alpha / r``).
      out_dtype: output dtype (default ``x.dtype``).
      interpret: interpret mode; ``None``: on CPU (the only way Pallas runs there).
      block_m, block_n, block_k: tile sizes (powers of two; ``block_k`` divides K; >= 16 when
        compiled). Defaults: large tiles in interpret mode; on a GPU (untuned) 16..64 x
        32 (M <= 16) or 64 x up to 256.
      lookup: gather the 16 table values (default when compiled) instead of a tree of
        selects (default in interpret mode); the values are the same.
      precision: ``jax.lax.Precision`` of the dots (kernel and XLA parts).

    Returns:
      ``(..., N)`` array of ``out_dtype``.

    Raises:
      ValueError / TypeError: shapes or dtypes that the kernel does not take (K not a multiple
        of the block, wrong codes/absmax shapes, ...); the message names the shapes.

    Reference: Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", 2023.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from effjax.quant import nf4_codebook
      >>> from pallas_kernels.dequant_matmul import dequant_matmul, dequant_matmul_reference
      >>> k0, k1, k2 = jax.random.split(jax.random.key(0), 3)
      >>> x = jax.random.normal(k0, (4, 128))
      >>> codes = jax.random.randint(k1, (24, 64), 0, 256).astype(jnp.uint8)
      >>> absmax = jax.random.uniform(k2, (24, 2))
      >>> table = jnp.asarray(nf4_codebook(), jnp.float32)
      >>> y = dequant_matmul(x, codes, absmax, table, block_size=64)
      >>> r = dequant_matmul_reference(x, codes, absmax, table, block_size=64)
      >>> y.shape, bool(jnp.allclose(y, r, rtol=1e-5, atol=1e-5))
      ((4, 24), True)
    """
    x = jnp.asarray(x)
    d = check_operands(x, codes, absmax, table, block_size=block_size, lora_a=lora_a,
                       lora_b=lora_b)
    interp = bw.resolve_interpret(interpret)
    tiles = _tiles(d, interp, block_m, block_n, block_k)
    out_dtype = x.dtype if out_dtype is None else jnp.dtype(out_dtype)
    r_pad = max(bw.pow2_ceil(d.r), 16) if d.r else 0
    gather = (not interp) if lookup is None else bool(lookup)
    st = _Static(d, r_pad, int(block_size), tiles, _scale(lora_scale), jnp.dtype(out_dtype).name,
                 interp, gather, precision)
    y = _make(st)(x.reshape(d.m, d.k), codes, absmax, jnp.asarray(table), lora_a, lora_b)
    return y.reshape(x.shape[:-1] + (d.n,))
