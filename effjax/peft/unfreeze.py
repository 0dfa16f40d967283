"""Unfreeze: train a leaf fully (PEFT's ``modules_to_save``, e.g. a new classifier head).

Every leaf that no rule targets is frozen. ``{r'head/.*': Unfreeze()}`` makes the matched leaves
trainable as they are: :math:`W' = W`, :math:`\\prod_i n_i` trainable parameters (the leaf's
size). Works on any floating leaf (kernels, biases, norms, embeddings).

Example:
  >>> import jax, jax.numpy as jnp
  >>> node = Unfreeze().adapt(jax.random.key(0), jnp.ones((3,)))
  >>> node.materialize()
  Array([1., 1., 1.], dtype=float32)
  >>> Unfreeze().num_trainable((4, 3))
  12
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax

from effjax.peft.base import AdapterMethod, AdapterNode, adapter_node, register_adapter

__all__ = ["Unfreeze", "UnfrozenWeight"]


@register_adapter("unfreeze")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Unfreeze(AdapterMethod):
    """Make a leaf fully trainable (no adapter): :math:`W' = W`."""

    def adapt(self, key: jax.Array, w: jax.Array) -> UnfrozenWeight:
        """Wrap ``w`` (``key`` is unused)."""
        del key
        return UnfrozenWeight(w=w, method=self)

    def num_trainable(self, shape: Sequence[int]) -> int:
        """The leaf's size."""
        return math.prod(shape)


@adapter_node
class UnfrozenWeight(AdapterNode):
    """A fully trainable leaf ``w``; ``materialize()`` is ``w``."""

    trainable_fields = ("w",)

    w: jax.Array
    method: Unfreeze

    def materialize(self) -> jax.Array:
        return self.w
