"""LoRA-SB and the gradient-calibration helper: the init reproduces the best rank-r
approximation of the first full fine-tuning update (checked against numpy's float64 SVD of the
gradient), the full-rank SGD case is exactly one SGD step, R's update is the projected full-FT
update, and gradient_calibration equals jax.grad averaged over the batches.

Tolerances: float32 SVD (XLA) vs float64 numpy 1e-5 relative to the largest singular value;
gradient means 1e-6 (the same float32 gradients summed in the same order).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.peft import LoRA, combine, inject, materialize, split
from effjax.peft.gradients import gradient_calibration
from effjax.peft.lora_sb import LoRASB, LoRASBWeight


def _mlp_params(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    return {"dense1": {"kernel": f(6, 8), "bias": f(8)},
            "dense2": {"kernel": f(8, 3), "bias": f(3)}}


def _mlp_loss(p, batch):
    x, y = batch
    h = jnp.tanh(x @ p["dense1"]["kernel"] + p["dense1"]["bias"])
    return jnp.mean((h @ p["dense2"]["kernel"] + p["dense2"]["bias"] - y) ** 2)


def _batches(n=3, seed=1):
    rng = np.random.default_rng(seed)
    return [(jnp.asarray(rng.standard_normal((5, 6)), jnp.float32),
             jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)) for _ in range(n)]


def _trunc(m, r):
    """Best rank-r approximation of m (float64 numpy SVD) and the tail singular values."""
    u, sv, vh = np.linalg.svd(np.asarray(m, np.float64), full_matrices=False)
    return (u[:, :r] * sv[:r]) @ vh[:r], sv


# ---- gradient_calibration ------------------------------------------------------------------

def test_gradient_calibration_is_the_mean_of_jax_grad_per_batch():
    params, batches = _mlp_params(), _batches()
    rules = {r".*/kernel": LoRASB(rank=2, lr=1e-3)}
    calib = gradient_calibration(_mlp_loss, params, batches, rules)
    assert set(calib) == {"dense1/kernel", "dense2/kernel"}
    grads = [jax.grad(_mlp_loss)(params, b) for b in batches]
    for layer in ("dense1", "dense2"):
        want = np.mean([np.asarray(g[layer]["kernel"]) for g in grads], axis=0)
        got = calib[f"{layer}/kernel"]
        assert got.shape == params[layer]["kernel"].shape and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7)
    # an explicit path list gives the same; the batches' order does not matter
    by_path = gradient_calibration(_mlp_loss, params, batches[::-1], ["dense2/kernel"])
    assert set(by_path) == {"dense2/kernel"}
    np.testing.assert_allclose(np.asarray(by_path["dense2/kernel"]),
                               np.asarray(calib["dense2/kernel"]), rtol=1e-6, atol=1e-7)


def test_gradient_calibration_compiles_once_and_takes_only_gradient_methods():
    params, traces = _mlp_params(), []

    def loss(p, batch):
        traces.append(1)  # runs only while tracing
        return _mlp_loss(p, batch)

    rules = {"dense1/kernel": LoRA(rank=2), "dense2/kernel": LoRASB(rank=2, lr=1e-3)}
    calib = gradient_calibration(loss, params, _batches(4), rules)
    assert set(calib) == {"dense2/kernel"}  # LoRA needs no gradient
    assert len(traces) == 1  # one jit trace for the four same-shape batches


def test_gradient_calibration_bad_inputs():
    params = _mlp_params()
    with pytest.raises(TypeError, match="wrap one path in a list"):
        gradient_calibration(_mlp_loss, params, _batches(), "dense1/kernel")
    with pytest.raises(ValueError, match=r"\['dense9/kernel'\] are not leaf paths"):
        gradient_calibration(_mlp_loss, params, _batches(), ["dense9/kernel"])
    with pytest.raises(ValueError, match="at least one batch"):
        gradient_calibration(_mlp_loss, params, [], ["dense1/kernel"])
    with pytest.raises(ValueError, match="no rule targets a leaf with a gradient-calibrated"):
        gradient_calibration(_mlp_loss, params, _batches(), {".*/kernel": LoRA(rank=2)})
    with pytest.raises(ValueError, match="matches no leaf"):
        gradient_calibration(_mlp_loss, params, _batches(), {"nope": LoRASB(rank=1, lr=1.0)})
    with pytest.raises(TypeError, match="leaf 'step'.*not a floating array"):
        gradient_calibration(lambda p, b: 0.0, {"step": jnp.zeros((), jnp.int32)}, [0],
                             ["step"])


# ---- the LoRA-SB init ----------------------------------------------------------------------

@pytest.mark.parametrize("first_step", ["adam", "sgd"])
def test_init_is_the_best_rank_r_approximation_of_the_first_full_ft_step(first_step):
    params, batches = _mlp_params(), _batches()
    lr, rank, alpha = 0.05, 2, 6.0
    method = LoRASB(rank=rank, lr=lr, first_step=first_step, alpha=alpha)
    rules = {r".*/kernel": method}
    calib = gradient_calibration(_mlp_loss, params, batches, rules)
    tree = inject(params, rules, key=jax.random.key(0), calibration=calib)
    out = materialize(tree)
    for layer in ("dense1", "dense2"):
        node = tree[layer]["kernel"]
        assert isinstance(node, LoRASBWeight)
        w = np.asarray(params[layer]["kernel"], np.float64)
        g = np.mean([np.asarray(jax.grad(_mlp_loss)(params, b)[layer]["kernel"], np.float64)
                     for b in batches], axis=0)
        step = -lr * (np.sign(g) if first_step == "adam" else g)  # the paper's Delta W_1
        best, sv = _trunc(step, rank)
        a, r, b = (np.asarray(x, np.float64) for x in (node.a, node.r, node.b))
        tol = 1e-5 * sv[0]
        np.testing.assert_allclose(alpha / rank * a @ r @ b, best, atol=tol)
        np.testing.assert_allclose(a.T @ a, np.eye(rank), atol=1e-5)  # A = U_r
        np.testing.assert_allclose(b @ b.T, np.eye(rank), atol=1e-5)  # B = V_r^T
        np.testing.assert_allclose(r, np.diag(sv[:rank]) / (alpha / rank), atol=tol)  # S_r / s
        # the paper keeps W: the init applies the truncated first step
        np.testing.assert_array_equal(np.asarray(node.w), np.asarray(params[layer]["kernel"]))
        np.testing.assert_allclose(np.asarray(out[layer]["kernel"]), w + best, atol=1e-5)
        # Eckart-Young: the error is the tail of the spectrum, the smallest possible
        err = np.linalg.norm(step - alpha / rank * a @ r @ b)
        np.testing.assert_allclose(err, np.sqrt(np.sum(sv[rank:] ** 2)), rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(out["dense1"]["bias"]),
                                  np.asarray(params["dense1"]["bias"]))


def test_full_rank_sgd_init_is_exactly_one_full_fine_tuning_step():
    w = jnp.asarray(np.random.default_rng(0).standard_normal((7, 5)), jnp.float32)
    g = jnp.asarray(np.random.default_rng(1).standard_normal((7, 5)), jnp.float32)
    node = LoRASB(rank=5, lr=0.3, first_step="sgd").adapt(jax.random.key(0), w, data=g)
    np.testing.assert_allclose(np.asarray(node.materialize()), np.asarray(w - 0.3 * g),
                               atol=1e-5)


def test_residual_keeps_w_at_init_with_the_same_factors():
    w = jnp.asarray(np.random.default_rng(0).standard_normal((9, 6)), jnp.float32)
    g = jnp.asarray(np.random.default_rng(1).standard_normal((9, 6)), jnp.float32)
    plain = LoRASB(rank=3, lr=0.2).adapt(jax.random.key(0), w, data=g)
    res = LoRASB(rank=3, lr=0.2, residual=True).adapt(jax.random.key(0), w, data=g)
    for f in ("a", "r", "b"):
        np.testing.assert_array_equal(np.asarray(getattr(res, f)), np.asarray(getattr(plain, f)))
    np.testing.assert_allclose(np.asarray(res.materialize()), np.asarray(w), atol=1e-6)
    best, _ = _trunc(-0.2 * np.sign(np.asarray(g)), 3)
    np.testing.assert_allclose(np.asarray(res.w), np.asarray(w) - best, atol=1e-5)


def test_r_update_is_the_full_ft_update_projected_on_the_fixed_subspaces():
    """An SGD step on R moves W' by -eta s^2 A A^T G B^T B (A, B orthonormal): the paper's
    equivalent gradient, the full-FT gradient G = dL/dW' projected on both sides."""
    w = jnp.asarray(np.random.default_rng(0).standard_normal((8, 6)), jnp.float32)
    g0 = jnp.asarray(np.random.default_rng(1).standard_normal((8, 6)), jnp.float32)
    s = 2.0
    tree = inject({"k": w}, {"k": LoRASB(rank=3, lr=0.1, alpha=6.0)}, key=jax.random.key(0),
                  calibration={"k": g0})
    c = jnp.asarray(np.random.default_rng(2).standard_normal((8, 6)), jnp.float32)
    trainable, frozen = split(tree)
    loss = lambda t: jnp.sum(c * materialize(combine(t, frozen))["k"])  # noqa: E731, G = c
    grads = jax.grad(loss)(trainable)
    eta = 0.01
    moved = jax.tree.map(lambda p, d: p - eta * d, trainable, grads)
    change = np.asarray(materialize(combine(moved, frozen))["k"] - materialize(tree)["k"],
                        np.float64)
    a, b = np.asarray(tree["k"].a, np.float64), np.asarray(tree["k"].b, np.float64)
    want = -eta * s**2 * a @ a.T @ np.asarray(c, np.float64) @ b.T @ b
    np.testing.assert_allclose(change, want, atol=1e-5)


def test_stacked_kernels_take_the_svd_of_each_gradient_slice():
    w = jnp.asarray(np.random.default_rng(0).standard_normal((3, 8, 6)), jnp.float32)
    g = np.random.default_rng(1).standard_normal((3, 8, 6)).astype(np.float32)
    node = LoRASB(rank=2, lr=0.1, batch_axes=0).adapt(jax.random.key(0), w, data=g)
    assert node.a.shape == (3, 8, 2) and node.r.shape == (3, 2, 2) and node.b.shape == (3, 2, 6)
    delta = np.asarray(node.materialize() - w, np.float64)
    for k in range(3):
        best, sv = _trunc(-0.1 * np.sign(g[k]), 2)
        np.testing.assert_allclose(delta[k], best, atol=1e-5 * sv[0])


def test_bfloat16_kernel_gets_float32_factors():
    w = jnp.asarray(np.random.default_rng(0).standard_normal((8, 6)), jnp.bfloat16)
    g = np.random.default_rng(1).standard_normal((8, 6)).astype(np.float32)
    node = LoRASB(rank=2, lr=0.1).adapt(jax.random.key(0), w, data=g)
    assert node.a.dtype == node.r.dtype == node.b.dtype == jnp.float32
    assert node.w.dtype == node.materialize().dtype == jnp.bfloat16


# ---- errors --------------------------------------------------------------------------------

def test_missing_calibration_names_the_path():
    params = {"layer": {"kernel": jnp.ones((6, 4))}}
    rules = {"layer/kernel": LoRASB(rank=2, lr=0.1)}
    with pytest.raises(ValueError, match=r"leaf 'layer/kernel'.*needs calibration data "
                                         r"\(gradients\)"):
        inject(params, rules, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"leaf 'layer/kernel'.*needs calibration data"):
        inject(params, rules, key=jax.random.key(0), calibration={"other/kernel": 0})
    with pytest.raises(ValueError, match=r"data=grad"):
        LoRASB(rank=2, lr=0.1).adapt(jax.random.key(0), jnp.ones((6, 4)))


def test_bad_calibration_data_names_shape_and_dtype():
    params = {"layer": {"kernel": jnp.ones((6, 4))}}
    rules = {"layer/kernel": LoRASB(rank=2, lr=0.1)}
    with pytest.raises(ValueError, match=r"layer/kernel.*gradient has shape \(4, 6\), but the "
                                         r"kernel has shape \(6, 4\)"):
        inject(params, rules, key=jax.random.key(0),
               calibration={"layer/kernel": jnp.ones((4, 6))})
    with pytest.raises(TypeError, match="gradient must be floating, got dtype int32"):
        inject(params, rules, key=jax.random.key(0),
               calibration={"layer/kernel": jnp.ones((6, 4), jnp.int32)})
    with pytest.raises(ValueError, match=r"layer/kernel.*rank <= min\(n_in, n_out\) = 4"):
        inject(params, {"layer/kernel": LoRASB(rank=5, lr=0.1)}, key=jax.random.key(0),
               calibration={"layer/kernel": jnp.ones((6, 4))})


@pytest.mark.parametrize("kwargs, err, match", [
    ({"rank": 2}, TypeError, "lr"),
    ({"rank": 0, "lr": 0.1}, ValueError, "rank must be >= 1"),
    ({"lr": 0.0}, ValueError, "lr must be finite and > 0"),
    ({"lr": float("nan")}, ValueError, "lr must be finite and > 0"),
    ({"lr": "0.1"}, TypeError, "lr must be a number"),
    ({"lr": 0.1, "first_step": "rmsprop"}, ValueError, "first_step must be one of"),
    ({"lr": 0.1, "residual": 1}, TypeError, "residual must be a bool"),
    ({"lr": 0.1, "alpha": float("inf")}, ValueError, "alpha must be finite"),
    ({"lr": 0.1, "dtype": jnp.int8}, TypeError, "dtype must be a floating dtype"),
])
def test_bad_configs_name_the_field(kwargs, err, match):
    with pytest.raises(err, match=match):
        LoRASB(**kwargs)
