"""effjax.compress: weight quantization, QAT, sparsity and low-rank compression rewriters.

* Fake quantization with a straight-through estimator (QAT): :func:`fake_quantize`, and the
  param-tree rewriter :func:`fake_quantize_params` with ordered ``{regex: FakeQuant}`` rules.
"""

from effjax.compress.fake_quant import FakeQuant, fake_quantize, fake_quantize_params

__all__ = ["fake_quantize", "FakeQuant", "fake_quantize_params"]
