"""pallas_kernels.optim_update: fused low-bit steps (interpret mode) == effjax.optim's jnp path;
dispatch and checkpoint interchangeability.

Lion and SGD-momentum are bit-identical. The Adam family has identical codes and absmax (the
stored state) but float32 updates that may differ by an ulp or two: XLA's CPU compiler contracts
``a * b + c`` into fused multiply-adds depending on how it fuses the surrounding graph, and the
kernel body (interpret mode) is fused differently from the jnp path. Measured (3-6 steps, f32
leaves): at most 3 ulps of the leaf's largest update; bfloat16 leaves identical.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from effjax import optim as O
from effjax import quant as Q
from pallas_kernels import optim_update as K

S8 = Q.dynamic_codebook(signed=True)

PARAMS = {
    "w": jnp.zeros((3, 1400)),  # quantized, not a multiple of the block per row
    "e": jnp.zeros((2, 70, 31), jnp.bfloat16),  # quantized, bf16, merged trailing axes
    "b": jnp.zeros((10,)),  # under min_quantized_size: float32 state, jnp path
}


def _grads(params, step):
    out = {}
    for i, (k, v) in enumerate(sorted(params.items())):
        g = jax.random.normal(jax.random.key(100 * step + i), v.shape) * (step + 1)
        if k == "w" and step == 1:
            g = g.at[0, 5].set(jnp.nan).at[2, 900].set(jnp.inf)
        out[k] = g.astype(v.dtype)
    return out


def _run(opt, steps, state=None, params=PARAMS, start=0):
    state = opt.init(params) if state is None else state
    update = jax.jit(opt.update)
    for t in range(start, start + steps):
        u, state = update(_grads(params, t), state, params)
        params = optax.apply_updates(params, u)
    return u, state, params


OPTIMIZERS = {
    "adamw_8bit": lambda uk: O.adamw_8bit(1e-2, weight_decay=0.1,
                                          mask=lambda p: {k: k != "e" for k in p},
                                          use_kernel=uk, min_quantized_size=1000),
    "adam_8bit_nesterov": lambda uk: O.adam_8bit(1e-2, nesterov=True, use_kernel=uk,
                                                 min_quantized_size=1000),
    "adamw_4bit": lambda uk: O.adamw_4bit(optax.cosine_decay_schedule(1e-2, 10),
                                          use_kernel=uk, min_quantized_size=1000),
    "lion_8bit": lambda uk: O.lion_8bit(1e-3, use_kernel=uk, min_quantized_size=1000),
    "sgd_8bit": lambda uk: O.sgd_8bit(0.1, nesterov=True, use_kernel=uk,
                                      min_quantized_size=1000),
}


# Bit-identical through the public optimizers.
@pytest.mark.parametrize("name", ["lion_8bit", "sgd_8bit"])
def test_public_optimizer_kernel_equals_jnp_path(name):
    mk = OPTIMIZERS[name]
    u0, s0, p0 = _run(mk(False), 3)
    u1, s1, p1 = _run(mk(True), 3)
    assert jax.tree.structure((u0, s0, p0)) == jax.tree.structure((u1, s1, p1))
    for a, b in zip(jax.tree.leaves((u0, s0, p0)), jax.tree.leaves((u1, s1, p1))):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    qs = [x for x in jax.tree.leaves(s1, is_leaf=lambda x: isinstance(x, Q.QuantizedArray))
          if isinstance(x, Q.QuantizedArray)]
    assert qs and all(q.shape in [(3, 1400), (2, 70, 31)] for q in qs)
    assert float(jnp.abs(u1["w"]).max()) > 0


def _quantized(tree):
    return [x for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, Q.QuantizedArray))
            if isinstance(x, Q.QuantizedArray)]


@pytest.mark.parametrize("name", ["adamw_8bit", "adam_8bit_nesterov", "adamw_4bit"])
def test_adam_family_kernel_state_equals_jnp_path_and_updates_to_ulps(name):
    mk = OPTIMIZERS[name]
    u0, s0, p0 = _run(mk(False), 3)
    u1, s1, p1 = _run(mk(True), 3)
    assert jax.tree.structure(s0) == jax.tree.structure(s1)
    q0, q1 = _quantized(s0), _quantized(s1)
    assert len(q0) == len(q1) == 4  # two moments of the two quantized leaves
    for a, b in zip(q0, q1):  # the stored state: bit for bit
        np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
        np.testing.assert_array_equal(np.asarray(a.absmax), np.asarray(b.absmax))
    for k in PARAMS:  # updates and params: within 8 ulps of the leaf's largest value (FMA)
        for x, y in ((u0[k], u1[k]), (p0[k], p1[k])):
            assert x.dtype == y.dtype
            x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
            scale = np.abs(x).max()
            assert scale > 0
            if y.dtype == np.float32 and PARAMS[k].dtype == jnp.float32:
                np.testing.assert_allclose(y, x, rtol=0, atol=8 * np.spacing(scale))
            else:  # bfloat16 leaves: identical (the rounding to bf16 absorbs the ulps)
                np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("name", ["adamw_8bit", "lion_8bit"])
def test_a_state_from_one_path_continues_on_the_other(name):
    """Checkpoints are interchangeable: 2 jnp steps then 2 kernel steps == 4 jnp steps (and
    the reverse), same codes and absmax."""
    mk = OPTIMIZERS[name]
    _, s_all, _ = _run(mk(False), 4)
    for first, second in ((False, True), (True, False)):
        _, s_mid, p_mid = _run(mk(first), 2)
        _, s_end, _ = _run(mk(second), 2, state=s_mid, params=p_mid, start=2)
        for a, b in zip(_quantized(s_all), _quantized(s_end)):
            np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
            np.testing.assert_array_equal(np.asarray(a.absmax), np.asarray(b.absmax))


def _has_pallas(opt):
    params = {"w": jnp.zeros((2, 2048))}
    jaxpr = jax.make_jaxpr(opt.update)(params, opt.init(params), params)
    return "pallas_call" in str(jaxpr)


def test_dispatch_rule():
    assert _has_pallas(O.adamw_8bit(1e-3, use_kernel=True))
    assert not _has_pallas(O.adamw_8bit(1e-3, use_kernel=False))
    # On this CPU machine auto means the jnp path.
    assert jax.default_backend() == "cpu" and not K.kernel_available()
    assert not _has_pallas(O.adamw_8bit(1e-3))
    with pytest.raises(ValueError, match="rmsprop_8bit: there is no fused Pallas kernel"):
        O.rmsprop_8bit(1e-3, use_kernel=True)
    with pytest.raises(ValueError, match="use_kernel must be None, True or False"):
        O.adamw_8bit(1e-3, use_kernel="yes")


def test_bad_leaf_names_its_path():
    q = Q.quantize_blockwise(jnp.zeros((4, 256)), codebook=S8, block_size=256)
    with pytest.raises(ValueError, match=r"\['w'\]: gradient shape \(4, 255\)"):
        K.fused_update(K.sgd_rule, jnp.zeros((4, 255)), None, (q,), dict(decay=0.9),
                       interpret=True, name="['w']")
    with pytest.raises(TypeError, match="int32"):
        K.fused_update(K.sgd_rule, jnp.zeros((4, 256), jnp.int32), None, (q,),
                       dict(decay=0.9), interpret=True)


def test_bfloat16_scales_keep_the_jnp_step_under_the_pallas_kernel():
    """The Pallas kernel stores float32 scales: it refuses bfloat16-scale moments by leaf name,
    and ``use_kernel=True`` runs such leaves on the jnp step (same results as
    ``use_kernel=False``, bit for bit)."""
    g = jnp.linspace(-1.0, 1.0, 512)
    m = Q.quantize_blockwise(g, codebook=S8, block_size=256, scale_dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match=r"\['w'\].*float32 scales"):
        K.fused_update(K.sgd_rule, g, None, (m,), {"decay": 0.9, "lr": -0.1},
                       name="['w']")
    params = {"w": jnp.zeros((4, 1024))}
    runs = [_run(O.lion_8bit(1e-3, use_kernel=uk, scale_dtype=jnp.bfloat16), 2, params=params)
            for uk in (True, False)]
    assert runs[0][1][0].mu["w"].absmax.dtype == jnp.bfloat16
    jax.tree.map(np.testing.assert_array_equal, runs[0], runs[1])
