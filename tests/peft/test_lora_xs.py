"""LoRA-XS: the paper's init and forward transcribed in numpy float64, the SVD factors' own
properties, the gradient of R, per-slice SVDs of stacked kernels, bfloat16 kernels, bad configs.

Tolerances (float32 vs float64 numpy): factors and products 1e-5 relative to the largest
singular value (XLA's float32 SVD vs LAPACK's float64 one), orthonormality 1e-5.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.peft import combine, inject, materialize, split
from effjax.peft.lora_xs import LoRAXS, LoRAXSWeight

# name: (kernel shape, layout kwargs, n_batch, n_in, n_out)
LAYOUTS = {
    "2d": ((12, 10), {}, 1, 12, 10),
    "wide": ((6, 14), {}, 1, 6, 14),
    "qkv": ((16, 4, 8), {}, 1, 16, 32),
    "out": ((4, 8, 16), {"in_axes": (0, 1)}, 1, 32, 16),
    "stacked": ((3, 12, 10), {"batch_axes": 0}, 3, 12, 10),
}


def _kernel(shape, seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _to_matrices(w, lay_kw):
    """The kernel as (n_batch, n_in, n_out) float64, by numpy transposes only."""
    w = np.asarray(w, np.float64)
    nd = w.ndim
    batch = lay_kw.get("batch_axes", ())
    batch = (batch,) if isinstance(batch, int) else tuple(batch)
    rest = [a for a in range(nd) if a not in batch]
    ins = tuple(lay_kw.get("in_axes", (rest[0],)))
    outs = tuple(a for a in rest if a not in ins)
    n_in = int(np.prod([w.shape[a] for a in ins]))
    n_out = int(np.prod([w.shape[a] for a in outs]))
    return w.transpose(batch + ins + outs).reshape(-1, n_in, n_out)


def numpy_loraxs(w_slice, rank, scale, r):
    """The paper's equations in float64: W = U S V^T, A = U_r S_r, B = V_r^T, W + s A R B."""
    u, sv, vh = np.linalg.svd(w_slice, full_matrices=False)
    a = u[:, :rank] * sv[:rank]
    b = vh[:rank]
    return a, b, w_slice + scale * a @ r @ b


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_factors_and_forward_match_the_numpy_transcription(layout):
    shape, lay_kw, n_batch, n_in, n_out = LAYOUTS[layout]
    rank, alpha = 3, 6.0
    w = _kernel(shape)
    node = LoRAXS(rank=rank, alpha=alpha, **lay_kw).adapt(jax.random.key(0), w)
    assert isinstance(node, LoRAXSWeight)
    assert node.a.shape[-1] == rank and node.r.shape[-2:] == (rank, rank)
    # a trained R (random), so the check covers the product A R B, not only R ~ 0
    r = np.random.default_rng(1).standard_normal((n_batch, rank, rank))
    node = node.replace(r=jnp.asarray(r.reshape(node.r.shape), jnp.float32))
    got = _to_matrices(node.materialize(), lay_kw)
    a_got = np.asarray(node.a, np.float64).reshape(n_batch, n_in, rank)
    b_got = np.asarray(node.b, np.float64).reshape(n_batch, rank, n_out)
    for k, wk in enumerate(_to_matrices(w, lay_kw)):
        a, b, _ = numpy_loraxs(wk, rank, alpha / rank, r[k])
        # singular vectors are defined up to one sign per component: align, then compare
        sign = np.sign(np.sum(a * a_got[k], axis=0))
        tol = 1e-5 * np.linalg.norm(wk, 2)
        np.testing.assert_allclose(a_got[k], a * sign, atol=tol)
        np.testing.assert_allclose(b_got[k], sign[:, None] * b, atol=1e-5)
        want = wk + alpha / rank * (a * sign) @ r[k] @ (sign[:, None] * b)
        np.testing.assert_allclose(got[k], want, atol=tol * rank)


@pytest.mark.parametrize("layout", ["2d", "wide", "stacked"])
def test_frozen_factors_are_the_truncated_svd(layout):
    shape, lay_kw, n_batch, n_in, n_out = LAYOUTS[layout]
    rank = 3
    w = _kernel(shape, seed=4)
    node = LoRAXS(rank=rank, **lay_kw).adapt(jax.random.key(0), w)
    a = np.asarray(node.a, np.float64).reshape(n_batch, n_in, rank)
    b = np.asarray(node.b, np.float64).reshape(n_batch, rank, n_out)
    for k, wk in enumerate(_to_matrices(w, lay_kw)):  # each slice has its own SVD
        u, sv, vh = np.linalg.svd(wk, full_matrices=False)
        np.testing.assert_allclose(b[k] @ b[k].T, np.eye(rank), atol=1e-5)  # V_r^T rows
        gram = a[k].T @ a[k]  # (U_r S_r)^T (U_r S_r) = S_r^2
        np.testing.assert_allclose(gram, np.diag(sv[:rank] ** 2), atol=1e-4 * sv[0] ** 2)
        # A B is the best rank-r approximation of the slice (sign-free)
        np.testing.assert_allclose(a[k] @ b[k], (u[:, :rank] * sv[:rank]) @ vh[:rank],
                                   atol=1e-5 * sv[0])


def test_official_gaussian_init_of_r_and_zeros_init():
    w = _kernel((40, 30))
    node = LoRAXS(rank=10).adapt(jax.random.key(3), w)
    r = np.asarray(node.r)
    assert r.shape == (10, 10) and r.dtype == np.float32
    assert 0.75e-5 < r.std() < 1.25e-5 and abs(r.mean()) < 0.3e-5  # N(0, 1e-5^2), 100 draws
    other = LoRAXS(rank=10).adapt(jax.random.key(4), w)
    assert not np.array_equal(np.asarray(other.r), r)  # drawn from the leaf's key
    np.testing.assert_array_equal(np.asarray(node.w), np.asarray(w))  # w kept as is
    zero = LoRAXS(rank=10, init="zeros").adapt(jax.random.key(3), w)
    np.testing.assert_array_equal(np.asarray(zero.r), np.zeros((10, 10), np.float32))
    np.testing.assert_array_equal(np.asarray(zero.materialize()), np.asarray(w))
    big = LoRAXS(rank=10, init_std=0.5).adapt(jax.random.key(3), w)
    np.testing.assert_allclose(np.asarray(big.r), 0.5e5 * r, rtol=1e-5)  # same draw, scaled


def test_gradient_of_r_is_s_at_g_bt():
    """dL/dR = s A^T G B^T for G = dL/dW' (the paper's projected gradient)."""
    w = _kernel((12, 10))
    params = {"k": w}
    tree = inject(params, {"k": LoRAXS(rank=4, alpha=2.0, init="zeros")},
                  key=jax.random.key(0))
    c = np.random.default_rng(5).standard_normal((12, 10)).astype(np.float32)
    trainable, frozen = split(tree)
    loss = lambda t: jnp.sum(c * materialize(combine(t, frozen))["k"])  # noqa: E731
    g = np.asarray(jax.grad(loss)(trainable)["k"].r, np.float64)
    a, b = np.asarray(tree["k"].a, np.float64), np.asarray(tree["k"].b, np.float64)
    np.testing.assert_allclose(g, 0.5 * a.T @ c @ b.T, rtol=1e-5, atol=1e-5)
    assert np.abs(g).max() > 0.1  # R = 0 at init does not stop training


def test_bfloat16_kernel_gets_float32_factors_from_a_float32_svd():
    w32 = _kernel((12, 10))
    w16 = w32.astype(jnp.bfloat16)
    node = LoRAXS(rank=3, init="zeros").adapt(jax.random.key(0), w16)
    assert node.w.dtype == jnp.bfloat16
    assert node.a.dtype == node.b.dtype == node.r.dtype == jnp.float32
    assert node.materialize().dtype == jnp.bfloat16
    ref = LoRAXS(rank=3, init="zeros").adapt(jax.random.key(0), w16.astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(node.a), np.asarray(ref.a))
    np.testing.assert_array_equal(np.asarray(node.b), np.asarray(ref.b))
    node16 = LoRAXS(rank=3, dtype=jnp.bfloat16).adapt(jax.random.key(0), w32)
    assert node16.r.dtype == node16.a.dtype == jnp.bfloat16


def test_trainable_count_is_r_squared_per_slice():
    assert LoRAXS(rank=4).num_trainable((4096, 4096)) == 16
    assert LoRAXS(rank=4, batch_axes=0).num_trainable((6, 64, 32)) == 6 * 16
    assert LoRAXS(rank=2, in_axes=(0, 1)).num_trainable((4, 8, 16)) == 4


@pytest.mark.parametrize("kwargs, err, match", [
    ({"rank": 0}, ValueError, "rank must be >= 1"),
    ({"rank": 2.0}, TypeError, "rank must be an int"),
    ({"rank": True}, TypeError, "rank must be an int"),
    ({"alpha": 0.0}, ValueError, "alpha must be finite and nonzero"),
    ({"alpha": "1"}, TypeError, "alpha must be None or a number"),
    ({"init": "kaiming"}, ValueError, "init must be one of"),
    ({"init_std": -1.0}, ValueError, "init_std must be finite and >= 0"),
    ({"dtype": jnp.int32}, TypeError, "dtype must be a floating dtype"),
    ({"batch_axes": "0"}, TypeError, "batch_axes must be None, an int or a tuple"),
])
def test_bad_configs_name_the_field(kwargs, err, match):
    with pytest.raises(err, match=match):
        LoRAXS(**kwargs)


def test_bad_kernels_name_the_leaf():
    params = {"layer": {"kernel": _kernel((6, 4))}}
    with pytest.raises(ValueError, match=r"layer/kernel.*rank <= min\(n_in, n_out\) = 4"):
        inject(params, {"layer/kernel": LoRAXS(rank=5)}, key=jax.random.key(0))
    with pytest.raises(ValueError, match="layer/kernel.*at least 2"):
        inject({"layer": {"kernel": jnp.ones(5)}}, {"layer/kernel": LoRAXS(rank=1)},
               key=jax.random.key(0))
    with pytest.raises(TypeError, match="floating kernel"):
        LoRAXS(rank=1).adapt(jax.random.key(0), jnp.ones((3, 3), jnp.int32))
