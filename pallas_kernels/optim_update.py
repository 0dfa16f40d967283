"""Fused low-bit optimizer steps (Adam/AdamW, Lion, SGD-momentum) as Pallas kernels.

One pass per block reads the gradient, the parameter, the moment codes and their absmax, and
writes the update and the new codes and absmax; the float moments exist only in registers:

    m = codebook_m[codes_m] * absmax_m,  v = codebook_v[codes_v] * absmax_v     (dequantize)
    (u, m', v') = rule(g, p, m, v)                                              (update)
    absmax'_b = max_{i in b} |m'_i|,  codes'_i = nearest(m'_i / absmax'_b)        (requantize)

with the rules of the optax transforms that ``effjax.optim``'s jnp path wraps, written with the
same expressions and dtypes as optax (``optax.scale_by_adam`` + ``add_decayed_weights`` +
``scale_by_learning_rate`` for ``adam``; ``scale_by_lion`` for ``lion``; ``trace`` for ``sgd``):

* adam: ``m' = (1-b1) g + b1 m``, ``v' = (1-b2) g^2 + b2 v``,
  ``u = -lr ((m'/(1-b1^t)) / (sqrt(v'/(1-b2^t) + eps_root) + eps) + wd p)``;
* lion: ``u = -lr (sign((1-b1) g + b1 m) + wd p)``, ``m' = (1-b2) g + b2 m``;
* sgd: ``m' = g + mu m``, ``u = -lr m'`` (nesterov: ``-lr (g + mu m')``).

Non-finite gradients follow :func:`effjax.optim.quantize_state`: the update of an element with a
NaN/inf gradient is 0 and every non-finite new moment element is stored as 0 before the absmax.

Exactness (status, CPU interpret mode): the kernel runs the reference's expressions in the
same dtypes (Python-number scalars are baked in, keeping JAX's weak typing so bfloat16 moments
stay bfloat16 as in optax; array scalars from ``optax.inject_hyperparams``, schedules and bias
corrections are kernel inputs with their dtype restored). Through the public optimizers
``lion_8bit`` and ``sgd_8bit`` give bit-identical updates and states over several steps (tested).
The Adam family agrees to the last bit or two of float32 in the update, not bit for bit: XLA's
CPU code contracts ``a*b+c`` into fused multiply-adds depending on how it fuses the surrounding
graph, and the kernel body is fused differently from the reference; a moment one ulp off can
then sit on the other side of a code midpoint, so a code can differ by one step, and later
steps inherit that. Quantize/dequantize alone are bit-exact (``blockwise``). Pinning the
contraction (or measuring the drift over many steps) is left open in issue 6.

Many leaves: :func:`fused_lowbit` launches one kernel per quantized leaf. A single launch over
all leaves would need their codes, absmax, parameters and gradients concatenated into one
buffer, i.e. an extra read and write of everything (or a flat state layout, which would break
checkpoint compatibility with the jnp path), so it is not implemented.

Leaves below ``min_quantized_size`` (float32 state) and all counters are left to the jnp
transform: :func:`fused_lowbit` runs the jnp update and substitutes the kernel's results for the
quantized leaves; under ``jax.jit`` (the update is jitted) XLA drops the unused jnp work.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import pallas as pl

from effjax.quant import QuantizedArray, dequantize_blockwise, quantize_blockwise
from pallas_kernels import blockwise as bw

__all__ = [
    "adam_rule", "lion_rule", "sgd_rule", "fused_update", "fused_update_reference",
    "fused_lowbit", "kernel_available", "should_use_kernel", "FusedSpec",
]


# ----------------------------------------------------------------------------- rules
# A rule maps (g, p, moments, scalars) to (update, new moments); the same function runs in
# the kernel (on tiles) and in the reference (on whole arrays). Expressions copy optax's.

def _tail(u, p, s):
    if "wd" in s:
        u = u + s["wd"] * p
    if "lr" in s:
        u = s["lr"] * u
    if "lr_cast" in s:  # a schedule: optax.scale_by_schedule's jnp.array(step, dtype) * g
        u = s["lr_cast"].astype(u.dtype) * u
    return u


def adam_rule(g, p, moments, s):
    """``optax.scale_by_adam`` (+ decayed weights, learning rate) on one block of elements."""
    mu_old, nu_old = moments
    b1, b2 = s["b1"], s["b2"]
    mu = (1 - b1) * (g**1) + b1 * mu_old
    nu = (1 - b2) * (g**2) + b2 * nu_old
    if "bc1_next" in s:  # nesterov
        mu_hat = b1 * (mu / s["bc1_next"].astype(mu.dtype)) + (1 - b1) * (
            g / s["bc1"].astype(g.dtype))
    else:
        mu_hat = mu / s["bc1"].astype(mu.dtype)
    nu_hat = nu / s["bc2"].astype(nu.dtype)
    u = mu_hat / (jnp.sqrt(nu_hat + s["eps_root"]) + s["eps"])
    return _tail(u, p, s), (mu, nu.astype(nu_old.dtype))


def lion_rule(g, p, moments, s):
    """``optax.scale_by_lion`` (hard sign) (+ decayed weights, learning rate)."""
    (mu_old,) = moments
    u = jnp.sign((1.0 - s["b1"]) * g + s["b1"] * mu_old)
    mu = (1 - s["b2"]) * (g**1) + s["b2"] * mu_old
    return _tail(u, p, s), (mu,)


def sgd_rule(g, p, moments, s):
    """``optax.trace`` (+ learning rate)."""
    (t_old,) = moments
    t = g + s["decay"] * t_old
    u = g + s["decay"] * t if s.get("nesterov") else t
    return _tail(u, p, s), (t,)


# ----------------------------------------------------------------------------- one leaf

def _split_scalars(scalars: dict):
    static, names, values, dtypes = {}, [], [], []
    for k, v in scalars.items():
        if isinstance(v, (bool, int, float, np.generic)) and not isinstance(v, jax.Array):
            static[k] = v
        else:
            v = jnp.asarray(v)
            if v.size != 1:
                raise ValueError(f"scalar hyper-parameter {k!r} must have one element, got "
                                 f"shape {v.shape}")
            names.append(k)
            values.append(v.reshape(()))
            dtypes.append(v.dtype)
    return static, names, values, dtypes


def _finite(x):
    return jnp.where(jnp.isfinite(x), x, jnp.zeros_like(x))


def _check_leaf(g, p, moments, name):
    for q in moments:
        if not isinstance(q, QuantizedArray):
            raise TypeError(f"{name}: moment is {type(q).__name__}, expected a QuantizedArray")
        if tuple(g.shape) != tuple(q.shape):
            raise ValueError(f"{name}: gradient shape {tuple(g.shape)} does not match the state "
                             f"shape {tuple(q.shape)}")
    if not jnp.issubdtype(g.dtype, jnp.floating):
        raise TypeError(f"{name}: gradient has dtype {g.dtype} (shape {tuple(g.shape)}); "
                        "floating point is required")
    if p is not None and tuple(p.shape) != tuple(g.shape):
        raise ValueError(f"{name}: parameter shape {tuple(p.shape)} does not match the gradient "
                         f"shape {tuple(g.shape)}")
    if len({(q.block_size, q.bits) for q in moments}) != 1:
        raise ValueError(f"{name}: moments with different block sizes or bits")


def fused_update_reference(rule, g, p, moments, scalars, *, name="<leaf>"):
    """Pure-jnp reference of :func:`fused_update` (effjax.quant's dequantize / quantize)."""
    _check_leaf(g, p, moments, name)
    floats = tuple(dequantize_blockwise(q) for q in moments)
    u, new = rule(g, p, floats, scalars)
    new_q = tuple(quantize_blockwise(_finite(m), codebook=q.codebook, block_size=q.block_size)
                  for m, q in zip(new, moments))
    return jnp.where(jnp.isfinite(g), u, jnp.zeros_like(u)), new_q


def fused_update(rule, g, p, moments, scalars, *, interpret: bool | None = None,
                 tile_elems: int | None = None, name: str = "<leaf>"):
    """One fused low-bit step of one leaf: ``(update, new moments)``; see the module docstring.

    Args:
      rule: :func:`adam_rule`, :func:`lion_rule`, :func:`sgd_rule` (or any elementwise rule).
      g: gradient; p: parameter (``None`` if the rule does not read it).
      moments: the rule's moments as QuantizedArrays of g's shape (same block size and bits).
      scalars: dict of hyper-parameters (Python numbers are baked in; arrays are inputs).
      interpret: interpret mode; ``None``: on CPU.

    Example:
      >>> import jax.numpy as jnp
      >>> from effjax.quant import quantize_blockwise, dynamic_codebook
      >>> from pallas_kernels.optim_update import fused_update, fused_update_reference, sgd_rule
      >>> g = jnp.linspace(-1.0, 1.0, 512)
      >>> m = quantize_blockwise(g, codebook=dynamic_codebook(), block_size=256)
      >>> s = {"decay": 0.9, "lr": -0.1}
      >>> u, (m2,) = fused_update(sgd_rule, g, None, (m,), s)
      >>> r, (r2,) = fused_update_reference(sgd_rule, g, None, (m,), s)
      >>> # codes equal; the update to float32 rounding (fused multiply-adds differ, see above)
      >>> bool(jnp.allclose(u, r, rtol=1e-6, atol=0)), bool((m2.codes == r2.codes).all())
      (True, True)
    """
    g = jnp.asarray(g)
    _check_leaf(g, p, moments, name)
    q0 = moments[0]
    interp = bw.resolve_interpret(interpret)
    lay = bw.make_layout(g.shape, q0.block_size, q0.bits, interpret=interp,
                         tile_elems=tile_elems)
    cbs = [bw.make_codebook(q.codebook) for q in moments]
    static, dyn_names, dyn_values, dyn_dtypes = _split_scalars(scalars)

    # Output dtypes: exactly those of the reference's rule.
    def abstract(gg, pp, ms, dv):
        return rule(gg, pp, ms, {**static, **dict(zip(dyn_names, dv))})

    u_aval, new_avals = jax.eval_shape(
        abstract, jax.ShapeDtypeStruct(g.shape, g.dtype),
        None if p is None else jax.ShapeDtypeStruct(p.shape, p.dtype),
        tuple(jax.ShapeDtypeStruct(q.shape, q.dtype) for q in moments),
        [jax.ShapeDtypeStruct((), d) for d in dyn_dtypes])

    value_spec, code_spec, scale_spec = bw.specs(lay)
    n_tables = [len(cb.tables) for cb in cbs]
    has_p = p is not None
    n_dyn = len(dyn_names)

    def kernel(*refs):
        it = iter(refs)
        g_t = next(it)[...]
        p_t = next(it)[...] if has_p else None
        s_ref = next(it) if n_dyn else None
        loaded = []
        for nt in n_tables:
            codes_t, absmax_t = next(it)[...], next(it)[...]
            tables = tuple(next(it)[...] for _ in range(nt))
            loaded.append((codes_t, absmax_t, tables))
        u_ref = next(it)
        out_refs = [(next(it), next(it)) for _ in moments]
        valid = bw.valid_columns(g_t.shape, pl.program_id(1) * lay.tile_cols, lay.length)
        floats = tuple(bw.dequantize_tile(c, a, lay, cb, t, q.dtype)
                       for (c, a, t), cb, q in zip(loaded, cbs, moments))
        sc = dict(static)
        for k, (nm, dt) in enumerate(zip(dyn_names, dyn_dtypes)):
            sc[nm] = s_ref[0, k].astype(dt)
        u, new = rule(g_t, p_t, floats, sc)
        u_ref[...] = jnp.where(jnp.isfinite(g_t), u, jnp.zeros_like(u)).astype(u_aval.dtype)
        for m, (_, _, tables), cb, (c_ref, a_ref) in zip(new, loaded, cbs, out_refs):
            codes, absmax = bw.quantize_tile(_finite(m).astype(jnp.float32), valid, lay, cb,
                                             tables)
            c_ref[...] = codes
            a_ref[...] = absmax

    inputs, in_specs = [g.reshape(lay.rows, lay.length)], [value_spec]
    if has_p:
        inputs.append(jnp.asarray(p).reshape(lay.rows, lay.length))
        in_specs.append(value_spec)
    if n_dyn:
        inputs.append(jnp.stack([v.astype(jnp.float32) for v in dyn_values]).reshape(1, n_dyn))
        in_specs.append(pl.BlockSpec((1, n_dyn), lambda i, j: (0, 0)))
    for q, cb in zip(moments, cbs):
        inputs += [bw.codes_2d(q, lay), q.absmax.reshape(lay.rows, lay.nblocks)]
        in_specs += [code_spec, scale_spec]
        inputs += [jnp.asarray(t) for t in cb.tables]
        in_specs += [bw.table_spec(t) for t in cb.tables]
    out_shape = [jax.ShapeDtypeStruct((lay.rows, lay.length), u_aval.dtype)]
    out_specs = [value_spec]
    for _ in moments:
        out_shape += [jax.ShapeDtypeStruct((lay.rows, lay.code_cols), jnp.uint8),
                      jax.ShapeDtypeStruct((lay.rows, lay.nblocks), jnp.float32)]
        out_specs += [code_spec, scale_spec]
    outs = pl.pallas_call(kernel, out_shape=tuple(out_shape), grid=lay.grid, in_specs=in_specs,
                          out_specs=tuple(out_specs), interpret=interp,
                          name="fused_lowbit_update")(*inputs)
    u = outs[0].reshape(g.shape)
    new_q = []
    for k, (q, aval) in enumerate(zip(moments, new_avals)):
        codes, absmax = outs[1 + 2 * k], outs[2 + 2 * k]
        new_q.append(QuantizedArray(codes=bw.codes_from_2d(codes, lay),
                                    absmax=absmax.reshape(bw.absmax_shape(lay)),
                                    shape=tuple(g.shape), dtype=aval.dtype,
                                    block_size=q.block_size, codebook=q.codebook, bits=q.bits))
    return u, tuple(new_q)


# ----------------------------------------------------------------------------- dispatch

#: Backends where the kernels have been compiled and checked against the jnp path on real
#: hardware, and so where ``use_kernel=None`` picks them. Empty until that check is done (issue
#: 6: no GPU/TPU run yet); a kernel that failed to lower would otherwise break every default
#: training loop on that backend. Add "gpu" / "tpu" once verified.
VALIDATED_BACKENDS: tuple[str, ...] = ()


def kernel_available() -> bool:
    """True where ``use_kernel=None`` picks the kernel: the default backend is one of
    :data:`VALIDATED_BACKENDS` (none yet: auto means the jnp path everywhere; pass
    ``use_kernel=True`` to opt in, e.g. on a GPU, where the ``pallas_call`` lowers with JAX's
    default GPU backend: Mosaic GPU on Hopper and newer since JAX 0.11, Triton before)."""
    return jax.default_backend() in VALIDATED_BACKENDS


def should_use_kernel(use_kernel: bool | None, *, name: str, has_kernel: bool = True) -> bool:
    """Resolve ``use_kernel`` (``None`` = auto, see :func:`kernel_available`)."""
    if use_kernel is not None and not isinstance(use_kernel, bool):
        raise ValueError(f"{name}: use_kernel must be None, True or False, got {use_kernel!r}")
    if use_kernel is None:
        return has_kernel and kernel_available()
    if use_kernel and not has_kernel:
        raise ValueError(f"{name}: there is no fused Pallas kernel for this optimizer; pass "
                         "use_kernel=None or False")
    return use_kernel


class FusedSpec(NamedTuple):
    """What :func:`fused_lowbit` needs to know about the wrapped optax alias (static)."""

    algo: str  # "adam" | "lion" | "sgd"
    hyper: dict  # b1, b2, eps, eps_root, nesterov, decay (sgd momentum)
    weight_decay: Any = None  # None: no add_decayed_weights in the chain
    mask: Any = None
    learning_rate: Any = None  # None: no scale_by_learning_rate in the chain


_RULES = {"adam": (adam_rule, 2), "lion": (lion_rule, 1), "sgd": (sgd_rule, 1)}


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


def fused_lowbit(jnp_tx: optax.GradientTransformationExtraArgs, spec: FusedSpec, *,
                 interpret: bool | None = None,
                 tile_elems: int | None = None) -> optax.GradientTransformationExtraArgs:
    """The low-bit optimizer ``jnp_tx`` (an ``effjax.optim`` alias) with fused kernel steps.

    Same ``init`` and the same state pytree as ``jnp_tx`` (checkpoints are interchangeable);
    ``update`` runs the kernel for every leaf whose moments are QuantizedArrays and takes all
    else (small float32 leaves, counters, schedule states) from ``jnp_tx.update``.
    """
    rule, n_mom = _RULES[spec.algo]

    def update_fn(updates, state, params=None, **extra):
        ref_updates, ref_state = jnp_tx.update(updates, state, params, **extra)
        chain = state if isinstance(state, tuple) and not hasattr(state, "_fields") else (state,)
        core = chain[0]
        if spec.algo == "adam":
            mom_trees = (core.mu, core.nu)
        elif spec.algo == "lion":
            mom_trees = (core.mu,)
        else:
            mom_trees = (core.trace,)
        flat_g, treedef = jax.tree_util.tree_flatten_with_path(updates)
        flat_m = [jax.tree.leaves(t, is_leaf=_is_q) for t in mom_trees]
        if any(len(m) != len(flat_g) for m in flat_m):
            raise ValueError("fused_lowbit: the state's moments do not match the updates' tree")
        flat_p = [None] * len(flat_g) if params is None else jax.tree.leaves(params)
        if len(flat_p) != len(flat_g):
            raise ValueError("fused_lowbit: params and updates have different tree structures")

        s = {}
        h = spec.hyper
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
        if use_wd and callable(wd):
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
        decay_mask = _mask_leaves(spec.mask, updates, len(flat_g)) if use_wd else None

        out_u = jax.tree.leaves(ref_updates)
        new_moms = [list(jax.tree.leaves(getattr_moment(ref_state, spec.algo, k),
                                         is_leaf=_is_q)) for k in range(n_mom)]
        for i, (path, g) in enumerate(flat_g):
            ms = tuple(m[i] for m in flat_m)
            if not _is_q(ms[0]):
                continue
            leaf_s = dict(s)
            if use_wd and decay_mask[i]:
                leaf_s["wd"] = wd
            p = flat_p[i] if "wd" in leaf_s else None
            u, new = fused_update(rule, g, p, ms, leaf_s, interpret=interpret,
                                  tile_elems=tile_elems,
                                  name=jax.tree_util.keystr(path) or "<root>")
            out_u[i] = u
            for k in range(n_mom):
                new_moms[k][i] = new[k]
        new_updates = jax.tree_util.tree_unflatten(treedef, out_u)
        return new_updates, replace_moments(ref_state, spec.algo, new_moms)

    return optax.GradientTransformationExtraArgs(jnp_tx.init, jax.jit(update_fn))


_FIELDS = {"adam": ("mu", "nu"), "lion": ("mu",), "sgd": ("trace",)}


def _core(state):
    return state[0] if isinstance(state, tuple) and not hasattr(state, "_fields") else state


def getattr_moment(state, algo: str, k: int):
    return getattr(_core(state), _FIELDS[algo][k])


def replace_moments(state, algo: str, new_moms: list[list]):
    core = _core(state)
    repl = {}
    for k, field in enumerate(_FIELDS[algo]):
        old = getattr(core, field)
        treedef = jax.tree.structure(old, is_leaf=_is_q)
        repl[field] = jax.tree_util.tree_unflatten(treedef, new_moms[k])
    new_core = core._replace(**repl)
    if core is state:
        return new_core
    return (new_core,) + tuple(state[1:])

