"""Argument and input checks shared by the effjax.optim transformations."""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
import optax

#: Largest block a low-bit state may use (bitsandbytes goes up to 4096; larger blocks only cost
#: accuracy, and a block is padded to its full size in memory).
MAX_BLOCK_SIZE = 2**16


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
                or not 2 <= block_size <= MAX_BLOCK_SIZE):
            raise ValueError(f"block_size must be an int in [2, {MAX_BLOCK_SIZE}], got "
                             f"{block_size!r}")
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


def is_number(x) -> bool:
    """A concrete Python/numpy number (not an array injected by ``optax.inject_hyperparams``)."""
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def check_range(where: str, name: str, value, lo=None, hi=None, *, lo_open=False,
                 hi_open=False) -> None:
    """Raise ``ValueError`` if the Python number ``value`` is outside its range; arrays pass."""
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{where}: {name} must be a number, got {value!r}")
    if not is_number(value):
        return
    bad = not math.isfinite(value)
    bad |= lo is not None and (value <= lo if lo_open else value < lo)
    bad |= hi is not None and (value >= hi if hi_open else value > hi)
    if bad:
        interval = (("(" if lo_open else "[") + ("-inf" if lo is None else str(lo)) + ", "
                    + ("inf" if hi is None else str(hi)) + (")" if hi_open else "]"))
        raise ValueError(f"{where}: {name} must be in {interval}, got {value!r}")


def check_int(where: str, name: str, value, lo: int, *, allow_none: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is an int >= ``lo`` (or None, or an array)."""
    if value is None and allow_none:
        return
    if isinstance(value, (jax.Array, np.ndarray)) and not isinstance(value, np.generic):
        return  # injected by optax.inject_hyperparams: checked when it was a number
    if (not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_))
            or value < lo):
        none = " or None" if allow_none else ""
        raise ValueError(f"{where}: {name} must be an int >= {lo}{none}, got {value!r}")


def check_state_bits(where: str, state_bits) -> None:
    if state_bits is None:
        return
    if isinstance(state_bits, jax.Array):
        raise ValueError(f"{where}: state_bits fixes the state's structure and must be a Python "
                         "int; with optax.inject_hyperparams pass static_args=('state_bits',)")
    if isinstance(state_bits, bool) or state_bits not in (4, 8):
        raise ValueError(f"{where}: state_bits must be None, 4 or 8, got {state_bits!r}")


def leaf_name(path) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def tree_difference(updates, reference, what: str = "the parameters") -> str:
    """The leaf paths found in only one of two trees, for a structure-mismatch message:
    ``"missing from the updates: ['b']; not in the parameters: ['c']"``."""
    paths = [{leaf_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(t)[0]}
             for t in (updates, reference)]
    parts = []
    if paths[1] - paths[0]:
        parts.append("missing from the updates: " + ", ".join(sorted(paths[1] - paths[0])))
    if paths[0] - paths[1]:
        parts.append(f"not in {what}: " + ", ".join(sorted(paths[0] - paths[1])))
    return "; ".join(parts) or "the same leaf paths with other node types"


def check_params_like_updates(updates, params, *, where: str) -> None:
    """Raise if ``params`` is missing or does not match ``updates`` leaf by leaf.

    ``ValueError`` when ``params`` is ``None``, when the two trees differ in structure, or when
    a leaf's shape differs (naming the leaf path); ``TypeError`` when a leaf of either tree is
    not floating point. Runs at trace time only (shapes and dtypes are static).
    """
    if params is None:
        raise ValueError(
            f"{where} reads the parameters: call update(updates, state, params) with the "
            "current params (optax.apply_updates happens after the update)")
    u_leaves, u_def = jax.tree_util.tree_flatten_with_path(updates)
    p_leaves, p_def = jax.tree_util.tree_flatten_with_path(params)
    if u_def != p_def:
        raise ValueError(
            f"{where}: updates and params have different tree structures "
            f"({tree_difference(updates, params)}):\n  updates: {u_def}\n  params:  {p_def}")
    for (path, u), (_, p) in zip(u_leaves, p_leaves):
        name = leaf_name(path)
        for what, x in (("update", u), ("parameter", p)):
            dtype = getattr(x, "dtype", None)
            if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
                raise TypeError(
                    f"{where}: {what} {name} has dtype {dtype} (type {type(x).__name__}); "
                    "floating point is required. Exclude it with optax.masked.")
        if jnp.shape(u) != jnp.shape(p):
            raise ValueError(
                f"{where}: update {name} has shape {jnp.shape(u)} but the parameter has "
                f"shape {jnp.shape(p)}")


def check_updates_like_state(updates, state_tree, *, where: str, what: str) -> None:
    """Raise ``ValueError`` naming the leaves when ``updates`` does not have the tree structure
    of ``state_tree`` (a state subtree built from the params given to init, ``optax.MaskedNode``
    where a leaf has no entry)."""
    masked = lambda x: isinstance(x, optax.MaskedNode)
    u_def = jax.tree.structure(updates, is_leaf=masked)
    s_def = jax.tree.structure(state_tree, is_leaf=masked)
    if u_def != s_def:
        paths = [{leaf_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(
            t, is_leaf=masked)[0]} for t in (updates, state_tree)]
        parts = [f"{name}: {', '.join(sorted(x)[:8])}" for name, x in (
            ("missing from the updates", paths[1] - paths[0]),
            (f"not in {what}", paths[0] - paths[1])) if x]
        raise ValueError(f"{where}: the updates' tree differs from the parameters given to "
                         f"init ({'; '.join(parts) or 'the same paths, other node types'})")


def check_state_shapes(init_fn, like, state, *, where: str) -> None:
    """Raise ``ValueError`` naming the state leaf whose shape differs from the one ``init_fn``
    makes for ``like`` (a tree of ``jax.ShapeDtypeStruct``): updates of other shapes than the
    parameters given to init."""
    want = jax.eval_shape(init_fn, like)
    got_leaves, got_def = jax.tree_util.tree_flatten_with_path(state)
    want_leaves, want_def = jax.tree_util.tree_flatten_with_path(want)
    if got_def != want_def:
        raise ValueError(f"{where}: the state's structure differs from the one init makes for "
                         f"these updates ({tree_difference(want, state, 'the state')}); were the "
                         "updates made for other parameters?")
    for (path, got), (_, w) in zip(got_leaves, want_leaves):
        if jnp.shape(got) != tuple(w.shape):
            raise ValueError(f"{where}: state leaf {leaf_name(path)} has shape "
                             f"{jnp.shape(got)}, but these updates need {tuple(w.shape)}: the "
                             "updates must have the shapes of the parameters given to init")


_UNIT = ("b1", "b2", "b3", "decay")  # EMA decays: [0, 1)
_NON_NEGATIVE = ("eps", "eps_root", "weight_decay", "initial_accumulator_value",
                 "initial_scale", "alpha")


def check_hyperparams(where: str, **values) -> None:
    """Raise naming ``where`` and the argument for hyper-parameters no optimizer can use:
    ``learning_rate`` that is not a number, a one-element array or a schedule (callable);
    decays outside ``[0, 1)``; ``eps``, ``weight_decay`` and the like negative. Arrays (from
    ``optax.inject_hyperparams``) and schedules pass; the numbers are also checked finite."""
    for name, value in values.items():
        if name == "learning_rate":
            if callable(value) or is_number(value):
                check_range(where, name, value) if is_number(value) else None
                continue
            if isinstance(value, (jax.Array, np.ndarray)) and np.size(value) == 1 and \
                    jnp.issubdtype(value.dtype, jnp.floating):
                continue
            raise TypeError(f"{where}: learning_rate must be a number, a one-element float "
                            f"array or a schedule (a callable step -> rate), got {value!r} "
                            f"({type(value).__name__})")
        elif callable(value):
            continue  # a schedule (ademamix's b3 and alpha may be)
        elif name in _UNIT:
            check_range(where, name, value, 0.0, 1.0, hi_open=True)
        elif name in _NON_NEGATIVE:
            check_range(where, name, value, 0.0)
