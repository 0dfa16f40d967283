"""Fake quantization (quantize-dequantize) with a straight-through estimator, for QAT.

Quantization-aware training keeps float "master" weights and runs the forward pass on their
quantize-dequantize image, so the model learns weights that survive int4/int8 rounding.

**Symmetric (absmax), the default.** One scale per slice: the reduction axes are the ones that
share a scale (for a weight, every axis but the output channels; for an activation, the features
of a token). With :math:`q_{\\max} = 2^{b-1} - 1`,

.. math::

  s = \\frac{\\max_{\\text{slice}} |x|}{q_{\\max}}, \\qquad
  q = \\mathrm{clip}\\big(\\mathrm{round}(x / s),\\; -q_{\\max},\\; q_{\\max}\\big), \\qquad
  \\hat x = s\\, q .

The integer range is **symmetric**, :math:`[-7, 7]` for int4 (15 levels) and
:math:`[-127, 127]` for int8: the code :math:`-2^{b-1}` is never produced. This is the absmax
scheme of LLM-QAT, SmoothQuant (``quantize_activation_per_token_absmax``) and of Stable-SPAM's
INT4 activation quantizer (``utils/dummy_quant.py``, ``fake_topk_quantize``: scale
``absmax / (2**(b-1) - 1)``; its clamp to ``[-2**(b-1), 2**(b-1) - 1]`` can never reach
``-2**(b-1)`` with round-to-nearest since ``|x| / s <= q_max``). A slice of zeros has
:math:`s = 0` and gives exact zeros (no NaN); a slice holding NaN or inf gives NaN.

**Asymmetric (min-max with a zero point), ``symmetric=False``.** Stable-SPAM's INT4 weight
quantizer (``utils/act_weight_quantization.py``, ``_quantize_tensor``, itself AWQ's
``pseudo_quantize_tensor``), transcribed exactly, with :math:`q_{\\max} = 2^b - 1`:

.. math::

  s = \\frac{\\max(\\max x - \\min x,\\; 10^{-5})}{q_{\\max}}, \\quad
  z = \\mathrm{clip}\\big(-\\mathrm{round}(\\min x / s), 0, q_{\\max}\\big), \\quad
  \\hat x = s\\,\\big(\\mathrm{clip}(\\mathrm{round}(x / s) + z, 0, q_{\\max}) - z\\big).

16 levels for int4. Caveat inherited from that code: the zero point is clipped to
:math:`[0, q_{\\max}]`, so a slice whose values all have one sign cannot represent its own range
(an all-positive slice is clipped to :math:`[0, \\max x - \\min x]`); mixed-sign slices, the
normal case for weights, have error at most :math:`s/2`.

**Groups.** ``group_size=g`` splits each slice (its reduction axes flattened in order) into
groups of ``g`` consecutive elements with a scale each; a last group shorter than ``g`` is a
group of its own. For a Flax kernel ``(in, out)`` quantized per output channel this is exactly
Stable-SPAM's grouping of the PyTorch weight ``(out, in)`` into rows of 256 (their 4-bit run
uses ``--weight_group_size 256``; they reshape the flat tensor, so their groups straddle rows
when ``in % 256 != 0``, ours never do).

**Outliers.** ``outliers=k`` keeps the ``k`` largest-magnitude elements of each group in full
precision and computes the scale from the others (Stable-SPAM quantizes activations with
``topk = 2``).

**Gradient: identity straight-through estimator** (Bengio et al., 2013):
:math:`\\partial \\hat x / \\partial x = I` exactly, also for elements the asymmetric quantizer
clips (unclipped STE, as Stable-SPAM's ``w_q.detach() + w - w.detach()``). With absmax scales
nothing is clipped in the symmetric scheme, so the clipped STE would be the same estimator.
It is a ``jax.custom_jvp``: forward mode, reverse mode, ``jit`` and ``vmap`` all see it, and the
forward value is exactly :math:`\\hat x` (not ``x + (x_hat - x)``, which can be off by an ulp).

Arithmetic runs in float32 (float64 for float64 input) and the result is cast back to the
input dtype, so a bfloat16 result is the nearest bfloat16 to a grid value. The division by
:math:`q_{\\max}` is computed as a multiplication by the rounded reciprocal
:math:`\\mathrm{fl}(1/q_{\\max})` (what XLA compiles a division by a constant to; at most one ulp
from the quotient), so eager and jitted results are bitwise equal.

References:
  Huang et al., "Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam",
  arXiv:2502.17055, 2025; code github.com/TianjinYellow/StableSPAM.
  Liu et al., "LLM-QAT: Data-Free Quantization Aware Training for Large Language Models", 2023.
  Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression", MLSys 2024.
  Bengio, Léonard, Courville, "Estimating or Propagating Gradients Through Stochastic Neurons
  for Conditional Computation", 2013.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from effjax.selection import rewrite

__all__ = ["fake_quantize", "FakeQuant", "fake_quantize_params"]

_ASYM_MIN_RANGE = 1e-5  # Stable-SPAM / AWQ: scales = (max - min).clamp(min=1e-5) / max_int


def _check_bits(bits: Any) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"bits must be an int, got {type(bits).__name__} {bits!r}")
    if not 2 <= int(bits) <= 16:
        raise ValueError(f"bits must be in [2, 16], got {bits}")
    return int(bits)


def _check_group_size(group_size: Any) -> int | None:
    if group_size is None:
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
        raise TypeError(f"group_size must be None or an int, got {group_size!r}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    return int(group_size)


def _normalize_axes(axis: Any, ndim: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    out = []
    for a in axes:
        if isinstance(a, bool) or not isinstance(a, (int, np.integer)):
            raise TypeError(f"axis entries must be ints, got {a!r}")
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for shape {shape} (ndim {ndim})")
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"axis {axis} repeats an axis of shape {shape}")
    return tuple(sorted(out))


def _qdq(x, bits, axes, symmetric, group_size, outliers):
    """Quantize-dequantize ``x`` (no STE); see the module docstring for the equations."""
    ctype = jnp.promote_types(x.dtype, jnp.float32)
    keep = [a for a in range(x.ndim) if a not in axes]
    xt = jnp.transpose(x, keep + list(axes)).astype(ctype)
    lead = xt.shape[: len(keep)]
    n = math.prod(xt.shape[len(keep):])
    g = n if group_size is None else min(group_size, n)
    n_groups = -(-n // g)
    pad = n_groups * g - n
    flat = xt.reshape(lead + (n,))
    if pad:
        flat = jnp.pad(flat, [(0, 0)] * len(lead) + [(0, pad)], mode="edge")
    grp = flat.reshape(lead + (n_groups, g))
    include = (jnp.arange(n_groups * g) < n).reshape(n_groups, g)
    include = jnp.broadcast_to(include, grp.shape)
    is_outlier = None
    if outliers:
        mag = jnp.where(include, jnp.abs(grp), -1.0)
        _, idx = jax.lax.top_k(mag, outliers)
        is_outlier = jnp.any(jnp.arange(g) == idx[..., None], axis=-2)
        include = include & ~is_outlier
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        absmax = jnp.max(jnp.where(include, jnp.abs(grp), 0.0), axis=-1, keepdims=True)
        scale = absmax * (1.0 / qmax)
        safe = jnp.where(scale > 0, scale, 1.0)
        q = jnp.clip(jnp.round(grp / safe), -qmax, qmax)
        deq = q * scale
    else:
        qmax = 2**bits - 1
        any_in = jnp.any(include, axis=-1, keepdims=True)
        hi = jnp.max(jnp.where(include, grp, -jnp.inf), axis=-1, keepdims=True)
        lo = jnp.min(jnp.where(include, grp, jnp.inf), axis=-1, keepdims=True)
        hi, lo = jnp.where(any_in, hi, 0.0), jnp.where(any_in, lo, 0.0)
        scale = jnp.maximum(hi - lo, _ASYM_MIN_RANGE) * (1.0 / qmax)
        zero = jnp.clip(-jnp.round(lo / scale), 0, qmax)
        q = jnp.clip(jnp.round(grp / scale) + zero, 0, qmax)
        deq = (q - zero) * scale
    if is_outlier is not None:
        deq = jnp.where(is_outlier, grp, deq)
    out = deq.reshape(lead + (n_groups * g,))[..., :n].reshape(xt.shape)
    inverse = np.argsort(keep + list(axes))
    return jnp.transpose(out, inverse).astype(x.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4, 5))
def _fake_quant_ste(x, bits, axes, symmetric, group_size, outliers):
    return _qdq(x, bits, axes, symmetric, group_size, outliers)


@_fake_quant_ste.defjvp
def _fake_quant_ste_jvp(bits, axes, symmetric, group_size, outliers, primals, tangents):
    (x,), (t,) = primals, tangents
    return _fake_quant_ste(x, bits, axes, symmetric, group_size, outliers), t


# One compiled computation per (shape, dtype, config) in eager use; inlined under an outer jit.
_fake_quant_jit = jax.jit(_fake_quant_ste, static_argnums=(1, 2, 3, 4, 5))


def fake_quantize(
    x: jax.Array,
    *,
    bits: int,
    axis: int | Sequence[int] | None,
    symmetric: bool = True,
    group_size: int | None = None,
    outliers: int = 0,
) -> jax.Array:
    """Quantize-dequantize ``x`` with one scale per slice over ``axis``; STE gradient.

    Symmetric: :math:`\\hat x = s\\,\\mathrm{clip}(\\mathrm{round}(x/s), -q_{\\max}, q_{\\max})`,
    :math:`s = \\max|x| / q_{\\max}`, :math:`q_{\\max} = 2^{b-1}-1` (int4: levels -7..7).
    Asymmetric: Stable-SPAM's / AWQ's min-max quantizer with a zero point (int4: 16 levels).
    Gradient: :math:`\\partial \\hat x / \\partial x = I` (identity STE). Details, caveats and
    references are in the module docstring.

    Args:
      x: floating array.
      bits: 2..16.
      axis: the reduction axes sharing a scale (int, sequence, or None for the whole tensor):
        ``-1`` is per row (per token for activations ``(..., features)``); ``0`` is per output
        channel for a Flax kernel ``(in, out)``.
      symmetric: absmax scheme (default) or min-max with a zero point.
      group_size: split the flattened reduction axes into groups of this many consecutive
        elements with a scale each (the last group may be shorter). None: one group.
      outliers: keep this many largest-magnitude elements of each group unquantized and
        exclude them from the scale (must be smaller than the group).

    Returns:
      An array of ``x``'s shape and dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[0.7, -0.35, 0.1], [0.0, 0.0, 0.0]])
      >>> fake_quantize(x, bits=4, axis=-1)  # scales 0.1 and 0 (zero row stays zero)
      Array([[ 0.7, -0.4,  0.1],
             [ 0. ,  0. ,  0. ]], dtype=float32)
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"fake_quantize needs a floating array, got dtype {x.dtype}")
    bits = _check_bits(bits)
    group_size = _check_group_size(group_size)
    axes = _normalize_axes(axis, x.ndim, x.shape)
    if isinstance(outliers, bool) or not isinstance(outliers, (int, np.integer)) or outliers < 0:
        raise ValueError(f"outliers must be an int >= 0, got {outliers!r}")
    if x.size == 0:
        return x
    n = math.prod(x.shape[a] for a in axes)
    g = n if group_size is None else min(group_size, n)
    if outliers and outliers >= g:
        raise ValueError(
            f"outliers={outliers} must be smaller than the group of {g} elements "
            f"(shape {x.shape}, axis {axis}, group_size {group_size})")
    return _fake_quant_jit(x, bits, axes, bool(symmetric), group_size, int(outliers))


@dataclasses.dataclass(frozen=True, kw_only=True)
class FakeQuant:
    """Per-output-channel weight fake quantization (a rule value of :func:`fake_quantize_params`).

    The output axes ``channel_axis`` each get their own scale(s); every other axis is reduced:
    :math:`\\hat W = \\mathrm{fake\\_quantize}(W, \\text{axis} = \\text{all axes} \\setminus
    \\text{channel\\_axis})`. Output axes of common kernels:

    * ``nnx.Linear`` / ``nn.Dense`` kernel ``(in, out)``: ``channel_axis=-1`` (the default),
      one scale per column.
    * ``nnx.LinearGeneral`` / ``nn.DenseGeneral`` query/key/value kernel
      ``(d, heads, head_dim)``: ``channel_axis=(-2, -1)``, one scale per (head, head_dim)
      column. Leaving the default ``-1`` would share a scale across heads.
    * attention output kernel ``(heads, head_dim, d)``: ``channel_axis=-1``.
    * embedding table ``(vocab, d)``: ``channel_axis=0`` (one scale per token row).

    To reproduce Stable-SPAM's INT4 weights use ``FakeQuant(bits=4, symmetric=False,
    group_size=256)``.

    Attributes:
      bits: 2..16 (default 4).
      channel_axis: the output axis or axes (default -1).
      symmetric: absmax with levels :math:`\\pm(2^{b-1}-1)` (default) or min-max with zero point.
      group_size: groups of this many consecutive input elements per output channel, or None.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.array([[1.0, 0.1], [-0.6, 0.3], [0.26, -0.4]])  # (in, out)
      >>> FakeQuant(bits=2)(w)  # per column: scales 1.0 and 0.4, levels {-1, 0, 1}
      Array([[ 1. ,  0. ],
             [-1. ,  0.4],
             [ 0. , -0.4]], dtype=float32)
    """

    bits: int = 4
    channel_axis: int | tuple[int, ...] = -1
    symmetric: bool = True
    group_size: int | None = None

    def __post_init__(self):
        _check_bits(self.bits)
        _check_group_size(self.group_size)
        ca = self.channel_axis
        if isinstance(ca, (list, tuple)):
            object.__setattr__(self, "channel_axis", tuple(ca))
        elif isinstance(ca, bool) or not isinstance(ca, (int, np.integer)):
            raise TypeError(f"channel_axis must be an int or a tuple of ints, got {ca!r}")
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"symmetric must be a bool, got {self.symmetric!r}")

    def reduction_axes(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The axes of a weight of ``shape`` that share a scale (all but ``channel_axis``)."""
        channels = _normalize_axes(self.channel_axis, len(shape), tuple(shape))
        axes = tuple(a for a in range(len(shape)) if a not in channels)
        if not axes:
            raise ValueError(
                f"channel_axis={self.channel_axis} leaves no axis to reduce over for shape "
                f"{tuple(shape)} (every element would be its own channel)")
        return axes

    def __call__(self, w: jax.Array) -> jax.Array:
        """Fake-quantize ``w`` per output channel (STE gradient)."""
        w = jnp.asarray(w)
        return fake_quantize(w, bits=self.bits, axis=self.reduction_axes(w.shape),
                             symmetric=self.symmetric, group_size=self.group_size)


def fake_quantize_params(params: Any, rules: Mapping[str, FakeQuant | None]) -> Any:
    """Fake-quantize the leaves of a param tree chosen by ordered regex rules (STE gradient).

    For each leaf, the first rule whose regex **fullmatches** its ``'/'``-joined path
    (:func:`effjax.selection.path_str`, e.g. ``'params/Dense_0/kernel'`` for Linen,
    ``'blocks/0/up/kernel'``
    for an NNX ``State``) decides: a :class:`FakeQuant` gives :math:`\\hat W = Q(W)`, ``None``
    leaves the float weight. Leaves no rule matches are left unchanged. A rule that decides no
    leaf (it matches none, or only leaves an earlier rule claimed) raises ``ValueError``.

    The result has the input's tree structure (a Linen dict stays a dict, an ``nnx.State``
    stays a ``State``), and since each :math:`Q` has an identity STE,
    ``jax.grad(lambda p: loss(fake_quantize_params(p, rules)))(p)`` equals
    :math:`\\nabla L(\\hat W)`: the gradient at the quantized weights, applied to the float
    master weights (QAT as in LLM-QAT and Stable-SPAM's INT4 runs).

    Args:
      params: a pytree of arrays (Linen ``params`` dict, NNX ``State``, nested containers).
      rules: ordered mapping (or sequence of pairs) ``{regex: FakeQuant | None}``.

    Returns:
      A new tree; the inputs are not modified.

    Raises:
      TypeError: a rule value is not a FakeQuant/None, or a targeted leaf is not floating.
      ValueError: a bad regex, a rule that decides no leaf (the message lists close paths),
        or a targeted leaf whose shape does not fit the rule (the message names the path).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> params = {'dense': {'kernel': jnp.array([[0.9, -0.3], [0.31, 0.4]]),
      ...                     'bias': jnp.array([0.123, 0.0])}}
      >>> q = fake_quantize_params(params, {r'.*/bias': None, r'.*': FakeQuant(bits=2)})
      >>> q['dense']['kernel']  # per column scales 0.9 and 0.4; levels {-1, 0, 1}
      Array([[ 0.9, -0.4],
             [ 0. ,  0.4]], dtype=float32)
      >>> q['dense']['bias']
      Array([0.123, 0.   ], dtype=float32)
      >>> g = jax.grad(lambda p: fake_quantize_params(p, {r'.*kernel': FakeQuant(bits=2)})
      ...              ['dense']['kernel'].sum())(params)
      >>> g['dense']['kernel']  # straight-through: ones
      Array([[1., 1.],
             [1., 1.]], dtype=float32)
    """
    return rewrite(params, rules, lambda path, leaf, cfg: cfg(leaf), accept=FakeQuant,
                   what="a FakeQuant", floating=True)
