"""The adapter contract every effjax.peft method implements.

A PEFT method is two small classes:

* a **method config** (the value of a rule): a frozen keyword-only dataclass deriving from
  :class:`AdapterMethod`, registered under a stable name with :func:`register_adapter` (the
  name checkpoints store; see :func:`method_to_config`). It holds hyperparameters only and
  implements ``adapt(key, w) -> node``: the structured node that replaces the leaf ``w`` (a
  pure function of ``key`` and ``w``; called once per targeted leaf by ``inject`` with a key
  folded from the injection key and the leaf's path). The base checks ``w`` before ``adapt``
  runs (a floating array, as a ``jax.Array``) and counts the trainable parameters
  (:meth:`AdapterMethod.num_trainable`, from the shapes ``adapt`` builds; a method may override
  it with its formula). Methods on kernels derive from :class:`KernelAdapter`, which declares,
  validates and normalizes the shared ``dtype``, ``in_axes``, ``out_axes`` and ``batch_axes``
  fields once and provides :meth:`~KernelAdapter.layout` and
  :meth:`~KernelAdapter.adapter_dtype`; a config's own checks go in ``__post_init__`` after
  ``super().__post_init__()`` (helpers in ``effjax.peft._checks``).

* an **adapter node** (what ``adapt`` returns): a frozen dataclass deriving from
  :class:`AdapterNode`, decorated with :func:`adapter_node`, which registers it as a pytree
  whose children are the fields named in the class variables ``trainable_fields`` and
  ``frozen_fields``; every other field is static (pytree metadata: hashable, compared by
  ``==``). Every node has a static ``method`` field holding the config that built it (used by
  :func:`effjax.peft.summary` and :func:`effjax.peft.save_adapters`). ``materialize()`` is the
  dense weight, of the original leaf's shape and dtype, differentiable in the trainable fields.
  A node defines one of

  - ``low_rank_factors() -> (A, B)`` (LoRA-shaped nodes with fields ``w`` and ``layout``):
    :math:`W' = W + AB` per batch slice, ``A`` ``(*batch, *in, r)``, ``B`` ``(*batch, r,
    *out)``, any scale folded in. The base derives ``delta()`` and ``materialize()`` from it,
    and :mod:`effjax.nn` computes :math:`xW + (xA)B` without the dense delta;
  - ``delta()`` (nodes with a frozen ``w``): :math:`W' = W + \\Delta`; the base's
    ``materialize()`` adds it (:meth:`AdapterNode._dense`, compiled by :func:`jit_dense`);
  - ``materialize()`` itself, for any other form of :math:`W'`.

Everything else (rules, ``inject``, ``materialize``, ``merge``, ``trainable_mask``,
``split``/``combine``, ``summary``, save/load) is generic over this interface.

Example: a new LoRA-family method (LoRA-FA: frozen random :math:`A`, trainable :math:`B`,
:math:`W' = W + AB`) is its fields, ``adapt`` and ``low_rank_factors``::

  >>> import dataclasses, jax, jax.numpy as jnp
  >>> from effjax.peft.layout import KernelLayout
  >>> @adapter_node
  ... class FAWeight(AdapterNode):
  ...     trainable_fields = ('b',)
  ...     frozen_fields = ('w', 'a')
  ...     w: jax.Array
  ...     a: jax.Array
  ...     b: jax.Array
  ...     method: 'LoRAFA'
  ...     layout: KernelLayout
  ...     def low_rank_factors(self):
  ...         return self.a, self.b
  >>> @register_adapter('example_lora_fa')
  ... @dataclasses.dataclass(frozen=True, kw_only=True)
  ... class LoRAFA(KernelAdapter):
  ...     rank: int = 2
  ...     def adapt(self, key, w):
  ...         lay, dt = self.layout(w.shape), self.adapter_dtype(w.dtype)
  ...         a = jax.random.normal(key, lay.batch_shape + lay.in_shape + (self.rank,), dt)
  ...         b = jnp.zeros(lay.batch_shape + (self.rank,) + lay.out_shape, dt)
  ...         return FAWeight(w=w, a=a, b=b, method=self, layout=lay)
  >>> node = LoRAFA(in_axes=0).adapt(jax.random.key(0), jnp.ones((3, 4)))
  >>> node.method.in_axes, bool((node.materialize() == 1.0).all())  # B = 0: W' = W
  ((0,), True)
  >>> LoRAFA().num_trainable((3, 4))  # r n_out, counted from the shapes adapt builds
  8
  >>> method_to_config(LoRAFA(rank=3))['method']
  'example_lora_fa'
  >>> LoRAFA().adapt(jax.random.key(0), jnp.ones((3, 4), jnp.int32))
  Traceback (most recent call last):
  TypeError: LoRAFA needs a floating kernel, got dtype int32
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
import re
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from effjax.compress import dense_weight, is_quantized
from effjax.peft._checks import (
    SizeLimit,
    adapter_dtype,
    as_float_kernel,
    check_kernel,
    check_size_limits,
    instance_hint,
)
from effjax.peft.layout import KernelLayout, axes_field

__all__ = ["AdapterMethod", "KernelAdapter", "AdapterNode", "adapter_node", "is_adapter",
           "register_adapter", "registered_adapters", "method_to_config", "method_from_config",
           "jit_dense"]


def _checked_adapt(adapt):
    """``adapt`` with its leaf checked first: a floating array, converted to a ``jax.Array``;
    for a :class:`KernelAdapter`, not zero-size and within the config's
    :meth:`~KernelAdapter.size_limits` (checked before anything is allocated). A quantized
    base (:class:`~effjax.compress.QuantizedWeight`) is adapted through its dequantized copy
    and kept quantized in the node (:func:`_adapt_quantized`)."""

    @functools.wraps(adapt)
    def checked(self, key, w, *args, **kwargs):
        if is_quantized(w):
            return _adapt_quantized(self, checked, key, w, *args, **kwargs)
        w = as_float_kernel(w, self.name)
        if isinstance(self, KernelAdapter):
            lay = self.layout(w.shape)
            check_kernel(lay, self.name)
            check_size_limits(self, lay, self.size_limits(lay))
        return adapt(self, key, w, *args, **kwargs)

    checked._checks_kernel = True
    return checked


def _adapt_quantized(method, checked, key, qw, *args, **kwargs):
    """QLoRA: the node ``method`` builds for the dequantized base, with the quantized base in
    its frozen ``w``. Methods that change the base (PiSSA, OLoRA, ...) or train it cannot keep
    a quantized base: ``TypeError`` saying what to do instead."""
    dense = qw.materialize()
    node = checked(method, key, dense, *args, **kwargs)
    trains = "w" in getattr(node, "trainable_fields", ())
    if trains or getattr(node, "w", None) is not dense:
        raise TypeError(
            f"{method.name} {'trains' if trains else 'rewrites'} the base weight, which stays "
            f"frozen in a quantized base ({qw.format}): adapt a "
            f"float base, use a method that keeps W (LoRA, DoRA, VeRA, ...), or start from "
            f"effjax.compress.loftq_init for a quantization-aware init")
    return node.replace(w=qw)


def _config_repr(self) -> str:
    """``Name(field=value, ...)``: the method's own fields, then the shared kernel fields."""
    shared = _KERNEL_FIELDS if isinstance(self, KernelAdapter) else ()
    fields = [f.name for f in dataclasses.fields(self) if f.repr]
    names = [n for n in fields if n not in shared] + [n for n in fields if n in shared]
    return f"{type(self).__qualname__}({', '.join(f'{n}={getattr(self, n)!r}' for n in names)})"


class AdapterMethod(abc.ABC):
    """Base class of method configs (frozen keyword-only dataclasses; see the module docs).

    Subclasses are declared ``@dataclasses.dataclass(frozen=True, kw_only=True)``, registered
    with :func:`register_adapter`, validate their fields in ``__post_init__`` and implement
    :meth:`adapt`. Every ``adapt`` a subclass defines receives its leaf checked: a floating
    ``jax.Array`` (anything else raises ``TypeError`` naming the method). Configs print their
    own fields first, then the shared ones of :class:`KernelAdapter`. Field values must be
    JSON-representable (bool, int, float, str, None, tuples of them, or a dtype) so that
    :func:`effjax.peft.save_adapters` can store the config beside the weights.
    """

    #: What data-driven inits need beside the weight: None (nothing), ``"inputs"`` (statistics of
    #: the layer's inputs, from :func:`effjax.peft.calibrate`) or ``"gradients"`` (the loss
    #: gradient of the leaf on a batch). :func:`effjax.peft.inject` passes the leaf's entry of
    #: its ``calibration`` mapping as ``adapt(key, w, data=...)`` to such methods.
    calibration: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__repr__" not in cls.__dict__:  # kept by @dataclass, which adds only missing methods
            cls.__repr__ = _config_repr
        adapt = cls.__dict__.get("adapt")
        if (callable(adapt) and not getattr(adapt, "__isabstractmethod__", False)
                and not getattr(adapt, "_checks_kernel", False)):
            cls.adapt = _checked_adapt(adapt)

    @abc.abstractmethod
    def adapt(self, key: jax.Array, w: jax.Array) -> AdapterNode:
        """The node that replaces the leaf ``w``; ``key`` is this leaf's own PRNG key.

        Methods with a ``calibration`` kind take a third keyword argument ``data`` (the leaf's
        calibration entry)."""

    def num_trainable(self, shape: Sequence[int]) -> int:
        """Number of trainable parameters ``adapt`` creates for a float32 leaf of ``shape``.

        The default counts the trainable fields of the node ``adapt`` builds, from their shapes
        alone (``jax.eval_shape``: nothing is computed); methods override it with their formula
        (the conformance tests check both against a count written by hand). Methods that need
        calibration data must override it."""
        if self.calibration is not None:
            raise NotImplementedError(f"{self.name} needs calibration data to adapt a leaf; "
                                      f"it must define num_trainable(shape) itself")
        leaf = jax.ShapeDtypeStruct(tuple(int(s) for s in shape), jnp.float32)
        node = jax.eval_shape(self.adapt, jax.random.key(0), leaf)
        return sum(math.prod(x.shape) for f in node.trainable_fields
                   for x in jax.tree.leaves(getattr(node, f)))

    @property
    def name(self) -> str:
        """The method's display name (the class name), used by ``summary``."""
        return type(self).__name__

    def _set(self, **values: Any) -> None:
        """Set normalized field values from ``__post_init__`` (the dataclass is frozen)."""
        for k, v in values.items():
            object.__setattr__(self, k, v)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelAdapter(AdapterMethod):
    """Base class of the methods that adapt a kernel seen as a stack of matrices.

    Declares the fields every such method shares, validated and normalized here once:

    Attributes:
      dtype: dtype of the adapter arrays (a floating dtype). None: the kernel's dtype, except
        float32 for float16 and bfloat16 kernels (PEFT's ``autocast_adapter_dtype=True``
        default); see :meth:`adapter_dtype`.
      in_axes, out_axes, batch_axes: the kernel's input, output and batch (stacked layers /
        experts) axes: None, an int or a tuple of ints, stored as tuples (see
        :mod:`effjax.peft.layout`); default: no batch axes, the first axis in, the rest out.

    Subclasses add their own fields and call ``super().__post_init__()`` first in their
    ``__post_init__``; a method with size fields (a rank, a number of bases) declares their
    upper bounds for a kernel in :meth:`size_limits`, checked with the zero-size check before
    every ``adapt`` so that no absurd value reaches an allocation.
    """

    dtype: Any = None
    in_axes: int | tuple[int, ...] | None = None
    out_axes: int | tuple[int, ...] | None = None
    batch_axes: int | tuple[int, ...] = ()

    def __post_init__(self):
        if self.dtype is not None:
            dt = jnp.dtype(self.dtype)
            if not jnp.issubdtype(dt, jnp.floating):
                raise TypeError(f"{self.name} dtype must be a floating dtype, got {dt}")
            self._set(dtype=dt)
        self._set(**{name: axes_field(getattr(self, name), name)
                     for name in ("in_axes", "out_axes", "batch_axes")})

    def layout(self, shape: Sequence[int]) -> KernelLayout:
        """The kernel layout this config gives a weight of ``shape``."""
        return KernelLayout.resolve(shape, in_axes=self.in_axes, out_axes=self.out_axes,
                                    batch_axes=self.batch_axes, method=self.name)

    def size_limits(self, lay: KernelLayout) -> tuple[SizeLimit, ...]:
        """Upper bounds of this config's size fields (rank, number of bases, ...) for a kernel
        of layout ``lay``, checked before every ``adapt`` (a field above its bound raises
        ``ValueError`` naming it, its value, the kernel's shape and the bound). Default: none;
        see :mod:`effjax.peft._checks` for the two kinds of bound the methods use.

        Example:
          >>> from effjax.peft import LoRA
          >>> LoRA(rank=4).size_limits(LoRA().layout((8, 4)))[0][:2]
          ('rank', 8)
        """
        del lay
        return ()

    def adapter_dtype(self, w_dtype: Any) -> jnp.dtype:
        """dtype of the adapter arrays for a kernel of ``w_dtype``: the config's ``dtype``, else
        the kernel's, except float32 for float16 / bfloat16 kernels (PEFT's
        ``autocast_adapter_dtype``)."""
        return adapter_dtype(self.dtype, w_dtype)


_KERNEL_FIELDS = tuple(f.name for f in dataclasses.fields(KernelAdapter))


class AdapterNode:
    """Base class of adapter nodes (frozen dataclasses registered with :func:`adapter_node`).

    Class variables:
      trainable_fields: names of the fields the optimizer updates (e.g. ``('a', 'b')``).
      frozen_fields: names of array fields kept fixed (e.g. ``('w',)``).

    A node defines ``low_rank_factors()``, ``delta()`` or ``materialize()`` (see the module
    docs); the others follow.
    """

    trainable_fields: ClassVar[tuple[str, ...]] = ()
    frozen_fields: ClassVar[tuple[str, ...]] = ()

    def materialize(self) -> jax.Array:
        """The dense weight (the original leaf's shape and dtype): ``w + delta()``, compiled
        once per node structure (:func:`jit_dense`)."""
        return jit_dense(self)

    def delta(self) -> jax.Array:
        """:math:`W' - W` in ``w``'s layout (promoted dtype of ``w`` and the factors), from
        ``low_rank_factors()``: :math:`AB` per batch slice."""
        if not hasattr(self, "low_rank_factors"):
            raise NotImplementedError(f"{type(self).__name__} defines neither delta() nor "
                                      f"low_rank_factors()")
        a, b = self.low_rank_factors()
        lay, r = self.layout, a.shape[-1]
        ct = jnp.promote_types(jnp.promote_types(self.w.dtype, a.dtype), b.dtype)
        a = a.reshape(lay.batch_shape + (lay.n_in, r)).astype(ct)
        b = b.reshape(lay.batch_shape + (r, lay.n_out)).astype(ct)
        return lay.from_matrix(jnp.matmul(a, b))

    def _dense(self) -> jax.Array:
        """``w + delta()`` in the promoted dtype, cast to ``w``'s dtype (for nodes with a
        frozen ``w``; :func:`jit_dense` compiles it)."""
        d = self.delta()
        return (dense_weight(self.w).astype(d.dtype) + d).astype(self.w.dtype)

    def replace(self, **changes: Any) -> AdapterNode:
        """A copy with some fields replaced (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def __getitem__(self, index: Any) -> AdapterNode:
        """``node[...]`` is the node itself: Flax NNX layers read a ``Param`` as
        ``param[...]``, and an intercepted layer (:mod:`effjax.nn.interception`) must get the
        node, not a dense copy."""
        if index is Ellipsis:
            return self
        raise TypeError(f"{type(self).__name__} is an adapter node: only node[...] is "
                        f"supported (use .materialize() for the dense weight)")


def _overrides(cls: type, name: str) -> bool:
    return getattr(cls, name, None) is not getattr(AdapterNode, name, None)


def adapter_node(cls: type) -> type:
    """Class decorator: a frozen keyword-only dataclass registered as a pytree node.

    The children are ``cls.trainable_fields + cls.frozen_fields`` (in that order); every other
    dataclass field is static metadata. Each declared name must be a field, the class must have
    a ``method`` field, and it must define ``materialize()``, ``delta()`` or
    ``low_rank_factors()`` (the last two need ``w`` and ``layout`` fields).
    """
    if not issubclass(cls, AdapterNode):
        raise TypeError(f"{cls.__name__} must derive from AdapterNode")
    cls = dataclasses.dataclass(frozen=True, kw_only=True)(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    data = tuple(cls.trainable_fields) + tuple(cls.frozen_fields)
    missing = [n for n in data if n not in names]
    if missing or len(set(data)) != len(data):
        raise TypeError(f"{cls.__name__}: trainable_fields + frozen_fields {data} must be "
                        f"distinct dataclass fields; fields are {names}")
    if "method" not in names:
        raise TypeError(f"{cls.__name__} needs a static 'method' field (its config)")
    if not (_overrides(cls, "materialize") or _overrides(cls, "_dense")):
        if not (_overrides(cls, "delta") or hasattr(cls, "low_rank_factors")):
            raise TypeError(f"{cls.__name__} must define materialize(), delta() or "
                            f"low_rank_factors()")
        if "w" not in names or ("layout" not in names and not _overrides(cls, "delta")):
            raise TypeError(f"{cls.__name__}: the materialize() derived from delta() / "
                            f"low_rank_factors() needs a 'w' field (and 'layout' for "
                            f"low_rank_factors); fields are {names}")
    meta = [n for n in names if n not in data]
    jax.tree_util.register_dataclass(cls, data_fields=list(data), meta_fields=meta)
    return cls


@jax.jit
def jit_dense(node: AdapterNode) -> jax.Array:
    """``node._dense()`` compiled once per node structure (shapes, dtypes, static fields), so
    eager ``materialize()`` calls stay fast (the default ``materialize``)."""
    return node._dense()


def is_adapter(x: Any) -> bool:
    """True for adapter nodes (the ``is_leaf`` predicate that stops at nodes)."""
    return isinstance(x, AdapterNode)


# --------------------------------------------------------------------------------------------
# registered names: what checkpoints store

#: ``{name: config class}``, filled when the method modules are imported (effjax.peft imports
#: them all), like JAX's pytree registry; never changed afterwards.
_REGISTRY: dict[str, type] = {}
_NAME = re.compile(r"[a-z][a-z0-9_]*")


def register_adapter(name: str):
    """Class decorator: register a method config under a stable ``name``.

    The name (lowercase letters, digits and ``_``) is what :func:`effjax.peft.save_adapters`
    stores for the config, so a checkpoint stays loadable when the class moves to another
    module or is renamed (keep the name). Each name belongs to one class and each class has
    one name.

    Example:
      >>> from effjax.peft import LoRA
      >>> registered_adapters()['lora'] is LoRA
      True
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"an adapter name is lowercase letters, digits and '_' starting with a "
                         f"letter, got {name!r}")

    def register(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, AdapterMethod)
                and dataclasses.is_dataclass(cls)):
            raise TypeError(f"register_adapter({name!r}) decorates an AdapterMethod dataclass, "
                            f"got {cls!r}")
        old = _REGISTRY.get(name)
        if old is not None and _path(old) != _path(cls):  # the same class re-imported is fine
            raise ValueError(f"adapter name {name!r} is already registered to {_path(old)}")
        other = _registered_name(cls)
        if other is not None and other != name:
            raise ValueError(f"{_path(cls)} is already registered as {other!r}")
        _REGISTRY[name] = cls
        return cls

    return register


def registered_adapters() -> dict[str, type]:
    """``{name: config class}`` of every registered adapter method."""
    return dict(_REGISTRY)


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _registered_name(cls: type) -> str | None:
    return next((n for n, c in _REGISTRY.items() if c is cls), None)


def _known() -> str:
    return ", ".join(f"'{n}' ({c.__name__})" for n, c in sorted(_REGISTRY.items()))


def _class_of(config: dict[str, Any]) -> type:
    """The registered class a stored config names: ``{"method": name}``, or the class path
    ``{"class": "effjax.peft.lora.LoRA"}`` written before registered names (matched by its
    full path, else by its class name, so a module renamed since still loads)."""
    if "method" in config:
        cls = _REGISTRY.get(config["method"])
        if cls is None:
            raise ValueError(f"unknown adapter method {config['method']!r}; the registered "
                             f"methods are {_known()}")
        return cls
    if "class" in config:
        path = str(config["class"])
        found = [c for c in _REGISTRY.values() if _path(c) == path]
        found = found or [c for c in _REGISTRY.values()
                          if c.__name__ == path.rpartition(".")[2]]
        if len(found) != 1:
            what = "no registered method has" if not found else "several registered methods have"
            raise ValueError(f"adapter config of class {path!r}: {what} the class name "
                             f"{path.rpartition('.')[2]!r}; the registered methods are "
                             f"{_known()}")
        return found[0]
    raise ValueError(f"an adapter config names its method ('method': name), got keys "
                     f"{sorted(config)}")


def _to_json(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (tuple, list)):
        return {"tuple": [_to_json(x) for x in v]}
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    try:
        return {"dtype": np.dtype(v).name}
    except TypeError:
        pass
    raise TypeError(f"cannot store config value {v!r} of type {type(v).__name__}")


def _from_json(v: Any) -> Any:
    if isinstance(v, dict) and set(v) == {"tuple"}:
        return tuple(_from_json(x) for x in v["tuple"])
    if isinstance(v, dict) and set(v) == {"dtype"}:
        return jnp.dtype(v["dtype"])
    return v


def method_to_config(method: AdapterMethod) -> dict[str, Any]:
    """A JSON-able description of a method config: its registered name and field values.

    Example:
      >>> from effjax.peft import LoRA
      >>> method_to_config(LoRA(rank=2, alpha=4.0, in_axes=(0, 1)))
      ... # doctest: +NORMALIZE_WHITESPACE
      {'method': 'lora', 'fields': {'dtype': None, 'in_axes': {'tuple': [0, 1]},
       'out_axes': None, 'batch_axes': {'tuple': []}, 'rank': 2, 'alpha': 4.0,
       'rslora': False, 'init': 'kaiming'}}
    """
    if isinstance(method, type) and issubclass(method, AdapterMethod):
        raise TypeError(f"method_to_config got the class {method.__name__}, not a method "
                        f"config; {instance_hint(method)}")
    if not isinstance(method, AdapterMethod) or not dataclasses.is_dataclass(method):
        raise TypeError(f"expected an AdapterMethod dataclass, got {type(method).__name__}")
    name = _registered_name(type(method))
    if name is None:
        raise TypeError(f"{_path(type(method))} has no registered name, so a checkpoint cannot "
                        f"name it; decorate the class with @register_adapter('<name>')")
    return {"method": name,
            "fields": {f.name: _to_json(getattr(method, f.name))
                       for f in dataclasses.fields(method)}}


def method_from_config(config: dict[str, Any]) -> AdapterMethod:
    """Rebuild a method config stored by :func:`method_to_config`.

    Accepts ``{"method": name, "fields": {...}}`` and the form checkpoints stored before
    registered names, ``{"class": "effjax.peft.lora.LoRA", "fields": {...}}`` (mapped to the
    registered class of that name).

    Raises:
      ValueError: an unknown name or class (the message lists the registered methods).
      TypeError: fields the class does not accept or does not validate.

    Example:
      >>> from effjax.peft import LoRA
      >>> m = LoRA(rank=2, alpha=4.0, in_axes=(0, 1))
      >>> method_from_config(method_to_config(m)) == m
      True
      >>> old = {'class': 'effjax.peft.old_module.LoRA', 'fields': {'rank': 2}}  # class path
      >>> method_from_config(old) == LoRA(rank=2)  # found by its class name
      True
    """
    cls = _class_of(config)
    fields = {k: _from_json(v) for k, v in config.get("fields", {}).items()}
    try:
        return cls(**fields)
    except TypeError as e:
        raise TypeError(f"adapter config for {cls.__name__}: {e}") from None
