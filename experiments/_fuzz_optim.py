"""The ``effjax.optim`` cases of ``experiments.fuzz_api``: constructors, ``init`` and ``update``
of 16 optimizers under bad leaves, dtypes, shapes, values, states and arguments, and the check
of the documented step rule."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from experiments._fuzz_case import LR, Case, leaf, val

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
