"""EVA: LoRA initialised from the principal components of the layer's inputs (Paischer et al.,
2024), with ranks redistributed across layers by explained variance.

For a kernel :math:`W \\in \\mathbb{R}^{n_{in} \\times n_{out}}` (``y = x W``) whose inputs
:math:`x_t` were collected by :func:`effjax.peft.calibrate`, EVA is LoRA,

.. math::

  W' = W + s\\, A B, \\qquad A = V_r \\in \\mathbb{R}^{n_{in} \\times r}, \\quad B = 0,

where the columns of :math:`V_r` are the top-:math:`r` right-singular vectors of the centered
activation matrix :math:`X - \\mathbf{1}\\bar x^\\top` (rows :math:`x_t`), i.e. the top
eigenvectors of the scatter matrix :math:`S = \\sum_t (x_t - \\bar x)(x_t - \\bar x)^\\top =
G - s s^\\top / n` (:meth:`~effjax.peft.InputStats.scatter`), with eigenvalues
:math:`\\lambda_1 \\ge \\lambda_2 \\ge \\dots`. :math:`W' = W` exactly right after injection.
``whiten=True`` divides column :math:`i` by :math:`\\sqrt{\\sigma_i}`, :math:`\\sigma_i =
\\sqrt{\\lambda_i}` the singular value (PEFT's ``whiten``). The scale is LoRA's,
:math:`s = \\alpha / r` (:math:`\\alpha/\\sqrt r` with ``rslora``), and the node is a
:class:`~effjax.peft.LoRAWeight`, so ``materialize``, ``merge`` and the fast LoRA layers apply.
Trainable parameters: :math:`r\\,(n_{in} + n_{out})`.

**Rank redistribution** (:func:`eva_rules`). Each EVA leaf :math:`l` starts with a rank
:math:`r_l` (its rule's ``rank``); with :math:`\\rho \\ge 1`, leaf :math:`l` offers its top
:math:`\\mathrm{round}(\\rho\\, r_l)` explained-variance ratios
:math:`\\lambda_i / \\mathrm{tr}\\,S`, and the :math:`\\sum_l r_l` largest ratios over all
leaves win: leaf :math:`l`'s new rank is the number of its ratios among them (0: the leaf is
not adapted). With ``adjust_scaling_factors`` (PEFT's default)
:math:`\\alpha_l \\leftarrow \\alpha\\, r'_l / r_l`, so :math:`s = \\alpha/r_l` stays as configured.
:math:`\\rho = 1` keeps every rank.

Relation to Hugging Face PEFT (``peft/tuners/lora/eva.py``): PEFT estimates the components with
an incremental, randomized PCA (``IncrementalPCA(lowrank=True)``: ``svd_lowrank`` with
:math:`q = 2k`, 4 subspace iterations, seed 42), feeding batches until the cosine similarity
between consecutive estimates reaches ``tau``. effjax computes the exact PCA of all calibration
tokens from their second moments (eigendecomposition of :math:`S` in float32), which is what that
iteration converges to, so ``tau`` has no counterpart. PEFT's ratio
:math:`\\sigma_i^2 / \\sum_j n\\,\\mathrm{var}_j` is :math:`\\lambda_i / \\mathrm{tr}\\,S` here;
signs follow PEFT's ``svd_flip`` (the largest-magnitude entry of each component is positive).
Ties between equal ratios (layers that see the same inputs, like query/key/value) go to the
leaf that comes first in the calibration mapping. PEFT orders tied modules by torch's
(unstable) sort: with two tied layers it agrees with this rule, with three (query, key and value
of one layer) it may swap the last two (measured on all-MiniLM-L6-v2: same total rank, key and
value exchanged). Other differences: PEFT caps :math:`\\rho` for :math:`\\rho > 1000`;
here :math:`\\mathrm{round}(\\rho r_l)` is capped at :math:`n_{in}` instead of failing; with
``whiten`` PEFT's singular values grow with the number of passes over the data it made (a
repeated batch counts again), here they are those of the calibration tokens once. Stacked
kernels (``batch_axes``) are not supported: per-slice ranks cannot share one array.

References:
  Paischer, Hauzenberger, Schmied, Alkin, Deisenroth, Hochreiter, "One Initialization to Rule
  Them All: Fine-tuning via Explained Variance Adaptation", arXiv:2410.07170, 2024.
  Hugging Face PEFT, ``src/peft/tuners/lora/eva.py`` and ``src/peft/utils/incremental_pca.py``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from effjax.peft._calibrate import InputStats
from effjax.peft._checks import check_bool
from effjax.peft.base import AdapterMethod, register_adapter
from effjax.peft.layout import place_like
from effjax.peft.lora import LoRAWeight, ScaledRank
from effjax.peft.rules import compile_rules

__all__ = ["EVA", "eva_components", "eva_rules"]


def _check_stats(data: Any, n_in: int, what: str) -> InputStats:
    if not all(hasattr(data, f) for f in ("gram", "sum", "count")):
        raise TypeError(f"{what} needs InputStats (from effjax.peft.calibrate) as calibration "
                        f"data, got {type(data).__name__}")
    g = jnp.asarray(data.gram)
    if g.shape != (n_in, n_in) or jnp.shape(data.sum) != (n_in,) or jnp.shape(data.count) != ():
        raise ValueError(f"{what}: the kernel has n_in={n_in} input features but the input "
                         f"statistics have gram {g.shape}, sum {jnp.shape(data.sum)}, count "
                         f"{jnp.shape(data.count)} (expected ({n_in}, {n_in}), ({n_in},), ()); "
                         f"check the config's in_axes against the layer")
    for name in ("gram", "sum", "count"):
        if not jnp.issubdtype(jnp.asarray(getattr(data, name)).dtype, jnp.floating):
            raise TypeError(f"{what}: InputStats.{name} must be floating, got "
                            f"{jnp.asarray(getattr(data, name)).dtype}")
    return InputStats(g.astype(jnp.float32), jnp.asarray(data.sum, jnp.float32),
                      jnp.asarray(data.count, jnp.float32))


def eva_components(stats: InputStats, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The top-``k`` principal components of the calibration tokens.

    Returns ``(v, ratio, sigma)``: ``v`` ``(n_in, k)`` the eigenvectors of the scatter matrix
    :math:`S = G - s s^\\top/n` for its ``k`` largest eigenvalues :math:`\\lambda_i` (columns, in
    decreasing order, each signed so that its largest-magnitude entry is positive),
    ``ratio`` :math:`\\lambda_i / \\mathrm{tr}\\,S` (explained-variance ratios) and ``sigma``
    :math:`\\sqrt{\\lambda_i}` (singular values of the centered activation matrix).

    Example:
      >>> import jax.numpy as jnp
      >>> from effjax.peft import input_stats
      >>> x = jnp.array([[3., 0.], [-1., 0.], [1., 1.], [1., -1.]])  # mean (1, 0)
      >>> v, ratio, sigma = eva_components(input_stats(x), 1)  # S = diag(8, 2)
      >>> v, ratio, (sigma ** 2).round(4)
      (Array([[1.],
             [0.]], dtype=float32), Array([0.8], dtype=float32), Array([8.], dtype=float32))
    """
    s = stats.scatter().astype(jnp.float32)
    s = 0.5 * (s + s.T)
    lam, vec = jnp.linalg.eigh(s)  # ascending
    lam, vec = jnp.maximum(lam[::-1][:k], 0.0), vec[:, ::-1][:, :k]
    idx = jnp.argmax(jnp.abs(vec), axis=0)
    sign = jnp.sign(vec[idx, jnp.arange(vec.shape[1])])
    vec = vec * jnp.where(sign == 0, 1.0, sign)[None, :]
    total = jnp.trace(s)
    return vec, lam / total, jnp.sqrt(lam)


@register_adapter("eva")
@dataclasses.dataclass(frozen=True, kw_only=True)
class EVA(ScaledRank):
    """EVA method config (a rule value of :func:`effjax.peft.inject`; needs calibration data).

    :math:`W' = W + s\\,AB` with :math:`A` the top-:math:`r` principal directions of the
    layer's inputs and :math:`B = 0`; trainable parameters :math:`r\\,(n_{in} + n_{out})`. See the
    module docstring for the equations, the rank redistribution (:func:`eva_rules`) and the
    differences from Hugging Face PEFT.

    Attributes:
      rank: :math:`r \\ge 1`, at most :math:`n_{in}`. Use :func:`eva_rules` to redistribute
        ranks across leaves (PEFT's ``initialize_lora_eva_weights``); used directly, every leaf
        gets this rank (PEFT with ``rho=1``).
      alpha: :math:`\\alpha` (PEFT's ``lora_alpha``).
      rslora: :math:`s = \\alpha/\\sqrt r`.
      whiten: divide each direction by the square root of its singular value (PEFT's
        ``EvaConfig.whiten``).
      dtype: dtype of ``a`` and ``b`` (None: the kernel's dtype, float32 for 16-bit kernels).
      in_axes, out_axes: the kernel's axes (:mod:`effjax.peft.layout`); the calibration
        statistics must be over the same ``n_in`` input features. ``batch_axes`` must be empty.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from effjax.peft import input_stats
      >>> x = jax.random.normal(jax.random.key(0), (64, 6)) * jnp.arange(1.0, 7.0)
      >>> w = jax.random.normal(jax.random.key(1), (6, 4))
      >>> node = EVA(rank=2, alpha=4.0).adapt(jax.random.key(2), w, data=input_stats(x))
      >>> node.a.shape, node.b.shape, node.scale, bool((node.materialize() == w).all())
      ((6, 2), (2, 4), 2.0, True)
      >>> jnp.abs(node.a).argmax(axis=0)  # the two inputs with the largest variance
      Array([5, 4], dtype=int32)
    """

    calibration: ClassVar[str] = "inputs"

    whiten: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_bool(self.whiten, "whiten", self.name)
        if self.batch_axes:
            raise ValueError(f"EVA does not support stacked kernels (batch_axes="
                             f"{self.batch_axes}): its ranks are chosen per leaf")

    def adapt(self, key: jax.Array, w: jax.Array, data: Any = None) -> LoRAWeight:
        """``a`` = the top-``rank`` principal directions of the inputs (``data``: this leaf's
        :class:`~effjax.peft.InputStats`), ``b = 0``, ``w`` unchanged."""
        del key
        lay = self.layout(w.shape)
        if data is None:
            raise ValueError("EVA needs the layer's input statistics: inject(..., calibration="
                             "calibrate(...))")
        stats = _check_stats(data, lay.n_in, f"EVA on a kernel of shape {w.shape}")
        r = self.rank
        if r > lay.n_in:
            raise ValueError(f"EVA rank={r} exceeds the kernel's n_in={lay.n_in} input features "
                             f"(shape {w.shape})")
        if not isinstance(stats.count, jax.core.Tracer) and float(stats.count) < r:
            raise ValueError(f"EVA rank={r} needs at least {r} calibration tokens, the "
                             f"statistics hold {float(stats.count):g}")
        vec, _, sigma = eva_components(stats, r)
        if self.whiten:
            vec = vec / jnp.sqrt(sigma)[None, :]
        dtype = self.adapter_dtype(w.dtype)
        a = vec.astype(dtype).reshape(lay.in_shape + (r,))
        b = jnp.zeros((r,) + lay.out_shape, dtype)
        a = place_like(a, w, lay.in_axes + (None,))
        b = place_like(b, w, (None,) + lay.out_axes)
        return LoRAWeight(w=w, a=a, b=b, method=self, layout=lay)


def eva_rules(rules: Any, calibration: Mapping[str, Any], *, rho: float = 2.0,
              adjust_scaling_factors: bool = True) -> dict[str, AdapterMethod | None]:
    """Rules with EVA's explained-variance rank redistribution applied (PEFT's
    ``initialize_lora_eva_weights`` with ``EvaConfig(rho=...)``).

    Every path of ``calibration`` whose first fullmatching rule is an :class:`EVA` config takes
    part: leaf :math:`l` (rank :math:`r_l` from its rule) offers its top
    :math:`\\mathrm{round}(\\rho r_l)` (at most :math:`n_{in}`) explained-variance ratios, and the
    :math:`\\sum_l r_l` largest over all leaves decide the new ranks (ties: earlier paths of
    ``calibration`` first). See the module docstring.

    Args:
      rules: the rules as for :func:`effjax.peft.inject` (EVA values give the initial ranks;
        other rules are kept).
      calibration: ``{path: InputStats}`` from :func:`effjax.peft.calibrate`. EVA rules are
        resolved against these paths only (a leaf without statistics is not adapted).
      rho: :math:`\\rho \\ge 1` (PEFT's ``EvaConfig.rho``; 1 keeps the ranks).
      adjust_scaling_factors: scale each leaf's :math:`\\alpha` by :math:`r'_l / r_l` (PEFT's
        default), keeping :math:`s = \\alpha/r_l`.

    Returns:
      Ordered rules for :func:`effjax.peft.inject`: ``{re.escape(path): EVA(rank=r'_l, ...)``
      or ``None`` (rank 0)} for every EVA leaf, then the non-EVA rules of ``rules`` in order.

    Raises:
      ValueError: ``rho < 1``; an EVA rule matching no calibration path; a leaf with too few
        calibration tokens. TypeError: calibration entries that are not InputStats.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from effjax.peft import input_stats
      >>> k = jax.random.split(jax.random.key(0), 2)
      >>> calib = {'wide/kernel': input_stats(jax.random.normal(k[0], (64, 4)) * 10.0),
      ...          'flat/kernel': input_stats(jax.random.normal(k[1], (64, 4)) * jnp.array(
      ...              [10.0, 0.1, 0.1, 0.1]))}
      >>> new = eva_rules({r'.*/kernel': EVA(rank=2, alpha=4.0)}, calib, rho=2.0)
      >>> {p: (m.rank, m.alpha) for p, m in new.items()}  # 'flat' has one strong direction
      {'wide/kernel': (3, 6.0), 'flat/kernel': (1, 2.0)}
    """
    if isinstance(rho, bool) or not isinstance(rho, (int, float, np.number)) or not rho >= 1.0:
        raise ValueError(f"eva_rules rho must be a number >= 1, got {rho!r}")
    compiled = compile_rules(rules)
    paths = list(calibration)
    pool: dict[str, EVA] = {}
    used = set()
    for p in paths:
        for i, r in enumerate(compiled):
            if r.regex.fullmatch(p):
                if isinstance(r.method, EVA):
                    pool[p] = r.method
                    used.add(i)
                break
    for i, r in enumerate(compiled):
        if isinstance(r.method, EVA) and i not in used:
            raise ValueError(f"EVA rule '{r.pattern}' matches no path of the calibration "
                             f"mapping (paths: {', '.join(repr(p) for p in paths[:8])}"
                             f"{', ...' if len(paths) > 8 else ''})")
    ratios = []  # (-ratio, leaf order, component) for a stable descending sort
    for order, (p, m) in enumerate(pool.items()):
        stats = calibration[p]
        n_in = int(jnp.shape(stats.gram)[-1]) if hasattr(stats, "gram") else -1
        stats = _check_stats(stats, n_in, f"EVA leaf '{p}'")
        k = min(round(m.rank * rho), n_in)
        if float(stats.count) < k:
            raise ValueError(f"EVA leaf '{p}': {k} components need at least {k} calibration "
                             f"tokens, the statistics hold {float(stats.count):g}")
        _, ratio, _ = eva_components(stats, k)
        ratios += [(-float(v), order, i, p) for i, v in enumerate(np.asarray(ratio))]
    budget = sum(m.rank for m in pool.values())
    counts = dict.fromkeys(pool, 0)
    for _, _, _, p in sorted(ratios)[:budget]:
        counts[p] += 1
    out: dict[str, AdapterMethod | None] = {}
    for p, m in pool.items():
        k = counts[p]
        alpha = m.alpha * k / m.rank if adjust_scaling_factors else m.alpha
        out[re.escape(p)] = dataclasses.replace(m, rank=k, alpha=alpha) if k else None
    for r in compiled:
        if not isinstance(r.method, EVA):
            out.setdefault(r.pattern, r.method)
    return out
