"""effjax.nn.lora_layers: the fast path x W + (x A) B equals the materialize path (outputs and
gradients) for every adapter kind, layout, layer and framework, and never builds the delta."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effjax.models import CharTransformer, CharTransformerConfig, next_token_loss
from effjax.models.bert import BertConfig, BertModel
from effjax.nn import (
    AdaptedDense,
    AdaptedDenseGeneral,
    AdaptedEinsum,
    AdaptedLinear,
    AdaptedLinearGeneral,
    adapted_dot_general,
    adapted_einsum,
    adapted_layers,
    has_low_rank_factors,
    is_intercepted,
    linen_adapted_layers,
)
from effjax.peft import (
    NOLA,
    AdapterNode,
    DoRA,
    LoRA,
    Unfreeze,
    VeRA,
    adapter_node,
    combine,
    inject,
    is_adapter,
    materialize,
    split,
)
from effjax.peft.layout import KernelLayout

TOL = dict(rtol=1e-5, atol=1e-5)


def _randomize(tree, seed=0):
    """Every trainable field replaced by N(0, 0.3^2) values (b = 0 would hide the delta)."""
    rng = np.random.default_rng(seed)

    def fill(x):
        if not is_adapter(x):
            return x
        return x.replace(**{f: jnp.asarray(0.3 * rng.standard_normal(getattr(x, f).shape),
                                           getattr(x, f).dtype)
                            for f in x.trainable_fields})

    return jax.tree.map(fill, tree, is_leaf=is_adapter)


def _close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                                   **(tol or TOL))


def _both(fast, slow, loss, trainable):
    """Outputs and gradients of ``loss(f(t))`` for both paths, in one compiled program."""

    def run(t):
        out = []
        for f in (fast, slow):
            y, vjp = jax.vjp(f, t)
            (g,) = vjp(jax.grad(loss)(y))
            out += [y, g]
        return out

    return jax.jit(run)(trainable)


def _method(kind, **axes):
    return {"lora": LoRA(rank=3, alpha=6.0, **axes),
            "vera": VeRA(rank=4, **axes),
            "nola": NOLA(rank=3, num_basis_a=5, num_basis_b=6, **axes),
            "dora": DoRA(rank=3, alpha=6.0, **axes)}[kind]


# kernel shape, einsum of (x, kernel), x shape, layout kwargs
CASES = {
    "dense": ((16, 12), "bti,io->bto", (2, 5, 16), {}),
    "qkv": ((16, 2, 6), "btd,dhk->bthk", (2, 5, 16), {}),
    "attn_out": ((2, 6, 16), "bthk,hkd->btd", (2, 5, 2, 6), dict(in_axes=(0, 1))),
    # a layout that does not match the contraction (in: heads only) is still exact
    "attn_out_default_layout": ((2, 6, 16), "bthk,hkd->btd", (2, 5, 2, 6), {}),
    "stacked": ((3, 8, 10), "lbi,lio->lbo", (3, 4, 8), dict(batch_axes=(0,))),
    "stacked_mid": ((8, 3, 10), "lbi,ilo->lbo", (3, 4, 8), dict(batch_axes=(1,))),
}


@pytest.mark.parametrize("kind", ["lora", "vera", "nola", "dora"])
@pytest.mark.parametrize("case", list(CASES))
def test_adapted_einsum_matches_materialize(kind, case):
    shape, spec, x_shape, axes = CASES[case]
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    node = _randomize(_method(kind, **axes).adapt(jax.random.key(0), w))
    assert has_low_rank_factors(node) == (kind != "dora")
    trainable, frozen = split({"k": node})

    def fast(t):
        return adapted_einsum(spec, x, combine(t, frozen)["k"])

    def slow(t):
        return jnp.einsum(spec, x, materialize(combine(t, frozen))["k"])

    y_fast, g_fast, y_slow, g_slow = _both(fast, slow, lambda y: jnp.sum(jnp.sin(y)),
                                           trainable)
    _close(y_fast, y_slow)
    # the delta matters: W' differs from W by more than the tolerance
    assert float(jnp.abs(y_slow - jnp.einsum(spec, x, w)).max()) > 1e-2
    assert jax.tree.structure(g_fast) == jax.tree.structure(trainable)
    assert [x.shape for x in jax.tree.leaves(g_fast)] == \
        [x.shape for x in jax.tree.leaves(trainable)]
    _close(g_fast, g_slow, rtol=1e-5, atol=1e-4)  # sums over 10-60 terms of O(1)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_fast)) > 1e-2


@pytest.mark.parametrize("case", list(CASES))
def test_input_gradient_matches_materialize(case):
    """The fast path's hand-written backward pass (effjax.nn._lowrank._low_rank_bwd) also
    gives the input's cotangent: dx = g W^T + (g B^T) A^T, as autodiff of the dense kernel."""
    shape, spec, x_shape, axes = CASES[case]
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    node = _randomize(_method("lora", **axes).adapt(jax.random.key(0), w))
    loss = lambda y: jnp.sum(jnp.sin(y))
    gx_fast = jax.jit(jax.grad(lambda x: loss(adapted_einsum(spec, x, node))))(x)
    gx_slow = jax.grad(lambda x: loss(jnp.einsum(spec, x, node.materialize())))(x)
    _close(gx_fast, gx_slow, rtol=1e-5, atol=1e-4)
    assert float(jnp.abs(gx_fast).max()) > 1e-2


def test_lora_equation_written_plainly():
    """Independent of materialize: y = x W + s (x A) B for a 2-D kernel."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((6, 5)), jnp.float32)
    a = jnp.asarray(rng.standard_normal((6, 2)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((2, 5)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((3, 6)), jnp.float32)
    node = LoRA(rank=2, alpha=3.0).adapt(jax.random.key(0), w).replace(a=a, b=b)
    want = np.asarray(x) @ np.asarray(w) + 1.5 * (np.asarray(x) @ np.asarray(a)) @ np.asarray(b)
    got = adapted_dot_general(x, node, (((1,), (0,)), ((), ())))
    np.testing.assert_allclose(np.asarray(got), want, **TOL)
    la, lb = node.low_rank_factors()
    np.testing.assert_array_equal(np.asarray(lb), 1.5 * np.asarray(b))
    assert la is node.a


def test_vera_and_nola_factors_reconstruct_delta():
    """low_rank_factors() per batch slice gives exactly the node's delta()."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((3, 4, 2, 5)), jnp.float32)
    for m in (VeRA(rank=3, batch_axes=(0,)), NOLA(rank=2, num_basis_a=3, num_basis_b=4,
                                                  batch_axes=(0,))):
        node = _randomize(m.adapt(jax.random.key(0), w))
        a, b = node.low_rank_factors()
        assert a.shape[:2] == (3, 4) and b.shape[0] == 3 and b.shape[2:] == (2, 5)
        d = jnp.einsum("lir,lrho->liho", a, b)
        _close(d, node.delta())


def test_dot_general_with_batch_dims_matches():
    """A dot_general with batch dims (x's axis 0 with the kernel's stacked axis 0)."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((3, 8, 10)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((3, 4, 8)), jnp.float32)
    node = _randomize(LoRA(rank=2, batch_axes=(0,)).adapt(jax.random.key(0), w))
    dims = (((2,), (1,)), ((0,), (0,)))
    _close(adapted_dot_general(x, node, dims), jax.lax.dot_general(x, node.materialize(), dims))


# ------------------------------------------------------------------------------ NNX layers

CFG = CharTransformerConfig(vocab_size=11, seq_len=8, width=32, depth=1, heads=2)


def _nnx_rules(kind):
    return {
        r"blocks/\d+/(query|key|value)/kernel": _method(kind),  # (32, 2, 16)
        r"blocks/\d+/out/kernel": _method(kind, in_axes=(0, 1)),  # (2, 16, 32)
        r"blocks/\d+/(up|down)/kernel": _method(kind),
        r"head/.*": Unfreeze(),  # nodes without factors (kernel and bias) in a fast layer
    }


@pytest.mark.parametrize("kind", ["lora", "vera", "nola", "dora"])
def test_char_transformer_fast_path_matches_materialize(kind):
    model = CharTransformer(CFG, rngs=nnx.Rngs(0))
    fast_model = adapted_layers(model)
    assert not is_intercepted(model.blocks[0].query)  # the input model is unchanged
    # same classes (no class swap), intercepted
    assert type(fast_model.blocks[0].query) is nnx.LinearGeneral
    assert is_intercepted(fast_model.blocks[0].query) and is_intercepted(fast_model.blocks[0].up)
    g_slow, params, rest = nnx.split(model, nnx.Param, ...)
    g_fast, params_fast, rest_fast = nnx.split(fast_model, nnx.Param, ...)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (3, 9)), jnp.int32)
    # plain kernels: identical outputs
    np.testing.assert_array_equal(
        np.asarray(nnx.merge(g_fast, params_fast, rest_fast)(tokens[:, :-1])),
        np.asarray(model(tokens[:, :-1])))
    tree = _randomize(inject(params, _nnx_rules(kind), key=jax.random.key(0)))
    trainable, frozen = split(tree)

    def fast(t):
        return next_token_loss(nnx.merge(g_fast, combine(t, frozen), rest_fast), tokens)

    def slow(t):
        return next_token_loss(nnx.merge(g_slow, materialize(combine(t, frozen)), rest), tokens)

    lf, gf, ls, gs = _both(fast, slow, lambda y: y, trainable)
    np.testing.assert_allclose(float(lf), float(ls), rtol=1e-5)
    assert jax.tree.structure(gf) == jax.tree.structure(trainable)
    _close(gf, gs, rtol=1e-4, atol=1e-5)  # float32 sums reassociated over a whole model
    base = next_token_loss(model, tokens)
    assert abs(float(lf) - float(base)) > 1e-3


def test_bert_fast_path_matches_materialize():
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_layers=2, num_heads=2,
                     intermediate_size=32)
    model = BertModel(cfg, rngs=nnx.Rngs(0))
    fast_model = adapted_layers(model, r"layers/\d+/(query|value|intermediate)")
    assert is_intercepted(fast_model.layers[0].query)
    assert not is_intercepted(fast_model.layers[0].key)  # not selected
    g_slow, params, rest = nnx.split(model, nnx.Param, ...)
    g_fast, _, rest_fast = nnx.split(fast_model, nnx.Param, ...)
    rules = {r"layers/\d+/(query|value|intermediate)/kernel": LoRA(rank=4, alpha=8.0)}
    trainable, frozen = split(_randomize(inject(params, rules, key=jax.random.key(0))))
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 40, (2, 7)), jnp.int32)
    mask = jnp.arange(7)[None] < jnp.array([[7], [4]])
    fast = lambda t: nnx.merge(g_fast, combine(t, frozen), rest_fast)(ids, mask)
    slow = lambda t: nnx.merge(g_slow, materialize(combine(t, frozen)), rest)(ids, mask)
    yf, gf, ys, gs = _both(fast, slow, lambda y: jnp.sum(y[:, 0] ** 2), trainable)
    _close(yf, ys, rtol=1e-5, atol=2e-5)
    _close(gf, gs, rtol=1e-4, atol=1e-5)  # float32 sums reassociated over a whole model


def test_nnx_einsum_stacked_and_in_place():
    layer = nnx.Einsum("ebi,eio->ebo", (3, 8, 10), (3, 1, 10), rngs=nnx.Rngs(0))
    same = adapted_layers(layer, copy=False)
    assert same is layer and type(layer) is nnx.Einsum and is_intercepted(layer)
    assert is_intercepted(AdaptedEinsum("ebi,eio->ebo", (3, 8, 10), (3, 1, 10),
                                        rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(layer)
    tree = _randomize(inject(params, {"kernel": LoRA(rank=2, batch_axes=(0,))},
                             key=jax.random.key(0)))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4, 8)), jnp.float32)
    trainable, frozen = split(tree)
    fast = lambda t: nnx.merge(graphdef, combine(t, frozen))(x)
    slow = lambda t: nnx.merge(graphdef, materialize(combine(t, frozen)))(x)
    yf, gf, ys, gs = _both(fast, slow, lambda y: jnp.sum(jnp.cos(y)), trainable)
    _close(yf, ys)
    _close(gf, gs, rtol=1e-5, atol=1e-4)  # sums over 32 terms of O(1)


def test_nnx_linear_general_batch_axis():
    layer = AdaptedLinearGeneral(8, (2, 5), axis=-1, batch_axis={0: 3}, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)
    tree = _randomize(inject(params, {"kernel": VeRA(rank=3, batch_axes=(0,))},
                             key=jax.random.key(0)))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4, 8)), jnp.float32)
    y = nnx.merge(graphdef, tree)(x)
    assert y.shape == (3, 4, 2, 5)
    _close(y, nnx.merge(graphdef, materialize(tree))(x))


def test_bf16_model_with_float32_adapters():
    """bf16 kernels and inputs, float32 LoRA factors (PEFT's autocast default): both paths
    return bf16 and agree with a float32 reference to bf16 precision."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((64, 48)) / 8, jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((4, 64)), jnp.bfloat16)
    node = _randomize(LoRA(rank=4, alpha=8.0).adapt(jax.random.key(0), w))
    assert node.a.dtype == jnp.float32
    fast = adapted_dot_general(x, node, (((1,), (0,)), ((), ())))
    slow = x @ node.materialize()
    assert fast.dtype == slow.dtype == jnp.bfloat16
    x32, w32 = np.asarray(x, np.float32), np.asarray(w, np.float32)
    ref = x32 @ w32 + 2.0 * (x32 @ np.asarray(node.a)) @ np.asarray(node.b)
    scale = np.abs(ref).max()
    # bf16 has an 8-bit mantissa: outputs of size ~scale round to ~scale * 2^-8; the
    # materialize path also rounds W' to bf16 before a 64-term bf16-input dot product.
    err_fast = np.abs(np.asarray(fast, np.float32) - ref).max() / scale
    err_slow = np.abs(np.asarray(slow, np.float32) - ref).max() / scale
    assert err_fast < 1e-2 and err_slow < 2e-2, (err_fast, err_slow)
    # and the gradients of the float32 factors agree to bf16 precision
    trainable, frozen = split({"k": node})
    f = lambda t: jnp.sum(adapted_dot_general(x, combine(t, frozen)["k"],
                                              (((1,), (0,)), ((), ()))).astype(jnp.float32))
    s = lambda t: jnp.sum((x @ materialize(combine(t, frozen))["k"]).astype(jnp.float32))
    gf, gs = jax.grad(f)(trainable), jax.grad(s)(trainable)
    for a, b in zip(jax.tree.leaves(gf), jax.tree.leaves(gs)):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                   atol=2e-2 * float(jnp.abs(b).max()))  # bf16, see above


def test_nnx_bf16_layers():
    """bf16 weights, float32 adapters (the default for bf16 kernels)."""
    # (1) CharTransformer: its LayerNorm outputs float32, so the layers promote to float32; the
    # fast path then equals the float32 computation (no W' rounded to bf16 anywhere).
    model = CharTransformer(CFG, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(lambda v: v.astype(jnp.bfloat16), params)
    fast_g = nnx.split(adapted_layers(model), nnx.Param, ...)[0]
    rules = {r"blocks/\d+/(query|key|value|up|down)/kernel": LoRA(rank=2),
             r"blocks/\d+/out/kernel": LoRA(rank=2, in_axes=(0, 1))}
    tree = _randomize(inject(params, rules, key=jax.random.key(0)))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (2, 8)), jnp.int32)
    fast = nnx.merge(fast_g, tree, rest)(tokens)
    ref = nnx.merge(graphdef, materialize(jax.tree.map(lambda v: v.astype(jnp.float32), tree)),
                    rest)(tokens)
    _close(fast, ref, rtol=1e-5, atol=1e-4)  # float32 sums of 32-128 terms

    # (2) an MLP run entirely in bf16: both paths return bf16 and agree with a float32
    # reference to bf16 precision.
    from effjax.models.classifiers import MLP

    mlp = MLP([64, 96, 48], rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(mlp)
    params = jax.tree.map(lambda v: v.astype(jnp.bfloat16), params)
    fast_g = nnx.split(adapted_layers(mlp))[0]
    tree = _randomize(inject(params, {r".*/kernel": LoRA(rank=4)}, key=jax.random.key(0)))
    tree = jax.tree.map(lambda n: n.replace(b=n.b / 4) if is_adapter(n) else n, tree,
                        is_leaf=is_adapter)  # deltas of the weights' size
    x = jnp.asarray(np.random.default_rng(1).standard_normal((8, 64)), jnp.bfloat16)
    fast = nnx.merge(fast_g, tree)(x)
    slow = nnx.merge(graphdef, materialize(tree))(x)
    assert fast.dtype == slow.dtype == jnp.bfloat16
    t32 = jax.tree.map(lambda v: v.astype(jnp.float32), tree)
    ref = np.asarray(nnx.merge(graphdef, materialize(t32))(x.astype(jnp.float32)))
    scale = np.abs(ref).max()
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9); two layers of 64-96-term dot
    # products of rounded values stay within a few percent of the output's scale.
    for y in (fast, slow):
        err = np.abs(np.asarray(y, np.float32) - ref).max() / scale
        assert err < 3e-2, err


# ------------------------------------------------------------------------------ Linen


class LinenAttentionMLP(nn.Module):
    """Dense MLP + DenseGeneral attention projections + a stacked Einsum."""

    @nn.compact
    def __call__(self, x):  # x (b, t, 16)
        q = nn.DenseGeneral((2, 8), name="query")(x)  # kernel (16, 2, 8)
        o = nn.DenseGeneral(16, axis=(-2, -1), name="out")(jnp.tanh(q))  # kernel (2, 8, 16)
        h = nn.Dense(24, name="up")(x + o)
        h = nn.Dense(16, name="down")(nn.gelu(h))
        e = nn.Einsum((2, 16, 16), "btd,edf->ebtf", name="experts")(h)
        return e.sum(0)


def _linen_rules(kind):
    return {"query/kernel": _method(kind), "out/kernel": _method(kind, in_axes=(0, 1)),
            "(up|down)/kernel": _method(kind),
            "experts/kernel": _method(kind, batch_axes=(0,)),
            "down/bias": Unfreeze()}  # a bias node is materialized


@pytest.mark.parametrize("kind", ["lora", "vera", "nola", "dora"])
def test_linen_interceptor_matches_materialize(kind):
    model = LinenAttentionMLP()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 16)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    tree = _randomize(inject(params, _linen_rules(kind), key=jax.random.key(1)))
    trainable, frozen = split(tree)

    def fast(t):
        with linen_adapted_layers():
            return model.apply({"params": combine(t, frozen)}, x)

    slow = lambda t: model.apply({"params": materialize(combine(t, frozen))}, x)
    yf, gf, ys, gs = _both(fast, slow, lambda y: jnp.sum(jnp.sin(y)), trainable)
    _close(yf, ys, rtol=1e-5, atol=2e-5)
    _close(gf, gs, rtol=1e-4, atol=1e-4)  # float32 sums reassociated through 5 layers
    assert jax.tree.structure(gf) == jax.tree.structure(trainable)
    # without the interceptor Linen cannot read the node (its shape check fails)
    with pytest.raises(Exception, match="kernel"):
        model.apply({"params": combine(trainable, frozen)}, x)


def test_linen_interceptor_where_selects_layers():
    model = LinenAttentionMLP()
    x = jnp.ones((1, 2, 16))
    params = model.init(jax.random.key(0), x)["params"]
    tree = _randomize(inject(params, {"up/kernel": LoRA(rank=2)}, key=jax.random.key(1)))
    with linen_adapted_layers("up"):
        y = model.apply({"params": tree}, x)
    _close(y, model.apply({"params": materialize(tree)}, x))
    with linen_adapted_layers("down"), pytest.raises(Exception, match="kernel"):
        model.apply({"params": tree}, x)


def test_linen_adapted_classes():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 8)), jnp.float32)
    for model, rule, shape in (
            (AdaptedDense(5), LoRA(rank=2), (3, 5)),
            (AdaptedDenseGeneral((2, 4)), NOLA(rank=2, num_basis_a=3, num_basis_b=3), (3, 2, 4)),
            (AdaptedDenseGeneral(6, axis=(-2, -1)), LoRA(rank=2, in_axes=(0, 1)), (3, 6))):
        axis = getattr(model, "axis", -1)
        xin = x if axis == -1 else x.reshape(3, 2, 4)
        params = model.init(jax.random.key(0), xin)["params"]
        ref = nn.DenseGeneral(model.features, axis=axis) if isinstance(
            model, nn.DenseGeneral) else nn.Dense(model.features)
        # plain kernels: exactly the parent class
        np.testing.assert_array_equal(np.asarray(model.apply({"params": params}, xin)),
                                      np.asarray(ref.apply({"params": params}, xin)))
        tree = _randomize(inject(params, {"kernel": rule}, key=jax.random.key(1)))
        y = model.apply({"params": tree}, xin)
        assert y.shape == shape
        _close(y, ref.apply({"params": materialize(tree)}, xin))


# ------------------------------------------------------------------------------ no dense delta

N_IN, N_OUT = 512, 768


def _compiled_grad(use_fast):
    """The compiled gradient (w.r.t. a, b) of one LoRA layer, fast or materialize path."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((N_IN, N_OUT)), jnp.float32)
    node = _randomize(LoRA(rank=8).adapt(jax.random.key(0), w))
    x = jnp.asarray(rng.standard_normal((16, N_IN)), jnp.float32)
    trainable, frozen = split({"k": node})

    def loss(t, frozen, x):
        k = combine(t, frozen)["k"]
        y = adapted_dot_general(x, k, (((1,), (0,)), ((), ()))) if use_fast else \
            x @ k.materialize()
        return jnp.sum(y ** 2)

    return jax.jit(jax.grad(loss)).lower(trainable, frozen, x).compile()


def _kernel_shaped_values(hlo: str) -> list[str]:
    """Instructions (not parameters) whose result has the kernel's (or its transpose's) shape."""
    pat = re.compile(rf"= f32\[({N_IN},{N_OUT}|{N_OUT},{N_IN})\]")
    return [ln.strip() for ln in hlo.splitlines() if pat.search(ln) and "parameter(" not in ln]


def test_fast_path_hlo_has_no_dense_delta():
    fast, slow = _compiled_grad(True), _compiled_grad(False)
    kernel_bytes = N_IN * N_OUT * 4
    # positive control: the materialize path's backward holds kernel-shaped temporaries
    assert _kernel_shaped_values(slow.as_text())
    assert slow.memory_analysis().temp_size_in_bytes >= kernel_bytes
    # the fast path: only the frozen w (a parameter) has that shape; temporaries are tiny
    assert _kernel_shaped_values(fast.as_text()) == []
    assert fast.memory_analysis().temp_size_in_bytes < kernel_bytes // 8


# ------------------------------------------------------------------------------ bad inputs


def test_errors_name_the_shapes():
    node = LoRA(rank=2).adapt(jax.random.key(0), jnp.ones((4, 3)))
    layer = AdaptedLinear(5, 3, rngs=nnx.Rngs(0))
    layer.kernel.set_value(node)
    with pytest.raises(ValueError, match=r"AdaptedLinear: LoRAWeight with w of shape \(4, 3\)"
                                         r".*\(5, 3\)"):
        layer(jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="explicit"):
        adapted_einsum("ij,jk", jnp.ones((2, 4)), node)
    with pytest.raises(ValueError, match="kernel operand cannot use"):
        adapted_einsum("ij,...->i", jnp.ones((2, 4)), node)
    with pytest.raises(ValueError, match=r"rank 2 and a kernel of rank 2"):
        adapted_einsum("ijk,jk->ik", jnp.ones((2, 4)), node)
    with pytest.raises(ValueError, match="where='nothing' selects none of the 2 .*'up'"):
        adapted_layers(_TwoLayers(), "nothing")
    with pytest.raises(TypeError, match="not a subclass of nn.Dense"):
        with linen_adapted_layers(layer_types=(nn.Conv,)):
            pass
    with pytest.raises(TypeError, match="needs an NNX module"):
        adapted_layers(nn.Dense(3))


class _TwoLayers(nnx.Module):
    def __init__(self):
        self.up, self.down = nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 4, rngs=nnx.Rngs(1))


@adapter_node
class _BadFactors(AdapterNode):
    """A node whose factors do not fit its layout."""

    trainable_fields = ("a",)
    frozen_fields = ("w",)
    w: jax.Array
    a: jax.Array
    method: object
    layout: KernelLayout

    def low_rank_factors(self):
        return self.a, jnp.ones((3, 3))

    def materialize(self):
        return self.w


def test_bad_factor_shapes_are_reported():
    w = jnp.ones((4, 3))
    node = _BadFactors(w=w, a=jnp.ones((4, 2)), method=None,
                       layout=KernelLayout.resolve(w.shape))
    assert has_low_rank_factors(node)
    with pytest.raises(ValueError, match=r"_BadFactors.low_rank_factors\(\) returned shapes "
                                         r"\(4, 2\) and \(3, 3\).*\(2, 3\)"):
        adapted_dot_general(jnp.ones((1, 4)), node, (((1,), (0,)), ((), ())))


def test_node_without_factors_is_materialized():
    @adapter_node
    class Shift(AdapterNode):
        trainable_fields = ("c",)
        frozen_fields = ("w",)
        w: jax.Array
        c: jax.Array
        method: object

        def materialize(self):
            return self.w + self.c

    w = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)), jnp.float32)
    node = Shift(w=w, c=jnp.asarray(0.5), method=None)
    assert not has_low_rank_factors(node)
    x = jnp.ones((2, 4))
    _close(adapted_einsum("bi,io->bo", x, node), x @ (w + 0.5))
    g = jax.grad(lambda n: adapted_einsum("bi,io->bo", x, n).sum())(node)
    np.testing.assert_allclose(float(g.c), 2 * 4 * 3)
    assert dataclasses.is_dataclass(node)


def test_forward_mode_is_refused_reverse_mode_works():
    """Documented: the fast path's backward is a custom_vjp, so jvp raises (JAX's own error)
    while grad works; materialize is the way to forward mode."""
    node = _randomize(LoRA(rank=2).adapt(jax.random.key(0), jnp.ones((4, 3))))
    x = jnp.ones((2, 4))
    with pytest.raises(TypeError, match="forward-mode autodiff"):
        jax.jvp(lambda x: adapted_einsum("ti,io->to", x, node), (x,), (x,))
    _, tangent = jax.jvp(lambda x: jnp.einsum("ti,io->to", x, node.materialize()), (x,), (x,))
    assert tangent.shape == (2, 3)
