"""SPAM and Stable-SPAM against float64 numpy transcriptions of the official optimizers, written
below from TianjinYellow/SPAM-Optimizer ``galore_torch/SPAM.py`` and TianjinYellow/StableSPAM
``galore_torch/stablespam.py``, on a fixed gradient sequence with planted spikes; plus the
composable parts, presets, low-bit states, inject_hyperparams, non-finite gradients, bad input."""

from __future__ import annotations

import functools
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from effjax.optim import (
    STABLE_SPAM_4BIT,
    STABLE_SPAM_BF16,
    adaptive_grad_norm,
    adaptive_spike_clip,
    cosine_momentum_scale,
    momentum_reset,
    quantize_state,
    scale_by_spam,
    spam,
    stable_spam,
)
from effjax.quant import QuantizedArray, dynamic_codebook

# Skip LLVM's optimization passes to cut compile time on the small test machine (the HLO is the
# same; float results can differ from a default build in the last bit).
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
_isq = lambda x: isinstance(x, QuantizedArray)

STEPS = 50
SHAPES = {"w": (12, 20), "b": (7,), "e": (3, 4, 5)}


def _sequence(shapes, steps, seed):
    """Gradients (float32-representable) with a slowly varying scale, and parameters."""
    r = np.random.default_rng(seed)
    gs = [{k: r.normal(size=s) * (1.0 + 0.5 * np.sin(t / 7.0)) for k, s in shapes.items()}
          for t in range(1, steps + 1)]
    p0 = {k: r.normal(size=s) for k, s in shapes.items()}
    return gs, p0


def _f32(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float32), tree)


GS, P0 = _sequence(SHAPES, STEPS, seed=0)
# Planted spikes; GS[t - 1] is step t's gradient. Resets in the tests come every 10 steps.
GS[12]["w"][3, 4] = 400.0  # step 13: 3 steps after a reset
GS[20]["w"][5, 6] = 400.0  # step 21: 1 step after a reset
GS[26]["e"][1, 2, 3], GS[26]["e"][0, 0, 0] = -300.0, 250.0  # step 27: two entries
GS[34]["b"] *= 200.0  # step 35: the whole tensor
GS[43]["w"][0, 0] = -1000.0  # step 44
GS, P0 = _f32(GS), _f32(P0)
GS_STACKED = {k: np.stack([g[k] for g in GS]) for k in SHAPES}


def _run(opt, gs=GS_STACKED, p0=P0):
    """All updates of ``opt`` over the stacked gradients in one jitted scan: (updates, state)."""
    def go(p, gs):
        def body(carry, g):
            p, s = carry
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), u
        (_, s), us = jax.lax.scan(body, (p, opt.init(p)), gs)
        return us, s
    us, s = jit(go)(jax.tree.map(jnp.asarray, p0), gs)
    return jax.tree.map(np.asarray, us), s


# Float64 numpy transcriptions of the official optimizers ----------------------------------------

def ref_stable_spam(gs, p0, *, lr, b1=0.9, b2=0.999, eps=1e-8, wd=0.0, gamma1=0.7, gamma2=0.9,
                    theta=0.999, dT=None, total_T=None, eta_min=0.5, composed=False,
                    reset_counts=False):
    """``StableSPAM.step`` (amsgrad=False) per tensor; ``composed=True`` instead follows the
    documented chain of the separate parts (own counters, see the stable_spam docstring).
    Returns the updates (a list of dicts), the number of AdaClip-rescaled entries, and the
    smallest relative distance of any |g_i| to the clip threshold (well-posedness)."""
    p = {k: v.astype(np.float64) for k, v in p0.items()}
    st = {k: dict(step=0, count=0, m=np.zeros(v.shape), v=np.zeros(v.shape), m_max=0.0,
                  m_norm=0.0, v_norm=0.0) for k, v in p.items()}
    us, clipped, margin = [], 0, np.inf
    for total, g_all in enumerate(gs, 1):
        scale = 1.0
        if total_T is not None:  # CosineAnnealingLR(T_max=total_T+1) closed form at `total`
            scale = eta_min + (1 - eta_min) * (1 + math.cos(math.pi * total / (total_T + 1))) / 2
        u_all = {}
        for k, g in g_all.items():
            g, s, p_old = g.astype(np.float64).copy(), st[k], p[k]
            p_new = p_old * (1 - lr * wd)
            s["step"] += 1
            kc = total if composed else s["step"]  # the parts' own counters are never reset
            gmax = np.abs(g).max()
            s["m_max"] = theta * s["m_max"] + (1 - theta) * gmax
            hat = s["m_max"] / (1 - theta ** kc)
            if abs(hat / gmax - 1) > 1e-6:  # else a tie at the max only rescales by ~1
                margin = min(margin, np.min(np.abs(np.abs(g) - hat)) / hat)
            mask = np.abs(g) > hat
            clipped += int(mask.sum())
            g[mask] = g[mask] / gmax * hat
            n = np.linalg.norm(g)
            g1 = gamma1 * scale
            s["m_norm"] = g1 * s["m_norm"] + (1 - g1) * n
            s["v_norm"] = gamma2 * s["v_norm"] + (1 - gamma2) * n ** 2
            c = (s["m_norm"] / (1 - g1 ** kc)) / (np.sqrt(s["v_norm"] / (1 - gamma2 ** kc)) + eps)
            if n > 0:
                g = g / n * c
            reset = dT is not None and total % dT == 0
            beta1 = b1 * scale
            if composed:
                s["count"] += 1
                ka = s["count"]
            else:
                ka = 1 if reset else s["step"]
                s["step"] = ka
            m = beta1 * s["m"] + (1 - beta1) * g  # at a reset step: the OLD moments
            v = b2 * s["v"] + (1 - b2) * g * g
            denom = np.sqrt(v) / np.sqrt(1 - b2 ** ka) + eps
            p_new = p_new - lr / (1 - beta1 ** ka) * (m / denom)
            s["m"], s["v"] = (np.zeros_like(m), np.zeros_like(v)) if reset else (m, v)
            if composed and reset and reset_counts:
                s["count"] = 0
            u_all[k], p[k] = p_new - p_old, p_new
        us.append(u_all)
    return us, clipped, margin


def ref_spam(gs, p0, *, lr, b1=0.9, b2=0.999, eps=1e-6, wd=0.0, thres=5000.0, dT=None, N=20,
             W=150):
    """``SPAM.step`` (``AdamW`` in SPAM.py, no density masks); ``dT=None``: never reset.
    Returns the updates, the number of clipped entries, the number of entries with
    ``g^2 > thres v`` while clipping is off (v > 0), and the smallest relative distance of any
    ``g^2`` to ``thres v`` where clipping is on (well-posedness)."""
    period = math.inf if dT is None else dT
    p = {k: v.astype(np.float64) for k, v in p0.items()}
    st = {k: dict(step=0, m=np.zeros(v.shape), v=np.zeros(v.shape)) for k, v in p.items()}
    total_step, current_step = 0, W + 1
    us, clipped, skipped, margin = [], 0, 0, np.inf

    def get_dr(cs):  # CosineDecay(0.99, W).get_dr: CosineAnnealingLR(T_max=W+1), 0 from W on
        return 0.0 if cs >= W else 0.99 * (1 + math.cos(math.pi * cs / (W + 1))) / 2

    for g_all in gs:
        scale = 1 - get_dr(current_step)
        u_all = {}
        for k, g in g_all.items():
            g, s, p_old = g.astype(np.float64).copy(), st[k], p[k]
            if (total_step + 1) % period == 0:
                s["m"], s["v"] = np.zeros_like(s["m"]), np.zeros_like(s["v"])
            s["step"] += 1
            cur = total_step + 1
            if thres and cur >= N:
                mask = g ** 2 > thres * s["v"]
                if cur % period >= N:
                    margin = min(margin, np.min(np.abs(g ** 2 - thres * s["v"]) / (thres * s["v"])))
                    clipped += int(mask.sum())
                    g[mask] = np.sign(g[mask]) * np.sqrt(s["v"][mask] * thres)
                else:
                    skipped += int((mask & (s["v"] > 0)).sum())
            s["m"] = b1 * s["m"] + (1 - b1) * g
            s["v"] = b2 * s["v"] + (1 - b2) * g * g
            denom = np.sqrt(s["v"]) + eps
            step_size = lr * math.sqrt(1 - b2 ** s["step"]) / (1 - b1 ** s["step"])
            p_new = p_old - step_size * scale * (s["m"] / denom)
            if wd > 0:
                p_new = p_new - lr * wd * p_new
            u_all[k], p[k] = p_new - p_old, p_new
        us.append(u_all)
        total_step += 1
        current_step += 1
        if total_step != 0 and (total_step + 1) % period == 0:
            current_step = 0
    return us, clipped, skipped, margin


def _assert_updates_close(us, ref, rtol, what):
    """Per step and leaf: |u - ref| <= rtol (|ref| + max|ref|)."""
    for t, r in enumerate(ref):
        for k in SHAPES:
            got, want = us[k][t], r[k]
            tol = rtol * (np.abs(want) + np.abs(want).max())
            bad = np.abs(got - want) > tol
            assert not bad.any(), (what, "step", t + 1, k, np.max(np.abs(got - want) / tol))


# 1. Stable-SPAM = the official optimizer ---------------------------------------------------------

LR = 0.01
SS_CASES = {  # name: stable_spam kwargs (reset every 10 steps: 5 resets in 50 steps)
    "4bit_dT10_wd": dict(STABLE_SPAM_4BIT, reset_interval=10, weight_decay=0.1),
    "bf16_cosine": dict(STABLE_SPAM_BF16, reset_interval=10, total_steps=40, eta_min=0.5),
    "no_reset": dict(theta=0.99, reset_interval=None, b1=0.8),
}


def _ss_ref_kwargs(kw):
    names = dict(weight_decay="wd", reset_interval="dT", total_steps="total_T")
    return {names.get(k, k): v for k, v in kw.items()}


_ss_run = functools.cache(lambda name: _run(stable_spam(LR, **SS_CASES[name])))
_ss_ref = functools.cache(lambda name: ref_stable_spam(GS, P0, lr=LR,
                                                       **_ss_ref_kwargs(SS_CASES[name])))

# float32 against float64, relative to |ref| + max|ref| per step and leaf: measured at most
# 7e-7 for the fused optimizers; a wrong counter, threshold or coefficient is off by >= 1e-3.
RTOL = 1e-5
# optax.scale_by_adam computes 1 - 0.999^t in float32 (ours from log(0.999) in float64):
# measured 6e-6 for the chain of parts.
RTOL_CHAIN = 5e-5


@pytest.mark.parametrize("name", list(SS_CASES))
def test_stable_spam_matches_official_transcription(name):
    us, state = _ss_run(name)
    ref, clipped, margin = _ss_ref(name)
    assert clipped > 0, "AdaClip must rescale some entries for the comparison to test it"
    assert margin > 1e-4, "no |g_i| within float32 rounding of the clip threshold"
    _assert_updates_close(us, ref, RTOL, name)
    assert int(state[0].count) == STEPS


def test_stable_spam_state_right_after_reset():
    # 50 % 10 == 0: the final state is the one stored after a reset step.
    _, state = _ss_run("4bit_dT10_wd")
    core = state[0]
    assert int(core.step) == 1 and int(core.count) == STEPS
    for k in SHAPES:
        assert not np.any(np.asarray(core.mu[k])) and not np.any(np.asarray(core.nu[k]))
        for stat in (core.m_max, core.m_norm, core.v_norm):  # statistics are not reset
            assert stat[k].shape == () and stat[k].dtype == jnp.float32 and float(stat[k]) > 0


def test_presets_have_the_official_values():
    assert dict(STABLE_SPAM_4BIT) == dict(gamma1=0.7, gamma2=0.9, theta=0.999,
                                          reset_interval=500)
    assert dict(STABLE_SPAM_BF16) == dict(gamma1=0.85, gamma2=0.99999, theta=0.999,
                                          reset_interval=1000)
    defaults = {k: v.default for k, v in inspect.signature(stable_spam).parameters.items()}
    assert {k: defaults[k] for k in STABLE_SPAM_4BIT} == dict(STABLE_SPAM_4BIT)
    assert (defaults["b1"], defaults["b2"], defaults["eps"]) == (0.9, 0.999, 1e-8)
    with pytest.raises(TypeError):
        STABLE_SPAM_4BIT["gamma1"] = 0.5  # read-only


def test_cosine_momentum_scale_is_the_closed_form():
    s = cosine_momentum_scale(total_steps=40, eta_min=0.3)
    n = np.arange(60)
    want = 0.3 + 0.7 * (1 + np.cos(np.pi * (n + 1) / 41)) / 2
    np.testing.assert_allclose(np.asarray(jax.vmap(s)(n)), want, rtol=1e-6, atol=1e-7)


# 2. The three parts composed with optax.chain -----------------------------------------------------

def _chain(reset_counts):
    kw = SS_CASES["4bit_dT10_wd"]
    return optax.chain(
        adaptive_spike_clip(kw["theta"]), adaptive_grad_norm(kw["gamma1"], kw["gamma2"], 1e-8),
        momentum_reset(optax.scale_by_adam(0.9, 0.999, 1e-8), kw["reset_interval"],
                       reset_counts=reset_counts),
        optax.add_decayed_weights(kw["weight_decay"]), optax.scale_by_learning_rate(LR))


@pytest.mark.parametrize("reset_counts", [True, False])
def test_chain_of_parts_matches_documented_semantics(reset_counts):
    us, _ = _run(_chain(reset_counts))
    ref, clipped, margin = ref_stable_spam(GS, P0, lr=LR, composed=True,
                                           reset_counts=reset_counts,
                                           **_ss_ref_kwargs(SS_CASES["4bit_dT10_wd"]))
    assert clipped > 0 and margin > 1e-4
    _assert_updates_close(us, ref, RTOL_CHAIN, "chain")
    # Same algorithm as the fused optimizer before the first reset step (10); different after.
    fused, _ = _ss_run("4bit_dT10_wd")
    for k in SHAPES:
        np.testing.assert_allclose(us[k][:9], fused[k][:9], rtol=1e-5, atol=1e-7)
        assert np.max(np.abs(us[k][9:] - fused[k][9:])) > 1e-3 * np.max(np.abs(fused[k]))


def test_adaptive_grad_norm_with_cosine_gamma1_schedule():
    # The official cosine variant: gamma1_t = 0.85 s_t, bias correction (gamma1_t)^t.
    sched = lambda n: 0.85 * cosine_momentum_scale(total_steps=8, eta_min=0.5)(n)
    us, _ = _run(adaptive_grad_norm(sched, 0.99, 1e-8))
    for k in SHAPES:
        m = v = 0.0
        for t in range(1, STEPS + 1):
            g = GS[t - 1][k].astype(np.float64)
            g1 = 0.85 * (0.5 + 0.5 * (1 + math.cos(math.pi * t / 9)) / 2)
            n = np.linalg.norm(g)
            m, v = g1 * m + (1 - g1) * n, 0.99 * v + 0.01 * n * n
            c = (m / (1 - g1 ** t)) / (math.sqrt(v / (1 - 0.99 ** t)) + 1e-8)
            np.testing.assert_allclose(us[k][t - 1], g / n * c, rtol=1e-5, err_msg=(k, t))


def test_parts_pass_nonfinite_through_and_keep_finite_state():
    g = {"w": jnp.array([1.0, jnp.nan, -2.0, jnp.inf])}
    for tx in (adaptive_spike_clip(0.9), adaptive_grad_norm(0.7, 0.9)):
        state = tx.init({"w": jnp.zeros(4)})
        u, state = jit(tx.update)(g, state)
        u_ref, state_ref = jit(tx.update)({"w": jnp.array([1.0, 0.0, -2.0, 0.0])},
                                          tx.init({"w": jnp.zeros(4)}))
        assert np.isnan(u["w"][1]) and np.isposinf(u["w"][3])  # passed through
        np.testing.assert_array_equal(u["w"][::2], u_ref["w"][::2])
        jax.tree.map(np.testing.assert_array_equal, state, state_ref)  # counted as 0


@pytest.mark.parametrize("reset_counts", [False, True])
def test_momentum_reset_generic_state(reset_counts):
    inner = optax.inject_hyperparams(optax.adam)(learning_rate=0.1)
    tx = momentum_reset(quantize_state(inner, min_quantized_size=0), 3, reset_counts=reset_counts)
    params = {"w": jnp.ones((4, 8))}
    state = jit(tx.init)(params)
    step = jit(tx.update)
    for t in range(1, 5):
        _, state = step({"w": jnp.full((4, 8), 0.5)}, state, params)
        adam = state.inner_state.inner_state[0]
        for q in (adam.mu["w"], adam.nu["w"]):  # zero absmax: the moment dequantizes to 0
            assert (not np.asarray(q.absmax).any()) == (t == 3), t  # zeroed after step 3 only
        # the injected learning rate (a 0-d float) is kept; the counts as asked
        assert float(state.inner_state.hyperparams["learning_rate"]) == pytest.approx(0.1)
        want_count = t - 3 if (reset_counts and t >= 3) else t
        assert int(adam.count) == want_count and int(state.count) == t


# 3. SPAM = the official optimizer ----------------------------------------------------------------

SP_CASES = {  # name: (spam kwargs, reference kwargs)
    "dT10_wd": dict(reset_interval=10, spike_delay=3, warmup_steps=4, weight_decay=0.1),
    "no_reset": dict(reset_interval=None, spike_delay=5, warmup_steps=4),
    "dT7_long_warmup": dict(reset_interval=7, spike_delay=2, warmup_steps=6, threshold=200.0,
                            eps=1e-8),
}


def _sp_ref_kwargs(kw):
    names = dict(weight_decay="wd", reset_interval="dT", spike_delay="N", warmup_steps="W",
                 threshold="thres")
    return {names.get(k, k): v for k, v in kw.items()}


_sp_run = functools.cache(lambda name: _run(spam(LR, **SP_CASES[name])))


@pytest.mark.parametrize("name", list(SP_CASES))
def test_spam_matches_official_transcription(name):
    us, state = _sp_run(name)
    ref, clipped, _, margin = ref_spam(GS, P0, lr=LR, **_sp_ref_kwargs(SP_CASES[name]))
    assert clipped > 0, "spike clipping must trigger"
    assert margin > 1e-4, "no g^2 within float32 rounding of theta v"
    _assert_updates_close(us, ref, RTOL, name)
    assert int(state[0].count) == STEPS


_SBS = dict(reset_interval=10, spike_delay=3, warmup_steps=4)  # = SP_CASES["dT10_wd"]
_sbs_run = functools.cache(lambda threshold: _run(scale_by_spam(threshold=threshold, **_SBS)))


def test_spam_clipping_is_off_right_after_reset():
    _, clipped, skipped, _ = ref_spam(GS, P0, lr=LR, **_sp_ref_kwargs(SP_CASES["dT10_wd"]))
    assert clipped > 0 and skipped > 0  # step 21's spike passes g^2 > theta v but is not clipped
    (on, _), (off, _) = _sbs_run(5000.0), _sbs_run(None)
    # Step 13's spike is clipped: that entry's update changes, and so do later ones until the
    # reset at step 20. The moments are reset at step 20 and clipping is off for steps 20-22
    # (t % 10 < 3): identical updates there, although step 21 carries a spike.
    assert abs(on["w"][12][3, 4] - off["w"][12][3, 4]) > 0.1 * abs(off["w"][12][3, 4])
    assert not np.array_equal(on["w"][12:19], off["w"][12:19])
    for k in SHAPES:
        np.testing.assert_array_equal(on[k][19:22], off[k][19:22])


def test_spam_warmup_factor_at_reset_step():
    # Step 20 is a reset step: fresh moments, m / (sqrt(v) + eps) = (1-b1) g / (sqrt(1-b2)|g| + eps)
    # scaled by 0.01 (the warm-up factor at c = 0) and the never-reset bias correction of step 20.
    us, _ = _sbs_run(5000.0)
    g = GS[19]["w"].astype(np.float64)
    bc = math.sqrt(1 - 0.999 ** 20) / (1 - 0.9 ** 20)
    want = 0.01 * bc * 0.1 * g / (math.sqrt(0.001) * np.abs(g) + 1e-6)
    np.testing.assert_allclose(us["w"][19], want, rtol=1e-5)


@pytest.mark.parametrize("factory", [stable_spam, spam], ids=["stable_spam", "spam"])
def test_weight_decay_mask(factory):
    g, p = jax.tree.map(jnp.asarray, GS[0]), jax.tree.map(jnp.asarray, P0)
    first = lambda opt: jit(lambda g, p: opt.update(g, opt.init(p), p)[0])(g, p)
    u_mask = first(factory(LR, weight_decay=0.5, mask={"w": True, "b": False, "e": True}))
    u_all, u_none = first(factory(LR, weight_decay=0.5)), first(factory(LR))
    np.testing.assert_array_equal(u_mask["b"], u_none["b"])  # not decayed
    for k in ("w", "e"):
        np.testing.assert_array_equal(u_mask[k], u_all[k])
        assert not np.allclose(u_mask[k], u_none[k], rtol=1e-3)


# 4. Low-bit states ------------------------------------------------------------------------------

QSHAPES = {"w": (64, 128), "b": (16,)}
QGS, QP0 = _sequence(QSHAPES, 30, seed=1)
QGS[15]["w"][1, 2] = 300.0
QGS = {k: np.stack([np.asarray(g[k], np.float32) for g in QGS]) for k in QSHAPES}
QP0 = _f32(QP0)
_LOWBIT = {"stable_spam": lambda **k: stable_spam(LR, reset_interval=10, **k),
           "spam": lambda **k: spam(LR, reset_interval=10, spike_delay=3, warmup_steps=4, **k)}


@pytest.mark.parametrize("name", list(_LOWBIT))
def test_state_bits_8_quantizes_moments_and_tracks_float(name):
    (uf, _), (uq, sq) = (_run(_LOWBIT[name](state_bits=b), QGS, QP0) for b in (None, 8))
    core = sq[0]
    for field, signed in (("mu", True), ("nu", False)):
        leaf = getattr(core, field)["w"]
        assert _isq(leaf) and leaf.bits == 8, field
        np.testing.assert_array_equal(np.asarray(leaf.codebook, np.float32),
                                      dynamic_codebook(signed=signed))
        assert getattr(core, field)["b"].dtype == jnp.float32  # 16 elements: kept in float
    for path, leaf in jax.tree_util.tree_flatten_with_path(core, is_leaf=_isq)[0]:
        if not _isq(leaf) and leaf.ndim == 0:  # counters int32, statistics float32 scalars
            assert leaf.dtype in (jnp.int32, jnp.float32), jax.tree_util.keystr(path)
    # Step 1 starts from exactly-zero moments: the same update as float, up to rounding.
    np.testing.assert_allclose(uq["w"][0], uf["w"][0], rtol=1e-6, atol=1e-9)
    # 8-bit moments carry ~1e-2 relative error per element, so updates drift apart slowly;
    # measured: the summed update of w is within 1.4% (stable_spam) and 1.6% (spam) of float's.
    # Bound 5%; a stale or mis-mapped state (e.g. v on the signed map) is off by far more.
    for k in QSHAPES:
        df, dq = uf[k].sum(0), uq[k].sum(0)
        assert np.linalg.norm(dq - df) <= 0.05 * np.linalg.norm(df), k


def test_quantize_state_around_the_alias_equals_state_bits():
    (u1, s1), (u2, s2) = (_run(t, QGS, QP0) for t in (
        stable_spam(LR, reset_interval=10, state_bits=8),
        quantize_state(stable_spam(LR, reset_interval=10))))
    for k in QSHAPES:  # same leaves quantized with the same maps: the same float math
        np.testing.assert_allclose(u1[k], u2[k], rtol=1e-6, atol=1e-9)
    assert _isq(s2[0].mu["w"]) and _isq(s2[0].nu["w"])


@pytest.mark.parametrize("factory", [stable_spam, spam])
def test_state_bits_4_layout(factory):
    state = jax.eval_shape(factory(LR, state_bits=4).init, {"w": jnp.zeros((64, 128))})
    core = state[0]
    assert _isq(core.mu["w"]) and core.mu["w"].bits == 4 and core.nu["w"].bits == 4
    assert min(core.nu["w"].codebook) > 0  # torchao's linear map without zero: unsigned
    assert min(core.mu["w"].codebook) < 0


# 5. inject_hyperparams ----------------------------------------------------------------------------

_sched = lambda count: LR * (count + 1.0)
_STATIC = {stable_spam: ("b1", "b2", "eps", "weight_decay", "gamma1", "gamma2", "theta",
                         "reset_interval", "eta_min"),
           spam: ("b1", "b2", "eps", "weight_decay", "threshold", "reset_interval",
                  "spike_delay", "warmup_steps")}


@pytest.mark.parametrize("factory", [stable_spam, spam], ids=["stable_spam", "spam"])
def test_inject_hyperparams_learning_rate(factory):
    kw = dict(reset_interval=2, weight_decay=0.1)
    opt = optax.inject_hyperparams(factory, static_args=_STATIC[factory])(
        learning_rate=_sched, **kw)
    fixed = jit(lambda lr, g, s, p: factory(lr, **kw).update(g, s, p))
    step, state = jit(opt.update), opt.init(P0)
    everything = optax.inject_hyperparams(factory)(learning_rate=_sched, **kw)  # all injected
    step_all, state_all = jit(everything.update), everything.init(P0)
    for t in range(4):  # two resets
        u_ref, _ = fixed(jnp.float32(_sched(t)), GS[t], state.inner_state, P0)
        u, state = step(GS[t], state, P0)
        u_all, state_all = step_all(GS[t], state_all, P0)
        assert float(state.hyperparams["learning_rate"]) == pytest.approx(_sched(t))
        for k in SHAPES:
            np.testing.assert_allclose(u[k], u_ref[k], rtol=1e-6, atol=1e-9)
            # Every hyper-parameter as a float32 array: 1 - 0.999 is then 1.3e-5 off relative
            # (float64 in the static path), so allow 1e-4.
            np.testing.assert_allclose(u_all[k], u[k], rtol=1e-4, atol=1e-7)


# 6. Non-finite gradients --------------------------------------------------------------------------

_BAD = ((0, 3), (5, 7))


@pytest.mark.parametrize("name", ["stable_spam", "spam", "stable_spam_8bit"])
def test_nonfinite_gradient_elements_count_as_zero_and_do_not_move(name):
    opt = {"stable_spam": lambda: stable_spam(LR, reset_interval=3, weight_decay=0.1),
           "spam": lambda: spam(LR, reset_interval=3, spike_delay=1, weight_decay=0.1),
           "stable_spam_8bit": lambda: stable_spam(LR, reset_interval=3, state_bits=8)}[name]()
    step, state = jit(opt.update), opt.init(P0)
    for t in range(2):
        _, state = step(GS[t], state, P0)
    bad = dict(GS[2], w=GS[2]["w"].copy(), b=np.full(SHAPES["b"], np.inf, np.float32))
    bad["w"][_BAD[0]], bad["w"][_BAD[1]] = np.nan, -np.inf
    zero = dict(bad, w=np.where(np.isfinite(bad["w"]), bad["w"], 0.0), b=np.zeros(SHAPES["b"]))
    u, new = step(bad, state, P0)
    u_ref, new_ref = step(jax.tree.map(jnp.asarray, zero), state, P0)
    ok = np.isfinite(bad["w"])
    assert not np.asarray(u["w"])[~ok].any() and not np.asarray(u["b"]).any()  # 0, no decay
    np.testing.assert_array_equal(np.asarray(u["w"])[ok], np.asarray(u_ref["w"])[ok])
    np.testing.assert_array_equal(u["e"], u_ref["e"])
    jax.tree.map(np.testing.assert_array_equal, new, new_ref)  # state as for a 0 gradient
    for t in range(3, 6):  # later steps (one of them a reset) stay finite and identical
        u, new = step(GS[t], new, P0)
        u_ref, new_ref = step(GS[t], new_ref, P0)
        assert all(np.isfinite(x).all() for x in jax.tree.leaves((u, new)))
        jax.tree.map(np.testing.assert_array_equal, (u, new), (u_ref, new_ref))


# 7. Bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: stable_spam(LR, theta=0.0), lambda: stable_spam(LR, theta=-0.5),
    lambda: stable_spam(LR, theta=1.0), lambda: stable_spam(LR, gamma1=1.0),
    lambda: stable_spam(LR, gamma2=-0.1), lambda: stable_spam(LR, b1=1.0),
    lambda: stable_spam(LR, eps=-1e-8), lambda: stable_spam(LR, reset_interval=0),
    lambda: stable_spam(LR, reset_interval=2.5), lambda: stable_spam(LR, total_steps=0),
    lambda: stable_spam(LR, eta_min=1.5), lambda: stable_spam(LR, weight_decay=-0.1),
    lambda: stable_spam(LR, state_bits=3), lambda: stable_spam(LR, gamma1=math.nan),
    lambda: spam(LR, threshold=0.0), lambda: spam(LR, threshold=-5.0),
    lambda: spam(LR, reset_interval=0), lambda: spam(LR, spike_delay=-1),
    lambda: spam(LR, warmup_steps=-1), lambda: spam(LR, b2=1.5), lambda: spam(LR, state_bits=16),
    lambda: momentum_reset(optax.scale_by_adam(), 0),
    lambda: momentum_reset(optax.scale_by_adam(), True),
    lambda: adaptive_spike_clip(theta=0.0), lambda: adaptive_grad_norm(gamma1=1.5),
    lambda: cosine_momentum_scale(total_steps=0),
])
def test_bad_arguments_raise_value_error(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize("factory", [stable_spam, spam])
def test_integer_parameter_named_in_type_error(factory):
    params = {"layer": {"count": jnp.zeros((8,), jnp.int32), "w": jnp.zeros((8,))}}
    with pytest.raises(TypeError, match=r"\['layer'\]\['count'\]"):
        factory(LR).init(params)


@pytest.mark.parametrize("factory", [stable_spam, spam])
def test_update_shape_mismatch_named_in_value_error(factory):
    opt = factory(LR)
    params = {"layer": {"w": jnp.zeros((4, 3)), "b": jnp.zeros((3,))}}
    bad = {"layer": {"w": jnp.zeros((4, 3)), "b": jnp.zeros((1,))}}  # would broadcast
    with pytest.raises(ValueError, match=r"\['layer'\]\['b'\] has shape \(1,\)"):
        opt.update(bad, opt.init(params), params)
    with pytest.raises(ValueError, match="tree structure"):
        opt.update({"layer": {"w": jnp.zeros((4, 3))}}, opt.init(params), params)


def test_state_bits_must_be_static_under_inject_hyperparams():
    with pytest.raises(ValueError, match="static_args"):
        optax.inject_hyperparams(spam)(learning_rate=LR, state_bits=8).init(P0)


# 8. Huge finite gradient elements (issue 19 item 3) ----------------------------------------------

_HUGE_AT, _HUGE_STEP = (5, 17), 1  # one element, in the second of five steps
_HUGE_GS = [np.random.default_rng(7).standard_normal((64, 256)).astype(np.float32)
            for _ in range(5)]
_HUGE_P0 = np.random.default_rng(8).standard_normal((64, 256)).astype(np.float32)


@pytest.mark.parametrize("value", [1e20, 3e38, np.inf, np.nan], ids=str)
@pytest.mark.parametrize("name", ["stable_spam", "spam"])
def test_one_huge_or_nonfinite_element_leaves_the_rest_as_float64(name, value):
    """One element of 1e20 (its square overflows float32), 3e38, inf or NaN in a 64x256
    gradient: every update and the state stay finite, and every other element's updates equal
    the float64 transcription of the official optimizer run on the same gradients (the
    non-finite element counted as 0 there, as documented; its own update is 0). Before the fix
    stable_spam's squared norm overflowed and the whole tensor was NaN from then on."""
    gs = [g.copy() for g in _HUGE_GS]
    gs[_HUGE_STEP][_HUGE_AT] = value
    us, state = _run({"stable_spam": stable_spam, "spam": spam}[name](LR),
                     {"w": np.stack(gs)}, {"w": _HUGE_P0})
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves((us, state)))
    ref_gs = [{"w": np.where(np.isfinite(g), g, 0.0)} for g in gs]
    ref = (ref_stable_spam(ref_gs, {"w": _HUGE_P0}, lr=LR, dT=500)[0] if name == "stable_spam"
           else ref_spam(ref_gs, {"w": _HUGE_P0}, lr=LR, dT=500)[0])
    others = np.ones((64, 256), bool)
    others[_HUGE_AT] = False
    for t, r in enumerate(ref):
        got, want = us["w"][t], r["w"]
        tol = RTOL * (np.abs(want) + np.abs(want).max())
        assert (np.abs(got - want) <= tol)[others].all(), ("step", t + 1)
    if not np.isfinite(value):
        assert us["w"][_HUGE_STEP][_HUGE_AT] == 0.0
