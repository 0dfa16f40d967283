"""Linear layers that consume LoRA-family adapter nodes without building the dense delta.

A kernel adapted by :func:`effjax.peft.inject` is a node holding the frozen :math:`W` and a
low-rank update. :func:`effjax.peft.materialize` builds :math:`W' = W + AB` densely, so every
step pays for an :math:`n_{in} \\times n_{out}` delta, and the backward pass for its gradient
:math:`x^\\top g` (the same dense matmul full fine-tuning needs). The fast path here computes

.. math::

  y = x\\,W + (x A)\\,B

(contracted over the layer's input axes, per batch slice for stacked kernels) with
:math:`(A, B)` from the node's :meth:`low_rank_factors`, the scale folded in: LoRA and NOLA
give :math:`(A, sB)`, VeRA :math:`(A\\,\\mathrm{diag}(d), B\\,\\mathrm{diag}(b))`. The
gradients are then :math:`\\partial L/\\partial B = (xA)^\\top g` and
:math:`\\partial L/\\partial A = x^\\top (g B^\\top)`: no tensor of the kernel's size is formed,
except the frozen :math:`W` itself. Nodes without ``low_rank_factors`` (DoRA, ...) are
materialized, so every adapter works; plain arrays run the ordinary layer.

The low-rank term's backward pass is written out (a ``jax.custom_vjp``) so that every
token-axis contraction transposes the small operand, not the activations (on XLA:CPU autodiff's
operand order made the fast path slower than full fine-tuning on MiniLM). Consequence:
reverse mode (``grad``, ``vjp``) works through the fast path, forward mode (``jvp``,
``jacfwd``, ``hessian``) raises; use :func:`effjax.peft.materialize` for those.

* :func:`adapted_einsum` / :func:`adapted_dot_general`: the functional core (any einsum or
  ``dot_general`` contraction of an input with a kernel that may be a node; the node's
  :class:`~effjax.peft.KernelLayout` says which kernel axes are batch / in / out, and any
  layout works with any contraction).
* The layers are Flax's own: an intercepted layer (:mod:`effjax.nn.interception`) runs Flax's
  ``__call__`` and computes its contraction with :func:`~effjax.nn.interception.contract`,
  which calls the functions above when the kernel is a node.
* NNX: :func:`adapted_layers` intercepts an existing model's ``nnx.Linear`` /
  ``nnx.LinearGeneral`` / ``nnx.Einsum`` layers (same classes, same parameter paths);
  :class:`AdaptedLinear`, :class:`AdaptedLinearGeneral`, :class:`AdaptedEinsum` are the Flax
  classes constructed intercepted.
* Linen: the context :func:`linen_adapted_layers` runs existing ``nn.Dense`` /
  ``nn.DenseGeneral`` / ``nn.Einsum`` code on ``{'params': tree}`` with nodes in it;
  :class:`AdaptedDense`, :class:`AdaptedDenseGeneral` are ``nn.Dense`` / ``nn.DenseGeneral``
  that do so without the context.

Typical NNX use (``model`` any NNX model built from ``nnx.Linear`` / ``nnx.LinearGeneral``)::

  model = adapted_layers(model)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  trainable, frozen = split(inject(params, rules, key=key))

  def loss_fn(trainable, batch):  # no materialize: the layers read the nodes
      return loss(nnx.merge(graphdef, combine(trainable, frozen), rest), batch)

References:
  Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022 (Sec. 4.1:
  :math:`h = W_0 x + BAx`, computed without merging during training).
  Hugging Face PEFT, ``src/peft/tuners/lora/layer.py`` (``Linear.forward``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import flax.linen as nn
import jax
from flax import nnx

from effjax.nn._lowrank import (
    LowRankAdapter,
    adapted_dot_general,
    adapted_einsum,
    has_low_rank_factors,
)
from effjax.nn.interception import LINEN_LAYERS, intercept, linen_intercept

__all__ = ["LowRankAdapter", "has_low_rank_factors", "adapted_einsum", "adapted_dot_general",
           "AdaptedLinear", "AdaptedLinearGeneral", "AdaptedEinsum", "adapted_layers",
           "AdaptedDense", "AdaptedDenseGeneral", "linen_adapted_layers"]

Where = str | Callable[[str, Any], bool] | None


# ----------------------------------------------------------------------------------- NNX


class AdaptedLinear(nnx.Linear):
    """``nnx.Linear`` constructed intercepted (same constructor, same call): its kernel
    ``Param`` may hold an adapter node.

    :math:`y = xW + (xA)B + b` for LoRA-family nodes (no dense delta), :math:`y = xW' + b` for
    other nodes (materialized; a bias that is a node, e.g. ``Unfreeze``, too), exactly
    ``nnx.Linear`` for plain params. The same as ``adapted_layers(nnx.Linear(...))``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from effjax.peft import LoRA, inject, materialize
      >>> layer = AdaptedLinear(4, 3, rngs=nnx.Rngs(0))
      >>> graphdef, params = nnx.split(layer)
      >>> tree = inject(params, {'kernel': LoRA(rank=2, init='gaussian')}, key=jax.random.key(0))
      >>> tree['kernel'].set_value(tree['kernel'].get_value().replace(b=jnp.ones((2, 3))))
      >>> x = jnp.ones((5, 4))
      >>> y = nnx.merge(graphdef, tree)(x)  # reads the node: x W + (x A)(s B) + bias
      >>> bool(jnp.allclose(y, nnx.merge(graphdef, materialize(tree))(x), atol=1e-5))
      True
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        intercept(self, copy=False)


class AdaptedLinearGeneral(nnx.LinearGeneral):
    """``nnx.LinearGeneral`` constructed intercepted (same constructor): multi-axis kernels
    such as attention's ``(d, heads, head_dim)`` and ``(heads, head_dim, d)``, and
    ``batch_axis`` kernels, may be adapter nodes.

    :math:`y = x \\cdot W + (x \\cdot A) \\cdot B + b`, contracted over ``axis``; the node's
    layout (its ``in_axes`` / ``out_axes`` / ``batch_axes``) only decides how :math:`A` and
    :math:`B` split the kernel, so any layout gives the same result as ``materialize``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from effjax.peft import LoRA, inject, materialize
      >>> out = AdaptedLinearGeneral((2, 4), 8, axis=(-2, -1), rngs=nnx.Rngs(0))
      >>> graphdef, params = nnx.split(out)
      >>> tree = inject(params, {'kernel': LoRA(rank=2, init='gaussian', in_axes=(0, 1))},
      ...               key=jax.random.key(0))
      >>> tree['kernel'].set_value(tree['kernel'].get_value().replace(b=jnp.ones((2, 8))))
      >>> x = jnp.ones((3, 2, 4))
      >>> y = nnx.merge(graphdef, tree)(x)
      >>> bool(jnp.allclose(y, nnx.merge(graphdef, materialize(tree))(x), atol=1e-5))
      True
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        intercept(self, copy=False)


class AdaptedEinsum(nnx.Einsum):
    """``nnx.Einsum`` constructed intercepted (same constructor):
    :math:`y = \\mathrm{einsum}(x, W) + \\mathrm{einsum}(\\mathrm{einsum}(x, A), B) + b`.

    Stacked kernels (experts / layers on a leading axis, ``'ebi,eio->ebo'``) take LoRA nodes
    with ``batch_axes=(0,)``: one adapter per slice.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from effjax.peft import LoRA, inject, materialize
      >>> layer = AdaptedEinsum('ebi,eio->ebo', (3, 4, 5), (3, 1, 5), rngs=nnx.Rngs(0))
      >>> graphdef, params = nnx.split(layer)
      >>> rule = LoRA(rank=2, init='gaussian', batch_axes=(0,))
      >>> tree = inject(params, {'kernel': rule}, key=jax.random.key(0))
      >>> tree['kernel'].set_value(tree['kernel'].get_value().replace(b=jnp.ones((3, 2, 5))))
      >>> x = jnp.ones((3, 2, 4))
      >>> y = nnx.merge(graphdef, tree)(x)
      >>> bool(jnp.allclose(y, nnx.merge(graphdef, materialize(tree))(x), atol=1e-5))
      True
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        intercept(self, copy=False)


def adapted_layers(model: nnx.Module, where: Where = None, *, copy: bool = True) -> nnx.Module:
    """An NNX model whose ``nnx.Linear`` / ``nnx.LinearGeneral`` / ``nnx.Einsum`` layers read
    adapter nodes from their kernel ``Param`` (same classes, parameters, paths, and outputs
    for plain kernels).

    The layers are intercepted (:func:`effjax.nn.interception.intercept` without a hook): they
    keep Flax's own ``__call__``, whose contraction then computes :math:`xW + (xA)B` for
    LoRA-family nodes (no dense delta) and :math:`xW'` for other nodes. Split the model, inject
    adapters into its params and ``nnx.merge`` the tree *without*
    :func:`~effjax.peft.materialize`: each layer then reads its node. Subclasses of the three
    layers are included.

    Args:
      model: an NNX module.
      where: None (every such layer), a regex fullmatched against the ``'/'``-joined module
        path (``'layers/0/query'``), or a predicate ``(path, module) -> bool``.
      copy: convert a copy (``nnx.clone``; the arrays are shared) and leave ``model`` as it
        is (default); False converts ``model`` in place and returns it.

    Raises:
      ValueError: ``where`` selects none of the model's linear layers (the message lists
        their paths).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from effjax.nn import is_intercepted
      >>> from effjax.peft import LoRA, inject, materialize
      >>> from effjax.models.classifiers import MLP
      >>> model = adapted_layers(MLP([4, 8, 2], rngs=nnx.Rngs(0)))
      >>> [(type(l).__name__, is_intercepted(l)) for l in model.layers]
      [('Linear', True), ('Linear', True)]
      >>> graphdef, params = nnx.split(model)
      >>> tree = inject(params, {r'.*/kernel': LoRA(rank=2, init='gaussian')},
      ...               key=jax.random.key(0))
      >>> x = jnp.ones((3, 4))
      >>> y_fast = nnx.merge(graphdef, tree)(x)
      >>> bool(jnp.allclose(y_fast, nnx.merge(graphdef, materialize(tree))(x)))
      True
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"adapted_layers needs an NNX module, got {type(model).__name__} "
                        f"(Linen models: use linen_adapted_layers)")
    return intercept(model, None, where, copy=copy)


# ----------------------------------------------------------------------------------- Linen


def _this(module: nn.Module) -> Callable[[str, Any], bool]:
    return lambda path, other: other is module


class AdaptedDense(nn.Dense):
    """``nn.Dense`` whose ``kernel`` param may be an adapter node (same attributes): Flax's
    ``nn.Dense`` call run inside :func:`linen_adapted_layers` for this layer.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from effjax.peft import LoRA, inject, materialize
      >>> model, x = AdaptedDense(3), jnp.ones((2, 4))
      >>> params = model.init(jax.random.key(0), x)['params']
      >>> tree = inject(params, {'kernel': LoRA(rank=2, init='gaussian')}, key=jax.random.key(1))
      >>> tree['kernel'] = tree['kernel'].replace(b=jnp.ones((2, 3)))
      >>> y = model.apply({'params': tree}, x)
      >>> bool(jnp.allclose(y, model.apply({'params': materialize(tree)}, x), atol=1e-5))
      True
    """

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        with linen_intercept(where=_this(self)):
            return super().__call__(inputs)


class AdaptedDenseGeneral(nn.DenseGeneral):
    """``nn.DenseGeneral`` whose ``kernel`` param may be an adapter node (same attributes).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from effjax.peft import LoRA, inject, materialize
      >>> model, x = AdaptedDenseGeneral((2, 4)), jnp.ones((3, 8))  # kernel (8, 2, 4)
      >>> params = model.init(jax.random.key(0), x)['params']
      >>> tree = inject(params, {'kernel': LoRA(rank=2, init='gaussian')}, key=jax.random.key(1))
      >>> tree['kernel'] = tree['kernel'].replace(b=jnp.ones((2, 2, 4)))
      >>> y = model.apply({'params': tree}, x)
      >>> y.shape, bool(jnp.allclose(y, model.apply({'params': materialize(tree)}, x), atol=1e-5))
      ((3, 2, 4), True)
    """

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        with linen_intercept(where=_this(self)):
            return super().__call__(inputs)


def linen_adapted_layers(
    where: Where = None,
    *,
    layer_types: tuple[type, ...] = LINEN_LAYERS,
) -> AbstractContextManager[None]:
    """Context in which Linen ``nn.Dense`` / ``nn.DenseGeneral`` / ``nn.Einsum`` layers read
    adapter nodes from their ``kernel`` param: existing Linen models run
    ``model.apply({'params': tree}, x)`` on an injected tree without ``materialize``.

    :func:`effjax.nn.interception.linen_intercept` without a hook: a selected layer whose
    kernel is a node computes :math:`xW + (xA)B` (LoRA family) or :math:`xW'` (other nodes,
    materialized) in Flax's own call; layers with plain kernels, and ``init``, run unchanged.
    As with any interceptor the substitution happens when the model is **traced**: put the
    ``with`` inside the function you ``jax.jit`` / ``jax.grad``.

    Args:
      where: None (every layer), a regex fullmatched against the module path
        (``'Dense_0'``, ``'block/mlp/up'``), or a predicate ``(path, module) -> bool``.
      layer_types: Linen classes to intercept (subclasses included; ``nn.Dense``,
        ``nn.DenseGeneral``, ``nn.Einsum`` and their subclasses are supported).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import flax.linen as nn
      >>> from effjax.peft import LoRA, inject, materialize
      >>> model, x = nn.Dense(3), jnp.ones((2, 4))
      >>> tree = inject(model.init(jax.random.key(0), x)['params'],
      ...               {'kernel': LoRA(rank=2, init='gaussian')}, key=jax.random.key(1))
      >>> tree['kernel'] = tree['kernel'].replace(b=jnp.ones((2, 3)))
      >>> with linen_adapted_layers():
      ...   y = model.apply({'params': tree}, x)
      >>> bool(jnp.allclose(y, model.apply({'params': materialize(tree)}, x), atol=1e-5))
      True
    """
    return linen_intercept(None, where, layer_types=layer_types)
