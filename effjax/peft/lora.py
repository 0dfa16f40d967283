"""LoRA: low-rank adaptation of a frozen kernel (Hu et al., 2021), with rsLoRA scaling.

For a Flax kernel :math:`W \\in \\mathbb{R}^{n_{in} \\times n_{out}}` (``y = x W``) LoRA trains
:math:`A \\in \\mathbb{R}^{n_{in} \\times r}` and :math:`B \\in \\mathbb{R}^{r \\times n_{out}}`
and keeps :math:`W` frozen:

.. math::

  W' = W + s\\, A B, \\qquad s = \\frac{\\alpha}{r} \\;\\text{(LoRA)} \\quad\\text{or}\\quad
  s = \\frac{\\alpha}{\\sqrt r} \\;\\text{(rsLoRA, Kalajdzievski 2023)} .

Trainable parameters per kernel: :math:`r\\,(n_{in} + n_{out})`, times the number of slices for
stacked kernels (``batch_axes``).

Initialization follows Hugging Face PEFT (``LoraLayer.reset_lora_parameters``): :math:`B = 0`, so
:math:`W' = W` right after injection, and

* ``init="kaiming"`` (PEFT's default ``init_lora_weights=True``): torch's
  ``kaiming_uniform_(a=sqrt(5))`` on PEFT's ``lora_A.weight`` of shape ``(r, in)``, i.e.
  :math:`A_{ij} \\sim U(-1/\\sqrt{n_{in}}, 1/\\sqrt{n_{in}})`;
* ``init="gaussian"``: :math:`A_{ij} \\sim \\mathcal N(0, 1/r^2)` (std :math:`1/r`).

Data-driven inits (also from PEFT's ``LoraLayer``) start from the weight itself; :math:`B \\neq 0`
and the frozen ``w`` becomes a residual :math:`W_{res} = W - s\\,AB`, so that
:math:`W_{res} + s\\,AB = W` (up to float rounding) right after injection:

* ``init="pissa"`` (Meng et al., 2024; PEFT's ``pissa_init``): with the SVD
  :math:`W = U \\Sigma V^\\top` and its top-:math:`r` part,
  :math:`A = U_r \\sqrt{\\Sigma_r / s}`, :math:`B = \\sqrt{\\Sigma_r / s}\\, V_r^\\top`, so
  :math:`s\\,AB = U_r \\Sigma_r V_r^\\top` is the principal part and :math:`W_{res}` the minor part
  (needs :math:`s > 0`).
* ``init="pissa_niter_K"`` (e.g. ``"pissa_niter_4"``): the same with the randomized SVD of
  Halko et al. (2011, Alg. 5.1; torch's ``svd_lowrank(W, q=r, niter=K)``, as PEFT) with ``K``
  subspace iterations; the random test matrix comes from the leaf's key, so
  :func:`~effjax.peft.load_adapters` needs the injection ``key`` to rebuild :math:`W_{res}`.
* ``init="olora"`` (Büyükakyüz, 2024; PEFT's ``olora_init``): PEFT takes the QR decomposition of
  torch's ``(out, in)`` weight :math:`W^\\top = QR` and sets ``lora_B`` :math:`= Q_{:, :r}`,
  ``lora_A`` :math:`= R_{:r, :}` (no division by :math:`s`); in Flax's layout
  :math:`A = (R_{:r,:})^\\top` ``(in, r)`` and :math:`B = (Q_{:,:r})^\\top` ``(r, out)``, so the
  rows of :math:`B` are orthonormal and :math:`W_{res} = W - s\\,AB`.

These inits need :math:`r \\le \\min(n_{in}, n_{out})` and are computed in float32 (or the
kernel's wider dtype) per batch slice; ``w`` is then cast back to the kernel's dtype (for
bfloat16 kernels the reconstruction is exact up to that rounding).

PEFT stores ``lora_A.weight`` :math:`= A^\\top` ``(r, in)`` and ``lora_B.weight``
:math:`= B^\\top` ``(out, r)`` and computes ``x @ W.T + s * (x @ A.T) @ B.T``; effjax's ``a``,
``b`` are their transposes in Flax's ``x @ W`` layout.

Kernels with more than two axes are handled through a :class:`~effjax.peft.layout.KernelLayout`
(``in_axes``, ``out_axes``, ``batch_axes``): ``a`` has shape ``(*batch, *in, r)`` and ``b``
``(*batch, r, *out)``, and :math:`A B` is contracted over ``r`` per batch slice.

References:
  Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, arXiv:2106.09685.
  Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA",
  arXiv:2312.03732, 2023.
  Meng, Wang, Zhang, "PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large
  Language Models", NeurIPS 2024, arXiv:2404.02948.
  Büyükakyüz, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models",
  arXiv:2406.01775, 2024.
  Halko, Martinsson, Tropp, "Finding structure with randomness", SIAM Review 53(2), 2011.
  Hugging Face PEFT, ``src/peft/tuners/lora/layer.py``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from effjax.peft._checks import (
    SizeLimit,
    check_bool,
    check_number,
    check_rank,
    factor_rank_limit,
)
from effjax.peft.base import AdapterNode, KernelAdapter, adapter_node, register_adapter
from effjax.peft.layout import KernelLayout, place_like

__all__ = ["LoRA", "LoRAWeight", "ScaledRank"]

_INITS = ("kaiming", "gaussian", "pissa", "olora")
_NITER = re.compile(r"pissa_niter_(\d+)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScaledRank(KernelAdapter):
    """Base of the configs whose node is a :class:`LoRAWeight` (LoRA, DoRA's low-rank part,
    EVA, CorDA): the rank :math:`r`, :math:`\\alpha` and rsLoRA fields, validated once, and
    the scale :math:`s = \\alpha / r` (:math:`\\alpha / \\sqrt r` with ``rslora``).

    Attributes:
      rank: :math:`r \\ge 1` (PEFT's ``r``; default 8).
      alpha: :math:`\\alpha`, finite (PEFT's ``lora_alpha``; default 8).
      rslora: use :math:`\\alpha/\\sqrt r` (PEFT's ``use_rslora``).
    """

    rank: int = 8
    alpha: float = 8.0
    rslora: bool = False

    def __post_init__(self):
        super().__post_init__()
        name = self.name
        self._set(rank=check_rank(self.rank, name), alpha=check_number(self.alpha, "alpha", name))
        check_bool(self.rslora, "rslora", name)

    @property
    def scale(self) -> float:
        """:math:`s = \\alpha / r`, or :math:`\\alpha / \\sqrt r` with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def num_trainable(self, shape: Sequence[int]) -> int:
        """:math:`n_{batch}\\, r\\,(n_{in} + n_{out})`."""
        lay = self.layout(shape)
        return lay.n_batch * self.rank * (lay.n_in + lay.n_out)


@register_adapter("lora")
@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRA(ScaledRank):
    """LoRA method config (a rule value of :func:`effjax.peft.inject`).

    :math:`W' = W + s\\,AB`, :math:`s = \\alpha/r` (or :math:`\\alpha/\\sqrt r` with
    ``rslora=True``); trainable parameters :math:`n_{batch}\\, r\\,(n_{in} + n_{out})`.
    See the module docstring for the equations, inits and references.

    Attributes:
      rank, alpha, rslora: :math:`r`, :math:`\\alpha` and rsLoRA (see :class:`ScaledRank`).
        The rank is at most :math:`\\max(n_{in}, n_{out})` of each targeted kernel with the
        random inits (PEFT accepts any :math:`r`; beyond that bound the factors only add
        redundant parameters) and at most :math:`\\min(n_{in}, n_{out})` with PiSSA / OLoRA;
        a larger one raises ``ValueError`` before anything is allocated.
      init: ``"kaiming"`` (PEFT's default) or ``"gaussian"`` (:math:`B = 0`, ``w`` kept as
        is), or ``"pissa"``, ``"pissa_niter_K"``, ``"olora"`` (``a``, ``b`` from the SVD / QR
        of the kernel and ``w`` replaced by the residual :math:`W - s\\,AB`; see the module
        docstring).
      dtype, in_axes, out_axes, batch_axes: as every :class:`~effjax.peft.KernelAdapter`
        (``dtype``: of ``a`` and ``b``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> node = LoRA(rank=2, alpha=4.0).adapt(jax.random.key(0), jnp.ones((3, 5)))
      >>> node.a.shape, node.b.shape, node.scale
      ((3, 2), (2, 5), 2.0)
      >>> bool(jnp.all(node.materialize() == 1.0))  # b = 0: W' = W
      True
      >>> LoRA(rank=2).num_trainable((3, 5))  # r (in + out)
      16
      >>> LoRA(rank=4, alpha=8.0, rslora=True).scale
      4.0
      >>> w = jax.random.normal(jax.random.key(1), (6, 4))
      >>> node = LoRA(rank=2, init="pissa").adapt(jax.random.key(0), w)
      >>> bool(jnp.allclose(node.materialize(), w, atol=1e-5))  # W_res + s A B = W
      True
      >>> s = jnp.linalg.svd(w, compute_uv=False)
      >>> bool(jnp.allclose(jnp.linalg.svd(node.w, compute_uv=False)[:2], s[2:], atol=1e-5))
      True
    """

    init: str = "kaiming"

    def __post_init__(self):
        super().__post_init__()
        name = self.name
        if not isinstance(self.init, str) or not (self.init in _INITS
                                                  or _NITER.fullmatch(self.init)):
            raise ValueError(f"{name} init must be one of {_INITS} or 'pissa_niter_K' (K >= 0 "
                             f"an int), got {self.init!r}")
        if self.init.startswith("pissa") and not self.alpha > 0:
            raise ValueError(f"{name} init={self.init!r} divides the singular values by the "
                             f"scale alpha / r, so alpha must be > 0, got {self.alpha}")

    def size_limits(self, lay: KernelLayout) -> tuple[SizeLimit, ...]:
        """``rank <= max(n_in, n_out)`` for the random inits (PiSSA / OLoRA check ``rank <=
        min(n_in, n_out)`` themselves)."""
        return (factor_rank_limit(lay),) if self.init in ("kaiming", "gaussian") else ()

    def adapt(self, key: jax.Array, w: jax.Array) -> LoRAWeight:
        """``a`` from the init distribution, ``b = 0`` (or ``a``, ``b`` and the residual ``w``
        from the PiSSA / OLoRA decomposition), on ``w``'s devices and sharded like ``w``'s
        in/out axes (``a``: ``(*batch, *in, r)``, ``b``: ``(*batch, r, *out)``)."""
        lay = self.layout(w.shape)
        r, dtype = self.rank, self.adapter_dtype(w.dtype)
        if self.init not in ("kaiming", "gaussian"):
            w_res, a, b = self._decompose(key, w, lay, dtype)
            a = place_like(a, w, lay.batch_axes + lay.in_axes + (None,))
            b = place_like(b, w, lay.batch_axes + (None,) + lay.out_axes)
            return LoRAWeight(w=place_like(w_res, w, tuple(range(w.ndim))), a=a, b=b,
                              method=self, layout=lay)
        gen = jnp.promote_types(dtype, jnp.float32)
        a_shape = lay.batch_shape + lay.in_shape + (r,)
        if self.init == "gaussian":
            a = jax.random.normal(key, a_shape, gen) * (1.0 / r)
        else:  # torch kaiming_uniform_(a=sqrt(5)) with fan_in = n_in: bound 1/sqrt(n_in)
            bound = 1.0 / math.sqrt(lay.n_in)
            a = jax.random.uniform(key, a_shape, gen, -bound, bound)
        a = a.astype(dtype)
        b = jnp.zeros(lay.batch_shape + (r,) + lay.out_shape, dtype)
        a = place_like(a, w, lay.batch_axes + lay.in_axes + (None,))
        b = place_like(b, w, lay.batch_axes + (None,) + lay.out_axes)
        return LoRAWeight(w=w, a=a, b=b, method=self, layout=lay)

    def _decompose(self, key: jax.Array, w: jax.Array, lay: KernelLayout, dtype: Any):
        """PiSSA / OLoRA: ``(w_res, a, b)`` with ``w_res = w - s a b`` (see the module docs)."""
        r, s = self.rank, self.scale
        if r > min(lay.n_in, lay.n_out):
            raise ValueError(f"{self.name} init={self.init!r} needs rank <= min(n_in, n_out) = "
                             f"{min(lay.n_in, lay.n_out)} for a kernel of shape {lay.shape}, "
                             f"got rank={r}")
        ct = jnp.promote_types(w.dtype, jnp.float32)
        m = lay.to_matrix(w).astype(ct)  # (*batch, n_in, n_out)
        if self.init == "olora":  # PEFT: QR of torch's (out, in) weight, B = Q_r, A = R_r
            q, rr = jnp.linalg.qr(jnp.swapaxes(m, -1, -2))  # (*b, out, k), (*b, k, in)
            a = jnp.swapaxes(rr[..., :r, :], -1, -2)  # (*b, in, r)
            b = jnp.swapaxes(q[..., :, :r], -1, -2)  # (*b, r, out)
        else:
            niter = _NITER.fullmatch(self.init)
            if niter is None:
                u, sv, vh = jnp.linalg.svd(m, full_matrices=False)
                u, sv, vh = u[..., :r], sv[..., :r], vh[..., :r, :]
            else:
                u, sv, vh = _svd_lowrank(key, m, r, int(niter.group(1)))
            root = jnp.sqrt(sv / s)
            a = u * root[..., None, :]
            b = root[..., :, None] * vh
        a, b = a.astype(dtype), b.astype(dtype)
        # the residual from the (possibly rounded) stored factors, so W_res + s A B = W
        w_res = m - s * jnp.matmul(a.astype(ct), b.astype(ct))
        a = a.reshape(lay.batch_shape + lay.in_shape + (r,))
        b = b.reshape(lay.batch_shape + (r,) + lay.out_shape)
        return lay.from_matrix(w_res).astype(w.dtype), a, b


def _svd_lowrank(key: jax.Array, m: jax.Array, q: int, niter: int):
    """Randomized rank-``q`` SVD of ``m`` ``(*batch, p, n)``: torch's ``svd_lowrank(m, q,
    niter)`` (Halko et al. 2011, Alg. 5.1, with ``niter`` subspace iterations, no
    oversampling). Returns ``u (*batch, p, q)``, ``s (*batch, q)``, ``vh (*batch, q, n)``."""
    tall = m.shape[-2] >= m.shape[-1]
    x = m if tall else jnp.swapaxes(m, -1, -2)  # torch works on the tall orientation
    xt = jnp.swapaxes(x, -1, -2)
    omega = jax.random.normal(key, x.shape[:-2] + (x.shape[-1], q), x.dtype)
    basis = jnp.linalg.qr(jnp.matmul(x, omega))[0]
    for _ in range(niter):
        basis = jnp.linalg.qr(jnp.matmul(xt, basis))[0]
        basis = jnp.linalg.qr(jnp.matmul(x, basis))[0]
    u, sv, vh = jnp.linalg.svd(jnp.matmul(jnp.swapaxes(basis, -1, -2), x), full_matrices=False)
    u = jnp.matmul(basis, u)
    if tall:
        return u, sv, vh
    return jnp.swapaxes(vh, -1, -2), sv, jnp.swapaxes(u, -1, -2)


@adapter_node
class LoRAWeight(AdapterNode):
    """A kernel with a LoRA adapter: frozen ``w``, trainable ``a`` and ``b``.

    ``materialize()`` :math:`= W + s\\,AB` in ``w``'s shape and dtype (computed in the promoted
    dtype of ``w`` and ``a``, then cast to ``w.dtype``).

    Attributes:
      w: the frozen kernel.
      a: ``(*batch, *in, r)``, trainable.
      b: ``(*batch, r, *out)``, trainable.
      method: the :class:`LoRA` config (static).
      layout: the kernel's :class:`~effjax.peft.layout.KernelLayout` (static).
    """

    trainable_fields = ("a", "b")
    frozen_fields = ("w",)

    w: jax.Array
    a: jax.Array
    b: jax.Array
    method: LoRA
    layout: KernelLayout

    @property
    def scale(self) -> float:
        """:math:`s`, from the config."""
        return self.method.scale

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    def low_rank_factors(self) -> tuple[jax.Array, jax.Array]:
        """:math:`(A,\\; s\\,B)`: ``(*batch, *in, r)`` and ``(*batch, r, *out)`` with
        :math:`W' = W + A\\,(sB)` per batch slice, for layers that compute
        :math:`xW + (xA)(sB)` without the dense delta (:mod:`effjax.nn.lora_layers`)."""
        return self.a, self.scale * self.b

    def delta(self) -> jax.Array:
        """:math:`s\\,AB` in ``w``'s layout (promoted dtype)."""
        lay, r = self.layout, self.rank
        ct = jnp.promote_types(self.w.dtype, self.a.dtype)
        a = self.a.reshape(lay.batch_shape + (lay.n_in, r)).astype(ct)
        b = self.b.reshape(lay.batch_shape + (r, lay.n_out)).astype(ct)
        return self.scale * lay.from_matrix(jnp.matmul(a, b))

    def materialize(self) -> jax.Array:
        """:math:`W + s\\,AB`, cast to ``w.dtype`` (``_dense`` op by op, not
        :func:`~effjax.peft.base.jit_dense`: XLA's fusion of the sum rounds some kernels
        differently, and LoRA's eager values are pinned by ``tests/fixtures``)."""
        return self._dense()
