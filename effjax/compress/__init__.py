"""effjax.compress: weight quantization, QAT, sparsity and low-rank compression rewriters.

* Weight quantization (QLoRA bases): formats :class:`NF4`, :class:`FP4`, :class:`Int8`,
  :class:`Int4`; :func:`quantize_params` with ordered ``{regex: format}`` rules gives
  :class:`QuantizedWeight` nodes (bitsandbytes' bytes for NF4/FP4), :func:`materialize`
  dequantizes, :func:`quantization_report` prints bits per parameter.
* bitsandbytes 4-bit checkpoints: :func:`to_bnb_state_dict` / :func:`from_bnb_state_dict`,
  :func:`save_bnb_checkpoint` / :func:`load_bnb_checkpoint` (no dequantization).
* LoftQ / LQ-LoRA: :func:`loftq_init`, :func:`lq_lora_decompose`, :func:`lq_lora_allocate`
  (a quantized base plus low-rank factors; mixed formats under a byte budget).
* Fake quantization with a straight-through estimator (QAT): :func:`fake_quantize`, and the
  param-tree rewriter :func:`fake_quantize_params` with ordered ``{regex: FakeQuant}`` rules.
"""

from effjax.compress.bnb_format import (
    from_bnb_state_dict,
    load_bnb_checkpoint,
    save_bnb_checkpoint,
    to_bnb_state_dict,
)
from effjax.compress.fake_quant import FakeQuant, fake_quantize, fake_quantize_params
from effjax.compress.loftq import loftq_init, lq_lora_allocate, lq_lora_decompose
from effjax.compress.weight_quant import (
    FP4,
    NF4,
    Int4,
    Int8,
    QuantizedWeight,
    WeightFormat,
    bits_per_parameter,
    dense_weight,
    is_quantized,
    materialize,
    quantization_report,
    quantize_params,
    quantize_weight,
)

__all__ = [
    "WeightFormat", "NF4", "FP4", "Int8", "Int4", "QuantizedWeight", "quantize_params",
    "quantize_weight", "materialize", "is_quantized", "dense_weight", "quantization_report",
    "bits_per_parameter",
    "to_bnb_state_dict", "from_bnb_state_dict", "save_bnb_checkpoint", "load_bnb_checkpoint",
    "loftq_init", "lq_lora_decompose", "lq_lora_allocate",
    "fake_quantize", "FakeQuant", "fake_quantize_params",
]
