"""Argument and input checks shared by the effjax.optim transformations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def check_quant_args(*, bits, block_size, min_quantized_size) -> None:
    """Raise ``ValueError`` for settings no low-bit state can have."""
    for name, value in (("bits", bits), ("block_size", block_size),
                        ("min_quantized_size", min_quantized_size)):
        if isinstance(value, jax.Array):
            raise ValueError(
                f"{name} must be a Python int (it fixes array shapes), got an array; with "
                f"optax.inject_hyperparams pass static_args=('block_size', "
                f"'min_quantized_size') or leave them at their None defaults")
    if isinstance(bits, bool) or bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if block_size is not None:
        if (not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool)
                or block_size < 2):
            raise ValueError(f"block_size must be an int >= 2, got {block_size!r}")
        if bits == 4 and block_size % 2:
            raise ValueError(f"4-bit states pack two codes a byte: block_size must be even, "
                             f"got {block_size}")
    if (not isinstance(min_quantized_size, (int, np.integer))
            or isinstance(min_quantized_size, bool) or min_quantized_size < 0):
        raise ValueError(f"min_quantized_size must be an int >= 0, got {min_quantized_size!r}")


def check_float_params(params, *, where: str) -> None:
    """Raise ``TypeError`` naming the first parameter leaf that is not floating point."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            name = jax.tree_util.keystr(path) or "<root>"
            raise TypeError(
                f"{where}: parameter {name} has dtype {dtype} (type {type(leaf).__name__}); "
                "low-bit optimizer states need floating-point parameters. Exclude it with "
                "optax.masked / optax.multi_transform or cast it to a float dtype.")
