"""4-bit training: Adam vs SPAM vs Stable-SPAM with INT4 weights and activations.

Huang et al. (2025), "Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam", claim
that with INT4 weights and activations Stable-SPAM beats 16-bit Adam and reaches 4-bit Adam's
final loss in about half the steps. This script trains the char-level transformer on
``shakespeare_char`` with quantization-aware training in the paper's INT4 scheme (weights:
asymmetric, groups of 256 along the input; activations: 4 bits, groups of 256, 2 outliers kept;
the projections of every block, not the embeddings or the output head; straight-through
gradients), for Adam, SPAM and Stable-SPAM at several learning rates, plus float32 and BF16 Adam
(no quantization) at each learning rate as references. Same initial weights and data order for
every run; the same warm-up + cosine learning-rate schedule; no gradient clipping (the methods
under test are the spike handling).

Reported per run: final validation loss (held-out plays, evaluated with the run's own
quantization), the number of loss spikes (a step whose loss exceeds 1.25× the median of the
previous 20 steps), divergence (a non-finite loss, or a final loss above the initial one), and
the first step at which the 20-step moving average of the training loss reaches 4-bit Adam's
final moving average at the same learning rate.

Reset intervals are scaled to the run length: the paper's ΔT = 500 (Stable-SPAM) and
ΔT = 500 with a 150-step warm-up (SPAM) belong to runs of tens of thousands of steps; here
``--reset-interval`` (default: a quarter of the run) and a warm-up of 0.3 ΔT are used.

Run:  python -m experiments.stable_spam_4bit                 (CPU defaults, ~15 min on 2 cores)
      python -m experiments.stable_spam_4bit --steps 5000 --width 384 --depth 6   (GPU)
      python -m experiments.stable_spam_4bit --quick         (seconds, no SPAM row; the tests)
Writes experiments/results/stable_spam_4bit.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from effjax import optim
from effjax.compress import FakeQuant, fake_quantize_params
from effjax.data import batches
from effjax.models import CharTransformer, CharTransformerConfig
from effjax.nn import quantize_activations
from experiments import _train

WEIGHTS = {r"blocks/.*/kernel": FakeQuant(bits=4, symmetric=False, group_size=256)}


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    ap.add_argument("--reset-interval", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-windows", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="tiny settings (tests)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", default=_train.RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.batch, args.seq_len, args.width, args.depth = 24, 4, 32, 32, 1
        args.lrs, args.eval_windows = [3e-3], 16
    if args.reset_interval is None:
        args.reset_interval = max(2, args.steps // 4)
    return args


def methods(args):
    """name -> (precision, optimizer factory taking a schedule)."""
    dt = args.reset_interval
    rows = {
        "adam int4": ("int4", lambda lr: optax.adamw(lr)),
        "spam int4": ("int4", lambda lr: optim.spam(lr, reset_interval=dt,
                                                    warmup_steps=max(1, int(0.3 * dt)),
                                                    spike_delay=min(20, dt // 2))),
        "stable_spam int4": ("int4", lambda lr: optim.stable_spam(
            lr, **{**optim.STABLE_SPAM_4BIT, "reset_interval": dt})),
        "adam bf16": ("bf16", lambda lr: optax.adamw(lr)),
        "adam fp32": ("fp32", lambda lr: optax.adamw(lr)),
    }
    if args.quick:  # a smoke test of every precision and of Stable-SPAM vs Adam in int4: SPAM
        del rows["spam int4"]  # (another compile of the int4 model) is left to the full run
    return rows


def _xent(logits, targets):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                           targets).mean()


def loss_for(precision):
    """``loss(model, windows)`` for the precision's forward pass."""
    if precision == "int4":
        def prepare(model):
            graph, params = nnx.split(model, nnx.Param)
            return nnx.merge(graph, fake_quantize_params(params, WEIGHTS))
    elif precision == "bf16":
        def prepare(model):
            graph, params, rest = nnx.split(model, nnx.Param, ...)
            params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
            return nnx.merge(graph, params, rest)
    else:
        prepare = lambda model: model

    def loss(model, windows):
        windows = windows.astype(jnp.int32)
        return _xent(prepare(model)(windows[:, :-1]), windows[:, 1:])

    return loss


def spikes(losses, factor=1.25, window=20) -> int:
    losses = np.asarray(losses)
    return int(sum(losses[t] > factor * np.median(losses[t - window:t])
                   for t in range(window, len(losses)) if np.isfinite(losses[t])))


def steps_to_reach(losses, target, window=20):
    avg = _train.smooth(losses, window)
    hit = np.flatnonzero(avg <= target)
    return int(hit[0] + window) if hit.size else None


def main(argv=None):
    args = parse(argv)
    train, vocab = _train.char_windows("train", args.seq_len, limit=64 if args.quick else None)
    val, _ = _train.char_windows("validation", args.seq_len,
                                 limit=args.eval_windows // (256 // args.seq_len) + 1)
    val = val[:args.eval_windows]
    cfg = CharTransformerConfig(vocab_size=len(vocab), seq_len=args.seq_len, width=args.width,
                                depth=args.depth, heads=4 if args.width % 4 == 0 else 1)
    base = CharTransformer(cfg, rngs=nnx.Rngs(args.seed))
    models = {"int4": quantize_activations(base, r"blocks/.*", bits=4, group_size=256,
                                           outliers=2),
              "bf16": base, "fp32": base}
    print(f"{cfg}; {_train.machine()}")
    rows = []
    # one loss function per precision: the methods of a precision share its compiled evaluation
    losses_by_precision = {p: loss_for(p) for p in models}
    for lr in args.lrs:
        for name, (precision, make) in methods(args).items():
            graph, params0 = nnx.split(models[precision], nnx.Param)
            loss = losses_by_precision[precision]
            eval_fn = lambda p, graph=graph, loss=loss: _train.evaluate(graph, p, loss, val, 64)
            schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, args.steps // 20),
                                                          args.steps, lr / 10)
            data = (b["tokens"] for b in batches({"tokens": train}, args.batch, seed=args.seed,
                                                 epochs=None))
            r = _train.run(f"{name} {lr:g}", make(schedule), graph, params0, loss, data,
                           args.steps, eval_fn, max(1, args.steps // 4),
                           progress=not args.no_progress)
            losses = r["train_losses"]
            rows.append({"method": name, "lr": lr, "val_loss": r["final_eval"],
                         "final_train": r["final_train"], "spikes": spikes(losses),
                         "diverged": bool(not np.all(np.isfinite(losses))
                                          or r["final_train"] > losses[0]),
                         "train_losses": losses, "evals": r["evals"]})
        adam = next(x for x in rows if x["lr"] == lr and x["method"] == "adam int4")
        target = float(_train.smooth(adam["train_losses"], 20)[-1])
        for x in rows:
            if x["lr"] == lr:
                x["steps_to_adam_int4"] = steps_to_reach(x["train_losses"], target)
    report(rows, args)
    return rows


def report(rows, args):
    fmt = lambda v: "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
    table = [[f"{r['lr']:g}", r["method"], fmt(r["val_loss"]), fmt(r["final_train"]),
              r["spikes"], "yes" if r["diverged"] else "no", fmt(r["steps_to_adam_int4"])]
             for r in rows]
    md = _train.markdown_table(["lr", "method", "val loss", "final train loss", "spikes",
                                "diverged", "steps to 4-bit Adam's final loss"], table)
    print("\n" + md)
    suffix = "_quick" if args.quick else ""
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"stable_spam_4bit{suffix}.md"), "w") as f:
        f.write(f"Settings: {vars(args)}\n\nMachine: {_train.machine()}\n\n{md}\n")
    with open(os.path.join(args.out, f"stable_spam_4bit{suffix}.json"), "w") as f:
        json.dump({"settings": vars(args), "machine": _train.machine(), "rows": rows}, f,
                  indent=1)
    plot(rows, os.path.join(args.out, f"stable_spam_4bit{suffix}.png"), args)


def plot(rows, path, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = list(dict.fromkeys(r["lr"] for r in rows))
    fig, axes = plt.subplots(1, len(lrs), figsize=(5.5 * len(lrs), 4), squeeze=False)
    for ax, lr in zip(axes[0], lrs):
        for r in (r for r in rows if r["lr"] == lr):
            w = max(1, min(20, args.steps // 10))
            curve = _train.smooth(np.nan_to_num(r["train_losses"], nan=10.0), w)
            ax.plot(np.arange(len(curve)) + w, curve, label=r["method"],
                    ls="--" if "int4" not in r["method"] else "-")
        ax.set_title(f"learning rate {lr:g}")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (moving average)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
