"""Codebooks: the value tables that low-bit codes index into.

Every function returns a float32 ``numpy`` array (a host constant, so it can be used as
static metadata of a :class:`~effjax.quant.QuantizedArray` and baked into jitted code).
Values are normalized to ``[-1, 1]`` (signed) or ``[0, 1]`` (unsigned); a block's values are
``codebook[code] * absmax``.

References:
  * Dettmers, "8-Bit Approximations for Parallelism in Deep Learning", ICLR 2016 (dynamic map).
  * Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022.
  * Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", NeurIPS 2023 (NF4).
  * Li et al., "Memory Efficient Optimizers with 4-bit States", NeurIPS 2023 (4-bit maps).
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = [
    "dynamic_codebook",
    "linear_codebook",
    "nf4_codebook",
    "fp4_codebook",
    "adam4bit_first_moment_codebook",
    "adam4bit_second_moment_codebook",
    "check_codebook",
]


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """float32 ``linspace`` evaluated the way PyTorch's CPU kernel does.

    The step is a float32; the first half is ``start + step * i`` and the second half
    ``end - step * (steps - 1 - i)``, each with one rounding (a fused multiply-add, emulated
    exactly in float64). This makes the dynamic map equal value-for-value to bitsandbytes'.
    """
    start32, end32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start32], np.float32)
    step = np.float64(np.float32((end32 - start32) / np.float32(steps - 1)))
    idx = np.arange(steps, dtype=np.float64)
    low = np.float64(start32) + step * idx
    high = np.float64(end32) - step * (steps - 1 - idx)
    return np.where(idx < steps // 2, low, high).astype(np.float32)


@functools.cache
def _dynamic(signed: bool, bits: int, max_exponent_bits: int) -> np.ndarray:
    non_sign_bits = bits - 1
    if max_exponent_bits > non_sign_bits:
        raise ValueError(
            f"max_exponent_bits={max_exponent_bits} exceeds the {non_sign_bits} non-sign bits "
            f"of a {bits}-bit map"
        )
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    data: list[np.ndarray] = []

    def decade(scale_exp: int, items: int) -> None:
        bounds = _linspace_f32(0.1, 1.0, items)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        scale = np.float32(10.0**scale_exp)
        data.append(scale * means)
        if signed:
            data.append(-scale * means)

    for i in range(max_exponent_bits):
        shift = i + non_sign_bits - max_exponent_bits + (0 if signed else 1)
        decade(-(max_exponent_bits - 1) + i, 2**shift + 1)
    if additional_items > 0:
        decade(-(max_exponent_bits - 1) + max_exponent_bits - 1, additional_items + 1)
    values = np.concatenate(data + [np.array([0.0, 1.0], np.float32)]).astype(np.float32)
    if values.size != 2**bits:
        raise ValueError(f"dynamic map has {values.size} values, expected {2**bits}")
    values.sort()
    values.setflags(write=False)
    return values


def dynamic_codebook(signed: bool = True, bits: int = 8, max_exponent_bits: int | None = None):
    """Dettmers' dynamic tree map with ``2**bits`` sorted values.

    Decade ``i`` (``i = 0 .. E-1``, ``E = max_exponent_bits``) holds the midpoints of
    ``linspace(0.1, 1, 2**(i + bits - 1 - E [+1 if unsigned]) + 1)`` scaled by ``10**(i - E + 1)``
    (and their negatives when ``signed``); ``0`` and ``1`` complete the map. For ``bits=8`` the
    values equal ``bitsandbytes.functional.create_dynamic_map(signed)`` exactly; with
    ``bits=4, max_exponent_bits=3`` and ``signed=True`` they equal torchao's 4-bit first-moment map.

    Args:
      signed: include negative values (first moments) or not (second moments).
      bits: code width; ``2**bits`` values are returned.
      max_exponent_bits: number of decades; defaults to ``bits - 1``.

    Example:
      >>> cb = dynamic_codebook(signed=True)
      >>> cb.shape, round(float(cb.min()), 6), float(cb.max())
      ((256,), -0.992969, 1.0)
    """
    if bits not in (2, 3, 4, 5, 6, 7, 8):
        raise ValueError(f"bits must be in 2..8, got {bits!r}")
    return _dynamic(bool(signed), int(bits), int(bits - 1 if max_exponent_bits is None
                                                   else max_exponent_bits))


@functools.cache
def linear_codebook(bits: int = 8, signed: bool = True) -> np.ndarray:
    """Evenly spaced values: ``linspace(-1, 1, 2**bits)`` (signed) or ``linspace(0, 1, 2**bits)``.

    Note the signed map has no exact zero when ``2**bits`` is even; use
    :func:`dynamic_codebook` when zeros must be exact.

    Example:
      >>> [round(v, 6) for v in linear_codebook(2, signed=False).tolist()]
      [0.0, 0.333333, 0.666667, 1.0]
    """
    if bits not in (2, 3, 4, 5, 6, 7, 8):
        raise ValueError(f"bits must be in 2..8, got {bits!r}")
    values = _linspace_f32(-1.0 if signed else 0.0, 1.0, 2**bits)
    values.setflags(write=False)
    return values


_NF4 = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
     -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
     0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
     0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0],
    np.float32,
)
_NF4.setflags(write=False)


def nf4_codebook() -> np.ndarray:
    """The 16 NormalFloat4 values of QLoRA (quantiles of N(0, 1), exact zero, ``[-1, 1]``).

    Equal to bitsandbytes' ``get_4bit_type("nf4")`` in the same (code) order.

    Example:
      >>> float(nf4_codebook()[7])
      0.0
    """
    return _NF4


@functools.cache
def fp4_codebook() -> np.ndarray:
    """The 16 FP4 (E2M1, bias 2) values, divided by their maximum 12, in bit-pattern order.

    Code ``c`` has sign bit ``c >> 3``; equal to bitsandbytes' ``get_4bit_type("fp4")``.

    Example:
      >>> fp4_codebook()[:4].tolist()
      [0.0, 0.0052083334885537624, 0.6666666865348816, 1.0]
    """
    raw = np.array([0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0], np.float32)
    values = np.concatenate([raw, -raw]) / np.float32(12.0)
    values = values.astype(np.float32)
    values.setflags(write=False)
    return values


def adam4bit_first_moment_codebook() -> np.ndarray:
    """torchao's 4-bit AdamW first-moment map: ``dynamic_codebook(True, bits=4)``."""
    return dynamic_codebook(signed=True, bits=4, max_exponent_bits=3)


@functools.cache
def adam4bit_second_moment_codebook() -> np.ndarray:
    """torchao's 4-bit AdamW second-moment map: ``linspace(0, 1, 17)[1:]`` (no zero).

    Without a zero code, an all-zero block still dequantizes to zero (its absmax is 0) but an
    isolated zero in a non-zero block becomes ``absmax / 16``.
    """
    values = _linspace_f32(0.0, 1.0, 17)[1:].copy()
    values.setflags(write=False)
    return values


def _show(values) -> str:
    return "[" + ", ".join(f"{float(v):.9g}" for v in values) + "]"


@functools.cache
def _check(values: tuple[float, ...], name: str) -> tuple[float, ...]:
    arr = np.asarray(values, np.float32)
    if not 2 <= arr.size <= 256:
        raise ValueError(f"{name} needs 2..256 values, got {arr.size}")
    bad = arr[~np.isfinite(arr)]
    if bad.size:
        raise ValueError(f"{name} values must be finite, got {_show(bad[:8])}")
    bad = arr[np.abs(arr) > 1]
    if bad.size:
        raise ValueError(f"{name} values must lie in [-1, 1] (they are multiplied by the "
                         f"block's absmax), got {_show(bad[:8])}")
    if np.abs(arr).max() != 1:
        raise ValueError(f"{name} must contain 1 or -1 (its largest magnitude must be 1, so "
                         f"that a block's largest element decodes to itself), got largest "
                         f"magnitude {float(np.abs(arr).max()):.9g}")
    ordered = np.sort(arr, kind="stable")
    same = ordered[1:] == ordered[:-1]
    zero_pair = (ordered[1:] == 0) & (np.signbit(ordered[1:]) != np.signbit(ordered[:-1]))
    dup = ordered[1:][same & ~zero_pair]
    if dup.size:
        raise ValueError(f"{name} values must be distinct (a value repeated is a code that is "
                         f"never chosen), repeated: {_show(np.unique(dup)[:8])}")
    # Decision thresholds (midpoints of neighbours) closer than 2**-12 of their size would
    # need an exact-search table of more than 2**12 buckets per binade (search.bucket_table).
    t = (ordered[:-1].astype(np.float64) + ordered[1:]) / 2
    gap = t[1:] - t[:-1]
    near = gap < np.maximum(np.abs(t[1:]), np.abs(t[:-1])) * 2.0**-12
    if near.any():
        i = int(np.argmax(near))
        raise ValueError(f"{name} values {_show(ordered[i:i + 3])} are too close together: "
                         "the midpoints between neighbours must differ by at least 2**-12 of "
                         "their magnitude for the exact nearest-code search")
    return tuple(float(v) for v in arr)


def check_codebook(codebook, *, name: str = "codebook") -> tuple[float, ...]:
    """Validate a codebook; return its values as a tuple of float32 numbers (in its order).

    Rules, each with its own error naming the offending values: 2..256 finite values, all in
    ``[-1, 1]`` (codes are multiplied by the block's absmax), the largest magnitude equal to 1 (a
    block's largest element decodes to itself: signed maps hold 1 or -1, unsigned ones, all
    values >= 0, reach 1), all distinct (a repeated value is a code never
    chosen; ``+0`` and ``-0`` together count as distinct, as in FP4), and no three neighbours
    so close that the midpoints between them differ by less than ``2**-12`` of their
    magnitude (the exact search of :mod:`effjax.quant.search` builds a table whose size grows
    as that gap shrinks).
    The order is free: codes index the given order (FP4 is stored in bit-pattern order, and
    saved codes keep their meaning); the search sorts a copy. Every built-in codebook passes.

    Args:
      codebook: a sequence or array of values.
      name: how the error messages call it (e.g. ``"signed_codebook"``).

    Returns:
      The values as a tuple of Python floats (float32-exact), in the given order.

    Example:
      >>> check_codebook([-1.0, 0.0, 1.0])
      (-1.0, 0.0, 1.0)
      >>> try:
      ...     check_codebook([0.5] * 16, name="signed_codebook")
      ... except ValueError as e:
      ...     print(str(e)[:40])
      signed_codebook must contain 1 or -1 (it
    """
    try:
        array = np.asarray(codebook, np.float32).reshape(-1)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of numbers (e.g. effjax.quant.nf4_codebook()"
                        f"), got {codebook!r} ({type(codebook).__name__})") from None
    return _check(tuple(float(v) for v in array), str(name))
