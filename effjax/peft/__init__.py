"""effjax.peft: parameter-efficient fine-tuning methods as param-tree rewriters.

Rules ``{regex: method}`` pick leaves of a param tree (Linen ``params`` dict or NNX ``State``) by
their '/'-joined path; :func:`inject` replaces each with an adapter node; :func:`materialize`
turns the tree back into dense params for any model code.

* Methods: :class:`LoRA` (gaussian / kaiming init, rsLoRA; multi-axis and stacked kernels),
  :class:`Unfreeze` (train a leaf fully, PEFT's ``modules_to_save``).
* Tree functions: :func:`inject`, :func:`materialize`, :func:`merge`, :func:`trainable_mask`,
  :func:`split` / :func:`combine`, :func:`summary`.
* I/O: :func:`save_adapters` / :func:`load_adapters` (orbax; trainable arrays + configs only).
* Interface for new methods: :class:`AdapterMethod`, :class:`AdapterNode`,
  :func:`adapter_node` (see :mod:`effjax.peft.base`), :class:`KernelLayout`.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from effjax.peft import LoRA, inject, materialize, split, combine, summary
  >>> params = {'dense': {'kernel': jnp.ones((8, 4)), 'bias': jnp.zeros(4)}}
  >>> tree = inject(params, {r'.*/kernel': LoRA(rank=2, alpha=4.0)}, key=jax.random.key(0))
  >>> trainable, frozen = split(tree)
  >>> loss = lambda t: materialize(combine(t, frozen))['dense']['kernel'].sum()
  >>> sorted(x.shape for x in jax.tree.leaves(jax.grad(loss)(trainable)))
  [(2, 4), (8, 2)]
  >>> print(summary(tree).trainable)  # 2 * (8 + 4)
  24
"""

from effjax.peft.base import (
    AdapterMethod,
    AdapterNode,
    adapter_node,
    is_adapter,
    method_from_config,
    method_to_config,
)
from effjax.peft.dora import DoRA, DoRAWeight
from effjax.peft.io import load_adapters, read_adapter_config, save_adapters
from effjax.peft.layout import KernelLayout
from effjax.peft.lora import LoRA, LoRAWeight
from effjax.peft.nola import NOLA, NOLAWeight
from effjax.peft.rules import Rule, assign_rules, compile_rules
from effjax.peft.tree import (
    Summary,
    adapter_paths,
    combine,
    inject,
    leaf_key,
    materialize,
    merge,
    split,
    summary,
    trainable_mask,
)
from effjax.peft.unfreeze import Unfreeze, UnfrozenWeight
from effjax.peft.vera import VeRA, VeRAWeight

__all__ = [
    "LoRA", "LoRAWeight", "DoRA", "DoRAWeight", "VeRA", "VeRAWeight", "NOLA", "NOLAWeight",
    "Unfreeze", "UnfrozenWeight",
    "inject", "materialize", "merge", "trainable_mask", "split", "combine", "summary", "Summary",
    "adapter_paths", "leaf_key", "save_adapters", "load_adapters", "read_adapter_config",
    "AdapterMethod", "AdapterNode", "adapter_node", "is_adapter", "method_to_config",
    "method_from_config", "KernelLayout", "Rule", "compile_rules", "assign_rules",
]
