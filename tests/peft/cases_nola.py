"""Conformance rows for NOLA (the equation written plainly on the node's fields).

Per slice s: A_s = A0 + sum_i alpha_{s,i} A_i, B_s = sum_j beta_{s,j} B_j (the frozen bases of
``nola_bases`` for the flattened (n_in, n_out) matrix), W'_s = W_s + (alpha / r) A_s B_s.
Counts by hand: k + l, times the number of slices.
"""

import jax.numpy as jnp

from effjax.peft import NOLA
from effjax.peft.nola import nola_bases
from tests.peft.conformance_case import Case, f32


def nola(n_in, n_out, to_kernel):
    """W + s A_s B_s, the per-slice products ``(S, n_in, n_out)`` put in the kernel's layout by
    ``to_kernel``."""
    def ref(n):
        m = n.method
        a0, a_bases, b_bases = nola_bases(m.seed, m.rank, m.num_basis_a, m.num_basis_b,
                                          n_in, n_out)
        ca = f32(n.coef_a).reshape(-1, m.num_basis_a)
        cb = f32(n.coef_b).reshape(-1, m.num_basis_b)
        a = f32(a0) + jnp.einsum("sk,kir->sir", ca, f32(a_bases))
        b = jnp.einsum("sl,lro->sro", cb, f32(b_bases))
        return f32(n.w) + m.alpha / m.rank * to_kernel(a @ b)
    return ref


CASES = {
    "nola_2d": Case(NOLA(rank=3, num_basis_a=5, num_basis_b=7, alpha=6.0), (12, 10), 5 + 7,
                    nola(12, 10, lambda p: p[0])),
    "nola_qkv": Case(NOLA(rank=2, num_basis_a=4, num_basis_b=3, seed=5), (16, 4, 8), 4 + 3,
                     nola(16, 32, lambda p: p[0].reshape(16, 4, 8))),
    "nola_stacked": Case(NOLA(rank=2, num_basis_a=4, num_basis_b=6, batch_axes=0), (3, 12, 10),
                         3 * (4 + 6), nola(12, 10, lambda p: p)),
    "nola_experts_mid": Case(NOLA(rank=2, num_basis_a=3, num_basis_b=2, batch_axes=1),
                             (6, 3, 5), 3 * (3 + 2),
                             nola(6, 5, lambda p: p.transpose(1, 0, 2))),
}
