"""Conformance rows for EVA (LoRA with A from the principal components of the inputs, B = 0).

The calibration statistics come from a fixed random input matrix with n_in columns. EVA does
not support stacked kernels (its ranks are chosen per leaf), so there is no stacked row; the
multi-axis rows are an attention output projection (two input axes) and a qkv kernel (two
output axes).
"""

import jax.numpy as jnp
import numpy as np

from effjax.peft import input_stats
from effjax.peft.eva import EVA
from tests.peft.conformance_case import Case, f32


def _calib(n_in, seed=7):
    """params -> {'layer/kernel': InputStats of 64 random tokens with unequal variances}."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((64, n_in)) * np.linspace(2.0, 0.2, n_in) + 0.5
    stats = input_stats(jnp.asarray(x, jnp.float32))
    return lambda params: {"layer/kernel": stats}


def lora(eq):
    """W + s einsum(eq, a, b), s = alpha / r."""
    return lambda n: f32(n.w) + n.method.alpha / n.method.rank * jnp.einsum(eq, f32(n.a),
                                                                          f32(n.b))


CASES = {
    "eva_2d": Case(EVA(rank=3, alpha=6.0), (12, 10), 3 * (12 + 10), lora("ir,ro->io"),
                   calibration=_calib(12)),
    "eva_out": Case(EVA(rank=2, alpha=4.0, in_axes=(0, 1)), (4, 8, 16), 2 * (4 * 8 + 16),
                    lora("hdr,ro->hdo"), calibration=_calib(32)),
    "eva_qkv_whiten": Case(EVA(rank=2, alpha=2.0, whiten=True), (16, 4, 8), 2 * (16 + 4 * 8),
                           lora("ir,rhd->ihd"), calibration=_calib(16)),
}
