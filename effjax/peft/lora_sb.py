"""LoRA-SB: LoRA-XS's architecture initialized from the first full fine-tuning update (Ponkshe,
Singhal et al., 2024).

LoRA-SB keeps LoRA-XS's architecture (two frozen projections and a trainable
:math:`r \\times r` matrix :math:`R` between them) but initializes it so that the adapter starts
at the best rank-:math:`r` approximation of the **first step of full fine-tuning**, computed
from a gradient batch. For a Flax kernel :math:`W \\in \\mathbb{R}^{n_{in} \\times n_{out}}`
(``y = x W``) with the (averaged) loss gradient :math:`G = \\partial L / \\partial W` on a few
calibration batches:

.. math::

  \\Delta W_1 = -\\eta\\, \\mathcal A(G), \\qquad
  \\Delta W_1 = U \\Sigma V^\\top \\;\\text{(SVD)}, \\qquad
  A = U_r,\\; R = \\Sigma_r / s,\\; B = V_r^\\top,

  W' = W + s\\, A R B \\quad (A, B \\text{ frozen}, R \\text{ trainable}),

so :math:`s\\,ARB = U_r \\Sigma_r V_r^\\top` is the best rank-:math:`r` approximation (Eckart-Young)
of the first full fine-tuning update, independent of :math:`s`. :math:`\\mathcal A` is the first
step of the full-FT optimizer: ``first_step="adam"`` (default, the official code's
``-lr * sign(grad)``: Adam's bias-corrected first update :math:`\\hat m_1 / \\sqrt{\\hat v_1}`
is :math:`G / |G| = \\mathrm{sign}(G)` up to :math:`\\epsilon`) or ``"sgd"``
(:math:`\\mathcal A(G) = G`). :math:`\\eta` (``lr``) is the learning rate of that first step; the
official code uses the first linear-warmup step's rate, ``peak_lr / warmup_steps``.

Because :math:`A` and :math:`B` have orthonormal columns / rows, an update of :math:`R` by its
gradient :math:`g^R = s A^\\top G B^\\top` moves :math:`W'` by :math:`s^2 A A^\\top (\\cdot) B^\\top
B`: the full-FT update projected onto the fixed rank-:math:`r` subspaces (the paper's
"equivalent gradient").

**The base weight at init.** Following the paper and the official code
(``find_and_initialize_grad`` in github.com/RaghavSinghal10/lora-sb, which replaces the LoRA
factors and never touches the base weight), ``w`` is kept as is, so right after injection
:math:`W' = W + \\mathrm{trunc}_r(\\Delta W_1) \\neq W`: the init *is* the approximated first
step. ``residual=True`` instead stores :math:`W - s\\,ARB` as the frozen ``w`` (as PiSSA /
LoRA-GA do), so that :math:`W' = W` at init up to float rounding while :math:`A, B, R` are
the same.

Trainable parameters per kernel: :math:`r^2`, times the number of slices for stacked kernels
(``batch_axes``; each slice gets the SVD of its own slice of :math:`\\Delta W_1`). The scale
defaults to :math:`s = 1` (``alpha=None``; the official scripts set ``lora_alpha = r``).

LoRA-SB is data-driven: its class attribute ``calibration = "gradients"`` makes
:func:`effjax.peft.inject` pass the leaf's entry of ``calibration`` as
``adapt(key, w, data=G)``; :func:`effjax.peft.gradients.gradient_calibration` builds that
mapping (the mean gradient over batches) from a loss function.

The official code uses torch's randomized ``svd_lowrank(q=r, niter=10)`` and rounds the factors
to bfloat16; effjax computes the exact truncated SVD in float32 (or the kernel's wider dtype)
and stores the factors in the adapter dtype. In the official code the latent ``nn.Linear``
weight is :math:`\\Sigma_r` and PEFT's scaling :math:`\\alpha / r = 1`; effjax divides by
:math:`s` so that :math:`s\\,ARB` is the truncated update for any ``alpha``.

References:
  Ponkshe, Singhal, Gorbunov, Tumanov, Horvath, Vepakomma, "Initialization using Update
  Approximation is a Silver Bullet for Extremely Efficient Low-Rank Fine-Tuning",
  arXiv:2411.19557, 2024. Official code: github.com/RaghavSinghal10/lora-sb.
  Bałazy et al., "LoRA-XS", arXiv:2405.17604, 2024 (the architecture).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from effjax.peft._checks import check_alpha, check_bool, check_number, check_rank
from effjax.peft.base import KernelAdapter, adapter_node, register_adapter
from effjax.peft.layout import place_like
from effjax.peft.lora_xs import (
    LoRAXSWeight,
    place_factors,
    truncated_svd,
)

__all__ = ["LoRASB", "LoRASBWeight"]

_FIRST_STEPS = ("adam", "sgd")


@register_adapter("lora_sb")
@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRASB(KernelAdapter):
    """LoRA-SB method config (a rule value of :func:`effjax.peft.inject`, with
    ``calibration={path: gradient}``).

    :math:`W' = W + s\\,ARB` with :math:`s\\,ARB = \\mathrm{trunc}_r(-\\eta\\,\\mathcal A(G))`
    at init (:math:`A = U_r`, :math:`B = V_r^\\top` frozen, :math:`R = \\Sigma_r / s`
    trainable); trainable parameters :math:`n_{batch}\\, r^2`. See the module docstring.

    Attributes:
      rank: :math:`r \\ge 1`, at most :math:`\\min(n_{in}, n_{out})` (default 8).
      lr: :math:`\\eta > 0`, the learning rate of the approximated first full-FT step
        (required; e.g. ``peak_lr / warmup_steps`` with linear warmup, as the official code).
      first_step: ``"adam"`` (:math:`\\Delta W_1 = -\\eta\\,\\mathrm{sign}(G)`, official) or
        ``"sgd"`` (:math:`\\Delta W_1 = -\\eta\\, G`).
      alpha: None (:math:`s = 1`, official) or :math:`\\alpha` with :math:`s = \\alpha / r`.
      residual: False (paper / official: ``w`` kept, :math:`W' \\ne W` at init) or True
        (``w`` := :math:`W - s\\,ARB`, so :math:`W' = W` at init).
      dtype, in_axes, out_axes, batch_axes: as every :class:`~effjax.peft.KernelAdapter`
        (``dtype``: of ``a``, ``r``, ``b``).

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> w = jnp.zeros((6, 5))
      >>> g = jnp.asarray(np.random.default_rng(0).standard_normal((6, 5)), jnp.float32)
      >>> m = LoRASB(rank=5, lr=0.1, first_step="sgd")  # full rank: exactly one SGD step
      >>> node = m.adapt(jax.random.key(0), w, data=g)
      >>> node.a.shape, node.r.shape, node.b.shape, m.num_trainable((6, 5))
      ((6, 5), (5, 5), (5, 5), 25)
      >>> bool(jnp.allclose(node.materialize(), w - 0.1 * g, atol=1e-5))
      True
      >>> node = LoRASB(rank=2, lr=0.1).adapt(jax.random.key(0), w, data=g)
      >>> s = np.linalg.svd(-0.1 * np.sign(np.asarray(g)), compute_uv=False)
      >>> bool(np.allclose(np.diag(node.r), s[:2], atol=1e-5))  # R = S_r of the Adam step
      True
    """

    calibration: ClassVar[str | None] = "gradients"

    rank: int = 8
    lr: float
    first_step: str = "adam"
    alpha: float | None = None
    residual: bool = False

    def __post_init__(self):
        super().__post_init__()
        name = self.name
        self._set(rank=check_rank(self.rank, name),
                  lr=check_number(self.lr, "lr", name, positive=True),
                  alpha=check_alpha(self.alpha, name))
        if self.first_step not in _FIRST_STEPS:
            raise ValueError(f"LoRASB first_step must be one of {_FIRST_STEPS}, got "
                             f"{self.first_step!r}")
        check_bool(self.residual, "residual", name)

    @property
    def scale(self) -> float:
        """:math:`s = \\alpha / r` (1 when ``alpha`` is None)."""
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def num_trainable(self, shape: Sequence[int]) -> int:
        """:math:`n_{batch}\\, r^2`."""
        return self.layout(shape).n_batch * self.rank**2

    def first_update(self, grad: jax.Array) -> jax.Array:
        """:math:`\\Delta W_1 = -\\eta\\,\\mathcal A(G)` (same shape as ``grad``)."""
        return -self.lr * (jnp.sign(grad) if self.first_step == "adam" else grad)

    def adapt(self, key: jax.Array, w: jax.Array, data: Any = None) -> LoRASBWeight:
        """``a = U_r``, ``r = S_r / s``, ``b = V_r^T`` from the truncated SVD of each slice of
        :math:`\\Delta W_1` built from ``data`` (the leaf's loss gradient, ``w``'s shape);
        ``w`` kept (or replaced by the residual with ``residual=True``). ``key`` is unused."""
        del key
        if data is None:
            raise ValueError("LoRASB needs the leaf's loss gradient as adapt(key, w, data=grad) "
                             "(inject(..., calibration={path: grad}); see "
                             "effjax.peft.gradients.gradient_calibration)")
        g = jnp.asarray(data)
        if g.shape != w.shape:
            raise ValueError(f"LoRASB calibration gradient has shape {g.shape}, but the kernel "
                             f"has shape {w.shape}; pass the gradient of this leaf")
        if not jnp.issubdtype(g.dtype, jnp.floating):
            raise TypeError(f"LoRASB calibration gradient must be floating, got dtype {g.dtype}")
        lay = self.layout(w.shape)
        rk, s, dtype = self.rank, self.scale, self.adapter_dtype(w.dtype)
        ct = jnp.promote_types(jnp.promote_types(w.dtype, g.dtype), jnp.float32)
        delta = lay.to_matrix(self.first_update(g.astype(ct)))  # (*batch, n_in, n_out)
        u, sv, vh = truncated_svd(delta, rk, lay, "LoRASB")
        a, b = u.astype(dtype), vh.astype(dtype)
        core = jnp.zeros(lay.batch_shape + (rk, rk), ct)
        core = core.at[..., jnp.arange(rk), jnp.arange(rk)].set(sv / s).astype(dtype)
        if self.residual:  # from the stored (possibly rounded) factors, so W_res + s A R B = W
            prod = jnp.matmul(jnp.matmul(a.astype(ct), core.astype(ct)), b.astype(ct))
            w_new = lay.from_matrix(lay.to_matrix(w).astype(ct) - s * prod).astype(w.dtype)
            w_new = place_like(w_new, w, tuple(range(w.ndim)))
        else:
            w_new = w
        a = a.reshape(lay.batch_shape + lay.in_shape + (rk,))
        b = b.reshape(lay.batch_shape + (rk,) + lay.out_shape)
        a, core, b = place_factors(w, lay, a, core, b)
        return LoRASBWeight(w=w_new, a=a, r=core, b=b, method=self, layout=lay)


@adapter_node
class LoRASBWeight(LoRAXSWeight):
    """A kernel with a LoRA-SB adapter: frozen ``w``, ``a`` (:math:`U_r`), ``b``
    (:math:`V_r^\\top`), trainable ``r`` (:math:`\\Sigma_r / s` at init).

    ``materialize()`` :math:`= W + s\\,A R B` in ``w``'s shape and dtype (the LoRA-XS
    equation; see :class:`~effjax.peft.lora_xs.LoRAXSWeight` for the field shapes).
    """
