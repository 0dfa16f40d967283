"""SPAM: Adam with spike-aware clipping, periodic momentum reset and a warm-up after each reset.

Huang et al., "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training", ICLR 2025
(official code: TianjinYellow/SPAM-Optimizer, ``galore_torch/SPAM.py``). At step ``t`` (1-based),
element-wise, with ``v`` the second moment before this step's update:

    reset:     if t % dT == 0:  m <- 0, v <- 0            (the bias-correction step t is kept)
    clip:      if t % dT >= N and g^2 > theta v:  g <- sign(g) sqrt(theta v)
    Adam:      m <- b1 m + (1-b1) g;   v <- b2 v + (1-b2) g^2
    warm-up:   c = t % dT;  s = 1 - 0.99 (1 + cos(pi c / (W+1))) / 2  if c < W and
               t >= max(dT, 2) (after the first reset), else s = 1
    update:    u = -lr s sqrt(1-b2^t) / (1-b1^t) * m / (sqrt(v) + eps)
    decay:     p_new = (p + u) (1 - lr wd)     (weight decay after the step, as the code)

with ``dT = reset_interval`` (500), ``theta = threshold`` (5000), ``N = spike_delay`` (20 steps
without clipping after each reset and at the start) and ``W = warmup_steps`` (150, the paper's
value; the official training script passes its learning-rate warm-up length instead, an
acknowledged bug). The warm-up factor at a reset step is 0.01, not 0 (the code's cosine decays
0.99, not 1). ``eps`` is added to ``sqrt(v)`` before the bias correction, as the code does.

Non-finite gradients: a NaN or +-inf gradient element counts as 0 in every statistic (moments
and the spike test), so the state stays finite, and its update is 0 (the parameter does not
move, weight decay included). Use ``optax.apply_if_finite`` to skip whole steps instead.
A finite element beyond ``2^63`` (float32; its square would overflow) enters the moments as
``+-2^63``: Adam's ``m / sqrt(v)`` is scale-free, so its updates are the float64 algorithm's
within rounding while the spike dominates its moments, and nothing overflows.

Low-bit states: ``state_bits=8`` or ``4`` stores the moments with
:func:`effjax.optim.quantize_state` (``m`` on the signed map, ``v`` on the
unsigned map); the step counter stays int32. Wrapping the alias in ``quantize_state`` directly
quantizes the same leaves the same way.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from effjax.optim._checks import (
    check_float_params,
    check_int,
    check_range,
    check_state_bits,
)
from effjax.optim._spike_utils import (
    decay,
    finite,
    leaves_like,
    maybe_quantize,
    square_limit,
    weight_decay_stage,
    zero_nonfinite_updates,
)

__all__ = ["ScaleBySpamState", "scale_by_spam", "spam"]


class ScaleBySpamState(NamedTuple):
    """State of :func:`scale_by_spam`: step counter (never reset) and Adam's moments."""

    count: jax.Array  # int32, steps taken; Adam's bias-correction step
    mu: optax.Updates
    nu: optax.Updates


# SPAM ----------------------------------------------------------------------------------------

def scale_by_spam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    threshold: float | None = 5000.0,
    reset_interval: int | None = 500,
    spike_delay: int = 20,
    warmup_steps: int = 150,
) -> optax.GradientTransformation:
    """SPAM's Adam direction (no learning rate): spike clipping, momentum reset, warm-up.

    At step ``t`` (1-based; element-wise; ``v`` is the second moment before this step)::

      m, v = (0, 0) if t % dT == 0 else (m, v)                  # momentum reset
      g = sign(g) sqrt(theta v)  where g^2 > theta v and t % dT >= N   # spike clipping
      m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
      u = s_t sqrt(1-b2^t)/(1-b1^t) m / (sqrt(v) + eps)

    where ``s_t = 1 - 0.99 (1 + cos(pi c / (W+1))) / 2`` with ``c = t % dT`` for ``c < W`` after
    the first reset (``t >= max(dT, 2)``), else 1; the bias-correction step ``t`` is never reset.

    Args:
      b1, b2: Adam's decay rates.
      eps: added to ``sqrt(v)`` (before the bias correction, as the official code).
      threshold: ``theta`` of the spike test ``g^2 > theta v``; ``None`` turns clipping off.
      reset_interval: ``dT``, steps between momentum resets; ``None``: never reset (then no
        warm-up either, and clipping starts at step ``spike_delay``).
      spike_delay: ``N``, clipping is off while ``t % dT < N`` (official ``grad_accu_steps``).
      warmup_steps: ``W``, length of the cosine warm-up of the update after each reset.

    Reference: Huang et al., "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM
    Training", ICLR 2025, Algorithm 1; TianjinYellow/SPAM-Optimizer ``galore_torch/SPAM.py``.

    Example:
      >>> import jax.numpy as jnp
      >>> from effjax.optim import scale_by_spam
      >>> tx = scale_by_spam(reset_interval=100)
      >>> state = tx.init({"w": jnp.zeros(3)})
      >>> u, state = tx.update({"w": jnp.array([1.0, -2.0, 0.0])}, state)
      >>> [round(float(x), 3) for x in u["w"]]  # step 1: m / sqrt(v) = sign(g)
      [1.0, -1.0, 0.0]
    """
    where = "scale_by_spam"
    check_range(where, "b1", b1, 0.0, 1.0, hi_open=True)
    check_range(where, "b2", b2, 0.0, 1.0, hi_open=True)
    check_range(where, "eps", eps, 0.0)
    if threshold is not None:
        check_range(where, "threshold", threshold, 0.0, lo_open=True)
    check_int(where, "reset_interval", reset_interval, 1, allow_none=True)
    check_int(where, "spike_delay", spike_delay, 0)
    check_int(where, "warmup_steps", warmup_steps, 0)

    def init_fn(params):
        check_float_params(params, where=where)
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)
        return ScaleBySpamState(count=jnp.zeros([], jnp.int32), mu=zeros(), nu=zeros())

    def update_fn(updates, state, params=None):
        del params
        t = optax.safe_increment(state.count)
        d1, d2 = decay(b1), decay(b2)
        if reset_interval is None:
            reset = jnp.asarray(False)
            clip_on = t >= spike_delay
            scale = jnp.asarray(1.0, jnp.float32)
        else:
            c = t % reset_interval
            reset = c == 0
            clip_on = c >= spike_delay
            warm = (t >= jnp.maximum(reset_interval, 2)) & (c < warmup_steps)
            cos = jnp.cos(jnp.pi * c.astype(jnp.float32) / (warmup_steps + 1.0))
            scale = jnp.where(warm, 1.0 - 0.99 * (1.0 + cos) / 2.0, 1.0)
        step = t.astype(jnp.float32)
        step_size = scale * jnp.sqrt(d2.bias_correction(step)) / d1.bias_correction(step)

        def leaf(g_in, mu_in, nu_in):
            dtype = jnp.promote_types(g_in.dtype, jnp.float32)
            big = square_limit(dtype)  # g * g and the moments stay finite
            g = jnp.clip(finite(g_in).astype(dtype), -big, big)
            mu = jnp.where(reset, 0.0, mu_in.astype(dtype))
            nu = jnp.where(reset, 0.0, nu_in.astype(dtype))
            if threshold is not None:
                spike = clip_on & (g * g > threshold * nu)
                g = jnp.where(spike, jnp.sign(g) * jnp.sqrt(nu * threshold), g)
            mu = d1.d * mu + d1.one_minus * g
            nu = d2.d * nu + d2.one_minus * (g * g)
            u = jnp.where(jnp.isfinite(g_in), step_size * (mu / (jnp.sqrt(nu) + eps)), 0.0)
            return u.astype(g_in.dtype), mu.astype(mu_in.dtype), nu.astype(nu_in.dtype)

        leaves, treedef, mus = leaves_like(updates, state.mu, where)
        out = [leaf(*x) for x in zip(leaves, mus, treedef.flatten_up_to(state.nu), strict=True)]
        u, mu, nu = (treedef.unflatten([o[i] for o in out]) for i in range(3))
        return u, ScaleBySpamState(count=t, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


class _DecayAfterStepState(NamedTuple):
    count: jax.Array  # int32, for the learning-rate schedule


def _decay_after_step(learning_rate, weight_decay) -> optax.GradientTransformation:
    """``u <- u - lr wd (p + u)``: weight decay of the already-updated parameter. Its state
    holds a step counter only when the learning rate is a schedule (as
    ``optax.scale_by_learning_rate``), so an injected (array) learning rate and a number give
    the same state."""
    scheduled = callable(learning_rate)

    def init_fn(params):
        del params
        return (_DecayAfterStepState(count=jnp.zeros([], jnp.int32)) if scheduled
                else optax.EmptyState())

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("spam: weight_decay needs the params argument of update()")
        lr = learning_rate(state.count) if scheduled else learning_rate
        updates = jax.tree.map(lambda u, p: u - (lr * weight_decay) * (p + u), updates, params)
        if scheduled:
            state = _DecayAfterStepState(count=optax.safe_increment(state.count))
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


def spam(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    threshold: float | None = 5000.0,
    reset_interval: int | None = 500,
    spike_delay: int = 20,
    warmup_steps: int = 150,
    mask: Any = None,
    *,
    state_bits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """The SPAM optimizer (Huang et al., ICLR 2025), as the official ``SPAM`` optimizer.

    ``u = -lr * scale_by_spam(...)``, then decoupled weight decay of the updated parameter:
    ``p_new = (p + u) (1 - lr wd)`` (the official code decays after the Adam step; optax's
    ``adamw`` decays the old parameter, a difference of order ``lr^2 wd``). See
    :func:`scale_by_spam` for the equations and the module docstring for non-finite gradients.

    Args:
      learning_rate: a scalar or an optax schedule.
      b1, b2, eps: Adam's constants (official defaults: 0.9, 0.999, 1e-6).
      weight_decay: decoupled weight decay ``wd`` (official default 0).
      threshold, reset_interval, spike_delay, warmup_steps: see :func:`scale_by_spam`
        (official: 5000, 500, 20, and 150 in the paper).
      mask: pytree of bools or callable, as ``optax.adamw``: where weight decay applies.
      state_bits: ``None`` (float32 moments), 8 or 4 (block-wise quantized moments).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from effjax.optim import spam
      >>> opt = spam(1e-3, reset_interval=500, warmup_steps=150)
      >>> params = {"w": jnp.ones((4, 3))}
      >>> state = opt.init(params)
      >>> updates, state = opt.update({"w": jnp.full((4, 3), 0.5)}, state, params)
      >>> round(float(updates["w"][0, 0]), 6)  # step 1: -lr * sign(g)
      -0.001
      >>> params = optax.apply_updates(params, updates)
    """
    check_range("spam", "weight_decay", weight_decay, 0.0)
    check_state_bits("spam", state_bits)
    core = maybe_quantize(scale_by_spam(b1, b2, eps, threshold, reset_interval, spike_delay,
                                         warmup_steps), state_bits)
    # The decay stage is always there (a no-op for weight_decay=0) so that the state has the
    # same structure under optax.inject_hyperparams, which makes weight_decay an array.
    wd_step = _decay_after_step(learning_rate, weight_decay)
    wd_step = weight_decay_stage(wd_step if mask is None else optax.masked(wd_step, mask),
                                 weight_decay)
    return zero_nonfinite_updates(
        optax.chain(core, optax.scale_by_learning_rate(learning_rate), wd_step))
