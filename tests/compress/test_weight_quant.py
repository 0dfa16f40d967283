"""effjax.compress weight quantization: a Flax kernel's NF4/FP4 bytes equal bitsandbytes'
``quantize_4bit`` of the PyTorch weight ``W.T`` (CPU, bitsandbytes 0.50), int8 equals its
``int8_vectorwise_quant``, int4 torchao's affine primitives; layouts of einsum and stacked
kernels; the bits-per-parameter report; NNX and Linen trees; bad inputs name the leaf."""

import bitsandbytes.functional as bnbf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from effjax.compress import (
    FP4,
    NF4,
    Int4,
    Int8,
    QuantizedWeight,
    bits_per_parameter,
    materialize,
    quantization_report,
    quantize_params,
)
from effjax.models import CharTransformer, CharTransformerConfig
from effjax.quant import weights as wq


def _bnb4(torch_weight, fmt):
    return bnbf.quantize_4bit(torch.from_numpy(np.ascontiguousarray(torch_weight)),
                              blocksize=fmt.block_size, compress_statistics=fmt.double_quant,
                              quant_type=fmt.kind)


# (kernel shape, torch [out, in] weight from the kernel, format)
CASES = [
    ((128, 48), lambda w: w.T, NF4(block_size=64, double_quant=False)),
    ((100, 7), lambda w: w.T, FP4(block_size=64, double_quant=False)),  # flat: blocks cross rows
    ((64, 2, 16), lambda w: w.reshape(64, 32).T, NF4(block_size=32, double_quant=True)),
    ((2, 16, 40), lambda w: w.reshape(32, 40).T, FP4(block_size=32, in_axes=(0, 1))),
    ((3, 64, 24), lambda w: w.transpose(0, 2, 1), NF4(block_size=64, batch_axes=(0,))),
]


@pytest.mark.peer
@pytest.mark.parametrize("shape,to_torch,fmt", CASES,
                         ids=["dense", "dense-odd", "einsum-qkv", "einsum-out", "stacked"])
def test_kernel_bytes_equal_bitsandbytes_of_the_torch_weight(shape, to_torch, fmt):
    w = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
    node = quantize_params({"k": jnp.asarray(w)}, {"k": fmt})["k"]
    assert isinstance(node, QuantizedWeight)
    packed, state = _bnb4(to_torch(w), fmt)
    np.testing.assert_array_equal(np.asarray(node.codes).ravel(), packed.numpy().ravel())
    if fmt.double_quant:
        np.testing.assert_array_equal(np.asarray(node.scales).ravel(), state.absmax.numpy())
        # the offset is a float32 mean in another summation order (tests/quant/
        # test_weight_formats.py): compare the nested maxima where they do not depend on it
        assert abs(float(node.scales_offset) - state.offset.item()) < 1e-6
        np.testing.assert_allclose(np.asarray(node.scales_absmax), state.state2.absmax.numpy(),
                                   rtol=1e-6)
        scales = np.asarray(node.block_scales()).ravel()
    else:
        np.testing.assert_array_equal(np.asarray(node.scales).ravel(), state.absmax.numpy())
        scales = state.absmax.numpy()
    # materialize: the numpy dequantization of bnb's bytes, put back in the kernel's layout
    b = packed.numpy().ravel()
    q = np.stack([b >> 4, b & 15], -1).ravel()[:w.size]
    torch_w = wq.four_bit_table(fmt.kind)[q] * np.repeat(scales, fmt.block_size)[:w.size]
    expect = {0: lambda t: t.T, 2: lambda t: t.reshape(2, 16, 64).transpose(2, 0, 1),
              3: lambda t: t.T.reshape(2, 16, 40),
              4: lambda t: t.reshape(3, 24, 64).transpose(0, 2, 1)}
    i = next(i for i, c in enumerate(CASES) if c[0] == shape)
    t = torch_w.reshape(to_torch(w).shape)
    dense = expect.get(i, lambda t: t.T)(t)
    np.testing.assert_array_equal(np.asarray(materialize({"k": node})["k"]), dense)


@pytest.mark.peer
def test_int8_and_int4_kernels_equal_their_anchors():
    from torchao.quantization.quant_primitives import (
        MappingType,
        choose_qparams_affine,
        quantize_affine,
    )
    w = np.random.default_rng(5).standard_normal((64, 12)).astype(np.float32)
    tree = quantize_params({"a": jnp.asarray(w), "b": jnp.asarray(w)},
                           {"a": Int8(), "b": Int4(group_size=32)})
    bq, bs, _ = bnbf.int8_vectorwise_quant(torch.from_numpy(w.T.copy()))
    np.testing.assert_array_equal(np.asarray(tree["a"].codes), bq.numpy())
    np.testing.assert_array_equal(np.asarray(tree["a"].scales), bs.numpy())
    s, z = choose_qparams_affine(torch.from_numpy(w.T.copy()), MappingType.SYMMETRIC, (1, 32),
                                 torch.int8, quant_min=-8, quant_max=7)
    q = quantize_affine(torch.from_numpy(w.T.copy()), (1, 32), s, z, torch.int8, -8, 7)
    codes = wq.unpack_nibbles(tree["b"].codes, w.size).reshape(12, 64)
    np.testing.assert_array_equal(np.asarray(codes).astype(np.int32) - 8, q.numpy())
    np.testing.assert_array_equal(np.asarray(tree["b"].scales), s.numpy())
    dense = materialize(tree)
    np.testing.assert_allclose(np.asarray(dense["a"]), (bq.numpy() * bs.numpy()[:, None]
                                                        * np.float32(1 / 127)).T, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(dense["b"]),
                                  (q.numpy().astype(np.float32) * np.repeat(s.numpy(), 32, 1)).T)


def test_bits_per_parameter_and_report():
    n_in, n_out = 1024, 64
    tree = quantize_params({"w": jnp.ones((n_in, n_out)), "b": jnp.zeros(n_out)},
                           {"w": NF4(block_size=64, double_quant=True)})
    n = n_in * n_out
    blocks = n // 64
    # codes n/2 bytes, one uint8 code per block, a float32 maximum per 256 blocks, the offset
    expect = 8 * (n / 2 + blocks + 4 * -(-blocks // 256) + 4) / n
    assert bits_per_parameter(tree["w"]) == pytest.approx(expect, abs=1e-12)
    assert round(expect, 3) == 4.127  # QLoRA's figure
    plain = quantize_params({"w": jnp.ones((n_in, n_out))}, {"w": NF4(double_quant=False)})
    assert bits_per_parameter(plain["w"]) == 4.5
    report = quantization_report(tree)
    assert "w      nf4 b64 +dq" in report and "b      float32" in report
    assert f"{8 * (tree['w'].nbytes + 4 * n_out) / (n + n_out):10.3f}" in report
    assert f"({tree['w'].nbytes / (4 * n):.3f} of their original bytes)" in report


def test_jit_equals_eager_and_node_is_a_pytree():
    w = jax.random.normal(jax.random.key(0), (96, 32))
    rules = {"w": NF4(block_size=32, double_quant=True)}
    eager = quantize_params({"w": w}, rules)
    jitted = jax.jit(lambda p: quantize_params(p, rules))({"w": w})
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 eager, jitted)
    assert len(jax.tree.leaves(eager)) == 4  # codes, scales, nested maxima, offset
    out = jax.jit(materialize)(eager)["w"]
    assert out.shape == (96, 32) and out.dtype == jnp.float32
    bf = quantize_params({"w": w.astype(jnp.bfloat16)}, rules)["w"]
    assert bf.materialize().dtype == jnp.bfloat16


def test_nnx_model_runs_on_quantized_weights():
    cfg = CharTransformerConfig(vocab_size=11, seq_len=8, width=32, depth=1, heads=2)
    graphdef, params, rest = nnx.split(CharTransformer(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    rules = {r"blocks/\d+/(query|key|value)/kernel": NF4(block_size=32),
             r"blocks/\d+/out/kernel": NF4(block_size=32, in_axes=(0, 1)),
             r"blocks/\d+/(up|down)/kernel": FP4(block_size=32),
             r"head/kernel": Int8()}
    q = quantize_params(params, rules)
    assert isinstance(q, nnx.State)
    assert isinstance(q["blocks"][0]["out"]["kernel"].get_value(), QuantizedWeight)  # in a Param
    assert q["embed"]["embedding"].get_value() is params["embed"]["embedding"].get_value()
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (2, 8)), jnp.int32)
    apply = jax.jit(lambda p: nnx.merge(graphdef, p, rest)(tokens))
    y, y_q = apply(params), apply(materialize(q))
    err = float(jnp.linalg.norm(y_q - y) / jnp.linalg.norm(y))
    assert 1e-3 < err < 0.2, err  # 4-bit weights move the logits, but not grossly


@pytest.mark.parametrize("params,rules,exc,match", [
    ({"w": jnp.ones((64, 4), jnp.int32)}, {"w": NF4()}, TypeError, r"leaf 'w'.*not a floating"),
    ({"b": jnp.ones(64)}, {"b": NF4()}, ValueError, r"leaf 'b' \(shape \(64,\).*at least 2"),
    ({"w": jnp.ones((32, 4))}, {"w": NF4(block_size=64)}, ValueError,
     r"leaf 'w'.*block of 64 is longer than the contraction axes \(32,\)"),
    ({"w": jnp.ones((64, 4)).at[3, 1].set(jnp.nan)}, {"w": NF4()}, ValueError,
     r"leaf 'w'.*1 non-finite"),
    ({"w": jnp.ones((64, 4))}, {"v": NF4()}, ValueError, r"rule 'v'.*no leaf|matches no"),
])
def test_bad_inputs_name_the_leaf(params, rules, exc, match):
    with pytest.raises(exc, match=match):
        quantize_params(params, rules)


@pytest.mark.parametrize("make,match", [
    (lambda: NF4(block_size=48), r"block_size must be a power of two in \[32, 4096\]"),
    (lambda: NF4(block_size=8192), r"block_size must be a power of two"),
    (lambda: Int4(group_size=100), r"group_size must be a power of two"),
    (lambda: Int4(scale_dtype="int8"), r"scale_dtype must be one of"),
    (lambda: NF4(double_quant=1), r"double_quant must be a bool"),
])
def test_bad_formats(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_partial_last_group(symmetric):
    """K = 48 in groups of 32: each row is a group of 32 and one of 16 (its own scale),
    written out per group with the formulas of effjax.quant.weights' docstring."""
    w = np.random.default_rng(7).standard_normal((48, 5)).astype(np.float32)
    w[40:, 2] = 3.0  # a large value only in the short group of output channel 2
    node = quantize_params({"w": jnp.asarray(w)},
                           {"w": Int4(group_size=32, symmetric=symmetric)})["w"]
    assert node.scales.shape == (5, 2) and node.codes.shape == (5, 24)
    expect = np.empty_like(w.T)
    for r, row in enumerate(w.T):
        for lo, hi in ((0, 32), (32, 48)):
            g = row[lo:hi]
            if symmetric:
                s = np.float32(np.abs(g).max() / np.float32(7.5))
                expect[r, lo:hi] = np.clip(np.round(g * (np.float32(1) / s)), -8, 7) * s
            else:
                d = np.float32((g.max() - g.min()) / np.float32(15))
                q = np.minimum(np.trunc((g - g.min()) * (np.float32(1) / d) + np.float32(0.5)), 15)
                expect[r, lo:hi] = q * d + g.min()
    np.testing.assert_allclose(np.asarray(node.materialize()), expect.T, rtol=1e-6, atol=1e-7)
    s2 = np.asarray(node.scales)[2]  # the short group's scale sees only its own 16 values
    assert s2[1] == pytest.approx(3.0 / 7.5 if symmetric else (3.0 - w[32:40, 2].min()) / 15,
                                  rel=1e-6)
