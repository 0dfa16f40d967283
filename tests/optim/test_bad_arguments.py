"""Bad arguments and foreign states get a clear error naming the argument or the leaf (issue 19
items 6, 7, 8 and the cases ``experiments/fuzz_api.py`` found): never a silent run in another
format, a crash deep inside XLA or a hang."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

import effjax.optim as eo
from effjax.quant import dynamic_codebook, linear_codebook

PARAMS = {"w": jnp.zeros((64, 128)), "b": jnp.zeros((8,))}
GRADS = jax.tree.map(jnp.ones_like, PARAMS)


def _state(opt):
    return jax.eval_shape(opt.init, PARAMS)


# (the optimizer the state was made by, the one given it, what the message must say)
FOREIGN = {
    "8-bit state to adamw_4bit": (eo.adamw_8bit(1e-3), eo.adamw_4bit(1e-3),
                                  ["[0].mu['w']", "8-bit", "4-bit"]),
    "block 256 state to block 128": (eo.adamw_8bit(1e-3), eo.adamw_8bit(1e-3, block_size=128),
                                     ["[0].mu['w']", "block_size 256", "block_size 128"]),
    "optax.adamw state to adamw_8bit": (optax.adamw(1e-3), eo.adamw_8bit(1e-3),
                                        ["[0].mu['w']", "unquantized float32", "8-bit"]),
    "bfloat16 scales to float32 scales": (
        eo.adamw_8bit(1e-3, scale_dtype=jnp.bfloat16), eo.adamw_8bit(1e-3),
        ["[0].mu['w']", "bfloat16 scales", "float32 scales"]),
    "another codebook": (
        eo.quantize_state(optax.adam(1e-3), signed_codebook=linear_codebook(8, signed=True)),
        eo.quantize_state(optax.adam(1e-3)), ["[0].mu['w']", "codebook"]),
    "all leaves quantized to the default": (
        eo.adamw_8bit(1e-3, min_quantized_size=0), eo.adamw_8bit(1e-3),
        ["[0].mu['b']", "8-bit", "unquantized"]),
}


@pytest.mark.parametrize("case", list(FOREIGN))
def test_a_state_from_another_optimizer_names_leaf_and_mismatch(case):
    maker, user, words = FOREIGN[case]
    with pytest.raises(ValueError) as err:
        jax.eval_shape(user.update, GRADS, _state(maker), PARAMS)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(learning_rate=None), TypeError, ["learning_rate", "None"]),
    (dict(learning_rate="1e-3"), TypeError, ["learning_rate", "'1e-3'"]),
    (dict(learning_rate=1e-3, b1=1.5), ValueError, ["b1", "1.5"]),
    (dict(learning_rate=1e-3, b2=-0.1), ValueError, ["b2", "-0.1"]),
    (dict(learning_rate=1e-3, eps=-1.0), ValueError, ["eps", "-1.0"]),
    (dict(learning_rate=1e-3, weight_decay=float("nan")), ValueError, ["weight_decay", "nan"]),
    (dict(learning_rate=1e-3, block_size=10**9), ValueError, ["block_size", "1000000000"]),
    (dict(learning_rate=1e-3, block_size=0), ValueError, ["block_size", "0"]),
])
def test_bad_hyperparameters_are_refused_when_built(kwargs, error, words):
    with pytest.raises(error) as err:
        eo.adamw_8bit(**kwargs)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_schedules_and_injected_arrays_still_pass():
    eo.adamw_8bit(optax.linear_schedule(1e-3, 0.0, 10), b1=jnp.float32(0.9))
    opt = optax.inject_hyperparams(eo.adamw_8bit, static_args=("block_size",
                                                               "min_quantized_size"))(1e-3)
    updates, _ = opt.update(GRADS, opt.init(PARAMS), PARAMS)
    assert jnp.isfinite(updates["w"]).all()


@pytest.mark.parametrize("codebook,error,words", [
    ("nf4", TypeError, ["signed_codebook", "'nf4'", "nf4_codebook"]),
    ([0.0, 0.5, 1.0], ValueError, ["signed_codebook", "no negative value"]),
    ([-2.0, 0.0, 2.0], ValueError, ["signed_codebook", "-2"]),
    ([0.5] * 16, ValueError, ["signed_codebook"]),
])
def test_bad_codebooks_are_refused_when_built(codebook, error, words):
    with pytest.raises(error) as err:
        eo.quantize_state(optax.adam(1e-3), signed_codebook=codebook)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_unsigned_codebook_must_be_non_negative():
    with pytest.raises(ValueError, match="unsigned_codebook has negative values"):
        eo.quantize_state(optax.adam(1e-3), unsigned_codebook=dynamic_codebook(signed=True))


@pytest.mark.parametrize("make", [lambda: eo.spam(1e-3), lambda: eo.stable_spam(1e-3),
                                  lambda: eo.adamw_8bit(1e-3)])
def test_integer_gradients_name_the_leaf(make):
    opt = make()
    grads = dict(GRADS, b=jnp.ones((8,), jnp.int32))
    with pytest.raises(TypeError) as err:
        jax.eval_shape(opt.update, grads, _state(opt), PARAMS)
    assert "['b']" in str(err.value) and "int32" in str(err.value), str(err.value)
