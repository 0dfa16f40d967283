"""Gradient calibration for data-driven adapter inits (LoRA-SB and other methods whose
``calibration`` class attribute is ``"gradients"``).

:func:`gradient_calibration` returns the mapping that :func:`effjax.peft.inject` takes as
``calibration``: for each targeted leaf :math:`W` the loss gradient averaged over the
calibration batches,

.. math::

  G_W = \\frac{1}{K} \\sum_{k=1}^{K} \\nabla_W L(\\theta; x_k),

keyed by the leaf's ``'/'``-joined path (:func:`effjax.selection.path_str`, as rules match
it). The gradient is taken with respect to the targeted leaves only, by one jit-compiled
``jax.grad`` reused for every batch (batches of the same shapes compile once); sums are kept in
float32 (or the leaf's wider dtype).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from effjax.peft.rules import assign_rules, compile_rules
from effjax.selection import path_str

__all__ = ["gradient_calibration"]


def _targets(paths: list[str], targets: Any) -> list[int]:
    """Indices of the leaves chosen by ``targets`` (rules or a sequence of exact paths)."""
    if isinstance(targets, str):
        raise TypeError(f"targets must be rules {{regex: method}} or a sequence of paths, got "
                        f"the string {targets!r} (wrap one path in a list)")
    if isinstance(targets, Mapping) or (
            isinstance(targets, Sequence) and targets and all(
                isinstance(t, tuple) for t in targets)):
        compiled = compile_rules(targets)
        choice = assign_rules(paths, compiled)
        methods = [None if c is None else compiled[c].method for c in choice]
        idx = [i for i, m in enumerate(methods)
               if m is not None and getattr(m, "calibration", None) == "gradients"]
        if not idx:
            raise ValueError("no rule targets a leaf with a gradient-calibrated method (one "
                             "whose calibration is 'gradients', e.g. LoRASB); nothing to "
                             "compute")
        return idx
    if not isinstance(targets, Iterable):
        raise TypeError(f"targets must be rules {{regex: method}} or a sequence of paths, got "
                        f"{type(targets).__name__}")
    wanted = list(targets)
    if not wanted or not all(isinstance(t, str) for t in wanted):
        raise TypeError(f"targets must be a non-empty sequence of path strings, got {wanted!r}")
    where = {p: i for i, p in enumerate(paths)}
    missing = [p for p in wanted if p not in where]
    if missing:
        raise ValueError(f"targets {missing} are not leaf paths of params; paths are "
                         f"{paths[:8]}{' ...' if len(paths) > 8 else ''}")
    return [where[p] for p in dict.fromkeys(wanted)]


def gradient_calibration(loss_fn: Callable[[Any, Any], jax.Array], params: Any,
                         batches: Iterable[Any], targets: Any) -> dict[str, jax.Array]:
    """``{path: mean over batches of d loss_fn(params, batch) / d leaf}`` for the targeted
    leaves: the ``calibration`` mapping of :func:`effjax.peft.inject` for LoRA-SB.

    Args:
      loss_fn: ``(params, batch) -> scalar`` loss.
      params: the base params (a pytree of arrays, e.g. a Linen ``params`` dict).
      batches: an iterable of batches (each passed to ``loss_fn`` as is); at least one.
      targets: the rules given to ``inject`` (``{regex: method}``; the leaves they assign to a
        method with ``calibration == "gradients"`` are taken), or a sequence of exact paths.

    Returns:
      A dict from the ``'/'``-joined leaf path to the mean gradient (the leaf's shape, float32
      or the leaf's wider dtype).

    Raises:
      TypeError / ValueError: bad targets, a targeted leaf that is not a floating array, or no
      batches (messages name the path).

    Example:
      >>> import jax.numpy as jnp
      >>> params = {'w': jnp.ones((2, 3))}
      >>> loss = lambda p, x: jnp.sum(x @ p['w'])
      >>> g = gradient_calibration(loss, params, [jnp.ones((1, 2)), 3 * jnp.ones((1, 2))], ['w'])
      >>> g['w']  # mean of x^T 1 over the two batches
      Array([[2., 2., 2.],
             [2., 2., 2.]], dtype=float32)
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [path_str(p) for p, _ in flat]
    leaves = [x for _, x in flat]
    idx = _targets(paths, targets)
    for i in idx:
        dt = getattr(leaves[i], "dtype", None)
        if dt is None or not jnp.issubdtype(dt, jnp.floating):
            raise TypeError(f"leaf '{paths[i]}' (dtype {dt}) is not a floating array; its "
                            f"gradient cannot be taken")
    chosen = set(idx)
    rest = [None if i in chosen else x for i, x in enumerate(leaves)]

    def loss_of_targets(sel, rest, batch):
        full = list(rest)
        for j, i in enumerate(idx):
            full[i] = sel[j]
        return loss_fn(jax.tree_util.tree_unflatten(treedef, full), batch)

    grad_fn = jax.jit(jax.grad(loss_of_targets))
    acc_dtypes = [jnp.promote_types(leaves[i].dtype, jnp.float32) for i in idx]

    @jax.jit
    def accumulate(total, g):
        return [t + x.astype(t.dtype) for t, x in zip(total, g)]

    sel = [leaves[i] for i in idx]
    total = [jnp.zeros(leaves[i].shape, d) for i, d in zip(idx, acc_dtypes)]
    n = 0
    for batch in batches:
        total = accumulate(total, grad_fn(sel, rest, batch))
        n += 1
    if n == 0:
        raise ValueError("gradient_calibration needs at least one batch; batches was empty")
    return {paths[i]: t / n for i, t in zip(idx, total)}
