"""EVA: principal components from calibration statistics, rank redistribution, and agreement
with Hugging Face PEFT's ``initialize_lora_eva_weights`` on the same torch MLP and batch.

Tolerances (float32): components vs numpy's float64 SVD of the centered activations 1e-4
(eigh of a float32 Gram matrix: errors ~ eps * lambda_max / eigengap); vs PEFT's lora_A 1e-4
(measured 3.5e-5 at worst, on the 5th component of the last layer: its eigengap is small; PEFT
uses a randomized incremental PCA, which is exact here since 2 * n_components >= n_in);
outputs with PEFT's adapter weights copied in 1e-5.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.config import EvaConfig
from peft.tuners.lora.eva import initialize_lora_eva_weights

from effjax.peft import (
    LoRA,
    LoRAWeight,
    adapter_paths,
    calibrate,
    inject,
    input_stats,
    is_adapter,
    materialize,
)
from effjax.peft.eva import EVA, eva_components, eva_rules
from effjax.selection import path_str

PATHS = ["l0/kernel", "l2/kernel", "l4/kernel"]


class MLP(nnx.Module):
    def __init__(self):
        r = nnx.Rngs(0)
        self.l0 = nnx.Linear(12, 16, rngs=r)
        self.l2 = nnx.Linear(16, 10, rngs=r)
        self.l4 = nnx.Linear(10, 6, rngs=r)

    def __call__(self, x):
        return self.l4(jnp.tanh(self.l2(jnp.tanh(self.l0(x)))))


def _torch_and_jax():
    torch.manual_seed(0)
    tm = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10),
                             torch.nn.Tanh(), torch.nn.Linear(10, 6))
    with torch.no_grad():  # make the layers' spectra differ so that ranks move
        tm[0].weight.mul_(3.0)
        tm[2].weight.mul_(0.5)
    m = MLP()
    for i in (0, 2, 4):
        getattr(m, f"l{i}").kernel[...] = jnp.asarray(tm[i].weight.detach().numpy().T)
        getattr(m, f"l{i}").bias[...] = jnp.asarray(tm[i].bias.detach().numpy())
    rng = np.random.default_rng(0)
    z = rng.standard_normal((256, 12)) * 0.35 ** np.arange(12)
    x = z @ np.linalg.qr(rng.standard_normal((12, 12)))[0] + 0.3
    return tm, m, x.astype(np.float32)


def _peft_eva(tm, x, whiten=False):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2", "4"], init_lora_weights="eva",
                     eva_config=EvaConfig(rho=2.0, whiten=whiten))
    pm = get_peft_model(tm, cfg)
    initialize_lora_eva_weights(pm, dataloader=[torch.tensor(x)], forward_fn=lambda m, b: m(b),
                                prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None,
                                show_progress_bar=False)
    return pm


def _replace_nodes(tree, new):
    """``tree`` with the adapter nodes at the paths of ``new`` replaced."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: new.get(path_str(kp), x) if is_adapter(x) else x, tree,
        is_leaf=is_adapter)


@pytest.fixture(scope="module")
def setup():
    tm, m, x = _torch_and_jax()
    stats = calibrate(m, [jnp.asarray(x)])
    pm = _peft_eva(tm, x)
    return pm, m, x, stats


def test_same_ranks_components_and_scales_as_peft(setup):
    pm, m, x, stats = setup
    rules = eva_rules({r"l\d/kernel": EVA(rank=4, alpha=8.0)}, stats, rho=2.0)
    assert list(rules) == PATHS
    ranks = [rules[p].rank for p in PATHS]
    assert ranks == [3, 4, 5]  # redistributed (budget 12 = 3 * 4)
    assert ranks == [pm.base_model.model[i].r["default"] for i in (0, 2, 4)]
    graphdef, state = nnx.split(m)
    tree = inject(state, rules, key=jax.random.key(0), calibration=stats)
    for p, i in zip(PATHS, (0, 2, 4)):
        mod = pm.base_model.model[i]
        a_peft = mod.lora_A["default"].weight.detach().numpy()  # (r, in)
        node = adapter_paths(tree)[p]
        assert isinstance(node, LoRAWeight) and node.rank == mod.r["default"]
        np.testing.assert_allclose(np.asarray(node.a).T, a_peft, rtol=0, atol=1e-4)
        assert node.scale == mod.scaling["default"] == 2.0  # alpha adjusted to 8 r' / 4
        assert rules[p].alpha == 8.0 * node.rank / 4
        np.testing.assert_array_equal(np.asarray(node.b), 0.0)
        np.testing.assert_array_equal(np.asarray(mod.lora_B["default"].weight.detach()), 0.0)
    # identity: materialize right after inject is the base model exactly
    jax.tree.map(np.testing.assert_array_equal, materialize(tree), state)


def test_outputs_agree_with_peft_weights_copied_in(setup):
    pm, m, x, stats = setup
    rules = eva_rules({r"l\d/kernel": EVA(rank=4, alpha=8.0)}, stats, rho=2.0)
    graphdef, state = nnx.split(m)
    tree = inject(state, rules, key=jax.random.key(0), calibration=stats)
    g = torch.Generator().manual_seed(1)
    nodes, new = adapter_paths(tree), {}
    for p, i in zip(PATHS, (0, 2, 4)):
        mod = pm.base_model.model[i]
        with torch.no_grad():  # a trained-looking B, so the adapter path matters
            mod.lora_B["default"].weight.copy_(
                torch.randn(mod.lora_B["default"].weight.shape, generator=g))
        new[p] = nodes[p].replace(
            a=jnp.asarray(mod.lora_A["default"].weight.detach().numpy().T),
            b=jnp.asarray(mod.lora_B["default"].weight.detach().numpy().T))
    tree = _replace_nodes(tree, new)
    want = pm(torch.tensor(x)).detach().numpy()
    got = np.asarray(nnx.merge(graphdef, materialize(tree))(jnp.asarray(x)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    base = np.asarray(m(jnp.asarray(x)))
    assert np.abs(got - base).max() > 0.1  # the adapters change the output


def test_whiten_matches_peft_directions(setup):
    _, m, x, stats = setup
    tm, _, _ = _torch_and_jax()
    pm = _peft_eva(tm, x, whiten=True)
    rules = eva_rules({r"l\d/kernel": EVA(rank=4, alpha=8.0, whiten=True)}, stats, rho=2.0)
    for p, i in zip(PATHS, (0, 2, 4)):
        a_peft = pm.base_model.model[i].lora_A["default"].weight.detach().numpy()
        st = stats[p]
        a = np.asarray(rules[p].adapt(None, jnp.zeros((st.n_in, 3)), data=st).a).T
        v, _, sigma = eva_components(st, rules[p].rank)
        # our whitening: v_i / sqrt(sigma_i) exactly
        np.testing.assert_allclose(a, np.asarray(v).T / np.sqrt(np.asarray(sigma))[:, None],
                                   rtol=1e-6)
        # PEFT's singular values grow with its number of passes P over the (one) batch:
        # sigma_P = sqrt(P) sigma, so its rows are ours times one constant P^(-1/4) per layer
        ratio = np.linalg.norm(a_peft, axis=1) / np.linalg.norm(a, axis=1)
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-4)
        assert 0.3 < ratio[0] <= 1.0
        np.testing.assert_allclose(a_peft / ratio[0], a, rtol=0, atol=1e-4 * np.abs(a).max())


def test_components_are_the_centered_svd():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((200, 7)) * [5, 3, 2, 1, 0.5, 0.2, 0.1] + rng.standard_normal(7)
    v, ratio, sigma = eva_components(input_stats(jnp.asarray(x, jnp.float32)), 4)
    xc = x - x.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    signs = np.sign(vt[np.arange(7), np.abs(vt).argmax(1)])  # sklearn / PEFT svd_flip on V
    vt = vt * signs[:, None]
    np.testing.assert_allclose(np.asarray(v), vt[:4].T, rtol=0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(sigma), s[:4], rtol=1e-4)
    np.testing.assert_allclose(np.asarray(ratio), s[:4] ** 2 / np.sum(xc**2), rtol=1e-4)


def _stats(scales, n=64, seed=0):
    rng = np.random.default_rng(seed)
    return input_stats(jnp.asarray(rng.standard_normal((n, len(scales))) * scales, jnp.float32))


def test_redistribution_rules():
    sharp, flat = _stats([10.0, 0.1, 0.1, 0.1]), _stats([1.0, 1.0, 1.0, 1.0])
    calib = {"a/kernel": sharp, "b/kernel": flat, "c/kernel": flat, "d/bias": flat}
    base = EVA(rank=2, alpha=4.0, rslora=True)
    rules = {r"c/.*": None, r".*/kernel": base, r".*/bias": LoRA(rank=1)}
    out = eva_rules(rules, calib, rho=2.0)
    # a offers ~[1, 0, 0, 0]; b offers 4 x ~0.25; budget 4: a gets 1, b gets 3; c is excluded
    assert list(out) == ["a/kernel", "b/kernel", "c/.*", ".*/bias"]
    assert (out["a/kernel"].rank, out["b/kernel"].rank) == (1, 3)
    assert out["a/kernel"].alpha == 2.0 and out["b/kernel"].alpha == 6.0
    assert out["c/.*"] is None and out[".*/bias"] == LoRA(rank=1)
    assert out["a/kernel"].rslora and out["a/kernel"].scale == 2.0 / 1.0
    no_adjust = eva_rules(rules, calib, rho=2.0, adjust_scaling_factors=False)
    assert no_adjust["b/kernel"].alpha == 4.0
    assert eva_rules(rules, calib, rho=1.0)["a/kernel"].rank == 2  # rho = 1 keeps ranks
    # a leaf whose ratios all lose is dropped (None): x offers 3 x ~1/3, y 4 x ~1/8
    one = {"x/kernel": _stats([10.0, 10.0, 10.0, 0.01], n=400),
           "y/kernel": _stats([1.0] * 8, n=400)}
    out = eva_rules({r"x/.*": EVA(rank=1), r"y/.*": EVA(rank=2)}, one, rho=3.0)
    assert out["x/kernel"].rank == 3 and out["y/kernel"] is None
    tie = eva_rules({r".*": EVA(rank=1)}, {"q/kernel": flat, "k/kernel": flat}, rho=2.0)
    assert (tie["q/kernel"].rank, tie["k/kernel"].rank) == (1, 1)
    tie = eva_rules({r".*": EVA(rank=2)}, {"q/kernel": flat, "k/kernel": flat,
                                           "v/kernel": sharp}, rho=2.0)
    assert [tie[p].rank for p in ("q/kernel", "k/kernel", "v/kernel")] == [3, 2, 1]
    # rank 0 leaves stay plain after inject
    params = {"x": {"kernel": jnp.ones((4, 2))}, "y": {"kernel": jnp.ones((8, 2))}}
    tree = inject(params, out, key=jax.random.key(0), calibration=one)
    assert isinstance(tree["x"]["kernel"], LoRAWeight) and tree["x"]["kernel"].rank == 3
    assert isinstance(tree["y"]["kernel"], jax.Array)


def test_multi_axis_kernel_from_char_transformer_calibration():
    from effjax.models import CharTransformer, CharTransformerConfig

    cfg = CharTransformerConfig(vocab_size=13, seq_len=8, width=8, depth=1, heads=2)
    model = CharTransformer(cfg, rngs=nnx.Rngs(1))
    toks = jnp.asarray(np.random.default_rng(0).integers(0, 13, (4, 8)))
    stats = calibrate(model, [toks], targets=r"blocks/0/(out|query)/kernel")
    _, state = nnx.split(model)
    rules = {r".*/out/kernel": EVA(rank=3, in_axes=(0, 1)), r".*/query/kernel": EVA(rank=2)}
    tree = inject(state, rules, key=jax.random.key(0), calibration=stats)
    nodes = adapter_paths(tree)
    out = nodes["blocks/0/out/kernel"]
    assert out.a.shape == (2, 4, 3) and out.b.shape == (3, 8)
    v, _, _ = eva_components(stats["blocks/0/out/kernel"], 3)
    np.testing.assert_array_equal(np.asarray(out.a).reshape(8, 3), np.asarray(v))
    assert nodes["blocks/0/query/kernel"].b.shape == (2, 2, 4)
    # the wrong in_axes for the output projection: n_in 2 vs statistics over 8 features
    with pytest.raises(ValueError, match=r"blocks/0/out/kernel.*n_in=2 .*gram \(8, 8\)"):
        inject(state, {r".*/out/kernel": EVA(rank=1)}, key=jax.random.key(0),
               calibration=stats)


def test_errors():
    st = _stats([1.0, 2.0, 3.0], n=2)
    w = jnp.ones((3, 5))
    with pytest.raises(ValueError, match="rank=4 exceeds the kernel's n_in=3"):
        EVA(rank=4).adapt(None, w, data=st)
    with pytest.raises(ValueError, match="needs at least 3 calibration tokens"):
        EVA(rank=3).adapt(None, w, data=st)
    with pytest.raises(TypeError, match="needs InputStats"):
        EVA(rank=1).adapt(None, w, data=np.eye(3))
    with pytest.raises(ValueError, match="calibration data"):
        inject({"k": w}, {"k": EVA(rank=1)}, key=jax.random.key(0))
    with pytest.raises(ValueError, match="stacked kernels"):
        EVA(rank=1, batch_axes=0)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        EVA(rank=0)
    with pytest.raises(TypeError, match="whiten must be a bool"):
        EVA(whiten=1)
    with pytest.raises(ValueError, match="rho must be a number >= 1"):
        eva_rules({"k": EVA(rank=1)}, {"k": st}, rho=0.5)
    with pytest.raises(ValueError, match=r"EVA rule 'q.\*' matches no path.*'k'"):
        eva_rules({"k": EVA(rank=1), "q.*": EVA(rank=1)}, {"k": st})
    with pytest.raises(ValueError, match="EVA leaf 'k': 2 components need at least 2"):
        eva_rules({"k": EVA(rank=1)}, {"k": _stats([1.0, 2.0, 3.0], n=1)}, rho=2.0)
