"""LaMDA: the init and forward transcribed in numpy float64, the SVD factors' properties, and
the gradual freezing of PMB through optax (inside optax.chain with adamw, under jit, on the
paper's linear schedule and on the official trainer's step schedule).

Tolerances (float32 vs float64 numpy): 1e-5 relative to the largest singular value (XLA's
float32 SVD vs LAPACK's float64 one); the freezing checks are exact (frozen components do not
change at all, the others change by more than 1e-6).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from effjax.peft import LoRA, combine, inject, materialize, split
from effjax.peft.lamda import LaMDA, LaMDAWeight, frozen_components, lamda_freeze
from tests.peft.test_lora_xs import LAYOUTS, _kernel, _to_matrices


def numpy_lamda(w_slice, rank, scale):
    """The init in float64: W = U S V^T, A = U_r, S = S_r / s, B = V_r^T, W_res = W - s A S B."""
    u, sv, vh = np.linalg.svd(w_slice, full_matrices=False)
    a, s, b = u[:, :rank], np.diag(sv[:rank]) / scale, vh[:rank]
    return a, s, b, w_slice - scale * a @ s @ b


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_init_and_forward_match_the_numpy_transcription(layout):
    shape, lay_kw, n_batch, n_in, n_out = LAYOUTS[layout]
    rank, alpha = 3, 6.0
    sc = alpha / rank
    w = _kernel(shape, seed=2)
    node = LaMDA(rank=rank, alpha=alpha, **lay_kw).adapt(jax.random.key(0), w)
    assert isinstance(node, LaMDAWeight)
    a = np.asarray(node.a, np.float64).reshape(n_batch, n_in, rank)
    s = np.asarray(node.s, np.float64).reshape(n_batch, rank, rank)
    b = np.asarray(node.b, np.float64).reshape(n_batch, rank, n_out)
    w_res = _to_matrices(node.w, lay_kw)
    # trained S and B (random), for the forward check
    rng = np.random.default_rng(1)
    s2 = rng.standard_normal((n_batch, rank, rank))
    b2 = rng.standard_normal((n_batch, rank, n_out))
    trained = node.replace(s=jnp.asarray(s2.reshape(node.s.shape), jnp.float32),
                           b=jnp.asarray(b2.reshape(node.b.shape), jnp.float32))
    got = _to_matrices(trained.materialize(), lay_kw)
    for k, wk in enumerate(_to_matrices(w, lay_kw)):
        a_np, s_np, b_np, res_np = numpy_lamda(wk, rank, sc)
        sign = np.sign(np.sum(a_np * a[k], axis=0))  # one sign per singular pair
        tol = 1e-5 * s_np[0, 0] * sc
        np.testing.assert_allclose(a[k], a_np * sign, atol=1e-5)
        np.testing.assert_allclose(b[k], sign[:, None] * b_np, atol=1e-5)
        np.testing.assert_allclose(s[k], s_np, atol=tol)
        np.testing.assert_allclose(w_res[k], res_np, atol=tol)
        want = res_np + sc * (a_np * sign) @ s2[k] @ b2[k]  # y = xW + s x A S B, per slice
        np.testing.assert_allclose(got[k], want, atol=10 * tol)


def test_projections_are_orthonormal_and_the_residual_keeps_the_tail_spectrum():
    w = _kernel((12, 10), seed=3)
    node = LaMDA(rank=4).adapt(jax.random.key(0), w)
    a, b = np.asarray(node.a, np.float64), np.asarray(node.b, np.float64)
    np.testing.assert_allclose(a.T @ a, np.eye(4), atol=1e-5)
    np.testing.assert_allclose(b @ b.T, np.eye(4), atol=1e-5)
    sv = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)
    tail = np.linalg.svd(np.asarray(node.w, np.float64), compute_uv=False)
    np.testing.assert_allclose(tail[:6], sv[4:], atol=1e-5)
    np.testing.assert_allclose(np.asarray(node.materialize()), np.asarray(w), atol=1e-5)


def test_zeros_init_keeps_w_and_only_s_gets_a_gradient_at_init():
    w = _kernel((12, 10), seed=3)
    tree = inject({"k": w}, {"k": LaMDA(rank=3, init="zeros")}, key=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(materialize(tree)["k"]), np.asarray(w))
    c = jnp.asarray(np.random.default_rng(0).standard_normal((12, 10)), jnp.float32)
    trainable, frozen = split(tree)
    grads = jax.grad(lambda t: jnp.sum(c * materialize(combine(t, frozen))["k"]))(trainable)
    a, b = np.asarray(tree["k"].a, np.float64), np.asarray(tree["k"].b, np.float64)
    np.testing.assert_allclose(np.asarray(grads["k"].s), a.T @ np.asarray(c) @ b.T, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(grads["k"].b), np.zeros((3, 10)))  # S = 0


def test_bfloat16_kernel_gets_float32_factors():
    w = _kernel((12, 10)).astype(jnp.bfloat16)
    node = LaMDA(rank=3).adapt(jax.random.key(0), w)
    assert node.a.dtype == node.s.dtype == node.b.dtype == jnp.float32
    assert node.w.dtype == node.materialize().dtype == jnp.bfloat16


# ---- gradual freezing of PMB ---------------------------------------------------------------

def _train(tree, tx, steps):
    """Run `steps` jitted steps of tx on a quadratic loss; return the trainable half after each
    step (index 0: before training)."""
    trainable, frozen = split(tree)
    target = jnp.asarray(np.random.default_rng(9).standard_normal(
        materialize(tree)["layer"]["kernel"].shape), jnp.float32)

    def loss(t):
        return jnp.sum((materialize(combine(t, frozen))["layer"]["kernel"] - target) ** 2)

    @jax.jit
    def step(t, st):
        updates, st = tx.update(jax.grad(loss)(t), st, t)
        return optax.apply_updates(t, updates), st

    state = tx.init(trainable)
    history = [trainable]
    for _ in range(steps):
        trainable, state = step(trainable, state)
        history.append(trainable)
    return history


def _rows_changed(history, field, axis):
    """changed[n, j]: whether rank component j of `field` changed in step n (n -> n + 1)."""
    vals = [np.asarray(getattr(h["layer"]["kernel"], field)) for h in history]
    out = []
    for x, y in zip(vals, vals[1:]):
        d = np.abs(np.moveaxis(y - x, axis, 0)).reshape(x.shape[axis], -1).max(axis=1)
        assert np.all((d == 0) | (d > 1e-6)), d  # either frozen or clearly moving
        out.append(d > 0)
    return np.array(out)


@pytest.mark.parametrize("shape, kw, axis", [((12, 10), {}, 0),
                                             ((2, 12, 10), {"batch_axes": 0}, 1)])
def test_pmb_stops_changing_exactly_on_the_linear_schedule_inside_adamw_chain(shape, kw, axis):
    rank, t_i, steps = 3, 6, 10
    tree = inject({"layer": {"kernel": _kernel(shape, seed=5)}},
                  {"layer/kernel": LaMDA(rank=rank, **kw)}, key=jax.random.key(0))
    tx = optax.chain(optax.adamw(0.05, weight_decay=0.1), lamda_freeze(t_i))
    history = _train(tree, tx, steps)
    changed = _rows_changed(history, "b", axis)
    for j in range(rank):  # component j freezes from step ceil((j + 1) t_i / r): 2, 4, 6
        first_frozen = math.ceil((j + 1) * t_i / rank)
        assert changed[:first_frozen, j].all(), (j, changed[:, j])
        assert not changed[first_frozen:, j].any(), (j, changed[:, j])
    assert not changed[t_i:].any()  # PMB completely frozen from step t_i
    s_changed = _rows_changed(history, "s", axis)
    assert s_changed.all()  # the LDA keeps training every step


def test_official_step_schedule_and_smallest_first_order():
    rank = 4
    tree = inject({"layer": {"kernel": _kernel((12, 10), seed=6)}},
                  {"layer/kernel": LaMDA(rank=rank)}, key=jax.random.key(0))
    # the official trainer: t = count // int(eta * max_steps), components [:t] frozen
    tx = optax.chain(optax.adam(0.05), lamda_freeze(lambda c: c // 3))
    changed = _rows_changed(_train(tree, tx, 14), "b", 0)
    for j in range(rank):
        assert changed[:3 * (j + 1), j].all() and not changed[3 * (j + 1):, j].any()
    tx = optax.chain(optax.sgd(0.01), lamda_freeze(4, order="smallest_first"))
    changed = _rows_changed(_train(tree, tx, 6), "b", 0)
    for j in range(rank):  # component r - 1 first: frozen from step r - j
        assert changed[:rank - j, j].all() and not changed[rank - j:, j].any()


def test_freeze_touches_only_pmb_of_lamda_nodes():
    params = {"layer": {"kernel": _kernel((12, 10)), "bias": jnp.ones(10)},
              "other": {"kernel": _kernel((6, 5))}}
    tree = inject(params, {"layer/kernel": LaMDA(rank=2), "other/kernel": LoRA(rank=2)},
                  key=jax.random.key(0))
    tx = lamda_freeze(1)  # everything of PMB frozen from step 1
    ones = jax.tree.map(jnp.ones_like, tree)  # the full tree, frozen fields included
    state = tx.init(ones)
    out0, state = jax.jit(tx.update)(ones, state)
    out1, state = jax.jit(tx.update)(ones, state)
    assert int(state.count) == 2
    assert jax.tree.structure(out1) == jax.tree.structure(ones)
    for got, path in ((out0, "step 0"), (out1, "step 1")):
        for f in ("w", "a", "s"):
            assert np.all(np.asarray(getattr(got["layer"]["kernel"], f)) == 1), (path, f)
        for leaf in jax.tree.leaves(got["other"]) + [got["layer"]["bias"]]:
            assert np.all(np.asarray(leaf) == 1), path
    assert np.all(np.asarray(out0["layer"]["kernel"].b) == 1)
    assert np.all(np.asarray(out1["layer"]["kernel"].b) == 0)


def test_frozen_components_schedule_values():
    assert [int(frozen_components(t, 4, 8)) for t in range(11)] == [0, 0, 1, 1, 2, 2, 3, 3,
                                                                    4, 4, 4]
    assert [int(frozen_components(t, 2, lambda c: c - 1)) for t in range(5)] == [0, 0, 1, 2, 2]


@pytest.mark.parametrize("args, kwargs, err, match", [
    ((0,), {}, ValueError, "freeze_steps must be >= 1"),
    ((2.5,), {}, TypeError, "freeze_steps must be an int"),
    ((True,), {}, TypeError, "freeze_steps must be an int"),
    ((3,), {"order": "random"}, ValueError, "order must be one of"),
])
def test_bad_freeze_arguments(args, kwargs, err, match):
    with pytest.raises(err, match=match):
        lamda_freeze(*args, **kwargs)


@pytest.mark.parametrize("kwargs, err, match", [
    ({"rank": 0}, ValueError, "LaMDA rank must be >= 1"),
    ({"rank": 1.5}, TypeError, "LaMDA rank must be an int"),
    ({"alpha": 0}, ValueError, "LaMDA alpha must be finite and nonzero"),
    ({"init": "pissa"}, ValueError, "LaMDA init must be one of"),
    ({"dtype": jnp.int32}, TypeError, "LaMDA dtype must be a floating dtype"),
    ({"in_axes": (0.5,)}, TypeError, "in_axes must be None, an int or a tuple"),
])
def test_bad_configs_name_the_field(kwargs, err, match):
    with pytest.raises(err, match=match):
        LaMDA(**kwargs)


def test_bad_kernels_name_the_leaf():
    with pytest.raises(ValueError, match=r"layer/kernel.*rank <= min\(n_in, n_out\) = 4"):
        inject({"layer": {"kernel": _kernel((6, 4))}}, {"layer/kernel": LaMDA(rank=5)},
               key=jax.random.key(0))
