"""VeRA: vector-based random matrix adaptation (Kopiczko et al., 2024).

VeRA freezes a pair of random matrices shared by all adapted layers and trains two scaling
vectors per layer. For a Flax kernel :math:`W \\in \\mathbb{R}^{n_{in} \\times n_{out}}`
(``y = x W``), with frozen :math:`A \\in \\mathbb{R}^{n_{in} \\times r}`,
:math:`B \\in \\mathbb{R}^{r \\times n_{out}}` and trainable :math:`d \\in \\mathbb{R}^r`,
:math:`b \\in \\mathbb{R}^{n_{out}}`:

.. math::

  W' = W + \\big(A\\, \\mathrm{diag}(d)\\, B\\big)\\, \\mathrm{diag}(b),

the transpose of the paper's :math:`h = W_0 x + \\Lambda_b B \\Lambda_d A x` (torch layout). There
is no :math:`\\alpha / r` scaling. Trainable parameters per kernel: :math:`r + n_{out}`, times the
number of slices for stacked kernels (``batch_axes``).

Initialization follows Hugging Face PEFT (``peft/tuners/vera``): :math:`b = 0`, so :math:`W' = W`
right after injection, :math:`d = d_{initial}` (0.1), and :math:`A`, :math:`B` kaiming-uniform
with gain :math:`\\sqrt 2` on PEFT's layouts ``vera_A`` ``(r, max_in)`` and ``vera_B``
``(max_out, r)``: :math:`A_{ij} \\sim U(\\pm\\sqrt{6 / \\mathrm{max\\_in}})`,
:math:`B_{ij} \\sim U(\\pm\\sqrt{6 / r})`.

Sharing and slicing. PEFT draws one ``vera_A``/``vera_B`` sized for the largest targeted layer
and gives every layer the leading block (``vera_A[:, :in]``, ``vera_B[:out, :]``). effjax
rewrites leaf by leaf, so it regenerates the matrices from ``seed`` instead, in a way that makes
every leaf's matrices blocks of the same infinite random matrices: row :math:`i` of :math:`A`
is drawn from ``fold_in(key_A, i)`` and column :math:`j` of :math:`B` from ``fold_in(key_B,
j)``. So leaves of any shape share exactly as in PEFT (a leaf with fewer inputs gets the first
rows of a larger leaf's :math:`A`), and leaves of equal shape get equal matrices. The only
quantity that depends on the largest layer is the bound of :math:`A` (its fan-in is ``max_in``
in PEFT); set ``max_in`` to the largest :math:`n_{in}` over the targeted leaves to reproduce
PEFT's distribution exactly (leaves with :math:`n_{in}` > ``max_in`` are rejected). With the
default ``max_in=None`` each leaf uses its own :math:`n_{in}` as the fan-in, which differs from
PEFT's bound (only the scale of :math:`A`) when the targeted layers have different input sizes.
The random values themselves come from JAX's PRNG, not torch's, so they are not the numbers
PEFT draws for the same ``projection_prng_key``.

Checkpoints. :math:`A`, :math:`B` are frozen fields of the node (so ``split`` / ``jax.grad`` /
optax never see them as trainable) and are rebuilt by ``adapt`` from ``seed``:
:func:`effjax.peft.save_adapters` stores only :math:`d` and :math:`b` (PEFT's default
``save_projection=True`` stores the matrices; effjax behaves like ``save_projection=False`` but
regeneration is deterministic in JAX), and :func:`effjax.peft.load_adapters` reproduces the
matrices bit for bit whatever injection key it is given.

Kernels with more than two axes use a :class:`~effjax.peft.layout.KernelLayout`: ``a`` has
shape ``(*in, r)``, ``b`` ``(r, *out)`` (shared by all batch slices, like PEFT's shared
matrices), ``lambda_d`` ``(*batch, r)`` and ``lambda_b`` ``(*batch, *out)``.

References:
  Kopiczko, Blankevoort, Asano, "VeRA: Vector-based Random Matrix Adaptation", ICLR 2024,
  arXiv:2310.11454.
  Hugging Face PEFT, ``src/peft/tuners/vera/{layer,model}.py`` (v0.21).
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
    check_rank,
    check_seed,
)
from effjax.peft.base import AdapterNode, KernelAdapter, adapter_node, register_adapter
from effjax.peft.layout import KernelLayout, place_like

__all__ = ["VeRA", "VeRAWeight", "vera_projections"]


def _rows(key: jax.Array, n: int, r: int, bound: float, dtype: Any) -> jax.Array:
    """``(n, r)``: row ``i`` uniform in ``[-bound, bound)`` from ``fold_in(key, i)`` (so the
    rows of a smaller matrix are the first rows of a larger one)."""
    draw = lambda i: jax.random.uniform(jax.random.fold_in(key, i), (r,), dtype, -bound, bound)
    return jax.vmap(draw)(jnp.arange(n, dtype=jnp.uint32))


def vera_projections(seed: int, rank: int, n_in: int, n_out: int, *, fan_in: int | None = None,
                     dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array]:
    """The frozen VeRA matrices ``(A, B)`` of shapes ``(n_in, r)`` and ``(r, n_out)``.

    :math:`A_{ij} \\sim U(\\pm\\sqrt{6/\\mathrm{fan\\_in}})` (``fan_in`` defaults to ``n_in``;
    PEFT uses the largest targeted input size), :math:`B_{ij} \\sim U(\\pm\\sqrt{6/r})`; row
    :math:`i` of ``A`` and column :math:`j` of ``B`` depend only on ``(seed, rank, fan_in, i)``
    resp. ``(seed, rank, j)``, so smaller matrices are leading blocks of larger ones.

    Example:
      >>> import numpy as np
      >>> a, b = vera_projections(0, 4, 16, 8)
      >>> a.shape, b.shape
      ((16, 4), (4, 8))
      >>> a6, b5 = vera_projections(0, 4, 6, 5, fan_in=16)  # PEFT's slicing: leading blocks
      >>> bool((a6 == a[:6]).all()), bool((b5 == b[:, :5]).all())
      (True, True)
    """
    fan_in = n_in if fan_in is None else fan_in
    return _projections(np.uint32(seed), int(rank), int(n_in), int(n_out), int(fan_in),
                        jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _projections(seed, rank, n_in, n_out, fan_in, dtype):  # jitted: compiled once per shape
    key_a, key_b = jax.random.split(jax.random.key(seed))
    gen = jnp.promote_types(dtype, jnp.float32)
    a = _rows(key_a, n_in, rank, math.sqrt(6.0 / fan_in), gen)
    b = _rows(key_b, n_out, rank, math.sqrt(6.0 / rank), gen).T
    return a.astype(dtype), b.astype(dtype)


@register_adapter("vera")
@dataclasses.dataclass(frozen=True, kw_only=True)
class VeRA(KernelAdapter):
    """VeRA method config (a rule value of :func:`effjax.peft.inject`).

    :math:`W' = W + (A\\,\\mathrm{diag}(d)\\,B)\\,\\mathrm{diag}(b)` with frozen random
    :math:`A, B` regenerated from ``seed`` and trainable :math:`d, b`; trainable parameters
    :math:`n_{batch}\\,(r + n_{out})`. See the module docstring for inits, sharing and
    references.

    Attributes:
      rank: :math:`r \\ge 1` (PEFT's ``r``; default 256 as in PEFT). It may exceed the
        kernel's sides, but the frozen projections' :math:`r\\,(n_{in} + n_{out})` elements
        must stay within ``max(64 n_in n_out, 2**24)`` (else ``ValueError``).
      seed: seed of the shared random matrices (PEFT's ``projection_prng_key``; default 0).
      d_initial: initial value of every entry of :math:`d` (PEFT's ``d_initial``; 0.1).
      max_in: the fan-in of :math:`A`'s kaiming bound, PEFT's largest targeted input size.
        None: each leaf's own :math:`n_{in}`. A leaf with more inputs raises ``ValueError``.
      dtype, in_axes, out_axes, batch_axes: as every :class:`~effjax.peft.KernelAdapter`
        (``dtype``: of all adapter arrays).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> node = VeRA(rank=4).adapt(jax.random.key(0), jnp.ones((6, 5)))
      >>> node.a.shape, node.b.shape, node.lambda_d.shape, node.lambda_b.shape
      ((6, 4), (4, 5), (4,), (5,))
      >>> bool(jnp.all(node.materialize() == 1.0))  # lambda_b = 0: W' = W
      True
      >>> VeRA(rank=4).num_trainable((6, 5))  # r + out
      9
    """

    rank: int = 256
    seed: int = 0
    d_initial: float = 0.1
    max_in: int | None = None

    def __post_init__(self):
        super().__post_init__()
        name = self.name
        self._set(rank=check_rank(self.rank, name), seed=check_seed(self.seed, name),
                  d_initial=check_number(self.d_initial, "d_initial", name))
        if self.max_in is not None:
            self._set(max_in=check_int(self.max_in, "max_in", 1, name))

    def num_trainable(self, shape: Sequence[int]) -> int:
        """:math:`n_{batch}\\,(r + n_{out})`."""
        lay = self.layout(shape)
        return lay.n_batch * (self.rank + lay.n_out)

    def size_limits(self, lay: KernelLayout) -> tuple[SizeLimit, ...]:
        """``rank (n_in + n_out)``, the frozen projections' size, within
        :func:`~effjax.peft._checks.element_budget` (VeRA's rank may exceed the kernel's sides:
        its paper uses 1024 on 768-wide layers)."""
        return (budget_limit(lay, "rank", lay.n_in + lay.n_out,
                             "its frozen projections A (n_in, r) and B (r, n_out)"),)

    def adapt(self, key: jax.Array, w: jax.Array) -> VeRAWeight:
        """Frozen ``a``, ``b`` from ``seed`` (``key`` is unused: the matrices are shared by all
        leaves), ``lambda_d = d_initial``, ``lambda_b = 0``; placed on ``w``'s devices."""
        del key
        lay = self.layout(w.shape)
        if self.max_in is not None and lay.n_in > self.max_in:
            raise ValueError(f"VeRA max_in={self.max_in} is smaller than this kernel's input "
                             f"size {lay.n_in}; set max_in to the largest targeted input size")
        r, dtype = self.rank, self.adapter_dtype(w.dtype)
        a, b = vera_projections(self.seed, r, lay.n_in, lay.n_out, fan_in=self.max_in,
                                dtype=dtype)
        a = place_like(a.reshape(lay.in_shape + (r,)), w, lay.in_axes + (None,))
        b = place_like(b.reshape((r,) + lay.out_shape), w, (None,) + lay.out_axes)
        lambda_d = place_like(jnp.full(lay.batch_shape + (r,), self.d_initial, dtype), w,
                              lay.batch_axes + (None,))
        lambda_b = place_like(jnp.zeros(lay.batch_shape + lay.out_shape, dtype), w,
                              lay.batch_axes + lay.out_axes)
        return VeRAWeight(w=w, a=a, b=b, lambda_d=lambda_d, lambda_b=lambda_b, method=self,
                          layout=lay)


@adapter_node
class VeRAWeight(AdapterNode):
    """A kernel with a VeRA adapter: frozen ``w``, ``a``, ``b``; trainable ``lambda_d``,
    ``lambda_b``.

    ``materialize()`` :math:`= W + (A\\,\\mathrm{diag}(d)\\,B)\\,\\mathrm{diag}(b)` in ``w``'s
    shape and dtype (computed in the promoted dtype of ``w`` and the adapter, then cast).

    Attributes:
      w: the frozen kernel.
      a: ``(*in, r)``, frozen random (from the config's ``seed``).
      b: ``(r, *out)``, frozen random.
      lambda_d: ``(*batch, r)``, trainable (PEFT's ``vera_lambda_d``).
      lambda_b: ``(*batch, *out)``, trainable (PEFT's ``vera_lambda_b``).
      method: the :class:`VeRA` config (static).
      layout: the kernel's :class:`~effjax.peft.layout.KernelLayout` (static).
    """

    trainable_fields = ("lambda_d", "lambda_b")
    frozen_fields = ("w", "a", "b")

    w: jax.Array
    a: jax.Array
    b: jax.Array
    lambda_d: jax.Array
    lambda_b: jax.Array
    method: VeRA
    layout: KernelLayout

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    def low_rank_factors(self) -> tuple[jax.Array, jax.Array]:
        """:math:`(A\\,\\mathrm{diag}(d),\\; B\\,\\mathrm{diag}(b))` per batch slice:
        ``(*batch, *in, r)`` and ``(*batch, r, *out)`` (the shared ``a``, ``b`` broadcast over
        the batch axes), for layers that compute :math:`xW + (xA')B'` without the dense delta
        (:mod:`effjax.nn.lora_layers`)."""
        lay = self.layout
        ct = jnp.promote_types(self.a.dtype, self.lambda_d.dtype)
        nb, n_in = len(lay.batch_shape), len(lay.in_shape)
        d = self.lambda_d.reshape(lay.batch_shape + (1,) * n_in + (self.rank,)).astype(ct)
        lb = self.lambda_b.reshape(lay.batch_shape + (1,) + lay.out_shape).astype(ct)
        a = self.a.reshape((1,) * nb + self.a.shape).astype(ct) * d
        b = self.b.reshape((1,) * nb + self.b.shape).astype(ct) * lb
        return a, b

    def delta(self) -> jax.Array:
        """:math:`(A\\,\\mathrm{diag}(d)\\,B)\\,\\mathrm{diag}(b)` in ``w``'s layout."""
        lay, r = self.layout, self.rank
        ct = jnp.promote_types(self.w.dtype, self.lambda_d.dtype)
        a = self.a.reshape(lay.n_in, r).astype(ct)
        b = self.b.reshape(r, lay.n_out).astype(ct)
        d = self.lambda_d.reshape(lay.batch_shape + (1, r)).astype(ct)
        lb = self.lambda_b.reshape(lay.batch_shape + (1, lay.n_out)).astype(ct)
        return lay.from_matrix(jnp.matmul(a * d, b) * lb)
