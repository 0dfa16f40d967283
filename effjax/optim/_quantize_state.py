"""``quantize_state``: keep ANY optax transformation's floating state in 8-bit or 4-bit form.

Between steps every large floating state leaf (a moment the size of its parameter) is stored
as a block-wise :class:`~effjax.quant.QuantizedArray`; at each step it is dequantized, the
wrapped transformation runs in float32 as usual, and its new state is quantized again. The
update itself is computed from the new float32 state, exactly as bitsandbytes and torchao do:

    s_t = dequant(q_{t-1});   (u_t, s'_t) = inner.update(g_t, s_t, params);   q_t = quant(s'_t)

Which leaves are quantized: floating leaves with at least one axis and at least
``min_quantized_size`` elements (4096, as bitsandbytes and torchao); counts, scalars,
hyper-parameters and small tensors (biases, norms) keep their dtype.

Which map a quantized leaf uses (the rule): a leaf is *unsigned* (second-moment map: linear 4-bit
or unsigned dynamic 8-bit) when a field name on its path — a NamedTuple or dataclass attribute
such as ``nu`` of ``ScaleByAdamState`` — fully matches ``unsigned_fields`` (default
``nu``, ``nu_max``, ``sum_of_squares``, ``v``, ``exp_avg_sq``, or anything containing ``sq``);
every other leaf is *signed* (first-moment map). A leaf wrongly declared unsigned would lose its
sign, so custom transformations with non-negative state under other names should pass their
own pattern.

Non-finite values (one rule on every path: this jnp step, the chunked, native C++ and Pallas
fused steps): an element is *bad* at a step when its gradient, its update or any of its new
moments is not finite (NaN, +-inf, or a finite gradient whose square overflows: 1e20 in
float32, 300 in float16). A bad element's update is 0 (its parameter does not move) and every
moment of that element restarts from 0 (all state leaves laid out like the updates: ``mu`` and
``nu`` of Adam alike), so it never leaves a huge first moment over a zeroed second one nor
turns its block's scale into NaN. Other elements are untouched. Non-finite elements of other
floating state arrays are stored as 0. This generalizes bitsandbytes' rule (no update where the
gradient is not finite); optax itself keeps an inf second moment and freezes the element.

References: Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022;
Li et al., "Memory Efficient Optimizers with 4-bit States", NeurIPS 2023.
"""

from __future__ import annotations

import inspect
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from effjax.optim._checks import (
    check_float_params,
    check_params_like_updates,
    check_quant_args,
    leaf_name,
)
from effjax.quant import (
    QuantizedArray,
    adam4bit_first_moment_codebook,
    adam4bit_second_moment_codebook,
    check_codebook,
    dequantize_blockwise,
    dynamic_codebook,
    quantize_blockwise,
)
from effjax.quant.blockwise import check_scale_dtype

__all__ = ["quantize_state", "QuantizationConfig", "DEFAULT_UNSIGNED_FIELDS"]

DEFAULT_UNSIGNED_FIELDS = r"nu|nu_max|sum_of_squares|v|exp_avg_sq|.*sq.*"


class QuantizationConfig(NamedTuple):
    """Resolved settings of a :func:`quantize_state` wrapper (static, hashable)."""

    bits: int
    block_size: int
    min_quantized_size: int
    signed_codebook: tuple[float, ...]
    unsigned_codebook: tuple[float, ...]
    unsigned_fields: str
    scale_dtype: str = "float32"


def _default_codebooks(bits: int):
    if bits == 8:
        return dynamic_codebook(signed=True, bits=8), dynamic_codebook(signed=False, bits=8)
    return adam4bit_first_moment_codebook(), adam4bit_second_moment_codebook()


def _field_names(path) -> list[str]:
    return [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)]


def _is_q(x) -> bool:
    return isinstance(x, QuantizedArray)


def _quantize_leaf(path, leaf, cfg: QuantizationConfig):
    if not isinstance(leaf, (jax.Array, np.ndarray)) or not jnp.issubdtype(leaf.dtype,
                                                                           jnp.floating):
        return leaf
    if leaf.ndim == 0 or leaf.size < cfg.min_quantized_size:
        return leaf
    unsigned = any(re.fullmatch(cfg.unsigned_fields, n) for n in _field_names(path))
    codebook = cfg.unsigned_codebook if unsigned else cfg.signed_codebook
    return quantize_blockwise(leaf, codebook=codebook, block_size=cfg.block_size,
                              scale_dtype=cfg.scale_dtype)


def _requantize(old, new):
    """Store ``new`` the way ``old`` was stored (non-finite elements already zeroed)."""
    if not _is_q(old):
        return new
    return quantize_blockwise(new, like=old)  # same layout, codebook, block, scales


def _floating(x) -> bool:
    return (isinstance(x, (jax.Array, np.ndarray)) and x.ndim > 0
            and jnp.issubdtype(x.dtype, jnp.floating))


def _shape(x):
    return tuple(x.shape) if _is_q(x) else tuple(jnp.shape(x))


def _like_updates(treedef, shapes):
    """``is_leaf`` predicate: a subtree laid out like the updates (same structure and leaf
    shapes), e.g. Adam's ``mu`` and ``nu``; its i-th leaf belongs to the i-th parameter."""

    def match(node):
        if node is None:
            return False
        leaves, tdef = jax.tree.flatten(node, is_leaf=_is_q)
        return tdef == treedef and [_shape(x) for x in leaves] == shapes

    return match


def bad_elements_reset(updates, new_updates, new_state):
    """The non-finite rule (module docstring): ``(updates, state)`` with every bad element's
    update and moments set to 0, other non-finite state elements set to 0."""
    g_leaves, treedef = jax.tree.flatten(updates)
    u_leaves = treedef.flatten_up_to(new_updates)
    match = _like_updates(treedef, [tuple(jnp.shape(g)) for g in g_leaves])
    parts, outer = jax.tree.flatten(new_state, is_leaf=match)
    per_param = [k for k, x in enumerate(parts) if match(x)]
    bad = [~jnp.isfinite(g) | ~jnp.isfinite(u) for g, u in zip(g_leaves, u_leaves)]
    for k in per_param:
        for i, x in enumerate(treedef.flatten_up_to(parts[k])):
            if _floating(x):
                bad[i] = bad[i] | ~jnp.isfinite(x)
    for k, x in enumerate(parts):
        if k in per_param:
            leaves = treedef.flatten_up_to(x)
            parts[k] = treedef.unflatten(
                [jnp.where(b, jnp.zeros_like(y), y) if _floating(y) else y
                 for b, y in zip(bad, leaves)])
        elif _floating(x):
            parts[k] = jnp.where(jnp.isfinite(x), x, jnp.zeros_like(x))
        else:
            parts[k] = jax.tree.map(
                lambda y: jnp.where(jnp.isfinite(y), y, jnp.zeros_like(y)) if _floating(y)
                else y, x)
    out_u = [jnp.where(b, jnp.zeros_like(u), u) for b, u in zip(bad, u_leaves)]
    return treedef.unflatten(out_u), outer.unflatten(parts)


def _describe(x) -> str:
    if _is_q(x):
        return (f"{x.bits}-bit (block_size {x.block_size}, {len(x.codebook)}-value codebook, "
                f"{jnp.dtype(x.absmax.dtype).name} scales) of shape {x.shape}")
    dtype = getattr(x, "dtype", None)
    return (f"an unquantized {jnp.dtype(dtype).name if dtype is not None else type(x).__name__} "
            f"array of shape {tuple(jnp.shape(x))}")


def _same_layout(got, want) -> bool:
    if _is_q(got) != _is_q(want):
        return False
    if _is_q(got):
        return (got.bits, got.block_size, got.codebook, tuple(got.shape),
                jnp.dtype(got.absmax.dtype), tuple(got.codes.shape)) == (
            want.bits, want.block_size, want.codebook, tuple(want.shape),
            jnp.dtype(want.absmax.dtype), tuple(want.codes.shape))
    return tuple(jnp.shape(got)) == tuple(jnp.shape(want))


def check_state(updates, state, params, init_fn, cfg: QuantizationConfig) -> None:
    """Raise, naming the leaf, when ``updates`` / ``params`` / ``state`` do not belong together:
    the state this wrapper's ``init`` would make for the updates' shapes is compared with the
    given one (structure, quantized or not, bits, block size, codebook, scale dtype, shapes)."""
    for path, g in jax.tree_util.tree_flatten_with_path(updates)[0]:
        dtype = getattr(g, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"quantize_state: update {leaf_name(path)} has dtype {dtype} (type "
                            f"{type(g).__name__}, shape {jnp.shape(g)}); floating point is "
                            "required. Exclude such leaves with optax.masked.")
    if params is not None:
        check_params_like_updates(updates, params, where="quantize_state")
    like = jax.tree.map(lambda g, p: jax.ShapeDtypeStruct(
        jnp.shape(g), getattr(p, "dtype", None) or jnp.result_type(g)), updates,
        updates if params is None else params)
    want = jax.eval_shape(init_fn, like)
    got_leaves, got_def = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_q)
    want_leaves, want_def = jax.tree_util.tree_flatten_with_path(want, is_leaf=_is_q)
    setting = (f"this optimizer stores moments of >= {cfg.min_quantized_size} elements in "
               f"{cfg.bits} bits, block_size {cfg.block_size}")
    if got_def != want_def:
        paths = [{leaf_name(p) for p, _ in leaves} for leaves in (got_leaves, want_leaves)]
        parts = [f"{what}: {', '.join(sorted(x)[:8])}" for what, x in (
            ("state leaves without an update", paths[0] - paths[1]),
            ("state leaves missing for these updates", paths[1] - paths[0])) if x]
        raise ValueError(
            "quantize_state: the state does not match the updates' tree ("
            + ("; ".join(parts) or "the same leaf paths with other node types")
            + f"); {setting}. Was the state made by init on other parameters, or by another "
            "optimizer?")
    for (path, got), (_, w) in zip(got_leaves, want_leaves):
        if _is_q(got) == _is_q(w) and tuple(got.shape if _is_q(got) else jnp.shape(got)) != \
                tuple(w.shape):
            raise ValueError(
                f"quantize_state: state leaf {leaf_name(path)} has shape "
                f"{tuple(got.shape if _is_q(got) else jnp.shape(got))} but the update it belongs "
                f"to has shape {tuple(w.shape)}; the updates must have the shapes of the "
                "parameters given to init")
        if not _same_layout(got, w):
            raise ValueError(
                f"quantize_state: state leaf {leaf_name(path)} is {_describe(got)}, but for "
                f"these updates this optimizer makes {_describe(w)} ({setting}). Was the state "
                "made by another optimizer (other bits, block_size, codebook or scale_dtype, "
                "or an unquantized optax state) or for other parameters? Call init again, or "
                "build the optimizer with the settings the state was made with.")


def _dequantize_tree(tree):
    return jax.tree.map(lambda x: dequantize_blockwise(x) if _is_q(x) else x, tree,
                        is_leaf=_is_q)


def _public_name(fn) -> str:
    """``optax.adamw`` for ``optax._src.alias.adamw``: the module up to its first private part."""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", repr(fn))
    module = getattr(fn, "__module__", None) or ""
    parts = []
    for part in module.split("."):
        if part.startswith("_"):
            break
        parts.append(part)
    return ".".join([*parts, name]) if parts and parts != ["__main__"] else name


def _check_inner(inner) -> None:
    """``inner`` must be a transformation (an object with ``init`` and ``update``)."""
    if isinstance(inner, optax.GradientTransformation) or (
            callable(getattr(inner, "init", None)) and callable(getattr(inner, "update", None))):
        return
    if callable(inner):
        name = _public_name(inner)
        try:
            takes_lr = "learning_rate" in inspect.signature(inner).parameters
        except (TypeError, ValueError):
            takes_lr = False
        call = f"{name}(learning_rate=1e-3)" if takes_lr else f"{name}(...)"
        kind = "class" if isinstance(inner, type) else "function"
        raise TypeError(f"quantize_state got the {kind} {name}, not a GradientTransformation: "
                        f"call it first, e.g. quantize_state({call})")
    raise TypeError("quantize_state needs an optax GradientTransformation (e.g. "
                    f"optax.adamw(learning_rate=1e-3)), got {type(inner).__name__}: {inner!r}")


def quantize_state(
    inner: optax.GradientTransformation,
    *,
    bits: int = 8,
    block_size: int | None = None,
    min_quantized_size: int = 4096,
    signed_codebook=None,
    unsigned_codebook=None,
    unsigned_fields: str = DEFAULT_UNSIGNED_FIELDS,
    scale_dtype=jnp.float32,
) -> optax.GradientTransformationExtraArgs:
    """Wrap ``inner`` so that its floating state lives in ``bits``-bit block-wise form.

    Args:
      inner: any optax ``GradientTransformation`` (an alias such as ``optax.adamw(1e-3)``, a
        ``scale_by_*`` transform, a chain, ``inject_hyperparams(...)``...).
      bits: 8 (bitsandbytes' format) or 4 (torchao's format).
      block_size: elements per block; default 256 for 8 bits, 128 for 4 bits.
      min_quantized_size: state leaves with fewer elements stay in their dtype.
      signed_codebook / unsigned_codebook: override the maps (default: dynamic signed /
        unsigned maps for 8 bits; torchao's dynamic 4-bit and linear maps for 4 bits).
      unsigned_fields: regex (fullmatch) on state field names that selects the unsigned map.
      scale_dtype: dtype of the block scales: ``jnp.float32`` (the anchors' format) or
        ``jnp.bfloat16`` (each scale rounded up to bfloat16: half the scales' memory, e.g.
        2.016 instead of 2.031 bytes per element for two 8-bit moments; see
        :mod:`effjax.quant.blockwise`).

    Returns:
      A ``GradientTransformationExtraArgs`` whose state is ``inner``'s state with the selected
      leaves replaced by :class:`~effjax.quant.QuantizedArray`.

    Raises:
      TypeError: ``inner`` is not a transformation, e.g. the factory ``optax.adamw`` itself
        instead of ``optax.adamw(1e-3)``; or (when ``update`` is traced) an update leaf is not
        floating point.
      ValueError: ``block_size`` outside 2..65536, a bad codebook; or (when ``update`` is
        traced, naming the leaf) updates whose tree or shapes differ from the params or the
        state, or a state made by another optimizer (other bits, block size, codebook, scale
        dtype, or an unquantized state such as ``optax.adamw``'s).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from effjax.optim import quantize_state
      >>> opt = quantize_state(optax.adamw(1e-3))
      >>> params = {"w": jnp.ones((64, 128))}
      >>> state = opt.init(params)
      >>> type(state[0].mu["w"]).__name__, state[0].mu["w"].codes.dtype
      ('QuantizedArray', dtype('uint8'))
      >>> updates, state = opt.update({"w": jnp.ones((64, 128))}, state, params)
    """
    _check_inner(inner)
    check_quant_args(bits=bits, block_size=block_size, min_quantized_size=min_quantized_size)
    block_size = (256 if bits == 8 else 128) if block_size is None else int(block_size)
    default_signed, default_unsigned = _default_codebooks(bits)
    max_codes = 2**bits
    cbs = []
    for name, cb, default in (("signed_codebook", signed_codebook, default_signed),
                              ("unsigned_codebook", unsigned_codebook, default_unsigned)):
        values = check_codebook(default if cb is None else cb, name=name)
        if name == "signed_codebook" and min(values) >= 0:
            raise ValueError(f"signed_codebook has no negative value (min {min(values)}): "
                             "first moments would lose their sign; give a signed map (e.g. "
                             "effjax.quant.dynamic_codebook(signed=True))")
        if name == "unsigned_codebook" and min(values) < 0:
            raise ValueError(f"unsigned_codebook has negative values (min {min(values)}): it "
                             "stores non-negative moments (v); give an unsigned map")
        if len(values) > max_codes:
            raise ValueError(f"{name} needs 2..{max_codes} values for bits={bits}, "
                             f"got {len(values)}")
        cbs.append(values)
    re.compile(unsigned_fields)
    scale_dtype = check_scale_dtype(scale_dtype)
    cfg = QuantizationConfig(bits, block_size, int(min_quantized_size), cbs[0], cbs[1],
                             unsigned_fields, scale_dtype.name)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        check_float_params(params, where="quantize_state")
        state = inner.init(params)
        return jax.tree_util.tree_map_with_path(lambda p, x: _quantize_leaf(p, x, cfg), state)

    def update_fn(updates, state, params=None, **extra_args):
        check_state(updates, state, params, init_fn, cfg)
        float_state = _dequantize_tree(state)
        new_updates, new_float_state = inner.update(updates, float_state, params, **extra_args)
        new_updates, new_float_state = bad_elements_reset(updates, new_updates, new_float_state)
        new_state = jax.tree.map(_requantize, state, new_float_state, is_leaf=_is_q)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


