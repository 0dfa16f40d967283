"""effjax.peft: parameter-efficient fine-tuning methods as param-tree rewriters.

Rules ``{regex: method}`` pick leaves of a param tree (Linen ``params`` dict or NNX ``State``) by
their '/'-joined path; :func:`inject` replaces each with an adapter node; :func:`materialize`
turns the tree back into dense params for any model code.

* Methods: :class:`LoRA` (gaussian / kaiming / PiSSA / OLoRA inits, rsLoRA; multi-axis and
  stacked kernels), :class:`DoRA`, :class:`VeRA`, :class:`NOLA`, :class:`RandLoRA`,
  :class:`MiSS` (= :class:`Bone`), :class:`MoS`, :class:`SVFit`, :class:`LoLDU`,
  :class:`LoRAXS`, :class:`LoRASB`, :class:`LaMDA` (with :func:`lamda_freeze`),
  :class:`WeLore` (ranks from :func:`welore_rules`), :class:`EVA` (ranks from
  :func:`eva_rules`), :class:`CorDA` (KPA / IPA), :class:`Unfreeze` (train a leaf fully,
  PEFT's ``modules_to_save``).
* Data-driven inits: :func:`calibrate` (layer-input statistics of Linen and NNX models) and
  :func:`gradient_calibration` (mean loss gradients), passed as ``inject(...,
  calibration=...)``.
* Tree functions: :func:`inject`, :func:`materialize`, :func:`merge`, :func:`trainable_mask`,
  :func:`split` / :func:`combine`, :func:`summary`.
* Quantized bases (QLoRA): a leaf that is an :class:`effjax.compress.QuantizedWeight` keeps
  its 4-/8-bit base inside the adapter node (methods that rewrite the base refuse it);
  :func:`inject_loftq` with :class:`LoftQ` rules starts the adapters from LoftQ; ``merge``
  folds adapters into quantized bases three ways.
* I/O: :func:`save_adapters` / :func:`load_adapters` (orbax; trainable arrays + configs only);
  :func:`save_peft_adapter` / :func:`load_peft_adapter` (Hugging Face PEFT's
  ``adapter_model.safetensors`` + ``adapter_config.json``; :func:`llama_module_names` for
  SmolLM2).
* Interface for new methods (see :mod:`effjax.peft.base`): :class:`AdapterMethod` and
  :class:`KernelAdapter` (configs, with the shared ``dtype`` / axes fields), :class:`AdapterNode`
  and :func:`adapter_node` (nodes), :func:`register_adapter` (the stable name checkpoints
  store), :class:`KernelLayout`.

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

from effjax.peft._calibrate import InputStats, calibrate, input_stats
from effjax.peft.base import (
    AdapterMethod,
    AdapterNode,
    KernelAdapter,
    adapter_node,
    is_adapter,
    method_from_config,
    method_to_config,
    register_adapter,
    registered_adapters,
)
from effjax.peft.corda import CorDA, corda_decompose
from effjax.peft.dora import DoRA, DoRAWeight
from effjax.peft.eva import EVA, eva_components, eva_rules
from effjax.peft.gradients import gradient_calibration
from effjax.peft.hf_format import (
    from_peft_state_dict,
    llama_module_names,
    load_peft_adapter,
    save_peft_adapter,
    to_peft_state_dict,
)
from effjax.peft.io import load_adapters, read_adapter_config, save_adapters
from effjax.peft.lamda import LaMDA, LaMDAFreezeState, LaMDAWeight, frozen_components, lamda_freeze
from effjax.peft.layout import KernelLayout
from effjax.peft.loftq import LoftQ, inject_loftq
from effjax.peft.loldu import LoLDU, LoLDUScaleWeight, LoLDUWeight, ldu_decompose
from effjax.peft.lora import LoRA, LoRAWeight
from effjax.peft.lora_sb import LoRASB, LoRASBWeight
from effjax.peft.lora_xs import LoRAXS, LoRAXSWeight
from effjax.peft.miss import Bone, MiSS, MiSSWeight
from effjax.peft.mos import MoS, MoSWeight, mos_routing
from effjax.peft.nola import NOLA, NOLAWeight
from effjax.peft.randlora import RandLoRA, RandLoRAWeight, randlora_bases, randlora_num_bases
from effjax.peft.rules import Rule, assign_rules, compile_rules
from effjax.peft.svfit import SVFit, SVFitWeight
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
from effjax.peft.welore import (
    WeLore,
    WeLoreWeight,
    welore_ranks,
    welore_rules,
    welore_spectra,
    welore_threshold,
)

__all__ = [
    "LoRA", "LoRAWeight", "DoRA", "DoRAWeight", "VeRA", "VeRAWeight", "NOLA", "NOLAWeight",
    "Unfreeze", "UnfrozenWeight", "RandLoRA", "RandLoRAWeight", "randlora_bases",
    "randlora_num_bases", "MiSS", "Bone", "MiSSWeight", "MoS", "MoSWeight", "mos_routing",
    "SVFit", "SVFitWeight", "LoLDU", "LoLDUWeight", "LoLDUScaleWeight", "ldu_decompose",
    "LoRAXS", "LoRAXSWeight", "LoRASB", "LoRASBWeight", "LaMDA", "LaMDAWeight", "lamda_freeze",
    "LaMDAFreezeState", "frozen_components", "WeLore", "WeLoreWeight", "welore_spectra",
    "welore_threshold", "welore_ranks", "welore_rules", "EVA", "eva_components", "eva_rules",
    "CorDA", "corda_decompose",
    "calibrate", "input_stats", "InputStats", "gradient_calibration",
    "inject", "materialize", "merge", "trainable_mask", "split", "combine", "summary", "Summary",
    "adapter_paths", "leaf_key", "save_adapters", "load_adapters", "read_adapter_config",
    "save_peft_adapter", "load_peft_adapter", "to_peft_state_dict", "from_peft_state_dict",
    "llama_module_names", "LoftQ", "inject_loftq",
    "AdapterMethod", "KernelAdapter", "AdapterNode", "adapter_node", "is_adapter",
    "register_adapter", "registered_adapters", "method_to_config", "method_from_config",
    "KernelLayout", "Rule", "compile_rules", "assign_rules",
]
