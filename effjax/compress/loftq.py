"""LoftQ and LQ-LoRA: a quantized base plus low-rank factors that absorb its error, and
LQ-LoRA's integer program that picks each matrix's format under a memory budget.

Both write a kernel as :math:`W \\approx Q + s\\,AB` with :math:`Q` a quantized kernel
(:class:`~effjax.compress.QuantizedWeight`), :math:`A` ``(*batch, *in, r)``, :math:`B`
``(*batch, r, *out)`` in effjax's LoRA layout (PEFT's ``lora_A`` is :math:`A^T`, ``lora_B`` is
:math:`B^T`) and :math:`s` the LoRA scale (:math:`\\alpha / r`, or :math:`\\alpha/\\sqrt r`
with rsLoRA). The algorithms run on each batch slice's *row view* (the PyTorch weight
:math:`W^T`, ``(out, in)``; see :mod:`effjax.compress.weight_quant`), in float32 (the promoted
dtype of the kernel), so their quantized bytes are those of the anchors:

* **LoftQ** (:func:`loftq_init`; Li et al. 2023, PEFT's ``loftq_init``): starting from the
  residual :math:`R_0 = W`, ``iters`` times: :math:`Q_t = \\mathrm{quant}(R_{t-1})`, the SVD
  :math:`U S V^h` of :math:`W - Q_t`, :math:`L_t = U_{:r} S_{:r}^{1/2}` (``lora_B``),
  :math:`R'_t = S_{:r}^{1/2} V^h_{:r}` (``lora_A``), and :math:`R_t = W - L_t R'_t`.
* **LQ-LoRA** (:func:`lq_lora_decompose`; Guo et al. 2024, the official ``lq_utils.py``):
  :math:`Q = 0`; repeat: :math:`L_1 L_2` = rank-:math:`r` SVD of :math:`W - Q`,
  :math:`Q = \\mathrm{quant}(W - L_1 L_2)`, error :math:`\\lVert W - L_1L_2 - Q\\rVert_F`;
  stop when the error rises. :func:`lq_lora_allocate` solves its integer linear program with
  ``scipy.optimize.milp``.

The factors come out in float32 (the promoted dtype of the kernel) for the caller to cast; the
:class:`~effjax.compress.QuantizedWeight` keeps the kernel's dtype (``materialize`` returns
it). This module returns arrays; :func:`effjax.peft.inject` builds the adapter nodes.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from effjax.compress import NF4, loftq_init
  >>> w = jax.random.normal(jax.random.key(0), (128, 64))  # a Flax kernel (in, out)
  >>> q, a, b = loftq_init(w, NF4(), rank=8, iters=2)
  >>> a.shape, b.shape
  ((128, 8), (8, 64))
  >>> plain = jnp.linalg.norm(w - q.materialize())  # the quantization error alone ...
  >>> bool(jnp.linalg.norm(w - q.materialize() - a @ b) < plain)  # ... shrinks
  True
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from effjax.compress.weight_quant import NF4, QuantizedWeight, WeightFormat, quantize_params

__all__ = ["loftq_init", "lq_lora_decompose", "lq_lora_allocate"]

_QLORA_NF4 = NF4()  # the default base: NF4, block 64, double quantization (QLoRA)


# ----------------------------------------------------------------------------- helpers


def _scale(rank: int, alpha: float | None, rslora: bool) -> float:
    if alpha is None:
        return 1.0
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating, np.integer)) \
            or not math.isfinite(alpha) or not alpha > 0:
        raise ValueError(f"alpha must be a finite number > 0 (the factors are divided by "
                         f"sqrt(alpha / rank)), got {alpha!r}")
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


def _checked(w: Any, fmt: Any, rank: int, iters: int, what: str):
    """``(w, layout)`` after checking the arguments (shape and dtype named in errors)."""
    if not isinstance(fmt, WeightFormat):
        raise TypeError(f"{what}: fmt must be a WeightFormat (NF4, FP4, Int8, Int4), "
                        f"got {fmt!r}")
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"{what} needs a floating kernel, got dtype {w.dtype} "
                        f"(shape {w.shape})")
    lay = fmt.layout(w.shape)
    for name, v in (("rank", rank), ("iters", iters)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{what}: {name} must be an int >= 1, got {v!r}")
    bound = min(lay.n_in, lay.n_out)
    if rank > bound:
        raise ValueError(f"{what}: rank={rank} exceeds min(n_in, n_out) = {bound} of the "
                         f"kernel of shape {w.shape} (in axes {lay.in_shape}, out axes "
                         f"{lay.out_shape}): an SVD has at most {bound} singular values")
    if not isinstance(w, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(w))):
        raise ValueError(f"{what}: {int(jnp.sum(~jnp.isfinite(w)))} non-finite value(s) in "
                         f"the kernel of shape {w.shape}")
    return w, lay


def _quant(x: jax.Array, fmt: WeightFormat) -> QuantizedWeight:
    return quantize_params({"kernel": x}, {"kernel": fmt})["kernel"]


def _rows(x: jax.Array, lay) -> jax.Array:
    """The kernel as PyTorch weights ``(*batch, out, in)``."""
    return jnp.swapaxes(lay.to_matrix(x), -1, -2)


def _kernel(m: jax.Array, lay) -> jax.Array:
    """Inverse of :func:`_rows`."""
    return lay.from_matrix(jnp.swapaxes(m, -1, -2))


def _factors(m: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """PEFT's ``_low_rank_decomposition`` per batch slice: ``L = U_r sqrt(S_r)`` ``(.., out,
    r)``, ``R = sqrt(S_r) Vh_r`` ``(.., r, in)`` from the exact SVD of ``m`` ``(.., out, in)``."""
    u, s, vh = jnp.linalg.svd(m, full_matrices=False)
    root = jnp.sqrt(s[..., :rank])
    return u[..., :, :rank] * root[..., None, :], root[..., :, None] * vh[..., :rank, :]


def _to_ab(left, right, lay, rank: int, scale: float):
    """effjax's ``a (*batch, *in, r)``, ``b (*batch, r, *out)`` from ``L`` and ``R``, each
    divided by ``sqrt(scale)`` so that ``scale * a @ b = L R`` (a no-op at scale 1)."""
    a = jnp.swapaxes(right, -1, -2)
    b = jnp.swapaxes(left, -1, -2)
    if scale != 1.0:
        root = math.sqrt(scale)
        a, b = a / root, b / root
    return (a.reshape(lay.batch_shape + lay.in_shape + (rank,)),
            b.reshape(lay.batch_shape + (rank,) + lay.out_shape))


# ----------------------------------------------------------------------------- LoftQ


@functools.partial(jax.jit, static_argnames=("fmt", "rank"))
def _loftq_step(w: jax.Array, res: jax.Array, fmt: WeightFormat, rank: int):
    """One LoftQ iteration (one compiled program for every iteration): ``Q = quant(res)``,
    ``L, R`` from the SVD of ``W - Q``, and the next residual ``W - L R``."""
    lay = fmt.layout(w.shape)
    node = _quant(res, fmt)
    left, right = _factors(_rows(w - node.materialize(), lay), rank)
    return node, left, right, w - _kernel(jnp.matmul(left, right), lay)


def loftq_init(w: jax.Array, fmt: WeightFormat = _QLORA_NF4, *, rank: int, iters: int = 1,
               alpha: float | None = None,
               rslora: bool = False) -> tuple[QuantizedWeight, jax.Array, jax.Array]:
    """LoftQ initialization: a quantized kernel and LoRA factors that absorb its error.

    On the row view :math:`W` (PyTorch's ``(out, in)``), with :math:`R_0 = W`, for
    :math:`t = 1..T`:

    .. math::

       Q_t = \\mathrm{dequant}(\\mathrm{quant}(R_{t-1})),\\quad
       U S V^h = \\mathrm{svd}(W - Q_t),\\quad
       L_t = U_{:r} S_{:r}^{1/2},\\; R'_t = S_{:r}^{1/2} V^h_{:r},\\quad
       R_t = W - L_t R'_t,

    which is PEFT's ``loftq_init(weight, num_bits, reduced_rank, num_iter)`` step by step
    (exact SVD; ``fmt=NF4(double_quant=False)`` is its ``num_bits=4``, the same bytes; its
    ``num_bits=8`` quantizes the float16 cast of the residual (bitsandbytes' ``Int8Params``),
    :class:`~effjax.compress.Int8` the float32 values). The result is :math:`Q_T` and
    :math:`A = R'^T_T / \\sqrt s`, :math:`B = L^T_T / \\sqrt s`, so that
    :math:`Q_T + s\\,AB = Q_T + L_T R'_T` for any LoRA scale :math:`s`.

    **alpha != rank.** PEFT computes the factors for a scale of 1 and stores them as they
    are, so with ``lora_alpha != r`` its model starts from :math:`Q + (\\alpha/r) L R'`,
    not the LoftQ approximation (its docs ask for ``lora_alpha = r``). effjax divides each
    factor by :math:`\\sqrt s` instead: the product is right for every :math:`\\alpha`, and
    ``alpha=None`` (or ``alpha = rank``) returns PEFT's factors unchanged. The iterations
    never see :math:`s`, so the quantized base does not depend on it.

    Args:
      w: a floating kernel; its layout (in, out and batch axes) is ``fmt``'s.
      fmt: the base's :class:`~effjax.compress.WeightFormat`; default QLoRA's NF4 with double
        quantization (the iterations quantize with the stored format; PEFT's LoftQ uses NF4
        without double quantization).
      rank: :math:`r`, at most :math:`\\min(n_{in}, n_{out})`.
      iters: :math:`T \\ge 1` (PEFT's ``num_iter``; ``loftq_iter``, default 1).
      alpha, rslora: the LoRA config's :math:`\\alpha` and rsLoRA flag giving
        :math:`s = \\alpha/r` (:math:`\\alpha/\\sqrt r`); ``None``: :math:`s = 1`.

    Returns:
      ``(q, a, b)``: the :class:`~effjax.compress.QuantizedWeight` (``w``'s dtype), ``a``
      ``(*batch, *in, r)`` and ``b`` ``(*batch, r, *out)`` in float32 (the promoted dtype),
      with :math:`\\mathrm{materialize}(q) + s\\,ab \\approx w`.

    Raises:
      ValueError: rank or iters below 1, rank above :math:`\\min(n_{in}, n_{out})`, a block
        longer than the contraction axes, non-finite weights, alpha not > 0 (shape named).
      TypeError: a non-floating kernel or a ``fmt`` that is no WeightFormat.

    Reference: Li et al., "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language
    Models", ICLR 2024 (arXiv:2310.08659), Algorithm 1; PEFT ``peft/utils/loftq_utils.py``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> w = jax.random.normal(jax.random.key(0), (64, 32))
      >>> q, a, b = loftq_init(w, NF4(double_quant=False), rank=4, alpha=16.0)  # s = 4
      >>> q0, a0, b0 = loftq_init(w, NF4(double_quant=False), rank=4)  # s = 1 (PEFT's)
      >>> bool(jnp.all(a == a0 / 2)), bool(jnp.allclose(4.0 * a @ b, a0 @ b0, atol=1e-6))
      (True, True)
    """
    w, lay = _checked(w, fmt, rank, iters, "loftq_init")
    scale = _scale(rank, alpha, rslora)
    ct = jnp.promote_types(w.dtype, jnp.float32)
    w32 = res = w.astype(ct)
    for _ in range(int(iters)):  # (the last residual is not used, as in PEFT)
        node, left, right, res = _loftq_step(w32, res, fmt, int(rank))
    a, b = _to_ab(left, right, lay, int(rank), scale)
    return dataclasses.replace(node, dtype=jnp.dtype(w.dtype)), a, b


# ----------------------------------------------------------------------------- LQ-LoRA


@functools.partial(jax.jit, static_argnames=("fmt", "rank"))
def _lq_step(w: jax.Array, q: jax.Array, fmt: WeightFormat, rank: int):
    """One LQ-LoRA iteration from the dense base ``q``: ``(node, q', L, R, error)``."""
    lay = fmt.layout(w.shape)
    left, right = _factors(_rows(w - q, lay), rank)
    lr = _kernel(jnp.matmul(left, right), lay)
    node = _quant(w - lr, fmt)
    q = node.materialize()
    return node, q, left, right, jnp.linalg.norm((w - lr - q).ravel())


def lq_lora_decompose(w: jax.Array, fmt: WeightFormat = _QLORA_NF4, *, rank: int, iters: int = 10,
                      alpha: float | None = None, rslora: bool = False
                      ) -> tuple[QuantizedWeight, jax.Array, jax.Array, list[float]]:
    """LQ-LoRA's low-rank plus quantized decomposition :math:`W \\approx Q + L_1 L_2`.

    On the row view :math:`W` (``(out, in)``), with :math:`Q_0 = 0`, for :math:`t = 1..T`:

    .. math::

       L_1 L_2 = \\mathrm{svd}_r(W - Q_{t-1}),\\quad
       Q_t = \\mathrm{dequant}(\\mathrm{quant}(W - L_1 L_2)),\\quad
       e_t = \\lVert W - L_1 L_2 - Q_t \\rVert_F,

    stopping at the first :math:`e_t > e_{t-1}` (the official ``lowrank_quantized_sparse_
    decomposition``). :math:`\\mathrm{svd}_r` is the **exact** truncated SVD with the split
    :math:`L_1 = U_r S_r^{1/2}`, :math:`L_2 = S_r^{1/2} V^h_r` (the official code defaults to
    ``torch.svd_lowrank`` with 10 oversamples, a randomized approximation of the same
    factors; the exact one is deterministic and no slower at LoRA sizes). The official code
    returns the iterate whose error rose (a TODO in it says so); effjax returns the best
    iterate, :math:`e_{t-1}`. Factors as in :func:`loftq_init`: :math:`A = L_2^T/\\sqrt s`,
    :math:`B = L_1^T/\\sqrt s`. Runs eagerly (the stop depends on the values), one compiled
    program per (shape, format, rank) for all iterations.

    Args:
      w: a floating kernel; its layout (in, out and batch axes) is ``fmt``'s.
      fmt: the :class:`~effjax.compress.WeightFormat` of :math:`Q`.
      rank: :math:`r`, at most :math:`\\min(n_{in}, n_{out})`.
      iters: the most iterations :math:`T \\ge 1`.
      alpha, rslora: the LoRA scale :math:`s` as in :func:`loftq_init` (``None``: 1).

    Returns:
      ``(q, a, b, errors)``: the best iterate's :class:`~effjax.compress.QuantizedWeight`
      (``w``'s dtype), ``a`` ``(*batch, *in, r)``, ``b`` ``(*batch, r, *out)`` (float32), and
      every computed :math:`e_t` as Python floats: non-increasing but for a last one that
      rose, which stopped the loop; the returned decomposition's error is ``min(errors)``.

    Raises:
      ValueError, TypeError: as :func:`loftq_init`.

    Reference: Guo, Greengard, Xing, Kim, "LQ-LoRA: Low-rank Plus Quantized Matrix
    Decomposition for Efficient Language Model Finetuning", ICLR 2024 (arXiv:2311.12023),
    Algorithm 1; github.com/HanGuo97/lq-lora ``models/lq_utils.py``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> w = jax.random.normal(jax.random.key(0), (64, 32))
      >>> q, a, b, errors = lq_lora_decompose(w, NF4(), rank=4, iters=5)
      >>> err = float(jnp.linalg.norm(w - q.materialize() - a @ b))
      >>> abs(err - min(errors)) < 1e-4 and errors[1] <= errors[0]
      True
    """
    w, lay = _checked(w, fmt, rank, iters, "lq_lora_decompose")
    scale = _scale(rank, alpha, rslora)
    ct = jnp.promote_types(w.dtype, jnp.float32)
    w32 = w.astype(ct)
    q = jnp.zeros_like(w32)
    errors: list[float] = []
    best = None
    for _ in range(int(iters)):
        node, q_next, left, right, err = _lq_step(w32, q, fmt, int(rank))
        errors.append(float(err))
        if best is not None and errors[-1] > errors[-2]:
            break
        best, q = (node, left, right), q_next
    node, left, right = best
    a, b = _to_ab(left, right, lay, int(rank), scale)
    return dataclasses.replace(node, dtype=jnp.dtype(w.dtype)), a, b, errors


@jax.jit
def _dequant_error(node: QuantizedWeight, w: jax.Array) -> jax.Array:
    """:math:`\\lVert W - \\mathrm{dequant}(Q)\\rVert_F`."""
    return jnp.linalg.norm((w - node.materialize()).ravel())


def lq_lora_allocate(weights: Mapping[str, jax.Array], candidates: Sequence[WeightFormat], *,
                     budget_bits_per_param: float | None = None,
                     budget_bytes: float | None = None, rank: int | None = None,
                     iters: int = 10) -> dict[str, WeightFormat]:
    """LQ-LoRA's mixed-format allocation: the integer program that picks one format per matrix.

    With :math:`c_{ij}` the squared error of matrix :math:`i` under candidate :math:`j` and
    :math:`m_{ij}` its stored bytes (codes, scales and nested statistics: the node's
    ``nbytes``), solve

    .. math::

       \\min_x \\sum_{ij} c_{ij} x_{ij}\\quad\\text{s.t.}\\quad
       \\sum_{ij} m_{ij} x_{ij} \\le \\text{budget},\\quad
       \\sum_j x_{ij} = 1,\\quad x_{ij} \\in \\{0, 1\\}

    with ``scipy.optimize.milp`` (HiGHS, ``mip_rel_gap=0``: the optimum, not a near one).
    :math:`c_{ij} = \\lVert W_i - \\mathrm{dequant}(\\mathrm{quant}_j(W_i))\\rVert_F^2`, or with
    ``rank`` the error left by :func:`lq_lora_decompose` (the official code's
    ``prepare_data_for_qconfig_assignments``; squared norms, so the objective is the total
    squared error; the official code also offers Fisher-weighted errors, not here). The
    low-rank factors cost the same under every candidate and are not counted. A candidate
    that cannot store a matrix (a block longer than its contraction axes, an int4 group
    that does not divide them) is left out for that matrix.

    Args:
      weights: ``{path: kernel}`` (e.g. from :func:`effjax.selection.tree_paths`); each
        candidate's in/batch axes apply to every kernel.
      candidates: the :class:`~effjax.compress.WeightFormat` choices (bits and block sizes).
      budget_bits_per_param: the budget as bits per parameter over all the kernels, or
      budget_bytes: the budget in bytes (exactly one of the two).
      rank: ``None`` for plain quantization errors, else the LQ-LoRA rank.
      iters: LQ-LoRA's iterations (with ``rank``).

    Returns:
      ``{path: format}``, the optimum; its total bytes are at most the budget. Use it as
      :func:`~effjax.compress.quantize_params` rules with ``re.escape(path)`` keys.

    Raises:
      ValueError: no candidates or weights, both or neither budget, a matrix no candidate can
        store, a budget below the cheapest choice of every matrix (both named in bytes and
        bits per parameter).

    Reference: Guo et al., "LQ-LoRA", ICLR 2024 (arXiv:2311.12023), Sec. 3.2, Eq. (4);
    github.com/HanGuo97/lq-lora ``models/lq_utils.py`` (``mip_solve``).

    Example:
      >>> import jax
      >>> from effjax.compress import Int8
      >>> ws = {'small': jax.random.normal(jax.random.key(0), (64, 32)) * 0.1,
      ...       'large': jax.random.normal(jax.random.key(1), (64, 32))}
      >>> alloc = lq_lora_allocate(ws, [NF4(), Int8()], budget_bits_per_param=6.5)
      >>> type(alloc['small']).__name__, type(alloc['large']).__name__
      ('NF4', 'Int8')
    """
    if not weights:
        raise ValueError("lq_lora_allocate needs at least one weight")
    candidates = list(candidates)
    if not candidates:
        raise ValueError("lq_lora_allocate needs at least one candidate format")
    for f in candidates:
        if not isinstance(f, WeightFormat):
            raise TypeError(f"candidates must be WeightFormats (NF4, FP4, Int8, Int4), got {f!r}")
    if (budget_bits_per_param is None) == (budget_bytes is None):
        raise ValueError("give exactly one of budget_bits_per_param and budget_bytes, got "
                         f"{budget_bits_per_param!r} and {budget_bytes!r}")
    paths = list(weights)
    n, k = len(paths), len(candidates)
    costs, sizes = np.zeros((n, k)), np.zeros((n, k), np.int64)
    ok = np.zeros((n, k), bool)
    n_params = 0
    for i, path in enumerate(paths):
        w = jnp.asarray(weights[path])
        if not jnp.issubdtype(w.dtype, jnp.floating):
            raise TypeError(f"weight {path!r}: needs a floating kernel, got dtype {w.dtype} "
                            f"(shape {w.shape})")
        n_params += w.size
        if not bool(jnp.all(jnp.isfinite(w))):
            raise ValueError(f"weight {path!r}: {int(jnp.sum(~jnp.isfinite(w)))} non-finite "
                             f"value(s) in the kernel of shape {w.shape}")
        w32 = w.astype(jnp.promote_types(w.dtype, jnp.float32))
        reasons = []
        for j, fmt in enumerate(candidates):
            # a candidate that cannot store this kernel (layout, block or group length) is
            # left out for it; a rank above the kernel's bound is the caller's error
            try:
                fmt.layout(w.shape)
            except ValueError as e:
                reasons.append(f"{fmt}: {e}")
                continue
            if rank is not None:
                _checked(w32, fmt, rank, iters, f"weight {path!r}")
            try:
                if rank is None:  # quantize_params' compiled encoder, shared with its callers
                    node = _quant(w32, fmt)
                    err = float(_dequant_error(node, w32))
                else:
                    node, _, _, errs = lq_lora_decompose(w32, fmt, rank=rank, iters=iters)
                    err = min(errs)
            except ValueError as e:
                reasons.append(f"{fmt}: {e}")
                continue
            costs[i, j], sizes[i, j], ok[i, j] = err * err, node.nbytes, True
        if not ok[i].any():
            raise ValueError(f"weight {path!r} (shape {w.shape}): no candidate can store it: "
                             + "; ".join(reasons))
    budget = (float(budget_bytes) if budget_bytes is not None
              else float(budget_bits_per_param) * n_params / 8)
    cheapest = int(sum(sizes[i][ok[i]].min() for i in range(n)))
    if not budget >= cheapest:
        raise ValueError(f"budget of {budget:g} bytes ({8 * budget / n_params:.4g} bits per "
                         f"parameter) is below the minimum {cheapest} bytes "
                         f"({8 * cheapest / n_params:.4g} bits per parameter) that the "
                         f"cheapest candidate of every matrix needs")
    from scipy.optimize import Bounds, LinearConstraint, milp  # jax depends on scipy

    top = costs.max()
    c = (costs / top if top > 0 else costs).ravel()
    one_hot = np.kron(np.eye(n), np.ones((1, k)))
    res = milp(c, integrality=np.ones(n * k),
               bounds=Bounds(np.zeros(n * k), ok.ravel().astype(float)),
               constraints=[LinearConstraint(sizes.reshape(1, -1).astype(float), -np.inf,
                                             math.floor(budget)),
                            LinearConstraint(one_hot, 1, 1)],
               options={"mip_rel_gap": 0.0})
    if res.x is None:  # cannot happen once the cheapest choice fits; kept as a guard
        raise RuntimeError(f"scipy.optimize.milp found no assignment: {res.message}")
    choice = np.round(res.x).reshape(n, k).argmax(axis=1)
    total = int(sizes[np.arange(n), choice].sum())
    if total > budget:  # HiGHS' feasibility tolerance; integer bytes make this a guard
        raise RuntimeError(f"the assignment takes {total} bytes, above the budget {budget:g}")
    return {path: candidates[j] for path, j in zip(paths, choice)}
