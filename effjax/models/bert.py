"""BERT encoder (Devlin et al. 2019, arXiv:1810.04805) in Flax NNX, with the mean-pooled,
L2-normalized sentence embedding of Sentence-BERT (Reimers & Gurevych 2019, arXiv:1908.10084).

It reproduces Hugging Face ``BertModel`` in inference mode (no dropout): absolute position
embeddings, post-LayerNorm residual blocks, exact (erf) GELU. Weights for a real checkpoint
come from a loader such as :func:`effjax.models.minilm.load_minilm`.

For a sequence of token ids ``x`` with token types ``s`` and a 0/1 attention mask ``m``::

    h⁰_t = LN(E_word[x_t] + E_pos[t] + E_type[s_t])
    per layer, with heads of size d = hidden_size / num_heads:
      A = softmax(Q Kᵀ / √d + B),   B_tk = 0 if m_k = 1 else -inf     (Q = hW_q + b_q, ...)
      a = LN(h + concat_heads(A V) W_o + b_o)
      h ← LN(a + GELU(a W_1 + b_1) W_2 + b_2),   GELU(z) = z Φ(z)
    pooler (BERT's next-sentence head input):  tanh(h_0 W_p + b_p)
    sentence embedding:  u = Σ_t m_t h_t / max(Σ_t m_t, 1e-9),   e = u / max(‖u‖₂, 1e-12)

Linear kernels are stored as Flax lays them out, ``(in, out)``: ``y = x @ kernel + bias``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["BertConfig", "BertModel", "mean_pool", "l2_normalize", "sentence_embedding"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertConfig:
    """Shape and constants of a BERT encoder.

    Attributes:
      vocab_size: number of word-piece tokens.
      hidden_size: width ``H`` of every token vector.
      num_layers: number of transformer blocks.
      num_heads: attention heads; must divide ``hidden_size``.
      intermediate_size: width of the feed-forward block.
      max_position_embeddings: longest sequence the position table covers.
      type_vocab_size: number of token types (segments).
      layer_norm_eps: ``ε`` of every LayerNorm, ``(x - μ) / √(σ² + ε) γ + β``.
      pad_token_id: id of the padding token.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of "
                             f"num_heads={self.num_heads}")

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> BertConfig:
        """The config of a Hugging Face BERT ``config.json`` (a parsed dict).

        Raises ``ValueError`` for variants this module does not implement (a ``hidden_act``
        other than exact ``"gelu"``, relative position embeddings).

        >>> BertConfig.from_hf({"vocab_size": 30522, "hidden_size": 384,
        ...     "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536,
        ...     "hidden_act": "gelu"}).num_layers
        6
        """
        act = config.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"hidden_act={act!r} is not supported (only exact 'gelu')")
        pos = config.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise ValueError(f"position_embedding_type={pos!r} is not supported")
        return cls(vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
                   num_layers=config["num_hidden_layers"],
                   num_heads=config["num_attention_heads"],
                   intermediate_size=config["intermediate_size"],
                   max_position_embeddings=config.get("max_position_embeddings", 512),
                   type_vocab_size=config.get("type_vocab_size", 2),
                   layer_norm_eps=config.get("layer_norm_eps", 1e-12),
                   pad_token_id=config.get("pad_token_id", 0))


class BertEmbeddings(nnx.Module):
    """``LN(E_word[x_t] + E_pos[t] + E_type[s_t])``."""

    def __init__(self, config: BertConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        h, kw = config.hidden_size, dict(param_dtype=param_dtype, rngs=rngs)
        self.word = nnx.Embed(config.vocab_size, h, **kw)
        self.position = nnx.Embed(config.max_position_embeddings, h, **kw)
        self.token_type = nnx.Embed(config.type_vocab_size, h, **kw)
        self.norm = nnx.LayerNorm(h, epsilon=config.layer_norm_eps, **kw)

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        positions = jnp.arange(input_ids.shape[-1])
        return self.norm(self.word(input_ids) + self.position(positions)
                         + self.token_type(token_type_ids))


class BertLayer(nnx.Module):
    """One post-LayerNorm block: masked multi-head self-attention, then a GELU MLP."""

    def __init__(self, config: BertConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        h, f = config.hidden_size, config.intermediate_size
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.num_heads = config.num_heads
        self.query, self.key, self.value = (nnx.Linear(h, h, **kw) for _ in range(3))
        self.attention_out = nnx.Linear(h, h, **kw)
        self.attention_norm = nnx.LayerNorm(h, epsilon=config.layer_norm_eps, **kw)
        self.intermediate = nnx.Linear(h, f, **kw)
        self.output = nnx.Linear(f, h, **kw)
        self.output_norm = nnx.LayerNorm(h, epsilon=config.layer_norm_eps, **kw)

    def __call__(self, h: jax.Array, mask: jax.Array) -> jax.Array:
        *batch, t, width = h.shape
        heads = lambda x: x.reshape(*batch, t, self.num_heads, width // self.num_heads)
        q, k, v = heads(self.query(h)), heads(self.key(h)), heads(self.value(h))
        scores = jnp.einsum("...qnd,...knd->...nqk", q, k, preferred_element_type=jnp.float32)
        scores = scores / jnp.sqrt(jnp.float32(q.shape[-1]))
        scores = jnp.where(mask[..., None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        context = jnp.einsum("...nqk,...knd->...qnd", probs, v).reshape(*batch, t, width)
        a = self.attention_norm(h + self.attention_out(context))
        ffn = self.output(jax.nn.gelu(self.intermediate(a), approximate=False))
        return self.output_norm(a + ffn)


class BertModel(nnx.Module):
    """BERT encoder: embeddings, ``num_layers`` :class:`BertLayer` blocks and a pooler.

    ``model(input_ids, attention_mask, token_type_ids)`` returns the last hidden states,
    shape ``(..., T, hidden_size)``; ``model.pool(hidden)`` is BERT's ``tanh`` pooler on the
    first (``[CLS]``) token. ``attention_mask`` (1 = real token, 0 = padding) defaults to all
    ones and ``token_type_ids`` to zeros. Padded positions get hidden states too; they never
    influence the real ones (keys are masked), so drop them with the mask.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from effjax.models.bert import BertConfig, BertModel
    >>> cfg = BertConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=4,
    ...                  intermediate_size=32)
    >>> model = BertModel(cfg, rngs=nnx.Rngs(0))
    >>> ids = jnp.array([[2, 7, 9, 3, 0], [2, 5, 3, 0, 0]])
    >>> hidden = model(ids, attention_mask=ids != 0)
    >>> hidden.shape, model.pool(hidden).shape
    ((2, 5, 16), (2, 16))
    """

    def __init__(self, config: BertConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.config = config
        self.embeddings = BertEmbeddings(config, **kw)
        self.layers = nnx.List([BertLayer(config, **kw) for _ in range(config.num_layers)])
        self.pooler = nnx.Linear(config.hidden_size, config.hidden_size, **kw)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None) -> jax.Array:
        if input_ids.shape[-1] > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {input_ids.shape[-1]} exceeds "
                             f"max_position_embeddings={self.config.max_position_embeddings}")
        mask = (jnp.ones(input_ids.shape, bool) if attention_mask is None
                else jnp.asarray(attention_mask).astype(bool))
        types = jnp.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        h = self.embeddings(input_ids, types)
        for layer in self.layers:
            h = layer(h, mask)
        return h

    def pool(self, hidden: jax.Array) -> jax.Array:
        """BERT's pooled output ``tanh(h_[CLS] W_p + b_p)`` (not used by mean pooling)."""
        return jnp.tanh(self.pooler(hidden[..., 0, :]))


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """Average of the unmasked token vectors: ``Σ_t m_t h_t / max(Σ_t m_t, 1e-9)``.

    Args:
      hidden: ``(..., T, H)`` token vectors.
      mask: ``(..., T)``, 1 (or True) for real tokens, 0 for padding.

    Returns:
      ``(..., H)`` float32 means (zeros for a row with no real token).

    >>> import jax.numpy as jnp
    >>> from effjax.models.bert import mean_pool
    >>> mean_pool(jnp.array([[[1., 2.], [3., 4.], [100., 100.]]]), jnp.array([[1, 1, 0]]))
    Array([[2., 3.]], dtype=float32)
    """
    m = jnp.asarray(mask, jnp.float32)[..., None]
    total = jnp.sum(hidden.astype(jnp.float32) * m, axis=-2)
    return total / jnp.maximum(jnp.sum(m, axis=-2), 1e-9)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``x / max(‖x‖₂, eps)`` along the last axis (as ``torch.nn.functional.normalize``).

    >>> import jax.numpy as jnp
    >>> from effjax.models.bert import l2_normalize
    >>> l2_normalize(jnp.array([3., 4.]))
    Array([0.6, 0.8], dtype=float32)
    """
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def sentence_embedding(model: BertModel, input_ids: jax.Array, attention_mask: jax.Array,
                       token_type_ids: jax.Array | None = None) -> jax.Array:
    """Sentence-BERT embedding: ``l2_normalize(mean_pool(model(ids, mask), mask))``.

    Returns ``(..., hidden_size)`` float32 unit vectors; padding does not change them.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from effjax.models.bert import BertConfig, BertModel, sentence_embedding
    >>> cfg = BertConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2,
    ...                  intermediate_size=32)
    >>> model = BertModel(cfg, rngs=nnx.Rngs(0))
    >>> ids, mask = jnp.array([[2, 7, 3, 0]]), jnp.array([[1, 1, 1, 0]])
    >>> e = sentence_embedding(model, ids, mask)
    >>> bool(jnp.allclose(jnp.linalg.norm(e, axis=-1), 1.0))
    True
    >>> bool(jnp.allclose(e, sentence_embedding(model, ids[:, :3], mask[:, :3]), atol=1e-6))
    True
    """
    hidden = model(input_ids, attention_mask, token_type_ids)
    return l2_normalize(mean_pool(hidden, attention_mask))
