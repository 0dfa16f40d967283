"""Interleaved A/B timing of optimizer steps between two source trees (before / after a change).

``bench_optim`` compares optimizers within one tree; this script compares one tree with another.
Each invocation times, in the tree that ``effjax`` is imported from, the jitted and donated step
(update + ``optax.apply_updates``) of ``optax.adamw`` and of a few effjax optimizers on
``bench_optim``'s 10M tree, and appends one line per optimizer (median over ``--reps`` steps,
and the ratio to ``optax.adamw`` of the same invocation) to ``--log``. A driver runs it
alternately in the two trees, so that load drift hits both alike:

  git worktree add /tmp/before <commit>
  for i in 1 2 3 4 5 6; do
    PYTHONPATH=/tmp/before python experiments/ab_steps.py --label before --log /tmp/ab.jsonl
    PYTHONPATH=.            python experiments/ab_steps.py --label after  --log /tmp/ab.jsonl
  done
  python experiments/ab_steps.py --summarize /tmp/ab.jsonl --out experiments/results

``--summarize`` prints, per optimizer and label, the median over the invocations of the ratio to
``optax.adamw`` and its spread (min..max), and writes ``ab_steps.{md,png}``. ``--quick`` (tiny
tree, 3 reps) is run by the tests.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

ROWS = ("adamw", "adamw_8bit", "adamw_8bit (fused_apply)", "lion_8bit", "sgd_8bit",
        "adamw_4bit")


def _tree(quick: bool):
    import jax.numpy as jnp
    import numpy as np
    rng = np.random.default_rng(0)
    vocab, d, layers = (64, 32, 2) if quick else (2048, 256, 12)  # bench_optim's 10M
    tree = {"embed": rng.normal(size=(vocab, d))}
    for i in range(layers):
        tree[f"layer_{i}"] = {
            "qkv": rng.normal(size=(d, 3 * d)), "out": rng.normal(size=(d, d)),
            "up": rng.normal(size=(d, 4 * d)), "down": rng.normal(size=(4 * d, d)),
            "norm": np.ones(d)}
    return {k: _cast(v, jnp) for k, v in tree.items()}


def _cast(v, jnp):
    if isinstance(v, dict):
        return {k: _cast(x, jnp) for k, x in v.items()}
    return jnp.asarray(0.02 * v, jnp.float32)


def time_rows(reps: int, quick: bool) -> dict[str, float]:
    """Median milliseconds of one jitted, donated step per row, in the imported tree."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from effjax import optim

    params = _tree(quick)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
    makers = {"adamw": lambda: optax.adamw(1e-3), "adamw_8bit": lambda: optim.adamw_8bit(1e-3),
              "lion_8bit": lambda: optim.lion_8bit(1e-4), "sgd_8bit": lambda: optim.sgd_8bit(1e-2),
              "adamw_4bit": lambda: optim.adamw_4bit(1e-3)}
    out = {}
    for row in ROWS:
        opt = makers[row.split(" ")[0]]()
        if row.endswith("(fused_apply)"):
            @functools.partial(jax.jit, donate_argnums=(0, 1))
            def step(p, s, g, opt=opt):
                return optim.fused_apply(opt)(g, s, p)
        else:
            @functools.partial(jax.jit, donate_argnums=(0, 1))
            def step(p, s, g, opt=opt):
                u, s = opt.update(g, s, p)
                return optax.apply_updates(p, u), s
        p = jax.tree.map(jnp.copy, params)
        s = opt.init(p)
        p, s = step(p, s, grads)
        jax.block_until_ready((p, s))
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            p, s = step(p, s, grads)
            jax.block_until_ready((p, s))
            times.append(time.perf_counter() - t)
        out[row] = 1e3 * float(np.median(times))
    return out


def summarize(log: str, out_dir: str | None) -> str:
    import numpy as np
    runs = [json.loads(line) for line in open(log) if line.strip()]
    labels = list(dict.fromkeys(r["label"] for r in runs))
    rows = [r for r in ROWS if r != "adamw"]
    lines = ["| optimizer | " + " | ".join(f"{lab}: ratio to adamw (min..max)" for lab in labels)
             + " | change |", "|---" * (len(labels) + 2) + "|"]
    medians = {}
    for row in rows:
        cells = []
        for lab in labels:
            r = [run["ms"][row] / run["ms"]["adamw"] for run in runs
                 if run["label"] == lab and row in run["ms"]]
            medians[row, lab] = float(np.median(r))
            cells.append(f"{np.median(r):.2f} ({min(r):.2f}..{max(r):.2f}, n={len(r)})")
        change = (f"{100 * (medians[row, labels[-1]] / medians[row, labels[0]] - 1):+.1f}%"
                  if len(labels) > 1 else "")
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {change} |")
    table = "\n".join(lines)
    print(table)
    if out_dir:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "ab_steps.md"), "w") as f:
            f.write(table + "\n")
        fig, ax = plt.subplots(figsize=(7, 3.5))
        width = 0.8 / len(labels)
        for j, lab in enumerate(labels):
            ax.bar([i + j * width for i in range(len(rows))], [medians[r, lab] for r in rows],
                   width, label=lab)
        ax.set_xticks([i + width * (len(labels) - 1) / 2 for i in range(len(rows))], rows,
                      rotation=20, fontsize=8)
        ax.set_ylabel("step time / optax.adamw")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "ab_steps.png"), dpi=120)
        print(f"wrote {out_dir}/ab_steps.md and ab_steps.png")
    return table


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="this tree")
    ap.add_argument("--log", help="append the result line (JSON) here")
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--summarize", metavar="LOG")
    ap.add_argument("--out", help="folder for ab_steps.{md,png} (with --summarize)")
    args = ap.parse_args(argv)
    if args.summarize:
        summarize(args.summarize, args.out)
        return
    ms = time_rows(3 if args.quick else args.reps, args.quick)
    import effjax
    line = {"label": args.label, "tree": os.path.dirname(os.path.dirname(effjax.__file__)),
            "ms": ms}
    print(json.dumps(line))
    if args.log:
        with open(args.log, "a") as f:
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    sys.exit(main())
