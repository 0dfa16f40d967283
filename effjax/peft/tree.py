"""Param-tree rewriters: inject adapters, materialize/merge them, and split trainable leaves.

All functions are pure and work on any pytree of arrays: a Flax Linen ``params`` dict, an NNX
``State`` (from ``nnx.split``; put the result back with ``nnx.merge``) or nested containers. The
tree keeps its structure; targeted leaves become adapter nodes (:class:`~effjax.peft.LoRAWeight`
...) which are pytrees themselves, so ``jax.jit``, ``jax.grad``, optax and orbax see their
arrays as ordinary leaves.

Typical fine-tuning loop::

  tree = inject(params, {r'.*/(query|value)/kernel': LoRA(rank=8, alpha=16)}, key=key)
  trainable, frozen = split(tree)
  opt_state = optimizer.init(trainable)

  def loss_fn(trainable, frozen, batch):
      return loss(model_apply(materialize(combine(trainable, frozen)), batch))

  grads = jax.grad(loss_fn)(trainable, frozen, batch)  # only adapter leaves
  updates, opt_state = optimizer.update(grads, opt_state, trainable)
  trainable = optax.apply_updates(trainable, updates)

The gradient is computed for the trainable leaves only. Alternatively keep one tree and freeze
with ``optax.multi_transform({'train': opt, 'freeze': optax.set_to_zero()}, labels)``,
``labels = jax.tree.map(lambda m: 'train' if m else 'freeze', trainable_mask(tree))``. (Note
that ``optax.masked(opt, mask)`` passes the masked-out updates through unchanged; it does not
zero them.)
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from effjax.compress import is_quantized, quantize_weight
from effjax.peft._checks import short_repr
from effjax.peft.base import AdapterNode, is_adapter
from effjax.peft.rules import compile_rules
from effjax.selection import rewrite, tree_paths

__all__ = ["inject", "materialize", "merge", "trainable_mask", "split", "combine", "summary",
           "Summary", "adapter_paths", "leaf_key"]


def leaf_key(key: jax.Array, path: str) -> jax.Array:
    """The PRNG key ``inject`` gives the leaf at ``path``: ``fold_in(key, crc32(path))``.

    Depending only on the path, a leaf's adapter init does not change when other rules are
    added or removed.
    """
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def _is_node(x: Any) -> bool:
    """Adapter nodes and quantized weights: the structured leaves a tree walk stops at."""
    return is_adapter(x) or is_quantized(x)


def _flatten(tree: Any):
    return tree_paths(tree, is_leaf=_is_node)


def _check_not_module(params: Any) -> None:
    """An NNX module (not its state) passed as params: say what to pass instead."""
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax is a dependency
        return
    if isinstance(params, nnx.Module):
        raise TypeError(
            f"inject got the NNX module {type(params).__name__} itself; pass its parameters: "
            f"graphdef, params, rest = nnx.split(model, nnx.Param, ...); tree = inject(params, "
            f"rules, key=key); a model back: nnx.merge(graphdef, materialize(tree), rest)")


def _check_key(key: Any) -> None:
    """``TypeError`` unless ``key`` is a PRNG key (typed, or a raw ``uint32`` key array)."""
    dtype = getattr(key, "dtype", None)
    ok = dtype is not None and (jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
                                or np.dtype(dtype) == np.uint32)
    if not ok:
        raise TypeError(f"inject key must be a PRNG key, e.g. key=jax.random.key(0), got "
                        f"{type(key).__name__} {short_repr(key)}")


def adapter_paths(tree: Any) -> dict[str, AdapterNode]:
    """``{path: node}`` for every adapter node of ``tree``, in tree order."""
    paths, leaves, _ = _flatten(tree)
    return {p: x for p, x in zip(paths, leaves) if is_adapter(x)}


def inject(params: Any, rules: Any, *, key: jax.Array,
           calibration: Mapping[str, Any] | None = None) -> Any:
    """Replace the leaves chosen by ``rules`` with adapter nodes.

    For each leaf, the first rule whose regex fullmatches its ``'/'``-joined path
    (:mod:`effjax.peft.rules`) decides: a method ``m`` replaces the leaf ``w`` with
    ``m.adapt(leaf_key(key, path), w)``; ``None`` leaves it. Leaves no rule targets stay as they
    are (and are frozen). With :class:`~effjax.peft.LoRA` the node of a kernel ``w``
    materializes to :math:`W + s\\,AB` with :math:`B = 0` at init, so
    ``materialize(inject(p, rules, key=k))`` equals ``p`` exactly.

    Args:
      params: a pytree of arrays (Linen ``params`` dict, NNX ``State``, ...). It may already
        hold adapter nodes (from an earlier ``inject``); those are kept but cannot be targeted.
      rules: ordered mapping (or sequence of pairs) ``{regex: method | None}``.
      key: a PRNG key; each leaf gets ``fold_in(key, crc32(path))`` (:func:`leaf_key`).
      calibration: ``{path: data}`` for data-driven methods (those whose ``calibration`` class
        attribute is ``"inputs"`` or ``"gradients"``, e.g. EVA, CorDA, LoRA-SB): the leaf's
        entry is passed as ``adapt(key, w, data=...)``. Build it with
        :func:`effjax.peft.calibrate` (inputs) or from ``jax.grad`` of the loss (gradients).

    Returns:
      A new tree of the same structure with adapter nodes at the targeted leaves.

    Raises:
      TypeError: a bad ``rules`` or rule value (a method class instead of an instance
        included); a ``key`` that is not a PRNG key; a targeted leaf that is not a floating
        array or is already an adapter node. ValueError: a bad regex; a rule that decides no
        leaf (the message lists close paths); a leaf whose shape the method cannot adapt
        (too few axes, zero-size, or too small for the method's rank or other size field,
        see ``KernelAdapter.size_limits``). Messages about a leaf name its path, shape and
        dtype.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from effjax.peft import LoRA, materialize
      >>> params = {'dense': {'kernel': jnp.ones((4, 3)), 'bias': jnp.zeros(3)}}
      >>> tree = inject(params, {r'.*/kernel': LoRA(rank=2)}, key=jax.random.key(0))
      >>> type(tree['dense']['kernel']).__name__, tree['dense']['kernel'].a.shape
      ('LoRAWeight', (4, 2))
      >>> jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), materialize(tree), params))
      True
    """
    def adapt(path, leaf, method):
        if is_adapter(leaf):
            raise TypeError(f"the leaf already holds a {type(leaf).__name__} "
                            f"({leaf.method.name}); adapters do not stack")
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"{method.name} needs a floating array")
        kind = getattr(method, "calibration", None)
        extra = {}
        if kind is not None:
            if calibration is None or path not in calibration:
                raise ValueError(f"{method.name} needs calibration data ({kind}) for this "
                                 f"leaf; pass inject(..., calibration={{'{path}': ...}}) (see "
                                 f"effjax.peft.calibrate)")
            extra["data"] = calibration[path]
        return method.adapt(leaf_key(key, path), leaf, **extra)

    _check_not_module(params)
    _check_key(key)
    return rewrite(params, compile_rules(rules), adapt, is_leaf=_is_node)


def materialize(tree: Any) -> Any:
    """Every adapter node replaced by its dense weight (``node.materialize()``), and every
    quantized weight (:class:`~effjax.compress.QuantizedWeight`) by its dequantized kernel.

    The result has the structure of the original params, so any model code runs unchanged:
    ``model.apply({'params': materialize(tree)}, x)`` or
    ``nnx.merge(graphdef, materialize(state))``. Differentiable in the trainable fields.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from effjax.peft import LoRA, inject
      >>> tree = inject({'k': jnp.eye(2)}, {'k': LoRA(rank=1, alpha=2.0)}, key=jax.random.key(0))
      >>> tree = {'k': tree['k'].replace(a=jnp.array([[1.0], [0.0]]), b=jnp.array([[0.0, 3.0]]))}
      >>> materialize(tree)['k']  # I + (2 / 1) a @ b
      Array([[1., 6.],
             [0., 1.]], dtype=float32)
    """
    return jax.tree.map(lambda x: x.materialize() if _is_node(x) else x, tree,
                        is_leaf=_is_node)


_MERGE_MODES = ("dequantize", "requantize", "keep")


def merge(tree: Any, *, quantized: str = "dequantize", dtype: Any = None) -> Any:
    """Plain params with the adapters folded in, for export or inference.

    Every adapter node over a float base becomes a dense array of the original leaf's shape
    and dtype (for LoRA :math:`W + s\\,AB` cast to ``w``'s dtype, no ``stop_gradient``). For a
    quantized base (QLoRA: a :class:`~effjax.compress.QuantizedWeight` in the node's ``w``)
    ``quantized`` picks one of three ways, each with its error:

    * ``"dequantize"`` (default, the recommended export): :math:`\\mathrm{deq}(W_q) + s\\,AB`
      as a dense array in ``dtype`` (default: the base's original dtype, e.g. bfloat16). The
      model computes exactly what it computed during training (up to the export dtype's
      rounding); bare quantized leaves are dequantized too.
    * ``"requantize"``: that sum quantized again in the base's format
      (:func:`~effjax.compress.quantize_weight`), what PEFT's ``Linear4bit.merge`` does
      (dequantize, add, requantize). The merged weights are as small as the base, but each
      element moves to its format's nearest code: the adapter's update is rounded away where
      it is smaller than half a code step, and the model drifts from the trained one
      (``tests/peft/test_qlora.py`` measures it). Bare quantized leaves are kept.
    * ``"keep"``: nodes over quantized bases are kept (base and adapters separate: exact, as
      small as training, and the layers run them without densifying).

    Args:
      tree: an injected tree.
      quantized: ``"dequantize"``, ``"requantize"`` or ``"keep"`` (see above).
      dtype: the dense dtype of ``"dequantize"`` (None: each base's original dtype).

    Returns:
      The merged tree.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from effjax.peft import LoRA, inject
      >>> tree = inject({'k': jnp.eye(2, dtype=jnp.bfloat16)}, {'k': LoRA(rank=1, alpha=2.0)},
      ...               key=jax.random.key(0))
      >>> tree = {'k': tree['k'].replace(a=jnp.array([[1.0], [0.0]]), b=jnp.array([[0.0, 3.0]]))}
      >>> merge(tree)['k']  # I + (2 / 1) a @ b, in the kernel's dtype
      Array([[1, 6],
             [0, 1]], dtype=bfloat16)
    """
    if quantized not in _MERGE_MODES:
        raise ValueError(f"merge(quantized=...) must be one of {_MERGE_MODES}, got {quantized!r}")

    def fold(x):
        if is_quantized(x):
            return x.materialize().astype(dtype or x.dtype) if quantized == "dequantize" else x
        if not is_adapter(x):
            return x
        base = getattr(x, "w", None)
        if not is_quantized(base):
            return x.materialize()
        if quantized == "keep":
            return x
        dense = x.materialize()  # deq(W_q) + delta in the base's dtype
        if quantized == "requantize":
            return quantize_weight(dense, base.format)
        return dense.astype(dtype or base.dtype)

    return jax.tree.map(fold, tree, is_leaf=_is_node)


def _node_map(node: AdapterNode, fn_trainable, fn_frozen) -> AdapterNode:
    changes = {f: jax.tree.map(fn_trainable, getattr(node, f)) for f in node.trainable_fields}
    changes |= {f: jax.tree.map(fn_frozen, getattr(node, f)) for f in node.frozen_fields}
    return dataclasses.replace(node, **changes)


def trainable_mask(tree: Any) -> Any:
    """A tree of bools of ``tree``'s structure: True exactly at the nodes' trainable fields.

    Plain leaves (not adapted) and frozen fields (LoRA's ``w``) are False. Usable as an optax
    mask or label source (see the module docstring).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from effjax.peft import LoRA, inject
      >>> tree = inject({'k': jnp.ones((3, 2)), 'b': jnp.ones(2)}, {'k': LoRA(rank=1)},
      ...               key=jax.random.key(0))
      >>> m = trainable_mask(tree)
      >>> m['b'], m['k'].w, m['k'].a, m['k'].b
      (False, False, True, True)
    """
    return jax.tree.map(
        lambda x: _node_map(x, lambda _: True, lambda _: False) if is_adapter(x) else
        jax.tree.map(lambda _: False, x), tree, is_leaf=is_adapter)


def split(tree: Any) -> tuple[Any, Any]:
    """``(trainable, frozen)``: two trees of ``tree``'s structure with ``None`` holes.

    ``trainable`` keeps the nodes' trainable fields and has ``None`` everywhere else;
    ``frozen`` is the complement. ``None`` is an empty pytree, so ``jax.grad``, optax and
    orbax see only the arrays that are there. :func:`combine` is the exact inverse.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from effjax.peft import LoRA, inject
      >>> tree = inject({'k': jnp.ones((3, 2)), 'b': jnp.ones(2)}, {'k': LoRA(rank=1)},
      ...               key=jax.random.key(0))
      >>> trainable, frozen = split(tree)
      >>> [x.shape for x in jax.tree.leaves(trainable)], [x.shape for x in jax.tree.leaves(frozen)]
      ([(3, 1), (1, 2)], [(2,), (3, 2)])
    """
    none = lambda _: None
    keep = lambda x: x
    trainable = jax.tree.map(
        lambda x: _node_map(x, keep, none) if is_adapter(x) else None, tree, is_leaf=is_adapter)
    frozen = jax.tree.map(
        lambda x: _node_map(x, none, keep) if is_adapter(x) else x, tree, is_leaf=is_adapter)
    return trainable, frozen


def combine(*trees: Any) -> Any:
    """Fill the ``None`` holes of the first tree from the next ones (inverse of :func:`split`).

    ``combine(*split(tree))`` is ``tree`` (same structure, the same array objects).
    """
    if not trees:
        raise TypeError("combine needs at least one tree")

    def pick(*xs):
        for x in xs:
            if x is not None:
                return x
        return None

    return jax.tree.map(pick, *trees, is_leaf=lambda x: x is None)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Summary:
    """Parameter counts of a tree (returned by :func:`summary`).

    Attributes:
      trainable: elements in trainable fields of adapter nodes.
      total: elements of every array leaf (frozen weights, adapters and untouched leaves;
        PRNG key arrays excluded; a quantized kernel counts its weights, not its bytes), as
        PEFT's "all params".
      methods: ``{method name: {'leaves': n, 'trainable': t, 'total': c}}`` over the nodes of
        each method (``total`` includes their frozen fields).
    """

    trainable: int
    total: int
    methods: dict[str, dict[str, int]]

    @property
    def percent(self) -> float:
        """``100 * trainable / total``."""
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        line = (f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || "
                f"trainable%: {self.percent:.4f}")
        rows = [f"  {name}: {c['leaves']} leaves, {c['trainable']:,d} trainable "
                f"of {c['total']:,d}" for name, c in self.methods.items()]
        return "\n".join([line, *rows])


def _size(x: Any) -> int:
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if shape is None or dtype is None or jax.dtypes.issubdtype(dtype, jax.dtypes.extended):
        return 0
    return int(np.prod(shape, dtype=np.int64))


def summary(tree: Any) -> Summary:
    """Trainable and total parameter counts, overall and per method.

    The first line of ``str(summary(tree))`` has the format of PEFT's
    ``print_trainable_parameters()``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from effjax.peft import LoRA, inject
      >>> tree = inject({'k': jnp.ones((6, 4)), 'b': jnp.ones(4)}, {'k': LoRA(rank=2)},
      ...               key=jax.random.key(0))
      >>> print(summary(tree))  # 2 * (6 + 4) = 20 trainable of 24 + 4 + 20
      trainable params: 20 || all params: 48 || trainable%: 41.6667
        LoRA: 1 leaves, 20 trainable of 44
    """
    trainable = total = 0
    methods: dict[str, dict[str, int]] = {}
    def count(v):  # a quantized kernel counts its weights (PEFT counts a Params4bit's too)
        return v.size if is_quantized(v) else _size(v)

    for x in jax.tree.leaves(tree, is_leaf=_is_node):
        if not is_adapter(x):
            total += count(x)
            continue
        t = sum(_size(v) for f in x.trainable_fields for v in jax.tree.leaves(getattr(x, f)))
        c = t + sum(count(v) for f in x.frozen_fields
                    for v in jax.tree.leaves(getattr(x, f), is_leaf=is_quantized))
        trainable, total = trainable + t, total + c
        m = methods.setdefault(x.method.name, {"leaves": 0, "trainable": 0, "total": 0})
        m["leaves"] += 1
        m["trainable"] += t
        m["total"] += c
    return Summary(trainable=trainable, total=total, methods=methods)
