"""The adapter-method interface every effjax.peft method implements.

A PEFT method is two small classes:

* a **method config** (the value of a rule): a frozen keyword-only dataclass deriving from
  :class:`AdapterMethod`. It holds hyperparameters only (rank, alpha, init, axes ...) and
  implements

  - ``adapt(key, w) -> node``: build the structured node that replaces the leaf ``w``
    (a pure function of ``key`` and ``w``; called once per targeted leaf by ``inject`` with a
    key folded from the injection key and the leaf's path);
  - ``num_trainable(shape) -> int``: the trainable-parameter formula for a leaf of ``shape``
    (the conformance tests check it against the node ``adapt`` builds).

* an **adapter node** (what ``adapt`` returns): a frozen dataclass deriving from
  :class:`AdapterNode`, decorated with :func:`adapter_node`, which registers it as a pytree
  whose children are the fields named in the class variables ``trainable_fields`` and
  ``frozen_fields``; every other field is static (pytree metadata: hashable, compared by
  ``==``). Every node has a static ``method`` field holding the config that built it (used by
  :func:`effjax.peft.summary` and :func:`effjax.peft.save_adapters`). The node implements

  - ``materialize() -> Array``: the dense weight, of the original leaf's shape and dtype,
    differentiable in the trainable fields;
  - ``merge() -> Array`` (optional): the dense weight for export; defaults to
    ``materialize()``.

Everything else (rules, ``inject``, ``materialize``, ``merge``, ``trainable_mask``,
``split``/``combine``, ``summary``, save/load) is generic over this interface.

Example: a (toy) method that learns an additive bias on a whole kernel,
:math:`W' = W + c`, one trainable scalar per leaf::

  >>> import dataclasses, jax, jax.numpy as jnp
  >>> @adapter_node
  ... class ShiftWeight(AdapterNode):
  ...     trainable_fields = ('c',)
  ...     frozen_fields = ('w',)
  ...     w: jax.Array
  ...     c: jax.Array
  ...     method: 'Shift'
  ...     def materialize(self):
  ...         return (self.w + self.c).astype(self.w.dtype)
  >>> @dataclasses.dataclass(frozen=True, kw_only=True)
  ... class Shift(AdapterMethod):
  ...     def adapt(self, key, w):
  ...         return ShiftWeight(w=w, c=jnp.zeros((), w.dtype), method=self)
  ...     def num_trainable(self, shape):
  ...         return 1
  >>> node = Shift().adapt(jax.random.key(0), jnp.ones((2, 3)))
  >>> jax.tree.leaves(node)  # children: trainable then frozen fields
  [Array(0., dtype=float32), Array([[1., 1., 1.],
         [1., 1., 1.]], dtype=float32)]
  >>> node.materialize().shape
  (2, 3)
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import numpy as np

__all__ = ["AdapterMethod", "AdapterNode", "adapter_node", "is_adapter", "method_to_config",
           "method_from_config", "jit_dense"]


class AdapterMethod(abc.ABC):
    """Base class of method configs (frozen keyword-only dataclasses; see the module docs).

    Subclasses are declared ``@dataclasses.dataclass(frozen=True, kw_only=True)``, validate
    their fields in ``__post_init__`` and implement :meth:`adapt` and :meth:`num_trainable`.
    Field values must be JSON-representable (bool, int, float, str, None, tuples of them, or a
    dtype) so that :func:`effjax.peft.save_adapters` can store the config beside the weights.
    """

    #: What data-driven inits need beside the weight: None (nothing), ``"inputs"`` (statistics of
    #: the layer's inputs, from :func:`effjax.peft.calibrate`) or ``"gradients"`` (the loss
    #: gradient of the leaf on a batch). :func:`effjax.peft.inject` passes the leaf's entry of
    #: its ``calibration`` mapping as ``adapt(key, w, data=...)`` to such methods.
    calibration: ClassVar[str | None] = None

    @abc.abstractmethod
    def adapt(self, key: jax.Array, w: jax.Array) -> AdapterNode:
        """The node that replaces the leaf ``w``; ``key`` is this leaf's own PRNG key.

        Methods with a ``calibration`` kind take a third keyword argument ``data`` (the leaf's
        calibration entry)."""

    @abc.abstractmethod
    def num_trainable(self, shape: Sequence[int]) -> int:
        """Number of trainable parameters ``adapt`` creates for a leaf of ``shape``."""

    @property
    def name(self) -> str:
        """The method's display name (the class name), used by ``summary``."""
        return type(self).__name__


class AdapterNode(abc.ABC):
    """Base class of adapter nodes (frozen dataclasses registered with :func:`adapter_node`).

    Class variables:
      trainable_fields: names of the fields the optimizer updates (e.g. ``('a', 'b')``).
      frozen_fields: names of array fields kept fixed (e.g. ``('w',)``).
    """

    trainable_fields: ClassVar[tuple[str, ...]] = ()
    frozen_fields: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def materialize(self) -> jax.Array:
        """The dense weight (the original leaf's shape and dtype); most nodes return
        ``jit_dense(self)`` and define ``delta()`` (see :meth:`_dense`)."""

    def _dense(self) -> jax.Array:
        """``w + delta()`` in the promoted dtype, cast to ``w``'s dtype (for nodes with a
        frozen ``w`` and a ``delta()`` method; :func:`jit_dense` compiles it)."""
        d = self.delta()
        return (self.w.astype(d.dtype) + d).astype(self.w.dtype)

    def merge(self) -> jax.Array:
        """The dense weight with the adapter folded in, for export (default: materialize)."""
        return self.materialize()

    def replace(self, **changes: Any) -> AdapterNode:
        """A copy with some fields replaced (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


def adapter_node(cls: type) -> type:
    """Class decorator: a frozen keyword-only dataclass registered as a pytree node.

    The children are ``cls.trainable_fields + cls.frozen_fields`` (in that order); every other
    dataclass field is static metadata. Each declared name must be a field, and the class must
    have a ``method`` field.
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
    meta = [n for n in names if n not in data]
    jax.tree_util.register_dataclass(cls, data_fields=list(data), meta_fields=meta)
    return cls


@jax.jit
def jit_dense(node: AdapterNode) -> jax.Array:
    """``node._dense()`` compiled once per node structure (shapes, dtypes, static fields), so
    eager ``materialize()`` calls stay fast; nodes implement ``materialize`` as
    ``return jit_dense(self)``."""
    return node._dense()


def is_adapter(x: Any) -> bool:
    """True for adapter nodes (the ``is_leaf`` predicate that stops at nodes)."""
    return isinstance(x, AdapterNode)


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
        import jax.numpy as jnp

        return jnp.dtype(v["dtype"])
    return v


def method_to_config(method: AdapterMethod) -> dict[str, Any]:
    """A JSON-able description of a method config: its class and field values.

    Example:
      >>> from effjax.peft import LoRA
      >>> method_to_config(LoRA(rank=2, alpha=4.0))['class']
      'effjax.peft.lora.LoRA'
    """
    if not isinstance(method, AdapterMethod) or not dataclasses.is_dataclass(method):
        raise TypeError(f"expected an AdapterMethod dataclass, got {type(method).__name__}")
    cls = type(method)
    return {"class": f"{cls.__module__}.{cls.__qualname__}",
            "fields": {f.name: _to_json(getattr(method, f.name))
                       for f in dataclasses.fields(method)}}


def method_from_config(config: dict[str, Any]) -> AdapterMethod:
    """Rebuild a method config stored by :func:`method_to_config` (imports its module).

    Example:
      >>> from effjax.peft import LoRA
      >>> m = LoRA(rank=2, alpha=4.0, in_axes=(0, 1))
      >>> method_from_config(method_to_config(m)) == m
      True
    """
    module, _, qualname = config["class"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), qualname)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot find adapter method class {config['class']!r}: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, AdapterMethod)):
        raise TypeError(f"{config['class']!r} is not an AdapterMethod")
    return cls(**{k: _from_json(v) for k, v in config["fields"].items()})
