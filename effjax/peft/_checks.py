"""Argument checks shared by the adapter methods' configs (one copy each).

Each check returns the normalized value (``int``, ``float``, ``bool``) and raises ``TypeError``
for a value of the wrong kind or ``ValueError`` for one out of range, with a message that
names the method and the field.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_int", "check_rank", "check_seed", "check_number", "check_alpha", "check_bool",
           "adapter_dtype", "as_float_kernel"]


def check_int(v: Any, name: str, lo: int, method: str) -> int:
    """``v`` as an int ``>= lo``; ``TypeError``/``ValueError`` naming ``method`` and ``name``."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{method} {name} must be an int, got {v!r}")
    if v < lo:
        raise ValueError(f"{method} {name} must be >= {lo}, got {v}")
    return int(v)


def check_rank(rank: Any, name: str) -> int:
    """A rank: an int >= 1 (``name`` is the method's name, for the message)."""
    return check_int(rank, "rank", 1, name)


def check_seed(seed: Any, method: str) -> int:
    """A PRNG seed: an int in ``[0, 2**32)``."""
    seed = check_int(seed, "seed", 0, method)
    if seed >= 2**32:
        raise ValueError(f"{method} seed must be < 2**32, got {seed}")
    return seed


def check_number(v: Any, name: str, method: str, *, positive: bool = False,
                 nonnegative: bool = False) -> float:
    """``v`` as a finite float (bools are not numbers here), ``> 0`` if ``positive``, ``>= 0``
    if ``nonnegative``."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.number)):
        raise TypeError(f"{method} {name} must be a number, got {v!r}")
    bound = " and > 0" if positive else " and >= 0" if nonnegative else ""
    if not math.isfinite(v) or (positive and not v > 0) or (nonnegative and not v >= 0):
        raise ValueError(f"{method} {name} must be finite{bound}, got {v}")
    return float(v)


def check_alpha(alpha: Any, name: str) -> float | None:
    """None or a finite nonzero number."""
    if alpha is None:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.number)):
        raise TypeError(f"{name} alpha must be None or a number, got {alpha!r}")
    if not math.isfinite(alpha) or alpha == 0:
        raise ValueError(f"{name} alpha must be finite and nonzero, got {alpha}")
    return float(alpha)


def check_bool(v: Any, name: str, method: str) -> bool:
    """``v``, which must be a bool."""
    if not isinstance(v, bool):
        raise TypeError(f"{method} {name} must be a bool, got {v!r}")
    return v


def adapter_dtype(dtype: Any, w_dtype: Any) -> jnp.dtype:
    """The config's dtype, or the kernel's dtype widened to float32 for 16-bit kernels."""
    if dtype is not None:
        return jnp.dtype(dtype)
    w_dtype = jnp.dtype(w_dtype)
    return jnp.dtype(jnp.float32) if w_dtype.itemsize < 4 else w_dtype


def as_float_kernel(w: Any, name: str) -> jax.Array:
    """``w`` as a jax array; ``TypeError`` unless it is floating."""
    w = jnp.asarray(w) if not isinstance(w, jax.Array) else w
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"{name} needs a floating kernel, got dtype {w.dtype}")
    return w
