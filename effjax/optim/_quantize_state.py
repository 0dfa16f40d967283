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

Non-finite gradients (bitsandbytes' rule): where an element of the incoming gradient is NaN or
+-inf, the returned update for that element is 0 (the parameter does not move), and any
non-finite element of the new state (of every floating state array, quantized or not) is stored
as 0, so one bad element never turns its whole block's scale into NaN nor stays in the state.

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

from effjax.optim._checks import check_float_params, check_quant_args
from effjax.quant import (
    QuantizedArray,
    adam4bit_first_moment_codebook,
    adam4bit_second_moment_codebook,
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
    """Store ``new`` the way ``old`` was stored; non-finite moment elements become 0."""
    if not _is_q(old):
        if isinstance(new, jax.Array) and new.ndim and jnp.issubdtype(new.dtype, jnp.floating):
            return jnp.where(jnp.isfinite(new), new, jnp.zeros_like(new))
        return new
    finite = jnp.where(jnp.isfinite(new), new, jnp.zeros_like(new))
    return quantize_blockwise(finite, codebook=old.codebook, block_size=old.block_size,
                              scale_dtype=old.absmax.dtype)


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
        instead of ``optax.adamw(1e-3)``.

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
        values = np.asarray(default if cb is None else cb, np.float32).reshape(-1)
        if not 2 <= values.size <= max_codes:
            raise ValueError(f"{name} needs 2..{max_codes} values for bits={bits}, "
                             f"got {values.size}")
        cbs.append(tuple(float(v) for v in values))
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
        float_state = _dequantize_tree(state)
        new_updates, new_float_state = inner.update(updates, float_state, params, **extra_args)
        new_state = jax.tree.map(_requantize, state, new_float_state, is_leaf=_is_q)
        new_updates = jax.tree.map(
            lambda g, u: jnp.where(jnp.isfinite(g), u, jnp.zeros_like(u)), updates, new_updates)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


