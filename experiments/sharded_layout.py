"""What the shard-local block layout costs: bytes per parameter of two 8-bit moments.

``effjax.quant.quantize_blockwise`` keeps bitsandbytes' flat blocks wherever they lie inside
shards, and switches to the shard-local layout (each shard blocked on its own, the shard grid
leading the scales) where a sharding would cut them (issue 19 item 4). This script tabulates,
for leaf shapes of real models and shardings on a 4 x 2 mesh, the bytes per parameter of two
8-bit moments (uint8 codes + float32 absmax, blocks of 256) in the flat layout and in the
layout the library picks, from shapes only (``effjax.quant.scales_shape``; nothing is
allocated, no device needed).

Run:  python -m experiments.sharded_layout           (a second)
      python -m experiments.sharded_layout --quick   (run by the tests)
Writes experiments/results/sharded_layout{,_quick}.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib

from effjax.quant import scales_shape, shard_layout

BLOCK = 256
MESH = {"x": 4, "y": 2}
# (name, shape, partition spec as mesh axis names per leaf axis)
CASES = [
    ("MiniLM ffn in (384, 1536)", (384, 1536), ("x", "y")),
    ("MiniLM ffn out (1536, 384)", (1536, 384), ("x", None)),
    ("MiniLM ffn out (1536, 384)", (1536, 384), (None, "y")),
    ("MiniLM ffn out (1536, 384)", (1536, 384), ("x", "y")),
    ("SmolLM2 (576, 1536)", (576, 1536), ("x", "y")),
    ("SmolLM2 (1536, 576)", (1536, 576), ("x", "y")),
    ("(1000, 1000)", (1000, 1000), ("x", "y")),
    ("LLaMA (4096, 4096)", (4096, 4096), ("x", "y")),
    ("LLaMA mlp (4096, 11008)", (4096, 11008), ("x", "y")),
    ("small (24, 384)", (24, 384), ("x", "y")),
    ("attention (384, 12, 64)", (384, 12, 64), (None, "y", None)),
    ("attention (384, 12, 64)", (384, 12, 64), ("x", "y", None)),
    ("attention (4096, 32, 128)", (4096, 32, 128), ("x", "y", None)),
]
QUICK = [0, 3, 6, 10]


def bytes_per_param(shape, shards) -> float:
    """Two 8-bit moments: 1 byte of code per element each, plus float32 scales."""
    n = math.prod(shape)
    return 2 * (n + 4 * math.prod(scales_shape(shape, BLOCK, shards))) / n


def rows(cases):
    out = []
    for name, shape, spec in cases:
        counts = tuple(MESH[a] if a else 1 for a in spec)
        chosen = shard_layout(shape, BLOCK, counts)
        out.append(dict(name=name, shape=list(shape),
                        spec="P(" + ", ".join(repr(a) if a else "None" for a in spec) + ")",
                        layout="flat" if chosen is None else f"shard-local {chosen}",
                        flat=bytes_per_param(shape, None),
                        chosen=bytes_per_param(shape, chosen),
                        local=bytes_per_param(shape, counts)))
    return out


def markdown(table) -> str:
    lines = ["| leaf | sharding (4 x 2 mesh) | layout picked | flat B/param | picked B/param "
             "| shard-local B/param |", "|---|---|---|---:|---:|---:|"]
    for r in table:
        lines.append(f"| {r['name']} | `{r['spec']}` | {r['layout']} | {r['flat']:.4f} | "
                     f"{r['chosen']:.4f} | {r['local']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(table, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['name']}\n{r['spec']}" for r in table]
    xs = range(len(table))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(table)), 4))
    ax.bar([x - 0.2 for x in xs], [r["flat"] for r in table], 0.4, label="flat (bitsandbytes)")
    ax.bar([x + 0.2 for x in xs], [r["chosen"] for r in table], 0.4, label="layout picked")
    ax.set_xticks(list(xs), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylim(2.0, max(r["chosen"] for r in table) * 1.005)
    ax.set_ylabel("bytes / parameter (two 8-bit moments)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="four cases (for the tests)")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    table = rows([CASES[i] for i in QUICK] if args.quick else CASES)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "sharded_layout_quick" if args.quick else "sharded_layout"
    md = markdown(table)
    (out / f"{stem}.md").write_text(md)
    (out / f"{stem}.json").write_text(json.dumps(dict(block=BLOCK, mesh=MESH, rows=table),
                                                 indent=1))
    plot(table, out / f"{stem}.png")
    print(md, end="")
    print(f"wrote {out / stem}.{{md,json,png}}")
    return table


if __name__ == "__main__":
    main()
