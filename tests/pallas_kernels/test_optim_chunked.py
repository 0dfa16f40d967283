"""pallas_kernels.optim_update.fused_update_chunked: the CPU default of the fused low-bit
optimizers (``use_kernel=None``) against the unfused jnp path (``use_kernel=False``).

Expected values come from effjax.optim's unfused path (optax's own update run on dequantized
moments, then quantize_blockwise), which tests/optim checks against bitsandbytes and torchao.
The stored state (codes and absmax) must be identical bit for bit; Lion and SGD updates too.
Adam updates may differ by an ulp or two, as for the Pallas kernel (XLA's fused multiply-add
contraction depends on the fusion; see tests/pallas_kernels/test_optim_update.py).
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
from pallas_kernels import optim_update as K
from tests.pallas_kernels.test_optim_update import OPTIMIZERS, _quantized

# Leaves chosen so that every branch of the chunked step runs with CHUNK_ELEMS = 2**16 and
# block 256 (8-bit) / 128 (4-bit): at most CHUNK_ELEMS per chunk and at least two chunks.
PARAMS = {
    "a": jnp.zeros((8, 1024)),  # 32 blocks: a loop of 2 chunks of 16
    "b": jnp.zeros((5, 768)),  # 15 blocks: a loop of 1 chunk of 8, then a rest of 7
    "big": jnp.zeros((320, 1024)),  # 1280 blocks: chunks of CHUNK_ELEMS, 5 loop steps
    "e": jnp.zeros((2, 16, 64), jnp.bfloat16),  # merged trailing axes, bf16
    "pad": jnp.zeros((3, 1400)),  # a padded last block: the reference on the whole leaf
    "small": jnp.zeros((10,)),  # float32 state (under min_quantized_size)
}


def _grads(step):
    out = {}
    for i, (k, v) in enumerate(sorted(PARAMS.items())):
        g = jax.random.normal(jax.random.key(100 * step + i), v.shape) * (step + 1)
        if k in ("a", "big") and step >= 1:  # step 1 corrupts the state, step 2 the update
            g = g.at[0, 5 + step].set(jnp.nan).at[3, 900 + step].set(jnp.inf)
        out[k] = g.astype(v.dtype)
    return out


def _run(opt, steps, state=None, params=PARAMS, start=0):
    state = opt.init(params) if state is None else state

    @jax.jit
    def step(p, s, g):
        u, s = opt.update(g, s, p)
        return u, s, optax.apply_updates(p, u)

    for t in range(start, start + steps):
        u, state, params = step(params, state, _grads(t))
    return u, state, params


def _has(opt, primitive):
    jaxpr = str(jax.make_jaxpr(opt.update)(PARAMS, opt.init(PARAMS), PARAMS))
    if primitive == "loop":  # fori_loop with static bounds is a scan
        return "scan[" in jaxpr or "while[" in jaxpr
    return primitive in jaxpr


@pytest.fixture
def one_device(monkeypatch):
    """The optimizers pick the chunked step in single-device CPU processes where the native
    kernel is unavailable (tests/pallas_kernels/test_native_cpu.py covers it): this test process
    has 8 CPU devices (tests/conftest.py), so make it look like one while they are built, with
    the native kernel switched off. And chunk every 8-bit leaf, not only those of
    CHUNK_MIN_ELEMS elements and more."""
    monkeypatch.setattr(jax, "device_count", lambda *a: 1)
    monkeypatch.setattr(N, "available", lambda: False)
    monkeypatch.setattr(K, "CHUNK_MIN_ELEMS", 0)


def test_which_leaves_are_chunked():
    big = Q.quantize_blockwise(jnp.zeros((2048, 2048)), codebook=Q.dynamic_codebook())
    small = Q.quantize_blockwise(jnp.zeros((2048, 2047)), codebook=Q.dynamic_codebook())
    four = Q.quantize_blockwise(jnp.zeros((2048, 2048)), codebook=Q.nf4_codebook(),
                                block_size=128)
    assert K.CHUNK_MIN_ELEMS == 2048 * 2048
    assert K.chunk_pays(big) and not K.chunk_pays(small) and not K.chunk_pays(four)


def test_auto_is_the_chunked_step_on_single_device_cpu(one_device):
    assert jax.default_backend() == "cpu"
    assert F.select_path(None, name="x") == "chunked"
    assert F.select_path(None, name="x", has_kernel=False) is None
    assert F.select_path(False, name="x") is None and F.select_path(True, name="x") == "pallas"
    assert _has(O.adamw_8bit(1e-3, min_quantized_size=1000), "loop")
    assert not _has(O.adamw_8bit(1e-3, use_kernel=False, min_quantized_size=1000), "loop")
    assert not _has(O.adamw_8bit(1e-3, min_quantized_size=1000), "pallas_call")
    assert not _has(O.rmsprop_8bit(1e-3, min_quantized_size=1000), "loop")  # no fused step


def test_several_devices_keep_the_unfused_path(monkeypatch):
    """The chunked loop slices flattened blocks and XLA cannot partition a pallas_call: both
    would gather a sharded leaf, so auto keeps the unfused path with several devices."""
    monkeypatch.setattr(jax, "device_count", lambda *a: 8)
    assert F.select_path(None, name="x") is None
    monkeypatch.setattr(K, "kernel_available", lambda: True)  # as on a GPU
    assert F.select_path(None, name="x") is None
    assert F.select_path(True, name="x") == "pallas"
    monkeypatch.setattr(jax, "device_count", lambda *a: 1)
    assert F.select_path(None, name="x") == "pallas"
    assert not _has(O.adamw_8bit(1e-3, min_quantized_size=1000), "loop")


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_chunked_state_equals_unfused_path(name, one_device):
    mk = OPTIMIZERS[name]
    # 8-bit leaves take the chunked loop; 4-bit ones keep the unfused step (chunk_pays).
    assert _has(mk(None), "loop") == ("4bit" not in name)
    u0, s0, p0 = _run(mk(False), 3)
    u1, s1, p1 = _run(mk(None), 3)
    assert jax.tree.structure(s0) == jax.tree.structure(s1)
    q0, q1 = _quantized(s0), _quantized(s1)
    assert len(q0) == len(q1) == (2 if "adam" in name else 1) * 5
    for a, b in zip(q0, q1):  # the stored state: bit for bit
        assert (a.shape, a.dtype, a.codes.shape) == (b.shape, b.dtype, b.codes.shape)
        np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
        np.testing.assert_array_equal(np.asarray(a.absmax), np.asarray(b.absmax))
    exact = "adam" not in name
    for k in PARAMS:
        for x, y in ((u0[k], u1[k]), (p0[k], p1[k])):
            assert x.dtype == y.dtype
            x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
            assert np.abs(x).max() > 0
            if exact or PARAMS[k].dtype == jnp.bfloat16:
                np.testing.assert_array_equal(y, x)
            else:  # within 8 ulps of the leaf's largest value (FMA contraction)
                np.testing.assert_allclose(y, x, rtol=0, atol=8 * np.spacing(np.abs(x).max()))
    # the planted NaN / inf gradient elements (last step): no update; the state stays finite
    assert float(u1["a"][0, 7]) == 0.0 and float(u1["big"][3, 902]) == 0.0
    assert all(np.isfinite(np.asarray(q.absmax)).all() for q in q1)


def test_checkpoint_moves_between_unfused_and_chunked(one_device):
    mk = OPTIMIZERS["adamw_8bit"]
    _, s_all, _ = _run(mk(False), 4)
    _, s_mid, p_mid = _run(mk(None), 2)
    _, s_end, _ = _run(mk(False), 2, state=s_mid, params=p_mid, start=2)
    for a, b in zip(_quantized(s_all), _quantized(s_end)):
        np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
        np.testing.assert_array_equal(np.asarray(a.absmax), np.asarray(b.absmax))


@pytest.mark.parametrize("shape,bits,chunk", [
    ((4, 1024), 8, 1024),  # 16 blocks, chunks of 4: loop only
    ((6, 512), 8, 768),  # 12 blocks, chunks of 3
    ((7, 256), 8, 512),  # 7 blocks: chunks of 2, loop of 3 and a rest of 1
    ((3, 256), 8, 4096),  # 3 blocks: at least two chunks (2 and a rest of 1)
    ((2, 3, 128), 4, 256),  # 4-bit, merged axes, even last axis
    ((4, 129), 4, 256),  # 4-bit odd last axis: the reference as a whole
    ((1, 256), 8, 256),  # one block: one piece
])
def test_chunked_equals_reference_per_leaf(shape, bits, chunk):
    key = jax.random.key(sum(shape))
    g = jax.random.normal(key, shape)
    cbs = ((Q.dynamic_codebook(signed=True), Q.dynamic_codebook(signed=False)) if bits == 8
           else (Q.adam4bit_first_moment_codebook(), Q.adam4bit_second_moment_codebook()))
    bs = 256 if bits == 8 else 128
    m = Q.quantize_blockwise(0.1 * g, codebook=cbs[0], block_size=bs)
    v = Q.quantize_blockwise(0.01 * g * g, codebook=cbs[1], block_size=bs)
    s = dict(b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, bc1=jnp.float32(0.19),
             bc2=jnp.float32(0.002), lr=-1e-2)
    # Both jitted: run op by op, the reference would round the multiply-adds separately.
    u0, n0 = jax.jit(lambda g, m, v: K.fused_update_reference(
        K.adam_rule, g, None, (m, v), s))(g, m, v)
    u1, n1 = jax.jit(lambda g, m, v: K.fused_update_chunked(
        K.adam_rule, g, None, (m, v), s, chunk_elems=chunk))(g, m, v)
    for a, b in zip(n0, n1):
        assert (a.shape, a.codes.shape, a.absmax.shape) == (b.shape, b.codes.shape,
                                                             b.absmax.shape)
        np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
        np.testing.assert_array_equal(np.asarray(a.absmax), np.asarray(b.absmax))
    np.testing.assert_allclose(np.asarray(u1), np.asarray(u0), rtol=0,
                               atol=8 * np.spacing(float(jnp.abs(u0).max())))
