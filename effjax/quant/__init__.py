"""effjax.quant: number formats (codebooks) and block-wise quantization.

The shared numeric core of effjax; optimizers, weight quantization and kernels build on it.
"""

from effjax.quant import search
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
