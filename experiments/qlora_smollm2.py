"""QLoRA on SmolLM2-135M: LoRA over a 16-bit base vs 4-bit bases (NF4, NF4 + double quant,
FP4, int4, LoftQ-NF4), fine-tuned on Shakespeare; and a post-training quantization table.

**(qlora)** SmolLM2-135M-Instruct (``effjax.models.load_smollm2()``) fine-tuned as a
Shakespeare language model: the plays as plain script text, tokenized with SmolLM2's own
tokenizer and cut into windows per play (``experiments.peft_shakespeare.lm_windows``, the
``shakespeare_char`` by-play split: train plays for training, the validation plays held out).
Every run has the SAME adapter config (LoRA on every linear kernel but the (tied) output
projection: q/k/v/o and gate/up/down of the 30 blocks; rank 16, alpha 32 by default, QLoRA's
r = 64, alpha = 16 with ``--gpu``; kaiming A, B = 0, the same key), the same data order, the
same steps and optimizer (Adam, clip 1.0, 10% warm-up then linear decay); only the frozen base
of the 210 adapted kernels differs:

* ``bf16 LoRA``: the float kernels cast to bfloat16 (the 16-bit baseline);
* ``NF4 QLoRA`` / ``NF4+DQ QLoRA`` / ``FP4 QLoRA``: ``quantize_params`` with
  ``NF4(block_size=64)`` without / with double quantization, ``FP4(block_size=64)`` without;
* ``int4-g128 QLoRA``: ``Int4(group_size=128)`` (symmetric, float32 scales); SmolLM2's
  576-wide inputs are 4 groups of 128 and a last group of 64 per row (its own scale);
* ``LoftQ-NF4``: base and factors from ``effjax.compress.loftq_init`` (NF4 + double quant,
  one iteration, as PEFT's default ``loftq_iter=1``), the factors scaled for alpha.

Every quantized base is quantized from the float weights of ``load_smollm2()``, which are
themselves dequantized from the GGUF's Q4_1 blocks (the only published weights the project
ships): the "fp32" model is the Q4_1 model, and 4-bit formats re-quantize an already 4-bit
grid. The embedding (tied output projection) and the norms stay float32 in every run.

The QLoRA models run through ``effjax.nn.adapted_layers``: each layer contracts
``x dequant(W_q) + (x A) B`` with a custom VJP that dequantizes again in the backward pass
(no dense base kept). Reported per run: held-out NLL / perplexity before and after, bytes of
the adapted kernels' base and of the whole frozen model (``quantization_report`` totals), the
compiled step's memory (``jax.jit(step).lower(...).compile().memory_analysis()``: temporaries
+ arguments), and the median step time after the compiling step, as a ratio to bf16 LoRA's.
The runs are interleaved step by step (run 1 step i, run 2 step i, ...), so a shared CPU's
load hits them alike; compare ratios within one run only.

**(ptq)** No fine-tuning: held-out perplexity of SmolLM2 with its linear kernels stored as
fp32, bf16, int8 (per output channel), NF4, NF4 + DQ, FP4, int4-g128 (as above) and the GGUF's
own Q4_1 blocks (``load_smollm2(quantized=True)``), with bits per parameter of the quantized
kernels and of the whole model. Perplexities are computed on the dequantized float32 model
(one compiled forward for all formats); the Q4_1 row is also evaluated through the on-the-fly
quantized layers, as a check. Both parts share one SmolLM2 load.

Run:  python -m experiments.qlora_smollm2 --quick        (1 of 30 blocks, tiny; the test)
      python -m experiments.qlora_smollm2                (CPU defaults, < 30 min on 2 cores)
      python -m experiments.qlora_smollm2 --gpu          (QLoRA's r=64/alpha=16, 1000 steps of
                                                          16 x 256 tokens, 256 eval windows)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from effjax.compress import (
    FP4,
    NF4,
    Int4,
    Int8,
    dense_weight,
    is_quantized,
    loftq_init,
    quantization_report,
    quantize_params,
)
from effjax.compress import materialize as dequantize
from effjax.data import batches
from effjax.nn import adapted_layers
from effjax.peft import LoRA, combine, inject, split, summary
from effjax.selection import path_str
from experiments import _train
from experiments.peft_shakespeare import (
    LM_TARGETS,
    lm_nll,
    lm_windows,
    warmup_linear_decay,
)

NAME = "qlora_smollm2"
TARGETS = LM_TARGETS["all"]  # q/k/v/o + gate/up/down of every block (the embedding is tied)


def _int4_rules(group: int) -> dict:
    """Int4 at ``group`` on every adapted kernel (a row's last group may be shorter: 576 =
    4 x 128 + 64)."""
    return {TARGETS: Int4(group_size=group)}


# name -> rules over the adapted kernels (None: the float kernels, cast by ``dtype``)
FORMATS: dict[str, Callable[[], dict | None]] = {
    "fp32": lambda: None,
    "bf16": lambda: None,
    "int8": lambda: {TARGETS: Int8()},
    "NF4": lambda: {TARGETS: NF4(block_size=64, double_quant=False)},
    "NF4+DQ": lambda: {TARGETS: NF4(block_size=64, double_quant=True)},
    "FP4": lambda: {TARGETS: FP4(block_size=64, double_quant=False)},
    "int4-g128": lambda: _int4_rules(128),
}
LOFTQ_FORMAT = NF4(block_size=64, double_quant=True)

# fine-tuning runs: name -> base (a FORMATS key, or "loftq")
RUNS = {"bf16 LoRA": "bf16", "NF4 QLoRA": "NF4", "NF4+DQ QLoRA": "NF4+DQ", "FP4 QLoRA": "FP4",
        "int4-g128 QLoRA": "int4-g128", "LoftQ-NF4": "loftq"}
PTQ_ROWS = ["fp32", "bf16", "int8", "NF4", "NF4+DQ", "FP4", "int4-g128", "Q4_1 (GGUF)"]


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", nargs="+", default=["qlora", "ptq"], choices=["qlora", "ptq"])
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--eval-windows", type=int, default=32,
                    help="held-out windows, evenly spread over the validation plays")
    ap.add_argument("--eval-batch", type=int, default=8)
    ap.add_argument("--layers", type=int, default=None,
                    help="keep the first N of the 30 blocks (default all; --quick: 2)")
    ap.add_argument("--max-plays", type=int, default=None,
                    help="use only the first N plays of each split (default all; --quick: 2)")
    ap.add_argument("--loftq-iters", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gpu", action="store_true",
                    help="GPU scale: QLoRA's r=64/alpha=16, 1000 steps of 16 x 256 tokens, "
                         "256 eval windows")
    ap.add_argument("--quick", action="store_true",
                    help="tiny settings for the test: 1 block, 2 plays per split, 4 steps of "
                         "2 x 32 tokens")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", default=_train.RESULTS)
    args = ap.parse_args(argv)
    if args.gpu:
        args.rank, args.alpha, args.steps, args.batch, args.seq = 64, 16.0, 1000, 16, 256
        args.eval_windows, args.eval_batch = 256, 16
    if args.quick:
        args.layers, args.max_plays, args.steps, args.batch, args.seq = 1, 2, 4, 2, 32
        args.eval_windows, args.eval_batch, args.lr = 8, 4, 2e-3
    return args


# --- model, data, trees --------------------------------------------------------------------------

def _truncate(model, layers: int | None):
    """Keep the first ``layers`` blocks (the same real weights; quick runs)."""
    if layers is not None:
        if not 1 <= layers <= len(model.layers):
            raise ValueError(f"--layers must be in [1, {len(model.layers)}], got {layers}")
        model.layers = nnx.List(list(model.layers)[:layers])
    return model


def load(args):
    """``(graph, float32 params, Q4_1 params or None, tokenizer, load notes)``: ``graph`` is the
    adapted-layers graph of SmolLM2 (every nnx.Linear reads adapter and quantized nodes).

    The float params are ``load_smollm2()``'s. With ``--quick`` and the ptq part, the GGUF is
    read once (``load_smollm2(quantized=True)``) and the float params are its dequantization,
    which ``load_llama_gguf`` documents (and its tests check) to be the float loader's weights
    bit for bit; the full run reads both and records their largest difference."""
    from effjax.models import load_smollm2

    notes, q41 = {}, None
    t0 = time.perf_counter()
    if "ptq" in args.part:
        loaded = load_smollm2(quantized=True)
        qmodel = adapted_layers(_truncate(loaded.model, args.layers), copy=False)
        qgraph, qstate = nnx.split(qmodel)
        q41 = nnx.to_pure_dict(qstate)
    if q41 is not None and args.quick:
        graph, params = qgraph, dequantize(q41)
        notes["float_params"] = "dequantized from load_smollm2(quantized=True) (quick)"
    else:
        loaded = load_smollm2()
        graph, state = nnx.split(adapted_layers(_truncate(loaded.model, args.layers),
                                                copy=False))
        params = nnx.to_pure_dict(state)
        notes["float_params"] = "load_smollm2()"
        if q41 is not None:
            notes["max_abs_diff_q4_1_vs_float"] = float(max(
                jnp.abs(a - b).max() for a, b in zip(jax.tree.leaves(dequantize(q41)),
                                                     jax.tree.leaves(params))))
    notes["load_s"] = time.perf_counter() - t0
    return graph, params, q41, loaded.tokenizer, notes


def data(tokenizer, args):
    """Training windows (train plays) and ``eval_windows`` held-out windows evenly spread over
    the validation plays, each ``seq + 1`` tokens."""
    train = lm_windows(tokenizer, "train", args.seq, args.max_plays)
    val_all = lm_windows(tokenizer, "validation", args.seq, args.max_plays)
    n = min(args.eval_windows, len(val_all)) // args.eval_batch * args.eval_batch
    pick = np.linspace(0, len(val_all) - 1, n).round().astype(int)
    return train, val_all[pick], len(val_all)


def base_tree(params: dict, fmt: str) -> dict:
    """The frozen base for one row: ``params`` with the adapted kernels cast (fp32, bf16) or
    quantized by ``quantize_params`` (every other leaf unchanged)."""
    rules = FORMATS[fmt]()
    if rules is None:
        dt = jnp.bfloat16 if fmt == "bf16" else jnp.float32
        return _map_targets(params, lambda w: w.astype(dt))
    return quantize_params(params, rules)


def _map_targets(tree, fn):
    pattern = re.compile(TARGETS)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: fn(x) if pattern.fullmatch(path_str(p)) else x, tree,
        is_leaf=is_quantized)


def loftq_tree(params: dict, args) -> tuple[dict, dict]:
    """``(LoftQ base, LoRA tree)``: each adapted kernel's ``(q, a, b)`` from ``loftq_init``,
    put into the nodes ``inject`` builds over ``q`` (same config as every run)."""
    qa, qb = {}, {}

    def q_of(path, w):
        q, a, b = loftq_init(w, LOFTQ_FORMAT, rank=args.rank, iters=args.loftq_iters,
                             alpha=args.alpha)
        qa[path], qb[path] = a, b
        return q

    pattern = re.compile(TARGETS)
    base = jax.tree_util.tree_map_with_path(
        lambda p, x: q_of(path_str(p), x) if pattern.fullmatch(path_str(p)) else x, params)
    tree = inject(base, {TARGETS: lora(args)}, key=jax.random.key(args.seed))

    def put(p, node):
        k = path_str(p)
        if k in qa:
            return dataclasses.replace(node, a=qa[k].astype(node.a.dtype),
                                       b=qb[k].astype(node.b.dtype))
        return node
    tree = jax.tree_util.tree_map_with_path(put, tree, is_leaf=_is_adapter)
    return base, tree


def _is_adapter(x) -> bool:
    return hasattr(x, "low_rank_factors")


def lora(args) -> LoRA:
    return LoRA(rank=args.rank, alpha=args.alpha)


def weight_bytes(tree) -> dict:
    """Bytes and parameter counts of the adapted kernels' base and of the whole frozen model
    (the totals of ``quantization_report``, checked against its printed total)."""
    pattern = re.compile(TARGETS)
    n_k = b_k = n_all = b_all = 0
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)[0]
    for p, x in flat:
        n = x.size if is_quantized(x) else int(np.size(x))
        b = x.nbytes if is_quantized(x) else n * x.dtype.itemsize
        if pattern.fullmatch(path_str(p)):
            n_k, b_k = n_k + n, b_k + b
        n_all, b_all = n_all + n, b_all + b
    total_line = next(ln for ln in quantization_report(tree).splitlines()
                      if ln.startswith("total"))
    if int(total_line.split()[-1]) != b_all:
        raise AssertionError(f"bytes {b_all} differ from quantization_report's {total_line}")
    return {"kernel_params": n_k, "kernel_bytes": b_k, "kernel_bits": 8 * b_k / n_k,
            "model_params": n_all, "model_bytes": b_all, "model_bits": 8 * b_all / n_all}


# --- evaluation ----------------------------------------------------------------------------------

def dense_f32(tree):
    """Every kernel as a dense float32 array: quantized ones dequantized, LoRA nodes as
    ``dequant(W) + s A B`` summed in float32 (``peft.materialize`` would round the sum to the
    base's dtype, bf16 for the baseline)."""
    def conv(x):
        if _is_adapter(x):
            return (dense_weight(x.w).astype(jnp.float32) + x.delta().astype(jnp.float32))
        return dense_weight(x).astype(jnp.float32)
    return jax.tree.map(conv, tree, is_leaf=lambda x: _is_adapter(x) or is_quantized(x))


class Evaluator:
    """Mean next-token NLL over the held-out windows, on a dense float32 tree (one compile for
    every row of both tables)."""

    def __init__(self, graph, val: np.ndarray, batch: int):
        self.val, self.batch = val, batch
        self.fn = jax.jit(lambda p, t: lm_nll(nnx.merge(graph, p), t))

    def __call__(self, tree, dense: bool = True) -> float:
        p = dense_f32(tree) if dense else tree
        vals = [float(self.fn(p, self.val[i:i + self.batch]))
                for i in range(0, len(self.val), self.batch)]
        return float(np.mean(vals))


# --- fine-tuning ---------------------------------------------------------------------------------

def make_step(graph, opt):
    def loss_fn(tr, fr, tokens):
        return lm_nll(nnx.merge(graph, combine(tr, fr)), tokens)

    def step(tr, st, fr, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(tr, fr, tokens)
        updates, st = opt.update(grads, st, tr)
        return optax.apply_updates(tr, updates), st, loss
    return jax.jit(step, donate_argnums=(0, 1))


def memory(compiled) -> dict:
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("temp", "argument", "output",
                                                                  "alias")}
    out["peak"] = out["temp"] + out["argument"]
    return out


def part_qlora(args, graph, params, train, val, evaluate, ptq_nll: dict) -> dict:
    from tqdm.auto import tqdm

    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adam(warmup_linear_decay(args.lr, args.steps)))
    step = make_step(graph, opt)
    tokens0 = jnp.asarray(train[:args.batch])
    runs = {}
    for name in args.runs:
        t0 = time.perf_counter()
        kind = RUNS[name]
        if kind == "loftq":
            base, tree = loftq_tree(params, args)
        else:
            base = base_tree(params, kind)
            tree = inject(base, {TARGETS: lora(args)}, key=jax.random.key(args.seed))
        prep_s = time.perf_counter() - t0
        tr, fr = split(tree)
        st = opt.init(tr)
        t0 = time.perf_counter()
        compiled = step.lower(tr, st, fr, tokens0).compile()
        compile_s = time.perf_counter() - t0
        before = ptq_nll.get(kind)
        if before is None:  # LoftQ (B != 0), or a format the ptq part did not evaluate
            before = evaluate(tree)
        runs[name] = {"tr": tr, "st": st, "fr": fr, "step": compiled, "losses": [],
                      "times": [], "row": {
                          "run": name, "base": kind, "nll_before": before,
                          "trainable": summary(tree).trainable, "prep_s": prep_s,
                          "compile_s": compile_s, "memory": memory(compiled),
                          **weight_bytes(base)}}
        print(f"  {name}: prepared in {prep_s:.1f} s, compiled in {compile_s:.1f} s, "
              f"held-out NLL before {before:.4f}", flush=True)
    it = batches({"tokens": train}, args.batch, seed=args.seed, epochs=None)
    for _ in tqdm(range(args.steps), desc="  steps (all runs)", disable=args.no_progress):
        tokens = jnp.asarray(next(it)["tokens"])  # the same batch for every run
        for r in runs.values():
            t0 = time.perf_counter()
            r["tr"], r["st"], loss = r["step"](r["tr"], r["st"], r["fr"], tokens)
            r["losses"].append(float(loss))
            r["times"].append(time.perf_counter() - t0)
    rows = []
    for r in runs.values():
        row = r["row"]
        row["nll_after"] = evaluate(combine(r["tr"], r["fr"]))
        row["ppl_before"], row["ppl_after"] = math.exp(row["nll_before"]), math.exp(
            row["nll_after"])
        row["train_losses"] = r["losses"]
        row["step_ms"] = 1e3 * statistics.median(r["times"][1:] if len(r["times"]) > 1
                                                 else r["times"])
        rows.append(row)
    ref = next((r for r in rows if r["run"] == "bf16 LoRA"), None)
    for row in rows:
        row["step_ratio"] = row["step_ms"] / ref["step_ms"] if ref else None
        row["kernel_bytes_ratio"] = row["kernel_bytes"] / ref["kernel_bytes"] if ref else None
        row["temp_ratio"] = (row["memory"]["temp"] / ref["memory"]["temp"]) if ref else None
        row["peak_ratio"] = (row["memory"]["peak"] / ref["memory"]["peak"]) if ref else None
    return {"rows": rows, "tokens_per_step": args.batch * args.seq}


# --- post-training quantization ------------------------------------------------------------------

def part_ptq(args, graph, params, q41, evaluate) -> dict:
    rows = []
    for name in PTQ_ROWS:
        t0 = time.perf_counter()
        tree = q41 if name == "Q4_1 (GGUF)" else base_tree(params, name)
        nll = evaluate(tree)
        row = {"format": name, "nll": nll, "ppl": math.exp(nll), **weight_bytes(tree),
               "eval_s": time.perf_counter() - t0}
        if name == "Q4_1 (GGUF)":  # through the quantized layers (no dense kernels)
            row["nll_on_the_fly"] = evaluate(q41, dense=False)
        rows.append(row)
        print(f"  {name}: NLL {nll:.4f}, ppl {math.exp(nll):.2f}, "
              f"{row['kernel_bits']:.3f} bits/param (kernels)", flush=True)
    return {"rows": rows}


# --- report --------------------------------------------------------------------------------------

MB = 1e6


def table_qlora(res) -> str:
    header = ["run", "base of the adapted kernels", "held-out NLL before", "after",
              "ppl before", "ppl after", "kernel MB (x bf16)", "model MB",
              "step temp MB (x bf16)", "step peak MB = args + temp (x bf16)",
              "median step ms", "step time / bf16 LoRA"]
    body = []
    for r in res["rows"]:
        m = r["memory"]
        x = (lambda v: "" if v is None else f" ({v:.3f}x)")
        body.append([r["run"], _base_name(r["base"]), f"{r['nll_before']:.4f}",
                     f"{r['nll_after']:.4f}", f"{r['ppl_before']:.2f}", f"{r['ppl_after']:.2f}",
                     f"{r['kernel_bytes'] / MB:.2f}{x(r['kernel_bytes_ratio'])}",
                     f"{r['model_bytes'] / MB:.2f}",
                     f"{m['temp'] / MB:.1f}{x(r['temp_ratio'])}",
                     f"{m['peak'] / MB:.1f}{x(r['peak_ratio'])}",
                     f"{r['step_ms']:.0f}",
                     "-" if r["step_ratio"] is None else f"{r['step_ratio']:.2f}"])
    return _train.markdown_table(header, body)


def _base_name(kind: str) -> str:
    return {"bf16": "bf16", "NF4": "NF4 b64", "NF4+DQ": "NF4 b64 + DQ", "FP4": "FP4 b64",
            "int4-g128": "int4 sym g128",
            "loftq": "NF4 b64 + DQ (LoftQ)"}.get(kind, kind)


def table_ptq(res) -> str:
    header = ["format", "bits/param (adapted kernels)", "bits/param (whole model)",
              "model MB", "held-out NLL", "perplexity", "ppl / fp32"]
    fp32 = next((r["ppl"] for r in res["rows"] if r["format"] == "fp32"), None)
    body = [[r["format"], f"{r['kernel_bits']:.3f}", f"{r['model_bits']:.3f}",
             f"{r['model_bytes'] / MB:.2f}", f"{r['nll']:.4f}", f"{r['ppl']:.3f}",
             f"{r['ppl'] / fp32:.4f}" if fp32 else "-"] for r in res["rows"]]
    return _train.markdown_table(header, body)


def conclusions(result) -> list[str]:
    """The paper's claims, tested with this run's numbers (and the issue's targets)."""
    out = []
    q = {r["run"]: r for r in result.get("qlora", {}).get("rows", [])}
    if "bf16 LoRA" in q and "NF4 QLoRA" in q:
        lo, nf = q["bf16 LoRA"], q["NF4 QLoRA"]
        d = nf["nll_after"] - lo["nll_after"]
        gain_lo = lo["nll_before"] - lo["nll_after"]
        verdict = ("matches" if abs(d) <= max(0.01, 0.1 * abs(gain_lo)) else
                   "does not match")
        out.append(f"NF4 QLoRA vs 16-bit LoRA: held-out NLL after {nf['nll_after']:.4f} vs "
                   f"{lo['nll_after']:.4f} (difference {d:+.4f} nats; ppl "
                   f"{nf['ppl_after']:.2f} vs {lo['ppl_after']:.2f}; LoRA's own gain "
                   f"{gain_lo:.4f} nats): NF4 QLoRA {verdict} bf16 LoRA here (criterion: "
                   f"|difference| <= max(0.01, 10% of LoRA's gain)). Before training the gap "
                   f"was {nf['nll_before'] - lo['nll_before']:+.4f} (quantization alone; the float "
                       f"base is itself the dequantized Q4_1 model, so NF4 re-quantizes a "
                       f"4-bit grid).")
        if "NF4+DQ QLoRA" in q:
            dq = q["NF4+DQ QLoRA"]
            out.append(f"Double quantization: NLL after {dq['nll_after']:.4f} vs "
                       f"{nf['nll_after']:.4f} without, for {dq['kernel_bits']:.3f} vs "
                       f"{nf['kernel_bits']:.3f} bits per parameter.")
    if "LoftQ-NF4" in q and "NF4+DQ QLoRA" in q:
        lq, dq = q["LoftQ-NF4"], q["NF4+DQ QLoRA"]
        out.append(f"LoftQ-NF4 vs NF4+DQ QLoRA (same base format and bytes): NLL before "
                   f"{lq['nll_before']:.4f} vs {dq['nll_before']:.4f}, after "
                   f"{lq['nll_after']:.4f} vs {dq['nll_after']:.4f}.")
    if "NF4 QLoRA" in q and "FP4 QLoRA" in q:
        nf, fp = q["NF4 QLoRA"], q["FP4 QLoRA"]
        for when, key in (("before", "nll_before"), ("after", "nll_after")):
            d = fp[key] - nf[key]
            out.append(f"NF4 vs FP4 {when} fine-tuning (same bytes): NLL {nf[key]:.4f} vs "
                       f"{fp[key]:.4f}: NF4 {'beats' if d > 0 else 'does not beat'} FP4 "
                       f"(by {d:+.4f} nats).")
    if "bf16 LoRA" in q:
        ref = q["bf16 LoRA"]
        for name, r in q.items():
            if name == "bf16 LoRA":
                continue
            if r["base"] in ("NF4+DQ", "loftq"):  # the bytes target: NF4 + DQ's
                target = (f"target <= 0.26x "
                          f"{'met' if r['kernel_bytes_ratio'] <= 0.26 else 'NOT met'}")
            else:
                target = "no double quantization: the 0.26x target is NF4+DQ's"
            out.append(f"{name}: adapted kernels {r['kernel_bytes_ratio']:.4f}x bf16 bytes "
                       f"({r['kernel_bits']:.3f} bits/param; {target}); step "
                       f"temporaries {r['memory']['temp'] / MB:.1f} MB vs "
                       f"{ref['memory']['temp'] / MB:.1f} MB (target <= bf16 LoRA's "
                       f"{'met' if r['memory']['temp'] <= ref['memory']['temp'] else 'NOT met'}"
                       f"); step time {r['step_ratio']:.2f}x (target <= 1.25x on CPU "
                       f"{'met' if r['step_ratio'] <= 1.25 else 'NOT met'}).")
    p = {r["format"]: r for r in result.get("ptq", {}).get("rows", [])}
    if p:
        order = sorted((r for r in p.values() if r["format"] not in ("fp32",)),
                       key=lambda r: r["ppl"])
        out.append("PTQ, perplexity from best to worst: " + ", ".join(
            f"{r['format']} {r['ppl']:.2f}" for r in order) + (
            f" (fp32 {p['fp32']['ppl']:.2f})" if "fp32" in p else "") + ".")
        if "NF4" in p and "FP4" in p:
            out.append(f"PTQ NF4 vs FP4: ppl {p['NF4']['ppl']:.3f} vs {p['FP4']['ppl']:.3f} "
                       f"({'NF4 better' if p['NF4']['ppl'] < p['FP4']['ppl'] else 'FP4 better'}"
                       f").")
        if "Q4_1 (GGUF)" in p:
            r = p["Q4_1 (GGUF)"]
            diff = result.get("load", {}).get("max_abs_diff_q4_1_vs_float")
            out.append("Q4_1 (the GGUF's own blocks): the float weights ARE its dequantization"
                       + (f" (max |difference| {diff:.1e})" if diff is not None else "")
                       + f", so its ppl equals fp32's by construction; through the on-the-fly "
                       f"quantized layers: NLL {r['nll_on_the_fly']:.5f} vs {r['nll']:.5f} "
                       f"dense.")
    return out


def main(argv=None) -> dict:
    args = parse(argv)
    command = "python -m experiments.qlora_smollm2 " + " ".join(
        argv if argv is not None else sys.argv[1:])
    t_start = time.perf_counter()
    graph, params, q41, tokenizer, notes = load(args)
    train, val, n_val_all = data(tokenizer, args)
    evaluate = Evaluator(graph, val, args.eval_batch)
    print(f"SmolLM2-135M ({len(params['layers'])} blocks), {len(train):,} training windows of "
          f"{args.seq} tokens, {len(val)} of {n_val_all} held-out windows; {_train.machine()}",
          flush=True)
    result = {}
    ptq_nll = {}
    if "ptq" in args.part:
        t0 = time.perf_counter()
        result["ptq"] = part_ptq(args, graph, params, q41, evaluate)
        result["ptq"]["wall_s"] = time.perf_counter() - t0
        ptq_nll = {r["format"]: r["nll"] for r in result["ptq"]["rows"]}
        print("\n" + table_ptq(result["ptq"]) + "\n")
    if "qlora" in args.part:
        t0 = time.perf_counter()
        result["qlora"] = part_qlora(args, graph, params, train, val, evaluate, ptq_nll)
        result["qlora"]["wall_s"] = time.perf_counter() - t0
        print("\n" + table_qlora(result["qlora"]) + "\n")
    result["load"] = notes
    result["conclusions"] = conclusions(result)
    print("\n".join(result["conclusions"]))
    result.update({"command": command.strip(), "machine": _train.machine(),
                   "jax": jax.__version__, "wall_s": time.perf_counter() - t_start,
                   "load": notes, "n_train_windows": len(train), "n_val_windows": len(val),
                   "settings": {k: v for k, v in vars(args).items()
                                if k not in ("out", "no_progress")}})
    report(result, args)
    return result


def report(result, args):
    suffix = "_quick" if args.quick else ""
    os.makedirs(args.out, exist_ok=True)
    s = result["settings"]
    lines = [f"# QLoRA on SmolLM2-135M{' (quick)' if args.quick else ''}", "",
             f"Command: `{result['command']}`", "",
             f"Machine: {result['machine']}; wall time {result['wall_s'] / 60:.1f} min", "",
             f"Settings: `{s}`", "",
             "SmolLM2-135M-Instruct as loaded by `effjax.models.load_smollm2()`: its float "
             "weights are the dequantized Q4_1 blocks of the GGUF (the fp32 model IS the Q4_1 "
             "model); every other base is quantized from them by `quantize_params`. Embedding "
             "(tied output projection) and norms stay float32 in every row. Held-out: "
             f"{result['n_val_windows']} windows of {s['seq']} tokens evenly spread over the "
             "validation plays; NLL in nats per token.", ""]
    if "ptq" in result:
        lines += ["## Post-training quantization (no fine-tuning)", "",
                  table_ptq(result["ptq"]), "",
                  "Bits per parameter count codes, scales, nested statistics (and mins); "
                  "\"whole model\" adds the float32 embedding and norms. Perplexity of the "
                  "dequantized float32 model (Q4_1 also through the on-the-fly layers, see "
                  "below).", ""]
    if "qlora" in result:
        q = result["qlora"]
        lines += ["## Fine-tuning: LoRA over a 16-bit base vs QLoRA", "",
                  f"LoRA r={s['rank']}, alpha={s['alpha']:g} on every linear kernel of the "
                  f"{len(q['rows']) and 'model'} but the tied output projection "
                  f"(`{TARGETS}`); {s['steps']} steps of {s['batch']} x {s['seq']} tokens, "
                  f"the same batches for every run, Adam LR {s['lr']:g} (10% warm-up, linear "
                  f"decay, clip 1.0), compute in float32.", "",
                  table_qlora(q), "",
                  "Kernel MB: the adapted kernels' frozen base (codes + scales + nested "
                  "statistics); model MB: the whole frozen model (`quantization_report` "
                  "total; adapters excluded). Step memory from "
                  "`jax.jit(step, donate_argnums=(0, 1)).lower(...).compile()"
                  ".memory_analysis()`: temporaries, and arguments (frozen base, adapters, "
                  "Adam state, batch) + temporaries. Step times: medians after the compiling "
                  "step, runs interleaved step by step; on a shared CPU compare ratios only.",
                  ""]
    lines += ["## Conclusions (this run's numbers)", "",
              *[f"- {c}" for c in result["conclusions"]], ""]
    with open(os.path.join(args.out, f"{NAME}{suffix}.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(args.out, f"{NAME}{suffix}.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    plot(result, os.path.join(args.out, f"{NAME}{suffix}.png"))


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("qlora", "ptq") if k in result]
    n = len(panels) + ("qlora" in result)
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4.5), squeeze=False)
    axes = list(axes[0])
    if "qlora" in result:
        rows = result["qlora"]["rows"]
        ax = axes.pop(0)
        w = max(1, len(rows[0]["train_losses"]) // 10)
        for i, r in enumerate(rows):
            curve = _train.smooth(r["train_losses"], w)
            ax.plot(np.arange(len(curve)) + w, curve, lw=1, color=f"C{i}", label=r["run"])
            ax.scatter([len(r["train_losses"])], [r["nll_after"]], color=f"C{i}", marker="x")
        ax.set_xlabel("step")
        ax.set_ylabel(f"train NLL (mean of {w} steps); x: held-out after")
        ax.set_title("SmolLM2-135M on Shakespeare: LoRA vs QLoRA")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        ax = axes.pop(0)
        for i, r in enumerate(rows):
            ax.scatter([r["memory"]["peak"] / MB], [r["nll_after"]], color=f"C{i}",
                       label=f"{r['run']} ({r['kernel_bits']:.2f} bits)")
            ax.annotate("", xy=(r["memory"]["peak"] / MB, r["nll_after"]),
                        xytext=(r["memory"]["peak"] / MB, r["nll_before"]),
                        arrowprops=dict(arrowstyle="->", color=f"C{i}", lw=0.8))
        ys = [r[k] for r in rows for k in ("nll_before", "nll_after")]
        pad = 0.05 * (max(ys) - min(ys) or 1.0)
        ax.set_ylim(min(ys) - pad, max(ys) + pad)
        ax.set_xlabel("compiled step: arguments + temporaries (MB)")
        ax.set_ylabel("held-out NLL (arrow: before -> after)")
        ax.set_title("held-out NLL vs step memory")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if "ptq" in result:
        ax = axes.pop(0)
        rows = result["ptq"]["rows"]
        for i, r in enumerate(rows):
            ax.scatter([r["kernel_bits"]], [r["ppl"]], color=f"C{i}",
                       label=f"{r['format']} ({r['model_bits']:.2f} bits whole model)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bits per parameter of the linear kernels (log2)")
        ax.set_ylabel("held-out perplexity")
        ax.set_title("SmolLM2-135M post-training quantization")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
