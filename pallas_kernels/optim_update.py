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

Non-finite values follow :func:`effjax.optim.quantize_state`'s rule: an element whose gradient,
update or any new moment is not finite (a finite gradient whose square overflows included) gets
update 0 and all its new moments 0, before the absmax.

Exactness (status, CPU interpret mode): the kernel runs the reference's expressions in the
same dtypes (Python-number scalars are baked in, keeping JAX's weak typing so bfloat16 moments
stay bfloat16 as in optax; array scalars from ``optax.inject_hyperparams``, schedules and bias
corrections are kernel inputs with their dtype restored). Through the public optimizers
``lion_8bit`` and ``sgd_8bit`` give bit-identical updates and states over several steps (tested).
The Adam family agrees to the last bit or two of float32 in the update, not bit for bit: XLA's
CPU code contracts ``a*b+c`` into fused multiply-adds depending on how it fuses the surrounding
graph, and the kernel body is fused differently from the reference; a moment one ulp off can
then sit on the other side of a code midpoint, so a code can differ by one step, and later
steps inherit that. Quantize/dequantize alone are bit-exact (``blockwise``).

GPU (Triton; measured on an H100, ``experiments/check_kernels.py``): the kernel divides with a
correctly rounded ``div.rn.f32`` (Triton's own ``/`` is approximate) and reads the codebooks
through lookup tables (:func:`pallas_kernels.blockwise.lookup_tables`). After one step from the
same state at most 0.0015% of codes differ from XLA:GPU's jnp path, absmax is equal, Lion/SGD
updates are equal and Adam's differ by at most 2 bf16 ulps on bfloat16 leaves: the two compilers
round bf16 arithmetic and contract multiply-adds differently.

Writing the parameters: ``optax``'s interface returns an update that ``optax.apply_updates``
adds afterwards, and XLA cannot fuse a kernel's output into that addition, so the update goes
through memory (28 bytes per float32 parameter instead of 16). :func:`effjax.optim.fused_apply`
runs the kernel with ``apply=True``: it writes ``p + update`` over ``p`` and the codes and
absmax over the old ones (``input_output_aliases``). On the H100: 0.75-0.77x ``optax.adamw``'s
step time, vs 1.16x for ``update`` + ``apply_updates``.

Many leaves: ``effjax.optim``'s fused step launches one kernel per quantized leaf. Measured on
the H100 (72 leaves, 151M elements, ``experiments/bench_kernels.py --multi-leaf``): per-leaf
launches 2.94 ms, one launch over the concatenated leaves 5.76 ms (the concatenation and split cost
more than the launches save), one leaf of the same size 1.70 ms. A flat state layout could
approach the last figure but would change the state pytree (checkpoints), so it is not done.

CPU: Pallas only interprets there. ``effjax.optim``'s default on single-device CPUs is the
native C++ step (:mod:`pallas_kernels.native_cpu`, an XLA FFI call with this module's rules,
compiled on first use) for float32 leaves whose blocks are whole rows; where it cannot build,
and for the leaves it does not take, :func:`fused_update_chunked` (the fused step in plain jnp:
the rule on the whole leaf for the update, a loop over cache-sized chunks for the
requantization) runs on large 8-bit leaves (:func:`chunk_pays`), the unfused jnp step on the
rest.

Which of these runs for a leaf, and everything optax (the state, counters, schedules, small
float32 leaves), is decided in ``effjax.optim`` (``effjax/optim/_fused.py``); the kernels here
take arrays, scalars and a rule.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from effjax.quant import QuantizedArray, dequantize_blockwise, quantize_blockwise
from pallas_kernels import blockwise as bw

__all__ = [
    "adam_rule", "lion_rule", "sgd_rule", "fused_update", "fused_update_reference",
    "fused_update_chunked", "chunk_pays", "float32_scales", "kernel_available", "reset_bad",
    "VALIDATED_BACKENDS",
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
    """``optax.scale_by_adam`` (+ decayed weights, learning rate) on one block of elements.

    Divisions go through ``s["div"]`` when given (the kernel's correctly rounded GPU division,
    :func:`pallas_kernels.blockwise.exact_div`), else ``/``."""
    div = s.get("div", jnp.divide)
    mu_old, nu_old = moments
    b1, b2 = s["b1"], s["b2"]
    mu = (1 - b1) * (g**1) + b1 * mu_old
    nu = (1 - b2) * (g**2) + b2 * nu_old
    if "bc1_next" in s:  # nesterov
        mu_hat = b1 * div(mu, s["bc1_next"].astype(mu.dtype)) + (1 - b1) * (
            div(g, s["bc1"].astype(g.dtype)))
    else:
        mu_hat = div(mu, s["bc1"].astype(mu.dtype))
    nu_hat = div(nu, s["bc2"].astype(nu.dtype))
    u = div(mu_hat, jnp.sqrt(nu_hat + s["eps_root"]) + s["eps"])
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


def reset_bad(g, u, new):
    """:func:`effjax.optim.quantize_state`'s non-finite rule on one leaf (or tile): where the
    gradient, the update or any new moment is not finite, the update and every new moment are
    0. Returns ``(u, new)``."""
    bad = ~jnp.isfinite(g) | ~jnp.isfinite(u)
    for m in new:
        bad = bad | ~jnp.isfinite(m)
    return (jnp.where(bad, jnp.zeros_like(u), u),
            tuple(jnp.where(bad, jnp.zeros_like(m), m) for m in new))


def float32_scales(moments) -> bool:
    """Whether every moment stores float32 scales (the only kind the Pallas kernel writes)."""
    return all(jnp.dtype(q.absmax.dtype) == jnp.float32 for q in moments)


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
    if any(q.shards is not None for q in moments):
        raise ValueError(f"{name}: the fused steps take bitsandbytes' flat block layout; this "
                         f"moment has the shard-local layout (shards={moments[0].shards}): use "
                         "the unfused jnp step (effjax.quant.blockwise's docstring)")


def fused_update_reference(rule, g, p, moments, scalars, *, name="<leaf>"):
    """Pure-jnp reference of :func:`fused_update` (effjax.quant's dequantize / quantize)."""
    _check_leaf(g, p, moments, name)
    floats = tuple(dequantize_blockwise(q) for q in moments)
    u, new = reset_bad(g, *rule(g, p, floats, scalars))
    new_q = tuple(quantize_blockwise(m, codebook=q.codebook, block_size=q.block_size,
                                     scale_dtype=q.absmax.dtype)
                  for m, q in zip(new, moments))
    return u, new_q


#: Elements per chunk of :func:`fused_update_chunked` (256 KiB of float32 per temporary;
#: measured best of 2**14..2**18 on the 10M tree of ``experiments/bench_optim.py``).
CHUNK_ELEMS = 2**16


#: 8-bit leaves from this many elements take the chunked step (``effjax.optim``'s ``"chunked"``
#: path);
#: smaller ones (and 4-bit leaves) keep the unfused jnp step, which was as fast or faster in
#: measurements on the 2-core CI machine (single leaves, min of 15 steps, ratio
#: to optax.adamw; unfused / chunked): 8-bit 1M elements 6.2x / 10.0x, 4M 11.1x / 6.0x,
#: 16M 8.5x / 4.8x; 4-bit 4M 17.8x / 25.7x.
CHUNK_MIN_ELEMS = 2**22


def chunk_pays(q: QuantizedArray) -> bool:
    """Whether the chunked path runs :func:`fused_update_chunked` on a leaf with
    moment ``q`` (8-bit, at least :data:`CHUNK_MIN_ELEMS` elements)."""
    return q.bits == 8 and q.size >= CHUNK_MIN_ELEMS


def fused_update_chunked(rule, g, p, moments, scalars, *, chunk_elems: int | None = None,
                         name: str = "<leaf>"):
    """:func:`fused_update_reference` with the requantization run chunk by chunk (pure jnp).

    The fused step for CPUs, where Pallas only interprets. XLA:CPU cannot fuse a block
    reduction (the new absmax) with its consumers, so on a whole leaf it materializes the
    dequantized codes and the new float32 moments as leaf-sized temporaries, which are paged in
    afresh at every step. Here:

    * the update is the rule applied to the dequantized old moments of the whole leaf: an
      elementwise expression that XLA fuses into its consumer (``optax.apply_updates``) as it
      does for any optax update;
    * the new codes and scales come from a ``fori_loop`` over consecutive chunks of at most
      ``chunk_elems`` elements (default :data:`CHUNK_ELEMS`; whole blocks, and at least two
      chunks) whose temporaries stay in cache. The loop writes them to new buffers:
      requantizing in place while the update still reads the old codes makes XLA copy the
      codes twice.

    Both run the reference's expressions on the same elements, so codes and scales are the
    reference's, and the update too wherever XLA contracts the same multiply-adds (tested
    through the public optimizers). Leaves whose blocks cannot be viewed as rows without a copy
    (a padded last block, or 4-bit codes with an odd last axis) run the reference as a whole.
    The loop slices the leaf's flattened blocks, so on a sharded leaf XLA gathers it: the
    optimizers pick this step only in single-device processes (``effjax.optim``'s ``select_path``).

    Example:
      >>> import jax.numpy as jnp
      >>> from effjax.quant import quantize_blockwise, dynamic_codebook
      >>> from pallas_kernels.optim_update import (fused_update_chunked,
      ...     fused_update_reference, lion_rule)
      >>> g = jnp.linspace(-1.0, 1.0, 4096).reshape(4, 1024)
      >>> m = quantize_blockwise(0.5 * g, codebook=dynamic_codebook(), block_size=256)
      >>> s = {"b1": 0.9, "b2": 0.99, "lr": -0.1}
      >>> u, (m2,) = fused_update_chunked(lion_rule, g, None, (m,), s, chunk_elems=1024)
      >>> r, (r2,) = fused_update_reference(lion_rule, g, None, (m,), s)
      >>> bool((u == r).all()), bool((m2.codes == r2.codes).all()), m2.absmax.shape
      (True, True, (4, 4))
    """
    g = jnp.asarray(g)
    _check_leaf(g, p, moments, name)
    q0 = moments[0]
    bs, bits = q0.block_size, q0.bits
    n_blocks = bw.chunk_view(g.shape, bs, bits)
    if n_blocks is None:
        return fused_update_reference(rule, g, p, moments, scalars, name=name)
    # At most CHUNK_ELEMS per chunk, and at least two chunks: a leaf run as one piece has the
    # same decode feeding the update and the requantization, which XLA materializes.
    per = max(1, min((CHUNK_ELEMS if chunk_elems is None else int(chunk_elems)) // bs,
                     -(-n_blocks // 2)))
    u, new_whole = reset_bad(g, *rule(g, p, tuple(dequantize_blockwise(q) for q in moments),
                                      scalars))
    cols = bs * bits // 8
    g2 = g.reshape(n_blocks, bs)
    p2 = None if p is None else jnp.asarray(p).reshape(n_blocks, bs)
    old_codes = [q.codes.reshape(n_blocks, cols) for q in moments]
    old_scales = [q.absmax.reshape(n_blocks, 1) for q in moments]

    def step(lo, size, carry):
        def sl(x):
            return jax.lax.dynamic_slice_in_dim(x, lo, size, 0)

        # The barrier keeps XLA from merging this decode with the update's (CSE), which would
        # give the decoded moments two consumers and so a materialized leaf-sized temporary.
        codes, scales = jax.lax.optimization_barrier(
            ([sl(c) for c in old_codes], [sl(a) for a in old_scales]))
        ms = tuple(QuantizedArray(codes=c, absmax=a, shape=(size, bs), dtype=q.dtype,
                                  block_size=bs, codebook=q.codebook, bits=bits)
                   for c, a, q in zip(codes, scales, moments))
        _, new = fused_update_reference(rule, sl(g2), None if p2 is None else sl(p2), ms,
                                        scalars, name=name)
        if carry is None:  # the whole leaf in one step
            return [m.codes for m in new], [m.absmax for m in new]
        return ([jax.lax.dynamic_update_slice_in_dim(c, m.codes, lo, 0)
                 for c, m in zip(carry[0], new)],
                [jax.lax.dynamic_update_slice_in_dim(a, m.absmax, lo, 0)
                 for a, m in zip(carry[1], new)])

    n_full, rest = divmod(n_blocks, per)
    if n_full == 1 and not rest:  # a single block
        codes, scales = step(0, n_blocks, None)
    else:
        init = ([jnp.zeros_like(c) for c in old_codes], [jnp.zeros_like(a) for a in old_scales])
        codes, scales = jax.lax.fori_loop(0, n_full, lambda i, c: step(i * per, per, c), init)
        if rest:
            codes, scales = step(n_full * per, rest, (codes, scales))
    new_q = tuple(QuantizedArray(codes=c.reshape(q.codes.shape), absmax=a.reshape(q.absmax.shape),
                                 shape=tuple(g.shape), dtype=m.dtype, block_size=bs,
                                 codebook=q.codebook, bits=bits)
                  for c, a, q, m in zip(codes, scales, moments, new_whole))
    return u, new_q


def fused_update(rule, g, p, moments, scalars, *, interpret: bool | None = None,
                 tile_elems: int | None = None, lookup: bool | None = None,
                 apply: bool = False, name: str = "<leaf>"):
    """One fused low-bit step of one leaf: ``(update, new moments)``; see the module docstring.

    Args:
      rule: :func:`adam_rule`, :func:`lion_rule`, :func:`sgd_rule` (or any elementwise rule).
      g: gradient; p: parameter (``None`` if the rule does not read it).
      moments: the rule's moments as QuantizedArrays of g's shape (same block size and bits).
      scalars: dict of hyper-parameters (Python numbers are baked in; arrays are inputs).
      interpret: interpret mode; ``None``: on CPU.
      lookup: codebook search and decode by lookup tables
        (:func:`pallas_kernels.blockwise.lookup_tables`); ``None``: when compiled (GPU).
      apply: return the new parameter ``(p + update).astype(p.dtype)`` (``optax.apply_updates``)
        instead of the update: the kernel writes it over ``p`` (aliased), so a step moves 16
        bytes per float32 parameter instead of 16 + 12 for a separate ``apply_updates``.

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
    if apply and p is None:
        raise ValueError(f"{name}: apply=True needs the parameter")
    if not float32_scales(moments):
        raise ValueError(f"{name}: the Pallas kernel stores float32 scales; got "
                         f"{[str(q.absmax.dtype) for q in moments]} (use the jnp step)")
    q0 = moments[0]
    interp = bw.resolve_interpret(interpret)
    lay = bw.make_layout(g.shape, q0.block_size, q0.bits, interpret=interp,
                         tile_elems=tile_elems)
    cbs = [bw.make_codebook(q.codebook, lookup=bw.resolve_lookup(lookup, interp))
           for q in moments]
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
    gpu_asm = bw.uses_gpu_asm(interp)

    def kernel(*refs):
        it = iter(refs)
        masks = bw.tile_masks(lay, interp)
        g_t = bw.load(next(it), masks.value)
        p_t = bw.load(next(it), masks.value) if has_p else None
        s_ref = next(it) if n_dyn else None
        loaded = []
        for nt in n_tables:
            codes_t, absmax_t = bw.load(next(it), masks.code), bw.load(next(it), masks.scale)
            tables = tuple(next(it) for _ in range(nt))
            loaded.append((codes_t, absmax_t, tables))
        u_ref = next(it)
        out_refs = [(next(it), next(it)) for _ in moments]
        valid = bw.valid_columns(g_t.shape, pl.program_id(1) * lay.tile_cols, lay.length)
        floats = tuple(bw.dequantize_tile(c, a, lay, cb, t, q.dtype)
                       for (c, a, t), cb, q in zip(loaded, cbs, moments))
        sc = dict(static, div=functools.partial(bw.exact_div, gpu_asm=gpu_asm))
        for k, (nm, dt) in enumerate(zip(dyn_names, dyn_dtypes)):
            sc[nm] = s_ref[0, k].astype(dt)
        u, new = reset_bad(g_t, *rule(g_t, p_t, floats, sc))
        u = u.astype(u_aval.dtype)
        if apply:  # optax.apply_updates' expression
            u = jnp.asarray(p_t + u).astype(p_t.dtype)
        bw.store(u_ref, u, masks.value)
        for m, (_, _, tables), cb, (c_ref, a_ref) in zip(new, loaded, cbs, out_refs):
            codes, absmax = bw.quantize_tile(m.astype(jnp.float32), valid, lay, cb,
                                             tables, gpu_asm=gpu_asm)
            bw.store(c_ref, codes, masks.code)
            bw.store(a_ref, absmax, masks.scale)

    inputs, in_specs = [g.reshape(lay.rows, lay.length)], [value_spec]
    if has_p:
        inputs.append(jnp.asarray(p).reshape(lay.rows, lay.length))
        in_specs.append(value_spec)
    if n_dyn:
        width = bw.pow2_ceil(n_dyn)
        vals = [v.astype(jnp.float32) for v in dyn_values]
        vals += [jnp.zeros((), jnp.float32)] * (width - n_dyn)
        inputs.append(jnp.stack(vals).reshape(1, width))
        in_specs.append(pl.BlockSpec((1, width), lambda i, j: (0, 0)))
    aliases = {1: 0} if apply else {}
    for k, (q, cb) in enumerate(zip(moments, cbs)):
        if lay.pack_in_kernel or q.bits == 8:  # codes in place (else unpacked: a new array)
            aliases[len(inputs)] = 1 + 2 * k
        aliases[len(inputs) + 1] = 2 + 2 * k  # absmax in place
        inputs += [bw.codes_2d(q, lay), q.absmax.reshape(lay.rows, lay.nblocks)]
        in_specs += [code_spec, scale_spec]
        inputs += [jnp.asarray(t) for t in cb.tables]
        in_specs += [bw.table_spec(t) for t in cb.tables]
    out_shape = [jax.ShapeDtypeStruct((lay.rows, lay.length),
                                      jnp.asarray(p).dtype if apply else u_aval.dtype)]
    out_specs = [value_spec]
    for _ in moments:
        out_shape += [jax.ShapeDtypeStruct((lay.rows, lay.code_cols), jnp.uint8),
                      jax.ShapeDtypeStruct((lay.rows, lay.nblocks), jnp.float32)]
        out_specs += [code_spec, scale_spec]
    outs = pl.pallas_call(kernel, out_shape=tuple(out_shape), grid=lay.grid, in_specs=in_specs,
                          out_specs=tuple(out_specs), interpret=interp,
                          compiler_params=bw.compiler_params(interp),
                          input_output_aliases=aliases,
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
#: hardware, and so where ``use_kernel=None`` picks them: NVIDIA GPUs (H100, jax 0.11, Triton;
#: ``experiments/check_kernels.py``). Not TPU (never run there).
VALIDATED_BACKENDS: tuple[str, ...] = ("gpu",)


def kernel_available() -> bool:
    """True where ``use_kernel=None`` picks the kernel: the default backend is one of
    :data:`VALIDATED_BACKENDS` (GPU). On a GPU the kernels lower with Pallas' Triton backend,
    named explicitly (JAX 0.11's default for ``pallas_call``; JAX 0.10 defaulted to Mosaic GPU,
    whose ``pallas_call`` path is deprecated and does not take these tiles)."""
    return jax.default_backend() in VALIDATED_BACKENDS
