"""LoftQ as a rewriter: quantize chosen kernels and start their LoRA adapters from LoftQ.

:func:`inject_loftq` is :func:`effjax.peft.inject` for QLoRA with a quantization-aware init:
each leaf a :class:`LoftQ` rule targets becomes a LoRA node whose frozen base is
:math:`Q_T` and whose factors are LoftQ's (:func:`effjax.compress.loftq_init`), so
``materialize`` gives :math:`\\mathrm{deq}(Q_T) + s\\,AB \\approx W` at step 0 instead of
:math:`\\mathrm{deq}(Q(W))`. The node is an ordinary LoRA node over a quantized base (the same
layers, optimizer, ``merge`` and PEFT export apply).

Reference: Li et al., "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models",
ICLR 2024; PEFT's ``LoraConfig(init_lora_weights="loftq")``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from effjax.compress import NF4, WeightFormat, loftq_init
from effjax.peft.lora import LoRA
from effjax.peft.tree import leaf_key
from effjax.selection import rewrite

__all__ = ["LoftQ", "inject_loftq"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoftQ:
    """A rule value of :func:`inject_loftq`.

    Attributes:
      lora: the adapter (its rank, alpha, rsLoRA flag, dtype and axes); its ``init`` must be
        the default (LoftQ replaces it).
      quant: the base's format (default: QLoRA's NF4 with double quantization); its axes are
        taken from ``lora``.
      iters: LoftQ's alternating steps :math:`T \\ge 1` (PEFT's ``loftq_iter``).
    """

    lora: LoRA = dataclasses.field(default_factory=lambda: LoRA(rank=16, alpha=16.0))
    quant: WeightFormat = dataclasses.field(default_factory=NF4)
    iters: int = 1

    def __post_init__(self):
        if not isinstance(self.lora, LoRA) or type(self.lora) is not LoRA:
            raise TypeError(f"LoftQ.lora must be a LoRA config, got {type(self.lora).__name__}")
        if self.lora.init not in ("kaiming", "gaussian"):
            raise ValueError(f"LoftQ sets the adapter's init itself; "
                             f"LoRA(init={self.lora.init!r}) would change the base too")
        if not isinstance(self.quant, WeightFormat):
            raise TypeError(f"LoftQ.quant must be a WeightFormat (NF4(), FP4(), Int8(), "
                            f"Int4()), got {type(self.quant).__name__}")
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 1:
            raise ValueError(f"LoftQ.iters must be an int >= 1, got {self.iters!r}")


def _adapt(key: jax.Array, w: jax.Array, cfg: LoftQ):
    lora = cfg.lora
    lay = lora.layout(w.shape)
    fmt = dataclasses.replace(cfg.quant, in_axes=lay.in_axes, batch_axes=lay.batch_axes)
    q, a, b = loftq_init(w, fmt, rank=lora.rank, iters=cfg.iters, alpha=lora.alpha,
                         rslora=lora.rslora)
    node = lora.adapt(key, q)  # a LoRA node over the quantized base (b = 0 so far)
    return node.replace(a=a.astype(node.a.dtype), b=b.astype(node.b.dtype))


def inject_loftq(params: Any, rules: Any, *, key: jax.Array) -> Any:
    """Quantize the leaves ``rules`` target and give each a LoftQ-initialized LoRA adapter.

    Args:
      params: a pytree of arrays (Linen ``params``, NNX ``State``).
      rules: ordered ``{regex: LoftQ | None}`` (:mod:`effjax.selection`).
      key: a PRNG key (LoRA's own init is replaced; the key only feeds ``adapt``).

    Returns:
      The tree with LoRA nodes over :class:`~effjax.compress.QuantizedWeight` bases at the
      targeted leaves.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from effjax.compress import NF4, quantize_params
      >>> from effjax.peft import LoRA, materialize
      >>> w = jax.random.normal(jax.random.key(0), (128, 64))
      >>> cfg = LoftQ(lora=LoRA(rank=8, alpha=16.0), quant=NF4(double_quant=False))
      >>> tree = inject_loftq({'k': w}, {'k': cfg}, key=jax.random.key(1))
      >>> plain = quantize_params({'k': w}, {'k': NF4(double_quant=False)})
      >>> err = lambda t: float(jnp.linalg.norm(materialize(t)['k'] - w))
      >>> err(tree) < err(plain)  # LoftQ starts closer to W than quantization alone
      True
    """
    return rewrite(params, rules, lambda path, leaf, cfg: _adapt(leaf_key(key, path),
                                                               jnp.asarray(leaf), cfg),
                   accept=LoftQ, what="a LoftQ", floating=True)
