"""Conformance rows for VeRA (the equation written plainly on the node's fields).

W' = W + (A diag(d) B) diag(b) per slice: ``einsum(eq, a, lambda_d, b, lambda_b)`` with the
frozen ``a``, ``b`` shared by all slices. Counts by hand: r + n_out, times the number of slices.
"""

import jax.numpy as jnp

from effjax.peft import VeRA
from tests.peft.conformance_case import Case, f32


def vera(eq):
    """W + einsum(eq, A, d, B, b): (A diag(d) B) diag(b) per slice."""
    return lambda n: f32(n.w) + jnp.einsum(eq, f32(n.a), f32(n.lambda_d), f32(n.b),
                                           f32(n.lambda_b))


CASES = {
    "vera_2d": Case(VeRA(rank=3), (12, 10), 3 + 10, vera("ir,r,ro,o->io")),
    "vera_2d_max_in": Case(VeRA(rank=4, seed=7, d_initial=0.5, max_in=20), (12, 10), 4 + 10,
                           vera("ir,r,ro,o->io")),
    "vera_qkv": Case(VeRA(rank=2), (16, 4, 8), 2 + 4 * 8, vera("ir,r,rhd,hd->ihd")),
    "vera_out": Case(VeRA(rank=2, in_axes=(0, 1)), (4, 8, 16), 2 + 16,
                     vera("hdr,r,ro,o->hdo")),
    "vera_stacked": Case(VeRA(rank=2, batch_axes=0), (3, 12, 10), 3 * (2 + 10),
                         vera("ir,lr,ro,lo->lio")),
    "vera_experts_mid": Case(VeRA(rank=2, batch_axes=1), (6, 3, 5), 3 * (2 + 5),
                             vera("ir,er,ro,eo->ieo")),
}
