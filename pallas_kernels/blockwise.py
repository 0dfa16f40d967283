"""Pallas kernels for block-wise quantize / dequantize, bit-identical to ``effjax.quant``.

Same format as :func:`effjax.quant.quantize_blockwise` (the pure-jnp reference, re-exported
here as :func:`quantize_blockwise_reference` / :func:`dequantize_blockwise_reference`): blocks of
``block_size`` consecutive elements along the (merged) last axis, ``absmax_b = max |x|`` per
block in float32, and per element the code of the codebook value nearest to
``x_i * (1 / absmax_b)``:

    codes_i = argmin_c |codebook[c] - x_i * (1 / absmax_b)|,    x_i ~= codebook[codes_i] * absmax_b

The kernels return a :class:`~effjax.quant.QuantizedArray` with the same codes (bit for bit) and
the same absmax (exactly) as the reference, so the two are interchangeable anywhere.

How the kernel tiles the array: the parameter is viewed as a 2-D ``(rows, L)`` array (``L`` the
blocking length of :func:`effjax.quant.block_view`, ``rows`` the product of its other
axes); a program handles ``R`` rows times ``C`` whole blocks. Sizes that are not multiples of
the block are handled in the kernel: the columns past ``L`` are masked (they count as zeros in
the absmax, exactly as the reference's zero padding, and are never written), so no padded copy
of the input is made. 4-bit codes are packed two per byte inside the kernel (element ``2j`` in
the high nibble); the one layout where a byte pair would straddle rows (an odd last axis
shorter than the block, merged with the axis before) is packed outside the kernel instead.

Search and decode: in interpret mode the kernels reuse effjax.quant's gather-free forms (the
8-bit dynamic maps by closed form, 16-value codebooks by 15 compares; other codebooks read the
lookup tables below). Compiled on a GPU they read lookup tables passed as inputs
(:func:`lookup_tables`: a bucket table, two loads per element): on an H100 the closed forms kept
too many values live per element (fused 8-bit AdamW + apply_updates at 1e8 elements: 6.5 ms,
3.1 ms with the best tile size; with the tables 1.8 ms and 1.5 ms, in a run that also timed 5
steps per synchronization instead of 1). Both give the reference's
codes (tested on every decision boundary in interpret mode, ``lookup=True``/``False``).

Differentiation: quantization outputs integer codes, so it is not differentiable (``jax.grad``
through :func:`quantize_blockwise` raises, as for any ``pallas_call``). :func:`dequantize_blockwise`
has a ``jax.custom_vjp``: ``d out / d absmax_b = sum_{i in b} g_i * codebook[codes_i]`` (the
reference's autodiff value, computed in jnp), and codes get a zero (float0) cotangent. The
optimizer path differentiates neither.

Backends: ``interpret=None`` runs the kernel in interpret mode on CPU (the only way Pallas runs
there) and compiles it elsewhere. On NVIDIA GPUs the kernels lower with Pallas' Triton backend
(explicit :func:`compiler_params`) and were run on an H100 (``experiments/check_kernels.py``,
``experiments/bench_kernels.py``). Triton shapes are powers of two, it reads and writes whole
tiles (loads and stores past an array's end are masked: :func:`tile_masks`), and its float32
division is approximate (:func:`exact_div`). TPU: never run.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from effjax.quant import (
    QuantizedArray,
    block_view,
    scales_shape,
    search,  # the reference's own search (bit-exactness)
)
from effjax.quant import dequantize_blockwise as _dequantize_ref
from effjax.quant import quantize_blockwise as _quantize_ref

__all__ = [
    "quantize_blockwise", "dequantize_blockwise", "quantize_blockwise_reference",
    "dequantize_blockwise_reference", "resolve_interpret",
]

_FLOATS = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_TILE_ELEMS = 2048  # elements per program on GPU/TPU (H100 sweep, bench_kernels --sweep)
NUM_WARPS = 4  # Triton warps per program on a GPU
_TILE_ELEMS_INTERPRET = 1 << 16  # interpret mode runs the grid as a serial loop: fewer steps


def quantize_blockwise_reference(x, *, codebook, block_size=256) -> QuantizedArray:
    """The pure-jnp reference: :func:`effjax.quant.quantize_blockwise` (nearest rounding)."""
    return _quantize_ref(x, codebook=codebook, block_size=block_size)


def dequantize_blockwise_reference(q: QuantizedArray) -> jax.Array:
    """The pure-jnp reference: :func:`effjax.quant.dequantize_blockwise`."""
    return _dequantize_ref(q)


def resolve_interpret(interpret: bool | None) -> bool:
    """``None`` -> interpret mode exactly when the default backend is the CPU."""
    if interpret is None:
        return jax.default_backend() == "cpu"
    return bool(interpret)


def _pow2_floor(n: int) -> int:
    return 1 << (max(int(n), 1).bit_length() - 1)


class Layout(NamedTuple):
    """Static 2-D view of a blocked array and its tiling (shared with ``optim_update``)."""

    shape: tuple[int, ...]
    rows: int  # product of the unmerged leading axes
    length: int  # merged blocking length L
    nblocks: int
    block_size: int
    bits: int
    pack_in_kernel: bool  # 4-bit codes packed inside the kernel
    tile_rows: int  # R
    tile_blocks: int  # C

    @property
    def tile_cols(self) -> int:
        return self.tile_blocks * self.block_size

    @property
    def code_cols(self) -> int:
        """Width of the codes array in the 2-D view."""
        if self.bits == 4 and self.pack_in_kernel:
            return -(-self.length // 2)
        return self.length

    @property
    def code_tile_cols(self) -> int:
        return self.tile_cols // 2 if (self.bits == 4 and self.pack_in_kernel) else self.tile_cols

    @property
    def grid(self) -> tuple[int, int]:
        return (-(-self.rows // self.tile_rows), -(-self.nblocks // self.tile_blocks))


def make_layout(shape, block_size: int, bits: int, *, interpret: bool,
                tile_elems: int | None = None) -> Layout:
    """Tiling of an array of ``shape`` quantized in blocks of ``block_size`` (``bits`` 8 or 4)."""
    shape = tuple(int(s) for s in shape)
    view = block_view(shape, block_size)
    rows, length = math.prod(view[:-1]), view[-1]
    nblocks = -(-length // block_size)
    if bits == 4 and block_size % 2:
        raise ValueError(f"4-bit codes pack two a byte: block_size must be even, got {block_size}")
    # A byte pair straddles two rows of the view only with an odd last axis that was merged
    # or grouped (the view's rows are not the parameter's rows).
    pack_in_kernel = bits == 8 or shape[-1] % 2 == 0 or view == shape
    if tile_elems is None:
        tile_elems = _TILE_ELEMS_INTERPRET if interpret else _TILE_ELEMS
    c = min(_pow2_floor(nblocks), _pow2_floor(max(1, tile_elems // block_size)))
    r = min(_pow2_floor(rows), _pow2_floor(max(1, tile_elems // (c * block_size))))
    return Layout(shape, rows, length, nblocks, int(block_size), bits, pack_in_kernel, r, c)


# ----------------------------------------------------------------------------- tile helpers
# Functions of in-kernel values (jnp arrays of one tile); also usable on whole arrays.

class Codebook(NamedTuple):
    """A codebook's static description plus the tables a kernel reads (if any)."""

    values: tuple[float, ...]
    bits: int
    tables: tuple[np.ndarray, ...]  # () for the closed forms; else lookup_tables(values)
    bucket: tuple[int, ...] = ()  # (shift, q0, buckets, half, nan_code) with tables


def lookup_tables(values) -> tuple[tuple[np.ndarray, ...], tuple[int, ...]]:
    """Tables for a gather-based search and decode, and their static parameters.

    The search is effjax.quant's bucket table (``effjax.quant.search``): the top mantissa
    bits and the exponent of ``|y|`` (and its sign) pick a bucket holding at most one decision
    threshold ``T`` of the sorted codebook, so the nearest code is ``lo`` if ``y < T`` else
    ``hi``, the codes on either side of that threshold. Three tables, each a power of two
    long (Triton's shapes; a ref indexed by an array becomes a gather load from the L1-cached
    table):

    * ``values``: the codebook in its own order (decode: ``values[code]``);
    * ``thresholds[bucket]``: the threshold inside the bucket (``+inf`` if none);
    * ``codes[bucket]``: ``lo | hi << 8``.

    Two independent loads per element (no dependent chain as in a binary search). NaN gets the
    code of the smallest value, as in the reference.
    """
    vals = np.asarray(values, np.float32).reshape(-1)
    n = vals.size
    key = tuple(float(v) for v in vals)
    order = search.sort_order(key)
    sorted_vals = key if order is None else order[0]
    order_idx = np.arange(n) if order is None else np.asarray(order[1])
    table = search.bucket_table(sorted_vals)
    half = pow2_ceil(table.buckets)
    thresholds = np.full(2 * half, np.inf, np.float32)
    codes = np.zeros(2 * half, np.int32)
    for side in range(2):
        rows = table.rows[side * table.buckets:(side + 1) * table.buckets]
        count = rows[:, 0].astype(np.int64)
        lo = order_idx[np.clip(count, 0, n - 1)]
        hi = order_idx[np.clip(count + 1, 0, n - 1)]
        thresholds[side * half: side * half + table.buckets] = rows[:, 1]
        codes[side * half: side * half + table.buckets] = lo | (hi << 8)
    out_vals = np.zeros(pow2_ceil(n), np.float32)
    out_vals[:n] = vals
    bucket = (table.shift, table.q0, table.buckets, half, int(order_idx[0]))
    return (out_vals, thresholds, codes), bucket


def chunk_view(shape, block_size: int, bits: int):
    """Blocks of a leaf as rows of a 2-D view ``(n_blocks, block_size)``, or None.

    The view is a free reshape when the blocking length ``L`` is a multiple of the block (no
    padded block) and 4-bit byte pairs never straddle two original rows (even last axis)."""
    view = block_view(tuple(shape), block_size)
    if view[-1] % block_size or (bits == 4 and (block_size % 2 or shape[-1] % 2)):
        return None
    return math.prod(view[:-1]) * (view[-1] // block_size)


def pow2_ceil(n: int) -> int:
    """The smallest power of two >= ``n``, at least 2 (Triton's array sizes)."""
    return 1 << max(1, (int(n) - 1).bit_length())


def make_codebook(values, *, lookup: bool = False) -> Codebook:
    """``lookup=False``: the closed forms where the codebook has one (8-bit dynamic maps,
    16-value codebooks), else lookup tables; ``lookup=True``: lookup tables always."""
    values = tuple(float(v) for v in np.asarray(values, np.float32).reshape(-1))
    bits = 4 if len(values) <= 16 else 8
    closed = len(values) <= 16 or search.dynamic_map_kind(search.sorted_values_of(values)) \
        is not None
    if closed and not lookup:
        return Codebook(values, bits, ())
    tables, bucket = lookup_tables(values)
    return Codebook(values, bits, tables, bucket)


def resolve_lookup(lookup: bool | None, interp: bool) -> bool:
    """``None`` -> lookup tables in compiled kernels (GPU), closed forms in interpret mode.

    Measured on an H100 (``experiments/bench_kernels.py``): the closed-form search and decode
    keep too many values live per element for Triton's registers; the table search is a few
    cached loads per element."""
    return (not interp) if lookup is None else bool(lookup)


def _nearest_codes(y, cb: Codebook, tables):
    """Codes (int32, the codebook's own order) of the values nearest to float32 ``y``;
    ``tables``: the refs of :func:`lookup_tables` (when ``cb.tables``)."""
    if not cb.tables:
        # tables=False: a kernel cannot capture a lookup-table constant.
        sorted_values = search.sorted_values_of(cb.values)
        idx = search.nearest_sorted(y, sorted_values, tables=False)
        return search.to_codes(idx, cb.values, tables=False)
    _, thresholds, codes = tables
    shift, q0, buckets, half, nan_code = cb.bucket
    bits = jax.lax.bitcast_convert_type(y, jnp.int32)
    mag = jnp.bitwise_and(bits, 0x7FFFFFFF)
    q = jnp.clip(jnp.right_shift(mag, shift) - q0, 0, buckets - 1)
    q = q + jnp.where(bits < 0, half, 0)
    pair = codes[q]
    code = jnp.where(y >= thresholds[q], jnp.right_shift(pair, 8), jnp.bitwise_and(pair, 255))
    return jnp.where(jnp.isnan(y), nan_code, code)


def _code_values(codes, cb: Codebook, tables):
    """``codebook[codes]`` as float32."""
    if not cb.tables:
        return search.value_at(codes, cb.values, tables=False)
    return tables[0][codes.astype(jnp.int32)]


class TileMasks(NamedTuple):
    """In-bounds masks of the current program's value, code and absmax tiles (None where the
    tiles divide the array). A compiled Triton kernel reads and writes a whole tile, past the
    array's end too; the loads and stores are masked with these."""

    value: jax.Array | None
    code: jax.Array | None
    scale: jax.Array | None


#: Interpret mode pads partial tiles itself, so the kernels skip the masks there (a masked
#: load also changes how XLA:CPU fuses the interpreted body, and with it which multiply-adds
#: it contracts); the tests set this to run the masked loads and stores in interpret mode.
MASK_IN_INTERPRET = False


def tile_masks(lay: Layout, interp: bool) -> TileMasks:
    """The masks of program ``(program_id(0), program_id(1))``; call inside a kernel."""
    r = lay.tile_rows
    if interp and not MASK_IN_INTERPRET:
        return TileMasks(None, None, None)
    rows_ok = lay.rows % r == 0

    def mask(width, total):
        if rows_ok and total % width == 0:
            return None
        row = pl.program_id(0) * r + jax.lax.broadcasted_iota(jnp.int32, (r, width), 0)
        col = pl.program_id(1) * width + jax.lax.broadcasted_iota(jnp.int32, (r, width), 1)
        return (row < lay.rows) & (col < total)

    return TileMasks(mask(lay.tile_cols, lay.length), mask(lay.code_tile_cols, lay.code_cols),
                     mask(lay.tile_blocks, lay.nblocks))


def load(ref, mask):
    """``ref[...]``, elements outside ``mask`` read as 0 (not read at all on a GPU)."""
    if mask is None:
        return ref[...]
    return pltriton.load(ref, mask=mask, other=0)


def store(ref, value, mask):
    """``ref[...] = value`` where ``mask`` holds."""
    if mask is None:
        ref[...] = value
    else:
        pltriton.store(ref, value, mask=mask)


def uses_gpu_asm(interp: bool) -> bool:
    """Whether a kernel body is compiled for an NVIDIA GPU (Triton): then the kernels take
    :func:`compiler_params` and divide with :func:`exact_div`'s inline PTX; in interpret mode
    they divide as XLA does."""
    return not interp and jax.default_backend() == "gpu"


def exact_div(x, y, *, gpu_asm: bool):
    """``x / y`` rounded as XLA rounds it (IEEE round-to-nearest), in the promoted dtype.

    Triton lowers a float32 ``/`` to PTX ``div.full.f32``, an approximation within 2 ulp,
    where XLA:GPU emits the correctly rounded ``div.rn.f32``; a quotient one ulp off moves a
    scaled moment across a code midpoint now and then, and the kernel would no longer match the
    jnp path. On a GPU (``gpu_asm``) the kernels therefore divide with inline ``div.rn.f32``;
    16-bit operands are divided in float32 and rounded back, as XLA:GPU does.
    """
    if not gpu_asm:
        return jnp.divide(x, y)
    dt = jnp.result_type(x, y)
    shape = jnp.broadcast_shapes(jnp.shape(x), jnp.shape(y))
    xf = jnp.broadcast_to(jnp.asarray(x, dt).astype(jnp.float32), shape)
    yf = jnp.broadcast_to(jnp.asarray(y, dt).astype(jnp.float32), shape)
    (q,) = pltriton.elementwise_inline_asm(
        "div.rn.f32 $0, $1, $2;", args=[xf, yf], constraints="=r,r,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(shape, jnp.float32)])
    return q.astype(dt)


def compiler_params(interp: bool):
    """Explicit Triton parameters on a GPU: JAX 0.11 lowers a ``pallas_call`` with Triton by
    default, JAX 0.10 with Mosaic GPU, whose ``pallas_call`` path JAX has deprecated and which
    does not take these kernels' tiles (its copies allow at most 256 elements per axis)."""
    return pltriton.CompilerParams(num_warps=NUM_WARPS) if uses_gpu_asm(interp) else None


def valid_columns(shape2d, col0, length):
    """Boolean mask of the columns of a ``(R, W)`` tile starting at column ``col0`` inside L."""
    col = col0 + jax.lax.broadcasted_iota(jnp.int32, shape2d, 1)
    return col < length


def quantize_tile(x, valid, lay: Layout, cb: Codebook, tables, *, gpu_asm: bool = False):
    """Quantize a float32 ``(R, C*bs)`` tile: returns ``(codes uint8, absmax (R, C) float32)``.

    The expressions are the reference's (effjax.quant.quantize_blockwise), so the codes and
    scales are bit-identical; ``valid`` masks the columns past the array's end (zeros there).
    """
    r, bs = x.shape[0], lay.block_size
    xb = jnp.where(valid, x, 0.0).reshape(r, -1, bs)
    absmax = jnp.max(jnp.abs(xb), axis=-1)
    absmax = jnp.where(jnp.isfinite(absmax), absmax, jnp.nan)
    pre = jnp.where(absmax >= 2.0**125, np.float32(2.0**-4), np.float32(1.0))
    inv = jnp.where(absmax > 0, exact_div(1.0, absmax * pre, gpu_asm=gpu_asm), 0.0)
    y = (xb * pre[..., None]) * inv[..., None]
    codes = _nearest_codes(y, cb, tables).reshape(x.shape)
    if lay.bits == 4 and lay.pack_in_kernel:
        codes = jnp.where(valid, codes, 0)
        pairs = codes.reshape(r, -1, 2)
        # (hi << 4) | lo as a sum over the pair axis: Triton lowers no slices.
        shift = 4 - 4 * jax.lax.broadcasted_iota(jnp.int32, pairs.shape, 2)
        codes = jnp.sum(jnp.left_shift(pairs, shift), axis=-1)
    return codes.astype(jnp.uint8), absmax


def dequantize_tile(codes, absmax, lay: Layout, cb: Codebook, tables, dtype):
    """Inverse of :func:`quantize_tile`: ``(codebook[codes] * absmax).astype(dtype)``."""
    if lay.bits == 4 and lay.pack_in_kernel:
        both = jnp.stack([jnp.right_shift(codes, 4), jnp.bitwise_and(codes, 15)], axis=-1)
        codes = both.reshape(codes.shape[0], -1)
    vals = _code_values(codes, cb, tables)
    r = vals.shape[0]
    out = vals.reshape(r, -1, lay.block_size) * absmax[..., None]
    return out.reshape(r, -1).astype(dtype)


def pack4_outside(codes, shape):
    """Pack unpacked 4-bit codes of ``shape`` two a byte along the last axis (odd: pad 0)."""
    codes = codes.reshape(shape)
    if codes.shape[-1] % 2:
        codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, 1)])
    pairs = codes.reshape(codes.shape[:-1] + (codes.shape[-1] // 2, 2))
    return jnp.left_shift(pairs[..., 0], 4) | pairs[..., 1]


def unpack4_outside(packed, shape):
    both = jnp.stack([jnp.right_shift(packed, 4), jnp.bitwise_and(packed, 15)], axis=-1)
    out = both.reshape(packed.shape[:-1] + (packed.shape[-1] * 2,))
    return out[..., : shape[-1]]


def codes_2d(q: QuantizedArray, lay: Layout):
    """The codes of ``q`` in the kernel's 2-D view (unpacked first if packing is outside)."""
    if q.bits == 4 and not lay.pack_in_kernel:
        return unpack4_outside(q.codes, q.shape).reshape(lay.rows, lay.length)
    return q.codes.reshape(lay.rows, lay.code_cols)


def codes_from_2d(codes, lay: Layout):
    if lay.bits == 4 and not lay.pack_in_kernel:
        return pack4_outside(codes, lay.shape)
    if lay.bits == 4:
        return codes.reshape(lay.shape[:-1] + (-(-lay.shape[-1] // 2),))
    return codes.reshape(lay.shape)


def absmax_shape(lay: Layout) -> tuple[int, ...]:
    return scales_shape(lay.shape, lay.block_size)


def specs(lay: Layout):
    """BlockSpecs ``(values, codes, absmax, table)`` for the 2-D views."""
    r, c = lay.tile_rows, lay.tile_blocks
    value = pl.BlockSpec((r, lay.tile_cols), lambda i, j: (i, j))
    code = pl.BlockSpec((r, lay.code_tile_cols), lambda i, j: (i, j))
    scale = pl.BlockSpec((r, c), lambda i, j: (i, j))
    return value, code, scale


def table_spec(table: np.ndarray):
    return pl.BlockSpec(table.shape, lambda i, j: (0,) * table.ndim)


# ----------------------------------------------------------------------------- quantize

def _check_x(x, block_size):
    if not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool) \
            or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if jnp.dtype(x.dtype) not in _FLOATS:
        raise TypeError(f"quantize_blockwise kernel needs a float32/bfloat16/float16 array, got "
                        f"dtype {x.dtype} (shape {x.shape})")
    if x.ndim == 0 or x.size == 0:
        raise ValueError(f"quantize_blockwise kernel needs a non-empty array with at least one "
                         f"axis, got shape {x.shape}")


def quantize_blockwise(x, *, codebook, block_size: int = 256, interpret: bool | None = None,
                       tile_elems: int | None = None, lookup: bool | None = None
                       ) -> QuantizedArray:
    """Pallas block-wise quantization; same result as :func:`effjax.quant.quantize_blockwise`.

    ``absmax_b = max_{i in b} |x_i|``; ``codes_i = argmin_c |codebook[c] - x_i * (1/absmax_b)|``
    (ties to the larger value); 16-value codebooks give 4-bit codes packed two a byte.

    Args:
      x: float32 / bfloat16 / float16 array, any shape with at least one axis.
      codebook: 2..256 values (e.g. ``effjax.quant.dynamic_codebook()``).
      block_size: elements per block.
      interpret: run the kernel in interpret mode; ``None``: on CPU only.
      tile_elems: elements a program handles (default 4096, 65536 in interpret mode).
      lookup: search with lookup tables (:func:`lookup_tables`) rather than the closed forms;
        ``None``: tables when compiled (GPU), closed forms in interpret mode. Same codes.

    Example:
      >>> import jax.numpy as jnp
      >>> from effjax.quant import dynamic_codebook, quantize_blockwise as reference
      >>> from pallas_kernels.blockwise import quantize_blockwise
      >>> x = jnp.linspace(-1.0, 1.0, 600).reshape(2, 300)
      >>> q = quantize_blockwise(x, codebook=dynamic_codebook(), block_size=256)
      >>> r = reference(x, codebook=dynamic_codebook(), block_size=256)
      >>> bool((q.codes == r.codes).all()), bool((q.absmax == r.absmax).all())
      (True, True)
    """
    x = jnp.asarray(x)
    _check_x(x, block_size)
    interp = resolve_interpret(interpret)
    cb = make_codebook(codebook, lookup=resolve_lookup(lookup, interp))
    lay = make_layout(x.shape, int(block_size), cb.bits, interpret=interp, tile_elems=tile_elems)
    value_spec, code_spec, scale_spec = specs(lay)

    def kernel(x_ref, *refs):
        tables = refs[: len(cb.tables)]
        codes_ref, absmax_ref = refs[len(cb.tables):]
        masks = tile_masks(lay, interp)
        col0 = pl.program_id(1) * lay.tile_cols
        xt = load(x_ref, masks.value).astype(jnp.float32)
        codes, absmax = quantize_tile(xt, valid_columns(xt.shape, col0, lay.length), lay, cb,
                                      tables, gpu_asm=uses_gpu_asm(interp))
        store(codes_ref, codes, masks.code)
        store(absmax_ref, absmax, masks.scale)

    codes, absmax = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((lay.rows, lay.code_cols), jnp.uint8),
                   jax.ShapeDtypeStruct((lay.rows, lay.nblocks), jnp.float32)),
        grid=lay.grid,
        in_specs=[value_spec] + [table_spec(t) for t in cb.tables],
        out_specs=(code_spec, scale_spec),
        interpret=interp,
        compiler_params=compiler_params(interp),
        name="quantize_blockwise",
    )(x.reshape(lay.rows, lay.length), *[jnp.asarray(t) for t in cb.tables])
    return QuantizedArray(codes=codes_from_2d(codes, lay),
                          absmax=absmax.reshape(absmax_shape(lay)), shape=tuple(x.shape),
                          dtype=x.dtype, block_size=int(block_size), codebook=cb.values,
                          bits=cb.bits)


# ----------------------------------------------------------------------------- dequantize

def _dequantize_fwd_impl(codes, absmax, q: QuantizedArray, interp: bool, tile_elems, lookup):
    cb = make_codebook(q.codebook, lookup=resolve_lookup(lookup, interp))
    lay = make_layout(q.shape, q.block_size, q.bits, interpret=interp, tile_elems=tile_elems)
    value_spec, code_spec, scale_spec = specs(lay)
    qq = QuantizedArray(codes=codes, absmax=absmax, shape=q.shape, dtype=q.dtype,
                        block_size=q.block_size, codebook=q.codebook, bits=q.bits)

    def kernel(codes_ref, absmax_ref, *refs):
        tables = refs[: len(cb.tables)]
        (out_ref,) = refs[len(cb.tables):]
        masks = tile_masks(lay, interp)
        out = dequantize_tile(load(codes_ref, masks.code), load(absmax_ref, masks.scale), lay,
                              cb, tables, q.dtype)
        store(out_ref, out, masks.value)

    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((lay.rows, lay.length), q.dtype),
        grid=lay.grid,
        in_specs=[code_spec, scale_spec] + [table_spec(t) for t in cb.tables],
        out_specs=value_spec,
        interpret=interp,
        compiler_params=compiler_params(interp),
        name="dequantize_blockwise",
    )(codes_2d(qq, lay), absmax.astype(jnp.float32).reshape(lay.rows, lay.nblocks),
      *[jnp.asarray(t) for t in cb.tables])
    return out.reshape(q.shape)


def _make_dequantize(q: QuantizedArray, interp: bool, tile_elems, lookup):
    @jax.custom_vjp
    def deq(codes, absmax):
        return _dequantize_fwd_impl(codes, absmax, q, interp, tile_elems, lookup)

    def fwd(codes, absmax):
        return deq(codes, absmax), (codes, absmax)

    def bwd(res, g):
        codes, absmax = res
        # The reference's autodiff w.r.t. absmax: the block sum of g * codebook[codes].
        ref = QuantizedArray(codes=codes, absmax=absmax, shape=q.shape, dtype=q.dtype,
                             block_size=q.block_size, codebook=q.codebook, bits=q.bits)
        _, vjp = jax.vjp(lambda a: _dequantize_ref(
            QuantizedArray(codes=codes, absmax=a, shape=ref.shape, dtype=ref.dtype,
                           block_size=ref.block_size, codebook=ref.codebook, bits=ref.bits)),
            absmax)
        (g_absmax,) = vjp(g)
        return np.zeros(codes.shape, jax.dtypes.float0), g_absmax

    deq.defvjp(fwd, bwd)
    return deq


def dequantize_blockwise(q: QuantizedArray, *, interpret: bool | None = None,
                         tile_elems: int | None = None, lookup: bool | None = None
                         ) -> jax.Array:
    """Pallas block-wise dequantization: ``codebook[codes] * absmax`` in ``q.dtype``; equal to
    :func:`effjax.quant.dequantize_blockwise` bit for bit. Differentiable w.r.t. ``q.absmax``
    (``jax.custom_vjp``; codes are integers and get no gradient).

    Example:
      >>> import jax.numpy as jnp
      >>> from effjax.quant import nf4_codebook, quantize_blockwise
      >>> from pallas_kernels.blockwise import dequantize_blockwise
      >>> q = quantize_blockwise(jnp.ones((4, 64)), codebook=nf4_codebook(), block_size=64)
      >>> float(dequantize_blockwise(q).sum())
      256.0
    """
    if not isinstance(q, QuantizedArray):
        raise TypeError(f"dequantize_blockwise needs a QuantizedArray, got {type(q).__name__}")
    interp = resolve_interpret(interpret)
    return _make_dequantize(q, interp, tile_elems, lookup)(q.codes, q.absmax)
