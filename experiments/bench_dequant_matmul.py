"""QLoRA forward: the Pallas dequant-matmul kernel vs XLA's dequantize-then-dot vs a bf16 matmul.

For a linear layer ``y = x W (+ s (x A) B)`` with ``W`` (K, N) stored in bitsandbytes' 4-bit
layout (NF4 codes packed two a byte, one float32 absmax per 64 elements: about 0.56 bytes per
weight instead of bf16's 2), this times, in one run and on the same device, at batch (rows of
``x``) 1, 16 and 256:

* ``dense``: ``x @ W`` with ``W`` already dense in bfloat16 (the speed a 4-bit layer competes
  with; its weight takes 3.6x the memory);
* ``kernel``: :func:`pallas_kernels.dequant_matmul.dequant_matmul` (codes dequantized tile by
  tile in registers), and ``kernel+lora`` with a rank-16 LoRA term fused in its epilogue;
* ``xla``: :func:`~pallas_kernels.dequant_matmul.dequant_matmul_reference` (XLA dequantizes
  the whole ``W`` into a temporary, then ``jnp.dot``), and ``xla+lora``;

each as a ratio to ``dense`` in the same run (median of ``--reps`` samples of 5 calls each, one
synchronization per sample). It also records the kernel's achieved bandwidth (bytes it must
read and write / time: the binding limit at batch 1), the temporary memory XLA reports for the
compiled ``kernel`` and ``xla`` programs (``compiled.memory_analysis()``: the ``xla`` path
allocates the dense weight), and checks the kernel against the reference on the same inputs
(the summation-order bound of ``tests/pallas_kernels/test_dequant_matmul.py`` plus one bf16
rounding of the output).

Shapes (K, N): 4096 x 4096 (a 7B model's attention projection) and 576 x 1536 (SmolLM2-135M's
MLP up-projection). These are GPU figures: without a GPU the script refuses to run unless
``--quick`` is given; the quick run (tiny shapes, the kernel in interpret mode on CPU) only
proves that the script works and that the kernel agrees with the reference. Its timings say
nothing about kernel speed.

Run (GPU):  python -m experiments.bench_dequant_matmul
Quick:      python -m experiments.bench_dequant_matmul --quick   (run by the tests)
Writes experiments/results/bench_dequant_matmul{,_quick}.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from effjax.quant import nf4_codebook
from pallas_kernels.dequant_matmul import (
    dequant_matmul,
    dequant_matmul_reference,
    dequantize_4bit_weight,
)

RESULTS = os.path.join(os.path.dirname(__file__), "results")
INNER = 5  # calls per timed sample (one host synchronization per sample)
METHODS = ("dense", "kernel", "kernel+lora", "xla", "xla+lora")
U32 = 2.0**-24
COLUMNS = ("K", "N", "batch", "dense_ms", "kernel_ms", "kernel_lora_ms", "xla_ms", "xla_lora_ms",
           "kernel_vs_dense", "kernel_lora_vs_dense", "xla_vs_dense", "xla_lora_vs_dense",
           "kernel_gbs", "kernel_temp_mib", "xla_temp_mib", "max_abs_err", "within_bound")


def _timed(fn, args, reps):
    """Median seconds per call of ``fn(*args)`` over ``reps`` samples of INNER calls."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(INNER):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / INNER)
    return float(np.median(times))


def _temp_mib(compiled):
    """Temporary bytes (MiB) XLA allocates for a compiled program, or None."""
    try:
        mem = compiled.memory_analysis()
        return None if mem is None else mem.temp_size_in_bytes / 2**20
    except Exception as e:  # noqa: BLE001 - some backends have no memory analysis
        print(f"no memory analysis: {type(e).__name__}: {e}")
        return None


def kernel_bytes(m, k, n, block_size, r=0):
    """Bytes the kernel must move: codes (K N / 2), absmax (4 K N / bs), bf16 x and y, and with
    LoRA the bf16 (x A) and B."""
    return k * n / 2 + 4 * k * n / block_size + 2 * m * k + 2 * m * n + 2 * (m * r + r * n)


def operands(m, k, n, block_size, rank, seed=0):
    """bf16 ``x`` (m, k), random NF4 codes and absmax for ``W`` (k, n), LoRA factors."""
    key = jax.random.key(seed)
    kx, kc, ka, kla, klb = jax.random.split(key, 5)
    return dict(
        x=jax.random.normal(kx, (m, k), jnp.bfloat16),
        codes=jax.random.randint(kc, (n, k // 2), 0, 256, jnp.int32).astype(jnp.uint8),
        absmax=jax.random.uniform(ka, (n, k // block_size), jnp.float32, 0.01, 0.05),
        table=jnp.asarray(nf4_codebook(), jnp.float32),
        lora_a=(jax.random.normal(kla, (k, rank)) * 0.01).astype(jnp.bfloat16),
        lora_b=(jax.random.normal(klb, (rank, n)) * 0.01).astype(jnp.bfloat16))


def _check(y, ref, ops, block_size, scale):
    """max |kernel - reference| and whether it is within 2 gamma_{K+r+1} (|x||W| + s|xA||B|)
    plus one bf16 rounding of each output (both outputs are bf16)."""
    yk = np.asarray(y, np.float64)
    yr = np.asarray(ref, np.float64)
    x = np.abs(np.asarray(ops["x"], np.float64))
    w = np.abs(np.asarray(dequantize_4bit_weight(ops["codes"], ops["absmax"], ops["table"],
                                                 block_size=block_size, dtype=jnp.bfloat16),
                          np.float64))
    xa = np.abs(np.asarray(jnp.dot(ops["x"], ops["lora_a"], preferred_element_type=jnp.float32)
                           .astype(jnp.bfloat16), np.float64))
    mag = x @ w + abs(scale) * xa @ np.abs(np.asarray(ops["lora_b"], np.float64))
    n_terms = x.shape[1] + xa.shape[1] + 1
    bound = 2 * n_terms * U32 / (1 - n_terms * U32) * mag + 2.0**-8 * (np.abs(yk) + np.abs(yr))
    err = np.abs(yk - yr)
    return float(err.max()), bool(np.all(err <= bound))


def run(shapes, batches, *, block_size, rank, reps, interpret):
    rows = []
    scale = 2.0  # LoRA alpha / r
    for k, n in shapes:
        for m in batches:
            ops = operands(m, k, n, block_size, rank)
            base = (ops["x"], ops["codes"], ops["absmax"], ops["table"])
            lora = base + (ops["lora_a"], ops["lora_b"])
            w_dense = dequantize_4bit_weight(ops["codes"], ops["absmax"], ops["table"],
                                             block_size=block_size, dtype=jnp.bfloat16)
            fns = {
                "dense": (jax.jit(lambda x, w: jnp.dot(x, w)), (ops["x"], w_dense)),
                "kernel": (jax.jit(lambda x, c, a, t: dequant_matmul(
                    x, c, a, t, block_size=block_size, interpret=interpret)), base),
                "kernel+lora": (jax.jit(lambda x, c, a, t, la, lb: dequant_matmul(
                    x, c, a, t, block_size=block_size, lora_a=la, lora_b=lb, lora_scale=scale,
                    interpret=interpret)), lora),
                "xla": (jax.jit(lambda x, c, a, t: dequant_matmul_reference(
                    x, c, a, t, block_size=block_size)), base),
                "xla+lora": (jax.jit(lambda x, c, a, t, la, lb: dequant_matmul_reference(
                    x, c, a, t, block_size=block_size, lora_a=la, lora_b=lb,
                    lora_scale=scale)), lora),
            }
            # compiled once: timed, and asked for its memory
            fns = {name: (fn.lower(*args).compile(), args) for name, (fn, args) in fns.items()}
            sec = {name: _timed(fn, args, reps) for name, (fn, args) in fns.items()}
            y = fns["kernel+lora"][0](*lora)
            ref = fns["xla+lora"][0](*lora)
            err, ok = _check(y, ref, ops, block_size, scale)
            row = dict(K=k, N=n, batch=m, block_size=block_size, rank=rank,
                       dense_ms=sec["dense"] * 1e3, kernel_ms=sec["kernel"] * 1e3,
                       kernel_lora_ms=sec["kernel+lora"] * 1e3, xla_ms=sec["xla"] * 1e3,
                       xla_lora_ms=sec["xla+lora"] * 1e3,
                       kernel_vs_dense=sec["kernel"] / sec["dense"],
                       kernel_lora_vs_dense=sec["kernel+lora"] / sec["dense"],
                       xla_vs_dense=sec["xla"] / sec["dense"],
                       xla_lora_vs_dense=sec["xla+lora"] / sec["dense"],
                       kernel_gbs=kernel_bytes(m, k, n, block_size) / sec["kernel"] / 1e9,
                       kernel_temp_mib=_temp_mib(fns["kernel"][0]),
                       xla_temp_mib=_temp_mib(fns["xla"][0]),
                       max_abs_err=err, ref_max_abs=float(jnp.max(jnp.abs(
                           ref.astype(jnp.float32)))), within_bound=ok)
            rows.append(row)
            print(" ".join(f"{c}={row[c]:.4g}" if isinstance(row[c], float) else
                           f"{c}={row[c]}" for c in COLUMNS), flush=True)
    return rows


def _mib(v):
    return "n/a" if v is None else f"{v:.1f}"


def to_markdown(rows, meta):
    lines = [f"Device: {meta['device']}; jax {meta['jax']}; command: `{meta['command']}`",
             f"NF4, block {meta['block_size']}, LoRA rank {meta['rank']}, bf16 activations; "
             "ratios are time / dense bf16 matmul in the same run (lower is faster).", ""]
    if meta["quick"]:
        lines += ["**Quick run (CPU, kernel in interpret mode): proves the script runs and the "
                  "kernel agrees with the reference; these numbers are not GPU figures and say "
                  "nothing about kernel speed.**", ""]
    lines += ["| K x N | batch | dense bf16 ms | kernel / dense | kernel+LoRA / dense | "
              "XLA dequant+dot / dense | XLA+LoRA / dense | kernel GB/s | temp MiB kernel / "
              "XLA | max abs err (within bound) |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['K']} x {r['N']} | {r['batch']} | {r['dense_ms']:.4f} | "
                     f"{r['kernel_vs_dense']:.2f}x | {r['kernel_lora_vs_dense']:.2f}x | "
                     f"{r['xla_vs_dense']:.2f}x | {r['xla_lora_vs_dense']:.2f}x | "
                     f"{r['kernel_gbs']:.1f} | {_mib(r['kernel_temp_mib'])} / "
                     f"{_mib(r['xla_temp_mib'])} | {r['max_abs_err']:.3g} "
                     f"({'yes' if r['within_bound'] else 'NO'}) |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["K"], r["N"]) for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4), squeeze=False)
    for ax, (k, n) in zip(axes[0], shapes):
        sub = [r for r in rows if (r["K"], r["N"]) == (k, n)]
        xs = [r["batch"] for r in sub]
        for key, label in (("kernel_vs_dense", "Pallas kernel"),
                           ("kernel_lora_vs_dense", "Pallas kernel + LoRA"),
                           ("xla_vs_dense", "XLA dequantize + dot"),
                           ("xla_lora_vs_dense", "XLA dequantize + dot + LoRA")):
            ax.plot(xs, [r[key] for r in sub], "o-", label=label)
        ax.axhline(1.0, color="k", ls="--", lw=0.8, label="dense bf16 matmul")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (rows of x)")
        ax.set_ylabel("time / dense bf16")
        ax.set_title(f"K x N = {k} x {n}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parse_shapes(text):
    return [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="tiny shapes on any device (CPU: interpret mode); not GPU figures")
    ap.add_argument("--shapes", default="4096x4096,576x1536", help="KxN,KxN,...")
    ap.add_argument("--batches", default="1,16,256")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    dev = jax.devices()[0]
    device = f"{dev.platform} ({dev.device_kind})"
    print(f"device: {device}; jax {jax.__version__}", flush=True)
    gpu = jax.default_backend() == "gpu"
    if not gpu and not args.quick:
        sys.exit("bench_dequant_matmul: no GPU (jax.default_backend() is "
                 f"{jax.default_backend()!r}); Pallas only interprets on a CPU, so its timings "
                 "there are no kernel figures. Run it on an H100/H200, or pass --quick to check "
                 "that the script works.")
    shapes = _parse_shapes(args.shapes)
    batches = [int(b) for b in args.batches.split(",")]
    if args.quick:
        shapes, args.reps, args.rank = [(128, 64)], 2, 4
    if not gpu:
        print("NOT GPU FIGURES: the kernel runs in interpret mode on this CPU; the timings "
              "below only show that the script works.", flush=True)
    rows = run(shapes, batches, block_size=args.block_size, rank=args.rank, reps=args.reps,
               interpret=None)
    meta = dict(device=device, jax=jax.__version__, quick=args.quick, gpu=gpu,
                block_size=args.block_size, rank=args.rank, reps=args.reps, inner=INNER,
                command="python -m experiments.bench_dequant_matmul"
                + (" --quick" if args.quick else f" --shapes {args.shapes} --batches "
                   f"{args.batches}"))
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "bench_dequant_matmul" + ("_quick" if args.quick else ""))
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    md = to_markdown(rows, meta)
    with open(stem + ".md", "w") as f:
        f.write(md)
    plot(rows, stem + ".png")
    print(md)
    return rows


if __name__ == "__main__":
    main()
