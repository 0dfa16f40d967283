"""Linear layers that consume LoRA-family adapter nodes without building the dense delta.

A kernel adapted by :func:`effjax.peft.inject` is a node holding the frozen :math:`W` and a
low-rank update. :func:`effjax.peft.materialize` builds :math:`W' = W + AB` densely, so every
step pays for an :math:`n_{in} \\times n_{out}` delta, and the backward pass for its gradient
:math:`x^\\top g` (the same dense matmul full fine-tuning needs). The fast path here computes

.. math::

  y = x\\,W + (x A)\\,B

(contracted over the layer's input axes, per batch slice for stacked kernels) with
:math:`(A, B)` from the node's :meth:`low_rank_factors`, the scale folded in: LoRA and NOLA
give :math:`(A, sB)`, VeRA :math:`(A\\,\\mathrm{diag}(d), B\\,\\mathrm{diag}(b))`. The
gradients are then :math:`\\partial L/\\partial B = (xA)^\\top g` and
:math:`\\partial L/\\partial A = x^\\top (g B^\\top)`: no tensor of the kernel's size is formed,
except the frozen :math:`W` itself. Nodes without ``low_rank_factors`` (DoRA, ...) are
materialized, so every adapter works; plain arrays run the ordinary layer.

The low-rank term's backward pass is written out (a ``jax.custom_vjp``) so that every
token-axis contraction transposes the small operand, not the activations (on XLA:CPU autodiff's
operand order made the fast path slower than full fine-tuning on MiniLM). Consequence:
reverse mode (``grad``, ``vjp``) works through the fast path, forward mode (``jvp``,
``jacfwd``, ``hessian``) raises; use :func:`effjax.peft.materialize` for those.

* :func:`adapted_einsum` / :func:`adapted_dot_general`: the functional core (any einsum or
  ``dot_general`` contraction of an input with a kernel that may be a node; the node's
  :class:`~effjax.peft.KernelLayout` says which kernel axes are batch / in / out, and any
  layout works with any contraction).
* NNX: :class:`AdaptedLinear`, :class:`AdaptedLinearGeneral`, :class:`AdaptedEinsum`,
  subclasses of ``nnx.Linear`` / ``nnx.LinearGeneral`` / ``nnx.Einsum`` whose kernel ``Param``
  may hold a node; :func:`adapted_layers` converts an existing model's layers to them.
* Linen: :class:`AdaptedDense`, :class:`AdaptedDenseGeneral`, and the interceptor context
  :func:`linen_adapted_layers` that runs existing ``nn.Dense`` / ``nn.DenseGeneral`` /
  ``nn.Einsum`` code on ``{'params': tree}`` with nodes in it.

Typical NNX use (``model`` any NNX model built from ``nnx.Linear`` / ``nnx.LinearGeneral``)::

  model = adapted_layers(model)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  trainable, frozen = split(inject(params, rules, key=key))

  def loss_fn(trainable, batch):  # no materialize: the layers read the nodes
      return loss(nnx.merge(graphdef, combine(trainable, frozen), rest), batch)

References:
  Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022 (Sec. 4.1:
  :math:`h = W_0 x + BAx`, computed without merging during training).
  Hugging Face PEFT, ``src/peft/tuners/lora/layer.py`` (``Linear.forward``).
"""

from __future__ import annotations

import contextlib
import functools
import string
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from effjax.peft import KernelLayout, is_adapter
from effjax.selection import no_selection_message, path_str, selector

__all__ = ["LowRankAdapter", "has_low_rank_factors", "adapted_einsum", "adapted_dot_general",
           "AdaptedLinear", "AdaptedLinearGeneral", "AdaptedEinsum", "adapted_layers",
           "AdaptedDense", "AdaptedDenseGeneral", "linen_adapted_layers"]

Where = str | Callable[[str, Any], bool] | None


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


def _parse_einsum(subscripts: str, x_ndim: int, k_ndim: int) -> tuple[str, str, str]:
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
    x = jnp.asarray(x)
    kw = {} if out_sharding is None else {"out_sharding": out_sharding}
    if preferred_element_type is not None:
        kw["preferred_element_type"] = preferred_element_type
    if is_adapter(kernel) and not has_low_rank_factors(kernel):
        kernel = kernel.materialize()
    if not is_adapter(kernel):
        xc, kc = _promote(x, kernel, dtype)
        return einsum_op(subscripts, xc, kc, precision=precision, **kw)
    x_spec, k_spec, o_spec = _parse_einsum(subscripts, x.ndim, kernel.w.ndim)
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
    x = jnp.asarray(x)
    kw = {} if out_sharding is None else {"out_sharding": out_sharding}
    if preferred_element_type is not None:
        kw["preferred_element_type"] = preferred_element_type
    if is_adapter(kernel) and not has_low_rank_factors(kernel):
        kernel = kernel.materialize()
    if not is_adapter(kernel):
        xc, kc = _promote(x, kernel, dtype)
        return dot_general(xc, kc, dimension_numbers, precision=precision, **kw)
    specs = _dot_general_specs(x.ndim, kernel.w.ndim, dimension_numbers)
    xc, wc = _promote(x, kernel.w, dtype)
    y = dot_general(xc, wc, dimension_numbers, precision=precision, **kw)
    return y + _low_rank_term(*specs, xc, kernel, dtype, precision).astype(y.dtype)


# ----------------------------------------------------------------------------------- NNX


def _dense(x: Any) -> Any:
    """A bias (or other small param) that is an adapter node, materialized."""
    return x.materialize() if is_adapter(x) else x


def _prepare(layer_name: str, kernel: Any, expected: Sequence[int]) -> Any:
    """Materialize nodes without factors; check the kernel's shape against the layer's."""
    if is_adapter(kernel) and not has_low_rank_factors(kernel):
        kernel = kernel.materialize()
    shape = tuple(kernel.w.shape if is_adapter(kernel) else jnp.shape(kernel))
    if shape != tuple(expected):
        what = f"{_kernel_name(kernel)} with w of shape" if is_adapter(kernel) else \
            "kernel of shape"
        raise ValueError(f"{layer_name}: {what} {shape}, but the layer and its input need a "
                         f"kernel of shape {tuple(expected)}")
    return kernel


def _promote_node(promote: Callable, inputs, kernel, bias, dtype, tuple_style: bool):
    """The layer's ``promote_dtype`` on ``(inputs, kernel or node.w, bias)``."""
    w = kernel.w if is_adapter(kernel) else kernel
    args = (inputs, w, bias)
    inputs, w, bias = promote(args, dtype=dtype) if tuple_style else promote(*args, dtype=dtype)
    return inputs, (kernel.replace(w=w) if is_adapter(kernel) else w), bias


def _general_dims(ndim: int, axis: Sequence[int], batch_axis: Sequence[int]):
    axis = tuple(a % ndim for a in axis)
    batch_axis = tuple(a % ndim for a in batch_axis)
    n_b = len(batch_axis)
    return ((axis, tuple(range(n_b, n_b + len(axis)))), (batch_axis, tuple(range(n_b))))


def _expanded_bias_shape(shape, axis, batch_axis, features):
    ndim = len(shape)
    axis = {a % ndim for a in axis}
    batch_axis = {a % ndim for a in batch_axis}
    return tuple(shape[i] if i in batch_axis else 1 for i in range(ndim) if i not in axis) + \
        tuple(features)


class AdaptedLinear(nnx.Linear):
    """``nnx.Linear`` whose kernel ``Param`` may hold an adapter node (same constructor).

    :math:`y = xW + (xA)B + b` for LoRA-family nodes (no dense delta), :math:`y = xW' + b` for
    other nodes (materialized; a bias that is a node, e.g. ``Unfreeze``, too), exactly
    ``nnx.Linear`` for plain params.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from effjax.peft import LoRA, inject, materialize
      >>> layer = AdaptedLinear(4, 3, rngs=nnx.Rngs(0))
      >>> graphdef, params = nnx.split(layer)
      >>> tree = inject(params, {'kernel': LoRA(rank=2, init='gaussian')}, key=jax.random.key(0))
      >>> tree['kernel'].set_value(tree['kernel'].get_value().replace(b=jnp.ones((2, 3))))
      >>> x = jnp.ones((5, 4))
      >>> y = nnx.merge(graphdef, tree)(x)  # reads the node: x W + (x A)(s B) + bias
      >>> bool(jnp.allclose(y, nnx.merge(graphdef, materialize(tree))(x), atol=1e-5))
      True
    """

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        kernel = self.kernel.get_value()
        bias = self.bias.get_value() if self.bias is not None else None
        if not (is_adapter(kernel) or is_adapter(bias)):
            return super().__call__(inputs, out_sharding=out_sharding)
        kernel = _prepare(type(self).__name__, kernel, (jnp.shape(inputs)[-1],
                                                        self.out_features))
        bias = _dense(bias)
        inputs, kernel, bias = _promote_node(self.promote_dtype, inputs, kernel, bias,
                                             self.dtype, True)
        y = adapted_dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())),
                                dtype=self.dtype, precision=self.precision,
                                preferred_element_type=self.preferred_element_type,
                                dot_general=self.dot_general, out_sharding=out_sharding)
        if bias is not None:
            y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y


class AdaptedLinearGeneral(nnx.LinearGeneral):
    """``nnx.LinearGeneral`` whose kernel ``Param`` may hold an adapter node (same
    constructor): multi-axis kernels such as attention's ``(d, heads, head_dim)`` and
    ``(heads, head_dim, d)``, and ``batch_axis`` kernels.

    :math:`y = x \\cdot W + (x \\cdot A) \\cdot B + b`, contracted over ``axis``; the node's
    layout (its ``in_axes`` / ``out_axes`` / ``batch_axes``) only decides how :math:`A` and
    :math:`B` split the kernel, so any layout gives the same result as ``materialize``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from effjax.peft import LoRA, inject, materialize
      >>> out = AdaptedLinearGeneral((2, 4), 8, axis=(-2, -1), rngs=nnx.Rngs(0))
      >>> graphdef, params = nnx.split(out)
      >>> tree = inject(params, {'kernel': LoRA(rank=2, init='gaussian', in_axes=(0, 1))},
      ...               key=jax.random.key(0))
      >>> tree['kernel'].set_value(tree['kernel'].get_value().replace(b=jnp.ones((2, 8))))
      >>> x = jnp.ones((3, 2, 4))
      >>> y = nnx.merge(graphdef, tree)(x)
      >>> bool(jnp.allclose(y, nnx.merge(graphdef, materialize(tree))(x), atol=1e-5))
      True
    """

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        kernel = self.kernel.get_value()
        bias = self.bias.get_value() if self.bias is not None else None
        if not (is_adapter(kernel) or is_adapter(bias)):
            return super().__call__(inputs, out_sharding=out_sharding)
        kernel = _prepare(type(self).__name__, kernel,
                          tuple(self.batch_axis.values()) + tuple(self.in_features)
                          + tuple(self.out_features))
        bias = _dense(bias)
        shape = jnp.shape(inputs)
        batch_axis = tuple(self.batch_axis.keys())
        dims = _general_dims(len(shape), self.axis, batch_axis)
        inputs, kernel, bias = _promote_node(self.promote_dtype, inputs, kernel, bias,
                                             self.dtype, True)
        if self.dot_general_cls is not None:
            dot_general = self.dot_general_cls()
        else:
            dot_general = self.dot_general or lax.dot_general
        y = adapted_dot_general(inputs, kernel, dims, dtype=self.dtype,
                                precision=self.precision,
                                preferred_element_type=self.preferred_element_type,
                                dot_general=dot_general, out_sharding=out_sharding)
        if bias is not None:
            y += jnp.reshape(bias, _expanded_bias_shape(shape, self.axis, batch_axis,
                                                        self.out_features))
        return y


class AdaptedEinsum(nnx.Einsum):
    """``nnx.Einsum`` whose kernel ``Param`` may hold an adapter node (same constructor):
    :math:`y = \\mathrm{einsum}(x, W) + \\mathrm{einsum}(\\mathrm{einsum}(x, A), B) + b`.

    Stacked kernels (experts / layers on a leading axis, ``'ebi,eio->ebo'``) take LoRA nodes
    with ``batch_axes=(0,)``: one adapter per slice.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from effjax.peft import LoRA, inject, materialize
      >>> layer = AdaptedEinsum('ebi,eio->ebo', (3, 4, 5), (3, 1, 5), rngs=nnx.Rngs(0))
      >>> graphdef, params = nnx.split(layer)
      >>> rule = LoRA(rank=2, init='gaussian', batch_axes=(0,))
      >>> tree = inject(params, {'kernel': rule}, key=jax.random.key(0))
      >>> tree['kernel'].set_value(tree['kernel'].get_value().replace(b=jnp.ones((3, 2, 5))))
      >>> x = jnp.ones((3, 2, 4))
      >>> y = nnx.merge(graphdef, tree)(x)
      >>> bool(jnp.allclose(y, nnx.merge(graphdef, materialize(tree))(x), atol=1e-5))
      True
    """

    def __call__(self, inputs: jax.Array, einsum_str: str | None = None,
                 out_sharding: Any = None) -> jax.Array:
        kernel = self.kernel.get_value()
        bias = self.bias.get_value() if self.bias is not None else None
        if not (is_adapter(kernel) or is_adapter(bias)):
            return super().__call__(inputs, einsum_str, out_sharding=out_sharding)
        einsum_str = (einsum_str if einsum_str is not None else self.einsum_str)
        if einsum_str is None:
            raise ValueError("AdaptedEinsum: no einsum_str given to the constructor or the call")
        einsum_str = einsum_str.replace(" ", "")
        self._einsum_str_check(einsum_str)
        kernel = _prepare(type(self).__name__, kernel, tuple(self.kernel_shape))
        bias = _dense(bias)
        inputs, kernel, bias = _promote_node(self.promote_dtype, inputs, kernel, bias,
                                             self.dtype, True)
        y = adapted_einsum(einsum_str, inputs, kernel, dtype=self.dtype,
                           precision=self.precision,
                           preferred_element_type=self.preferred_element_type,
                           einsum_op=self.einsum_op, out_sharding=out_sharding)
        if bias is not None:
            w = kernel.w if is_adapter(kernel) else kernel
            y += jnp.reshape(bias, self._infer_broadcasted_bias_shape(einsum_str, inputs, w))
        return y


_NNX_FAST = {nnx.Linear: AdaptedLinear, nnx.LinearGeneral: AdaptedLinearGeneral,
             nnx.Einsum: AdaptedEinsum}


def adapted_layers(model: nnx.Module, where: Where = None, *, copy: bool = True) -> nnx.Module:
    """An NNX model whose ``nnx.Linear`` / ``nnx.LinearGeneral`` / ``nnx.Einsum`` layers are
    the adapter-aware :class:`AdaptedLinear` / :class:`AdaptedLinearGeneral` /
    :class:`AdaptedEinsum` (same parameters, same paths, same outputs for plain kernels).

    The layers are converted by changing their class (the subclasses add no state), so model
    code and parameter paths stay as they are. Split the converted model, inject adapters into
    its params and ``nnx.merge`` the tree *without* :func:`~effjax.peft.materialize`: each
    layer then reads its node (fast path for LoRA-family nodes). Layers of other classes,
    including user subclasses of ``nnx.Linear``, are left alone.

    Args:
      model: an NNX module.
      where: None (every such layer), a regex fullmatched against the ``'/'``-joined module
        path (``'layers/0/query'``), or a predicate ``(path, module) -> bool``.
      copy: convert a copy (``nnx.clone``; the arrays are shared) and leave ``model`` as it
        is (default); False converts ``model`` in place and returns it.

    Raises:
      ValueError: ``where`` selects none of the model's convertible layers (the message lists
        their paths).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from effjax.peft import LoRA, inject, materialize
      >>> from effjax.models.classifiers import MLP
      >>> model = adapted_layers(MLP([4, 8, 2], rngs=nnx.Rngs(0)))
      >>> [type(l).__name__ for l in model.layers]
      ['AdaptedLinear', 'AdaptedLinear']
      >>> graphdef, params = nnx.split(model)
      >>> tree = inject(params, {r'.*/kernel': LoRA(rank=2, init='gaussian')},
      ...               key=jax.random.key(0))
      >>> x = jnp.ones((3, 4))
      >>> y_fast = nnx.merge(graphdef, tree)(x)
      >>> bool(jnp.allclose(y_fast, nnx.merge(graphdef, materialize(tree))(x)))
      True
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"adapted_layers needs an NNX module, got {type(model).__name__}")
    select = selector(where)
    new = nnx.clone(model) if copy else model
    candidates, targets = [], []
    for path, module in nnx.iter_modules(new):
        if type(module) in _NNX_FAST or type(module) in _NNX_FAST.values():
            candidates.append(path)
            if type(module) in _NNX_FAST and select(path_str(path), module):
                targets.append(module)
    if where is not None and not targets:
        raise ValueError(no_selection_message(where, [path_str(p) for p in candidates],
                                              "nnx.Linear / LinearGeneral / Einsum layers"))
    for module in targets:
        module.__class__ = _NNX_FAST[type(module)]
    return new


# ----------------------------------------------------------------------------------- Linen


def _linen_kernel(module: nn.Module) -> Any:
    if module.has_variable("params", "kernel"):
        return module.get_variable("params", "kernel")
    return None


def _linen_has_node(module: nn.Module) -> bool:
    """Whether the layer's kernel or bias param is an adapter node."""
    return any(module.has_variable("params", k) and is_adapter(module.get_variable("params", k))
               for k in ("kernel", "bias"))


def _linen_bias(module: nn.Module, shape: Sequence[int]) -> jax.Array | None:
    if not module.use_bias:
        return None
    bias = _dense(module.get_variable("params", "bias"))
    if bias is None or tuple(jnp.shape(bias)) != tuple(shape):
        raise ValueError(f"{type(module).__name__} at '{path_str(module.path)}': bias of "
                         f"shape {None if bias is None else jnp.shape(bias)}, expected "
                         f"{tuple(shape)}")
    return bias


def _linen_dot_general(module: nn.Module) -> Callable:
    if getattr(module, "dot_general_cls", None) is not None:
        return module.dot_general_cls()
    return getattr(module, "dot_general", None) or lax.dot_general


def _linen_dense(module: nn.Dense, kernel: Any, inputs: jax.Array) -> jax.Array:
    name = f"{type(module).__name__} at '{path_str(module.path)}'"
    kernel = _prepare(name, kernel, (jnp.shape(inputs)[-1], module.features))
    bias = _linen_bias(module, (module.features,))
    inputs, kernel, bias = _promote_node(module.promote_dtype, inputs, kernel, bias,
                                         module.dtype, False)
    y = adapted_dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())),
                            dtype=module.dtype, precision=module.precision,
                            dot_general=_linen_dot_general(module))
    if bias is not None:
        y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y


def _tuple(x: Any) -> tuple:
    return tuple(x) if isinstance(x, Sequence) else (x,)


def _linen_dense_general(module: nn.DenseGeneral, kernel: Any, inputs: jax.Array) -> jax.Array:
    name = f"{type(module).__name__} at '{path_str(module.path)}'"
    shape = jnp.shape(inputs)
    features, axis, batch_dims = _tuple(module.features), _tuple(module.axis), \
        _tuple(module.batch_dims)
    axis_n = tuple(a % len(shape) for a in axis)
    batch_n = tuple(a % len(shape) for a in batch_dims)
    batch_shape = tuple(shape[a] for a in batch_n)
    kernel = _prepare(name, kernel, batch_shape + tuple(shape[a] for a in axis_n) + features)
    bias = _linen_bias(module, batch_shape + features)
    inputs, kernel, bias = _promote_node(module.promote_dtype, inputs, kernel, bias,
                                         module.dtype, False)
    y = adapted_dot_general(inputs, kernel, _general_dims(len(shape), axis, batch_dims),
                            dtype=module.dtype, precision=module.precision,
                            dot_general=_linen_dot_general(module))
    if bias is not None:
        y += jnp.reshape(bias, _expanded_bias_shape(shape, axis, batch_dims, features))
    return y


def _linen_einsum(module: nn.Einsum, kernel: Any, inputs: jax.Array,
                  einsum_str: str | None = None) -> jax.Array:
    name = f"{type(module).__name__} at '{path_str(module.path)}'"
    einsum_str = einsum_str if einsum_str is not None else module.einsum_str
    if einsum_str is None:
        raise ValueError(f"{name}: no einsum_str")
    einsum_str = einsum_str.replace(" ", "")
    kernel = _prepare(name, kernel, tuple(module.shape))
    bias = None
    if module.use_bias:
        w = kernel.w if is_adapter(kernel) else kernel
        bias_shape, broadcast_shape = module._get_bias_shape(einsum_str, inputs, w)
        bias = _linen_bias(module, bias_shape)
    inputs, kernel, bias = _promote_node(module.promote_dtype, inputs, kernel, bias,
                                         module.dtype, False)
    y = adapted_einsum(einsum_str, inputs, kernel, dtype=module.dtype,
                       precision=module.precision,
                       preferred_element_type=module.preferred_element_type)
    if bias is not None:
        y += jnp.reshape(bias, broadcast_shape)
    return y


_LINEN_CALLS = ((nn.Dense, _linen_dense), (nn.DenseGeneral, _linen_dense_general),
                (nn.Einsum, _linen_einsum))


class AdaptedDense(nn.Dense):
    """``nn.Dense`` whose ``kernel`` param may be an adapter node (same attributes).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from effjax.peft import LoRA, inject, materialize
      >>> model, x = AdaptedDense(3), jnp.ones((2, 4))
      >>> params = model.init(jax.random.key(0), x)['params']
      >>> tree = inject(params, {'kernel': LoRA(rank=2, init='gaussian')}, key=jax.random.key(1))
      >>> tree['kernel'] = tree['kernel'].replace(b=jnp.ones((2, 3)))
      >>> y = model.apply({'params': tree}, x)
      >>> bool(jnp.allclose(y, model.apply({'params': materialize(tree)}, x), atol=1e-5))
      True
    """

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        if not _linen_has_node(self):
            return super().__call__(inputs)
        kernel = _linen_kernel(self)
        return _linen_dense(self, kernel, inputs)


class AdaptedDenseGeneral(nn.DenseGeneral):
    """``nn.DenseGeneral`` whose ``kernel`` param may be an adapter node (same attributes).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from effjax.peft import LoRA, inject, materialize
      >>> model, x = AdaptedDenseGeneral((2, 4)), jnp.ones((3, 8))  # kernel (8, 2, 4)
      >>> params = model.init(jax.random.key(0), x)['params']
      >>> tree = inject(params, {'kernel': LoRA(rank=2, init='gaussian')}, key=jax.random.key(1))
      >>> tree['kernel'] = tree['kernel'].replace(b=jnp.ones((2, 2, 4)))
      >>> y = model.apply({'params': tree}, x)
      >>> y.shape, bool(jnp.allclose(y, model.apply({'params': materialize(tree)}, x), atol=1e-5))
      ((3, 2, 4), True)
    """

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        if not _linen_has_node(self):
            return super().__call__(inputs)
        kernel = _linen_kernel(self)
        return _linen_dense_general(self, kernel, inputs)


@contextlib.contextmanager
def linen_adapted_layers(
    where: Where = None,
    *,
    layer_types: tuple[type, ...] = (nn.Dense, nn.DenseGeneral, nn.Einsum),
) -> Iterator[None]:
    """Context in which Linen ``nn.Dense`` / ``nn.DenseGeneral`` / ``nn.Einsum`` layers read
    adapter nodes from their ``kernel`` param: existing Linen models run
    ``model.apply({'params': tree}, x)`` on an injected tree without ``materialize``.

    Uses ``flax.linen.intercept_methods``: the ``__call__`` of every selected layer whose
    kernel is a node computes :math:`xW + (xA)B` (LoRA family) or :math:`xW'` (other nodes,
    materialized); layers with plain kernels, and ``init``, run unchanged. As with any
    interceptor the substitution happens when the model is **traced**: put the ``with``
    inside the function you ``jax.jit`` / ``jax.grad``.

    Args:
      where: None (every layer), a regex fullmatched against the module path
        (``'Dense_0'``, ``'block/mlp/up'``), or a predicate ``(path, module) -> bool``.
      layer_types: Linen classes to intercept (subclasses included; ``nn.Dense``,
        ``nn.DenseGeneral``, ``nn.Einsum`` and their subclasses are supported).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import flax.linen as nn
      >>> from effjax.peft import LoRA, inject, materialize
      >>> model, x = nn.Dense(3), jnp.ones((2, 4))
      >>> tree = inject(model.init(jax.random.key(0), x)['params'],
      ...               {'kernel': LoRA(rank=2, init='gaussian')}, key=jax.random.key(1))
      >>> tree['kernel'] = tree['kernel'].replace(b=jnp.ones((2, 3)))
      >>> with linen_adapted_layers():
      ...   y = model.apply({'params': tree}, x)
      >>> bool(jnp.allclose(y, model.apply({'params': materialize(tree)}, x), atol=1e-5))
      True
    """
    select = selector(where)
    for t in layer_types:
        if not (isinstance(t, type) and any(issubclass(t, base) for base, _ in _LINEN_CALLS)):
            raise TypeError(f"layer_types: {t!r} is not a subclass of nn.Dense, "
                            f"nn.DenseGeneral or nn.Einsum")

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, layer_types) and select(
                path_str(module.path), module):
            if _linen_has_node(module):
                kernel = _linen_kernel(module)
                fn = next(f for base, f in _LINEN_CALLS if isinstance(module, base))
                kwargs = dict(kwargs)
                inputs = args[0] if args else kwargs.pop("inputs")
                return fn(module, kernel, inputs, *args[1:], **kwargs)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield
