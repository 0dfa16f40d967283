"""CorDA (IPA / KPA): agreement with Hugging Face PEFT's ``preprocess_corda`` + ``corda_init``
on the same torch MLP and calibration batch, reconstruction, stacked kernels and errors.

Tolerances (float32, XLA vs LAPACK SVD / inverse of the same matrices): residual weights and
adapter products s A B 2e-5 absolute (values ~0.3; measured <= 4.6e-6), factors (after PEFT's
per-call max scaling kappa, see the corda module docs) 1e-4 relative to their max (per-column
signs are free in an SVD); outputs with PEFT's weights copied in 1e-5.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.corda import preprocess_corda

from effjax.peft import (
    InputStats,
    LoRAWeight,
    adapter_paths,
    calibrate,
    inject,
    input_stats,
    is_adapter,
    materialize,
)
from effjax.peft.corda import CorDA, corda_decompose
from effjax.selection import path_str

LAYERS = (0, 2, 4)


class MLP(nnx.Module):
    def __init__(self):
        r = nnx.Rngs(0)
        self.l0 = nnx.Linear(12, 16, rngs=r)
        self.l2 = nnx.Linear(16, 10, rngs=r)
        self.l4 = nnx.Linear(10, 6, rngs=r)

    def __call__(self, x):
        return self.l4(jnp.tanh(self.l2(jnp.tanh(self.l0(x)))))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    tm = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10),
                             torch.nn.Tanh(), torch.nn.Linear(10, 6))
    m = MLP()
    for i in LAYERS:
        getattr(m, f"l{i}").kernel[...] = jnp.asarray(tm[i].weight.detach().numpy().T)
        getattr(m, f"l{i}").bias[...] = jnp.asarray(tm[i].bias.detach().numpy())
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((128, 12)) * np.linspace(2, 0.2, 12) + 0.3).astype(np.float32)
    stats = calibrate(m, [jnp.asarray(x)])
    peft_models = {}
    for mode, method in (("ipa", "ipm"), ("kpa", "kpm")):
        t = copy.deepcopy(tm)
        cfg = LoraConfig(r=3, lora_alpha=6, target_modules=["0", "2", "4"],
                         init_lora_weights="corda", corda_config=CordaConfig(corda_method=method))
        seen = {}  # the inputs PEFT's hook sees, for its per-call max scaling
        hooks = [t[i].register_forward_hook(
            lambda mod, inp, out, i=i, seen=seen: seen.__setitem__(i, inp[0].detach().numpy()))
            for i in LAYERS]
        preprocess_corda(t, cfg, run_model=lambda t=t: t(torch.tensor(x)))
        for h in hooks:
            h.remove()
        peft_models[mode] = (get_peft_model(t, cfg), seen)
    return m, x, stats, peft_models


def _inject(m, stats, mode):
    graphdef, state = nnx.split(m)
    tree = inject(state, {r"l\d/kernel": CorDA(rank=3, alpha=6.0, mode=mode)},
                  key=jax.random.key(0), calibration=stats)
    return graphdef, state, tree


@pytest.mark.parametrize("mode", ["ipa", "kpa"])
def test_same_residual_product_and_factors_as_peft(setup, mode):
    m, x, stats, peft_models = setup
    pm, seen = peft_models[mode]
    _, state, tree = _inject(m, stats, mode)
    nodes = adapter_paths(tree)
    for i in LAYERS:
        mod = pm.base_model.model[i]
        a_p = mod.lora_A["default"].weight.detach().numpy()  # (r, in)
        b_p = mod.lora_B["default"].weight.detach().numpy()  # (out, r)
        w_p = mod.base_layer.weight.detach().numpy()  # residual (out, in)
        node = nodes[f"l{i}/kernel"]
        s = mod.scaling["default"]
        assert isinstance(node, LoRAWeight) and node.scale == s == 2.0
        np.testing.assert_allclose(np.asarray(node.w).T, w_p, rtol=0, atol=2e-5)
        np.testing.assert_allclose(s * np.asarray(node.a @ node.b).T, s * b_p @ a_p, rtol=0,
                                   atol=2e-5)
        # factors: PEFT's covariance is X^T X / max(X)^2, ours X^T X / n -> kappa = max^2 / n
        kappa = float(np.abs(seen[i].max())) ** 2 / seen[i].shape[0]
        a_o, b_o = np.asarray(node.a), np.asarray(node.b)
        sign = np.sign(np.sum(a_o * a_p.T, axis=0))
        np.testing.assert_allclose(a_o * sign, a_p.T / np.sqrt(kappa), rtol=0,
                                   atol=1e-4 * np.abs(a_o).max())
        np.testing.assert_allclose(b_o * sign[:, None], b_p.T * np.sqrt(kappa), rtol=0,
                                   atol=1e-4 * np.abs(b_o).max())
        # the residual is a genuine split of W
        assert np.abs(np.asarray(node.w) - np.asarray(state[f"l{i}"]["kernel"][...])).max() > 1e-2


def test_ipa_and_kpa_take_opposite_ends_of_the_spectrum(setup):
    m, _, stats, _ = setup
    w = np.asarray(m.l2.kernel[...])
    st = stats["l2/kernel"]
    u, sv, v, delta = corda_decompose(jnp.asarray(w), st.second_moment())
    assert float(delta) == pytest.approx(0.01)  # well conditioned: no doubling
    sv = np.asarray(sv)
    assert np.all(np.diff(sv) <= 0)
    for mode, idx in (("ipa", slice(0, 3)), ("kpa", slice(7, 10))):
        node = CorDA(rank=3, alpha=6.0, mode=mode).adapt(None, jnp.asarray(w), data=st)
        want = (np.asarray(u)[:, idx] * sv[idx]) @ np.asarray(v)[:, idx].T  # U_r S_r V_r^T
        np.testing.assert_allclose(2.0 * np.asarray(node.a @ node.b).T, want, atol=2e-5)
    # the plain equations: C~ = C + 0.01 mean(diag C) I, W_t C~ = U S V^_T, V = C~^-1 V^
    c = np.asarray(st.gram, np.float64) / float(st.count)
    ct = c + 0.01 * np.mean(np.diag(c)) * np.eye(16)
    uu, ss, vh = np.linalg.svd(w.T.astype(np.float64) @ ct, full_matrices=False)
    np.testing.assert_allclose(sv, ss, rtol=1e-5)
    vv = (vh @ np.linalg.inv(ct)).T
    np.testing.assert_allclose(np.abs(np.asarray(v)), np.abs(vv), rtol=0,
                               atol=1e-4 * np.abs(vv).max())


@pytest.mark.parametrize("mode", ["ipa", "kpa"])
def test_outputs_agree_with_peft_weights_copied_in(setup, mode):
    m, x, stats, peft_models = setup
    pm, _ = peft_models[mode]
    graphdef, state, tree = _inject(m, stats, mode)
    base = np.asarray(m(jnp.asarray(x)))
    ours = np.asarray(nnx.merge(graphdef, materialize(tree))(jnp.asarray(x)))
    np.testing.assert_allclose(ours, base, rtol=0, atol=1e-5)  # identity to float rounding
    g = torch.Generator().manual_seed(1)
    nodes, new = adapter_paths(tree), {}
    for i in LAYERS:
        mod = pm.base_model.model[i]
        with torch.no_grad():
            mod.lora_B["default"].weight.add_(
                0.3 * torch.randn(mod.lora_B["default"].weight.shape, generator=g))
        new[f"l{i}/kernel"] = nodes[f"l{i}/kernel"].replace(
            w=jnp.asarray(mod.base_layer.weight.detach().numpy().T),
            a=jnp.asarray(mod.lora_A["default"].weight.detach().numpy().T),
            b=jnp.asarray(mod.lora_B["default"].weight.detach().numpy().T))
    tree = jax.tree_util.tree_map_with_path(
        lambda kp, v: new.get(path_str(kp), v) if is_adapter(v) else v, tree,
        is_leaf=is_adapter)
    want = pm(torch.tensor(x)).detach().numpy()
    got = np.asarray(nnx.merge(graphdef, materialize(tree))(jnp.asarray(x)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(got - base).max() > 0.05


def _stats(n_in, seed, n=48):
    x = np.random.default_rng(seed).standard_normal((n, n_in)) * np.linspace(1.5, 0.3, n_in)
    return input_stats(jnp.asarray(x, jnp.float32))


def test_stacked_kernel_per_slice_and_shared_statistics():
    w = jnp.asarray(np.random.default_rng(0).standard_normal((3, 8, 5)), jnp.float32)
    per = [_stats(8, s) for s in range(3)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *per)
    method = CorDA(rank=2, alpha=2.0, batch_axes=0, mode="kpa")
    node = method.adapt(None, w, data=stacked)
    assert node.a.shape == (3, 8, 2) and node.b.shape == (3, 2, 5)
    for i in range(3):
        one = CorDA(rank=2, alpha=2.0, mode="kpa").adapt(None, w[i], data=per[i])
        np.testing.assert_allclose(np.asarray(node.w[i]), np.asarray(one.w), atol=1e-5)
        np.testing.assert_allclose(np.asarray(node.a[i] @ node.b[i]),
                                   np.asarray(one.a @ one.b), atol=1e-5)
    shared = method.adapt(None, w, data=per[1])
    one = CorDA(rank=2, alpha=2.0, mode="kpa").adapt(None, w[0], data=per[1])
    np.testing.assert_allclose(np.asarray(shared.a[0] @ shared.b[0]), np.asarray(one.a @ one.b),
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(node.materialize()), np.asarray(w), atol=1e-5)


def test_multi_axis_out_projection():
    w = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4, 6)), jnp.float32)
    st = _stats(8, 3)
    node = CorDA(rank=3, alpha=3.0, in_axes=(0, 1)).adapt(None, w, data=st)
    flat = CorDA(rank=3, alpha=3.0).adapt(None, w.reshape(8, 6), data=st)
    assert node.a.shape == (2, 4, 3) and node.b.shape == (3, 6)
    np.testing.assert_allclose(np.asarray(node.w).reshape(8, 6), np.asarray(flat.w), atol=1e-6)
    np.testing.assert_allclose(np.asarray(node.materialize()), np.asarray(w), atol=1e-5)


def test_errors():
    w = jnp.ones((4, 3))
    st = _stats(4, 0)
    with pytest.raises(ValueError, match="mode must be 'ipa' or 'kpa'"):
        CorDA(mode="xyz")
    assert CorDA(mode="kpm").mode == "kpa"
    with pytest.raises(ValueError, match="alpha must be finite and > 0"):
        CorDA(alpha=0.0)
    with pytest.raises(ValueError, match=r"rank=4 exceeds min\(n_in, n_out\) = 3"):
        CorDA(rank=4).adapt(None, w, data=st)
    with pytest.raises(ValueError, match=r"n_in=4 .*gram \(5, 5\)"):
        CorDA(rank=1).adapt(None, w, data=_stats(5, 0))
    with pytest.raises(TypeError, match="needs InputStats"):
        CorDA(rank=1).adapt(None, w, data=np.eye(4))
    zero = InputStats(jnp.zeros((4, 4)), jnp.zeros(4), jnp.asarray(3.0))
    with pytest.raises(ValueError, match="covariance is zero"):
        CorDA(rank=1).adapt(None, w, data=zero)
    with pytest.raises(ValueError, match="no tokens"):
        CorDA(rank=1).adapt(None, w, data=zero._replace(count=jnp.asarray(0.0)))
    with pytest.raises(ValueError, match=r"layer/kernel.*calibration data"):
        inject({"layer": {"kernel": w}}, {"layer/kernel": CorDA(rank=1)}, key=jax.random.key(0))
