"""StableMax against a float64 numpy transcription of the official definition (utils.py of
LucasPrietoAl/grokking-at-the-edge-of-numerical-stability) and exact properties."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.nn import log_s, log_stablemax, stablemax, stablemax_cross_entropy

_rng = np.random.default_rng(0)


# The official code, transcribed in numpy float64: s, log_stablemax, stablemax_cross_entropy.
def _np_s(x):
    x = np.float64(x)
    with np.errstate(divide="ignore"):
        return np.where(x < 0, 1 / (1 - x + 1e-30), x + 1)


def _np_log_stablemax(x, axis=-1):
    s = _np_s(x)
    return np.log(s / np.sum(s, axis=axis, keepdims=True))


def _np_loss(x, labels):
    return -np.take_along_axis(_np_log_stablemax(x), labels[..., None], axis=-1)[..., 0]


def _np_grad_loss(x, labels):
    """d/dx of sum_n -log StableMax(x_n)_{y_n}, by hand: s'(x) = 1 (x >= 0), 1/(1-x)^2 (x < 0).

    d/dx_k [-log s(x_y) + log sum_j s(x_j)] = -[k = y] s'(x_y)/s(x_y) + s'(x_k) / sum_j s(x_j)
    """
    x = np.float64(x)
    s = _np_s(x)
    ds = np.where(x < 0, 1 / (1 - np.minimum(x, 0)) ** 2, 1.0)
    g = ds / np.sum(s, axis=-1, keepdims=True)
    onehot = np.eye(x.shape[-1])[labels]
    return g - onehot * ds / s


def _logits(shape, scale):
    return (scale * _rng.normal(size=shape)).astype(np.float32)


CASES = [((5,), 1.0), ((4, 10), 3.0), ((2, 3, 7), 50.0), ((8, 4), 1e4), ((3, 6), 1e-3)]


@pytest.mark.parametrize("shape,scale", CASES)
def test_matches_official_definition(shape, scale):
    x = _logits(shape, scale)
    labels = _rng.integers(0, shape[-1], size=shape[:-1])
    ref = _np_log_stablemax(x)
    np.testing.assert_allclose(jax.jit(log_stablemax)(x), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.jit(stablemax)(x), np.exp(ref), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(jax.jit(stablemax_cross_entropy)(x, labels),
                               _np_loss(x, labels), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.exp(log_s(x)), _np_s(x), rtol=1e-6)


@pytest.mark.parametrize("shape,scale", CASES)
def test_gradient_matches_hand_derivative(shape, scale):
    x = _logits(shape, scale)
    x.reshape(-1)[::3] = 0.0  # the kink of s: right derivative 1
    labels = _rng.integers(0, shape[-1], size=shape[:-1])
    g = jax.jit(jax.grad(lambda x: jnp.sum(stablemax_cross_entropy(x, labels))))(x)
    np.testing.assert_allclose(g, _np_grad_loss(x, labels), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("row", [
    [1e30, 0.0, -1e30],
    [-1e30, -1e30, -1e30, 1.0],
    [3e38, -3e38, 2.0],
    [1e30, 1e30, 1e30],  # sum of s overflows float32 if computed directly
    [-1e-30, 0.0, 1e-30],
])
def test_extreme_logits_are_finite(row):
    x = np.array([row], np.float32)
    total = lambda x, labels: stablemax_cross_entropy(x, labels).sum()
    for lab in range(len(row)):
        labels = np.array([lab])
        loss, g = jax.value_and_grad(total)(x, labels)
        assert np.isfinite(loss) and np.all(np.isfinite(g)), (row, lab)
        np.testing.assert_allclose(loss, _np_loss(x, labels)[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(g, _np_grad_loss(x, labels), rtol=1e-4, atol=1e-7)
    p = stablemax(x)
    assert np.all(np.isfinite(p)) and np.all(p >= 0)
    np.testing.assert_allclose(np.sum(p), 1.0, rtol=1e-6)


@pytest.mark.parametrize("shape,scale", CASES)
def test_probability_properties(shape, scale):
    x = _logits(shape, scale)
    p = np.asarray(stablemax(x))
    assert np.all(p > 0)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
    # monotone: larger logit, larger probability (s is strictly increasing)
    order_x, order_p = np.argsort(x, axis=-1), np.argsort(p, axis=-1)
    np.testing.assert_array_equal(np.take_along_axis(x, order_x, -1),
                                  np.take_along_axis(x, order_p, -1))


def test_not_shift_invariant():
    # s(0), s(1) = 1, 2 -> (1/3, 2/3); shifted by 1: s(1), s(2) = 2, 3 -> (2/5, 3/5).
    np.testing.assert_allclose(stablemax(jnp.array([0.0, 1.0])), [1 / 3, 2 / 3], rtol=1e-6)
    np.testing.assert_allclose(stablemax(jnp.array([1.0, 2.0])), [2 / 5, 3 / 5], rtol=1e-6)
    x = _logits((4, 6), 2.0)
    assert not np.allclose(stablemax(x), stablemax(x + 1.0), atol=1e-3)
    np.testing.assert_allclose(jax.nn.softmax(x), jax.nn.softmax(x + 1.0), rtol=1e-5)


def test_axis():
    x = _logits((5, 3), 2.0)
    labels = _rng.integers(0, 5, size=(3,))
    np.testing.assert_allclose(stablemax(x, axis=0), np.asarray(stablemax(x.T)).T, rtol=1e-6)
    np.testing.assert_allclose(stablemax_cross_entropy(x, labels, axis=0),
                               _np_loss(x.T, labels), rtol=1e-5, atol=1e-6)


def test_low_precision_input_is_computed_in_float32():
    x = jnp.asarray(_logits((4, 9), 20.0), jnp.bfloat16)
    labels = _rng.integers(0, 9, size=(4,))
    loss = stablemax_cross_entropy(x, labels)
    assert loss.dtype == jnp.float32 and stablemax(x).dtype == jnp.float32
    np.testing.assert_allclose(loss, _np_loss(np.float32(x), labels), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("logits,labels,axis,err,match", [
    (np.zeros((2, 3), np.float32), np.zeros((2,), np.float32), -1, TypeError, "integers"),
    (np.zeros((2, 3), np.float32), np.zeros((3,), np.int32), -1, ValueError, r"\(2,\)"),
    (np.zeros((2, 3), np.float32), np.zeros((2, 1), np.int32), -1, ValueError, "shape"),
    (np.zeros((2, 3), np.int32), np.zeros((2,), np.int32), -1, TypeError, "floating"),
    (np.zeros((2, 3), np.float32), np.zeros((2,), np.int32), 2, ValueError, "axis"),
    (np.float32(1.0), np.int32(0), -1, ValueError, "class axis"),
])
def test_bad_input(logits, labels, axis, err, match):
    with pytest.raises(err, match=match):
        stablemax_cross_entropy(logits, labels, axis=axis)
