"""effjax.nn: Flax layers and losses.

* StableMax and its cross-entropy (Prieto et al. 2025, "Grokking at the Edge of Numerical
  Stability").
* Activation fake quantization (per token, straight-through) for NNX and Linen models.
"""

from effjax.nn.fake_quant import (
    ActivationFakeQuant,
    fake_quantize_activations,
    linen_activation_fake_quant,
    quantize_activations,
)
from effjax.nn.stablemax import log_s, log_stablemax, stablemax, stablemax_cross_entropy

__all__ = ["stablemax", "log_stablemax", "stablemax_cross_entropy", "log_s",
           "fake_quantize_activations", "ActivationFakeQuant", "quantize_activations",
           "linen_activation_fake_quant"]
