"""Cross-check LoRA against Hugging Face PEFT (torch, CPU) with the same adapter weights.

PEFT stores ``lora_A.weight`` (r, in) and ``lora_B.weight`` (out, r) and computes
``base(x) + scaling * lora_B(lora_A(x))``; effjax's ``a`` (in, r) and ``b`` (r, out) are their
transposes. Tolerances: outputs 1e-5 (float32, one hidden layer of width 16; the two sides
associate the sums differently), merged weights 1e-6.
"""

import contextlib
import io

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

from effjax.peft import LoRA, inject, materialize, merge, summary

pytestmark = pytest.mark.peer


class _MLP(nn.Module):  # the same network as torch's Sequential(Linear, ReLU, Linear)
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="l2")(nn.relu(nn.Dense(16, name="l0")(x)))


def _torch_peft(rslora, init=True, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], use_rslora=rslora,
                          init_lora_weights=init)
    return peft.get_peft_model(model, cfg)


def _t2n(t):
    return t.detach().cpu().numpy().astype(np.float32)


@pytest.mark.parametrize("rslora", [False, True])
def test_outputs_and_merge_match_peft_with_the_same_weights(rslora):
    pm = _torch_peft(rslora)
    mods = {"l0": pm.base_model.model[0], "l2": pm.base_model.model[2]}
    with torch.no_grad():  # B = 0 at init: give it values so the adapter matters
        gen = torch.Generator().manual_seed(1)
        for m in mods.values():
            m.lora_B["default"].weight.copy_(
                0.3 * torch.randn(m.lora_B["default"].weight.shape, generator=gen))
    assert mods["l0"].scaling["default"] == (8 / 2 if rslora else 8 / 4)

    params = {"params": {name: {"kernel": jnp.asarray(_t2n(m.base_layer.weight).T),
                                "bias": jnp.asarray(_t2n(m.base_layer.bias))}
                         for name, m in mods.items()}}
    tree = inject(params, {r"params/l\d/kernel": LoRA(rank=4, alpha=8.0, rslora=rslora)},
                  key=jax.random.key(0))
    for name, m in mods.items():  # copy PEFT's adapter weights, transposed
        node = tree["params"][name]["kernel"]
        tree["params"][name]["kernel"] = node.replace(
            a=jnp.asarray(_t2n(m.lora_A["default"].weight).T),
            b=jnp.asarray(_t2n(m.lora_B["default"].weight).T))

    x = np.random.default_rng(0).standard_normal((32, 6)).astype(np.float32)
    with torch.no_grad():
        want = _t2n(pm(torch.from_numpy(x)))
    got = np.asarray(_MLP().apply(materialize(tree), jnp.asarray(x)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pm.disable_adapter(), torch.no_grad():
        base = _t2n(pm(torch.from_numpy(x)))
    assert np.abs(want - base).max() > 1e-2  # the adapters change the output

    merged = merge(tree)
    unloaded = pm.merge_and_unload()
    for name, idx in (("l0", 0), ("l2", 2)):
        np.testing.assert_allclose(np.asarray(merged["params"][name]["kernel"]),
                                   _t2n(unloaded[idx].weight).T, rtol=1e-6, atol=1e-6)


def test_parameter_counts_and_summary_line_match_peft():
    pm = _torch_peft(False)
    trainable, total = pm.get_nb_trainable_parameters()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        pm.print_trainable_parameters()
    x = jnp.zeros((1, 6))
    params = _MLP().init(jax.random.key(0), x)
    tree = inject(params, {r"params/l\d/kernel": LoRA(rank=4, alpha=8.0)}, key=jax.random.key(0))
    s = summary(tree)
    assert (s.trainable, s.total) == (trainable, total) == (4 * (6 + 16) + 4 * (16 + 5), 369)
    assert str(s).splitlines()[0] == buf.getvalue().strip()


def _ks_statistic(x, y):
    """Two-sample Kolmogorov-Smirnov statistic sup |F_x - F_y|."""
    x, y = np.sort(x), np.sort(y)
    grid = np.concatenate([x, y])
    return np.abs(np.searchsorted(x, grid, side="right") / x.size
                  - np.searchsorted(y, grid, side="right") / y.size).max()


@pytest.mark.parametrize("init,peft_init", [("kaiming", True), ("gaussian", "gaussian")])
def test_init_distribution_matches_peft(init, peft_init):
    """Same shapes (in=256, out=64, r=16): A's empirical law equals PEFT's, B = 0 in both."""
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(256, 64))
    pm = peft.get_peft_model(layer, peft.LoraConfig(r=16, lora_alpha=16, target_modules=["0"],
                                                    init_lora_weights=peft_init))
    lora = pm.base_model.model[0]
    a_peft = _t2n(lora.lora_A["default"].weight).ravel()
    assert np.all(_t2n(lora.lora_B["default"].weight) == 0)

    w = jnp.asarray(_t2n(lora.base_layer.weight).T)
    node = LoRA(rank=16, alpha=16.0, init=init).adapt(jax.random.key(0), w)
    a_ours = np.asarray(node.a).ravel()
    np.testing.assert_array_equal(np.asarray(node.b), 0.0)
    assert node.a.shape == (256, 16) and a_ours.size == a_peft.size == 4096
    # KS critical value at the 0.1% level for n = m = 4096 is 1.95 * sqrt(2 / 4096) = 0.043
    assert _ks_statistic(a_ours, a_peft) < 0.043
    assert a_ours.std() == pytest.approx(a_peft.std(), rel=0.06)
    if init == "kaiming":  # same support
        assert np.abs(a_ours).max() <= 1 / 16 and np.abs(a_peft).max() <= 1 / 16 + 1e-7
