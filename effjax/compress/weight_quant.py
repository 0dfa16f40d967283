"""Weight quantization of param trees: formats, the ``QuantizedWeight`` node, ``quantize_params``.

A frozen base model stored in 4 bits (QLoRA's NF4 with double quantization: 4.127 bits per
parameter) or 8 bits; the adapters train on top (:mod:`effjax.peft`). The numbers are
:mod:`effjax.quant.weights`' transcriptions of the anchors, so the bytes of an NF4/FP4 weight
equal ``bitsandbytes.functional.quantize_4bit`` of the matching PyTorch weight.

**Layout.** A kernel's contraction (input) axes run last in its *row view*: with the kernel's
:class:`~effjax.quant.kernel_layout.KernelLayout` (batch, in, out axes), the row view is the
kernel transposed to ``(*batch, *out, *in)`` and reshaped to ``(rows, K)``, ``K = n_in``; for
a Flax ``Dense`` kernel ``(in, out)`` it is ``W.T``, exactly the ``[out, in]`` weight PyTorch
stores, so blocks run along the input axis as in bitsandbytes. Attention kernels
``(d, heads, head_dim)`` contract over ``d`` (the default: first axis in), an output kernel
``(heads, head_dim, d)`` needs ``in_axes=(0, 1)``, stacked (scanned) layers ``(layers, in,
out)`` need ``batch_axes=(0,)``.

* 4-bit: ``codes`` are the packed bytes, ``(rows, K // 2)`` when each row holds whole blocks
  (``K % block_size == 0``), else flat ``(ceil(n / 2),)`` with bitsandbytes' blocks crossing
  rows; ``scales`` one per block, ``(rows, K // block_size)`` or ``(n_blocks,)``.
* int8: ``codes`` int8 ``(rows, K)``, ``scales`` ``(rows,)`` (one per output channel).
* int4: ``codes`` packed ``(rows, K // 2)`` (flat ``(ceil(n / 2),)`` for an odd ``K``),
  ``scales`` (and ``mins``, asymmetric) ``(rows, ceil(K / group_size))``: a row's last group
  may be shorter.
* Double quantization (``double_quant=True``): ``scales`` hold the uint8 codes of the scales,
  ``scales_absmax`` the nested float32 block maxima (one per 256 scales) and ``scales_offset``
  their mean (bitsandbytes' ``absmax``, ``nested_absmax``, ``offset``).

Exactness: an eager ``materialize`` gives bitsandbytes' ``dequantize_4bit`` values bit for bit.
Compiled (inside ``jit``), XLA:CPU may fuse double quantization's ``dyn[c] * a + offset`` into
one FMA, so some block scales are 1 ulp from bitsandbytes' two roundings (the codes are the
same). Sharding: a kernel sharded over Auto mesh axes quantizes under ``jit`` as on one device;
one sharded over Explicit axes is gathered first, and the node's arrays come out replicated.

Example:
  >>> import jax, jax.numpy as jnp
  >>> params = {'dense': {'kernel': jax.random.normal(jax.random.key(0), (128, 32)),
  ...                     'bias': jnp.zeros(32)}}
  >>> q = quantize_params(params, {r'.*/kernel': NF4(block_size=64, double_quant=True)})
  >>> node = q['dense']['kernel']
  >>> node.codes.shape, node.scales.shape, node.scales.dtype
  ((32, 64), (32, 2), dtype('uint8'))
  >>> w = materialize(q)['dense']['kernel']
  >>> bool(jnp.abs(w - params['dense']['kernel']).max() < 0.5)
  True
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from effjax.quant import weights as wq
from effjax.quant.kernel_layout import KernelLayout, axes_field
from effjax.selection import rewrite, tree_paths

__all__ = ["WeightFormat", "NF4", "FP4", "Int8", "Int4", "QuantizedWeight", "quantize_params",
           "materialize", "is_quantized", "dense_weight", "quantize_weight",
           "quantization_report", "bits_per_parameter"]

_SCALE_DTYPES = ("float32", "float16", "bfloat16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeightFormat:
    """Shared fields of every weight format (a rule value of :func:`quantize_params`).

    Attributes:
      double_quant: store the block scales in 8 bits (bitsandbytes' nested quantization).
      in_axes, batch_axes: the kernel's contraction and batch axes (see the module
        docstring); default: the first axis in, no batch axes.
    """

    double_quant: bool = False
    in_axes: Any = None
    batch_axes: Any = ()
    kind: ClassVar[str] = ""

    def __post_init__(self):
        if not isinstance(self.double_quant, bool):
            raise TypeError(f"double_quant must be a bool, got {self.double_quant!r}")
        object.__setattr__(self, "in_axes", axes_field(self.in_axes, "in_axes"))
        object.__setattr__(self, "batch_axes", axes_field(self.batch_axes, "batch_axes") or ())

    @property
    def block(self) -> int:
        """Elements per scale along the contraction axis (0: the whole row)."""
        return 0

    def layout(self, shape) -> KernelLayout:
        return KernelLayout.resolve(shape, in_axes=self.in_axes, batch_axes=self.batch_axes,
                                    method=f"{type(self).__name__} weight quantization")


def _check_block(name: str, value, lo: int, hi: int):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not (
            lo <= value <= hi) or value & (value - 1):
        raise ValueError(f"{name} must be a power of two in [{lo}, {hi}], got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class _FourBit(WeightFormat):
    block_size: int = 64
    double_quant: bool = True

    def __post_init__(self):
        super().__post_init__()
        _check_block("block_size", self.block_size, 32, 4096)

    @property
    def block(self) -> int:
        return self.block_size


@dataclasses.dataclass(frozen=True, kw_only=True)
class NF4(_FourBit):
    """4-bit NormalFloat (QLoRA; bitsandbytes' ``quant_type="nf4"``): 16 quantiles of a
    normal distribution, one float32 absmax per ``block_size`` (32 .. 4096) weights along the
    contraction axis; ``double_quant`` (default on, as QLoRA) stores the absmax in 8 bits.
    4.5 bits per parameter at block 64, 4.127 with double quantization."""

    kind: ClassVar[str] = "nf4"


@dataclasses.dataclass(frozen=True, kw_only=True)
class FP4(_FourBit):
    """4-bit float (bitsandbytes' ``quant_type="fp4"``, its ``Linear4bit`` default): sign,
    2 exponent bits, 1 mantissa bit; block scales as :class:`NF4`."""

    kind: ClassVar[str] = "fp4"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Int8(WeightFormat):
    """int8 weights with one absmax per output channel (bitsandbytes' LLM.int8 weight format,
    ``int8_vectorwise_quant``): ``q = round(x 127 / s)``, 8.25 bits per parameter for a row of
    128 (8 + 32 / K)."""

    kind: ClassVar[str] = "int8"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Int4(WeightFormat):
    """int4 weights with one scale per ``group_size`` weights along the contraction axis.

    ``symmetric=True``: torchao's symmetric int4 (range [-8, 7], scale ``max|x| / 7.5``).
    ``symmetric=False``: GGUF's Q4_1 (``x ~ q d + min``, q in 0..15; ``group_size=32`` with
    ``scale_dtype="float16"`` is exactly Q4_1). ``scale_dtype``: float32, float16, bfloat16.
    """

    group_size: int = 128
    symmetric: bool = True
    scale_dtype: str = "float32"
    kind: ClassVar[str] = "int4"

    def __post_init__(self):
        super().__post_init__()
        _check_block("group_size", self.group_size, 8, 4096)
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"symmetric must be a bool, got {self.symmetric!r}")
        name = jnp.dtype(self.scale_dtype).name if not isinstance(self.scale_dtype, str) \
            else self.scale_dtype
        if name not in _SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {_SCALE_DTYPES}, "
                             f"got {self.scale_dtype!r}")
        object.__setattr__(self, "scale_dtype", name)

    @property
    def block(self) -> int:
        return self.group_size


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A quantized kernel (a pytree node; its arrays are the children, the rest is static).

    Attributes:
      codes: packed 4-bit codes (uint8) or int8 codes, in the row view (module docstring).
      scales: block scales (float), or their uint8 codes under double quantization.
      scales_absmax, scales_offset: the nested scales and offset (double quantization), else
        None.
      mins: per-group minima (asymmetric int4), else None.
      shape, dtype: the original kernel's (``materialize`` returns this dtype).
      format: the :class:`WeightFormat` (static).
    """

    codes: jax.Array
    scales: jax.Array
    scales_absmax: jax.Array | None
    scales_offset: jax.Array | None
    mins: jax.Array | None
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: Any = dataclasses.field(metadata=dict(static=True))
    format: WeightFormat = dataclasses.field(metadata=dict(static=True))

    @property
    def layout(self) -> KernelLayout:
        return self.format.layout(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of every stored array."""
        return sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(self))

    def __getitem__(self, index: Any) -> QuantizedWeight:
        """``node[...]`` is the node itself (an NNX layer reads its ``Param`` as
        ``param[...]``; an intercepted layer must get the node, not a dense copy)."""
        if index is Ellipsis:
            return self
        raise TypeError(f"QuantizedWeight of shape {self.shape} ({self.format}): only "
                        f"node[...] is supported; use .materialize() for the dense kernel")

    def __jax_array__(self):
        raise TypeError(
            f"a QuantizedWeight of shape {self.shape} ({self.format}) reached code that needs "
            f"a dense array: a layer that does not read structured kernels (wrap an NNX model "
            f"with effjax.nn.adapted_layers(model); run a Linen model inside "
            f"effjax.nn.linen_adapted_layers(); only Linear/Dense, LinearGeneral/DenseGeneral "
            f"and Einsum layers can), or an op on the weight itself: materialize(tree) first "
            f"for a dense copy")

    def block_scales(self) -> jax.Array:
        """The float32 block scales (double quantization undone)."""
        if self.scales_absmax is None:
            return self.scales.astype(jnp.float32)
        return wq.double_dequantize(self.scales, self.scales_absmax, self.scales_offset)

    def row_view(self, dtype=jnp.float32, scales: jax.Array | None = None) -> jax.Array:
        """The dequantized row view ``(rows, K)`` in ``dtype`` (``scales``: the float32
        block scales if already computed)."""
        lay = self.layout
        rows, k = lay.n_batch * lay.n_out, lay.n_in
        f = self.format
        s = self.block_scales() if scales is None else scales
        if isinstance(f, _FourBit):
            flat = wq.dequantize_4bit(self.codes, s.ravel(), kind=f.kind,
                                      block_size=f.block_size, n=rows * k, dtype=dtype)
            return flat.reshape(rows, k)
        if isinstance(f, Int8):
            return wq.dequantize_int8_rows(self.codes, s, dtype)
        codes = wq.unpack_nibbles(self.codes, rows * k).reshape(rows, k)
        return wq.dequantize_int4_groups(codes, s, self.mins, dtype, group=f.group_size)

    def materialize(self) -> jax.Array:
        """The dequantized kernel, in its original shape and dtype (eagerly: one compiled
        program per node structure)."""
        if any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(self)):
            return _dense(self)
        # the scales op by op: compiled, XLA:CPU fuses double quantization's dyn[c] * a + offset
        # into one FMA (1 ulp from bitsandbytes' two roundings in some blocks)
        return _dense_jit(self, self.block_scales())


def _dense(node: QuantizedWeight, scales: jax.Array | None = None) -> jax.Array:
    return from_row_view(node.row_view(scales=scales), node.layout).astype(node.dtype)


_dense_jit = jax.jit(_dense)


def to_row_view(w: jax.Array, lay: KernelLayout) -> jax.Array:
    """The kernel as ``(rows, K)``: axes ``(*batch, *out, *in)``, contraction last."""
    perm = lay.batch_axes + lay.out_axes + lay.in_axes
    return jnp.transpose(w, perm).reshape(lay.n_batch * lay.n_out, lay.n_in)


def from_row_view(m: jax.Array, lay: KernelLayout) -> jax.Array:
    """Inverse of :func:`to_row_view`."""
    perm = lay.batch_axes + lay.out_axes + lay.in_axes
    m = m.reshape(lay.batch_shape + lay.out_shape + lay.in_shape)
    return jnp.transpose(m, tuple(int(i) for i in np.argsort(perm)))


def quantize_weight(w: jax.Array, fmt: WeightFormat) -> QuantizedWeight:
    """One kernel quantized in ``fmt`` (what :func:`quantize_params` does to each targeted
    leaf; errors name the shape, not a path).

    Example:
      >>> import jax.numpy as jnp
      >>> quantize_weight(jnp.ones((64, 3)), NF4()).codes.shape
      (3, 32)
    """
    if not isinstance(fmt, WeightFormat):
        raise TypeError(f"fmt must be a WeightFormat (NF4(), FP4(), Int8(), Int4()), got "
                        f"{type(fmt).__name__}")
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"quantize_weight needs a floating kernel, got dtype {w.dtype}")
    return _quantize(w, fmt)


def _quantize(w: jax.Array, fmt: WeightFormat) -> QuantizedWeight:
    lay = fmt.layout(w.shape)
    k = lay.n_in
    if fmt.block and fmt.block > k:
        raise ValueError(f"{type(fmt).__name__} block of {fmt.block} is longer than the "
                         f"contraction axes {lay.in_shape} (K = {k}) of this kernel: use a "
                         f"block of at most {1 << (k.bit_length() - 1)} (or check in_axes)")
    if not isinstance(w, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(w))):
        bad = int(jnp.sum(~jnp.isfinite(w)))
        raise ValueError(f"{bad} non-finite value(s) in the kernel: a quantized weight would "
                         "decode them to NaN for whole blocks")
    run = _encode if isinstance(w, jax.core.Tracer) else _encode_jit
    arrays = run(wq.replicated_if_explicit(w), fmt)
    return QuantizedWeight(*arrays, shape=tuple(w.shape), dtype=jnp.dtype(w.dtype), format=fmt)


def _encode(w: jax.Array, fmt: WeightFormat):
    """The arrays of a :class:`QuantizedWeight` (arguments checked)."""
    lay = fmt.layout(w.shape)
    rows, k = lay.n_batch * lay.n_out, lay.n_in
    m = to_row_view(w, lay)
    mins = None
    if isinstance(fmt, _FourBit):
        codes, scales = wq.quantize_4bit(m, kind=fmt.kind, block_size=fmt.block_size)
        if k % fmt.block_size == 0:
            codes, scales = codes.reshape(rows, k // 2), scales.reshape(rows, -1)
    elif isinstance(fmt, Int8):
        codes, scales = wq.quantize_int8_rows(m)
    else:
        q, scales, mins = wq.quantize_int4_groups(m, group=fmt.group_size,
                                                   symmetric=fmt.symmetric,
                                                   scale_dtype=fmt.scale_dtype)
        codes = wq.pack_nibbles(q)
        codes = codes.reshape(rows, k // 2) if k % 2 == 0 else codes
    nested = offset = None
    if fmt.double_quant:
        scales, nested, offset = wq.double_quantize(scales)
    return codes, scales, nested, offset, mins


# eagerly (a concrete kernel), one compiled program per (shape, dtype, format)
_encode_jit = jax.jit(_encode, static_argnames=("fmt",))


def quantize_params(params: Any, rules: Any) -> Any:
    """Quantize the leaves of a param tree chosen by ordered regex rules.

    The first rule whose regex fullmatches a leaf's path decides (:mod:`effjax.selection`): a
    :class:`WeightFormat` (:class:`NF4`, :class:`FP4`, :class:`Int8`, :class:`Int4`) gives a
    :class:`QuantizedWeight`, ``None`` keeps the leaf; a rule that decides no leaf is an error
    listing the closest paths. Embeddings, norms and biases stay as they are unless a rule
    targets them (QLoRA quantizes the linear layers only).

    Args:
      params: a pytree of arrays (Linen ``params``, NNX ``State``).
      rules: ordered ``{regex: WeightFormat | None}``.

    Returns:
      The tree with :class:`QuantizedWeight` nodes; :func:`materialize` undoes it.

    Raises:
      TypeError: a targeted leaf is not a floating array.
      ValueError: a 1-D leaf, a block longer than the contraction axes, non-finite weights;
        each message names the leaf's path, shape and dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> p = {'w': jnp.ones((64, 4)), 'b': jnp.zeros(4)}
      >>> q = quantize_params(p, {'w': Int8()})
      >>> q['w'].codes.dtype, materialize(q)['w'].sum().item()
      (dtype('int8'), 256.0)
    """
    return rewrite(params, rules, lambda path, leaf, fmt: _quantize(jnp.asarray(leaf), fmt),
                   accept=WeightFormat, what="a WeightFormat", floating=True,
                   is_leaf=is_quantized)


def is_quantized(x: Any) -> bool:
    """True for :class:`QuantizedWeight` nodes (an ``is_leaf`` predicate)."""
    return isinstance(x, QuantizedWeight)


def dense_weight(x: Any) -> Any:
    """``x.materialize()`` for a :class:`QuantizedWeight`, ``x`` itself otherwise (what an
    adapter node uses as its dense base).

    Example:
      >>> import jax.numpy as jnp
      >>> q = quantize_params({'w': jnp.ones((64, 2))}, {'w': Int8()})['w']
      >>> dense_weight(q).shape, dense_weight(jnp.ones(3)).shape
      ((64, 2), (3,))
    """
    return x.materialize() if is_quantized(x) else x


def materialize(tree: Any) -> Any:
    """Every :class:`QuantizedWeight` replaced by its dequantized kernel (same shape, dtype)."""
    return jax.tree.map(lambda x: x.materialize() if is_quantized(x) else x, tree,
                        is_leaf=is_quantized)


def bits_per_parameter(node: QuantizedWeight) -> float:
    """Stored bits per weight of a quantized kernel (codes, scales, nested statistics).

    Example:
      >>> import jax.numpy as jnp
      >>> q = quantize_params({'w': jnp.ones((4096, 64))}, {'w': NF4(double_quant=True)})
      >>> round(bits_per_parameter(q['w']), 3)  # 4 + 8/64 + 32/(64*256) + 32/n
      4.127
    """
    return 8 * node.nbytes / node.size


def quantization_report(tree: Any) -> str:
    """A table of every leaf: format, bits per parameter, bytes; and the totals.

    Example:
      >>> import jax.numpy as jnp
      >>> q = quantize_params({'w': jnp.ones((128, 64)), 'b': jnp.zeros(64)},
      ...                     {'w': NF4(double_quant=False)})
      >>> print(quantization_report(q))  # doctest: +NORMALIZE_WHITESPACE
      path  format                    params  bits/param  bytes
      b     float32                       64      32.000    256
      w     nf4 b64                     8192       4.500   4608
      total                             8256       4.713   4864
      quantized leaves: 8192 params, 4.500 bits/param (0.141 of their original bytes)
    """
    paths, leaves, _ = tree_paths(tree, is_leaf=is_quantized)
    rows, n_all, b_all, n_q, b_q, b_q_orig = [], 0, 0, 0, 0, 0
    for path, leaf in zip(paths, leaves):
        if is_quantized(leaf):
            f = leaf.format
            name = f.kind + (f" b{f.block}" if f.block else " per-row")
            if isinstance(f, Int4):
                name += " sym" if f.symmetric else f" asym {f.scale_dtype}"
            name += " +dq" if f.double_quant else ""
            n, b = leaf.size, leaf.nbytes
            n_q, b_q, b_q_orig = n_q + n, b_q + b, b_q_orig + n * leaf.dtype.itemsize
        else:
            name, n = str(leaf.dtype), int(np.size(leaf))
            b = n * leaf.dtype.itemsize
        rows.append((path, name, n, 8 * b / max(n, 1), b))
        n_all, b_all = n_all + n, b_all + b
    w = max([len(r[0]) for r in rows] + [5])
    lines = [f"{'path':<{w}}  {'format':<22} {'params':>9}  {'bits/param':>10}  {'bytes':>5}"]
    lines += [f"{p:<{w}}  {f:<22} {n:>9}  {bits:>10.3f}  {b:>5}" for p, f, n, bits, b in rows]
    lines.append(f"{'total':<{w}}  {'':<22} {n_all:>9}  {8 * b_all / max(n_all, 1):>10.3f}  "
                 f"{b_all:>5}")
    if n_q:
        lines.append(f"quantized leaves: {n_q} params, {8 * b_q / n_q:.3f} bits/param "
                     f"({b_q / b_q_orig:.3f} of their original bytes)")
    return "\n".join(lines)
