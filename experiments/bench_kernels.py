"""Fused Pallas 8-bit AdamW step vs optax.adamw, the jnp 8-bit path and torchao (issue 6).

For one parameter leaf of N elements (100M to 1B on a GPU) this measures, in one run:

* the device's copy bandwidth: a jitted ``x + 1`` over a float32 array of N elements
  (``2 * 4 * N`` bytes moved: one read, one write);
* the step time (update + apply, params and state donated, as in a training loop) of
  ``optax.adamw`` (float32 moments), ``effjax.optim.adamw_8bit`` on its jnp path
  (``use_kernel=False``) and on the fused kernel (``use_kernel=True``), each as a ratio to
  ``optax.adamw``;
* the fused step's achieved bandwidth: the bytes it must move divided by its time. With
  float32 params and grads an 8-bit AdamW step reads the parameter (4 B), the gradient (4 B),
  two 1-byte codes and writes the parameter and the codes back: 16 B per element (absmax:
  2 floats per 256 elements, counted too); as a fraction of the copy bandwidth;
* the peer on the same GPU: torchao's ``AdamW8bit`` (its per-parameter step is
  ``torch.compile``d by torchao itself), when torch sees a CUDA device.

Targets (issue 6): >= 80% of copy bandwidth, 8-bit AdamW step <= 0.7x optax.adamw, faster than
torchao's 8-bit step. Only a GPU run measures them: without a GPU the script refuses to write
results unless ``--quick`` is given, and the quick run (tiny sizes; the kernel in interpret
mode on CPU) only proves that the script works. Its numbers say nothing about GPU speed.

Run (GPU):  python -m experiments.bench_kernels                 (100M, 300M, 1B elements)
            python -m experiments.bench_kernels --sizes 1e8,3e8
Quick:      python -m experiments.bench_kernels --quick          (run by the tests)
Writes experiments/results/bench_kernels{,_quick}.{json,md,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from effjax import optim

RESULTS = os.path.join(os.path.dirname(__file__), "results")
ROW = 4096  # the leaf is (N / ROW, ROW): a multiple of the 256-block on its last axis


def bytes_per_element_8bit(block_size: int = 256) -> float:
    """Bytes a fused float32 8-bit AdamW step must move per element: read p, g (4 + 4), two
    codes (2), write p and codes (4 + 2), and read + write two absmax per block."""
    return 16.0 + 2 * 2 * 4 / block_size


INNER = 5  # chained steps per timed sample: one host synchronization per INNER steps


def _timed(fn, args, reps):
    """Median seconds per call of ``fn(*args)`` chained (``fn`` returns new args), after one
    warm-up; each of the ``reps`` samples times INNER calls and one synchronization."""
    args = fn(*args)
    jax.block_until_ready(args)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(INNER):
            args = fn(*args)
        jax.block_until_ready(args)
        times.append((time.perf_counter() - t0) / INNER)
    return float(np.median(times))


def copy_seconds(n: int, reps: int) -> float:
    """Median time of a jitted float32 ``x + 1`` (one read and one write of N elements)."""
    step = jax.jit(lambda x: (x + 1.0,), donate_argnums=0)  # x + 0 would be simplified away
    return _timed(step, (jnp.ones((n // ROW, ROW), jnp.float32),), reps)


def step_seconds(opt, n: int, reps: int) -> float:
    """Median time of one donated update + apply of ``opt`` on a (N / ROW, ROW) leaf."""
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p, s, g):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    p = jnp.zeros((n // ROW, ROW), jnp.float32)
    g = jnp.full((n // ROW, ROW), 1e-3, jnp.float32)
    # g is an argument, not donated and not returned (returning it would add a copy)
    return _timed(lambda p, s: step(p, s, g), (p, opt.init(p)), reps)


def apply_seconds(opt, n: int, reps: int) -> float:
    """Median time of one donated ``effjax.optim.fused_apply(opt)`` step (the kernel writes
    the new parameter itself) on a (N / ROW, ROW) leaf."""
    fused = optim.fused_apply(opt)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p, s, g):
        return fused(g, s, p)

    p = jnp.zeros((n // ROW, ROW), jnp.float32)
    g = jnp.full((n // ROW, ROW), 1e-3, jnp.float32)
    return _timed(lambda p, s: step(p, s, g), (p, opt.init(p)), reps)


def torchao_seconds(n: int, reps: int) -> float | None:
    """torchao ``AdamW8bit`` (compiled step) on the same size, or None without CUDA/torchao."""
    try:
        import torch
        from torchao.optim import AdamW8bit
    except Exception as e:  # noqa: BLE001 - report, do not hide
        print(f"torchao unavailable: {type(e).__name__}: {e}")
        return None
    if not torch.cuda.is_available():
        print("torch sees no CUDA device: no torchao figure")
        return None
    p = torch.nn.Parameter(torch.zeros(n // ROW, ROW, device="cuda"))
    p.grad = torch.full_like(p, 1e-3)
    opt = AdamW8bit([p], lr=1e-3)
    step = opt.step  # torchao compiles its per-parameter step itself (torch.compile)
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(INNER):
            step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / INNER)
    return float(np.median(times))


def sweep(n: int, reps: int, tiles=(1024, 2048, 4096, 8192), warps=(4, 8)):
    """Fused 8-bit AdamW step time on one N-element leaf per (tile elements, Triton warps)."""
    from pallas_kernels import blockwise as bw

    saved = bw._TILE_ELEMS, bw.NUM_WARPS
    rows = []
    try:
        for t in tiles:
            for w in warps:
                bw._TILE_ELEMS, bw.NUM_WARPS = t, w
                sec = apply_seconds(optim.adamw_8bit(1e-3, use_kernel=True), n, reps)
                rows.append(dict(tile_elems=t, num_warps=w, ms=sec * 1e3,
                                 gbs=bytes_per_element_8bit() * n / sec / 1e9))
                print(f"sweep tile={t} warps={w}: {sec * 1e3:.3f} ms", flush=True)
    finally:
        bw._TILE_ELEMS, bw.NUM_WARPS = saved
    return rows


#: A transformer-shaped tree for the many-leaves comparison: LAYERS x (4 d x d attention
#: kernels, d x 4d and 4d x d MLP kernels), d = D.
LAYERS, D = 12, 1024


def _layer_shapes():
    return [(D, D)] * 4 + [(D, 4 * D), (4 * D, D)]


def multi_leaf(reps: int):
    """Per-leaf kernel launches vs one launch over the concatenated leaves (a flattened batch,
    state kept per leaf, so the concatenation and the split are paid at every step) vs one
    leaf of the same total size (the flattened launch without its copies: a lower bound)."""
    from effjax.quant import dynamic_codebook, quantize_blockwise
    from pallas_kernels.optim_update import adam_rule, fused_update

    shapes = _layer_shapes() * LAYERS
    key = jax.random.key(0)
    ps = [jax.random.normal(jax.random.fold_in(key, i), s) * 0.02 for i, s in enumerate(shapes)]
    gs = [jnp.full(s, 1e-3, jnp.float32) for s in shapes]

    def q(x, signed):
        return quantize_blockwise(x, codebook=dynamic_codebook(signed=signed), block_size=256)

    ms = [(q(g, True), q(g * g, False)) for g in gs]
    sc = dict(b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, wd=0.01, lr=-1e-3,
              bc1=jnp.float32(0.1), bc2=jnp.float32(0.001))

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def per_leaf(ps, ms, gs):
        out_p, out_m = [], []
        for p, m, g in zip(ps, ms, gs):
            u, new = fused_update(adam_rule, g, p, m, sc)
            out_p.append(p + u)
            out_m.append(new)
        return out_p, out_m

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def flattened(ps, ms, gs):
        sizes = [p.size for p in ps]
        cat = lambda xs: jnp.concatenate([x.reshape(-1) for x in xs])  # noqa: E731
        flat_m = tuple(
            dataclasses.replace(ms[0][k], codes=cat([m[k].codes for m in ms]),
                              absmax=cat([m[k].absmax for m in ms]),
                              shape=(sum(sizes),)) for k in range(2))
        u, new = fused_update(adam_rule, cat(gs), cat(ps), flat_m, sc)
        offs = np.cumsum([0] + sizes)
        boffs = offs // 256
        out_p = [p + u[a:b].reshape(p.shape) for p, a, b in zip(ps, offs[:-1], offs[1:])]
        out_m = [tuple(dataclasses.replace(new[k], codes=new[k].codes[a:b].reshape(p.shape),
                                       absmax=new[k].absmax[c:d].reshape(m[k].absmax.shape),
                                       shape=p.shape) for k in range(2))
                 for p, m, a, b, c, d in zip(ps, ms, offs[:-1], offs[1:], boffs[:-1], boffs[1:])]
        return out_p, out_m

    total = sum(int(np.prod(s)) for s in shapes)
    t_leaf = _timed(lambda ps, ms: per_leaf(ps, ms, gs), (ps, ms), reps)
    ps = [jax.random.normal(jax.random.fold_in(key, i), s) * 0.02 for i, s in enumerate(shapes)]
    ms = [(q(g, True), q(g * g, False)) for g in gs]
    t_flat = _timed(lambda ps, ms: flattened(ps, ms, gs), (ps, ms), reps)
    one = (total // ROW, ROW)
    g1 = jnp.full(one, 1e-3, jnp.float32)
    t_one = _timed(lambda ps, ms: per_leaf(ps, ms, [g1]),
                   ([jnp.zeros(one)], [(q(g1, True), q(g1 * g1, False))]), reps)
    row = dict(leaves=len(shapes), elements=total, per_leaf_ms=t_leaf * 1e3,
               flattened_ms=t_flat * 1e3, one_leaf_ms=t_one * 1e3)
    print("multi-leaf " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in row.items()), flush=True)
    return row


def _or_oom(fn):
    """``fn()``, or None (printed) when the device runs out of memory."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - jax and torch raise different OOM types
        if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e):
            raise
        print(f"out of memory: {str(e).splitlines()[0][:160]}", flush=True)
        return None


def run(sizes, reps, peers=True):
    rows = []
    for n in sizes:
        n = int(n) // ROW * ROW
        copy = copy_seconds(n, reps)
        copy_bw = 2 * 4 * n / copy
        base = step_seconds(optax.adamw(1e-3), n, reps)
        fused_upd = step_seconds(optim.adamw_8bit(1e-3, use_kernel=True), n, reps)
        fused = apply_seconds(optim.adamw_8bit(1e-3, use_kernel=True), n, reps)
        jnp8 = _or_oom(lambda n=n: step_seconds(optim.adamw_8bit(1e-3, use_kernel=False), n, reps))
        fused_bw = bytes_per_element_8bit() * n / fused
        tao = _or_oom(lambda n=n: torchao_seconds(n, reps)) if peers else None
        row = dict(elements=n, copy_ms=copy * 1e3, copy_gbs=copy_bw / 1e9,
                   adamw_ms=base * 1e3, jnp8_ms=None if jnp8 is None else jnp8 * 1e3,
                   fused_update_ms=fused_upd * 1e3, fused_update_vs_adamw=fused_upd / base,
                   fused_ms=fused * 1e3,
                   fused_gbs=fused_bw / 1e9, fused_frac_copy=fused_bw / copy_bw,
                   fused_vs_adamw=fused / base,
                   fused_vs_jnp8=None if jnp8 is None else fused / jnp8,
                   jnp8_vs_adamw=None if jnp8 is None else jnp8 / base,
                   torchao_ms=None if tao is None else tao * 1e3,
                   fused_vs_torchao=None if tao is None else fused / tao)
        rows.append(row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in row.items()), flush=True)
    return rows


def to_markdown(rows, meta):
    lines = [f"Device: {meta['device']}; jax {meta['jax']}; command: `{meta['command']}`", ""]
    if meta["quick"]:
        lines += ["**Quick run (CPU, kernel in interpret mode): proves the script runs; these "
                  "numbers are not GPU figures and say nothing about kernel speed.**", ""]
    lines += ["| elements | copy GB/s | fused GB/s | fused / copy BW | fused / optax.adamw | "
              "fused update + apply_updates / optax.adamw | fused / jnp 8-bit | "
              "jnp 8-bit / optax.adamw | fused / torchao |",
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def ratio(v):
        return "n/a (out of memory)" if v is None else f"{v:.2f}x"

    for r in rows:
        tao = "n/a" if r["fused_vs_torchao"] is None else f"{r['fused_vs_torchao']:.2f}x"
        lines.append(f"| {r['elements']:,} | {r['copy_gbs']:.1f} | {r['fused_gbs']:.1f} | "
                     f"{r['fused_frac_copy']:.0%} | {r['fused_vs_adamw']:.2f}x | "
                     f"{r['fused_update_vs_adamw']:.2f}x | "
                     f"{ratio(r['fused_vs_jnp8'])} | {ratio(r['jnp8_vs_adamw'])} | {tao} |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["elements"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(xs, [r["fused_frac_copy"] for r in rows], "o-", label="fused 8-bit AdamW")
    axes[0].axhline(0.8, color="k", ls="--", lw=0.8, label="target 80%")
    axes[0].set_title("achieved / copy bandwidth")
    for key, label in (("fused_vs_adamw", "fused 8-bit (fused_apply)"),
                       ("fused_update_vs_adamw", "fused 8-bit (update + apply_updates)"),
                       ("jnp8_vs_adamw", "jnp 8-bit")):
        axes[1].plot(xs, [np.nan if r[key] is None else r[key] for r in rows], "o-",
                     label=label)
    axes[1].axhline(0.7, color="k", ls="--", lw=0.8, label="target 0.7x")
    axes[1].set_title("step time / optax.adamw")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("elements")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes on any device (CPU: interpret mode); not GPU figures")
    ap.add_argument("--sizes", default="1e8,3e8,1e9", help="comma-separated element counts")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-peers", action="store_true", help="skip torchao")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--sweep", action="store_true",
                    help="also time tile sizes x Triton warps at the first size")
    ap.add_argument("--multi-leaf", action="store_true",
                    help="also compare per-leaf launches with one flattened launch")
    args = ap.parse_args(argv)
    gpu = jax.default_backend() == "gpu"
    if not gpu and not args.quick:
        sys.exit("bench_kernels: no GPU (jax.default_backend() is "
                 f"{jax.default_backend()!r}); the issue's figures are GPU figures. Run it on "
                 "an H100/H200, or pass --quick to check that the script works.")
    sizes = [float(s) for s in args.sizes.split(",")]
    if args.quick:
        sizes, args.reps = [2 * ROW, 4 * ROW], 2
    sweep_rows = sweep(int(sizes[0]) // ROW * ROW, args.reps) if args.sweep else None
    leaf_row = multi_leaf(args.reps) if args.multi_leaf else None
    rows = run(sizes, args.reps, peers=not args.no_peers and gpu)
    dev = jax.devices()[0]
    meta = dict(device=f"{dev.platform} ({dev.device_kind})", jax=jax.__version__,
                quick=args.quick, command="python -m experiments.bench_kernels"
                + (" --quick" if args.quick else f" --sizes {args.sizes}"))
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "bench_kernels" + ("_quick" if args.quick else ""))
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows, sweep=sweep_rows, multi_leaf=leaf_row), f,
                  indent=1)
    md = to_markdown(rows, meta)
    with open(stem + ".md", "w") as f:
        f.write(md)
    plot(rows, stem + ".png")
    print(md)
    return rows


if __name__ == "__main__":
    main()
