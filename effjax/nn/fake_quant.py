"""Per-token activation fake quantization for the inputs of linear layers (NNX and Linen).

The input :math:`x` of a linear layer is quantize-dequantized with one symmetric absmax scale
per token (per row over the features the layer contracts):

.. math::

  s_t = \\frac{\\max_j |x_{t,j}|}{2^{b-1} - 1}, \\qquad
  \\hat x_{t,j} = s_t\\, \\mathrm{clip}\\big(\\mathrm{round}(x_{t,j} / s_t),
  -(2^{b-1}-1),\\, 2^{b-1}-1\\big),

then the layer runs on :math:`\\hat x`, with an identity straight-through gradient
(:math:`\\partial \\hat x / \\partial x = I`), so :math:`\\partial L/\\partial x = g W^\\top` and
:math:`\\partial L/\\partial W = \\hat x^\\top g` as in Stable-SPAM's ``A8Linear``. Combined with
:func:`effjax.compress.fake_quant.fake_quantize_params` on the weights this is W4A4 / W8A8
quantization-aware training. The default is plain per-token absmax (LLM-QAT, SmoothQuant).

Stable-SPAM's INT4 run (``INT4_scripts/350-stablespam-int4.sh``) quantizes the activations with
the *weight* settings, because ``QLinear`` overwrites ``A8Linear``'s class attributes: 4 bits,
groups of 256 consecutive features, the 2 largest-magnitude values of each group kept in full
precision, round-to-nearest (its ``--act_bits``, ``--act_group_size`` and ``--act_stochastic``
flags are parsed but unused), on the q/k/v/o/gate/up/down projections only (not the LM head).
Here: ``quantize_activations(model, r'blocks/.*', bits=4, group_size=256, outliers=2)``.

Which axes form a "token's features": the axes the layer contracts with its kernel, i.e.
``-1`` for ``nnx.Linear`` / ``nn.Dense``, ``layer.axis`` for ``nnx.LinearGeneral`` /
``nn.DenseGeneral`` (an attention output projection contracting ``(heads, head_dim)`` gets one
scale per token) and the contracted letters of an ``Einsum``.

:func:`quantize_activations` (NNX) and :func:`linen_activation_fake_quant` (Linen) attach the
hook :class:`FakeQuantActivations` through the layer interception of
:mod:`effjax.nn.interception`: the layers keep their classes and parameter paths and quantize
the input their kernel contracts (after the layer's dtype promotion).

References:
  Huang et al., "Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam",
  arXiv:2502.17055, 2025 (``utils/act_weight_quantization.py``, ``utils/dummy_quant.py``).
  Liu et al., "LLM-QAT: Data-Free Quantization Aware Training for Large Language Models", 2023.
  Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for LLMs", 2023.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from effjax.compress import fake_quantize
from effjax.nn.interception import intercept, layer_hooks, linen_intercept
from effjax.selection import no_selection_message, path_str, selector

__all__ = [
    "fake_quantize_activations",
    "FakeQuantActivations",
    "ActivationFakeQuant",
    "quantize_activations",
    "linen_activation_fake_quant",
]

Where = str | Callable[[str, Any], bool] | None


def fake_quantize_activations(
    x: jax.Array,
    bits: int,
    *,
    axis: int | Sequence[int] = -1,
    group_size: int | None = None,
    outliers: int = 0,
) -> jax.Array:
    """Symmetric per-token fake quantization of activations ``x`` (identity STE gradient).

    One absmax scale per token: :math:`\\hat x = s\\,\\mathrm{clip}(\\mathrm{round}(x/s),
    -q_{\\max}, q_{\\max})`, :math:`s = \\max_{\\text{axis}} |x| / q_{\\max}`,
    :math:`q_{\\max} = 2^{b-1}-1`. A token of zeros stays exactly zero.

    Args:
      x: floating activations ``(..., features)``.
      bits: 2..16 (int4: levels -7..7; int8: -127..127).
      axis: the feature axes of a token (default ``-1``).
      group_size: scale per group of this many consecutive features instead of per token.
      outliers: keep this many largest-magnitude values per group in full precision.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[1.4, -0.2, 0.5], [-7.0, 3.0, 1.0]])
      >>> fake_quantize_activations(x, 4)  # scales 0.2 and 1.0
      Array([[ 1.4, -0.2,  0.4],
             [-7. ,  3. ,  1. ]], dtype=float32)
    """
    return fake_quantize(x, bits=bits, axis=axis, symmetric=True, group_size=group_size,
                         outliers=outliers)


def _validate(bits: int, group_size: int | None, outliers: int) -> None:
    """Raise now (not at the first call) on a bad configuration; traces shapes only."""
    n = max(8, outliers + 1, group_size or 0)
    jax.eval_shape(lambda x: fake_quantize_activations(x, bits, group_size=group_size,
                                                       outliers=outliers),
                   jax.ShapeDtypeStruct((n,), jnp.float32))


def _contracted_axes(layer: Any) -> int | tuple[int, ...]:
    axis = getattr(layer, "axis", -1)
    return tuple(axis) if isinstance(axis, (list, tuple)) else int(axis)


@dataclasses.dataclass(frozen=True)
class FakeQuantActivations:
    """Layer hook (:mod:`effjax.nn.interception`): the contraction runs on the per-token fake
    quantization :math:`\\hat x` of its input, over the axes the kernel contracts (identity
    STE gradient); :func:`quantize_activations` and :func:`linen_activation_fake_quant` attach it.

    Args:
      bits: 2..16 (checked when the hook is made).
      group_size, outliers: see :func:`fake_quantize_activations`.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from effjax.nn import intercept
      >>> layer = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
      >>> x = jnp.array([[1.0, -0.5, 0.25]])
      >>> y = intercept(layer, FakeQuantActivations(bits=4))(x)
      >>> bool(jnp.allclose(y, layer(fake_quantize_activations(x, 4))))
      True
    """

    bits: int
    group_size: int | None = None
    outliers: int = 0

    def __post_init__(self):
        object.__setattr__(self, "bits", int(self.bits))
        object.__setattr__(self, "outliers", int(self.outliers))
        _validate(self.bits, self.group_size, self.outliers)

    def __call__(self, call: Any, next: Callable) -> jax.Array:
        xq = fake_quantize_activations(call.inputs, self.bits, axis=call.contracted_axes,
                                       group_size=self.group_size, outliers=self.outliers)
        return next(call.replace(inputs=xq))


class ActivationFakeQuant(nnx.Module):
    """Wrap an NNX module (any callable) so that its input is fake-quantized per token:
    ``inner(Q(x))``.

    The wrapped layer lives at ``self.inner`` (its parameter paths gain ``/inner``). The token
    axes default to the layer's contracted axes (``inner.axis`` for ``nnx.LinearGeneral``,
    ``-1`` otherwise). For linear layers :func:`quantize_activations` does the same without a
    wrapper (paths unchanged).

    Args:
      inner: any NNX module (or callable) taking the activation as first argument.
      bits: 2..16.
      axis: feature axes of a token; None: the contracted axes of ``inner``.
      group_size, outliers: see :func:`fake_quantize_activations`.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> layer = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
      >>> wrapped = ActivationFakeQuant(layer, bits=8)
      >>> x = jnp.array([[1.0, -0.5, 0.25]])
      >>> bool(jnp.allclose(wrapped(x), layer(fake_quantize_activations(x, 8))))
      True
    """

    def __init__(self, inner: Any, bits: int, *, axis: int | Sequence[int] | None = None,
                 group_size: int | None = None, outliers: int = 0):
        self.inner = inner
        self.bits = int(bits)
        self.axis = _contracted_axes(inner) if axis is None else (
            tuple(axis) if isinstance(axis, (list, tuple)) else int(axis))
        self.group_size = group_size
        self.outliers = int(outliers)
        _validate(self.bits, group_size, self.outliers)

    def __call__(self, x: jax.Array, *args, **kwargs):
        xq = fake_quantize_activations(x, self.bits, axis=self.axis,
                                       group_size=self.group_size, outliers=self.outliers)
        return self.inner(xq, *args, **kwargs)


def quantize_activations(
    model: nnx.Module,
    where: Where = None,
    *,
    bits: int,
    group_size: int | None = None,
    outliers: int = 0,
    layer_types: tuple[type, ...] = (nnx.Linear, nnx.LinearGeneral),
) -> nnx.Module:
    """Return a copy of an NNX model whose linear layers fake-quantize their inputs per token.

    Every layer of ``layer_types`` (default ``nnx.Linear`` and ``nnx.LinearGeneral``;
    ``nnx.Einsum`` is supported too) whose ``'/'``-joined module path (e.g.
    ``'blocks/0/query'``, ``'head'``) is selected by ``where`` is intercepted
    (:func:`effjax.nn.interception.intercept`) with the hook :class:`FakeQuantActivations`:
    :math:`y = f(\\hat x)` with :math:`\\hat x` the per-token fake quantization of the input
    its kernel contracts. The layers keep their classes and parameter paths
    (``blocks/0/query/kernel``); the input model is not modified (the copy shares the parameter
    arrays, which are immutable). Layers that already quantize their inputs are left as they
    are.

    Args:
      model: an NNX module.
      where: None (every linear layer), a regex fullmatched against the module path, or a
        predicate ``(path, module) -> bool``.
      bits: 2..16.
      group_size, outliers: see :func:`fake_quantize_activations`.
      layer_types: the layer classes to quantize (subclasses of ``nnx.Linear``,
        ``nnx.LinearGeneral`` or ``nnx.Einsum``).

    Raises:
      ValueError: ``where`` selects no layer (the message lists the candidate layer paths).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from effjax.nn import layer_hooks
      >>> class MLP(nnx.Module):
      ...   def __init__(self, rngs):
      ...     self.up, self.down = nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 2, rngs=rngs)
      ...   def __call__(self, x):
      ...     return self.down(nnx.relu(self.up(x)))
      >>> model = MLP(nnx.Rngs(0))
      >>> qmodel = quantize_activations(model, r'down', bits=4)
      >>> layer_hooks(qmodel.down), layer_hooks(qmodel.up), layer_hooks(model.down)
      ((FakeQuantActivations(bits=4, group_size=None, outliers=0),), None, None)
      >>> qmodel(jnp.ones((3, 4))).shape
      (3, 2)
    """
    hook = FakeQuantActivations(bits, group_size, outliers)
    select = selector(where)
    new = nnx.clone(model)
    modules = dict(nnx.iter_modules(new))
    candidates, targets = [], set()
    for path, module in modules.items():
        if not isinstance(module, layer_types):
            continue
        wrapped = bool(path) and isinstance(modules.get(path[:-1]), ActivationFakeQuant)
        if wrapped or any(isinstance(h, FakeQuantActivations)
                          for h in layer_hooks(module) or ()):
            continue  # already quantized
        candidates.append(path)
        if select(path_str(path), module):
            targets.add(id(module))
    if not targets:
        kind = f"{'/'.join(t.__name__ for t in layer_types)} layers"
        raise ValueError(no_selection_message(where, [path_str(p) for p in candidates], kind))
    return intercept(new, hook, lambda path, module: id(module) in targets,
                     layer_types=layer_types, copy=False)


def linen_activation_fake_quant(
    bits: int,
    where: Where = None,
    *,
    group_size: int | None = None,
    outliers: int = 0,
    layer_types: tuple[type, ...] = (nn.Dense, nn.DenseGeneral),
) -> AbstractContextManager[None]:
    """Context in which Linen ``nn.Dense`` / ``nn.DenseGeneral`` calls see fake-quantized inputs.

    :func:`effjax.nn.interception.linen_intercept` with the hook
    :class:`FakeQuantActivations`: inside the context the input every selected layer's kernel
    contracts is replaced by its per-token fake quantization (over ``-1`` for ``nn.Dense``, over
    ``layer.axis`` for ``nn.DenseGeneral``, the contracted letters for ``nn.Einsum``), identity
    STE gradient. ``init`` is not quantized.

    The interception happens when the model is **traced**: put the ``with`` inside the function
    you ``jax.jit``, not around a call to an already-compiled function (a cached trace made
    outside the context would run unquantized).

    Args:
      bits: 2..16.
      where: None (every layer), a regex fullmatched against the module path
        (``'Dense_0'``, ``'block/mlp/up'``), or a predicate ``(path, module) -> bool``.
      group_size, outliers: see :func:`fake_quantize_activations`.
      layer_types: the Linen module classes to intercept (subclasses of ``nn.Dense``,
        ``nn.DenseGeneral`` or ``nn.Einsum``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import flax.linen as nn
      >>> model = nn.Dense(2)
      >>> x = jnp.array([[1.0, -0.3, 0.1]])
      >>> variables = model.init(jax.random.key(0), x)
      >>> with linen_activation_fake_quant(bits=4):
      ...   y = model.apply(variables, x)
      >>> bool(jnp.allclose(y, model.apply(variables, fake_quantize_activations(x, 4))))
      True
    """
    return linen_intercept(FakeQuantActivations(bits, group_size, outliers), where,
                           layer_types=layer_types)
