"""DoRA beyond the shared conformance table (``tests/peft/cases_dora.py``): the magnitude at
init, the unit-norm direction, gradients with and without the detached norm, the zero column,
configs, the sharded layouts, and Hugging Face PEFT ``use_dora=True`` with the same adapter
weights (outputs, merged weights and gradients).

Tolerances (float32): m equals the column norm to 1e-6 relative; column norms of W' 1e-5;
gradients against the equation 1e-4; PEFT outputs 1e-5, merged weights 1e-6, gradients 1e-4
relative.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

from effjax.peft import combine, inject, materialize, merge, split, trainable_mask
from effjax.peft.dora import DoRA
from effjax.selection import path_str
from tests.peft.cases_dora import CASES as TABLE
from tests.peft.conformance_case import params_for as _params
from tests.peft.conformance_case import paths as _paths
from tests.peft.conformance_case import perturb as _perturb

# table row: the einsum of A B and the input axes of the kernel
ROWS = {"dora_2d": ("ir,ro->io", (0,)), "dora_qkv": ("ir,rhd->ihd", (0,)),
        "dora_out": ("hdr,ro->hdo", (0, 1)), "dora_stacked_out": ("lhdr,lro->lhdo", (1, 2)),
        "dora_pissa": ("ir,ro->io", (0,))}


def _inject(name, method=None):
    case = TABLE[name]
    params = _params(case.shape)
    return params, inject(params, {r"layer/kernel": method or case.method},
                          key=jax.random.key(1))


def reference_kernel(name, node, detach=True):
    """m * V / ||V||_c with V = W + s einsum(a, b), the norm over the input axes."""
    eq, in_axes = ROWS[name]
    v = node.w + node.method.scale * jnp.einsum(eq, node.a, node.b)
    norm = jnp.sqrt(jnp.sum(v ** 2, axis=in_axes, keepdims=True))
    if detach:
        norm = jax.lax.stop_gradient(norm)
    m = jnp.expand_dims(node.m, [a for a in in_axes])
    return m * v / norm


@pytest.mark.parametrize("name", ["dora_2d", "dora_out", "dora_pissa"])
def test_magnitude_is_the_column_norm_and_the_direction_unit_norm(name):
    params, tree = _inject(name)
    in_axes = ROWS[name][1]
    w0 = np.asarray(params["layer"]["kernel"], np.float64)
    # m is the column norm of W over the input axes (of the reconstructed W for PiSSA)
    np.testing.assert_allclose(np.asarray(tree["layer"]["kernel"].m),
                               np.sqrt(np.sum(w0 ** 2, axis=in_axes)), rtol=1e-6)
    # after training steps the column norms of W' are |m|: the direction has unit norm
    tree = _perturb(tree)
    got = np.asarray(materialize(tree)["layer"]["kernel"], np.float64)
    np.testing.assert_allclose(np.sqrt(np.sum(got ** 2, axis=in_axes)),
                               np.abs(np.asarray(tree["layer"]["kernel"].m)), rtol=1e-5)


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("name", ["dora_out", "dora_stacked_out"])
def test_grads_reach_only_a_b_m_and_match_the_equation(name, detach):
    method = TABLE[name].method
    if not detach:
        method = dataclasses.replace(method, detach_norm=False)
    tree = _perturb(_inject(name, method)[1])
    trainable, frozen = split(tree)
    c = jnp.asarray(np.random.default_rng(3).standard_normal(TABLE[name].shape), jnp.float32)

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


def test_zero_column_and_bad_configs():
    w = jnp.zeros((4, 3)).at[:, 0].set(1.0)
    node = DoRA(rank=1).adapt(jax.random.key(0), w)
    assert np.all(np.isfinite(np.asarray(node.materialize())))
    np.testing.assert_array_equal(np.asarray(node.materialize()), np.asarray(w))
    with pytest.raises(ValueError, match="DoRA rank must be >= 1"):
        DoRA(rank=0)
    with pytest.raises(TypeError, match="DoRA detach_norm must be a bool"):
        DoRA(detach_norm=1)
    with pytest.raises(ValueError, match="DoRA init='pissa' divides .* alpha must be > 0"):
        DoRA(init="pissa", alpha=-1.0)
    # a DoRA config is a LoRA config plus detach_norm; its low-rank part is that LoRA
    m = DoRA(rank=3, alpha=6.0, rslora=True, in_axes=(0, 1))
    assert m.lora.rank == 3 and m.lora.in_axes == (0, 1) and m.lora.scale == m.scale
    assert m.scale == 6.0 / np.sqrt(3)


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


def test_sharded_qkv_kernel_values_and_the_sharding_it_gets():
    """The table's dora_qkv row skips its sharding check: on a (d, heads, head_dim) kernel
    sharded P('x', None, 'y') the values are right, but W' comes back sharded P('x') only
    (DoRA works on the (d, heads * head_dim) matrix view, and 'y' on head_dim does not survive
    that reshape). Pinned here; a fix would give P('x', None, 'y')."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("x", "y"))
    spec = NamedSharding(mesh, P("x", None, "y"))
    w = jax.device_put(_params((16, 4, 8))["layer"]["kernel"], spec)
    tree = _perturb(inject({"k": w}, {"k": TABLE["dora_qkv"].method}, key=jax.random.key(1)))
    assert tree["k"].w.sharding == spec and tree["k"].m.sharding == NamedSharding(
        mesh, P(None, "y"))
    out = jax.jit(materialize)(tree)["k"]
    host = jax.device_get(tree["k"])
    np.testing.assert_allclose(np.asarray(out), np.asarray(reference_kernel("dora_qkv", host)),
                               rtol=1e-5, atol=1e-5)
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, P("x")), 3)
