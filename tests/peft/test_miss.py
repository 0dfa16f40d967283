"""MiSS / Bone: PEFT's forward equations written plainly in numpy (torch layout), the three
variants, init, errors, and a cross-check against Hugging Face PEFT (``MissConfig``) with the same
adapter weights: outputs, merged weights, gradients and parameter counts.

Tolerances (float32): numpy float64 references 1e-5; PEFT outputs 1e-5 and merged weights 1e-6
(the same float32 sums, associated differently), gradients 1e-5 relative to their max abs.
"""

import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

from effjax.peft import combine, inject, materialize, merge, split, summary
from effjax.peft.miss import Bone, MiSS, MiSSWeight
from tests.peft.conformance_case import params_for as _params
from tests.peft.conformance_case import perturb as _perturb


def _node(method, shape):
    tree = _perturb(inject(_params(shape), {"layer/kernel": method}, key=jax.random.key(0)))
    return tree["layer"]["kernel"]


def _f64(x):
    return np.asarray(x, np.float64)


def peft_forward_balance(x, w_torch, d, mini_r=None):
    """PEFT's MissLinear.forward: x W^T + (sum of the r-wide chunks of x, zero-padded) D,
    with D repeated along the output for mini."""
    r = d.shape[0]
    if mini_r is not None:
        d = np.tile(d, (1, w_torch.shape[0] // mini_r))
    pad = (-x.shape[-1]) % r
    xp = np.pad(x, ((0, 0), (0, pad)))
    chunks = xp.reshape(x.shape[0], -1, r).sum(axis=1)
    return x @ w_torch.T + chunks @ d


def peft_bat_weight(w_torch, blocks_torch):
    """PEFT's bat weight in torch layout: per (output block a, input block c),
    W_ac + W_ac @ B_a + B_a."""
    r = blocks_torch.shape[-1]
    out = w_torch.copy()
    for a in range(w_torch.shape[0] // r):
        for c in range(w_torch.shape[1] // r):
            blk = w_torch[a * r:(a + 1) * r, c * r:(c + 1) * r]
            out[a * r:(a + 1) * r, c * r:(c + 1) * r] = blk + blk @ blocks_torch[a] + \
                blocks_torch[a]
    return out


@pytest.mark.parametrize("shape,rank", [((12, 10), 3), ((12, 10), 5), ((7, 4), 7)])
def test_balance_is_peft_forward(shape, rank):
    node = _node(MiSS(rank=rank), shape)
    x = np.random.default_rng(0).standard_normal((5, shape[0]))
    want = peft_forward_balance(x, _f64(node.w).T, _f64(node.block))
    np.testing.assert_allclose(x @ _f64(node.materialize()), want, rtol=1e-5, atol=1e-5)


def test_mini_is_peft_forward():
    node = _node(MiSS(rank=3, variant="mini", mini_rank=5), (12, 10))
    assert node.block.shape == (3, 5)
    x = np.random.default_rng(0).standard_normal((5, 12))
    want = peft_forward_balance(x, _f64(node.w).T, _f64(node.block), mini_r=5)
    np.testing.assert_allclose(x @ _f64(node.materialize()), want, rtol=1e-5, atol=1e-5)
    # mini with m = n_out is the balance variant
    full = _node(MiSS(rank=3, variant="mini", mini_rank=10), (12, 10))
    bal = MiSS(rank=3).adapt(None, full.w).replace(block=full.block)
    np.testing.assert_array_equal(np.asarray(full.materialize()), np.asarray(bal.materialize()))


@pytest.mark.parametrize("shape", [(8, 12), (12, 4)])
def test_bat_is_peft_block_affine(shape):
    node = _node(MiSS(rank=4, variant="bat"), shape)
    assert node.block.shape == (shape[1] // 4, 4, 4)
    blocks_torch = _f64(node.block).transpose(0, 2, 1)  # PEFT's miss_block[a] = b_a^T
    want = peft_bat_weight(_f64(node.w).T, blocks_torch).T
    np.testing.assert_allclose(_f64(node.materialize()), want, rtol=1e-5, atol=1e-5)


def test_bat_stacked_and_multi_axis_match_2d_slices():
    node = _node(MiSS(rank=2, variant="bat", batch_axes=0), (3, 4, 6))
    out = np.asarray(node.materialize())
    for s in range(3):
        single = MiSS(rank=2, variant="bat").adapt(None, node.w[s]).replace(block=node.block[s])
        np.testing.assert_allclose(out[s], np.asarray(single.materialize()), rtol=1e-6)
    node = _node(MiSS(rank=2, variant="bat", in_axes=(0, 1)), (2, 3, 4))  # n_in 6, n_out 4
    flat = MiSS(rank=2, variant="bat").adapt(None, node.w.reshape(6, 4))
    flat = flat.replace(block=node.block)
    np.testing.assert_allclose(np.asarray(node.materialize()).reshape(6, 4),
                               np.asarray(flat.materialize()), rtol=1e-6)


def test_zero_init_identity_counts_and_bone_alias():
    assert Bone is MiSS
    for m, shape, count in ((MiSS(rank=4), (10, 6), 24),
                            (MiSS(rank=4, variant="mini", mini_rank=3), (10, 6), 12),
                            (MiSS(rank=2, variant="bat"), (4, 6), 12),
                            (MiSS(rank=4, batch_axes=0), (3, 10, 6), 72)):
        params = _params(shape)
        tree = inject(params, {"layer/kernel": m}, key=jax.random.key(0))
        node = tree["layer"]["kernel"]
        assert isinstance(node, MiSSWeight)
        assert m.num_trainable(shape) == count == summary(tree).trainable
        np.testing.assert_array_equal(np.asarray(node.block), 0.0)
        np.testing.assert_array_equal(np.asarray(materialize(tree)["layer"]["kernel"]),
                                      np.asarray(params["layer"]["kernel"]))


def test_kaiming_init_bound():
    node = MiSS(rank=64, init="kaiming").adapt(jax.random.key(0), jnp.ones((128, 256)))
    d = np.asarray(node.block)
    bound = 1 / np.sqrt(256)
    assert np.abs(d).max() <= bound and np.abs(d).max() > 0.99 * bound
    assert d.std() == pytest.approx(bound / np.sqrt(3), rel=0.03)
    other = MiSS(rank=64, init="kaiming").adapt(jax.random.key(1), jnp.ones((128, 256)))
    assert not np.array_equal(np.asarray(other.block), d)  # drawn from the leaf's key


def test_bfloat16_kernel_float32_block():
    w = jnp.asarray(np.random.default_rng(0).standard_normal((8, 8)), jnp.bfloat16)
    for variant in ("balance", "bat"):
        node = MiSS(rank=4, variant=variant).adapt(None, w)
        assert node.block.dtype == jnp.float32 and node.materialize().dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(node.materialize(), np.float32),
                                      np.asarray(w, np.float32))


def test_errors():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        MiSS(rank=0)
    with pytest.raises(TypeError, match="rank must be an int"):
        MiSS(rank=2.5)
    with pytest.raises(ValueError, match="variant must be one of"):
        MiSS(variant="bone")
    with pytest.raises(ValueError, match="init must be one of"):
        MiSS(init="gaussian")
    with pytest.raises(ValueError, match="init='kaiming'.*only for variant='balance'"):
        MiSS(init="kaiming", variant="bat")
    with pytest.raises(ValueError, match="mini_rank=4 is only used with variant='mini'"):
        MiSS(mini_rank=4)
    with pytest.raises(ValueError, match=r"rank=8 must be <= n_in = 6"):
        MiSS(rank=8).adapt(None, jnp.ones((6, 10)))
    with pytest.raises(ValueError, match=r"variant='bat' needs n_in = 6 and n_out = 10"):
        MiSS(rank=4, variant="bat").adapt(None, jnp.ones((6, 10)))
    with pytest.raises(ValueError, match=r"variant='bat' needs"):
        MiSS(rank=4, variant="bat").num_trainable((8, 10))
    with pytest.raises(ValueError, match=r"n_out = 10 divisible by mini_rank=4"):
        MiSS(rank=2, variant="mini", mini_rank=4).adapt(None, jnp.ones((6, 10)))
    with pytest.raises(TypeError, match="MiSS needs a floating kernel"):
        MiSS(rank=2).adapt(None, jnp.ones((6, 10), jnp.int32))


# ---- Hugging Face PEFT (torch, CPU) -------------------------------------------------------

def _mlp(d1, d2):
    class MLP(flax_nn.Module):  # torch's Sequential(Linear(d0, d1), ReLU, Linear(d1, d2))
        @flax_nn.compact
        def __call__(self, x):
            return flax_nn.Dense(d2, name="l2")(flax_nn.relu(flax_nn.Dense(d1, name="l0")(x)))
    return MLP()


def _t2n(t):
    return t.detach().cpu().numpy().astype(np.float32)


# (torch init_weights, mini_r, layer sizes, effjax config, trainable count by hand)
PEFT_CASES = {
    "balance_remainder": (True, 1, (6, 16, 5), MiSS(rank=4), 4 * 16 + 4 * 5),
    "mini": ("mini", 4, (6, 16, 8), MiSS(rank=4, variant="mini", mini_rank=4), 2 * 4 * 4),
    "bat": ("bat", 1, (8, 16, 4), MiSS(rank=4, variant="bat"), 4 * 16 + 4 * 4),
    "kaiming": (False, 1, (6, 16, 5), MiSS(rank=4, init="kaiming"), 4 * 16 + 4 * 5),
}


@pytest.mark.peer
@pytest.mark.parametrize("name", list(PEFT_CASES))
def test_outputs_merge_grads_and_counts_match_peft(name):
    init_weights, mini_r, (d0, d1, d2), method, count = PEFT_CASES[name]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(d0, d1), torch.nn.ReLU(),
                                torch.nn.Linear(d1, d2))
    cfg = peft.MissConfig(r=4, mini_r=mini_r, init_weights=init_weights,
                          target_modules=["0", "2"])
    pm = peft.get_peft_model(model, cfg)
    mods = {"l0": pm.base_model.model[0], "l2": pm.base_model.model[2]}
    params = {"params": {n: {"kernel": jnp.asarray(_t2n(m.base_layer.weight).T),
                             "bias": jnp.asarray(_t2n(m.base_layer.bias))}
                         for n, m in mods.items()}}
    tree = inject(params, {r"params/l\d/kernel": method}, key=jax.random.key(0))
    assert summary(tree).trainable == pm.get_nb_trainable_parameters()[0] == count
    bat = method.variant == "bat"
    for n, m in mods.items():  # same shapes; zero inits agree exactly
        node, theirs = tree["params"][n]["kernel"], _t2n(m.miss_block["default"])
        theirs = theirs.transpose(0, 2, 1) if bat else theirs
        assert node.block.shape == theirs.shape
        if method.init == "zeros":
            np.testing.assert_array_equal(np.asarray(node.block), theirs)
        else:  # both U(+-1/sqrt(out))
            bound = 1 / np.sqrt(node.w.shape[1])
            assert np.abs(theirs).max() <= bound and np.abs(np.asarray(node.block)).max() <= bound
    with torch.no_grad():  # "trained" blocks so that the adapter matters
        gen = torch.Generator().manual_seed(1)
        for m in mods.values():
            p = m.miss_block["default"]
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    for n, m in mods.items():
        theirs = _t2n(m.miss_block["default"])
        tree["params"][n]["kernel"] = tree["params"][n]["kernel"].replace(
            block=jnp.asarray(theirs.transpose(0, 2, 1) if bat else theirs))

    x = np.random.default_rng(0).standard_normal((32, d0)).astype(np.float32)
    c = np.random.default_rng(1).standard_normal((32, d2)).astype(np.float32)
    out_t = pm(torch.from_numpy(x))
    (out_t * torch.from_numpy(c)).sum().backward()
    want = _t2n(out_t)
    with pm.disable_adapter(), torch.no_grad():
        base = _t2n(pm(torch.from_numpy(x)))
    assert np.abs(want - base).max() > 1e-1
    mlp = _mlp(d1, d2)
    got = np.asarray(mlp.apply(materialize(tree), jnp.asarray(x)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    train, frozen = split(tree)
    grads = jax.grad(lambda t: jnp.sum(jnp.asarray(c) * mlp.apply(
        materialize(combine(t, frozen)), jnp.asarray(x))))(train)
    for n, m in mods.items():
        theirs = _t2n(m.miss_block["default"].grad)
        theirs = theirs.transpose(0, 2, 1) if bat else theirs
        assert np.abs(theirs).max() > 0
        np.testing.assert_allclose(np.asarray(grads["params"][n]["kernel"].block), theirs,
                                   rtol=1e-5, atol=1e-5 * np.abs(theirs).max())

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
def test_kaiming_init_has_peft_distribution():
    torch.manual_seed(0)
    pm = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(128, 64)),
                             peft.MissConfig(r=64, init_weights=False, target_modules=["0"]))
    theirs = _t2n(pm.base_model.model[0].miss_block["default"])  # (64, 64)
    ours = np.asarray(MiSS(rank=64, init="kaiming").adapt(jax.random.key(0),
                                                          jnp.ones((128, 64))).block)
    assert ours.shape == theirs.shape
    # KS critical value at the 0.1% level: 1.95 * sqrt(2 / n)
    assert _ks_statistic(ours.ravel(), theirs.ravel()) < 1.95 * np.sqrt(2 / ours.size)
