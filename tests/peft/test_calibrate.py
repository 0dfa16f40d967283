"""effjax.peft.calibrate: layer-input statistics against Gram matrices computed by hand.

Each reference runs the model's layers explicitly (no interception), collects the input of the
layer under test as a (tokens, n_in) matrix X and compares G = X^T X, s = sum_t x_t, n = #tokens.
Tolerance: rtol 1e-5 / atol 1e-4 (float32 sums of the same products in a different order).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effjax.models import CharTransformer, CharTransformerConfig
from effjax.models.bert import BertConfig, BertModel
from effjax.nn import is_intercepted, linen_intercept
from effjax.peft import AdapterMethod, InputStats, LoRA, calibrate, input_stats

RTOL, ATOL = 1e-5, 1e-4


def _check(st, x, count=None):
    x = np.asarray(x, np.float64).reshape(-1, st.n_in)
    np.testing.assert_allclose(np.asarray(st.gram), x.T @ x, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(st.sum), x.sum(0), rtol=RTOL, atol=ATOL)
    assert float(st.count) == (x.shape[0] if count is None else count)
    assert st.gram.dtype == st.sum.dtype == st.count.dtype == jnp.float32


def _batches(shape, n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(n)]


# ---------------------------------------------------------------------------------- Linen


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):  # x (B, T, 6)
        h = jax.nn.relu(nn.Dense(8, name="up")(x))
        g = nn.DenseGeneral((2, 4), name="split")(h)  # kernel (8, 2, 4)
        o = nn.DenseGeneral(5, axis=(-2, -1), name="merge")(g)  # kernel (2, 4, 5)
        e = nn.Einsum((5, 3, 7), "btd,dhk->bthk", name="ein")(o)  # kernel (5, 3, 7)
        return jnp.sum(e, axis=(-2, -1))


def test_linen_mlp_matches_hand_grams():
    net = LinenNet()
    xs = _batches((2, 5, 6))
    variables = net.init(jax.random.key(0), xs[0])
    p = variables["params"]
    stats = calibrate(net, xs, variables=variables)
    assert list(stats) == ["up/kernel", "split/kernel", "merge/kernel", "ein/kernel"]
    ins = {k: [] for k in stats}
    for x in xs:  # the forward written out
        ins["up/kernel"].append(x.reshape(-1, 6))
        h = jax.nn.relu(x @ p["up"]["kernel"] + p["up"]["bias"])
        ins["split/kernel"].append(h.reshape(-1, 8))
        g = jnp.einsum("btd,dhk->bthk", h, p["split"]["kernel"]) + p["split"]["bias"]
        ins["merge/kernel"].append(g.reshape(-1, 8))  # (heads, head_dim) flattened in C order
        o = jnp.einsum("bthk,hko->bto", g, p["merge"]["kernel"]) + p["merge"]["bias"]
        ins["ein/kernel"].append(o.reshape(-1, 5))
    for k, st in stats.items():
        _check(st, np.concatenate(ins[k]))
    assert stats["merge/kernel"].n_in == 8  # = KernelLayout(in_axes=(0, 1)).n_in of (2, 4, 5)


def test_linen_einsum_with_contracted_axis_not_first_in_kernel():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):  # x (B, 3, 4); kernel (5, 4, 3): contracted axes 1 ('d'), 2 ('h')
            return nn.Einsum((5, 4, 3), "bhd,odh->bo", name="e")(x)

    xs = _batches((6, 3, 4))
    net = Net()
    variables = net.init(jax.random.key(0), xs[0])
    st = calibrate(net, xs, variables=variables)["e/kernel"]
    # the kernel's input axes in kernel order are (d, h): tokens are x transposed to (b, d, h)
    _check(st, np.concatenate([np.asarray(x).transpose(0, 2, 1).reshape(-1, 12) for x in xs]))


def test_linen_needs_variables_with_params():
    net = LinenNet()
    xs = _batches((2, 5, 6), n=1)
    params = net.init(jax.random.key(0), xs[0])["params"]
    with pytest.raises(TypeError, match="'params' collection"):
        calibrate(net, xs, variables=params)


# ----------------------------------------------------------------------------------- NNX


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(4, 8, rngs=rngs)
        self.down = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.down(jnp.tanh(self.up(x)))


def test_nnx_mlp_matches_hand_grams_jit_and_eager():
    model = NNXMLP(nnx.Rngs(0))
    xs = _batches((3, 5, 4))
    for jit in (True, False):
        stats = calibrate(model, xs, jit=jit)
        assert list(stats) == ["up/kernel", "down/kernel"]
        _check(stats["up/kernel"], np.concatenate(xs))
        hidden = [jnp.tanh(model.up(x)) for x in xs]
        _check(stats["down/kernel"], np.concatenate(hidden))


def test_nnx_mask_drops_padded_tokens_and_model_is_untouched():
    model = NNXMLP(nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.state(model))
    xs = _batches((3, 5, 4))
    masks = [np.random.default_rng(i).random((3, 5)) > 0.4 for i in range(3)]
    batches = [{"x": x, "m": m} for x, m in zip(xs, masks)]
    stats = calibrate(model, batches, targets="up/kernel", forward=lambda m, b: m(b["x"]),
                      mask=lambda b: b["m"])
    assert list(stats) == ["up/kernel"]
    kept = np.concatenate([np.asarray(x)[m] for x, m in zip(xs, masks)])
    _check(stats["up/kernel"], kept, count=int(sum(m.sum() for m in masks)))
    after = jax.tree.map(np.asarray, nnx.state(model))
    jax.tree.map(np.testing.assert_array_equal, before, after)


def _char_model():
    cfg = CharTransformerConfig(vocab_size=13, seq_len=8, width=8, depth=2, heads=2)
    return CharTransformer(cfg, rngs=nnx.Rngs(1)), cfg


def test_char_transformer_linear_general_kernels():
    model, cfg = _char_model()
    rng = np.random.default_rng(0)
    toks = [jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 8))) for _ in range(2)]
    stats = calibrate(model, toks, targets=[r"blocks/1/(query|out|up)/kernel", r"head/kernel"])
    assert list(stats) == ["blocks/1/query/kernel", "blocks/1/out/kernel", "blocks/1/up/kernel",
                           "head/kernel"]
    ins = {k: [] for k in stats}
    for t in toks:  # CharTransformer.__call__ and _Block.__call__ written out
        x = model.embed(t) + model.pos(jnp.arange(t.shape[1]))[None]
        x = model.blocks[0](x)
        b = model.blocks[1]
        y = b.ln1(x)
        ins["blocks/1/query/kernel"].append(y.reshape(-1, cfg.width))
        q, k, v = b.query(y), b.key(y), b.value(y)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1])
        s = jnp.where(jnp.tril(jnp.ones((8, 8), bool)), s, jnp.finfo(s.dtype).min)
        att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)  # (B, T, H, Dh)
        ins["blocks/1/out/kernel"].append(att.reshape(-1, cfg.width))  # (h, d) in C order
        x = x + b.out(att)
        ins["blocks/1/up/kernel"].append(b.ln2(x).reshape(-1, cfg.width))
        x = x + b.down(jax.nn.gelu(b.up(b.ln2(x))))
        ins["head/kernel"].append(model.ln_f(x).reshape(-1, cfg.width))
    for k, st in stats.items():
        _check(st, np.concatenate(ins[k]))
    # paths are the ones inject sees on the State; n_in is the kernel layout's
    _, state = nnx.split(model)
    from tests.peft.conformance_case import paths
    assert set(stats) <= paths(state)
    assert stats["blocks/1/out/kernel"].n_in == LoRA(in_axes=(0, 1)).layout(
        state["blocks"][1]["out"]["kernel"][...].shape).n_in


def test_bert_padding_mask():
    cfg = BertConfig(vocab_size=30, hidden_size=8, num_layers=2, num_heads=2,
                     intermediate_size=16)
    model = BertModel(cfg, rngs=nnx.Rngs(0))
    ids = jnp.array([[2, 7, 9, 3, 0, 0], [2, 5, 3, 0, 0, 0]])
    mask = ids != 0
    batches = [{"ids": ids, "mask": mask}, {"ids": ids[::-1], "mask": mask[::-1]}]
    stats = calibrate(model, batches, targets=r"layers/1/query/kernel",
                      forward=lambda m, b: m(b["ids"], b["mask"]), mask=lambda b: b["mask"])
    hs = []
    for b in batches:
        h = model.embeddings(b["ids"], jnp.zeros_like(b["ids"]))
        h = model.layers[0](h, b["mask"])
        hs.append(np.asarray(h)[np.asarray(b["mask"])])
    _check(stats["layers/1/query/kernel"], np.concatenate(hs), count=2 * int(mask.sum()))
    # without the mask the padded positions count too (and change G)
    full = calibrate(model, batches, targets=r"layers/1/query/kernel",
                     forward=lambda m, b: m(b["ids"], b["mask"]))["layers/1/query/kernel"]
    assert float(full.count) == 2 * ids.size
    assert not np.allclose(np.asarray(full.gram), np.asarray(stats["layers/1/query/kernel"].gram))


# ------------------------------------------------------------------------- targets / errors


@dataclasses.dataclass(frozen=True, kw_only=True)
class _NeedsInputs(AdapterMethod):
    calibration = "inputs"

    def adapt(self, key, w, data=None):
        raise NotImplementedError

    def num_trainable(self, shape):
        return 0


def test_rules_mapping_selects_input_calibrated_kernels():
    model, _ = _char_model()
    toks = [jnp.zeros((1, 8), jnp.int32)]
    rules = {r"blocks/0/.*": None, r".*/(query|value)/kernel": _NeedsInputs(),
             r".*/up/kernel": LoRA(rank=2), r".*bias": _NeedsInputs()}
    with pytest.raises(ValueError, match=r"rule '\.\*bias' \(_NeedsInputs\).*matches none"):
        calibrate(model, toks, targets=rules)
    rules.pop(r".*bias")
    stats = calibrate(model, toks, targets=rules)
    assert list(stats) == ["blocks/1/query/kernel", "blocks/1/value/kernel"]


@pytest.mark.parametrize("target", ["embed/embedding", "blocks/0/query/bias",
                                    "blocks/0/ln1/scale", "blocks/9/query/kernel"])
def test_target_that_is_not_an_intercepted_kernel_is_an_error(target):
    model, _ = _char_model()
    with pytest.raises(ValueError, match=f"target '{target}' is not the kernel of an "
                                         r"intercepted layer.*nnx.Linear.*closest: '.*/kernel'"):
        calibrate(model, [jnp.zeros((1, 8), jnp.int32)], targets=target)


def test_mask_of_wrong_shape_names_the_layer():
    cfg = BertConfig(vocab_size=30, hidden_size=8, num_layers=1, num_heads=2,
                     intermediate_size=16)
    model = BertModel(cfg, rngs=nnx.Rngs(0))
    ids = jnp.ones((2, 6), jnp.int32)
    with pytest.raises(ValueError, match=r"mask of shape \(2, 6\) does not fit layer "
                                         r"'pooler/kernel'.*token axes \(2,\)"):
        calibrate(model, [ids], targets=[r"layers/0/query/kernel", "pooler/kernel"],
                  forward=lambda m, b: m.pool(m(b)), mask=lambda b: b != 0)


def test_calibrate_patches_no_class_and_leaves_models_plain():
    """calibrate hooks the layers of its own merged copy of the model (effjax.nn.interception):
    the Flax classes' ``__call__`` are the same objects before, during (inside the forward
    pass) and after, also when the forward pass raises; the model is not intercepted."""
    model = NNXMLP(nnx.Rngs(0))
    calls = {c: c.__dict__["__call__"] for c in (nnx.Linear, nnx.LinearGeneral, nnx.Einsum,
                                                 nn.Dense, nn.DenseGeneral, nn.Einsum)}
    unpatched = lambda: all(c.__dict__["__call__"] is f for c, f in calls.items())
    during = []

    def forward(m, x):
        during.append(unpatched() and is_intercepted(m.up))
        return m(x)

    def boom(m, x):
        m.up(x)
        raise RuntimeError("boom")

    for jit in (True, False):
        calibrate(model, _batches((2, 4), n=1), forward=forward, jit=jit)
        with pytest.raises(RuntimeError, match="boom"):
            calibrate(model, _batches((2, 4), n=1), forward=boom, jit=jit)
        assert unpatched()
    assert during and all(during)
    assert not any(is_intercepted(m) for _, m in nnx.iter_modules(model))
    stats = calibrate(model, _batches((2, 4), n=1))
    assert list(stats) == ["up/kernel", "down/kernel"]

    net = LinenNet()  # Linen: the interception context is gone after an error
    xs = _batches((2, 5, 6), n=1)
    variables = net.init(jax.random.key(0), xs[0])

    def linen_boom(v, x):
        net.apply(v, x)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        calibrate(net, xs, variables=variables, forward=linen_boom)
    assert unpatched()
    seen = []
    with linen_intercept(lambda call, next: seen.append(call.path) or next(call)):
        net.apply(variables, xs[0])
    assert seen == ["up", "split", "merge", "ein"]  # only this context's hook


def test_other_errors():
    model = NNXMLP(nnx.Rngs(0))
    with pytest.raises(ValueError, match="batches is empty"):
        calibrate(model, [])
    with pytest.raises(TypeError, match="flax.nnx.Module or a flax.linen.Module"):
        calibrate(lambda x: x, _batches((2, 4), n=1))
    with pytest.raises(ValueError, match="no tokens reached"):
        calibrate(model, _batches((2, 4), n=1), mask=lambda b: jnp.zeros(2, bool))
    with pytest.raises(ValueError, match=r"mask has shape \(3,\), the inputs' token axes are "
                                         r"\(2,\)"):
        input_stats(jnp.ones((2, 4)), mask=jnp.ones(3))


def test_input_stats_accumulate_and_moments():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 3)) * [1.0, 2.0, 0.5] + [3.0, -1.0, 0.0]
    a, b = input_stats(jnp.asarray(x[:20])), input_stats(jnp.asarray(x[20:]))
    st = jax.tree.map(jnp.add, a, b)
    assert isinstance(st, InputStats)
    np.testing.assert_allclose(np.asarray(st.mean()), x.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(st.second_moment()), x.T @ x / 50, rtol=1e-5)
    xc = x - x.mean(0)
    np.testing.assert_allclose(np.asarray(st.scatter()), xc.T @ xc, rtol=1e-4, atol=1e-4)
