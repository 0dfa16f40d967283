"""One interception mechanism for the kernel contraction of Flax linear layers (NNX and Linen).

The layers are NNX ``nnx.Linear`` / ``nnx.LinearGeneral`` / ``nnx.Einsum`` and Linen
``nn.Dense`` / ``nn.DenseGeneral`` / ``nn.Einsum`` (and their subclasses). An intercepted layer
runs **Flax's own** ``__call__`` (it reads its params, promotes dtypes, adds the bias); only the
contraction :math:`y = x \\cdot W` is handed to a chain of hooks. A hook is a function

.. code-block:: python

  def hook(call: LayerCall, next: Callable[[LayerCall], Array]) -> Array

that receives the contraction as a :class:`LayerCall` (the input, the kernel, which may be any
structured node such as an adapter node, the ``dimension_numbers`` or einsum string, the
layer's path) and returns its result, usually ``next(call)`` or
``next(call.replace(inputs=...))``; it may also record or replace the computation. At the end
of the chain :func:`contract` computes the contraction with the layer's own ``dot_general`` /
``einsum_op``: plain kernels exactly as Flax does, LoRA-family nodes as :math:`xW + (xA)B`
(:func:`~effjax.nn.adapted_dot_general`, no dense delta), other nodes materialized. So an
intercepted layer always reads structured kernels, and the same hooks serve the adapter fast
path, :func:`effjax.peft.calibrate` (records :attr:`LayerCall.inputs`) and activation fake
quantization (replaces them).

How the hooks are attached; there is no global patch and no class change:

* **NNX**: :func:`intercept` returns a copy of the model whose selected layers have
  effjax objects as their ``promote_dtype`` and ``dot_general`` / ``einsum_op`` attributes (the
  per-instance arguments Flax's constructors take). They are static attributes of the layer:
  ``nnx.split`` / ``merge`` / ``clone`` and ``nnx.jit`` carry them, equal hooks give equal
  graphdefs, and the input model is untouched (nothing to restore, also after an exception).
  ``promote_dtype`` promotes a structured kernel's frozen ``w`` with the input and bias and
  keeps the node.
* **Linen**: :func:`linen_intercept` is a context (``flax.linen.intercept_methods``: scoped to
  the ``with`` block and the thread, removed on exit and on exceptions). A selected layer is
  run as Flax's own ``__call__`` of a clone whose ``dot_general`` field is the hook chain, on
  the layer's variables, with a structured kernel replaced by its frozen ``w`` (so Flax's
  param shape check and dtype promotion see an array; the chain gets the node back). Linen's
  ``nn.Einsum`` calls ``jnp.einsum`` directly (it has no op field to extend), so for it the
  same steps (params, promotion, contraction, bias) are written here. As with any Linen
  interceptor the substitution happens when the model is traced: put the ``with`` inside the
  function you ``jax.jit``. During ``init`` layers run unintercepted. The clone gets the
  layer's variables read-only and no RNGs (enough for the Flax layers; a subclass that draws
  random numbers or writes variables in its call is not supported), and Linen interceptors
  entered before the effjax context see the clone (module path ``()``) instead of the layer.

NNX layers read a structured kernel through Flax's ``self.kernel[...]``, so nodes support
``node[...]`` (the node itself).

Example (a hook that doubles every layer's input; with jit):
  >>> import jax, jax.numpy as jnp
  >>> from flax import nnx
  >>> def double(call, next):
  ...   return next(call.replace(inputs=2 * call.inputs))
  >>> layer = nnx.Linear(3, 2, use_bias=False, rngs=nnx.Rngs(0))
  >>> doubled = intercept(layer, double)
  >>> x = jnp.ones((1, 3))
  >>> bool(jnp.allclose(nnx.jit(lambda m, x: m(x))(doubled, x), 2 * layer(x)))
  True
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import errors as flax_errors
from flax import nnx
from jax import lax

from effjax.compress import is_quantized
from effjax.nn._lowrank import (
    adapted_dot_general,
    adapted_einsum,
    has_low_rank_factors,
    parse_einsum,
)
from effjax.selection import no_selection_message, path_str, selector

__all__ = ["LayerCall", "Hook", "contract", "intercept", "linen_intercept", "layer_hooks",
           "is_intercepted", "is_structured", "NNX_LAYERS", "LINEN_LAYERS"]

Hook = Callable[["LayerCall", Callable[["LayerCall"], jax.Array]], jax.Array]
Where = str | Callable[[str, Any], bool] | None

NNX_LAYERS: tuple[type, ...] = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)
LINEN_LAYERS: tuple[type, ...] = (nn.Dense, nn.DenseGeneral, nn.Einsum)


def is_structured(kernel: Any) -> bool:
    """True for structured kernels: pytree nodes with ``materialize()`` (adapter nodes today;
    quantized, ternary or masked weights alike), not arrays."""
    return not isinstance(kernel, (jax.Array, np.ndarray)) and callable(
        getattr(kernel, "materialize", None))


def _frozen_w(node: Any) -> Any:
    """The node's frozen dense ``w`` (the original kernel), None if it has none (or if it is
    quantized: QLoRA's base is never densified for promotion)."""
    w = getattr(node, "w", None)
    return w if isinstance(w, (jax.Array, np.ndarray)) else None


def _dense_aval(node: Any) -> tuple[tuple[int, ...], Any]:
    """Shape and dtype of ``node.materialize()`` (its ``w``'s when it has one)."""
    w = _frozen_w(node)
    aval = w if w is not None else jax.eval_shape(node.materialize)
    return tuple(aval.shape), aval.dtype


def _stand_in(node: Any) -> jax.Array:
    """The array that takes a node's place in dtype promotion (and Linen's shape check): its
    frozen ``w``, or zeros of the dense weight's shape and dtype."""
    w = _frozen_w(node)
    return w if w is not None else jnp.zeros(*_dense_aval(node))


def _with_promoted(node: Any, promoted: jax.Array) -> Any:
    """The node the contraction sees: LoRA-family nodes carry the promoted ``w`` (the fast
    path's main term); other nodes are kept as stored (:func:`contract` materializes them)."""
    if has_low_rank_factors(node) and not is_quantized(node.w):
        return node.replace(w=promoted)
    return node


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class LayerCall:
    """One kernel contraction of an intercepted layer, as its hooks receive it.

    Attributes:
      inputs: the input, after the layer's dtype promotion.
      kernel: the kernel: an array (promoted), or a structured node (LoRA-family nodes with
        their ``w`` promoted; other nodes as stored).
      dimension_numbers: ``((x_contract, k_contract), (x_batch, k_batch))`` for
        ``Linear`` / ``Dense`` / ``LinearGeneral`` / ``DenseGeneral`` (None for einsum layers).
      einsum_str: the explicit einsum string of ``Einsum`` layers (None otherwise).
      precision: the layer's precision.
      op_kwargs: the other keyword arguments of the layer's op call (``preferred_element_type``,
        ``out_sharding`` where the layer passes them).
      dtype: the layer's ``dtype`` attribute (None: promoted from the operands).
      op: the layer's own ``dot_general`` (``(x, k, dimension_numbers, precision=, ...)``) or
        einsum op (``(subscripts, x, k, precision=, ...)``).
      path: the layer's ``'/'``-joined module path (``'blocks/0/query'``).
      layer: the layer's class.
    """

    inputs: Any
    kernel: Any
    dimension_numbers: Any = None
    einsum_str: str | None = None
    precision: Any = None
    op_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    dtype: Any = None
    op: Callable = lax.dot_general
    path: str = ""
    layer: type | None = None

    def replace(self, **changes: Any) -> LayerCall:
        """A copy with some fields replaced."""
        return dataclasses.replace(self, **changes)

    def _pairs(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """``(input axis, kernel axis)`` pairs contracted and batched."""
        ndim = jnp.ndim(self.inputs)
        k_ndim = len(_dense_aval(self.kernel)[0] if is_structured(self.kernel)
                     else jnp.shape(self.kernel))
        if self.einsum_str is not None:
            xs, ks, os_ = parse_einsum(self.einsum_str, ndim, k_ndim)
            shared = [(xs.index(c), j) for j, c in enumerate(ks) if c in xs]
            return ([p for p in shared if xs[p[0]] not in os_],
                    [p for p in shared if xs[p[0]] in os_])
        (xc, kc), (xb, kb) = self.dimension_numbers
        norm = lambda axes, n: [int(a) % n for a in axes]
        return (list(zip(norm(xc, ndim), norm(kc, k_ndim))),
                list(zip(norm(xb, ndim), norm(kb, k_ndim))))

    @property
    def contracted_axes(self) -> tuple[int, ...]:
        """The input axes summed with the kernel's input axes, in the kernel's axis order
        (``(ndim - 1,)`` for ``Linear`` / ``Dense``)."""
        return tuple(i for i, _ in sorted(self._pairs()[0], key=lambda p: p[1]))

    @property
    def batch_axes(self) -> tuple[int, ...]:
        """The input axes paired with kernel axes that stay in the output (stacked kernels),
        in the kernel's axis order."""
        return tuple(i for i, _ in sorted(self._pairs()[1], key=lambda p: p[1]))


def contract(call: LayerCall) -> jax.Array:
    """The contraction a :class:`LayerCall` describes, with the layer's own op: the end of
    every hook chain.

    Plain kernels: ``call.op(...)`` exactly as Flax calls it. LoRA-family nodes:
    :math:`y = x W + (x A) B` (:func:`~effjax.nn.adapted_dot_general` /
    :func:`~effjax.nn.adapted_einsum` with the layer's op for the main term, no dense delta).
    Quantized kernels (:class:`~effjax.compress.QuantizedWeight`): the same functions,
    dequantized on the fly with no dense residual. Other structured kernels: materialized and
    cast to the inputs' (promoted) dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> call = LayerCall(inputs=jnp.ones((2, 3)), kernel=jnp.ones((3, 4)),
      ...                  dimension_numbers=(((1,), (0,)), ((), ())))
      >>> contract(call).shape, call.contracted_axes
      ((2, 4), (1,))
    """
    kernel, kw = call.kernel, dict(call.op_kwargs)
    # a quantized kernel, like a LoRA-family node, goes to adapted_* (dequantized on the fly)
    if is_structured(kernel) and not (has_low_rank_factors(kernel) or is_quantized(kernel)):
        kernel = jnp.asarray(kernel.materialize(), jnp.result_type(call.inputs))
    if not is_structured(kernel):
        if call.einsum_str is not None:
            return call.op(call.einsum_str, call.inputs, kernel, precision=call.precision, **kw)
        return call.op(call.inputs, kernel, call.dimension_numbers, precision=call.precision,
                       **kw)
    pet, sharding = kw.pop("preferred_element_type", None), kw.pop("out_sharding", None)
    if kw:
        raise TypeError(f"layer '{call.path}': op arguments {sorted(kw)} are not supported with "
                        f"a {type(kernel).__name__} kernel")
    if call.einsum_str is not None:
        return adapted_einsum(call.einsum_str, call.inputs, kernel, dtype=call.dtype,
                              precision=call.precision, preferred_element_type=pet,
                              einsum_op=call.op, out_sharding=sharding)
    return adapted_dot_general(call.inputs, kernel, call.dimension_numbers, dtype=call.dtype,
                               precision=call.precision, preferred_element_type=pet,
                               dot_general=call.op, out_sharding=sharding)


def _run(call: LayerCall, hooks: tuple) -> jax.Array:
    """``hooks[0](call, next)`` with ``next`` running ``hooks[1:]`` and then :func:`contract`."""

    def step(i: int) -> Callable[[LayerCall], jax.Array]:
        if i == len(hooks):
            return contract
        return lambda c: hooks[i](c, step(i + 1))

    return step(0)(call)


def _layer_name(layer_type: type, path: str) -> str:
    return f"{layer_type.__name__} at '{path}'" if path else layer_type.__name__


def _shape_error(name: str, node: Any, shape: tuple, expected: tuple) -> ValueError:
    what = f"{type(node).__name__} with w of shape" if is_structured(node) else "kernel of shape"
    return ValueError(f"{name}: {what} {shape}, but the layer and its input need a kernel of "
                      f"shape {expected}")


# ------------------------------------------------------------------------------------- NNX


class _NodeKernel:
    """A structured kernel between an NNX layer's ``promote_dtype`` and its op: the node plus
    the ``shape`` / ``dtype`` Flax's call reads from the kernel (``nnx.Einsum``'s bias shape)."""

    __slots__ = ("node", "shape", "dtype")

    def __init__(self, node: Any, shape: tuple[int, ...], dtype: Any):
        self.node, self.shape, self.dtype = node, shape, dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclasses.dataclass(frozen=True)
class _Promote:
    """An NNX layer's ``promote_dtype`` that also takes a structured kernel: the layer's own
    promotion of ``(inputs, node's w, bias)``; the node is kept (with the promoted ``w``)."""

    inner: Callable
    layer: str
    kernel_shape: tuple[int, ...]

    def __call__(self, args, /, **kwargs):
        inputs, kernel, bias, *rest = args
        if is_structured(bias):
            bias = bias.materialize()
        if not is_structured(kernel):
            return self.inner((inputs, kernel, bias, *rest), **kwargs)
        shape, _ = _dense_aval(kernel)
        if shape != self.kernel_shape:
            raise _shape_error(self.layer, kernel, shape, self.kernel_shape)
        inputs, ref, bias, *rest = self.inner((inputs, _stand_in(kernel), bias, *rest),
                                              **kwargs)
        return (inputs, _NodeKernel(_with_promoted(kernel, ref), shape, ref.dtype), bias, *rest)


@dataclasses.dataclass(frozen=True)
class _NNXOp:
    """An NNX layer's ``dot_general`` / ``einsum_op``: runs the hook chain around the layer's
    original op (``inner``; a ``dot_general_cls`` is instantiated per call)."""

    inner: Callable
    hooks: tuple
    path: str
    layer: type
    dtype: Any
    einsum: bool
    inner_is_cls: bool = False

    def __call__(self, *args, precision=None, **kwargs):
        if self.einsum:
            subscripts, lhs, rhs = args
            spec = dict(einsum_str=subscripts)
        else:
            lhs, rhs, dims = args
            spec = dict(dimension_numbers=dims)
        kernel = rhs.node if isinstance(rhs, _NodeKernel) else rhs
        op = self.inner() if self.inner_is_cls else self.inner
        call = LayerCall(inputs=lhs, kernel=kernel, precision=precision, op_kwargs=kwargs,
                         dtype=self.dtype, op=op, path=self.path, layer=self.layer, **spec)
        return _run(call, self.hooks)


def _op_attr(layer: Any) -> str:
    return "einsum_op" if isinstance(layer, nnx.Einsum) else "dot_general"


def _nnx_kernel_shape(layer: Any) -> tuple[int, ...]:
    if isinstance(layer, nnx.Einsum):
        return tuple(layer.kernel_shape)
    if isinstance(layer, nnx.LinearGeneral):
        return (tuple(layer.batch_axis.values()) + tuple(layer.in_features)
                + tuple(layer.out_features))
    return (layer.in_features, layer.out_features)


def _install(layer: Any, path: str, hook: Hook | None, inner: bool) -> None:
    """Give one NNX layer the effjax ``promote_dtype`` and op (``hook`` outermost, or
    innermost with ``inner``)."""
    attr, new = _op_attr(layer), () if hook is None else (hook,)
    current = getattr(layer, attr)
    if isinstance(current, _NNXOp):
        hooks = current.hooks + new if inner else new + current.hooks
        op = dataclasses.replace(current, hooks=hooks, path=path)
    else:
        inner, from_cls = current, False
        if isinstance(layer, nnx.LinearGeneral) and layer.dot_general_cls is not None:
            inner, from_cls = layer.dot_general_cls, True
            layer.dot_general_cls = None
        op = _NNXOp(inner=inner if inner is not None else lax.dot_general, hooks=new, path=path,
                    layer=type(layer), dtype=layer.dtype, einsum=isinstance(layer, nnx.Einsum),
                    inner_is_cls=from_cls)
    setattr(layer, attr, op)
    promote = layer.promote_dtype
    layer.promote_dtype = _Promote(promote.inner if isinstance(promote, _Promote) else promote,
                                   _layer_name(type(layer), path), _nnx_kernel_shape(layer))


def _check_types(layer_types: tuple, kinds: tuple, names: str) -> tuple:
    layer_types = tuple(layer_types)
    for t in layer_types:
        if not (isinstance(t, type) and issubclass(t, kinds)):
            raise TypeError(f"layer_types: {t!r} is not a subclass of {names}")
    return layer_types


def intercept(model: nnx.Module, hook: Hook | None = None, where: Where = None, *,
              layer_types: tuple[type, ...] = NNX_LAYERS, inner: bool = False,
              copy: bool = True) -> nnx.Module:
    """An NNX model whose selected linear layers run their contraction through ``hook``.

    Every ``nnx.Linear`` / ``nnx.LinearGeneral`` / ``nnx.Einsum`` (subclasses included) of
    ``layer_types`` whose module path ``where`` selects keeps Flax's own ``__call__`` but gets
    effjax's ``promote_dtype`` and ``dot_general`` / ``einsum_op`` (see the module docstring):
    its contraction runs ``hook(call, next)`` and then :func:`contract`, so it also reads
    structured kernels (adapter nodes) from its ``kernel`` param. Parameter paths and classes
    are unchanged. A layer intercepted again keeps its hooks; the new hook runs first
    (outermost), or last, next to the contraction, with ``inner=True``.

    Args:
      model: an NNX module.
      hook: ``hook(call: LayerCall, next) -> y``, or None (the layers only read structured
        kernels). It becomes a static attribute of the layers: make it hashable (a function
        or a frozen dataclass), without arrays.
      where: None (every such layer), a regex fullmatched against the ``'/'``-joined module
        path (``'blocks/0/query'``), or a predicate ``(path, module) -> bool``.
      layer_types: the classes to intercept (subclasses of the three above).
      inner: run ``hook`` after the layer's other hooks (it then sees the input and kernel
        as they left them) instead of before them.
      copy: intercept a copy (``nnx.clone``; arrays shared) and leave ``model`` as it is
        (default); False changes ``model`` in place and returns it.

    Raises:
      TypeError: ``model`` is not an NNX module, or a type of ``layer_types`` is not a
        subclass of ``nnx.Linear`` / ``nnx.LinearGeneral`` / ``nnx.Einsum``.
      ValueError: ``where`` selects none of the candidate layers (the message lists them).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> seen = []
      >>> def record(call, next):
      ...   seen.append((call.path, call.inputs.shape, call.contracted_axes))
      ...   return next(call)
      >>> class Net(nnx.Module):
      ...   def __init__(self, rngs):
      ...     self.up = nnx.Linear(4, 8, rngs=rngs)
      ...     self.heads = nnx.LinearGeneral(8, (2, 4), rngs=rngs)
      ...   def __call__(self, x):
      ...     return self.heads(self.up(x))
      >>> model = intercept(Net(nnx.Rngs(0)), record)
      >>> model(jnp.ones((3, 4))).shape, seen
      ((3, 2, 4), [('up', (3, 4), (1,)), ('heads', (3, 8), (1,))])
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"intercept needs an NNX module, got {type(model).__name__} (Linen "
                        f"models: use linen_intercept)")
    layer_types = _check_types(layer_types, NNX_LAYERS,
                               "nnx.Linear, nnx.LinearGeneral or nnx.Einsum")
    select = selector(where)
    new = nnx.clone(model) if copy else model
    candidates, targets = [], []
    for path, module in nnx.iter_modules(new):
        if isinstance(module, layer_types):
            candidates.append(path_str(path))
            if select(candidates[-1], module):
                targets.append((candidates[-1], module))
    if where is not None and not targets:
        kind = "/".join(t.__name__ for t in layer_types) + " layers"
        raise ValueError(no_selection_message(where, candidates, kind))
    for path, module in targets:
        _install(module, path, hook, inner)
    return new


def layer_hooks(layer: Any) -> tuple | None:
    """The hooks of an NNX layer intercepted by :func:`intercept` (outermost first; ``()``
    when it only reads structured kernels), None for a layer that is not intercepted."""
    op = getattr(layer, _op_attr(layer), None) if isinstance(layer, NNX_LAYERS) else None
    return op.hooks if isinstance(op, _NNXOp) else None


def is_intercepted(layer: Any) -> bool:
    """Whether an NNX layer runs its contraction through :func:`intercept`'s hook chain."""
    return layer_hooks(layer) is not None


# ------------------------------------------------------------------------------------ Linen


@dataclasses.dataclass(frozen=True, eq=False)
class _LinenSpec:
    hook: Hook | None
    select: Callable[[str, Any], bool]
    layer_types: tuple[type, ...]
    inner: bool


class _Specs(threading.local):
    def __init__(self):
        self.stack: list[_LinenSpec] = []


_ACTIVE = _Specs()  # per thread, like flax.linen's own interceptor stack


class _LinenOp:
    """The ``dot_general`` field of the clone a Linen layer runs as: the hook chain around the
    layer's own ``dot_general`` / ``dot_general_cls``, with the structured kernel (if any)
    substituted back for the ``w`` Flax's call promoted."""

    def __init__(self, module: nn.Module, hooks: tuple, node: Any, path: str):
        self.inner, self.inner_cls = module.dot_general, module.dot_general_cls
        self.hooks, self.node, self.path = hooks, node, path
        self.layer, self.dtype = type(module), module.dtype

    def __call__(self, lhs, rhs, dimension_numbers, precision=None, **kwargs):
        if self.inner_cls is not None:
            op = self.inner_cls()
        else:
            op = self.inner if self.inner is not None else lax.dot_general
        kernel = rhs if self.node is None else _with_promoted(self.node, rhs)
        call = LayerCall(inputs=lhs, kernel=kernel, dimension_numbers=dimension_numbers,
                         precision=precision, op_kwargs=kwargs, dtype=self.dtype, op=op,
                         path=self.path, layer=self.layer)
        return _run(call, self.hooks)


def _linen_einsum(module: nn.Einsum, hooks: tuple, node: Any, path: str, args: tuple,
                  kwargs: dict) -> jax.Array:
    """``nn.Einsum.__call__``'s steps (it calls ``jnp.einsum`` itself, with no op field to
    extend) with the contraction run through the hook chain."""
    name = _layer_name(type(module), path)
    inputs = args[0] if args else kwargs["inputs"]
    einsum_str = args[1] if len(args) > 1 else kwargs.get("einsum_str")
    einsum_str = einsum_str if einsum_str is not None else module.einsum_str
    if einsum_str is None:
        raise ValueError(f"{name}: no einsum_str given to the constructor or the call")
    einsum_str = einsum_str.replace(" ", "")
    kernel = nn.meta.unbox(module.get_variable("params", "kernel"))
    ref = _stand_in(node) if node is not None else kernel
    if tuple(jnp.shape(ref)) != tuple(module.shape):
        raise _shape_error(name, kernel, tuple(jnp.shape(ref)), tuple(module.shape))
    bias = None
    if module.use_bias:
        bias = nn.meta.unbox(module.get_variable("params", "bias"))
        bias = bias.materialize() if is_structured(bias) else bias
        bias_shape, broadcast_shape = module._get_bias_shape(einsum_str, inputs, ref)
        if tuple(jnp.shape(bias)) != tuple(bias_shape):
            raise ValueError(f"{name}: bias of shape {jnp.shape(bias)}, expected "
                             f"{tuple(bias_shape)}")
    inputs, ref, bias = module.promote_dtype(inputs, ref, bias, dtype=module.dtype)
    call = LayerCall(inputs=inputs, kernel=ref if node is None else _with_promoted(node, ref),
                     einsum_str=einsum_str, precision=module.precision,
                     op_kwargs={"preferred_element_type": module.preferred_element_type},
                     dtype=module.dtype, op=jnp.einsum, path=path, layer=type(module))
    y = _run(call, hooks)
    if bias is not None:
        y += jnp.reshape(bias, broadcast_shape)
    return y


def _linen_call(module: nn.Module, hooks: tuple, next_fun: Callable, args: tuple,
                kwargs: dict) -> jax.Array:
    if module.is_initializing() or not module.has_variable("params", "kernel"):
        return next_fun(*args, **kwargs)
    kernel = module.get_variable("params", "kernel")
    bias = module.get_variable("params", "bias") if module.has_variable("params", "bias") \
        else None
    node = kernel if is_structured(kernel) else None
    if node is None and not hooks and not is_structured(bias):
        return next_fun(*args, **kwargs)  # nothing to do: exactly Flax's call
    path = path_str(module.path)
    if isinstance(module, nn.Einsum):
        return _linen_einsum(module, hooks, node, path, args, kwargs)
    variables = {col: dict(v) for col, v in module.variables.items()}
    if node is not None:
        variables["params"]["kernel"] = _stand_in(node)
    if is_structured(bias):
        variables["params"]["bias"] = bias.materialize()
    clone = module.clone(parent=None, dot_general=_LinenOp(module, hooks, node, path),
                         dot_general_cls=None)
    try:
        return clone.apply(variables, *args, **kwargs)
    except flax_errors.ScopeParamShapeError as e:
        if node is None:
            raise
        raise ValueError(f"{_layer_name(type(module), path)}: {type(node).__name__} with w of "
                         f"shape {_dense_aval(node)[0]} does not fit the layer and its input "
                         f"({e})") from None


def _check_unreadable(module: nn.Module) -> None:
    """A layer the interception does not handle, holding a structured param: say so (Flax's
    own error would compare the node's first array with the param's shape)."""
    if module.is_initializing() or "params" not in module.variables:
        return
    for name, value in module.variables["params"].items():
        if is_structured(value):
            raise TypeError(
                f"{_layer_name(type(module), path_str(module.path))}: its param '{name}' is a "
                f"{type(value).__name__}, which only Dense / DenseGeneral / Einsum layers read; "
                f"materialize it first (effjax.peft.materialize or effjax.compress.materialize)")


def _linen_interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and not isinstance(module, LINEN_LAYERS):
        _check_unreadable(module)
    if (context.method_name != "__call__" or not isinstance(module, LINEN_LAYERS)
            or isinstance(getattr(module, "dot_general", None), _LinenOp)):
        return next_fun(*args, **kwargs)  # not a layer, or the clone an interceptor runs
    path = path_str(module.path)
    specs = [s for s in _ACTIVE.stack if isinstance(module, s.layer_types)
             and s.select(path, module)]
    if not specs:
        return next_fun(*args, **kwargs)
    # inner contexts first (outermost), then the inner=True hooks, the latest last
    hooks = tuple(s.hook for s in reversed(specs) if s.hook is not None and not s.inner) + \
        tuple(s.hook for s in specs if s.hook is not None and s.inner)
    return _linen_call(module, hooks, next_fun, args, kwargs)


@contextlib.contextmanager
def linen_intercept(hook: Hook | None = None, where: Where = None, *,
                    layer_types: tuple[type, ...] = LINEN_LAYERS,
                    inner: bool = False) -> Iterator[None]:
    """Context in which the selected Linen linear layers run their contraction through
    ``hook`` (and read structured kernels, e.g. adapter nodes, from their ``kernel`` param).

    Every ``nn.Dense`` / ``nn.DenseGeneral`` / ``nn.Einsum`` (subclasses included) of
    ``layer_types`` whose module path ``where`` selects runs ``hook(call, next)`` and then
    :func:`contract` for its contraction (see the module docstring). Scoped to the ``with``
    block and the current thread (``flax.linen.intercept_methods``), also on exceptions.
    Nested contexts combine: the inner context's hook runs first (outermost); hooks given
    with ``inner=True`` run after all others, next to the contraction. Put the ``with``
    inside the function you ``jax.jit`` / ``jax.grad`` (the hooks act when the model is
    traced); ``init`` is not intercepted.

    Args:
      hook: ``hook(call: LayerCall, next) -> y``, or None (layers only read structured
        kernels).
      where: None (every layer), a regex fullmatched against the module path (``'Dense_0'``,
        ``'block/mlp/up'``), or a predicate ``(path, module) -> bool``.
      layer_types: Linen classes to intercept (subclasses of the three above).
      inner: run ``hook`` after the other contexts' hooks instead of before them.

    Raises:
      TypeError: a type of ``layer_types`` is not a subclass of ``nn.Dense``,
        ``nn.DenseGeneral`` or ``nn.Einsum``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import flax.linen as nn
      >>> model, x = nn.Dense(2), jnp.ones((1, 3))
      >>> variables = model.init(jax.random.key(0), x)
      >>> @jax.jit
      ... def doubled(variables, x):
      ...   with linen_intercept(lambda call, next: next(call.replace(inputs=2 * call.inputs))):
      ...     return model.apply(variables, x)
      >>> kernel = variables['params']['kernel']
      >>> bool(jnp.allclose(doubled(variables, x) - model.apply(variables, x), x @ kernel))
      True
    """
    spec = _LinenSpec(hook, selector(where),
                      _check_types(layer_types, LINEN_LAYERS,
                                   "nn.Dense, nn.DenseGeneral or nn.Einsum"), bool(inner))
    stack = _ACTIVE.stack
    stack.append(spec)
    try:
        with nn.intercept_methods(_linen_interceptor):
            yield
    finally:
        del stack[max(i for i, s in enumerate(stack) if s is spec)]
