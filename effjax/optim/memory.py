"""Memory accounting for optimizer states."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effjax.quant import QuantizedArray


def _is_q(x):
    return isinstance(x, QuantizedArray)


def state_bytes(state) -> int:
    """Bytes held by the arrays of an optimizer state (codes, scales, float leaves, counts).

    Example:
      >>> import jax.numpy as jnp
      >>> from effjax.optim import adamw_8bit, state_bytes
      >>> state = adamw_8bit(1e-3).init({"w": jnp.zeros((256, 256))})
      >>> state_bytes(state)  # 2 x (65536 codes + 256 float32 scales) + step counter
      133124
    """
    return sum(state_bytes_breakdown(state).values())


def state_bytes_breakdown(state) -> dict[str, int]:
    """:func:`state_bytes` split by kind: ``codes`` (low-bit codes), ``scales`` (their block
    scales), ``float`` (floating leaves kept unquantized: small tensors, float moments) and
    ``other`` (integer counters and the like). The values sum to :func:`state_bytes`.

    Example:
      >>> import jax.numpy as jnp
      >>> from effjax.optim import adamw_8bit, state_bytes_breakdown
      >>> state = adamw_8bit(1e-3).init({"w": jnp.zeros((256, 256)), "b": jnp.zeros(256)})
      >>> state_bytes_breakdown(state)  # b: 2 float32 moments of 256
      {'codes': 131072, 'scales': 2048, 'float': 2048, 'other': 4}
    """
    out = dict(codes=0, scales=0, float=0, other=0)
    for leaf in jax.tree.leaves(state, is_leaf=_is_q):
        if _is_q(leaf):
            out["codes"] += int(leaf.codes.size * leaf.codes.dtype.itemsize)
            out["scales"] += int(leaf.absmax.size * leaf.absmax.dtype.itemsize)
        elif hasattr(leaf, "dtype") and hasattr(leaf, "size"):
            kind = "float" if jnp.issubdtype(leaf.dtype, jnp.floating) else "other"
            out[kind] += int(leaf.size) * leaf.dtype.itemsize
    return out
