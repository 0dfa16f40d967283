"""Checks shared by the effjax.optim transformations that read the parameters in ``update``."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def leaf_name(path) -> str:
    return jax.tree_util.keystr(path) or "<root>"


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
            f"{where}: updates and params have different tree structures:\n  updates: "
            f"{u_def}\n  params:  {p_def}")
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
