"""PiSSA and OLoRA inits of LoRA: reconstruction, the decompositions' own properties, and the
same subspaces / residual weights as Hugging Face PEFT on the same weight.

Tolerances (float32): reconstruction W_res + s A B vs W 1e-5 relative to max|W|; against PEFT
(LAPACK SVD/QR in torch vs XLA's in jax, same float32 input) products and residuals 1e-5 and
projectors 1e-5.
"""

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

from effjax.peft import LoRA, inject, load_adapters, materialize, save_adapters, split, summary
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
INITS = ["pissa", "olora", "pissa_niter_2"]


def _inject(init, layout, rank=3, alpha=6.0, dtype=jnp.float32, **kw):
    shape, lay_kw, *_ = LAYOUTS[layout]
    params = _params(shape, dtype)
    method = LoRA(rank=rank, alpha=alpha, init=init, **lay_kw, **kw)
    return params, method, inject(params, {r"layer/kernel": method}, key=jax.random.key(1))


def _matrices(node):
    """(W_res, A, B) per slice as numpy (n_batch, n_in, n_out), (n_batch, n_in, r), ..."""
    lay = node.layout
    r = node.rank
    w = np.asarray(lay.to_matrix(node.w)).reshape(-1, lay.n_in, lay.n_out)
    a = np.asarray(node.a).reshape(-1, lay.n_in, r)
    b = np.asarray(node.b).reshape(-1, r, lay.n_out)
    return w, a, b


def _proj(x):
    """Orthogonal projector onto the column space of x."""
    q, _ = np.linalg.qr(np.asarray(x, np.float64))
    return q @ q.T


@pytest.mark.parametrize("layout", ["2d", "qkv", "out", "stacked"])
@pytest.mark.parametrize("init", INITS)
def test_materialize_after_inject_reconstructs_w(init, layout):
    params, method, tree = _inject(init, layout)
    node = tree["layer"]["kernel"]
    w0 = np.asarray(params["layer"]["kernel"])
    out = materialize(tree)
    got = np.asarray(out["layer"]["kernel"])
    assert got.shape == w0.shape and got.dtype == w0.dtype
    np.testing.assert_allclose(got, w0, rtol=0, atol=1e-5 * np.abs(w0).max())
    np.testing.assert_array_equal(np.asarray(out["layer"]["bias"]),
                                  np.asarray(params["layer"]["bias"]))
    # the frozen w is a genuine residual and b is not zero
    assert np.abs(np.asarray(node.w) - w0).max() > 0.1
    assert np.abs(np.asarray(node.b)).min() >= 0 and np.abs(np.asarray(node.b)).max() > 0.1
    _, _, n_batch, n_in, n_out = LAYOUTS[layout]
    want = n_batch * 3 * (n_in + n_out)
    assert method.num_trainable(LAYOUTS[layout][0]) == want == summary(tree).trainable
    assert sum(x.size for x in jax.tree.leaves(split(tree)[0])) == want


@pytest.mark.parametrize("layout", ["2d", "wide", "qkv", "stacked"])
def test_pissa_is_the_truncated_svd(layout):
    _, method, tree = _inject("pissa", layout)
    w_res, a, b = _matrices(tree["layer"]["kernel"])
    s, r = method.scale, method.rank
    for k in range(w_res.shape[0]):
        w = w_res[k] + s * a[k] @ b[k]
        u, sv, vh = np.linalg.svd(w.astype(np.float64), full_matrices=False)
        principal = (u[:, :r] * sv[:r]) @ vh[:r]
        np.testing.assert_allclose(s * a[k] @ b[k], principal, atol=1e-5)
        # A = U_r sqrt(S_r / s), B = sqrt(S_r / s) V_r^T: columns of A and rows of B have norms
        # sqrt(S_r / s), and the residual keeps the tail singular values
        np.testing.assert_allclose(np.linalg.norm(a[k], axis=0), np.sqrt(sv[:r] / s), rtol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(b[k], axis=1), np.sqrt(sv[:r] / s), rtol=1e-5)
        tail = np.linalg.svd(w_res[k].astype(np.float64), compute_uv=False)
        np.testing.assert_allclose(tail[:len(sv) - r], sv[r:], atol=1e-5)


@pytest.mark.parametrize("layout", ["2d", "wide", "out", "stacked"])
def test_olora_is_the_qr_of_the_out_in_weight(layout):
    """PEFT: torch weight W^T (out, in) = QR, B = Q_r, A = R_r; so in Flax layout b has
    orthonormal rows spanning the first r rows of W (the first r columns of W^T), and
    a = W b^T (R_r = Q_r^T W^T)."""
    _, method, tree = _inject("olora", layout)
    w_res, a, b = _matrices(tree["layer"]["kernel"])
    s, r = method.scale, method.rank
    for k in range(w_res.shape[0]):
        w = w_res[k] + s * a[k] @ b[k]
        np.testing.assert_allclose(b[k] @ b[k].T, np.eye(r), atol=1e-5)
        np.testing.assert_allclose(_proj(b[k].T), _proj(w[:r].T), atol=1e-5)
        np.testing.assert_allclose(a[k], w @ b[k].T, atol=1e-5)
        np.testing.assert_allclose(np.triu(a[k].T), a[k].T, atol=1e-6)  # R_r upper triangular


def _peft_layer(w_flax, init, rank, alpha, rslora=False):
    n_in, n_out = w_flax.shape
    lin = torch.nn.Sequential(torch.nn.Linear(n_in, n_out))
    with torch.no_grad():
        lin[0].weight.copy_(torch.from_numpy(np.ascontiguousarray(w_flax.T)))
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["0"], use_rslora=rslora,
                          init_lora_weights=init)
    layer = peft.get_peft_model(lin, cfg).base_model.model[0]
    t = lambda x: x.detach().numpy().astype(np.float64)  # noqa: E731
    return (t(layer.base_layer.weight).T, t(layer.lora_A["default"].weight).T,
            t(layer.lora_B["default"].weight).T, layer.scaling["default"])


@pytest.mark.peer
@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("shape", [(12, 10), (6, 14)])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_same_subspaces_and_residual_as_peft(init, shape, rslora):
    w = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    rank, alpha = 3, 5.0
    w_res_p, a_p, b_p, s_p = _peft_layer(w, init, rank, alpha, rslora)
    node = LoRA(rank=rank, alpha=alpha, init=init, rslora=rslora).adapt(jax.random.key(0),
                                                                        jnp.asarray(w))
    assert node.scale == pytest.approx(s_p)
    a, b = np.asarray(node.a, np.float64), np.asarray(node.b, np.float64)
    np.testing.assert_allclose(np.asarray(node.w), w_res_p, atol=1e-5)
    np.testing.assert_allclose(node.scale * a @ b, s_p * a_p @ b_p, atol=1e-5)
    np.testing.assert_allclose(_proj(a), _proj(a_p), atol=1e-5)
    np.testing.assert_allclose(_proj(b.T), _proj(b_p.T), atol=1e-5)
    # the same factors up to one sign per rank-one component (PiSSA: singular vector signs;
    # OLoRA: both QRs are Householder, signs agree but are not promised)
    sign = np.sign(np.sum(a * a_p, axis=0))
    np.testing.assert_allclose(a * sign, a_p, atol=1e-5)
    np.testing.assert_allclose(b * sign[:, None], b_p, atol=1e-5)


@pytest.mark.peer
def test_pissa_niter_finds_the_principal_subspace_like_peft():
    """Randomized SVD (q = r, as PEFT): with a clear spectral gap both ours and PEFT's
    ``pissa_niter_2`` recover the exact PiSSA product; reconstruction is exact regardless."""
    rng = np.random.default_rng(3)
    low = rng.standard_normal((40, 3)) @ rng.standard_normal((3, 24)) * 3
    w = (low + 0.01 * rng.standard_normal((40, 24))).astype(np.float32)
    exact = LoRA(rank=3, alpha=3.0, init="pissa").adapt(jax.random.key(0), jnp.asarray(w))
    fast = LoRA(rank=3, alpha=3.0, init="pissa_niter_2").adapt(jax.random.key(0),
                                                                jnp.asarray(w))
    torch.manual_seed(0)
    w_res_p, a_p, b_p, s_p = _peft_layer(w, "pissa_niter_2", 3, 3.0)
    want = np.asarray(exact.a @ exact.b)
    np.testing.assert_allclose(np.asarray(fast.a @ fast.b), want, atol=1e-3)
    np.testing.assert_allclose(a_p @ b_p, want, atol=1e-3)
    np.testing.assert_allclose(np.asarray(fast.materialize()), w, atol=1e-5)
    # a different key gives a (slightly) different residual: the key matters for reloading
    other = LoRA(rank=3, alpha=3.0, init="pissa_niter_0").adapt(jax.random.key(9),
                                                                 jnp.asarray(w))
    assert not np.array_equal(np.asarray(other.w), np.asarray(fast.w))


@pytest.mark.parametrize("init", INITS)
def test_jit_and_grads_reach_only_a_and_b(init):
    params, method, tree = _inject(init, "qkv")
    traced = jax.jit(lambda p, k: inject(p, {r"layer/kernel": method}, key=k))(
        params, jax.random.key(1))
    for x, y in zip(jax.tree.leaves(traced), jax.tree.leaves(tree)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)
    tree = _perturb(tree)
    trainable, frozen = split(tree)
    c = jnp.asarray(np.random.default_rng(3).standard_normal(LAYOUTS["qkv"][0]), jnp.float32)

    def loss(t):
        from effjax.peft import combine
        return jnp.sum(c * materialize(combine(t, frozen))["layer"]["kernel"] ** 2)

    grads = jax.jit(jax.grad(loss))(trainable)
    assert _paths(grads) == {"layer/kernel/a", "layer/kernel/b"}
    node = tree["layer"]["kernel"]

    def ref(a, b):  # W_res + s einsum(a, b), written plainly
        return jnp.sum(c * (node.w + method.scale * jnp.einsum("ir,rhd->ihd", a, b)) ** 2)

    ga, gb = jax.grad(ref, argnums=(0, 1))(node.a, node.b)
    np.testing.assert_allclose(np.asarray(grads["layer"]["kernel"].a), np.asarray(ga),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(grads["layer"]["kernel"].b), np.asarray(gb),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("init", INITS)
def test_save_load_rebuilds_the_residual(init, tmp_path):
    params, method, tree = _inject(init, "stacked")
    tree = _perturb(tree)
    save_adapters(tmp_path / "ad", tree)
    back = load_adapters(tmp_path / "ad", params, key=jax.random.key(1))
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_bfloat16_kernel():
    params, _, tree = _inject("pissa", "2d", dtype=jnp.bfloat16)
    node = tree["layer"]["kernel"]
    assert node.w.dtype == jnp.bfloat16 and node.a.dtype == node.b.dtype == jnp.float32
    got = materialize(tree)["layer"]["kernel"]
    assert got.dtype == jnp.bfloat16
    w0 = np.asarray(params["layer"]["kernel"], np.float32)
    # the residual is rounded to bfloat16 (8 bits): error <= 2^-8 |W_res| + one final rounding
    np.testing.assert_allclose(np.asarray(got, np.float32), w0, rtol=2**-7,
                               atol=2**-8 * float(np.abs(np.asarray(node.w, np.float32)).max()))


def test_bad_configs():
    with pytest.raises(ValueError, match="init"):
        LoRA(init="pissa_niter_x")
    with pytest.raises(ValueError, match="init"):
        LoRA(init="svd")
    with pytest.raises(ValueError, match="alpha must be > 0"):
        LoRA(init="pissa", alpha=0.0)
    with pytest.raises(ValueError, match="rank <= min"):
        LoRA(rank=7, init="olora").adapt(jax.random.key(0), jnp.ones((6, 14)))
    with pytest.raises(ValueError, match="rank <= min"):
        inject({"k": jnp.ones((3, 12, 5))}, {"k": LoRA(rank=6, init="pissa", batch_axes=0)},
               key=jax.random.key(0))
