"""MLP, CNN and CharTransformer against plain numpy / torch transcriptions of their equations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from effjax.models import CNN, MLP, CharTransformer, CharTransformerConfig, next_token_loss


def _np(x):
    return np.asarray(x, np.float64)


def _gelu(x):  # tanh approximation, jax.nn.gelu's default
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _layer_norm(x, scale, bias, eps=1e-6):  # nnx.LayerNorm's default epsilon
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def test_mlp_is_the_composition_of_its_layers():
    model = MLP((12, 16, 8, 3), rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(5, 3, 4)).astype(np.float32)
    h = _np(x).reshape(5, 12)
    for i, layer in enumerate(model.layers):
        h = h @ _np(layer.kernel[...]) + _np(layer.bias[...])
        h = _gelu(h) if i < 2 else h
    np.testing.assert_allclose(_np(model(jnp.asarray(x))), h, rtol=1e-5, atol=1e-5)


def test_cnn_matches_torch():
    model = CNN(num_classes=7, channels=(4, 6), hidden=16, image_size=12, rngs=nnx.Rngs(1))
    # nonzero biases, so a bias-layout mistake would show
    for conv in model.convs:
        conv.bias[...] = jax.random.normal(jax.random.PRNGKey(2), conv.bias.shape)
    x = np.random.default_rng(1).normal(size=(3, 12, 12)).astype(np.float32)
    t = torch.from_numpy(x)[:, None]  # NCHW
    for conv in model.convs:
        w = torch.from_numpy(np.array(conv.kernel[...])).permute(3, 2, 0, 1)  # OIHW
        t = torch.nn.functional.conv2d(t, w, torch.from_numpy(np.array(conv.bias[...])),
                                       padding="same")
        t = torch.nn.functional.avg_pool2d(torch.relu(t), 2)
    t = t.permute(0, 2, 3, 1).reshape(3, -1)  # flatten in NHWC order, as the model does
    for layer, act in ((model.hidden, torch.relu), (model.out, lambda v: v)):
        t = act(t @ torch.from_numpy(np.array(layer.kernel[...]))
                + torch.from_numpy(np.array(layer.bias[...])))
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), t.numpy(), rtol=1e-4,
                               atol=1e-5)


CFG = CharTransformerConfig(vocab_size=11, seq_len=8, width=12, depth=2, heads=3)


@pytest.fixture(scope="module")
def lm():
    model = CharTransformer(CFG, rngs=nnx.Rngs(3))
    # random biases and norms, so every parameter takes part in the comparison
    graph, params = nnx.split(model, nnx.Param)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(4), len(leaves))
    leaves = [v + 0.1 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys)]
    return nnx.merge(graph, jax.tree.unflatten(tree, leaves))


def _reference_lm(model, tokens):
    """GPT pre-LN forward, written from the equations in numpy (float64)."""
    p = lambda v: _np(v[...])
    t = tokens.shape[1]
    x = p(model.embed.embedding)[tokens] + p(model.pos.embedding)[:t][None]
    mask = np.tril(np.ones((t, t), bool))
    for b in model.blocks:
        y = _layer_norm(x, p(b.ln1.scale), p(b.ln1.bias))
        q, k, v = (np.einsum("btd,dhe->bthe", y, p(m.kernel)) + p(m.bias)
                   for m in (b.query, b.key, b.value))
        s = np.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(q.shape[-1])
        s = np.where(mask, s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = np.einsum("bhqk,bkhe->bqhe", a, v)
        x = x + np.einsum("bqhe,hed->bqd", o, p(b.out.kernel)) + p(b.out.bias)
        y = _layer_norm(x, p(b.ln2.scale), p(b.ln2.bias))
        x = x + _gelu(y @ p(b.up.kernel) + p(b.up.bias)) @ p(b.down.kernel) + p(b.down.bias)
    x = _layer_norm(x, p(model.ln_f.scale), p(model.ln_f.bias))
    return x @ p(model.head.kernel) + p(model.head.bias)


def test_char_transformer_matches_the_equations(lm):
    tokens = np.random.default_rng(2).integers(0, 11, size=(2, 8))
    np.testing.assert_allclose(np.asarray(lm(jnp.asarray(tokens))), _reference_lm(lm, tokens),
                               rtol=1e-4, atol=1e-4)


def test_char_transformer_is_causal(lm):
    tokens = np.random.default_rng(3).integers(0, 11, size=(1, 8))
    changed = tokens.copy()
    changed[0, 5:] = (changed[0, 5:] + 1) % 11
    a, b = lm(jnp.asarray(tokens)), lm(jnp.asarray(changed))
    np.testing.assert_array_equal(np.asarray(a[:, :5]), np.asarray(b[:, :5]))
    assert not np.allclose(np.asarray(a[:, 5:]), np.asarray(b[:, 5:]))


def test_next_token_loss_is_the_mean_cross_entropy(lm):
    windows = np.random.default_rng(4).integers(0, 11, size=(3, 9))
    logits = _reference_lm(lm, windows[:, :-1])
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -np.take_along_axis(logp, windows[:, 1:, None], -1).mean()
    np.testing.assert_allclose(float(next_token_loss(lm, jnp.asarray(windows))), want, rtol=1e-5)


def test_char_transformer_learns_a_periodic_sequence():
    model = CharTransformer(CFG, rngs=nnx.Rngs(5))
    graph, params = nnx.split(model, nnx.Param)
    windows = jnp.asarray(np.array([[(i + s) % 4 for i in range(9)] for s in range(4)]))
    opt = optax.adam(1e-2)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        loss, g = jax.value_and_grad(lambda p: next_token_loss(nnx.merge(graph, p), windows))(
            params)
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state, loss

    first = None
    for _ in range(60):
        params, state, loss = step(params, state)
        first = float(loss) if first is None else first
    assert first > 2.0 and float(loss) < 0.05  # log(11) = 2.4 at the start; memorised at the end


@pytest.mark.parametrize("build, match", [
    (lambda: CharTransformerConfig(vocab_size=5, width=10, heads=4), "not divisible by heads"),
    (lambda: CharTransformer(CFG, rngs=nnx.Rngs(0))(jnp.zeros((1, 9), jnp.int32)),
     "longer than seq_len=8"),
    (lambda: MLP((4,), rngs=nnx.Rngs(0)), r"needs \(in, ..., out\)"),
    (lambda: CNN(image_size=30, rngs=nnx.Rngs(0)), "not divisible"),
])
def test_bad_sizes_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build()
