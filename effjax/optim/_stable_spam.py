"""Stable-SPAM: adaptive spike clipping (AdaClip), adaptive gradient norm (AdaGN) and momentum
reset (MoRet) around Adam.

Huang et al., "Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam", 2025 (official
code: TianjinYellow/StableSPAM, ``galore_torch/stablespam.py``). Per tensor, at step ``t``::

    AdaClip:  M = theta M + (1-theta) max|g|;   M^ = M / (1 - theta^k)
              g_i <- g_i / max|g| * M^   where |g_i| > M^
    AdaGN:    n = ||g||;  m_n = g1 m_n + (1-g1) n;  v_n = g2 v_n + (1-g2) n^2
              g <- g / n * (m_n / (1-g1^k)) / (sqrt(v_n / (1-g2^k)) + eps)
    Adam:     m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
              u = -lr (m / (1-b1^k)) / (sqrt(v / (1-b2^k)) + eps) - lr wd p
    MoRet:    every dT steps m, v <- 0

This module gives the three parts as separate optax transformations,
:func:`adaptive_spike_clip`, :func:`adaptive_grad_norm` and :func:`momentum_reset`, and the
fused :func:`scale_by_stable_spam` / :func:`stable_spam`, which reproduce the official optimizer
exactly, including its counter semantics:

* ``k`` is ONE step counter per tensor that serves every bias correction above (AdaClip, AdaGN
  and Adam). At a reset step ``t`` (``t % dT == 0``) AdaClip and AdaGN use ``k`` as it is, then
  ``k`` is set to 1 and Adam runs with the OLD moments bias-corrected as step 1; the moments
  are zeroed after that update, so the zeroed moments take effect one step after the reset
  step. The next step uses ``k = 2`` for all three: the clip threshold and the norm statistics
  (which are not reset) are re-bias-corrected from step 2 after every reset. Since ``M`` is by
  then a full EMA, the threshold ``M^ = M / (1 - theta^k)`` is inflated: 500x ``M`` at
  ``k = 2`` and still >= 2.5x ``M`` at ``k = dT`` for theta = 0.999, dT = 500.
* With ``total_steps = T`` set, ``b1`` and ``g1`` are multiplied by the cosine factor
  ``s_t = eta_min + (1 - eta_min) (1 + cos(pi t / (T+1))) / 2`` (``t`` = steps taken, never
  reset; the bias corrections use ``(b1 s_t)^k``, ``(g1 s_t)^k``), as the official ``total_T``.
* Weight decay is applied first: ``p <- p (1 - lr wd)``, then the Adam step.

Composing the separate parts, ``optax.chain(adaptive_spike_clip(theta), adaptive_grad_norm(g1,
g2, eps), momentum_reset(optax.scale_by_adam(b1, b2, eps), dT, reset_counts=True),
optax.add_decayed_weights(wd), optax.scale_by_learning_rate(lr))``, is the same algorithm up to
the first reset step, and differs after it exactly in the counters: each part keeps its own
counter; AdaClip's and AdaGN's are never reset (their bias corrections fade out, no
re-correction after a reset); at the reset step Adam's update uses its running count, then its
moments are zeroed and (``reset_counts=True``) its count is set to 0, so the next step is
Adam's step 1 (official: old moments with step 1 at the reset step, step 2 next);
``reset_counts=False`` keeps Adam's count (SPAM's convention). ``optax.scale_by_adam`` takes no
cosine schedule for ``b1``; ``adaptive_grad_norm`` accepts one for ``gamma1``
(:func:`cosine_momentum_scale`).

Presets (the official ReadMe): :data:`STABLE_SPAM_4BIT` (INT4/FP4 training: ``gamma1=0.7,
gamma2=0.9, theta=0.999, reset_interval=500``, the defaults here) and :data:`STABLE_SPAM_BF16`
(``gamma1=0.85, gamma2=0.99999, theta=0.999, reset_interval=1000``): ``stable_spam(lr,
**STABLE_SPAM_BF16)``. The official runs also set ``total_steps`` to the number of training
steps and ``eta_min=0.5``.

Non-finite gradients: in :func:`scale_by_stable_spam` / :func:`stable_spam` a NaN or +-inf
element counts as 0 in every statistic (max-|g|, norm, moments), so the state stays finite, and
its update is 0 (weight decay included). Huge finite elements overflow nothing: the norm is
computed scaled (as LAPACK's ``nrm2``) where ``||g||^2`` would overflow, and AdaGN's statistics
then take it clamped to ``2^63`` (float32), ``m_norm`` and ``v_norm`` alike, so that ``c``, a
ratio of the two, is the float64 algorithm's within rounding while the spike dominates them;
below that the official expressions run unchanged. :func:`adaptive_spike_clip` and
:func:`adaptive_grad_norm` also count it as 0 in their statistics but pass the element through
unchanged (the rest of the chain decides).

Bad input: each transformation raises a ``ValueError`` naming the leaf path when the updates'
tree or a leaf's shape differs from the parameters'. :func:`adaptive_spike_clip`,
:func:`adaptive_grad_norm` and :func:`momentum_reset` hold no parameter-shaped state, so they
check the updates against the ``params`` given to ``update`` (when given).

Low-bit states: ``state_bits=8`` or ``4`` stores Adam's moments with
:func:`effjax.optim.quantize_state` (``m`` signed map, ``v`` unsigned map); the
per-tensor statistics (float32 scalars) and counters are never quantized.
"""

import types
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from effjax.optim._checks import (
    check_float_params,
    check_int,
    check_params_like_updates,
    check_range,
    check_state_bits,
)
from effjax.optim._spike_utils import (
    Decay,
    decay,
    finite,
    leaves_like,
    maybe_quantize,
    scaled_norm,
    square_limit,
    squares_in_range,
    weight_decay_stage,
    zero_moments,
    zero_nonfinite_updates,
)

__all__ = [
    "STABLE_SPAM_4BIT", "STABLE_SPAM_BF16", "AdaptiveSpikeClipState", "AdaptiveGradNormState",
    "MomentumResetState", "ScaleByStableSpamState", "adaptive_spike_clip", "adaptive_grad_norm",
    "momentum_reset", "cosine_momentum_scale", "scale_by_stable_spam", "stable_spam",
]

STABLE_SPAM_4BIT = types.MappingProxyType(
    dict(gamma1=0.7, gamma2=0.9, theta=0.999, reset_interval=500))
"""Official INT4/FP4 settings (ReadMe, 350M runs): ``stable_spam(lr, **STABLE_SPAM_4BIT)``."""

STABLE_SPAM_BF16 = types.MappingProxyType(
    dict(gamma1=0.85, gamma2=0.99999, theta=0.999, reset_interval=1000))
"""Official BF16 settings (ReadMe, 130M run): ``stable_spam(lr, **STABLE_SPAM_BF16)``."""


class AdaptiveSpikeClipState(NamedTuple):
    """State of :func:`adaptive_spike_clip`."""

    count: jax.Array  # int32, steps taken (the bias-correction step)
    m_max: optax.Updates  # per tensor: float32 scalar EMA of max|g|


class AdaptiveGradNormState(NamedTuple):
    """State of :func:`adaptive_grad_norm`."""

    count: jax.Array  # int32, steps taken (the bias-correction step)
    m_norm: optax.Updates  # per tensor: float32 scalar EMA of ||g||
    v_norm: optax.Updates  # per tensor: float32 scalar EMA of ||g||^2


class MomentumResetState(NamedTuple):
    """State of :func:`momentum_reset`."""

    count: jax.Array  # int32, steps taken
    inner_state: optax.OptState


class ScaleByStableSpamState(NamedTuple):
    """State of :func:`scale_by_stable_spam` (the official optimizer's per-tensor state)."""

    count: jax.Array  # int32, steps taken (official ``total_steps``; drives resets, cosine)
    step: jax.Array  # int32, the shared bias-correction step (official ``step``), reset to 1
    mu: optax.Updates  # Adam's first moment (``exp_avg``)
    nu: optax.Updates  # Adam's second moment (``exp_avg_sq``)
    m_max: optax.Updates  # per tensor float32 scalar: EMA of max|g| (``m_max_t``)
    m_norm: optax.Updates  # per tensor float32 scalar: EMA of ||g|| (``m_norm_t``)
    v_norm: optax.Updates  # per tensor float32 scalar: EMA of ||g||^2 (``v_norm_t``)


# Per-tensor pieces, shared by the separate transforms and the fused one ---------------------

def _scalars(params):
    return jax.tree.map(lambda _: jnp.zeros([], jnp.float32), params)


def _ada_clip(g, m_max, k, theta: Decay):
    """AdaClip on one tensor (``g`` finite, float32 or wider); returns ``(g, m_max)``, ``m_max``
    in its own dtype. The official expressions; a threshold beyond the dtype's range (inf) clips
    nothing, and where ``max|g| > 2^63`` (float32) ``g / max|g|`` divides both by ``2^63`` first
    (XLA divides by a scalar as ``x * (1 / d)``, and ``1 / d`` flushes to 0 for ``d >= 2^126``)."""
    gmax = jnp.max(jnp.abs(g)) if g.size else jnp.zeros([], g.dtype)
    new_max = theta.d * m_max + theta.one_minus * gmax
    hat = new_max / theta.bias_correction(k)
    spike = jnp.abs(g) > hat
    safe_max = jnp.where(gmax > 0, gmax, 1.0)
    limit = square_limit(g.dtype)
    big = safe_max > limit
    num, den = jnp.where(big, g / limit, g), jnp.where(big, safe_max / limit, safe_max)
    return jnp.where(spike, num / den * hat, g), new_max.astype(m_max.dtype)


def _ada_gn(g, m_norm, v_norm, k, g1: Decay, g2: Decay, eps):
    """AdaGN on one tensor (``g`` finite, float32 or wider); returns ``(g, m_norm, v_norm)``, the
    statistics in their own dtype.

    The official expressions wherever they neither overflow nor underflow. Where
    ``||g|| > 2^63`` (float32: ``||g||^2`` could overflow), ``v / bc2`` overflows or the sum of
    squares underflows, the norm is taken scaled (:func:`scaled_norm`), the statistics take it
    clamped to ``2^63``, ``m_norm`` and ``v_norm`` alike, so that their ratio, which is all
    ``c`` depends on, is that of the clamped spike; and ``sqrt(v / bc2)`` is
    ``sqrt(v) / sqrt(bc2)``."""
    bc1, bc2 = g1.bias_correction(k), g2.bias_correction(k)
    limit = square_limit(g.dtype)

    def stats(norm):
        new_m = g1.d * m_norm + g1.one_minus * norm
        new_v = g2.d * v_norm + g2.one_minus * (norm * norm)
        return new_m, new_v, new_v / bc2

    # The official expressions, computed whole and selected at the end: XLA then rounds them
    # as it did before the fallback existed (selecting their inputs instead moves an ulp).
    sq = jnp.sum(g * g)
    norm = jnp.sqrt(sq)
    new_m, new_v, q = stats(norm)
    c = (new_m / bc1) / (jnp.sqrt(q) + eps)
    out = g / jnp.where(norm > 0, norm, 1.0) * c

    s, r = scaled_norm(g)  # the fallback: ||g|| = s r
    safe_m, safe_v, safe_q = stats(jnp.minimum(s * r, limit))
    root = jnp.where(jnp.isfinite(safe_q), jnp.sqrt(safe_q), jnp.sqrt(safe_v) / jnp.sqrt(bc2))
    safe_c = (safe_m / bc1) / (root + eps)
    safe_out = g * (1.0 / s) / jnp.where(r > 0, r, 1.0) * safe_c  # 1 / s: a power of two

    official = squares_in_range(sq, g.size) & (norm <= limit) & jnp.isfinite(q)
    new_m, new_v = jnp.where(official, new_m, safe_m), jnp.where(official, new_v, safe_v)
    out = jnp.where(r > 0, jnp.where(official, out, safe_out), g)
    return out, new_m.astype(m_norm.dtype), new_v.astype(v_norm.dtype)


def _cosine(t, total_steps, eta_min) -> Decay:
    """The official cosine factor ``s_t`` as a :class:`Decay`, with ``1 - s_t`` computed as
    ``(1 - eta_min) sin^2(pi t / (2 (T+1)))`` (no cancellation)."""
    eta = jnp.asarray(eta_min, jnp.float32)
    one_minus = (1.0 - eta) * jnp.sin(jnp.pi * t / (2.0 * (total_steps + 1.0))) ** 2
    return Decay(1.0 - one_minus, one_minus, jnp.log1p(-one_minus))


def cosine_momentum_scale(total_steps: int, eta_min: float = 0.5) -> optax.Schedule:
    """The official cosine factor of ``b1`` and ``gamma1`` as an optax schedule of the count.

    ``s(n) = eta_min + (1 - eta_min) (1 + cos(pi (n+1) / (T+1))) / 2`` for ``n = 0, 1, ...``
    updates already applied (the official ``total_T = T``; ``s`` rises again after ``T+1``
    steps, as the official ``CosineAnnealingLR`` closed form does). Use it to schedule
    ``gamma1`` of :func:`adaptive_grad_norm`: ``gamma1=lambda n: 0.7 * s(n)``.

    Example:
      >>> from effjax.optim import cosine_momentum_scale
      >>> s = cosine_momentum_scale(total_steps=99, eta_min=0.5)
      >>> round(float(s(49)), 4), round(float(s(99)), 4)  # t = 50 (midway), t = T+1 = 100
      (0.75, 0.5)
    """
    check_int("cosine_momentum_scale", "total_steps", total_steps, 1)
    check_range("cosine_momentum_scale", "eta_min", eta_min, 0.0, 1.0)
    return lambda n: _cosine(jnp.asarray(n, jnp.float32) + 1.0, total_steps, eta_min).d


def _per_leaf(fn, where, updates, *trees, shapes=True):
    """Apply ``fn(g, *leaves) -> tuple`` per leaf; returns one tree per output. The first tree
    is checked against ``updates`` (structure, and with ``shapes`` the leaves' shapes)."""
    leaves, treedef, first = leaves_like(updates, trees[0], where, shapes=shapes)
    out = [fn(*x) for x in zip(leaves, first, *(treedef.flatten_up_to(t) for t in trees[1:]),
                               strict=True)]
    n = len(out[0]) if out else len(trees) + 1
    return tuple(treedef.unflatten([o[i] for o in out]) for i in range(n))


def _f32(g):
    return finite(g).astype(jnp.promote_types(g.dtype, jnp.float32))


# The separate transformations ----------------------------------------------------------------

def adaptive_spike_clip(theta: float = 0.999) -> optax.GradientTransformation:
    """AdaClip: rescale the entries above an EMA of the historical max ``|g|`` (per tensor).

    ``M_t = theta M_{t-1} + (1-theta) max|g_t|``, ``M^_t = M_t / (1 - theta^t)``; entries with
    ``|g_i| > M^_t`` become ``g_i / max|g_t| * M^_t`` (the largest lands exactly on ``M^_t``;
    the others keep their ratio to it); the rest pass unchanged. Non-finite entries count as 0
    in ``max|g|`` and are passed through unchanged.

    Args:
      theta: EMA decay of the max, in (0, 1) (official ``gamma3``, 0.999).

    Reference: Huang et al. 2025, "Stable-SPAM", Sec. 4 (AdaClip); the official
    ``galore_torch/stablespam.py``. The counter here is never reset (see the module docstring
    for the difference from the fused optimizer).

    Example:
      >>> import jax.numpy as jnp
      >>> from effjax.optim import adaptive_spike_clip
      >>> tx = adaptive_spike_clip(theta=0.5)
      >>> state = tx.init({"w": jnp.zeros(3)})
      >>> u, state = tx.update({"w": jnp.array([1.0, 2.0, -1.0])}, state)  # M^ = 2: no clip
      >>> u, state = tx.update({"w": jnp.array([8.0, 4.0, -1.0])}, state)  # M^ = 6
      >>> [round(float(x), 3) for x in u["w"]]  # 8 -> 8/8*6; 4, -1 unchanged (<= 6)
      [6.0, 4.0, -1.0]
    """
    check_range("adaptive_spike_clip", "theta", theta, 0.0, 1.0, lo_open=True, hi_open=True)

    def init_fn(params):
        check_float_params(params, where="adaptive_spike_clip")
        return AdaptiveSpikeClipState(count=jnp.zeros([], jnp.int32), m_max=_scalars(params))

    def update_fn(updates, state, params=None):
        if params is not None:  # the state holds no shapes: check against the parameters
            check_params_like_updates(updates, params, where="adaptive_spike_clip")
        k = optax.safe_increment(state.count)
        th = decay(theta)

        def leaf(g_in, m_max):
            g, m_max = _ada_clip(_f32(g_in), m_max, k.astype(jnp.float32), th)
            return jnp.where(jnp.isfinite(g_in), g.astype(g_in.dtype), g_in), m_max

        u, m_max = _per_leaf(leaf, "adaptive_spike_clip", updates, state.m_max, shapes=False)
        return u, AdaptiveSpikeClipState(count=k, m_max=m_max)

    return optax.GradientTransformation(init_fn, update_fn)


def adaptive_grad_norm(gamma1: optax.ScalarOrSchedule = 0.7, gamma2: float = 0.9,
                       eps: float = 1e-8) -> optax.GradientTransformation:
    """AdaGN: rescale each tensor to the norm predicted by EMA statistics of its norm.

    ``n_t = ||g_t||``, ``m_t = g1 m + (1-g1) n_t``, ``v_t = g2 v + (1-g2) n_t^2``,
    ``g <- g / n_t * (m_t / (1-g1^t)) / (sqrt(v_t / (1-g2^t)) + eps)`` (unchanged where
    ``n_t = 0``). Non-finite entries count as 0 in the norm and are passed through unchanged.

    Args:
      gamma1: decay of the norm's first moment in [0, 1), or a schedule of the count (the
        official cosine variant: ``lambda n: 0.7 * cosine_momentum_scale(T)(n)``; the bias
        correction then uses ``g1_t^t``, as the official code).
      gamma2: decay of the squared norm's moment in [0, 1).
      eps: added to the root of the second moment.

    Reference: Huang et al. 2025, "Stable-SPAM", Sec. 4 (AdaGN); the official
    ``galore_torch/stablespam.py``.

    Example:
      >>> import jax.numpy as jnp
      >>> from effjax.optim import adaptive_grad_norm
      >>> tx = adaptive_grad_norm(gamma1=0.7, gamma2=0.9)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> u, state = tx.update({"w": jnp.array([3.0, 4.0])}, state)  # step 1: norm -> ~1
      >>> [round(float(x), 4) for x in u["w"]]
      [0.6, 0.8]
    """
    where = "adaptive_grad_norm"
    if not callable(gamma1):
        check_range(where, "gamma1", gamma1, 0.0, 1.0, hi_open=True)
    check_range(where, "gamma2", gamma2, 0.0, 1.0, hi_open=True)
    check_range(where, "eps", eps, 0.0)

    def init_fn(params):
        check_float_params(params, where=where)
        return AdaptiveGradNormState(count=jnp.zeros([], jnp.int32), m_norm=_scalars(params),
                                     v_norm=_scalars(params))

    def update_fn(updates, state, params=None):
        if params is not None:  # the state holds no shapes: check against the parameters
            check_params_like_updates(updates, params, where=where)
        k = optax.safe_increment(state.count)
        g1 = decay(gamma1(state.count) if callable(gamma1) else gamma1)
        g2 = decay(gamma2)

        def leaf(g_in, m_norm, v_norm):
            g, m_norm, v_norm = _ada_gn(_f32(g_in), m_norm, v_norm, k.astype(jnp.float32), g1,
                                        g2, eps)
            return jnp.where(jnp.isfinite(g_in), g.astype(g_in.dtype), g_in), m_norm, v_norm

        u, m_norm, v_norm = _per_leaf(leaf, "adaptive_grad_norm", updates, state.m_norm,
                                      state.v_norm, shapes=False)
        return u, AdaptiveGradNormState(count=k, m_norm=m_norm, v_norm=v_norm)

    return optax.GradientTransformation(init_fn, update_fn)


def momentum_reset(inner: optax.GradientTransformation, interval: int, *,
                   reset_counts: bool = False) -> optax.GradientTransformationExtraArgs:
    """MoRet: zero the moments of ``inner``'s state after every ``interval``-th update.

    At step ``t`` (1-based) ``inner`` runs as usual; if ``t % interval == 0`` its new state's
    moments are then set to 0, so step ``t+1`` starts from zero moments (the official
    Stable-SPAM timing: the zeroed moments take effect one step after the reset step).

    Which leaves are moments: every floating-point leaf with at least one axis (``mu``, ``nu``,
    ``trace``...; the ``absmax`` of a :class:`~effjax.quant.QuantizedArray`, which makes it
    dequantize to 0). Kept: integer leaves (counters, quantization codes) and 0-d floats
    (hyper-parameters of ``optax.inject_hyperparams``, per-tensor statistics). With
    ``reset_counts=True`` the 0-d integer leaves (step counters) are also set to 0, so bias
    corrections restart; wrap the moment-holding transform itself (e.g.
    ``optax.scale_by_adam()``), not an alias with learning-rate schedules, whose counters would
    restart too. Moments whose initial value is not 0 (e.g. ``optax.adagrad``'s accumulator)
    are still set to 0. Non-finite gradients: ``momentum_reset`` keeps only a step counter and
    hands every gradient to ``inner``, whose convention applies (``optax.scale_by_adam`` takes a
    NaN into that element's moments and update, optax's convention); a reset sets those moments
    to 0, NaN included.

    Args:
      inner: the transformation whose moments are reset.
      interval: ``dT``, an int >= 1 (official: 500 for 4-bit runs, 1000 for BF16).
      reset_counts: also reset the 0-d integer counters of ``inner``'s state.

    Reference: Huang et al., "SPAM", ICLR 2025 and "Stable-SPAM", 2025 (MoRet).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from effjax.optim import momentum_reset
      >>> tx = momentum_reset(optax.scale_by_adam(), interval=2)
      >>> state = tx.init({"w": jnp.zeros(3)})
      >>> g = {"w": jnp.ones(3)}
      >>> _, state = tx.update(g, state)
      >>> float(state.inner_state.mu["w"][0]) > 0
      True
      >>> _, state = tx.update(g, state)  # step 2: reset after the update
      >>> float(state.inner_state.mu["w"][0]), int(state.inner_state.count)
      (0.0, 2)
    """
    check_int("momentum_reset", "interval", interval, 1)
    inner = optax.with_extra_args_support(inner)

    def reset_leaf(x, do):
        if not hasattr(x, "dtype") or not hasattr(x, "ndim"):
            return x
        if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim:
            return jnp.where(do, jnp.zeros_like(x), x)
        if reset_counts and jnp.issubdtype(x.dtype, jnp.integer) and not x.ndim:
            return jnp.where(do, jnp.zeros_like(x), x)
        return x

    def init_fn(params):
        return MomentumResetState(count=jnp.zeros([], jnp.int32), inner_state=inner.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        if params is not None:  # before inner, whose own error may not name the leaf
            check_params_like_updates(updates, params, where="momentum_reset")
        t = optax.safe_increment(state.count)
        updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        do = t % interval == 0
        inner_state = jax.tree.map(lambda x: reset_leaf(x, do), inner_state)
        return updates, MomentumResetState(count=t, inner_state=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# The fused optimizer --------------------------------------------------------------------------

def _check_stable_spam_args(where, b1, b2, eps, gamma1, gamma2, theta, reset_interval,
                            total_steps, eta_min):
    check_range(where, "b1", b1, 0.0, 1.0, hi_open=True)
    check_range(where, "b2", b2, 0.0, 1.0, hi_open=True)
    check_range(where, "eps", eps, 0.0)
    check_range(where, "gamma1", gamma1, 0.0, 1.0, hi_open=True)
    check_range(where, "gamma2", gamma2, 0.0, 1.0, hi_open=True)
    check_range(where, "theta", theta, 0.0, 1.0, lo_open=True, hi_open=True)
    check_int(where, "reset_interval", reset_interval, 1, allow_none=True)
    check_int(where, "total_steps", total_steps, 1, allow_none=True)
    check_range(where, "eta_min", eta_min, 0.0, 1.0)


def scale_by_stable_spam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    gamma1: float = 0.7,
    gamma2: float = 0.9,
    theta: float = 0.999,
    reset_interval: int | None = 500,
    total_steps: int | None = None,
    eta_min: float = 0.5,
) -> optax.GradientTransformation:
    """Stable-SPAM's update direction (no learning rate, no weight decay), as the official code.

    Per tensor at step ``t`` with the shared counter ``k <- k + 1``: AdaClip (``theta``, step
    ``k``), AdaGN (``gamma1 s_t``, ``gamma2``, step ``k``), then if ``t % dT == 0``: ``k <- 1``;
    Adam with ``b1 s_t``, ``b2`` and step ``k`` returns
    ``(m / (1 - (b1 s_t)^k)) / (sqrt(v / (1 - b2^k)) + eps)``; after a reset step the stored
    ``m, v`` are 0. ``s_t = 1`` unless ``total_steps`` is set (see the module docstring).

    Args:
      b1, b2: Adam's decay rates (official 0.9, 0.999).
      eps: added in AdaGN's and Adam's denominators (official 1e-8).
      gamma1, gamma2: AdaGN's decays (4-bit preset 0.7, 0.9; BF16 0.85, 0.99999).
      theta: AdaClip's decay (official ``gamma3`` 0.999).
      reset_interval: ``dT`` (official ``update_proj_gap``; 4-bit 500, BF16 1000); ``None``:
        no momentum reset (official ``update_proj_gap=0``).
      total_steps: official ``total_T``: when set, ``b1`` and ``gamma1`` follow the cosine
        factor ``s_t`` (see :func:`cosine_momentum_scale`); ``None``: ``s_t = 1``.
      eta_min: the cosine factor's floor (official ``eta``, 0.5).

    Reference: Huang et al., "Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit
    Adam", 2025, Algorithm 1; TianjinYellow/StableSPAM ``galore_torch/stablespam.py``.

    Example:
      >>> import jax.numpy as jnp
      >>> from effjax.optim import scale_by_stable_spam
      >>> tx = scale_by_stable_spam(reset_interval=2)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> u, state = tx.update({"w": jnp.array([3.0, -4.0])}, state)
      >>> [round(float(x), 4) for x in u["w"]]  # step 1: ~sign(g)
      [1.0, -1.0]
      >>> u, state = tx.update({"w": jnp.array([3.0, -4.0])}, state)  # reset step
      >>> int(state.step), float(state.mu["w"][0])
      (1, 0.0)
    """
    _check_stable_spam_args("scale_by_stable_spam", b1, b2, eps, gamma1, gamma2, theta,
                            reset_interval, total_steps, eta_min)

    def init_fn(params):
        check_float_params(params, where="scale_by_stable_spam")
        zeros = lambda: zero_moments(params)
        return ScaleByStableSpamState(
            count=jnp.zeros([], jnp.int32), step=jnp.zeros([], jnp.int32), mu=zeros(),
            nu=zeros(), m_max=_scalars(params), m_norm=_scalars(params), v_norm=_scalars(params))

    def update_fn(updates, state, params=None):
        del params
        t = optax.safe_increment(state.count)
        k = optax.safe_increment(state.step)
        d1, dg1, d2, dg2, th = (decay(x) for x in (b1, gamma1, b2, gamma2, theta))
        if total_steps is not None:
            s = _cosine(t.astype(jnp.float32), total_steps, eta_min)
            d1, dg1 = d1.scaled(s), dg1.scaled(s)
        reset = jnp.asarray(False) if reset_interval is None else t % reset_interval == 0
        k_adam = jnp.where(reset, 1, k)
        kf, kaf = k.astype(jnp.float32), k_adam.astype(jnp.float32)
        bc1, sqrt_bc2 = d1.bias_correction(kaf), jnp.sqrt(d2.bias_correction(kaf))

        def leaf(g_in, mu_in, nu_in, m_max, m_norm, v_norm):
            g = _f32(g_in)
            g, m_max = _ada_clip(g, m_max, kf, th)
            g, m_norm, v_norm = _ada_gn(g, m_norm, v_norm, kf, dg1, dg2, eps)
            mu = d1.d * mu_in.astype(g.dtype) + d1.one_minus * g
            nu = d2.d * nu_in.astype(g.dtype) + d2.one_minus * (g * g)
            u = (mu / bc1) / (jnp.sqrt(nu) / sqrt_bc2 + eps)
            u = jnp.where(jnp.isfinite(g_in), u, 0.0).astype(g_in.dtype)
            mu = jnp.where(reset, 0.0, mu).astype(mu_in.dtype)
            nu = jnp.where(reset, 0.0, nu).astype(nu_in.dtype)
            return u, mu, nu, m_max, m_norm, v_norm

        u, mu, nu, m_max, m_norm, v_norm = _per_leaf(
            leaf, "scale_by_stable_spam", updates, state.mu, state.nu, state.m_max, state.m_norm,
            state.v_norm)
        return u, ScaleByStableSpamState(count=t, step=k_adam, mu=mu, nu=nu, m_max=m_max,
                                         m_norm=m_norm, v_norm=v_norm)

    return optax.GradientTransformation(init_fn, update_fn)


def stable_spam(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    gamma1: float = 0.7,
    gamma2: float = 0.9,
    theta: float = 0.999,
    reset_interval: int | None = 500,
    total_steps: int | None = None,
    eta_min: float = 0.5,
    mask: Any = None,
    *,
    state_bits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """The Stable-SPAM optimizer, reproducing the official ``StableSPAM`` (with ``amsgrad=False``).

    ``u = -lr (scale_by_stable_spam(...) + wd p)``: weight decay of the old parameter, which is
    the official ``p *= 1 - lr wd`` before the step. Defaults are the 4-bit preset
    (:data:`STABLE_SPAM_4BIT`); ``stable_spam(lr, **STABLE_SPAM_BF16)`` for BF16 training.

    Args:
      learning_rate: a scalar or an optax schedule.
      b1, b2, eps, gamma1, gamma2, theta, reset_interval, total_steps, eta_min: see
        :func:`scale_by_stable_spam`.
      weight_decay: decoupled weight decay (official default 0).
      mask: pytree of bools or callable, as ``optax.adamw``: where weight decay applies.
      state_bits: ``None`` (float32 moments), 8 or 4 (block-wise quantized ``mu``/``nu``).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from effjax.optim import stable_spam, STABLE_SPAM_BF16
      >>> opt = stable_spam(1e-3, **STABLE_SPAM_BF16)
      >>> params = {"w": jnp.ones((4, 3))}
      >>> state = opt.init(params)
      >>> updates, state = opt.update({"w": jnp.full((4, 3), 0.5)}, state, params)
      >>> round(float(updates["w"][0, 0]), 6)  # step 1: about -lr * sign(g)
      -0.001
      >>> params = optax.apply_updates(params, updates)
    """
    check_range("stable_spam", "weight_decay", weight_decay, 0.0)
    check_state_bits("stable_spam", state_bits)
    core = maybe_quantize(scale_by_stable_spam(b1, b2, eps, gamma1, gamma2, theta,
                                                reset_interval, total_steps, eta_min),
                           state_bits)
    # The decay stage is always there (a no-op for weight_decay=0) so that the state has the
    # same structure under optax.inject_hyperparams, which makes weight_decay an array.
    wd_step = weight_decay_stage(optax.add_decayed_weights(weight_decay, mask), weight_decay)
    return zero_nonfinite_updates(
        optax.chain(core, wd_step, optax.scale_by_learning_rate(learning_rate)))

