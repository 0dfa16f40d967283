"""SVFit: fine-tune the top-:math:`r` singular values of a frozen kernel (Sun et al., 2024).

SVFit splits the pretrained kernel by its singular value decomposition into the best rank-:math:`r`
approximation and the rest, freezes the singular vectors and the rest, and trains only the top
:math:`r` ("critical") singular values. For a Flax kernel :math:`W \\in \\mathbb{R}^{n_{in}
\\times n_{out}}` (``y = x W``) with the SVD :math:`W = U \\Sigma V^\\top`:

.. math::

  W = \\underbrace{U_r \\Sigma_r V_r^\\top}_{W_r} + \\underbrace{W - U_r \\Sigma_r V_r^\\top}_{W_e},
  \\qquad W' = W_e + U_r\\, \\mathrm{diag}(\\sigma)\\, V_r^\\top,
  \\qquad \\sigma \\leftarrow \\mathrm{diag}(\\Sigma_r) \\text{ at init},

with :math:`U_r \\in \\mathbb{R}^{n_{in} \\times r}`, :math:`V_r \\in \\mathbb{R}^{n_{out} \\times
r}` (orthonormal columns) and the residual :math:`W_e` frozen and :math:`\\sigma \\in
\\mathbb{R}^r` trainable (the paper's :math:`W = W_r + W_e`, "the top-:math:`r` singular values
are then used as trainable parameters to scale the fundamental subspaces of the matrix"). So
:math:`W' = W` (up to float rounding) right after injection, and fine-tuning rescales the
principal rank-one components :math:`u_i v_i^\\top` of the kernel. There is no
:math:`\\alpha / r` scaling.

Trainable parameters per kernel: :math:`r`, times the number of slices for stacked kernels
(``batch_axes``); :math:`r \\le \\min(n_{in}, n_{out})`.

Details. The paper writes the torch layout :math:`W \\in \\mathbb{R}^{d_{out} \\times d_{in}}`;
the SVD of the Flax kernel is its transpose (the same singular values, the roles of :math:`U`
and :math:`V` swapped), so :math:`W_r` and :math:`W_e` are the same matrices transposed.
Singular vectors are unique only up to a sign per component (and a rotation within a repeated
singular value); :math:`W_r`, :math:`W_e` and :math:`W'` do not depend on that choice. The SVD
is computed in float32 (or the kernel's wider dtype) per batch slice with ``jnp.linalg.svd``;
``u``, ``s``, ``vh`` are stored in the adapter dtype (float32 for bfloat16/float16 kernels, as
LoRA) and :math:`W_e` is computed from the stored (rounded) factors, then cast to the kernel's
dtype. The paper selects :math:`r` so that the kept singular values hold most (">99%") of the
matrix's information; here ``rank`` is given explicitly, as LoRA's.

Kernels with more than two axes use a :class:`~effjax.peft.layout.KernelLayout`: ``u`` has
shape ``(*batch, *in, r)``, ``s`` ``(*batch, r)`` and ``vh`` ``(*batch, r, *out)``.

References:
  Sun, Wei, Wu, Shi, He, Ma, Xie, Yang, "SVFit: Parameter-Efficient Fine-Tuning of Large
  Pre-Trained Models Using Singular Values", arXiv:2409.05926, 2024. (No official code was found
  offline; the equations above follow the paper's text: SVD, :math:`W = W_r + W_e`, top-:math:`r`
  singular values trainable, singular vectors and :math:`W_e` frozen.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from effjax.peft._checks import check_rank
from effjax.peft.base import AdapterNode, KernelAdapter, adapter_node, register_adapter
from effjax.peft.layout import KernelLayout, place_like

__all__ = ["SVFit", "SVFitWeight"]


@register_adapter("svfit")
@dataclasses.dataclass(frozen=True, kw_only=True)
class SVFit(KernelAdapter):
    """SVFit method config (a rule value of :func:`effjax.peft.inject`).

    :math:`W' = W_e + U_r\\,\\mathrm{diag}(\\sigma)\\,V_r^\\top` with :math:`U_r, V_r, W_e` frozen
    from the SVD of the kernel and :math:`\\sigma` (initially the top-:math:`r` singular values)
    trainable; trainable parameters :math:`n_{batch}\\, r`. See the module docstring.

    Attributes:
      rank: :math:`r \\ge 1`, at most :math:`\\min(n_{in}, n_{out})` of each targeted kernel.
      dtype, in_axes, out_axes, batch_axes: as every :class:`~effjax.peft.KernelAdapter`
        (``dtype``: of ``u``, ``s`` and ``vh``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> w = jax.random.normal(jax.random.key(1), (6, 4))
      >>> node = SVFit(rank=2).adapt(jax.random.key(0), w)
      >>> node.u.shape, node.s.shape, node.vh.shape
      ((6, 2), (2,), (2, 4))
      >>> bool(jnp.allclose(node.materialize(), w, atol=1e-5))  # W_e + U_r S_r V_r^T = W
      True
      >>> bool(jnp.allclose(node.s, jnp.linalg.svd(w, compute_uv=False)[:2]))
      True
      >>> SVFit(rank=2).num_trainable((6, 4))  # r
      2
    """

    rank: int = 8

    def __post_init__(self):
        super().__post_init__()
        self._set(rank=check_rank(self.rank, self.name))

    def num_trainable(self, shape: Sequence[int]) -> int:
        """:math:`n_{batch}\\, r`."""
        return self.layout(shape).n_batch * self.rank

    def adapt(self, key: jax.Array, w: jax.Array) -> SVFitWeight:
        """The truncated SVD of each slice of ``w`` (``key`` is unused: the init is
        deterministic), with the residual :math:`W_e` as the frozen ``w``; placed on ``w``'s
        devices and sharded like ``w``'s batch / in / out axes."""
        del key
        lay = self.layout(w.shape)
        r, dtype = self.rank, self.adapter_dtype(w.dtype)
        if r > min(lay.n_in, lay.n_out):
            raise ValueError(f"SVFit rank must be <= min(n_in, n_out) = {min(lay.n_in, lay.n_out)}"
                             f" for a kernel of shape {lay.shape}, got rank={r}")
        ct = jnp.promote_types(w.dtype, jnp.float32)
        m = lay.to_matrix(w).astype(ct)  # (*batch, n_in, n_out)
        u, s, vh = jnp.linalg.svd(m, full_matrices=False)
        u, s, vh = u[..., :r].astype(dtype), s[..., :r].astype(dtype), vh[..., :r, :].astype(dtype)
        # the residual from the stored (possibly rounded) factors, so W_e + U diag(s) V^T = W
        w_e = m - jnp.matmul(u.astype(ct) * s.astype(ct)[..., None, :], vh.astype(ct))
        u = place_like(u.reshape(lay.batch_shape + lay.in_shape + (r,)), w,
                       lay.batch_axes + lay.in_axes + (None,))
        vh = place_like(vh.reshape(lay.batch_shape + (r,) + lay.out_shape), w,
                        lay.batch_axes + (None,) + lay.out_axes)
        s = place_like(s, w, lay.batch_axes + (None,))
        w_e = place_like(lay.from_matrix(w_e).astype(w.dtype), w, tuple(range(w.ndim)))
        return SVFitWeight(w=w_e, u=u, s=s, vh=vh, method=self, layout=lay)


@adapter_node
class SVFitWeight(AdapterNode):
    """A kernel with an SVFit adapter: frozen residual ``w`` and singular vectors ``u``, ``vh``;
    trainable singular values ``s``.

    ``materialize()`` :math:`= W_e + U_r\\,\\mathrm{diag}(\\sigma)\\,V_r^\\top` in the original
    kernel's shape and dtype (computed in the promoted dtype of ``w`` and ``s``, then cast).

    Attributes:
      w: the frozen residual :math:`W_e` (the kernel's shape and dtype).
      u: ``(*batch, *in, r)``, frozen left singular vectors (orthonormal per slice).
      s: ``(*batch, r)``, trainable (initially the top-:math:`r` singular values, descending).
      vh: ``(*batch, r, *out)``, frozen right singular vectors (orthonormal rows per slice).
      method: the :class:`SVFit` config (static).
      layout: the kernel's :class:`~effjax.peft.layout.KernelLayout` (static).
    """

    trainable_fields = ("s",)
    frozen_fields = ("w", "u", "vh")

    w: jax.Array
    u: jax.Array
    s: jax.Array
    vh: jax.Array
    method: SVFit
    layout: KernelLayout

    @property
    def rank(self) -> int:
        return self.s.shape[-1]

    def delta(self) -> jax.Array:
        """:math:`U_r\\,\\mathrm{diag}(\\sigma)\\,V_r^\\top` in ``w``'s layout (promoted dtype)."""
        lay, r = self.layout, self.rank
        ct = jnp.promote_types(self.w.dtype, self.s.dtype)
        u = self.u.reshape(lay.batch_shape + (lay.n_in, r)).astype(ct)
        vh = self.vh.reshape(lay.batch_shape + (r, lay.n_out)).astype(ct)
        s = self.s.astype(ct)[..., None, :]
        return lay.from_matrix(jnp.matmul(u * s, vh))

    def materialize(self) -> jax.Array:
        """:math:`W_e + U_r\\,\\mathrm{diag}(\\sigma)\\,V_r^\\top`, cast to ``w.dtype``."""
        return self._dense()  # op by op, not jit_dense: see LoRAWeight.materialize
