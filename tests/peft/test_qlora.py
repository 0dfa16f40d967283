"""QLoRA: LoRA-family adapters over a quantized base (effjax.compress.quantize_params), in NNX
and Linen layers, against the same computation on the dequantized base written out; the
backward pass keeps no dense copy of the base; methods that rewrite the base refuse it."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from effjax.compress import NF4, Int8, QuantizedWeight, is_quantized, quantize_params
from effjax.models import CharTransformer, CharTransformerConfig, next_token_loss
from effjax.nn import adapted_layers, linen_adapted_layers
from effjax.peft import (
    DoRA,
    LoRA,
    combine,
    inject,
    materialize,
    registered_adapters,
    split,
    trainable_mask,
)

RULES_Q = {r"blocks/\d+/(query|key|value)/kernel": NF4(block_size=32),
           r"blocks/\d+/out/kernel": NF4(block_size=32, in_axes=(0, 1)),
           r"blocks/\d+/(up|down)/kernel": NF4(block_size=32)}
RULES_LORA = {r"blocks/\d+/(query|key|value|up|down)/kernel": LoRA(rank=4, alpha=8.0),
              r"blocks/\d+/out/kernel": LoRA(rank=4, alpha=8.0, in_axes=(0, 1))}


@pytest.fixture(scope="module")
def qlora_model():
    cfg = CharTransformerConfig(vocab_size=11, seq_len=8, width=32, depth=1, heads=2)
    model = adapted_layers(CharTransformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tree = inject(quantize_params(params, RULES_Q), RULES_LORA, key=jax.random.key(1))

    def nonzero_b(x):  # B = 0 at init: give it values so the adapters matter
        if isinstance(x, nnx.Param) and hasattr(x.get_value(), "b"):
            node = x.get_value()
            return x.replace(node.replace(b=0.1 * jnp.ones_like(node.b)))
        return x
    tree = jax.tree.map(nonzero_b, tree, is_leaf=lambda x: isinstance(x, nnx.Param))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (2, 8)), jnp.int32)
    return graphdef, tree, rest, tokens


def _loss(graphdef, rest, tokens):
    return lambda t: next_token_loss(nnx.merge(graphdef, t, rest), tokens)


def test_nodes_keep_the_quantized_base_and_only_adapters_train(qlora_model):
    _, tree, _, _ = qlora_model
    node = tree["blocks"][0]["query"]["kernel"].get_value()
    assert is_quantized(node.w) and node.w.format == NF4(block_size=32)
    mask = trainable_mask(tree)
    flat = jax.tree_util.tree_leaves_with_path(mask)
    trained = {jax.tree_util.keystr(p) for p, m in flat if m}
    assert trained and all(k.endswith((".a", ".b")) for k in trained), trained
    assert not any(m for p, m in flat if ".w" in jax.tree_util.keystr(p))


def test_fast_path_equals_the_dequantized_computation(qlora_model):
    graphdef, tree, rest, tokens = qlora_model
    loss = _loss(graphdef, rest, tokens)
    trainable, frozen = split(tree)
    # reference: the model on plain dense weights W_deq + s A B (materialize), plain autodiff
    ref = jax.jit(jax.value_and_grad(lambda t: loss(materialize(combine(t, frozen)))))
    fast = jax.jit(jax.value_and_grad(lambda t: loss(combine(t, frozen))))
    (l_ref, g_ref), (l_fast, g_fast) = ref(trainable), fast(trainable)
    assert abs(float(l_ref) - float(l_fast)) < 1e-5
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         rtol=2e-4, atol=1e-6), g_ref, g_fast)
    assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(g_fast)) > 0


def test_a_step_trains_adapters_and_leaves_codes(qlora_model):
    graphdef, tree, rest, tokens = qlora_model
    trainable, frozen = split(tree)
    opt = optax.adamw(1e-2)
    state = opt.init(trainable)
    loss = _loss(graphdef, rest, tokens)

    @jax.jit
    def step(t, s):
        value, g = jax.value_and_grad(lambda t: loss(combine(t, frozen)))(t)
        u, s = opt.update(g, s, t)
        return optax.apply_updates(t, u), s, value

    losses = []
    for _ in range(5):
        trainable, state, value = step(trainable, state)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    new = combine(trainable, frozen)
    q0 = tree["blocks"][0]["up"]["kernel"].get_value().w
    q1 = new["blocks"][0]["up"]["kernel"].get_value().w
    np.testing.assert_array_equal(np.asarray(q0.codes), np.asarray(q1.codes))


def _dense_residual_sizes(f, *args):
    """Sizes of the floating residuals ``jax.vjp`` keeps for the backward pass."""
    _, vjp = jax.vjp(f, *args)
    return sorted(int(x.size) for x in jax.tree.leaves(vjp)
                  if jnp.issubdtype(x.dtype, jnp.floating))


def test_backward_keeps_no_dense_copy_of_the_base():
    k, n, depth = 256, 192, 3
    ws = [jax.random.normal(jax.random.key(i), (k, n)) / 16 for i in range(depth)]
    params = {f"l{i}": {"kernel": w} for i, w in enumerate(ws)}
    tree = inject(quantize_params(params, {r".*": NF4()}), {r".*": LoRA(rank=4)},
                  key=jax.random.key(0))
    trainable, frozen = split(tree)
    x = jnp.ones((4, k))

    def forward(t, dense):
        h, full = x, combine(t, frozen)
        for i in range(depth):
            node = full[f"l{i}"]["kernel"]
            with linen_adapted_layers():
                h = nn.Dense(n, use_bias=False).apply(
                    {"params": {"kernel": node.materialize() if dense else node}}, h)
            h = jnp.tanh(h[:, :k] if n >= k else jnp.pad(h, ((0, 0), (0, k - n))))
        return h.sum()

    fast = _dense_residual_sizes(lambda t: forward(t, False), trainable)
    dense = _dense_residual_sizes(lambda t: forward(t, True), trainable)
    assert max(fast) < k * n <= max(dense), (fast, dense)  # the check is not vacuous


def test_linen_qlora_matches_dense():
    model = nn.Sequential([nn.Dense(48), nn.relu, nn.Dense(5)])
    x = jax.random.normal(jax.random.key(0), (3, 64))
    params = model.init(jax.random.key(1), x)["params"]
    tree = inject(quantize_params(params, {r".*/kernel": NF4(block_size=32)}),
                  {r".*/kernel": LoRA(rank=2, init="gaussian")}, key=jax.random.key(2))
    tree = jax.tree.map(lambda v: v.replace(b=0.2 * jnp.ones_like(v.b))
                        if hasattr(v, "low_rank_factors") else v, tree,
                        is_leaf=lambda v: hasattr(v, "low_rank_factors"))

    def run(t):
        with linen_adapted_layers():
            return model.apply({"params": t}, x)
    y = jax.jit(run)(tree)
    np.testing.assert_allclose(np.asarray(y), np.asarray(model.apply(
        {"params": materialize(tree)}, x)), rtol=1e-5, atol=1e-5)
    # a quantized kernel without an adapter runs on the fly too
    bare = quantize_params(params, {r".*/kernel": Int8()})
    np.testing.assert_allclose(np.asarray(jax.jit(run)(bare)), np.asarray(model.apply(
        {"params": materialize(bare)}, x)), rtol=1e-5, atol=1e-5)


KEEP_BASE = ["lora", "dora", "lora_xs", "miss", "mos", "nola", "randlora", "vera"]
REWRITE_BASE = ["lamda", "loldu", "svfit", "welore", "unfreeze"]


@pytest.mark.parametrize("name", KEEP_BASE + REWRITE_BASE)
def test_every_method_over_a_quantized_base(name):
    cls = registered_adapters()[name]
    method = cls(rank=2) if "rank" in cls.__dataclass_fields__ else cls()
    w = jax.random.normal(jax.random.key(0), (64, 32))
    q = quantize_params({"k": w}, {"k": NF4(block_size=32)})
    if name in REWRITE_BASE:
        with pytest.raises(TypeError, match=r"leaf 'k'.*(rewrites|trains) the base weight"):
            inject(q, {"k": method}, key=jax.random.key(1))
        return
    node = inject(q, {"k": method}, key=jax.random.key(1))["k"]
    assert isinstance(node.w, QuantizedWeight)
    ref = inject({"k": q["k"].materialize()}, {"k": method}, key=jax.random.key(1))["k"]
    # the same node as on the dequantized base; materialize within an ulp (XLA fuses the
    # dequantization into the method's own sum in some methods' compiled _dense)
    np.testing.assert_allclose(np.asarray(node.materialize()), np.asarray(ref.materialize()),
                               rtol=0, atol=2.5e-7)


def test_dora_over_quantized_base_in_layers():
    w = jax.random.normal(jax.random.key(0), (64, 16))
    tree = inject(quantize_params({"kernel": w}, {"kernel": NF4(block_size=32)}),
                  {"kernel": DoRA(rank=2)}, key=jax.random.key(1))
    x = jnp.ones((2, 64))
    with linen_adapted_layers():
        y = nn.Dense(16, use_bias=False).apply({"params": tree}, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x @ tree["kernel"].materialize()),
                               rtol=1e-5)


@pytest.mark.peer
def test_merge_three_ways():
    import bitsandbytes.functional as bnbf
    import torch

    from effjax.peft import merge
    w = (jax.random.normal(jax.random.key(0), (128, 48)) / 8).astype(jnp.bfloat16)
    fmt = NF4(block_size=64, double_quant=False)
    tree = inject(quantize_params({"k": w, "v": w}, {"k": fmt, "v": fmt}),
                  {"k": LoRA(rank=4, alpha=8.0, init="gaussian")}, key=jax.random.key(1))
    node = tree["k"].replace(b=0.01 * jax.random.normal(jax.random.key(2), (4, 48)))
    tree = {"k": node, "v": tree["v"]}
    s = 8.0 / 4
    deq = node.w.materialize().astype(jnp.float32)
    exact = (deq + s * node.a @ node.b).astype(jnp.bfloat16)  # the trained model's weight
    dense = merge(tree)
    assert dense["k"].dtype == jnp.bfloat16 and dense["v"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(dense["k"], np.float32), np.asarray(exact, np.float32))
    np.testing.assert_array_equal(np.asarray(dense["v"]), np.asarray(tree["v"].materialize()))
    kept = merge(tree, quantized="keep")
    assert kept["k"] is tree["k"] and kept["v"] is tree["v"]
    req = merge(tree, quantized="requantize")
    assert isinstance(req["k"], QuantizedWeight) and req["v"] is tree["v"]
    # PEFT's Linear4bit.merge: bitsandbytes quantize_4bit of the merged torch weight W.T
    merged_t = torch.from_numpy(np.asarray(exact, np.float32).T.copy()).to(torch.bfloat16)
    packed, _ = bnbf.quantize_4bit(merged_t, blocksize=64, quant_type="nf4")
    np.testing.assert_array_equal(np.asarray(req["k"].codes).ravel(), packed.numpy().ravel())
    # the drift requantization costs: the merged weight moves by a good part of the update
    update = float(jnp.linalg.norm(exact.astype(jnp.float32) - deq))
    drift = float(jnp.linalg.norm(req["k"].materialize().astype(jnp.float32)
                                  - exact.astype(jnp.float32)))
    print(f"\nrequantize drift {drift:.4f} vs adapter update {update:.4f}")
    assert 0.05 * update < drift < 2 * update
    with pytest.raises(ValueError, match="merge\\(quantized=...\\) must be one of"):
        merge(tree, quantized="bf16")


@pytest.mark.peer
def test_qlora_outputs_equal_peft_over_bitsandbytes_linear4bit():
    """PEFT's LoRA over bitsandbytes' Linear4bit (CPU) and effjax's QLoRA with the same
    quantized base (read from the Linear4bit's state dict) and the same adapter values."""
    import bitsandbytes as bnb
    import peft
    import torch

    from effjax.compress import from_bnb_state_dict
    n_in, n_out = 128, 24
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n_out, n_in, generator=gen) / 8
    lin = bnb.nn.Linear4bit(n_in, n_out, bias=False, quant_type="nf4", compress_statistics=True)
    lin.weight.blocksize = 64
    lin.load_state_dict({"weight": w})
    lin = lin.to("cpu")  # quantizes (Params4bit._quantize)
    model = peft.get_peft_model(torch.nn.Sequential(lin),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    layer = model.base_model.model[0]
    # on CPU PEFT wraps the Linear4bit in its generic lora.Linear: base_layer(x) + B A x s
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_(0.1 * torch.randn(n_out, 4, generator=gen))
    x = torch.randn(5, n_in, generator=gen)
    with torch.no_grad():
        y_peft = model(x).numpy()

    sd = {k: v.detach().numpy() for k, v in layer.base_layer.state_dict().items()}
    qw = from_bnb_state_dict(sd, shape=(n_in, n_out))
    node = inject({"kernel": qw}, {"kernel": LoRA(rank=4, alpha=8.0)}, key=jax.random.key(0))
    node = node["kernel"].replace(
        a=jnp.asarray(layer.lora_A["default"].weight.detach().numpy().T),
        b=jnp.asarray(layer.lora_B["default"].weight.detach().numpy().T))
    with linen_adapted_layers():
        y = nn.Dense(n_out, use_bias=False).apply({"params": {"kernel": node}},
                                                  jnp.asarray(x.numpy()))
    # the same float32 products summed in different orders (two matmuls of length 128 / 4)
    np.testing.assert_allclose(np.asarray(y), y_peft, rtol=1e-5, atol=1e-5)
    assert np.abs(y_peft).max() > 0.1 and float(jnp.abs(node.b).max()) > 0


def test_inject_loftq_builds_lora_over_loftq_base():
    from effjax.compress import loftq_init
    from effjax.peft import LoftQ, inject_loftq
    w = jax.random.normal(jax.random.key(0), (3, 64, 32))  # stacked kernels
    lora = LoRA(rank=4, alpha=16.0, batch_axes=(0,))
    tree = inject_loftq({"k": w}, {"k": LoftQ(lora=lora, iters=2)}, key=jax.random.key(1))
    node = tree["k"]
    q, a, b = loftq_init(w, NF4(batch_axes=(0,)), rank=4, iters=2, alpha=16.0)
    np.testing.assert_array_equal(np.asarray(node.w.codes), np.asarray(q.codes))
    np.testing.assert_array_equal(np.asarray(node.a), np.asarray(a))
    np.testing.assert_array_equal(np.asarray(node.b), np.asarray(b))
    assert node.a.shape == (3, 64, 4) and node.b.shape == (3, 4, 32)
    # LoftQ starts closer to W than the quantized base alone, slice by slice
    start = materialize(tree)["k"]
    plain = quantize_params({"k": w}, {"k": NF4(batch_axes=(0,))})["k"].materialize()
    for i in range(3):
        assert jnp.linalg.norm(start[i] - w[i]) < jnp.linalg.norm(plain[i] - w[i])
    with pytest.raises(ValueError, match="LoftQ sets the adapter's init itself"):
        LoftQ(lora=LoRA(rank=4, init="pissa"))
    with pytest.raises(ValueError, match="iters must be an int >= 1"):
        LoftQ(iters=0)


def test_a_quantized_kernel_in_a_layer_that_cannot_read_it():
    q = quantize_params({"kernel": jnp.ones((3, 64, 4)), "bias": jnp.zeros(4)},
                        {"kernel": NF4(in_axes=(0, 1))})
    with pytest.raises(TypeError, match=r"Conv: its param 'kernel' is a QuantizedWeight"):
        with linen_adapted_layers():
            nn.Conv(4, (3,)).apply({"params": q}, jnp.ones((1, 5, 64)))
    conv = nnx.Conv(64, 4, (3,), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(conv, nnx.Param, ...)
    tree = quantize_params(params, {"kernel": NF4(in_axes=(0, 1))})
    with pytest.raises(TypeError, match=r"QuantizedWeight of shape \(3, 64, 4\).*adapted_layers"):
        nnx.merge(graphdef, tree, rest)(jnp.ones((1, 5, 64)))
    with pytest.raises(TypeError, match=r"only node\[...\] is supported"):
        tree["kernel"].get_value()[0]


def test_summary_counts_weights_of_quantized_kernels():
    from effjax.peft import summary
    p = {"a": {"kernel": jnp.ones((128, 64)), "bias": jnp.zeros(64)},
         "b": {"kernel": jnp.ones((128, 64))}}
    tree = inject(quantize_params(p, {r".*/kernel": NF4()}), {"a/kernel": LoRA(rank=4)},
                  key=jax.random.key(0))
    s = summary(tree)  # weights, not bytes: 2 kernels of 128 x 64, a bias, 4 (128 + 64)
    assert (s.trainable, s.total) == (768, 2 * 8192 + 64 + 768)
    assert s.methods["LoRA"] == {"leaves": 1, "trainable": 768, "total": 8192 + 768}
