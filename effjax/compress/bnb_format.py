"""bitsandbytes' serialized 4-bit format: read and write NF4/FP4 weights without dequantizing.

A ``bitsandbytes.nn.Linear4bit`` module ``<m>`` saves its quantized weight as these
``state_dict`` entries (``Linear4bit._save_to_state_dict`` with
``QuantState.as_dict(packed=True)``, bitsandbytes 0.50)::

    <m>.weight                                    uint8 [(n + 1) // 2, 1]  packed codes
    <m>.weight.absmax                             float32 [blocks]         (uint8 with DQ)
    <m>.weight.quant_map                          float32 [16]             NF4/FP4 table
    <m>.weight.nested_absmax                      float32 [ceil(blocks / 256)]   (DQ only)
    <m>.weight.nested_quant_map                   float32 [256]  dynamic map     (DQ only)
    <m>.weight.quant_state.bitsandbytes__<nf4|fp4>  uint8 [len]  UTF-8 JSON of
        {"quant_type", "blocksize", "dtype", "shape": [out, in],
         "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset"}  (last 3: DQ)

with ``n = out * in`` codes of the torch weight ``[out, in]`` flattened row-major, two per
byte, the first in the high nibble. These are exactly the arrays of a
:class:`~effjax.compress.QuantizedWeight` in its row view (:mod:`effjax.compress.weight_quant`:
a Flax kernel ``W[in, out]`` is stored as ``W.T``), so both directions only reshape: the packed
bytes are ``codes`` flattened, ``absmax`` is ``scales`` (the uint8 codes of the scales under
double quantization), ``nested_absmax`` is ``scales_absmax`` and ``nested_offset`` is
``scales_offset``. Nothing is dequantized or requantized, so a checkpoint read and written
again is byte-identical, JSON included.

For a kernel with several input or output axes (``DenseGeneral`` / ``Einsum``) the torch
weight is the row view ``[n_out, n_in]`` (output axes, then input axes, each flattened
row-major), what a ``torch.nn.Linear`` over the flattened features holds; a stacked kernel
(``batch_axes``) is written as one weight ``[layers * n_out, n_in]`` (its blocks may cross
layers, so it cannot be split into per-layer modules without requantizing).

**Whole trees.** :func:`save_bnb_checkpoint` / :func:`load_bnb_checkpoint` write and read a
safetensors file. ``module_names`` says which torch module each effjax leaf belongs to:
a callable ``path -> module name | None`` on the leaf's path (``'dense_0/kernel'`` ->
``'model.fc1'``; :func:`effjax.peft.llama_module_names` is one), or ordered rules
``{regex: template | None}`` whose first fullmatching regex gives
``match.expand(template)`` (``{r'dense_(\\d+)/(kernel|bias)': r'layers.\\1'}``). The torch
parameter is then named from the leaf's last path component: ``kernel``, ``embedding`` and
``scale`` -> ``<module>.weight``, ``bias`` -> ``<module>.bias``. Leaves without a name are not
written (and are kept from ``params_like`` on load). Quantized kernels are written in
bitsandbytes' format; float leaves as their torch tensors: a 2-D ``kernel`` transposed to
``[out, in]``, everything else (biases, norm scales, embeddings ``[vocab, d]``) as it is.

Only NF4 and FP4 have a bitsandbytes format (its int8 ``Linear8bitLt`` is not covered);
the ``quant_map`` must be bitsandbytes' own table.

Reference: bitsandbytes ``functional.QuantState.as_dict`` / ``from_dict``,
``nn.modules.Params4bit.from_prequantized``, ``Linear4bit._save_to_state_dict``
(bitsandbytes 0.50.2).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from effjax.compress import NF4, quantize_params
  >>> w = jax.random.normal(jax.random.key(0), (100, 7))          # Flax kernel (in, out)
  >>> node = quantize_params({'k': w}, {'k': NF4(block_size=64)})['k']
  >>> sd = to_bnb_state_dict(node, 'fc.')
  >>> list(sd)  # doctest: +NORMALIZE_WHITESPACE
  ['fc.weight', 'fc.weight.absmax', 'fc.weight.quant_map', 'fc.weight.nested_absmax',
   'fc.weight.nested_quant_map', 'fc.weight.quant_state.bitsandbytes__nf4']
  >>> sd['fc.weight'].shape, sd['fc.weight.absmax'].dtype
  ((350, 1), dtype('uint8'))
  >>> back = from_bnb_state_dict(sd, 'fc.', shape=(100, 7))
  >>> bool(jnp.array_equal(back.materialize(), node.materialize()))
  True
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from effjax._optional import import_optional
from effjax.compress.weight_quant import FP4, NF4, QuantizedWeight, is_quantized
from effjax.quant import weights as wq
from effjax.quant.codebooks import dynamic_codebook
from effjax.selection import assign_rules, compile_rules, tree_paths

__all__ = ["to_bnb_state_dict", "from_bnb_state_dict", "save_bnb_checkpoint",
           "load_bnb_checkpoint"]

_QS = "quant_state.bitsandbytes__"
_FORMATS = {"nf4": NF4, "fp4": FP4}
_TORCH_PARAM = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def _nested_map() -> np.ndarray:
    return np.asarray(dynamic_codebook(signed=True), np.float32)


def _torch_shape(lay) -> tuple[int, int]:
    """The torch weight ``[n_out, n_in]`` of a kernel layout (its row view)."""
    return (lay.n_batch * lay.n_out, lay.n_in)


def _json_tensor(d: dict) -> np.ndarray:
    # bitsandbytes.utils.pack_dict_to_tensor: json.dumps with the default separators
    return np.frombuffer(json.dumps(d).encode("utf-8"), np.uint8).copy()


def to_bnb_state_dict(node: QuantizedWeight, prefix: str = "") -> dict[str, np.ndarray]:
    """The ``state_dict`` entries bitsandbytes' ``Linear4bit`` writes for this weight.

    Reshapes only (see the module docstring): ``{prefix}weight`` is ``codes`` flattened to
    ``[(n + 1) // 2, 1]``, ``{prefix}weight.absmax`` the block scales (their uint8 codes
    under double quantization), ``nested_absmax`` / ``nested_offset`` the nested statistics,
    ``quant_map`` / ``nested_quant_map`` bitsandbytes' tables, and the packed JSON
    ``quant_state.bitsandbytes__<kind>`` with ``shape`` the torch weight ``[n_out, n_in]``.

    Args:
      node: an NF4 or FP4 :class:`~effjax.compress.QuantizedWeight`.
      prefix: the torch module's key prefix, with its trailing dot (``'model.fc1.'``).

    Returns:
      ``{key: numpy array}`` in bitsandbytes' key order, ready for ``safetensors``.

    Raises:
      TypeError: ``node`` is not an NF4/FP4 ``QuantizedWeight`` (int8/int4 have no
        bitsandbytes 4-bit format).

    Example:
      >>> import jax.numpy as jnp
      >>> from effjax.compress import FP4, quantize_params
      >>> node = quantize_params({'k': jnp.ones((64, 4))},
      ...                        {'k': FP4(block_size=32, double_quant=False)})['k']
      >>> sd = to_bnb_state_dict(node, 'lin.')
      >>> sd['lin.weight'].shape, sd['lin.weight.absmax'].tolist()
      ((128, 1), [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
      >>> bytes(sd['lin.weight.quant_state.bitsandbytes__fp4']).decode()
      '{"quant_type": "fp4", "blocksize": 32, "dtype": "float32", "shape": [4, 64]}'
    """
    if not is_quantized(node) or not isinstance(node.format, (NF4, FP4)):
        what = type(node.format).__name__ if is_quantized(node) else type(node).__name__
        raise TypeError(f"bitsandbytes' 4-bit format holds NF4 or FP4 weights, got {what} "
                        f"(prefix {prefix!r})")
    fmt = node.format
    w = prefix + "weight"
    sd = {w: np.asarray(node.codes, np.uint8).reshape(-1, 1)}
    sd[w + ".absmax"] = np.asarray(node.scales).ravel()
    sd[w + ".quant_map"] = wq.four_bit_table(fmt.kind)
    meta: dict[str, Any] = {"quant_type": fmt.kind, "blocksize": int(fmt.block_size),
                            "dtype": jnp.dtype(node.dtype).name,
                            "shape": list(_torch_shape(node.layout))}
    if fmt.double_quant:
        sd[w + ".nested_absmax"] = np.asarray(node.scales_absmax, np.float32).ravel()
        sd[w + ".nested_quant_map"] = _nested_map()
        meta.update(nested_blocksize=wq.DOUBLE_QUANT_BLOCK, nested_dtype="float32",
                    nested_offset=float(np.float32(node.scales_offset)))
    sd[w + "." + _QS + fmt.kind] = _json_tensor(meta)
    return sd


def _get(sd: Mapping[str, Any], key: str, prefix: str) -> np.ndarray:
    if key not in sd:
        near = sorted(k for k in sd if k.startswith(prefix))[:8]
        raise ValueError(f"prefix {prefix!r}: the state dict has no key {key!r} "
                         f"(keys under the prefix: {near})")
    return np.asarray(sd[key])


def _expect(arr: np.ndarray, key: str, shape: tuple[int, ...], dtype, why: str) -> np.ndarray:
    if arr.dtype != np.dtype(dtype) or arr.size != int(np.prod(shape)):
        raise ValueError(f"{key!r} is {arr.dtype} {tuple(arr.shape)}; expected {np.dtype(dtype)} "
                         f"with {int(np.prod(shape))} elements ({why})")
    return arr.reshape(shape)


def from_bnb_state_dict(sd: Mapping[str, Any], prefix: str = "", *, shape, dtype=None,
                        in_axes=None, batch_axes=()) -> QuantizedWeight:
    """A :class:`~effjax.compress.QuantizedWeight` from bitsandbytes' ``Linear4bit`` entries.

    The inverse of :func:`to_bnb_state_dict`: reads ``{prefix}weight`` and its packed JSON
    quant state without dequantizing (a weight kept in another dtype, bitsandbytes'
    ``quant_storage`` such as float16 for FSDP, is read as its bytes). The checkpoint's torch
    weight shape ``[out, in]`` must be the row view of the Flax kernel ``shape`` (for a 2-D
    ``Dense`` kernel ``(in, out)``, its transpose); every array must have the size the blocks
    of that shape imply.

    Args:
      sd: ``{key: array}`` (numpy arrays as ``safetensors.numpy.load_file`` gives, or
        anything ``np.asarray`` takes, such as CPU torch tensors).
      prefix: the module's key prefix with its trailing dot (``'model.fc1.'``).
      shape: the Flax kernel's shape (e.g. ``(in, out)``).
      dtype: the dtype ``materialize`` returns (default: the checkpoint's ``dtype``).
      in_axes, batch_axes: the kernel's contraction and batch axes
        (:class:`~effjax.compress.WeightFormat`); default: first axis in.

    Returns:
      The node, equal (arrays and static fields) to ``quantize_params`` of the same weight
      with ``NF4`` / ``FP4(block_size=blocksize, double_quant=nested)``.

    Raises:
      ValueError: a missing key; shapes that disagree (naming the prefix and both shapes);
        an array of the wrong size or dtype (naming its key); a quant map other than
        bitsandbytes' table; an unknown quant type.

    Example:
      >>> import jax.numpy as jnp
      >>> from effjax.compress import NF4, quantize_params
      >>> node = quantize_params({'k': jnp.ones((64, 4))}, {'k': NF4()})['k']
      >>> sd = to_bnb_state_dict(node, 'lin.')
      >>> from_bnb_state_dict(sd, 'lin.', shape=(64, 5))  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: prefix 'lin.': ... torch weight of shape (4, 64) but the kernel shape (64, 5) ...
    """
    w = prefix + "weight"
    qs_keys = [k for k in sd if k.startswith(w + "." + _QS)]
    if len(qs_keys) > 1:
        raise ValueError(f"prefix {prefix!r}: several quant states {sorted(qs_keys)}")
    if qs_keys:
        key = qs_keys[0]
        try:
            meta = json.loads(bytes(np.asarray(sd[key], np.uint8).ravel()).decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{key!r} is not bitsandbytes' packed JSON quant state: {e}") from None
        kind_of_key = key[len(w + "." + _QS):]
        if meta.get("quant_type") != kind_of_key:
            raise ValueError(f"{key!r} names quant type {kind_of_key!r} but holds "
                             f"{meta.get('quant_type')!r}")
    else:
        raise ValueError(f"prefix {prefix!r}: no bitsandbytes quant state "
                         f"('{w}.{_QS}nf4' or '...fp4'): not a 4-bit bitsandbytes weight")
    kind = meta.get("quant_type")
    if kind not in _FORMATS:
        raise ValueError(f"prefix {prefix!r}: quant_type {kind!r} is not 'nf4' or 'fp4'")
    nested = w + ".nested_absmax" in sd
    try:
        fmt = _FORMATS[kind](block_size=int(meta["blocksize"]), double_quant=nested,
                             in_axes=in_axes, batch_axes=batch_axes)
        lay = fmt.layout(tuple(int(s) for s in shape))
    except (KeyError, TypeError, ValueError) as e:
        raise type(e)(f"prefix {prefix!r}: {e}") from None
    rows, k = _torch_shape(lay)
    stored = tuple(int(s) for s in meta.get("shape") or ())
    if stored != (rows, k):
        raise ValueError(f"prefix {prefix!r}: the checkpoint holds a torch weight of shape "
                         f"{stored} but the kernel shape {tuple(lay.shape)} has the torch "
                         f"shape {(rows, k)}")
    n, block = rows * k, fmt.block_size
    n_blocks = -(-n // block)
    whole = k % block == 0
    codes_shape = (rows, k // 2) if whole else ((n + 1) // 2,)
    scales_shape = (rows, k // block) if whole else (n_blocks,)
    raw = _get(sd, w, prefix)
    if raw.dtype != np.uint8 and raw.dtype.kind in "fiuV":  # quant_storage other than uint8
        raw = np.ascontiguousarray(raw).view(np.uint8)
    codes = _expect(raw, w, codes_shape, np.uint8, f"{n} packed 4-bit codes")
    qmap = _get(sd, w + ".quant_map", prefix)
    if not np.array_equal(qmap.astype(np.float32).ravel(), wq.four_bit_table(kind)):
        raise ValueError(f"{w + '.quant_map'!r} is not bitsandbytes' {kind} table")
    absmax = _get(sd, w + ".absmax", prefix)
    why = f"one per block of {block} over {n} weights"
    if nested:
        scales = _expect(absmax, w + ".absmax", scales_shape, np.uint8, why + ", double quant")
        n_nested = -(-n_blocks // wq.DOUBLE_QUANT_BLOCK)
        nested_absmax = _expect(_get(sd, w + ".nested_absmax", prefix), w + ".nested_absmax",
                                (n_nested,), np.float32, f"one per {wq.DOUBLE_QUANT_BLOCK} of "
                                f"{n_blocks} block scales")
        nmap = _get(sd, w + ".nested_quant_map", prefix)
        if not np.array_equal(nmap.astype(np.float32).ravel(), _nested_map()):
            raise ValueError(f"{w + '.nested_quant_map'!r} is not bitsandbytes' signed dynamic "
                             f"map")
        if int(meta.get("nested_blocksize", -1)) != wq.DOUBLE_QUANT_BLOCK:
            raise ValueError(f"prefix {prefix!r}: nested_blocksize "
                             f"{meta.get('nested_blocksize')!r}; effjax reads 256")
        if "nested_offset" not in meta:
            raise ValueError(f"prefix {prefix!r}: the quant state has nested_absmax but no "
                             f"nested_offset")
        offset = jnp.asarray(np.float32(float(meta["nested_offset"])))
        scales_absmax = jnp.asarray(nested_absmax)
    else:
        scales = _expect(absmax, w + ".absmax", scales_shape, np.float32, why)
        scales_absmax = offset = None
    out_dtype = jnp.dtype(dtype if dtype is not None else meta.get("dtype", "float32"))
    return QuantizedWeight(jnp.asarray(codes), jnp.asarray(scales), scales_absmax, offset, None,
                           shape=tuple(lay.shape), dtype=out_dtype, format=fmt)


# --------------------------------------------------------------------------------------------
# whole trees


def _namer(module_names: Any, paths: list[str]) -> list[str | None]:
    """The torch module name of each path (None: not written)."""
    if callable(module_names):
        names = []
        for p in paths:
            name = module_names(p)
            if name is not None and not isinstance(name, str):
                raise TypeError(f"module_names({p!r}) returned {name!r}; expected a str or None")
            names.append(name)
        return names
    rules = compile_rules(module_names, accept=str, what="a torch module name template")
    choice = assign_rules(paths, rules)
    out = []
    for p, c in zip(paths, choice):
        rule = None if c is None else rules[c]
        out.append(None if rule is None or rule.value is None
                   else rule.regex.fullmatch(p).expand(rule.value))
    return out


def _param_key(path: str, module: str) -> tuple[str, str]:
    last = path.rsplit("/", 1)[-1]
    if last not in _TORCH_PARAM:
        raise ValueError(f"leaf {path!r}: no torch parameter name for a leaf called {last!r} "
                         f"(known: {sorted(_TORCH_PARAM)}); map it to None to leave it out")
    return last, f"{module}.{_TORCH_PARAM[last]}"


def _named_leaves(tree: Any, module_names: Any):
    paths, leaves, treedef = tree_paths(tree, is_leaf=is_quantized)
    return paths, leaves, treedef, _namer(module_names, paths)


def save_bnb_checkpoint(path: str | os.PathLike, tree: Any, module_names: Any) -> list[str]:
    """Write a param tree as a safetensors file in bitsandbytes' / PyTorch's layout.

    Quantized NF4/FP4 kernels become bitsandbytes ``Linear4bit`` entries
    (:func:`to_bnb_state_dict` with prefix ``'<module>.'``); float leaves become their torch
    tensors (a 2-D ``kernel`` transposed to ``[out, in]``, others unchanged). Leaves
    ``module_names`` gives no name are not written. The file's metadata is
    ``{"format": "pt"}``, as PyTorch-side loaders expect.

    Args:
      path: the ``.safetensors`` file to write.
      tree: a param tree (Linen dict, NNX ``State``) with
        :class:`~effjax.compress.QuantizedWeight` nodes.
      module_names: a callable ``leaf path -> module name | None`` or ordered rules
        ``{regex: template | None}`` (module docstring).

    Returns:
      The keys written, sorted.

    Raises:
      TypeError: a named int8/int4 node (no bitsandbytes 4-bit format); ValueError: a
        float ``kernel`` that is not 2-D, a leaf name with no torch parameter name, two
        leaves writing the same key; each message names the leaf's path.

    Example:
      >>> import os, tempfile, jax, jax.numpy as jnp
      >>> from effjax.compress import NF4, quantize_params
      >>> p = {'fc': {'kernel': jax.random.normal(jax.random.key(0), (64, 8)),
      ...             'bias': jnp.zeros(8)}}
      >>> q = quantize_params(p, {'fc/kernel': NF4()})
      >>> f = os.path.join(tempfile.mkdtemp(), 'model.safetensors')
      >>> keys = save_bnb_checkpoint(f, q, {r'fc/.*': 'model.fc'})
      >>> keys[:3]
      ['model.fc.bias', 'model.fc.weight', 'model.fc.weight.absmax']
      >>> back = load_bnb_checkpoint(f, q, {r'fc/.*': 'model.fc'})
      >>> bool(jnp.array_equal(back['fc']['kernel'].codes, q['fc']['kernel'].codes))
      True
    """
    st = import_optional("safetensors.numpy", extra="models", feature="save_bnb_checkpoint",
                         distribution="safetensors")
    paths, leaves, _, names = _named_leaves(tree, module_names)
    out: dict[str, np.ndarray] = {}
    owner: dict[str, str] = {}
    for p, leaf, module in zip(paths, leaves, names):
        if module is None:
            continue
        last, key = _param_key(p, module)
        if is_quantized(leaf):
            if last != "kernel":
                raise ValueError(f"leaf {p!r}: a quantized leaf must be a kernel")
            try:
                entries = to_bnb_state_dict(leaf, module + ".")
            except TypeError as e:
                raise TypeError(f"leaf {p!r}: {e}") from None
        else:
            arr = np.asarray(leaf)
            if last == "kernel":
                if arr.ndim != 2:
                    raise ValueError(f"leaf {p!r}: a float kernel of shape {arr.shape} has no "
                                     f"torch Linear layout; quantize it or map it to None")
                arr = arr.T
            entries = {key: arr}
        for k, v in entries.items():
            if k in out:
                raise ValueError(f"leaves {owner[k]!r} and {p!r} both write {k!r}")
            out[k], owner[k] = np.ascontiguousarray(v), p
    st.save_file(out, os.fspath(path), metadata={"format": "pt"})
    return sorted(out)


def load_bnb_checkpoint(path: str | os.PathLike, params_like: Any, module_names: Any, *,
                        strict: bool = True) -> Any:
    """Read a safetensors file of bitsandbytes / PyTorch weights into a param tree.

    Each named leaf of ``params_like`` is read from ``<module>.<param>``: a bitsandbytes
    4-bit entry (it has a quant state) becomes a :class:`~effjax.compress.QuantizedWeight`
    (:func:`from_bnb_state_dict`; the leaf's shape, dtype and, for a ``QuantizedWeight``
    leaf, its ``in_axes`` / ``batch_axes``), a float tensor becomes an array of the leaf's
    dtype (a 2-D ``kernel`` transposed from ``[out, in]``). ``params_like`` may hold arrays,
    ``jax.ShapeDtypeStruct`` leaves or ``QuantizedWeight`` nodes (from ``quantize_params``
    or ``jax.eval_shape`` of it); a float leaf may receive a quantized entry (loading a
    bitsandbytes checkpoint onto a float model), a ``QuantizedWeight`` leaf must receive
    one of its own format. Unnamed leaves are kept as they are.

    Args:
      path: the ``.safetensors`` file.
      params_like: the tree to fill (its structure, shapes, dtypes, formats).
      module_names: as :func:`save_bnb_checkpoint`.
      strict: every key of the file must be read.

    Returns:
      A tree of ``params_like``'s structure.

    Raises:
      ValueError: a missing key, a shape or format that disagrees with the leaf, keys left
        unread (``strict``); each message names the leaf's path or the keys.
    """
    st = import_optional("safetensors.numpy", extra="models", feature="load_bnb_checkpoint",
                         distribution="safetensors")
    sd = st.load_file(os.fspath(path))
    paths, leaves, treedef, names = _named_leaves(params_like, module_names)
    used: set[str] = set()
    out = []
    for p, leaf, module in zip(paths, leaves, names):
        if module is None:
            out.append(leaf)
            continue
        last, key = _param_key(p, module)
        quantized = any(k.startswith(key + "." + _QS) for k in sd)
        if quantized:
            fmt = leaf.format if is_quantized(leaf) else None
            try:
                node = from_bnb_state_dict(
                    sd, module + ".", shape=leaf.shape, dtype=leaf.dtype,
                    in_axes=None if fmt is None else fmt.in_axes,
                    batch_axes=() if fmt is None else fmt.batch_axes)
            except ValueError as e:
                raise ValueError(f"leaf {p!r}: {e}") from None
            if fmt is not None and node.format != fmt:
                raise ValueError(f"leaf {p!r}: the checkpoint holds {_describe(node.format)} "
                                 f"at {key!r}, params_like {_describe(fmt)}")
            used.update(k for k in sd if k == key or k.startswith(key + "."))
            out.append(node)
            continue
        if is_quantized(leaf):
            raise ValueError(f"leaf {p!r} is a QuantizedWeight but {key!r} is not a "
                             f"bitsandbytes 4-bit entry: load into a float tree and quantize")
        if key not in sd:
            raise ValueError(f"leaf {p!r}: the checkpoint has no key {key!r}")
        arr = sd[key]
        if last == "kernel" and arr.ndim == 2:
            arr = arr.T
        if tuple(arr.shape) != tuple(leaf.shape):
            raise ValueError(f"leaf {p!r}: {key!r} has shape {tuple(sd[key].shape)}, expected "
                             f"{tuple(leaf.shape)}" + (" transposed" if last == "kernel" else ""))
        used.add(key)
        out.append(jnp.asarray(arr, leaf.dtype))
    if strict and set(sd) - used:
        left = sorted(set(sd) - used)
        raise ValueError(f"{len(left)} key(s) of {os.fspath(path)!r} were not read: {left[:10]} "
                         f"(pass strict=False to ignore them)")
    return jax.tree_util.tree_unflatten(treedef, out)


def _describe(fmt) -> str:
    return f"{fmt.kind} b{fmt.block_size}" + (" +dq" if fmt.double_quant else "")

