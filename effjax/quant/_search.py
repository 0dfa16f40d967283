"""Exact nearest-code (and floor-code) search for sorted codebooks, without transcendentals.

For a codebook with sorted values ``v_0 <= ... <= v_{K-1}`` the nearest code of ``y`` is the
number of decision thresholds ``t_k = (v_k + v_{k+1}) / 2`` with ``y >= t_k`` (ties go up). The
thresholds are stored as the smallest float32 at or above the exact midpoint, so the float32
comparison ``y >= T_k`` is exactly ``y >= t_k`` and the result is the truly nearest code.

Small codebooks (``K <= 16``) count the thresholds directly (``K - 1`` vector compares). Large
ones use a bucket table keyed on the float's bits: the top ``m`` mantissa bits and the exponent
of ``|y|`` (plus the sign) pick a bucket that holds at most one threshold, so one table row
``(count of thresholds below the bucket, the threshold inside it)`` and one compare give the
count. ``m`` is the smallest width for which that holds; for the 8-bit dynamic map the table
has a few thousand rows and stays in L1 cache.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_DIRECT_MAX = 16


def _thresholds(values: np.ndarray, mode: str) -> np.ndarray:
    """float32 thresholds ``T`` such that ``y >= T_k`` <=> the code index exceeds ``k``."""
    if mode == "floor":
        return values[1:].astype(np.float32)
    mid = (values[:-1].astype(np.float64) + values[1:].astype(np.float64)) / 2.0  # exact
    t = mid.astype(np.float32)
    below = t.astype(np.float64) < mid
    t[below] = np.nextafter(t[below], np.float32(np.inf))
    return t


class _BucketTable(NamedTuple):
    shift: int  # 23 - mantissa bits kept
    q0: int  # bucket number of bucket 0's upper neighbour minus one
    buckets: int  # per sign
    rows: np.ndarray  # (2 * buckets, 2) float32: [count below, threshold inside or +inf]


def _bucket_bounds(mbits: int, q0: int, buckets: int) -> tuple[np.ndarray, np.ndarray]:
    shift = 23 - mbits
    starts = ((np.arange(buckets, dtype=np.int64) + q0) << shift).astype(np.uint32)
    lo = starts.view(np.float32).astype(np.float64)
    lo[0] = 0.0
    hi = np.append(lo[1:], np.inf)
    return lo, hi


def _try_table(t: np.ndarray, mbits: int, q0: int) -> _BucketTable | None:
    shift = 23 - mbits
    top = int(np.float32(2.0).view(np.int32)) >> shift  # buckets reach |y| = 2
    buckets = top - q0 + 1
    if buckets < 2:
        return None
    lo, hi = _bucket_bounds(mbits, q0, buckets)
    t64 = t.astype(np.float64)
    rows = np.zeros((2 * buckets, 2), np.float32)
    # positive side: y in [lo, hi)
    base = np.searchsorted(t64, lo, side="right")  # count(T <= lo)
    inside = np.searchsorted(t64, hi, side="left") - base  # T in (lo, hi)
    if inside.max() > 1:
        return None
    rows[:buckets, 0] = base
    first = np.minimum(base, t.size - 1)
    rows[:buckets, 1] = np.where(inside == 1, t[first], np.inf)
    # negative side: y in (-hi, -lo]
    base_n = np.searchsorted(t64, -hi, side="right")  # count(T <= -hi)
    inside_n = np.searchsorted(t64, -lo, side="right") - base_n  # T in (-hi, -lo]
    if inside_n.max() > 1:
        return None
    rows[buckets:, 0] = base_n
    first_n = np.minimum(base_n, t.size - 1)
    rows[buckets:, 1] = np.where(inside_n == 1, t[first_n], np.inf)
    return _BucketTable(shift, q0, buckets, rows)


@functools.cache
def _bucket_table(values: tuple[float, ...], mode: str) -> _BucketTable:
    t = _thresholds(np.asarray(values, np.float32), mode)
    for mbits in range(0, 20):
        # The largest q0 (smallest table) whose bucket 0 holds at most one threshold per side.
        lo_q, hi_q = 0, int(np.float32(1.0).view(np.int32)) >> (23 - mbits)
        best = None
        while lo_q <= hi_q:
            mid = (lo_q + hi_q) // 2
            table = _try_table(t, mbits, mid)
            if table is not None:
                best, lo_q = table, mid + 1
            else:
                hi_q = mid - 1
        if best is not None:
            return best
    raise ValueError("codebook thresholds are too close together for a bucket table")


def sorted_index(y: jax.Array, values: tuple[float, ...], mode: str = "nearest") -> jax.Array:
    """Index into the sorted codebook ``values``: nearest code (``mode='nearest'``, ties up)
    or the largest code ``<= y`` (``mode='floor'``, clamped to 0). ``y`` is float32; the
    result is int32. NaN maps to an arbitrary valid index."""
    if len(values) <= _DIRECT_MAX:
        t = _thresholds(np.asarray(values, np.float32), mode)
        idx = jnp.zeros(y.shape, jnp.int32)
        for tk in t.tolist():
            idx = idx + (y >= np.float32(tk)).astype(jnp.int32)
        return idx
    table = _bucket_table(values, mode)
    bits = jax.lax.bitcast_convert_type(y, jnp.int32)
    mag = jnp.bitwise_and(bits, 0x7FFFFFFF)
    q = jnp.clip(jnp.right_shift(mag, table.shift) - table.q0, 0, table.buckets - 1)
    q = q + jnp.where(bits < 0, table.buckets, 0)
    row = jnp.asarray(table.rows).at[q].get(mode="promise_in_bounds")
    return row[..., 0].astype(jnp.int32) + (y >= row[..., 1]).astype(jnp.int32)
