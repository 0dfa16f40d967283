"""Restore targets for sharded low-bit optimizer states, and their conversion to another mesh.

A :class:`~effjax.quant.QuantizedArray` moment has a block layout that is static pytree
metadata (``shards``): bitsandbytes' flat layout, or the shard-local layout that an eager
``init`` picks for a leaf whose shards would cut flat blocks (see
:mod:`effjax.quant.blockwise`). ``jax.eval_shape(opt.init, params)``, the usual orbax restore
target, traces ``init`` with tracers that carry no sharding under Auto mesh axes and therefore
always describes the flat layout; orbax then refuses a checkpoint of shard-local leaves
(``Requested shape: (8, 3) is not compatible with the stored shape: (4, 2, 3)``; the two
layouts' scales never have the same shape, so a layout is never silently mixed up).

* :func:`abstract_state` is the restore target: ``init``'s state as ``ShapeDtypeStruct`` s with
  the layouts and shardings an eager ``init`` on ``params``' shardings gives (nothing is
  allocated); with ``saved=`` the quantized leaves keep the layout the checkpoint holds.
* :func:`relayout` converts a state to the layouts and shardings of another target (the only
  lossy step: moments are dequantized and quantized again, see its docstring).

Resuming (the checkpoint's leaves are restored exactly in every case):

* On the mesh it was saved on: ``restore(path, abstract_state(opt, params))``; the next steps
  equal the uninterrupted run's bit for bit.
* On another mesh, or one device: ``restore(path, abstract_state(opt, params, saved=meta))``
  keeps the saved layouts on the new shardings. The steps stay correct and exact (the same
  numbers as the uninterrupted run wherever the step's arithmetic does not depend on the
  partitioning, e.g. AdamW; a per-tensor norm summed in another order may differ in its last
  bit), but a leaf whose saved layout is not shard-local on the new mesh moves data across
  devices at every step. ``relayout(state, abstract_state(opt, params))`` once after the
  restore gives the layouts of the new mesh (no collective in the step again) at the cost of
  one requantization.
* In a process with one device, the low-bit aliases pick their fused step (the C++ step on
  CPU) for flat-layout leaves, which rounds differently from the multi-device jnp step (about
  one float32 ulp of the parameters after 3 AdamW steps, measured), checkpoint or not; with
  ``use_kernel=False`` on both sides the resume there is bit-identical too (measured).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from effjax.optim._checks import leaf_name
from effjax.quant import (
    QuantizedArray,
    dequantize_blockwise,
    quantize_blockwise,
    scales_shape,
)

__all__ = ["abstract_state", "relayout"]


def _is_q(x) -> bool:
    return isinstance(x, QuantizedArray)


def _mesh_of(params):
    """The one mesh of ``params``' NamedShardings (None if none has one)."""
    meshes = {}
    for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
        sh = getattr(p, "sharding", None)
        if isinstance(sh, NamedSharding):
            meshes.setdefault(sh.mesh, leaf_name(path))
    if len(meshes) > 1:
        (m1, a), (m2, b) = list(meshes.items())[:2]
        raise ValueError(f"abstract_state: parameters {a} and {b} lie on different meshes "
                         f"({dict(m1.shape)} and {dict(m2.shape)}); put every parameter on "
                         "one mesh")
    mesh = next(iter(meshes), None)
    if mesh is not None and not isinstance(mesh, Mesh):
        raise ValueError("abstract_state: the parameters' shardings name an abstract mesh; "
                         "give NamedShardings over a concrete jax.sharding.Mesh")
    return mesh


def _abstract(p, sharding):
    return jax.ShapeDtypeStruct(np.shape(p), jnp.result_type(p), sharding=sharding)


def _spec(x) -> PartitionSpec:
    sh = getattr(x, "sharding", None)
    return sh.spec if isinstance(sh, NamedSharding) else PartitionSpec()


def _names(entry) -> tuple:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _saved_node(saved, path):
    """The entry of ``saved`` (nested dicts / lists such as orbax's metadata tree, or a state)
    at a state's key path."""
    node = saved
    for k in path:
        if isinstance(k, jax.tree_util.SequenceKey):
            node = node[k.idx]
        elif isinstance(k, jax.tree_util.DictKey):
            node = node[k.key]
        elif isinstance(k, jax.tree_util.GetAttrKey):
            node = node[k.name] if isinstance(node, Mapping) else getattr(node, k.name)
        else:  # FlattenedIndexKey
            node = node[k.key]
    return node


def _saved_shards(saved, path, q):
    """The layout (``shards``) a checkpoint holds for the quantized leaf ``q`` at ``path``,
    read from its scales' shape: the shard-local layout's scales have more axes than the
    array (the shard grid first), the flat layout's at most as many."""
    try:
        node = _saved_node(saved, path)
    except (KeyError, IndexError, AttributeError, TypeError):
        raise ValueError(f"abstract_state: saved= has no entry for the quantized state leaf "
                         f"{leaf_name(path)}; pass the checkpoint's metadata tree (orbax: "
                         "ckpt.metadata(path).item_metadata.tree) of a state of this "
                         "optimizer") from None
    if _is_q(node):
        return node.shards
    absmax = node["absmax"] if isinstance(node, Mapping) else getattr(node, "absmax", None)
    shape = tuple(getattr(absmax, "shape", None) or ())
    shards = shape[:len(q.shape)] if len(shape) > len(q.shape) else None
    try:
        ok = scales_shape(q.shape, q.block_size, shards) == shape
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"abstract_state: the saved scales of {leaf_name(path)} have shape {shape}, which "
            f"is no layout of a {q.bits}-bit array of shape {q.shape} in blocks of "
            f"{q.block_size} (flat: {scales_shape(q.shape, q.block_size)}); was the "
            "checkpoint written by an optimizer with other settings?")
    return shards


def abstract_state(opt, params, *, saved=None):
    """The restore target of ``opt``'s state: ``opt.init(params)`` as ``ShapeDtypeStruct`` s.

    Unlike ``jax.eval_shape(opt.init, params)``, every quantized moment has the block layout
    an eager ``opt.init`` on ``params``' shardings gives it (shard-local where shards would
    cut flat blocks) and every leaf a sharding (on ``params``' mesh: what ``init`` gives it
    there, 0-d leaves replicated; unsharded ``params``: their device). Nothing is allocated:
    ``init`` is traced once with ``params``' shardings as Explicit mesh axes, which pick the
    same layouts as an eager ``init`` (so ``init`` must trace under Explicit axes, as every
    effjax and optax ``init`` does).

    Args:
      opt: an optax ``GradientTransformation`` (any effjax or optax optimizer).
      params: the parameters the state belongs to, on the mesh to restore onto: arrays or
        ``jax.ShapeDtypeStruct`` s, with ``NamedSharding`` s over one mesh (a leaf without one
        is replicated) or none.
      saved: optional, to restore a checkpoint written on another mesh: its metadata tree
        (orbax: ``ckpt.metadata(path).item_metadata.tree``) or a state (concrete or
        abstract). Each quantized leaf then keeps the layout it was saved in (read from its
        scales' shape), placed on the new mesh as well as that layout allows; see
        :func:`relayout` to change it.

    Returns:
      ``opt.init(params)``'s pytree with ``jax.ShapeDtypeStruct`` leaves (``QuantizedArray``
      nodes keep their static layout), ready for ``orbax``'s ``restore``.

    Raises:
      ValueError: ``params`` on several meshes; ``saved`` lacks a quantized leaf, or holds
        scales of no layout of that leaf (naming it).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> from effjax.optim import adamw_8bit, abstract_state
      >>> mesh = jax.make_mesh((1,), ("x",))
      >>> params = {"w": jax.ShapeDtypeStruct((64, 96), jnp.float32,
      ...                                     sharding=NamedSharding(mesh, P("x")))}
      >>> target = abstract_state(adamw_8bit(1e-3), params)
      >>> target[0].mu["w"].codes.shape, target[0].mu["w"].shards
      ((64, 96), None)
    """
    mesh = _mesh_of(params)
    if mesh is None:
        devices = {next(iter(p.sharding.device_set)) for p in jax.tree.leaves(params)
                   if isinstance(getattr(p, "sharding", None), SingleDeviceSharding)}
        device = devices.pop() if len(devices) == 1 else jax.devices()[0]
        state = jax.eval_shape(opt.init, jax.tree.map(lambda p: _abstract(p, None), params))
        place = SingleDeviceSharding(device)
        return _with_saved(jax.tree.map(lambda x: _abstract(x, place), state), saved,
                           None, place)
    explicit = Mesh(mesh.devices, mesh.axis_names,
                    axis_types=(AxisType.Explicit,) * len(mesh.axis_names))
    typed = jax.tree.map(lambda p: _abstract(p, NamedSharding(explicit, _spec(p))), params)
    with jax.set_mesh(explicit):
        state = jax.eval_shape(opt.init, typed)
    state = jax.tree.map(lambda x: _abstract(x, NamedSharding(mesh, _spec(x))), state)
    return _with_saved(state, saved, explicit, mesh)


def _with_saved(state, saved, explicit, place):
    """``state`` with each quantized leaf in the layout ``saved`` holds for it (``place``: the
    user's mesh, or the one device's sharding when ``explicit`` is None)."""
    if saved is None:
        return state
    saved = getattr(saved, "item_metadata", saved)
    saved = getattr(saved, "tree", saved)

    def leaf(path, q):
        if not _is_q(q):
            return q
        shards = _saved_shards(saved, path, q)
        if shards == q.shards:
            return q
        return _requantized(q, shards, explicit, place)

    return jax.tree_util.tree_map_with_path(leaf, state, is_leaf=_is_q)


def _requantized(q, shards, explicit, place):
    """The abstract ``QuantizedArray`` of ``q``'s array in the layout ``shards``; shardings
    from tracing the quantization on the array's sharding (Explicit axes), or one device."""
    def quant(x):
        return quantize_blockwise(x, codebook=q.codebook, block_size=q.block_size,
                                  scale_dtype=q.absmax.dtype,
                                  shards=(1,) * len(q.shape) if shards is None else shards)

    if explicit is None:  # one device
        out = jax.eval_shape(quant, jax.ShapeDtypeStruct(q.shape, q.dtype))
        return jax.tree.map(lambda x: _abstract(x, place), out)
    sizes = dict(explicit.shape)
    spec = tuple(_spec(q.codes)) + (None,) * len(q.shape)
    spec = PartitionSpec(*(e if n % np.prod([sizes[a] for a in _names(e)], dtype=int) == 0
                           else None for e, n in zip(spec, q.shape)))  # 4-bit: codes halved
    x = jax.ShapeDtypeStruct(q.shape, q.dtype, sharding=NamedSharding(explicit, spec))
    with jax.set_mesh(explicit):
        out = jax.eval_shape(quant, x)
    return jax.tree.map(lambda a: _abstract(a, NamedSharding(place, _spec(a))), out)


def _describe(q) -> str:
    return (f"{q.bits}-bit, block_size {q.block_size}, {len(q.codebook)}-value codebook, "
            f"{jnp.dtype(q.absmax.dtype).name} scales, shape {q.shape}, dtype "
            f"{jnp.dtype(q.dtype).name}")


def relayout(state, target):
    """``state`` converted to the block layouts and shardings of ``target``.

    Each leaf is placed on ``target``'s sharding (``jax.device_put``, exact). A quantized leaf
    whose layout (``shards``) differs from ``target``'s is dequantized in its old layout and
    quantized again in the new one (same codebook, block size and scale dtype, nearest
    rounding). That is the only lossy step: each element moves by at most ``d * M``, where
    ``M`` is the largest magnitude in its new block and ``d`` the largest distance from a
    point of the codebook's range to the nearest codebook value: 0.0071 for the signed 8-bit
    dynamic map (first moments), 0.0036 for the unsigned one (second moments), 0.1125 and
    0.0625 for the 4-bit maps. This is the size of the rounding every step already applies
    when it stores its new moments; the resumed run then differs from the uninterrupted one
    by that rounding (usually in a few codes and scales) and by nothing else.

    Typical use, resuming on another mesh (or one device)::

      meta = ckpt.metadata(path).item_metadata.tree
      state = ckpt.restore(path, abstract_state(opt, params, saved=meta))  # exact
      state = relayout(state, abstract_state(opt, params))  # no collective in the step

    Args:
      state: an optimizer state (for example restored in its saved layouts).
      target: :func:`abstract_state` of the same optimizer for the parameters on the new
        mesh (or any state of it whose leaves carry shardings).

    Returns:
      The state with ``target``'s pytree structure (layouts included) and shardings.

    Raises:
      ValueError: the two trees differ other than in layouts, or a leaf differs in shape,
        dtype or quantization format (naming the leaf).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from effjax.optim import adamw_8bit, abstract_state, relayout
      >>> opt = adamw_8bit(1e-3, min_quantized_size=0)
      >>> params = {"w": jnp.ones((64, 96))}
      >>> state = relayout(opt.init(params), abstract_state(opt, params))
      >>> state[0].mu["w"].shards is None
      True
    """
    got, got_def = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_q)
    want, want_def = jax.tree_util.tree_flatten_with_path(target, is_leaf=_is_q)
    plain = lambda tree: jax.tree.structure(jax.tree.map(  # noqa: E731
        lambda x: 0, tree, is_leaf=_is_q), is_leaf=_is_q)
    if len(got) != len(want) or plain(state) != plain(target):
        names = [{leaf_name(p) for p, _ in leaves} for leaves in (got, want)]
        diff = sorted(names[0] ^ names[1])[:6]
        raise ValueError("relayout: the state and the target have different trees"
                         + (f" (leaves in only one: {', '.join(diff)})" if diff else "")
                         + "; the target must be abstract_state of the same optimizer")
    for (path, x), (_, t) in zip(got, want):  # every leaf checked before any is moved
        _check_leaf(leaf_name(path), x, t)
    return jax.tree.unflatten(want_def, [_relayout_leaf(x, t) for (_, x), (_, t) in
                                         zip(got, want)])


def _fmt(q):
    return (q.bits, q.block_size, q.codebook, tuple(q.shape), jnp.dtype(q.dtype),
            jnp.dtype(q.absmax.dtype))


def _check_leaf(name, x, t):
    if _is_q(x) != _is_q(t):
        raise ValueError(f"relayout: state leaf {name} is "
                         f"{'quantized' if _is_q(x) else 'not quantized'} but the target's "
                         "is not the same kind; the target must be abstract_state of the "
                         "same optimizer")
    if not _is_q(t):
        if tuple(np.shape(x)) != tuple(t.shape) or jnp.result_type(x) != t.dtype:
            raise ValueError(f"relayout: state leaf {name} has shape {tuple(np.shape(x))} "
                             f"and dtype {jnp.result_type(x)}, the target {tuple(t.shape)} "
                             f"and {t.dtype}")
    elif _fmt(x) != _fmt(t):
        raise ValueError(f"relayout: state leaf {name} is {_describe(x)}; the target's is "
                         f"{_describe(t)}; only the layout may differ")


def _relayout_leaf(x, t):
    if not _is_q(t):
        return jax.device_put(x, t.sharding)
    if x.shards != t.shards:
        x = quantize_blockwise(dequantize_blockwise(x), like=t)  # like: t's layout and format
    return QuantizedArray(codes=jax.device_put(x.codes, t.codes.sharding),
                          absmax=jax.device_put(x.absmax, t.absmax.sharding), shape=t.shape,
                          dtype=t.dtype, block_size=t.block_size, codebook=t.codebook,
                          bits=t.bits, shards=t.shards)
