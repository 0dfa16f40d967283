"""GaLore: gradient low-rank projection as an optax transformation.

Every ``update_proj_gap`` steps (``T``, counted from the first step) each projected matrix
leaf takes the top-``r`` singular vectors of its current gradient ``G_t`` (m x n) as its
projector; between refreshes the projector is kept. The inner optimizer ``rho`` (Adam by
default, any optax transformation) runs on the projected gradient, so its state lives on the
low-rank side, and its output is projected back and scaled by ``alpha`` (``scale``):

    left  (P = U[:, :r], m x r):   R_t = P^T G_t   (r x n),  u_t = alpha P rho(R_t)
    right (Q = V^T[:r], r x n):    R_t = G_t Q^T   (m x r),  u_t = alpha rho(R_t) Q
    full  (P and Q):               R_t = P^T G_t Q^T (r x r), u_t = alpha P rho(R_t) Q

``proj_type`` picks the side as the official code does: ``'std'`` projects the shorter axis
(right when m >= n, else left: the projector is the small r x min(m, n) matrix and the moments
are max(m, n) x r), ``'reverse_std'`` the longer one (left when m >= n: moments
r x min(m, n), which is ``optax.contrib.galore``'s choice), or ``'left'``/``'right'``/
``'full'``. The inner optimizer's moments are NOT reset when the projector changes (official).

Which leaves are projected: 2-D leaves selected by ``projection_mask`` (default: all) whose
projection shrinks an axis, i.e. ``min(rank, m, n)`` is smaller than a projected axis (they must
be floating point: an integer one raises ``TypeError`` naming its path).
Every other leaf (biases, norms, matrices no larger than the rank, leaves masked out) passes
through to the inner optimizer unchanged and unscaled, as the official code's non-GaLore
parameter group does. Leaves with more than two axes pass through, or with ``stacked=True``
are treated as stacks of matrices over their last two axes (scanned layers ``(L, m, n)``):
each matrix gets its own SVD and projector. ``row_axes`` views einsum kernels as matrices
(attention ``(d, heads, head_dim)`` as ``(d, heads * head_dim)``), so they are projected too.

The inner optimizer receives ``params=None`` (its update sees low-rank shapes): use
scale-type transformations (``optax.scale_by_adam()``, ``optax.adam(lr)``,
``quantize_state(optax.scale_by_adam())``...) and put weight decay outside, in the full
space, as :func:`galore_adamw` does; an inner that needs params raises optax's own error.

Conventions (they make results reproducible across backends):

* SVD in float32 (or the gradient's wider dtype); the projector is stored in the parameter's
  dtype, as the official code does. Each singular vector's sign is fixed so that its entry of
  largest magnitude is positive (LAPACK's sign is arbitrary; with moments kept across
  refreshes the sign changes the result after the first refresh, so a fixed rule is needed to
  reproduce a run).
* Non-finite gradient elements (NaN, +-inf) are treated as 0 everywhere (SVD, projection,
  inner optimizer) and the returned update is 0 at those elements, so the projector and
  moments stay finite. To skip such steps entirely wrap the optimizer in
  ``optax.apply_if_finite``.

Differences from the official code (jiaweizzhao/GaLore ``galore_torch/``):

* A matrix whose projection would not shrink any axis (``rank >= min(m, n)`` with ``'std'``)
  passes through (plain inner step, no ``scale``); the official code projects it onto a full
  orthogonal basis (Adam in a rotated basis, then times ``scale``), which saves no memory.
* Weight decay in :func:`galore_adamw` follows optax (``-lr * wd * p`` from the old
  parameter); the official ``AdamW`` decays the already updated parameter, a difference of
  ``lr**2 * wd * |u|``.
* More-than-2-D tensors: the official ``GaLoreProjectorTensor`` uses a Tucker decomposition
  (tensorly); here they pass through or are stacks of matrices (``stacked=True``).
* ``galore(inner=None)`` uses ``optax.scale_by_adam()`` (eps 1e-8 added to the bias-corrected
  ``sqrt(v_hat)``); :func:`galore_adamw` reproduces the official Adam exactly:
  ``u = sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)`` with eps 1e-6.

Differences from ``optax.contrib.galore`` (optax 0.2.8), which does not reset moments either:
optax always projects the longer axis (our ``proj_type='reverse_std'``; the official default
``'std'`` projects the shorter one and keeps max(m, n) x r moments); its ``scale`` defaults to
1.0 (official scripts and here: 0.25); it projects every 2-D leaf, clamping the rank to
``min(m, n)`` (a rotation when rank >= min(m, n)); it has no sign convention (so after the first
refresh the two differ when LAPACK's sign differs from ours) and no non-finite rule; it offers
dimension numbers to view n-D leaves as matrices. With ``proj_type='reverse_std'``, the same
scale and ``rank < min(m, n)`` the updates are equal until the first refresh.

Reference: Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection", ICML 2024 (arXiv:2403.03507).

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> from effjax.optim import galore_adamw
  >>> params = {"w": jnp.zeros((64, 32)), "b": jnp.zeros((32,))}
  >>> opt = galore_adamw(1e-3, rank=8, update_proj_gap=200)
  >>> state = opt.init(params)
  >>> state[0].inner_state.mu["w"].shape, state[0].right["w"].shape  # 'std', m >= n: right
  ((64, 8), (8, 32))
  >>> grads = {"w": jax.random.normal(jax.random.key(0), (64, 32)), "b": jnp.ones((32,))}
  >>> updates, state = opt.update(grads, state, params)
  >>> params = optax.apply_updates(params, updates)
"""


from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from effjax.optim._checks import (
    check_params_like_updates,
    check_state_shapes,
    check_updates_like_state,
    is_number,
)
from effjax.optim._quantize_state import bad_elements_reset
from effjax.optim._spike_utils import zero_moments

__all__ = ["GaLoreState", "FiraState", "galore", "galore_adamw", "scale_by_adam_uncorrected",
           "adam_bias_correction", "PROJ_TYPES"]

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
_EPS = 1e-8  # the official Fira code's denominators (norm ratio and limiter)


class GaLoreState(NamedTuple):
    """State of :func:`galore`.

    Attributes:
      count: int32 number of steps taken (the projector is refreshed when
        ``count % update_proj_gap == 0``).
      left: per leaf, the left projector ``U[:, :r]`` (``(..., m, r)``) or ``optax.MaskedNode``.
      right: per leaf, the right projector ``V^T[:r]`` (``(..., r, n)``) or ``MaskedNode``.
      inner_state: the inner optimizer's state over the low-rank (or passed-through) shapes.
    """

    count: jax.Array
    left: Any
    right: Any
    inner_state: optax.OptState


class FiraState(NamedTuple):
    """State of :func:`effjax.optim.fira`: :class:`GaLoreState`'s fields plus
    ``residual_norm``, per projected leaf the float32 norm of the last limited residual
    (shape: the leaf's stack axes, ``()`` for a matrix)."""

    count: jax.Array
    left: Any
    right: Any
    residual_norm: Any
    inner_state: optax.OptState


class _Plan(NamedTuple):
    """How one leaf is projected (static)."""

    side: str  # 'left', 'right' or 'full'
    rank: int  # effective rank min(rank, m, n)


# Checks and planning ----------------------------------------------------------------------------

def check_low_rank_args(*, rank, update_proj_gap, scale, proj_type, where: str) -> int:
    """Validate the shared GaLore/Fira arguments; return the rank as a Python int."""
    if isinstance(rank, (jax.Array, np.ndarray)):
        raise ValueError(
            f"{where}: rank must be a Python int (it fixes array shapes), got an array; with "
            "optax.inject_hyperparams pass static_args=('rank',) or leave rank at its default")
    if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"{where}: rank must be an int >= 1, got {rank!r}")
    if is_number(update_proj_gap):
        if int(update_proj_gap) != update_proj_gap or update_proj_gap < 1:
            raise ValueError(f"{where}: update_proj_gap must be an int >= 1, "
                             f"got {update_proj_gap!r}")
    elif not isinstance(update_proj_gap, jax.Array):
        raise ValueError(f"{where}: update_proj_gap must be an int >= 1, got {update_proj_gap!r}")
    if is_number(scale) and not np.isfinite(scale):
        raise ValueError(f"{where}: scale must be finite, got {scale!r}")
    if proj_type not in PROJ_TYPES:
        raise ValueError(f"{where}: proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")
    return int(rank)


def _per_leaf(arg, tree, treedef, where, name, ok, what):
    """One value per leaf of ``tree`` from ``arg`` (a tree, a prefix tree or a callable on
    ``tree``), each checked by ``ok`` (the error says ``what`` was expected)."""
    value = arg(tree) if callable(arg) else arg
    try:
        full = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: m, sub), value, tree,
                            is_leaf=lambda v: v is None)
        flags = treedef.flatten_up_to(full)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {name} must be a tree of {what} with the structure "
                         f"of the parameters (or a prefix of it): {e}") from None
    for f in flags:
        if not ok(f):
            raise ValueError(f"{where}: {name} leaves must be {what}, got {f!r}")
    return flags


def _mask_leaves(projection_mask, tree, treedef, where):
    """One bool per leaf of ``tree`` (``projection_mask`` may be a prefix tree or callable)."""
    if projection_mask is None:
        return [True] * treedef.num_leaves
    flags = _per_leaf(projection_mask, tree, treedef, where, "projection_mask",
                      lambda f: isinstance(f, (bool, np.bool_)), "Python bools")
    return [bool(f) for f in flags]


def _row_counts(row_axes, tree, treedef, where):
    """One ``int | None`` per leaf: how many leading (non-stack) axes form the matrix rows."""
    if row_axes is None:
        return [None] * treedef.num_leaves
    if isinstance(row_axes, (int, np.integer)) and not isinstance(row_axes, bool):
        row_axes = int(row_axes)
    ok = lambda k: k is None or (isinstance(k, (int, np.integer)) and not isinstance(k, bool)
                                 and k >= 1)
    return _per_leaf(row_axes, tree, treedef, where, "row_axes", ok, "None or ints >= 1")


def _matrix_view(shape, k, stacked, path, where):
    """``shape`` seen as matrices: ``(prod(shape[:k]), prod(shape[k:]))``, after the stack
    axis with ``stacked``. Leaves with at most 2 (non-stack) axes, or ``k=None``, keep their
    shape."""
    if k is None or len(shape) <= 2 + bool(stacked):
        return shape
    lead = shape[:1] if stacked else ()
    rest = shape[len(lead):]
    if not 1 <= k < len(rest):
        raise ValueError(f"{where}: row_axes={k} for parameter {path} of shape {shape} leaves "
                         f"no column axis (stacked={stacked}); it needs 1 <= row_axes < "
                         f"{len(rest)}, or None for this leaf")
    return lead + (int(np.prod(rest[:k])), int(np.prod(rest[k:])))


def _plan(shape, eligible: bool, rank: int, proj_type: str, stacked: bool) -> _Plan | None:
    if not eligible or len(shape) < 2 or (len(shape) > 2 and not stacked):
        return None
    m, n = shape[-2:]
    if m == 0 or n == 0:
        return None
    side = {"std": "right" if m >= n else "left",
            "reverse_std": "left" if m >= n else "right"}.get(proj_type, proj_type)
    r = min(rank, m, n)
    shrinks = (side in ("left", "full") and r < m) or (side in ("right", "full") and r < n)
    return _Plan(side, r) if shrinks else None


def _plans(tree, projection_mask, rank, proj_type, stacked, row_axes, where):
    """Per leaf: the leaf, its path, its plan (None: passes through) and its matrix view shape
    (the leaf's own shape when it passes through)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    flags = _mask_leaves(projection_mask, tree, treedef, where)
    rows = _row_counts(row_axes, tree, treedef, where)
    paths = [jax.tree_util.keystr(p) or "<root>" for p, _ in leaves]
    views, plans = [], []
    for (_, x), f, k, path in zip(leaves, flags, rows, paths, strict=True):
        shape = tuple(x.shape)
        view = _matrix_view(shape, k, stacked, path, where) if f else shape
        plan = _plan(view, f, rank, proj_type, stacked)
        plans.append(plan)
        views.append(shape if plan is None else view)
    return [x for _, x in leaves], treedef, paths, plans, views


def _projector_shapes(shape, plan: _Plan):
    *batch, m, n = shape
    left = (*batch, m, plan.rank) if plan.side in ("left", "full") else None
    right = (*batch, plan.rank, n) if plan.side in ("right", "full") else None
    return left, right


def _low_shape(shape, plan: _Plan):
    *batch, m, n = shape
    return (*batch, plan.rank if plan.side in ("left", "full") else m,
            plan.rank if plan.side in ("right", "full") else n)


# Sharding ---------------------------------------------------------------------------------------
# Every state leaf keeps its parameter's mesh axis on each axis of the same length (a left
# projector (m, r) and a moment (m, r) keep the rows' axis, (r, n) ones the columns'), from init
# on. Under Explicit mesh axes JAX types shardings while tracing: the SVD needs its input
# replicated (the refresh all-gathers the gradient, as it does under Auto axes), and a
# projection that contracts a sharded axis has its output sharding named.

def _is_explicit(x) -> bool:
    if not isinstance(x, jax.Array):  # a MaskedNode
        return False
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    return mesh is not None and AxisType.Explicit in tuple(getattr(mesh, "axis_types", ()))


def _spec(x) -> tuple | None:
    """``x``'s mesh axes per axis: from its type under Explicit axes, else from a concrete
    array's NamedSharding; None when there are none (a tracer under Auto axes)."""
    if _is_explicit(x):
        sh = jax.typeof(x).sharding
    elif isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and isinstance(
            x.sharding, NamedSharding):
        sh = x.sharding
    else:
        return None
    spec = tuple(sh.spec) + (None,) * (x.ndim - len(sh.spec))
    return None if all(e is None for e in spec) else spec


def _explicit_spec(x) -> tuple | None:
    return _spec(x) if _is_explicit(x) else None


def _keep_axes(spec, shape, like) -> PartitionSpec:
    """``spec`` (of an array shaped ``like``) on the axes of ``shape`` of the same length."""
    return PartitionSpec(*(e if i < len(like) and n == like[i] else None
                           for i, (e, n) in enumerate(zip(spec, shape))))


def _zeros_like_param(x, shape, dtype, view):
    """Zeros of ``shape`` sharded like the parameter ``x`` (seen as ``view``) on its axes of the
    same length (init of projectors, low-rank moments and residual norms)."""
    spec = _spec(x) if tuple(x.shape) == tuple(view) else None
    if spec is None:
        return jnp.zeros(shape, dtype)
    out = _keep_axes(spec, shape, view)
    if isinstance(x, jax.core.Tracer):
        return jnp.zeros(shape, dtype, out_sharding=out)
    return jnp.zeros(shape, dtype, device=NamedSharding(x.sharding.mesh, out))


def _einsum(expr, a, b, spec, view):
    """``jnp.einsum``; under Explicit axes (``spec``: the matrix's) its output sharding named."""
    if spec is None:
        return jnp.einsum(expr, a, b)
    lhs, rhs_out = expr.split(",")
    rhs, out = rhs_out.split("->")
    dims = dict(zip(lhs[3:], a.shape[a.ndim - len(lhs) + 3:]))
    dims.update(zip(rhs[3:], b.shape[b.ndim - len(rhs) + 3:]))
    shape = tuple(a.shape[:a.ndim - len(lhs) + 3]) + tuple(dims[c] for c in out[3:])
    return jnp.einsum(expr, a, b, out_sharding=_keep_axes(spec, shape, view))


# Linear algebra ---------------------------------------------------------------------------------

def _fix_sign(p, axis):
    """Flip each singular vector (along ``axis``) so its largest-magnitude entry is positive."""
    idx = jnp.argmax(jnp.abs(p), axis=axis, keepdims=True)
    pivot = jnp.take_along_axis(p, idx, axis=axis)
    return p * jnp.where(pivot < 0, -1.0, 1.0).astype(p.dtype)


def _new_projectors(g, plan: _Plan, left_dtype, right_dtype):
    g = g.astype(jnp.promote_types(g.dtype, jnp.float32))
    if _explicit_spec(g) is not None:  # the SVD takes the whole matrix (an all-gather)
        g = jax.sharding.reshard(g, PartitionSpec())
    u, _, vh = jnp.linalg.svd(g, full_matrices=False)
    left = right = optax.MaskedNode()
    if plan.side in ("left", "full"):
        left = _fix_sign(u[..., :, :plan.rank], axis=-2).astype(left_dtype)
    if plan.side in ("right", "full"):
        right = _fix_sign(vh[..., :plan.rank, :], axis=-1).astype(right_dtype)
    return left, right


def _project(g, left, right, plan: _Plan, spec=None, view=None):
    if plan.side in ("left", "full"):
        g = _einsum("...mr,...mn->...rn", left, g, spec, view)
    if plan.side in ("right", "full"):
        g = _einsum("...mn,...rn->...mr", g, right, spec, view)
    return g


def _project_back(x, left, right, plan: _Plan, spec=None, view=None):
    if plan.side in ("left", "full"):
        x = _einsum("...mr,...rn->...mn", left, x, spec, view)
    if plan.side in ("right", "full"):
        x = _einsum("...mr,...rn->...mn", x, right, spec, view)
    return x


def _fira_residual(g, low_g, low_u, left, right, plan: _Plan, scale, spec=None, view=None):
    """Fira's scaled residual ``phi * (G - alpha * back(R))`` before the limiter (official).

    ``phi`` is ``||rho(R)|| / (||R|| + 1e-8)`` taken across the projected axis, one value per
    index of the other axis (per column for left, per row for right; per matrix for 'full').
    """
    axes = {"left": (-2,), "right": (-1,), "full": (-2, -1)}[plan.side]
    f32 = jnp.promote_types(g.dtype, jnp.float32)
    norm = lambda x: jnp.sqrt(jnp.sum(jnp.square(x.astype(f32)), axis=axes, keepdims=True))
    phi = norm(low_u) / (norm(low_g) + _EPS)
    back = _project_back(low_g, left, right, plan, spec, view)
    resid = g.astype(f32) - scale * back.astype(f32)
    return resid * phi


def _limit(s, prev, first, gamma):
    """Norm-growth limiter: ``S <- S / (max(||S|| / (prev + 1e-8), gamma) / gamma)``.

    Returns the limited ``S`` and its norm (the next ``prev``); on the first step nothing is
    limited (official). ``gamma=None`` disables the limiter.
    """
    norm = jnp.sqrt(jnp.sum(jnp.square(s), axis=(-2, -1)))
    if gamma is None:
        return s, norm
    lim = jnp.maximum(norm / (prev + _EPS), gamma) / gamma
    lim = jnp.where(first, jnp.ones_like(lim), lim)
    return s / lim[..., None, None], norm / lim


# The transformation -----------------------------------------------------------------------------

def low_rank_transform(inner, *, rank, update_proj_gap, scale, proj_type, projection_mask,
                       stacked, fira, gamma, where, row_axes=None):
    """Build GaLore (``fira=False``) or Fira (``fira=True``); see :func:`galore`."""
    rank = check_low_rank_args(rank=rank, update_proj_gap=update_proj_gap, scale=scale,
                               proj_type=proj_type, where=where)
    if not isinstance(stacked, bool):
        raise ValueError(f"{where}: stacked must be a bool, got {stacked!r}")
    inner = optax.with_extra_args_support(optax.scale_by_adam() if inner is None else inner)
    state_cls = FiraState if fira else GaLoreState

    def plans_of(tree):
        return _plans(tree, projection_mask, rank, proj_type, stacked, row_axes, where)

    def init_fn(params):
        leaves, treedef, paths, plans, views = plans_of(params)
        lefts, rights, proxies, norms = [], [], [], []
        for x, path, plan, view in zip(leaves, paths, plans, views, strict=True):
            if plan is None:
                lefts.append(optax.MaskedNode())
                rights.append(optax.MaskedNode())
                norms.append(optax.MaskedNode())
                proxies.append(x)
                continue
            if not jnp.issubdtype(x.dtype, jnp.floating):
                raise TypeError(f"{where}: parameter {path} has dtype {x.dtype}; projected "
                                "leaves must be floating point (exclude it with "
                                "projection_mask or cast it)")
            lshape, rshape = _projector_shapes(view, plan)
            zeros = lambda shape, dtype: _zeros_like_param(x, shape, dtype, view)  # noqa: B023
            lefts.append(optax.MaskedNode() if lshape is None else zeros(lshape, x.dtype))
            rights.append(optax.MaskedNode() if rshape is None else zeros(rshape, x.dtype))
            norms.append(zeros(view[:-2], jnp.float32))
            proxies.append(zeros(_low_shape(view, plan), x.dtype))
        fields = dict(count=jnp.zeros([], jnp.int32), left=treedef.unflatten(lefts),
                      right=treedef.unflatten(rights),
                      inner_state=inner.init(treedef.unflatten(proxies)))
        if fira:
            fields["residual_norm"] = treedef.unflatten(norms)
        return state_cls(**fields)

    def update_fn(updates, state, params=None, **extra_args):
        if params is not None:
            check_params_like_updates(updates, params, where=where)
        del params  # the inner optimizer works on low-rank shapes: it gets params=None
        check_updates_like_state(updates, state.left, where=where, what="the parameters")
        leaves, treedef, paths, plans, views = plans_of(updates)
        lefts = treedef.flatten_up_to(state.left)
        rights = treedef.flatten_up_to(state.right)
        for x, path, plan, view, lp, rp in zip(leaves, paths, plans, views, lefts, rights,
                                               strict=True):
            want = (None, None) if plan is None else _projector_shapes(view, plan)
            have = tuple(None if isinstance(p, optax.MaskedNode) else tuple(p.shape)
                         for p in (lp, rp))
            if want != have:
                raise ValueError(f"{where}: update {path} has shape {tuple(x.shape)}, which "
                                 f"needs projectors {want}, but the state holds {have}; was "
                                 "the state initialised with parameters of other shapes?")
        finite = [jnp.isfinite(g) for g in leaves]
        gs = [jnp.where(f, g, jnp.zeros_like(g)).reshape(v)
              for g, f, v in zip(leaves, finite, views)]
        idx = [i for i, p in enumerate(plans) if p is not None]

        def refresh():
            new = [_new_projectors(gs[i], plans[i], getattr(lefts[i], "dtype", None),
                                   getattr(rights[i], "dtype", None)) for i in idx]
            # under Explicit axes both branches of the cond must be typed alike
            like = lambda p, old: (jax.sharding.reshard(p, jax.typeof(old).sharding)
                                   if _is_explicit(old) else p)
            return ([like(a, lefts[i]) for (a, _), i in zip(new, idx)],
                    [like(b, rights[i]) for (_, b), i in zip(new, idx)])

        if idx:
            do = (state.count % update_proj_gap) == 0
            new_l, new_r = jax.lax.cond(do, refresh,
                                        lambda: ([lefts[i] for i in idx],
                                                 [rights[i] for i in idx]))
            for k, i in enumerate(idx):
                lefts[i], rights[i] = new_l[k], new_r[k]
        specs = [_explicit_spec(g) for g in gs]
        lows = [g if p is None else _project(g, lefts[i], rights[i], p, specs[i], views[i])
                for i, (g, p) in enumerate(zip(gs, plans))]
        check_state_shapes(inner.init, treedef.unflatten(
            [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in lows]), state.inner_state,
            where=where)
        low_u, inner_state = inner.update(treedef.unflatten(lows), state.inner_state, None,
                                          **extra_args)
        # quantize_state's non-finite rule on the low-rank side: a projected element whose
        # square overflows (a 1e20 gradient) restarts its moments instead of leaving nu = inf
        low_u, inner_state = bad_elements_reset(treedef.unflatten(lows), low_u, inner_state)
        low_u = treedef.flatten_up_to(low_u)
        out = list(low_u)
        norms = treedef.flatten_up_to(state.residual_norm) if fira else None
        for i in idx:
            p = plans[i]
            u = scale * _project_back(low_u[i], lefts[i], rights[i], p, specs[i], views[i])
            if fira:
                s = _fira_residual(gs[i], lows[i], low_u[i], lefts[i], rights[i], p, scale,
                                   specs[i], views[i])
                s, norms[i] = _limit(s, norms[i], state.count == 0, gamma)
                u = u + s
            out[i] = u.astype(leaves[i].dtype).reshape(leaves[i].shape)
        out = [jnp.where(f, u, jnp.zeros_like(u)).astype(g.dtype)
               for u, f, g in zip(out, finite, leaves)]
        fields = dict(count=optax.safe_int32_increment(state.count),
                      left=treedef.unflatten(lefts), right=treedef.unflatten(rights),
                      inner_state=inner_state)
        if fira:
            fields["residual_norm"] = treedef.unflatten(norms)
        return treedef.unflatten(out), state_cls(**fields)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def galore(
    inner: optax.GradientTransformation | None = None,
    *,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    projection_mask: Any = None,
    stacked: bool = False,
    row_axes: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """GaLore around ``inner``: ``u = scale * P inner(P^T G)`` (or ``inner(G Q^T) Q``).

    Args:
      inner: the optimizer run on the low-rank gradients (and on passed-through leaves);
        default ``optax.scale_by_adam()``. It is called with ``params=None``.
      rank: target rank ``r`` (static; with ``optax.inject_hyperparams`` list it in
        ``static_args`` or leave the default).
      update_proj_gap: ``T``; the projector is recomputed by SVD when ``count % T == 0``.
      scale: ``alpha``, multiplies the projected-back update of projected leaves only.
      proj_type: ``'std'`` (official default: shorter axis), ``'reverse_std'``, ``'left'``,
        ``'right'`` or ``'full'``.
      projection_mask: tree (or prefix tree, or callable on params) of bools; ``False`` leaves
        pass through. Default: every 2-D leaf whose projection shrinks an axis.
      stacked: treat leaves with more than 2 axes as stacks of matrices over the last two
        (with ``row_axes``: the first axis is the stack).
      row_axes: view multi-axis leaves as matrices: ``k`` means the first ``k`` axes (after
        the stack axis with ``stacked``) form the rows and the others the columns, e.g. 1 for
        attention kernels ``(d, heads, head_dim)`` -> ``(d, heads * head_dim)`` and 2 for
        output kernels ``(heads, head_dim, d)`` -> ``(heads * head_dim, d)``. An int for all
        leaves, or a (prefix) tree / callable on params of ints or None (None: as is); it
        applies to leaves with more than 2 axes (3 with ``stacked``), others are unchanged. Only
        reshapes of contiguous axes: no transposes, so projecting is as cheap as for 2-D.

    Returns:
      A ``GradientTransformationExtraArgs`` with a :class:`GaLoreState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from effjax.optim import galore
      >>> opt = optax.chain(galore(optax.scale_by_adam(), rank=4, proj_type="left"),
      ...                   optax.scale_by_learning_rate(1e-2))
      >>> params = {"w": jnp.zeros((16, 32))}
      >>> state = opt.init(params)
      >>> state[0].left["w"].shape, state[0].inner_state.mu["w"].shape
      ((16, 4), (4, 32))
      >>> g = {"w": jax.random.normal(jax.random.key(0), (16, 32))}
      >>> updates, state = opt.update(g, state, params)
      >>> updates["w"].shape
      (16, 32)
    """
    return low_rank_transform(inner, rank=rank, update_proj_gap=update_proj_gap, scale=scale,
                              proj_type=proj_type, projection_mask=projection_mask,
                              stacked=stacked, fira=False, gamma=None, where="galore",
                              row_axes=row_axes)


# The official Adam, split so that the bias correction can come after the projection --------

def scale_by_adam_uncorrected(b1=0.9, b2=0.999, eps=1e-6) -> optax.GradientTransformation:
    """The official GaLore/Fira Adam before its bias correction: ``u = m / (sqrt(v) + eps)``.

    ``m = b1 m + (1-b1) g``, ``v = b2 v + (1-b2) g^2``; the state is an
    ``optax.ScaleByAdamState`` (``mu``, ``nu``: what ``quantize_state`` recognises). Follow it
    with :func:`adam_bias_correction` to get the official step
    ``sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps)``.
    """
    def init_fn(params):
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32),
                                      mu=zero_moments(params), nu=zero_moments(params))

    def update_fn(updates, state, params=None):
        del params
        # in the moments' dtype (float32 for float16 gradients: g^2 underflows in float16)
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g.astype(m.dtype), state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g.astype(v.dtype)),
                          state.nu, updates)
        out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu, nu)
        return out, optax.ScaleByAdamState(optax.safe_int32_increment(state.count), mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def adam_bias_correction(b1=0.9, b2=0.999) -> optax.GradientTransformation:
    """Multiply updates by Adam's bias correction ``sqrt(1 - b2^t) / (1 - b1^t)`` (t = 1, 2...)."""
    def factor(count):
        t = count + 1
        return jnp.sqrt(1 - b2 ** t) / (1 - b1 ** t)
    return optax.scale_by_schedule(factor)


def galore_adamw(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
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
    """The official ``GaLoreAdamW`` step as an optax chain.

    ``u = -lr * (c_t * [alpha P (m / (sqrt(v) + eps))  or  m / (sqrt(v) + eps)] + wd * p)`` with
    ``c_t = sqrt(1 - b2^t) / (1 - b1^t)``, the moments of the projected gradient ``P^T G``
    (projected leaves) or of ``G`` (passed-through leaves). Defaults are the official ones
    (eps 1e-6, no weight decay; rank 128, gap 200, scale 0.25 from the paper's scripts).
    Weight decay is optax's (see the module docstring); ``mask`` selects the decayed leaves.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from effjax.optim import galore_adamw
      >>> opt = optax.inject_hyperparams(galore_adamw, static_args=("rank",))(
      ...     learning_rate=optax.linear_schedule(0.0, 1e-3, 100), rank=8)
      >>> params = {"w": jnp.zeros((32, 64))}
      >>> state = opt.init(params)
      >>> updates, state = opt.update({"w": jnp.ones((32, 64))}, state, params)
    """
    return optax.chain(
        low_rank_transform(scale_by_adam_uncorrected(b1, b2, eps), rank=rank,
                           update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
                           projection_mask=projection_mask, stacked=stacked, fira=False,
                           gamma=None, where="galore_adamw", row_axes=row_axes),
        adam_bias_correction(b1, b2),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
