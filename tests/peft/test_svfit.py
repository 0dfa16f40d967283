"""SVFit: the paper's equations in numpy float64 (SVD split W = W_r + W_e, trainable top-r
singular values), exact properties of the frozen factors, and bad configs.

Tolerances (float32 kernels, entries ~N(0, 1)): factors, residual and reconstruction 1e-5
absolute against the float64 numpy SVD (XLA's float32 SVD vs LAPACK's float64 one; the test
matrices have well separated singular values so the singular vectors are well conditioned).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.peft import inject, materialize, split, summary
from effjax.peft.svfit import SVFit, SVFitWeight
from tests.peft.conformance_case import params_for as _params
from tests.peft.conformance_case import perturb as _perturb

# name: (kernel shape, layout kwargs, n_batch, n_in, n_out)
LAYOUTS = {
    "2d": ((12, 10), {}, 1, 12, 10),
    "wide": ((6, 14), {}, 1, 6, 14),
    "qkv": ((16, 4, 8), {}, 1, 16, 32),
    "out": ((4, 8, 16), {"in_axes": (0, 1)}, 1, 32, 16),
    "stacked": ((3, 12, 10), {"batch_axes": 0}, 3, 12, 10),
}


def _inject(layout, rank=3, dtype=jnp.float32):
    shape, kw, *_ = LAYOUTS[layout]
    params = _params(shape, dtype)
    method = SVFit(rank=rank, **kw)
    return params, method, inject(params, {r"layer/kernel": method}, key=jax.random.key(1))


def _slices(node):
    """(W_e, U, s, Vh) per slice as float64 numpy: (B, n_in, n_out), (B, n_in, r), (B, r), ..."""
    lay, r = node.layout, node.rank
    f = lambda x: np.asarray(x, np.float64)  # noqa: E731
    w = f(lay.to_matrix(node.w)).reshape(-1, lay.n_in, lay.n_out)
    return (w, f(node.u).reshape(-1, lay.n_in, r), f(node.s).reshape(-1, r),
            f(node.vh).reshape(-1, r, lay.n_out))


def _numpy_svfit_init(m, r):
    """The paper's init in float64: W = U S V^T, W_r = U_r S_r V_r^T, W_e = W - W_r, sigma =
    diag(S_r)."""
    u, s, vh = np.linalg.svd(m, full_matrices=False)
    w_r = (u[:, :r] * s[:r]) @ vh[:r]
    return m - w_r, w_r, s[:r]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_init_is_the_papers_svd_split(layout):
    params, method, tree = _inject(layout)
    node = tree["layer"]["kernel"]
    assert isinstance(node, SVFitWeight)
    lay = node.layout
    w0 = np.asarray(lay.to_matrix(params["layer"]["kernel"]), np.float64).reshape(
        -1, lay.n_in, lay.n_out)
    w_e, u, s, vh = _slices(node)
    r = method.rank
    for k in range(w0.shape[0]):
        want_e, want_r, want_s = _numpy_svfit_init(w0[k], r)
        np.testing.assert_allclose(s[k], want_s, rtol=1e-5)
        assert np.all(np.diff(s[k]) <= 0)  # descending: the *top* r values
        np.testing.assert_allclose((u[k] * s[k]) @ vh[k], want_r, atol=1e-5)
        np.testing.assert_allclose(w_e[k], want_e, atol=1e-5)
        # frozen singular vectors are orthonormal
        np.testing.assert_allclose(u[k].T @ u[k], np.eye(r), atol=1e-5)
        np.testing.assert_allclose(vh[k] @ vh[k].T, np.eye(r), atol=1e-5)
        # the residual keeps exactly the tail of the spectrum and is orthogonal to U_r, V_r
        tail = np.linalg.svd(w0[k], compute_uv=False)[r:]
        np.testing.assert_allclose(np.linalg.svd(w_e[k], compute_uv=False)[:len(tail)], tail,
                                   atol=1e-5)
        np.testing.assert_allclose(u[k].T @ w_e[k], 0.0, atol=1e-5)
        np.testing.assert_allclose(w_e[k] @ vh[k].T, 0.0, atol=1e-5)
    # identity after inject, up to float32 rounding
    got = np.asarray(materialize(tree)["layer"]["kernel"])
    np.testing.assert_allclose(got, np.asarray(params["layer"]["kernel"]), atol=1e-5)
    n_batch = LAYOUTS[layout][2]
    assert method.num_trainable(LAYOUTS[layout][0]) == n_batch * r == summary(tree).trainable
    assert [x.shape for x in jax.tree.leaves(split(tree)[0])] == [lay.batch_shape + (r,)]


@pytest.mark.parametrize("layout", ["2d", "out", "stacked"])
def test_forward_with_trained_singular_values_matches_numpy(layout):
    """W' = W_e + U_r diag(sigma) V_r^T with sigma != the initial values, in float64 numpy."""
    _, _, tree = _inject(layout)
    tree = _perturb(tree)
    node = tree["layer"]["kernel"]
    w_e, u, s, vh = _slices(node)
    want = np.stack([w_e[k] + u[k] @ np.diag(s[k]) @ vh[k] for k in range(w_e.shape[0])])
    lay = node.layout
    got = np.asarray(lay.to_matrix(materialize(tree)["layer"]["kernel"]), np.float64)
    np.testing.assert_allclose(got.reshape(want.shape), want, atol=1e-5)
    # zeroing sigma leaves exactly the frozen residual
    zero = node.replace(s=jnp.zeros_like(node.s)).materialize()
    np.testing.assert_array_equal(np.asarray(zero), np.asarray(node.w))


def test_full_rank_puts_everything_in_the_factors():
    w = np.random.default_rng(4).standard_normal((7, 5)).astype(np.float32)
    node = SVFit(rank=5).adapt(jax.random.key(0), jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(node.w), 0.0, atol=1e-5)  # W_e = 0
    np.testing.assert_allclose(np.asarray(node.materialize()), w, atol=1e-5)
    # doubling every singular value doubles W
    np.testing.assert_allclose(np.asarray(node.replace(s=2 * node.s).materialize()), 2 * w,
                               atol=2e-5)


def test_bfloat16_kernel_keeps_float32_factors():
    params, _, tree = _inject("2d", dtype=jnp.bfloat16)
    node = tree["layer"]["kernel"]
    assert node.w.dtype == jnp.bfloat16
    assert node.u.dtype == node.s.dtype == node.vh.dtype == jnp.float32
    got = materialize(tree)["layer"]["kernel"]
    assert got.dtype == jnp.bfloat16
    w0 = np.asarray(params["layer"]["kernel"], np.float32)
    # the residual is rounded to bfloat16 (8 bits) plus one final rounding
    np.testing.assert_allclose(np.asarray(got, np.float32), w0, rtol=2**-7,
                               atol=2**-8 * float(np.abs(np.asarray(node.w, np.float32)).max()))
    node16 = SVFit(rank=2, dtype=jnp.bfloat16).adapt(jax.random.key(0),
                                                     params["layer"]["kernel"])
    assert node16.s.dtype == jnp.bfloat16


def test_bad_configs():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        SVFit(rank=0)
    with pytest.raises(TypeError, match="rank must be an int"):
        SVFit(rank=2.0)
    with pytest.raises(TypeError, match="dtype must be a floating"):
        SVFit(dtype=jnp.int32)
    with pytest.raises(ValueError, match=r"rank must be <= min\(n_in, n_out\) = 6"):
        SVFit(rank=7).adapt(jax.random.key(0), jnp.ones((6, 14)))
    with pytest.raises(ValueError, match="layer/kernel.*rank must be <= min"):
        inject({"layer": {"kernel": jnp.ones((3, 12, 5))}},
               {"layer/kernel": SVFit(rank=6, batch_axes=0)}, key=jax.random.key(0))
    with pytest.raises(TypeError, match="floating kernel"):
        SVFit(rank=1).adapt(jax.random.key(0), jnp.ones((3, 3), jnp.int32))
    with pytest.raises(ValueError, match="overlaps batch_axes"):
        SVFit(rank=1, batch_axes=0, in_axes=0).adapt(jax.random.key(0), jnp.ones((2, 3, 3)))
