"""Which axes of a kernel are input, output and batch axes: :mod:`effjax.quant.kernel_layout`.

The layout is shared by adapters (here) and weight quantization (:mod:`effjax.compress`), so it
lives in the numeric core; this module re-exports it under its old name.
"""

from effjax.quant.kernel_layout import KernelLayout, axes_field, normalize_axes, place_like

__all__ = ["KernelLayout", "axes_field", "normalize_axes", "place_like"]
