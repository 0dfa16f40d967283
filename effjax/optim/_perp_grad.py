"""perpGrad (written ⊥Grad in the paper): drop the gradient's component along the weights.

Prieto, Barsbey, Mediano & Birdal, "Grokking at the Edge of Numerical Stability", ICLR 2025,
arXiv:2501.04697. Past the point of fitting the training set, most of the gradient points along
the current weights ("naive loss minimization"): it scales the logits without changing the
predictions, which delays generalization and ends in Softmax Collapse. ⊥Grad removes that
component before the optimizer sees the gradient:

    g_perp = g - (<w, g> / <w, w>) w

per parameter tensor (flattened), as the official code does (``orthograd.py``,
``OrthoGrad._orthogonalize_gradients``, LucasPrietoAl/grokking-at-the-edge-of-numerical-stability
@ 0cc9e8d); the paper writes the same projection for the full parameter vector. The official
code then rescales ``g_perp`` to the norm of ``g``,

    g_out = g_perp * ||g|| / ||g_perp||,

which is ``renormalize=True`` here (the default). Use it in front of any optimizer:
``optax.chain(perp_grad(), optax.adamw(...))`` is the paper's ⊥AdamW.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from effjax.optim._checks import check_params_like_updates
from effjax.quant._layout import explicit_spec

__all__ = ["perp_grad", "project_out_param_direction"]


def project_out_param_direction(g, w, *, renormalize: bool = True):
    """``g - (<w, g> / <w, w>) w`` for one tensor, optionally rescaled to ``||g||``.

    Computed in float32 (or wider) and returned in ``g``'s dtype. ``w`` is first divided by its
    largest absolute value, which leaves the projection unchanged and keeps ``<w, w>`` from
    underflowing or overflowing. Where ``w = 0`` there is no direction to remove and ``g`` is
    returned unchanged; where ``g_perp = 0`` (``g`` parallel to ``w``) the result is 0.
    Non-finite entries of ``g`` (NaN, +-inf) count as 0 in ``<w, g>`` and the norms, and are
    passed through unchanged (optax's convention: the optimizer after it decides); the other
    entries are the projection of ``g`` with 0 there.

    Example:
      >>> import jax.numpy as jnp
      >>> from effjax.optim import project_out_param_direction
      >>> project_out_param_direction(jnp.array([1.0, 1.0]), jnp.array([1.0, 0.0]),
      ...                             renormalize=False)
      Array([0., 1.], dtype=float32)
    """
    spec = explicit_spec(g)
    if spec is not None or explicit_spec(w) is not None:
        # Explicit mesh axes: the projection needs the whole tensor (two all-gathers) and
        # flattens it; the result is resharded like g.
        out = project_out_param_direction(jax.sharding.reshard(g, PartitionSpec()),
                                          jax.sharding.reshard(w, PartitionSpec()),
                                          renormalize=renormalize)
        return out if spec is None else jax.sharding.reshard(out, PartitionSpec(*spec[0]))
    dtype = jnp.promote_types(g.dtype, jnp.float32)
    gf, wf = g.astype(dtype).reshape(-1), w.astype(dtype).reshape(-1)
    # Non-finite entries of g count as 0 in <w, g> and the norms (one NaN would otherwise turn
    # every entry into NaN, or, renormalized, zero the whole tensor) and pass through unchanged.
    ok = jnp.isfinite(gf)
    gf = jnp.where(ok, gf, 0.0)
    scale = jnp.max(jnp.abs(wf)) if wf.size else jnp.zeros((), dtype)
    u = wf / jnp.where(scale > 0, scale, 1.0)
    # A gradient above 2**40 (a 1e20 spike) would overflow the sums of squares: run the
    # projection on g * 2**-e (max |g * 2**-e| in [0.5, 1)), exactly g's numbers scaled, since
    # every step commutes with a power-of-two factor; the result is scaled back at the end.
    gmax = jnp.max(jnp.abs(gf)) if gf.size else jnp.zeros((), dtype)
    e = jnp.where(gmax > 2.0**40, jnp.frexp(gmax)[1], 0)
    gf = jnp.ldexp(gf, -e)
    uu = jnp.vdot(u, u)
    coef = jnp.where(uu > 0, jnp.vdot(u, gf) / jnp.where(uu > 0, uu, 1.0), 0.0)
    gp = gf - coef * u
    if renormalize:
        g_norm, gp_norm = jnp.linalg.norm(gf), jnp.linalg.norm(gp)
        gp = jnp.where(gp_norm > 0, gp * (g_norm / jnp.where(gp_norm > 0, gp_norm, 1.0)), 0.0)
    out = jnp.where(ok, jnp.ldexp(gp, e), g.astype(dtype).reshape(-1))
    return out.reshape(g.shape).astype(g.dtype)


def perp_grad(*, renormalize: bool = True) -> optax.GradientTransformation:
    """⊥Grad (Prieto et al. 2025): project each update orthogonally to its parameter tensor.

        g_perp = g - (<w, g> / <w, w>) w,   then  g_perp * ||g|| / ||g_perp||  (renormalize)

    One projection per leaf, as the official ``OrthoGrad`` wrapper (which projects every
    parameter tensor on its own and rescales to the gradient's norm). ``w = 0`` leaves the
    update unchanged (no NaN). It keeps no state; a non-finite update entry counts as 0 in the
    projection of the others and is passed through unchanged, as optax's transforms do (an
    optimizer after it, such as ``optax.adamw``, then takes it into that entry's moments).

    Args:
      renormalize: rescale each projected leaf to the norm of the incoming one, as the official
        code does. ``False`` gives the plain projection.

    Returns:
      An optax ``GradientTransformation`` with an empty state. ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, numpy as np, optax
      >>> from effjax.optim import perp_grad
      >>> opt = optax.chain(perp_grad(), optax.adamw(1e-3, weight_decay=0.0))
      >>> params = {"w": jnp.array([[3.0, 4.0]])}
      >>> state = opt.init(params)
      >>> g, _ = perp_grad().update({"w": jnp.array([[1.0, 0.0]])}, None, params)
      >>> np.asarray(g["w"]).round(4), abs(float(jnp.vdot(g["w"], params["w"]))) < 1e-6
      (array([[ 0.8, -0.6]], dtype=float32), True)
      >>> updates, state = opt.update({"w": jnp.array([[1.0, 0.0]])}, state, params)
    """
    if not isinstance(renormalize, bool):
        raise TypeError(f"renormalize must be a bool, got {renormalize!r}")

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        check_params_like_updates(updates, params, where="perp_grad")
        out = jax.tree.map(
            lambda g, w: project_out_param_direction(g, w, renormalize=renormalize),
            updates, params)
        return out, state

    return optax.GradientTransformation(init_fn, update_fn)
