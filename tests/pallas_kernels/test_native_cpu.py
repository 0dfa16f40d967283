"""pallas_kernels.native_cpu: the C++ fused low-bit step (XLA FFI) on CPU.

Independent reference: the rules written plainly in numpy float32 (numpy rounds every product
and sum on its own, as the kernel compiled with -ffp-contract=off does), and the nearest code
found by brute force over the codebook (float64 distances, ties to the larger value), not by
the bucket tables the kernel uses. Kernel and reference must agree bit for bit: codes, absmax
and updates. Against effjax.optim's jnp path (XLA contracts some multiply-adds into FMAs) the
state and updates agree to float32 rounding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from effjax import optim as O
from effjax import quant as Q
from effjax.optim import _fused as F
from pallas_kernels import native_cpu as N
from tests.pallas_kernels.test_optim_update import OPTIMIZERS, _quantized
from tests.quant.test_blockwise import _bf16_neighbours

f32 = np.float32


def test_the_kernel_builds_here():
    # CI machines have a C++ compiler: a failed build must fail here, not fall back silently.
    assert N.available(), N.unavailable_reason()
    assert N.library_path().exists()


# ------------------------------------------------------------------ the numpy reference

def _nearest(y, values):
    """Index of the codebook value nearest to each y (brute force; ties to the larger value)."""
    v = np.asarray(values, np.float64)
    d = np.abs(v[None, :] - y.astype(np.float64).reshape(-1, 1))
    best = d.min(axis=1, keepdims=True)
    cand = np.where(d == best, v[None, :], -np.inf)  # among the tied, the larger value
    return cand.argmax(axis=1).reshape(y.shape)


def _quantize(x, values, bs, bf16_scale=False):
    """quantize_blockwise of finite x: (codes in the codebook's order, absmax)."""
    xb = x.reshape(-1, bs)
    absmax = np.abs(xb).max(axis=1).astype(f32)
    if bf16_scale:
        absmax = _bf16_neighbours(absmax)[1]  # the smallest bfloat16 >= absmax
    pre = np.where(absmax >= f32(2.0**125), f32(2.0**-4), f32(1.0)).astype(f32)
    with np.errstate(divide="ignore"):
        inv = np.where(absmax > 0, f32(1) / (absmax * pre), f32(0)).astype(f32)
    y = (xb * pre[:, None]).astype(f32) * inv[:, None]
    return _nearest(y.astype(f32), values).reshape(x.shape), absmax


def _reference(algo, g, p, moms, s, apply, bf16_scale=False):
    """moms: list of (codes as int indices of full shape, absmax per block, values, bs)."""
    old = [(np.asarray(vals, f32)[c].reshape(-1, bs) * a[:, None]).reshape(g.shape)
           for c, a, vals, bs in moms]
    c1, b1 = f32(1 - s.get("b1", 0)), f32(s.get("b1", 0))
    c2, b2 = f32(1 - s.get("b2", 0)), f32(s.get("b2", 0))
    with np.errstate(all="ignore"):
        if algo == "adam":
            mu = c1 * g + b1 * old[0]
            nu = c2 * (g * g) + b2 * old[1]
            if "bc1_next" in s:
                mu_hat = b1 * (mu / f32(s["bc1_next"])) + c1 * (g / f32(s["bc1"]))
            else:
                mu_hat = mu / f32(s["bc1"])
            u = mu_hat / (np.sqrt(nu / f32(s["bc2"]) + f32(s["eps_root"])) + f32(s["eps"]))
            new = [mu, nu]
        elif algo == "lion":
            u = np.sign(c1 * g + b1 * old[0]).astype(f32)
            new = [c2 * g + b2 * old[0]]
        else:
            t = g + f32(s["decay"]) * old[0]
            u = g + f32(s["decay"]) * t if s.get("nesterov") else t
            new = [t]
        if "wd" in s:
            u = u + f32(s["wd"]) * p
        u = f32(s["lr"]) * u
        # the non-finite rule: a bad element (gradient, update or any new moment not finite)
        # gets update 0 and all its moments 0
        bad = ~np.isfinite(g) | ~np.isfinite(u)
        for x in new:
            bad |= ~np.isfinite(x)
        u = np.where(bad, f32(0), u).astype(f32)
        new = [np.where(bad, f32(0), x) for x in new]
        out = p + u if apply else u
    q = [_quantize(x.astype(f32), vals, bs, bf16_scale) for x, (_, _, vals, bs) in zip(new, moms)]
    return out.astype(f32), q


# ------------------------------------------------------------------ kernel == reference

BOOKS = {
    8: (Q.dynamic_codebook(signed=True), Q.dynamic_codebook(signed=False), 256),
    4: (Q.adam4bit_first_moment_codebook(), Q.adam4bit_second_moment_codebook(), 128),
}

CASES = [  # (algo, scalars, apply)
    ("adam", dict(b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, bc1=0.19, bc2=0.001999,
                  wd=0.01, lr=-1e-3), False),
    ("adam", dict(b1=0.9, b2=0.999, eps=1e-8, eps_root=1e-12, bc1=0.19, bc2=0.001999,
                  bc1_next=0.271, lr=-3e-3), True),
    ("lion", dict(b1=0.9, b2=0.99, wd=1e-3, lr=-1e-4), False),
    ("lion", dict(b1=0.95, b2=0.98, lr=-1e-4), True),
    ("sgd", dict(decay=0.9, nesterov=False, lr=-0.1), False),
    ("sgd", dict(decay=0.8, nesterov=True, lr=-0.1), True),
    ("sgd", dict(decay=0.9, nesterov=False, wd=0.01, lr=-0.1), False),  # decayed weights
]


def _leaf(bits, shape, seed, scale_dtype=jnp.float32):
    """Gradient, parameter and moments with the edge cases: a NaN and an inf gradient, an
    all-zero block, and a block whose absmax is above 2**125 (the pre-scaled 1/absmax)."""
    cb_m, cb_v, bs = BOOKS[bits]
    k = jax.random.split(jax.random.key(seed), 4)
    g = np.array(jax.random.normal(k[0], shape), f32)
    g.reshape(-1)[3], g.reshape(-1)[bs + 7] = np.nan, np.inf
    g.reshape(-1)[2 * bs: 3 * bs] = 0.0  # with zero moments below: an all-zero block
    p = np.array(jax.random.normal(k[1], shape), f32)
    m = np.array(0.1 * jax.random.normal(k[2], shape), f32)
    v = np.array(0.01 * jax.random.uniform(k[3], shape), f32)
    m.reshape(-1)[2 * bs: 3 * bs] = 0.0
    v.reshape(-1)[2 * bs: 3 * bs] = 0.0
    # absmax above 2**125 = 4.25e37 in block 4 after the step (times 0.8..0.99), with every
    # rule's update still finite (Adam's m / (1 - b1^t) <= 2.6e38)
    m.reshape(-1)[4 * bs + 1] = 5.4e37
    qm = Q.quantize_blockwise(m, codebook=cb_m, block_size=bs, scale_dtype=scale_dtype)
    qv = Q.quantize_blockwise(v, codebook=cb_v, block_size=bs, scale_dtype=scale_dtype)
    return g, p, qm, qv


def _as_ref(q):
    codes = np.asarray(q.codes)
    if q.bits == 4:
        codes = np.stack([codes >> 4, codes & 15], axis=-1).reshape(q.shape)
    return codes.astype(np.int64), np.asarray(q.absmax, f32).reshape(-1), q.codebook, \
        q.block_size


@pytest.mark.parametrize("scale_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("algo,s,apply", CASES)
def test_kernel_equals_numpy_reference(bits, algo, s, apply, scale_dtype):
    _check_against_reference(bits, algo, s, apply, scale_dtype,
                             (6, 1024) if bits == 8 else (3, 2, 512))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("algo,s,apply", CASES)
def test_kernel_equals_numpy_reference_on_grouped_rows(bits, algo, s, apply):
    """Rows shorter than a whole number of blocks (a hidden size of 384 with blocks of 256,
    192 with 128) are grouped in pairs (effjax.quant.block_view): the blocks are the flat
    blocks of the reference, and the kernel takes the leaf."""
    shape = (6, 384) if bits == 8 else (6, 192)
    assert Q.block_view(shape, BOOKS[bits][2]) == (3, 2 * shape[1])
    _check_against_reference(bits, algo, s, apply, jnp.float32, shape)


def _check_against_reference(bits, algo, s, apply, scale_dtype, shape):
    g, p, qm, qv = _leaf(bits, shape, seed=bits, scale_dtype=scale_dtype)
    moms = (qm, qv) if algo == "adam" else (qm,)
    scal = {k: (jnp.float32(v) if k.startswith("bc") else v) for k, v in s.items()}
    uses_p = apply or "wd" in s
    step = jax.jit(lambda g, p, ms: N.lowbit_step(algo, g, p, ms, scal, apply=apply))
    assert "effjax_lowbit_step" in step.lower(g, p if uses_p else None, moms).as_text()
    out, new = step(g, p if uses_p else None, moms)
    bf16 = scale_dtype == jnp.bfloat16
    ref_out, ref_new = _reference(algo, g, p, [_as_ref(q) for q in moms], s, apply, bf16)
    np.testing.assert_array_equal(np.asarray(out), ref_out)
    for q, (codes, absmax) in zip(new, ref_new):
        assert q.codes.shape == moms[0].codes.shape and q.absmax.shape == moms[0].absmax.shape
        assert q.absmax.dtype == scale_dtype
        np.testing.assert_array_equal(_as_ref(q)[0], codes)
        np.testing.assert_array_equal(np.asarray(q.absmax, f32).reshape(-1), absmax)
    # The edge cases did happen: the non-finite gradients got no update, block 2 stayed zero,
    # block 4's first moment is above 2**125 (the pre-scaled reciprocal).
    flat = np.asarray(out).reshape(-1)
    assert flat[3] == (p.reshape(-1)[3] if apply else 0)
    assert all(float(q.absmax.reshape(-1)[2]) == 0.0 for q in new)
    assert float(new[0].absmax.reshape(-1)[4]) > 2.0**125
    assert all(np.isfinite(np.asarray(q.absmax)).all() for q in new)


# ------------------------------------------------------------------ the search alone

SEARCH_BOOKS = {  # name: codebook (8-bit if more than 16 values, else 4-bit)
    "dynamic signed": Q.dynamic_codebook(signed=True),
    "dynamic unsigned": Q.dynamic_codebook(signed=False),
    "linear signed (threshold 0.0)": Q.linear_codebook(8, signed=True),
    "dynamic signed, shuffled": np.random.default_rng(0).permutation(Q.dynamic_codebook()),
    "nf4": Q.nf4_codebook(),
    "fp4 (unsorted)": Q.fp4_codebook(),
    "adam4bit first moment": Q.adam4bit_first_moment_codebook(),
    "adam4bit second moment": Q.adam4bit_second_moment_codebook(),
}


def _search_probes(values):
    """Scaled values in [-1, 1] where a search goes wrong first: every decision threshold (the
    float32 midpoints rounded up, as effjax.quant's) and its float neighbours, the first float
    of every bucket of the kernel's table and the float below it, both signs, zeros and
    subnormals."""
    v = np.unique(np.asarray(values, np.float64))
    mid = ((v[:-1] + v[1:]) / 2).astype(f32)
    (_, _, table, _), (shift, q0, nb, _) = N._search_tables(
        tuple(float(x) for x in np.asarray(values, f32)))
    starts = ((np.arange(nb, dtype=np.int64) + q0) << shift).astype(np.int32)
    edges = np.concatenate([starts, starts - 1]).view(f32)
    pts = np.concatenate([mid, np.nextafter(mid, f32(np.inf)), np.nextafter(mid, f32(-np.inf)),
                          edges, np.array([0.0, 1e-45, 1e-38, 1e-30, 1.0], f32)]).astype(f32)
    pts = pts[np.abs(pts) <= 1]
    return np.concatenate([pts, -pts])


@pytest.mark.parametrize("name", sorted(SEARCH_BOOKS))
def test_kernel_search_is_nearest_at_every_threshold_and_bucket_edge(name):
    """An SGD step with decay 0 from a zero moment stores the gradient itself, so the new codes
    are the kernel's search on y = g / absmax; with absmax 1 (each block holds a 1.0), y = g
    exactly. Every code must be the brute-force nearest value."""
    values = SEARCH_BOOKS[name]
    bs = 256 if len(values) > 16 else 128
    y = _search_probes(values)
    rows = -(-y.size // (bs - 1))
    body = np.zeros(rows * (bs - 1), f32)
    body[: y.size] = y
    g = np.concatenate([np.ones((rows, 1), f32), body.reshape(rows, bs - 1)], axis=1)
    m = Q.quantize_blockwise(jnp.zeros(g.shape), codebook=values, block_size=bs)
    _, (new,) = jax.jit(lambda g, m: N.lowbit_step("sgd", g, None, (m,), dict(
        decay=0.0, nesterov=False, lr=1.0)))(g, m)
    np.testing.assert_array_equal(np.asarray(new.absmax).reshape(-1), np.ones(rows, f32))
    # The nearest value (fp4 has both +0 and -0: compared as values, either code is nearest).
    # Exactly: y goes above v_k iff y >= (v_k + v_k+1) / 2, a midpoint float64 holds exactly
    # (float64 distances cannot tell -1e-30 from 0 next to +-1/255). XLA:CPU runs with
    # subnormals flushed to zero, the kernel and effjax.quant alike: so does the reference.
    v = np.unique(np.asarray(values, np.float64))
    y = np.where(np.abs(g) < np.finfo(f32).tiny, 0.0, g.astype(np.float64))
    nearest = v[np.searchsorted((v[:-1] + v[1:]) / 2, y, side="right")]
    codes = _as_ref(new)[0].reshape(rows, bs)
    np.testing.assert_array_equal(np.asarray(values, f32)[codes], nearest)
    # ... and the very code effjax.quant picks, so states move between the paths.
    ref = Q.quantize_blockwise(jnp.asarray(g), codebook=values, block_size=bs)
    np.testing.assert_array_equal(np.asarray(new.codes), np.asarray(ref.codes))


# ------------------------------------------------------------------ checks and dispatch

def test_bad_leaves_are_refused_with_the_leaf_name():
    g, p, qm, qv = _leaf(8, (6, 1024), seed=2)
    s = dict(CASES[0][1], bc1=jnp.float32(0.19), bc2=jnp.float32(0.002))
    with pytest.raises(ValueError, match=r"\['w'\].*bfloat16"):
        N.lowbit_step("adam", jnp.asarray(g, jnp.bfloat16), p, (qm, qv), s, name="['w']")
    with pytest.raises(ValueError, match="unknown rule 'rmsprop'"):
        N.lowbit_step("rmsprop", g, p, (qm,), s, name="['w']")
    with pytest.raises(ValueError, match="adam needs 2 moments"):
        N.lowbit_step("adam", g, p, (qm,), s, name="['w']")
    padded = Q.quantize_blockwise(jnp.zeros((3, 1400)), codebook=Q.dynamic_codebook())
    assert not N.supports(jnp.zeros((3, 1400)), None, (padded,))
    odd4 = Q.quantize_blockwise(jnp.zeros((4, 129)), codebook=Q.nf4_codebook(), block_size=128)
    assert not N.supports(jnp.zeros((4, 129)), None, (odd4,))
    assert N.supports(g, p, (qm, qv)) and not N.supports(g, p.astype(jnp.bfloat16), (qm, qv))


def test_a_code_past_a_short_codebook_is_loud_not_a_wild_read():
    """A corrupted state: code 250 in an 8-bit codebook of 200 values decodes to NaN (the
    kernel reads a 256-entry copy of the table, never past it), so by the non-finite rule that
    element's update is 0 and its moment is stored as 0; the other elements' updates are the
    finite step."""
    book = tuple(np.linspace(-1.0, 1.0, 200).tolist())
    m = Q.quantize_blockwise(jnp.linspace(-1.0, 1.0, 512).reshape(2, 256), codebook=book)
    m = Q.QuantizedArray(codes=m.codes.at[0, 3].set(250), absmax=m.absmax, shape=m.shape,
                         dtype=m.dtype, block_size=m.block_size, codebook=m.codebook,
                         bits=m.bits)
    g = jnp.ones((2, 256))
    s = dict(decay=0.9, nesterov=False, lr=-0.1)
    u, (m2,) = jax.jit(lambda g, m: N.lowbit_step("sgd", g, None, (m,), s))(g, m)
    u = np.asarray(u)
    assert u[0, 3] == 0.0 and np.isfinite(u).all()
    assert (np.delete(u.reshape(-1), 3) != 0).all()  # -0.1 (g + 0.9 m), m decoded
    # stored as 0: this codebook has no 0, so its code is the value nearest 0 (+-1/199)
    nearest0 = float(np.abs(np.asarray(book, np.float32)).min() * m2.absmax[0, 0])
    assert abs(float(Q.dequantize_blockwise(m2)[0, 3])) == pytest.approx(nearest0, rel=1e-6)
    assert np.isfinite(np.asarray(m2.absmax)).all()


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("EFFJAX_NATIVE", "0")
    N.available.cache_clear()
    try:
        assert not N.available() and N.unavailable_reason() == "EFFJAX_NATIVE=0"
        monkeypatch.setattr(jax, "device_count", lambda *a: 1)
        assert F.select_path(None, name="x") == "chunked"
    finally:
        monkeypatch.delenv("EFFJAX_NATIVE")
        N.available.cache_clear()
    assert N.available()


@pytest.fixture
def one_device(monkeypatch):
    """Auto dispatch picks the native kernel in single-device CPU processes; this test process
    has 8 CPU devices (tests/conftest.py), so make it look like one."""
    monkeypatch.setattr(jax, "device_count", lambda *a: 1)


def test_auto_is_the_native_kernel_on_single_device_cpu(one_device):
    assert F.select_path(None, name="x") == "native"
    params = {"w": jnp.zeros((8, 512)), "b": jnp.zeros((10,)), "h": jnp.zeros((6, 384)),
              "odd": jnp.zeros((5, 384))}
    jaxpr = str(jax.make_jaxpr(O.adamw_8bit(1e-3, min_quantized_size=1000).update)(
        params, O.adamw_8bit(1e-3, min_quantized_size=1000).init(params), params))
    # "w", and "h" (rows grouped in pairs: whole blocks); "b" keeps float32 state, and "odd"
    # (5 rows of 384 cannot pair up: each row ends in a short block) takes the jnp step.
    assert jaxpr.count("effjax_lowbit_step") == 2
    opt = O.adamw_8bit(1e-3, min_quantized_size=1000, scale_dtype=jnp.bfloat16)
    jaxpr = str(jax.make_jaxpr(opt.update)(params, opt.init(params), params))
    assert jaxpr.count("effjax_lowbit_step") == 2  # bfloat16 scales too


# ------------------------------------------------------------------ through the optimizers

PARAMS = {
    "a": jnp.zeros((8, 1024)),  # native
    "e": jnp.zeros((2, 16, 64), jnp.bfloat16),  # bf16: the jnp step
    "h": jnp.zeros((4, 384)),  # rows grouped in pairs (whole blocks): native
    "pad": jnp.zeros((3, 1400)),  # a padded last block: the jnp step
    "small": jnp.zeros((10,)),  # float32 state
}


def _grads(step):
    out = {}
    for i, (k, v) in enumerate(sorted(PARAMS.items())):
        g = jax.random.normal(jax.random.key(100 * step + i), v.shape) * (step + 1)
        if k == "a" and step >= 1:
            g = g.at[0, 5 + step].set(jnp.nan).at[3, 900 + step].set(jnp.inf)
        out[k] = g.astype(v.dtype)
    return out


def _run(opt, steps, state=None, params=PARAMS, start=0, fused=False):
    state = opt.init(params) if state is None else state
    apply = O.fused_apply(opt)

    @jax.jit
    def step(p, s, g):
        if fused:
            new_p, s = apply(g, s, p)
            return jax.tree.map(lambda a, b: a - b, new_p, p), s, new_p
        u, s = opt.update(g, s, p)
        return u, s, optax.apply_updates(p, u)

    for t in range(start, start + steps):
        u, state, params = step(params, state, _grads(t))
    return u, state, params


def _close(y, x, atol):
    """All but 0.1% of elements within ``atol``; the rest (a moment code that flipped at a
    midpoint, felt by that element's later updates) within 10% of the largest value."""
    y, x = np.asarray(y, np.float32), np.asarray(x, np.float32)
    bad = np.abs(y - x) > atol
    assert bad.mean() <= 1e-3, (bad.sum(), np.abs(y - x).max(), atol)
    assert np.abs(y - x).max() <= 0.1 * np.abs(x).max()


NATIVE_OPTIMIZERS = dict(OPTIMIZERS, **{  # plus bfloat16 scales (effjax.quant.round_scale)
    "adamw_8bit/bf16": lambda uk: O.adamw_8bit(1e-2, weight_decay=0.1, use_kernel=uk,
                                               min_quantized_size=1000,
                                               scale_dtype=jnp.bfloat16),
    "adamw_4bit/bf16": lambda uk: O.adamw_4bit(1e-2, use_kernel=uk, min_quantized_size=1000,
                                               scale_dtype=jnp.bfloat16),
})


@pytest.mark.parametrize("name", sorted(NATIVE_OPTIMIZERS))
def test_optimizers_native_close_to_unfused_path(name, one_device):
    """Three steps, native (auto; ``update`` + ``apply_updates`` and ``fused_apply``) vs the
    unfused jnp path from the same start. The paths round multiply-adds differently (XLA
    contracts some into FMAs), so moments can sit an ulp apart and a code may then flip at a
    midpoint, which later steps inherit. Measured here: at most 1 code in 8192 and updates
    within 3e-7 of the largest (Adam); the bounds below leave room for other BLAS/CPU."""
    mk = NATIVE_OPTIMIZERS[name]
    u0, s0, p0 = _run(mk(False), 3)
    for fused in (False, True):
        u1, s1, p1 = _run(mk(None), 3, fused=fused)
        assert jax.tree.structure(s0) == jax.tree.structure(s1)
        for a, b in zip(_quantized(s0), _quantized(s1)):
            assert (a.shape, a.dtype, a.codes.shape) == (b.shape, b.dtype, b.codes.shape)
            assert a.absmax.dtype == b.absmax.dtype == (
                jnp.bfloat16 if name.endswith("bf16") else jnp.float32)
            assert np.mean(np.asarray(a.codes) != np.asarray(b.codes)) <= 1e-3
            np.testing.assert_allclose(np.asarray(b.absmax, np.float32),
                                       np.asarray(a.absmax, np.float32), rtol=1e-5)
        for k in PARAMS:
            umax = float(np.abs(np.asarray(u0[k], np.float32)).max())
            assert umax > 0
            if not fused:
                _close(u1[k], u0[k], 1e-4 * umax)
            # parameters: plus one rounding of the parameter's own dtype
            pmax = float(np.abs(np.asarray(p0[k], np.float32)).max())
            _close(p1[k], p0[k], 1e-4 * umax + float(jnp.finfo(PARAMS[k].dtype).eps) * pmax)
        if not fused:
            assert float(u1["a"][0, 7]) == 0.0 and float(u1["a"][3, 902]) == 0.0
        assert all(np.isfinite(np.asarray(q.absmax)).all() for q in _quantized(s1))


def test_update_is_written_over_a_temporary_gradient(one_device):
    """In a step whose gradient is computed in the same jit, the update takes the gradient's
    buffer: one leaf-sized temporary (the gradient) where it would be two (gradient and
    update); a gradient used after the update, or passed in, is left intact (XLA copies)."""
    p = {"w": jnp.full((512, 512), 0.5)}
    x = jax.random.normal(jax.random.key(0), (512, 512))
    opt = O.adamw_8bit(1e-2)
    s = opt.init(p)
    leaf = 512 * 512 * 4

    def grad(p):
        return jax.grad(lambda p: jnp.sum(jnp.sin(p["w"]) * x))(p)

    def step(p, s):
        u, s = opt.update(grad(p), s, p)
        return optax.apply_updates(p, u), s

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(p, s).compile()
    assert "effjax_lowbit_step" in compiled.as_text()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert leaf <= temp < leaf + leaf // 4, temp

    def step_keeping_grad(p, s):  # the gradient is an output too: it must survive the update
        g = grad(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, g

    new_p, _, g = jax.jit(step_keeping_grad)(p, s)
    np.testing.assert_array_equal(np.asarray(g["w"]), np.asarray(jnp.cos(p["w"]) * x))
    g_in = grad(p)
    want = np.asarray(g_in["w"]).copy()
    u, _ = jax.jit(opt.update)(g_in, s, p)
    np.testing.assert_array_equal(np.asarray(g_in["w"]), want)  # the caller's gradient
    u_ref, _ = O.adamw_8bit(1e-2, use_kernel=False).update(g_in, s, p)
    np.testing.assert_allclose(np.asarray(new_p["w"]), np.asarray(p["w"] + u["w"]), rtol=0,
                               atol=1e-7)
    np.testing.assert_allclose(np.asarray(u["w"]), np.asarray(u_ref["w"]), rtol=0, atol=1e-7)


def test_checkpoint_moves_between_unfused_and_native(one_device):
    """A state written by the native step continues on the unfused path (same pytree)."""
    mk = OPTIMIZERS["adamw_8bit"]
    _, s_mid, p_mid = _run(mk(None), 2)
    _, s_end, p_end = _run(mk(False), 2, state=s_mid, params=p_mid, start=2)
    _, s_nat, p_nat = _run(mk(None), 2, state=s_mid, params=p_mid, start=2)
    for a, b in zip(_quantized(s_end), _quantized(s_nat)):
        assert np.mean(np.asarray(a.codes) != np.asarray(b.codes)) <= 1e-3
    for k in PARAMS:
        _close(p_nat[k], p_end[k], 1e-6)
