"""Fuzz effjax's public API with bad inputs and tabulate what happens (issue 19).

Several hundred seeded cases throw bad inputs at ``effjax.optim`` (optimizer constructors,
``init`` and ``update``: wrong, transposed, missing and extra leaves; integer, complex,
float16 and bfloat16 dtypes; zero-size and odd shapes; NaN / inf / 1e20 / 3e38 gradient
elements; states from another optimizer; bad ``block_size``, ``bits``, codebooks and other
arguments), ``effjax.quant`` (``quantize_blockwise`` / ``dequantize_blockwise``), ``effjax.peft``
(``inject`` with rules matching nothing, wrong methods, bad ranks; ``load_adapters`` on a tree
whose shapes do not match) and ``effjax.compress.fake_quantize_params``, and sorts each
outcome into one class:

* ``a``: the right outcome. Either a clear error, whose message names the leaf or argument
  at fault (its path or name) *and* the bad value, shape or dtype; or, for an input the API
  documents as accepted (a float16 leaf, a NaN gradient element, a zero-size leaf), a result
  that passes the case's check of the documented rule.
* ``b``: an unclear error: an exception whose message does not name both.
* ``c``: a silent wrong result: no error, and the result breaks the documented rule (a
  parameter that blows up after one huge gradient element, a state from another optimizer
  accepted, a codebook that decodes the block maximum to twice its value).
* ``d``: a crash: the process died, ran past the per-case time limit, or ran out of the
  memory limit (``RLIMIT_AS``; an out-of-memory error counts here too).

Each case has a name, the call, the words a clear message must contain (``where``: leaf path
or argument name; ``what``: the bad value, shape or dtype) and, for inputs that must be
accepted, a check that returns what is wrong with the result. Cases run in a child process
(``RLIMIT_AS`` ``--memory-gb``, one device, a per-case ``--timeout``), restarted after a
crash, so an OOM or a hang is classified rather than suffered.

Run:  python -m experiments.fuzz_api            (all cases, a few minutes on 2 CPU cores)
      python -m experiments.fuzz_api --quick    (a fixed subset, seconds; run by the tests)
Writes experiments/results/fuzz_api{,_quick}.{json,md,png} (``--out`` picks another folder).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import resource
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = os.path.join(os.path.dirname(__file__), "results")
ROOT = Path(__file__).resolve().parent.parent
CLASSES = {
    "a": "clear error naming the leaf/argument and the bad value (or the documented result)",
    "b": "unclear error",
    "c": "silent wrong result",
    "d": "crash (process died, time or memory limit)",
}
AREAS = ("optim", "quant", "peft", "compress")
LR = 1e-3


@dataclasses.dataclass(frozen=True)
class Case:
    """One fuzz case.

    Attributes:
      name: unique, ``area/what-was-done``.
      area: ``optim``, ``quant``, ``peft`` or ``compress``.
      call: runs the API on the bad input; its return value goes to ``check``.
      where: a clear error message contains one of these (the leaf path or argument name).
      what: ... and one of these (the bad value, shape or dtype); empty: ``where`` suffices.
      check: for inputs the API must accept: ``check(result)`` returns what is wrong with the
        result (``None`` when it is right). ``None``: the call must raise.
      doc: the right outcome, in words.
    """

    name: str
    area: str
    call: Callable[[], Any]
    where: tuple[str, ...] = ()
    what: tuple[str, ...] = ()
    check: Callable[[Any], str | None] | None = None
    doc: str = ""


# ------------------------------------------------------------------ classification

_OOM_WORDS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "std::bad_alloc")


def is_clear(case: Case, message: str) -> bool:
    """The message names the leaf/argument (one of ``where``) and the bad value (``what``)."""
    named = not case.where or any(w in message for w in case.where)
    valued = not case.what or any(w in message for w in case.what)
    return named and valued and bool(case.where or case.what)


def classify(case: Case, outcome: dict) -> str:
    """The class (``a``..``d``) of ``outcome``, a dict with ``kind``:

    * ``"raised"`` with ``type`` and ``message``: ``d`` for an out-of-memory error, ``a`` when
      the message is clear (:func:`is_clear`), else ``b``;
    * ``"returned"`` with ``problem`` (the check's finding, ``None`` if it passed): ``a`` when
      the case accepts the input and the check passed, else ``c`` (a must-raise case returned);
    * ``"died"`` (exit, signal, time or memory limit): ``d``.
    """
    kind = outcome["kind"]
    if kind == "died":
        return "d"
    if kind == "raised":
        msg = outcome.get("message", "")
        if outcome.get("type") == "MemoryError" or any(w in msg for w in _OOM_WORDS):
            return "d"
        return "a" if is_clear(case, msg) else "b"
    if kind == "returned":
        if case.check is None or outcome.get("problem"):
            return "c"
        return "a"
    raise ValueError(f"unknown outcome kind {kind!r}")


def run_in_process(case: Case) -> dict:
    """Run one case here; the outcome dict :func:`classify` reads (never ``died``)."""
    t0 = time.perf_counter()
    try:
        result = case.call()
        if "jax" in sys.modules:  # errors of asynchronous dispatch surface here
            result = sys.modules["jax"].block_until_ready(result)
    except BaseException as e:  # noqa: BLE001 - every failure is an outcome
        if isinstance(e, KeyboardInterrupt):
            raise
        return dict(kind="raised", type=type(e).__name__, message=str(e)[:3000],
                    seconds=time.perf_counter() - t0)
    if case.check is None:
        problem = f"accepted (returned {type(result).__name__}); the input must be refused"
    else:
        try:
            problem = case.check(result)
        except Exception as e:  # noqa: BLE001 - a result the check cannot read is wrong
            problem = f"unexpected result ({type(e).__name__}: {e})"[:3000]
    return dict(kind="returned", problem=problem, seconds=time.perf_counter() - t0)


# ------------------------------------------------------------------ needles


def leaf(*keys: str) -> tuple[str, ...]:
    """The ways a message may name a dict leaf: ``['a']['b']`` (optax/jax) or ``a/b``."""
    out = ["".join(f"['{k}']" for k in keys), "/".join(keys)]
    if len(keys) == 1:
        out.append(f"'{keys[0]}'")
    return tuple(out)


def val(v: Any) -> tuple[str, ...]:
    """The ways a message may show the bad value ``v``."""
    out = {repr(v), str(v)}
    if isinstance(v, float) and math.isfinite(v):
        out |= {f"{v:g}", f"{v:e}"}
    if isinstance(v, tuple):
        out.add("[" + ",".join(str(x) for x in v) + "]")
        out.add("(" + ",".join(str(x) for x in v) + ")")
    return tuple(out)


# ------------------------------------------------------------------ optimizers


def _optimizers() -> dict[str, tuple[Callable[..., Any], Callable[[], Any] | None, float, bool]]:
    """name: (factory(**kw), optax counterpart or None, step size, takes block kwargs)."""
    import optax
    from optax import contrib

    from effjax import optim

    def lowbit(fn, *args):
        return lambda **kw: fn(*args, **kw)

    return {
        "adamw_8bit": (lowbit(optim.adamw_8bit, LR), lambda: optax.adamw(LR), LR, True),
        "adam_8bit": (lowbit(optim.adam_8bit, LR), lambda: optax.adam(LR), LR, True),
        "lion_8bit": (lowbit(optim.lion_8bit, LR), lambda: optax.lion(LR, weight_decay=1e-3),
                      LR, True),
        "sgd_8bit": (lowbit(optim.sgd_8bit, LR), lambda: optax.sgd(LR, momentum=0.9), LR, True),
        "rmsprop_8bit": (lowbit(optim.rmsprop_8bit, LR), lambda: optax.rmsprop(LR), LR, True),
        "adagrad_8bit": (lowbit(optim.adagrad_8bit, LR), lambda: optax.adagrad(LR), LR, True),
        "ademamix_8bit": (lowbit(optim.ademamix_8bit, LR), lambda: contrib.ademamix(LR), LR,
                          True),
        "adam_4bit": (lowbit(optim.adam_4bit, LR), lambda: optax.adam(LR), LR, True),
        "adamw_4bit": (lowbit(optim.adamw_4bit, LR), lambda: optax.adamw(LR), LR, True),
        "scale_by_adam_8bit": (lowbit(optim.scale_by_adam_8bit), optax.scale_by_adam, 1.0,
                               True),
        "quantize_state(adamw)": (lambda **kw: optim.quantize_state(optax.adamw(LR), **kw),
                                  lambda: optax.adamw(LR), LR, True),
        "spam": (lambda **kw: optim.spam(LR, **kw), None, LR, False),
        "stable_spam": (lambda **kw: optim.stable_spam(LR, **kw), None, LR, False),
        "stable_spam_8bit": (lambda **kw: optim.stable_spam(LR, state_bits=8, **kw), None, LR,
                             False),
        "galore_adamw": (lambda **kw: optim.galore_adamw(LR, rank=4, **kw), None, LR, False),
        "fira_adamw": (lambda **kw: optim.fira_adamw(LR, rank=4, **kw), None, LR, False),
    }


OPTIMIZERS = ("adamw_8bit", "adam_8bit", "lion_8bit", "sgd_8bit", "rmsprop_8bit",
              "adagrad_8bit", "ademamix_8bit", "adam_4bit", "adamw_4bit", "scale_by_adam_8bit",
              "quantize_state(adamw)", "spam", "stable_spam", "stable_spam_8bit",
              "galore_adamw", "fira_adamw")
LOWBIT = OPTIMIZERS[:11]
# the aliases with a fused step (native C++ on a one-device CPU, or Pallas)
FUSED = ("adamw_8bit", "adam_8bit", "lion_8bit", "sgd_8bit", "adam_4bit", "adamw_4bit",
         "scale_by_adam_8bit")
# Adaptive steps move a parameter by about lr per step whatever the gradient's size (Adam:
# |m_hat / sqrt(v_hat)| <= ~1 over the first steps); sgd's step grows with the gradient.
UNBOUNDED = ("sgd_8bit",)


def _key(kw: dict) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in kw.items()))


_OPTS: dict[tuple, Any] = {}


def make_opt(name: str, **kw):
    """The optimizer ``name`` built with ``kw`` (memoized, so its jitted steps are reused)."""
    k = (name, _key(kw))
    if k not in _OPTS:
        _OPTS[k] = _optimizers()[name][0](**kw)
    return _OPTS[k]


@functools.cache
def _jitted(opt):
    import jax

    return jax.jit(opt.init), jax.jit(opt.update)


def run_steps(opt, params, grads_seq, *, state=None):
    """``len(grads_seq)`` jitted steps; ``[(updates, params, state)]`` after each."""
    import optax

    init, update = _jitted(opt)
    state = init(params) if state is None else state
    out = []
    for g in grads_seq:
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
        out.append((u, params, state))
    return out


def _state_arrays(state):
    import jax

    from effjax.quant import QuantizedArray, dequantize_blockwise

    def is_q(x):
        return isinstance(x, QuantizedArray)

    for path, x in jax.tree_util.tree_flatten_with_path(state, is_leaf=is_q)[0]:
        if is_q(x):
            yield jax.tree_util.keystr(path), np.asarray(dequantize_blockwise(x), np.float32)
        elif hasattr(x, "dtype") and np.issubdtype(np.dtype(x.dtype), np.inexact):
            yield jax.tree_util.keystr(path), np.asarray(x, np.float32)


def _flat(tree) -> dict[str, Any]:
    import jax

    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_steps(hist, p0, grads_seq, *, step: float | None, frozen=None,
                ref=None) -> str | None:
    """What is wrong with a run whose rule is: parameters and state finite after every step;
    no element moves farther than ``10 * step`` per step (the adaptive optimizers' steps are
    about ``step``), plus twice the farthest move of its leaf in ``ref`` (the same steps on
    clean or float32 inputs, when given), plus one ulp of its dtype per step (``step=None``
    and no ``ref``: no bound); elements whose step-1 gradient is not finite get a zero update
    at step 1 (``frozen``: their positions per leaf)."""
    p0f = {k: np.asarray(x, np.float32) for k, x in _flat(p0).items()}
    eps = {k: float(np.finfo(np.dtype(x.dtype)).eps) for k, x in _flat(p0).items()}
    for t, (_, params, state) in enumerate(hist, 1):
        ref_t = None if ref is None else _flat(ref[t - 1][1])
        for name, x in _flat(params).items():
            x = np.asarray(x, np.float32)
            bad = ~np.isfinite(x) & np.isfinite(p0f[name])
            if bad.any():
                return f"step {t}: parameter {name} not finite at {np.argwhere(bad)[0].tolist()}"
            if (step is None and ref is None) or not x.size:
                continue
            moved = np.abs(x - p0f[name])
            limit = 10 * (step or 0) * t + t * eps[name] * np.abs(p0f[name])
            if ref_t is not None:
                limit = limit + 2 * np.abs(np.asarray(ref_t[name], np.float32)
                                           - p0f[name]).max()
            if (moved > limit).any():
                i = np.unravel_index((moved - limit).argmax(), moved.shape)
                return (f"step {t}: parameter {name}{[int(k) for k in i]} moved by "
                        f"{moved[i]:.3g}, more than the {limit[i]:.3g} allowed (10 x "
                        f"{step or 0:g} per step" + (", + 2 x the reference run's farthest "
                                                     "move" if ref is not None else "")
                        + f"; now {x[i]:.3g})")
        for name, x in _state_arrays(state):
            if not np.isfinite(x).all():
                return f"step {t}: state {name} not finite"
    if frozen is not None:
        u1 = hist[0][0]
        for key, idx in frozen.items():
            got = np.asarray(u1[key], np.float32)[idx]
            if np.any(got != 0):
                return f"step 1: update ['{key}'] at a non-finite gradient element is {got}, not 0"
    return None


# ------------------------------------------------------------------ optim cases


def _tree(rng, shape, dtype="float32", scale=1.0):
    return {"w": (rng.standard_normal(shape) * scale).astype(dtype),
            "b": (rng.standard_normal(shape[-1:]) * scale).astype(dtype)}


def _asj(tree, dtype=None):
    import jax
    import jax.numpy as jnp

    # a copy: jnp.asarray may share a numpy array's buffer, and cases edit their numpy arrays
    return jax.tree.map(lambda x: jnp.array(x, dtype or x.dtype, copy=True), tree)


def optim_cases(rng: np.random.Generator) -> list[Case]:
    import jax.numpy as jnp

    cases = []
    shapes = [(64, 128), (32, 256), (48, 128)]

    def add(name, call, where=(), what=(), check=None, doc=""):
        cases.append(Case(f"optim/{name}", "optim", call, tuple(where), tuple(what), check, doc))

    def kw_for(name, rng):
        if name in LOWBIT and rng.random() < 0.5:
            return {"min_quantized_size": 0}
        return {}

    for name in OPTIMIZERS:
        shape = shapes[rng.integers(len(shapes))]
        kw = kw_for(name, rng)
        p = _tree(rng, shape)
        g = _tree(rng, shape, scale=0.1)
        r, c = shape

        def upd(gg, pp=None, name=name, kw=kw, p=p):
            opt = make_opt(name, **kw)
            pj = _asj(p)
            return opt.update(_asj(gg), opt.init(pj), _asj(pp) if pp is not None else pj)

        add(f"{name}/grad-transposed", lambda g=g, upd=upd: upd({**g, "w": g["w"].T}),
            leaf("w"), val((c, r)) + val((r, c)), doc="error naming ['w'] and both shapes")
        add(f"{name}/grad-wrong-shape",
            lambda g=g, upd=upd, r=r, c=c: upd({**g, "w": g["w"][:, : c - 1]}),
            leaf("w"), val((r, c - 1)), doc="error naming ['w'] and the shapes")
        add(f"{name}/grad-missing-leaf", lambda g=g, upd=upd: upd({"w": g["w"]}), leaf("b"),
            doc="error naming the missing leaf ['b']")
        add(f"{name}/grad-extra-leaf",
            lambda g=g, upd=upd: upd({**g, "c": np.ones(3, np.float32)}), leaf("c"),
            doc="error naming the extra leaf ['c']")
        add(f"{name}/params-and-grads-other-shape",
            lambda g=g, upd=upd, p=p: upd({**g, "w": g["w"].T}, {**p, "w": p["w"].T}),
            leaf("w"), val((c, r)) + val((r, c)),
            doc="state from (r, c) params, update with (c, r) params and grads: error naming "
                "['w'] and the shapes")
        for dt in ("int32", "complex64"):
            def init_bad(name=name, kw=kw, p=p, dt=dt):
                return make_opt(name, **kw).init(_asj({**p, "w": p["w"].astype(dt)}))

            add(f"{name}/init-{dt}-param", init_bad, leaf("w"), (dt,),
                doc=f"error naming ['w'] and {dt}")

        def grad_int(name=name, kw=kw, p=p, g=g):
            opt = make_opt(name, **kw)
            pj = _asj(p)
            return opt.update(_asj({**g, "w": (g["w"] * 100).astype("int32")}), opt.init(pj), pj)

        add(f"{name}/grad-int32", grad_int, leaf("w"), ("int32",),
            doc="error naming ['w'] and int32")
        step = None if name in UNBOUNDED else _optimizers()[name][2]
        for dt in ("float16", "bfloat16"):
            seed = int(rng.integers(1 << 30))
            def low_prec(name=name, kw=kw, dt=dt, shape=shape, seed=seed):
                rr = np.random.default_rng(seed)
                p0 = _asj(_tree(rr, shape), getattr(jnp, dt))
                gs = [_asj(_tree(rr, shape, scale=0.1), getattr(jnp, dt)) for _ in range(3)]
                ref = run_steps(make_opt(name, **kw), _asj(p0, jnp.float32),
                                [_asj(g, jnp.float32) for g in gs])
                return run_steps(make_opt(name, **kw), p0, gs), p0, gs, ref

            add(f"{name}/{dt}-params", low_prec,
                check=lambda res, step=step: check_steps(*res[:3], step=step, ref=res[3]),
                doc=f"{dt} params and grads: 3 finite steps, none much larger than ~lr or "
                    "than the same steps in float32")

        seed = int(rng.integers(1 << 30))
        def f16_big(name=name, kw=kw, shape=shape, seed=seed):
            rr = np.random.default_rng(seed)
            p0 = _asj(_tree(rr, shape), jnp.float16)
            g1 = _tree(rr, shape, scale=0.1)
            g1["w"][1, 2] = 300.0  # its square overflows float16
            gs = [_asj(g, jnp.float16) for g in (g1, _tree(rr, shape, scale=0.1),
                                                 _tree(rr, shape, scale=0.1))]
            ref = run_steps(make_opt(name, **kw), _asj(p0, jnp.float32),
                            [_asj(g, jnp.float32) for g in gs])
            return run_steps(make_opt(name, **kw), p0, gs), p0, gs, ref

        add(f"{name}/float16-grad-300", f16_big,
            check=lambda res, step=step: check_steps(*res[:3], step=step, ref=res[3]),
            doc="float16 params, one gradient element 300 (its square overflows float16): "
                "finite, at most ~lr per step (optax freezes the element)")
        variants = [("", kw, [np.nan, np.inf, -np.inf, 1e20, -1e20, 3e38, 1e-45])]
        if name in FUSED:  # the unfused jnp step too (the default here: the native step)
            variants.append(("[use_kernel=False]", {**kw, "use_kernel": False},
                             [np.nan, 1e20, 3e38]))
        for label, kw_v, values in variants:
            for v in values:
                seed = int(rng.integers(1 << 30))

                def planted(name=name, kw=kw_v, shape=shape, v=v, seed=seed, step=step):
                    rr = np.random.default_rng(seed)
                    p0 = _asj(_tree(rr, shape))
                    g1 = _tree(rr, shape, scale=0.1)
                    idx = tuple(rr.integers(0, s, size=2) for s in shape)
                    clean = [_asj(g1)] + [_asj(_tree(rr, shape, scale=0.1)) for _ in range(2)]
                    g1["w"][idx] = v
                    gs = [_asj(g1)] + clean[1:]
                    opt = make_opt(name, **kw)
                    # sgd's step grows with the gradient: no reference bound for it
                    ref = None if step is None else run_steps(opt, p0, clean)
                    return run_steps(opt, p0, gs), p0, gs, idx, ref

                frozen = not np.isfinite(v)
                add(f"{name}{label}/grad-{v:g}", planted,
                    check=lambda res, step=step, frozen=frozen: check_steps(
                        *res[:3], step=step, frozen={"w": res[3]} if frozen else None,
                        ref=res[4]),
                    doc=f"two gradient elements {v:g} at step 1, then normal steps: params "
                        "and state finite, no move beyond ~10 lr per step + twice the clean "
                        "run's" + ("; the update is 0 where the gradient is not finite"
                                   if frozen else ""))
        if name in LOWBIT or name in ("spam", "stable_spam", "stable_spam_8bit"):
            extra = {"min_quantized_size": 0} if name in LOWBIT else {}

            def zero_size(name=name, extra=extra):
                p0 = {"w": jnp.zeros((0, 300)), "b": jnp.ones((8,))}
                return run_steps(make_opt(name, **extra), p0, [p0]), p0

            def zero_ok(res):
                (u, _, _), = res[0]
                if tuple(u["w"].shape) != (0, 300):
                    return f"update shape {u['w'].shape}, expected (0, 300)"
                return None

            add(f"{name}/zero-size-leaf", zero_size, leaf("w"), val((0, 300)), zero_ok,
                doc="a (0, 300) leaf: an empty update (or a clear error)")
        if name in LOWBIT:
            for shape_odd in [(1,), (3, 5, 7), (4097,), (1, 4097), (2, 384), (5, 1)]:
                if rng.random() < 0.66:
                    continue
                bs = int(rng.choice([2, 64, 128, 256] if "4bit" in name else [2, 7, 64, 256]))

                seed = int(rng.integers(1 << 30))
                def odd(name=name, shape_odd=shape_odd, bs=bs, seed=seed):
                    rr = np.random.default_rng(seed)
                    p0 = {"w": jnp.asarray(rr.standard_normal(shape_odd), jnp.float32)}
                    gs = [{"w": jnp.asarray(rr.standard_normal(shape_odd) * 0.1, jnp.float32)}
                          for _ in range(3)]
                    ref = _optimizers()[name][1]()
                    u_ref, _ = ref.update(gs[0], ref.init(p0), p0)
                    opt = make_opt(name, block_size=bs, min_quantized_size=0)
                    return run_steps(opt, p0, gs), p0, gs, u_ref

                def odd_ok(res, step=step):
                    hist, p0, gs, u_ref = res
                    got, want = np.asarray(hist[0][0]["w"]), np.asarray(u_ref["w"])
                    # step 1's moments are computed in float32 before they are quantized, so
                    # the update is optax's up to the order of rounding (native kernel: no FMA)
                    if not np.allclose(got, want, rtol=1e-3, atol=1e-9):
                        err = np.abs(got - want).max()
                        return f"step-1 update differs from optax's by up to {err:.3g}"
                    return check_steps(hist, p0, gs, step=step)

                add(f"{name}/shape-{'x'.join(map(str, shape_odd))}-block-{bs}", odd,
                    check=odd_ok, doc="an odd shape, every leaf quantized: step 1 equals the "
                                      "optax optimizer's, 3 finite bounded steps")
    cases += _state_mismatch_cases()
    cases += _constructor_cases(rng)
    return cases


def _state_mismatch_cases() -> list[Case]:
    import jax.numpy as jnp
    import optax

    from effjax import optim
    from effjax.quant import linear_codebook

    p = {"w": np.ones((64, 128), np.float32), "b": np.ones((128,), np.float32)}
    pairs = [
        ("adamw_8bit->adamw_4bit", lambda: optim.adamw_8bit(LR), lambda: optim.adamw_4bit(LR),
         ("bit",)),
        ("adamw_4bit->adamw_8bit", lambda: optim.adamw_4bit(LR), lambda: optim.adamw_8bit(LR),
         ("bit",)),
        ("adamw_8bit->adamw_8bit(block 128)", lambda: optim.adamw_8bit(LR),
         lambda: optim.adamw_8bit(LR, block_size=128), ("block",)),
        ("adamw_8bit(block 128)->adamw_8bit", lambda: optim.adamw_8bit(LR, block_size=128),
         lambda: optim.adamw_8bit(LR), ("block",)),
        ("optax.adamw->adamw_8bit", lambda: optax.adamw(LR), lambda: optim.adamw_8bit(LR),
         ("float", "quantized", "Quantized")),
        ("adamw_8bit(all quantized)->adamw_8bit", lambda: optim.adamw_8bit(
            LR, min_quantized_size=0), lambda: optim.adamw_8bit(LR),
         ("float", "quantized", "Quantized", "min_quantized_size")),
        ("adamw_8bit(bf16 scales)->adamw_8bit", lambda: optim.adamw_8bit(
            LR, scale_dtype=jnp.bfloat16), lambda: optim.adamw_8bit(LR), ("scale", "bfloat16")),
        ("quantize_state(linear map)->adamw_8bit", lambda: optim.quantize_state(
            optax.adamw(LR), signed_codebook=linear_codebook(8)), lambda: optim.adamw_8bit(LR),
         ("codebook", "map")),
        ("stable_spam(8 bit)->stable_spam(4 bit)", lambda: optim.stable_spam(LR, state_bits=8),
         lambda: optim.stable_spam(LR, state_bits=4), ("bit",)),
        ("stable_spam->stable_spam(8 bit)", lambda: optim.stable_spam(LR),
         lambda: optim.stable_spam(LR, state_bits=8), ("float", "quantized", "Quantized")),
    ]
    cases = []
    for label, a, b, what in pairs:
        def call(a=a, b=b):
            pj = _asj(p)
            return b().update(pj, a().init(pj), pj)

        cases.append(Case(f"optim/state-from-{label}", "optim", call, leaf("w") + ("mu", "nu"),
                          what, None, f"error naming the leaf and the mismatch ({what[0]})"))
    structural = [
        ("adamw_8bit->lion_8bit", lambda: optim.adamw_8bit(LR), lambda: optim.lion_8bit(LR)),
        ("adam_8bit->adamw_8bit", lambda: optim.adam_8bit(LR), lambda: optim.adamw_8bit(LR)),
        ("sgd_8bit->lion_8bit", lambda: optim.sgd_8bit(LR), lambda: optim.lion_8bit(LR)),
    ]
    for label, a, b in structural:
        def call(a=a, b=b):
            pj = _asj(p)
            return b().update(pj, a().init(pj), pj)

        cases.append(Case(f"optim/state-from-{label}", "optim", call, ("state",),
                          ("structure", "State", "does not match", "tree"), None,
                          "error saying the state does not have this optimizer's structure"))
    return cases


def _constructor_cases(rng) -> list[Case]:
    import jax.numpy as jnp
    import optax

    from effjax import optim
    from effjax.quant import dynamic_codebook

    cases = []
    p = {"w": np.ones((64, 128), np.float32), "b": np.ones((128,), np.float32)}

    def add(name, build, where, what, doc="error naming the argument and the bad value"):
        def call(build=build):
            opt = build()
            pj = _asj(p)
            return opt.update(pj, opt.init(pj), pj)

        cases.append(Case(f"optim/{name}", "optim", call, tuple(where), tuple(what), None, doc))

    bad_blocks = ["256", 0, -1, 1, 1e9, 2.5, True, np.int64(-5)]
    for name in LOWBIT:
        factory = _optimizers()[name][0]
        rest = bad_blocks[1:]
        picks = [bad_blocks[0]] + [rest[i] for i in rng.choice(len(rest), 2, replace=False)]
        if "4bit" in name:
            picks.append(3)
        for v in picks:
            add(f"{name}/block_size={v!r}",
                lambda factory=factory, v=v: factory(block_size=v, min_quantized_size=0),
                ("block_size",), val(v))
    for name in ("adamw_8bit", "adamw_4bit"):
        factory = _optimizers()[name][0]

        def huge_block(factory=factory):
            p0 = _asj(p)
            gs = [_asj({k: v * 0.1 for k, v in p.items()})] * 3
            hist = run_steps(factory(block_size=10**9, min_quantized_size=0), p0, gs)
            return hist, p0, gs

        def huge_ok(res):
            import jax

            nbytes = sum(x.nbytes for x in jax.tree.leaves(res[0][-1][2]))
            n = sum(x.size for x in p.values())
            if nbytes > 4 * n + 4096:  # two 8-bit moments: 2 bytes per parameter
                return f"state of {nbytes} bytes for {n} parameters"
            return check_steps(*res, step=LR)

        cases.append(Case(
            f"optim/{name}/block_size=10**9", "optim", huge_block,
            ("block_size",) + leaf("w"), val(10**9), huge_ok,
            "a block larger than every leaf: 3 finite bounded steps with a state of about 2 "
            "bytes per parameter (one unpadded block per leaf), or a clear error naming "
            "block_size (a bound) and the leaf; not an OOM"))
    for name in ("adamw_8bit", "lion_8bit", "adam_4bit"):
        factory = _optimizers()[name][0]
        for v in (-1, "0", 1.5):
            add(f"{name}/min_quantized_size={v!r}",
                lambda factory=factory, v=v: factory(min_quantized_size=v),
                ("min_quantized_size",), val(v))
    for v in (jnp.float16, jnp.int8, "float64"):
        add(f"adamw_8bit/scale_dtype={getattr(v, '__name__', v)}",
            lambda v=v: optim.adamw_8bit(LR, scale_dtype=v), ("scale_dtype",),
            val(v) + (getattr(v, "__name__", str(v)),))
    for v in ("yes", 0.5):
        add(f"adamw_8bit/use_kernel={v!r}", lambda v=v: optim.adamw_8bit(LR, use_kernel=v),
            ("use_kernel",), val(v))
    for v in (3, 16, "8", None, True):
        add(f"quantize_state/bits={v!r}",
            lambda v=v: optim.quantize_state(optax.adamw(LR), bits=v), ("bits",), val(v))
    for v in (0.0, -0.5, None):
        add(f"sgd_8bit/momentum={v!r}", lambda v=v: optim.sgd_8bit(LR, momentum=v),
            ("momentum",), val(v))
    for v in ("1e-3", None):
        for name in ("adamw_8bit", "lion_8bit"):
            factory = getattr(optim, name)
            add(f"{name}/learning_rate={v!r}", lambda factory=factory, v=v: factory(v),
                ("learning_rate",), val(v))
    for arg, v in (("b1", 1.5), ("b2", -0.1), ("eps", -1.0)):
        add(f"adamw_8bit/{arg}={v!r}", lambda arg=arg, v=v: optim.adamw_8bit(LR, **{arg: v}),
            (arg,), val(v), f"error naming {arg} and its range (optax does not check it)")
    others = [
        ("galore_adamw", "rank", 0), ("galore_adamw", "rank", -1), ("galore_adamw", "rank", "4"),
        ("galore_adamw", "update_proj_gap", 0), ("galore_adamw", "proj_type", "diagonal"),
        ("fira_adamw", "rank", 0), ("fira_adamw", "update_proj_gap", -1),
        ("stable_spam", "state_bits", 3), ("stable_spam", "reset_interval", 0),
        ("stable_spam", "gamma1", 2.0), ("spam", "threshold", -1.0),
        ("spam", "state_bits", 16),
    ]
    for name, arg, v in others:
        factory = getattr(optim, name)
        add(f"{name}/{arg}={v!r}", lambda factory=factory, arg=arg, v=v: factory(LR, **{arg: v}),
            (arg,), val(v))
    # codebooks (issue 19, item 7): sorted unique values in [-1, 1] with the extremes needed
    dyn = np.asarray(dynamic_codebook(signed=True, bits=8), np.float32)
    repeats = dyn.copy()
    repeats[10:13] = repeats[100]
    books = [
        ("[-2, 0, 2]", [-2.0, 0.0, 2.0], val(2.0) + ("[-1, 1]",)),
        ("sixteen 0.5", [0.5] * 16, ("0.5", "unique", "duplicate", "repeat")),
        ("256 with a value 3 times", repeats, ("unique", "duplicate", "repeat")),
        ("NaN", [-1.0, np.nan, 1.0], ("nan", "NaN", "finite")),
        ("1 value", [1.0], ("1 value", "got 1", "2..")),
        ("300 values", np.linspace(-1, 1, 300), ("300",)),
        ("empty", [], ("0 values", "got 0", "empty")),
        ("'nf4'", "nf4", ("'nf4'", "str")),
        ("without -1", np.linspace(0, 1, 256), ("-1", "negative", "extreme")),
    ]
    for label, book, what in books:
        add(f"quantize_state/signed_codebook={label}",
            lambda book=book: optim.quantize_state(optax.adamw(LR), signed_codebook=book,
                                                   min_quantized_size=0),
            ("signed_codebook", "codebook"), what,
            "error naming the codebook and what is wrong with it")
    for name in ("adamw_8bit", "lion_8bit"):
        def no_params(name=name):
            opt = make_opt(name)
            pj = _asj(p)
            return opt.update(pj, opt.init(pj))

        cases.append(Case(f"optim/{name}/update-without-params", "optim", no_params,
                          ("params",), ("None", "params"), None,
                          "error saying update needs the params"))
    return cases


# ------------------------------------------------------------------ quant cases


def _roundtrip_problem(x, q, *, bf16=False, nonfinite_blocks_nan=True) -> str | None:
    """Check ``dequantize(q)`` against ``x`` by the module's documented rule: per block, an
    error of at most the codebook's largest half gap times the block's absmax (bfloat16
    scales: stretched by 2**-7, and saturating above the largest bfloat16); a block holding
    NaN or inf decodes to NaN, other blocks are unaffected."""
    from effjax.quant import block_view, dequantize_blockwise

    x = np.asarray(x, np.float32)
    deq = np.asarray(dequantize_blockwise(q), np.float32)
    if deq.shape != x.shape:
        return f"dequantized shape {deq.shape}, expected {x.shape}"
    book = np.sort(np.asarray(q.codebook, np.float64))
    half = float(np.max(np.diff(book))) / 2 if book.size > 1 else 1.0
    if book[0] > -1 or book[-1] < 1:  # values beyond the codebook's range clamp to its ends
        half = max(half, 1 - min(-book[0], book[-1]))
    view = block_view(x.shape, q.block_size)
    length = view[-1]
    xb = x.reshape(view[:-1] + (length,))
    db = deq.reshape(xb.shape)
    if not xb.size:
        return None
    # blocks of block_size along the (grouped) last axis; the last one may be shorter
    starts = np.arange(0, length, q.block_size)
    counts = np.diff(np.append(starts, length))
    finite = np.repeat(np.logical_and.reduceat(np.isfinite(xb), starts, axis=-1), counts, -1)
    if nonfinite_blocks_nan and not np.isnan(db[~finite]).all():
        return "a block holding NaN/inf does not decode to NaN"
    absmax = np.maximum.reduceat(np.abs(np.where(np.isfinite(xb), xb, 0)), starts, axis=-1)
    absmax = np.repeat(absmax, counts, -1).astype(np.float64)
    # + 2**-20 of the block's absmax: float32 rounding of x * (1 / absmax) and of the decode
    tol = absmax * (half * (1 + 2.0**-6 if bf16 else 1) + 2.0**-20) + (
        2.0**-7 * absmax if bf16 else 0) + 1e-30
    err = np.abs(db.astype(np.float64) - xb.astype(np.float64))
    over = (err > tol) & finite
    if over.any():
        i = tuple(np.argwhere(over)[0])
        return (f"element {[int(k) for k in i]}: {xb[i]:.6g} decodes to {db[i]:.6g}, error "
                f"{err[i]:.3g} > {tol[i]:.3g} allowed by its block's absmax and the codebook")
    return None


def quant_cases(rng: np.random.Generator) -> list[Case]:
    import jax
    import jax.numpy as jnp

    from effjax.quant import (
        dequantize_blockwise,
        dynamic_codebook,
        fp4_codebook,
        linear_codebook,
        nf4_codebook,
        quantize_blockwise,
    )

    dyn = dynamic_codebook(signed=True, bits=8)
    cases = []

    def add(name, call, where=(), what=(), check=None, doc="error naming the argument"):
        cases.append(Case(f"quant/{name}", "quant", call, tuple(where), tuple(what), check, doc))

    x = rng.standard_normal((8, 256)).astype(np.float32)
    for dt in ("int32", "complex64", "bool", "uint8"):
        add(f"quantize/x-{dt}", lambda dt=dt: quantize_blockwise(
            jnp.asarray(x).astype(dt), codebook=dyn, block_size=64),
            ("quantize_blockwise", "x"), (dt,))
    add("quantize/x-scalar", lambda: quantize_blockwise(jnp.float32(1), codebook=dyn),
        ("quantize_blockwise", "x"), ("scalar", "()", "axis"))
    add("quantize/x-zero-size", lambda: quantize_blockwise(jnp.zeros((0, 300)), codebook=dyn,
                                                           block_size=64),
        ("x", "quantize_blockwise"), val((0, 300)),
        lambda q: (None if tuple(np.asarray(dequantize_blockwise(q)).shape) == (0, 300)
                   else "wrong shape"), "an empty QuantizedArray (or a clear error)")
    for v in (0, -1, "256", 2.5, True):
        add(f"quantize/block_size={v!r}", lambda v=v: quantize_blockwise(
            jnp.asarray(x), codebook=dyn, block_size=v), ("block_size",), val(v))
    add("quantize/block_size=None", lambda: quantize_blockwise(
        jnp.asarray(x), codebook=dyn, block_size=None), ("block_size",), ("None",),
        lambda q: _roundtrip_problem(x, q),
        "None as the default block (a correct round trip) or a clear error")

    def huge_ok(q):
        if q.codes.size * q.codes.dtype.itemsize + q.absmax.size * 4 > 4 * x.size:
            return f"{q.codes.size} codes and {q.absmax.size} scales for {x.size} elements"
        return _roundtrip_problem(x, q)

    add("quantize/block_size=10**9", lambda: quantize_blockwise(
        jnp.asarray(x), codebook=dyn, block_size=10**9), ("block_size",), val(10**9), huge_ok,
        "a block larger than the array: one block per row group without padding memory, or "
        "a clear error naming block_size (not an OOM)")
    dup = np.asarray(dyn, np.float32).copy()
    dup[10:13] = dup[100]
    for label, book, what, must_raise in [
        ("1 value", [0.5], ("got 1", "1 value", "2.."), True),
        ("257 values", np.linspace(-1, 1, 257), ("257",), True),
        ("NaN", [-1.0, np.nan, 1.0], ("NaN", "nan", "finite"), True),
        ("inf", [-np.inf, 0.0, 1.0], ("inf", "finite"), True),
        ("[-2, 0, 2]", [-2.0, 0.0, 2.0], val(2.0) + ("[-1, 1]",), True),
        ("sixteen 0.5", [0.5] * 16, ("unique", "duplicate", "repeat", "0.5"), True),
        ("256 with a value 3 times", dup, ("unique", "duplicate", "repeat"), True),
        ("'nf4'", "nf4", ("'nf4'", "str"), True),
        ("None", None, ("None", "needs codebook"), True),
        ("unsorted dynamic map", rng.permutation(np.asarray(dyn)), (), False),
    ]:
        def qcall(book=book):
            q = quantize_blockwise(jnp.asarray(x), codebook=book, block_size=64)
            return q

        add(f"quantize/codebook={label}", qcall, ("codebook",), what,
            None if must_raise else (lambda q: _roundtrip_problem(x, q)),
            "error naming the codebook and what is wrong" if must_raise else
            "documented as accepted in any order: a correct round trip (or a clear error)")
    for v in ("up", 1, None):
        add(f"quantize/rounding={v!r}", lambda v=v: quantize_blockwise(
            jnp.asarray(x), codebook=dyn, rounding=v), ("rounding",), val(v))
    add("quantize/stochastic-without-key", lambda: quantize_blockwise(
        jnp.asarray(x), codebook=dyn, rounding="stochastic"), ("key",), ("stochastic", "None"))
    add("quantize/stochastic-key=42", lambda: quantize_blockwise(
        jnp.asarray(x), codebook=dyn, rounding="stochastic", key=42), ("key",), ("42", "int"))
    for v in (jnp.float16, jnp.int8, "float64"):
        add(f"quantize/scale_dtype={getattr(v, '__name__', v)}", lambda v=v: quantize_blockwise(
            jnp.asarray(x), codebook=dyn, scale_dtype=v), ("scale_dtype",),
            val(v) + (getattr(v, "__name__", str(v)),))
    books = {"dynamic8": dyn, "nf4": nf4_codebook(), "fp4": fp4_codebook(),
             "linear4": linear_codebook(4)}
    for v in (np.nan, np.inf, 1e20, 3e38, -3e38, 1e-45):
        for bname in rng.choice(list(books), 2, replace=False):
            bf16 = bool(rng.random() < 0.5)

            seed = int(rng.integers(1 << 30))
            def planted(v=v, book=books[bname], bf16=bf16, seed=seed):
                rr = np.random.default_rng(seed)
                xx = rr.standard_normal((6, 200)).astype(np.float32)
                xx[tuple(rr.integers(0, s, 2) for s in xx.shape)] = v
                return xx, quantize_blockwise(jnp.asarray(xx), codebook=book, block_size=64,
                                              scale_dtype=jnp.bfloat16 if bf16 else jnp.float32)

            add(f"quantize/value-{v:g}-{bname}{'-bf16' if bf16 else ''}", planted,
                check=lambda res, bf16=bf16: _roundtrip_problem(res[0], res[1], bf16=bf16),
                doc="documented: a block with NaN/inf decodes to NaN, others within the "
                    "codebook's error; huge finite values round-trip within it")
    for shape in [(3, 5, 7), (1,), (2, 384), (4097,), (5, 1)]:
        bs = int(rng.choice([2, 7, 64, 256, 1000]))
        bname = str(rng.choice(list(books)))

        seed = int(rng.integers(1 << 30))
        def odd(shape=shape, bs=bs, book=books[bname], seed=seed):
            xx = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
            return xx, quantize_blockwise(jnp.asarray(xx), codebook=book, block_size=bs)

        add(f"quantize/shape-{'x'.join(map(str, shape))}-block-{bs}-{bname}", odd,
            check=lambda res: _roundtrip_problem(*res),
            doc="an odd shape: a round trip within the codebook's error")
    q = quantize_blockwise(jnp.asarray(x), codebook=dyn, block_size=64)
    add("dequantize/ndarray", lambda: dequantize_blockwise(np.zeros((8, 256), np.uint8)),
        ("dequantize_blockwise", "q"), ("ndarray",))
    add("dequantize/absmax-wrong-shape", lambda: dequantize_blockwise(
        dataclasses.replace(q, absmax=q.absmax.T)), ("absmax",), val((4, 8)))
    add("dequantize/codes-transposed", lambda: dequantize_blockwise(dataclasses.replace(
        q, codes=jnp.zeros((256, 8), jnp.uint8))), ("codes",), val((256, 8)),
        doc="codes of another shape than the array's: error naming codes and the shapes")
    want = np.asarray(dequantize_blockwise(q))
    add("dequantize/codes-int32", lambda: dequantize_blockwise(dataclasses.replace(
        q, codes=q.codes.astype(jnp.int32))), ("codes",), ("int32",),
        lambda out: None if np.array_equal(np.asarray(out), want) else "decodes differently",
        "int32 codes holding the same values: the same decode (or a clear error)")
    add("dequantize/bits-4-with-8-bit-codes", lambda: dequantize_blockwise(
        dataclasses.replace(q, bits=4)), ("bits", "codes"), ("4", "256", "(8, 256)"),
        doc="bits=4 with a 256-value codebook and unpacked codes: error naming bits")
    add("dequantize/block_size-0", lambda: dequantize_blockwise(
        dataclasses.replace(q, block_size=0)), ("block_size",), ("0",))
    add("dequantize/not-a-QuantizedArray-tree", lambda: dequantize_blockwise(
        jax.tree.map(lambda a: a, {"q": q})), ("dequantize_blockwise", "QuantizedArray"),
        ("dict",))
    return cases


# ------------------------------------------------------------------ peft cases


def peft_cases(rng: np.random.Generator) -> list[Case]:
    import jax
    import jax.numpy as jnp
    import optax

    from effjax import peft
    from effjax.compress import FakeQuant

    key = jax.random.key(0)

    def base(**over):
        p = {"dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)},
             "out": {"kernel": jnp.ones((4, 2))}}
        for k, v in over.items():
            layer, name = k.split("__")
            if v is None:
                p[layer].pop(name)
            else:
                p[layer][name] = v
        return p

    cases = []

    def add(name, call, where=(), what=(), check=None, doc=""):
        cases.append(Case(f"peft/{name}", "peft", call, tuple(where), tuple(what), check, doc))

    lora = peft.LoRA(rank=2)
    add("inject/rule-matches-nothing", lambda: peft.inject(base(), {"nothing/kernel": lora},
                                                           key=key),
        ("nothing/kernel",), ("dense/kernel", "out/kernel"),
        doc="error naming the rule and the closest paths")
    add("inject/bad-regex", lambda: peft.inject(base(), {"dense/[kernel": lora}, key=key),
        ("dense/[kernel",), ("regex", "regular expression", "unterminated", "pattern"))
    for label, method, what in [
        ("'lora'", "lora", ("str", "'lora'")),
        ("optax.adam", optax.adam(1e-3), ("GradientTransformation",)),
        ("4", 4, ("int",)),
        ("the LoRA class", peft.LoRA, ("type", "class", "LoRA'>")),
        ("FakeQuant", FakeQuant(bits=4), ("FakeQuant",)),
    ]:
        add(f"inject/method={label}", lambda method=method: peft.inject(
            base(), {".*/kernel": method}, key=key), (".*/kernel", "dense/kernel"), what,
            doc="error naming the rule and the value's type")
    for v in (0, -1, 1.5, "4", None):
        add(f"LoRA/rank={v!r}", lambda v=v: peft.inject(base(), {".*/kernel": peft.LoRA(rank=v)},
                                                        key=key), ("rank",), val(v))
    add("LoRA/rank=10**9", lambda: peft.inject(base(), {"dense/kernel": peft.LoRA(rank=10**9)},
                                               key=key),
        ("rank",) + leaf("dense", "kernel"), val(10**9),
        doc="a rank far above the kernel's (8, 4): a clear error, not an OOM")
    for cls in ("DoRA", "VeRA", "RandLoRA", "LoRAXS", "NOLA", "MoS"):
        def other(cls=cls):
            return peft.inject(base(), {"dense/kernel": getattr(peft, cls)(rank=0)}, key=key)

        add(f"{cls}/rank=0", other, ("rank",), ("0",))
    for v in (float("nan"), float("inf"), "16"):
        add(f"LoRA/alpha={v!r}", lambda v=v: peft.inject(
            base(), {".*/kernel": peft.LoRA(rank=2, alpha=v)}, key=key), ("alpha",), val(v))
    add("inject/int-kernel", lambda: peft.inject(base(dense__kernel=jnp.ones((8, 4), jnp.int32)),
                                                 {"dense/kernel": lora}, key=key),
        ("dense/kernel",), ("int32",))
    add("inject/1-D-bias", lambda: peft.inject(base(), {"dense/bias": lora}, key=key),
        ("dense/bias",), ("(4,)",))
    add("inject/scalar-leaf", lambda: peft.inject(base(dense__kernel=jnp.float32(1)),
                                                  {"dense/kernel": lora}, key=key),
        ("dense/kernel",), ("()", "scalar"))

    def zero_size():
        p = base(dense__kernel=jnp.ones((0, 4)))
        return p, peft.materialize(peft.inject(p, {"dense/kernel": lora}, key=key))

    add("inject/zero-size-kernel", zero_size, ("dense/kernel",), ("(0, 4)",),
        lambda res: (None if tuple(res[1]["dense"]["kernel"].shape) == (0, 4)
                     else f"materialized shape {res[1]['dense']['kernel'].shape}"),
        "a (0, 4) kernel: materialize gives it back (or a clear error)")
    for v in (None, 0, "key"):
        add(f"inject/key={v!r}", lambda v=v: peft.inject(base(), {"dense/kernel": lora}, key=v),
            ("key",), val(v) + (type(v).__name__,))
    for label, rules, what in [
        ("a list of strings", ["dense/kernel"], ("list", "str")),
        ("a string", "dense/kernel", ("str",)),
        ("None", None, ("None",)),
        ("an int key", {1: lora}, ("int", "1")),
    ]:
        add(f"inject/rules={label}", lambda rules=rules: peft.inject(base(), rules, key=key),
            ("rules", "rule"), what)

    def saved(tmp):
        path = os.path.join(tmp, "adapters")
        peft.save_adapters(path, peft.inject(base(), {"dense/kernel": lora}, key=key))
        return path

    def load(over):
        with tempfile.TemporaryDirectory() as tmp:
            return peft.load_adapters(saved(tmp), base(**over))

    add("load_adapters/kernel-other-shape", lambda: load({"dense__kernel": jnp.ones((16, 4))}),
        ("dense/kernel",), ("(16, 4)", "(16, 2)", "(8, 2)"))
    add("load_adapters/kernel-missing", lambda: load({"dense__kernel": None}),
        ("dense/kernel",), (), doc="error naming the stored path missing from the tree")
    add("load_adapters/int-kernel", lambda: load({"dense__kernel": jnp.ones((8, 4), jnp.int32)}),
        ("dense/kernel",), ("int32",))
    add("inject/EVA-without-calibration", lambda: peft.inject(
        base(), {"dense/kernel": peft.EVA(rank=2)}, key=key), ("dense/kernel",),
        ("calibration",))
    return cases


# ------------------------------------------------------------------ compress cases


def _fake_quant_reference(w, bits):
    """Symmetric per-column fake quantization written plainly (channel_axis=-1)."""
    w = np.asarray(w, np.float64)
    levels = 2 ** (bits - 1) - 1
    scale = np.abs(w).max(axis=0, keepdims=True) / levels
    safe = np.where(scale > 0, scale, 1)
    return np.clip(np.round(w / safe), -levels, levels) * scale


def compress_cases(rng: np.random.Generator) -> list[Case]:
    import jax.numpy as jnp

    from effjax.compress import FakeQuant, fake_quantize, fake_quantize_params

    def base(kernel=None):
        return {"dense": {"kernel": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32)
                          if kernel is None else kernel},
                "emb": jnp.ones((16, 8))}

    cases = []

    def add(name, call, where=(), what=(), check=None, doc="error naming the argument"):
        cases.append(Case(f"compress/{name}", "compress", call, tuple(where), tuple(what), check,
                          doc))

    def fq(**kw):
        return lambda: fake_quantize_params(base(), {"dense/kernel": FakeQuant(**kw)})

    for v in (0, 1, 17, "8", 4.5, None, True):
        add(f"FakeQuant/bits={v!r}", fq(bits=v), ("bits",), val(v))
    for v in (0, -1, "64"):
        add(f"FakeQuant/group_size={v!r}", fq(group_size=v), ("group_size",), val(v))
    def group3():
        params = base()
        out = fake_quantize_params(params, {"dense/kernel": FakeQuant(group_size=3)})
        return np.asarray(params["dense"]["kernel"]), np.asarray(out["dense"]["kernel"])

    def group3_ok(res):
        w, got = res
        want = np.concatenate([_fake_quant_reference(w[i:i + 3], 4) for i in (0, 3, 6)])
        return None if np.allclose(got, want, rtol=1e-6, atol=0) else "differs from the reference"

    add("FakeQuant/group_size=3-on-8-rows", group3, ("group_size", "dense/kernel"), ("3",),
        group3_ok, "documented: a short last group is a group of its own (rows 6-7)")
    for v in (5, "x", 1.5):
        add(f"FakeQuant/channel_axis={v!r}", fq(channel_axis=v), ("channel_axis", "dense/kernel"),
            val(v))
    add("FakeQuant/symmetric='yes'", fq(symmetric="yes"), ("symmetric",), ("'yes'",))
    add("fake_quantize_params/rule-matches-nothing", lambda: fake_quantize_params(
        base(), {"nothing": FakeQuant()}), ("nothing",), ("dense/kernel", "emb"))
    add("fake_quantize_params/int-leaf", lambda: fake_quantize_params(
        base(jnp.ones((8, 4), jnp.int32)), {"dense/kernel": FakeQuant()}), ("dense/kernel",),
        ("int32",))
    for label, value in (("'int8'", "int8"), ("8", 8)):
        add(f"fake_quantize_params/rule-value={label}", lambda value=value: fake_quantize_params(
            base(), {"dense/kernel": value}), ("dense/kernel",), (type(value).__name__,))
    add("fake_quantize_params/scalar-leaf", lambda: fake_quantize_params(
        base(jnp.float32(2)), {"dense/kernel": FakeQuant()}), ("dense/kernel",),
        ("()", "scalar"))
    add("fake_quantize_params/zero-size-leaf", lambda: fake_quantize_params(
        base(jnp.ones((0, 4))), {"dense/kernel": FakeQuant()}), ("dense/kernel",), ("(0, 4)",),
        lambda out: (None if tuple(out["dense"]["kernel"].shape) == (0, 4)
                     else f"shape {out['dense']['kernel'].shape}"),
        "a (0, 4) leaf comes back empty (or a clear error)")
    for v in (np.nan, 1e20, 3e38, -3e38):
        bits = int(rng.choice([2, 4, 8]))

        seed = int(rng.integers(1 << 30))
        def planted(v=v, bits=bits, seed=seed):
            w = np.random.default_rng(seed).standard_normal((8, 4)).astype(np.float32)
            w[2, 1] = v
            out = fake_quantize_params(base(jnp.asarray(w)), {"dense/kernel": FakeQuant(
                bits=bits)})
            return w, np.asarray(out["dense"]["kernel"], np.float64)

        def planted_ok(res, v=v, bits=bits):
            w, got = res
            want = _fake_quant_reference(w, bits)
            cols = [1] if np.isfinite(v) else []
            cols += [0, 2, 3]  # a NaN spoils its own column's scale only
            for c in cols:
                if not np.allclose(got[:, c], want[:, c], rtol=1e-5, atol=0):
                    return (f"column {c}: {got[:, c].tolist()} != per-column reference "
                            f"{want[:, c].tolist()}")
            return None

        add(f"fake_quantize_params/value-{v:g}-bits-{bits}", planted, check=planted_ok,
            doc="a weight element NaN/huge: the other columns (and a finite huge one's own) "
                "equal the per-column reference")
    add("fake_quantize/axis=5", lambda: fake_quantize(jnp.ones((8, 4)), bits=4, axis=5),
        ("axis",), ("5",))
    add("fake_quantize/bits=1", lambda: fake_quantize(jnp.ones((8, 4)), bits=1, axis=0),
        ("bits",), ("1",))
    return cases


# ------------------------------------------------------------------ suites

QUICK = (
    "optim/adamw_8bit/grad-transposed",
    "optim/adamw_8bit/grad-missing-leaf",
    "optim/adamw_8bit/init-int32-param",
    "optim/adamw_8bit/grad-nan",
    "optim/adamw_8bit/block_size='256'",
    "optim/quantize_state/bits=3",
    "quant/quantize/x-int32",
    "quant/quantize/block_size=0",
    "quant/quantize/codebook=[-2, 0, 2]",
    "quant/dequantize/absmax-wrong-shape",
    "peft/inject/rule-matches-nothing",
    "peft/LoRA/rank=0",
    "compress/FakeQuant/bits=17",
    "compress/fake_quantize_params/int-leaf",
)


def selftest_cases() -> list[Case]:
    """Hand-made cases whose class is known, for the tests of the runner and classifier."""

    def clear():
        raise ValueError("['w']: shape (2,) does not match the parameter's (3,)")

    def unclear():
        return 1 / 0

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def hang():
        time.sleep(3600)

    def hog():
        return np.ones((1 << 30) * 8, np.uint8).sum()  # 8 GB: past the memory limit

    def oom_error():
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 4000000000 bytes.")

    return [
        Case("self/clear", "optim", clear, leaf("w"), ("(2,)",)),
        Case("self/unclear", "optim", unclear, leaf("w"), ("(2,)",)),
        Case("self/wrong-result", "quant", lambda: 2.0,
             check=lambda r: None if r == 1.0 else f"got {r}, expected 1.0"),
        Case("self/right-result", "quant", lambda: 1.0,
             check=lambda r: None if r == 1.0 else f"got {r}, expected 1.0"),
        Case("self/accepted-bad-input", "peft", lambda: 1.0, ("x",), ("1",)),
        Case("self/dies", "peft", die, ("x",), ("1",)),
        Case("self/hangs", "compress", hang, ("x",), ("1",)),
        Case("self/memory", "compress", hog, ("x",), ("1",)),
        Case("self/oom-error", "compress", oom_error, ("x",), ("1",)),
    ]


def build_cases(suite: str, seed: int, quick: bool) -> list[Case]:
    """The cases of ``suite`` (``main`` or ``selftest``), the same for the same seed."""
    if suite == "selftest":
        return selftest_cases()
    cases = []
    for i, fn in enumerate((optim_cases, quant_cases, peft_cases, compress_cases)):
        cases += fn(np.random.default_rng([seed, i]))
    names = [c.name for c in cases]
    dupes = [n for n, k in Counter(names).items() if k > 1]
    if dupes:
        raise AssertionError(f"duplicate case names: {dupes}")
    if quick:
        by_name = {c.name: c for c in cases}
        missing = [n for n in QUICK if n not in by_name]
        if missing:
            raise AssertionError(f"quick cases not built: {missing}")
        cases = [by_name[n] for n in QUICK]
    return cases


# ------------------------------------------------------------------ the child process


def worker(suite: str, seed: int, quick: bool, memory_gb: float) -> None:
    """Read case indices on stdin, write one JSON outcome per line on the original stdout."""
    limit = int(memory_gb * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed (Python or C) goes to stderr
    sys.stdout = sys.stderr
    cases = build_cases(suite, seed, quick)
    channel.write(json.dumps({"ready": len(cases)}) + "\n")
    for line in sys.stdin:
        i = int(line)
        channel.write(json.dumps({"index": i, **run_in_process(cases[i])}) + "\n")


class _Child:
    def __init__(self, suite, seed, quick, memory_gb, devices, log):
        env = dict(os.environ, JAX_PLATFORMS="cpu", OPENBLAS_NUM_THREADS="1",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        cmd = [sys.executable, "-m", "experiments.fuzz_api", "--worker", "--suite", suite,
               "--seed", str(seed), "--memory-gb", str(memory_gb)] + (["--quick"] if quick
                                                                         else [])
        self.log = log
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=open(log, "ab"),
                                     text=True, start_new_session=True)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)

    def read(self, timeout: float) -> tuple[dict | None, str]:
        """The next JSON line, or ``None`` and why not (the process is then killed)."""
        if self.sel.select(timeout):
            line = self.proc.stdout.readline()
            if line:
                return json.loads(line), ""
            self.kill()
            return None, f"the process ended (exit status {self.proc.returncode})"
        self.kill()
        return None, f"no answer within {timeout:g} s (killed)"

    def send(self, i: int) -> bool:
        try:
            self.proc.stdin.write(f"{i}\n")
            self.proc.stdin.flush()
            return True
        except BrokenPipeError:
            return False

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.sel.close()

    def tail(self) -> str:
        try:
            return Path(self.log).read_text(errors="replace")[-800:]
        except OSError:
            return ""


def run_cases(suite: str = "main", *, seed: int = 0, quick: bool = False,
              timeout: float = 30.0, memory_gb: float = 4.0, devices: int = 1,
              startup_timeout: float = 180.0, progress: bool = False) -> list[dict]:
    """Run every case of ``suite`` in child processes; one result dict per case."""
    cases = build_cases(suite, seed, quick)
    results = []
    child = None
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "worker.log")
        try:
            for i, case in enumerate(cases):
                if child is None:
                    child = _Child(suite, seed, quick, memory_gb, devices, log)
                    hello, why = child.read(startup_timeout)
                    if not hello or hello.get("ready") != len(cases):
                        raise RuntimeError(f"the fuzz worker did not start ({why}):\n"
                                           f"{child.tail()}")
                t0 = time.perf_counter()
                out, why = child.read(timeout) if child.send(i) else (None, "stdin closed")
                if out is None:
                    out = dict(kind="died", message=f"{why}; stderr: {child.tail()[-300:]}",
                               seconds=round(time.perf_counter() - t0, 2))
                    child = None
                out.pop("index", None)
                cls = classify(case, out)
                if cls == "d" and child is not None:  # start afresh after an OOM
                    child.kill()
                    child = None
                results.append(dict(name=case.name, area=case.area, cls=cls, doc=case.doc,
                                    **out))
                if progress:
                    print(f"[{i + 1}/{len(cases)}] {cls} {case.name}", file=sys.stderr,
                          flush=True)
        finally:
            if child is not None:
                child.kill()
    return results


# ------------------------------------------------------------------ report


def table(results: Sequence[dict]) -> str:
    """Markdown: class counts per area, then every case outside class ``a``."""
    lines = ["| area | a: clear / right | b: unclear error | c: silent wrong | d: crash | cases |",
             "|---|---:|---:|---:|---:|---:|"]
    for area in AREAS + ("all",):
        rows = [r for r in results if area in ("all", r["area"])]
        if not rows:
            continue
        n = Counter(r["cls"] for r in rows)
        lines.append(f"| {area} | {n['a']} | {n['b']} | {n['c']} | {n['d']} | {len(rows)} |")
    bad = [r for r in results if r["cls"] != "a"]
    if bad:
        lines += ["", "| case | class | outcome |", "|---|---|---|"]
        for r in sorted(bad, key=lambda r: (r["cls"], r["name"])):
            what = r.get("problem") or r.get("message") or ""
            what = (f"{r['type']}: " if r.get("type") else "") + what
            what = " ".join(what.split())[:200].replace("|", "\\|")
            lines.append(f"| `{r['name']}` | {r['cls']} | {what} |")
    return "\n".join(lines)


def plot(results: Sequence[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    colors = {"a": "tab:green", "b": "tab:orange", "c": "tab:red", "d": "black"}
    bottom = np.zeros(len(AREAS))
    for cls, color in colors.items():
        counts = np.array([sum(r["area"] == a and r["cls"] == cls for r in results)
                           for a in AREAS])
        ax.bar(AREAS, counts, bottom=bottom, color=color, label=f"{cls}: {CLASSES[cls]}")
        bottom += counts
    ax.set_ylabel("cases")
    ax.set_title("effjax public API under bad inputs (fuzz_api)")
    ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _tree_state() -> str:
    """The commit the code under test is at, and whether effjax / pallas_kernels differ."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "effjax",
                                "pallas_kernels"], cwd=ROOT, text=True, capture_output=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return f"commit {head}" + (" + uncommitted changes in effjax/pallas_kernels" if dirty else "")


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a fixed subset, seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per case")
    ap.add_argument("--memory-gb", type=float, default=4.0, help="RLIMIT_AS of the child")
    ap.add_argument("--devices", type=int, default=1, help="CPU devices of the child")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--suite", default="main", choices=("main", "selftest"))
    ap.add_argument("--note", default="", help="recorded with the results (e.g. the tree)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.suite, args.seed, args.quick, args.memory_gb)
        return []
    t0 = time.time()
    results = run_cases(args.suite, seed=args.seed, quick=args.quick, timeout=args.timeout,
                        memory_gb=args.memory_gb, devices=args.devices, progress=not args.quick)
    command = " ".join(["python -m experiments.fuzz_api",
                        *(argv if argv is not None else sys.argv[1:])])
    import jax

    meta = dict(machine=f"{platform.machine()} {os.cpu_count()} cores", jax=jax.__version__,
                command=command, seconds=round(time.time() - t0, 1), seed=args.seed,
                tree=_tree_state(), note=args.note,
                classes=CLASSES, counts=dict(Counter(r["cls"] for r in results)))
    md = table(results)
    print(md)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "fuzz_api" + ("_quick" if args.quick else "")
                        + ("" if args.suite == "main" else f"_{args.suite}"))
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(f"`{command}` ({meta['seconds']} s, {meta['machine']}, jax {meta['jax']}; "
                f"{meta['tree']}{'; ' + args.note if args.note else ''})\n\n" + md + "\n")
    plot(results, stem + ".png")
    return results


if __name__ == "__main__":
    main()
