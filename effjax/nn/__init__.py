"""effjax.nn: Flax layers and losses.

* StableMax and its cross-entropy (Prieto et al. 2025, "Grokking at the Edge of Numerical
  Stability").
* Layer interception (:mod:`effjax.nn.interception`): one mechanism by which Flax NNX and Linen
  ``Linear``/``Dense``, ``LinearGeneral``/``DenseGeneral`` and ``Einsum`` layers run their
  kernel contraction through hooks (:func:`intercept`, :func:`linen_intercept`) and read
  structured kernels such as adapter nodes; used by the adapter fast path, activation fake
  quantization and :func:`effjax.peft.calibrate`.
* Activation fake quantization (per token, straight-through) for NNX and Linen models.
* Adapter-aware linear layers (:mod:`effjax.nn.lora_layers`): ``x W + (x A) B`` for
  LoRA-family nodes without building the dense delta, for NNX (:func:`adapted_layers`) and
  Linen (:func:`linen_adapted_layers`) models.
"""

from effjax.nn._stablemax import log_s, log_stablemax, stablemax, stablemax_cross_entropy
from effjax.nn.fake_quant import (
    ActivationFakeQuant,
    FakeQuantActivations,
    fake_quantize_activations,
    linen_activation_fake_quant,
    quantize_activations,
)
from effjax.nn.interception import (
    LayerCall,
    contract,
    intercept,
    is_intercepted,
    layer_hooks,
    linen_intercept,
)
from effjax.nn.lora_layers import (
    AdaptedDense,
    AdaptedDenseGeneral,
    AdaptedEinsum,
    AdaptedLinear,
    AdaptedLinearGeneral,
    LowRankAdapter,
    adapted_dot_general,
    adapted_einsum,
    adapted_layers,
    has_low_rank_factors,
    linen_adapted_layers,
)

__all__ = ["stablemax", "log_stablemax", "stablemax_cross_entropy", "log_s",
           "LayerCall", "contract", "intercept", "linen_intercept", "layer_hooks",
           "is_intercepted",
           "fake_quantize_activations", "FakeQuantActivations", "ActivationFakeQuant",
           "quantize_activations", "linen_activation_fake_quant",
           "LowRankAdapter", "has_low_rank_factors", "adapted_einsum", "adapted_dot_general",
           "AdaptedLinear", "AdaptedLinearGeneral", "AdaptedEinsum", "adapted_layers",
           "AdaptedDense", "AdaptedDenseGeneral", "linen_adapted_layers"]
