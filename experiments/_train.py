"""Shared pieces of the training experiments: data loading, one jitted train step, a timed
training run with progress bar, evaluation, and result tables/plots."""

from __future__ import annotations

import functools
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from effjax.data import load_shakespeare_char_source, to_arrays
from effjax.optim import state_bytes

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def char_windows(split: str, seq_len: int, limit: int | None = None) -> tuple[np.ndarray, str]:
    """``shakespeare_char`` windows cut to ``seq_len + 1`` tokens: each stored 257-token window
    gives ``256 // seq_len`` consecutive, non-overlapping training windows (no text wasted)."""
    source, vocab = load_shakespeare_char_source(split)
    n = len(source) if limit is None else min(limit, len(source))
    stored = np.stack([source[i]["tokens"] for i in range(n)])
    width = stored.shape[1] - 1
    if width % seq_len:
        raise ValueError(f"seq_len {seq_len} must divide the stored window length {width}")
    pieces = [stored[:, i * seq_len:(i + 1) * seq_len + 1] for i in range(width // seq_len)]
    return np.concatenate(pieces), vocab


def fashion_mnist_arrays(split: str, limit: int | None = None) -> dict[str, np.ndarray]:
    from effjax.data import load_fashion_mnist_source
    arrays = to_arrays(load_fashion_mnist_source(split))
    if limit is not None:
        arrays = {k: v[:limit] for k, v in arrays.items()}
    return arrays


@functools.lru_cache(maxsize=16)
def train_step(graph, loss_fn: Callable, opt: optax.GradientTransformation):
    """``step(params, opt_state, batch) -> (params, opt_state, loss)``, jitted and donating.

    One per (graph, loss, optimizer object): runs that pass the same three (e.g. the seeds of
    one optimizer in ``optim_parity``) reuse the compiled step instead of compiling it again."""

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(nnx.merge(graph, p), batch))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


@functools.lru_cache(maxsize=64)
def _jitted_metric(graph, metric_fn: Callable):
    """One compiled ``metric(model, batch)`` per (graph, metric): evaluations during a run reuse
    it instead of tracing and compiling again at every call."""
    return jax.jit(lambda p, b: metric_fn(nnx.merge(graph, p), b))


def evaluate(graph, params, metric_fn: Callable, data: np.ndarray | dict, batch_size: int):
    """Mean of ``metric_fn(model, batch)`` over ``data`` in full batches (the tail is dropped
    only if it is shorter than a batch; batches are equally weighted)."""
    fn = _jitted_metric(graph, metric_fn)
    n = len(data) if not isinstance(data, dict) else len(next(iter(data.values())))
    values = []
    for start in range(0, max(n - batch_size + 1, 1), batch_size):
        if isinstance(data, dict):
            batch = {k: v[start:start + batch_size] for k, v in data.items()}
        else:
            batch = data[start:start + batch_size]
        values.append(float(fn(params, batch)))
    return float(np.mean(values))


def run(name: str, opt, graph, params0, loss_fn: Callable, batches: Iterator, steps: int,
        eval_fn: Callable[[object], float], eval_every: int, progress: bool = True) -> dict:
    """Train ``steps`` steps from ``params0`` (copied) and return the history and timings.

    ``step_ms`` is the median wall time of a step after the first (compilation) step,
    synchronised on the loss each step.
    """
    from tqdm.auto import tqdm

    params = jax.tree.map(jnp.copy, params0)
    opt_state = opt.init(params)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    sbytes = state_bytes(opt_state)
    step = train_step(graph, loss_fn, opt)
    losses, evals, times = [], [], []
    bar = tqdm(range(steps), desc=f"{name:>12s}", disable=not progress, leave=True)
    for i in bar:
        batch = next(batches)
        t0 = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, batch)
        loss = float(loss)
        times.append(time.perf_counter() - t0)
        losses.append(loss)
        if (i + 1) % eval_every == 0 or i + 1 == steps:
            evals.append((i + 1, eval_fn(params)))
            bar.set_postfix(loss=f"{loss:.3f}", val=f"{evals[-1][1]:.3f}")
        elif i % 10 == 0:
            bar.set_postfix(loss=f"{loss:.3f}")
    tail = max(1, min(50, steps // 10))
    return {"optimizer": name, "params": n_params, "state_bytes": sbytes,
            "bytes_per_param": sbytes / n_params, "train_losses": losses,
            "final_train": float(np.mean(losses[-tail:])), "evals": evals,
            "final_eval": evals[-1][1],
            "step_ms": 1e3 * statistics.median(times[1:] if steps > 1 else times),
            "final_params": params}


def machine() -> str:
    dev = jax.devices()[0]
    return (f"{dev.platform} ({dev.device_kind}), {os.cpu_count()} cores, jax {jax.__version__}, "
            f"{platform.python_implementation()} {platform.python_version()}")


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def smooth(values, width: int) -> np.ndarray:
    width = max(1, min(width, len(values)))
    return np.convolve(values, np.ones(width) / width, mode="valid")
