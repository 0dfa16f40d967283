"""RandLoRA: the paper's equation in numpy, init, shared random bases and their laws, errors, and
a cross-check against Hugging Face PEFT (``RandLoraConfig``) with the same weights: outputs,
merged weights and gradients of lambda / gamma.

Tolerances (float32): numpy float64 references 1e-5; PEFT outputs 1e-5, merged weights 1e-6
(both sides associate the same float32 products differently), gradients 1e-5 relative to the
gradient's max abs.
"""

import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

from effjax.peft import combine, inject, materialize, merge, split, summary
from effjax.peft.randlora import RandLoRA, randlora_bases, randlora_num_bases
from tests.peft.conformance_case import params_for as _params
from tests.peft.conformance_case import perturb as _perturb

RULE = r"layer/kernel"


def _node(method, shape, seed=2):
    tree = _perturb(inject(_params(shape), {RULE: method}, key=jax.random.key(0)), seed)
    return tree, tree["layer"]["kernel"]


def _f64(x):
    return np.asarray(x, np.float64)


def paper_delta_torch(node, s):
    """s * sum_n B_n Lambda_n A Gamma_n in numpy, on 2-D (d_max, d_min) matrices: B_n is
    (d_max, r), Lambda_n = diag(lam[:, n]) (r, r), A (r, d_min), Gamma_n = diag(gamma[n])."""
    r, n_bases = node.lam.shape[-2:]
    d_min = node.a.size // r
    a = _f64(node.a).reshape(r, d_min)
    b = _f64(node.b).reshape(-1, n_bases, r)
    lam, gamma = _f64(node.lam), _f64(node.gamma).reshape(n_bases, d_min)
    return s * sum(b[:, n] @ np.diag(lam[:, n]) @ a @ np.diag(gamma[n])
                   for n in range(n_bases))


@pytest.mark.parametrize("shape", [(12, 10), (10, 12), (7, 7), (5, 20)])
def test_materialize_is_the_papers_sum(shape):
    method = RandLoRA(rank=3, alpha=6.0)
    _, node = _node(method, shape)
    n_in, n_out = shape
    d_min = min(shape)
    assert node.lam.shape == (3, -(-d_min // 3)) and node.gamma.shape == (-(-d_min // 3), d_min)
    m = paper_delta_torch(node, method.scale)  # (d_max, d_min)
    # torch's (out, in) update is M when the input is the min side, else M^T; Flax's is its T
    delta_torch = m if n_in <= n_out else m.T
    want = _f64(node.w) + delta_torch.T
    np.testing.assert_allclose(np.asarray(node.materialize()), want, rtol=1e-5, atol=1e-5)
    # the forward h = W0 x + dW x, x in torch's column convention
    x = np.random.default_rng(0).standard_normal((n_in, 4))
    np.testing.assert_allclose(np.asarray(node.materialize()).T @ x,
                               _f64(node.w).T @ x + delta_torch @ x, rtol=1e-5, atol=1e-4)


def test_full_rank_update_from_rank_r_bases():
    """N r >= d_min: with random lambda, gamma the update has full rank (LoRA's would be r)."""
    method = RandLoRA(rank=2, alpha=2.0)
    _, node = _node(method, (9, 12))
    delta = np.asarray(node.materialize(), np.float64) - _f64(node.w)
    assert node.num_bases == 5 and np.linalg.matrix_rank(delta, tol=1e-6) == 9


def test_stacked_slices_are_independent_adapters_on_shared_bases():
    method = RandLoRA(rank=3, alpha=6.0, batch_axes=0)
    _, node = _node(method, (3, 12, 10))
    out = np.asarray(node.materialize())
    for i in range(3):
        single = RandLoRA(rank=3, alpha=6.0).adapt(None, node.w[i])
        single = single.replace(lam=node.lam[i], gamma=node.gamma[i])
        np.testing.assert_array_equal(np.asarray(single.a), np.asarray(node.a))
        np.testing.assert_allclose(out[i], np.asarray(single.materialize()), rtol=1e-6,
                                   atol=1e-6)
    assert not np.allclose(out[0] - np.asarray(node.w[0]), out[1] - np.asarray(node.w[1]))


def test_init_count_and_identity():
    method = RandLoRA(rank=4, alpha=8.0)
    params = _params((6, 16))
    tree = inject(params, {RULE: method}, key=jax.random.key(0))
    node = tree["layer"]["kernel"]
    assert method.num_trainable((6, 16)) == 2 * (4 + 6) == summary(tree).trainable
    np.testing.assert_array_equal(np.asarray(node.lam), 0.0)
    np.testing.assert_array_equal(np.asarray(node.gamma), np.float32(1 / 6))
    np.testing.assert_array_equal(np.asarray(materialize(tree)["layer"]["kernel"]),
                                  np.asarray(params["layer"]["kernel"]))
    assert [randlora_num_bases(r, 10, 12) for r in (1, 3, 5, 10, 32)] == [10, 4, 2, 1, 1]
    # bfloat16 kernels get float32 adapters (PEFT's autocast_adapter_dtype), bf16 output
    w16 = jnp.asarray(params["layer"]["kernel"], jnp.bfloat16)
    node16 = method.adapt(None, w16)
    assert all(x.dtype == jnp.float32 for x in (node16.a, node16.b, node16.lam, node16.gamma))
    assert node16.materialize().dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(node16.materialize(), np.float32),
                                  np.asarray(w16, np.float32))


def test_bases_are_shared_sliced_and_seeded():
    rng = np.random.default_rng(0)
    params = {"big": jnp.asarray(rng.standard_normal((16, 24)), jnp.float32),
              "twin": jnp.asarray(rng.standard_normal((16, 24)), jnp.float32),
              "small": jnp.asarray(rng.standard_normal((9, 6)), jnp.float32)}
    m = RandLoRA(rank=4, seed=3)
    t1 = inject(params, {".*": m}, key=jax.random.key(0))
    t2 = inject(params, {".*": m}, key=jax.random.key(99))  # the key does not matter
    for p in params:
        for f in ("a", "b"):
            np.testing.assert_array_equal(np.asarray(getattr(t1[p], f)),
                                          np.asarray(getattr(t2[p], f)))
    np.testing.assert_array_equal(np.asarray(t1["big"].b), np.asarray(t1["twin"].b))
    # PEFT's slicing: A[:, :d_min], B[:d_max, :N] of the largest bases (small: out is min side)
    assert t1["big"].b.shape == (24, 4, 4) and t1["small"].b.shape == (9, 2, 4)
    np.testing.assert_array_equal(np.asarray(t1["small"].a), np.asarray(t1["big"].a[:, :6]))
    np.testing.assert_array_equal(np.asarray(t1["small"].b), np.asarray(t1["big"].b[:9, :2]))
    other = inject(params, {".*": RandLoRA(rank=4, seed=4)}, key=jax.random.key(0))
    assert not np.array_equal(np.asarray(other["big"].a), np.asarray(t1["big"].a))


def test_basis_distributions():
    a, b = randlora_bases(0, 16, 256, 512, 16)
    for x in (np.asarray(a), np.asarray(b)):  # U(-sqrt 3, sqrt 3): std 1
        assert np.abs(x).max() <= np.sqrt(3) and np.abs(x).max() > 0.99 * np.sqrt(3)
        assert x.std() == pytest.approx(1.0, rel=0.03) and abs(x.mean()) < 0.03
    for s in (3.0, 16.0):
        a, b = randlora_bases(0, 16, 256, 512, 16, sparsity=s)
        x = np.asarray(b, np.float64).ravel()
        np.testing.assert_allclose(np.unique(x), [-np.sqrt(s), 0.0, np.sqrt(s)], rtol=1e-6)
        p = 1 / (2 * s)  # P(+1) = P(-1); 4-sigma binomial bounds
        for v in (np.sqrt(s), -np.sqrt(s)):
            frac = np.mean(np.isclose(x, v))
            assert abs(frac - p) < 4 * np.sqrt(p * (1 - p) / x.size)
        assert x.std() == pytest.approx(1.0, rel=0.03)
    # very_sparse uses sqrt(very_sparse_dim), or the leaf's d_min
    node = RandLoRA(rank=2, very_sparse=True, very_sparse_dim=81).adapt(None, jnp.ones((8, 9)))
    assert np.isclose(np.abs(np.asarray(node.b)).max(), 3.0)  # sqrt(sqrt(81))
    node = RandLoRA(rank=2, very_sparse=True).adapt(None, jnp.ones((16, 20)))
    assert np.isclose(np.abs(np.asarray(node.b)).max(), 2.0)  # sqrt(sqrt(16))


def test_errors():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        RandLoRA(rank=0)
    with pytest.raises(TypeError, match="rank must be an int"):
        RandLoRA(rank=2.0)
    with pytest.raises(ValueError, match="alpha must be finite"):
        RandLoRA(alpha=float("inf"))
    with pytest.raises(ValueError, match="seed must be < 2"):
        RandLoRA(seed=2**32)
    with pytest.raises(ValueError, match="exclusive"):
        RandLoRA(sparse=True, very_sparse=True)
    with pytest.raises(TypeError, match="sparse must be a bool"):
        RandLoRA(sparse=1)
    with pytest.raises(ValueError, match="very_sparse_dim is only used"):
        RandLoRA(very_sparse_dim=8)
    with pytest.raises(ValueError, match="very_sparse_dim=4 is smaller"):
        inject({"k": jnp.ones((8, 6))}, {"k": RandLoRA(rank=2, very_sparse=True,
                                                        very_sparse_dim=4)},
               key=jax.random.key(0))
    with pytest.raises(TypeError, match="RandLoRA needs a floating kernel"):
        RandLoRA(rank=2).adapt(None, jnp.ones((4, 3), jnp.int32))
    with pytest.raises(TypeError, match="RandLoRA dtype must be a floating"):
        RandLoRA(dtype=jnp.int8)


# ---- Hugging Face PEFT (torch, CPU) -------------------------------------------------------

class _MLP(flax_nn.Module):  # torch's Sequential(Linear(6, 16), ReLU, Linear(16, 5))
    @flax_nn.compact
    def __call__(self, x):
        return flax_nn.Dense(5, name="l2")(flax_nn.relu(flax_nn.Dense(16, name="l0")(x)))


def _t2n(t):
    return t.detach().cpu().numpy().astype(np.float32)


def _peft_bases(m, d_min, d_max, n_bases, r):
    """PEFT's sliced bases in effjax's layout: a (r, d_min); b[p, n, k] = PEFT's flattened
    B[:d_max, :N].flatten(1)[p, k * N + n] (the column PEFT pairs with lambda[k, n])."""
    a = _t2n(m.randlora_A["default"])[:, 0, :d_min]
    flat = _t2n(m.randlora_B["default"])[:d_max, :n_bases, :].reshape(d_max, n_bases * r)
    b = flat.reshape(d_max, r, n_bases).transpose(0, 2, 1)
    return a, b


@pytest.mark.peer
@pytest.mark.parametrize("sparse", [False, True])
def test_outputs_merge_grads_and_counts_match_peft(sparse):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    cfg = peft.RandLoraConfig(r=4, randlora_alpha=8, target_modules=["0", "2"],
                              projection_prng_key=0, sparse=sparse)
    pm = peft.get_peft_model(model, cfg)
    mods = {"l0": pm.base_model.model[0], "l2": pm.base_model.model[2]}
    params = {"params": {n: {"kernel": jnp.asarray(_t2n(m.base_layer.weight).T),
                             "bias": jnp.asarray(_t2n(m.base_layer.bias))}
                         for n, m in mods.items()}}
    method = RandLoRA(rank=4, alpha=8.0, sparse=sparse)
    tree = inject(params, {r"params/l\d/kernel": method}, key=jax.random.key(0))
    trainable, total = pm.get_nb_trainable_parameters()
    # l0: d_min 6, N 2: 2 (4 + 6); l2: d_min 5, N 2: 2 (4 + 5)
    assert summary(tree).trainable == trainable == 2 * (4 + 6) + 2 * (4 + 5)
    for n, m in mods.items():  # PEFT's init equals ours: lambda = 0, gamma = 1 / d_min
        node = tree["params"][n]["kernel"]
        assert method.scale == m.scaling["default"] and node.num_bases == m.num_bases
        np.testing.assert_array_equal(np.asarray(node.lam), _t2n(m.randlora_lambda["default"]))
        np.testing.assert_allclose(np.asarray(node.gamma), _t2n(m.randlora_gamma["default"]),
                                   rtol=1e-7)
    with torch.no_grad():  # "trained" diagonals so that the adapter matters
        gen = torch.Generator().manual_seed(1)
        for m in mods.values():
            for p in (m.randlora_lambda["default"], m.randlora_gamma["default"]):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    for n, m in mods.items():
        node = tree["params"][n]["kernel"]
        n_in, n_out = node.w.shape
        a, b = _peft_bases(m, min(n_in, n_out), max(n_in, n_out), node.num_bases, 4)
        assert a.shape == node.a.shape and b.shape == node.b.shape
        tree["params"][n]["kernel"] = node.replace(
            a=jnp.asarray(a), b=jnp.asarray(b),
            lam=jnp.asarray(_t2n(m.randlora_lambda["default"])),
            gamma=jnp.asarray(_t2n(m.randlora_gamma["default"])))

    x = np.random.default_rng(0).standard_normal((32, 6)).astype(np.float32)
    c = np.random.default_rng(1).standard_normal((32, 5)).astype(np.float32)
    out_t = pm(torch.from_numpy(x))
    (out_t * torch.from_numpy(c)).sum().backward()
    want = _t2n(out_t)
    with pm.disable_adapter(), torch.no_grad():
        base = _t2n(pm(torch.from_numpy(x)))
    assert np.abs(want - base).max() > 1e-1
    got = np.asarray(_MLP().apply(materialize(tree), jnp.asarray(x)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    train, frozen = split(tree)
    grads = jax.grad(lambda t: jnp.sum(jnp.asarray(c) * _MLP().apply(
        materialize(combine(t, frozen)), jnp.asarray(x))))(train)
    for n, m in mods.items():
        g = grads["params"][n]["kernel"]
        for ours, theirs in ((g.lam, m.randlora_lambda["default"].grad),
                             (g.gamma, m.randlora_gamma["default"].grad)):
            theirs = _t2n(theirs)
            assert np.abs(theirs).max() > 0
            np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-5,
                                       atol=1e-5 * np.abs(theirs).max())

    merged = merge(tree)
    unloaded = pm.merge_and_unload()
    for n, idx in (("l0", 0), ("l2", 2)):
        np.testing.assert_allclose(np.asarray(merged["params"][n]["kernel"]),
                                   _t2n(unloaded[idx].weight).T, rtol=1e-6, atol=1e-6)


def _ks_statistic(x, y):
    x, y = np.sort(x), np.sort(y)
    grid = np.concatenate([x, y])
    return np.abs(np.searchsorted(x, grid, side="right") / x.size
                  - np.searchsorted(y, grid, side="right") / y.size).max()


@pytest.mark.peer
def test_bases_have_peft_distribution():
    torch.manual_seed(0)
    pm = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(256, 64)),
                             peft.RandLoraConfig(r=16, target_modules=["0"]))
    a_peft = _t2n(pm.base_model.model[0].randlora_A["default"])  # (16, 1, 64)
    b_peft = _t2n(pm.base_model.model[0].randlora_B["default"])  # (256, 4, 16)
    a, b = randlora_bases(0, 16, 64, 256, 4)
    assert a.shape == a_peft[:, 0].shape and b.shape == b_peft.shape
    # KS critical value at the 0.1% level: 1.95 * sqrt(2 / n)
    assert _ks_statistic(np.asarray(a).ravel(), a_peft.ravel()) < 1.95 * np.sqrt(2 / a.size)
    assert _ks_statistic(np.asarray(b).ravel(), b_peft.ravel()) < 1.95 * np.sqrt(2 / b.size)
    for very in (False, True):  # ternary: value +-c, 0 with the same frequencies
        pm = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(256, 64)),
                                 peft.RandLoraConfig(r=16, target_modules=["0"],
                                                     sparse=not very, very_sparse=very))
        b_peft = _t2n(pm.base_model.model[0].randlora_B["default"]).ravel()
        node = RandLoRA(rank=16, sparse=not very, very_sparse=very).adapt(
            None, jnp.ones((256, 64)))
        b = np.asarray(node.b).ravel()
        s = 3.0 if not very else 8.0  # sqrt(min(64, 256))
        p = 1 / (2 * s)
        tol = 4 * np.sqrt(p * (1 - p) / b.size)
        for x in (b, b_peft):
            assert abs(np.mean(x > 0) - p) < tol and abs(np.mean(x < 0) - p) < tol
        # PEFT divides by the empirical std, effjax by the population std sqrt(1 / s)
        assert np.abs(b).max() == pytest.approx(np.abs(b_peft).max(), rel=0.03)
