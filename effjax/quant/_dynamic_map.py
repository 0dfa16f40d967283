"""Gather-free, bit-exact decode and nearest-code search for the 8-bit dynamic maps.

A Pallas kernel cannot capture a lookup table, so the kernels (and the jnp path on backends
other than CPU, see ``effjax.quant.search``) decode and encode the dynamic map by its construction:

* magnitude index ``p`` (0-based among the non-zero codes below 1) lies in decade
  ``i = floor(log2(p + 2**k)) - k`` at position ``j = p + 2**k - 2**(i + k)``, where ``k = 0``
  for the signed map (decade ``i`` holds ``2**i`` codes) and ``k = 1`` for the unsigned map;
* its value is ``S_i * (lin_j + lin_{j+1}) / 2`` with ``S_i = float32(10**(i - 6))`` and
  ``lin_t`` the float32 ``linspace(0.1, 1, n + 1)`` of PyTorch (``n = 2**(i + k)``), which is a
  once-rounded ``0.1 + step * t`` (first half) or ``1 - step * (n - t)`` (second half). Those
  are evaluated exactly in uint32 fixed point (units of ``2**-31``) and rounded once by the
  integer-to-float conversion, so every decoded value equals the table bit for bit
  (checked against the table in the tests) and no fused multiply-add can change it.

The search takes the floor code from the closed form (decade by six compares, position by one
multiply) and settles nearest-or-next with one exact midpoint test (an error-free TwoSum), so
the result is the truly nearest code, identical to the table search.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from effjax.quant.codebooks import dynamic_codebook

_DECADES = 7
_START32 = np.float32(0.1)
_D32 = np.float32(np.float32(1.0) - _START32)  # float32(1 - 0.1), the linspace range
_START_U = int(np.float64(_START32) * 2**31)  # 0.1f in units of 2**-31 (exact)
_D_MANT = int(np.float64(_D32) * 2**24)  # _D32 = _D_MANT * 2**-24 (exact)
_END0_U = 2**31 - _D_MANT * 2**7  # 1 - step * n in units of 2**-31, the same in every decade
_SCALES = [np.float32(10.0 ** (i - 6)) for i in range(_DECADES)]
_SCALES_2M32 = [np.float32(s * np.float32(2.0**-32)) for s in _SCALES]
assert _START_U == np.float64(_START32) * 2**31 and _D_MANT == np.float64(_D32) * 2**24


@functools.cache
def kind_of(values: tuple[float, ...]) -> int | None:
    """0 for the signed 8-bit dynamic map, 1 for the unsigned one, else None."""
    for k, signed in ((0, True), (1, False)):
        if values == tuple(float(v) for v in dynamic_codebook(signed=signed, bits=8)):
            return k
    return None


def _top(k: int) -> int:
    """Magnitude index of the code 1.0 (one past the last decade code)."""
    return 2 ** (_DECADES + k) - 2**k


def _select(i: jax.Array, table: list) -> jax.Array:
    out = jnp.full_like(i, table[0], dtype=jnp.float32)
    for d in range(1, len(table)):
        out = jnp.where(i == d, np.float32(table[d]), out)
    return out


def _lin_u(t: jax.Array, half: jax.Array, step_u: jax.Array) -> jax.Array:
    """PyTorch's float32 ``linspace(0.1, 1, n + 1)[t]`` for ``t < n``, in int32 fixed point.

    In units of 2**-31 the first half is ``0.1 + step * t`` and the second half
    ``1 - step * (n - t) = (1 - step * n) + step * t``; ``step * n`` is the same constant
    ``_D_MANT * 2**7`` in every decade, so both halves are one offset plus ``step * t`` and stay
    below 2**31. The int32-to-float32 conversion is then the single rounding of the fma.
    """
    return jnp.where(t < half, _START_U, _END0_U) + step_u * t


def magnitude(p: jax.Array, k: int) -> jax.Array:
    """Value of magnitude index ``p`` (int32, ``-1 <= p <= top``): 0 for -1, 1.0 for top."""
    top = _top(k)
    q = jnp.clip(p, 0, top - 1) + 2**k
    ik = jnp.right_shift(jax.lax.bitcast_convert_type(q.astype(jnp.float32), jnp.int32), 23) - 127
    n = jnp.left_shift(1, ik)  # codes in this decade; q - n is the position in it
    j = q - n
    half = jnp.right_shift(n + 1, 1)
    step_u = jnp.left_shift(_D_MANT, 7 - ik)
    lo = _lin_u(j, half, step_u).astype(jnp.float32)
    hi = jnp.where(j + 1 == n, np.float32(2.0**31), _lin_u(j + 1, half, step_u).astype(jnp.float32))
    # S_i * ((lo + hi) * 2**-31 * 0.5) == (S_i * 2**-32) * (lo + hi): power-of-two scalings
    # are exact, so the value is rounded exactly as the table was built.
    value = _select(ik - k, _SCALES_2M32) * (lo + hi)
    value = jnp.where(p < 0, np.float32(0.0), value)
    return jnp.where(p >= top, np.float32(1.0), value)


def decode(idx: jax.Array, k: int) -> jax.Array:
    """Codebook value of sorted index ``idx`` (int32) of the dynamic map of kind ``k``."""
    if k == 0:
        neg = idx < 127
        p = jnp.where(neg, 126 - idx, idx - 128)
        mag = magnitude(p, 0)
        return jnp.where(neg, -mag, mag)
    return magnitude(idx - 1, 1)


def _at_or_above_mid(a, v1, v2, strict):
    """``a >= (v1 + v2) / 2`` (``>`` if ``strict``) decided exactly in float32."""
    s = v1 + v2
    bb = s - v1
    err = (v1 - (s - bb)) + (v2 - bb)  # v1 + v2 == s + err exactly (TwoSum)
    d = a * np.float32(2.0) - s
    return jnp.where(strict, d > err, d >= err)


def nearest(y: jax.Array, k: int) -> jax.Array:
    """Sorted index (int32) of the code nearest to ``y`` (float32); ties go to the larger
    value, exactly as the threshold search does.

    The closed form gives the floor candidate ``f`` (largest code ``<= |y|``); it can be off by
    one only when ``|y|`` is within a few ulp of a code value, where the answer is that code
    whichever of its neighbours is taken as ``f``. One exact midpoint test between codes ``f``
    and ``f + 1`` then settles the nearest code.
    """
    top = _top(k)
    neg = y < 0
    a = jnp.abs(y)
    i = jnp.zeros_like(y, jnp.int32)
    for d in range(1, _DECADES):
        i = i + (a >= np.float32(10.0 ** (d - 7))).astype(jnp.int32)
    n = jnp.left_shift(1, i + k)
    inv_scale = _select(i, [np.float32(10.0 ** (6 - d)) for d in range(_DECADES)])
    r = (a * inv_scale - _START32) * (n.astype(jnp.float32) / _D32) - np.float32(0.5)
    r = jnp.clip(r, -1.0, 2.0**8)  # keeps NaN and out-of-range values inside int range
    j = jnp.clip(jnp.floor(r).astype(jnp.int32), -1, n - 1)
    p = jnp.clip(n - 2**k + j, -1, top - 1)
    v_lo = magnitude(p, k)
    v_hi = magnitude(p + 1, k)
    if k == 0:  # no -1.0 in the signed map: a negative value never rounds to magnitude 1
        v_hi = jnp.where(neg & (p + 1 >= top), np.float32(np.inf), v_hi)
    # Positive values tie towards the larger magnitude, negative ones towards the smaller.
    p = p + _at_or_above_mid(a, v_lo, v_hi, neg).astype(jnp.int32)
    if k == 0:
        return jnp.where(neg, 126 - p, 128 + p)
    return jnp.where(neg, 0, p + 1)
