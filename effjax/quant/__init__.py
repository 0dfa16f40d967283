"""effjax.quant: number formats (codebooks) and block-wise quantization.

The shared numeric core of effjax; optimizers, weight quantization and kernels build on it.
"""

from effjax.quant import search
from effjax.quant.blockwise import (
    QuantizedArray,
    block_layout,
    block_view,
    dequantize_blockwise,
    quantize_blockwise,
    round_scale,
    scales_shape,
)
from effjax.quant.codebooks import (
    adam4bit_first_moment_codebook,
    adam4bit_second_moment_codebook,
    dynamic_codebook,
    fp4_codebook,
    linear_codebook,
    nf4_codebook,
)

__all__ = [
    "search",
    "QuantizedArray",
    "block_layout",
    "block_view",
    "scales_shape",
    "dequantize_blockwise",
    "quantize_blockwise",
    "round_scale",
    "adam4bit_first_moment_codebook",
    "adam4bit_second_moment_codebook",
    "dynamic_codebook",
    "fp4_codebook",
    "linear_codebook",
    "nf4_codebook",
]
