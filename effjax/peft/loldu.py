"""LoLDU: low-rank adaptation via the Lower-Diag-Upper decomposition (Shi et al., 2024).

LoLDU factors the pretrained weight with an LU decomposition with partial pivoting, rescales it
into :math:`P L D U` (unit lower-trapezoidal :math:`L`, diagonal :math:`D`, unit upper-trapezoidal
:math:`U`), freezes the leading :math:`r` columns of :math:`P L` and rows of :math:`U`, and trains
only the :math:`r` diagonal entries. In the paper's (torch) layout :math:`W \\in
\\mathbb{R}^{d_{out} \\times d_{in}}`:

.. math::

  W = P L D U, \\qquad
  W_{res} = W - \\sigma_0\\, P L_r\\, \\mathrm{diag}(D_r)\\, U_r, \\qquad
  W' = W_{res} + \\sigma\\, P L_r\\, \\mathrm{diag}(z)\\, U_r,

with :math:`L_r = L_{:, :r}`, :math:`U_r = U_{:r, :}`, :math:`D_r = D_{:r}`, the trainable diagonal
:math:`z \\in \\mathbb{R}^r` initialized to :math:`D_r`, and the scaling factor :math:`\\sigma`
initialized to :math:`\\sigma_0 = \\alpha / r`; so :math:`W' = W` (up to float rounding) right after
injection. For a Flax kernel (``y = x W``, ``W`` of shape ``(n_in, n_out)``) effjax decomposes the
transpose :math:`W^\\top = P L D U` exactly as the paper's weight and stores

* ``u`` :math:`= U_r^\\top` ``(*batch, *in, r)`` and ``l`` :math:`= (P L_r)^\\top`
  ``(*batch, r, *out)`` (frozen; the permutation is applied to :math:`L` once at init, so no
  :math:`d_{out} \\times d_{out}` permutation matrix is stored or multiplied),
* ``z`` ``(*batch, r)`` (trainable) and ``sigma`` ``(*batch,)`` (frozen by default, trainable with
  ``train_scale=True``),
* ``w`` :math:`= W_{res}` (frozen, the kernel's shape and dtype),

and ``materialize()`` :math:`= W_{res} + \\sigma\\, U_r^\\top \\mathrm{diag}(z) (P L_r)^\\top`.

Trainable parameters per kernel: :math:`r` (``train_scale=False``, the default) or :math:`r + 1`,
times the number of slices for stacked kernels (``batch_axes``); :math:`r \\le \\min(n_{in},
n_{out})`.

What follows the official code (``SKDDJ/LoLDU``, ``minloldu/loldu.py``) and what is a choice:

* Decomposition: ``torch.linalg.lu`` of the ``(out, in)`` weight (LAPACK ``getrf``: partial
  pivoting by rows, the row with the largest :math:`|\\cdot|` in the current column becomes the
  pivot, so :math:`|L_{ij}| \\le 1`), :math:`D = \\mathrm{diag}(U_{LU})`, :math:`U = U_{LU} / D`
  row-wise. effjax uses ``jax.lax.linalg.lu`` (the batched form of ``jax.scipy.linalg.lu``, the same
  partial pivoting; it returns the row permutation as indices) in float32 per batch slice. Ties
  between equal-magnitude pivot candidates may be broken differently by XLA and LAPACK; the
  decomposition is then a different but equally valid one. A zero pivot (a rank-deficient
  leading block) would make the official code divide by zero; effjax then keeps that row of
  :math:`U_{LU}` unnormalized and sets its :math:`D` entry to 0 (the residual absorbs it, so
  :math:`W' = W` at init still holds).
* Scaling: the official layer uses ``scaling_factor`` :math:`= \\alpha / r` with ``lora_alpha=1``
  in ``from_linear`` (effjax's default ``alpha=1.0``), and subtracts
  :math:`\\sigma_0 P L_r D_r U_r` from the weight. With ``alpha=rank`` (:math:`\\sigma_0 = 1`)
  the residual is exactly the minor part :math:`P L_{:, r:} D_{r:} U_{r:, :}` (the paper's figure:
  "residual subspace matrix :math:`L_{[r:]} D_{[r:]} U_{[r:]}`").
* Trainable parts: the official training helper (``get_loldu_params``) optimizes only the
  diagonal ``vector_z`` and the paper's figure marks only the diagonal as trainable; the scaling
  factor is an ``nn.Parameter`` that the helper leaves out (a commented-out variant includes it).
  effjax freezes :math:`\\sigma` by default and trains it with ``train_scale=True``.
* The official code's other ``init_method`` options for :math:`z` (uniform / normal around the
  mean of :math:`D_r`, constants) are not implemented; ``"lu"`` (:math:`z = D_r`), the default,
  is.

References:
  Shi, Wei, Wu, Ran, Sun, He, Yang, "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper
  Decomposition for Parameter-Efficient Fine-Tuning", arXiv:2410.13618, 2024.
  Official code: https://github.com/SKDDJ/LoLDU (``minloldu/loldu.py``, ``loldu_utils.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from effjax.peft._checks import check_bool, check_number, check_rank
from effjax.peft.base import AdapterNode, KernelAdapter, adapter_node, register_adapter
from effjax.peft.layout import KernelLayout, place_like

__all__ = ["LoLDU", "LoLDUWeight", "LoLDUScaleWeight", "ldu_decompose"]


def ldu_decompose(a: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The LDU decomposition with partial pivoting of ``a`` ``(*batch, M, N)``.

    Returns ``(perm, l, d, u)``: ``perm`` ``(*batch, M)`` int32 row indices, ``l`` ``(*batch, M,
    K)`` unit lower-trapezoidal, ``d`` ``(*batch, K)`` and ``u`` ``(*batch, K, N)``
    unit upper-trapezoidal (``K = min(M, N)``) with

    .. math:: a_{\\mathrm{perm}[i], :} = (L\\, \\mathrm{diag}(d)\\, U)_{i, :},
      \\qquad\\text{i.e.}\\quad a = P L D U,\\; P_{\\mathrm{perm}[i], i} = 1.

    ``jax.lax.linalg.lu`` (partial pivoting, as LAPACK ``getrf`` / ``torch.linalg.lu``) followed
    by :math:`d = \\mathrm{diag}(U_{LU})`, :math:`U = U_{LU} / d` row-wise; a zero pivot leaves
    its row of :math:`U_{LU}` as is and gives :math:`d_i = 0`.

    Example:
      >>> import jax.numpy as jnp
      >>> a = jnp.array([[1.0, 2.0], [4.0, 2.0], [2.0, 3.0]])
      >>> perm, l, d, u = ldu_decompose(a)
      >>> perm, d  # row 1 (|4| largest in column 0) is the first pivot
      (Array([1, 2, 0], dtype=int32), Array([4., 2.], dtype=float32))
      >>> bool(jnp.allclose(((l * d) @ u), a[perm]))
      True
    """
    m, n = a.shape[-2:]
    k = min(m, n)
    lu, _, perm = jax.lax.linalg.lu(a)
    low = jnp.tril(lu[..., :, :k], -1) + jnp.eye(m, k, dtype=lu.dtype)
    upper = jnp.triu(lu[..., :k, :])
    d = jnp.diagonal(upper, axis1=-2, axis2=-1)
    safe = jnp.where(d == 0, jnp.ones_like(d), d)
    u = upper / safe[..., :, None]
    return perm.astype(jnp.int32), low, jnp.where(d == 0, jnp.zeros_like(d), d), u


@register_adapter("loldu")
@dataclasses.dataclass(frozen=True, kw_only=True)
class LoLDU(KernelAdapter):
    """LoLDU method config (a rule value of :func:`effjax.peft.inject`).

    :math:`W' = W_{res} + \\sigma\\, P L_r\\, \\mathrm{diag}(z)\\, U_r` (torch layout) with
    :math:`P, L_r, U_r, W_{res}` frozen from the LDU decomposition of the kernel, :math:`z`
    trainable (initially :math:`D_r`) and :math:`\\sigma = \\alpha / r` (trainable with
    ``train_scale=True``); trainable parameters :math:`n_{batch}\\,(r + [\\text{train\\_scale}])`.
    See the module docstring.

    Attributes:
      rank: :math:`r \\ge 1`, at most :math:`\\min(n_{in}, n_{out})` of each targeted kernel.
      alpha: :math:`\\alpha`; :math:`\\sigma_0 = \\alpha / r` (official ``lora_alpha``, 1 in
        ``from_linear``). Must be nonzero.
      train_scale: also train :math:`\\sigma` (one scalar per kernel slice). Default False, as
        the official training helper.
      dtype, in_axes, out_axes, batch_axes: as every :class:`~effjax.peft.KernelAdapter`
        (``dtype``: of ``u``, ``l``, ``z``, ``sigma``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> w = jax.random.normal(jax.random.key(1), (6, 4))  # Flax (in, out)
      >>> node = LoLDU(rank=2).adapt(jax.random.key(0), w)
      >>> node.u.shape, node.l.shape, node.z.shape, float(node.sigma)
      ((6, 2), (2, 4), (2,), 0.5)
      >>> bool(jnp.allclose(node.materialize(), w, atol=1e-5))  # W_res + s P L_r D_r U_r = W
      True
      >>> LoLDU(rank=2).num_trainable((6, 4)), LoLDU(rank=2, train_scale=True).num_trainable(
      ...     (6, 4))  # r, r + 1
      (2, 3)
    """

    rank: int = 8
    alpha: float = 1.0
    train_scale: bool = False

    def __post_init__(self):
        super().__post_init__()
        name = self.name
        self._set(rank=check_rank(self.rank, name), alpha=check_number(self.alpha, "alpha", name))
        if self.alpha == 0:
            raise ValueError("LoLDU alpha must be nonzero (the scale alpha / rank multiplies the "
                             "trainable diagonal)")
        check_bool(self.train_scale, "train_scale", name)

    @property
    def scale(self) -> float:
        """:math:`\\sigma_0 = \\alpha / r`."""
        return self.alpha / self.rank

    def num_trainable(self, shape: Sequence[int]) -> int:
        """:math:`n_{batch}\\,(r + 1)` with ``train_scale``, else :math:`n_{batch}\\, r`."""
        return self.layout(shape).n_batch * (self.rank + int(self.train_scale))

    def adapt(self, key: jax.Array, w: jax.Array) -> LoLDUWeight:
        """The LDU decomposition of each slice's ``(out, in)`` matrix, its top-:math:`r` factors
        and the residual (``key`` is unused: the init is deterministic); placed on ``w``'s
        devices and sharded like ``w``'s batch / in / out axes."""
        del key
        lay = self.layout(w.shape)
        r, dtype = self.rank, self.adapter_dtype(w.dtype)
        if r > min(lay.n_in, lay.n_out):
            raise ValueError(f"LoLDU rank must be <= min(n_in, n_out) = {min(lay.n_in, lay.n_out)}"
                             f" for a kernel of shape {lay.shape}, got rank={r}")
        ct = jnp.promote_types(w.dtype, jnp.float32)
        m = lay.to_matrix(w).astype(ct)  # (*batch, n_in, n_out)
        perm, low, d, up = ldu_decompose(jnp.swapaxes(m, -1, -2))  # W^T = P L D U (out, in)
        inv = jnp.argsort(perm, axis=-1)
        pl = jnp.take_along_axis(low[..., :, :r], inv[..., :, None], axis=-2)  # P L_r (out, r)
        u = jnp.swapaxes(up[..., :r, :], -1, -2).astype(dtype)  # U_r^T (*b, in, r)
        lt = jnp.swapaxes(pl, -1, -2).astype(dtype)  # (P L_r)^T (*b, r, out)
        z = d[..., :r].astype(dtype)
        sigma = jnp.full(lay.batch_shape, self.scale, dtype)
        # the residual from the stored (possibly rounded) factors, so W_res + s U z L = W
        delta = jnp.matmul(u.astype(ct) * z.astype(ct)[..., None, :], lt.astype(ct))
        w_res = m - sigma.astype(ct)[..., None, None] * delta
        u = place_like(u.reshape(lay.batch_shape + lay.in_shape + (r,)), w,
                       lay.batch_axes + lay.in_axes + (None,))
        lt = place_like(lt.reshape(lay.batch_shape + (r,) + lay.out_shape), w,
                       lay.batch_axes + (None,) + lay.out_axes)
        z = place_like(z, w, lay.batch_axes + (None,))
        sigma = place_like(sigma, w, lay.batch_axes)
        w_res = place_like(lay.from_matrix(w_res).astype(w.dtype), w, tuple(range(w.ndim)))
        cls = LoLDUScaleWeight if self.train_scale else LoLDUWeight
        return cls(w=w_res, u=u, l=lt, z=z, sigma=sigma, method=self, layout=lay)


@adapter_node
class LoLDUWeight(AdapterNode):
    """A kernel with a LoLDU adapter: frozen residual ``w``, factors ``u``, ``l`` and scale
    ``sigma``; trainable diagonal ``z``.

    ``materialize()`` :math:`= W_{res} + \\sigma\\, U_r^\\top\\, \\mathrm{diag}(z)\\,
    (P L_r)^\\top` (Flax layout) in the kernel's shape and dtype (computed in the promoted dtype
    of ``w`` and ``z``, then cast).

    Attributes:
      w: the frozen residual :math:`W_{res}`.
      u: ``(*batch, *in, r)``: :math:`U_r^\\top` (unit upper-trapezoidal :math:`U_r`), frozen.
      l: ``(*batch, r, *out)``: :math:`(P L_r)^\\top` (row-permuted unit lower-trapezoidal
        :math:`L_r`), frozen.
      z: ``(*batch, r)``, trainable (initially the pivots :math:`D_r`).
      sigma: ``(*batch,)``: :math:`\\sigma`, frozen here (trainable in
        :class:`LoLDUScaleWeight`, the node of ``train_scale=True``).
      method: the :class:`LoLDU` config (static).
      layout: the kernel's :class:`~effjax.peft.layout.KernelLayout` (static).
    """

    trainable_fields = ("z",)
    frozen_fields = ("w", "u", "l", "sigma")

    w: jax.Array
    u: jax.Array
    l: jax.Array  # noqa: E741
    z: jax.Array
    sigma: jax.Array
    method: LoLDU
    layout: KernelLayout

    @property
    def rank(self) -> int:
        return self.z.shape[-1]

    def delta(self) -> jax.Array:
        """:math:`\\sigma\\, U_r^\\top\\, \\mathrm{diag}(z)\\, (P L_r)^\\top` in ``w``'s layout."""
        lay, r = self.layout, self.rank
        ct = jnp.promote_types(self.w.dtype, self.z.dtype)
        u = self.u.reshape(lay.batch_shape + (lay.n_in, r)).astype(ct)
        lt = self.l.reshape(lay.batch_shape + (r, lay.n_out)).astype(ct)
        s = self.sigma.astype(ct)[..., None, None]
        return lay.from_matrix(s * jnp.matmul(u * self.z.astype(ct)[..., None, :], lt))

    def materialize(self) -> jax.Array:
        """:math:`W_{res} + \\sigma\\, U_r^\\top \\mathrm{diag}(z) (P L_r)^\\top`, cast to
        ``w.dtype``."""
        return self._dense()  # op by op, not jit_dense: see LoRAWeight.materialize


@adapter_node
class LoLDUScaleWeight(LoLDUWeight):
    """:class:`LoLDUWeight` with a trainable scale: trainable ``z`` and ``sigma`` (the node of
    ``LoLDU(train_scale=True)``)."""

    trainable_fields = ("z", "sigma")
    frozen_fields = ("w", "u", "l")
