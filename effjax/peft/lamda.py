"""LaMDA: large-model fine-tuning via spectrally decomposed low-dimensional adaptation (Azizi,
Kundu, Pedram, 2024).

LaMDA puts a trainable low-dimensional square matrix :math:`S` (the "low-dimensional adapter",
LDA) between two projections of the LoRA path: the first projection (PMA) :math:`A` is frozen,
the second (PMB) :math:`B` is trainable at first and frozen gradually during the early steps of
fine-tuning, after which only :math:`S` trains. For a Flax kernel
:math:`W \\in \\mathbb{R}^{n_{in} \\times n_{out}}` (``y = x W``):

.. math::

  y = x W + s\\, x A S B, \\qquad A \\in \\mathbb{R}^{n_{in} \\times r}\\ \\text{(PMA, frozen)},
  \\quad S \\in \\mathbb{R}^{r \\times r}\\ \\text{(LDA)}, \\quad
  B \\in \\mathbb{R}^{r \\times n_{out}}\\ \\text{(PMB)},

i.e. :math:`W' = W + s\\,ASB`, with :math:`s = \\alpha / r` (``alpha=None``: :math:`s = 1`).
Trainable parameters per kernel (the fields an optimizer holds): :math:`r^2 + r\\,n_{out}`
(:math:`S` and :math:`B`), times the number of slices for stacked kernels (``batch_axes``);
once PMB is frozen only the :math:`r^2` of :math:`S` still change.

**Initialization** ("spectrally decomposed"): the paper initializes the projections with
singular vectors of the pretrained weight. With the SVD :math:`W = U \\Sigma V^\\top` and its
top-:math:`r` part, effjax sets :math:`A = U_r` (orthonormal columns), :math:`B = V_r^\\top`
(orthonormal rows) and

* ``init="svd"`` (default): :math:`S = \\Sigma_r / s` and the frozen weight becomes the residual
  :math:`W_{res} = W - s\\,ASB` (the principal part moves into the adapter, as PiSSA), so
  :math:`W' = W` up to float rounding;
* ``init="zeros"``: :math:`S = 0` and ``w`` kept, so :math:`W' = W` exactly.

The paper's text available offline (abstract, figure 1: "PMB is trainable and gradually freezes
based on the singular values; after :math:`t_i` iterations PMB is completely frozen") does not
give the initial value of :math:`S`; ``"svd"`` is the reading consistent with a spectral
decomposition of :math:`W`. The official code (github.com/ArminAzizi98/LaMDA, ``lamda.py``)
differs from the paper here: it keeps PEFT's default LoRA init (kaiming ``lora_A``, zero
``lora_B``) and ``nn.Linear``'s default init for :math:`S`.

**Gradual freezing of PMB** is an optax transform, :func:`lamda_freeze`, placed last in the
chain (``optax.chain(optax.adamw(...), lamda_freeze(t_i))``): it zeroes the updates of the
first :math:`k` rank components (rows of :math:`B`, ordered by singular value, largest first as
the official ``gradual_freeze_B``, which zeroes ``lora_B.weight.grad[:, :t]``) with

.. math::

  k(t) = \\min\\bigl(r,\\; \\lfloor t\\, r / t_i \\rfloor\\bigr)

at optimizer step :math:`t` (0-based), so component :math:`j` stops changing from step
:math:`\\lceil (j+1)\\, t_i / r \\rceil` and all of PMB from step :math:`t_i`; any other schedule
``count -> k`` can be given instead (the official trainer's is
``k = count // int(0.3 * max_steps)``). Only PMB leaves of :class:`LaMDAWeight` nodes are
touched; :math:`S`, other adapters and plain leaves pass through.

Multi-axis kernels go through a :class:`~effjax.peft.layout.KernelLayout`: ``a`` has shape
``(*batch, *in, r)``, ``s`` ``(*batch, r, r)`` and ``b`` ``(*batch, r, *out)``; each batch slice
gets its own SVD. LaMDA++'s adaptive rank allocation is not implemented.

References:
  Azizi, Kundu, Pedram, "LaMDA: Large Model Fine-Tuning via Spectrally Decomposed
  Low-Dimensional Adaptation", Findings of EMNLP 2024, arXiv:2406.12832. Official code:
  github.com/ArminAzizi98/LaMDA.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from effjax.peft._checks import check_alpha, check_rank
from effjax.peft.base import AdapterNode, KernelAdapter, adapter_node, register_adapter
from effjax.peft.layout import KernelLayout, place_like
from effjax.peft.lora_xs import (
    place_factors,
    three_factor_delta,
    truncated_svd,
)

__all__ = ["LaMDA", "LaMDAWeight", "lamda_freeze", "LaMDAFreezeState", "frozen_components"]

_INITS = ("svd", "zeros")
_ORDERS = ("largest_first", "smallest_first")


@register_adapter("lamda")
@dataclasses.dataclass(frozen=True, kw_only=True)
class LaMDA(KernelAdapter):
    """LaMDA method config (a rule value of :func:`effjax.peft.inject`).

    :math:`W' = W + s\\,ASB` with PMA :math:`A = U_r` frozen, LDA :math:`S` and PMB
    :math:`B = V_r^\\top` trainable (freeze PMB with :func:`lamda_freeze`); trainable
    parameters :math:`n_{batch}\\,(r^2 + r\\,n_{out})`. See the module docstring.

    Attributes:
      rank: :math:`r \\ge 1`, at most :math:`\\min(n_{in}, n_{out})` (default 8).
      alpha: None (:math:`s = 1`) or :math:`\\alpha` with :math:`s = \\alpha / r`.
      init: ``"svd"`` (:math:`S = \\Sigma_r / s`, ``w`` := :math:`W - s\\,ASB`) or ``"zeros"``
        (:math:`S = 0`, ``w`` kept).
      dtype, in_axes, out_axes, batch_axes: as every :class:`~effjax.peft.KernelAdapter`
        (``dtype``: of ``a``, ``s``, ``b``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> w = jax.random.normal(jax.random.key(1), (6, 5))
      >>> node = LaMDA(rank=2).adapt(jax.random.key(0), w)
      >>> node.a.shape, node.s.shape, node.b.shape
      ((6, 2), (2, 2), (2, 5))
      >>> LaMDA(rank=2).num_trainable((6, 5))  # r^2 + r n_out
      14
      >>> bool(jnp.allclose(node.materialize(), w, atol=1e-5))  # W_res + A S B = W
      True
      >>> bool(jnp.allclose(node.a.T @ node.a, jnp.eye(2), atol=1e-5))  # PMA = U_r
      True
    """

    rank: int = 8
    alpha: float | None = None
    init: str = "svd"

    def __post_init__(self):
        super().__post_init__()
        self._set(rank=check_rank(self.rank, self.name), alpha=check_alpha(self.alpha, self.name))
        if self.init not in _INITS:
            raise ValueError(f"LaMDA init must be one of {_INITS}, got {self.init!r}")

    @property
    def scale(self) -> float:
        """:math:`s = \\alpha / r` (1 when ``alpha`` is None)."""
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def num_trainable(self, shape: Sequence[int]) -> int:
        """:math:`n_{batch}\\,(r^2 + r\\,n_{out})`."""
        lay = self.layout(shape)
        return lay.n_batch * (self.rank**2 + self.rank * lay.n_out)

    def adapt(self, key: jax.Array, w: jax.Array) -> LaMDAWeight:
        """``a = U_r``, ``b = V_r^T`` from the truncated SVD of each slice of ``w`` (float32 or
        wider); ``s = S_r / s`` and the residual ``w`` (``init="svd"``) or ``s = 0`` and ``w``
        kept (``init="zeros"``). ``key`` is unused."""
        del key
        lay = self.layout(w.shape)
        rk, sc, dtype = self.rank, self.scale, self.adapter_dtype(w.dtype)
        ct = jnp.promote_types(w.dtype, jnp.float32)
        m = lay.to_matrix(w).astype(ct)
        u, sv, vh = truncated_svd(m, rk, lay, "LaMDA")
        a, b = u.astype(dtype), vh.astype(dtype)
        core = jnp.zeros(lay.batch_shape + (rk, rk), ct)
        w_new = w
        if self.init == "svd":
            core = core.at[..., jnp.arange(rk), jnp.arange(rk)].set(sv / sc).astype(dtype)
            # the residual from the stored (possibly rounded) factors, so W_res + s A S B = W
            prod = jnp.matmul(jnp.matmul(a.astype(ct), core.astype(ct)), b.astype(ct))
            w_new = lay.from_matrix(m - sc * prod).astype(w.dtype)
            w_new = place_like(w_new, w, tuple(range(w.ndim)))
        core = core.astype(dtype)
        a = a.reshape(lay.batch_shape + lay.in_shape + (rk,))
        b = b.reshape(lay.batch_shape + (rk,) + lay.out_shape)
        a, core, b = place_factors(w, lay, a, core, b)
        return LaMDAWeight(w=w_new, a=a, s=core, b=b, method=self, layout=lay)


@adapter_node
class LaMDAWeight(AdapterNode):
    """A kernel with a LaMDA adapter: frozen ``w`` and PMA ``a``, trainable LDA ``s`` and PMB
    ``b`` (freeze ``b`` on a schedule with :func:`lamda_freeze`).

    ``materialize()`` :math:`= W + s\\,A S B` in ``w``'s shape and dtype (computed in the
    promoted dtype of ``w`` and ``s``, then cast to ``w.dtype``).

    Attributes:
      w: the frozen kernel (the residual with ``init="svd"``).
      a: ``(*batch, *in, r)``, frozen PMA (:math:`U_r`).
      s: ``(*batch, r, r)``, trainable LDA.
      b: ``(*batch, r, *out)``, trainable PMB (:math:`V_r^\\top` at init); axis
        ``len(batch_shape)`` indexes the rank components that :func:`lamda_freeze` freezes.
      method: the :class:`LaMDA` config (static).
      layout: the kernel's :class:`~effjax.peft.layout.KernelLayout` (static).
    """

    trainable_fields = ("s", "b")
    frozen_fields = ("w", "a")

    w: jax.Array
    a: jax.Array
    s: jax.Array
    b: jax.Array
    method: LaMDA
    layout: KernelLayout

    @property
    def scale(self) -> float:
        """:math:`s`, from the config."""
        return self.method.scale

    @property
    def rank(self) -> int:
        return self.s.shape[-1]

    def delta(self) -> jax.Array:
        """:math:`s\\,A S B` in ``w``'s layout (promoted dtype)."""
        ct = jnp.promote_types(self.w.dtype, self.s.dtype)
        return three_factor_delta(self.layout, self.a, self.s, self.b, self.scale, ct)

    def materialize(self) -> jax.Array:
        """:math:`W + s\\,A S B`, cast to ``w.dtype``."""
        return self._dense()  # op by op, not jit_dense: see LoRAWeight.materialize


def frozen_components(count: Any, rank: int,
                      freeze_steps: int | Callable[[jax.Array], Any]) -> jax.Array:
    """How many PMB rank components are frozen at optimizer step ``count`` (0-based).

    ``freeze_steps`` an int :math:`t_i`: :math:`\\min(r, \\lfloor t\\,r / t_i \\rfloor)` (all
    frozen from step :math:`t_i`); a callable: ``freeze_steps(count)`` clipped to
    :math:`[0, r]`.

    Example:
      >>> [int(frozen_components(t, 3, 6)) for t in range(8)]
      [0, 0, 1, 1, 2, 2, 3, 3]
    """
    count = jnp.asarray(count, jnp.int32)
    if callable(freeze_steps):
        k = jnp.asarray(freeze_steps(count))
        return jnp.clip(jnp.floor(k).astype(jnp.int32), 0, rank)
    return jnp.minimum(count, freeze_steps) * rank // freeze_steps


class LaMDAFreezeState(NamedTuple):
    """State of :func:`lamda_freeze`: the number of updates applied so far."""

    count: jax.Array


def _check_freeze_steps(freeze_steps: Any) -> None:
    if callable(freeze_steps):
        return
    if isinstance(freeze_steps, bool) or not isinstance(freeze_steps, int):
        raise TypeError(f"lamda_freeze freeze_steps must be an int (t_i) or a callable "
                        f"count -> number of frozen components, got {freeze_steps!r}")
    if freeze_steps < 1:
        raise ValueError(f"lamda_freeze freeze_steps must be >= 1, got {freeze_steps}")


def lamda_freeze(freeze_steps: int | Callable[[jax.Array], Any], *,
                 order: str = "largest_first") -> optax.GradientTransformation:
    """LaMDA's gradual freezing of PMB: zero the updates of the frozen PMB rank components.

    Put it **last** in the chain, after the optimizer (and its weight decay), so a frozen
    component's final update is exactly zero: ``optax.chain(optax.adamw(lr), lamda_freeze(t_i))``.
    At step ``count`` (0-based) the first :math:`k` = :func:`frozen_components` ``(count, r,
    freeze_steps)`` components along PMB's rank axis get a zero update (``order="largest_first"``,
    the official order: components of the largest singular values first; ``"smallest_first"``:
    from the last one). Works on the full adapted tree or on the trainable half from
    :func:`effjax.peft.split`: it rewrites the ``b`` field of every :class:`LaMDAWeight` node of
    the updates and leaves every other leaf alone. (The optimizer's moments of frozen components
    still update; only the parameters stop changing.)

    Args:
      freeze_steps: :math:`t_i`, the step from which all of PMB is frozen (linear schedule), or
        a callable ``count -> number of frozen components`` (jit-traceable).
      order: ``"largest_first"`` or ``"smallest_first"``.

    Returns:
      An optax ``GradientTransformation`` with state :class:`LaMDAFreezeState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from effjax.peft import inject, split
      >>> tree = inject({'k': jax.random.normal(jax.random.key(0), (4, 3))},
      ...               {'k': LaMDA(rank=2)}, key=jax.random.key(0))
      >>> trainable, _ = split(tree)
      >>> tx = lamda_freeze(2)
      >>> ones = jax.tree.map(jnp.ones_like, trainable)
      >>> u, st = tx.update(ones, tx.init(trainable))  # step 0: nothing frozen
      >>> u, st = tx.update(ones, st)  # step 1: component 0 frozen
      >>> u['k'].b
      Array([[0., 0., 0.],
             [1., 1., 1.]], dtype=float32)
      >>> bool(jnp.all(u['k'].s == 1))  # S keeps training
      True
    """
    _check_freeze_steps(freeze_steps)
    if order not in _ORDERS:
        raise ValueError(f"lamda_freeze order must be one of {_ORDERS}, got {order!r}")

    def init_fn(params):
        del params
        return LaMDAFreezeState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        del params

        def fix(x):
            if not isinstance(x, LaMDAWeight) or getattr(x.b, "ndim", None) is None:
                return x
            nb = len(x.layout.batch_axes)
            r = x.b.shape[nb]
            k = frozen_components(state.count, r, freeze_steps)
            idx = jnp.arange(r)
            frozen = idx < k if order == "largest_first" else idx >= r - k
            frozen = frozen.reshape((1,) * nb + (r,) + (1,) * (x.b.ndim - nb - 1))
            return x.replace(b=jnp.where(frozen, jnp.zeros_like(x.b), x.b))

        updates = jax.tree.map(fix, updates, is_leaf=lambda x: isinstance(x, AdapterNode))
        return updates, LaMDAFreezeState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)
