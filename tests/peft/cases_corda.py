"""Conformance rows for CorDA (IPA / KPA): LoRA factors from the covariance-weighted SVD of W,
the frozen w replaced by the residual.

The calibration statistics come from fixed random input matrices with n_in columns; the
stacked row gets per-slice statistics (gram of shape (layers, n_in, n_in)).
"""

import jax
import jax.numpy as jnp
import numpy as np

from effjax.peft import input_stats
from effjax.peft.corda import CorDA
from tests.peft.conformance_case import Case, f32


def _x(n_in, seed):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((64, n_in)) * np.linspace(2.0, 0.2, n_in) + 0.3,
                       jnp.float32)


def _calib(n_in, layers=None, seed=11):
    """params -> {'layer/kernel': InputStats} (per slice when ``layers`` is given)."""
    if layers is None:
        stats = input_stats(_x(n_in, seed))
    else:
        stats = jax.tree.map(lambda *s: jnp.stack(s),
                             *[input_stats(_x(n_in, seed + i)) for i in range(layers)])
    return lambda params: {"layer/kernel": stats}


def lora(eq):
    """W_res + s einsum(eq, a, b), s = alpha / r."""
    return lambda n: f32(n.w) + n.method.alpha / n.method.rank * jnp.einsum(eq, f32(n.a),
                                                                          f32(n.b))


_WHY = "CorDA moves r components of W C into a, b: W_res + s a b = W up to float32 rounding"

CASES = {
    "corda_ipa_2d": Case(CorDA(rank=3, alpha=6.0, mode="ipa"), (12, 10), 3 * (12 + 10),
                         lora("ir,ro->io"), identity="close", calibration=_calib(12), why=_WHY),
    "corda_kpa_2d": Case(CorDA(rank=3, alpha=3.0, mode="kpa"), (12, 10), 3 * (12 + 10),
                         lora("ir,ro->io"), identity="close", calibration=_calib(12), why=_WHY),
    "corda_out": Case(CorDA(rank=2, alpha=4.0, in_axes=(0, 1)), (4, 8, 16), 2 * (4 * 8 + 16),
                      lora("hdr,ro->hdo"), identity="close", calibration=_calib(32), why=_WHY),
    "corda_stacked_kpa": Case(CorDA(rank=2, alpha=2.0, mode="kpa", batch_axes=0), (3, 12, 10),
                              3 * 2 * (12 + 10), lora("lir,lro->lio"), identity="close",
                              calibration=_calib(12, layers=3), why=_WHY),
}
