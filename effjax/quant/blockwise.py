"""Block-wise quantization: ``QuantizedArray``, ``quantize_blockwise``, ``dequantize_blockwise``.

A tensor is cut into blocks of ``block_size`` consecutive elements; each block stores its
``absmax = max |x|`` in float32 and each element the code of the codebook value nearest to
``x / absmax`` (computed as ``x * (1 / absmax)``, as bitsandbytes does):

    codes_i = argmin_c |codebook[c] - x_i * (1 / absmax_b)|,   x_i ~= codebook[codes_i] * absmax_b

Layout (flat, bitsandbytes'; chosen so that a parameter's sharding applies to its codes and
scales unchanged where shards hold whole blocks; see the shard-local layout below otherwise):

* ``codes`` has the parameter's shape (uint8); 4-bit codes are packed two per byte along the
  last axis (element ``2j`` in the high nibble, ``2j+1`` in the low nibble; an odd last axis is
  padded with one zero code), so the last axis is halved.
* Blocks run along the last axis: ``absmax.shape == x.shape[:-1] + (ceil(n / block_size),)``.
  A last block shorter than ``block_size`` is a block of its own.
* Exception, for memory: when the last axis is shorter than ``block_size`` (an attention kernel
  ``(d, heads, head_dim)`` with ``head_dim = 64``, a ``(rows, 3)`` table) trailing axes are
  merged until they hold at least ``block_size`` elements, and blocks run along the merged axis.
  Otherwise every short row would pay a full float32 scale (``head_dim = 64`` would cost 2.125
  instead of 2.016 bytes per parameter for two 8-bit moments). Such a parameter still shards
  shard-locally along its leading (unmerged) axes, and along a merged axis whenever each shard
  holds whole blocks. ``QuantizedArray.block_axes`` says how many trailing axes were merged.
* Exception, for memory and speed: when the (merged) last axis ``L`` is not a multiple of
  ``block_size`` (a hidden size of 384 or 576 with blocks of 256), ``g = block_size /
  gcd(L, block_size)`` consecutive rows are grouped into one row of ``g * L`` elements, which
  holds whole blocks (384: pairs of rows, 3 blocks; 576: four rows, 9 blocks), provided the
  axis before ``L`` is a multiple of ``g`` (else each row keeps a short last block). Otherwise
  every row would pay a scale for its short last block (384 wide: 2.042 instead of 2.031 bytes
  per parameter for two 8-bit moments; 576: 2.042) and the fused CPU/GPU steps, which need
  whole blocks, could not take the leaf. The blocks are then bitsandbytes' flat blocks, and the
  parameter shards shard-locally along that axis whenever each shard holds whole groups of
  ``g`` rows. :func:`block_view` gives the blocking view; ``absmax.shape`` is its leading axes
  plus the number of blocks (:func:`scales_shape`).

Shard-local layout (``QuantizedArray.shards``), for sharded arrays whose shards would cut
flat blocks (a ``(512, 384)`` leaf sharded ``P('x', 'y')`` on a 4 x 2 mesh: rows of 192 per
shard; ``(1000, 1000)``): with ``n_i`` shards along axis ``i`` (``s_i = N_i / n_i`` elements
each), the array is viewed as ``(n_0, s_0, n_1, s_1, ...)``, transposed to the shard grid
first, ``(n_0, n_1, ..., s_0, s_1, ...)``, and each shard's local array ``(s_0, s_1, ...)`` is
blocked as above (merged trailing axes, grouped rows). Every block lies inside one shard, so
quantizing, dequantizing and an optimizer step need no communication: ``codes`` keep the
parameter's shape and sharding (4-bit: each shard's last axis packed on its own) and
``absmax.shape == (n_0, n_1, ...) + scales_shape(local)``, sharded over the same mesh axes.
It costs at most a short last block per local row (``experiments/sharded_layout.py``: 2.031
bytes per parameter for two 8-bit moments of a 384-wide leaf, flat or shard-local).

* Which layout: :func:`quantize_blockwise` reads the shards per axis from its input (a
  concrete array's ``.sharding``; under Explicit mesh axes the sharding in its type, also
  inside jit) and keeps the flat layout wherever its blocks already lie inside shards
  (unsharded arrays, arrays sharded along leading axes, or along the blocked axis in chunks of
  whole blocks: :func:`shard_layout`); on one device the numbers are exactly the flat ones.
* The layout is static and stays: requantize with ``like=old`` (``quantize_state`` does), so
  the state's structure is the same at every step, and a state restored on another mesh (or
  one device) keeps its layout; it is then correct (the same numbers), merely not
  shard-local (the step moves data between devices). ``effjax.optim.relayout`` converts it
  to the new mesh's layout (one requantization).
* Under jit with Auto mesh axes a tracer carries no sharding: ``quantize_blockwise`` of a
  fresh array there gets the flat layout (a jitted ``init``, even with ``out_shardings``,
  gives the flat layout, and so does ``jax.eval_shape(opt.init, params)``, which orbax then
  refuses as a restore target for shard-local leaves). Call ``init`` eagerly on the sharded
  parameters (as usual), use Explicit axes, or pass ``shards=`` explicitly; for a restore
  target use ``effjax.optim.abstract_state``.

Scales (``scale_dtype``): float32 by default (bitsandbytes' and torchao's format). With
``scale_dtype=jnp.bfloat16`` each block stores the smallest bfloat16 ``s >= absmax`` (the float32
absmax rounded *up*, at most 2**-7 above it) and codes are found for ``x * (1 / s)``, so every
scaled value still lies in ``[-1, 1]``; this halves the scales' memory (8-bit moments with block
256: 2.016 instead of 2.031 bytes per element; 4-bit with block 128: 1.031 instead of 1.063) at
the cost of a codebook stretched by at most 2**-7 (0.8%) over the block's range. A block whose
absmax is above the largest finite bfloat16 (about 3.39e38) stores that value, and its
largest elements saturate to it (relative error below 2**-7).

Zero-size arrays quantize to empty codes and scales (``scales_shape`` gives their shape) and
dequantize to an empty array. A row that is a single block (a last axis, or merged axes,
shorter than ``block_size``) is never padded past its length, so a huge ``block_size`` costs
no memory (the scales are the same: padding zeros never change a block's ``max |x|``).

Non-finite input: a block holding NaN or +-inf gets ``absmax = NaN``, so every element of that
block dequantizes to NaN (loud, never a plausible wrong number); other blocks are unaffected.
An all-zero block has ``absmax = 0`` and dequantizes to exact zeros whatever the codebook.
Subnormal inputs count as zero on CPU (XLA flushes them), an absolute error below 2**-126.

References: Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from effjax.quant import _layout, search
from effjax.quant.codebooks import check_codebook

__all__ = ["QuantizedArray", "quantize_blockwise", "dequantize_blockwise", "block_layout",
           "block_view", "scales_shape", "codes_shape", "shard_layout",
           "round_scale", "SCALE_DTYPES"]

_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64)


def block_layout(shape: tuple[int, ...], block_size: int) -> tuple[int, int]:
    """Return ``(merged_axes, merged_length)`` of the blocking view of ``shape``.

    ``merged_axes`` trailing axes are flattened into one of length ``merged_length``; the
    smallest number of axes whose product reaches ``block_size`` (1 for most weights).

    Example:
      >>> block_layout((512, 8, 64), 256)
      (2, 512)
    """
    if len(shape) == 0:
        return 0, 1
    k, length = 1, shape[-1]
    while length < block_size and k < len(shape):
        k += 1
        length *= shape[-k]
    return k, length


def block_view(shape: tuple[int, ...], block_size: int) -> tuple[int, ...]:
    """The shape ``lead + (L,)`` an array of ``shape`` is viewed as (a free reshape) before its
    last axis is cut into blocks of ``block_size``; ``absmax.shape == lead + (ceil(L / block),)``.

    The trailing axes of :func:`block_layout` are merged into ``L``; if ``L`` is not a multiple
    of the block, ``g = block_size / gcd(L, block_size)`` consecutive rows are grouped into one
    (when the axis before divides by ``g``), so that every block is whole.

    Example:
      >>> block_view((512, 8, 64), 256), block_view((1536, 384), 256), block_view((3, 384), 256)
      ((512, 512), (768, 768), (3, 384))
    """
    shape = tuple(int(n) for n in shape)
    k, length = block_layout(shape, block_size)
    lead = shape[: len(shape) - k]
    if length % block_size and lead:
        g = block_size // math.gcd(length, block_size)
        if lead[-1] % g == 0:
            return lead[:-1] + (lead[-1] // g, g * length)
    return lead + (length,)


def scales_shape(shape: tuple[int, ...], block_size: int,
                 shards: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """``absmax.shape`` of an array of ``shape`` quantized in blocks of ``block_size``: the
    leading axes of :func:`block_view` plus the number of blocks (a short last one included).
    In the shard-local layout (``shards``, shards per axis) the shard grid comes first and
    each shard's local array is blocked as above.

    Example:
      >>> scales_shape((1536, 384), 256), scales_shape((3, 384), 256)
      ((768, 3), (3, 2))
      >>> scales_shape((512, 384), 256, shards=(4, 2))  # local (128, 192): merged, 96 blocks
      (4, 2, 96)
    """
    shape = tuple(int(n) for n in shape)
    if shards is not None:
        local = tuple(n // c for n, c in zip(shape, shards))
        return tuple(int(c) for c in shards) + scales_shape(local, block_size)
    view = block_view(shape, block_size)
    return view[:-1] + (-(-view[-1] // block_size),)


def codes_shape(shape: tuple[int, ...], bits: int,
                shards: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """``codes.shape``: ``shape``, with 4-bit codes' last axis halved (rounded up; per shard
    in the shard-local layout).

    Example:
      >>> codes_shape((8, 6), 4), codes_shape((8, 6), 4, shards=(1, 2))
      ((8, 3), (8, 4))
    """
    shape = tuple(int(n) for n in shape)
    if bits != 4 or not shape:
        return shape
    c = 1 if shards is None else int(shards[-1])
    return shape[:-1] + (c * -(-(shape[-1] // c) // 2),)


def shard_layout(shape: tuple[int, ...], block_size: int, counts, bits: int = 8
                 ) -> tuple[int, ...] | None:
    """The layout :func:`quantize_blockwise` picks for an array of ``shape`` cut into
    ``counts`` shards per axis: ``None`` (bitsandbytes' flat layout) when its blocks already
    lie inside shards (unsharded arrays; arrays sharded along leading axes, or along the
    blocked axis in chunks of whole blocks), else ``counts`` (the shard-local layout).

    Example:
      >>> shard_layout((512, 384), 256, (4, 1)), shard_layout((512, 384), 256, (4, 2))
      (None, (4, 2))
    """
    shape = tuple(int(n) for n in shape)
    counts = tuple(int(c) for c in counts)
    if len(counts) != len(shape) or any(c < 1 or n % c for n, c in zip(shape, counts)):
        raise ValueError(f"shards {counts} do not divide the shape {shape} axis by axis")
    if all(c == 1 for c in counts) or 0 in shape:
        return None
    k, _ = block_layout(shape, block_size)
    if _layout.flat_is_shard_local(shape, block_size, counts, bits,
                                   block_view(shape, block_size), k):
        return None
    return counts


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """Block-wise quantized array (a pytree: ``codes`` and ``absmax`` are its leaves).

    Attributes:
      codes: uint8 codes, shape ``shape`` (4-bit: last axis ``ceil(n / 2)``, two codes a byte).
      absmax: block scales (float32, or bfloat16 rounded up: see ``scale_dtype``), shape
        ``lead + (ceil(L / block_size),)`` where ``lead + (L,) == block_view(shape,
        block_size)`` (usually ``shape[:-1] + (ceil(shape[-1] / block_size),)``).
      shape, dtype: of the original array (``dequantize`` returns this dtype).
      block_size: elements per block.
      codebook: the code values, a tuple of float32 numbers (static, hashable).
      bits: 8 or 4.
      shards: the layout: ``None`` for the flat layout, else the shard-local layout's shards
        per axis (see the module docstring).
    """

    codes: jax.Array
    absmax: jax.Array
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: Any = dataclasses.field(metadata=dict(static=True))
    block_size: int = dataclasses.field(metadata=dict(static=True))
    codebook: tuple[float, ...] = dataclasses.field(metadata=dict(static=True))
    bits: int = dataclasses.field(metadata=dict(static=True))
    shards: tuple[int, ...] | None = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def block_axes(self) -> int:
        return block_layout(self.shape, self.block_size)[0]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held on device (codes + absmax)."""
        return int(self.codes.size * self.codes.dtype.itemsize
                   + self.absmax.size * self.absmax.dtype.itemsize)

    def dequantize(self) -> jax.Array:
        return dequantize_blockwise(self)


def _bits_for(n_codes: int) -> int:
    return 4 if n_codes <= 16 else 8


def _blocks(x: jax.Array, block_size: int, grid: int = 0):
    """View ``x`` (``grid`` shard-grid axes, then the array blocked) as ``grid + lead +
    (nblocks, width)``, zero-padded: ``width`` is ``block_size``, or the row's length when a
    row is one block (never padded past the row). Returns it, ``lead`` and the row length."""
    head, shape = tuple(x.shape[:grid]), tuple(x.shape[grid:])
    view = block_view(shape, block_size)
    lead, length = view[:-1], view[-1]
    nblocks = -(-length // block_size)
    width = length if nblocks == 1 else block_size
    flat = _layout.reshape(x, head + lead + (length,))
    pad = nblocks * width - length
    if pad:
        flat = jnp.pad(flat, [(0, 0)] * (len(head) + len(lead)) + [(0, pad)])
    return _layout.reshape(flat, head + lead + (nblocks, width)), lead, length


def _unblocks(b: jax.Array, lead: tuple[int, ...], length: int, shape, grid: int = 0):
    head = tuple(b.shape[:grid])
    flat = _layout.reshape(b, head + lead + (b.shape[-2] * b.shape[-1],))
    if flat.shape[-1] != length:
        flat = flat[..., :length]
    return _layout.reshape(flat, head + tuple(shape))


def _pack4(codes: jax.Array) -> jax.Array:
    if codes.shape[-1] % 2:
        codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, 1)])
    pairs = _layout.reshape(codes, codes.shape[:-1] + (codes.shape[-1] // 2, 2))
    return jnp.left_shift(pairs[..., 0], 4) | pairs[..., 1]


def _unpack4(packed: jax.Array, n: int) -> jax.Array:
    both = jnp.stack([jnp.right_shift(packed, 4), jnp.bitwise_and(packed, 15)], axis=-1)
    out = _layout.reshape(both, packed.shape[:-1] + (packed.shape[-1] * 2,))
    return out if out.shape[-1] == n else out[..., :n]


#: Dtypes a block scale can be stored in.
SCALE_DTYPES = (jnp.float32, jnp.bfloat16)


def check_scale_dtype(scale_dtype):
    """``scale_dtype`` as a numpy dtype, or a ``ValueError`` naming the accepted ones."""
    try:
        dt = jnp.dtype(scale_dtype)
    except TypeError:
        dt = None
    if dt not in [jnp.dtype(d) for d in SCALE_DTYPES]:
        raise ValueError(f"scale_dtype must be float32 or bfloat16, got {scale_dtype!r}")
    return dt


_BF16_MAX_BITS = 0x7F7F0000  # the largest finite bfloat16, as float32 bits


def round_scale(absmax: jax.Array, scale_dtype) -> jax.Array:
    """float32 block maxima -> the stored scales (in ``scale_dtype``).

    bfloat16: the smallest bfloat16 ``>= absmax`` (float32 bits rounded up to the top 16),
    capped at the largest finite bfloat16; NaN and inf stay, 0 stays 0.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([1.0, 1.001, 3.0e38, 3.4e38])  # the last: above the largest bfloat16
      >>> [float(v) for v in round_scale(x, jnp.bfloat16)]
      [1.0, 1.0078125, 3.00405527047391e+38, 3.3895313892515355e+38]
    """
    dt = check_scale_dtype(scale_dtype)
    if dt == jnp.float32:
        return absmax
    bits = jax.lax.bitcast_convert_type(absmax, jnp.uint32)
    up = (bits + np.uint32(0xFFFF)) & np.uint32(0xFFFF0000)
    up = jnp.minimum(up, np.uint32(_BF16_MAX_BITS))
    up = jax.lax.bitcast_convert_type(up, jnp.float32)
    return jnp.where(jnp.isfinite(absmax), up, absmax).astype(jnp.bfloat16)


def _check_args(x, block_size, rounding, key):
    if not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool) \
            or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    if rounding == "stochastic" and key is None:
        raise ValueError("rounding='stochastic' needs a PRNG key")
    if rounding == "stochastic" and not (
            isinstance(key, jax.Array) and (jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
                                            or (key.dtype == jnp.uint32 and key.shape == (2,)))):
        raise TypeError(f"key must be a PRNG key (e.g. jax.random.key(0)), got {key!r} "
                        f"({type(key).__name__})")
    if x.dtype not in _FLOATS:
        raise TypeError(f"quantize_blockwise needs a floating array, got dtype {x.dtype}")
    if x.ndim == 0:
        raise ValueError("quantize_blockwise needs at least one axis, got a scalar")


def _resolve_shards(x, shards, like, block_size, bits):
    if like is not None:
        if not isinstance(like, QuantizedArray):
            raise TypeError(f"like= needs a QuantizedArray, got {type(like).__name__}")
        if tuple(like.shape) != tuple(x.shape):
            raise ValueError(f"like= is a QuantizedArray of shape {like.shape}, but the array "
                             f"has shape {tuple(x.shape)}")
        return like.shards
    if shards is None:
        return None
    if isinstance(shards, str):
        if shards != "auto":
            raise ValueError(f"shards must be 'auto', None or a tuple of ints, got {shards!r}")
        return shard_layout(x.shape, block_size, _layout.shard_counts(x), bits)
    counts = tuple(int(c) for c in shards)
    shard_layout(x.shape, block_size, counts, bits)  # validates
    return None if all(c == 1 for c in counts) else counts


def quantize_blockwise(
    x: jax.Array,
    *,
    codebook=None,
    block_size: int | None = None,
    rounding: str = "nearest",
    key: jax.Array | None = None,
    scale_dtype=None,
    shards="auto",
    like: QuantizedArray | None = None,
) -> QuantizedArray:
    """Quantize ``x`` block-wise to the codes of ``codebook``.

    ``rounding="nearest"`` picks the truly nearest codebook value of ``x * (1 / absmax)`` (ties
    go to the larger value). ``rounding="stochastic"`` rounds to one of the two codebook values
    bracketing it with probabilities proportional to proximity, so ``E[dequantize] = x`` for
    values inside the codebook's range.

    Args:
      x: float32 / bfloat16 / float16 array with at least one axis (zero-size allowed).
      codebook: 2..256 distinct values in ``[-1, 1]``, largest magnitude 1 (any order; codes
        index this order; see :func:`effjax.quant.check_codebook`). 16 or fewer values are
        stored as 4-bit codes packed two per byte.
      block_size: elements per block (see the module docstring for the layout); default 256.
      rounding: ``"nearest"`` or ``"stochastic"``.
      key: PRNG key, required for stochastic rounding.
      scale_dtype: ``jnp.float32`` (default) or ``jnp.bfloat16`` (scales rounded up; see the
        module docstring).
      shards: the layout: ``"auto"`` (default) picks it from ``x``'s sharding (a concrete
        array's ``.sharding``, or the sharding in its type under Explicit mesh axes; a tracer
        under Auto axes has none and gets the flat layout) with :func:`shard_layout`; ``None``
        forces the flat layout; a tuple of shards per axis forces that shard-local layout.
      like: a :class:`QuantizedArray` of the same shape whose layout, codebook, block size and
        scale dtype are reused (the arguments left at ``None``): requantizing a state with
        ``like=old`` keeps its layout from step to step, even where ``x`` carries no sharding.

    Returns:
      A :class:`QuantizedArray`.

    Example:
      >>> import jax.numpy as jnp
      >>> from effjax.quant import dynamic_codebook, quantize_blockwise, dequantize_blockwise
      >>> x = jnp.linspace(-1.0, 1.0, 512).reshape(2, 256)
      >>> q = quantize_blockwise(x, codebook=dynamic_codebook(signed=True), block_size=256)
      >>> q.codes.dtype, q.absmax.shape
      (dtype('uint8'), (2, 1))
      >>> bool(jnp.abs(dequantize_blockwise(q) - x).max() < 0.01)
      True
      >>> q2 = quantize_blockwise(x * 2, like=q)  # same codebook, block and layout as q
    """
    x = jnp.asarray(x)
    if like is not None and isinstance(like, QuantizedArray):
        codebook = like.codebook if codebook is None else codebook
        block_size = like.block_size if block_size is None else block_size
        scale_dtype = like.absmax.dtype if scale_dtype is None else scale_dtype
    if codebook is None:
        raise TypeError("quantize_blockwise needs codebook= (or like= a QuantizedArray)")
    block_size = 256 if block_size is None else block_size
    _check_args(x, block_size, rounding, key)
    scale_dtype = check_scale_dtype(jnp.float32 if scale_dtype is None else scale_dtype)
    values = check_codebook(codebook)
    bits = _bits_for(len(values))
    block_size = int(block_size)
    shards = _resolve_shards(x, shards, like, block_size, bits)
    # Eagerly (a concrete array: init), one compiled program per leaf instead of one per op.
    run = _quantize_jit if not isinstance(x, jax.core.Tracer) else _quantize
    codes, stored = run(x, key, values=values, block_size=block_size, rounding=rounding,
                        scale_dtype=scale_dtype.name, shards=shards)
    return QuantizedArray(codes=codes, absmax=stored, shape=tuple(x.shape), dtype=x.dtype,
                          block_size=block_size, codebook=values, bits=bits, shards=shards)


def _quantize(x, key, *, values, block_size, rounding, scale_dtype, shards):
    """``(codes, stored scales)`` of :func:`quantize_blockwise` (arguments checked)."""
    bits = _bits_for(len(values))
    sorted_values = search.sorted_values_of(values)
    xf = x.astype(jnp.float32)
    grid = 0
    if shards is not None:
        xf, grid = _layout.grid_in(xf, shards), len(shards)
    local = tuple(xf.shape[grid:])
    xb, lead, length = _blocks(xf, block_size, grid)
    absmax = jnp.max(jnp.abs(xb), axis=-1)
    # NaN scale where the block holds NaN or inf: tested on the elements, since XLA:CPU's
    # reduce-max drops NaN in inputs of >= 4096 elements (openxla/xla#21461)
    absmax = jnp.where(jnp.all(jnp.isfinite(xb), axis=-1), absmax, jnp.nan)
    stored = round_scale(absmax, scale_dtype)
    absmax = stored.astype(jnp.float32)
    # 1/absmax is subnormal (flushed to 0 on CPU) above 2**126: pre-scale such blocks by 2**-4.
    # For every other block pre == 1 and y == x * (1 / absmax), bitsandbytes' expression.
    pre = jnp.where(absmax >= 2.0**125, np.float32(2.0**-4), np.float32(1.0))
    inv = jnp.where(absmax > 0, 1.0 / (absmax * pre), 0.0)
    y = (xb * pre[..., None]) * inv[..., None]
    if rounding == "nearest":
        idx = search.nearest_sorted(y, sorted_values)
    else:
        lo = search.floor_sorted(y, sorted_values)
        hi = jnp.minimum(lo + 1, len(values) - 1)
        v_lo = search.sorted_value(lo, sorted_values)
        v_hi = search.sorted_value(hi, sorted_values)
        gap = v_hi - v_lo
        p_up = jnp.where(gap > 0, jnp.clip((y - v_lo) / jnp.where(gap > 0, gap, 1.0), 0, 1), 0)
        up = jax.random.uniform(key, y.shape, **_layout.like_sharding(y)) < p_up
        idx = jnp.where(up, hi, lo)
    idx = search.to_codes(idx, values)
    codes = _unblocks(idx.astype(jnp.uint8), lead, length, local, grid)
    if bits == 4:
        codes = _pack4(codes)
    if shards is not None:
        codes = _layout.grid_out(codes, shards)
    return codes, stored


_quantize_jit = jax.jit(_quantize, static_argnames=("values", "block_size", "rounding",
                                                    "scale_dtype", "shards"))


def dequantize_blockwise(q: QuantizedArray, *, tables: bool | None = None) -> jax.Array:
    """Inverse of :func:`quantize_blockwise`: ``codebook[codes] * absmax`` in ``q.dtype``.

    ``tables`` picks how codes are decoded (a lookup table, or gather-free arithmetic for the
    dynamic and 16-value maps; ``None``: the backend's default); the result is the same.

    Example:
      >>> import jax.numpy as jnp
      >>> from effjax.quant import nf4_codebook, quantize_blockwise, dequantize_blockwise
      >>> q = quantize_blockwise(jnp.ones((4, 64)), codebook=nf4_codebook(), block_size=64)
      >>> float(dequantize_blockwise(q).sum())
      256.0
    """
    if not isinstance(q, QuantizedArray):
        raise TypeError(f"dequantize_blockwise needs a QuantizedArray, got {type(q).__name__}")
    if (not isinstance(q.block_size, (int, np.integer)) or isinstance(q.block_size, bool)
            or q.block_size < 1):
        raise ValueError(f"QuantizedArray of shape {q.shape} has block_size {q.block_size!r}; "
                         "it must be a positive int (was the array built by hand?)")
    want = scales_shape(q.shape, q.block_size, q.shards)
    layout = ("flat layout (block_view " f"{block_view(q.shape, q.block_size)})"
              if q.shards is None else f"shard-local layout over shards {q.shards}")
    if tuple(q.absmax.shape) != want:
        raise ValueError(
            f"QuantizedArray of shape {q.shape}, block {q.block_size}: absmax has shape "
            f"{tuple(q.absmax.shape)}, the {layout} needs {want}; was it written by another "
            "version of effjax's block layout?")
    want_codes = codes_shape(q.shape, q.bits, q.shards)
    if tuple(q.codes.shape) != want_codes:
        raise ValueError(
            f"QuantizedArray of shape {q.shape}, {q.bits}-bit: codes have shape "
            f"{tuple(q.codes.shape)}, the {layout} needs {want_codes}")
    if isinstance(q.codes, jax.core.Tracer) or isinstance(q.absmax, jax.core.Tracer):
        return _dequantize(q, tables)
    return _dequantize_jit(q, tables)


def _dequantize(q: QuantizedArray, tables):
    codes, grid = q.codes, 0
    local = tuple(q.shape)
    if q.shards is not None:
        codes, grid = _layout.grid_in(codes, q.shards), len(q.shards)
        local = tuple(n // c for n, c in zip(q.shape, q.shards))
    if q.bits == 4:
        codes = _unpack4(codes, local[-1])
    vals = search.value_at(codes, q.codebook, tables=tables)
    vb, lead, length = _blocks(vals, q.block_size, grid)
    out = vb * q.absmax.astype(jnp.float32)[..., None]
    out = _unblocks(out, lead, length, local, grid)
    if q.shards is not None:
        out = _layout.grid_out(out, q.shards)
    return out.astype(q.dtype)


_dequantize_jit = jax.jit(_dequantize, static_argnames=("tables",))
