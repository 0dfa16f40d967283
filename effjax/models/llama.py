"""A LLaMA decoder in Flax NNX: the reference architecture behind SmolLM2, Llama 2/3, Mistral.

The model follows Touvron et al., "LLaMA: Open and Efficient Foundation Language Models"
(arXiv:2302.13971) with grouped-query attention (Ainslie et al., "GQA", arXiv:2305.13245) and
matches Hugging Face's ``LlamaForCausalLM`` layer by layer, so weights converted from either
a ``transformers`` checkpoint or a llama.cpp GGUF (see :mod:`effjax.models.smollm2`) load as
they are. For tokens ``x_1..x_T`` and ``L`` decoder blocks::

    h_0 = E[x]                                       token embedding, E: (vocab, d)
    a_l = h_{l-1} + Attn_l(RMSNorm(h_{l-1}))          pre-norm residual attention
    h_l = a_l + MLP_l(RMSNorm(a_l))                   pre-norm residual SwiGLU MLP
    logits = RMSNorm(h_L) W_out^T                     W_out = E when embeddings are tied

* RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467): ``y = x / sqrt(mean(x^2) + eps) * w``.
* SwiGLU MLP (Shazeer 2020, arXiv:2002.05202): ``down(silu(gate(x)) * up(x))``.
* Attention: ``softmax(q k^T / sqrt(d_head) + causal mask) v`` per head; ``num_heads`` query
  heads share ``num_kv_heads`` key/value heads, query head ``i`` reading kv head
  ``i // (num_heads // num_kv_heads)`` (the order of Hugging Face's ``repeat_kv``).
* RoPE (Su et al., "RoFormer", arXiv:2104.09864) in Hugging Face's *rotate-half* layout: the
  head dimension ``d`` is split in halves and coordinate ``i < d/2`` is rotated together with
  coordinate ``i + d/2`` by the angle ``p * theta^(-2i/d)`` at position ``p`` (llama.cpp's
  interleaved layout pairs ``2i`` with ``2i+1`` instead; loaders must convert).

Everything computes in float32. There is no KV cache: :func:`greedy_generate` re-runs the
whole (fixed-length) window each step, which keeps one compiled program and is fast enough for
short continuations of a small model.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["LlamaConfig", "Llama", "RMSNorm", "Attention", "MLP", "Block", "apply_rope",
           "rope_angles", "greedy_generate"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Hyper-parameters of a LLaMA decoder (names as in Hugging Face's ``LlamaConfig``).

    Attributes:
      vocab_size: number of token ids.
      hidden_size: model width ``d``.
      intermediate_size: width of the SwiGLU MLP.
      num_layers: number of decoder blocks.
      num_heads: query heads; ``hidden_size`` must be a multiple of it.
      num_kv_heads: key/value heads (GQA); ``num_heads`` must be a multiple of it.
      rope_theta: RoPE base ``theta``.
      rms_norm_eps: the ``eps`` of every RMSNorm.
      max_position_embeddings: longest sequence the model is used for (the context length).
      tie_word_embeddings: the output projection is the token embedding matrix.

    Example:

    >>> from effjax.models.llama import LlamaConfig
    >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2,
    ...                   num_heads=4, num_kv_heads=2)
    >>> cfg.head_dim
    4
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads "
                             f"{self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads "
                             f"{self.num_kv_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"head_dim {self.hidden_size // self.num_heads} must be even for "
                             "RoPE")

    @property
    def head_dim(self) -> int:
        """Width of one attention head, ``hidden_size // num_heads``."""
        return self.hidden_size // self.num_heads


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """``(cos, sin)`` of the RoPE angles in rotate-half layout, each ``(*positions.shape, d)``.

    ``angle[p, i] = p * theta^(-2i/d)`` for ``i < d/2``, repeated for the second half
    (``concat([angle, angle])``), as Hugging Face's ``LlamaRotaryEmbedding`` computes it.

    Example:

    >>> import jax.numpy as jnp
    >>> from effjax.models.llama import rope_angles
    >>> cos, sin = rope_angles(jnp.arange(3), head_dim=4, theta=10000.0)
    >>> cos.shape, float(cos[0, 0]), float(sin[1, 0])  # position 1, frequency 1: sin(1)
    ((3, 4), 1.0, 0.8414709568023682)
    """
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x`` (``(..., T, heads, d)``) by RoPE: ``x * cos + rotate_half(x) * sin``.

    ``rotate_half([x1, x2]) = [-x2, x1]`` with ``x1, x2`` the two halves of the last axis, so
    the pair ``(x[i], x[i + d/2])`` is rotated by ``angle[i]``. ``cos``/``sin``: ``(T, d)``.

    Example:

    >>> import jax.numpy as jnp
    >>> from effjax.models.llama import apply_rope, rope_angles
    >>> x = jnp.array([[[1.0, 0.0, 0.0, 0.0]]])  # (T=1, heads=1, d=4), at position 1
    >>> cos, sin = rope_angles(jnp.array([1]), head_dim=4, theta=10000.0)
    >>> [round(float(v), 4) for v in apply_rope(x, cos, sin)[0, 0]]  # (cos 1, 0, sin 1, 0)
    [0.5403, 0.0, 0.8415, 0.0]
    """
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class RMSNorm(nnx.Module):
    """``y = x / sqrt(mean(x^2, axis=-1) + eps) * weight`` (float32), ``weight`` init 1.

    Example:

    >>> import jax.numpy as jnp
    >>> from effjax.models.llama import RMSNorm
    >>> y = RMSNorm(2, eps=0.0)(jnp.array([3.0, 4.0]))  # rms = sqrt(12.5)
    >>> [round(float(v), 4) for v in y]
    [0.8485, 1.1314]
    """

    def __init__(self, dim: int, *, eps: float = 1e-5):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return x * self.weight[...]


def _linear(din: int, dout: int, rngs: nnx.Rngs) -> nnx.Linear:
    # Kernel (din, dout): a Hugging Face / GGUF weight W of shape (dout, din) loads as W.T.
    return nnx.Linear(din, dout, use_bias=False, rngs=rngs,
                      kernel_init=nnx.initializers.normal(0.02))


class Attention(nnx.Module):
    """Causal grouped-query self-attention with RoPE (see the module docstring).

    ``q = x Wq`` (``num_heads`` heads), ``k = x Wk``, ``v = x Wv`` (``num_kv_heads`` heads),
    RoPE on ``q`` and ``k`` at positions ``0..T-1``, then per query head ``h`` with kv head
    ``g = h // (num_heads // num_kv_heads)``:
    ``o_h = softmax(q_h k_g^T / sqrt(d) + M) v_g`` with ``M[i, j] = -inf`` for ``j > i``, and
    the output ``concat_h(o_h) Wo``.
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.rope_theta = c.rope_theta
        self.q_proj = _linear(c.hidden_size, c.num_heads * c.head_dim, rngs)
        self.k_proj = _linear(c.hidden_size, c.num_kv_heads * c.head_dim, rngs)
        self.v_proj = _linear(c.hidden_size, c.num_kv_heads * c.head_dim, rngs)
        self.o_proj = _linear(c.num_heads * c.head_dim, c.hidden_size, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        *batch, t, _ = x.shape
        d, kv, rep = self.head_dim, self.num_kv_heads, self.num_heads // self.num_kv_heads
        q = self.q_proj(x).reshape(*batch, t, self.num_heads, d)
        k = self.k_proj(x).reshape(*batch, t, kv, d)
        v = self.v_proj(x).reshape(*batch, t, kv, d)
        cos, sin = rope_angles(jnp.arange(t), d, self.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = q.reshape(*batch, t, kv, rep, d)  # query head h = g * rep + r
        scores = jnp.einsum("...qgrd,...kgd->...grqk", q, k) / jnp.sqrt(jnp.float32(d))
        causal = jnp.tril(jnp.ones((t, t), bool))
        scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("...grqk,...kgd->...qgrd", probs, v)
        return self.o_proj(out.reshape(*batch, t, self.num_heads * d))


class MLP(nnx.Module):
    """SwiGLU feed-forward: ``down(silu(x Wgate) * (x Wup))``."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.gate_proj = _linear(config.hidden_size, config.intermediate_size, rngs)
        self.up_proj = _linear(config.hidden_size, config.intermediate_size, rngs)
        self.down_proj = _linear(config.intermediate_size, config.hidden_size, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    """One pre-norm decoder block: ``a = x + Attn(norm1(x))``; ``a + MLP(norm2(a))``."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Attention(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nnx.Module):
    """LLaMA causal language model: ``model(tokens) -> logits`` (float32).

    Parameters are laid out like Hugging Face's ``LlamaForCausalLM`` (``embed_tokens``,
    ``layers[i].self_attn.{q,k,v,o}_proj``, ``layers[i].mlp.{gate,up,down}_proj``,
    ``layers[i].{input,post_attention}_layernorm``, ``norm``, and ``lm_head`` unless the
    embeddings are tied), with every linear kernel stored as ``(in, out)``.

    Args:
      config: the :class:`LlamaConfig`.
      rngs: random streams for the (normal, std 0.02) initialization.

    Example:

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from effjax.models.llama import Llama, LlamaConfig
    >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2,
    ...                   num_heads=4, num_kv_heads=2)
    >>> model = Llama(cfg, rngs=nnx.Rngs(0))
    >>> logits = model(jnp.array([[1, 2, 3, 4, 5]]))
    >>> logits.shape, logits.dtype
    ((1, 5, 32), dtype('float32'))
    >>> # causal: the logits at position 2 do not depend on later tokens
    >>> bool(jnp.allclose(model(jnp.array([[1, 2, 3, 9, 9]]))[:, :3], logits[:, :3]))
    True
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, rngs=rngs,
                                      embedding_init=nnx.initializers.normal(0.02))
        self.layers = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if not config.tie_word_embeddings:
            self.lm_head = _linear(config.hidden_size, config.vocab_size, rngs)

    def hidden_states(self, tokens: jax.Array) -> jax.Array:
        """Final normalized hidden states ``RMSNorm(h_L)``, ``(batch, T, hidden_size)``."""
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an int array (batch, seq), got {tokens.dtype} "
                             f"{tokens.shape}")
        if tokens.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds "
                             f"max_position_embeddings {self.config.max_position_embeddings}")
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Output projection of hidden states: ``hidden @ W_out^T`` (``E`` when tied)."""
        if self.config.tie_word_embeddings:
            return hidden @ self.embed_tokens.embedding[...].T
        return self.lm_head(hidden)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Next-token logits ``(batch, T, vocab_size)`` for int tokens ``(batch, T)``."""
        return self.logits(self.hidden_states(tokens))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _greedy(graphdef, state, tokens, max_new_tokens):
    model = nnx.merge(graphdef, state)
    batch, t = tokens.shape
    buf = jnp.zeros((batch, t + max_new_tokens), jnp.int32).at[:, :t].set(tokens)

    def step(i, buf):
        # Causal attention: positions < i never see the not-yet-written zeros after them.
        hidden = model.hidden_states(buf)
        last = jax.lax.dynamic_index_in_dim(hidden, i - 1, axis=1, keepdims=False)
        return buf.at[:, i].set(jnp.argmax(model.logits(last), axis=-1).astype(jnp.int32))

    return jax.lax.fori_loop(t, t + max_new_tokens, step, buf)


def greedy_generate(model: Llama, tokens: jax.Array, max_new_tokens: int) -> jax.Array:
    """Greedy decoding: append ``argmax_v logits[-1, v]`` ``max_new_tokens`` times.

    ``x_{t+1} = argmax p(. | x_1..x_t)``. The whole loop is one jit-compiled
    ``lax.fori_loop`` over a fixed ``(batch, T + max_new_tokens)`` buffer; each step runs the
    model on the full buffer (no KV cache) and reads the logits at the last written position.
    No early stop at end-of-sequence tokens.

    Args:
      model: a :class:`Llama`.
      tokens: int prompt ids ``(batch, T)``, ``T >= 1``.
      max_new_tokens: number of tokens to append.

    Returns:
      int32 ``(batch, T + max_new_tokens)``: the prompt followed by the generated ids.

    Example:

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from effjax.models.llama import Llama, LlamaConfig, greedy_generate
    >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2,
    ...                   num_heads=4, num_kv_heads=2)
    >>> model = Llama(cfg, rngs=nnx.Rngs(0))
    >>> out = greedy_generate(model, jnp.array([[1, 2, 3]]), max_new_tokens=4)
    >>> out.shape
    (1, 7)
    >>> int(out[0, 3]) == int(model(jnp.array([[1, 2, 3]]))[0, -1].argmax())
    True
    """
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] < 1 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be a non-empty int array (batch, seq), got {tokens.dtype} "
                         f"{tokens.shape}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    total = tokens.shape[1] + max_new_tokens
    if total > model.config.max_position_embeddings:
        raise ValueError(f"prompt + max_new_tokens = {total} exceeds max_position_embeddings "
                         f"{model.config.max_position_embeddings}")
    graphdef, state = nnx.split(model)
    return _greedy(graphdef, state, tokens.astype(jnp.int32), max_new_tokens)
