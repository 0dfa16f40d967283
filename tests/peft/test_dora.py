"""DoRA: identity at init, the equation written plainly, gradients (detached norm as PEFT),
save/load, multi-axis and stacked kernels, and Hugging Face PEFT ``use_dora=True`` with the same
adapter weights (outputs, merged weights and gradients).

Tolerances (float32): materialize right after inject equals W exactly (kaiming/gaussian:
m equals the column norm bit for bit) or to 1e-5 relative (PiSSA); against the plain equation
1e-5; PEFT outputs 1e-5, merged weights 1e-6, gradients 1e-4 relative.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import peft
import pytest
import torch

from effjax.peft import (
    combine,
    inject,
    load_adapters,
    materialize,
    merge,
    save_adapters,
    split,
    summary,
    trainable_mask,
)
from effjax.peft.dora import DoRA, DoRAWeight
from effjax.selection import path_str
from tests.peft.conformance_case import params_for as _params
from tests.peft.conformance_case import paths as _paths
from tests.peft.conformance_case import perturb as _perturb

# name: (method, shape, trainable count by hand, einsum of A B, input axes of the kernel)
CASES = {
    "2d": (DoRA(rank=3, alpha=6.0), (12, 10), 3 * (12 + 10) + 10, "ir,ro->io", (0,)),
    "gauss_rs": (DoRA(rank=4, alpha=2.0, init="gaussian", rslora=True), (10, 12),
                 4 * (10 + 12) + 12, "ir,ro->io", (0,)),
    "qkv": (DoRA(rank=2, alpha=4.0), (16, 4, 8), 2 * (16 + 32) + 32, "ir,rhd->ihd", (0,)),
    "out": (DoRA(rank=2, alpha=4.0, in_axes=(0, 1)), (4, 8, 16), 2 * (32 + 16) + 16,
            "hdr,ro->hdo", (0, 1)),
    "stacked": (DoRA(rank=2, alpha=3.0, batch_axes=0), (3, 12, 10), 3 * (2 * (12 + 10) + 10),
                "lir,lro->lio", (1,)),
    "stacked_out": (DoRA(rank=2, alpha=2.0, batch_axes=0, in_axes=(1, 2)), (2, 4, 8, 16),
                    2 * (2 * (32 + 16) + 16), "lhdr,lro->lhdo", (1, 2)),
    "pissa": (DoRA(rank=3, alpha=6.0, init="pissa"), (12, 10), 3 * (12 + 10) + 10,
              "ir,ro->io", (0,)),
}
NAMES = list(CASES)


def _inject(name, dtype=jnp.float32):
    method, shape, *_ = CASES[name]
    params = _params(shape, dtype)
    return params, inject(params, {r"layer/kernel": method}, key=jax.random.key(1))


def reference_kernel(name, node, detach=True):
    """m * V / ||V||_c with V = W + s einsum(a, b), the norm over the input axes."""
    method, _, _, eq, in_axes = CASES[name]
    v = node.w + method.scale * jnp.einsum(eq, node.a, node.b)
    norm = jnp.sqrt(jnp.sum(v ** 2, axis=in_axes, keepdims=True))
    if detach:
        norm = jax.lax.stop_gradient(norm)
    m = jnp.expand_dims(node.m, [a for a in in_axes])
    return m * v / norm


@pytest.mark.parametrize("name", NAMES)
def test_count_and_identity_after_inject(name):
    method, shape, expected, _, in_axes = CASES[name]
    params, tree = _inject(name)
    node = tree["layer"]["kernel"]
    assert isinstance(node, DoRAWeight)
    n_leaves = sum(x.size for x in jax.tree.leaves(split(tree)[0]))
    assert method.num_trainable(shape) == expected == n_leaves == summary(tree).trainable
    w0 = np.asarray(params["layer"]["kernel"])
    # m is the column norm of W over the input axes
    want_m = np.sqrt(np.sum(w0.astype(np.float64) ** 2, axis=in_axes))
    np.testing.assert_allclose(np.asarray(node.m), want_m, rtol=1e-6)
    got = np.asarray(materialize(tree)["layer"]["kernel"])
    assert got.dtype == w0.dtype
    if method.init == "pissa":
        np.testing.assert_allclose(got, w0, rtol=0, atol=1e-5 * np.abs(w0).max())
    else:
        np.testing.assert_array_equal(np.asarray(node.b), 0.0)
        np.testing.assert_array_equal(got, w0)


@pytest.mark.parametrize("name", NAMES)
def test_materialize_matches_the_equation_and_jit(name):
    _, tree = _inject(name)
    tree = _perturb(tree)
    node = tree["layer"]["kernel"]
    want = np.asarray(reference_kernel(name, node))
    got = materialize(tree)["layer"]["kernel"]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.jit(materialize)(tree)["layer"]["kernel"]),
                               want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(merge(tree)["layer"]["kernel"]), np.asarray(got))
    # the column norms of W' are m (the direction is unit-norm)
    in_axes = CASES[name][4]
    np.testing.assert_allclose(np.sqrt(np.sum(np.asarray(got, np.float64) ** 2, axis=in_axes)),
                               np.abs(np.asarray(node.m)), rtol=1e-5)


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("name", ["out", "stacked_out"])
def test_grads_reach_only_a_b_m_and_match_the_equation(name, detach):
    method = CASES[name][0]
    if not detach:
        method = dataclasses.replace(method, detach_norm=False)
    params = _params(CASES[name][1])
    tree = _perturb(inject(params, {r"layer/kernel": method}, key=jax.random.key(1)))
    trainable, frozen = split(tree)
    c = jnp.asarray(np.random.default_rng(3).standard_normal(CASES[name][1]), jnp.float32)

    def loss(t):
        return jnp.sum(c * materialize(combine(t, frozen))["layer"]["kernel"] ** 2)

    grads = jax.jit(jax.grad(loss))(trainable)
    want_paths = {"layer/kernel/a", "layer/kernel/b", "layer/kernel/m"}
    flat_mask = jax.tree_util.tree_flatten_with_path(trainable_mask(tree))[0]
    assert {path_str(p) for p, m in flat_mask if m} == want_paths
    assert _paths(grads) == want_paths
    node = tree["layer"]["kernel"]

    def ref(a, b, m):
        return jnp.sum(c * reference_kernel(name, node.replace(a=a, b=b, m=m), detach) ** 2)

    ref_g = jax.grad(ref, argnums=(0, 1, 2))(node.a, node.b, node.m)
    for f, r in zip("abm", ref_g):
        g = np.asarray(getattr(grads["layer"]["kernel"], f))
        assert np.abs(g).max() > 0
        np.testing.assert_allclose(g, np.asarray(r), rtol=1e-4, atol=1e-4)
    if detach:  # the detached and full gradients of a differ (so the flag is doing something)
        full = jax.grad(lambda a: jnp.sum(
            c * reference_kernel(name, node.replace(a=a), False) ** 2))(node.a)
        assert np.abs(np.asarray(full) - np.asarray(grads["layer"]["kernel"].a)).max() > 1e-3


@pytest.mark.parametrize("name", ["qkv", "stacked"])
def test_save_load_roundtrip(name, tmp_path):
    method, _, expected, _, _ = CASES[name]
    params, tree = _inject(name)
    tree = _perturb(tree)
    save_adapters(tmp_path / "ad", tree)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ck:
        raw = ck.restore(tmp_path / "ad", args=ocp.args.Composite(
            adapters=ocp.args.StandardRestore()))["adapters"]
    assert _paths(raw) == {"layer/kernel/a", "layer/kernel/b", "layer/kernel/m"}
    assert sum(np.asarray(x).size for x in jax.tree.leaves(raw)) == expected
    for rules in (None, {r"layer/kernel": method}):
        back = load_adapters(tmp_path / "ad", params, rules)
        assert jax.tree.structure(back) == jax.tree.structure(tree)
        for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_bfloat16_kernel_float32_adapters():
    params, tree = _inject("2d", jnp.bfloat16)
    node = tree["layer"]["kernel"]
    assert node.a.dtype == node.b.dtype == node.m.dtype == jnp.float32
    out = materialize(tree)["layer"]["kernel"]
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32),
                                  np.asarray(params["layer"]["kernel"], np.float32))


def test_zero_column_and_bad_configs():
    w = jnp.zeros((4, 3)).at[:, 0].set(1.0)
    node = DoRA(rank=1).adapt(jax.random.key(0), w)
    assert np.all(np.isfinite(np.asarray(node.materialize())))
    np.testing.assert_array_equal(np.asarray(node.materialize()), np.asarray(w))
    with pytest.raises(ValueError, match="DoRA: LoRA rank must be >= 1"):
        DoRA(rank=0)
    with pytest.raises(TypeError, match="detach_norm"):
        DoRA(detach_norm=1)
    with pytest.raises(TypeError, match="DoRA: LoRA needs a floating kernel"):
        DoRA(rank=1).adapt(jax.random.key(0), jnp.ones((3, 2), jnp.int32))


# ----------------------------------------------------------------- Hugging Face PEFT (peer)

class _MLP(nn.Module):  # torch's Sequential(Linear(6, 16), ReLU, Linear(16, 5))
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="l2")(nn.relu(nn.Dense(16, name="l0")(x)))


def _t2n(t):
    return t.detach().cpu().numpy().astype(np.float32)


@pytest.mark.peer
@pytest.mark.parametrize("rslora", [False, True])
def test_outputs_merge_and_grads_match_peft_dora(rslora):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], use_rslora=rslora,
                          use_dora=True)
    pm = peft.get_peft_model(model, cfg)
    mods = {"l0": pm.base_model.model[0], "l2": pm.base_model.model[2]}
    params = {"params": {name: {"kernel": jnp.asarray(_t2n(m.base_layer.weight).T),
                                "bias": jnp.asarray(_t2n(m.base_layer.bias))}
                         for name, m in mods.items()}}
    method = DoRA(rank=4, alpha=8.0, rslora=rslora)
    tree = inject(params, {r"params/l\d/kernel": method}, key=jax.random.key(0))
    for name, m in mods.items():  # PEFT's magnitude at init: the same column norms
        assert method.scale == m.scaling["default"]
        np.testing.assert_allclose(np.asarray(tree["params"][name]["kernel"].m),
                                   _t2n(m.lora_magnitude_vector["default"].weight), rtol=1e-6)

    with torch.no_grad():  # nonzero B and a magnitude away from the norms
        gen = torch.Generator().manual_seed(1)
        for m in mods.values():
            m.lora_B["default"].weight.copy_(
                0.3 * torch.randn(m.lora_B["default"].weight.shape, generator=gen))
            mag = m.lora_magnitude_vector["default"].weight
            mag.mul_(1 + 0.2 * torch.randn(mag.shape, generator=gen))
    for name, m in mods.items():
        node = tree["params"][name]["kernel"]
        tree["params"][name]["kernel"] = node.replace(
            a=jnp.asarray(_t2n(m.lora_A["default"].weight).T),
            b=jnp.asarray(_t2n(m.lora_B["default"].weight).T),
            m=jnp.asarray(_t2n(m.lora_magnitude_vector["default"].weight)))

    x = np.random.default_rng(0).standard_normal((32, 6)).astype(np.float32)
    c = np.random.default_rng(1).standard_normal((32, 5)).astype(np.float32)
    out_t = pm(torch.from_numpy(x))
    (out_t * torch.from_numpy(c)).sum().backward()
    want = _t2n(out_t)
    got = np.asarray(_MLP().apply(materialize(tree), jnp.asarray(x)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pm.disable_adapter(), torch.no_grad():
        base = _t2n(pm(torch.from_numpy(x)))
    assert np.abs(want - base).max() > 1e-2

    # gradients: PEFT detaches the weight norm; so does DoRA(detach_norm=True)
    trainable, frozen = split(tree)

    def loss(t):
        return jnp.sum(jnp.asarray(c) * _MLP().apply(materialize(combine(t, frozen)),
                                                     jnp.asarray(x)))

    grads = jax.grad(loss)(trainable)
    for name, m in mods.items():
        g = grads["params"][name]["kernel"]
        for ours, theirs in ((g.a, m.lora_A["default"].weight.grad.T),
                             (g.b, m.lora_B["default"].weight.grad.T),
                             (g.m, m.lora_magnitude_vector["default"].weight.grad)):
            theirs = _t2n(theirs)
            np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-4,
                                       atol=1e-4 * np.abs(theirs).max())

    merged = merge(tree)
    unloaded = pm.merge_and_unload()
    for name, idx in (("l0", 0), ("l2", 2)):
        np.testing.assert_allclose(np.asarray(merged["params"][name]["kernel"]),
                                   _t2n(unloaded[idx].weight).T, rtol=1e-6, atol=1e-6)


def test_sharded_kernel_keeps_sharding():
    """8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8): w, a, b, m follow
    the kernel's sharding (m like the out axis), for DoRA on top of a PiSSA init too."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    assert jax.device_count() >= 8, "tests/conftest.py sets 8 CPU devices"
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("x", "y"))
    w_host = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    w = jax.device_put(w_host, NamedSharding(mesh, P("x", "y")))
    for init in ("kaiming", "pissa"):
        node = DoRA(rank=2, init=init).adapt(jax.random.key(0), w)
        assert node.w.sharding == w.sharding
        assert node.a.sharding == NamedSharding(mesh, P("x", None))
        assert node.b.sharding == NamedSharding(mesh, P(None, "y"))
        assert node.m.sharding == NamedSharding(mesh, P("y"))
        out = jax.jit(materialize)({"k": node})["k"]
        assert out.sharding.is_equivalent_to(w.sharding, 2)
        np.testing.assert_allclose(np.asarray(out), w_host, atol=1e-5)
