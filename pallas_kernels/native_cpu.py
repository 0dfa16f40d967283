"""The fused low-bit optimizer step as a native CPU kernel (C++, called through XLA's FFI).

Pallas only interprets on CPU, and XLA:CPU compiles the jnp step into passes that materialize
leaf-sized temporaries (the block absmax is a reduction it will not fuse with its consumers),
so on a CPU the fused step is this C++ kernel (``csrc/lowbit_step.cc``), the counterpart of
bitsandbytes' native CPU optimizer kernels. One pass per block of elements:

    m = codebook_m[codes_m] * absmax_m,  v = codebook_v[codes_v] * absmax_v     (dequantize)
    (u, m', v') = rule(g, p, m, v)                                   (adam | lion | sgd)
    absmax'_b = max_{i in b} |m'_i|,  codes'_i = nearest(m'_i * (1 / absmax'_b))   (requantize)

with the float32 expressions of :func:`pallas_kernels.optim_update.adam_rule`, ``lion_rule``
and ``sgd_rule`` in the same order, compiled with ``-ffp-contract=off`` (no fused
multiply-adds), and effjax.quant's nearest-code search: its bucket table packed one int32 per
bucket (:func:`_search_tables`), so each element costs one table load. Codes and scales equal
the jnp path's (tested); updates equal them bit for bit for Lion and SGD and within an ulp or
two of float32 for Adam, where XLA contracts multiply-adds into FMAs depending on how it fuses
the graph. Blocks run in parallel on XLA's intra-op thread pool, and
the codes and scales are written in place (``input_output_aliases``).

Build: the source is compiled on first use with the system C++ compiler (``$CXX``, else
``c++``; flags ``-O3 -march=native``) into ``$EFFJAX_CACHE`` (default ``~/.cache/effjax``),
keyed by a hash of the source, the flags, the compiler, this CPU's feature flags and the jax
version, and registered with ``jax.ffi``. If there is no compiler or the build fails,
:func:`available` is False (:func:`unavailable_reason` says why) and ``effjax.optim`` keeps the
jnp step. ``EFFJAX_NATIVE=0`` switches the kernel off.

Supported leaves: float32 gradients (and parameters), 8-bit or 4-bit moments whose blocks are
whole rows of the flattened leaf (no padded last block; 4-bit: an even last axis), as
:func:`pallas_kernels.optim_update.fused_update_chunked` needs too (:func:`supports`).

Example:
  >>> import jax.numpy as jnp
  >>> from effjax.quant import dynamic_codebook, quantize_blockwise
  >>> from pallas_kernels import native_cpu, optim_update
  >>> g = jnp.linspace(-1.0, 1.0, 1024).reshape(4, 256)
  >>> m = quantize_blockwise(0.5 * g, codebook=dynamic_codebook(), block_size=256)
  >>> s = {"b1": 0.9, "b2": 0.99, "lr": -0.1}
  >>> r, (r2,) = optim_update.fused_update_reference(optim_update.lion_rule, g, None, (m,), s)
  >>> if native_cpu.available():
  ...     u, (m2,) = native_cpu.lowbit_step("lion", g, None, (m,), s)
  ... else:  # no C++ compiler here
  ...     u, m2 = r, r2
  >>> bool((u == r).all()), bool((m2.codes == r2.codes).all())
  (True, True)
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from effjax.quant import QuantizedArray, search
from pallas_kernels.blockwise import chunk_view

__all__ = ["available", "unavailable_reason", "supports", "lowbit_step", "library_path"]

_SOURCE = Path(__file__).parent / "csrc" / "lowbit_step.cc"
_TARGET = "effjax_lowbit_step"
_FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-std=c++17",
          "-shared", "-fPIC")
_ALGOS = {"adam": 0, "lion": 1, "sgd": 2}
_WD, _NESTEROV, _APPLY, _BF16_SCALE = 1, 2, 4, 8
# Slot order of the scalars buffer (lowbit_step.cc's enum Slot).
_SLOTS = ("c1", "b1", "c2", "b2", "bc1", "bc2", "bc1_next", "eps_root", "eps", "wd", "lr")


def _cpu_fingerprint() -> str:
    """The CPU's feature flags (``-march=native`` builds differ per CPU), else its name."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = [line for line in f if line.startswith("flags")]
    except OSError:
        flags = []
    return flags[0] if flags else (platform.processor() or platform.machine())


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def library_path() -> Path:
    """Where the compiled kernel for this machine lives (built by :func:`available`)."""
    cxx = _compiler() or "none"
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                                 timeout=60).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        version = cxx
    key = hashlib.sha256("\n".join([
        _SOURCE.read_text(), " ".join(_FLAGS), version, _cpu_fingerprint(), jax.__version__,
    ]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("EFFJAX_CACHE", Path.home() / ".cache" / "effjax"))
    return cache / "native" / f"lowbit_step-{key}.so"


def _build(out: Path) -> None:
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found ($CXX, c++ or g++)")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent builds (pytest-xdist) never see a
    # half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [cxx, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if res.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_REASON: list[str] = []


@functools.cache
def available() -> bool:
    """Whether the native kernel is built and registered (builds it on first call). False
    when ``EFFJAX_NATIVE=0``, off CPU, or when the build fails (warns once)."""
    if os.environ.get("EFFJAX_NATIVE", "1") == "0":
        _REASON.append("EFFJAX_NATIVE=0")
        return False
    if jax.default_backend() != "cpu":
        _REASON.append(f"the default backend is {jax.default_backend()}, not cpu")
        return False
    try:
        path = library_path()
        if not path.exists():
            _build(path)
        lib = ctypes.cdll.LoadLibrary(str(path))
        jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.EffjaxLowbitStep),
                                    platform="cpu")
    except Exception as e:  # noqa: BLE001 - any failure means: use the jnp step
        _REASON.append(f"{type(e).__name__}: {e}")
        warnings.warn(f"effjax: the native CPU optimizer kernel is unavailable ({e}); the "
                      "low-bit optimizers use the (slower) jnp step", RuntimeWarning,
                      stacklevel=2)
        return False
    return True


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None if it is True or was not called)."""
    return _REASON[-1] if _REASON else None


def supports(g, p, moments) -> bool:
    """Whether :func:`lowbit_step` takes this leaf: float32 gradient (and parameter), 4- or
    8-bit moments of the same block size whose blocks are whole rows of the flattened leaf,
    with float32 or (all) bfloat16 scales."""
    if jnp.dtype(g.dtype) != jnp.float32 or (p is not None and jnp.dtype(p.dtype) != jnp.float32):
        return False
    if not moments or not all(isinstance(q, QuantizedArray) for q in moments):
        return False
    q0 = moments[0]
    if any((q.block_size, q.bits, q.shape) != (q0.block_size, q0.bits, q0.shape)
           for q in moments) or tuple(g.shape) != tuple(q0.shape):
        return False
    if any(jnp.dtype(q.dtype) != jnp.float32 for q in moments):
        return False  # the rule would run in the moments' dtype
    if q0.bits == 4 and any(len(q.codebook) > 16 for q in moments):
        return False
    scale_dtypes = {jnp.dtype(q.absmax.dtype) for q in moments}
    if scale_dtypes not in ({jnp.dtype(jnp.float32)}, {jnp.dtype(jnp.bfloat16)}):
        return False  # one flag covers both moments
    # The chunked step's condition: blocks are rows of a free 2-D view of the leaf.
    return chunk_view(tuple(g.shape), q0.block_size, q0.bits) is not None


@functools.cache
def _search_tables(values: tuple[float, ...]):
    """The kernel's tables for one codebook: ``(values, edge, table, order)`` and the bucket
    parameters ``(shift, q0, buckets, half)``.

    effjax.quant's bucket table (``search.bucket_table``) packed one int32 per bucket:
    ``t << 8 | lo``, where ``lo`` is the sorted index below the bucket's threshold ``T`` and
    ``t = (|T| bits) - ((q + q0) << shift)`` is ``T``'s offset from the bucket's first float
    (in ``[0, 2**shift)`` from bucket 1 up, checked here), or ``2**shift + 1`` (positive side)
    / ``-2`` (negative side) for a bucket without a threshold. Bucket 0 also holds every ``|y|``
    below its first float, so its two thresholds go in ``edge`` (floats, ``+inf`` if none).
    ``order`` maps sorted index to code (256 entries).
    """
    vals = np.asarray(values, np.float32)
    n = vals.size
    key = tuple(float(v) for v in vals)
    order = search.sort_order(key)
    sorted_vals = key if order is None else order[0]
    table = search.bucket_table(sorted_vals)
    shift, q0, nb = table.shift, table.q0, table.buckets
    count = table.rows[:, 0].astype(np.int64)
    thr = table.rows[:, 1].astype(np.float32)
    has = np.isfinite(thr)
    if np.any(count[has] < 0) or np.any(count[has] + 1 > n - 1):
        raise AssertionError("bucket threshold without two neighbouring values")
    base = np.tile((np.arange(nb, dtype=np.int64) + q0) << shift, 2)
    t = (thr.view(np.int32).astype(np.int64) & 0x7FFFFFFF) - base
    inner = has & (np.arange(2 * nb) % nb != 0)
    if np.any((t[inner] < 0) | (t[inner] >= 1 << shift)):
        raise AssertionError("bucket threshold outside its bucket")
    none = np.where(np.arange(2 * nb) < nb, (1 << shift) + 1, -2)
    t = np.where(has, t, none)
    t[[0, nb]] = 0  # bucket 0 compares against `edge`
    packed = ((t << 8) | np.clip(count, 0, n - 1)).astype(np.int32)
    edge = thr[[0, nb]].astype(np.float32)
    perm = np.zeros(256, np.int32)
    perm[:n] = np.arange(n) if order is None else np.asarray(order[1])
    return (vals, edge, packed, perm), (shift, q0, nb, nb)


def _scalars(algo: str, s: dict) -> jax.Array:
    """The rules' scalar operands as float32, each computed with the rule's own expression
    (Python numbers are weakly typed, so ``(1 - b1) * one`` is the float32 the rule uses)."""
    one = jnp.ones((), jnp.float32)
    f = {k: 0.0 * one for k in _SLOTS}
    if algo in ("adam", "lion"):
        f.update(c1=(1 - s["b1"]) * one, b1=s["b1"] * one, c2=(1 - s["b2"]) * one,
                 b2=s["b2"] * one)
    if algo == "adam":
        f.update(bc1=jnp.asarray(s["bc1"]).astype(jnp.float32),
                 bc2=jnp.asarray(s["bc2"]).astype(jnp.float32),
                 eps=s["eps"] * one, eps_root=s["eps_root"] * one)
        if "bc1_next" in s:
            f["bc1_next"] = jnp.asarray(s["bc1_next"]).astype(jnp.float32)
    if algo == "sgd":
        f["b1"] = s["decay"] * one
    if "wd" in s:
        f["wd"] = s["wd"] * one
    if "lr" in s:
        f["lr"] = s["lr"] * one
    elif "lr_cast" in s:
        f["lr"] = jnp.asarray(s["lr_cast"]).astype(jnp.float32)
    else:
        f["lr"] = one
    return jnp.stack([jnp.asarray(f[k], jnp.float32).reshape(()) for k in _SLOTS])


def lowbit_step(algo: str, g, p, moments, scalars: dict, *, apply: bool = False,
                name: str = "<leaf>"):
    """One fused step of one leaf: ``(update, new moments)``, or ``(new parameter, new
    moments)`` with ``apply=True`` (``p + update``, written over ``p``).

    Args and results as :func:`pallas_kernels.optim_update.fused_update` (``algo`` names the
    rule: ``"adam"``, ``"lion"`` or ``"sgd"``; ``scalars`` is the same dict). Requires
    :func:`available` and :func:`supports`; raises ``ValueError`` naming the leaf otherwise.
    """
    if algo not in _ALGOS:
        raise ValueError(f"{name}: unknown rule {algo!r}; expected one of {sorted(_ALGOS)}")
    n_mom = 2 if algo == "adam" else 1
    if len(moments) != n_mom:
        raise ValueError(f"{name}: {algo} needs {n_mom} moments, got {len(moments)}")
    g = jnp.asarray(g)
    if not supports(g, p, moments):
        raise ValueError(
            f"{name}: the native kernel takes float32 leaves whose blocks are whole rows; got "
            f"gradient {g.dtype}{tuple(g.shape)}"
            + ("" if p is None else f", parameter {jnp.asarray(p).dtype}")
            + f", moments {[(q.bits, q.block_size) for q in moments]}")
    if not available():
        raise ValueError(f"{name}: the native CPU kernel is unavailable: {unavailable_reason()}")
    q0 = moments[0]
    flags = (_WD if "wd" in scalars else 0) | (_NESTEROV if scalars.get("nesterov")
                                                or "bc1_next" in scalars else 0)
    flags |= _APPLY if apply else 0
    scale_dtype = jnp.dtype(q0.absmax.dtype)
    flags |= _BF16_SCALE if scale_dtype == jnp.bfloat16 else 0
    if (flags & (_WD | _APPLY)) and p is None:
        raise ValueError(f"{name}: weight decay and apply need the parameter")
    empty_f, empty_u8, empty_i = (jnp.zeros((0,), t) for t in (jnp.float32, jnp.uint8,
                                                               jnp.int32))
    args = [g, empty_f if p is None else jnp.asarray(p),
            _scalars(algo, scalars)]
    attrs = dict(algo=np.int64(_ALGOS[algo]), flags=np.int64(flags),
                 block_size=np.int64(q0.block_size), bits=np.int64(q0.bits))
    out_types = [jax.ShapeDtypeStruct(g.shape, jnp.float32)]
    for k in range(2):
        if k < n_mom:
            q = moments[k]
            (vals, edge, table, order), (shift, qq, buckets, half) = _search_tables(q.codebook)
            args += [q.codes, q.absmax.astype(jnp.float32), jnp.asarray(vals),
                     jnp.asarray(edge), jnp.asarray(table), jnp.asarray(order)]
            out_types += [jax.ShapeDtypeStruct(q.codes.shape, jnp.uint8),
                          jax.ShapeDtypeStruct(q.absmax.shape, jnp.float32)]
        else:
            args += [empty_u8, empty_f, empty_f, empty_f, empty_i, empty_i]
            out_types += [jax.ShapeDtypeStruct((0,), jnp.uint8),
                          jax.ShapeDtypeStruct((0,), jnp.float32)]
            shift, qq, buckets, half = 0, 0, 1, 1
        attrs.update({f"shift{k}": np.int64(shift), f"q0{k}": np.int64(qq),
                      f"buckets{k}": np.int64(buckets), f"half{k}": np.int64(half)})
    # Codes and scales are updated in place (a block is decoded before its codes are
    # written). The first output is written over the parameter with apply=True, else over the
    # gradient (each element's gradient is read before its update is written): in a training
    # step whose gradients are temporaries (computed in the same jit) the update then needs no
    # buffer of its own (one leaf-sized temporary less, and no fresh pages to fault in); where
    # the gradient is still needed, or is an argument of the jitted function, XLA copies it.
    aliases = {3: 1, 4: 2}
    if n_mom == 2:
        aliases.update({9: 3, 10: 4})
    aliases[1 if apply else 0] = 0
    call = jax.ffi.ffi_call(_TARGET, out_types, input_output_aliases=aliases,
                            vmap_method="sequential")
    out, c0, a0, c1, a1 = call(*args, **attrs)
    new = []
    for q, c, a in zip(moments, (c0, c1), (a0, a1)):
        new.append(QuantizedArray(codes=c.reshape(q.codes.shape),
                                  absmax=a.reshape(q.absmax.shape).astype(scale_dtype),
                                  shape=q.shape,
                                  dtype=q.dtype, block_size=q.block_size, codebook=q.codebook,
                                  bits=q.bits))
    return out.reshape(g.shape), tuple(new)
