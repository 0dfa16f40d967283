"""SmolLM2's Q4_1 GGUF blocks loaded as 4-bit ``QuantizedWeight`` kernels, against the
dequantizing loader.

The reference is today's float path: ``read_gguf`` (gguf-py's own ``dequantize`` of every
block) then ``params_from_gguf``. Q4_1 *is* effjax's ``Int4(group_size=32, symmetric=False,
scale_dtype="float16")`` (``w = q d + m`` per 32 weights along the input axis), so the
quantized loader only moves bytes: ``materialize`` must give the reference kernels bit for
bit, and the model's logits must then be equal exactly (same floats, same compiled program).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effjax.compress import Int4, QuantizedWeight, is_quantized, materialize, quantization_report
from effjax.models.llama import Llama, LlamaConfig
from effjax.models.smollm2 import (
    Q4_1_FORMAT,
    GGUFBlocks,
    config_from_gguf,
    load_llama_gguf,
    load_smollm2,
    params_from_gguf,
    read_gguf,
    smollm2_path,
    unpermute_qk,
)

LINEAR = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _keyed(tree) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)[0]
    return {jax.tree_util.keystr(p): v for p, v in leaves}


@pytest.fixture(scope="module")
def file_blocks():
    """``(metadata, tensors)`` of the real file, every tensor as stored (the one read of the
    GGUF in this module): ``read_gguf`` keeping all three of its types."""
    return read_gguf(smollm2_path(), keep_quantized=("Q4_1", "Q8_0", "F32"))


@pytest.fixture(scope="module")
def config(file_blocks):
    return config_from_gguf(file_blocks[0], tie_word_embeddings=True)


@pytest.fixture(scope="module")
def params(file_blocks, config):
    """What ``load_smollm2(quantized=True)`` holds: ``params_from_gguf`` of the blocks (Q4_1
    kernels as QuantizedWeight; the Q8_0 embedding and F32 norms dequantized)."""
    return params_from_gguf(file_blocks[1], config)


@pytest.fixture(scope="module")
def reference(file_blocks, config):
    """Today's dequantizing loader's parameters (float32 numpy): ``read_gguf``'s default path
    is gguf-py's ``dequantize`` of each tensor (``GGUFBlocks.dequantize`` runs the same call,
    checked below), then ``params_from_gguf``."""
    tensors = {name: t.dequantize() for name, t in file_blocks[1].items()}
    return params_from_gguf(tensors, config)


@pytest.fixture(scope="module")
def dense(params):
    """The quantized kernels materialized one by one (one compile per shape)."""
    decode = jax.jit(lambda node: node.materialize())
    return jax.tree.map(lambda x: decode(x) if is_quantized(x) else x, params,
                        is_leaf=is_quantized)


def test_file_tensor_types(file_blocks):
    """What the wheel's GGUF holds: every linear weight Q4_1, the tied embedding Q8_0, the
    norms F32 (so only the Q4_1 tensors have an exact effjax format)."""
    import gguf

    types = {}
    for name, t in file_blocks[1].items():
        kind = name.split(".")[-2] if name.startswith("blk.") else name
        types.setdefault(kind, set()).add(t.tensor_type)
    assert types == {**{k: {"Q4_1"} for k in LINEAR}, "attn_norm": {"F32"},
                     "ffn_norm": {"F32"}, "output_norm.weight": {"F32"},
                     "token_embd.weight": {"Q8_0"}}
    assert len(file_blocks[1]) == 30 * 9 + 2
    t = file_blocks[1]["blk.4.ffn_down.weight"]  # dequantize() is gguf-py's call, reshaped
    want = gguf.quants.dequantize(t.data, gguf.GGMLQuantizationType.Q4_1)
    np.testing.assert_array_equal(t.dequantize(), want.reshape(576, 1536))


def test_every_q4_1_kernel_materializes_bit_for_bit(params, dense, reference):
    got, want, dense = _keyed(params), _keyed(reference), _keyed(dense)
    assert got.keys() == want.keys()
    n_nodes = 0
    for key, leaf in got.items():
        if is_quantized(leaf):
            n_nodes += 1
            assert leaf.format == Q4_1_FORMAT and leaf.dtype == np.float32, key
            assert leaf.shape == want[key].shape, key
            assert dense[key].dtype == np.float32
        np.testing.assert_array_equal(np.asarray(dense[key]), want[key], err_msg=key)
    assert n_nodes == 30 * 7


def test_codes_are_the_files_nibbles(params, config, file_blocks):
    """The node's bytes are GGUF's block fields moved, q/k rows un-permuted whole.

    Read plainly from ggml's ``block_q4_1`` {f16 d, f16 m, uint8 qs[16]}: element j of a block
    in the low nibble of qs[j], element j + 16 in the high nibble. effjax packs element 2i in
    the high nibble of byte i and 2i + 1 in the low nibble.
    """
    for layer, name, proj, heads in [(0, "attn_v", "v_proj", None),
                                     (7, "attn_q", "q_proj", config.num_heads),
                                     (29, "attn_k", "k_proj", config.num_kv_heads)]:
        t = file_blocks[1][f"blk.{layer}.{name}.weight"]
        rows, k = t.shape
        raw = np.asarray(t.data).reshape(rows, k // 32, 20)
        d = raw[:, :, 0:2].copy().view(np.float16)[..., 0]
        m = raw[:, :, 2:4].copy().view(np.float16)[..., 0]
        q = np.zeros((rows, k // 32, 32), np.uint8)
        for j in range(16):
            q[:, :, j] = raw[:, :, 4 + j] & 0x0F
            q[:, :, j + 16] = raw[:, :, 4 + j] >> 4
        q = q.reshape(rows, k)
        packed = q[:, 0::2] * 16 + q[:, 1::2]
        if heads is not None:
            d, m, packed = (unpermute_qk(a, heads) for a in (d, m, packed))
        node = params["layers"][layer]["self_attn"][proj]["kernel"]
        assert node.codes.dtype == np.uint8 and node.scales.dtype == np.float16
        np.testing.assert_array_equal(np.asarray(node.codes), packed)
        np.testing.assert_array_equal(np.asarray(node.scales).view(np.uint16),
                                      d.view(np.uint16))  # bits, so -0.0 and NaN count too
        np.testing.assert_array_equal(np.asarray(node.mins).view(np.uint16), m.view(np.uint16))
        assert node.shape == (k, rows)  # the (in, out) kernel; the row view is (out, in)
        assert node.nbytes == t.data.nbytes  # exactly the file's bytes, nothing added


def test_logits_equal_the_dequantized_loader(config, dense, reference):
    tokens = jnp.array([[504, 3575, 282, 4649, 314, 1345, 28, 198]], jnp.int32)  # 8 tokens
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))
    forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))  # one compile for both
    nnx.replace_by_pure_dict(state, dense)
    got = np.asarray(forward(state, tokens))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, reference))
    want = np.asarray(forward(state, tokens))
    assert got.shape == (1, 8, config.vocab_size) and np.all(np.isfinite(want))
    assert len(np.unique(want.argmax(-1))) > 1  # a working model, not a constant output
    np.testing.assert_array_equal(got, want)


def test_bytes_quantized_vs_float(params, reference, file_blocks):
    nodes = [x for x in jax.tree.leaves(params, is_leaf=is_quantized) if is_quantized(x)]
    q4_1_bytes = sum(t.data.nbytes for t in file_blocks[1].values()
                     if t.tensor_type == "Q4_1")
    n_linear = 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)
    assert sum(n.size for n in nodes) == n_linear == 106_168_320
    assert sum(n.nbytes for n in nodes) == q4_1_bytes == n_linear * 5 // 8  # 5 bits/weight
    report = quantization_report(params)
    print("\n" + "\n".join(report.splitlines()[-2:]))
    print(quantization_report(reference).splitlines()[-1])
    total_params = 134_515_008
    float_rest = (total_params - n_linear) * 4  # Q8_0 embedding and norms, float32
    assert report.splitlines()[-2].split()[1:] == [
        str(total_params), f"{8 * (q4_1_bytes + float_rest) / total_params:.3f}",
        str(q4_1_bytes + float_rest)]
    assert "5.000 bits/param (0.156 of their original bytes)" in report.splitlines()[-1]
    assert quantization_report(reference).splitlines()[-1].split()[1:] == [
        str(total_params), "32.000", str(4 * total_params)]


@pytest.fixture(scope="module")
def tiny():
    """A 1-block LLaMA with Q4_1 linear weights written by gguf-py's own quantizer."""
    import gguf

    cfg = LlamaConfig(vocab_size=16, hidden_size=64, intermediate_size=96, num_layers=1,
                      num_heads=2, num_kv_heads=1)
    shapes = {"token_embd.weight": (16, 64), "output_norm.weight": (64,),
              "blk.0.attn_norm.weight": (64,), "blk.0.ffn_norm.weight": (64,),
              "blk.0.attn_q.weight": (64, 64), "blk.0.attn_k.weight": (32, 64),
              "blk.0.attn_v.weight": (32, 64), "blk.0.attn_output.weight": (64, 64),
              "blk.0.ffn_gate.weight": (96, 64), "blk.0.ffn_up.weight": (96, 64),
              "blk.0.ffn_down.weight": (64, 96)}
    rng = np.random.default_rng(0)
    raw, floats = {}, {}
    for name, shape in shapes.items():
        x = rng.standard_normal(shape).astype(np.float32)
        kind = "F32" if len(shape) == 1 else "Q8_0" if "embd" in name else "Q4_1"
        if kind == "F32":
            raw[name] = floats[name] = x
            continue
        t = gguf.GGMLQuantizationType[kind]
        data = gguf.quants.quantize(x, t)
        raw[name] = GGUFBlocks(data, kind, shape)
        floats[name] = gguf.quants.dequantize(data, t).reshape(shape)
    return cfg, raw, floats


def test_small_model_from_blocks_equals_float_path(tiny):
    cfg, raw, floats = tiny
    tree = params_from_gguf(raw, cfg)
    got, want = _keyed(tree), _keyed(params_from_gguf(floats, cfg))
    assert got.keys() == want.keys()
    kinds = {k: type(v).__name__ for k, v in got.items()}
    assert sum(is_quantized(v) for v in got.values()) == 7  # the embedding is dequantized
    assert kinds["['embed_tokens']['embedding']"] == "ndarray"
    dense = _keyed(jax.jit(materialize)(tree))
    for key in got:
        np.testing.assert_array_equal(np.asarray(dense[key]), want[key], err_msg=key)
    q = got["['layers'][0]['self_attn']['q_proj']['kernel']"]
    assert q.format == Int4(group_size=32, symmetric=False, scale_dtype="float16")
    assert q.codes.shape == (64, 32) and q.scales.shape == q.mins.shape == (64, 2)


def test_bad_inputs(tiny):
    cfg, raw, _ = tiny
    with pytest.raises(ValueError, match=r"keep_quantized.*'Q4_2'"):
        read_gguf(smollm2_path(), keep_quantized=("Q4_2",))
    name = "blk.0.ffn_up.weight"
    short = dict(raw, **{name: raw[name]._replace(data=raw[name].data[:, :-20])})
    with pytest.raises(ValueError, match=r"'blk.0.ffn_up.weight'.*Q4_1 blocks"):
        params_from_gguf(short, cfg)
    wrong = dict(raw, **{name: raw[name]._replace(shape=(64, 96))})
    with pytest.raises(ValueError, match=r"'blk.0.ffn_up.weight' has shape \(64, 96\), "
                                         r"expected \(96, 64\)"):
        params_from_gguf(wrong, cfg)
    with pytest.raises(TypeError, match="quantized must be a bool"):
        load_smollm2(quantized="yes")


def test_node_type(tiny):
    cfg, raw, _ = tiny
    node = params_from_gguf(raw, cfg)["layers"][0]["mlp"]["down_proj"]["kernel"]
    assert isinstance(node, QuantizedWeight) and node.shape == (96, 64)
    assert node.codes.shape == (64, 48)  # the row view: GGUF's (out, in) rows, K/2 bytes


def _write_tiny_gguf(path, cfg, tensors):
    """A LLaMA GGUF written with gguf-py's own writer (Q4_1/Q8_0 blocks stored raw)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_context_length(64)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list([chr(ord("a") + i) for i in range(cfg.vocab_size - 1)] + ["ab"])
    w.add_token_types([1] * cfg.vocab_size)
    w.add_token_merges(["a b"])
    for name, t in tensors.items():
        if isinstance(t, GGUFBlocks):
            w.add_tensor(name, t.data, raw_dtype=gguf.GGMLQuantizationType[t.tensor_type])
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_load_llama_gguf_quantized_on_a_written_file(tiny, tmp_path):
    """The loader path: Params hold QuantizedWeight nodes; densified, the model is the float
    loader's model (same state, same logits)."""
    cfg, raw, _ = tiny
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, cfg, raw)
    q_model, _, q_cfg = load_llama_gguf(path, quantized=True)
    f_model, _, f_cfg = load_llama_gguf(path)
    assert q_cfg == f_cfg and q_cfg.hidden_size == 64 and q_cfg.tie_word_embeddings
    graphdef, q_state = nnx.split(q_model)
    f_graphdef, f_state = nnx.split(f_model)
    nodes = [x for x in jax.tree.leaves(q_state, is_leaf=is_quantized) if is_quantized(x)]
    assert len(nodes) == 7 and all(n.format == Q4_1_FORMAT for n in nodes)
    kernel = q_state["layers"][0]["self_attn"]["k_proj"]["kernel"]
    assert isinstance(kernel, nnx.Param) and isinstance(kernel.get_value(), QuantizedWeight)
    assert isinstance(kernel.get_value().codes, jax.Array)
    d_state = jax.jit(materialize)(q_state)  # jitted: eager decoding compiles op by op
    assert isinstance(d_state, nnx.State)
    for (path_, a), (_, b) in zip(*(jax.tree_util.tree_flatten_with_path(x)[0]
                                    for x in (d_state, f_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b),
                                      err_msg=jax.tree_util.keystr(path_))
    tokens = jnp.array([[1, 5, 9, 2, 15, 0]], jnp.int32)
    assert graphdef == f_graphdef
    forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))  # one program for both
    np.testing.assert_array_equal(np.asarray(forward(d_state, tokens)),
                                  np.asarray(forward(f_state, tokens)))
