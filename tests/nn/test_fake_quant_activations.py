"""Tests of effjax.nn.fake_quant: per-token activation fake quantization for NNX and Linen."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effjax.compress.fake_quant import FakeQuant, fake_quantize_params
from effjax.models import CharTransformer, CharTransformerConfig, next_token_loss
from effjax.nn import layer_hooks
from effjax.nn.fake_quant import (
    ActivationFakeQuant,
    FakeQuantActivations,
    fake_quantize_activations,
    linen_activation_fake_quant,
    quantize_activations,
)
from effjax.selection import path_str


def np_per_token(x, bits, n_feature_axes=1):
    """Per-token symmetric absmax quantize-dequantize, one token at a time (float32)."""
    x = np.asarray(x, np.float32)
    rows = x.reshape(-1, int(np.prod(x.shape[x.ndim - n_feature_axes:])))
    qmax = np.float32(2 ** (bits - 1) - 1)
    out = np.zeros_like(rows)
    for t, row in enumerate(rows):
        scale = np.abs(row).max() * np.float32(1 / qmax)
        if scale > 0:
            out[t] = np.clip(np.round(row / scale), -qmax, qmax) * scale
    return out.reshape(x.shape)


def _x(shape, seed=0):
    rng = np.random.default_rng(seed)
    # tokens of very different magnitudes, so a per-tensor scale would fail the tests
    mags = np.exp(rng.standard_normal(shape[:-1] + (1,)) * 2)
    return (rng.standard_normal(shape) * mags).astype(np.float32)


@pytest.mark.parametrize("shape,bits", [((2, 3, 16), 4), ((5, 33), 8), ((4, 8), 2)])
def test_per_token_matches_numpy(shape, bits):
    x = _x(shape)
    got = np.asarray(fake_quantize_activations(jnp.asarray(x), bits))
    np.testing.assert_array_equal(got, np_per_token(x, bits))
    levels = max(np.unique(row).size for row in got.reshape(-1, shape[-1]))
    assert levels <= 2**bits - 1


def test_tokens_are_independent_and_zero_tokens_stay_zero():
    x = _x((4, 16), seed=1)
    x[2] = 0.0
    base = np.asarray(fake_quantize_activations(jnp.asarray(x), 4))
    np.testing.assert_array_equal(base[2], 0.0)
    y = x.copy()
    y[0] *= 64.0  # power of two: token 0 scales exactly, the others do not move
    moved = np.asarray(fake_quantize_activations(jnp.asarray(y), 4))
    np.testing.assert_array_equal(moved[0], 64.0 * base[0])
    np.testing.assert_array_equal(moved[1:], base[1:])


def test_stable_spam_groups_with_outliers():
    x = _x((3, 32), seed=2)
    got = np.asarray(fake_quantize_activations(jnp.asarray(x), 4, group_size=16, outliers=2))
    for t in range(3):
        for g0 in (0, 16):
            grp, out = x[t, g0:g0 + 16], got[t, g0:g0 + 16]
            top = np.argsort(-np.abs(grp))[:2]
            np.testing.assert_array_equal(out[top], grp[top])
            rest = np.delete(np.arange(16), top)
            np.testing.assert_array_equal(out[rest], np_per_token(grp[rest][None], 4)[0])


# ----------------------------------------------------------------------------- NNX wrapper
def test_wrapper_on_linear_forward_and_ste_gradients():
    layer = nnx.Linear(6, 3, rngs=nnx.Rngs(0))
    wrapped = ActivationFakeQuant(layer, bits=4)
    x = jnp.asarray(_x((5, 6), seed=3))
    xq = np_per_token(np.asarray(x), 4)
    kernel, bias = np.asarray(layer.kernel[...]), np.asarray(layer.bias[...])
    np.testing.assert_allclose(np.asarray(wrapped(x)), xq @ kernel + bias, rtol=1e-5, atol=1e-6)
    g = np.random.default_rng(4).standard_normal((5, 3)).astype(np.float32)
    gx = jax.grad(lambda x: jnp.sum(wrapped(x) * g))(x)
    np.testing.assert_allclose(np.asarray(gx), g @ kernel.T, rtol=1e-5, atol=1e-6)  # STE: gW^T
    gk = nnx.grad(lambda m: jnp.sum(m(x) * g))(wrapped)["inner"]["kernel"][...]
    np.testing.assert_allclose(np.asarray(gk), xq.T @ g, rtol=1e-5, atol=1e-5)  # x_hat^T g


def test_wrapper_on_linear_general_uses_contracted_axes():
    layer = nnx.LinearGeneral((2, 4), 3, axis=(-2, -1), rngs=nnx.Rngs(1))  # attention output
    wrapped = ActivationFakeQuant(layer, bits=4)
    assert wrapped.axis == (-2, -1)
    x = _x((2, 5, 2, 4), seed=5)
    xq = np_per_token(x, 4, n_feature_axes=2)  # one scale per token over (heads, head_dim)
    want = np.asarray(layer(jnp.asarray(xq)))
    np.testing.assert_allclose(np.asarray(wrapped(jnp.asarray(x))), want, rtol=1e-5, atol=1e-6)


def test_wrapper_validates_eagerly():
    with pytest.raises(ValueError, match="bits"):
        ActivationFakeQuant(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), bits=1)


# ----------------------------------------------------------------------------- NNX rewriter
@pytest.fixture(scope="module")
def char_setup():
    cfg = CharTransformerConfig(vocab_size=11, seq_len=8, width=32, depth=1, heads=2)
    model = CharTransformer(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (2, 8)), jnp.int32)
    return model, tokens


def _wrapped_paths(model):
    """Paths of the layers whose inputs are fake-quantized (an interception hook)."""
    return sorted(path_str(p) for p, m in nnx.iter_modules(model)
                  if any(isinstance(h, FakeQuantActivations) for h in layer_hooks(m) or ()))


def _param_paths(model):
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(
        nnx.state(model, nnx.Param))[0]]


def test_char_transformer_rewrite(char_setup):
    model, tokens = char_setup
    forward = lambda m: nnx.jit(lambda m: m(tokens))(m)
    y_f = forward(model)
    q4, q8 = quantize_activations(model, bits=4), quantize_activations(model, bits=8)
    assert _wrapped_paths(q4) == ["blocks/0/down", "blocks/0/key", "blocks/0/out",
                                  "blocks/0/query", "blocks/0/up", "blocks/0/value", "head"]
    assert type(q4.blocks[0].query) is nnx.LinearGeneral  # same classes, same param paths
    assert _param_paths(q4) == _param_paths(model)
    assert _wrapped_paths(model) == []  # the input model is not modified
    np.testing.assert_array_equal(np.asarray(forward(model)), np.asarray(y_f))
    err4, err8 = (float(jnp.linalg.norm(forward(q) - y_f) / jnp.linalg.norm(y_f))
                  for q in (q4, q8))
    assert 0 < err8 < 0.03 and 4 * err8 < err4 < 0.3, (err4, err8)
    # same parameters (shared arrays)
    assert sum(x.size for x in jax.tree.leaves(nnx.state(q4, nnx.Param))) == \
        sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_char_transformer_w4a4_gradients_reach_every_param(char_setup):
    model, tokens = char_setup
    qmodel = quantize_activations(model, bits=4)
    graphdef, params, rest = nnx.split(qmodel, nnx.Param, ...)
    rules = {r"blocks/\d+/(query|key|value)/kernel": FakeQuant(channel_axis=(-2, -1)),
             r".*/kernel": FakeQuant()}
    loss = lambda p: next_token_loss(nnx.merge(graphdef, fake_quantize_params(p, rules), rest),
                                     tokens)
    grads = jax.jit(jax.grad(loss))(params)
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    assert len(flat) == len(jax.tree.leaves(params))
    for path, g in flat:
        assert np.all(np.isfinite(np.asarray(g))), path
        assert float(jnp.abs(g).sum()) > 0, path


@pytest.mark.parametrize("where,expected", [
    (r"blocks/\d+/(up|down)", ["blocks/0/down", "blocks/0/up"]),
    (lambda path, m: isinstance(m, nnx.LinearGeneral) and path.endswith("out"),
     ["blocks/0/out"]),
    ("head", ["head"]),
])
def test_where_selects_layers(char_setup, where, expected):
    model, _ = char_setup
    assert _wrapped_paths(quantize_activations(model, where, bits=8)) == expected


def test_where_matching_nothing_lists_layer_paths(char_setup):
    model, _ = char_setup
    with pytest.raises(ValueError, match=re.escape(r"'blocks/\d/mlp'") + ".*'blocks/0/query'"):
        quantize_activations(model, r"blocks/\d/mlp", bits=4)
    with pytest.raises(ValueError, match="not a valid regex"):
        quantize_activations(model, "(", bits=4)


def test_already_wrapped_layers_are_not_wrapped_twice(char_setup):
    model, _ = char_setup
    twice = quantize_activations(quantize_activations(model, "head", bits=8), bits=4)
    assert layer_hooks(twice.head) == (FakeQuantActivations(bits=8),)
    assert layer_hooks(twice.blocks[0].up) == (FakeQuantActivations(bits=4),)


def test_wrapping_the_root_layer():
    layer = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
    wrapped = quantize_activations(layer, bits=4)
    assert wrapped is not layer and layer_hooks(wrapped) == (FakeQuantActivations(bits=4),)
    assert layer_hooks(layer) is None
    x = jnp.asarray(_x((3, 4), seed=6))
    np.testing.assert_allclose(np.asarray(wrapped(x)),
                               np.asarray(layer(jnp.asarray(np_per_token(np.asarray(x), 4)))),
                               rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- Linen
class _LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: (batch, tokens, 2, 4)
        h = nn.DenseGeneral(6, axis=(-2, -1), name="proj")(x)
        return nn.Dense(3, name="head")(jnp.tanh(h))


@pytest.fixture(scope="module")
def linen_setup():
    x = jnp.asarray(_x((2, 3, 2, 4), seed=7))
    variables = _LinenNet().init(jax.random.key(0), x)
    return x, variables


def _linen_manual(variables, x, bits, quant_proj=True, quant_head=True):
    p = variables["params"]
    xs = np_per_token(np.asarray(x), bits, 2) if quant_proj else np.asarray(x)
    h = np.tanh(np.einsum("btij,ijo->bto", xs, np.asarray(p["proj"]["kernel"]))
                + np.asarray(p["proj"]["bias"]))
    h = np_per_token(h, bits) if quant_head else h
    return h @ np.asarray(p["head"]["kernel"]) + np.asarray(p["head"]["bias"])


@pytest.mark.parametrize("where,qp,qh", [(None, True, True), ("head", False, True),
                                         (lambda path, m: path == "proj", True, False)])
def test_linen_context(linen_setup, where, qp, qh):
    x, variables = linen_setup
    model = _LinenNet()

    @jax.jit
    def run(v, x):
        with linen_activation_fake_quant(4, where):
            return model.apply(v, x)

    want = _linen_manual(variables, x, 4, qp, qh)
    np.testing.assert_allclose(np.asarray(run(variables, x)), want, rtol=1e-4, atol=1e-5)
    plain = np.asarray(model.apply(variables, x))  # outside the context: float
    np.testing.assert_allclose(plain, _linen_manual(variables, x, 4, False, False), rtol=1e-4,
                               atol=1e-5)
    assert not np.allclose(plain, want, rtol=1e-4, atol=1e-5)


def test_linen_ste_gradient_wrt_input(linen_setup):
    """The input gradient of a quantized Dense is exactly the float layer's: g W^T."""
    x, _ = linen_setup
    dense = nn.Dense(5)
    xs = x.reshape(6, 8)
    v = dense.init(jax.random.key(1), xs)
    g = jnp.asarray(np.random.default_rng(8).standard_normal((6, 5)).astype(np.float32))

    def gx(quant):
        def f(x):
            if quant:
                with linen_activation_fake_quant(4):
                    return jnp.sum(dense.apply(v, x) * g)
            return jnp.sum(dense.apply(v, x) * g)
        return np.asarray(jax.grad(f)(xs))

    np.testing.assert_array_equal(gx(True), gx(False))
