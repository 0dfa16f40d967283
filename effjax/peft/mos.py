"""MoS: Mixture of Shards, LoRA factors assembled from a shared pool of shards (Wang et al., 2025).

MoS builds every layer's LoRA matrices from shards drawn out of a trainable pool shared by all
layers, so the layers keep LoRA's rank :math:`r` while the trainable count is that of a much
smaller rank :math:`e`. For a Flax kernel stack :math:`W_s \\in \\mathbb{R}^{n_{in} \\times
n_{out}}`, :math:`s = 1 \\dots L` (``y = x W_s``; the layers are the slices of a stacked kernel,
see *Design* below), with :math:`l` shards per vector, trainable pools

.. math::

  P^A \\in \\mathbb{R}^{S \\times n_{in}/l}, \\qquad P^B \\in \\mathbb{R}^{S \\times n_{out}/l},
  \\qquad S = e\\,L\\,l,

and fixed routing indices :math:`I^A_s, I^B_s \\in \\{0..S-1\\}^{r \\times l}` per layer, the
:math:`k`-th low-rank vectors of layer :math:`s` are concatenations of :math:`l` shards
(*vector sharding*),

.. math::

  a_{s,k} = \\big[P^A_{I^A_{s,k,1}} \\,\\|\\, \\cdots \\,\\|\\, P^A_{I^A_{s,k,l}}\\big]
  \\in \\mathbb{R}^{n_{in}}, \\qquad
  b_{s,k} = \\big[P^B_{I^B_{s,k,1}} \\,\\|\\, \\cdots \\,\\|\\, P^B_{I^B_{s,k,l}}\\big]
  \\in \\mathbb{R}^{n_{out}},

and, with :math:`A_s = [a_{s,1} \\cdots a_{s,r}] \\in \\mathbb{R}^{n_{in} \\times r}`,
:math:`B_s = [b_{s,1} \\cdots b_{s,r}]^\\top \\in \\mathbb{R}^{r \\times n_{out}}`,

.. math::

  W'_s = W_s + \\frac{\\alpha}{r}\\, A_s B_s = W_s + \\frac{\\alpha}{r} \\sum_{k=1}^{r}
  a_{s,k}\\, b_{s,k}^\\top ,

the transpose of the paper's :math:`\\Delta W = B A` in torch's ``(out, in)`` layout. The
routing (the paper's MoE-like router with an index matrix per layer; fixed at initialization,
not learned) implements the four differentiation strategies:

* *shard privatization*: the pool's first :math:`(e - p)\\,L\\,l` shards are public, the rest are
  split into :math:`p\\,l` private shards per layer (:math:`p` = ``private_rank``);
* *subset selection*: each layer takes its :math:`(r - p)\\,l` public shards as a random subset
  (without replacement) of the public pool, followed by its own :math:`p\\,l` private shards;
* *pair dissociation*: :math:`I^A` and :math:`I^B` are drawn independently, so :math:`a_{s,k}`
  and :math:`b_{s,k}` are not a fixed pair;
* *vector sharding*: :math:`l` shards per vector (``num_shards``).

Trainable parameters per stacked kernel: :math:`S\\,(n_{in} + n_{out})/l = e\\,L\\,(n_{in} +
n_{out})`, the count of LoRA with rank :math:`e` on every layer (the paper's "equivalent
rank"), while every layer's update has rank up to :math:`r`. It needs :math:`p \\le e`,
:math:`p \\le r`, :math:`r - p \\le (e - p)\\,L` (enough public shards for the subset),
:math:`l \\mid n_{in}` and :math:`l \\mid n_{out}`.

Initialization follows the official code (``modules/Tied_LoRA.py``): :math:`P^B = 0` (so
:math:`W' = W` exactly right after injection) and :math:`P^A` kaiming-uniform with the fan-in of
a whole vector, :math:`U(\\pm 1/\\sqrt{n_{in}})`, like LoRA's :math:`A`. The official code's
"random scaling" vector is disabled there (it asserts a constant 1) and is omitted here.

Design: one node per stacked kernel. MoS shares its pools across layers, which a leaf-by-leaf
rewrite cannot do across *separate* leaves: a node's ``materialize`` sees only its own fields.
effjax therefore shares the pools across the slices of one stacked leaf: the layers are the
kernel's ``batch_axes`` (``nn.scan`` / ``nnx.scan`` kernels ``(layers, in, out)``, expert
stacks), ``L`` is the number of slices, and one :class:`MoSWeight` holds the whole pool of that
projection type as trainable fields and every layer's routing as frozen integer fields. This is
exactly the official code's layout, which keeps one pool per projection type (``q_proj``,
``k_proj``, ...) shared by all transformer blocks. Limits: leaves that are not stacked have
:math:`L = 1`, so the constraint :math:`r - p \\le e - p` forces :math:`r \\le e` and MoS
brings no saving over LoRA (it is accepted but pointless); separate leaves (e.g. ``q`` and ``v``)
never share a pool, as in the official code; and the routing is drawn from the leaf's
injection key, so :func:`effjax.peft.load_adapters` needs the injection ``key``
(checkpoints hold the two pools only).

Multi-axis kernels use a :class:`~effjax.peft.layout.KernelLayout`: shards are pieces of the
flattened input and output vectors (``(*in)`` and ``(*out)`` in row-major order).

References:
  Wang, Chen, Chen, Dong, Xue, Jiang, Kong, Wu, "MoS: Unleashing Parameter Efficiency of
  Low-Rank Adaptation with Mixture of Shards", ICLR 2025, arXiv:2410.00938.
  Official code: https://github.com/Forence1999/MoS (``modules/Tied_LoRA.py``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from effjax.peft._checks import SizeLimit, check_int, check_number, factor_rank_limit
from effjax.peft.base import AdapterNode, KernelAdapter, adapter_node, register_adapter
from effjax.peft.layout import KernelLayout, place_like

__all__ = ["MoS", "MoSWeight", "mos_routing"]


def mos_routing(key: jax.Array, num_layers: int, rank: int, pool_rank: int,
                private_rank: int, num_shards: int) -> jax.Array:
    """Routing indices ``(num_layers, rank * num_shards)`` into a pool of
    ``pool_rank * num_layers * num_shards`` shards.

    Row :math:`s`: a random subset (without replacement) of :math:`(r - p)\\,l` public shards
    from ``[0, (e - p) L l)``, then layer :math:`s`'s private shards ``(e - p) L l + s p l +
    [0, p l)``. Entry ``k * l + i`` is the :math:`i`-th shard of vector :math:`k`.

    Example:
      >>> import jax
      >>> idx = mos_routing(jax.random.key(0), 3, 4, 2, 1, 2)  # L=3, r=4, e=2, p=1, l=2
      >>> idx.shape
      (3, 8)
      >>> [list(map(int, row[6:])) for row in idx]  # private shards after the 3 * 2 public
      [[6, 7], [8, 9], [10, 11]]
      >>> bool((idx[:, :6] < 6).all()) and all(len(set(map(int, r[:6]))) == 6 for r in idx)
      True
    """
    public = (pool_rank - private_rank) * num_layers * num_shards
    n_pub = (rank - private_rank) * num_shards
    n_priv = private_rank * num_shards

    def row(s):
        chosen = jax.random.permutation(jax.random.fold_in(key, s), public)[:n_pub]
        own = public + s * n_priv + jnp.arange(n_priv)
        return jnp.concatenate([chosen.astype(jnp.int32), own.astype(jnp.int32)])

    return jax.vmap(row)(jnp.arange(num_layers))


@register_adapter("mos")
@dataclasses.dataclass(frozen=True, kw_only=True)
class MoS(KernelAdapter):
    """MoS method config (a rule value of :func:`effjax.peft.inject`).

    Per layer :math:`s` (slice of the stacked kernel): :math:`W'_s = W_s + (\\alpha/r)\\,A_s B_s`
    with the columns of :math:`A_s` and rows of :math:`B_s` concatenated from ``num_shards``
    shards of two trainable pools shared by all layers; trainable parameters
    :math:`e\\,L\\,(n_{in} + n_{out})` (:math:`L` = number of slices). See the module docstring
    for the routing, the design and references.

    Attributes:
      rank: :math:`r`, the rank of each layer's :math:`A_s B_s` (the official ``lora_r``;
        default 8).
      pool_rank: :math:`e`, the equivalent rank of the trainable pools per layer (the
        official ``valid_param_lora_r``; default 2). ``rank`` and ``pool_rank`` are at most
        :math:`\\max(n_{in}, n_{out})` of the kernel (else ``ValueError``).
      private_rank: :math:`p`, vectors per layer built from private shards (the official
        ``valid_param_private_r``; default 1; 0 disables shard privatization).
      num_shards: :math:`l`, shards per vector (the official ``num_chunk_per_vec``; default 2;
        1 disables vector sharding).
      alpha: :math:`\\alpha`; the scale is :math:`\\alpha / r` (default 16).
      dtype: dtype of the pools. None: the kernel's dtype, except float32 for float16 and
        bfloat16 kernels (as :class:`~effjax.peft.LoRA`).
      in_axes, out_axes, batch_axes: the kernel's axes (see :mod:`effjax.peft.layout`);
        ``batch_axes`` are the layers that share the pools.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> m = MoS(rank=4, pool_rank=2, private_rank=1, num_shards=2, batch_axes=0)
      >>> node = m.adapt(jax.random.key(0), jnp.ones((3, 6, 8)))  # 3 layers
      >>> node.pool_a.shape, node.pool_b.shape, node.idx_a.shape  # S = e L l = 12 shards
      ((12, 3), (12, 4), (3, 8))
      >>> bool(jnp.all(node.materialize() == 1.0))  # pool_b = 0: W' = W
      True
      >>> m.num_trainable((3, 6, 8)), 4 * 3 * (6 + 8)  # e L (in + out) vs LoRA rank 4
      (84, 168)
    """

    rank: int = 8
    pool_rank: int = 2
    private_rank: int = 1
    num_shards: int = 2
    alpha: float = 16.0

    def __post_init__(self):
        super().__post_init__()
        for name, lo in (("rank", 1), ("pool_rank", 1), ("private_rank", 0),
                         ("num_shards", 1)):
            self._set(**{name: check_int(getattr(self, name), name, lo, self.name)})
        if self.private_rank > min(self.rank, self.pool_rank):
            raise ValueError(f"MoS private_rank={self.private_rank} must be <= rank="
                             f"{self.rank} and <= pool_rank={self.pool_rank}")
        self._set(alpha=check_number(self.alpha, "alpha", self.name))

    @property
    def scale(self) -> float:
        """:math:`\\alpha / r`."""
        return self.alpha / self.rank

    def _check(self, lay: KernelLayout) -> None:
        r, e, p, n_layers = self.rank, self.pool_rank, self.private_rank, lay.n_batch
        for side, n in (("n_in", lay.n_in), ("n_out", lay.n_out)):
            if n % self.num_shards:
                raise ValueError(f"MoS num_shards={self.num_shards} must divide {side} = {n} "
                                 f"(kernel of shape {lay.shape})")
        if r - p > (e - p) * n_layers:
            raise ValueError(
                f"MoS needs rank - private_rank <= (pool_rank - private_rank) * L public "
                f"vectors, got rank={r}, pool_rank={e}, private_rank={p}, L={n_layers} "
                f"layers (the slices of batch_axes={lay.batch_axes}) for a kernel of shape "
                f"{lay.shape}; the pool is shared across the stacked layers only")

    def size_limits(self, lay: KernelLayout) -> tuple[SizeLimit, ...]:
        """``rank`` and ``pool_rank`` (each layer's equivalent rank) ``<= max(n_in, n_out)``."""
        return factor_rank_limit(lay), factor_rank_limit(lay, "pool_rank")

    def num_trainable(self, shape: Sequence[int]) -> int:
        """:math:`e\\,L\\,(n_{in} + n_{out})`."""
        lay = self.layout(shape)
        self._check(lay)
        return self.pool_rank * lay.n_batch * (lay.n_in + lay.n_out)

    def adapt(self, key: jax.Array, w: jax.Array) -> MoSWeight:
        """Pools (``pool_a`` kaiming-uniform, ``pool_b = 0``) and independent routings
        ``idx_a``, ``idx_b`` from ``key``, on ``w``'s devices (replicated)."""
        lay = self.layout(w.shape)
        self._check(lay)
        n_layers, n_sh = lay.n_batch, self.num_shards
        size = self.pool_rank * n_layers * n_sh
        dtype = self.adapter_dtype(w.dtype)
        k_pool, k_a, k_b = jax.random.split(key, 3)
        bound = 1.0 / math.sqrt(lay.n_in)  # kaiming_uniform_(a=sqrt(5)), fan-in n_in
        pool_a = jax.random.uniform(k_pool, (size, lay.n_in // n_sh),
                                    jnp.promote_types(dtype, jnp.float32), -bound, bound)
        pool_b = jnp.zeros((size, lay.n_out // n_sh), dtype)
        route = lambda k: mos_routing(k, n_layers, self.rank, self.pool_rank,
                                      self.private_rank, n_sh).reshape(
            lay.batch_shape + (self.rank * n_sh,))
        rep = lambda x: place_like(x, w, (None,) * x.ndim)
        by_layer = lambda x: place_like(x, w, lay.batch_axes + (None,))
        return MoSWeight(w=w, pool_a=rep(pool_a.astype(dtype)), pool_b=rep(pool_b),
                         idx_a=by_layer(route(k_a)), idx_b=by_layer(route(k_b)), method=self,
                         layout=lay)


@adapter_node
class MoSWeight(AdapterNode):
    """A (stacked) kernel with a MoS adapter: frozen ``w`` and routings ``idx_a``, ``idx_b``;
    trainable pools ``pool_a``, ``pool_b`` shared by all slices.

    ``materialize()`` :math:`= W_s + (\\alpha/r)\\,A_s B_s` per slice, with
    :math:`A_s` = ``pool_a[idx_a[s]]`` reshaped to ``(r, n_in)`` and transposed, :math:`B_s` =
    ``pool_b[idx_b[s]]`` reshaped to ``(r, n_out)``; in ``w``'s shape and dtype.

    Attributes:
      w: the frozen kernel.
      pool_a: ``(S, n_in / l)``, trainable shards of the :math:`A` vectors.
      pool_b: ``(S, n_out / l)``, trainable shards of the :math:`B` vectors.
      idx_a: ``(*batch, r * l)`` int32, frozen routing of :math:`A` (entry ``k * l + i``: the
        :math:`i`-th shard of vector :math:`k`).
      idx_b: ``(*batch, r * l)`` int32, frozen routing of :math:`B`.
      method: the :class:`MoS` config (static).
      layout: the kernel's :class:`~effjax.peft.layout.KernelLayout` (static).
    """

    trainable_fields = ("pool_a", "pool_b")
    frozen_fields = ("w", "idx_a", "idx_b")

    w: jax.Array
    pool_a: jax.Array
    pool_b: jax.Array
    idx_a: jax.Array
    idx_b: jax.Array
    method: MoS
    layout: KernelLayout

    def factors(self) -> tuple[jax.Array, jax.Array]:
        """:math:`A_s` ``(*batch, n_in, r)`` and :math:`B_s` ``(*batch, r, n_out)``."""
        lay, r = self.layout, self.method.rank
        ct = jnp.promote_types(self.w.dtype, self.pool_a.dtype)
        a = self.pool_a.astype(ct)[self.idx_a].reshape(lay.batch_shape + (r, lay.n_in))
        b = self.pool_b.astype(ct)[self.idx_b].reshape(lay.batch_shape + (r, lay.n_out))
        return jnp.swapaxes(a, -1, -2), b

    def delta(self) -> jax.Array:
        """:math:`(\\alpha/r)\\,A_s B_s` in ``w``'s layout (promoted dtype)."""
        a, b = self.factors()
        return self.method.scale * self.layout.from_matrix(jnp.matmul(a, b))
