"""A decoder-only, character-level transformer LM (Flax NNX) of configurable size.

Pre-LayerNorm GPT blocks (Radford et al., 2019):

.. math::

  h &= x + W_o\\,\\mathrm{softmax}\\big(\\tfrac{(x W_q)(x W_k)^\\top}{\\sqrt{d_h}} + M\\big)(x W_v)
  \\quad\\text{(per head, on } \\mathrm{LN}(x))\\\\
  y &= h + W_2\\,\\mathrm{gelu}(W_1\\,\\mathrm{LN}(h))

with the causal mask :math:`M_{ij} = -\\infty` for :math:`j > i`, learned token and position
embeddings, a final LayerNorm and an untied output projection. Attention projections are
``nnx.LinearGeneral`` kernels of shape ``(width, heads, head_dim)`` (query/key/value) and
``(heads, head_dim, width)`` (output), the einsum layout of large JAX models.

Example::

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from effjax.models import CharTransformer, CharTransformerConfig
  >>> cfg = CharTransformerConfig(vocab_size=65, seq_len=32, width=64, depth=2, heads=4)
  >>> model = CharTransformer(cfg, rngs=nnx.Rngs(0))
  >>> model(jnp.zeros((2, 32), jnp.int32)).shape
  (2, 32, 65)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

__all__ = ["CharTransformerConfig", "CharTransformer", "next_token_loss"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class CharTransformerConfig:
    """Size of a :class:`CharTransformer`. ``width`` must be divisible by ``heads``."""

    vocab_size: int
    seq_len: int = 256
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 4

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")


class _Block(nnx.Module):
    def __init__(self, cfg: CharTransformerConfig, rngs: nnx.Rngs):
        d, h = cfg.width, cfg.heads
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.query = nnx.LinearGeneral(d, (h, d // h), rngs=rngs)
        self.key = nnx.LinearGeneral(d, (h, d // h), rngs=rngs)
        self.value = nnx.LinearGeneral(d, (h, d // h), rngs=rngs)
        self.out = nnx.LinearGeneral((h, d // h), d, axis=(-2, -1), rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, cfg.mlp_ratio * d, rngs=rngs)
        self.down = nnx.Linear(cfg.mlp_ratio * d, d, rngs=rngs)

    def __call__(self, x):
        y = self.ln1(x)
        q, k, v = self.query(y), self.key(y), self.value(y)  # (B, T, H, Dh)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
        t = x.shape[1]
        causal = jnp.tril(jnp.ones((t, t), bool))
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        x = x + self.out(att)
        return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


class CharTransformer(nnx.Module):
    """``tokens (batch, T) int -> logits (batch, T, vocab_size)``, ``T <= cfg.seq_len``."""

    def __init__(self, cfg: CharTransformerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.width, rngs=rngs)
        self.pos = nnx.Embed(cfg.seq_len, cfg.width, rngs=rngs)
        self.blocks = nnx.List([_Block(cfg, rngs) for _ in range(cfg.depth)])
        self.ln_f = nnx.LayerNorm(cfg.width, rngs=rngs)
        self.head = nnx.Linear(cfg.width, cfg.vocab_size, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        t = tokens.shape[1]
        if t > self.cfg.seq_len:
            raise ValueError(f"sequence of {t} tokens is longer than seq_len={self.cfg.seq_len}")
        x = self.embed(tokens) + self.pos(jnp.arange(t))[None]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def next_token_loss(model: CharTransformer, windows: jax.Array) -> jax.Array:
    """Mean cross-entropy of predicting ``windows[:, 1:]`` from ``windows[:, :-1]``."""
    windows = windows.astype(jnp.int32)
    logits = model(windows[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()
