"""WeLore: non-uniform low-rank compression from the singular-value tail, and fine-tuning of the
low-rank components (Jaiswal et al., 2024).

WeLore (Weight Low-Rank Projection) picks one rank per weight matrix from the heavy tail of its
singular values, with one global threshold for all matrices, replaces the matrices that compress
well (the *low-rank components*, LRCs) by their truncated SVD factors, and fine-tunes only those
factors (WeLore-PEFT); the other matrices (N-LRCs) stay dense and frozen.

**Rank choice** (the official ``adaptive_rank_pruning``). For each matrix with singular values
:math:`s_1 \\ge \\dots \\ge s_k` (:math:`k = \\min(n_{in}, n_{out})`), normalize them to
:math:`[0, 1]` and drop those under a global threshold :math:`t`:

.. math::

  \\hat s_i = \\frac{s_i - \\min_j s_j}{\\max_j s_j - \\min_j s_j}, \\qquad
  \\text{pruned} = \\#\\{i : \\hat s_i < t\\}, \\qquad r = k - \\text{pruned}.

A matrix is an LRC when :math:`\\text{pruned} / k > \\text{min\\_ratio}` (official default 0).
The official scripts take :math:`t` from a table tuned per model for a target "effective rank
reduction" :math:`\\rho = \\sum \\text{pruned} / \\sum k` (e.g. :math:`t = 0.175` for 50% on
LLaMa-2 7B); :func:`welore_threshold` instead solves for the smallest threshold that reaches a
given :math:`\\rho` on the targeted leaves (the threshold is a step function's argument, so the
reached reduction can exceed :math:`\\rho` only by ties). A matrix whose singular values are all
equal (e.g. zero or orthogonal; "equal" meaning :math:`\\max - \\min \\le 10^{-5} \\max`, the
float32 SVD's accuracy) keeps its full rank (the official code would divide by zero, or prune
by rounding noise).

**Factors** (the official ``LowRankLayer``). With the SVD :math:`W = U \\Sigma V^\\top` of the
Flax kernel :math:`W \\in \\mathbb{R}^{n_{in} \\times n_{out}}` (``y = x W``):

.. math::

  W \\approx W' = A B, \\qquad A = U_r \\Sigma_r^{1/2} \\in \\mathbb{R}^{n_{in} \\times r},
  \\quad B = \\Sigma_r^{1/2} V_r^\\top \\in \\mathbb{R}^{r \\times n_{out}},

both trainable, and the dense kernel is dropped: ``materialize()`` is the low-rank product
:math:`AB` (equal to :math:`W` up to float rounding only at full rank
:math:`r = \\min(n_{in}, n_{out})`; otherwise the best rank-:math:`r` approximation, Eckart-Young).
The official layer ``U(V(x))`` with ``U.weight`` :math:`= U_r\\Sigma_r^{1/2}` and ``V.weight``
:math:`= \\Sigma_r^{1/2} V_r^\\top` in torch's ``(out, in)`` layout is the same product transposed.

Trainable parameters per kernel: :math:`r\\,(n_{in} + n_{out})`, times the number of slices for
stacked kernels (``batch_axes``); for a tuple of per-slice ranks, :math:`n_{batch}\\,
r_{max}\\,(n_{in} + n_{out})` (see below). No frozen arrays are kept for a compressed leaf.

**Memory.** A compressed leaf stores :math:`r\\,(n_{in} + n_{out})` numbers instead of
:math:`n_{in} n_{out}`: a saving whenever :math:`r < n_{in} n_{out} / (n_{in} + n_{out})` (e.g.
:math:`r = 512` on a :math:`4096 \\times 4096` kernel keeps 25% of the elements), and the
fine-tuning optimizer state is that of the factors only. Factors are float32 for bfloat16/float16
kernels by default (as LoRA), which doubles their bytes; pass ``dtype=jnp.bfloat16`` to store
them in bfloat16 like the official code.

**Stacked kernels** (``batch_axes``: scanned layers or experts) get one rank per slice, as WeLore
ranks every matrix separately: ``rank`` may be a tuple with one rank per slice (in row-major
order of the batch shape). The factors are then stored with :math:`r_{max} = \\max_s r_s` columns
and slice :math:`s`'s columns :math:`\\ge r_s` are zero and masked in ``materialize`` (so they get
exactly zero gradients and stay zero); they count in the trainable-array size. A stacked leaf is
an LRC when its total pruned rank over all slices exceeds ``min_ratio`` of its total rank.

Tree-level use: :func:`welore_rules` computes every targeted leaf's spectrum, the ranks and the
LRCs and returns exact-path rules for :func:`effjax.peft.inject`::

  rules = welore_rules(params, {r'.*/(query|value|mlp.*)/kernel': WeLore()}, reduction=0.5)
  tree = inject(params, rules, key=key)   # LRCs become WeLoreWeight, everything else frozen

Rank choice needs concrete weights (it fixes array shapes), so it runs outside ``jit``;
``inject`` with the resulting rules runs under ``jit``.

References:
  Jaiswal, Yin, Zhang, Liu, Zhao, Tian, Wang, "From GaLore to WeLore: How Low-Rank Weights
  Non-uniformly Emerge from Low-Rank Gradients", arXiv:2407.11239, 2024.
  Official code: https://github.com/VITA-Group/welore (``utils.py: adaptive_rank_pruning``,
  ``lib/LowRankLayer.py``, ``lib/rank_reduction.py: do_rank_reduction``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from effjax.peft.base import AdapterNode, KernelAdapter, adapter_node, register_adapter
from effjax.peft.layout import KernelLayout, place_like
from effjax.peft.rules import assign_rules, compile_rules
from effjax.selection import path_str

__all__ = ["WeLore", "WeLoreWeight", "welore_spectra", "welore_threshold", "welore_ranks",
           "welore_rules"]


def _check_rank(v: Any) -> int | tuple[int, ...] | None:
    if v is None:
        return None
    items = tuple(v) if isinstance(v, (tuple, list)) else None
    for x in (items if items is not None else (v,)):
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
            raise TypeError(f"WeLore rank must be None, an int or a tuple of ints (one per "
                            f"batch slice), got {v!r}")
        if x < 1:
            raise ValueError(f"WeLore rank must be >= 1, got {v!r}")
    if items is None:
        return int(v)
    if not items:
        raise ValueError("WeLore rank tuple is empty; give one rank per batch slice")
    return tuple(int(x) for x in items)


@register_adapter("welore")
@dataclasses.dataclass(frozen=True, kw_only=True)
class WeLore(KernelAdapter):
    """WeLore method config: replace a kernel by trainable rank-:math:`r` SVD factors.

    :math:`W' = AB`, :math:`A = U_r\\Sigma_r^{1/2}`, :math:`B = \\Sigma_r^{1/2}V_r^\\top`;
    trainable parameters :math:`n_{batch}\\, r\\,(n_{in} + n_{out})`. Ranks usually come from
    :func:`welore_rules`. See the module docstring.

    Attributes:
      rank: None (full rank :math:`\\min(n_{in}, n_{out})`: an exact refactorization), an int
        :math:`1 \\le r \\le \\min(n_{in}, n_{out})`, or a tuple of such ints, one per batch slice
        of a stacked kernel (row-major over the batch shape).
      dtype, in_axes, out_axes, batch_axes: as every :class:`~effjax.peft.KernelAdapter`
        (``dtype``: of ``a`` and ``b``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> w = jax.random.normal(jax.random.key(1), (6, 4))
      >>> node = WeLore(rank=2).adapt(jax.random.key(0), w)
      >>> node.a.shape, node.b.shape
      ((6, 2), (2, 4))
      >>> s = jnp.linalg.svd(w, compute_uv=False)  # the error is the dropped tail (Eckart-Young)
      >>> bool(jnp.isclose(jnp.linalg.norm(node.materialize() - w), jnp.linalg.norm(s[2:])))
      True
      >>> full = WeLore().adapt(jax.random.key(0), w)  # rank None: min(n_in, n_out)
      >>> bool(jnp.allclose(full.materialize(), w, atol=1e-5))
      True
      >>> WeLore(rank=2).num_trainable((6, 4))  # r (in + out)
      20
    """

    rank: int | tuple[int, ...] | None = None

    def __post_init__(self):
        super().__post_init__()
        self._set(rank=_check_rank(self.rank))

    def slice_ranks(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The rank of every batch slice of a kernel of ``shape`` (checked against it)."""
        lay = self.layout(shape)
        k = min(lay.n_in, lay.n_out)
        if self.rank is None:
            return (k,) * lay.n_batch
        ranks = self.rank if isinstance(self.rank, tuple) else (self.rank,) * lay.n_batch
        if len(ranks) != lay.n_batch:
            raise ValueError(f"WeLore rank={self.rank} has {len(ranks)} entries but the kernel "
                             f"of shape {lay.shape} has {lay.n_batch} batch slices "
                             f"(batch_axes={lay.batch_axes})")
        if max(ranks) > k:
            raise ValueError(f"WeLore rank must be <= min(n_in, n_out) = {k} for a kernel of "
                             f"shape {lay.shape}, got rank={self.rank}")
        return ranks

    def num_trainable(self, shape: Sequence[int]) -> int:
        """:math:`n_{batch}\\, r_{max}\\,(n_{in} + n_{out})` (:math:`r` for a single rank)."""
        lay = self.layout(shape)
        return lay.n_batch * max(self.slice_ranks(shape)) * (lay.n_in + lay.n_out)

    def adapt(self, key: jax.Array, w: jax.Array) -> WeLoreWeight:
        """The truncated SVD factors of each slice of ``w`` (``key`` is unused: deterministic);
        ``a`` sharded like ``w``'s batch / in axes and ``b`` like its batch / out axes."""
        del key
        lay = self.layout(w.shape)
        ranks = self.slice_ranks(w.shape)
        r, dtype = max(ranks), self.adapter_dtype(w.dtype)
        ct = jnp.promote_types(w.dtype, jnp.float32)
        m = lay.to_matrix(w).astype(ct)  # (*batch, n_in, n_out)
        u, s, vh = jnp.linalg.svd(m, full_matrices=False)
        root = jnp.sqrt(s[..., :r]) * _mask(ranks, r, lay.batch_shape, ct)
        a = (u[..., :r] * root[..., None, :]).astype(dtype)
        b = (root[..., :, None] * vh[..., :r, :]).astype(dtype)
        a = place_like(a.reshape(lay.batch_shape + lay.in_shape + (r,)), w,
                       lay.batch_axes + lay.in_axes + (None,))
        b = place_like(b.reshape(lay.batch_shape + (r,) + lay.out_shape), w,
                       lay.batch_axes + (None,) + lay.out_axes)
        return WeLoreWeight(a=a, b=b, method=self, layout=lay, dtype=jnp.dtype(w.dtype))


def _mask(ranks: tuple[int, ...], r: int, batch_shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """``(*batch, r)``: 1 for the columns below each slice's rank, else 0 (a constant)."""
    m = np.arange(r)[None, :] < np.asarray(ranks)[:, None]
    return jnp.asarray(m.reshape(batch_shape + (r,)), dtype)


@adapter_node
class WeLoreWeight(AdapterNode):
    """A kernel replaced by trainable low-rank factors (a WeLore LRC): ``a`` and ``b``.

    ``materialize()`` :math:`= AB` (per slice, columns beyond the slice's rank masked) in the
    original kernel's shape and ``dtype``.

    Attributes:
      a: ``(*batch, *in, r)``: :math:`U_r\\Sigma_r^{1/2}`, trainable.
      b: ``(*batch, r, *out)``: :math:`\\Sigma_r^{1/2}V_r^\\top`, trainable.
      method: the :class:`WeLore` config (static).
      layout: the kernel's :class:`~effjax.peft.layout.KernelLayout` (static).
      dtype: the original kernel's dtype (static), the dtype of ``materialize()``.
    """

    trainable_fields = ("a", "b")
    frozen_fields = ()

    a: jax.Array
    b: jax.Array
    method: WeLore
    layout: KernelLayout
    dtype: Any

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    def materialize(self) -> jax.Array:
        """:math:`AB`, cast to the original kernel's dtype."""
        lay, r = self.layout, self.rank
        ct = jnp.promote_types(self.a.dtype, self.dtype)
        a = self.a.astype(ct)
        if isinstance(self.method.rank, tuple):
            mask = _mask(self.method.slice_ranks(lay.shape), r, lay.batch_shape, ct)
            a = a * mask.reshape(lay.batch_shape + (1,) * len(lay.in_axes) + (r,))
        # one einsum over the kernel's own axes (no reshape to matrices), so the product keeps
        # the shardings of a's batch / in axes and b's out axes
        letters = [chr(ord("a") + i) for i in range(len(lay.shape))]
        bt, it, ot = ("".join(letters[x] for x in axes)
                      for axes in (lay.batch_axes, lay.in_axes, lay.out_axes))
        eq = f"{bt}{it}z,{bt}z{ot}->{''.join(letters)}"
        return jnp.einsum(eq, a, self.b.astype(ct)).astype(self.dtype)


# ---------------------------------------------------------------------------------------------
# tree-level rank selection


def _targets(targets: Any) -> list:
    if isinstance(targets, str):
        targets = {targets: WeLore()}
    rules = compile_rules(targets)
    for rule in rules:
        if rule.method is not None and not isinstance(rule.method, WeLore):
            raise TypeError(f"welore target '{rule.pattern}': value must be a WeLore template "
                            f"(its axes and dtype are used, its rank replaced) or None, got "
                            f"{type(rule.method).__name__}")
    return rules


def _targeted(params: Any, targets: Any) -> dict[str, tuple[WeLore, jax.Array]]:
    rules = _targets(targets)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    paths = [path_str(p) for p, _ in flat]
    out = {}
    for path, (_, leaf), c in zip(paths, flat, assign_rules(paths, rules)):
        if c is None or rules[c].method is None:
            continue
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"welore: leaf '{path}' (dtype {dtype}) is not a floating array")
        out[path] = (rules[c].method, leaf)
    return out


def welore_spectra(params: Any, targets: Any) -> dict[str, np.ndarray]:
    """The singular values of every targeted leaf: ``{path: (n_batch, k) float64}``, each row
    descending (:math:`k = \\min(n_{in}, n_{out})`, float32 SVD per slice).

    Args:
      params: the param tree.
      targets: a regex, or ordered rules ``{regex: WeLore template | None}`` (first fullmatch
        decides, as :func:`effjax.peft.inject`; a template's axes tell how to see the leaf as
        matrices). A rule that decides no leaf is an error.

    Example:
      >>> import jax.numpy as jnp
      >>> spec = welore_spectra({'k': jnp.diag(jnp.array([3.0, 1.0, 2.0]))}, 'k')
      >>> spec['k']
      array([[3., 2., 1.]])
    """
    out = {}
    for path, (method, leaf) in _targeted(params, targets).items():
        try:
            lay = method.layout(leaf.shape)
        except (ValueError, TypeError) as e:
            raise type(e)(f"welore: leaf '{path}' (shape {tuple(leaf.shape)}): {e}") from None
        m = lay.to_matrix(jnp.asarray(leaf)).astype(jnp.promote_types(leaf.dtype, jnp.float32))
        s = jax.device_get(jnp.linalg.svd(m, compute_uv=False))
        out[path] = np.asarray(s, np.float64).reshape(lay.n_batch, -1)
    return out


#: spectra whose spread max - min is at most this fraction of max count as flat (equal singular
#: values up to the float32 SVD's accuracy): nothing is pruned
FLAT_RTOL = 1e-5


def _normalized(s: np.ndarray) -> np.ndarray:
    """Min-max normalized singular values per row; flat rows (see FLAT_RTOL) become all 1."""
    lo, hi = s.min(axis=-1, keepdims=True), s.max(axis=-1, keepdims=True)
    span = hi - lo
    ok = span > FLAT_RTOL * hi
    return np.where(ok, (s - lo) / np.where(ok, span, 1.0), 1.0)


def _spectra_of(params: Any, targets: Any, spectra: Mapping[str, np.ndarray] | None):
    return dict(spectra) if spectra is not None else welore_spectra(params, targets)


def welore_threshold(params: Any, targets: Any, reduction: float, *,
                     spectra: Mapping[str, np.ndarray] | None = None) -> float:
    """The smallest global threshold :math:`t` whose rank reduction
    :math:`\\sum \\#\\{\\hat s_i < t\\} / \\sum k` over the targeted leaves is at least
    ``reduction`` (see the module docstring; replaces the official per-model threshold table).

    Every matrix keeps at least rank 1, so ``reduction`` must leave one singular value per
    matrix: :math:`0 \\le \\rho \\le 1 - n_{matrices} / \\sum k`.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {'k': jnp.diag(jnp.array([5.0, 4.0, 2.0, 1.0]))}  # s_hat = 1, .75, .25, 0
      >>> welore_threshold(params, 'k', 0.5)  # prune 2 of 4: t just above 0.25
      0.25000000000000006
    """
    if isinstance(reduction, bool) or not isinstance(reduction, (int, float, np.number)) or not (
            0.0 <= reduction < 1.0):
        raise ValueError(f"welore reduction must be a number in [0, 1), got {reduction!r}")
    spec = _spectra_of(params, targets, spectra)
    vals, n_mat = [], 0
    for s in spec.values():
        h = _normalized(s)
        n_mat += h.shape[0]
        # each row's largest value (1) is never pruned: rank >= 1
        vals.append(np.sort(h, axis=-1)[:, :-1].ravel())
    allv = np.sort(np.concatenate(vals)) if vals else np.zeros(0)
    total = allv.size + n_mat
    need = math.ceil(reduction * total - 1e-9)
    if need == 0:
        return 0.0
    if need > allv.size or allv[need - 1] >= 1.0:
        raise ValueError(f"welore reduction={reduction} would prune {need} of {total} singular "
                         f"values, leaving some matrix with rank 0; at most "
                         f"{allv.size - int(np.sum(allv >= 1.0))} can be pruned")
    return float(np.nextafter(allv[need - 1], np.inf))


def welore_ranks(params: Any, targets: Any, *, threshold: float | None = None,
                 reduction: float | None = None,
                 spectra: Mapping[str, np.ndarray] | None = None) -> dict[str, tuple[int, ...]]:
    """The WeLore rank of every slice of every targeted leaf: ``{path: (r_1, ..., r_nbatch)}``
    with :math:`r = k - \\#\\{i : \\hat s_i < t\\}` (see the module docstring).

    Args:
      params, targets: as :func:`welore_spectra`.
      threshold: the global threshold :math:`t \\in [0, 1]` (the official ``rank_thresold``).
      reduction: instead of ``threshold``: the target rank reduction :math:`\\rho`
        (:func:`welore_threshold`). Exactly one of the two.
      spectra: precomputed :func:`welore_spectra` (skips the SVDs).

    Example (a hand-computed case):
      >>> import jax.numpy as jnp
      >>> params = {'a': jnp.diag(jnp.array([5.0, 4.0, 2.0, 1.0])),  # s_hat = 1, .75, .25, 0
      ...           'b': jnp.diag(jnp.array([9.0, 1.0, 1.0]))}  # s_hat = 1, 0, 0
      >>> welore_ranks(params, '.*', threshold=0.5)  # a: 2 below 0.5, b: 2 below 0.5
      {'a': (2,), 'b': (1,)}
    """
    if (threshold is None) == (reduction is None):
        raise ValueError("welore: give exactly one of threshold= and reduction=")
    spec = _spectra_of(params, targets, spectra)
    if threshold is None:
        threshold = welore_threshold(params, targets, reduction, spectra=spec)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.number)) or not (
            0.0 <= threshold <= 1.0):
        raise ValueError(f"welore threshold must be a number in [0, 1], got {threshold!r}")
    out = {}
    for path, s in spec.items():
        h = _normalized(s)
        pruned = np.sum(h < threshold, axis=-1)
        out[path] = tuple(int(x) for x in np.maximum(h.shape[-1] - pruned, 1))
    return out


def welore_rules(params: Any, targets: Any, *, threshold: float | None = None,
                 reduction: float | None = None, min_ratio: float = 0.0,
                 spectra: Mapping[str, np.ndarray] | None = None) -> dict[str, WeLore]:
    """Exact-path rules ``{re.escape(path): WeLore(rank=...)}`` for the LRCs among the targeted
    leaves: those whose pruned rank is more than ``min_ratio`` of their full rank (official
    ``do_rank_reduction``: ``pruned / k > min_ratio``). Pass them to :func:`effjax.peft.inject`;
    N-LRCs are left out of the rules and so stay dense and frozen.

    Each rule's config is the leaf's template with ``rank`` set (an int, or a tuple for a stacked
    leaf whose slices get different ranks).

    Args:
      params, targets, threshold, reduction, spectra: as :func:`welore_ranks`.
      min_ratio: in ``[0, 1)``; default 0 (any pruning makes an LRC), as the official default.

    Raises:
      ValueError: bad ``threshold`` / ``reduction`` / ``min_ratio``; no leaf qualifies as an LRC
        (nothing to fine-tune: lower ``min_ratio`` or raise the threshold).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from effjax.peft import inject, summary
      >>> params = {'a': jnp.diag(jnp.array([5.0, 4.0, 2.0, 1.0])),
      ...           'b': jnp.diag(jnp.array([9.0, 1.0, 1.0])), 'c': jnp.eye(3)}
      >>> rules = welore_rules(params, {'a|b': WeLore()}, threshold=0.5, min_ratio=0.6)
      >>> rules  # a prunes 2/4 = 0.5 (an N-LRC), b prunes 2/3
      {'b': WeLore(rank=1, dtype=None, in_axes=None, out_axes=None, batch_axes=())}
      >>> summary(inject(params, rules, key=jax.random.key(0))).trainable  # 1 * (3 + 3)
      6
    """
    if isinstance(min_ratio, bool) or not isinstance(min_ratio, (int, float, np.number)) or not (
            0.0 <= min_ratio < 1.0):
        raise ValueError(f"welore min_ratio must be a number in [0, 1), got {min_ratio!r}")
    spec = _spectra_of(params, targets, spectra)
    ranks = welore_ranks(params, targets, threshold=threshold, reduction=reduction,
                         spectra=spec)
    templates = {p: m for p, (m, _) in _targeted(params, targets).items()}
    out = {}
    for path, rs in ranks.items():
        k = spec[path].shape[-1]
        if (k * len(rs) - sum(rs)) / (k * len(rs)) <= min_ratio:
            continue  # N-LRC: stays dense and frozen
        rank = rs[0] if len(set(rs)) == 1 else rs
        out[re.escape(path)] = dataclasses.replace(templates[path], rank=rank)
    if not out:
        raise ValueError(f"welore: no targeted leaf prunes more than min_ratio={min_ratio} of "
                         f"its rank at this threshold (nothing to fine-tune); lower min_ratio or "
                         f"raise the threshold / reduction")
    return out
