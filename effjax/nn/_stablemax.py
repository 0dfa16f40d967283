"""StableMax and its cross-entropy: a softmax whose exponential is replaced by a ramp.

Prieto, Barsbey, Mediano & Birdal, "Grokking at the Edge of Numerical Stability", ICLR 2025,
arXiv:2501.04697, Sec. 4. With

    s(x) = x + 1        for x >= 0
    s(x) = 1 / (1 - x)  for x <  0

StableMax is ``StableMax(x)_i = s(x_i) / sum_j s(x_j)`` and the loss is its cross-entropy
``-log StableMax(x)_y``. ``s`` grows linearly instead of exponentially, so the probabilities do
not saturate to exactly 0 and 1 in floating point (Softmax Collapse) when the logits grow.

The official code (``utils.py``: ``s``, ``log_stablemax``, ``stablemax_cross_entropy``,
LucasPrietoAl/grokking-at-the-edge-of-numerical-stability @ 0cc9e8d) casts the logits to float64
and computes ``log(s(x) / sum s(x))`` with ``1 / (1 - x + 1e-30)`` on the negative side. Here the
same function is computed in float32 (or the input's wider dtype) in log space:

    log s(x) = log1p(x) for x >= 0,  -log1p(-x) for x < 0,
    log StableMax(x)_i = log s(x_i) - logsumexp_j(log s(x_j)),

which neither overflows nor loses the small probabilities, and whose gradient
``1 / (1 + |x|)`` per ``log s`` term stays finite for logits up to the float32 range.

Unlike softmax, StableMax is not invariant to a shift of the logits (``s(x + c)`` is not
proportional to ``s(x)``); it preserves their order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["log_s", "stablemax", "log_stablemax", "stablemax_cross_entropy"]


def _float(x):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"logits must be floating point, got dtype {x.dtype}")
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def log_s(x):
    """``log s(x)``: ``log1p(x)`` for ``x >= 0``, ``-log1p(-x)`` for ``x < 0``.

    Each branch only sees the inputs it is selected for, so neither its value nor its gradient
    can be NaN. Computed in float32 or wider.

    Example:
      >>> import jax.numpy as jnp
      >>> from effjax.nn import log_s
      >>> jnp.exp(log_s(jnp.array([-3.0, 0.0, 3.0])))  # s = 1/4, 1, 4
      Array([0.25, 1.  , 4.  ], dtype=float32)
    """
    x = _float(x)
    pos = x >= 0
    return jnp.where(pos, jnp.log1p(jnp.where(pos, x, 0.0)), -jnp.log1p(jnp.where(pos, 0.0, -x)))


def log_stablemax(logits, axis: int = -1):
    """``log StableMax(x)_i = log s(x_i) - log sum_j s(x_j)`` along ``axis`` (float32 or wider).

    Example:
      >>> import jax.numpy as jnp, numpy as np
      >>> from effjax.nn import log_stablemax
      >>> np.exp(np.asarray(log_stablemax(jnp.array([0.0, 1.0, 2.0])))).round(4)  # s = 1, 2, 3
      array([0.1667, 0.3333, 0.5   ], dtype=float32)
    """
    ls = log_s(logits)
    return ls - jax.nn.logsumexp(ls, axis=axis, keepdims=True)


def stablemax(logits, axis: int = -1):
    """``StableMax(x)_i = s(x_i) / sum_j s(x_j)`` along ``axis`` (Prieto et al. 2025, Section 4).

    Non-negative, sums to 1 along ``axis``, keeps the order of the logits. Float32 or wider.

    Example:
      >>> import jax.numpy as jnp, numpy as np
      >>> from effjax.nn import stablemax
      >>> np.asarray(stablemax(jnp.array([-1.0, 0.0, 1.0])) * 7).round(4)  # s = 1/2, 1, 2
      array([1., 2., 4.], dtype=float32)
    """
    return jax.nn.softmax(log_s(logits), axis=axis)


def stablemax_cross_entropy(logits, labels, axis: int = -1):
    """StableMax cross-entropy with integer labels: ``-log StableMax(logits)_label``.

    Per-example losses (no reduction, like ``optax.softmax_cross_entropy_with_integer_labels``;
    the official code takes the mean). Computed in float32 or wider.

    Args:
      logits: ``(..., num_classes)`` (classes along ``axis``), floating point.
      labels: integers in ``[0, num_classes)``, shape ``logits.shape`` without ``axis``.
        Out-of-range labels are not checked (they cannot be under ``jit``).
      axis: the class axis.

    Returns:
      Losses with the shape of ``labels``.

    Example:
      >>> import jax.numpy as jnp
      >>> from effjax.nn import stablemax_cross_entropy
      >>> logits = jnp.array([[0.0, 1.0, 2.0], [1e30, 0.0, -1e30]])
      >>> stablemax_cross_entropy(logits, jnp.array([2, 0]))  # -log(3/6), -log(1 - ~1e-30)
      Array([0.6931472, 0.       ], dtype=float32)
    """
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integers (class indices), got dtype {labels.dtype}; "
                        "for one-hot or soft targets use -sum(targets * log_stablemax(logits))")
    if logits.ndim == 0:
        raise ValueError("logits must have a class axis, got a scalar")
    ax = axis % logits.ndim if -logits.ndim <= axis < logits.ndim else None
    if ax is None:
        raise ValueError(f"axis {axis} is out of range for logits of shape {logits.shape}")
    expected = logits.shape[:ax] + logits.shape[ax + 1:]
    if labels.shape != expected:
        raise ValueError(f"labels have shape {labels.shape}; logits of shape {logits.shape} "
                         f"with class axis {axis} need labels of shape {expected}")
    logp = log_stablemax(logits, axis=ax)
    picked = jnp.take_along_axis(logp, jnp.expand_dims(labels, ax), axis=ax)
    return 0.0 - jnp.squeeze(picked, ax)  # 0 - p: no -0.0 for a certain prediction
