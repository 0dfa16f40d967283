"""The main job (``make demo``): a char-level transformer on Shakespeare, trained with
``optax.adamw`` and effjax's low-bit AdamW variants from the same initial weights and the same
data order, compared on optimizer-state memory, loss and step time.

Every optimizer gets the same learning-rate schedule (linear warm-up, cosine decay) and global
norm clipping at 1.0. For each it prints: optimizer-state MB and bytes per parameter, the final
training loss (mean of the last steps), the validation loss on held-out plays, the median step
time and its ratio to ``optax.adamw`` measured in the same run. Writes
``experiments/results/quickstart.{png,json,md}`` (loss curves; table).

Run:  make demo                                      (defaults: < 5 minutes on 2 CPU cores)
      python -m experiments.quickstart --steps 3000 --width 256 --depth 6   (longer)
      python -m experiments.quickstart --quick        (seconds; run by the tests)
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import numpy as np
import optax
from flax import nnx

from effjax import optim
from effjax.data import batches
from effjax.models import CharTransformer, CharTransformerConfig, next_token_loss
from experiments import _train

# The baseline and every effjax Adam-family optimizer (default settings; the low-rank ones at
# rank 32 = width / 4). New optimizers are added here.
OPTIMIZERS = {
    "optax.adamw": optax.adamw,
    "adamw_8bit": optim.adamw_8bit,
    "adamw_4bit": optim.adamw_4bit,
    "spam": optim.spam,
    "stable_spam_8bit": lambda lr: optim.stable_spam(lr, state_bits=8),
    "galore_adamw": lambda lr: optim.galore_adamw(lr, rank=32),
    "fira_adamw": lambda lr: optim.fira_adamw(lr, rank=32),
}

#: ``--quick``'s rows (unless ``--optimizers`` is given): the baseline, the low-bit and the
#: spike-robust ones; the low-rank rows' steps run in ``bench_optim --quick`` (and every
#: optimizer's in the optimizer conformance table).
QUICK_OPTIMIZERS = ("optax.adamw", "adamw_8bit", "adamw_4bit", "spam", "stable_spam_8bit")


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-windows", type=int, default=512)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    ap.add_argument("--quick", action="store_true",
                    help="tiny model, 8 steps, QUICK_OPTIMIZERS (tests)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", default=_train.RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.batch, args.seq_len, args.width, args.depth = 8, 4, 32, 32, 1
        args.heads, args.eval_windows, args.eval_every = 2, 16, 4
        if args.optimizers == list(OPTIMIZERS):  # GaLore/Fira: stepped on a transformer tree
            args.optimizers = list(QUICK_OPTIMIZERS)  # by bench_optim --quick, not here
    return args


def main(argv=None) -> list[dict]:
    args = parse(argv)
    train, vocab = _train.char_windows("train", args.seq_len,
                                       limit=64 if args.quick else None)
    val, _ = _train.char_windows("validation", args.seq_len,
                                 limit=args.eval_windows // (256 // args.seq_len) + 1)
    val = val[:args.eval_windows]
    cfg = CharTransformerConfig(vocab_size=len(vocab), seq_len=args.seq_len, width=args.width,
                                depth=args.depth, heads=args.heads)
    graph, params0 = nnx.split(CharTransformer(cfg, rngs=nnx.Rngs(args.seed)), nnx.Param)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, args.steps // 20),
                                                  args.steps, end_value=args.lr / 10)
    loss_fn = lambda model, batch: next_token_loss(model, batch["tokens"])
    eval_fn = lambda p: _train.evaluate(graph, p, next_token_loss, val, batch_size=64)

    print(f"char transformer {cfg}: {sum(x.size for x in jax.tree.leaves(params0)):,} params; "
          f"{len(train):,} training windows of {args.seq_len} characters; {_train.machine()}")
    rows = []
    for name in args.optimizers:
        opt = optax.chain(optax.clip_by_global_norm(1.0), OPTIMIZERS[name](schedule))
        data = (b for b in batches({"tokens": train}, args.batch, seed=args.seed, epochs=None))
        rows.append(_train.run(name, opt, graph, params0, loss_fn, data, args.steps, eval_fn,
                               args.eval_every, progress=not args.no_progress))
    report(rows, args)
    return rows


def report(rows, args):
    base = next((r["step_ms"] for r in rows if r["optimizer"] == "optax.adamw"), None)
    header = ["optimizer", "state MB", "state B/param", "final train loss", "val loss",
              "median step ms", "step ratio to adamw"]
    table = [[r["optimizer"], f"{r['state_bytes'] / 2**20:.2f}", f"{r['bytes_per_param']:.3f}",
              f"{r['final_train']:.4f}", f"{r['final_eval']:.4f}", f"{r['step_ms']:.1f}",
              f"{r['step_ms'] / base:.2f}" if base else "-"] for r in rows]
    md = _train.markdown_table(header, table)
    print("\n" + md)
    suffix = "_quick" if args.quick else ""
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"quickstart{suffix}.md"), "w") as f:
        f.write(f"Settings: {vars(args)}\n\nMachine: {_train.machine()}\n\n{md}\n")
    with open(os.path.join(args.out, f"quickstart{suffix}.json"), "w") as f:
        json.dump({"settings": vars(args), "machine": _train.machine(),
                   "rows": [{k: v for k, v in r.items() if k != "final_params"} for r in rows]},
                  f, indent=1)
    plot(rows, os.path.join(args.out, f"quickstart{suffix}.png"), args)
    print("wrote (table, JSON, plot):",
          *(os.path.join(args.out, f"quickstart{suffix}.{ext}") for ext in ("md", "json", "png")))


def plot(rows, path, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in rows:
        width = max(1, args.steps // 30)
        curve = _train.smooth(r["train_losses"], width)
        line, = ax.plot(np.arange(len(curve)) + width, curve, label=f"{r['optimizer']} train")
        steps, vals = zip(*r["evals"])
        ax.plot(steps, vals, "o--", color=line.get_color(), label=f"{r['optimizer']} val")
    ax.set_xlabel("step")
    ax.set_ylabel("next-character cross-entropy (nats)")
    ax.set_title("char transformer on shakespeare_char: same init, same data order")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
