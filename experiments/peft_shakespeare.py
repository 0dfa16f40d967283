"""PEFT methods on Shakespeare: (a) genre classification with all-MiniLM-L6-v2, (b) LoRA on
SmolLM2-135M as a Shakespeare language model.

(a) ``shakespeare_genre`` (dialogue lines labelled comedy / history / tragedy, split by play):
the real all-MiniLM-L6-v2 encoder, mean pooling over the real tokens of each line, and a new
linear head ``384 -> 3`` (``Unfreeze``, trained in every run). The encoder is adapted with each
method of :data:`METHODS` (rules on its kernels; the rest frozen), from the same initial head
(N(0, 0.02^2), bias 0), on the same class-balanced subset of training lines in the same order,
with the same steps, batch and seed. Reported per method: validation and test accuracy (on
class-balanced subsets of the held-out plays), trainable parameters
(:func:`effjax.peft.summary`), the median training-step time and its ratio to full fine-tuning.
Optimizer: Adam (no weight decay), global-norm clipping at 1.0, linear warm-up over 10% of the
steps then linear decay to 0; the head always at :data:`HEAD_LR`, the encoder's trainable
params at the learning rate of the method's family (:data:`LR`).

(b) SmolLM2-135M-Instruct (real weights) with LoRA on the attention q/v kernels (``--lm-targets
all``: every linear kernel) trained on Shakespeare's plays as plain script text
(``effjax.data.shakespeare.play_texts``, the same by-play split as ``shakespeare_char``),
tokenized with SmolLM2's own tokenizer and cut into fixed windows per play. Reported:
validation perplexity before and after, trainable params, median step time.

Step times are wall-clock medians after the first (compiling) step on whatever machine runs the
script; on a shared CPU they are noisy, so compare ratios within one run only.

Run:  python -m experiments.peft_shakespeare --quick                (1-2 min on CPU; the tests)
      python -m experiments.peft_shakespeare                        (a) small CPU scale, 6 min
                                                                     + (b) CPU medium, 4 min
      python -m experiments.peft_shakespeare --part a --train-lines 2400 --steps 150 --batch 32
                                          (a) as in results/peft_shakespeare.md, 13 min on CPU
      python -m experiments.peft_shakespeare --part b --lm-gpu      (b) at GPU scale
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from effjax.data import batches, load_shakespeare_genre_source
from effjax.models.bert import mean_pool
from effjax.peft import (
    EVA,
    NOLA,
    CorDA,
    DoRA,
    LaMDA,
    LoLDU,
    LoRA,
    LoRASB,
    LoRAXS,
    MiSS,
    MoS,
    RandLoRA,
    SVFit,
    Unfreeze,
    VeRA,
    WeLore,
    combine,
    inject,
    materialize,
    split,
    summary,
    welore_rules,
)
from experiments import _train

NAME = "peft_shakespeare"
NUM_CLASSES = 3

# Encoder kernels the adapters target (regexes relative to the encoder's params).
TARGETS = {
    "qv": r"layers/\d+/(query|value)/kernel",
    "all": r"layers/\d+/(query|key|value|attention_out|intermediate|output)/kernel",
}
# Learning rate of the encoder's trainable params, per method family (the head: HEAD_LR).
LR = {
    "full": 5e-5,      # BERT fine-tuning's usual 2e-5 .. 5e-5 (Devlin et al. 2019)
    "low-rank": 5e-4,  # LoRA's RoBERTa-base GLUE runs use 4e-4 .. 5e-4 (Hu et al. 2021)
    "vector": 5e-3,    # VeRA / NOLA train a few scalars per layer: 10x higher (their papers)
}
# The new head, in every run: VeRA's RoBERTa-base GLUE runs give the head its own LR of 4e-3 ..
# 1e-2; 5e-3 was picked from {1e-3, 5e-3, 2e-2} on the head-only run (100 steps of 16).
HEAD_LR = 5e-3


@dataclasses.dataclass(frozen=True)
class Method:
    """One row of the table.

    ``rules(targets)`` returns encoder-relative rules ``{regex: method}`` for the target regex;
    the experiment prefixes them with ``encoder/`` and adds the head's ``Unfreeze``. Methods
    whose config has ``calibration = "inputs"`` or ``"gradients"`` (EVA, CorDA, LoRA-SB) get
    their data from :func:`calibration_data` automatically.
    """

    rules: Callable[..., dict]
    family: str  # key of LR; None-like "head" for the head-only baseline
    needs_params: bool = False  # rules(targets, encoder_params): ranks chosen from the weights

    @property
    def lr(self) -> float:
        return LR.get(self.family, 0.0)


# New methods are one line each. Families: "low-rank" for methods training factors of rank r,
# "vector" for those training a few scalars / an r x r core per kernel (10x the LR).
METHODS: dict[str, Method] = {
    "head only": Method(lambda t: {}, "head"),
    "full FT": Method(lambda t: {r"(embeddings|layers)/.*": Unfreeze()}, "full"),
    "LoRA": Method(lambda t: {t: LoRA(rank=8, alpha=16)}, "low-rank"),
    "rsLoRA": Method(lambda t: {t: LoRA(rank=8, alpha=16, rslora=True)}, "low-rank"),
    "PiSSA": Method(lambda t: {t: LoRA(rank=8, alpha=16, init="pissa")}, "low-rank"),
    "OLoRA": Method(lambda t: {t: LoRA(rank=8, alpha=16, init="olora")}, "low-rank"),
    "DoRA": Method(lambda t: {t: DoRA(rank=8, alpha=16)}, "low-rank"),
    "VeRA": Method(lambda t: {t: VeRA(rank=256)}, "vector"),
    "NOLA": Method(lambda t: {t: NOLA(rank=8, alpha=16, num_basis_a=1024, num_basis_b=1024)},
                   "vector"),
    "RandLoRA": Method(lambda t: {t: RandLoRA(rank=32)}, "low-rank"),  # PEFT defaults
    "MiSS": Method(lambda t: {t: MiSS(rank=64)}, "low-rank"),  # PEFT default r = 64
    # MoS shares its pool across the slices of a stacked kernel; on these unstacked kernels each
    # layer has its own pool (L = 1, so rank <= pool_rank): LoRA-like, no sharing saving
    "MoS": Method(lambda t: {t: MoS(rank=8, pool_rank=8, alpha=16)}, "low-rank"),
    "SVFit": Method(lambda t: {t: SVFit(rank=8)}, "vector"),
    "LoLDU": Method(lambda t: {t: LoLDU(rank=8)}, "vector"),
    "LoRA-XS": Method(lambda t: {t: LoRAXS(rank=8)}, "vector"),
    # initialized from the first full-FT Adam step (lr: full FT's) on the calibration batches
    "LoRA-SB": Method(lambda t: {t: LoRASB(rank=8, lr=5e-5)}, "vector"),
    "LaMDA": Method(lambda t: {t: LaMDA(rank=8)}, "low-rank"),  # no lamda_freeze schedule
    "EVA": Method(lambda t: {t: EVA(rank=8, alpha=16)}, "low-rank"),  # uniform ranks
    "CorDA": Method(lambda t: {t: CorDA(rank=8, alpha=16)}, "low-rank"),  # IPA
    # WeLore compresses: targeted kernels whose spectrum allows it become trainable low-rank
    # factors (ranks from the singular-value tail at a 50% rank reduction)
    "WeLore": Method(lambda t, p: welore_rules(p, {t: WeLore()}, reduction=0.5), "low-rank",
                     needs_params=True),
}


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", nargs="+", default=["a", "b"], choices=["a", "b"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--targets", default="qv", choices=list(TARGETS))
    ap.add_argument("--train-lines", type=int, default=1800, help="balanced: / 3 per genre")
    ap.add_argument("--eval-lines", type=int, default=900, help="per held-out split, balanced")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=24,
                    help="tokens per line incl. [CLS]/[SEP] (99.9%% of lines have <= 21, the "
                         "longest ~26; the number of lines cut is reported)")
    ap.add_argument("--calib-batches", type=int, default=4,
                    help="batches for data-driven inits (EVA, CorDA, LoRA-SB)")
    ap.add_argument("--seed", type=int, default=0)
    # (b)
    ap.add_argument("--lm-targets", default="qv", choices=["qv", "all"])
    ap.add_argument("--lm-steps", type=int, default=40)
    ap.add_argument("--lm-batch", type=int, default=4)
    ap.add_argument("--lm-seq", type=int, default=128)
    ap.add_argument("--lm-eval-windows", type=int, default=64)
    ap.add_argument("--lm-lr", type=float, default=2e-4)
    ap.add_argument("--lm-gpu", action="store_true",
                    help="GPU scale for (b): 1000 steps, batch 16, 256 tokens, 256 eval windows")
    ap.add_argument("--quick", action="store_true", help="tiny settings (tests, 1-2 min on CPU)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", default=_train.RESULTS)
    args = ap.parse_args(argv)
    if args.lm_gpu:
        args.lm_steps, args.lm_batch, args.lm_seq, args.lm_eval_windows = 1000, 16, 256, 256
    if args.quick:
        args.train_lines, args.eval_lines, args.steps, args.batch = 48, 24, 4, 8
        args.calib_batches = 1
        args.lm_steps, args.lm_batch, args.lm_seq, args.lm_eval_windows = 5, 2, 32, 8
        args.lm_lr = 1e-3
    return args


# --- (a) data -----------------------------------------------------------------------------------

def balanced_lines(split: str, per_class: int, seed: int) -> tuple[list[str], np.ndarray]:
    """``per_class`` random lines of each genre from ``split``: the stored records are shuffled
    (TFDS shuffles on write), so their prefix is read until every genre has enough, then
    ``per_class`` of each are drawn with ``default_rng([seed, genre])``."""
    source, _ = load_shakespeare_genre_source(split)
    texts, labels, start, chunk = [], [], 0, max(1024, 8 * per_class)
    while start < len(source) and min(np.bincount(labels, minlength=NUM_CLASSES)) < per_class:
        recs = source.__getitems__(list(range(start, min(start + chunk, len(source)))))
        texts += [r["text"].decode() for r in recs]
        labels += [int(r["label"]) for r in recs]
        start += chunk
    labels = np.array(labels)
    picked = []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise ValueError(f"{split} has only {len(idx)} lines of class {c}, need {per_class}")
        picked += list(np.random.default_rng([seed, c]).choice(idx, per_class, replace=False))
    picked = np.sort(np.array(picked))
    return [texts[i] for i in picked], labels[picked]


def tokenize(minilm, texts: list[str], max_len: int) -> dict[str, np.ndarray]:
    """``ids``/``mask`` int32 ``(N, max_len)``, right padded (``[SEP]`` kept when cut)."""
    enc = minilm.tokenizer.encode_batch(texts)
    ids = np.zeros((len(texts), max_len), np.int32)
    truncated = 0
    for i, e in enumerate(enc):
        row = list(e.ids[:int(sum(e.attention_mask))])
        if len(row) > max_len:
            row, truncated = row[:max_len - 1] + row[-1:], truncated + 1
        ids[i, :len(row)] = row
    return {"ids": ids, "mask": (ids != minilm.config.pad_token_id).astype(np.int32),
            "truncated": truncated}


# --- (a) model ----------------------------------------------------------------------------------

def classifier_params(minilm, seed: int) -> tuple[object, dict]:
    """``(encoder graphdef, {'encoder': pure-dict params, 'head': {'kernel', 'bias'}})``."""
    graph, state = nnx.split(minilm.model)
    hidden = minilm.config.hidden_size
    head = {"kernel": 0.02 * jax.random.normal(jax.random.key(seed), (hidden, NUM_CLASSES)),
            "bias": jnp.zeros((NUM_CLASSES,))}
    return graph, {"encoder": nnx.to_pure_dict(state), "head": head}


def logits_fn(graph, params: dict, batch: dict) -> jax.Array:
    """Head on the mean of the encoder's last hidden states over real tokens."""
    encoder = nnx.merge(graph, params["encoder"])
    hidden = encoder(batch["ids"], batch["mask"])
    pooled = mean_pool(hidden, batch["mask"])
    return pooled @ params["head"]["kernel"] + params["head"]["bias"]


def build_rules(method: Method, targets: str, params: dict | None = None) -> dict:
    """The full rules of one method: encoder rules prefixed with ``encoder/``, then the head
    (``params``: the classifier's params, needed by methods that pick ranks from weights)."""
    if method.needs_params:
        if params is None:
            raise ValueError("this method chooses its ranks from the weights: pass params")
        enc = method.rules(TARGETS[targets], params["encoder"])
    else:
        enc = method.rules(TARGETS[targets])
    rules = {f"encoder/{k}": v for k, v in enc.items()}
    return {**rules, r"head/.*": Unfreeze()}


def calibration_data(rules: dict, graph, params: dict, data: Iterable[dict]) -> dict | None:
    """The ``calibration`` argument of :func:`effjax.peft.inject` for data-driven methods.

    For rules whose method declares ``calibration = "inputs"`` (EVA, CorDA): input statistics
    of the targeted encoder layers over ``data`` (:func:`effjax.peft.calibrate`,
    padding masked out). For ``"gradients"`` (LoRA-SB): the mean over ``data`` of the
    cross-entropy gradient of each targeted dense kernel (with the initial head). None when
    no rule needs data.
    """
    kinds = {getattr(m, "calibration", None) for m in rules.values() if m is not None} - {None}
    if not kinds:
        return None
    data = list(data)
    out = {}
    enc_rules = {k[len("encoder/"):]: v for k, v in rules.items() if k.startswith("encoder/")}
    if "inputs" in kinds:
        from effjax.peft import calibrate
        stats = calibrate(nnx.merge(graph, params["encoder"]), data, targets=enc_rules,
                          forward=lambda m, b: m(b["ids"], b["mask"]), mask=lambda b: b["mask"])
        out.update({f"encoder/{p}": s for p, s in stats.items()})
    if "gradients" in kinds:
        from effjax.peft import compile_rules
        from effjax.peft.rules import assign_rules
        from effjax.selection import path_str
        compiled = compile_rules(rules)
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        paths = [path_str(p) for p, _ in flat]
        wanted = {paths[i] for i, c in enumerate(assign_rules(paths, compiled))
                  if c is not None and getattr(compiled[c].method, "calibration", None)
                  == "gradients"}
        grad = jax.jit(jax.grad(lambda p, b: _xent(logits_fn(graph, p, b), b["label"])))
        total = None
        for b in data:
            g = grad(params, b)
            total = g if total is None else jax.tree.map(jnp.add, total, g)
        flat_g = jax.tree_util.tree_flatten_with_path(total)[0]
        out.update({path_str(p): g / len(data) for p, g in flat_g
                    if path_str(p) in wanted})
    return out


def _xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def warmup_linear_decay(lr: float, steps: int):
    """Linear warm-up over 10% of ``steps``, then linear decay to 0 (shared with
    ``qlora_smollm2``)."""
    warm = max(1, steps // 10)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm),
                                 optax.linear_schedule(lr, 0.0, max(1, steps - warm))], [warm])


def _label_tree(trainable):
    """'head' or 'encoder' for each trainable leaf, by the first key of its path."""
    return jax.tree_util.tree_map_with_path(lambda p, _: str(p[0].key), trainable)


@functools.lru_cache(maxsize=8)
def _predictor(graph):
    return jax.jit(lambda p, b: jnp.argmax(logits_fn(graph, p, b), -1))


def _predict_all(predict, params, data: dict, batch_size: int) -> np.ndarray:
    n = len(data["label"])
    pad = -n % batch_size
    padded = {k: np.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1)) for k, v in data.items()}
    preds = [np.asarray(predict(params, {k: v[i:i + batch_size] for k, v in padded.items()}))
             for i in range(0, n + pad, batch_size)]
    return np.concatenate(preds)[:n]


def train_classifier(name: str, method: Method, graph, base: dict, train: dict, evals: dict,
                     args) -> dict:
    """Inject, train ``args.steps`` steps, evaluate; one row of the table."""
    from tqdm.auto import tqdm

    rules = build_rules(method, args.targets, base)
    # calibration batches (data-driven inits only): a separate draw, not counted as steps
    calib = calibration_data(rules, graph, base, _take(
        batches(train, args.batch, seed=args.seed + 1, epochs=None), args.calib_batches))
    tree = inject(base, rules, key=jax.random.key(args.seed), calibration=calib)
    info = summary(tree)
    trainable, frozen = split(tree)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.multi_transform(
        {"head": optax.adam(warmup_linear_decay(HEAD_LR, args.steps)),
         "encoder": optax.adam(warmup_linear_decay(method.lr, args.steps))},
        _label_tree(trainable)))
    opt_state = opt.init(trainable)

    def loss_fn(tr, fr, b):
        return _xent(logits_fn(graph, materialize(combine(tr, fr)), b), b["label"])

    @jax.jit
    def step(tr, state, fr, b):
        loss, grads = jax.value_and_grad(loss_fn)(tr, fr, b)
        updates, state = opt.update(grads, state, tr)
        return optax.apply_updates(tr, updates), state, loss

    data = batches(train, args.batch, seed=args.seed, epochs=None)
    losses, times = [], []
    for _ in tqdm(range(args.steps), desc=f"{name:>10s}", disable=args.no_progress):
        b = next(data)
        t0 = time.perf_counter()
        trainable, opt_state, loss = step(trainable, opt_state, frozen, b)
        losses.append(float(loss))
        times.append(time.perf_counter() - t0)
    dense = materialize(combine(trainable, frozen))  # same structure for every method
    predict = _predictor(graph)  # so the evaluation compiles once for all of them
    acc = {k: float(np.mean(_predict_all(predict, dense, d, min(64, len(d["label"])))
                            == d["label"])) for k, d in evals.items()}
    tail = max(1, args.steps // 10)
    return {"method": name, "family": method.family, "lr": method.lr, "head_lr": HEAD_LR,
            "trainable": info.trainable, "total": info.total,
            "per_method": info.methods, "first_loss": losses[0],
            "final_train_loss": float(np.mean(losses[-tail:])), "train_losses": losses,
            "val_acc": acc["validation"], "test_acc": acc["test"],
            "step_ms": 1e3 * statistics.median(times[1:] if len(times) > 1 else times),
            "first_step_s": times[0]}


def _take(it: Iterator, n: int) -> list:
    return [next(it) for _ in range(n)]


def part_a(args) -> dict:
    from effjax.models.minilm import load_minilm

    minilm = load_minilm()
    graph, base = classifier_params(minilm, args.seed)
    texts, labels = balanced_lines("train", args.train_lines // NUM_CLASSES, args.seed)
    train = tokenize(minilm, texts, args.max_len)
    truncated = train.pop("truncated")
    train["label"] = labels.astype(np.int32)
    evals = {}
    for name in ("validation", "test"):
        t, y = balanced_lines(name, args.eval_lines // NUM_CLASSES, args.seed)
        evals[name] = tokenize(minilm, t, args.max_len)
        truncated += evals[name].pop("truncated")
        evals[name]["label"] = y.astype(np.int32)
    print(f"(a) all-MiniLM-L6-v2 + linear head on shakespeare_genre: {len(labels)} training "
          f"lines, {len(evals['validation']['label'])} validation, {len(evals['test']['label'])} "
          f"test (class-balanced); {truncated} lines cut to {args.max_len} tokens; "
          f"{_train.machine()}")
    rows = [train_classifier(name, METHODS[name], graph, base, train, evals, args)
            for name in args.methods]
    full = next((r["step_ms"] for r in rows if r["method"] == "full FT"), None)
    for r in rows:
        r["step_ratio"] = r["step_ms"] / full if full else None
    return {"rows": rows, "truncated": truncated, "n_train": len(labels)}


# --- (b) SmolLM2 + LoRA on Shakespeare text ----------------------------------------------------

LM_TARGETS = {"qv": r"layers/\d+/self_attn/(q_proj|v_proj)/kernel",
              "all": r"layers/\d+/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel"}


def lm_windows(tokenizer, split: str, seq_len: int, max_plays: int | None = None
               ) -> np.ndarray:
    """Consecutive non-overlapping windows of ``seq_len + 1`` tokens of each play of ``split``
    (the ``shakespeare_char`` by-play split; its first ``max_plays`` only, if given), int32
    ``(N, seq_len + 1)``."""
    from effjax.data.shakespeare import play_texts, split_plays

    texts = play_texts()
    plays = split_plays(list(texts))[split][:max_plays]
    out = []
    for enc in tokenizer.encode_batch([texts[p] for p in plays]):
        ids = np.asarray(enc.ids, np.int32)
        n = len(ids) // (seq_len + 1)
        out.append(ids[:n * (seq_len + 1)].reshape(n, seq_len + 1))
    return np.concatenate(out)


def lm_nll(model, tokens):
    """Mean next-token cross-entropy of ``model`` on windows ``tokens`` ``(B, T + 1)``."""
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def part_b(args) -> dict:
    from tqdm.auto import tqdm

    from effjax.models.smollm2 import load_smollm2

    t0 = time.perf_counter()
    model, tokenizer, config = load_smollm2()
    graph, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    load_s = time.perf_counter() - t0
    train = lm_windows(tokenizer, "train", args.lm_seq)
    val_all = lm_windows(tokenizer, "validation", args.lm_seq)
    pick = np.linspace(0, len(val_all) - 1, args.lm_eval_windows).round().astype(int)
    val = val_all[pick]  # evenly spread over the validation plays
    rules = {LM_TARGETS[args.lm_targets]: LoRA(rank=8, alpha=16)}
    tree = inject(params, rules, key=jax.random.key(args.seed))
    info = summary(tree)
    trainable, frozen = split(tree)
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adam(warmup_linear_decay(args.lm_lr, args.lm_steps)))
    opt_state = opt.init(trainable)

    def loss_fn(tr, fr, tokens):
        return lm_nll(nnx.merge(graph, materialize(combine(tr, fr))), tokens)

    @jax.jit
    def step(tr, st, fr, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(tr, fr, tokens)
        updates, st = opt.update(grads, st, tr)
        return optax.apply_updates(tr, updates), st, loss

    nll = jax.jit(loss_fn)
    eval_batch = min(8, args.lm_eval_windows)

    def perplexity(tr):  # mean token NLL over equal-size batches (windows have equal length)
        vals = [float(nll(tr, frozen, val[i:i + eval_batch]))
                for i in range(0, len(val) - eval_batch + 1, eval_batch)]
        return math.exp(float(np.mean(vals)))

    print(f"(b) SmolLM2-135M ({sum(x.size for x in jax.tree.leaves(params)):,} params, loaded "
          f"in {load_s:.1f} s) + LoRA r=8 on {args.lm_targets}: {len(train):,} training windows "
          f"of {args.lm_seq} tokens, {len(val)} validation windows")
    before = perplexity(trainable)
    data = batches({"tokens": train}, args.lm_batch, seed=args.seed, epochs=None)
    losses, times = [], []
    for _ in tqdm(range(args.lm_steps), desc="  SmolLM2", disable=args.no_progress):
        b = next(data)["tokens"]
        t0 = time.perf_counter()
        trainable, opt_state, loss = step(trainable, opt_state, frozen, b)
        losses.append(float(loss))
        times.append(time.perf_counter() - t0)
    after = perplexity(trainable)
    return {"model": "SmolLM2-135M-Instruct", "targets": args.lm_targets,
            "trainable": info.trainable, "total": info.total, "ppl_before": before,
            "ppl_after": after, "train_losses": losses, "n_train_windows": len(train),
            "step_ms": 1e3 * statistics.median(times[1:] if len(times) > 1 else times),
            "tokens_per_step": args.lm_batch * args.lm_seq}


# --- report -------------------------------------------------------------------------------------

def table_a(rows) -> str:
    header = ["method", "LR (encoder)", "trainable params", "% of total", "final train loss",
              "val acc", "test acc", "median step ms", "step ratio to full FT"]
    body = [[r["method"], "-" if r["family"] == "head" else f"{r['lr']:g}",
             f"{r['trainable']:,d}", f"{100 * r['trainable'] / r['total']:.3f}",
             f"{r['final_train_loss']:.3f}", f"{r['val_acc']:.3f}", f"{r['test_acc']:.3f}",
             f"{r['step_ms']:.0f}",
             "-" if r["step_ratio"] is None else f"{r['step_ratio']:.2f}"] for r in rows]
    return _train.markdown_table(header, body)


def table_b(r) -> str:
    header = ["model", "adapter", "trainable params", "% of total", "val ppl before",
              "val ppl after", "median step ms", "tokens / step"]
    body = [[r["model"], f"LoRA r=8 ({r['targets']})", f"{r['trainable']:,d}",
             f"{100 * r['trainable'] / r['total']:.3f}", f"{r['ppl_before']:.2f}",
             f"{r['ppl_after']:.2f}", f"{r['step_ms']:.0f}", str(r["tokens_per_step"])]]
    return _train.markdown_table(header, body)


def main(argv=None) -> dict:
    """Run the parts in ``--part``; returns ``{"a": ..., "b": ...}`` (the parts run now).

    The results files keep a part from an earlier run when this run does not redo it, so (a)
    and (b) can run separately (e.g. (b) on a GPU machine); each part records its command,
    settings, machine and wall time."""
    args = parse(argv)
    command = "python -m experiments.peft_shakespeare " + " ".join(
        argv if argv is not None else sys.argv[1:])
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "no_progress")}
    meta = lambda t0: {"command": command.strip(), "settings": settings,
                       "machine": _train.machine(), "jax": jax.__version__,
                       "wall_s": time.perf_counter() - t0}
    result = {}
    if "a" in args.part:
        t0 = time.perf_counter()
        result["a"] = part_a(args)
        result["a"].update(meta(t0))
        print("\n" + table_a(result["a"]["rows"]) + "\n")
    if "b" in args.part:
        t0 = time.perf_counter()
        result["b"] = part_b(args)
        result["b"].update(meta(t0))
        print("\n" + table_b(result["b"]) + "\n")
    report(result, args)
    return result


def report(result, args):
    suffix = "_quick" if args.quick else ""
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, f"{NAME}{suffix}.json")
    merged = dict(result)
    if os.path.exists(json_path):  # keep the other part of an earlier run
        with open(json_path) as f:
            old = json.load(f)
        merged = {k: result.get(k, old.get(k)) for k in ("a", "b") if k in result or k in old}
    lines = [f"# PEFT on Shakespeare{' (quick)' if args.quick else ''}", ""]
    if "a" in merged:
        a, s = merged["a"], merged["a"]["settings"]
        lines += ["## (a) all-MiniLM-L6-v2 + linear head, shakespeare_genre", "",
                  *_meta_lines(a),
                  f"{a['n_train']} class-balanced training lines, {s['steps']} steps of batch "
                  f"{s['batch']} (the same data order for every method), seed {s['seed']}; "
                  f"{s['eval_lines'] // NUM_CLASSES * NUM_CLASSES} class-balanced lines each "
                  f"of the validation and test plays (chance = 1/3); max {s['max_len']} tokens "
                  f"({a['truncated']} lines cut); mean pooling; adapters on "
                  f"`{TARGETS[s['targets']]}` (r = 8, alpha = 16 for the LoRA family); head "
                  f"LR {HEAD_LR:g} in every run; Adam, clip 1.0, 10% warm-up, linear decay.", "",
                  table_a(a["rows"]), ""]
    if "b" in merged:
        b, s = merged["b"], merged["b"]["settings"]
        lines += ["## (b) SmolLM2-135M + LoRA, Shakespeare plays as text", "",
                  *_meta_lines(b),
                  f"{s['lm_steps']} steps of {s['lm_batch']} windows x {s['lm_seq']} tokens "
                  f"(of {b['n_train_windows']:,} training windows), LR {s['lm_lr']:g}; "
                  f"perplexity on {s['lm_eval_windows']} validation windows spread over the "
                  f"held-out plays.", "", table_b(b), ""]
    lines += ["Final train loss: mean of the last 10% of steps (cross-entropy; log 3 = 1.099 "
              "at chance). Step times are medians after the compiling step; on a CPU shared "
              "with other jobs they are noisy: compare ratios within one run only.", ""]
    with open(os.path.join(args.out, f"{NAME}{suffix}.md"), "w") as f:
        f.write("\n".join(lines))
    with open(json_path, "w") as f:
        json.dump(merged, f, indent=1, default=str)
    plot(merged, os.path.join(args.out, f"{NAME}{suffix}.png"))


def _meta_lines(part) -> list[str]:
    return [f"Command: `{part['command']}`", "",
            f"Machine: {part['machine']}; wall time {part['wall_s'] / 60:.1f} min", "",
            f"Settings: `{part['settings']}`", ""]


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("a", "b") if k in result]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, part in zip(axes[0], panels):
        if part == "a":
            seen: dict[int, int] = {}
            for i, r in enumerate(result["a"]["rows"]):
                k = seen[r["trainable"]] = seen.get(r["trainable"], -1) + 1
                x = r["trainable"] * 1.12 ** k  # equal counts spread slightly to the right
                ax.scatter([x], [r["val_acc"]], marker="o", color=f"C{i % 10}", label=r["method"])
                ax.scatter([x], [r["test_acc"]], marker="x", color=f"C{i % 10}")
            ax.axhline(1 / NUM_CLASSES, color="grey", lw=0.8, ls=":", label="chance")
            ax.set_xscale("log")
            ax.set_xlabel("trainable parameters (log; equal counts shifted right)")
            ax.set_ylabel("accuracy (o validation, x test)")
            ax.set_title("(a) MiniLM genre classifier: accuracy vs trainable params")
            ax.legend(fontsize=7, ncol=2)
        else:
            b = result["b"]
            w = max(1, len(b["train_losses"]) // 10)
            curve = _train.smooth(b["train_losses"], w)
            ax.plot(np.arange(len(curve)) + w, curve, lw=1,
                    label=f"train loss (LoRA; mean of {w} steps)")
            ax.axhline(math.log(b["ppl_before"]), color="C1", ls="--", label="val NLL before")
            ax.axhline(math.log(b["ppl_after"]), color="C2", ls="--", label="val NLL after")
            ax.set_xlabel("step")
            ax.set_ylabel("next-token NLL (nats)")
            ax.set_title(f"(b) SmolLM2-135M + LoRA: ppl {b['ppl_before']:.1f} -> "
                         f"{b['ppl_after']:.1f}")
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
