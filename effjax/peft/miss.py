"""MiSS (formerly Bone): matrix shard sharing (Kang & Yin, 2024).

MiSS trains one small matrix per kernel and adds it to every shard of the weight, instead of
LoRA's product of two factors. Its three variants, as in Hugging Face PEFT
(``peft/tuners/miss``, v0.21), for a Flax kernel :math:`W \\in \\mathbb{R}^{n_{in} \\times
n_{out}}` (``y = x W``; the input side is split into shards of :math:`r` rows):

* ``variant="balance"`` (PEFT's default ``init_weights=True``, the paper's MiSS): a trainable
  :math:`D \\in \\mathbb{R}^{r \\times n_{out}}` shared by all row shards,

  .. math::

    W'_{i o} = W_{i o} + D_{(i \\bmod r),\\, o}, \\qquad
    \\text{i.e.}\\;\\; W' = W + \\begin{bmatrix} D \\\\ D \\\\ \\vdots \\end{bmatrix}_{:n_{in}},

  which is PEFT's forward ``y = x W^T + (\\sum_j x_{[j r : (j+1) r]}) D`` (the input
  zero-padded to a multiple of :math:`r`). Trainable parameters :math:`r\\,n_{out}`.
* ``variant="mini"`` (PEFT's ``init_weights="mini"``): :math:`D \\in \\mathbb{R}^{r \\times
  m}` (:math:`m` = ``mini_rank``, PEFT's ``mini_r``) repeated along the output as well,
  :math:`W'_{io} = W_{io} + D_{(i \\bmod r),\\, (o \\bmod m)}` (needs :math:`m \\mid n_{out}`).
  Trainable parameters :math:`r\\,m`.
* ``variant="bat"`` (PEFT's ``init_weights="bat"``; Bone's Block-Affine Transformation): the
  kernel is cut into :math:`r \\times r` blocks :math:`W_{ca}` (input block :math:`c`, output
  block :math:`a`; needs :math:`r \\mid n_{in}` and :math:`r \\mid n_{out}`) and each output
  block column has a trainable :math:`b_a \\in \\mathbb{R}^{r \\times r}`:

  .. math::

    W'_{ca} = W_{ca} + b_a\\,(W_{ca} + I),

  the transpose of PEFT's ``W @ B_a + B_a`` in torch's ``(out, in)`` layout
  (:math:`b_a = B_a^\\top`, where ``B`` is PEFT's ``miss_block`` of shape
  ``(out / r, r, r)``). The update depends on :math:`W` (it is not a low-rank additive term).
  Trainable parameters :math:`(n_{out}/r)\\,r^2 = r\\,n_{out}`.

All counts are per kernel, times the number of slices for stacked kernels (``batch_axes``).

Initialization follows PEFT: the trainable matrix is zero (``init="zeros"``), so
:math:`W' = W` exactly right after injection; PEFT's ``init_weights=False`` is
``init="kaiming"`` (balance only): ``kaiming_uniform_(a=sqrt(5))`` on PEFT's ``(r, out)`` block,
i.e. :math:`D_{ij} \\sim U(\\pm 1/\\sqrt{n_{out}})`, and then :math:`W' \\neq W` at
initialization. PEFT's ``r`` must be at most ``in_features``; so must ``rank`` here. There is
no scaling factor (PEFT's ``scale_layer`` is a no-op for MiSS).

PEFT configs map to effjax as ``MissConfig(r=R)`` → ``MiSS(rank=R)``, ``init_weights="bat"`` →
``variant="bat"``, ``init_weights="mini", mini_r=M`` → ``variant="mini", mini_rank=M``,
``init_weights=False`` → ``init="kaiming"``. ``Bone`` is an alias of :class:`MiSS` (PEFT's
former ``BoneConfig`` had the same default and ``"bat"`` variants).

Kernels with more than two axes use a :class:`~effjax.peft.layout.KernelLayout`: shards are taken
over the flattened input axes (and, for ``bat``/``mini``, the flattened output axes); the
balance block is ``(*batch, r, *out)``, the mini block ``(*batch, r, m)`` and the bat blocks
``(*batch, n_out / r, r, r)``.

Sharding: balance and mini are elementwise additions of a (tiled) block and keep the kernel's
sharding. bat multiplies within :math:`r \times r` blocks; when every device holds whole blocks
(the per-device extent of the input and output dimensions is a multiple of :math:`r`) the
result stays sharded like the kernel, otherwise XLA moves data between devices and picks the
output's sharding itself.

References:
  Kang, Yin, "Bone: Block-Affine Adaptation of Large Language Models" (v1), later "DiSHA" and
  "MiSS: Balancing LoRA Performance and Efficiency with Simple Shard Sharing", arXiv:2409.15371.
  Official code: https://github.com/JL-er/MiSS.
  Hugging Face PEFT, ``src/peft/tuners/miss/{config,layer}.py`` (v0.21).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from effjax.compress import dense_weight
from effjax.peft._checks import check_int, check_rank
from effjax.peft.base import AdapterNode, KernelAdapter, adapter_node, register_adapter
from effjax.peft.layout import KernelLayout, place_like

__all__ = ["MiSS", "Bone", "MiSSWeight"]

_VARIANTS = ("balance", "bat", "mini")
_INITS = ("zeros", "kaiming")


@register_adapter("miss")
@dataclasses.dataclass(frozen=True, kw_only=True)
class MiSS(KernelAdapter):
    """MiSS method config (a rule value of :func:`effjax.peft.inject`); ``Bone`` is an alias.

    ``balance``: :math:`W'_{io} = W_{io} + D_{(i \\bmod r), o}`; ``mini``:
    :math:`W'_{io} = W_{io} + D_{(i \\bmod r), (o \\bmod m)}`; ``bat``:
    :math:`W'_{ca} = W_{ca} + b_a (W_{ca} + I)` on :math:`r \\times r` blocks. Trainable
    parameters :math:`n_{batch}\\, r\\, n_{out}` (balance, bat) or :math:`n_{batch}\\, r\\, m`
    (mini). See the module docstring for the equations, PEFT's names and references.

    Attributes:
      rank: :math:`r \\ge 1`, the shard height along the input (PEFT's ``r``; default 64);
        at most :math:`n_{in}`.
      variant: ``"balance"`` (default), ``"bat"`` or ``"mini"`` (PEFT's ``init_weights``).
      mini_rank: :math:`m` for ``variant="mini"`` (PEFT's ``mini_r``; default 1); must divide
        :math:`n_{out}`.
      init: ``"zeros"`` (PEFT's default, :math:`W' = W` at init) or ``"kaiming"`` (PEFT's
        ``init_weights=False``; balance only).
      dtype, in_axes, out_axes, batch_axes: as every :class:`~effjax.peft.KernelAdapter`
        (``dtype``: of the trainable block).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> node = MiSS(rank=2).adapt(jax.random.key(0), jnp.ones((5, 3)))
      >>> node.block.shape, bool(jnp.all(node.materialize() == 1.0))  # D = 0: W' = W
      ((2, 3), True)
      >>> d = jnp.array([[1., 2., 3.], [10., 20., 30.]])
      >>> node.replace(block=d).materialize() - 1.0  # D repeated over the input shards
      Array([[ 1.,  2.,  3.],
             [10., 20., 30.],
             [ 1.,  2.,  3.],
             [10., 20., 30.],
             [ 1.,  2.,  3.]], dtype=float32)
      >>> MiSS(rank=2).num_trainable((5, 3)), MiSS(rank=2, variant="mini").num_trainable((5, 3))
      (6, 2)
      >>> MiSS(rank=2, variant="bat").adapt(jax.random.key(0), jnp.ones((4, 6))).block.shape
      (3, 2, 2)
    """

    rank: int = 64
    variant: str = "balance"
    mini_rank: int = 1
    init: str = "zeros"

    def __post_init__(self):
        super().__post_init__()
        self._set(rank=check_rank(self.rank, "MiSS"),
                  mini_rank=check_int(self.mini_rank, "mini_rank", 1, "MiSS"))
        if self.variant not in _VARIANTS:
            raise ValueError(f"MiSS variant must be one of {_VARIANTS}, got {self.variant!r}")
        if self.init not in _INITS:
            raise ValueError(f"MiSS init must be one of {_INITS}, got {self.init!r}")
        if self.init == "kaiming" and self.variant != "balance":
            raise ValueError(f"MiSS init='kaiming' (PEFT's init_weights=False) exists only for "
                             f"variant='balance'; variant={self.variant!r} starts at zero")
        if self.variant != "mini" and self.mini_rank != 1:
            raise ValueError(f"MiSS mini_rank={self.mini_rank} is only used with "
                             f"variant='mini', got variant={self.variant!r}")

    def _check(self, lay: KernelLayout) -> None:
        r = self.rank
        if r > lay.n_in:
            raise ValueError(f"MiSS rank={r} must be <= n_in = {lay.n_in} for a kernel of "
                             f"shape {lay.shape}")
        if self.variant == "bat" and (lay.n_in % r or lay.n_out % r):
            raise ValueError(f"MiSS variant='bat' needs n_in = {lay.n_in} and n_out = "
                             f"{lay.n_out} divisible by rank={r} (r x r blocks) for a kernel "
                             f"of shape {lay.shape}")
        if self.variant == "mini" and lay.n_out % self.mini_rank:
            raise ValueError(f"MiSS variant='mini' needs n_out = {lay.n_out} divisible by "
                             f"mini_rank={self.mini_rank} for a kernel of shape {lay.shape}")

    def block_shape(self, lay: KernelLayout) -> tuple[int, ...]:
        """Shape of the trainable block for a kernel of layout ``lay`` (batch axes first)."""
        r = self.rank
        if self.variant == "mini":
            return lay.batch_shape + (r, self.mini_rank)
        if self.variant == "bat":
            return lay.batch_shape + (lay.n_out // r, r, r)
        return lay.batch_shape + (r,) + lay.out_shape

    def num_trainable(self, shape: Sequence[int]) -> int:
        """:math:`n_{batch}\\, r\\, n_{out}` (balance, bat) or :math:`n_{batch}\\, r\\, m`
        (mini)."""
        lay = self.layout(shape)
        self._check(lay)
        return math.prod(self.block_shape(lay))

    def adapt(self, key: jax.Array, w: jax.Array) -> MiSSWeight:
        """The zero block (or, with ``init="kaiming"``, :math:`U(\\pm 1/\\sqrt{n_{out}})` from
        ``key``) on ``w``'s devices; the balance block is sharded like ``w``'s output axes."""
        lay = self.layout(w.shape)
        self._check(lay)
        dtype, shape = self.adapter_dtype(w.dtype), self.block_shape(lay)
        if self.init == "kaiming":  # torch kaiming_uniform_(a=sqrt(5)) on (r, out): fan_in out
            bound = 1.0 / math.sqrt(lay.n_out)
            gen = jnp.promote_types(dtype, jnp.float32)
            block = jax.random.uniform(key, shape, gen, -bound, bound).astype(dtype)
        else:
            block = jnp.zeros(shape, dtype)
        if self.variant == "balance":
            dims = lay.batch_axes + (None,) + lay.out_axes
        else:
            dims = lay.batch_axes + (None,) * (len(shape) - len(lay.batch_axes))
        return MiSSWeight(w=w, block=place_like(block, w, dims), method=self, layout=lay)


Bone = MiSS


@adapter_node
class MiSSWeight(AdapterNode):
    """A kernel with a MiSS adapter: frozen ``w``, trainable ``block``.

    ``materialize()``: ``w`` plus the block repeated over the input shards (balance; also over
    the output for mini), or :math:`W_{ca} + b_a (W_{ca} + I)` per :math:`r \\times r` block
    (bat); in ``w``'s shape and dtype (computed in the promoted dtype of ``w`` and ``block``).

    Attributes:
      w: the frozen kernel.
      block: trainable; ``(*batch, r, *out)`` (balance: PEFT's ``miss_block``),
        ``(*batch, r, m)`` (mini: PEFT's ``miss_block``) or ``(*batch, n_out / r, r, r)``
        (bat: ``block[a]`` is PEFT's ``miss_block[a]`` transposed).
      method: the :class:`MiSS` config (static).
      layout: the kernel's :class:`~effjax.peft.layout.KernelLayout` (static).
    """

    trainable_fields = ("block",)
    frozen_fields = ("w",)

    w: jax.Array
    block: jax.Array
    method: MiSS
    layout: KernelLayout

    def _tiled(self, ct) -> jax.Array:
        """balance / mini: the block repeated to ``(*batch, n_in, n_out)``."""
        lay, r = self.layout, self.method.rank
        d = self.block.reshape(lay.batch_shape + (r, -1)).astype(ct)
        if self.method.variant == "mini":
            d = jnp.tile(d, (1,) * len(lay.batch_shape) + (1, lay.n_out // d.shape[-1]))
        d = jnp.tile(d, (1,) * len(lay.batch_shape) + (-(-lay.n_in // r), 1))
        return d[..., :lay.n_in, :]

    def _bat(self, ct) -> jax.Array:
        """bat: :math:`W_{ca} + b_a (W_{ca} + I)` as ``(*batch, n_in, n_out)``."""
        lay, r = self.layout, self.method.rank
        m = lay.to_matrix(dense_weight(self.w)).astype(ct)
        nb = lay.batch_shape
        blocks = m.reshape(nb + (lay.n_in // r, r, lay.n_out // r, r))  # (..., c, s, a, p)
        b = self.block.astype(ct)  # (..., a, q, s)
        new = blocks + jnp.einsum("...aqs,...csap->...cqap", b, blocks) + jnp.einsum(
            "...aqp->...qap", b)[..., None, :, :, :]
        return new.reshape(nb + (lay.n_in, lay.n_out))

    def _dense(self) -> jax.Array:
        """:math:`W'` (see the class docs), cast to ``w.dtype`` (compiled by the default
        ``materialize``)."""
        ct = jnp.promote_types(self.w.dtype, self.block.dtype)
        if self.method.variant == "bat":
            return self.layout.from_matrix(self._bat(ct)).astype(self.w.dtype)
        d = self.layout.from_matrix(self._tiled(ct))
        return (dense_weight(self.w).astype(ct) + d).astype(self.w.dtype)
