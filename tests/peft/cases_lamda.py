"""Conformance rows for LaMDA: W' = W + s A S B (PMA A frozen, LDA S and PMB B trainable), the
equation written as an einsum over the node's fields."""

import jax.numpy as jnp

from effjax.peft.lamda import LaMDA
from tests.peft.conformance_case import Case, f32


def lamda(eq):
    """W + s einsum(eq, A, S, B), s = alpha / r (1 when alpha is None)."""
    def ref(n):
        m = n.method
        s = 1.0 if m.alpha is None else m.alpha / m.rank
        return f32(n.w) + s * jnp.einsum(eq, f32(n.a), f32(n.s), f32(n.b))
    return ref


_SVD = "init='svd' moves U_r S_r V_r^T into A S B and keeps the residual: W' = W up to rounding"

CASES = {
    "lamda_2d": Case(LaMDA(rank=3, alpha=6.0), (12, 10), 3 * 3 + 3 * 10,
                     lamda("ir,rq,qo->io"), identity="close", why=_SVD),
    "lamda_2d_zeros": Case(LaMDA(rank=3, init="zeros"), (12, 10), 3 * 3 + 3 * 10,
                           lamda("ir,rq,qo->io")),
    "lamda_qkv": Case(LaMDA(rank=2), (16, 4, 8), 2 * 2 + 2 * 32, lamda("ir,rq,qhd->ihd"),
                      identity="close", why=_SVD),
    "lamda_out": Case(LaMDA(rank=2, init="zeros", in_axes=(0, 1)), (4, 8, 16),
                      2 * 2 + 2 * 16, lamda("hdr,rq,qo->hdo")),
    "lamda_stacked": Case(LaMDA(rank=2, batch_axes=0), (3, 12, 10), 3 * (2 * 2 + 2 * 10),
                          lamda("lir,lrq,lqo->lio"), identity="close", why=_SVD),
    "lamda_experts_mid": Case(LaMDA(rank=2, init="zeros", batch_axes=1), (6, 3, 5),
                              3 * (2 * 2 + 2 * 5), lamda("eir,erq,eqo->ieo")),
}
