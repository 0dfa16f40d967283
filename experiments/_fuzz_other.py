"""The ``effjax.quant``, ``effjax.peft`` and ``effjax.compress`` cases of
``experiments.fuzz_api``."""

from __future__ import annotations

import dataclasses
import os
import tempfile

import numpy as np

from experiments._fuzz_case import Case, leaf, val

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
