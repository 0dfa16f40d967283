"""Helpers shared by SPAM and Stable-SPAM: EMA decays, leaf checks, non-finite and overflow
rules."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from effjax.optim._checks import is_number, tree_difference
from effjax.optim._quantize_state import quantize_state

__all__ = ["Decay", "decay", "leaves_like", "finite", "zero_nonfinite_updates", "maybe_quantize",
           "weight_decay_stage", "square_limit", "scaled_norm", "squares_in_range",
           "moment_dtype", "zero_moments"]


class Decay(NamedTuple):
    """An EMA decay ``d`` as float32 ``(d, 1 - d, log d)``."""

    d: jax.Array
    one_minus: jax.Array
    log: jax.Array

    def bias_correction(self, t):
        """``1 - d**t`` computed as ``-expm1(t log d)`` (accurate for d near 1)."""
        return -jnp.expm1(t * self.log)

    def scaled(self, s: Decay) -> Decay:
        """The decay ``d * s``: ``1 - d s = (1 - d) + d (1 - s)``, ``log(d s) = log d + log s``."""
        return Decay(self.d * s.d, self.one_minus + self.d * s.one_minus, self.log + s.log)


def decay(d) -> Decay:
    """``1 - d`` and ``log d`` in float64 when ``d`` is a Python number (``1 - 0.99999`` in
    float32 would be off by 1e-3 relative); in float32 when it is an (injected) array."""
    if is_number(d):
        log = math.log(d) if d > 0 else -math.inf
        return Decay(*(jnp.asarray(v, jnp.float32) for v in (d, 1.0 - d, log)))
    d = jnp.asarray(d, jnp.float32)
    return Decay(d, 1.0 - d, jnp.log(d))


def leaves_like(updates, tree, where: str, *, shapes: bool = True):
    """``(update leaves, treedef, tree's leaves)``; ``ValueError`` if the structure (and with
    ``shapes``, a leaf's shape, naming it) differs from the state's (the params given to init),
    ``TypeError`` naming a leaf that is not floating point."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(updates)
    try:
        like = treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: the updates' tree structure differs from the parameters' "
                         f"given to init ({tree_difference(updates, tree)}): {e}") from None
    for (path, g), m in zip(with_path, like, strict=True):
        dtype = getattr(g, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"{where}: update {jax.tree_util.keystr(path) or '<root>'} has dtype "
                            f"{dtype} (shape {jnp.shape(g)}); floating point is required. "
                            "Exclude such leaves with optax.masked.")
        if shapes and jnp.shape(g) != jnp.shape(m):
            raise ValueError(f"{where}: update {jax.tree_util.keystr(path) or '<root>'} has "
                             f"shape {jnp.shape(g)}, but init saw shape {jnp.shape(m)}")
    return [g for _, g in with_path], treedef, like


def finite(g):
    return jnp.where(jnp.isfinite(g), g, jnp.zeros_like(g))


def square_limit(dtype) -> float:
    """``2**63`` for float32 (``2**511`` for float64): the power of two whose square is a quarter
    of the largest finite value's binade, so that ``x * x`` and an EMA of such squares stay
    finite for ``|x|`` up to it."""
    return 2.0 ** ((jnp.finfo(dtype).maxexp - 2) // 2)


def _pow2(e, dtype):
    """``2.0**e`` in ``dtype`` (float32 or float64), exactly, for integer ``e`` in the normal
    exponent range (built from its bits: no rounding)."""
    info = jnp.finfo(dtype)
    int_dtype = jnp.int32 if info.bits == 32 else jnp.int64
    return lax.bitcast_convert_type((e.astype(int_dtype) + (info.maxexp - 1)) << info.nmant,
                                    dtype)


def _pow2_scale(amax):
    """``(s, 1 / s)``: the power of two ``s`` with ``amax / s`` in [0.5, 1), clamped so that both
    are normal numbers of ``amax``'s dtype (float32 or float64). Dividing by ``s`` is exact; a
    scalar divisor near the top of the range should be divided by ``s`` first, since XLA
    computes ``x / d`` as ``x * (1 / d)`` and ``1 / d`` is flushed to 0 for ``d >= 2^126``."""
    info = jnp.finfo(amax.dtype)
    _, e = jnp.frexp(amax)  # amax = f 2^e, f in [0.5, 1)
    e = jnp.clip(e, info.minexp, info.maxexp - 2)
    return _pow2(e, amax.dtype), _pow2(-e, amax.dtype)


def scaled_norm(x):
    """``(s, r)`` with ``||x||_2 = s * r`` computed without overflow or underflow.

    As LAPACK's ``nrm2``, ``x`` is divided by a scale near ``max |x|`` before it is squared;
    the scale ``s`` is a power of two (:func:`_pow2_scale`), so the divisions and the square root
    are exact (the sum may still round differently from ``sum(x * x)``: XLA vectorizes the two
    reductions differently). ``x`` is float32 or float64 (finite); ``r = 0`` for a zero (or
    empty) ``x``.
    """
    amax = jnp.max(jnp.abs(x)) if x.size else jnp.zeros([], x.dtype)
    s, inv = _pow2_scale(amax)
    y = x * inv
    return s, jnp.sqrt(jnp.sum(y * y))


def squares_in_range(sq, n: int):
    """Whether ``sq = sum(x * x)`` over ``n`` elements is as accurate as the dtype allows: finite,
    and far enough above the smallest normal number that the squares flushed below it weigh
    less than half an ulp of the sum."""
    info = jnp.finfo(sq.dtype)
    return jnp.isfinite(sq) & (sq >= float(info.tiny) * 2.0 ** (info.nmant + 1) * max(n, 1))


def zero_nonfinite_updates(inner: optax.GradientTransformation):
    """Wrap ``inner``: the update of an element whose gradient is non-finite is exactly 0."""
    inner = optax.with_extra_args_support(inner)

    def update_fn(updates, state, params=None, **extra_args):
        new_updates, state = inner.update(updates, state, params, **extra_args)
        new_updates = jax.tree.map(lambda g, u: jnp.where(jnp.isfinite(g), u, jnp.zeros_like(u)),
                                   updates, new_updates)
        return new_updates, state

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def maybe_quantize(inner, state_bits):
    """Store the moments in ``state_bits`` bits: ``nu`` (non-negative) on the unsigned map,
    everything else (``mu``) signed; scalars and counters are never quantized."""
    if state_bits is None:
        return inner
    return quantize_state(inner, bits=state_bits, unsigned_fields="nu")


def weight_decay_stage(stage: optax.GradientTransformation, weight_decay):
    """``stage`` (the weight-decay part of a chain), or, when ``weight_decay`` is the number 0,
    a no-op with ``stage``'s init. The chain then has the same state structure whatever the
    decay's value, as ``optax.inject_hyperparams`` needs: it passes ``weight_decay`` (default
    included) as an array whose value is unknown when the chain is built."""
    if not (is_number(weight_decay) and weight_decay == 0):
        return stage

    def update_fn(updates, state, params=None):
        del params
        return updates, state

    return optax.GradientTransformation(stage.init, update_fn)


def moment_dtype(dtype):
    """The dtype a float moment of a parameter of ``dtype`` is kept in: the parameter's, except
    float16, whose range cannot hold a second moment (``(1 - b2) g^2`` underflows below 6e-8
    for ``|g| < 0.008`` and overflows above 256): float32 there, as bitsandbytes keeps its
    32-bit states. bfloat16 has float32's range and keeps its dtype (as optax and the
    official SPAM/GaLore code)."""
    return jnp.float32 if jnp.dtype(dtype) == jnp.float16 else dtype


def zero_moments(params):
    """Zeros like ``params`` in :func:`moment_dtype`."""
    return jax.tree.map(lambda p: jnp.zeros_like(p, dtype=moment_dtype(p.dtype)), params)

