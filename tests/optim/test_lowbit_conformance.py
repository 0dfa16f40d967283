"""Conformance table of effjax's low-bit optimizers against independent references: the float
optax optimizer with the same arguments, a fake-quantization simulation of the documented format
written here, and hand-computed layouts and byte counts."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from optax import contrib

import effjax.optim as eo
from effjax.quant import (
    QuantizedArray,
    adam4bit_first_moment_codebook,
    adam4bit_second_moment_codebook,
    dynamic_codebook,
)

LR, WD, STEPS = 0.05, 0.01, 30
# The machine running the suite is small: skip LLVM's optimization passes to cut compile time by
# a third. The HLO, its fusion and sharding are unchanged; float results can differ from a default
# build in the last bit (no FMA contraction), and every comparison below is between programs
# compiled this same way.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
_isq = lambda x: isinstance(x, QuantizedArray)

# Least squares, one independent problem per leaf: 0.5 ||X (p - p*)||^2 (and 0.5 ||b - b*||^2).
_rng = np.random.default_rng(0)
_X = {"w": _rng.normal(size=(128, 64)) / np.sqrt(128), "e": _rng.normal(size=(64, 32)) / 8.0}
_PSTAR = {"w": _rng.normal(size=(64, 128)), "e": _rng.normal(size=(32, 256)),
          "b": _rng.normal(size=(16,))}
_X, _PSTAR = ({k: jnp.asarray(v, jnp.float32) for k, v in d.items()} for d in (_X, _PSTAR))
P0 = {k: jnp.asarray(0.1 * _rng.normal(size=v.shape), jnp.float32) for k, v in _PSTAR.items()}
SHAPES = {k: v.shape for k, v in P0.items()}


def _loss(p):
    return 0.5 * (jnp.sum((p["b"] - _PSTAR["b"]) ** 2)
                  + sum(jnp.sum((x @ (p[k] - _PSTAR[k])) ** 2) for k, x in _X.items()))


_grad = jit(jax.grad(_loss))


def _rand_grads(i):
    r = np.random.default_rng(100 + i)
    return {k: jnp.asarray(r.normal(size=s), jnp.float32) for k, s in SHAPES.items()}


def _sba(t):  # scale_by_adam has no learning rate: follow it with the same fixed scale
    return optax.chain(t, optax.scale(-LR))


class Row(NamedTuple):
    name: str
    low: Any  # (**quantization kwargs) -> the low-bit transformation
    ref: str  # key of REFS: the float optax transformation with the same arguments
    bits: int
    signed: tuple  # state fields expected on the signed (first-moment) map
    unsigned: tuple  # ... on the unsigned (second-moment) map
    counts: int  # int32 counters in the state
    sim: bool = False  # also compared with the fake-quantization simulation
    scale: Any = jnp.float32  # dtype of the stored block scales


# Float references (shared by rows with the same optimizer). In the chain, eps=1e-3 makes Adam's
# step depend on the gradient's scale, so that the clipping matters.
REFS = {
    "sba": lambda: _sba(optax.scale_by_adam()), "adam": lambda: optax.adam(LR),
    "adamw": lambda: optax.adamw(LR, weight_decay=WD),
    "lion": lambda: optax.lion(0.01, weight_decay=WD),
    "sgd": lambda: optax.sgd(0.1, momentum=0.9), "rmsprop": lambda: optax.rmsprop(0.01),
    "adagrad": lambda: optax.adagrad(0.3), "ademamix": lambda: contrib.ademamix(LR),
    "amsgrad": lambda: optax.amsgrad(LR), "adabelief": lambda: optax.adabelief(LR),
    "clip": lambda: optax.chain(optax.clip_by_global_norm(1.0),
                                optax.adamw(LR, eps=1e-3, weight_decay=WD)),
}
M, N = ("mu",), ("nu",)
_ROWS = [
    Row("scale_by_adam_8bit", lambda **k: _sba(eo.scale_by_adam_8bit(**k)), "sba", 8, M, N, 1),
    Row("adam_8bit", lambda **k: eo.adam_8bit(LR, **k), "adam", 8, M, N, 1),
    Row("adamw_8bit", lambda **k: eo.adamw_8bit(LR, weight_decay=WD, **k), "adamw", 8, M, N, 1),
    Row("lion_8bit", lambda **k: eo.lion_8bit(0.01, weight_decay=WD, **k), "lion", 8, M, (), 1,
        True),
    Row("sgd_8bit", lambda **k: eo.sgd_8bit(0.1, momentum=0.9, **k), "sgd", 8, ("trace",), (), 0),
    Row("rmsprop_8bit", lambda **k: eo.rmsprop_8bit(0.01, **k), "rmsprop", 8, (), N, 0),
    Row("adagrad_8bit", lambda **k: eo.adagrad_8bit(0.3, **k), "adagrad", 8, (),
        ("sum_of_squares",), 0, True),
    Row("ademamix_8bit", lambda **k: eo.ademamix_8bit(LR, **k), "ademamix", 8, ("m1", "m2"), N,
        2),
    Row("adam_4bit", lambda **k: eo.adam_4bit(LR, **k), "adam", 4, M, N, 1, True),
    Row("adamw_4bit", lambda **k: eo.adamw_4bit(LR, weight_decay=WD, **k), "adamw", 4, M, N, 1,
        True),
    Row("adamw_8bit/bf16", lambda **k: eo.adamw_8bit(LR, weight_decay=WD,
                                                     scale_dtype=jnp.bfloat16, **k), "adamw", 8,
        M, N, 1, True, jnp.bfloat16),
    Row("adamw_4bit/bf16", lambda **k: eo.adamw_4bit(LR, weight_decay=WD,
                                                     scale_dtype=jnp.bfloat16, **k), "adamw", 4,
        M, N, 1, True, jnp.bfloat16),
    Row("qs(adamw)", lambda **k: eo.quantize_state(optax.adamw(LR, weight_decay=WD), **k),
        "adamw", 8, M, N, 1),
    Row("qs(amsgrad)", lambda **k: eo.quantize_state(optax.amsgrad(LR), **k), "amsgrad", 8, M,
        ("nu", "nu_max"), 1, True),
    Row("qs(adabelief)", lambda **k: eo.quantize_state(optax.adabelief(LR), **k), "adabelief",
        8, M, N, 1),
    Row("qs4(adamw)", lambda **k: eo.quantize_state(optax.adamw(LR, weight_decay=WD), bits=4,
                                                    **k), "adamw", 4, M, N, 1, True),
    Row("chain(clip,adamw_8bit)", lambda **k: optax.chain(
        optax.clip_by_global_norm(1.0), eo.adamw_8bit(LR, eps=1e-3, weight_decay=WD, **k)),
        "clip", 8, M, N, 1),
]
ROWS = {r.name: r for r in _ROWS}
ALL = list(ROWS)


def _run(opt):
    """``STEPS`` steps from P0 in one jitted scan: final loss, first update, params, state."""
    def go(p):
        def body(carry, _):
            p, s = carry
            u, s = opt.update(jax.grad(_loss)(p), s, p)
            return (optax.apply_updates(p, u), s), u
        (p, s), us = jax.lax.scan(body, (p, opt.init(p)), None, length=STEPS)
        return _loss(p), jax.tree.map(lambda x: x[0], us), p, s
    return jit(go)(P0)


_float_run = functools.cache(lambda ref: _run(REFS[ref]()))
_trajectories = functools.cache(lambda name: (_run(ROWS[name].low()), _float_run(ROWS[name].ref)))


# 1. Against the float optimizer ---------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_first_update_equals_float_and_loss_tracks_float(name):
    (lq, u1q, _, _), (lf, u1f, _, _) = _trajectories(name)
    # Step 1 dequantizes the initial state (exact: zeros, or adagrad's 0.1 = 1.0 * absmax) and
    # returns the update from the new float moments before re-quantization: float optax's
    # update up to float32 rounding of differently fused code (measured: bit-identical in every
    # row but adagrad, 3 ulp there). Re-quantizing first would be ~1e-2 off.
    for k in SHAPES:
        scale = float(jnp.max(jnp.abs(u1f[k])))
        np.testing.assert_allclose(u1q[k], u1f[k], rtol=1e-6, atol=1e-6 * scale, err_msg=k)
    l0, lq, lf = float(_loss(P0)), float(lq), float(lf)
    assert lf < 0.6 * l0, "the float run must make real progress for the comparison to mean much"
    # 8 bits: the dynamic map's relative error is ~1e-2 per element of m and v, so each update
    # is ~1e-2 off and the runs drift apart slowly; the final loss (2-65x below the initial one)
    # differs by <= 3.2% in the measured rows, hence 8% (2.5x margin), and >= 99.4% of the float
    # loss reduction is reached, hence 98%; a stale state is off by far more. 4 bits (16 codes)
    # are much coarser: the loss ends ~3x the float one (the fake-quant simulation reproduces
    # that, so it is the format, not a bug): demand 75% of the float run's loss reduction
    # (measured 84%); the simulation test pins the 4-bit rows exactly.
    if ROWS[name].bits == 8:
        assert abs(lq - lf) <= 0.08 * lf, (lq, lf)
    assert (l0 - lq) >= (0.75 if ROWS[name].bits == 4 else 0.98) * (l0 - lf), (l0, lq, lf)


def _fake_quant(x, codebook, block, scale=jnp.float32):
    """Independent reference: round x * (1/absmax) to the nearest code (ties up), per block.
    bfloat16 scales: absmax replaced by the smallest bfloat16 not below it (round to nearest,
    then one bfloat16 step up where that fell below)."""
    cb = np.sort(np.asarray(codebook, np.float32))
    mid = (cb[:-1].astype(np.float64) + cb[1:]) / 2  # exact midpoints; y >= mid rounds up
    thr = mid.astype(np.float32)
    thr[thr < mid] = np.nextafter(thr[thr < mid], np.float32(np.inf))
    xb = x.reshape(-1, block)  # all sizes here are multiples of the block: blocks = runs
    absmax = jnp.max(jnp.abs(xb), axis=1, keepdims=True)
    if scale == jnp.bfloat16:
        r = absmax.astype(jnp.bfloat16)
        r = jnp.where(r.astype(jnp.float32) < absmax,
                      jnp.nextafter(r, jnp.bfloat16(jnp.inf)), r)
        absmax = r.astype(jnp.float32)
    y = xb * jnp.where(absmax > 0, 1.0 / absmax, 0.0)
    idx = jnp.searchsorted(jnp.asarray(thr), y, side="right")
    return (jnp.asarray(cb)[idx] * absmax).reshape(x.shape)


@functools.cache
def _simulated_run(ref, bits, signed, unsigned, scale=jnp.float32):
    """Float ``REFS[ref]`` whose large state leaves are replaced by fake-quantized values."""
    inner, block, maps = REFS[ref](), 256 if bits == 8 else 128, _maps(bits)

    def fq(path, x):
        if _field(path) not in signed + unsigned or x.size < 4096:
            return x
        return _fake_quant(x, maps[_field(path) in unsigned], block, scale)

    def update(g, s, p):
        u, s = inner.update(g, s, p)
        return u, jax.tree_util.tree_map_with_path(fq, s)
    return _run(optax.GradientTransformation(inner.init, update))


@pytest.mark.parametrize("name", [n for n in ROWS if ROWS[n].sim])
def test_matches_fake_quantization_simulation(name):
    row = ROWS[name]
    (lq, _, pq, _), _ = _trajectories(name)
    ls, _, ps, _ = _simulated_run(row.ref, row.bits, row.signed, row.unsigned, row.scale)
    # Same float math and rounding rule, but compiled as different programs: a moment that lands
    # within an ulp of a midpoint between two codes can round the other way (seen once in 30
    # steps: an exact tie, 1 ulp apart); that parameter's column then drifts by ~1e-3 (17 of
    # 8192 elements). Any error in the format (map, block grouping, rounding rule) moves most.
    np.testing.assert_allclose(float(lq), float(ls), rtol=1e-5)
    for k in SHAPES:
        off = np.abs(np.asarray(pq[k]) - np.asarray(ps[k]))
        assert np.mean(off > 1e-5) <= 1e-2 and off.max() < 1e-2, (k, np.mean(off > 1e-5))


# 2. State layout ------------------------------------------------------------------------------

def _maps(bits):  # {is_unsigned: codebook}
    return ({False: dynamic_codebook(signed=True), True: dynamic_codebook(signed=False)}
            if bits == 8 else
            {False: adam4bit_first_moment_codebook(), True: adam4bit_second_moment_codebook()})


def _field(path):  # the last NamedTuple field name on the path (mu, nu, ...)
    return ([k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)] or [None])[-1]


def _key(path):  # the parameter's name
    return ([k.key for k in path if isinstance(k, jax.tree_util.DictKey)] or [None])[-1]


# Hand-computed from the documented layout (blocks along the last axis; trailing axes merged
# while shorter than a block): 8 bits, block 256: w (64, 128) -> 32 blocks of two rows,
# e (32, 256) -> one block a row; 4 bits, block 128, two codes a byte.
_LAYOUT = {8: {"w": ((64, 128), (32,)), "e": ((32, 256), (32, 1))},
           4: {"w": ((64, 64), (64, 1)), "e": ((32, 128), (32, 2))}}


@pytest.mark.parametrize("name", ALL)
def test_state_layout_and_bytes(name):
    row = ROWS[name]
    (_, _, _, state), _ = _trajectories(name)  # after 30 updates
    fields, seen = row.signed + row.unsigned, set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(state, is_leaf=_isq)[0]:
        field, key, where = _field(path), _key(path), jax.tree_util.keystr(path)
        if _isq(leaf):
            seen.add((field, key))
            codes_shape, absmax_shape = _LAYOUT[row.bits][key]
            assert leaf.codes.dtype == jnp.uint8 and leaf.codes.shape == codes_shape, where
            assert leaf.absmax.dtype == row.scale and leaf.absmax.shape == absmax_shape, where
            assert (leaf.bits, leaf.block_size) == (row.bits, 256 if row.bits == 8 else 128)
            assert leaf.shape == SHAPES[key] and leaf.dtype == jnp.float32
            np.testing.assert_array_equal(np.asarray(leaf.codebook, np.float32),
                                          _maps(row.bits)[field in row.unsigned], err_msg=where)
            assert bool(jnp.all(jnp.isfinite(leaf.absmax)))
        elif field in fields and key is not None:  # the 16-element bias stays float32
            assert key == "b" and leaf.dtype == jnp.float32 and leaf.shape == (16,), where
    assert seen == {(f, k) for f in fields for k in ("w", "e")}
    # state_bytes by hand: per quantized field 2 x (8192 codes (4 bits: 4096 bytes) + absmax
    # floats) + the float32 bias state (16 x 4); int32 counters 4 bytes each.
    sb = jnp.dtype(row.scale).itemsize  # 4, or 2 for bfloat16 scales
    per_field = (2 * (8192 + 32 * sb) if row.bits == 8 else 2 * 4096 + (64 + 64) * sb) + 16 * 4
    assert eo.state_bytes(state) == len(fields) * per_field + 4 * row.counts


def test_min_quantized_size_threshold_and_short_leaves():
    params = {"w": jnp.zeros((64, 128)), "b": jnp.zeros((16,))}
    for mqs, quantized in ((8192, True), (8193, False)):
        state = jax.eval_shape(eo.adam_8bit(1e-3, min_quantized_size=mqs).init, params)
        assert _isq(state[0].mu["w"]) is quantized and _isq(state[0].nu["w"]) is quantized
        assert state[0].mu["b"].dtype == jnp.float32
    state = jax.eval_shape(eo.adam_8bit(1e-3, min_quantized_size=0).init, params)
    assert state[0].mu["b"].absmax.shape == (1,)  # one short block of 16
    assert state[0].count.dtype == jnp.int32  # counters are never quantized


# 3. Composition --------------------------------------------------------------------------------

_adamw8 = eo.adamw_8bit(LR, weight_decay=WD)
_adamw8_init, _adamw8_update = jit(_adamw8.init), jit(_adamw8.update)  # eager init is slow
_sched = lambda count: LR * (count + 1.0)


@pytest.mark.parametrize("static", [
    pytest.param((), id="plain"),
    pytest.param(("block_size", "min_quantized_size"), id="static_args")])
def test_inject_hyperparams_schedule(static):
    opt = optax.inject_hyperparams(eo.adamw_8bit, static_args=static)(
        learning_rate=_sched, weight_decay=WD)
    step = jit(opt.update)
    fixed = jit(lambda lr, g, s, p: eo.adamw_8bit(lr, weight_decay=WD).update(g, s, p))
    state = jit(opt.init)(P0)
    for k in range(3):
        g = _rand_grads(k)
        u_ref, _ = fixed(jnp.float32(_sched(k)), g, state.inner_state, P0)
        u_lr0, _ = fixed(jnp.float32(_sched(0)), g, state.inner_state, P0)
        u, state = step(g, state, P0)
        assert float(state.hyperparams["learning_rate"]) == pytest.approx(_sched(k), rel=1e-7)
        assert _isq(state.inner_state[0].mu["w"])
        for n in SHAPES:  # step k is adamw_8bit's step with lr = schedule(k) = (k+1) lr_0
            np.testing.assert_allclose(u[n], u_ref[n], rtol=1e-5, atol=1e-7, err_msg=n)
            np.testing.assert_allclose(u[n], (k + 1) * u_lr0[n], rtol=1e-5, atol=1e-7)


def test_multi_transform_keeps_float_branch_float():
    mt = optax.multi_transform({"q": eo.adamw_8bit(LR, weight_decay=WD, min_quantized_size=1024),
                                "f": optax.adamw(LR, weight_decay=WD)},
                               {"w": "q", "e": "f", "b": "q"})
    ref = optax.adamw(LR, weight_decay=WD)

    @jit
    def two_steps(g0, g1):
        s, r, out = mt.init(P0), ref.init(P0), []
        for g in (g0, g1):
            (u, s), (v, r) = mt.update(g, s, P0), ref.update(g, r, P0)
            out.append((u, v))
        return out, s

    out, state = two_steps(_rand_grads(0), _rand_grads(1))
    f_state, q_state = (state.inner_states[b].inner_state[0] for b in ("f", "q"))
    assert not any(_isq(x) for x in jax.tree.leaves(state.inner_states["f"], is_leaf=_isq))
    assert f_state.mu["e"].dtype == f_state.nu["e"].dtype == jnp.float32
    assert f_state.mu["e"].shape == (32, 256)
    assert _isq(q_state.mu["w"]) and _isq(q_state.nu["w"]) and not _isq(q_state.mu["b"])
    for u, v in out:  # the float leaf follows float adamw at every step
        np.testing.assert_allclose(u["e"], v["e"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(out[0][0]["w"], out[0][1]["w"], rtol=1e-6, atol=1e-9)


# 4. Bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL[:-1])  # all but the chain
def test_bad_arguments_raise_value_error(name):
    bad = [dict(block_size=0), dict(block_size=1), dict(min_quantized_size=-1)]
    for kwargs in bad + ([dict(block_size=127)] if ROWS[name].bits == 4 else []):
        with pytest.raises(ValueError):
            ROWS[name].low(**kwargs)


@pytest.mark.parametrize("make", [lambda: eo.quantize_state(optax.adam(1e-3), bits=3),
                                  lambda: eo.quantize_state(optax.adam(1e-3), bits=16),
                                  lambda: eo.sgd_8bit(0.1, momentum=0.0)])
def test_bad_bits_and_sgd_without_momentum(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize("name", ALL)
def test_integer_parameter_named_in_type_error(name):
    params = {"layer": {"count": jnp.zeros((8,), jnp.int32), "w": jnp.zeros((8,))}}
    with pytest.raises(TypeError, match=r"\['layer'\]\['count'\]"):
        ROWS[name].low().init(params)


# 5. Non-finite gradient elements --------------------------------------------------------------

_BAD = ((0, 3), (1, 100))  # two elements of w's first block (w's blocks are pairs of rows)
_finite = lambda tree: all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", ["adamw_8bit", "adagrad_8bit"])
def test_nonfinite_gradient_elements(name):
    opt = _adamw8 if name == "adamw_8bit" else ROWS[name].low()
    update = _adamw8_update if name == "adamw_8bit" else jit(opt.update)
    state = jit(opt.init)(P0)
    for k in range(2):
        _, state = update(_rand_grads(k), state, P0)
    g = _rand_grads(2)
    bad_g = dict(g, w=g["w"].at[_BAD[0]].set(jnp.nan).at[_BAD[1]].set(jnp.inf))
    # The rule stores non-finite new state as 0 (a NaN/inf gradient makes every moment of its
    # element non-finite), so the reference zeroes the gradient AND the old state there: then
    # the new state is 0 there as well, and every block max, code and other update is the same.
    zero_g = dict(g, w=g["w"].at[_BAD[0]].set(0.0).at[_BAD[1]].set(0.0))

    def zero_old_state(q):
        if not _isq(q) or q.shape != SHAPES["w"]:
            return q
        z = q.codebook.index(0.0)
        return dataclasses.replace(q, codes=q.codes.at[_BAD[0]].set(z).at[_BAD[1]].set(z))
    u, new = update(bad_g, state, P0)
    u_ref, new_ref = update(zero_g, jax.tree.map(zero_old_state, state, is_leaf=_isq), P0)
    mask = np.ones(SHAPES["w"], bool)
    mask[_BAD[0]] = mask[_BAD[1]] = False
    assert float(u["w"][_BAD[0]]) == 0.0 and float(u["w"][_BAD[1]]) == 0.0
    np.testing.assert_array_equal(np.asarray(u["w"])[mask], np.asarray(u_ref["w"])[mask])
    jax.tree.map(np.testing.assert_array_equal, (u["e"], u["b"], new),
                 (u_ref["e"], u_ref["b"], new_ref))
    assert _finite(new)  # absmax included
    for k in range(3, 5):  # later finite steps stay finite and identical
        u, new = update(_rand_grads(k), new, P0)
        u_ref, new_ref = update(_rand_grads(k), new_ref, P0)
        assert _finite((u, new))
        jax.tree.map(np.testing.assert_array_equal, (u, new), (u_ref, new_ref))


def test_nonfinite_gradient_in_float_leaf():
    g = _rand_grads(0)
    u, state = _adamw8_update(dict(g, b=g["b"].at[0].set(jnp.nan)), _adamw8_init(P0), P0)
    assert float(u["b"][0]) == 0.0
    assert _finite(_adamw8_update(_rand_grads(1), state, P0))


# 6. Sharding ----------------------------------------------------------------------------------

@pytest.mark.parametrize("factory", [eo.adamw_8bit, eo.adamw_4bit, functools.partial(
    eo.adamw_8bit, scale_dtype=jnp.bfloat16)], ids=["8bit", "4bit", "8bit/bf16"])
def test_sharded_update_keeps_parameter_sharding(factory):
    assert jax.device_count() >= 8, "tests/conftest.py sets 8 CPU devices"
    mesh = jax.make_mesh((2, 4), ("data", "model"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    specs = {"w": P("data", "model"), "v": P("model", None), "b": P("model"),
             "x": P("model", None)}
    # b: float32 state; x: 8-bit, rows of 384 grouped in pairs (whole blocks; 256 rows a shard)
    shapes = {"w": (512, 1024), "v": (1024, 512), "b": (1024,), "x": (1024, 384)}
    r = np.random.default_rng(7)
    params, grads = ({k: jax.device_put(jnp.asarray(r.normal(size=s), jnp.float32),
                                        NamedSharding(mesh, specs[k]))
                      for k, s in shapes.items()} for _ in range(2))
    opt = factory(1e-3)

    def expected(path, leaf):  # codes and absmax: the parameter's spec; counters replicated
        sh = NamedSharding(mesh, specs[_key(path)] if _key(path) else P())
        return dataclasses.replace(leaf, codes=sh, absmax=sh) if _isq(leaf) else sh
    want = jax.tree_util.tree_map_with_path(expected, jax.eval_shape(opt.init, params),
                                            is_leaf=_isq)
    state = jit(opt.init, out_shardings=want)(params)
    compiled = jit(lambda g, s, p: opt.update(g, s, p)).lower(grads, state, params).compile()
    # AdamW is elementwise and every block lies inside one shard: no collective at all (with
    # block_size=512, blocks straddle two 'model' shards and XLA adds all-gather + all-reduce).
    hlo = compiled.as_text()
    assert not [c for c in ("all-gather", "all-to-all", "all-reduce") if c in hlo]
    updates, new_state = compiled(grads, state, params)
    n_codes = 0
    for (path, got), sh in zip(jax.tree_util.tree_flatten_with_path(new_state)[0],
                               jax.tree.leaves(want), strict=True):
        n_codes += got.dtype == jnp.uint8
        assert got.sharding.is_equivalent_to(sh, got.ndim), (jax.tree_util.keystr(path), sh)
    assert n_codes == 6  # mu and nu of w, v and x are quantized
    grouped = [q for q in jax.tree.leaves(new_state, is_leaf=_isq)
               if _isq(q) and q.shape[-1] == 384]
    for q in grouped:  # 8-bit: pairs of rows, 3 blocks of 256; 4-bit: 3 blocks of 128 a row
        assert q.absmax.shape == {256: (512, 3), 128: (1024, 3)}[q.block_size]
    assert len(grouped) == 2
    for k in shapes:
        assert updates[k].sharding.is_equivalent_to(params[k].sharding, updates[k].ndim)


# 7. Checkpointing -----------------------------------------------------------------------------

def _train(update, p, s, steps):
    for _ in range(steps):
        u, s = update(_grad(p), s, p)
        p = optax.apply_updates(p, u)
    return p, s


@pytest.mark.parametrize("name", ["adamw_8bit", "adamw_4bit", "adamw_8bit/bf16"])
def test_orbax_roundtrip_and_resume(name, tmp_path):
    opt = _adamw8 if name == "adamw_8bit" else ROWS[name].low()
    update = _adamw8_update if name == "adamw_8bit" else jit(opt.update)
    p, s = _train(update, P0, jit(opt.init)(P0), 3)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "state", s)
    ckpt.wait_until_finished()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            s)
    restored = ckpt.restore(tmp_path / "state", abstract)
    ckpt.close()
    assert jax.tree.structure(restored) == jax.tree.structure(s)  # incl. codebooks, block size
    assert any(_isq(x) for x in jax.tree.leaves(restored, is_leaf=_isq))
    assert any(x.dtype == jnp.uint8 for x in jax.tree.leaves(restored))
    for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(restored), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    p_a, s_a = _train(update, p, s, 5)
    p_b, s_b = _train(update, p, restored, 5)
    jax.tree.map(np.testing.assert_array_equal, (p_a, s_a), (p_b, s_b))
