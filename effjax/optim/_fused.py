"""Fused low-bit steps: which kernel runs for a leaf is ``effjax.optim``'s decision.

The kernels (:mod:`pallas_kernels.optim_update`: the Pallas kernel, the chunked jnp step and
the rules; :mod:`pallas_kernels.native_cpu`: the C++ CPU step) take arrays, scalars and a rule;
they know nothing of optax. This module owns everything between an optax-style optimizer and
them:

* **one set of hyper-parameters**: each family (:func:`adam_family`, :func:`lion_family`,
  :func:`sgd_family`) builds, from the same arguments, the optax chain of the unfused step
  (``quantize_state`` wraps it) and the :class:`FusedSpec` the kernels run;
* **the same state pytree**: :func:`fused_transform` keeps the unfused transform's ``init``,
  so a checkpoint of one path continues on any other;
* **decided at trace time**: which path runs (:func:`select_path`) is looked up when ``update``
  is traced, never when the optimizer is built, so building one touches no backend (and
  ``jax.distributed.initialize()`` may still come after it);
* **update-and-apply without a registry**: :func:`fused_apply` opens a request (a context
  variable, scoped to its call) that a fused transform answers by letting its kernel write the
  new parameters; a leaf whose update reaches ``fused_apply`` untouched (the transform is last
  in its ``optax.chain``, or alone) takes the kernel's parameters, any other leaf
  ``p + update`` as ``optax.apply_updates`` does. So ``fused_apply(optax.chain(clip, opt))``
  runs fused, and a transform after the fused one can never see written parameters.
"""

from __future__ import annotations

import contextvars
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from effjax.quant import QuantizedArray

__all__ = ["FusedSpec", "adam_family", "lion_family", "sgd_family", "select_path",
           "fused_transform", "fused_apply"]

_FIELDS = {"adam": ("mu", "nu"), "lion": ("mu",), "sgd": ("trace",)}


class FusedSpec(NamedTuple):
    """What the fused step needs to know of its optax chain (static)."""

    algo: str  # "adam" | "lion" | "sgd"
    hyper: dict  # b1, b2, eps, eps_root, nesterov; decay and nesterov for sgd
    weight_decay: Any = None  # None: no add_decayed_weights in the chain
    mask: Any = None
    learning_rate: Any = None  # None: no scale_by_learning_rate in the chain


def _with_tail(core, spec: FusedSpec):
    parts = [core]
    if spec.weight_decay is not None:
        parts.append(optax.add_decayed_weights(spec.weight_decay, spec.mask))
    if spec.learning_rate is not None:
        parts.append(optax.scale_by_learning_rate(spec.learning_rate))
    return (optax.chain(*parts) if len(parts) > 1 else core), spec


def adam_family(*, b1, b2, eps, eps_root, nesterov=False, learning_rate=None,
                weight_decay=None, mask=None):
    """``(optax chain, FusedSpec)`` of Adam: ``optax.scale_by_adam`` (+
    ``add_decayed_weights`` when ``weight_decay`` is given, + ``scale_by_learning_rate`` when
    ``learning_rate`` is), exactly ``optax.adam`` / ``optax.adamw``'s chain."""
    core = optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, nesterov=nesterov)
    return _with_tail(core, FusedSpec("adam", dict(b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                                                   nesterov=nesterov),
                                      weight_decay, mask, learning_rate))


def lion_family(*, learning_rate, b1, b2, weight_decay, mask=None):
    """``(optax chain, FusedSpec)`` of Lion, exactly ``optax.lion``'s chain."""
    return _with_tail(optax.scale_by_lion(b1=b1, b2=b2),
                      FusedSpec("lion", dict(b1=b1, b2=b2), weight_decay, mask, learning_rate))


def sgd_family(*, learning_rate, momentum, nesterov=False):
    """``(optax chain, FusedSpec)`` of SGD with momentum, exactly ``optax.sgd``'s chain."""
    return _with_tail(optax.trace(decay=momentum, nesterov=nesterov),
                      FusedSpec("sgd", dict(decay=momentum, nesterov=nesterov), None, None,
                                learning_rate))


def check_use_kernel(use_kernel: Any, *, name: str, has_kernel: bool) -> None:
    """Validate ``use_kernel`` when an optimizer is built (touches no backend)."""
    if use_kernel is not None and not isinstance(use_kernel, bool):
        raise ValueError(f"{name}: use_kernel must be None, True or False, got {use_kernel!r}")
    if use_kernel and not has_kernel:
        raise ValueError(f"{name}: there is no fused Pallas kernel for this optimizer; pass "
                         "use_kernel=None or False")


def select_path(use_kernel: bool | None, *, name: str, has_kernel: bool = True) -> str | None:
    """Which step runs, looked up when ``update`` is traced: ``"pallas"`` (the fused kernel),
    ``"native"`` (the C++ CPU kernel, :mod:`pallas_kernels.native_cpu`), ``"chunked"``
    (:func:`pallas_kernels.optim_update.fused_update_chunked`, the fused step in jnp) or
    ``None`` (the unfused jnp path of :func:`effjax.optim.quantize_state`).

    ``use_kernel=True``: the kernel (interpret mode on CPU: slow, for testing). ``False``: the
    unfused jnp path. ``None`` (auto), for optimizers that have a fused step, in a process with
    one device: the kernel on the backends where it was validated on real hardware
    (:data:`pallas_kernels.optim_update.VALIDATED_BACKENDS`); on a CPU the native kernel where
    it builds, else the chunked jnp step; with several devices (sharded leaves, which XLA
    cannot partition through a kernel call) and elsewhere the unfused jnp path.
    """
    check_use_kernel(use_kernel, name=name, has_kernel=has_kernel)
    if use_kernel is not None:
        return "pallas" if use_kernel else None
    if not has_kernel:
        return None
    # Single-device processes only: XLA cannot partition a pallas_call (it would all-gather
    # a sharded leaf; under shard_map pass use_kernel=True), and the chunked step slices
    # flattened blocks, which gathers a sharded leaf too.
    if jax.device_count() != 1:
        return None
    from pallas_kernels import optim_update  # the kernels import effjax.quant only

    if optim_update.kernel_available():
        return "pallas"
    if jax.default_backend() != "cpu":
        return None
    from pallas_kernels import native_cpu

    return "native" if native_cpu.available() else "chunked"


# ----------------------------------------------------------------------------- the step


@functools.partial(jax.jit, inline=True)
def _bias_correction(decay, count):
    return 1 - decay**count  # optax.tree.bias_correction's expression, jitted the same way


def _is_q(x):
    return isinstance(x, QuantizedArray)


def _mask_leaves(mask, updates, n):
    if mask is None:
        return [True] * n
    tree = mask(updates) if callable(mask) else mask
    full = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: m, sub), tree, updates)
    leaves = jax.tree.leaves(full)
    if len(leaves) != n:
        raise ValueError(f"weight-decay mask has {len(leaves)} leaves, the updates {n}")
    return leaves


def _chain(state):
    """The fused transform's own state as a tuple: its chain's states, or ``(core,)``."""
    return state if isinstance(state, tuple) and not hasattr(state, "_fields") else (state,)


def _replace_moments(state, algo: str, new_moms: list[list]):
    chain = _chain(state)
    core = chain[0]
    repl = {}
    for k, field in enumerate(_FIELDS[algo]):
        treedef = jax.tree.structure(getattr(core, field), is_leaf=_is_q)
        repl[field] = jax.tree_util.tree_unflatten(treedef, new_moms[k])
    new_core = core._replace(**repl)
    return new_core if chain[0] is state else (new_core,) + tuple(chain[1:])


def _scalars(spec: FusedSpec, chain) -> tuple[dict, Any, bool]:
    """The kernels' scalars for this step, the weight decay and whether it applies."""
    core, h, s = chain[0], spec.hyper, {}
    if spec.algo == "adam":
        count_inc = optax.safe_increment(core.count)
        s.update(b1=h["b1"], b2=h["b2"], eps=h["eps"], eps_root=h["eps_root"],
                 bc1=_bias_correction(h["b1"], count_inc),
                 bc2=_bias_correction(h["b2"], count_inc))
        if h.get("nesterov"):
            s["bc1_next"] = _bias_correction(h["b1"], optax.safe_increment(count_inc))
    elif spec.algo == "lion":
        s.update(b1=h["b1"], b2=h["b2"])
    else:
        s.update(decay=h["decay"], nesterov=bool(h.get("nesterov")))
    wd = spec.weight_decay
    use_wd = wd is not None and not (isinstance(wd, (int, float)) and wd == 0.0)
    if use_wd and callable(wd):  # a schedule: add_decayed_weights counts its own steps
        wd_state = chain[1]
        while hasattr(wd_state, "inner_state"):
            wd_state = wd_state.inner_state
        wd = wd(wd_state.count)
    if spec.learning_rate is not None:
        lr = spec.learning_rate
        if callable(lr):
            s["lr_cast"] = -1 * lr(chain[-1].count)
        else:
            s["lr"] = -1 * lr
    return s, wd, use_wd


def _step(reference, spec: FusedSpec, path: str, apply: bool, interpret, tile_elems,
          updates, state, params, **extra):
    """One fused step: the reference (unfused) step for everything, the kernel's results for
    the quantized leaves. Returns ``(updates, state, new_params)``; ``new_params`` holds the
    kernel-written parameters of the leaves it applied (``apply``), None elsewhere."""
    from pallas_kernels import optim_update as K

    native = path == "native"
    chunked = path in ("chunked", "native")  # native: chunked is its fallback
    if native:
        from pallas_kernels import native_cpu
    rule, n_mom = {"adam": (K.adam_rule, 2), "lion": (K.lion_rule, 1),
                   "sgd": (K.sgd_rule, 1)}[spec.algo]
    ref_updates, ref_state = reference.update(updates, state, params, **extra)
    chain = _chain(state)
    flat_g, treedef = jax.tree_util.tree_flatten_with_path(updates)
    mom_trees = tuple(getattr(chain[0], f) for f in _FIELDS[spec.algo])
    flat_m = [jax.tree.leaves(t, is_leaf=_is_q) for t in mom_trees]
    if any(len(m) != len(flat_g) for m in flat_m):
        raise ValueError("the optimizer state's moments do not match the updates' tree")
    flat_p = [None] * len(flat_g) if params is None else jax.tree.leaves(params)
    if len(flat_p) != len(flat_g):
        raise ValueError("params and updates have different tree structures")
    s, wd, use_wd = _scalars(spec, chain)
    decay_mask = _mask_leaves(spec.mask, updates, len(flat_g)) if use_wd else None

    ref_u = jax.tree.leaves(ref_updates)
    out_u = list(ref_u)
    written = [None] * len(flat_g)
    new_moms = [list(jax.tree.leaves(getattr(_chain(ref_state)[0], f), is_leaf=_is_q))
                for f in _FIELDS[spec.algo]]
    for i, (kpath, g) in enumerate(flat_g):
        ms = tuple(m[i] for m in flat_m)
        if not _is_q(ms[0]) or any(q.shards is not None for q in ms):
            continue  # float32 state, or the shard-local layout: the unfused jnp step
        leaf_s = dict(s)
        if use_wd and decay_mask[i]:
            leaf_s["wd"] = wd
        leaf_name = jax.tree_util.keystr(kpath) or "<root>"
        p = flat_p[i] if ("wd" in leaf_s or apply) else None
        if native and native_cpu.supports(g, p, ms):
            u, new = native_cpu.lowbit_step(spec.algo, g, p, ms, leaf_s, apply=apply,
                                            name=leaf_name)
            done = apply
        elif chunked:
            p = p if "wd" in leaf_s else None
            if not K.chunk_pays(ms[0]):
                continue  # the unfused jnp step's results
            u, new = K.fused_update_chunked(rule, g, p, ms, leaf_s, name=leaf_name)
            done = False
        else:
            if not K.float32_scales(ms):
                continue  # bfloat16 scales: the unfused jnp step's results
            u, new = K.fused_update(rule, g, p, ms, leaf_s, interpret=interpret,
                                    tile_elems=tile_elems, apply=apply, name=leaf_name)
            done = apply
        if done:
            written[i] = u  # the kernel wrote p + update; the update stays the reference's
        else:
            out_u[i] = u
        for k in range(n_mom):
            new_moms[k][i] = new[k]
    new_state = _replace_moments(ref_state, spec.algo, new_moms)
    return jax.tree_util.tree_unflatten(treedef, out_u), new_state, written


_APPLY_REQUEST: contextvars.ContextVar = contextvars.ContextVar("effjax_fused_apply",
                                                                default=None)


def fused_transform(reference: optax.GradientTransformation, spec: FusedSpec, *, name: str,
                    use_kernel: bool | None = None, interpret: bool | None = None,
                    tile_elems: int | None = None) -> optax.GradientTransformationExtraArgs:
    """``reference`` (``quantize_state`` of ``spec``'s chain) whose quantized leaves run a
    fused step where :func:`select_path` finds one.

    Same ``init`` and the same state pytree as ``reference`` (checkpoints are interchangeable);
    ``update`` runs the kernel for every leaf whose moments are QuantizedArrays and takes all
    else (small float32 leaves, counters, schedule states) from ``reference.update``; under
    ``jax.jit`` XLA drops the reference's unused work.
    """
    check_use_kernel(use_kernel, name=name, has_kernel=True)
    if use_kernel is False:
        return reference
    reference = optax.with_extra_args_support(reference)
    steps = {}

    def compiled(path, apply):
        if (path, apply) not in steps:
            steps[path, apply] = jax.jit(functools.partial(
                _step, reference, spec, path, apply, interpret, tile_elems))
        return steps[path, apply]

    def update_fn(updates, state, params=None, **extra):
        path = select_path(use_kernel, name=name)  # at trace time: no backend before
        if path is None:
            return reference.update(updates, state, params, **extra)
        request = _APPLY_REQUEST.get()
        apply = request is not None and params is not None
        out, new_state, written = compiled(path, apply)(updates, state, params, **extra)
        if apply:
            for u, p_new in zip(jax.tree.leaves(out), written):
                if p_new is not None:
                    request[id(u)] = (u, p_new)  # keeps u alive: ids stay unique
        return out, new_state

    return optax.GradientTransformationExtraArgs(reference.init, update_fn)


def fused_apply(opt: optax.GradientTransformation):
    """``step(grads, state, params) -> (new_params, new_state)``: ``opt.update`` followed by
    ``optax.apply_updates``, in one call.

    Where ``opt`` is, or ends with, an ``effjax.optim`` optimizer running a fused kernel
    (the Pallas kernel on a GPU, the native C++ step on a CPU), the kernel writes the new
    parameters itself, over the old ones: a float32 8-bit AdamW step then reads the gradient,
    the parameter and two codes and writes the parameter and the codes, 16 bytes per
    parameter, where ``update`` + ``apply_updates`` move 28 (the update goes through memory,
    and XLA cannot fuse a kernel's output into the addition). This holds inside
    ``optax.chain(..., opt)`` and ``optax.inject_hyperparams``: a leaf whose update reaches
    the end of ``opt.update`` unchanged takes the kernel's parameters, every other leaf (a
    transform after the fused one changed it; a leaf without a fused step) gets
    ``p + update``. Same results as ``update`` + ``apply_updates`` up to the rounding of a
    fused multiply-add (``p + lr * u`` may be contracted inside the kernel). Any other
    optimizer gets the two calls.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from effjax import optim
      >>> opt = optim.adamw_8bit(1e-3, weight_decay=0.1)
      >>> params = {"w": jnp.ones((64, 128))}
      >>> state = opt.init(params)
      >>> step = optim.fused_apply(optax.chain(optax.clip_by_global_norm(1.0), opt))
      >>> params, state = step({"w": jnp.full((64, 128), 0.1)}, (optax.EmptyState(), state),
      ...                      params)[0], state
      >>> round(float(params["w"][0, 0]), 6)  # 1 - lr * (sign(g) + weight_decay * 1)
      0.9989
    """

    def step(grads, state, params, **extra):
        if params is None:
            raise ValueError("fused_apply needs the parameters (got params=None)")
        request: dict = {}
        token = _APPLY_REQUEST.set(request)
        try:
            updates, state = opt.update(grads, state, params, **extra)
        finally:
            _APPLY_REQUEST.reset(token)

        def apply(p, u):
            if p is None:
                return None
            hit = request.get(id(u))
            if hit is not None and hit[0] is u:
                return hit[1]
            return jnp.asarray(p + u).astype(jnp.asarray(p).dtype)

        return jax.tree.map(apply, params, updates, is_leaf=lambda x: x is None), state

    return step
