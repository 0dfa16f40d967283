"""VeRA beyond the shared conformance table (``tests/peft/cases_vera.py``): the init of the
vectors, the paper's forward written in its own (torch) layout, shared / sliced / seeded random
matrices (and checkpoints that rebuild them whatever the key), field shardings, errors, and a
cross-check against Hugging Face PEFT (``VeraConfig``) with the same weights.

Tolerances (float32): numpy float64 references 1e-5; PEFT outputs 1e-5 and merged weights 1e-6
(the two sides associate the sums differently).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from effjax.peft import inject, load_adapters, materialize, merge, save_adapters, summary
from effjax.peft.vera import VeRA, vera_projections
from tests.peft.cases_vera import CASES as TABLE
from tests.peft.conformance_case import params_for as _params
from tests.peft.conformance_case import perturb as _perturb


def _inject(name, dtype=jnp.float32, key=1):
    case = TABLE[name]
    params = _params(case.shape, dtype)
    return params, inject(params, {r"layer/kernel": case.method}, key=jax.random.key(key))


def numpy_kernel(node):
    """W + (A diag(d) B) diag(b) in float64 numpy, for a 2-D kernel."""
    f = lambda x: np.asarray(x, np.float64)
    return f(node.w) + (f(node.a) * f(node.lambda_d)) @ f(node.b) * f(node.lambda_b)


@pytest.mark.parametrize("name", ["vera_2d_max_in", "vera_stacked"])
def test_vectors_start_at_d_initial_and_zero(name):
    node = _inject(name)[1]["layer"]["kernel"]
    np.testing.assert_array_equal(np.asarray(node.lambda_b), 0.0)
    d_initial = np.float32(TABLE[name].method.d_initial)
    np.testing.assert_array_equal(np.asarray(node.lambda_d), d_initial)


def test_forward_is_the_papers_equation():
    """h = W0 x + Lambda_b B Lambda_d A x (paper, torch layout), written plainly in numpy."""
    _, tree = _inject("vera_2d_max_in")
    tree = _perturb(tree)
    node = tree["layer"]["kernel"]
    f = lambda x: np.asarray(x, np.float64)
    w0, a_t, b_t = f(node.w).T, f(node.a).T, f(node.b).T  # (out, in), (r, in), (out, r)
    lam_d, lam_b = np.diag(f(node.lambda_d)), np.diag(f(node.lambda_b))
    x = np.random.default_rng(0).standard_normal((7, 12))
    want = np.stack([w0 @ xi + lam_b @ b_t @ lam_d @ a_t @ xi for xi in x])
    got = np.asarray(x.astype(np.float32) @ materialize(tree)["layer"]["kernel"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["vera_2d_max_in", "vera_out"])
def test_load_rebuilds_the_frozen_matrices_whatever_the_key(name, tmp_path):
    params, tree = _inject(name)
    tree = _perturb(tree)
    save_adapters(tmp_path / "ad", tree)
    for key in (None, jax.random.key(123)):  # the matrices come from the config's seed
        back = load_adapters(tmp_path / "ad", params, key=key)
        for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):  # incl. frozen a, b
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_matrices_are_shared_sliced_and_seeded():
    rng = np.random.default_rng(0)
    params = {"q": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32),
              "v": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32),
              "small": jnp.asarray(rng.standard_normal((6, 5)), jnp.float32)}
    m = VeRA(rank=4, seed=3, max_in=16)
    t1 = inject(params, {".*": m}, key=jax.random.key(0))
    t2 = inject(params, {".*": m}, key=jax.random.key(99))  # the key does not matter
    for p in params:
        for f in ("a", "b"):
            np.testing.assert_array_equal(np.asarray(getattr(t1[p], f)),
                                          np.asarray(getattr(t2[p], f)))
    np.testing.assert_array_equal(np.asarray(t1["q"].a), np.asarray(t1["v"].a))
    np.testing.assert_array_equal(np.asarray(t1["q"].b), np.asarray(t1["v"].b))
    # PEFT's slicing of the largest matrices: the smaller leaf gets the leading blocks
    np.testing.assert_array_equal(np.asarray(t1["small"].a), np.asarray(t1["q"].a[:6]))
    np.testing.assert_array_equal(np.asarray(t1["small"].b), np.asarray(t1["q"].b[:, :5]))
    other = inject(params, {".*": VeRA(rank=4, seed=4, max_in=16)}, key=jax.random.key(0))
    assert not np.array_equal(np.asarray(other["q"].a), np.asarray(t1["q"].a))
    assert not np.array_equal(np.asarray(other["q"].b), np.asarray(t1["q"].b))
    # kaiming-uniform bounds: sqrt(6 / max_in) for A, sqrt(6 / r) for B
    a, b = vera_projections(3, 16, 64, 256, fan_in=64)
    assert float(jnp.abs(a).max()) <= np.sqrt(6 / 64) and float(jnp.abs(b).max()) <= np.sqrt(
        6 / 16)
    assert float(jnp.abs(a).max()) > 0.95 * np.sqrt(6 / 64)
    assert np.std(np.asarray(a)) == pytest.approx(np.sqrt(6 / 64) / np.sqrt(3), rel=0.05)
    assert np.std(np.asarray(b)) == pytest.approx(np.sqrt(6 / 16) / np.sqrt(3), rel=0.05)


def test_errors():
    with pytest.raises(ValueError, match="max_in"):
        inject({"k": jnp.ones((8, 4))}, {"k": VeRA(rank=2, max_in=4)}, key=jax.random.key(0))
    with pytest.raises(ValueError, match="rank"):
        VeRA(rank=0)
    with pytest.raises(TypeError, match="seed"):
        VeRA(seed=1.5)
    with pytest.raises(ValueError, match="VeRA seed must be < 2\\*\\*32"):
        VeRA(seed=2**32)
    with pytest.raises(ValueError, match="d_initial"):
        VeRA(d_initial=float("nan"))


def test_sharded_kernel_keeps_sharding_under_jit():
    assert jax.device_count() >= 8, "tests/conftest.py sets 8 CPU devices"
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("x", "y"))
    w = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal((16, 8)),
                                   jnp.float32), NamedSharding(mesh, PartitionSpec("x", "y")))
    node = VeRA(rank=4).adapt(jax.random.key(0), w)
    assert node.a.sharding == NamedSharding(mesh, PartitionSpec("x", None))
    assert node.b.sharding == NamedSharding(mesh, PartitionSpec(None, "y"))
    assert node.lambda_b.sharding == NamedSharding(mesh, PartitionSpec("y"))
    lb = jax.device_put(jnp.arange(8.0), node.lambda_b.sharding)
    node = node.replace(lambda_b=lb)
    out = jax.jit(lambda n: n.materialize())(node)
    assert out.sharding.is_equivalent_to(w.sharding, 2)
    np.testing.assert_allclose(np.asarray(out), numpy_kernel(node), rtol=1e-5, atol=1e-5)


# ---- Hugging Face PEFT (torch, CPU) -------------------------------------------------------

def _t2n(t):
    return t.detach().cpu().numpy().astype(np.float32)


@pytest.mark.peer
def test_outputs_merge_and_counts_match_peft_with_the_same_weights():
    import flax.linen as flax_nn
    import peft
    import torch

    class MLP(flax_nn.Module):  # torch's Sequential(Linear(6, 16), ReLU, Linear(16, 5))
        @flax_nn.compact
        def __call__(self, x):
            return flax_nn.Dense(5, name="l2")(flax_nn.relu(flax_nn.Dense(16, name="l0")(x)))

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    pm = peft.get_peft_model(model, peft.VeraConfig(r=4, target_modules=["0", "2"],
                                                    projection_prng_key=0, d_initial=0.1))
    mods = {"l0": pm.base_model.model[0], "l2": pm.base_model.model[2]}
    vera_a = _t2n(mods["l0"].vera_A["default"])  # (r, max_in) = (4, 16), shared
    vera_b = _t2n(mods["l0"].vera_B["default"])  # (max_out, r) = (16, 4), shared
    assert vera_a.shape == (4, 16) and vera_b.shape == (16, 4)
    # PEFT's init equals ours: b = 0, d = d_initial; A, B within the kaiming bounds
    for m in mods.values():
        np.testing.assert_array_equal(_t2n(m.vera_lambda_b["default"]), 0.0)
        np.testing.assert_allclose(_t2n(m.vera_lambda_d["default"]), 0.1)
    assert np.abs(vera_a).max() <= np.sqrt(6 / 16) and np.abs(vera_b).max() <= np.sqrt(6 / 4)
    with torch.no_grad():  # "trained" vectors so that the adapter matters
        gen = torch.Generator().manual_seed(1)
        for m in mods.values():
            for p in (m.vera_lambda_b["default"], m.vera_lambda_d["default"]):
                p.copy_(torch.randn(p.shape, generator=gen))

    params = {"params": {n: {"kernel": jnp.asarray(_t2n(m.base_layer.weight).T),
                             "bias": jnp.asarray(_t2n(m.base_layer.bias))}
                         for n, m in mods.items()}}
    method = VeRA(rank=4, seed=0, d_initial=0.1, max_in=16)
    tree = inject(params, {r"params/l\d/kernel": method}, key=jax.random.key(0))
    trainable, total = pm.get_nb_trainable_parameters()
    assert summary(tree).trainable == trainable == (4 + 16) + (4 + 5)
    # PEFT counts parameters only; the frozen vera_A/B are buffers there, node fields here
    frozen_ab = sum(n.a.size + n.b.size for n in (tree["params"]["l0"]["kernel"],
                                                   tree["params"]["l2"]["kernel"]))
    assert summary(tree).total == total + frozen_ab
    for n, m in mods.items():  # PEFT's shared matrices, sliced as PEFT slices them
        node = tree["params"][n]["kernel"]
        n_in, n_out = node.w.shape
        tree["params"][n]["kernel"] = node.replace(
            a=jnp.asarray(vera_a[:, :n_in].T), b=jnp.asarray(vera_b[:n_out].T),
            lambda_d=jnp.asarray(_t2n(m.vera_lambda_d["default"])),
            lambda_b=jnp.asarray(_t2n(m.vera_lambda_b["default"])))

    x = np.random.default_rng(0).standard_normal((32, 6)).astype(np.float32)
    with torch.no_grad():
        want = _t2n(pm(torch.from_numpy(x)))
    with pm.disable_adapter(), torch.no_grad():
        base = _t2n(pm(torch.from_numpy(x)))
    assert np.abs(want - base).max() > 1e-2
    got = np.asarray(MLP().apply(materialize(tree), jnp.asarray(x)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

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
def test_random_matrices_have_peft_distribution():
    """Two targeted layers (in 256 and 64): max_in=256 gives PEFT's law for A and B."""
    import peft
    import torch
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.Linear(64, 32))
    pm = peft.get_peft_model(model, peft.VeraConfig(r=16, target_modules=["0", "1"]))
    a_peft = _t2n(pm.base_model.model[0].vera_A["default"])  # (16, 256)
    b_peft = _t2n(pm.base_model.model[0].vera_B["default"])  # (64, 16)
    a, b = vera_projections(0, 16, 256, 64, fan_in=256)
    assert a.shape == a_peft.T.shape and b.shape == b_peft.T.shape
    # KS critical value at the 0.1% level: 1.95 * sqrt(2 / n)
    assert _ks_statistic(np.asarray(a).ravel(), a_peft.ravel()) < 1.95 * np.sqrt(2 / 4096)
    assert _ks_statistic(np.asarray(b).ravel(), b_peft.ravel()) < 1.95 * np.sqrt(2 / 1024)
