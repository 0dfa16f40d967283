"""CorDA: context-oriented decomposition adaptation (Yang et al., 2024).

CorDA splits a kernel along the singular directions of :math:`W` *weighted by the covariance of
its inputs*. In Hugging Face PEFT's (torch) orientation, for a weight
:math:`W_t = W^\\top \\in \\mathbb{R}^{n_{out} \\times n_{in}}` and the input covariance
:math:`C = \\frac1n \\sum_t x_t x_t^\\top` (uncentered; :meth:`~effjax.peft.InputStats.
second_moment` of the statistics :func:`effjax.peft.calibrate` collects):

.. math::

  \\tilde C = C + \\delta\\, \\overline{\\mathrm{diag}\\,C}\\, I, \\qquad
  W_t \\tilde C = U \\Sigma \\hat V^\\top \\;\\text{(SVD)}, \\qquad
  V = \\tilde C^{-1} \\hat V, \\qquad W_t = U \\Sigma V^\\top ,

with the damping :math:`\\delta` starting at 0.01 and doubled until
:math:`\\lVert \\tilde C \\tilde C^{-1} - I \\rVert_F < 0.05` (PEFT's ``collect_eigens_for_layer``).
Of the :math:`\\min(n_{in}, n_{out})` components, :math:`r` become a trainable LoRA adapter and
the rest stay in the frozen residual:

* **IPA** (instruction-previewed adaptation, ``mode="ipa"``, PEFT's ``corda_method="ipm"``):
  the :math:`r` *largest* components, those that matter most for the calibration task;
* **KPA** (knowledge-preserved adaptation, ``mode="kpa"``, PEFT's ``"kpm"``): the :math:`r`
  *smallest*, leaving the components the calibration data (e.g. world-knowledge QA) relies on
  frozen.

With the chosen :math:`U_r, \\Sigma_r, V_r` and the scale :math:`s = \\alpha/r`
(:math:`\\alpha/\\sqrt r` with ``rslora``), in Flax's ``(in, out)`` layout (PEFT's
``lora_A = \\sqrt{\\Sigma_r/s}\\,V_r^\\top``, ``lora_B = U_r \\sqrt{\\Sigma_r/s}``):

.. math::

  A = V_r \\sqrt{\\Sigma_r / s} \\in \\mathbb{R}^{n_{in} \\times r}, \\quad
  B = \\sqrt{\\Sigma_r / s}\\, U_r^\\top \\in \\mathbb{R}^{r \\times n_{out}}, \\quad
  W_{res} = W - s\\,A B, \\qquad W' = W_{res} + s\\,A B ,

so :math:`W' = W` up to float32 rounding right after injection. The node is a
:class:`~effjax.peft.LoRAWeight` (``materialize``, ``merge``, the fast LoRA layers apply);
trainable parameters :math:`r\\,(n_{in} + n_{out})` per slice. Computed in float32 per slice;
``w`` is cast back to the kernel's dtype.

Differences from PEFT: PEFT's hook divides each *call's* inputs by their maximum
(``x / max(x).abs()``) and averages :math:`X^\\top X` over calls; effjax uses the plain mean
:math:`G/n` over all tokens. For a single calibration call the two differ by a scalar
:math:`\\kappa = \\max(x)^2 / n`, which changes neither :math:`\\delta`, the subspaces,
:math:`s\\,AB` nor :math:`W_{res}`, only the balance of the factors: ours are PEFT's
:math:`A/\\sqrt\\kappa,\\; B\\sqrt\\kappa`. Over several calls PEFT weights each call by its own
maximum; effjax weights every token equally. PEFT's covariance/cache files have no counterpart
(the :class:`~effjax.peft.InputStats` are the cache). Stacked kernels
(``batch_axes``) take per-slice statistics (``gram`` of shape ``(*batch, n_in, n_in)``) or one
set shared by all slices.

References:
  Yang, Li, Zhu, Tang, Yang, Pan, "CorDA: Context-Oriented Decomposition Adaptation of Large
  Language Models for Task-Aware Parameter-Efficient Fine-tuning", NeurIPS 2024,
  arXiv:2406.05223. Official code: github.com/iboing/CorDA (``cordalib/decomposition.py``).
  Hugging Face PEFT, ``src/peft/tuners/lora/corda.py`` and ``LoraLayer.corda_init``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from effjax.peft._calibrate import InputStats
from effjax.peft._checks import check_number
from effjax.peft.base import register_adapter
from effjax.peft.layout import KernelLayout, place_like
from effjax.peft.lora import LoRAWeight, ScaledRank

__all__ = ["CorDA", "corda_decompose"]

_HI = jax.lax.Precision.HIGHEST
_MODES = {"ipa": "ipa", "kpa": "kpa", "ipm": "ipa", "kpm": "kpa"}


def _damped_inverse(c: jax.Array, max_doublings: int = 60):
    """PEFT's damping: ``(C~, C~^-1, delta)`` with ``C~ = C + delta mean(diag C) I``, ``delta``
    from 0.01 doubled until ``||C~ C~^-1 - I||_F < 0.05`` (per leading slice)."""
    n = c.shape[-1]
    eye = jnp.eye(n, dtype=c.dtype)
    mean_diag = jnp.mean(jnp.diagonal(c, axis1=-2, axis2=-1), axis=-1)

    def fixed(damp):
        return c + (damp * mean_diag)[..., None, None] * eye

    def ok(damp):
        f = fixed(damp)
        err = jnp.linalg.norm(jnp.matmul(f, jnp.linalg.inv(f), precision=_HI) - eye,
                              axis=(-2, -1))
        return err < 0.05

    def cond(carry):
        i, _, done = carry
        return jnp.logical_and(i < max_doublings, ~jnp.all(done))

    def body(carry):
        i, damp, done = carry
        done = done | ok(damp)
        return i + 1, jnp.where(done, damp, 2.0 * damp), done

    damp0 = jnp.full(mean_diag.shape, 0.01, c.dtype)
    _, damp, _ = jax.lax.while_loop(cond, body, (0, damp0, jnp.zeros(mean_diag.shape, bool)))
    f = fixed(damp)
    return f, jnp.linalg.inv(f), damp


def corda_decompose(m: jax.Array, cov: jax.Array):
    """``(U, S, V, delta)``: CorDA's covariance-weighted SVD
    :math:`W_t = U\\,\\mathrm{diag}(S)\\,V^\\top` of a kernel
    matrix ``m = W_t^T`` in Flax's ``(*batch, n_in, n_out)`` layout.

    ``cov``: ``(*batch, n_in, n_in)``. ``U`` ``(*batch, n_out, k)``, ``S`` ``(*batch, k)``
    descending, ``V`` ``(*batch, n_in, k)`` with :math:`V = \\tilde C^{-1} \\hat V` (a
    Cholesky solve),
    ``k = min(n_out, n_in)``; ``delta`` the damping. Computed as the SVD of
    :math:`\\tilde C\\, m = (W_t \\tilde C)^\\top` (no transposed matmul operands, so eager and
    ``jax.jit`` runs round alike).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> w = jax.random.normal(jax.random.key(0), (5, 3))  # (in, out)
      >>> x = jax.random.normal(jax.random.key(1), (40, 5))
      >>> u, s, v, delta = corda_decompose(w, x.T @ x / 40)
      >>> bool(jnp.allclose(v * s @ u.T, w, atol=1e-4)), round(float(delta), 4)
      (True, 0.01)
    """
    fix, _, damp = _damped_inverse(cov)
    vhat, s, ut = jnp.linalg.svd(jnp.matmul(fix, m, precision=_HI), full_matrices=False)
    # V = C~^-1 V^ by a Cholesky solve (C~ is symmetric positive definite): with few calibration
    # tokens C~ is ill-conditioned and the explicit inverse's product loses up to ~7% on the top
    # component in float32 (measured vs float64; the solve: 0.06%, PEFT's order: similar).
    v = jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(fix), True), vhat)
    return jnp.swapaxes(ut, -1, -2), s, v, damp


@register_adapter("corda")
@dataclasses.dataclass(frozen=True, kw_only=True)
class CorDA(ScaledRank):
    """CorDA method config (a rule value of :func:`effjax.peft.inject`; needs calibration data).

    :math:`W' = W_{res} + s\\,AB` with :math:`A, B` from the :math:`r` largest (IPA) or smallest
    (KPA) components of the covariance-weighted SVD :math:`W^\\top \\tilde C`; trainable
    parameters :math:`n_{batch}\\, r\\,(n_{in} + n_{out})`. See the module docstring.

    Attributes:
      rank: :math:`r`, at most :math:`\\min(n_{in}, n_{out})`.
      alpha: :math:`\\alpha > 0` (the singular values are divided by :math:`s`).
      mode: ``"ipa"`` (largest components; PEFT's default ``"ipm"``) or ``"kpa"`` (smallest;
        ``"kpm"``). PEFT's names are accepted and stored as ``"ipa"`` / ``"kpa"``.
      rslora: :math:`s = \\alpha/\\sqrt r`.
      dtype: dtype of ``a`` and ``b`` (None: the kernel's dtype, float32 for 16-bit kernels).
      in_axes, out_axes, batch_axes: the kernel's axes (:mod:`effjax.peft.layout`); the
        statistics must be over the same ``n_in`` features (per slice for ``batch_axes``, or
        shared).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from effjax.peft import input_stats
      >>> x = jax.random.normal(jax.random.key(0), (64, 6))
      >>> w = jax.random.normal(jax.random.key(1), (6, 4))
      >>> node = CorDA(rank=2, alpha=4.0, mode="kpa").adapt(None, w, data=input_stats(x))
      >>> node.a.shape, node.b.shape, node.scale
      ((6, 2), (2, 4), 2.0)
      >>> bool(jnp.allclose(node.materialize(), w, atol=1e-5))  # W_res + s A B = W
      True
    """

    calibration: ClassVar[str] = "inputs"

    mode: str = "ipa"

    def __post_init__(self):
        super().__post_init__()
        # alpha > 0: the singular values are divided by the scale alpha / r
        check_number(self.alpha, "alpha", self.name, positive=True)
        if self.mode not in _MODES:
            raise ValueError(f"CorDA mode must be 'ipa' or 'kpa' (PEFT's 'ipm' / 'kpm'), got "
                             f"{self.mode!r}")
        self._set(mode=_MODES[self.mode])

    def _covariance(self, data: Any, lay: KernelLayout) -> jax.Array:
        if not all(hasattr(data, f) for f in ("gram", "sum", "count")):
            raise TypeError(f"CorDA needs InputStats (from effjax.peft.calibrate) as calibration "
                            f"data, got {type(data).__name__}")
        n = lay.n_in
        g = jnp.asarray(data.gram)
        count = jnp.asarray(data.count)
        ok = (g.shape in ((n, n), lay.batch_shape + (n, n))
              and count.shape == g.shape[:-2])
        if not ok:
            want = f"({n}, {n})" + (f" or {lay.batch_shape + (n, n)}" if lay.batch_shape else "")
            raise ValueError(f"CorDA on a kernel of shape {lay.shape}: n_in={n} (batch "
                             f"{lay.batch_shape}) but the input statistics have gram {g.shape}, "
                             f"count {count.shape}; expected gram {want} (check in_axes / "
                             f"batch_axes against the layer)")
        if not (jnp.issubdtype(g.dtype, jnp.floating) and jnp.issubdtype(count.dtype,
                                                                           jnp.floating)):
            raise TypeError(f"CorDA: InputStats gram/count must be floating, got {g.dtype}, "
                            f"{count.dtype}")
        stats = InputStats(g.astype(jnp.float32), jnp.zeros(g.shape[:-1], jnp.float32),
                           count.astype(jnp.float32))
        cov = stats.second_moment()
        if not isinstance(cov, jax.core.Tracer):
            if float(jnp.min(count)) <= 0:
                raise ValueError("CorDA: the input statistics hold no tokens (count 0)")
            if not bool(jnp.all(jnp.isfinite(cov))):
                raise ValueError("CorDA: the input covariance has NaN/inf entries")
            if float(jnp.min(jnp.trace(cov, axis1=-2, axis2=-1))) <= 0:
                raise ValueError("CorDA: the input covariance is zero (all inputs were zero)")
        return jnp.broadcast_to(cov, lay.batch_shape + (n, n))

    def adapt(self, key: jax.Array, w: jax.Array, data: Any = None) -> LoRAWeight:
        """``a``, ``b`` from the chosen components and ``w`` replaced by the residual
        (``data``: this leaf's :class:`~effjax.peft.InputStats`)."""
        del key
        lay = self.layout(w.shape)
        r, s = self.rank, self.scale
        if r > min(lay.n_in, lay.n_out):
            raise ValueError(f"CorDA rank={r} exceeds min(n_in, n_out) = "
                             f"{min(lay.n_in, lay.n_out)} for a kernel of shape {w.shape}")
        if data is None:
            raise ValueError("CorDA needs the layer's input statistics: inject(..., "
                             "calibration=calibrate(...))")
        cov = self._covariance(data, lay)
        ct = jnp.promote_types(w.dtype, jnp.float32)
        m = lay.to_matrix(w).astype(ct)  # (*batch, n_in, n_out)
        u, sv, v, _ = corda_decompose(m, cov.astype(ct))
        sel = slice(0, r) if self.mode == "ipa" else slice(sv.shape[-1] - r, sv.shape[-1])
        u, sv, v = u[..., :, sel], sv[..., sel], v[..., :, sel]
        root = jnp.sqrt(sv / s)
        dtype = self.adapter_dtype(w.dtype)
        a = (v * root[..., None, :]).astype(dtype)  # (*b, n_in, r)
        b = (root[..., :, None] * jnp.swapaxes(u, -1, -2)).astype(dtype)  # (*b, r, n_out)
        w_res = m - s * jnp.matmul(a.astype(ct), b.astype(ct), precision=_HI)
        a = a.reshape(lay.batch_shape + lay.in_shape + (r,))
        b = b.reshape(lay.batch_shape + (r,) + lay.out_shape)
        a = place_like(a, w, lay.batch_axes + lay.in_axes + (None,))
        b = place_like(b, w, lay.batch_axes + (None,) + lay.out_axes)
        w_res = place_like(lay.from_matrix(w_res).astype(w.dtype), w, tuple(range(w.ndim)))
        return LoRAWeight(w=w_res, a=a, b=b, method=self, layout=lay)
