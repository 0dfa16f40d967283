"""Compiled Pallas kernels == effjax's jnp path, on the device at hand (issue 6).

The tests run the kernels in interpret mode on CPU; this script checks what the compiled
kernels (Triton on an NVIDIA GPU) compute, on fresh random data, against the jnp reference on
the same device:

* ``quantize``/``dequantize`` (``pallas_kernels.blockwise``) over a table of codebooks, shapes
  (sizes that are not multiples of the block, odd last axes) and dtypes: codes and absmax must
  be equal, and so must the dequantized values;
* one optimizer step of every fused alias (``adamw_8bit``, ``adam_8bit``, ``lion_8bit``,
  ``sgd_8bit``, ``adamw_4bit``) with ``use_kernel=True`` vs ``use_kernel=False`` from the same
  state on a tree of float32, bfloat16 and small (float32-state) leaves: the fraction of codes
  that differ, whether absmax is equal, and the largest update difference in float32 ulps;
* the same over ``--steps`` steps: the largest parameter difference relative to the largest
  total change of the parameter.

Run (GPU): python -m experiments.check_kernels            (prints a table; --json PATH)
Quick:     python -m experiments.check_kernels --quick    (CPU interpret mode; run by the tests)
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from effjax import optim, quant
from pallas_kernels import blockwise as B

QUANT_CASES = [  # (codebook name, shape, dtype, block size)
    ("dynamic8 signed", (512, 4096), "float32", 256),
    ("dynamic8 signed", (3, 300), "bfloat16", 256),
    ("dynamic8 signed", (7, 1000), "float16", 256),
    ("dynamic8 unsigned", (1000, 2048), "float32", 256),
    ("dynamic8 unsigned", (12345,), "float32", 256),
    ("nf4", (256, 4096), "float32", 64),
    ("nf4", (5, 301), "bfloat16", 64),
    ("fp4", (4096, 128), "float32", 128),
    ("dynamic4 signed", (100, 1000), "float32", 128),
]
QUICK_QUANT = [("dynamic8 signed", (3, 300), "float32", 256), ("nf4", (5, 301), "float32", 64)]

OPTIMIZERS = {
    "adamw_8bit": lambda k: optim.adamw_8bit(1e-3, weight_decay=0.1, use_kernel=k),
    "adam_8bit": lambda k: optim.adam_8bit(optax.cosine_decay_schedule(1e-3, 100), use_kernel=k),
    "lion_8bit": lambda k: optim.lion_8bit(1e-4, use_kernel=k),
    "sgd_8bit": lambda k: optim.sgd_8bit(1e-2, momentum=0.9, use_kernel=k),
    "adamw_4bit": lambda k: optim.adamw_4bit(1e-3, use_kernel=k),
}


def _codebook(name):
    kind, _, sign = name.partition(" ")
    if kind == "nf4":
        return quant.nf4_codebook()
    if kind == "fp4":
        return quant.fp4_codebook()
    bits = int(kind.removeprefix("dynamic"))
    return quant.dynamic_codebook(signed=sign == "signed", bits=bits)


def _sample(key, shape, dtype, unsigned):
    """Normal values with block scales over 12 decades, some exact zeros and a zero block."""
    k1, k2, k3 = jax.random.split(key, 3)
    x = jax.random.normal(k1, shape, jnp.float32)
    scale = 10.0 ** jax.random.uniform(k2, shape[:-1] + (1,), minval=-8, maxval=4)
    x = x * scale * (jax.random.uniform(k3, shape) > 0.05)
    x = x.reshape(-1).at[:300].set(0.0).reshape(shape)
    return (jnp.abs(x) if unsigned else x).astype(dtype)


def check_quantize(cases, key, interpret):
    rows = []
    for i, (cbn, shape, dt, bs) in enumerate(cases):
        cb = _codebook(cbn)
        x = _sample(jax.random.fold_in(key, i), shape, jnp.dtype(dt), "unsigned" in cbn)
        ref = jax.jit(lambda x, cb=cb, bs=bs: quant.quantize_blockwise(
            x, codebook=cb, block_size=bs))(x)
        got = jax.jit(lambda x, cb=cb, bs=bs: B.quantize_blockwise(
            x, codebook=cb, block_size=bs, interpret=interpret))(x)
        deq_ref = jax.jit(quant.dequantize_blockwise)(ref)
        deq = jax.jit(lambda q: B.dequantize_blockwise(q, interpret=interpret))(ref)
        bad = np.argwhere(np.asarray(got.codes != ref.codes))[:3]
        examples = [dict(index=[int(v) for v in ix], ref_code=int(ref.codes[tuple(ix)]),
                         kernel_code=int(got.codes[tuple(ix)])) for ix in bad]
        rows.append(dict(
            kernel="quantize", case=f"{cbn} {shape} {dt} block {bs}", examples=examples,
            code_mismatch=int((got.codes != ref.codes).sum()), codes=int(ref.codes.size),
            absmax_equal=bool((got.absmax == ref.absmax).all()),
            dequant_equal=bool((deq == deq_ref).all())))
    return rows


def _tree(key, quick):
    ks = jax.random.split(key, 4)
    if quick:
        shapes = {"w": ((64, 256), jnp.float32), "h": ((32, 256), jnp.bfloat16),
                  "b": ((100,), jnp.float32)}
    else:
        shapes = {"w": ((1024, 4096), jnp.float32), "h": ((512, 1000), jnp.bfloat16),
                  "odd": ((3, 5001), jnp.float32), "b": ((1000,), jnp.float32)}
    return {k: (jax.random.normal(kk, s) * 0.02).astype(d)
            for (k, (s, d)), kk in zip(shapes.items(), ks)}


def _ulps(a, b):
    """Largest distance in float32 ulps between two arrays (as float32)."""
    ia = np.asarray(a, np.float32).view(np.int32).astype(np.int64)
    ib = np.asarray(b, np.float32).view(np.int32).astype(np.int64)
    ia = np.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    ib = np.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return int(np.max(np.abs(ia - ib)))


def _codes_and_scales(state):
    leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, quant.QuantizedArray))
    qs = [q for q in leaves if isinstance(q, quant.QuantizedArray)]
    return qs


def check_optimizers(key, steps, quick):
    rows = []
    params0 = _tree(key, quick)
    grads = [jax.tree.map(lambda p, i=i: jax.random.normal(
        jax.random.fold_in(key, 1000 + i), p.shape).astype(p.dtype) * 1e-2, params0)
        for i in range(steps)]
    for name, make in OPTIMIZERS.items():
        out = {}
        for use_kernel in (True, False):
            opt = make(use_kernel)

            @jax.jit
            def step(p, s, g, opt=opt):
                u, s = opt.update(g, s, p)
                return optax.apply_updates(p, u), s, u

            p, s = params0, opt.init(params0)
            first = None
            for i, g in enumerate(grads):
                p, s, u = step(p, s, g)
                if i == 0:
                    first = (u, s)
            out[use_kernel] = (first, p)
        opt = make(True)
        fused = jax.jit(optim.fused_apply(opt))
        p_a, s_a = params0, opt.init(params0)
        for g in grads:
            p_a, s_a = fused(g, s_a, p_a)
        (u_k, s_k), p_k = out[True]
        (u_j, s_j), p_j = out[False]
        qk, qj = _codes_and_scales(s_k), _codes_and_scales(s_j)
        mism = sum(int((a.codes != b.codes).sum()) for a, b in zip(qk, qj))
        total = sum(int(a.codes.size) for a in qk)
        drift = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                          / (jnp.max(jnp.abs(b.astype(jnp.float32) - c.astype(jnp.float32)))
                             + 1e-30))
                    for a, b, c in zip(jax.tree.leaves(p_k), jax.tree.leaves(p_j),
                                       jax.tree.leaves(params0)))
        rows.append(dict(
            kernel="optimizer", case=name,
            code_mismatch=mism, codes=total,
            absmax_equal=all(bool((a.absmax == b.absmax).all()) for a, b in zip(qk, qj)),
            update_max_ulps=max(_ulps(a, b) for a, b in zip(jax.tree.leaves(u_k),
                                                            jax.tree.leaves(u_j))),
            steps=steps, param_drift_rel=drift,
            apply_vs_update_max_ulps=max(_ulps(a, b) for a, b in zip(jax.tree.leaves(p_a),
                                                                     jax.tree.leaves(p_k)))))
    return rows


def to_table(rows):
    lines = ["| kernel | case | codes differing | absmax equal | other |", "|---|---|---:|---|---|"]
    for r in rows:
        other = ("dequantized equal" if r.get("dequant_equal") else "DEQUANTIZED DIFFER") \
            if r["kernel"] == "quantize" else (
            f"step-1 update: max {r['update_max_ulps']} ulp; after {r['steps']} steps: "
            f"max |p_kernel - p_jnp| = {r['param_drift_rel']:.2e} x max |p - p0|; fused_apply "
            f"vs kernel update + apply_updates: max {r['apply_vs_update_max_ulps']} ulp")
        lines.append(f"| {r['kernel']} | {r['case']} | {r['code_mismatch']} / {r['codes']} | "
                     f"{r['absmax_equal']} | {other} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny cases, interpret mode on CPU")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    gpu = jax.default_backend() == "gpu"
    if not gpu and not args.quick:
        sys.exit("check_kernels: no GPU; pass --quick to check the script in interpret mode")
    key = jax.random.key(args.seed)
    interpret = not gpu
    steps = 3 if args.quick else args.steps
    rows = check_quantize(QUICK_QUANT if args.quick else QUANT_CASES, key, interpret)
    rows += check_optimizers(jax.random.fold_in(key, 1), steps, args.quick)
    dev = jax.devices()[0]
    meta = dict(device=f"{dev.platform} ({dev.device_kind})", jax=jax.__version__,
                interpret=interpret, seed=args.seed)
    print(f"device: {meta['device']}; jax {meta['jax']}; interpret={interpret}")
    print(to_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
