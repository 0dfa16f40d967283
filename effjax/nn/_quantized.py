"""Contractions with a quantized kernel (QLoRA's frozen base) that keep no dense copy of it.

:func:`quantized_einsum` computes ``einsum(x, dequant(W_q))`` with a custom VJP: the forward
pass dequantizes ``W_q`` into a temporary, the backward pass dequantizes it again to form
``dx = g dequant(W_q)^T``, so the residual kept between the two is the quantized kernel
itself (4.1 bits a weight for NF4 with double quantization), not a dense copy (16 or 32). The
base is frozen: its cotangent is zero (``float0`` for the integer codes). Used by the layer
interception (:func:`effjax.nn.contract`) for :class:`~effjax.compress.QuantizedWeight`
kernels and for LoRA-family nodes over them (:func:`effjax.nn.adapted_einsum`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from effjax.compress import QuantizedWeight

__all__ = ["quantized_einsum"]


def _zero_cotangent(a: jax.Array):
    if jnp.issubdtype(a.dtype, jnp.floating):
        return jnp.zeros_like(a)
    return np.zeros(a.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _qeinsum(specs, dtype, precision, x, qw):
    x_spec, k_spec, o_spec = specs
    w = qw.materialize().astype(dtype)
    return jnp.einsum(f"{x_spec},{k_spec}->{o_spec}", x, w, precision=precision)


def _qeinsum_fwd(specs, dtype, precision, x, qw):
    return _qeinsum(specs, dtype, precision, x, qw), qw


def _qeinsum_bwd(specs, dtype, precision, qw, g):
    x_spec, k_spec, o_spec = specs
    w = qw.materialize().astype(dtype)  # dequantized again: no dense residual
    dx = jnp.einsum(f"{o_spec},{k_spec}->{x_spec}", g.astype(dtype), w, precision=precision)
    return dx, jax.tree.map(_zero_cotangent, qw)


_qeinsum.defvjp(_qeinsum_fwd, _qeinsum_bwd)


def quantized_einsum(x_spec: str, k_spec: str, o_spec: str, x: jax.Array, qw: QuantizedWeight,
                     *, dtype: Any = None, precision: Any = None) -> jax.Array:
    """``einsum(x_spec,k_spec->o_spec, x, dequant(qw))`` in ``dtype`` (default: promoted from
    ``x`` and the kernel's dtype), differentiable in ``x`` only, with no dense kernel kept
    for the backward pass (module docstring).

    Args:
      x_spec, k_spec, o_spec: explicit einsum specs (every letter of ``x_spec`` must appear
        in ``k_spec`` or ``o_spec``, as in a linear layer).
      x: the input.
      qw: the quantized kernel, of ``k_spec``'s rank.
      dtype, precision: the computation dtype and the einsum precision.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from effjax.compress import NF4, quantize_params
      >>> qw = quantize_params({'w': jnp.ones((64, 8))}, {'w': NF4()})['w']
      >>> x = jnp.ones((2, 64))
      >>> quantized_einsum('bi', 'io', 'bo', x, qw)[0, :2]
      Array([64., 64.], dtype=float32)
      >>> jax.grad(lambda x: quantized_einsum('bi', 'io', 'bo', x, qw).sum())(x)[0, :2]
      Array([8., 8.], dtype=float32)
    """
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"quantized_einsum needs a QuantizedWeight, got {type(qw).__name__}")
    if len(k_spec) != qw.ndim or len(x_spec) != jnp.ndim(x):
        raise ValueError(f"einsum specs {x_spec},{k_spec}->{o_spec} do not fit an input of "
                         f"shape {jnp.shape(x)} and a quantized kernel of shape {qw.shape}")
    if not set(x_spec) <= set(k_spec) | set(o_spec):
        raise ValueError(f"einsum specs {x_spec},{k_spec}->{o_spec} sum an input axis away "
                         f"before the kernel; a quantized kernel needs a linear layer's "
                         f"contraction")
    dt = jnp.dtype(dtype) if dtype is not None else jnp.result_type(x, qw.dtype)
    return _qeinsum((x_spec, k_spec, o_spec), dt, precision, jnp.asarray(x, dt), qw)
