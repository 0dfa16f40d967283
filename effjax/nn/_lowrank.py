"""The functional core of the adapter fast path: contractions with a kernel that may be a
LoRA-family node, without building the dense delta (see :mod:`effjax.nn.lora_layers` for the
equations and :mod:`effjax.nn.interception` for the layers that call it).

Public names here are re-exported by :mod:`effjax.nn.lora_layers`; ``parse_einsum`` is shared
with :mod:`effjax.nn.interception`.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from jax import lax

from effjax.compress import is_quantized
from effjax.nn._quantized import quantized_einsum
from effjax.peft.base import is_adapter
from effjax.peft.layout import KernelLayout

__all__ = ["LowRankAdapter", "has_low_rank_factors", "adapted_einsum", "adapted_dot_general",
           "parse_einsum"]


@runtime_checkable
class LowRankAdapter(Protocol):
    """A LoRA-family adapter node: ``W' = w + A B`` per batch slice of ``layout``.

    Implemented by :class:`~effjax.peft.LoRAWeight`, :class:`~effjax.peft.VeRAWeight` and
    :class:`~effjax.peft.NOLAWeight`.

    Attributes:
      w: the frozen kernel, shape ``layout.shape``.
      layout: the :class:`~effjax.peft.KernelLayout` (batch / in / out axes of ``w``).

    ``low_rank_factors()`` returns ``(a, b)`` of shapes ``(*batch, *in, r)`` and
    ``(*batch, r, *out)`` (``layout``'s batch, in and out shapes) with any scale folded in, such
    that ``materialize() == w + layout.from_matrix(a_mat @ b_mat)`` up to rounding, where
    ``a_mat``, ``b_mat`` are ``a``, ``b`` reshaped to ``(*batch, n_in, r)``, ``(*batch, r,
    n_out)``. It must be differentiable in the node's trainable fields.
    """

    w: jax.Array
    layout: KernelLayout

    def low_rank_factors(self) -> tuple[jax.Array, jax.Array]: ...


def has_low_rank_factors(kernel: Any) -> bool:
    """True for adapter nodes the fast path computes without a dense delta.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from effjax.peft import LoRA, DoRA
      >>> w = jnp.ones((4, 3))
      >>> has_low_rank_factors(LoRA(rank=2).adapt(jax.random.key(0), w))
      True
      >>> has_low_rank_factors(DoRA(rank=2).adapt(jax.random.key(0), w)), has_low_rank_factors(w)
      (False, False)
    """
    return is_adapter(kernel) and isinstance(kernel, LowRankAdapter)


def _kernel_name(kernel: Any) -> str:
    return type(kernel).__name__


def _checked_factors(kernel: Any) -> tuple[jax.Array, jax.Array]:
    """The node's factors, with their shapes checked against its layout and ``w``."""
    lay = kernel.layout
    if tuple(kernel.w.shape) != lay.shape:
        raise ValueError(f"{_kernel_name(kernel)}: w has shape {tuple(kernel.w.shape)} but the "
                         f"node's layout is for shape {lay.shape}")
    a, b = kernel.low_rank_factors()
    r = a.shape[-1] if a.ndim else -1
    want_a = lay.batch_shape + lay.in_shape + (r,)
    want_b = lay.batch_shape + (r,) + lay.out_shape
    if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
        raise ValueError(
            f"{_kernel_name(kernel)}.low_rank_factors() returned shapes {tuple(a.shape)} and "
            f"{tuple(b.shape)}; for the layout {lay} they must be (*batch, *in, r) = {want_a} "
            f"and (*batch, r, *out) = {want_b}")
    for name, f in (("a", a), ("b", b)):
        if not jnp.issubdtype(f.dtype, jnp.floating):
            raise TypeError(f"{_kernel_name(kernel)}.low_rank_factors(): factor {name} has "
                            f"dtype {f.dtype}; expected a floating dtype")
    return a, b


def _promote(x: jax.Array, w: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    dt = jnp.dtype(dtype) if dtype is not None else jnp.result_type(x, w)
    return jnp.asarray(x, dt), jnp.asarray(w, dt)


def _low_rank_term(x_spec: str, k_spec: str, o_spec: str, x: jax.Array, kernel: Any,
                   dtype: Any, precision: Any) -> jax.Array:
    """:math:`(x A) B` contracted like ``einsum(x_spec, k_spec -> o_spec)`` with the kernel's
    low-rank delta, in two einsums (so the dense delta never exists)."""
    lay = kernel.layout
    a, b = _checked_factors(kernel)
    kb = "".join(k_spec[i] for i in lay.batch_axes)
    ki = "".join(k_spec[i] for i in lay.in_axes)
    ko = "".join(k_spec[i] for i in lay.out_axes)
    r = next(c for c in string.ascii_letters if c not in x_spec + k_spec + o_spec)
    # letters still needed after contracting x with a: the output's and b's
    needed = set(o_spec) | set(kb) | set(ko) | {r}
    t_spec = "".join(dict.fromkeys(c for c in x_spec + kb + ki + r if c in needed))
    ct = jnp.dtype(dtype) if dtype is not None else jnp.result_type(x, a, b)
    specs = (x_spec, kb + ki + r, t_spec, kb + r + ko, o_spec)
    xc, ac, bc = x.astype(ct), a.astype(ct), b.astype(ct)
    if set(x_spec) <= set(t_spec) | set(specs[1]):
        return _low_rank(specs, precision, xc, ac, bc)
    # an input letter summed away before the kernel (rare): plain autodiff
    t = jnp.einsum(f"{x_spec},{specs[1]}->{t_spec}", xc, ac, precision=precision)
    return jnp.einsum(f"{t_spec},{specs[3]}->{o_spec}", t, bc, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _low_rank(specs, precision, x, a, b):
    """``einsum(einsum(x, a), b)`` with a backward pass whose einsums put the small operand
    first (see :func:`_low_rank_bwd`)."""
    return _low_rank_fwd(specs, precision, x, a, b)[0]


def _low_rank_fwd(specs, precision, x, a, b):
    x_spec, a_spec, t_spec, b_spec, o_spec = specs
    t = jnp.einsum(f"{x_spec},{a_spec}->{t_spec}", x, a, precision=precision)
    y = jnp.einsum(f"{t_spec},{b_spec}->{o_spec}", t, b, precision=precision)
    return y, (x, a, b, t)


def _low_rank_bwd(specs, precision, res, g):
    """The chain rule written out: ``dt = g B^T``, ``dB = t^T g``, ``dA = x^T dt``,
    ``dx = dt A^T`` (each an einsum over the same letters as the forward pass).

    Operand order matters on XLA:CPU: the token axes are contracted with the small operand
    (``t``, ``dt``) first so that XLA transposes it, not the big ``x`` or ``g``. A transposed
    big operand is fused with whatever produced it (MiniLM's GELU) into a strided loop that
    recomputes it: ~100 ms a layer for the 2048 x 1536 intermediate activations of
    ``experiments/bench_peft.py``, about a quarter of the step."""
    x_spec, a_spec, t_spec, b_spec, o_spec = specs
    x, a, b, t = res
    dt = jnp.einsum(f"{o_spec},{b_spec}->{t_spec}", g, b, precision=precision)
    db = jnp.einsum(f"{t_spec},{o_spec}->{b_spec}", t, g, precision=precision)
    # dA with the rank axis first, then transposed: asked for in A's order directly, XLA swaps
    # the operands to avoid the (tiny) output transpose and transposes the big input instead
    # (the barrier keeps it from folding the transpose back into the dot).
    r_first = a_spec[-1] + a_spec[:-1]
    da = jax.lax.optimization_barrier(
        jnp.einsum(f"{t_spec},{x_spec}->{r_first}", dt, x, precision=precision))
    da = jnp.einsum(f"{r_first}->{a_spec}", da)
    dx = jnp.einsum(f"{t_spec},{a_spec}->{x_spec}", dt, a, precision=precision)
    return dx.astype(x.dtype), da.astype(a.dtype), db.astype(b.dtype)


_low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)


def parse_einsum(subscripts: str, x_ndim: int, k_ndim: int) -> tuple[str, str, str]:
    """Explicit ``'x,k->o'`` specs, the ellipsis (allowed in x and the output) expanded."""
    s = subscripts.replace(" ", "")
    if "->" not in s or s.count(",") != 1:
        raise ValueError(f"einsum subscripts {subscripts!r} must be explicit ('x,k->out', with "
                         f"'->') and have exactly two operands")
    ins, o_spec = s.split("->")
    x_spec, k_spec = ins.split(",")
    if "..." in k_spec:
        raise ValueError(f"einsum subscripts {subscripts!r}: the kernel operand cannot use '...'")
    if "..." in x_spec:
        n = x_ndim - (len(x_spec) - 3)
        if n < 0:
            raise ValueError(f"einsum subscripts {subscripts!r} do not fit an input of rank "
                             f"{x_ndim}")
        fresh = "".join([c for c in string.ascii_letters if c not in s][:n])
        x_spec, o_spec = x_spec.replace("...", fresh), o_spec.replace("...", fresh)
    if "..." in o_spec or len(x_spec) != x_ndim or len(k_spec) != k_ndim:
        raise ValueError(f"einsum subscripts {subscripts!r} do not fit an input of rank "
                         f"{x_ndim} and a kernel of rank {k_ndim}")
    return x_spec, k_spec, o_spec


def _quantized_main(specs, x, qw, dtype, precision):
    """``(x cast, einsum(x, dequant(qw)))`` for a quantized kernel or QLoRA base: dequantized
    on the fly, no dense residual (:func:`effjax.nn._quantized.quantized_einsum`)."""
    xc = jnp.asarray(x, dtype or jnp.result_type(x, qw.dtype))
    return xc, quantized_einsum(*specs, xc, qw, dtype=xc.dtype, precision=precision)


def _prologue(x, kernel, out_sharding, preferred_element_type):
    """``(x, kernel, op keywords)`` shared by the two ops: a node without low-rank factors is
    materialized (the dense path)."""
    kw = {} if out_sharding is None else {"out_sharding": out_sharding}
    if preferred_element_type is not None:
        kw["preferred_element_type"] = preferred_element_type
    if is_adapter(kernel) and not has_low_rank_factors(kernel):
        kernel = kernel.materialize()
    return jnp.asarray(x), kernel, kw


def adapted_einsum(subscripts: str, x: jax.Array, kernel: Any, *, dtype: Any = None,
                   precision: Any = None, preferred_element_type: Any = None,
                   einsum_op: Callable = jnp.einsum, out_sharding: Any = None) -> jax.Array:
    """``einsum(subscripts, x, W')`` for a kernel that may be an adapter node.

    For a node with :meth:`~LowRankAdapter.low_rank_factors` ``(A, B)``:
    :math:`y = \\mathrm{einsum}(x, W) + \\mathrm{einsum}(\\mathrm{einsum}(x, A), B)`, where the
    node's layout assigns the kernel's letters to ``A`` ``(*batch, *in, r)`` and ``B``
    ``(*batch, r, *out)`` (the dense :math:`AB` is never formed). Other nodes are
    materialized; plain arrays are used as they are.

    Args:
      subscripts: explicit two-operand einsum ``'x,kernel->out'`` (``'...'`` allowed for
        ``x`` and the output).
      x: the input.
      kernel: an array or an adapter node whose ``w`` has the kernel operand's rank.
      dtype: computation dtype (``x`` and ``w`` are cast to it; the low-rank term too). None:
        the promoted dtype of ``x`` and ``w``; the low-rank term then runs in the promoted
        dtype of that and the factors (float32 for bfloat16 models with float32 adapters,
        PEFT's default) and is cast to the result's dtype.
      precision, preferred_element_type: passed to the main einsum (``precision`` to all).
      einsum_op: the function computing the main ``x``-``W`` term (default ``jnp.einsum``).
      out_sharding: passed to ``einsum_op`` when not None.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from effjax.peft import LoRA
      >>> w = jax.random.normal(jax.random.key(0), (8, 2, 4))  # (d, heads, head_dim)
      >>> node = LoRA(rank=2).adapt(jax.random.key(1), w)
      >>> node = node.replace(b=jnp.ones_like(node.b))
      >>> x = jnp.ones((3, 8))
      >>> y = adapted_einsum('td,dhk->thk', x, node)
      >>> bool(jnp.allclose(y, jnp.einsum('td,dhk->thk', x, node.materialize()), atol=1e-5))
      True
    """
    x, kernel, kw = _prologue(x, kernel, out_sharding, preferred_element_type)
    if is_quantized(kernel):
        specs = parse_einsum(subscripts, x.ndim, kernel.ndim)
        return _quantized_main(specs, x, kernel, dtype, precision)[1]
    if not is_adapter(kernel):
        xc, kc = _promote(x, kernel, dtype)
        return einsum_op(subscripts, xc, kc, precision=precision, **kw)
    x_spec, k_spec, o_spec = parse_einsum(subscripts, x.ndim, kernel.w.ndim)
    if is_quantized(kernel.w):
        xc, y = _quantized_main((x_spec, k_spec, o_spec), x, kernel.w, dtype, precision)
    else:
        xc, wc = _promote(x, kernel.w, dtype)
        y = einsum_op(f"{x_spec},{k_spec}->{o_spec}", xc, wc, precision=precision, **kw)
    return y + _low_rank_term(x_spec, k_spec, o_spec, xc, kernel, dtype, precision).astype(
        y.dtype)


def _dot_general_specs(x_ndim: int, k_ndim: int, dimension_numbers) -> tuple[str, str, str]:
    """The einsum specs of ``lax.dot_general(x, k, dimension_numbers)`` (its output order:
    batch dims, x's free dims, the kernel's free dims)."""
    (xc, kc), (xb, kb) = dimension_numbers
    norm = lambda axes, nd: tuple(int(a) % nd for a in axes)
    xc, xb = norm(xc, x_ndim), norm(xb, x_ndim)
    kc, kb = norm(kc, k_ndim), norm(kb, k_ndim)
    if len(xc) != len(kc) or len(xb) != len(kb):
        raise ValueError(f"dot_general dimension_numbers {dimension_numbers} pair "
                         f"{len(xc)}/{len(kc)} contracting and {len(xb)}/{len(kb)} batch axes")
    letters = iter(string.ascii_letters)
    x_spec = [next(letters) for _ in range(x_ndim)]
    k_spec = [""] * k_ndim
    for i, j in zip(xc + xb, kc + kb):
        k_spec[j] = x_spec[i]
    k_spec = [c or next(letters) for c in k_spec]
    out = ([x_spec[i] for i in xb] + [c for i, c in enumerate(x_spec) if i not in xc + xb]
           + [c for j, c in enumerate(k_spec) if j not in kc + kb])
    return "".join(x_spec), "".join(k_spec), "".join(out)


def adapted_dot_general(x: jax.Array, kernel: Any, dimension_numbers, *, dtype: Any = None,
                        precision: Any = None, preferred_element_type: Any = None,
                        dot_general: Callable = lax.dot_general,
                        out_sharding: Any = None) -> jax.Array:
    """``lax.dot_general(x, W', dimension_numbers)`` for a kernel that may be an adapter node.

    The same computation as :func:`adapted_einsum`: :math:`y = x \\cdot W + (x \\cdot A)\\cdot B`
    for nodes with low-rank factors (the main term with ``dot_general``), the materialized
    kernel for other nodes, and the plain ``dot_general`` for arrays.

    Args:
      x: the input (``lhs``).
      kernel: an array or an adapter node (``rhs``).
      dimension_numbers: ``((x_contract, k_contract), (x_batch, k_batch))`` as in
        ``lax.dot_general``.
      dtype, precision, preferred_element_type, out_sharding: as in :func:`adapted_einsum`.
      dot_general: the function computing the main ``x``-``W`` term.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from effjax.peft import LoRA
      >>> node = LoRA(rank=2, alpha=4.0).adapt(jax.random.key(0), jnp.zeros((4, 3)))
      >>> node = node.replace(a=jnp.ones((4, 2)), b=jnp.ones((2, 3)))
      >>> adapted_dot_general(jnp.ones((1, 4)), node, (((1,), (0,)), ((), ())))  # 4 * 2 * 2
      Array([[16., 16., 16.]], dtype=float32)
    """
    x, kernel, kw = _prologue(x, kernel, out_sharding, preferred_element_type)
    if is_quantized(kernel):
        specs = _dot_general_specs(x.ndim, kernel.ndim, dimension_numbers)
        return _quantized_main(specs, x, kernel, dtype, precision)[1]
    if not is_adapter(kernel):
        xc, kc = _promote(x, kernel, dtype)
        return dot_general(xc, kc, dimension_numbers, precision=precision, **kw)
    specs = _dot_general_specs(x.ndim, kernel.w.ndim, dimension_numbers)
    if is_quantized(kernel.w):
        xc, y = _quantized_main(specs, x, kernel.w, dtype, precision)
    else:
        xc, wc = _promote(x, kernel.w, dtype)
        y = dot_general(xc, wc, dimension_numbers, precision=precision, **kw)
    return y + _low_rank_term(*specs, xc, kernel, dtype, precision).astype(y.dtype)
