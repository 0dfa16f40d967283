"""What the compiled GPU kernels run, checked on CPU: the lookup-table search and decode (in
interpret mode, against the reference on every decision boundary), the Triton lowering for
CUDA (lowered, not run: the figures from a real H100 are in experiments/results/), the fused
update-and-apply step, and the pieces that are GPU-only (exact division, compiler params)."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental.pallas import triton as pltriton

from effjax import optim as O
from effjax import quant as Q
from effjax.quant import search
from pallas_kernels import blockwise as B
from pallas_kernels import optim_update as K

CODEBOOKS = {
    "dynamic8_signed": Q.dynamic_codebook(signed=True),
    "dynamic8_unsigned": Q.dynamic_codebook(signed=False),
    "linear8": Q.linear_codebook(8),
    "nf4": Q.nf4_codebook(),
    "fp4": Q.fp4_codebook(),
    "dynamic4_signed": Q.dynamic_codebook(bits=4),
    "adam4_second": Q.adam4bit_second_moment_codebook(),
}


def _boundary_blocks(cb, bs):
    """Every decision threshold, its float32 neighbours, every code value and a NaN, scaled
    into blocks whose absmax is exactly 1 (so ``y == x``)."""
    vals = np.sort(np.asarray(cb, np.float32))
    t = search._thresholds(vals)
    pts = np.concatenate([t, np.nextafter(t, -np.inf), np.nextafter(t, np.inf), vals, [np.nan]])
    pts = np.clip(pts.astype(np.float32), -1, 1)
    pts = np.concatenate([pts, np.zeros((-pts.size) % (bs - 1), np.float32)]).reshape(-1, bs - 1)
    return jnp.asarray(np.concatenate([pts, np.ones((pts.shape[0], 1), np.float32)], axis=1))


@pytest.mark.parametrize("lookup", [False, True])
@pytest.mark.parametrize("name", list(CODEBOOKS))
def test_search_and_decode_on_every_decision_boundary(name, lookup):
    cb = CODEBOOKS[name]
    x = _boundary_blocks(cb, 64)
    ref = Q.quantize_blockwise(x, codebook=cb, block_size=64)
    got = B.quantize_blockwise(x, codebook=cb, block_size=64, interpret=True, lookup=lookup)
    np.testing.assert_array_equal(np.asarray(got.codes), np.asarray(ref.codes))
    np.testing.assert_array_equal(np.asarray(got.absmax), np.asarray(ref.absmax))
    deq = B.dequantize_blockwise(ref, interpret=True, lookup=lookup)
    np.testing.assert_array_equal(np.asarray(deq), np.asarray(Q.dequantize_blockwise(ref)))


@pytest.mark.parametrize("shape,bs,tile", [((3, 700), 256, 512), ((5, 301), 64, 256),
                                           ((2, 70, 31), 256, 2048), ((1000,), 128, 512)])
def test_masked_tiles_equal_reference(monkeypatch, shape, bs, tile):
    """The masked loads and stores a GPU needs for partial tiles (rows and columns), run in
    interpret mode: same codes, scales, values and fused steps as the reference."""
    monkeypatch.setattr(B, "MASK_IN_INTERPRET", True)
    for cb in (CODEBOOKS["dynamic8_signed"], CODEBOOKS["nf4"]):
        x = jax.random.normal(jax.random.key(0), shape)
        ref = Q.quantize_blockwise(x, codebook=cb, block_size=bs)
        got = B.quantize_blockwise(x, codebook=cb, block_size=bs, interpret=True,
                                   tile_elems=tile)
        np.testing.assert_array_equal(np.asarray(got.codes), np.asarray(ref.codes))
        np.testing.assert_array_equal(np.asarray(got.absmax), np.asarray(ref.absmax))
        deq = B.dequantize_blockwise(ref, interpret=True, tile_elems=tile)
        np.testing.assert_array_equal(np.asarray(deq), np.asarray(Q.dequantize_blockwise(ref)))
        u, (m,) = K.fused_update(K.sgd_rule, x, x, (ref,), dict(decay=0.9, lr=-0.1),
                                 interpret=True, tile_elems=tile, apply=True)
        r, (rm,) = K.fused_update_reference(K.sgd_rule, x, x, (ref,), dict(decay=0.9, lr=-0.1))
        # XLA:CPU contracts g + 0.9 t into a fused multiply-add in one graph and not in the
        # other: ulps, where a mask bug would leave garbage or zeros
        np.testing.assert_allclose(np.asarray(u), np.asarray(x + r), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.asarray(m.absmax), np.asarray(rm.absmax), rtol=3e-7)


@pytest.mark.parametrize("name", ["dynamic8_signed", "dynamic8_unsigned", "nf4"])
def test_lookup_tables_are_power_of_two_and_consistent(name):
    cb = CODEBOOKS[name]
    (vals, thresholds, codes), (shift, q0, buckets, half, nan_code) = B.lookup_tables(cb)
    for t in (vals, thresholds, codes):
        assert t.size & (t.size - 1) == 0  # Triton needs power-of-two shapes
    values = np.asarray(cb, np.float32)
    np.testing.assert_array_equal(vals[: values.size], values)
    assert half >= buckets and thresholds.size == codes.size == 2 * half
    assert values[nan_code] == values.min()
    lo, hi = codes & 255, codes >> 8
    assert lo.max() < values.size and hi.max() < values.size
    # inside a bucket with a threshold the two codes are neighbours in sorted order
    rank = np.argsort(np.argsort(values, kind="stable"), kind="stable")
    has_t = np.isfinite(thresholds)
    assert np.all(rank[hi[has_t]] == rank[lo[has_t]] + 1)


def _gpu_predicates(monkeypatch):
    # as on a GPU: Triton compiler params and the inline-PTX division
    monkeypatch.setattr(B, "uses_gpu_asm", lambda interp: not interp)
    assert isinstance(B.compiler_params(False), pltriton.CompilerParams)


def _lower_cuda(fn, *args):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


ADAM = dict(b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, bc1=jnp.float32(0.1),
            bc2=jnp.float32(0.001), wd=0.01, lr=-1e-3, lr_cast=jnp.float32(1e-3))


@pytest.mark.parametrize("what,shape,dtype,cb", [
    ("quantize", (3, 300), jnp.bfloat16, "dynamic8_signed"),
    ("quantize", (1000,), jnp.float32, "linear8"),
    ("quantize", (5, 301), jnp.float32, "nf4"),
    ("dequantize", (64, 4096), jnp.float32, "dynamic8_unsigned"),
    ("adam", (7, 1000), jnp.bfloat16, "dynamic8_signed"),
    ("adam", (64, 4096), jnp.float32, "nf4"),
    ("lion", (3, 5001), jnp.float32, "dynamic8_signed"),
    ("sgd", (16, 256), jnp.float32, "dynamic4_signed"),
])
def test_kernels_lower_to_triton_for_cuda(monkeypatch, what, shape, dtype, cb):
    """The kernels lower with Pallas' Triton backend (Triton takes no slices, no gathers of
    register values and only power-of-two shapes; each of these once failed here)."""
    _gpu_predicates(monkeypatch)
    codebook = CODEBOOKS[cb]
    bs = 64 if len(codebook) <= 16 else 256
    x = jnp.ones(shape, dtype)
    if what == "quantize":
        text = _lower_cuda(lambda x: B.quantize_blockwise(x, codebook=codebook, block_size=bs,
                                                          interpret=False), x)
    elif what == "dequantize":
        q = Q.quantize_blockwise(x, codebook=codebook, block_size=bs)
        text = _lower_cuda(lambda q: B.dequantize_blockwise(q, interpret=False), q)
    else:
        rule = {"adam": K.adam_rule, "lion": K.lion_rule, "sgd": K.sgd_rule}[what]
        n = 2 if what == "adam" else 1
        ms = tuple(Q.quantize_blockwise(x, codebook=codebook, block_size=bs) for _ in range(n))
        s = ADAM if what == "adam" else dict(b1=0.9, b2=0.99, decay=0.9, lr=-1e-2)
        text = _lower_cuda(lambda g, p, ms: K.fused_update(rule, g, p, ms, s, interpret=False,
                                                           apply=True), x, x, ms)
        assert "div.rn.f32" in text or what != "adam"  # the correctly rounded division
    assert "__gpu$xla.gpu.triton" in text


def test_exact_div_and_compiler_params_off_gpu():
    x, y = jnp.float32(1.0), jnp.float32(3.0)
    assert B.exact_div(x, y, gpu_asm=False) == x / y
    assert not B.uses_gpu_asm(False) and B.compiler_params(False) is None  # on this CPU


FUSED = {
    "adamw_8bit": lambda: O.adamw_8bit(1e-3, weight_decay=0.1, use_kernel=True),
    "adam_8bit_schedule": lambda: O.adam_8bit(optax.linear_schedule(1e-3, 0.0, 10),
                                              use_kernel=True),
    "lion_8bit": lambda: O.lion_8bit(1e-4, use_kernel=True),
    "sgd_8bit": lambda: O.sgd_8bit(1e-2, momentum=0.9, use_kernel=True),
    "adamw_4bit": lambda: O.adamw_4bit(1e-3, use_kernel=True),
    "optax.adam (no kernel)": lambda: optax.adam(1e-3),
}


@pytest.mark.parametrize("name", list(FUSED))
def test_fused_apply_equals_update_then_apply_updates(name):
    key = jax.random.key(3)
    params = {"w": jax.random.normal(key, (40, 300)),
              "h": jax.random.normal(key, (32, 256)).astype(jnp.bfloat16),
              "b": jnp.ones((10,))}
    opt = FUSED[name]()
    step = O.fused_apply(opt)
    p1 = p2 = params
    s1 = s2 = opt.init(params)
    for i in range(3):
        g = jax.tree.map(lambda p, i=i: (jax.random.normal(jax.random.fold_in(key, i), p.shape)
                                         * 0.01).astype(p.dtype), params)
        g["w"] = g["w"].at[0, 0].set(jnp.nan)  # a non-finite gradient element: no update there
        p1, s1 = step(g, s1, p1)
        u, s2 = opt.update(g, s2, p2)
        p2 = optax.apply_updates(p2, u)
    for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2))):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert float(p1["w"][0, 0]) == float(params["w"][0, 0]) or "optax" in name
    moved = float(jnp.max(jnp.abs(p1["w"] - params["w"])))
    assert moved > 0


def test_fused_apply_needs_params():
    g = jnp.zeros((4, 256))
    q = Q.quantize_blockwise(g, codebook=Q.dynamic_codebook(), block_size=256)
    with pytest.raises(ValueError, match="apply=True needs the parameter"):
        K.fused_update(K.sgd_rule, g, None, (q,), dict(decay=0.9), interpret=True, apply=True)
    opt = O.sgd_8bit(1e-2, use_kernel=True)
    with pytest.raises(ValueError, match="needs the parameters"):
        O.fused_apply(opt)({"w": jnp.zeros((8, 4096))}, opt.init({"w": jnp.zeros((8, 4096))}),
                           None)


def test_import_effjax_does_not_need_tensorflow_datasets():
    code = ("import sys, effjax, effjax.optim, pallas_kernels.optim_update; "
            "assert 'tensorflow_datasets' not in sys.modules, 'tfds imported'; "
            "effjax.data; assert 'tensorflow_datasets' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
