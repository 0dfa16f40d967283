"""Which axes of a kernel are input, output and batch (layers/experts) axes (shared by adapters
and weight quantization).

LoRA-family methods see a kernel as a stack of matrices :math:`W_s \\in \\mathbb{R}^{n_{in}
\\times n_{out}}` (Flax's ``x @ W`` convention), one per index ``s`` of the batch axes:

* ``nnx.Linear`` / ``nn.Dense`` kernel ``(in, out)``: in ``(0,)``, out ``(1,)`` (the default).
* ``nnx.LinearGeneral`` / ``nn.DenseGeneral`` query/key/value kernel ``(d, heads, head_dim)``:
  in ``(0,)``, out ``(1, 2)`` (the default: first axis in, the rest out).
* attention output kernel ``(heads, head_dim, d)``: set ``in_axes=(0, 1)``.
* stacked layers (``nn.scan``) or MoE experts ``(layers, in, out)``: ``batch_axes=(0,)``; each
  slice gets its own adapter. Axis numbers always refer to the full kernel.

Example:
  >>> lay = KernelLayout.resolve((8, 4, 16, 32), batch_axes=(0,), in_axes=(1, 2))
  >>> lay.batch_shape, lay.in_shape, lay.out_shape, lay.n_in, lay.n_out
  ((8,), (4, 16), (32,), 64, 32)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

__all__ = ["KernelLayout", "axes_field", "normalize_axes", "place_like"]


def normalize_axes(axes: Any, ndim: int, what: str) -> tuple[int, ...] | None:
    """``axes`` (None, an int or a sequence of ints) as sorted non-negative ints, or None."""
    if axes is None:
        return None
    axes = (axes,) if isinstance(axes, (int, np.integer)) else tuple(axes)
    out = []
    for a in axes:
        if isinstance(a, bool) or not isinstance(a, (int, np.integer)):
            raise TypeError(f"{what} entries must be ints, got {a!r}")
        if not -ndim <= a < ndim:
            raise ValueError(f"{what}={axes}: axis {a} is out of range for a {ndim}-d kernel")
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{what}={axes} repeats an axis")
    return tuple(sorted(out))


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelLayout:
    """A kernel's shape split into batch, input and output axes (each sorted, disjoint, and
    together all axes). Build it with :meth:`resolve`."""

    shape: tuple[int, ...]
    batch_axes: tuple[int, ...]
    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]

    @classmethod
    def resolve(cls, shape: Sequence[int], *, in_axes: Any = None, out_axes: Any = None,
                batch_axes: Any = (), method: str = "a LoRA-family method") -> KernelLayout:
        """Fill in the missing axes: batch ``()``; in: all non-batch axes not in ``out_axes``,
        or the first non-batch axis if neither is given; out: the remaining axes. ``method``
        names the method in errors."""
        shape = tuple(int(s) for s in shape)
        nd = len(shape)
        batch = normalize_axes(batch_axes, nd, "batch_axes") or ()
        ins = normalize_axes(in_axes, nd, "in_axes")
        outs = normalize_axes(out_axes, nd, "out_axes")
        rest = [a for a in range(nd) if a not in batch]
        if len(rest) < 2:
            raise ValueError(f"a kernel of shape {shape} with batch_axes={batch} has "
                             f"{len(rest)} non-batch axes; {method} needs at least 2 (in and out): "
                             f"target only kernels (a bias or a norm scale is 1-D)")
        for name, ax in (("in_axes", ins), ("out_axes", outs)):
            if ax is not None and set(ax) & set(batch):
                raise ValueError(f"{name}={ax} overlaps batch_axes={batch}")
        if ins is None and outs is None:
            ins = (rest[0],)
        if ins is None:
            ins = tuple(a for a in rest if a not in outs)
        if outs is None:
            outs = tuple(a for a in rest if a not in ins)
        if set(ins) & set(outs) or sorted(batch + ins + outs) != list(range(nd)) or not (
                ins and outs):
            raise ValueError(f"batch_axes={batch}, in_axes={ins}, out_axes={outs} must be "
                             f"disjoint, non-empty (in, out) and cover all axes of {shape}")
        return cls(shape=shape, batch_axes=batch, in_axes=ins, out_axes=outs)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in self.batch_axes)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in self.in_axes)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in self.out_axes)

    @property
    def n_batch(self) -> int:
        return math.prod(self.batch_shape)

    @property
    def n_in(self) -> int:
        return math.prod(self.in_shape)

    @property
    def n_out(self) -> int:
        return math.prod(self.out_shape)

    @property
    def _perm(self) -> tuple[int, ...]:
        return self.batch_axes + self.in_axes + self.out_axes

    def to_matrix(self, w: jax.Array) -> jax.Array:
        """``w`` as ``(*batch_shape, n_in, n_out)``."""
        return w.transpose(self._perm).reshape(self.batch_shape + (self.n_in, self.n_out))

    def from_matrix(self, m: jax.Array) -> jax.Array:
        """Inverse of :meth:`to_matrix`: ``(*batch_shape, n_in, n_out)`` back to ``shape``."""
        m = m.reshape(self.batch_shape + self.in_shape + self.out_shape)
        return m.transpose(tuple(int(i) for i in np.argsort(self._perm)))


def place_like(x: jax.Array, w: Any, dims: Sequence[int | None]) -> jax.Array:
    """Put ``x`` on ``w``'s devices, sharding ``x``'s dimension ``i`` like ``w``'s axis
    ``dims[i]`` (``None``: replicated).

    So a LoRA factor ``a`` of shape ``(in, r)`` for a kernel sharded ``P('x', 'y')`` gets
    ``P('x', None)`` and ``b`` ``(r, out)`` gets ``P(None, 'y')``; ``a @ b`` is then sharded
    like the kernel with no all-gather. Leaves ``x`` alone under tracing or for shardings other
    than ``NamedSharding`` and single-device ones.
    """
    sharding = getattr(w, "sharding", None) if isinstance(w, jax.Array) else None
    if sharding is None or isinstance(w, jax.core.Tracer):
        return x
    if isinstance(sharding, SingleDeviceSharding):
        return jax.device_put(x, sharding)
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (w.ndim - len(sharding.spec))
        new = PartitionSpec(*(None if d is None else spec[d] for d in dims))
        return jax.device_put(x, NamedSharding(sharding.mesh, new))
    return x


def axes_field(v: Any, name: str) -> tuple[int, ...] | None:
    """Normalize a config's axes field: None, an int or a tuple of ints -> None or a tuple."""
    if v is None:
        return None
    v = (v,) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else v
    if not isinstance(v, (tuple, list)) or not all(
            isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in v):
        raise TypeError(f"{name} must be None, an int or a tuple of ints, got {v!r}")
    return tuple(int(a) for a in v)
