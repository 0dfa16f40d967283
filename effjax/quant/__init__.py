"""effjax.quant: number formats (codebooks) and block-wise quantization.

The shared numeric core of effjax; optimizers, weight quantization and kernels build on it.
:mod:`effjax.quant.weights` holds the weight formats (bitsandbytes' NF4 / FP4 and double
quantization, int8 per row, int4 with groups).
"""

from effjax.quant import search, weights
from effjax.quant.blockwise import (
    QuantizedArray,
    block_layout,
    block_view,
    codes_shape,
    dequantize_blockwise,
    quantize_blockwise,
    round_scale,
    scales_shape,
    shard_layout,
)
from effjax.quant.codebooks import (
    adam4bit_first_moment_codebook,
    adam4bit_second_moment_codebook,
    check_codebook,
    dynamic_codebook,
    fp4_codebook,
    linear_codebook,
    nf4_codebook,
)

__all__ = [
    "search",
    "weights",
    "QuantizedArray",
    "block_layout",
    "block_view",
    "scales_shape",
    "codes_shape",
    "shard_layout",
    "dequantize_blockwise",
    "quantize_blockwise",
    "round_scale",
    "adam4bit_first_moment_codebook",
    "adam4bit_second_moment_codebook",
    "check_codebook",
    "dynamic_codebook",
    "fp4_codebook",
    "linear_codebook",
    "nf4_codebook",
]
