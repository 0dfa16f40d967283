"""Does 8-bit (and 4-bit) AdamW train as well as 32-bit AdamW on real data?

Dettmers et al. (2022), "8-bit Optimizers via Block-wise Quantization", claim 8-bit optimizer
states match 32-bit performance. This experiment checks the claim for effjax's optimizers on two
real tasks, each with 3 seeds (a seed fixes the initial weights and the data order, shared by
the optimizers, so the comparison is paired):

(a) ``lm``: the char-level transformer on ``shakespeare_char``; metric: validation loss on the
    held-out plays (nats per character).
(b) ``cnn``: the CNN on Fashion-MNIST; 5,000 training images (a fixed, seed-0 choice) are held
    out for validation; metrics: validation loss and accuracy, and test accuracy.

For each task and optimizer it reports mean ± std over seeds and the ratio of the mean
validation loss to fp32 AdamW's. The bar set by the issue: ratio ≤ 1.01 for 8-bit.

Run:  python -m experiments.optim_parity                  (CPU defaults, ~25 min on 2 cores)
      python -m experiments.optim_parity --lm-steps 5000 --lm-width 384 --lm-depth 6   (GPU)
      python -m experiments.optim_parity --quick          (seconds; run by the tests)
Writes experiments/results/optim_parity.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from effjax import optim
from effjax.data import batches, load_fashion_mnist_source
from effjax.models import CNN, CharTransformer, CharTransformerConfig, next_token_loss
from experiments import _train

OPTIMIZERS = {"adamw (fp32)": optax.adamw, "adamw_8bit": optim.adamw_8bit,
              "adamw_4bit": optim.adamw_4bit}


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--tasks", nargs="+", default=["lm", "cnn"], choices=["lm", "cnn"])
    ap.add_argument("--lm-steps", type=int, default=800)
    ap.add_argument("--lm-batch", type=int, default=32)
    ap.add_argument("--lm-seq-len", type=int, default=128)
    ap.add_argument("--lm-width", type=int, default=128)
    ap.add_argument("--lm-depth", type=int, default=2)
    ap.add_argument("--lm-lr", type=float, default=3e-3)
    ap.add_argument("--lm-eval-windows", type=int, default=1024)
    ap.add_argument("--cnn-epochs", type=float, default=2.0)
    ap.add_argument("--cnn-batch", type=int, default=128)
    ap.add_argument("--cnn-lr", type=float, default=2e-3)
    ap.add_argument("--quick", action="store_true", help="tiny settings, 2 seeds (tests)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", default=_train.RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.lm_steps, args.lm_batch, args.lm_seq_len = [0, 1], 6, 4, 32
        args.lm_width, args.lm_depth, args.lm_eval_windows = 32, 1, 16
        args.cnn_epochs, args.cnn_batch = 6 * 16 / 256, 16
    return args


def schedule(lr, steps):
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps, lr / 10)


def lm_task(args):
    train, vocab = _train.char_windows("train", args.lm_seq_len, limit=64 if args.quick else None)
    val, _ = _train.char_windows("validation", args.lm_seq_len,
                                 limit=args.lm_eval_windows // (256 // args.lm_seq_len) + 1)
    val = val[:args.lm_eval_windows]
    cfg = CharTransformerConfig(vocab_size=len(vocab), seq_len=args.lm_seq_len,
                                width=args.lm_width, depth=args.lm_depth, heads=4 if
                                args.lm_width % 4 == 0 else 1)
    # one optimizer object per name, shared by the seeds (the same schedule): with the seeds'
    # equal graphs, _train.run compiles each optimizer's step once
    opts = {name: optax.chain(optax.clip_by_global_norm(1.0),
                              make(schedule(args.lm_lr, args.lm_steps)))
            for name, make in OPTIMIZERS.items()}
    results = []
    for seed in args.seeds:
        graph, params0 = nnx.split(CharTransformer(cfg, rngs=nnx.Rngs(seed)), nnx.Param)
        eval_fn = lambda p, graph=graph: _train.evaluate(graph, p, next_token_loss, val, 64)
        for name, opt in opts.items():
            data = (b["tokens"] for b in batches({"tokens": train}, args.lm_batch, seed=seed,
                                                 epochs=None))
            r = _train.run(f"lm s{seed} {name}", opt, graph, params0, next_token_loss, data,
                           args.lm_steps, eval_fn, max(1, args.lm_steps // 4),
                           progress=not args.no_progress)
            results.append({"task": "lm", "seed": seed, "optimizer": name,
                            "val_loss": r["final_eval"], "final_train": r["final_train"],
                            "bytes_per_param": r["bytes_per_param"], "evals": r["evals"]})
    return results, {"model": str(cfg), "train_windows": len(train), "val_windows": len(val)}


def _xent(model, batch):
    logits = model(batch["image"].astype(jnp.float32) / 255.0)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


def _accuracy(model, batch):
    logits = model(batch["image"].astype(jnp.float32) / 255.0)
    return jnp.mean(jnp.argmax(logits, -1) == batch["label"])


def _records(source, indices):
    """The images and labels of ``source``'s records at ``indices`` (random access)."""
    recs = [source[int(i)] for i in indices]
    return {k: np.stack([r[k] for r in recs]) for k in ("image", "label")}


def cnn_task(args):
    if args.quick:  # read only the records the quick run uses (the same ones), not all 60,000
        source = load_fashion_mnist_source("train")
        order = np.random.default_rng(0).permutation(len(source))
        val, train = _records(source, order[:256]), _records(source, order[256:512])
        test = _records(load_fashion_mnist_source("test"), range(256))  # val's batch shape
    else:
        full = _train.fashion_mnist_arrays("train")
        test = _train.fashion_mnist_arrays("test")
        order = np.random.default_rng(0).permutation(len(full["label"]))
        n_val = 5000
        val = {k: v[order[:n_val]] for k, v in full.items() if k in ("image", "label")}
        train = {k: v[order[n_val:]] for k, v in full.items() if k in ("image", "label")}
    steps = max(1, int(args.cnn_epochs * len(train["label"]) / args.cnn_batch))
    opts = {name: make(schedule(args.cnn_lr, steps)) for name, make in OPTIMIZERS.items()}
    results = []
    for seed in args.seeds:
        model = CNN(num_classes=10, rngs=nnx.Rngs(seed))
        graph, params0 = nnx.split(model, nnx.Param)
        eval_fn = lambda p, graph=graph: _train.evaluate(graph, p, _xent, val, 500)
        for name, opt in opts.items():
            data = batches(train, args.cnn_batch, seed=seed, epochs=None)
            r = _train.run(f"cnn s{seed} {name}", opt, graph, params0, _xent, data, steps,
                           eval_fn, max(1, steps // 4), progress=not args.no_progress)
            p = r["final_params"]
            results.append({"task": "cnn", "seed": seed, "optimizer": name,
                            "val_loss": r["final_eval"], "final_train": r["final_train"],
                            "val_acc": _train.evaluate(graph, p, _accuracy, val, 500),
                            "test_acc": _train.evaluate(graph, p, _accuracy, test, 500),
                            "bytes_per_param": r["bytes_per_param"], "evals": r["evals"]})
    return results, {"steps": steps, "train_images": len(train["label"]),
                     "val_images": len(val["label"])}


def summarize(results):
    """Rows of mean ± std over seeds per (task, optimizer), with ratios to fp32."""
    rows = []
    for task in dict.fromkeys(r["task"] for r in results):
        base = np.mean([r["val_loss"] for r in results
                        if r["task"] == task and r["optimizer"] == "adamw (fp32)"])
        for name in OPTIMIZERS:
            rs = [r for r in results if r["task"] == task and r["optimizer"] == name]
            row = {"task": task, "optimizer": name, "seeds": len(rs),
                   "bytes_per_param": rs[0]["bytes_per_param"]}
            for key in ("val_loss", "val_acc", "test_acc"):
                if key in rs[0]:
                    v = np.array([r[key] for r in rs])
                    row[key] = (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0)
            row["val_loss_ratio"] = row["val_loss"][0] / base
            rows.append(row)
    return rows


def report(results, meta, args):
    rows = summarize(results)
    fmt = lambda ms, d=4: f"{ms[0]:.{d}f} ± {ms[1]:.{d}f}" if ms else "-"
    table = [[r["task"], r["optimizer"], r["seeds"], f"{r['bytes_per_param']:.2f}",
              fmt(r["val_loss"]), f"{r['val_loss_ratio']:.4f}", fmt(r.get("val_acc")),
              fmt(r.get("test_acc"))] for r in rows]
    md = _train.markdown_table(["task", "optimizer", "seeds", "state B/param",
                                "val loss (mean ± std)", "ratio to fp32", "val acc",
                                "test acc"], table)
    print("\n" + md)
    suffix = "_quick" if args.quick else ""
    os.makedirs(args.out, exist_ok=True)
    settings = {k: v for k, v in vars(args).items()}
    with open(os.path.join(args.out, f"optim_parity{suffix}.md"), "w") as f:
        f.write(f"Settings: {settings}\n\nData/model: {meta}\n\nMachine: {_train.machine()}"
                f"\n\n{md}\n")
    with open(os.path.join(args.out, f"optim_parity{suffix}.json"), "w") as f:
        json.dump({"settings": settings, "meta": meta, "machine": _train.machine(),
                   "summary": rows, "runs": results}, f, indent=1)
    plot(results, os.path.join(args.out, f"optim_parity{suffix}.png"))
    return rows


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in results))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for k, name in enumerate(OPTIMIZERS):
            runs = [r for r in results if r["task"] == task and r["optimizer"] == name]
            steps = [s for s, _ in runs[0]["evals"]]
            vals = np.array([[v for _, v in r["evals"]] for r in runs])
            ax.errorbar(np.array(steps) * (1 + 0.01 * k), vals.mean(0), yerr=vals.std(0),
                        marker="o", capsize=3, label=name)
        ax.set_title({"lm": "char LM, shakespeare_char", "cnn": "CNN, Fashion-MNIST"}[task])
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (mean ± std over seeds)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse(argv)
    print(_train.machine())
    results, meta = [], {}
    if "lm" in args.tasks:
        res, meta["lm"] = lm_task(args)
        results += res
    if "cnn" in args.tasks:
        res, meta["cnn"] = cnn_task(args)
        results += res
    return report(results, meta, args)


if __name__ == "__main__":
    main()
