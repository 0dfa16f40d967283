"""Conformance rows for RandLoRA (the equation written plainly on the node's fields).

:math:`\\Delta W^{torch} = s \\sum_n B_n \\Lambda_n A \\Gamma_n`; in Flax's ``(in, out)`` layout
the :math:`\\Gamma` (min) side is the input side when :math:`n_{in} \\le n_{out}`, else the output
side. Trainable counts are :math:`n_{batch} N (r + d_{min})`, :math:`N = \\lceil d_{min}/r
\\rceil`, written out by hand.
"""

import jax.numpy as jnp

from effjax.peft.randlora import RandLoRA
from tests.peft.conformance_case import Case, f32


def randlora(eq):
    """W + s einsum(eq, b, lam, a, gamma): s * sum_n B_n diag(lam_n) A diag(gamma_n)."""
    return lambda n: f32(n.w) + n.method.alpha / n.method.rank * jnp.einsum(
        eq, f32(n.b), f32(n.lam), f32(n.a), f32(n.gamma))


CASES = {
    # (12, 10): out is the min side, d_min = 10, N = ceil(10 / 3) = 4
    "randlora_2d": Case(RandLoRA(rank=3, alpha=6.0), (12, 10), 4 * (3 + 10),
                        randlora("ink,kn,ko,no->io")),
    # (10, 12): in is the min side
    "randlora_2d_in_min": Case(RandLoRA(rank=3, alpha=6.0, seed=5), (10, 12), 4 * (3 + 10),
                               randlora("onk,kn,ki,ni->io")),
    # qkv (16, 4, 8): n_in 16 <= n_out 32, N = ceil(16 / 4) = 4
    "randlora_qkv": Case(RandLoRA(rank=4, alpha=8.0), (16, 4, 8), 4 * (4 + 16),
                         randlora("hdnk,kn,ki,ni->ihd")),
    # attention out (4, 8, 16) with in_axes=(0, 1): n_in 32 > n_out 16
    "randlora_out": Case(RandLoRA(rank=4, alpha=8.0, in_axes=(0, 1)), (4, 8, 16),
                         4 * (4 + 16), randlora("hdnk,kn,ko,no->hdo")),
    "randlora_stacked": Case(RandLoRA(rank=3, alpha=6.0, batch_axes=0), (3, 12, 10),
                             3 * 4 * (3 + 10), randlora("ink,lkn,ko,lno->lio")),
    "randlora_sparse": Case(RandLoRA(rank=3, alpha=6.0, sparse=True), (12, 10),
                            4 * (3 + 10), randlora("ink,kn,ko,no->io")),
    "randlora_very_sparse": Case(RandLoRA(rank=2, alpha=4.0, very_sparse=True,
                                          very_sparse_dim=16), (12, 10), 5 * (2 + 10),
                                 randlora("ink,kn,ko,no->io")),
}
