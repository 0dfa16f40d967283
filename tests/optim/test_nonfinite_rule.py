"""The non-finite rule of the low-bit optimizers (issue 19 item 1), on every path.

Rule (``effjax.optim.quantize_state``'s docstring): an element whose gradient, update or any new
moment is not finite (NaN, +-inf, or a finite gradient whose square overflows: 1e20 / 3e38 in
float32 and bfloat16, 300 in float16) gets update 0 and every moment of it restarts from 0.

The check is an exact property, independent of the code under test: from a zero state, a
zero gradient leaves a zero state and a zero update in every optimizer here, so a run whose
first gradient holds bad elements must equal, bit for bit, the run whose first gradient holds 0
there; and so must every later step (normal gradients). Before the fix the 1e20 element kept its
first moment (1e19) over a zeroed second moment and the next update divided by sqrt(0): the
parameter reached 1.04e19 after 3 steps (float16: -28.5 from |g| = 300).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import effjax.optim as eo
from effjax.quant import QuantizedArray
from pallas_kernels import native_cpu as N
from pallas_kernels import optim_update as K

SHAPE, BLOCK, LR, STEPS = (8, 256), 64, 1e-2, 3
Q = dict(block_size=BLOCK, min_quantized_size=0)
# Planted elements of the first gradient (row, column): value per dtype. Each is a non-finite
# value or a finite one whose square (Adam's, RMSprop's, AdEMAMix's v) overflows in the dtype.
# The huge finite ones are bad for the optimizers with a second moment (``SQUARES``); Lion and
# SGD take them as ordinary (finite) steps, as optax does, so they get only the non-finite ones.
PLANTED = {
    "float32": {(1, 5): np.nan, (1, 77): np.inf, (3, 130): -np.inf, (5, 9): 1e20,
                (6, 200): -3e38},
    "bfloat16": {(1, 5): np.nan, (3, 130): np.inf, (5, 9): 1e20, (6, 200): -3e38},
    "float16": {(1, 5): np.nan, (3, 130): -np.inf, (5, 9): 300.0, (6, 200): -65504.0},
}
NONFINITE_ONLY = ("lion_8bit", "sgd_8bit")

OPTIMIZERS = {  # no weight decay: with it a zero gradient still moves the parameter
    "adamw_8bit": lambda **k: eo.adamw_8bit(LR, weight_decay=0.0, **Q, **k),
    "adam_8bit": lambda **k: eo.adam_8bit(LR, **Q, **k),
    "lion_8bit": lambda **k: eo.lion_8bit(LR, weight_decay=0.0, **Q, **k),
    "sgd_8bit": lambda **k: eo.sgd_8bit(LR, momentum=0.9, **Q, **k),
    "rmsprop_8bit": lambda **k: eo.rmsprop_8bit(LR, **Q, **k),
    "ademamix_8bit": lambda **k: eo.ademamix_8bit(LR, **Q, **k),
    "adam_4bit": lambda **k: eo.adam_4bit(LR, **Q, **k),
    "adamw_4bit": lambda **k: eo.adamw_4bit(LR, weight_decay=0.0, **Q, **k),
    "quantize_state(adamw)": lambda **k: eo.quantize_state(optax.adamw(LR, weight_decay=0.0),
                                                           **Q),
}
FUSED = ("adamw_8bit", "lion_8bit", "sgd_8bit", "adamw_4bit")  # the rows with kernel paths

CASES = [(name, "float32", "jnp") for name in OPTIMIZERS]
CASES += [(name, dt, "jnp") for name in FUSED for dt in ("bfloat16", "float16")]
CASES += [(name, "float32", path) for name in FUSED for path in ("native", "chunked", "pallas")
          if not (path == "chunked" and name == "adamw_4bit")]  # chunked: 8-bit leaves only


def _paths(monkeypatch, path):
    """Make ``select_path`` pick ``path`` when the step is traced (this process has 8 CPU
    devices, on which auto dispatch takes the jnp path)."""
    if path in ("native", "chunked"):
        monkeypatch.setattr(jax, "device_count", lambda *a: 1)
    if path == "chunked":
        monkeypatch.setattr(N, "available", lambda: False)
        monkeypatch.setattr(K, "CHUNK_MIN_ELEMS", 0)
    return {"pallas": dict(use_kernel=True), "jnp": dict(use_kernel=False)}.get(path, {})


def _grads(dtype, name):
    rng = np.random.default_rng(0)
    gs = [0.05 * rng.standard_normal(SHAPE).astype(np.float32) for _ in range(STEPS)]
    bad, clean = gs[0].copy(), gs[0].copy()
    for (i, j), v in PLANTED[dtype].items():
        if name in NONFINITE_ONLY and np.isfinite(v):
            continue
        bad[i, j], clean[i, j] = v, 0.0
    cast = lambda x: {"w": jnp.asarray(x, dtype)}
    return [cast(bad)] + [cast(g) for g in gs[1:]], [cast(clean)] + [cast(g) for g in gs[1:]]


def _run(opt, grads, dtype):
    step = jax.jit(opt.update)
    params = {"w": jnp.asarray(np.linspace(-1, 1, np.prod(SHAPE)).reshape(SHAPE), dtype)}
    state = opt.init(params)
    for g in grads:
        updates, state = step(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("name,dtype,path", CASES)
def test_bad_elements_reset_like_a_zero_gradient(name, dtype, path, monkeypatch):
    opt = OPTIMIZERS[name](**_paths(monkeypatch, path))
    bad, clean = _grads(dtype, name)
    got, want = _run(opt, bad, dtype), _run(opt, clean, dtype)
    if path in ("native", "pallas", "chunked"):  # the kernel really ran
        jaxpr = str(jax.make_jaxpr(opt.update)(bad[0], opt.init(got[0]), got[0]))
        kinds = {"native": ["effjax_lowbit_step"], "pallas": ["pallas_call"],
                "chunked": ["while[", "scan["]}[path]  # noqa: E501
        assert any(k in jaxpr for k in kinds)
    for (kp, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want),
                          strict=True):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(kp), strict=True)
        if np.issubdtype(a.dtype, np.floating):
            assert np.isfinite(a).all(), jax.tree_util.keystr(kp)
    # and no blow-up: |params| <= 1 at start, each step moves an element by at most about
    # 3.2 lr (RMSprop's first step: g / sqrt(0.1 g^2))
    assert float(jnp.abs(got[0]["w"].astype(jnp.float32)).max()) <= 1.0 + STEPS * 4 * LR


@pytest.mark.parametrize("rule,n_mom", [(K.adam_rule, 2), (K.lion_rule, 1), (K.sgd_rule, 1)])
def test_a_nonzero_moment_restarts_from_zero(rule, n_mom):
    """From a non-zero state: the bad element's update and every moment of it are 0 after the
    step (the joint reset), on the reference and the chunked step; blocks without a bad
    element are those of the same step with a finite gradient there."""
    rng = np.random.default_rng(1)
    from effjax.quant import dynamic_codebook, quantize_blockwise
    moms = tuple(quantize_blockwise(jnp.asarray(np.abs(rng.standard_normal(SHAPE)) if k else
                                                rng.standard_normal(SHAPE), jnp.float32),
                                    codebook=dynamic_codebook(signed=not k), block_size=BLOCK)
                 for k in range(n_mom))
    s = {"b1": 0.9, "b2": 0.999, "eps": 1e-8, "eps_root": 0.0, "bc1": jnp.float32(0.5),
         "bc2": jnp.float32(0.1), "decay": 0.9, "lr": -LR}
    g = rng.standard_normal(SHAPE).astype(np.float32)
    g_bad = g.copy()
    g_bad[2, 70] = 1e20  # finite; its square overflows (Adam's v); Lion/SGD: a finite step
    g_bad[4, 3] = np.nan
    for fn in (K.fused_update_reference,
               functools.partial(K.fused_update_chunked, chunk_elems=2 * BLOCK)):
        u, new = fn(rule, jnp.asarray(g_bad), None, moms, s)
        u0, new0 = fn(rule, jnp.asarray(g), None, moms, s)
        bad = [(4, 3)] + ([(2, 70)] if rule is K.adam_rule else [])
        for i, j in bad:
            assert float(u[i, j]) == 0.0
            for m in new:
                assert float(m.dequantize()[i, j]) == 0.0
        rows = [r for r in range(SHAPE[0]) if r not in (2, 4)]
        np.testing.assert_array_equal(np.asarray(u)[rows], np.asarray(u0)[rows])
        for m, m0 in zip(new, new0):
            assert np.isfinite(np.asarray(m.absmax)).all()
            np.testing.assert_array_equal(np.asarray(m.codes)[rows], np.asarray(m0.codes)[rows])


def test_rule_written_once_for_the_kernels():
    """The kernels and the chunked step share ``reset_bad``: on a tile holding every kind of
    bad element it zeroes exactly those elements' update and moments."""
    g = jnp.array([1.0, jnp.nan, 2.0, 3.0, 4.0])
    u = jnp.array([0.1, 0.2, jnp.inf, 0.3, 0.4])
    m = jnp.array([1.0, 1.0, 1.0, -jnp.inf, 5.0])
    v = jnp.array([1.0, 1.0, 1.0, 1.0, jnp.nan])
    u2, (m2, v2) = K.reset_bad(g, u, (m, v))
    np.testing.assert_array_equal(u2, np.float32([0.1, 0, 0, 0, 0]))
    np.testing.assert_array_equal(m2, np.float32([1.0, 0, 0, 0, 0]))
    np.testing.assert_array_equal(v2, np.float32([1.0, 0, 0, 0, 0]))


def test_quantized_state_leaves_are_quantized():
    """The table's rows do quantize their (small) test leaf: the rule is tested on codes."""
    for name, make in OPTIMIZERS.items():
        state = make().init({"w": jnp.zeros(SHAPE)})
        assert any(isinstance(x, QuantizedArray) for x in jax.tree.leaves(
            state, is_leaf=lambda x: isinstance(x, QuantizedArray))), name


@pytest.mark.parametrize("renormalize", [True, False])
def test_perp_grad_passes_nonfinite_entries_through(renormalize):
    """perp_grad keeps no state and follows optax's convention: a NaN/inf entry is passed
    through unchanged and counts as 0 in <w, g> and the norms, so the other entries are the
    projection (the equation, in float64 numpy) of the gradient with 0 there. (It used to turn
    every entry NaN without renormalization, and zero the whole tensor with it.)"""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(6, 10)).astype(np.float32)
    g = rng.normal(size=(6, 10)).astype(np.float32)
    g[1, 2], g[4, 7], g[5, 0] = np.nan, np.inf, -np.inf
    out, _ = eo.perp_grad(renormalize=renormalize).update({"w": jnp.asarray(g)}, None,
                                                          {"w": jnp.asarray(w)})
    out = np.asarray(out["w"])
    bad = ~np.isfinite(g)
    np.testing.assert_array_equal(out[bad], g[bad])
    g0, w64 = np.where(bad, 0.0, g).astype(np.float64), w.astype(np.float64)
    gp = g0 - (np.vdot(w64, g0) / np.vdot(w64, w64)) * w64
    if renormalize:
        gp *= np.linalg.norm(g0) / np.linalg.norm(gp)
    np.testing.assert_allclose(out[~bad], gp[~bad], rtol=2e-5, atol=1e-6)  # float32 sums
