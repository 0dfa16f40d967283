"""Exact nearest-code search for sorted codebooks, without transcendentals.

Public for kernels (:mod:`pallas_kernels`), which must find the same codes bit for bit.

For a codebook with sorted values ``v_0 <= ... <= v_{K-1}`` the nearest code of ``y`` is the
number of decision thresholds ``t_k = (v_k + v_{k+1}) / 2`` with ``y >= t_k`` (ties go up). The
thresholds are stored as the smallest float32 at or above the exact midpoint, so the float32
comparison ``y >= T_k`` is exactly ``y >= t_k`` and the result is the truly nearest code.

Small codebooks (``K <= 16``) count the thresholds directly (``K - 1`` vector compares). Large
ones use a bucket table keyed on the float's bits: the top ``m`` mantissa bits and the exponent
of ``|y|`` (plus the sign) pick a bucket that holds at most one threshold, so one table row
``(count of thresholds below the bucket, the threshold inside it)`` and one compare give the
count. ``m`` is the smallest width for which that holds.

Two ways to evaluate the same exact answer (``tables``):

* ``tables=True``: one-dimensional lookup tables. The bucket table is stored as two 1-D arrays
  (counts, thresholds) and read with two scalar gathers; decoding reads the values table. On
  XLA:CPU a 1-D gather from a table that fits in L1 costs about one vectorized op, whereas the
  previous ``(rows, 2)`` row gather was not vectorized (13.5 ms vs 2.9 ms for 8M elements,
  ``experiments/bench_optim.py``'s machine), so this is the default on CPU.
* ``tables=False``: no tables. The 8-bit dynamic maps use their closed form
  (``_dynamic_map``), 16-value codebooks count thresholds and decode with a chain of selects.
  The Pallas kernels in interpret mode use this (a kernel cannot capture a table constant;
  compiled on a GPU they read tables passed as inputs instead), and it is the default on
  backends other than CPU and GPU, where it has not been measured against gathers.

Both give bit-identical codes and values (tested).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from effjax.quant import _dynamic_map, _layout

__all__ = ["BucketTable", "bucket_table", "sort_order", "sorted_values_of", "nearest_sorted",
           "floor_sorted", "sorted_value", "value_at", "to_codes", "dynamic_map_kind",
           "default_tables"]

dynamic_map_kind = _dynamic_map.kind_of  # which 8-bit dynamic map a codebook is (or None)

_DIRECT_MAX = 16


def _thresholds(values: np.ndarray) -> np.ndarray:
    """float32 thresholds ``T`` such that ``y >= T_k`` <=> the nearest code index exceeds ``k``."""
    mid = (values[:-1].astype(np.float64) + values[1:].astype(np.float64)) / 2.0  # exact
    t = mid.astype(np.float32)
    below = t.astype(np.float64) < mid
    t[below] = np.nextafter(t[below], np.float32(np.inf))
    return t


class BucketTable(NamedTuple):
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


def _try_table(t: np.ndarray, mbits: int, q0: int) -> BucketTable | None:
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
    return BucketTable(shift, q0, buckets, rows)


@functools.cache
def bucket_table(values: tuple[float, ...]) -> BucketTable:
    t = _thresholds(np.asarray(values, np.float32))
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


def default_tables() -> bool:
    """Whether the jnp path reads lookup tables by default: on CPU (see the module docstring)
    and on GPU, where they were faster too: on an H100 the unfused 8-bit AdamW step went from
    1.78x to 1.30x ``optax.adamw``'s time at 1e8 elements (each ratio measured within one run of
    ``experiments/bench_kernels.py``; the later run also synchronized once per 5 steps instead
    of every step, which moves both times, so the gain is approximate)."""
    return jax.default_backend() in ("cpu", "gpu")


def _resolve(tables: bool | None) -> bool:
    return default_tables() if tables is None else bool(tables)


@functools.cache
def _split_table(values: tuple[float, ...]) -> tuple[BucketTable, np.ndarray, np.ndarray]:
    table = bucket_table(values)
    return table, table.rows[:, 0].astype(np.int32), np.ascontiguousarray(table.rows[:, 1])


def _table_index(y: jax.Array, values: tuple[float, ...], tables: bool = False) -> jax.Array:
    if len(values) <= _DIRECT_MAX and not tables:
        t = _thresholds(np.asarray(values, np.float32))
        idx = jnp.zeros_like(y, jnp.int32)
        for tk in t.tolist():
            idx = idx + (y >= np.float32(tk)).astype(jnp.int32)
        return idx
    table, counts, thresholds = _split_table(values)
    bits = jax.lax.bitcast_convert_type(y, jnp.int32)
    mag = jnp.bitwise_and(bits, 0x7FFFFFFF)
    q = jnp.clip(jnp.right_shift(mag, table.shift) - table.q0, 0, table.buckets - 1)
    q = q + jnp.where(bits < 0, table.buckets, 0)
    count = _layout.take(counts, q)
    inside = _layout.take(thresholds, q)
    return count + (y >= inside).astype(jnp.int32)


def _values_select(idx: jax.Array, values) -> jax.Array:
    out = jnp.full_like(idx, np.float32(values[0]), jnp.float32)
    for c in range(1, len(values)):
        out = jnp.where(idx == c, np.float32(values[c]), out)
    return out


def _gather(values, idx: jax.Array) -> jax.Array:
    return _layout.take(np.asarray(values, np.float32), idx)


def sorted_value(idx: jax.Array, sorted_values: tuple[float, ...], *,
                 tables: bool | None = None) -> jax.Array:
    """``sorted_values[idx]`` (float32) for int32 ``idx``; gather-free if not ``tables``."""
    if _resolve(tables):
        return _gather(sorted_values, idx)
    kind = _dynamic_map.kind_of(sorted_values)
    if kind is not None:
        return _dynamic_map.decode(idx, kind)
    if len(sorted_values) <= _DIRECT_MAX:
        return _values_select(idx, sorted_values)
    return _gather(sorted_values, idx)


def nearest_sorted(y: jax.Array, sorted_values: tuple[float, ...], *,
                   tables: bool | None = None) -> jax.Array:
    """Index (int32) of the value of ``sorted_values`` nearest to float32 ``y`` (ties go to the
    larger value). NaN maps to index 0, whichever strategy runs."""
    tables = _resolve(tables)
    kind = None if tables else _dynamic_map.kind_of(sorted_values)
    idx = (_dynamic_map.nearest(y, kind) if kind is not None
           else _table_index(y, sorted_values, tables))
    return jnp.where(jnp.isnan(y), 0, idx)


def floor_sorted(y: jax.Array, sorted_values: tuple[float, ...], *,
                 tables: bool | None = None) -> jax.Array:
    """Index of the largest value ``<= y`` (0 below the smallest value)."""
    idx = nearest_sorted(y, sorted_values, tables=tables)
    above = sorted_value(idx, sorted_values, tables=tables) > y
    return jnp.maximum(idx - above.astype(jnp.int32), 0)


def value_at(codes: jax.Array, values: tuple[float, ...], *,
             tables: bool | None = None) -> jax.Array:
    """``values[codes]`` as float32 (codes in the codebook's own order)."""
    if _resolve(tables):
        return _gather(values, codes.astype(jnp.int32))
    order = sort_order(values)
    if order is None:
        return sorted_value(codes.astype(jnp.int32), values, tables=False)
    if len(values) <= _DIRECT_MAX:
        return _values_select(codes.astype(jnp.int32), values)
    return _gather(values, codes.astype(jnp.int32))


@functools.cache
def sort_order(values: tuple[float, ...]):
    """``(sorted_values, original index of each sorted position)``; None if already sorted."""
    arr = np.asarray(values, np.float32)
    order = np.argsort(arr, kind="stable")
    if np.array_equal(order, np.arange(order.size)):
        return None
    return tuple(float(v) for v in arr[order]), tuple(int(i) for i in order)


def to_codes(sorted_idx: jax.Array, values: tuple[float, ...], *,
             tables: bool | None = None) -> jax.Array:
    """Map sorted positions back to codes in the codebook's own order (int32)."""
    order = sort_order(values)
    if order is None:
        return sorted_idx
    if len(values) <= _DIRECT_MAX and not _resolve(tables):
        out = jnp.zeros_like(sorted_idx, jnp.int32)
        for pos, code in enumerate(order[1]):
            if code:
                out = jnp.where(sorted_idx == pos, code, out)
        return out
    return _layout.take(np.asarray(order[1], np.int32), sorted_idx)


def sorted_values_of(values: tuple[float, ...]) -> tuple[float, ...]:
    order = sort_order(values)
    return values if order is None else order[0]
