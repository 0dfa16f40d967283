"""Memory accounting for optimizer states."""

from __future__ import annotations

import jax

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
    total = 0
    for leaf in jax.tree.leaves(state, is_leaf=_is_q):
        if _is_q(leaf):
            total += leaf.nbytes
        elif hasattr(leaf, "dtype") and hasattr(leaf, "size"):
            total += int(leaf.size) * leaf.dtype.itemsize
    return total
