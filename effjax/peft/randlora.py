"""RandLoRA: full-rank updates from frozen random low-rank bases (Albert et al., ICLR 2025).

RandLoRA sums :math:`N` low-rank random products, each scaled by trainable diagonal matrices, so
that the update can have full rank while only the diagonals are trained. Written in PyTorch's
``(out, in)`` layout the paper's update is

.. math::

  \\Delta W = s \\sum_{n=1}^{N} B_n \\Lambda_n A \\Gamma_n , \\qquad
  s = \\frac{\\alpha}{r}, \\qquad N = \\Big\\lceil \\frac{\\min(n_{in}, n_{out})}{r} \\Big\\rceil,

with frozen random :math:`B_n \\in \\mathbb{R}^{d_{max} \\times r}` (one per basis) and
:math:`A \\in \\mathbb{R}^{r \\times d_{min}}` (shared by the :math:`N` terms, as in PEFT),
trainable :math:`\\Lambda_n = \\mathrm{diag}(\\lambda_{:, n}) \\in \\mathbb{R}^{r \\times r}` and
:math:`\\Gamma_n = \\mathrm{diag}(\\gamma_{n, :}) \\in \\mathbb{R}^{d_{min} \\times d_{min}}`,
where :math:`d_{min} = \\min(n_{in}, n_{out})` and :math:`d_{max} = \\max(n_{in}, n_{out})`.
The trainable diagonals act on the smaller side (as PEFT does, to keep the count small):
for :math:`n_{in} \\le n_{out}` the :math:`\\Gamma` side is the input side, otherwise the
output side. In effjax's Flax layout (``y = x W``, :math:`W \\in \\mathbb{R}^{n_{in} \\times
n_{out}}`) with :math:`M_{pq} = \\sum_{n, k} B_{p n k}\\, \\lambda_{k n}\\, A_{k q}\\,
\\gamma_{n q}` (:math:`p` over :math:`d_{max}`, :math:`q` over :math:`d_{min}`):

.. math::

  W' = W + s\\,M^\\top \\;\\; (n_{in} \\le n_{out}), \\qquad W' = W + s\\,M \\;\\;
  (n_{in} > n_{out}).

:math:`N` makes :math:`N r \\ge d_{min}`, so the sum can reach full rank.

Trainable parameters per kernel: :math:`N\\,(r + d_{min})` (:math:`\\lambda` is ``(r, N)`` and
:math:`\\gamma` is ``(N, d_min)``, PEFT's ``randlora_lambda`` and ``randlora_gamma``), times the
number of slices for stacked kernels (``batch_axes``).

Initialization follows Hugging Face PEFT (``peft/tuners/randlora``, v0.21):
:math:`\\lambda = 0` (so :math:`W' = W` exactly right after injection),
:math:`\\gamma = 1 / d_{min}` (``reset_randlora_parameters``: ``1 / max(gamma.shape)``), and
the bases with unit standard deviation:

* dense (default): PEFT draws ``kaiming_uniform_(a=sqrt(5))`` and divides by the empirical
  standard deviation, i.e. entries uniform on :math:`[-\\sqrt 3, \\sqrt 3]`; effjax draws
  :math:`U(-\\sqrt 3, \\sqrt 3)` directly (population std 1; PEFT's empirical normalization and
  its bfloat16 draw differ from this by sampling noise only);
* ``sparse=True``: ternary :math:`\\{-1, 0, 1\\}` with :math:`P(\\pm 1) = 1/(2 s)` each,
  :math:`s = 3`, divided by the std (:math:`\\sqrt{1/s}`), so entries are
  :math:`\\pm\\sqrt 3` or 0;
* ``very_sparse=True``: the same with :math:`s = \\sqrt D`, :math:`D` PEFT's
  :math:`\\min(\\text{largest } n_{out}, \\text{largest } n_{in})` over the targeted layers
  (``very_sparse_dim``; None: this leaf's :math:`d_{min}`).

Sharing and slicing. PEFT draws one ``randlora_A`` ``(r, 1, D_min)`` and one ``randlora_B``
``(D_max, N_max, r)`` sized for the largest targeted layer and gives every layer the leading
blocks ``A[:, :, :d_min]`` and ``B[:d_max, :N, :]``. effjax regenerates them from ``seed`` so
that every leaf's bases are leading blocks of the same infinite random arrays (column :math:`q`
of :math:`A` from ``fold_in(key_A, q)``, :math:`B_{p n :}` from ``fold_in(fold_in(key_B, n),
p)``), exactly PEFT's sharing. The values come from JAX's PRNG, not torch's.

Pairing of :math:`B` with :math:`(\\lambda, A, \\gamma)`. PEFT flattens ``B[:d_max, :N, :]``
over ``(basis, rank)`` but the scaled :math:`A` over ``(rank, basis)``, so its column
``k*N + n`` of the flattened :math:`B` multiplies :math:`\\lambda_{k n} A_k \\gamma_n`. effjax
stores :math:`B` in the paper's order, ``b[p, n, k]``; PEFT's layer equals it with
``b[p, n, k] = B_peft[:d_max, :N, :].reshape(d_max, N * r)[p, k * N + n]`` (a fixed
permutation of i.i.d. entries: the same distribution, and bit-identical outputs when PEFT's
bases are copied in this way; see ``tests/peft/test_randlora.py``).

Checkpoints. The bases are frozen node fields rebuilt by ``adapt`` from ``seed``:
:func:`effjax.peft.save_adapters` stores only :math:`\\lambda` and :math:`\\gamma` (PEFT's
``save_projection=False``).

Kernels with more than two axes use a :class:`~effjax.peft.layout.KernelLayout`; the min side
keeps its axes: ``a`` is ``(r, *min_shape)``, ``b`` ``(*max_shape, N, r)`` (shared by all batch
slices, like PEFT's shared bases), ``lam`` ``(*batch, r, N)`` and ``gamma``
``(*batch, N, *min_shape)``, where the min side is the input axes when :math:`n_{in} \\le
n_{out}` and the output axes otherwise.

References:
  Albert, Zhang, Saratchandran, Rodriguez-Opazo, van den Hengel, Abbasnejad, "RandLoRA:
  Full-rank parameter-efficient fine-tuning of large models", ICLR 2025, arXiv:2502.00987.
  Official code: https://github.com/PaulAlbert31/RandLoRA.
  Li, Hastie, Church, "Very sparse random projections", KDD 2006 (the sparse bases).
  Hugging Face PEFT, ``src/peft/tuners/randlora/{layer,model}.py`` (v0.21).
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
    check_bool,
    check_int,
    check_number,
    check_rank,
    check_seed,
)
from effjax.peft.base import AdapterNode, KernelAdapter, adapter_node, register_adapter
from effjax.peft.layout import KernelLayout, place_like

__all__ = ["RandLoRA", "RandLoRAWeight", "randlora_bases", "randlora_num_bases"]


def randlora_num_bases(rank: int, n_in: int, n_out: int) -> int:
    """:math:`N = \\lceil \\min(n_{in}, n_{out}) / r \\rceil` (PEFT's ``num_bases``).

    Example:
      >>> randlora_num_bases(4, 6, 16), randlora_num_bases(4, 16, 8), randlora_num_bases(32, 8, 8)
      (2, 2, 1)
    """
    return -(-min(int(n_in), int(n_out)) // int(rank))


def randlora_bases(seed: int, rank: int, d_min: int, d_max: int, num_bases: int, *,
                   sparsity: float | None = None,
                   dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array]:
    """The frozen RandLoRA bases ``(A, B)`` of shapes ``(r, d_min)`` and ``(d_max, N, r)``.

    Dense (``sparsity=None``): entries :math:`U(-\\sqrt 3, \\sqrt 3)` (unit std). Sparse: entries
    :math:`\\pm\\sqrt s` with probability :math:`1/(2s)` each, 0 otherwise (unit std); PEFT's
    ``sparse=True`` is :math:`s = 3`, ``very_sparse=True`` :math:`s = \\sqrt D`. Column ``q`` of
    ``A`` depends only on ``(seed, rank, sparsity, q)`` and ``B[p, n]`` only on ``(seed, rank,
    sparsity, n, p)``, so smaller bases are leading blocks of larger ones (PEFT's slicing).

    Example:
      >>> a, b = randlora_bases(0, 4, 6, 16, 2)
      >>> a.shape, b.shape
      ((4, 6), (16, 2, 4))
      >>> a3, b3 = randlora_bases(0, 4, 3, 5, 1)  # leading blocks
      >>> bool((a3 == a[:, :3]).all()), bool((b3 == b[:5, :1]).all())
      (True, True)
      >>> a, _ = randlora_bases(0, 4, 6, 16, 2, sparsity=3.0)
      >>> sorted({round(float(v), 4) for v in a.ravel()} - {0.0}) == [-1.7321, 1.7321]
      True
    """
    s = None if sparsity is None else float(sparsity)
    return _bases(np.uint32(seed), int(rank), int(d_min), int(d_max), int(num_bases), s,
                  jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def _bases(seed, rank, d_min, d_max, num_bases, sparsity, dtype):  # compiled once per shape
    key_a, key_b = jax.random.split(jax.random.key(seed))
    gen = jnp.promote_types(dtype, jnp.float32)
    fold = jax.vmap(jax.random.fold_in, in_axes=(None, 0))
    keys_a = fold(key_a, jnp.arange(d_min, dtype=jnp.uint32))  # column q of A
    keys_n = fold(key_b, jnp.arange(num_bases, dtype=jnp.uint32))
    keys_b = jax.vmap(fold, in_axes=(0, None))(keys_n, jnp.arange(d_max, dtype=jnp.uint32))
    keys = jnp.concatenate([keys_a, keys_b.reshape(-1)])  # one draw of r values per key
    if sparsity is None:
        x = jax.vmap(lambda k: jax.random.uniform(k, (rank,), gen, -math.sqrt(3.0),
                                                  math.sqrt(3.0)))(keys)
    else:
        u = jax.vmap(lambda k: jax.random.uniform(k, (rank,), gen))(keys)
        p = 1.0 / (2.0 * sparsity)
        x = ((u > 1.0 - p).astype(gen) - (u < p).astype(gen)) * math.sqrt(sparsity)
    a = x[:d_min].T  # (r, d_min)
    b = jnp.swapaxes(x[d_min:].reshape(num_bases, d_max, rank), 0, 1)  # (d_max, N, r)
    return a.astype(dtype), b.astype(dtype)


@register_adapter("randlora")
@dataclasses.dataclass(frozen=True, kw_only=True)
class RandLoRA(KernelAdapter):
    """RandLoRA method config (a rule value of :func:`effjax.peft.inject`).

    :math:`\\Delta W = s \\sum_n B_n \\Lambda_n A \\Gamma_n` (torch layout), :math:`s =
    \\alpha / r`, :math:`N = \\lceil d_{min} / r \\rceil` bases, frozen random :math:`A`,
    :math:`B_n` regenerated from ``seed``, trainable diagonals :math:`\\lambda` ``(r, N)`` and
    :math:`\\gamma` ``(N, d_min)``; trainable parameters :math:`n_{batch}\\,N\\,(r + d_{min})`.
    See the module docstring for the Flax-layout equation, inits, sharing and references.

    Attributes:
      rank: :math:`r \\ge 1`, the rank of each random basis (PEFT's ``r``; default 32). A
        smaller rank means more bases and more trainable parameters. :math:`r\\,(n_{in} +
        n_{out})` must stay within ``max(64 n_in n_out, 2**24)`` elements (else ``ValueError``).
      alpha: :math:`\\alpha` (PEFT's ``randlora_alpha``; default 640); :math:`s = \\alpha/r`.
      seed: seed of the shared random bases (PEFT's ``projection_prng_key``; default 0).
      sparse: ternary bases with :math:`P(\\pm 1) = 1/6` each (PEFT's ``sparse``).
      very_sparse: ternary bases with :math:`P(\\pm 1) = 1/(2\\sqrt D)` each (PEFT's
        ``very_sparse``; exclusive with ``sparse``).
      very_sparse_dim: :math:`D` for ``very_sparse``: PEFT's :math:`\\min(\\text{largest }
        n_{out}, \\text{largest } n_{in})` over the targeted layers. None: each leaf's own
        :math:`d_{min}`. A leaf with a larger :math:`d_{min}` raises ``ValueError``.
      dtype, in_axes, out_axes, batch_axes: as every :class:`~effjax.peft.KernelAdapter`
        (``dtype``: of all adapter arrays).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> m = RandLoRA(rank=4, alpha=8.0)
      >>> node = m.adapt(jax.random.key(0), jnp.ones((6, 16)))  # d_min = 6, N = 2
      >>> node.a.shape, node.b.shape, node.lam.shape, node.gamma.shape, m.scale
      ((4, 6), (16, 2, 4), (4, 2), (2, 6), 2.0)
      >>> bool(jnp.all(node.materialize() == 1.0))  # lambda = 0: W' = W
      True
      >>> m.num_trainable((6, 16))  # N (r + d_min) = 2 * (4 + 6)
      20
      >>> round(float(node.gamma[0, 0]), 6)  # 1 / d_min
      0.166667
    """

    rank: int = 32
    alpha: float = 640.0
    seed: int = 0
    sparse: bool = False
    very_sparse: bool = False
    very_sparse_dim: int | None = None

    def __post_init__(self):
        super().__post_init__()
        name = self.name
        self._set(rank=check_rank(self.rank, name), seed=check_seed(self.seed, name),
                  alpha=check_number(self.alpha, "alpha", name))
        check_bool(self.sparse, "sparse", name)
        check_bool(self.very_sparse, "very_sparse", name)
        if self.sparse and self.very_sparse:
            raise ValueError("RandLoRA sparse and very_sparse are exclusive; set one of them")
        if self.very_sparse_dim is not None:
            if not self.very_sparse:
                raise ValueError("RandLoRA very_sparse_dim is only used with very_sparse=True")
            self._set(very_sparse_dim=check_int(self.very_sparse_dim, "very_sparse_dim", 1, name))

    @property
    def scale(self) -> float:
        """:math:`s = \\alpha / r`."""
        return self.alpha / self.rank

    def num_bases(self, shape: Sequence[int]) -> int:
        """:math:`N = \\lceil d_{min} / r \\rceil` for a leaf of ``shape``."""
        lay = self.layout(shape)
        return randlora_num_bases(self.rank, lay.n_in, lay.n_out)

    def num_trainable(self, shape: Sequence[int]) -> int:
        """:math:`n_{batch}\\,N\\,(r + d_{min})`."""
        lay = self.layout(shape)
        n = randlora_num_bases(self.rank, lay.n_in, lay.n_out)
        return lay.n_batch * n * (self.rank + min(lay.n_in, lay.n_out))

    def sparsity(self, d_min: int) -> float | None:
        """:math:`s` of the ternary bases (None: dense) for a leaf with ``d_min``."""
        if self.sparse:
            return 3.0
        if self.very_sparse:
            return math.sqrt(self.very_sparse_dim or d_min)
        return None

    def size_limits(self, lay: KernelLayout) -> tuple[SizeLimit, ...]:
        """``rank (n_in + n_out)``, about the frozen bases' size, within
        :func:`~effjax.peft._checks.element_budget`."""
        return (budget_limit(lay, "rank", lay.n_in + lay.n_out,
                             "its frozen bases A (r, d_min) and B (d_max, N, r)"),)

    def adapt(self, key: jax.Array, w: jax.Array) -> RandLoRAWeight:
        """Frozen bases from ``seed`` (``key`` is unused: the bases are shared by all leaves),
        ``lam = 0``, ``gamma = 1 / d_min``; on ``w``'s devices, sharded like its axes."""
        del key
        lay = self.layout(w.shape)
        in_min = lay.n_in <= lay.n_out
        d_min, d_max = min(lay.n_in, lay.n_out), max(lay.n_in, lay.n_out)
        if self.very_sparse_dim is not None and d_min > self.very_sparse_dim:
            raise ValueError(f"RandLoRA very_sparse_dim={self.very_sparse_dim} is smaller than "
                             f"this kernel's min(n_in, n_out) = {d_min} (shape {lay.shape}); "
                             f"set it to PEFT's min(largest n_out, largest n_in)")
        r, dtype = self.rank, self.adapter_dtype(w.dtype)
        n = randlora_num_bases(r, lay.n_in, lay.n_out)
        a, b = randlora_bases(self.seed, r, d_min, d_max, n, sparsity=self.sparsity(d_min),
                              dtype=dtype)
        min_shape, min_axes = (lay.in_shape, lay.in_axes) if in_min else (lay.out_shape,
                                                                           lay.out_axes)
        max_shape, max_axes = (lay.out_shape, lay.out_axes) if in_min else (lay.in_shape,
                                                                            lay.in_axes)
        a = place_like(a.reshape((r,) + min_shape), w, (None,) + min_axes)
        b = place_like(b.reshape(max_shape + (n, r)), w, max_axes + (None, None))
        lam = place_like(jnp.zeros(lay.batch_shape + (r, n), dtype), w,
                         lay.batch_axes + (None, None))
        gamma = place_like(jnp.full(lay.batch_shape + (n,) + min_shape, 1.0 / d_min, dtype), w,
                           lay.batch_axes + (None,) + min_axes)
        return RandLoRAWeight(w=w, a=a, b=b, lam=lam, gamma=gamma, method=self, layout=lay)


@adapter_node
class RandLoRAWeight(AdapterNode):
    """A kernel with a RandLoRA adapter: frozen ``w``, ``a``, ``b``; trainable ``lam``,
    ``gamma``.

    ``materialize()`` :math:`= W + s\\,M^{(\\top)}` with :math:`M_{pq} = \\sum_{n,k} B_{pnk}
    \\lambda_{kn} A_{kq} \\gamma_{nq}` (transposed when the input side is the smaller one), in
    ``w``'s shape and dtype (computed in the promoted dtype of ``w`` and the adapter).

    Attributes:
      w: the frozen kernel.
      a: ``(r, *min_shape)``, frozen random :math:`A` (shared by the bases).
      b: ``(*max_shape, N, r)``, frozen random :math:`B_n` (``b[..., n, :]``).
      lam: ``(*batch, r, N)``, trainable :math:`\\lambda` (PEFT's ``randlora_lambda``).
      gamma: ``(*batch, N, *min_shape)``, trainable :math:`\\gamma` (PEFT's
        ``randlora_gamma``).
      method: the :class:`RandLoRA` config (static).
      layout: the kernel's :class:`~effjax.peft.layout.KernelLayout` (static).
    """

    trainable_fields = ("lam", "gamma")
    frozen_fields = ("w", "a", "b")

    w: jax.Array
    a: jax.Array
    b: jax.Array
    lam: jax.Array
    gamma: jax.Array
    method: RandLoRA
    layout: KernelLayout

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def num_bases(self) -> int:
        return self.lam.shape[-1]

    def delta(self) -> jax.Array:
        """:math:`s\\,M` (or :math:`s\\,M^\\top`) in ``w``'s layout (promoted dtype)."""
        lay, r, n = self.layout, self.rank, self.num_bases
        d_min, d_max = min(lay.n_in, lay.n_out), max(lay.n_in, lay.n_out)
        ct = jnp.promote_types(self.w.dtype, self.lam.dtype)
        a = self.a.reshape(r, d_min).astype(ct)
        b = self.b.reshape(d_max, n * r).astype(ct)
        lam = self.lam.reshape(lay.batch_shape + (r, n)).astype(ct)
        gamma = self.gamma.reshape(lay.batch_shape + (n, d_min)).astype(ct)
        # the scaled A of every basis, stacked over (basis, rank): (*batch, N * r, d_min)
        scaled = jnp.swapaxes(lam, -1, -2)[..., None] * a * gamma[..., None, :]
        m = jnp.matmul(b, scaled.reshape(lay.batch_shape + (n * r, d_min)))  # (*b, max, min)
        if lay.n_in <= lay.n_out:
            m = jnp.swapaxes(m, -1, -2)
        return self.method.scale * lay.from_matrix(m)
