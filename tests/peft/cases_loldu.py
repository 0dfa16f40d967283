"""Conformance rows for LoLDU (the equation written plainly: W_res + sigma U_r^T diag(z) (P L_r)^T
in Flax layout)."""

import jax.numpy as jnp

from effjax.peft.loldu import LoLDU
from tests.peft.conformance_case import Case, f32


def loldu(eq):
    """W_res + einsum(eq, u, z, l, sigma): sigma U_r^T diag(z) (P L_r)^T per slice."""
    return lambda n: f32(n.w) + jnp.einsum(eq, f32(n.u), f32(n.z), f32(n.l), f32(n.sigma))


_WHY = "LoLDU moves sigma0 P L_r D_r U_r of the LDU decomposition into the adapter; W_res + it = W"

CASES = {
    "loldu_2d": Case(LoLDU(rank=3), (12, 10), 3, loldu("ir,r,ro,->io"), identity="close",
                     why=_WHY),
    "loldu_wide_scale": Case(LoLDU(rank=4, alpha=4.0, train_scale=True), (6, 14), 4 + 1,
                             loldu("ir,r,ro,->io"), identity="close", why=_WHY),
    "loldu_qkv": Case(LoLDU(rank=2, alpha=2.0), (16, 4, 8), 2, loldu("ir,r,rhd,->ihd"),
                      identity="close", why=_WHY),
    "loldu_out": Case(LoLDU(rank=2, in_axes=(0, 1), train_scale=True), (4, 8, 16), 2 + 1,
                      loldu("hdr,r,ro,->hdo"), identity="close", why=_WHY),
    "loldu_stacked": Case(LoLDU(rank=2, batch_axes=0), (3, 12, 10), 3 * 2,
                          loldu("lir,lr,lro,l->lio"), identity="close", why=_WHY),
    "loldu_experts_mid": Case(LoLDU(rank=2, batch_axes=1, train_scale=True), (6, 3, 5),
                              3 * (2 + 1), loldu("eir,er,ero,e->ieo"), identity="close",
                              why=_WHY),
}
