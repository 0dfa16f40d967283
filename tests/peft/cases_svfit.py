"""Conformance rows for SVFit (the equation written plainly: W_e + U_r diag(s) V_r^T)."""

import jax.numpy as jnp

from effjax.peft.svfit import SVFit
from tests.peft.conformance_case import Case, f32


def svfit(eq):
    """W_e + einsum(eq, u, s, vh): U_r diag(s) V_r^T per slice."""
    return lambda n: f32(n.w) + jnp.einsum(eq, f32(n.u), f32(n.s), f32(n.vh))


_WHY = "SVFit splits W into its top-r SVD part (trainable singular values) and a frozen residual"

CASES = {
    "svfit_2d": Case(SVFit(rank=3), (12, 10), 3, svfit("ir,r,ro->io"), identity="close",
                     why=_WHY),
    "svfit_wide": Case(SVFit(rank=4), (6, 14), 4, svfit("ir,r,ro->io"), identity="close",
                       why=_WHY),
    "svfit_qkv": Case(SVFit(rank=2), (16, 4, 8), 2, svfit("ir,r,rhd->ihd"), identity="close",
                      why=_WHY),
    "svfit_out": Case(SVFit(rank=2, in_axes=(0, 1)), (4, 8, 16), 2, svfit("hdr,r,ro->hdo"),
                      identity="close", why=_WHY),
    "svfit_stacked": Case(SVFit(rank=2, batch_axes=0), (3, 12, 10), 3 * 2,
                          svfit("lir,lr,lro->lio"), identity="close", why=_WHY),
    "svfit_experts_mid": Case(SVFit(rank=2, batch_axes=1), (6, 3, 5), 3 * 2,
                              svfit("eir,er,ero->ieo"), identity="close", why=_WHY),
}
