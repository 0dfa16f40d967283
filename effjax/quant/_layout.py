"""Shard-aware helpers of the block layout (see :mod:`effjax.quant.blockwise`).

* :func:`shard_counts`: how many shards each axis of an array is cut into (its concrete
  ``.sharding``, or under Explicit mesh axes the sharding in its type).
* :func:`flat_is_shard_local`: whether bitsandbytes' flat blocks already lie inside shards.
* :func:`reshape`: ``x.reshape(shape)`` that, under Explicit mesh axes, names the output's
  sharding (JAX cannot always infer it): a mesh axis stays on the leading axis of the group of
  axes it came from.
* :func:`grid_in` / :func:`grid_out`: ``(n_0 s_0, n_1 s_1, ...) <-> (n_0, n_1, ..., s_0, s_1,
  ...)``, the shard grid first, each shard's local array after it.
* :func:`take`: a table lookup ``table[idx]`` (a gather), typed like ``idx`` under Explicit axes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

__all__ = ["shard_counts", "flat_is_shard_local", "explicit_spec", "reshape", "grid_in",
           "grid_out", "take", "like_sharding"]


def _typed_sharding(x):
    try:
        return jax.typeof(x).sharding
    except (TypeError, AttributeError):
        return None


def explicit_spec(x) -> tuple[tuple, dict] | None:
    """``(spec per axis, mesh axis sizes)`` when ``x``'s type is sharded over Explicit mesh
    axes (then JAX checks shardings while tracing), else None."""
    sh = _typed_sharding(x)
    mesh = getattr(sh, "mesh", None)
    if mesh is None or not getattr(mesh, "axis_names", ()):
        return None
    explicit = {n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Explicit}
    if not explicit:
        return None
    spec = tuple(sh.spec) + (None,) * (jnp.ndim(x) - len(sh.spec))
    if all(e is None for e in spec):
        return None
    return spec, dict(mesh.shape)


def _names(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _count(entry, sizes) -> int:
    return math.prod(sizes[n] for n in _names(entry))


def shard_counts(x) -> tuple[int, ...]:
    """Shards per axis of ``x``: from its type under Explicit axes, else from a concrete
    array's ``.sharding`` (any sharding: ``shape // shard_shape``), else (a tracer under Auto
    axes, which carries no sharding; a numpy array) all ones."""
    shape = tuple(int(n) for n in np.shape(x))
    typed = explicit_spec(x)
    if typed is not None:
        spec, sizes = typed
        counts = tuple(_count(e, sizes) for e in spec)
    elif isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        try:
            local = x.sharding.shard_shape(x.shape)
        except Exception:  # noqa: BLE001 - an exotic sharding: treat as unsharded
            return (1,) * len(shape)
        counts = tuple(n // m if m else 1 for n, m in zip(shape, local))
    else:
        return (1,) * len(shape)
    return tuple(c if n else 1 for c, n in zip(counts, shape))


def flat_is_shard_local(shape, block_size: int, counts, bits: int, view, k: int) -> bool:
    """Whether every flat block (``view = block_view(shape, block_size)``, ``k`` trailing axes
    merged) lies inside one shard of a ``counts`` sharding, so that the flat layout needs no
    communication: sharded axes are leading (unmerged) axes, or the first merged axis cut into
    chunks of whole blocks, or the grouped axis cut into whole groups of rows; 4-bit codes also
    need an even number of elements of the last axis per shard (two codes share a byte)."""
    nd = len(shape)
    first = nd - k
    if any(counts[i] > 1 for i in range(first + 1, nd)):
        return False
    grouped = view[-1] != math.prod(shape[first:])  # rows grouped g at a time
    if counts[first] > 1:
        chunk = shape[first] // counts[first] * math.prod(shape[first + 1:])
        if grouped or chunk % block_size:
            return False
    if grouped:
        a = first - 1
        g = view[-1] // math.prod(shape[first:])
        if counts[a] > 1 and (shape[a] // counts[a]) % g:
            return False
    return not (bits == 4 and counts[-1] > 1 and (shape[-1] // counts[-1]) % 2)


def _view_spec(in_shape, spec, out_shape, sizes) -> tuple:
    """The output spec of a reshape that splits and merges groups of axes: a mesh axis on the
    leading axis of a group goes to the leading output axis of that group (when it divides it);
    any other placement is dropped (JAX then moves the data)."""
    out = [None] * len(out_shape)
    if 0 in in_shape:
        return tuple(out)
    i = j = 0
    while i < len(in_shape) or j < len(out_shape):
        i0, j0 = i, j
        pi = in_shape[i] if i < len(in_shape) else 1
        pj = out_shape[j] if j < len(out_shape) else 1
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                pi *= in_shape[i]
                i += 1
            else:
                pj *= out_shape[j]
                j += 1
        ins = [a for a in range(i0, min(i, len(in_shape))) if in_shape[a] != 1]
        outs = [b for b in range(j0, min(j, len(out_shape))) if out_shape[b] != 1]
        sharded = [a for a in range(i0, min(i, len(in_shape))) if spec[a] is not None]
        if len(sharded) == 1 and ins and outs and sharded[0] == ins[0]:
            entry = spec[sharded[0]]
            if out_shape[outs[0]] % _count(entry, sizes) == 0:
                out[outs[0]] = entry
    return tuple(out)


def reshape(x: jax.Array, shape) -> jax.Array:
    """``x.reshape(shape)``; under Explicit mesh axes with the output's sharding named."""
    shape = tuple(int(n) for n in shape)
    if tuple(x.shape) == shape:
        return x
    typed = explicit_spec(x)
    if typed is None:
        return x.reshape(shape)
    spec, sizes = typed
    out = _view_spec(tuple(x.shape), spec, shape, sizes)
    # A NamedSharding over x's own mesh, not a bare spec: no jax.set_mesh needed
    out_sharding = NamedSharding(jax.typeof(x).sharding.mesh, PartitionSpec(*out))
    return jax.lax.reshape(x, shape, out_sharding=out_sharding)


def grid_in(x: jax.Array, shards) -> jax.Array:
    """``(n_0 s_0, ..., n_{d-1} s_{d-1}) -> (n_0, ..., n_{d-1}, s_0, ..., s_{d-1})``."""
    d = len(shards)
    inter = sum(((c, n // c) for n, c in zip(x.shape, shards)), ())
    x = reshape(x, inter)
    return jnp.transpose(x, tuple(range(0, 2 * d, 2)) + tuple(range(1, 2 * d, 2)))


def grid_out(x: jax.Array, shards) -> jax.Array:
    """Inverse of :func:`grid_in` (the local axes may have any lengths)."""
    d = len(shards)
    x = jnp.transpose(x, tuple(a for i in range(d) for a in (i, d + i)))
    return reshape(x, tuple(c * n for c, n in zip(shards, x.shape[1::2])))


def take(table, idx: jax.Array) -> jax.Array:
    """``table[idx]`` for a host table and int32 ``idx`` (indices promised in bounds)."""
    table = jnp.asarray(table)
    if explicit_spec(idx) is None:
        return table.at[idx].get(mode="promise_in_bounds")
    return table.at[idx].get(mode="promise_in_bounds", out_sharding=jax.typeof(idx).sharding)


def like_sharding(x: jax.Array) -> dict:
    """``out_sharding=`` keywords for a new array shaped like ``x`` (jax.random, ...)."""
    return {} if explicit_spec(x) is None else {"out_sharding": jax.typeof(x).sharding}
