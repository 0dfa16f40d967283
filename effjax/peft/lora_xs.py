"""LoRA-XS: low-rank adaptation with an extremely small number of parameters (Bałazy et al.,
2024).

LoRA-XS freezes both LoRA factors, taken from the truncated SVD of the pretrained kernel, and
trains only a small :math:`r \\times r` matrix :math:`R` between them. For a Flax kernel
:math:`W \\in \\mathbb{R}^{n_{in} \\times n_{out}}` (``y = x W``) with the SVD
:math:`W = U \\Sigma V^\\top` and its top-:math:`r` part:

.. math::

  W' = W + s\\, A R B, \\qquad
  A = U_r \\Sigma_r \\in \\mathbb{R}^{n_{in} \\times r}\\ \\text{(frozen)},
  \\quad B = V_r^\\top \\in \\mathbb{R}^{r \\times n_{out}}\\ \\text{(frozen)},
  \\quad R \\in \\mathbb{R}^{r \\times r}\\ \\text{(trainable)},

with :math:`s = \\alpha / r` (``alpha=None``: :math:`s = 1`, i.e. :math:`\\alpha = r`, the
official math-reasoning setting). Trainable parameters per kernel: :math:`r^2`, times the number
of slices for stacked kernels (``batch_axes``), independent of the kernel's size.

Where the singular values go follows the official code (``utils/initialization_utils.py`` and
``utils/svd_utils.py`` of github.com/MohammadrezaBanaei/LoRA-XS): it runs sklearn's
``TruncatedSVD`` on ``target.weight.T`` (the ``(in, out)`` matrix, i.e. Flax's layout) and
puts ``transform(W^T)`` :math:`= U_r \\Sigma_r` into ``lora_A`` (the input-side factor) and
``components_`` :math:`= V_r^\\top` into ``lora_B``; so the singular values sit in the
input-side factor :math:`A`, and :math:`B` has orthonormal rows. (The official code uses
sklearn's randomized SVD with 10 power iterations; effjax computes the exact truncated SVD, in
float32 or the kernel's wider dtype, per batch slice.)

Initialization of :math:`R` (official ``init_module_weights(latent, sigma=1e-5)``):
``init="gaussian"`` (default) draws :math:`R_{ij} \\sim \\mathcal N(0, \\sigma^2)` with
:math:`\\sigma` = ``init_std`` = 1e-5, so :math:`W'` differs from :math:`W` by a tiny amount at
init; ``init="zeros"`` sets :math:`R = 0` (then :math:`W' = W` exactly; the gradient of
:math:`R`, :math:`s A^\\top G B^\\top`, is not zero because :math:`A`, :math:`B` are fixed and
nonzero, so training starts normally).

The official code stores PyTorch's ``lora_A.weight`` :math:`= A^\\top` ``(r, in)``,
``lora_B.weight`` :math:`= B^\\top` ``(out, r)`` and the latent ``nn.Linear(r, r)`` weight
:math:`= R^\\top`; effjax's ``a``, ``r``, ``b`` are their transposes in Flax's ``x @ W``
layout. Multi-axis kernels go through a :class:`~effjax.peft.layout.KernelLayout`: ``a`` has
shape ``(*batch, *in, r)``, ``r`` ``(*batch, r, r)`` and ``b`` ``(*batch, r, *out)``.

References:
  Bałazy, Banaei, Aberer, Tabor, "LoRA-XS: Low-Rank Adaptation with Extremely Small Number of
  Parameters", arXiv:2405.17604, 2024. Official code: github.com/MohammadrezaBanaei/LoRA-XS.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from effjax.peft._checks import check_alpha, check_number, check_rank
from effjax.peft.base import AdapterNode, KernelAdapter, adapter_node, register_adapter
from effjax.peft.layout import KernelLayout, place_like

__all__ = ["LoRAXS", "LoRAXSWeight"]

_INITS = ("gaussian", "zeros")


def truncated_svd(m: jax.Array, rank: int, lay: KernelLayout, name: str):
    """Top-``rank`` SVD of each slice of ``m`` ``(*batch, n_in, n_out)``: ``u (*b, n_in, r)``,
    ``sv (*b, r)``, ``vh (*b, r, n_out)`` (``jnp.linalg.svd`` batches over the slices)."""
    if rank > min(lay.n_in, lay.n_out):
        raise ValueError(f"{name} needs rank <= min(n_in, n_out) = {min(lay.n_in, lay.n_out)} "
                         f"for a kernel of shape {lay.shape} (n_in={lay.n_in}, "
                         f"n_out={lay.n_out}), got rank={rank}")
    u, sv, vh = jnp.linalg.svd(m, full_matrices=False)
    return u[..., :rank], sv[..., :rank], vh[..., :rank, :]


def place_factors(w: jax.Array, lay: KernelLayout, a, core, b):
    """``a (*batch, *in, r)``, ``core (*batch, r, r)``, ``b (*batch, r, *out)`` on ``w``'s
    devices, sharded like ``w``'s batch / in / out axes (the r axes replicated)."""
    a = place_like(a, w, lay.batch_axes + lay.in_axes + (None,))
    core = place_like(core, w, lay.batch_axes + (None, None))
    b = place_like(b, w, lay.batch_axes + (None,) + lay.out_axes)
    return a, core, b


def three_factor_delta(lay: KernelLayout, a, core, b, scale: float, ct) -> jax.Array:
    """``scale * A @ core @ B`` per batch slice, in ``w``'s layout (dtype ``ct``)."""
    r = core.shape[-1]
    a = a.reshape(lay.batch_shape + (lay.n_in, r)).astype(ct)
    b = b.reshape(lay.batch_shape + (r, lay.n_out)).astype(ct)
    return scale * lay.from_matrix(jnp.matmul(jnp.matmul(a, core.astype(ct)), b))


@register_adapter("lora_xs")
@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAXS(KernelAdapter):
    """LoRA-XS method config (a rule value of :func:`effjax.peft.inject`).

    :math:`W' = W + s\\,A R B`, :math:`A = U_r\\Sigma_r`, :math:`B = V_r^\\top` frozen from the
    truncated SVD of :math:`W`, :math:`R` (:math:`r \\times r`) trainable; trainable parameters
    :math:`n_{batch}\\, r^2`. See the module docstring for the equations and references.

    Attributes:
      rank: :math:`r \\ge 1`, at most :math:`\\min(n_{in}, n_{out})` (default 8).
      alpha: None (:math:`s = 1`) or :math:`\\alpha` with :math:`s = \\alpha / r` (PEFT's
        ``lora_alpha``; the official GLUE runs use 16, the math runs :math:`\\alpha = r`).
      init: ``"gaussian"`` (official: :math:`R \\sim \\mathcal N(0, \\sigma^2)`) or ``"zeros"``
        (:math:`R = 0`, so :math:`W' = W` exactly at init).
      init_std: :math:`\\sigma` of the gaussian init (official 1e-5).
      dtype, in_axes, out_axes, batch_axes: as every :class:`~effjax.peft.KernelAdapter`
        (``dtype``: of ``a``, ``r``, ``b``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> w = jax.random.normal(jax.random.key(1), (6, 5))
      >>> node = LoRAXS(rank=2, init="zeros").adapt(jax.random.key(0), w)
      >>> node.a.shape, node.r.shape, node.b.shape
      ((6, 2), (2, 2), (2, 5))
      >>> bool(jnp.all(node.materialize() == w))  # R = 0: W' = W
      True
      >>> LoRAXS(rank=2).num_trainable((6, 5))  # r^2
      4
      >>> bool(jnp.allclose(node.b @ node.b.T, jnp.eye(2), atol=1e-5))  # B = V_r^T
      True
      >>> s = jnp.linalg.svd(w, compute_uv=False)
      >>> bool(jnp.allclose(jnp.linalg.norm(node.a, axis=0), s[:2], atol=1e-5))  # A = U_r S_r
      True
    """

    rank: int = 8
    alpha: float | None = None
    init: str = "gaussian"
    init_std: float = 1e-5

    def __post_init__(self):
        super().__post_init__()
        name = self.name
        self._set(rank=check_rank(self.rank, name), alpha=check_alpha(self.alpha, name),
                  init_std=check_number(self.init_std, "init_std", name, nonnegative=True))
        if self.init not in _INITS:
            raise ValueError(f"LoRAXS init must be one of {_INITS}, got {self.init!r}")

    @property
    def scale(self) -> float:
        """:math:`s = \\alpha / r` (1 when ``alpha`` is None)."""
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def num_trainable(self, shape: Sequence[int]) -> int:
        """:math:`n_{batch}\\, r^2`."""
        return self.layout(shape).n_batch * self.rank**2

    def adapt(self, key: jax.Array, w: jax.Array) -> LoRAXSWeight:
        """``a = U_r S_r``, ``b = V_r^T`` from the truncated SVD of each slice of ``w`` (in
        float32 or wider), ``r`` from the init; ``w`` kept as is."""
        lay = self.layout(w.shape)
        rk, dtype = self.rank, self.adapter_dtype(w.dtype)
        ct = jnp.promote_types(w.dtype, jnp.float32)
        u, sv, vh = truncated_svd(lay.to_matrix(w).astype(ct), rk, lay, "LoRAXS")
        a = (u * sv[..., None, :]).reshape(lay.batch_shape + lay.in_shape + (rk,))
        b = vh.reshape(lay.batch_shape + (rk,) + lay.out_shape)
        core_shape = lay.batch_shape + (rk, rk)
        if self.init == "zeros":
            core = jnp.zeros(core_shape, dtype)
        else:
            gen = jnp.promote_types(dtype, jnp.float32)
            core = (jax.random.normal(key, core_shape, gen) * self.init_std).astype(dtype)
        a, core, b = place_factors(w, lay, a.astype(dtype), core, b.astype(dtype))
        return LoRAXSWeight(w=w, a=a, r=core, b=b, method=self, layout=lay)


@adapter_node
class LoRAXSWeight(AdapterNode):
    """A kernel with a LoRA-XS adapter: frozen ``w``, ``a``, ``b``, trainable ``r``.

    ``materialize()`` :math:`= W + s\\,A R B` in ``w``'s shape and dtype (computed in the
    promoted dtype of ``w`` and ``r``, then cast to ``w.dtype``).

    Attributes:
      w: the frozen kernel.
      a: ``(*batch, *in, r)``, frozen (:math:`U_r \\Sigma_r`).
      r: ``(*batch, r, r)``, trainable.
      b: ``(*batch, r, *out)``, frozen (:math:`V_r^\\top`).
      method: the :class:`LoRAXS` config (static).
      layout: the kernel's :class:`~effjax.peft.layout.KernelLayout` (static).
    """

    trainable_fields = ("r",)
    frozen_fields = ("w", "a", "b")

    w: jax.Array
    a: jax.Array
    r: jax.Array
    b: jax.Array
    method: Any
    layout: KernelLayout

    @property
    def scale(self) -> float:
        """:math:`s`, from the config."""
        return self.method.scale

    @property
    def rank(self) -> int:
        return self.r.shape[-1]

    def delta(self) -> jax.Array:
        """:math:`s\\,A R B` in ``w``'s layout (promoted dtype)."""
        ct = jnp.promote_types(self.w.dtype, self.r.dtype)
        return three_factor_delta(self.layout, self.a, self.r, self.b, self.scale, ct)

    def materialize(self) -> jax.Array:
        """:math:`W + s\\,A R B`, cast to ``w.dtype``."""
        return self._dense()  # op by op, not jit_dense: see LoRAWeight.materialize
