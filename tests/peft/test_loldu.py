"""LoLDU: the official init (SKDDJ/LoLDU ``minloldu/loldu.py``) transcribed in torch as the
independent reference, the paper's forward in numpy float64, exact properties of the LDU
decomposition, and bad configs.

Tolerances (float32 kernels, entries ~N(0, 1)): factors and residual against the torch
transcription 1e-5 (both are float32 LAPACK/XLA LU with partial pivoting: the same pivots, the
factors differ by float32 rounding); P L D U = A 1e-5; forward against numpy float64 1e-5.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import torch

from effjax.peft import inject, materialize, split, summary
from effjax.peft.loldu import LoLDU, LoLDUScaleWeight, LoLDUWeight, ldu_decompose
from tests.peft.conformance_case import params_for as _params
from tests.peft.conformance_case import paths as _paths
from tests.peft.conformance_case import perturb as _perturb

# name: (kernel shape, layout kwargs, n_batch, n_in, n_out)
LAYOUTS = {
    "2d": ((12, 10), {}, 1, 12, 10),
    "wide": ((6, 14), {}, 1, 6, 14),
    "qkv": ((16, 4, 8), {}, 1, 16, 32),
    "out": ((4, 8, 16), {"in_axes": (0, 1)}, 1, 32, 16),
    "stacked": ((3, 12, 10), {"batch_axes": 0}, 3, 12, 10),
}


def _inject(layout, dtype=jnp.float32, **kw):
    shape, lay_kw, *_ = LAYOUTS[layout]
    params = _params(shape, dtype)
    method = LoLDU(**{"rank": 3, **kw}, **lay_kw)
    return params, method, inject(params, {r"layer/kernel": method}, key=jax.random.key(1))


def _slices(node):
    """(W_res, u, l, z, sigma) per slice as float64 numpy in Flax layout."""
    lay, r = node.layout, node.rank
    f = lambda x: np.asarray(x, np.float64)  # noqa: E731
    return (f(lay.to_matrix(node.w)).reshape(-1, lay.n_in, lay.n_out),
            f(node.u).reshape(-1, lay.n_in, r), f(node.l).reshape(-1, r, lay.n_out),
            f(node.z).reshape(-1, r), f(node.sigma).reshape(-1))


def official_init(weight, rank, lora_alpha):
    """The official LoLDUParametrization init (init_loldu_weights='ldu', init_method='lu') on a
    torch-layout weight (out, in), float32: returns (resmat, P, L_r, z, U_r, scaling)."""
    weight = weight.to(torch.float32)
    P, L, U = torch.linalg.lu(weight)  # ldu_decomposition
    D = torch.diagonal(U)
    U = U / D.unsqueeze(-1)
    lora_A, lora_B, vector_z = U[:rank], L[:, :rank], D[:rank]
    scaling = lora_alpha / rank
    resmat = weight - scaling * P @ lora_B @ torch.diag(vector_z) @ lora_A
    return resmat, P, lora_B, vector_z, lora_A, scaling


@pytest.mark.parametrize("alpha", [1.0, 5.0])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_init_matches_the_official_code(layout, alpha):
    params, method, tree = _inject(layout, alpha=alpha)
    node = tree["layer"]["kernel"]
    assert type(node) is LoLDUWeight
    lay, r = node.layout, method.rank
    w0 = np.asarray(lay.to_matrix(params["layer"]["kernel"])).reshape(-1, lay.n_in, lay.n_out)
    w_res, u, lt, z, sigma = _slices(node)
    for k in range(w0.shape[0]):
        res_t, P, L_r, z_t, U_r, s = official_init(torch.from_numpy(w0[k].T.copy()), r, alpha)
        f = lambda x: x.double().numpy()  # noqa: E731
        np.testing.assert_allclose(sigma[k], s, rtol=1e-7)
        np.testing.assert_allclose(z[k], f(z_t), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(u[k], f(U_r).T, atol=1e-5)
        np.testing.assert_allclose(lt[k], f(P @ L_r).T, atol=1e-5)
        np.testing.assert_allclose(w_res[k], f(res_t).T, atol=1e-5)
    # identity after inject (official: resmat + s P L_r diag(z) U_r = W)
    got = np.asarray(materialize(tree)["layer"]["kernel"])
    np.testing.assert_allclose(got, np.asarray(params["layer"]["kernel"]), atol=1e-5)
    n_batch = LAYOUTS[layout][2]
    assert method.num_trainable(LAYOUTS[layout][0]) == n_batch * r == summary(tree).trainable
    assert _paths(split(tree)[0]) == {"layer/kernel/z"}


@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (2, 6, 6)])
def test_ldu_decomposition_properties(shape):
    a = np.random.default_rng(5).standard_normal(shape)
    out = ldu_decompose(jnp.asarray(a, jnp.float32))
    perm, low, d, u = (np.asarray(x, np.float64) for x in out)
    m, n = shape[-2:]
    kk = min(m, n)
    a3, perm, low, d, u = (x.reshape((-1,) + x.shape[len(shape) - 2:])
                           for x in (a, perm, low, d, u))
    for b in range(a3.shape[0]):
        p = np.zeros((m, m))
        p[perm[b].astype(int), np.arange(m)] = 1.0  # P[perm[i], i] = 1
        assert sorted(perm[b].astype(int)) == list(range(m))
        np.testing.assert_allclose(p @ low[b] @ np.diag(d[b]) @ u[b], a3[b], atol=1e-5)
        # unit lower / upper trapezoidal; partial pivoting bounds |L| by 1
        np.testing.assert_array_equal(np.triu(low[b], 1), 0.0)
        np.testing.assert_array_equal(np.diagonal(low[b]), 1.0)
        np.testing.assert_array_equal(np.tril(u[b], -1), 0.0)
        np.testing.assert_allclose(np.diagonal(u[b]), 1.0, atol=1e-6)
        assert np.abs(low[b]).max() <= 1.0
        # the same pivots and factors as LAPACK's float64 getrf (scipy)
        P_s, L_s, U_s = scipy.linalg.lu(a3[b])
        np.testing.assert_array_equal(p, P_s)
        np.testing.assert_allclose(low[b], L_s, atol=1e-5)
        np.testing.assert_allclose(d[b], np.diagonal(U_s)[:kk], rtol=1e-5)


def test_alpha_equal_rank_leaves_the_minor_ldu_part_as_residual():
    """sigma0 = 1: W_res = P L[:, r:] D[r:] U[r:] exactly (the paper's figure)."""
    w = np.random.default_rng(1).standard_normal((9, 7)).astype(np.float32)  # Flax (in, out)
    node = LoLDU(rank=3, alpha=3.0).adapt(jax.random.key(0), jnp.asarray(w))
    P, L, U = scipy.linalg.lu(w.T.astype(np.float64))
    D = np.diagonal(U)
    Un = U / D[:, None]
    minor = P @ L[:, 3:] @ np.diag(D[3:]) @ Un[3:]
    np.testing.assert_allclose(np.asarray(node.w, np.float64), minor.T, atol=1e-5)


@pytest.mark.parametrize("layout", ["2d", "out", "stacked"])
def test_forward_with_trained_diagonal_and_scale_matches_numpy(layout):
    _, method, tree = _inject(layout, train_scale=True, alpha=2.0)
    node = tree["layer"]["kernel"]
    assert type(node) is LoLDUScaleWeight
    assert _paths(split(tree)[0]) == {"layer/kernel/z", "layer/kernel/sigma"}
    assert method.num_trainable(LAYOUTS[layout][0]) == LAYOUTS[layout][2] * 4
    tree = _perturb(tree)
    node = tree["layer"]["kernel"]
    w_res, u, lt, z, sigma = _slices(node)
    # the paper's W' = W_res + sigma P L_r diag(z) U_r (torch layout), transposed to Flax
    want = np.stack([(w_res[k].T + sigma[k] * lt[k].T @ np.diag(z[k]) @ u[k].T).T
                     for k in range(w_res.shape[0])])
    lay = node.layout
    got = np.asarray(lay.to_matrix(materialize(tree)["layer"]["kernel"]), np.float64)
    np.testing.assert_allclose(got.reshape(want.shape), want, atol=1e-5)


def test_zero_pivot_gives_no_nan_and_still_reconstructs():
    w = np.random.default_rng(2).standard_normal((6, 5)).astype(np.float32)
    w[0, :] = 0.0  # the torch-layout W^T (out, in) has a zero first column: first pivot 0
    node = LoLDU(rank=3).adapt(jax.random.key(0), jnp.asarray(w))
    assert float(node.z[0]) == 0.0
    for x in (node.u, node.l, node.z, node.w):
        assert np.isfinite(np.asarray(x)).all()
    np.testing.assert_allclose(np.asarray(node.materialize()), w, atol=1e-5)


def test_bfloat16_kernel_keeps_float32_factors():
    params, _, tree = _inject("2d", dtype=jnp.bfloat16)
    node = tree["layer"]["kernel"]
    assert node.w.dtype == jnp.bfloat16
    assert node.u.dtype == node.l.dtype == node.z.dtype == node.sigma.dtype == jnp.float32
    got = materialize(tree)["layer"]["kernel"]
    assert got.dtype == jnp.bfloat16
    w0 = np.asarray(params["layer"]["kernel"], np.float32)
    # the residual is rounded to bfloat16 (8 bits) plus one final rounding
    np.testing.assert_allclose(np.asarray(got, np.float32), w0, rtol=2**-7,
                               atol=2**-8 * float(np.abs(np.asarray(node.w, np.float32)).max()))


def test_bad_configs():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoLDU(rank=0)
    with pytest.raises(TypeError, match="rank must be an int"):
        LoLDU(rank="2")
    with pytest.raises(ValueError, match="alpha must be nonzero"):
        LoLDU(alpha=0.0)
    with pytest.raises(ValueError, match="alpha must be finite"):
        LoLDU(alpha=float("inf"))
    with pytest.raises(TypeError, match="train_scale must be a bool"):
        LoLDU(train_scale=1)
    with pytest.raises(TypeError, match="dtype must be a floating"):
        LoLDU(dtype=jnp.int8)
    with pytest.raises(ValueError, match=r"rank must be <= min\(n_in, n_out\) = 6"):
        LoLDU(rank=7).adapt(jax.random.key(0), jnp.ones((6, 14)))
    with pytest.raises(ValueError, match="layer/kernel.*rank must be <= min"):
        inject({"layer": {"kernel": jnp.ones((3, 12, 5))}},
               {"layer/kernel": LoLDU(rank=6, batch_axes=0)}, key=jax.random.key(0))
    with pytest.raises(TypeError, match="floating kernel"):
        LoLDU(rank=1).adapt(jax.random.key(0), jnp.ones((3, 3), jnp.int32))
