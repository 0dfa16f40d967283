"""Fira: GaLore plus the scaled full-rank residual and a norm-growth limiter.

GaLore (:mod:`effjax.optim.galore`) discards the part of the gradient outside the projector's
subspace. Fira adds it back, scaled like the inner optimizer scales the low-rank part, and
limits how fast that added term may grow. For a projected leaf with low-rank gradient ``R_t``
(``P^T G_t`` or ``G_t Q^T``) and inner output ``rho(R_t)``:

    phi_t   = ||rho(R_t)||_i / (||R_t||_i + 1e-8)            one ratio per index i
    S_t     = phi_t * (G_t - alpha * back(R_t))              back(R) = P R  or  R Q
    S_t    <- S_t / (max(||S_t|| / (||S_{t-1}|| + 1e-8), gamma) / gamma)   (t > 1)
    u_t     = alpha * back(rho(R_t)) + S_t

``||.||_i`` is the norm across the projected (low-rank) axis, one value per index of the other
axis: per column of ``G`` for a left projection (R is r x n), per row for a right one (R is
m x r), as in the official code (its ``norm_dim`` rule, on 'std' projections); with
``proj_type='full'`` the ratio is one number per matrix. ``||S||`` is the Frobenius norm of
the whole matrix (of each matrix with ``stacked=True``) and ``||S_{t-1}||`` is the norm of the
previous *limited* residual, kept in :class:`FiraState` (``residual_norm``); it is not reset on
a projector refresh. The limiter is off on the first step and when ``gamma=None``.

Official-code details reproduced (xichen-fy/Fira ``optimizer_torch/fira_adamw.py``,
``gradient_projection.py``): the residual subtracts ``alpha * P P^T G`` (the projector's
``project_back`` includes the scale), so with ``alpha = 0.25`` it keeps 3/4 of the in-subspace
gradient, where the paper writes ``G - P R``; the two agree when ``scale=1``. ``phi`` and the
limiter use the Adam output *before* Adam's bias correction ``c_t = sqrt(1-b2^t)/(1-b1^t)``,
which the official code folds into the step size applied to the whole update. :func:`fira_adamw`
reproduces that by running the uncorrected Adam inside and multiplying by ``c_t`` after. With a
generic ``inner`` the limiter compares norms in the inner's output scale: put learning rates
and schedules *after* ``fira`` (as ``fira_adamw`` does), or the limiter would also limit a
learning-rate warm-up.

Non-finite gradients, the sign convention, pass-through leaves, ``stacked`` and the inner's
``params=None`` follow :mod:`effjax.optim.galore`. Differences from the official code besides
GaLore's: ``phi`` for forced ``'left'``/``'right'`` projections always takes the norm across
the low-rank axis (the official shape rule can pick the other axis there and then fails to
broadcast), and ``gamma`` (hard-coded 1.01 there) is an argument.

Reference: Chen et al., "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank
Constraint?", 2024 (arXiv:2410.01623).

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> from effjax.optim import fira_adamw
  >>> params = {"w": jnp.zeros((64, 32)), "b": jnp.zeros((32,))}
  >>> opt = fira_adamw(1e-3, rank=8)
  >>> state = opt.init(params)
  >>> state[0].inner_state.mu["w"].shape, state[0].residual_norm["w"].shape
  ((64, 8), ())
  >>> grads = {"w": jax.random.normal(jax.random.key(0), (64, 32)), "b": jnp.ones((32,))}
  >>> updates, state = opt.update(grads, state, params)
"""


from typing import Any

import jax
import numpy as np
import optax

from effjax.optim._galore import (
    FiraState,
    adam_bias_correction,
    low_rank_transform,
    scale_by_adam_uncorrected,
)

__all__ = ["FiraState", "fira", "fira_adamw"]


def _check_gamma(gamma):
    if gamma is None or isinstance(gamma, jax.Array):
        return
    if (not isinstance(gamma, (int, float, np.integer, np.floating)) or isinstance(gamma, bool)
            or not np.isfinite(gamma) or gamma <= 0):
        raise ValueError(f"fira: gamma must be a finite number > 0 (or None), got {gamma!r}")


def fira(
    inner: optax.GradientTransformation | None = None,
    *,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    gamma: float | None = 1.01,
    proj_type: str = "std",
    projection_mask: Any = None,
    stacked: bool = False,
    row_axes: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Fira around ``inner``: GaLore's update plus the limited, scaled residual ``S_t``.

    Args:
      inner: optimizer on the low-rank gradients (default ``optax.scale_by_adam()``); keep
        learning rates out of it (see the module docstring).
      rank, update_proj_gap, scale, proj_type, projection_mask, stacked, row_axes: as in
        :func:`effjax.optim.galore`.
      gamma: the norm-growth limit ``||S_t|| <= gamma ||S_{t-1}||`` (paper and official: 1.01);
        ``None`` turns the limiter off.

    Returns:
      A ``GradientTransformationExtraArgs`` with a :class:`FiraState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from effjax.optim import fira
      >>> opt = optax.chain(fira(rank=4), optax.scale_by_learning_rate(1e-2))
      >>> params = {"w": jnp.zeros((16, 32))}
      >>> state = opt.init(params)
      >>> g = {"w": jax.random.normal(jax.random.key(0), (16, 32))}
      >>> updates, state = opt.update(g, state, params)
      >>> state[0].left["w"].shape  # 'std', m < n: left projection
      (16, 4)
    """
    _check_gamma(gamma)
    return low_rank_transform(inner, rank=rank, update_proj_gap=update_proj_gap, scale=scale,
                              proj_type=proj_type, projection_mask=projection_mask,
                              stacked=stacked, fira=True, gamma=gamma, where="fira",
                              row_axes=row_axes)


def fira_adamw(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    gamma: float | None = 1.01,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    mask: Any = None,
    *,
    proj_type: str = "std",
    projection_mask: Any = None,
    stacked: bool = False,
    row_axes: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """The official ``FiraAdamW`` step as an optax chain.

    ``u = -lr * (c_t * (alpha P N + S_t) + wd * p)`` with ``N = m / (sqrt(v) + eps)`` (moments of
    ``R = P^T G``), ``S_t`` the limited residual computed from ``N`` and ``R`` (module
    docstring) and ``c_t = sqrt(1 - b2^t) / (1 - b1^t)``; passed-through leaves take the official
    Adam step ``c_t N``. Defaults are the official ones (eps 1e-6, no weight decay, gamma 1.01)
    and the paper's rank 128, gap 200, scale 0.25. Weight decay is optax's decoupled decay.

    Example:
      >>> import jax.numpy as jnp
      >>> from effjax.optim import fira_adamw
      >>> opt = fira_adamw(1e-3, rank=8, update_proj_gap=50)
      >>> state = opt.init({"w": jnp.zeros((32, 64))})
      >>> state[0].inner_state.nu["w"].shape
      (8, 64)
    """
    _check_gamma(gamma)
    return optax.chain(
        low_rank_transform(scale_by_adam_uncorrected(b1, b2, eps), rank=rank,
                           update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
                           projection_mask=projection_mask, stacked=stacked, fira=True,
                           gamma=gamma, where="fira_adamw", row_axes=row_axes),
        adam_bias_correction(b1, b2),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
