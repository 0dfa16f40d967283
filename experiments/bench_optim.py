"""Optimizer-state memory and step time of effjax's low-bit optimizers vs ``optax.adamw``.

For transformer-shaped parameter trees of about 1M, 10M and 50M parameters this prints, per
optimizer: state bytes per parameter and the jitted step time (update + apply, params and state
donated, as in a training loop; median of ``--reps`` steps, the optimizers stepping in turn so
that load drift hits them alike) as a ratio to ``optax.adamw`` measured in the same run. For
reference it also times the CPU peers on the same shapes: torch's fp32 AdamW, bitsandbytes'
``AdamW8bit`` (native CPU kernel) and torchao's ``AdamW8bit`` / ``AdamW4bit`` (torch.compile),
each as a ratio to torch's AdamW. GaLore and Fira (rank: ``galore_rank``) are timed on steps
without a projector refresh: their SVD runs once every 200 steps, here on the untimed first step.
``adamw_8bit`` is the default path (on a single-device CPU: the native C++ fused step,
``pallas_kernels/native_cpu.py``, for every quantized float32 leaf whose blocks are whole rows),
timed as ``update`` + ``optax.apply_updates``; ``adamw_8bit (fused_apply)`` is the same
optimizer through ``effjax.optim.fused_apply``, where the kernel writes the parameters itself
(no update array goes through memory); ``adamw_8bit (unfused)`` forces the unfused jnp step
(``use_kernel=False``) everywhere. The ``(bf16 scales)`` rows store block scales as bfloat16
(``scale_dtype=jnp.bfloat16``). The Markdown output ends with the state bytes of every low-bit
row split into codes, scales, float32 leaves and other (``optim.state_bytes_breakdown``).

Real models: ``MiniLM-L6`` (all-MiniLM-L6-v2's tree, hidden size 384, random values) is timed
like the synthetic trees; its rows of 384 are not whole blocks of 256, so it exercises the
grouped-row layout (``effjax.quant.block_view``). A last table gives the state bytes of the
low-bit rows on MiniLM-L6, SmolLM2-135M and LLaMA-2-7B (``experiments/model_trees.py``; shapes
only, ``jax.eval_shape``), next to the same tree in the anchors' flat-block layout.

Run:  python -m experiments.bench_optim            (full, ~12 min on 2 CPU cores)
      python -m experiments.bench_optim --quick    (tiny tree, QUICK_ROWS; run by the tests)
      python -m experiments.bench_optim --grads-in-step   (the step computes its gradients,
                                                           materialized as a backward pass's
                                                           are: adamw, adamw_8bit, fused_apply,
                                                           adamw_4bit; ~2 min)
Writes experiments/results/bench_optim.{json,md,png} (``--out`` picks another folder). glibc's
``MALLOC_*`` / ``GLIBC_TUNABLES`` settings in the environment are recorded with the command.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import platform
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from effjax import optim
from effjax.optim import fira_adamw, galore_adamw
from effjax.quant import QuantizedArray
from experiments import model_trees

RESULTS = os.path.join(os.path.dirname(__file__), "results")

SIZES = {  # name: (vocab, d_model, layers, heads)
    "1M": (256, 128, 5, 4),
    "10M": (2048, 256, 12, 4),
    "50M": (8192, 512, 15, 8),
}


def transformer_tree(vocab, d, layers, heads, key=0):
    """Flax-Linen-shaped decoder params: attention kernels are (d, heads, head_dim)."""
    hd = d // heads
    shapes = {"embed": {"embedding": (vocab, d)}, "ln_f": {"scale": (d,), "bias": (d,)}}
    for i in range(layers):
        shapes[f"block_{i}"] = {
            "ln_1": {"scale": (d,), "bias": (d,)},
            "attn": {"query": {"kernel": (d, heads, hd)}, "key": {"kernel": (d, heads, hd)},
                     "value": {"kernel": (d, heads, hd)}, "out": {"kernel": (heads, hd, d)}},
            "ln_2": {"scale": (d,), "bias": (d,)},
            "mlp": {"up": {"kernel": (d, 4 * d), "bias": (4 * d,)},
                    "down": {"kernel": (4 * d, d), "bias": (d,)}},
        }
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
    keys = jax.random.split(jax.random.PRNGKey(key), len(leaves))
    arrays = [jax.random.normal(k, s, jnp.float32) * 0.02 for k, s in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, arrays)


def galore_rank(d_model):
    """GaLore/Fira rank for a tree of width ``d_model``: 128 (the paper's smallest) from
    d = 256 up, else d / 4. Plain ``galore_adamw`` projects only 2-D leaves: the tree's 3-D
    attention kernels, vectors and matrices no wider than the rank keep full Adam moments;
    the ``+einsum`` rows also project the attention kernels (``row_axes``)."""
    return 128 if d_model is None or d_model >= 256 else max(1, d_model // 4)


def einsum_row_axes(params):
    """``row_axes`` for :func:`transformer_tree`: attention input kernels ``(d, heads,
    head_dim)`` have 1 row axis, the output kernel ``(heads, head_dim, d)`` 2."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: (2 if "'out'" in jax.tree_util.keystr(path) else 1) if x.ndim == 3
        else None, params)


class FusedApply(NamedTuple):
    """An optimizer timed through ``effjax.optim.fused_apply`` (one call for update + apply)."""

    opt: optax.GradientTransformation


def optimizers(d_model=None):
    lr = 1e-3
    rank = galore_rank(d_model)
    return {
        "optax.adamw": optax.adamw(lr),
        "adamw_8bit": optim.adamw_8bit(lr),
        "adamw_8bit (fused_apply)": FusedApply(optim.adamw_8bit(lr)),
        "adamw_8bit (unfused)": optim.adamw_8bit(lr, use_kernel=False),
        "adamw_4bit": optim.adamw_4bit(lr),
        "adamw_8bit (bf16 scales)": optim.adamw_8bit(lr, scale_dtype=jnp.bfloat16),
        "adamw_4bit (bf16 scales)": optim.adamw_4bit(lr, scale_dtype=jnp.bfloat16),
        "lion_8bit": optim.lion_8bit(lr),
        "sgd_8bit": optim.sgd_8bit(lr),
        "rmsprop_8bit": optim.rmsprop_8bit(lr),
        "adagrad_8bit": optim.adagrad_8bit(lr),
        "ademamix_8bit": optim.ademamix_8bit(lr),
        "galore_adamw": galore_adamw(lr, rank=rank),
        "fira_adamw": fira_adamw(lr, rank=rank),
        "galore_adamw+einsum": galore_adamw(lr, rank=rank, row_axes=einsum_row_axes),
        "fira_adamw+einsum": fira_adamw(lr, rank=rank, row_axes=einsum_row_axes),
    }


#: The rows of ``--quick`` (a smoke test of the script: every kind of row it reports, the
#: default, fused_apply, unfused, 4-bit, bfloat16-scale and low-rank rows, each compiled once;
#: the other 8-bit rows are the same ``quantize_state`` step with another optax inner, checked
#: by the optimizer conformance table).
QUICK_ROWS = ("optax.adamw", "adamw_8bit", "adamw_8bit (fused_apply)", "adamw_8bit (unfused)",
              "adamw_4bit", "adamw_8bit (bf16 scales)", "adamw_4bit (bf16 scales)",
              "galore_adamw", "fira_adamw", "galore_adamw+einsum", "fira_adamw+einsum")


def grads_in_step(p, c):
    """Gradients made inside the step, as a training step's backward pass makes them: the
    gradient of ``sum(p * p * c) / 2``, i.e. ``p * c``, materialized (behind
    ``lax.optimization_barrier``) as a backward pass's matmuls materialize theirs, so that no
    optimizer can fuse its producer away: every optimizer reads it from a temporary buffer."""
    g = jax.grad(lambda p: sum(jnp.vdot(a * a, b) / 2 for a, b in
                               zip(jax.tree.leaves(p), jax.tree.leaves(c))))(p)
    return jax.lax.optimization_barrier(g)


def jax_stepper(opt, params, grads, in_step=False):
    """A compiled step of ``opt`` (params and state donated) and its state bytes: returns
    ``(one_step, by_kind)``, ``one_step()`` running one synchronised step and returning
    seconds, ``by_kind`` the state's bytes by kind (``optim.state_bytes_breakdown``).
    ``in_step``: the step computes its gradients (:func:`grads_in_step`) instead of taking
    ``grads`` as they are."""
    fused = None
    if isinstance(opt, FusedApply):
        opt, fused = opt.opt, optim.fused_apply(opt.opt)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p, s, g):
        g = grads_in_step(p, g) if in_step else g
        if fused is not None:
            return fused(g, s, p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    p = jax.tree.map(jnp.copy, params)
    s = opt.init(p)
    by_kind = optim.state_bytes_breakdown(s)
    state = list(step(p, s, grads))  # compile + first step
    jax.block_until_ready(state)

    def one_step():
        t0 = time.perf_counter()
        state[:] = step(*state, grads)
        jax.block_until_ready(state)
        return time.perf_counter() - t0

    return one_step, by_kind


def time_interleaved(opts, params, grads, reps, in_step=False):
    """Median step seconds and state bytes by kind of every optimizer in ``opts``; the optimizers
    step in turn (one step each, ``reps`` rounds) so that load drift on a shared machine hits
    them alike."""
    steppers = {name: jax_stepper(opt, params, grads, in_step) for name, opt in opts.items()}
    times = {name: [] for name in opts}
    for _ in range(reps):
        for name, (one_step, _) in steppers.items():
            times[name].append(one_step())
    return {name: (float(np.median(times[name])), steppers[name][1]) for name in opts}


def time_torch(params, grads, reps):
    """Median step seconds of the CPU peers on the same shapes (None when unavailable)."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    out = {}
    leaves = [np.asarray(x) for x in jax.tree.leaves(params)]
    gleaves = [np.asarray(x) for x in jax.tree.leaves(grads)]
    peers = {"torch.AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3)}
    try:
        import bitsandbytes as bnb
        peers["bnb.AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3)
    except Exception as e:  # noqa: BLE001 - report, do not hide
        print(f"bitsandbytes unavailable: {e}")
    try:
        import torchao.optim as tao
        peers["torchao.AdamW8bit"] = lambda ps: tao.AdamW8bit(ps, lr=1e-3)
        peers["torchao.AdamW4bit"] = lambda ps: tao.AdamW4bit(ps, lr=1e-3)
    except Exception as e:  # noqa: BLE001
        print(f"torchao unavailable: {e}")
    for name, make in peers.items():
        try:
            ps = [torch.nn.Parameter(torch.from_numpy(x.copy())) for x in leaves]
            for p, g in zip(ps, gleaves):
                p.grad = torch.from_numpy(g.copy())
            opt = make(ps)
            opt.step()
            opt.step()
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                opt.step()
                times.append(time.perf_counter() - t0)
            out[name] = float(np.median(times))
        except Exception as e:  # noqa: BLE001
            print(f"{name} failed on CPU: {type(e).__name__}: {str(e)[:200]}")
            out[name] = None
    return out


#: The rows of ``--grads-in-step``.
IN_STEP_ROWS = ("optax.adamw", "adamw_8bit", "adamw_8bit (fused_apply)", "adamw_4bit")


def run(sizes, reps, peers=True, in_step=False, rows_only=None):
    rows = []
    for size in sizes:
        if size in model_trees.MODELS:  # a real model's tree, random values
            params, d = model_trees.random_tree(size), model_trees.MODELS[size].hidden_size
        else:
            vocab, d, layers, heads = SIZES[size] if size in SIZES else size
            size = size if size in SIZES else "x".join(map(str, size))
            params = transformer_tree(vocab, d, layers, heads)
        n = sum(x.size for x in jax.tree.leaves(params))
        grads = jax.tree.map(lambda x: x * 0.01 + 1e-4, params)
        opts = optimizers(d)
        if in_step:
            opts = {k: opts[k] for k in IN_STEP_ROWS}
        elif rows_only is not None:
            opts = {k: opts[k] for k in rows_only}
        timed = time_interleaved(opts, params, grads, reps, in_step)
        base = timed["optax.adamw"][0]
        for name, (secs, by_kind) in timed.items():
            nbytes = sum(by_kind.values())
            rows.append(dict(size=str(size), params=n, optimizer=name, kind="jax",
                             bytes_per_param=nbytes / n, step_ms=secs * 1e3,
                             ratio=secs / base,
                             by_kind={k: v / n for k, v in by_kind.items()}))
            print(f"{size:>5} {name:18s} {nbytes / n:6.3f} B/param  {secs * 1e3:9.2f} ms  "
                  f"{secs / base:5.2f}x adamw", flush=True)
        if peers:
            tt = time_torch(params, grads, reps)
            tbase = tt.get("torch.AdamW")
            for name, secs in tt.items():
                if secs is None:
                    continue
                rows.append(dict(size=str(size), params=n, optimizer=name, kind="torch",
                                 bytes_per_param=None, step_ms=secs * 1e3,
                                 ratio=secs / tbase if tbase else None))
                print(f"{size:>5} {name:18s}   (peer)      {secs * 1e3:9.2f} ms  "
                      f"{secs / tbase:5.2f}x torch AdamW", flush=True)
    return rows


#: The rows of the real-model state table (the same optimizers as the timed rows).
STATE_ROWS = ("optax.adamw", "adamw_8bit", "adamw_8bit (bf16 scales)", "adamw_4bit",
              "adamw_4bit (bf16 scales)")


def flat_layout_bytes(shapes, bits, scale_bytes=4, block=None, min_size=4096):
    """State bytes of two Adam moments in bitsandbytes'/torchao's layout, written plainly:
    each tensor of at least ``min_size`` elements cut into flat blocks over all its elements
    (codes ``bits / 8`` bytes each, one scale per block), smaller ones two float32 moments.
    The step counter is not counted."""
    block = block or (256 if bits == 8 else 128)
    total = 0
    for x in jax.tree.leaves(shapes):
        n = int(np.prod(x.shape))
        total += (2 * (-(-n * bits // 8) + -(-n // block) * scale_bytes) if n >= min_size
                  else 8 * n)
    return total


def state_bytes_by_unique_leaf(opt, shapes):
    """``optim.state_bytes_breakdown(jax.eval_shape(opt.init, shapes))`` for an optimizer whose
    state is per leaf (every row of :data:`STATE_ROWS`: each leaf's moments depend only on its
    shape and dtype), traced on one leaf of each (shape, dtype) and multiplied by its count;
    leaves of no parameter (the step counter) are counted once. The same integers, from a few
    traced leaves instead of hundreds (``--quick``)."""
    counts = collections.Counter((tuple(x.shape), jnp.dtype(x.dtype))
                                 for x in jax.tree.leaves(shapes))
    one = {f"leaf{i}": jax.ShapeDtypeStruct(s, d) for i, (s, d) in enumerate(counts)}
    mult = {f"leaf{i}": c for i, c in enumerate(counts.values())}
    out = dict(codes=0, scales=0, float=0, other=0)
    state = jax.eval_shape(opt.init, one)
    for path, leaf in jax.tree_util.tree_flatten_with_path(
            state, is_leaf=lambda x: isinstance(x, QuantizedArray))[0]:
        keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey) and k.key in mult]
        for kind, v in optim.state_bytes_breakdown(leaf).items():
            out[kind] += v * (mult[keys[-1]] if keys else 1)
    return out


def model_state_bytes(names, unique_leaves=False):
    """State bytes per parameter on real models' trees (shapes only: ``jax.eval_shape`` of
    ``init``), by kind, with the flat-block layout of the anchors on the same tree.
    ``unique_leaves`` (``--quick``): through :func:`state_bytes_by_unique_leaf`."""
    opts = optimizers()
    rows = []
    for name in names:
        shapes = model_trees.param_shapes(name)
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
        for opt_name in STATE_ROWS:
            by_kind = (state_bytes_by_unique_leaf(opts[opt_name], shapes) if unique_leaves else
                       optim.state_bytes_breakdown(jax.eval_shape(opts[opt_name].init, shapes)))
            row = dict(model=name, params=n, optimizer=opt_name,
                       bytes_per_param=sum(by_kind.values()) / n,
                       by_kind={k: v / n for k, v in by_kind.items()}, flat_layout=None)
            if opt_name != "optax.adamw":
                bits = 8 if "8bit" in opt_name else 4
                flat = flat_layout_bytes(shapes, bits, 2 if "bf16" in opt_name else 4)
                row["flat_layout"] = (flat + by_kind["other"]) / n
            rows.append(row)
            print(f"{name:>13} {opt_name:26s} {row['bytes_per_param']:7.4f} B/param", flush=True)
    return rows


def to_markdown(rows, meta, model_rows=()):
    lines = [f"Machine: {meta['machine']}; jax {meta['jax']} on {meta['device']}; "
             f"command: `{meta['command']}`", "",
             "| size | params | optimizer | state B/param | step ms | ratio |",
             "| --- | ---: | --- | ---: | ---: | ---: |"]
    for r in rows:
        bpp = "" if r["bytes_per_param"] is None else f"{r['bytes_per_param']:.3f}"
        base = "adamw" if r["kind"] == "jax" else "torch AdamW"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x {base}"
        lines.append(f"| {r['size']} | {r['params']:,} | {r['optimizer']} | {bpp} | "
                     f"{r['step_ms']:.2f} | {ratio} |")
    lines += ["", "State bytes per parameter by kind (low-bit rows; `float`: state leaves kept in "
              "float32, tensors under `min_quantized_size` = 4096 elements):", "",
              "| size | optimizer | codes | scales | float | other | total |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        k = r.get("by_kind")
        if r["kind"] != "jax" or not k or not k["codes"]:
            continue
        lines.append(f"| {r['size']} | {r['optimizer']} | {k['codes']:.4f} | {k['scales']:.4f} "
                     f"| {k['float']:.4f} | {k['other']:.6f} | {r['bytes_per_param']:.4f} |")
    if model_rows:
        lines += ["", "State bytes per parameter on real models' parameter trees (shapes only; "
                  "`flat layout`: the same tree in bitsandbytes'/torchao's flat blocks, "
                  "written plainly, for comparison):", "",
                  "| model | params | optimizer | codes | scales | float | total | "
                  "flat layout |",
                  "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in model_rows:
            k = r["by_kind"]
            flat = "" if r["flat_layout"] is None else f"{r['flat_layout']:.4f}"
            lines.append(f"| {r['model']} | {r['params']:,} | {r['optimizer']} | "
                         f"{k['codes']:.4f} | {k['scales']:.4f} | {k['float']:.4f} | "
                         f"{r['bytes_per_param']:.4f} | {flat} |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    jrows = [r for r in rows if r["kind"] == "jax"]
    sizes = sorted({r["size"] for r in jrows}, key=lambda s: [r["params"] for r in jrows
                                                              if r["size"] == s][0])
    names = list(dict.fromkeys(r["optimizer"] for r in jrows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        vals = [next(r for r in jrows if r["size"] == s and r["optimizer"] == name)
                for s in sizes]
        xs = np.arange(len(sizes)) + k * width
        axes[0].bar(xs, [v["bytes_per_param"] for v in vals], width, label=name)
        axes[1].bar(xs, [v["ratio"] for v in vals], width, label=name)
    for ax, title in zip(axes, ["state bytes / param", "step time / optax.adamw"]):
        ax.set_xticks(np.arange(len(sizes)) + 0.4 - width / 2)
        ax.set_xticklabels(sizes)
        ax.set_title(title)
    axes[1].axhline(3.0, color="k", ls="--", lw=0.8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="tiny tree (1 layer), 2 repetitions, the QUICK_ROWS")
    ap.add_argument("--sizes", default="1M,10M,50M,MiniLM-L6",
                    help="comma-separated: 1M, 10M, 50M, or a model of experiments/model_trees.py")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--grads-in-step", action="store_true",
                    help="the step computes its gradients (grads_in_step); a few rows, no peers")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    sizes = [(64, 64, 1, 2)] if args.quick else args.sizes.split(",")
    rows = run(sizes, 2 if args.quick else args.reps,
               peers=not (args.no_peers or args.grads_in_step), in_step=args.grads_in_step,
               rows_only=QUICK_ROWS if args.quick else None)
    model_rows = [] if args.grads_in_step else model_state_bytes(list(model_trees.MODELS),
                                                                 unique_leaves=args.quick)
    # The allocator settings the process runs under (glibc reads them at start-up): they move
    # the `update` rows (the update temporary's fresh pages; experiments/README.md).
    env = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items())
                   if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES")
    command = " ".join(["python -m experiments.bench_optim", *(argv if argv is not None
                                                                 else sys.argv[1:])])
    meta = dict(machine=f"{platform.machine()} {os.cpu_count()} cores",
                jax=jax.__version__, device=str(jax.devices()[0].device_kind),
                command=(env + " " + command).strip())
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "bench_optim" + ("_grads_in_step" if args.grads_in_step else "")
                        + ("_quick" if args.quick else ""))
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows, model_rows=model_rows), f, indent=1)
    md = to_markdown(rows, meta, model_rows)
    with open(stem + ".md", "w") as f:
        f.write(md)
    plot(rows, stem + ".png")
    print(md)
    return rows


if __name__ == "__main__":
    main()
