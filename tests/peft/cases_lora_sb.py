"""Conformance rows for LoRA-SB: W' = W + s A R B with A, B, R from the truncated SVD of the
first full-FT update -lr A(G); G is a fixed fake gradient of the kernel's shape."""

import jax.numpy as jnp
import numpy as np

from effjax.peft.lora_sb import LoRASB
from tests.peft.cases_lora_xs import loraxs
from tests.peft.conformance_case import Case


def fake_gradient(params):
    """A fixed random 'gradient' for layer/kernel (float32, seeded by the shape)."""
    shape = params["layer"]["kernel"].shape
    rng = np.random.default_rng(int(np.prod(shape)))
    return {"layer/kernel": jnp.asarray(rng.standard_normal(shape), jnp.float32)}


_STEP = ("LoRA-SB (paper and official code) keeps W and starts the adapter at the best rank-r "
         "approximation of the first full-FT step, so W' = W + trunc_r(-lr sign(G)) at init")
_RES = "residual=True stores W - s A R B, so W' = W up to float32 rounding"

CASES = {
    "lorasb_2d": Case(LoRASB(rank=3, lr=0.01), (12, 10), 3 * 3, loraxs("ir,rq,qo->io"),
                      identity="none", calibration=fake_gradient, why=_STEP),
    "lorasb_2d_residual_sgd": Case(
        LoRASB(rank=3, lr=0.5, first_step="sgd", alpha=6.0, residual=True), (12, 10), 3 * 3,
        loraxs("ir,rq,qo->io"), identity="close", calibration=fake_gradient, why=_RES),
    "lorasb_qkv": Case(LoRASB(rank=2, lr=0.01, residual=True), (16, 4, 8), 2 * 2,
                       loraxs("ir,rq,qhd->ihd"), identity="close", calibration=fake_gradient,
                       why=_RES),
    "lorasb_out": Case(LoRASB(rank=2, lr=0.01, in_axes=(0, 1)), (4, 8, 16), 2 * 2,
                       loraxs("hdr,rq,qo->hdo"), identity="none", calibration=fake_gradient,
                       why=_STEP),
    "lorasb_stacked": Case(LoRASB(rank=2, lr=0.1, residual=True, batch_axes=0), (3, 12, 10),
                           3 * 2 * 2, loraxs("lir,lrq,lqo->lio"), identity="close",
                           calibration=fake_gradient, why=_RES),
    "lorasb_experts_mid": Case(LoRASB(rank=2, lr=0.01, batch_axes=1), (6, 3, 5), 3 * 2 * 2,
                               loraxs("eir,erq,eqo->ieo"), identity="none",
                               calibration=fake_gradient, why=_STEP),
}
