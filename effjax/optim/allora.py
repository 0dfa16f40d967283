"""ALLoRA: LoRA without dropout and scaling factor, with a norm-adaptive learning rate.

Huang & Balestriero, "ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws",
arXiv:2410.09692v1 (2024), Sec. 4.2 and Appendix F (Listing 1). With ``f(x) = B A x``,
``B``: ``(n1, r)``, ``A``: ``(r, n2)`` and ``g_i`` the row of ``dL/d(BA)`` for output ``i``, the
paper defines ALLoRA as

    f~ = I o f,     g~_i = 1 / sqrt(||(BA)_{i,:}|| + 1/eta^2) * g_i,   i in [n1]

"where eta is a hyperparameter": the forward pass has no dropout and no ``alpha / r`` factor, and
the gradient is rescaled per output unit by the unsquared L2 norm of that unit's row of ``BA``.
At ``B = 0`` the coefficient is its maximum ``eta`` (Sec. 4.2: it "reaches maximum eta at
||(BA)_{i,:}|| = 0 and then tapers down"), so ``eta`` takes the place of LoRA's scaling factor in
the first steps. Only the gradients of ``A`` and ``B`` are rescaled: "We only modify the gradients
of A and B, but not that of the input." The paper's Listing 1 computes exactly this
(``norms = torch.norm(weight_B @ weight_A, dim=1)``, ``1. / torch.sqrt(norms + rsq_scale)``
with ``rsq_scale = 1/eta^2 = 1/4``, applied to ``grad_output`` before it forms the gradients of
``A`` and ``B``; ``grad_input`` unscaled). The coefficient depends on the weights only, the same
for every sample (the output-dependent, per-sample variant ALLoRA-OD of Sec. 4.3 is not
implemented). The experiments use ``eta^2 in {1, 2, 4}`` with a base learning rate ``1e-4``
(Sec. 4.4-4.5, Table 1 uses ``eta = 1``; Listing 1 ``eta = 2``); the paper's code is at
github.com/rbalestr-lab/allora (its footnote 1).

In a Flax ``(in, out)`` kernel ``dW = A B`` (``A``: ``(in, r)``, ``B``: ``(r, out)``) the paper's
row ``(BA)_{i,:}`` is column ``i`` of ``dW``, so here

    c_i = 1 / sqrt(||dW[:, i]||_2 + 1 / eta^2)

Two entry points:

* :func:`allora_lora_delta` -- the method itself: ``x @ A @ B`` whose backward pass applies
  ``c_i`` to the output gradient before it forms the gradients of ``A`` and ``B``.
* :func:`scale_by_inverse_param_norm` -- the same coefficient as an optax transformation on
  each parameter leaf, with the leaf's own norm per output slice in place of ``dW``'s, for
  chains that cannot change the model's backward pass. This is an approximation, not the
  paper's rule. Use it on adapter leaves only (``optax.masked``).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from effjax.optim._checks import check_params_like_updates, leaf_name

__all__ = ["allora_coefficient", "allora_lora_delta", "scale_by_inverse_param_norm"]


def _check_eta(eta) -> None:
    if isinstance(eta, (int, float, np.number)) and not isinstance(eta, bool):
        if not np.isfinite(eta) or eta <= 0:
            raise ValueError(f"eta must be a finite number > 0, got {eta!r}")
    elif not isinstance(eta, jax.Array):
        raise TypeError(f"eta must be a float (or a scalar array), got {type(eta).__name__}")


def allora_coefficient(norm, eta):
    """ALLoRA's gradient coefficient ``1 / sqrt(norm + 1 / eta^2)`` (Section 4.2), in float32.

    ``norm`` is an L2 norm (>= 0); the coefficient is ``eta`` at ``norm = 0`` and decreases
    monotonically.

    Example:
      >>> from effjax.optim.allora import allora_coefficient
      >>> float(allora_coefficient(0.0, eta=4.0)), float(allora_coefficient(0.9375, eta=4.0))
      (4.0, 1.0)
    """
    norm = jnp.asarray(norm, jnp.float32)
    eta = jnp.asarray(eta, jnp.float32)
    return jax.lax.rsqrt(norm + 1.0 / (eta * eta))


# ------------------------------------------------------------------ the method: custom backward


def _column_norms(a, b):
    """``||(a @ b)[:, j]||_2`` for every column j without forming ``a @ b`` (in x out).

    ``||a b_j||^2 = b_j^T (a^T a) b_j``: O(r^2 (in + out)) instead of O(in * r * out).
    """
    a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
    gram = a32.T @ a32
    sq = jnp.sum(b32 * (gram @ b32), axis=0)
    return jnp.sqrt(jnp.maximum(sq, 0.0))


@jax.custom_vjp
def _allora_delta(x, a, b, eta):
    return (x @ a) @ b


def _allora_fwd(x, a, b, eta):
    return (x @ a) @ b, (x, a, b, eta)


def _allora_bwd(res, g):
    x, a, b, eta = res
    coef = allora_coefficient(_column_norms(a, b), eta)  # (out,), a constant of the backward
    grad_x = (g @ b.T) @ a.T  # unscaled: earlier layers see the plain gradient
    gs = (g.astype(jnp.float32) * coef).astype(g.dtype)
    xf = x.reshape(-1, x.shape[-1])
    gf = gs.reshape(-1, gs.shape[-1])
    grad_a = xf.T @ (gf @ b.T)
    grad_b = (xf @ a).T @ gf
    return grad_x, grad_a.astype(a.dtype), grad_b.astype(b.dtype), jnp.zeros_like(eta)


_allora_delta.defvjp(_allora_fwd, _allora_bwd)


def allora_lora_delta(x, lora_a, lora_b, *, eta: float):
    """ALLoRA's adapter output ``x @ A @ B``: no dropout, no scaling, a rescaled backward.

    Forward: ``y = x A B`` with ``A``: ``(in, r)`` and ``B``: ``(r, out)`` (Flax's ``nnx.LoRA``
    layout; add it to the frozen layer's output). Backward (Huang & Balestriero 2024, Sec. 4.2
    and Listing 1), with ``dW = A B`` and output gradient ``delta``:

        c_j = 1 / sqrt(||dW[:, j]||_2 + 1/eta^2),   delta~ = delta * c   (per output unit j)
        dL/dA = x^T delta~ B^T,   dL/dB = (x A)^T delta~,   dL/dx = delta B^T A^T (unscaled).

    ``c`` is treated as a constant (no gradient flows through it) and is computed from
    ``A^T A`` without forming ``dW``.

    Args:
      x: inputs, shape ``(..., in)``.
      lora_a: ``(in, r)``; lora_b: ``(r, out)``.
      eta: ``> 0``; the gradient multiplier at ``B = 0`` (the paper's hyper-parameter that
        replaces LoRA's scaling factor).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from effjax.optim.allora import allora_lora_delta
      >>> x, a, b = jnp.ones((2, 4)), jnp.ones((4, 2)), jnp.zeros((2, 3))
      >>> allora_lora_delta(x, a, b, eta=2.0).shape
      (2, 3)
      >>> loss = lambda b: allora_lora_delta(x, a, b, eta=2.0).sum()
      >>> (jax.grad(loss)(b) / jax.grad(lambda b: (x @ a @ b).sum())(b))[0, 0]  # = eta at B=0
      Array(2., dtype=float32)
    """
    _check_eta(eta)
    x, lora_a, lora_b = jnp.asarray(x), jnp.asarray(lora_a), jnp.asarray(lora_b)
    if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_a.shape[1] != lora_b.shape[0]:
        raise ValueError(f"allora_lora_delta needs lora_a (in, r) and lora_b (r, out), got "
                         f"shapes {lora_a.shape} and {lora_b.shape}")
    if x.ndim < 1 or x.shape[-1] != lora_a.shape[0]:
        raise ValueError(f"allora_lora_delta: x has shape {x.shape}, its last axis must be "
                         f"lora_a's input size {lora_a.shape[0]}")
    return _allora_delta(x, lora_a, lora_b, jnp.asarray(eta, jnp.float32))


# ------------------------------------------------------------- the optax form (per leaf)


def _reduce_axes(ndim: int, axis, name: str) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim - 1)) if ndim >= 2 else tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    for ax in axes:
        if not -ndim <= ax < ndim:
            raise ValueError(f"scale_by_inverse_param_norm: axis {axis!r} is out of range for "
                             f"parameter {name} with {ndim} dimensions")
    return tuple(sorted({ax % ndim for ax in axes}))


def scale_by_inverse_param_norm(
    eta: float, *, axis: int | Sequence[int] | None = None
) -> optax.GradientTransformation:
    """Multiply each update by ALLoRA's coefficient of its parameter's norm.

        u <- u / sqrt(||theta||_2 + 1/eta^2)

    with the norm taken over ``axis`` (kept, so there is one coefficient per remaining index).
    The default, ``axis=None``, reduces every axis but the last: one coefficient per output unit
    of a Flax ``(..., out)`` kernel, as ALLoRA's per-output rule (Huang & Balestriero 2024,
    Sec. 4.2); 0-d and 1-d leaves use their whole norm.

    This is the per-parameter form of the coefficient: it uses each leaf's own norm, while the
    paper's rule uses the norm of the product ``A B`` and rescales the output gradient before it
    reaches ``A`` and ``B`` (see :func:`allora_lora_delta` for that exact form). Where it sits in
    the chain decides what it scales: after the base optimizer's ``scale_by_*`` and before the
    learning rate it acts as a per-output learning rate; before Adam-type transforms it mostly
    cancels, since they are invariant to a slowly varying per-coordinate gradient scale.

    It keeps no state. A non-finite update entry is passed through unchanged (scaled by its
    coefficient), optax's convention (as ``optax.scale``); a non-finite parameter gives its
    output unit a NaN coefficient (inf: 0).

    Args:
      eta: ``> 0``: the multiplier at ``theta = 0``.
      axis: axes reduced by the norm (see above).

    Returns:
      An optax ``GradientTransformation`` with an empty state. ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from effjax.optim.allora import scale_by_inverse_param_norm
      >>> opt = optax.chain(optax.scale_by_adam(), scale_by_inverse_param_norm(eta=2.0),
      ...                   optax.scale(-1e-3))
      >>> params = {"lora_a": jnp.ones((8, 2)), "lora_b": jnp.zeros((2, 4))}
      >>> state = opt.init(params)
      >>> updates, state = opt.update(params, state, params)
      >>> jnp.round(scale_by_inverse_param_norm(eta=2.0).update(
      ...     {"w": jnp.ones((3, 2))}, None, {"w": jnp.zeros((3, 2))})[0]["w"], 3)
      Array([[2., 2.],
             [2., 2.],
             [2., 2.]], dtype=float32)
    """
    _check_eta(eta)
    if axis is not None and not isinstance(axis, int):
        axis = tuple(axis)
        if not all(isinstance(ax, int) for ax in axis):
            raise TypeError(f"axis must be an int, a sequence of ints or None, got {axis!r}")

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        check_params_like_updates(updates, params, where="scale_by_inverse_param_norm")

        def scale(path, u, p):
            axes = _reduce_axes(p.ndim, axis, leaf_name(path))
            p32 = p.astype(jnp.promote_types(p.dtype, jnp.float32))
            norm = jnp.sqrt(jnp.sum(jnp.square(p32), axis=axes, keepdims=True))
            return (u * allora_coefficient(norm, eta)).astype(u.dtype)

        return jax.tree_util.tree_map_with_path(scale, updates, params), state

    return optax.GradientTransformation(init_fn, update_fn)
