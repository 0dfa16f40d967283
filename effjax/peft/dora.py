"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024).

DoRA splits the kernel into a magnitude and a direction and adapts the direction with LoRA.
For a Flax kernel :math:`W \\in \\mathbb{R}^{n_{in} \\times n_{out}}` (``y = x W``), with
:math:`V = W + s\\,AB` (the LoRA-adapted kernel, :math:`s = \\alpha/r` or :math:`\\alpha/\\sqrt r`)
and :math:`\\lVert V \\rVert_c \\in \\mathbb{R}^{n_{out}}` the Euclidean norm of each output column
(over the input dimension):

.. math::

  W' = m \\odot \\frac{W + s\\,AB}{\\lVert W + s\\,AB \\rVert_c}, \\qquad
  m_j \\leftarrow \\lVert W_{:, j} \\rVert \\;\\text{at init} ,

so :math:`W' = W` right after injection (:math:`B = 0`). Trainable: :math:`A` ``(in, r)``,
:math:`B` ``(r, out)`` and the magnitude :math:`m` ``(out,)``:
:math:`r\\,(n_{in} + n_{out}) + n_{out}` parameters per kernel (times the number of slices for
stacked kernels). :math:`W` is frozen.

**Gradients.** Following Section 4.3 of the paper and Hugging Face PEFT
(``DoraLinearLayer.forward`` detaches ``weight_norm``), the norm :math:`\\lVert V\\rVert_c` is
treated as a constant in the backward pass (``detach_norm=True``, the default):
:func:`jax.lax.stop_gradient` on the norm, so :math:`m` receives
:math:`\\partial L/\\partial W' \\odot V / \\lVert V\\rVert_c` and :math:`A, B` receive the LoRA
gradients scaled by :math:`m / \\lVert V\\rVert_c` per column, exactly PEFT's gradients. The
forward value is the same either way. ``detach_norm=False`` differentiates through the norm too
(the paper's Eq. 5 without the memory-saving approximation).

PEFT computes the layer output as
``base(x) + (m/n - 1) * x @ W.T + (m/n) * s * lora_B(lora_A(x))``, which is
:math:`x\\,W'` with :math:`W'` above (up to float reassociation); :meth:`DoRAWeight.materialize`
(and so :func:`effjax.peft.merge`) builds :math:`W'` densely, which is also PEFT's merged weight
(``merge_and_unload``). A zero output column of :math:`V` (so :math:`\\lVert V\\rVert_c = 0`)
gives a zero column in effjax (the norm is replaced by 1 there) where PEFT gives NaN.

Inits of :math:`A, B` are LoRA's (``"kaiming"``, ``"gaussian"``, and ``"pissa"``,
``"pissa_niter_K"``, ``"olora"``, for which :math:`W` becomes the residual
:math:`W - s\\,AB` and :math:`m` is the column norm of the reconstructed :math:`W`, as PEFT
computes the magnitude after its LoRA init). Multi-axis and stacked kernels use a
:class:`~effjax.peft.layout.KernelLayout` as in :mod:`effjax.peft.lora`; ``m`` has shape
``(*batch, *out)`` and the norm runs over all input axes of each slice.

References:
  Liu, Wang, Yin, Molchanov, Wang, Cheng, Chen, "DoRA: Weight-Decomposed Low-Rank Adaptation",
  ICML 2024, arXiv:2402.09353.
  Hugging Face PEFT, ``src/peft/tuners/lora/dora.py`` and ``variants.py``
  (``DoraLinearVariant``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from effjax.compress import dense_weight
from effjax.peft._checks import check_bool
from effjax.peft.base import AdapterNode, adapter_node, register_adapter
from effjax.peft.layout import KernelLayout, place_like
from effjax.peft.lora import LoRA

__all__ = ["DoRA", "DoRAWeight"]


@register_adapter("dora")
@dataclasses.dataclass(frozen=True, kw_only=True)
class DoRA(LoRA):
    """DoRA method config (a rule value of :func:`effjax.peft.inject`).

    :math:`W' = m \\odot (W + s\\,AB) / \\lVert W + s\\,AB \\rVert_c` (column norms over the input
    dimension); trainable parameters :math:`n_{batch}\\,(r\\,(n_{in} + n_{out}) + n_{out})`.
    See the module docstring for the equation, the gradients and references. A DoRA config is
    a :class:`~effjax.peft.LoRA` config (its fields, checks and scale) with ``detach_norm``.

    Attributes:
      rank, alpha, init, rslora, dtype, in_axes, out_axes, batch_axes: as in
        :class:`~effjax.peft.LoRA` (``dtype`` also applies to ``m``).
      detach_norm: treat the column norm as a constant in the backward pass (PEFT and the
        paper's Section 4.3; default True).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> w = jnp.array([[3.0, 0.0], [4.0, 2.0]])
      >>> node = DoRA(rank=1, alpha=2.0).adapt(jax.random.key(0), w)
      >>> node.m  # column norms of W
      Array([5., 2.], dtype=float32)
      >>> bool(jnp.allclose(node.materialize(), w))
      True
      >>> DoRA(rank=1).num_trainable((2, 2))  # r (in + out) + out
      6
    """

    detach_norm: bool = True

    def __post_init__(self):
        super().__post_init__()
        check_bool(self.detach_norm, "detach_norm", self.name)

    @property
    def lora(self) -> LoRA:
        """The :class:`~effjax.peft.LoRA` config of the low-rank part."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(LoRA)}
        return LoRA(**fields)

    def num_trainable(self, shape: Sequence[int]) -> int:
        """:math:`n_{batch}\\,(r\\,(n_{in} + n_{out}) + n_{out})`."""
        lay = self.layout(shape)
        return lay.n_batch * (self.rank * (lay.n_in + lay.n_out) + lay.n_out)

    def adapt(self, key: jax.Array, w: jax.Array) -> DoRAWeight:
        """LoRA's ``a``, ``b`` (and residual ``w`` for PiSSA / OLoRA) and
        :math:`m = \\lVert W + s\\,AB \\rVert_c` (``(*batch, *out)``, sharded like ``w``'s
        batch and out axes)."""
        node = LoRA.adapt(self, key, w)
        lay = node.layout
        m = _column_norm(node.w, node.a, node.b, lay, self.scale)
        m = m.astype(node.a.dtype).reshape(lay.batch_shape + lay.out_shape)
        m = place_like(m, node.w, lay.batch_axes + lay.out_axes)
        return DoRAWeight(w=node.w, a=node.a, b=node.b, m=m, method=self, layout=lay)


def _direction(w, a, b, lay: KernelLayout, scale: float, dtype):
    """:math:`V = W + s\\,AB` as ``(*batch, n_in, n_out)`` in ``dtype``."""
    r = a.shape[-1]
    a = a.reshape(lay.batch_shape + (lay.n_in, r)).astype(dtype)
    b = b.reshape(lay.batch_shape + (r, lay.n_out)).astype(dtype)
    return lay.to_matrix(w).astype(dtype) + scale * jnp.matmul(a, b)


def _column_norm(w, a, b, lay: KernelLayout, scale: float) -> jax.Array:
    dtype = jnp.promote_types(w.dtype, a.dtype)
    v = _direction(w, a, b, lay, scale, dtype)
    return jnp.sqrt(jnp.sum(jnp.square(v), axis=-2))  # (*batch, n_out)


@adapter_node
class DoRAWeight(AdapterNode):
    """A kernel with a DoRA adapter: frozen ``w``, trainable ``a``, ``b`` and ``m``.

    ``materialize()`` :math:`= m \\odot (W + s\\,AB) / \\lVert W + s\\,AB \\rVert_c` in ``w``'s
    shape and dtype (computed in the promoted dtype of ``w``, ``a`` and ``m``).

    Attributes:
      w: the frozen kernel (the residual for PiSSA / OLoRA inits).
      a: ``(*batch, *in, r)``, trainable.
      b: ``(*batch, r, *out)``, trainable.
      m: ``(*batch, *out)``, the magnitude, trainable.
      method: the :class:`DoRA` config (static).
      layout: the kernel's :class:`~effjax.peft.layout.KernelLayout` (static).
    """

    trainable_fields = ("a", "b", "m")
    frozen_fields = ("w",)

    w: jax.Array
    a: jax.Array
    b: jax.Array
    m: jax.Array
    method: DoRA
    layout: KernelLayout

    @property
    def scale(self) -> float:
        """:math:`s`, from the config."""
        return self.method.scale

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    def weight_norm(self) -> jax.Array:
        """:math:`\\lVert W + s\\,AB \\rVert_c`, shape ``(*batch, *out)`` (not detached)."""
        lay = self.layout
        n = _column_norm(dense_weight(self.w), self.a, self.b, lay, self.scale)
        return n.reshape(lay.batch_shape + lay.out_shape)

    def materialize(self) -> jax.Array:
        """:math:`m \\odot V / \\lVert V \\rVert_c`, :math:`V = W + s\\,AB`, cast to ``w.dtype``
        (the norm under ``stop_gradient`` when ``method.detach_norm``)."""
        lay = self.layout
        dtype = jnp.promote_types(jnp.promote_types(self.w.dtype, self.a.dtype), self.m.dtype)
        v = _direction(dense_weight(self.w), self.a, self.b, lay, self.scale, dtype)
        norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=-2))
        if self.method.detach_norm:
            norm = jax.lax.stop_gradient(norm)
        norm = jnp.where(norm > 0, norm, 1.0)  # a zero column stays zero (PEFT: NaN)
        m = self.m.reshape(lay.batch_shape + (lay.n_out,)).astype(dtype)
        out = v * (m / norm)[..., None, :]
        return lay.from_matrix(out).astype(self.w.dtype)
