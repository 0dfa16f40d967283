"""Conformance rows for WeLore (the equation written plainly: W' = A B per slice, slice s using
only its first r_s columns)."""

import jax.numpy as jnp
import numpy as np

from effjax.peft.welore import WeLore
from tests.peft.conformance_case import Case, f32


def welore(eq):
    """einsum(eq, a, b): the low-rank product A B."""
    return lambda n: jnp.einsum(eq, f32(n.a), f32(n.b))


def welore_masked(eq, ranks):
    """einsum(eq, a * mask, b) with mask[s, j] = j < ranks[s] (per-slice ranks)."""
    def ref(n):
        r = n.a.shape[-1]
        mask = jnp.asarray(np.arange(r)[None, :] < np.asarray(ranks)[:, None], jnp.float32)
        return jnp.einsum(eq, f32(n.a), mask, f32(n.b))
    return ref


_LOW = ("WeLore replaces W by its best rank-r approximation A B (the compression itself): "
        "materialize equals W only at full rank")
_FULL = "full-rank WeLore refactors W = (U S^1/2)(S^1/2 V^T) exactly up to float32 rounding"

CASES = {
    "welore_2d_full": Case(WeLore(), (12, 10), 10 * (12 + 10), welore("ir,ro->io"),
                           identity="close", why=_FULL),
    "welore_2d": Case(WeLore(rank=3), (12, 10), 3 * (12 + 10), welore("ir,ro->io"),
                      identity="none", why=_LOW),
    "welore_qkv": Case(WeLore(rank=2), (16, 4, 8), 2 * (16 + 32), welore("ir,rhd->ihd"),
                       identity="none", why=_LOW),
    "welore_out": Case(WeLore(rank=3, in_axes=(0, 1)), (4, 8, 16), 3 * (32 + 16),
                       welore("hdr,ro->hdo"), identity="none", why=_LOW),
    "welore_stacked": Case(WeLore(rank=2, batch_axes=0), (3, 12, 10), 3 * 2 * (12 + 10),
                           welore("lir,lro->lio"), identity="none", why=_LOW),
    "welore_stacked_ranks": Case(WeLore(rank=(4, 1, 2), batch_axes=0), (3, 12, 10),
                                 3 * 4 * (12 + 10),
                                 welore_masked("lir,lr,lro->lio", (4, 1, 2)), identity="none",
                                 why=_LOW + "; per-slice ranks pad the factors to r_max = 4"),
    "welore_stacked_full": Case(WeLore(batch_axes=1), (6, 3, 5), 3 * 5 * (6 + 5),
                                welore("eir,ero->ieo"), identity="close", why=_FULL),
}
