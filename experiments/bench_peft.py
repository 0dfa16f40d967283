"""Fine-tuning all-MiniLM-L6-v2: full fine-tuning vs LoRA via ``materialize`` vs the LoRA fast path.

The real all-MiniLM-L6-v2 weights (22.7 M parameters, :func:`effjax.models.minilm.load_minilm`)
plus a new linear classifier head on the mean-pooled tokens, trained on token batches with a
cross-entropy loss. Three methods, compiled and timed in the same run:

* ``full_ft``: every parameter trainable (embeddings included), ``optax.adamw``.
* ``lora_materialize``: LoRA rank 8, alpha 16 on every linear kernel of the six blocks
  (query, key, value, attention_out, intermediate, output; PEFT's ``target_modules="all-linear"``
  minus the pooler), the head fully trained (``Unfreeze``), the rest frozen; the model runs on
  ``materialize(combine(trainable, frozen))`` (dense :math:`W + sAB` per kernel).
* ``lora_fast``: the same adapters and optimizer, the model's ``nnx.Linear`` layers converted by
  :func:`effjax.nn.adapted_layers`, so each layer computes :math:`xW + (xA)(sB)` and the
  backward pass never forms an :math:`n_{in} \\times n_{out}` tensor besides the frozen ``W``.

Reported per method: trainable parameters, optimizer-state bytes (:func:`effjax.optim.state_bytes`),
XLA's memory accounting of the compiled train step (``compile().memory_analysis()``: argument,
output, aliased (donated) and temporary bytes; peak = argument + output - alias + temp, the
buffers live during one step; it works on CPU), the median step time and its ratio to
``full_ft``. Steps of the three methods are interleaved (one step of each in turn) so that load
drift on a shared machine hits all three alike. Tokens are random ids (timing does not depend
on the text); the label is a function of the tokens so the loss can fall.

Run:  python -m experiments.bench_peft                (batch 16, seq 128, 20 timed steps)
      python -m experiments.bench_peft --quick        (batch 2, seq 16, 3 steps; the tests)
Writes experiments/results/bench_peft[_quick].{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from effjax.models.bert import mean_pool
from effjax.models.minilm import load_minilm
from effjax.nn import adapted_layers
from effjax.optim import state_bytes
from effjax.peft import LoRA, Unfreeze, combine, inject, materialize, split

RESULTS = os.path.join(os.path.dirname(__file__), "results")
METHODS = ("full_ft", "lora_materialize", "lora_fast")
TARGETS = r"encoder/layers/\d+/(query|key|value|attention_out|intermediate|output)"


class Classifier(nnx.Module):
    """BERT encoder, mean pooling over real tokens, linear head."""

    def __init__(self, encoder, num_classes: int, *, rngs: nnx.Rngs):
        self.encoder = encoder
        self.head = nnx.Linear(encoder.config.hidden_size, num_classes, rngs=rngs)

    def __call__(self, ids, mask):
        return self.head(mean_pool(self.encoder(ids, mask), mask))


def batches(n: int, batch: int, seq: int, vocab: int, seed: int = 0):
    """``n`` batches of random word-piece ids framed by [CLS] (101) ... [SEP] (102), all real
    tokens; label = the first content token's id mod 2 (learnable, so the loss falls)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(1000, vocab, (batch, seq)).astype(np.int32)
        ids[:, 0], ids[:, -1] = 101, 102
        out.append({"ids": jnp.asarray(ids), "mask": jnp.ones((batch, seq), bool),
                    "labels": jnp.asarray(ids[:, 1] % 2)})
    return out


def build(rank: int, alpha: float, lr_full: float, lr_lora: float, seed: int = 0):
    """The three methods: ``{name: (step, state, info)}``; ``step(state, batch) -> (state,
    loss)`` with the mutable part of ``state`` donated."""
    enc = load_minilm().model
    model = Classifier(enc, 2, rngs=nnx.Rngs(seed))
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    fast_graph = nnx.split(adapted_layers(model, TARGETS + "|head"), nnx.Param, ...)[0]
    rules = {TARGETS + "/kernel": LoRA(rank=rank, alpha=alpha), r"head/(kernel|bias)": Unfreeze()}
    tree = inject(params, rules, key=jax.random.key(seed))
    trainable, frozen = split(tree)

    def ce(logits, labels):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    methods = {}
    opt = optax.adamw(lr_full)

    def full_step(p, s, batch):
        def loss_fn(p):
            return ce(nnx.merge(graph, p, rest)(batch["ids"], batch["mask"]), batch["labels"])

        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    methods["full_ft"] = (full_step, (params, opt.init(params)), params)

    lopt = optax.adamw(lr_lora)

    def lora_step(graph_, use_materialize):
        def step(t, s, frozen, batch):
            def loss_fn(t):
                tree = combine(t, frozen)
                tree = materialize(tree) if use_materialize else tree
                m = nnx.merge(graph_, tree, rest)
                return ce(m(batch["ids"], batch["mask"]), batch["labels"])

            loss, g = jax.value_and_grad(loss_fn)(t)
            u, s = lopt.update(g, s, t)
            return optax.apply_updates(t, u), s, loss

        return step

    methods["lora_materialize"] = (lora_step(graph, True), (trainable, lopt.init(trainable)),
                                   trainable)
    methods["lora_fast"] = (lora_step(fast_graph, False), (trainable, lopt.init(trainable)),
                            trainable)
    n_total = sum(x.size for x in jax.tree.leaves(params))
    return methods, frozen, n_total


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def run(batch: int, seq: int, steps: int, warmup: int, rank: int = 8, alpha: float = 16.0,
        n_batches: int = 4, progress: bool = True) -> tuple[list[dict], int]:
    methods, frozen, n_total = build(rank, alpha, lr_full=2e-5, lr_lora=1e-3)
    data = batches(n_batches, batch, seq, 30522)
    compiled, states, rows = {}, {}, {}
    for name, (step, (p, s), trainable) in methods.items():
        p, s = _copy(p), _copy(s)
        args = (p, s, data[0]) if name == "full_ft" else (p, s, frozen, data[0])
        t0 = time.perf_counter()
        exe = jax.jit(step, donate_argnums=(0, 1)).lower(*args).compile()
        compile_s = time.perf_counter() - t0
        ma = exe.memory_analysis()
        mem = {k: int(getattr(ma, f"{k}_size_in_bytes")) for k in
               ("argument", "output", "alias", "temp")}
        compiled[name], states[name] = exe, (p, s)
        rows[name] = dict(method=name, trainable=int(sum(x.size for x in jax.tree.leaves(
            trainable))), total_params=n_total, state_bytes=int(state_bytes(s)),
            **{f"{k}_bytes": v for k, v in mem.items()},
            peak_bytes=mem["argument"] + mem["output"] - mem["alias"] + mem["temp"],
            compile_s=compile_s, times=[], losses=[])
        if progress:
            print(f"compiled {name:17s} in {compile_s:5.1f} s; memory {mem}", flush=True)

    def one(name, i):
        p, s = states[name]
        b = data[i % len(data)]
        t0 = time.perf_counter()
        p, s, loss = (compiled[name](p, s, b) if name == "full_ft"
                      else compiled[name](p, s, frozen, b))
        loss = float(loss)  # synchronises
        dt = time.perf_counter() - t0
        states[name] = (p, s)
        return dt, loss

    for i in range(warmup + steps):
        last = {}
        for name in METHODS:  # interleaved: load drift hits every method alike
            last[name] = dt, loss = one(name, i)
            rows[name]["losses"].append(loss)
            if i >= warmup:
                rows[name]["times"].append(dt)
        if progress:
            print(f"step {i + 1}/{warmup + steps}: " + "  ".join(
                f"{n} {loss:.4f} ({1e3 * dt:.0f} ms)" for n, (dt, loss) in last.items()),
                flush=True)
    base = statistics.median(rows["full_ft"]["times"])
    out = []
    for name in METHODS:
        r = rows[name]
        t = r["times"]
        r["step_ms"] = 1e3 * statistics.median(t)
        q1, _, q3 = statistics.quantiles(t, n=4) if len(t) >= 2 else (t[0], t[0], t[0])
        r["step_ms_iqr"] = (1e3 * q1, 1e3 * q3)
        r["step_ratio"] = statistics.median(t) / base
        r["peak_ratio"] = r["peak_bytes"] / rows["full_ft"]["peak_bytes"]
        out.append(r)
    return out, n_total


MB = 1e6


def to_markdown(rows, meta) -> str:
    lines = [
        f"Machine: {meta['machine']}. Command: `{meta['command']}`. "
        f"all-MiniLM-L6-v2 ({rows[0]['total_params']:,} parameters incl. the 2-class head), "
        f"batch {meta['batch']} x {meta['seq']} tokens, {meta['steps']} timed steps after "
        f"{meta['warmup']} warm-up steps, methods interleaved step by step. LoRA: rank "
        f"{meta['rank']}, alpha {meta['alpha']:g} on {meta['targets']}; head trained fully.",
        "",
        "| method | trainable params | optimizer state MB | peak step memory MB "
        "(args + out - alias + temp) | temp MB | peak / full FT | median step ms (IQR) "
        "| step time / full FT | loss first -> last |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lo, hi = r["step_ms_iqr"]
        lines.append(
            f"| {r['method']} | {r['trainable']:,} | {r['state_bytes'] / MB:.2f} | "
            f"{r['peak_bytes'] / MB:.1f} ({r['argument_bytes'] / MB:.1f} + "
            f"{r['output_bytes'] / MB:.1f} - {r['alias_bytes'] / MB:.1f} + "
            f"{r['temp_bytes'] / MB:.1f}) | {r['temp_bytes'] / MB:.1f} | "
            f"{r['peak_ratio']:.3f} | {r['step_ms']:.0f} ({lo:.0f}-{hi:.0f}) | "
            f"{r['step_ratio']:.3f} | {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f} |")
    by = {r["method"]: r for r in rows}
    fast, mat, full = by["lora_fast"], by["lora_materialize"], by["full_ft"]
    wins = fast["step_ratio"] < 1 and fast["peak_ratio"] < 1
    lines += [
        "",
        f"lora_fast vs full_ft: step time x{fast['step_ratio']:.3f}, peak step memory "
        f"x{fast['peak_ratio']:.3f}, optimizer state "
        f"x{fast['state_bytes'] / full['state_bytes']:.4f}"
        f" -> the fast path {'beats' if wins else 'does NOT beat'} full fine-tuning on both step "
        f"time and peak memory in this run.",
        f"lora_fast vs lora_materialize: step time x{fast['step_ms'] / mat['step_ms']:.3f}, "
        f"temporaries {fast['temp_bytes'] / MB:.1f} MB vs {mat['temp_bytes'] / MB:.1f} MB.",
        "",
        "Memory is XLA's accounting of the compiled train step (`jax.jit(step, donate_argnums="
        "(0, 1)).lower(...).compile().memory_analysis()`): arguments (parameters, optimizer "
        "state, batch; the frozen weights for LoRA), outputs, the part of the outputs aliased "
        "to donated arguments, and temporaries (activations kept for the backward pass, "
        "gradients, and for `lora_materialize` the dense W + sAB of every adapted kernel and "
        "its gradient). It is not the process RSS (which adds the JAX runtime, the host copy "
        "of the checkpoint and allocator slack). Step times are wall-clock medians with the "
        "interquartile range; the three methods run one step each in turn.",
    ]
    return "\n".join(lines) + "\n"


def plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    colors = ["#777777", "#d98c3f", "#3f7fd9"]
    axes[0].bar(names, [r["step_ratio"] for r in rows], color=colors)
    axes[0].set_title("median step time / full FT")
    bottom = np.zeros(len(rows))
    for key, label, alpha in (("argument", "arguments", 1.0), ("temp", "temporaries", 0.5)):
        vals = np.array([r[f"{key}_bytes"] / MB for r in rows])
        axes[1].bar(names, vals, bottom=bottom, color=colors, alpha=alpha, label=label)
        bottom += vals
    out = np.array([(r["output_bytes"] - r["alias_bytes"]) / MB for r in rows])
    axes[1].bar(names, out, bottom=bottom, color="k", alpha=0.3, label="non-aliased outputs")
    axes[1].set_title("train-step memory (XLA), MB")
    axes[1].legend(fontsize=7)
    axes[2].bar(names, [r["state_bytes"] / MB for r in rows], color=colors)
    axes[2].set_yscale("log")
    axes[2].set_title("optimizer state, MB (log)")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
        ax.axhline(1.0 if ax is axes[0] else 0, color="k", lw=0.6, ls="--")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 2, seq 16, 3 steps")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.steps, args.warmup = 2, 16, 3, 1
    from experiments._train import machine

    rows, _ = run(args.batch, args.seq, args.steps, args.warmup, args.rank, args.alpha)
    cmd = "python -m experiments.bench_peft" + (" " + " ".join(argv if argv is not None
                                                               else sys.argv[1:])).rstrip()
    meta = dict(machine=machine(), jax=jax.__version__, command=cmd.strip(),
                batch=args.batch, seq=args.seq, steps=args.steps, warmup=args.warmup,
                rank=args.rank, alpha=args.alpha,
                targets="query, key, value, attention_out, intermediate, output (6 layers)")
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "bench_peft" + ("_quick" if args.quick else ""))
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
