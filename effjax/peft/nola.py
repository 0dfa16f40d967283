"""NOLA: LoRA factors as linear combinations of frozen random bases (Koohpayegani et al., 2024).

NOLA re-parameterizes LoRA's factors with :math:`k` and :math:`l` fixed random matrices and
trains only the mixing coefficients, so the trainable count no longer depends on the rank or the
layer size. For a Flax kernel :math:`W \\in \\mathbb{R}^{n_{in} \\times n_{out}}` (``y = x W``):

.. math::

  W' = W + s\\, A B, \\qquad
  A = A_0 + \\sum_{i=1}^{k} \\alpha_i A_i, \\qquad B = \\sum_{j=1}^{l} \\beta_j B_j, \\qquad
  s = \\frac{\\text{alpha}}{r},

with frozen :math:`A_0, A_i \\in \\mathbb{R}^{n_{in} \\times r}`,
:math:`B_j \\in \\mathbb{R}^{r \\times n_{out}}` and trainable :math:`\\alpha \\in \\mathbb{R}^k`,
:math:`\\beta \\in \\mathbb{R}^l`. Trainable parameters per kernel: :math:`k + l`, times the
number of slices for stacked kernels (``batch_axes``).

Inits and scaling follow the official implementation for language models (UCDvision/NOLA,
``gpt/src/model_nola.py`` and ``llama/qlora/peft/tuners/lora.py``: ``NOLALinear``,
``GenerateParams``, ``LoRA.reset_lora_parameters``):

* bases :math:`A_i, B_j` with entries :math:`U(-1, 1) / \\sqrt{k}` resp.
  :math:`U(-1, 1) / \\sqrt{l}` (``nn.init.uniform_(W, -1, 1) * 1/sqrt(num_basis)``);
* :math:`\\alpha = \\beta = 0` (``nn.init.zeros_(coefficients)``), so :math:`B = 0` and
  :math:`W' = W` right after injection;
* :math:`A_0`: the frozen base weight of the official ``lora_A`` ``NOLALinear``, initialized
  like LoRA's A (``kaiming_uniform_(a=sqrt(5))``: :math:`U(\\pm 1/\\sqrt{n_{in}})`); it is what
  makes training start (with :math:`A_0 = 0` and :math:`\\alpha = \\beta = 0` every gradient
  vanishes). The official ``lora_B`` base weight is zero, hence no :math:`B_0`;
* :math:`s = \\text{lora\\_alpha} / r` as in LoRA.

The paper's equation (Sec. 3) is the :math:`A_0 = 0` case, :math:`\\Delta W = s\\,AB`,
:math:`A = \\sum_i \\alpha_i A_i`, :math:`B = \\sum_j \\beta_j B_j`.

Bases are regenerated from the config's ``seed`` inside :meth:`NOLAWeight.materialize` (as the
official ``GenerateParams`` regenerates them from a stored seed in forward and backward): they
are neither node fields nor stored in checkpoints; :func:`effjax.peft.save_adapters` writes only
:math:`\\alpha, \\beta`. Leaves of equal (flattened) shape under the same ``seed`` and sizes
share the same bases (the official code draws one seed per layer; give rules different seeds
for independent bases). The bases take :math:`(k\\,n_{in} + l\\,n_{out})\\,r` floats of
transient memory per leaf when materialized.

References:
  Koohpayegani, Navaneet, Nooralinejad, Kolouri, Pirsiavash, "NOLA: Compressing LoRA using
  Linear Combination of Random Basis", ICLR 2024, arXiv:2310.02556.
  Official code: https://github.com/UCDvision/NOLA (``gpt/src/model_nola.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from effjax.peft._checks import (
    SizeLimit,
    budget_limit,
    check_int,
    check_number,
    check_seed,
    factor_rank_limit,
)
from effjax.peft.base import AdapterNode, KernelAdapter, adapter_node, register_adapter
from effjax.peft.layout import KernelLayout, place_like

__all__ = ["NOLA", "NOLAWeight", "nola_bases"]


def nola_bases(seed: int, rank: int, num_basis_a: int, num_basis_b: int, n_in: int,
               n_out: int, dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The frozen NOLA matrices ``(a0, a_bases, b_bases)`` for a ``(n_in, n_out)`` kernel.

    ``a0`` ``(n_in, r)`` :math:`\\sim U(\\pm 1/\\sqrt{n_{in}})`, ``a_bases`` ``(k, n_in, r)``
    :math:`\\sim U(-1, 1)/\\sqrt k`, ``b_bases`` ``(l, r, n_out)`` :math:`\\sim U(-1, 1)/\\sqrt l`,
    all drawn from ``jax.random.key(seed)`` (a pure function of the arguments).

    Example:
      >>> a0, ab, bb = nola_bases(0, 2, 3, 4, 5, 6)
      >>> a0.shape, ab.shape, bb.shape
      ((5, 2), (3, 5, 2), (4, 2, 6))
      >>> float(abs(ab).max()) <= 1 / 3 ** 0.5
      True
    """
    return _bases(np.uint32(seed), int(rank), int(num_basis_a), int(num_basis_b), int(n_in),
                  int(n_out), jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def _bases(seed, rank, num_basis_a, num_basis_b, n_in, n_out, dtype):  # compiled once per shape
    k0, ka, kb = jax.random.split(jax.random.key(seed), 3)
    gen = jnp.promote_types(dtype, jnp.float32)
    bound = 1.0 / math.sqrt(n_in)
    a0 = jax.random.uniform(k0, (n_in, rank), gen, -bound, bound)
    a = jax.random.uniform(ka, (num_basis_a, n_in, rank), gen, -1.0, 1.0) / math.sqrt(
        num_basis_a)
    b = jax.random.uniform(kb, (num_basis_b, rank, n_out), gen, -1.0, 1.0) / math.sqrt(
        num_basis_b)
    return a0.astype(dtype), a.astype(dtype), b.astype(dtype)


@register_adapter("nola")
@dataclasses.dataclass(frozen=True, kw_only=True)
class NOLA(KernelAdapter):
    """NOLA method config (a rule value of :func:`effjax.peft.inject`).

    :math:`W' = W + s\\,AB`, :math:`A = A_0 + \\sum_i \\alpha_i A_i`,
    :math:`B = \\sum_j \\beta_j B_j`, :math:`s = \\text{alpha}/r`, frozen random bases from
    ``seed``; trainable parameters :math:`n_{batch}\\,(k + l)`. See the module docstring for
    inits and references.

    Attributes:
      rank: :math:`r \\ge 1` of the factors (default 8), at most :math:`\\max(n_{in},
        n_{out})` of each targeted kernel (else ``ValueError``).
      num_basis_a: :math:`k`, number of bases of :math:`A` (default 1024, as the official code).
      num_basis_b: :math:`l`, number of bases of :math:`B` (default 1024). The frozen bases,
        :math:`k\\,n_{in} r` and :math:`l\\,r\\,n_{out}` elements, must each stay within
        ``max(64 n_in n_out, 2**24)`` (else ``ValueError``).
      alpha: LoRA's ``lora_alpha``; :math:`s = \\text{alpha} / r` (default 8).
      seed: seed of the frozen bases (default 0).
      dtype, in_axes, out_axes, batch_axes: as every :class:`~effjax.peft.KernelAdapter`
        (``dtype``: of the coefficients and bases).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> m = NOLA(rank=2, num_basis_a=3, num_basis_b=4)
      >>> node = m.adapt(jax.random.key(0), jnp.ones((6, 5)))
      >>> node.coef_a.shape, node.coef_b.shape, m.scale
      ((3,), (4,), 4.0)
      >>> bool(jnp.all(node.materialize() == 1.0))  # beta = 0: W' = W
      True
      >>> m.num_trainable((6, 5))  # k + l
      7
    """

    rank: int = 8
    num_basis_a: int = 1024
    num_basis_b: int = 1024
    alpha: float = 8.0
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        name = self.name
        self._set(**{f: check_int(getattr(self, f), f, 1, name)
                     for f in ("rank", "num_basis_a", "num_basis_b")})
        self._set(seed=check_seed(self.seed, name), alpha=check_number(self.alpha, "alpha", name))

    @property
    def scale(self) -> float:
        """:math:`s = \\text{alpha} / r`."""
        return self.alpha / self.rank

    def num_trainable(self, shape: Sequence[int]) -> int:
        """:math:`n_{batch}\\,(k + l)`."""
        return self.layout(shape).n_batch * (self.num_basis_a + self.num_basis_b)

    def bases(self, layout: KernelLayout, dtype: Any = jnp.float32):
        """``(a0, a_bases, b_bases)`` for a kernel of ``layout`` (:func:`nola_bases`)."""
        return nola_bases(self.seed, self.rank, self.num_basis_a, self.num_basis_b,
                          layout.n_in, layout.n_out, dtype)

    def size_limits(self, lay: KernelLayout) -> tuple[SizeLimit, ...]:
        """``rank <= max(n_in, n_out)`` and the frozen bases of each factor within
        :func:`~effjax.peft._checks.element_budget`."""
        r = min(self.rank, max(lay.n_in, lay.n_out))  # a too large rank is reported first
        return (factor_rank_limit(lay),
                budget_limit(lay, "num_basis_a", lay.n_in * r,
                             f"its frozen bases A_i of shape (n_in, r) = ({lay.n_in}, {r})"),
                budget_limit(lay, "num_basis_b", r * lay.n_out,
                             f"its frozen bases B_j of shape (r, n_out) = ({r}, {lay.n_out})"))

    def adapt(self, key: jax.Array, w: jax.Array) -> NOLAWeight:
        """``coef_a = coef_b = 0`` on ``w``'s devices (``key`` is unused: the bases come from
        ``seed``)."""
        del key
        lay = self.layout(w.shape)
        dtype = self.adapter_dtype(w.dtype)
        dims = lay.batch_axes + (None,)
        coef_a = place_like(jnp.zeros(lay.batch_shape + (self.num_basis_a,), dtype), w, dims)
        coef_b = place_like(jnp.zeros(lay.batch_shape + (self.num_basis_b,), dtype), w, dims)
        return NOLAWeight(w=w, coef_a=coef_a, coef_b=coef_b, method=self, layout=lay)


@adapter_node
class NOLAWeight(AdapterNode):
    """A kernel with a NOLA adapter: frozen ``w``, trainable ``coef_a`` (:math:`\\alpha`) and
    ``coef_b`` (:math:`\\beta`); the bases are regenerated from ``method.seed``.

    ``materialize()`` :math:`= W + s\\,(A_0 + \\sum_i \\alpha_i A_i)(\\sum_j \\beta_j B_j)` in
    ``w``'s shape and dtype.

    Attributes:
      w: the frozen kernel.
      coef_a: ``(*batch, k)``, trainable.
      coef_b: ``(*batch, l)``, trainable.
      method: the :class:`NOLA` config (static).
      layout: the kernel's :class:`~effjax.peft.layout.KernelLayout` (static).
    """

    trainable_fields = ("coef_a", "coef_b")
    frozen_fields = ("w",)

    w: jax.Array
    coef_a: jax.Array
    coef_b: jax.Array
    method: NOLA
    layout: KernelLayout

    def factors(self) -> tuple[jax.Array, jax.Array]:
        """:math:`A` ``(*batch, n_in, r)`` and :math:`B` ``(*batch, r, n_out)``."""
        ct = jnp.promote_types(self.w.dtype, self.coef_a.dtype)
        a0, a_bases, b_bases = self.method.bases(self.layout, ct)
        a = a0 + jnp.einsum("...k,kir->...ir", self.coef_a.astype(ct), a_bases)
        b = jnp.einsum("...l,lro->...ro", self.coef_b.astype(ct), b_bases)
        return a, b

    def low_rank_factors(self) -> tuple[jax.Array, jax.Array]:
        """:math:`(A,\\; s\\,B)` shaped ``(*batch, *in, r)`` and ``(*batch, r, *out)``, for
        layers that compute :math:`xW + (xA)(sB)` without the dense delta
        (:mod:`effjax.nn.lora_layers`)."""
        lay = self.layout
        a, b = self.factors()
        r = a.shape[-1]
        return (a.reshape(lay.batch_shape + lay.in_shape + (r,)),
                self.method.scale * b.reshape(lay.batch_shape + (r,) + lay.out_shape))

    def delta(self) -> jax.Array:
        """:math:`s\\,AB` in ``w``'s layout (promoted dtype)."""
        a, b = self.factors()
        return self.method.scale * self.layout.from_matrix(jnp.matmul(a, b))
