"""Tests of effjax.compress.fake_quant against a plain numpy transcription of the equations."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from effjax.compress.fake_quant import FakeQuant, fake_quantize, fake_quantize_params
from effjax.models import CharTransformer, CharTransformerConfig, next_token_loss
from effjax.selection import path_str


# ----------------------------------------------------------------------------- numpy reference
def np_fake_quant(x, bits, axis, symmetric=True, group_size=None, outliers=0):
    """Loop-by-loop float32 transcription of the quantizer equations (module docstring)."""
    x = np.asarray(x, np.float32)
    if axis is None:
        axes = list(range(x.ndim))
    else:
        axes = sorted(a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis))
    keep = [a for a in range(x.ndim) if a not in axes]
    xt = np.transpose(x, keep + axes)
    n = math.prod(x.shape[a] for a in axes)
    rows = xt.reshape(-1, n)
    out = np.empty_like(rows)
    g = group_size or n
    for r in range(rows.shape[0]):
        for start in range(0, n, g):
            grp = rows[r, start:start + g]
            body = np.ones(grp.size, bool)
            if outliers:
                body[np.argsort(-np.abs(grp), kind="stable")[:outliers]] = False
            vals = grp[body]
            if symmetric:
                qmax = np.float32(2 ** (bits - 1) - 1)
                scale = np.float32(np.abs(vals).max() if vals.size else 0) * np.float32(1 / qmax)
                if scale == 0:
                    deq = np.zeros_like(grp)
                else:
                    deq = np.clip(np.round(grp / scale), -qmax, qmax) * scale
            else:
                qmax = np.float32(2**bits - 1)
                hi, lo = (vals.max(), vals.min()) if vals.size else (0, 0)
                span = max(np.float32(hi - lo), np.float32(1e-5))
                scale = np.float32(span) * np.float32(1 / qmax)
                zero = np.clip(-np.round(np.float32(lo) / scale), 0, qmax)
                deq = (np.clip(np.round(grp / scale) + zero, 0, qmax) - zero) * scale
            out[r, start:start + g] = np.where(body, deq, grp)
    return np.transpose(out.reshape(xt.shape), np.argsort(keep + axes))


def np_scales(x, axis, bits):
    """Symmetric per-slice scale, broadcastable to x."""
    qmax = 2 ** (bits - 1) - 1
    return np.abs(np.asarray(x, np.float32)).max(axis=axis, keepdims=True) / np.float32(qmax)


def _data(shape, seed=0, heavy=False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    if heavy:
        x = x * np.exp(rng.standard_normal(shape) * 1.5).astype(np.float32)
    # different magnitudes along the last axis so per-slice scales matter
    return x * np.geomspace(0.01, 10.0, shape[-1], dtype=np.float32)


CASES = [
    # shape, axis, bits, symmetric, group_size, outliers
    ((6, 5), 0, 4, True, None, 0),
    ((4, 7), -1, 8, True, None, 0),
    ((3, 4, 5), (0, 2), 4, True, None, 0),
    ((4, 9), None, 3, True, None, 0),
    ((2, 3, 8), -1, 4, True, 4, 0),
    ((2, 10), -1, 4, True, 4, 0),  # ragged last group of 2
    ((5, 6), 0, 4, False, None, 0),
    ((512, 3), 0, 4, False, 256, 0),  # Stable-SPAM's INT4 weights, Flax layout
    ((3, 16), -1, 4, True, 8, 2),  # Stable-SPAM's INT4 activations (group, top-2 outliers)
    ((3, 12), -1, 4, False, 5, 1),
    ((2, 6), -1, 2, True, None, 0),
]


@pytest.mark.parametrize("shape,axis,bits,sym,group,outl", CASES)
def test_matches_numpy_transcription(shape, axis, bits, sym, group, outl):
    x = _data(shape, seed=len(shape) + bits, heavy=bool(outl))
    got = fake_quantize(jnp.asarray(x), bits=bits, axis=axis, symmetric=sym, group_size=group,
                        outliers=outl)
    want = np_fake_quant(x, bits, axis, sym, group, outl)
    assert got.shape == x.shape and got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("shape,axis,bits", [((16, 8), 0, 4), ((8, 33), -1, 8), ((5, 7), 0, 2)])
def test_symmetric_grid_levels_and_error(shape, axis, bits):
    x = _data(shape, seed=3)
    got = np.asarray(fake_quantize(jnp.asarray(x), bits=bits, axis=axis))
    scale = np_scales(x, axis, bits)
    qmax = 2 ** (bits - 1) - 1
    codes = got / scale
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)  # on the grid s * k
    assert np.abs(np.round(codes)).max() == qmax  # absmax maps to +-qmax, never -2^(b-1)
    assert np.all(np.abs(got - x) <= scale / 2 * (1 + 1e-5))  # round-to-nearest error bound
    levels = [np.unique(np.take(got, i, axis=1 - axis % 2)).size for i in range(
        x.shape[1 - axis % 2])]
    assert max(levels) <= 2**bits - 1  # int4: at most 15 levels per channel


def test_asymmetric_levels_and_error_on_mixed_sign_groups():
    x = _data((64, 6), seed=5)  # every column has both signs
    got = np.asarray(fake_quantize(jnp.asarray(x), bits=4, axis=0, symmetric=False))
    scale = (x.max(0) - x.min(0)) / 15
    assert np.all(np.abs(got - x) <= scale / 2 * (1 + 1e-5))
    assert max(np.unique(got[:, j]).size for j in range(6)) <= 16


@pytest.mark.parametrize("bits,sym", [(4, True), (8, True), (4, False), (3, False)])
def test_exact_for_values_on_the_grid(bits, sym):
    rng = np.random.default_rng(0)
    s = np.float32(2.0) ** rng.integers(-8, 3, size=(1, 5)).astype(np.float32)  # per column
    if sym:
        qmax = 2 ** (bits - 1) - 1
        k = rng.integers(-qmax, qmax + 1, size=(20, 5))
        k[0], k[1] = qmax, -qmax
        x = (k * s).astype(np.float32)
    else:
        qmax = 2**bits - 1
        z = rng.integers(1, qmax, size=(1, 5))
        k = rng.integers(0, qmax + 1, size=(20, 5))
        k[0], k[1] = 0, qmax
        x = ((k - z) * s).astype(np.float32)
    got = fake_quantize(jnp.asarray(x), bits=bits, axis=0, symmetric=sym)
    np.testing.assert_array_equal(np.asarray(got), x)


@pytest.mark.parametrize("sym,group,outl", [(True, None, 0), (False, None, 0), (True, 4, 1),
                                            (False, 3, 0)])
def test_ste_gradient_is_exactly_identity(sym, group, outl):
    x = jnp.asarray(_data((6, 8), seed=1))
    if not sym:  # an all-positive row: the asymmetric zero-point clamp clips it
        x = x.at[0].set(jnp.abs(x[0]) + 1.0)
    w = jnp.asarray(np.random.default_rng(2).standard_normal((6, 8)).astype(np.float32))
    f = lambda x: fake_quantize(x, bits=4, axis=-1, symmetric=sym, group_size=group,
                                outliers=outl)
    g = jax.grad(lambda x: jnp.sum(w * f(x)))(x)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    y, t = jax.jvp(f, (x,), (w,))
    np.testing.assert_array_equal(np.asarray(t), np.asarray(w))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(f(x)))
    if not sym:  # clipped elements really were clipped, yet their gradient is 1 (unclipped STE)
        assert float(jnp.max(jnp.abs(f(x)[0] - x[0]))) > 0.5


@pytest.mark.parametrize("sym", [True, False])
def test_zero_channels_are_exact_and_finite(sym):
    x = _data((5, 4), seed=4)
    x[:, 2] = 0.0
    xj = jnp.asarray(x)
    f = lambda x: fake_quantize(x, bits=4, axis=0, symmetric=sym)
    out = np.asarray(f(xj))
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[:, 2], 0.0)
    g = jax.grad(lambda x: jnp.sum(f(x) ** 2))(xj)
    assert np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_array_equal(np.asarray(f(jnp.zeros((3, 3)))), 0.0)


def test_nan_poisons_only_its_slice():
    x = _data((4, 3), seed=6)
    x[1, 1] = np.nan
    out = np.asarray(fake_quantize(jnp.asarray(x), bits=4, axis=0))
    assert np.all(np.isnan(out[:, 1]))
    np.testing.assert_array_equal(out[:, [0, 2]], np_fake_quant(x[:, [0, 2]], 4, 0))


def test_outliers_are_kept_exactly_and_excluded_from_the_scale():
    x = _data((4, 16), seed=7, heavy=True)
    out = np.asarray(fake_quantize(jnp.asarray(x), bits=4, axis=-1, outliers=2))
    for r in range(4):
        top = np.argsort(-np.abs(x[r]))[:2]
        np.testing.assert_array_equal(out[r, top], x[r, top])
        rest = np.delete(np.arange(16), top)
        scale = np.abs(x[r, rest]).max() / 7
        assert np.all(np.abs(out[r, rest] - x[r, rest]) <= scale / 2 * (1 + 1e-5))


def test_bfloat16_keeps_dtype_and_matches_float32_rounded():
    x = jnp.asarray(_data((8, 4), seed=8)).astype(jnp.bfloat16)
    out = fake_quantize(x, bits=4, axis=0)
    assert out.dtype == jnp.bfloat16
    ref = np_fake_quant(np.asarray(x.astype(jnp.float32)), 4, 0)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(jnp.asarray(ref, jnp.bfloat16)))


@pytest.mark.parametrize("kwargs,err,msg", [
    (dict(x=jnp.ones((2, 2), jnp.int32), bits=4, axis=0), TypeError, "int32"),
    (dict(bits=1, axis=0), ValueError, "bits"),
    (dict(bits=17, axis=0), ValueError, "bits"),
    (dict(bits=True, axis=0), TypeError, "bits"),
    (dict(bits=4, axis=2), ValueError, "out of range"),
    (dict(bits=4, axis=(0, -2)), ValueError, "repeats"),
    (dict(bits=4, axis=0, group_size=0), ValueError, "group_size"),
    (dict(bits=4, axis=0, outliers=3), ValueError, "outliers"),
    (dict(bits=4, axis=0, group_size=2, outliers=2), ValueError, "outliers"),
])
def test_bad_inputs(kwargs, err, msg):
    kwargs = {"x": jnp.ones((3, 2)), **kwargs}
    with pytest.raises(err, match=msg):
        fake_quantize(kwargs.pop("x"), **kwargs)


# ----------------------------------------------------------------------------- FakeQuant config
def test_fake_quant_is_per_output_channel():
    w = _data((12, 5), seed=9)[:, ::-1].copy()  # (in, out), columns of different magnitude
    got = np.asarray(FakeQuant(bits=4)(jnp.asarray(w)))
    for j in range(5):  # each column its own scale
        np.testing.assert_array_equal(got[:, j], np_fake_quant(w[:, j:j + 1], 4, 0)[:, 0])


@pytest.mark.parametrize("shape,channel_axis,reduce", [
    ((8, 2, 4), (-2, -1), 0),  # query/key/value kernel (d, heads, head_dim)
    ((2, 4, 8), -1, (0, 1)),  # attention output kernel (heads, head_dim, d)
    ((10, 6), 0, 1),  # embedding table (vocab, d): per row
])
def test_fake_quant_einsum_kernels(shape, channel_axis, reduce):
    w = _data(shape, seed=10)
    got = FakeQuant(bits=4, channel_axis=channel_axis)(jnp.asarray(w))
    np.testing.assert_array_equal(np.asarray(got), np_fake_quant(w, 4, reduce))


def test_stable_spam_int4_weight_scheme_in_torch_layout():
    """Stable-SPAM groups the PyTorch weight (out, in) flattened into rows of 256."""
    w = _data((512, 3), seed=11)  # Flax (in, out)
    got = np.asarray(FakeQuant(bits=4, symmetric=False, group_size=256)(jnp.asarray(w)))
    wt = w.T.reshape(-1, 256)  # (out * in / 256, 256) as in _quantize_tensor
    hi, lo = wt.max(1, keepdims=True), wt.min(1, keepdims=True)
    scales = np.maximum(hi - lo, np.float32(1e-5)) * np.float32(1 / 15)
    zeros = np.clip(-np.round(lo / scales), 0, 15)
    deq = (np.clip(np.round(wt / scales) + zeros, 0, 15) - zeros) * scales
    np.testing.assert_array_equal(got, deq.reshape(3, 512).T)


def test_fake_quant_config_validation():
    with pytest.raises(TypeError):
        FakeQuant(4)  # keyword-only
    with pytest.raises(dataclasses.FrozenInstanceError):
        FakeQuant().bits = 8
    with pytest.raises(ValueError, match="bits"):
        FakeQuant(bits=1)
    with pytest.raises(TypeError, match="channel_axis"):
        FakeQuant(channel_axis="out")
    assert FakeQuant(channel_axis=[1, 2]).channel_axis == (1, 2)
    with pytest.raises(ValueError, match="no axis to reduce"):
        FakeQuant()(jnp.ones((4,)))


# ----------------------------------------------------------------------------- rewriter: Linen
class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))


@pytest.fixture(scope="module")
def linen_setup():
    x = jnp.asarray(_data((16, 4), seed=12))
    variables = _MLP().init(jax.random.key(0), x)
    return x, variables


def test_key_paths_of_linen_and_nnx():
    from jax.tree_util import DictKey, GetAttrKey, SequenceKey
    assert path_str((DictKey("params"), DictKey("Dense_0"), DictKey("kernel"))) == \
        "params/Dense_0/kernel"
    assert path_str((DictKey("blocks"), DictKey(0), DictKey("up"), DictKey("kernel"),
                         GetAttrKey("value"))) == "blocks/0/up/kernel"
    assert path_str((GetAttrKey("layers"), SequenceKey(2), GetAttrKey("w"))) == "layers/2/w"


def test_rules_first_match_wins_and_none_leaves_float(linen_setup):
    _, variables = linen_setup
    p = variables["params"]
    rules = {r"Dense_0/kernel": FakeQuant(bits=8), r".*/kernel": FakeQuant(bits=2),
             r".*/bias": None}
    q = fake_quantize_params(p, rules)
    np.testing.assert_array_equal(np.asarray(q["Dense_0"]["kernel"]),
                                  np_fake_quant(p["Dense_0"]["kernel"], 8, 0))
    np.testing.assert_array_equal(np.asarray(q["Dense_1"]["kernel"]),
                                  np_fake_quant(p["Dense_1"]["kernel"], 2, 0))
    for layer in ("Dense_0", "Dense_1"):
        assert q[layer]["bias"] is p[layer]["bias"]
    assert not np.array_equal(np.asarray(q["Dense_1"]["kernel"]), p["Dense_1"]["kernel"])


def test_unmatched_leaves_unchanged_and_input_not_mutated(linen_setup):
    _, variables = linen_setup
    before = jax.tree.map(np.array, variables)
    q = fake_quantize_params(variables, {r"params/Dense_1/kernel": FakeQuant()})
    assert q["params"]["Dense_0"]["kernel"] is variables["params"]["Dense_0"]["kernel"]
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, variables), before)
    assert jax.tree.structure(q) == jax.tree.structure(variables)


@pytest.mark.parametrize("rules,err,msg", [
    ({r"Dense_2/kernel": FakeQuant()}, ValueError, r"rule 'Dense_2/kernel'.*Dense_\d/kernel"),
    ({r".*": None, r".*/kernel": FakeQuant()}, ValueError, r"rule '\.\*/kernel' decides no"),
    ({r"(": FakeQuant()}, ValueError, "not a valid regex"),
    ({r".*/kernel": 4}, TypeError, "FakeQuant or None"),
    ({r".*/bias": FakeQuant()}, ValueError, r"Dense_\d/bias.*shape \(\d+,\)"),
    ("Dense_0", TypeError, "mapping"),
])
def test_rule_errors(linen_setup, rules, err, msg):
    _, variables = linen_setup
    with pytest.raises(err, match=msg):
        fake_quantize_params(variables["params"], rules)


def test_non_float_leaf_is_named():
    tree = {"emb": {"ids": jnp.arange(6).reshape(2, 3)}, "w": jnp.ones((2, 2))}
    with pytest.raises(TypeError, match=r"emb/ids.*int32"):
        fake_quantize_params(tree, {r".*": FakeQuant()})


def test_linen_ste_gradient_is_gradient_at_quantized_weights(linen_setup):
    x, variables = linen_setup
    y = jnp.sin(x[:, :3])
    rules = {r".*/kernel": FakeQuant(bits=4)}
    loss = lambda v: jnp.mean((_MLP().apply(v, x) - y) ** 2)
    g_qat = jax.grad(lambda v: loss(fake_quantize_params(v, rules)))(variables)
    g_at_q = jax.grad(loss)(fake_quantize_params(variables, rules))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 g_qat, g_at_q)
    g_float = jax.grad(loss)(variables)  # and it is not the float gradient
    assert not np.allclose(g_qat["params"]["Dense_0"]["kernel"],
                           g_float["params"]["Dense_0"]["kernel"])


def test_jit_matches_eager(linen_setup):
    _, variables = linen_setup
    rules = {r".*Dense_0/kernel": FakeQuant(bits=4, symmetric=False, group_size=2),
             r".*/kernel": FakeQuant(bits=8)}
    eager = fake_quantize_params(variables, rules)
    jitted = jax.jit(lambda v: fake_quantize_params(v, rules))(variables)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 eager, jitted)


def test_sharded_kernel_keeps_sharding():
    devices = np.array(jax.devices()[:8])
    mesh = jax.sharding.Mesh(devices, ("model",))
    sharding = NamedSharding(mesh, PartitionSpec(None, "model"))  # shard output channels
    w = _data((6, 16), seed=13)
    ws = jax.device_put(jnp.asarray(w), sharding)
    out = jax.jit(lambda t: fake_quantize_params(t, {"w": FakeQuant()}))({"w": ws})["w"]
    assert out.sharding.is_equivalent_to(sharding, 2)
    np.testing.assert_array_equal(np.asarray(out), np_fake_quant(w, 4, 0))


# ----------------------------------------------------------------------------- rewriter: NNX
@pytest.fixture(scope="module")
def char_model():
    cfg = CharTransformerConfig(vocab_size=11, seq_len=8, width=32, depth=1, heads=2)
    return CharTransformer(cfg, rngs=nnx.Rngs(0))


NNX_RULES = {
    r"blocks/\d+/(query|key|value)/kernel": FakeQuant(channel_axis=(-2, -1)),
    r"blocks/\d+/(out|up|down)/kernel": FakeQuant(),
    r"head/kernel": FakeQuant(bits=8),
}


def test_nnx_state(char_model):
    graphdef, params, rest = nnx.split(char_model, nnx.Param, ...)
    q = fake_quantize_params(params, NNX_RULES)
    assert isinstance(q, nnx.State)
    assert jax.tree.structure(q) == jax.tree.structure(params)
    qk = np.asarray(q["blocks"][0]["query"]["kernel"][...])
    np.testing.assert_array_equal(
        qk, np_fake_quant(np.asarray(params["blocks"][0]["query"]["kernel"][...]), 4, 0))
    np.testing.assert_array_equal(
        np.asarray(q["head"]["kernel"][...]),
        np_fake_quant(np.asarray(params["head"]["kernel"][...]), 8, 0))
    assert q["embed"]["embedding"][...] is params["embed"]["embedding"][...]
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (2, 8)), jnp.int32)
    apply = jax.jit(lambda p: nnx.merge(graphdef, p, rest)(tokens))
    y_f = apply(params)
    rules8 = {k: None if v is None else dataclasses.replace(v, bits=8)
              for k, v in NNX_RULES.items()}
    err4, err8 = (float(jnp.linalg.norm(apply(p) - y_f) / jnp.linalg.norm(y_f))
                  for p in (q, fake_quantize_params(params, rules8)))
    # the output moves, int4 by more than int8 (about 2^4 times the step), neither grossly
    assert 0 < err8 < 0.03 and 4 * err8 < err4 < 0.3, (err4, err8)

    def loss(p):
        return next_token_loss(nnx.merge(graphdef, p, rest), tokens)

    grad = jax.jit(jax.grad(loss))
    g_qat = jax.jit(jax.grad(lambda p: loss(fake_quantize_params(p, NNX_RULES))))(params)
    g_at_q = grad(q)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         rtol=1e-5, atol=1e-7), g_qat, g_at_q)
    g_float = grad(params)
    assert not np.allclose(g_qat["blocks"][0]["up"]["kernel"][...],
                           g_float["blocks"][0]["up"]["kernel"][...], rtol=1e-3, atol=1e-6)
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(g_qat))


def test_nnx_rule_error_lists_close_paths(char_model):
    _, params, _ = nnx.split(char_model, nnx.Param, ...)
    with pytest.raises(ValueError, match=r"rule 'blocks/0/qery/kernel'.*blocks/0/query/kernel"):
        fake_quantize_params(params, {"blocks/0/qery/kernel": FakeQuant()})


# ----------------------------------------------------------------------------- QAT training
def test_qat_int4_regression_decreases_loss():
    rng = np.random.default_rng(14)
    x = jnp.asarray(rng.standard_normal((64, 8)).astype(np.float32))
    w_true = rng.standard_normal((8, 4)).astype(np.float32)
    y = x @ jnp.asarray(w_true)
    model = nn.Dense(4)
    params = model.init(jax.random.key(1), x)
    rules = {r".*/kernel": FakeQuant(bits=4)}
    loss = lambda p: jnp.mean((model.apply(fake_quantize_params(p, rules), x) - y) ** 2)
    opt = optax.adam(0.05)
    state = opt.init(params)

    @jax.jit
    def step(p, s):
        value, g = jax.value_and_grad(loss)(p)
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s, value

    losses = []
    for _ in range(40):
        params, state, value = step(params, state)
        losses.append(float(value))
    assert losses[-1] < 0.1 * losses[0]
    kernel = np.asarray(fake_quantize_params(params, rules)["params"]["kernel"])
    assert max(np.unique(kernel[:, j]).size for j in range(4)) <= 15  # int4 deployed weights
