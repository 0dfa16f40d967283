"""ALLoRA, perpGrad and the batch-size rules against numpy transcriptions of their equations
(perpGrad: of the official ``OrthoGrad`` code) and exact properties."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from effjax.optim import perp_grad, project_out_param_direction
from effjax.optim.allora import (
    allora_coefficient,
    allora_lora_delta,
    scale_by_inverse_param_norm,
)
from effjax.optim.batch_size import (
    adam_hyperparams_for_batch_size,
    lr_for_batch_size,
    scale_learning_rate,
)

_rng = np.random.default_rng(0)


def _normal(*shape, scale=1.0):
    return (scale * _rng.normal(size=shape)).astype(np.float32)


# ----------------------------------------------------------------------------- ALLoRA


def _np_coef(norm, eta):  # Huang & Balestriero 2024, Sec. 4.2: 1 / sqrt(||(BA)_i,:|| + 1/eta^2)
    return 1.0 / np.sqrt(np.asarray(norm, np.float64) + 1.0 / eta**2)


@pytest.mark.parametrize("norm,eta", [(0.0, 2.0), (0.0, 16.0), (3.5, 2.0), (1e4, 0.5),
                                      (0.75, 1.0)])
def test_allora_coefficient(norm, eta):
    np.testing.assert_allclose(allora_coefficient(norm, eta), _np_coef(norm, eta), rtol=1e-6)


def _np_allora_grads(x, a, b, t, eta):
    """Gradients of sum(t * (x A B)) under ALLoRA's rescaled backward, in float64."""
    x, a, b, t = (np.asarray(v, np.float64) for v in (x, a, b, t))
    dw = a @ b  # (in, out): column j produces output j
    c = _np_coef(np.linalg.norm(dw, axis=0), eta)
    xf, tf = x.reshape(-1, x.shape[-1]), t.reshape(-1, t.shape[-1])
    ts = tf * c
    return (t @ b.T @ a.T,  # dL/dx: not rescaled
            xf.T @ ts @ b.T,  # dL/dA = x^T delta~ B^T
            (xf @ a).T @ ts)  # dL/dB = (x A)^T delta~


@pytest.mark.parametrize("batch,n_in,r,n_out,eta,b_scale", [
    ((6,), 5, 2, 4, 3.0, 1.0),
    ((2, 3), 7, 3, 5, 0.5, 0.1),
    ((4,), 8, 4, 3, 10.0, 5.0),
])
def test_allora_lora_delta_matches_numpy(batch, n_in, r, n_out, eta, b_scale):
    x, a, t = _normal(*batch, n_in), _normal(n_in, r), _normal(*batch, n_out)
    b = _normal(r, n_out, scale=b_scale)
    loss = jax.jit(lambda x, a, b: jnp.sum(t * allora_lora_delta(x, a, b, eta=eta)))
    gx, ga, gb = jax.grad(loss, argnums=(0, 1, 2))(x, a, b)
    rx, ra, rb = _np_allora_grads(x, a, b, t, eta)
    for got, ref in ((gx, rx), (ga, ra), (gb, rb)):
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(allora_lora_delta(x, a, b, eta=eta),
                               x.astype(np.float64) @ a @ b, rtol=1e-5, atol=1e-5)


def test_allora_at_init_gradient_is_eta_times_lora():
    # B = 0: every coefficient is eta, so ALLoRA's step equals LoRA's with scaling factor eta.
    x, a, b, t = _normal(4, 6), _normal(6, 2), np.zeros((2, 3), np.float32), _normal(4, 3)
    g = jax.grad(lambda b: jnp.sum(t * allora_lora_delta(x, a, b, eta=4.0)))(b)
    g_lora = jax.grad(lambda b: jnp.sum(t * (x @ a @ b)))(b)
    np.testing.assert_allclose(g, 4.0 * g_lora, rtol=1e-6)


def _np_paper_listing1(input_x, weight_a, weight_b, grad_output, rsq_scale):
    """Huang & Balestriero 2024, Appendix F, Listing 1, line by line in numpy (paper layout:
    A (r, n2), B (n1, r), input (batch, seq, n2)); torch sums the per-sample A/B grads over batch.
    """
    input_x, weight_a, weight_b, grad_output = (
        np.asarray(v, np.float64) for v in (input_x, weight_a, weight_b, grad_output))
    norms = np.linalg.norm(weight_b @ weight_a, axis=1)  # torch.norm(B @ A, dim=1): unsquared
    accelerate = 1.0 / np.sqrt(norms + rsq_scale)
    grad_input = grad_output @ weight_b @ weight_a
    temp = np.swapaxes((grad_output * accelerate) @ weight_b, 1, 2)
    grad_weight_a = (temp @ input_x).sum(0)
    temp = np.swapaxes(grad_output * accelerate, 1, 2)
    grad_weight_b = (temp @ (input_x @ weight_a.T)).sum(0)
    return grad_input, grad_weight_a, grad_weight_b


@pytest.mark.parametrize("eta", [2.0, 1.0, math.sqrt(2.0)])  # Listing 1: rsq_scale = 1/4
def test_allora_lora_delta_matches_paper_listing(eta):
    # Paper layout (out = B A x) vs Flax layout (out = x A' B' with A' = A^T, B' = B^T).
    x, t = _normal(3, 5, 7), _normal(3, 5, 4)
    pa, pb = _normal(2, 7), _normal(4, 2, scale=0.8)  # A (r, n2), B (n1, r)
    loss = lambda x, a, b: jnp.sum(t * allora_lora_delta(x, a, b, eta=eta))
    gx, ga, gb = jax.grad(loss, argnums=(0, 1, 2))(x, pa.T, pb.T)
    rx, ra, rb = _np_paper_listing1(x, pa, pb, t, rsq_scale=1.0 / eta**2)
    for got, ref in ((gx, rx), (ga, ra.T), (gb, rb.T)):
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("x_shape,a_shape,b_shape,eta,err", [
    ((3, 4), (5, 2), (2, 3), 1.0, ValueError),  # x's last axis != in
    ((3, 4), (4, 2), (3, 3), 1.0, ValueError),  # rank mismatch
    ((3, 4), (4,), (2, 3), 1.0, ValueError),
    ((3, 4), (4, 2), (2, 3), 0.0, ValueError),
    ((3, 4), (4, 2), (2, 3), -1.0, ValueError),
    ((3, 4), (4, 2), (2, 3), "2", TypeError),
])
def test_allora_lora_delta_bad_input(x_shape, a_shape, b_shape, eta, err):
    with pytest.raises(err):
        allora_lora_delta(jnp.ones(x_shape), jnp.ones(a_shape), jnp.ones(b_shape), eta=eta)


def _np_reduce_axes(ndim, axis):
    if axis is None:
        return tuple(range(ndim - 1)) if ndim >= 2 else tuple(range(ndim))
    return (axis,) if isinstance(axis, int) else tuple(axis)


@pytest.mark.parametrize("shape,axis", [
    ((4, 3), None),  # one coefficient per output column of a Flax kernel
    ((2, 3, 4), None),
    ((5,), None),
    ((), None),
    ((4, 3), 1),
    ((4, 3), (0, 1)),
    ((2, 3, 4), -1),
])
def test_scale_by_inverse_param_norm_matches_numpy(shape, axis):
    eta = 1.5
    u, p = _normal(*shape), _normal(*shape, scale=0.7)
    tx = scale_by_inverse_param_norm(eta, axis=axis)
    out, _ = jax.jit(tx.update)({"p": u}, tx.init({"p": p}), {"p": p})
    norm = np.sqrt(np.sum(np.float64(p) ** 2, axis=_np_reduce_axes(len(shape), axis),
                          keepdims=True))
    np.testing.assert_allclose(out["p"], u * _np_coef(norm, eta), rtol=1e-6)


def test_scale_by_inverse_param_norm_masked_in_a_chain():
    params = {"lora_a": _normal(6, 2), "lora_b": _normal(2, 3), "dense": _normal(6, 3)}
    grads = {k: _normal(*v.shape) for k, v in params.items()}
    mask = {"lora_a": True, "lora_b": True, "dense": False}
    opt = optax.chain(optax.masked(scale_by_inverse_param_norm(2.0), mask), optax.scale(-0.1))
    updates, _ = jax.jit(opt.update)(grads, opt.init(params), params)
    for k, v in params.items():
        coef = _np_coef(np.linalg.norm(np.float64(v), axis=0, keepdims=True), 2.0)
        np.testing.assert_allclose(updates[k], -0.1 * grads[k] * (coef if mask[k] else 1.0),
                                   rtol=1e-6)


# ---------------------------------------------------------------------- bad inputs (shared)

_TRANSFORMS = {"scale_by_inverse_param_norm": lambda: scale_by_inverse_param_norm(1.0),
               "perp_grad": perp_grad}


@pytest.mark.parametrize("name", list(_TRANSFORMS))
@pytest.mark.parametrize("updates,params,err,match", [
    ({"w": jnp.ones((2, 3))}, None, ValueError, "needs|reads the parameters"),
    ({"a": {"w": jnp.ones((2, 3))}}, {"a": {"w": jnp.ones((3, 2))}}, ValueError,
     r"\['a'\]\['w'\].*\(2, 3\).*\(3, 2\)"),
    ({"w": jnp.ones((2,))}, {"v": jnp.ones((2,))}, ValueError, "tree structures"),
    ({"w": jnp.ones((2,))}, {"w": jnp.ones((2,), jnp.int32)}, TypeError, r"\['w'\].*int32"),
])
def test_bad_updates_or_params(name, updates, params, err, match):
    tx = _TRANSFORMS[name]()
    with pytest.raises(err, match=match):
        tx.update(updates, optax.EmptyState(), params)


def test_scale_by_inverse_param_norm_bad_args():
    for eta in (0.0, -2.0, float("inf")):
        with pytest.raises(ValueError, match="eta"):
            scale_by_inverse_param_norm(eta)
    tx = scale_by_inverse_param_norm(1.0, axis=2)
    with pytest.raises(ValueError, match=r"\['w'\]"):
        tx.update({"w": jnp.ones((2, 3))}, optax.EmptyState(), {"w": jnp.ones((2, 3))})


# --------------------------------------------------------------------------- perpGrad


def _np_orthograd(g, w, renormalize=True):
    """The official OrthoGrad step (orthograd.py @ 0cc9e8d), in float64."""
    g, w = np.float64(g).reshape(-1), np.float64(w).reshape(-1)
    proj = np.dot(w, g) / (np.dot(w, w) + 1e-30)
    g_orth = g - proj * w
    if renormalize:
        g_orth = g_orth * (np.linalg.norm(g) / (np.linalg.norm(g_orth) + 1e-30))
    return g_orth


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("shape,w_scale", [((7,), 1.0), ((4, 5), 0.02), ((2, 3, 4), 30.0),
                                           ((3,), 2.0)])
def test_perp_grad_matches_official_and_is_orthogonal(shape, w_scale, renormalize):
    g, w = _normal(*shape), _normal(*shape, scale=w_scale)
    out, _ = jax.jit(perp_grad(renormalize=renormalize).update)({"w": g}, None, {"w": w})
    got = np.float64(out["w"]).reshape(-1)
    np.testing.assert_allclose(got, _np_orthograd(g, w, renormalize), rtol=1e-5, atol=1e-6)
    w64 = np.float64(w).reshape(-1)
    # <g_perp, w> = 0 up to float32 rounding (relative to the sizes involved)
    assert abs(got @ w64) <= 1e-5 * np.linalg.norm(got) * np.linalg.norm(w64) + 1e-12
    if renormalize:
        np.testing.assert_allclose(np.linalg.norm(got), np.linalg.norm(g), rtol=1e-5)


@pytest.mark.parametrize("renormalize", [True, False])
def test_perp_grad_keeps_orthogonal_gradients_and_zero_weights(renormalize):
    w = np.array([[1.0, 2.0], [0.0, -1.0]], np.float32)
    g_orth = np.array([[2.0, -1.0], [3.0, 0.0]], np.float32)  # <g, w> = 0
    zeros = np.zeros_like(w)
    tx = perp_grad(renormalize=renormalize)
    out, _ = tx.update({"a": g_orth, "b": g_orth}, None, {"a": w, "b": zeros})
    np.testing.assert_allclose(out["a"], g_orth, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out["b"], g_orth)  # w = 0: nothing to remove, no NaN
    # g parallel to w: nothing is left (also for one-element leaves, where the official code
    # rescales float rounding noise up to ||g||)
    par, _ = tx.update({"a": 3.0 * w, "c": np.float32([0.3])}, None,
                       {"a": w, "c": np.float32([-1.7])})
    np.testing.assert_allclose(par["a"], 0.0, atol=1e-6)
    np.testing.assert_allclose(par["c"], 0.0, atol=1e-6)


def test_perp_grad_tiny_and_huge_weights_stay_orthogonal():
    # <w, w> underflows (1e-25^2) or overflows (1e25^2) in float32; the projection must not.
    g = _normal(16)
    for scale in (1e-25, 1e25):
        w = _normal(16) * np.float32(scale)
        out = np.float64(project_out_param_direction(jnp.asarray(g), jnp.asarray(w)))
        assert np.all(np.isfinite(out))
        u = np.float64(w) / np.linalg.norm(np.float64(w))
        assert abs(out @ u) <= 1e-5 * np.linalg.norm(out)
        np.testing.assert_allclose(out, _np_orthograd(g, np.float64(w) / scale), rtol=1e-4,
                                   atol=1e-5)


def test_perp_grad_bfloat16_leaf():
    g, w = _normal(32), _normal(32)
    gb, wb = jnp.asarray(g, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    out = project_out_param_direction(gb, wb)
    assert out.dtype == jnp.bfloat16
    ref = _np_orthograd(np.float32(gb), np.float32(wb))  # same bf16 inputs, float64 math
    np.testing.assert_allclose(np.float32(out), ref, rtol=2e-2, atol=2e-2)


def test_perp_grad_chained_with_adamw():
    params = {"w": _normal(4, 3), "b": _normal(3)}
    opt = optax.chain(perp_grad(), optax.adamw(0.01, weight_decay=0.1))
    ref = optax.adamw(0.01, weight_decay=0.1)
    state, ref_state = opt.init(params), ref.init(params)
    step = jax.jit(opt.update)
    p, p_ref = params, params
    for i in range(3):
        grads = {k: _normal(*v.shape) for k, v in params.items()}
        updates, state = step(grads, state, p)
        proj = {k: jnp.asarray(_np_orthograd(grads[k], p_ref[k]).reshape(grads[k].shape),
                               jnp.float32) for k in grads}
        ref_updates, ref_state = ref.update(proj, ref_state, p_ref)
        for k in params:
            np.testing.assert_allclose(updates[k], ref_updates[k], rtol=1e-4, atol=1e-6,
                                       err_msg=f"step {i}, leaf {k}")
        p, p_ref = optax.apply_updates(p, updates), optax.apply_updates(p_ref, ref_updates)


def test_perp_grad_bad_args():
    with pytest.raises(TypeError, match="renormalize"):
        perp_grad(renormalize=1)


# ------------------------------------------------------------------------- batch size


@pytest.mark.parametrize("lr,b0,b,rule,expected", [
    (1e-3, 256, 1024, "sqrt", 2e-3),
    (1e-3, 256, 64, "sqrt", 5e-4),
    (0.1, 256, 1024, "linear", 0.4),
    (0.1, 256, 32, "linear", 0.0125),
    (3e-4, 100, 300, "sqrt", 3e-4 * math.sqrt(3.0)),
    (0.5, 8, 8, "linear", 0.5),
])
def test_scale_learning_rate(lr, b0, b, rule, expected):
    assert scale_learning_rate(lr, b0, b, rule=rule) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("optimizer,factor", [("adam", 2.0), ("AdamW", 2.0), ("rmsprop", 2.0),
                                              ("sgd", 4.0)])
def test_lr_for_batch_size_rule_per_optimizer(optimizer, factor):
    assert lr_for_batch_size(0.01, 64, 256, optimizer=optimizer) == pytest.approx(0.01 * factor)


def test_scaled_schedule():
    base = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 100)
    for rule, factor in (("sqrt", 3.0), ("linear", 9.0)):
        sched = scale_learning_rate(base, 32, 288, rule=rule)
        for step in (0, 5, 10, 50, 99):
            np.testing.assert_allclose(sched(step), factor * base(step), rtol=1e-6)
    sched = jax.jit(lr_for_batch_size(base, 32, 128, optimizer="adam"))
    np.testing.assert_allclose(sched(20), 2.0 * base(20), rtol=1e-6)
    opt = optax.adam(sched)  # usable as an optax learning rate
    opt.update({"w": jnp.ones(2)}, opt.init({"w": jnp.ones(2)}))


# (the last row: b1 = 0, no momentum, stays 0)
@pytest.mark.parametrize("b0,b,b1,b2,eps", [(256, 1024, 0.9, 0.999, 1e-8),
                                            (128, 32, 0.9, 0.95, 1e-6),
                                            (10, 15, 0.0, 0.99, 1e-3)])
def test_adam_hyperparams_for_batch_size(b0, b, b1, b2, eps):
    k = b / b0  # Malladi et al.'s rule written out
    hp = adam_hyperparams_for_batch_size(b0, b, learning_rate=1e-3, b1=b1, b2=b2, eps=eps)
    assert hp == pytest.approx({"learning_rate": 1e-3 * math.sqrt(k),
                                "b1": 1 - k * (1 - b1) if b1 else 0.0,
                                "b2": 1 - k * (1 - b2), "eps": eps / math.sqrt(k)}, rel=1e-12)
    optax.adamw(**hp)


@pytest.mark.parametrize("call,err,match", [
    (lambda: scale_learning_rate(1e-3, 0, 64), ValueError, "base_batch_size"),
    (lambda: scale_learning_rate(1e-3, 64, -8), ValueError, "batch_size"),
    (lambda: scale_learning_rate(1e-3, 64, 32.0), ValueError, "batch_size"),
    (lambda: scale_learning_rate(1e-3, True, 32), ValueError, "base_batch_size"),
    (lambda: scale_learning_rate(1e-3, 64, 128, rule="cubic"), ValueError, "rule"),
    (lambda: scale_learning_rate(-1e-3, 64, 128), ValueError, "learning_rate"),
    (lambda: scale_learning_rate("1e-3", 64, 128), TypeError, "learning_rate"),
    (lambda: lr_for_batch_size(1e-3, 64, 128, optimizer="lion"), ValueError, "lion"),
    (lambda: adam_hyperparams_for_batch_size(64, 128, learning_rate=1e-3, b1=1.0),
     ValueError, "b1"),
    (lambda: adam_hyperparams_for_batch_size(8, 128, learning_rate=1e-3, b1=0.9),
     ValueError, "b1.*> 1"),
    (lambda: adam_hyperparams_for_batch_size(8, 16, learning_rate=1e-3, eps=0.0),
     ValueError, "eps"),
])
def test_batch_size_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call()


@pytest.mark.parametrize("spike", [1e20, -3e38])
def test_perp_projection_of_a_huge_gradient_is_finite_and_right(spike):
    """A gradient element of 1e20 or 3e38 (finite): the sums of squares would overflow float32;
    the projection runs on a power-of-two-scaled copy, so it equals the float64 equation
    ``g - (<w, g> / <w, w>) w`` renormalized to ``||g||`` (found by the planted-value check)."""
    from effjax.optim import project_out_param_direction

    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 8)).astype(np.float32)
    g = rng.normal(size=(16, 8)).astype(np.float32)
    g[3, 5] = spike
    got = np.asarray(project_out_param_direction(jnp.asarray(g), jnp.asarray(w)))
    g64, w64 = g.astype(np.float64), w.astype(np.float64)
    gp = g64 - (np.vdot(w64, g64) / np.vdot(w64, w64)) * w64
    want = gp * (np.linalg.norm(g64) / np.linalg.norm(gp))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())
