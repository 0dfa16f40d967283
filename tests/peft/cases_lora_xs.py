"""Conformance rows for LoRA-XS: W' = W + s A R B (A, B frozen from the SVD of W, R trainable),
the equation written as an einsum over the node's fields."""

import jax.numpy as jnp

from effjax.peft.lora_xs import LoRAXS
from tests.peft.conformance_case import Case, f32


def loraxs(eq):
    """W + s einsum(eq, A, R, B), s = alpha / r (1 when alpha is None)."""
    def ref(n):
        m = n.method
        s = 1.0 if m.alpha is None else m.alpha / m.rank
        return f32(n.w) + s * jnp.einsum(eq, f32(n.a), f32(n.r), f32(n.b))
    return ref


_GAUSS = ("the official init draws R ~ N(0, 1e-5^2), so W' = W + s A R B differs from W by "
          "O(1e-5 * sigma_max) at init by design")

CASES = {
    "loraxs_2d": Case(LoRAXS(rank=3), (12, 10), 3 * 3, loraxs("ir,rq,qo->io"),
                      identity="none", why=_GAUSS),
    "loraxs_2d_zeros": Case(LoRAXS(rank=3, alpha=6.0, init="zeros"), (12, 10), 3 * 3,
                            loraxs("ir,rq,qo->io")),
    "loraxs_qkv": Case(LoRAXS(rank=2, init="zeros"), (16, 4, 8), 2 * 2,
                       loraxs("ir,rq,qhd->ihd")),
    "loraxs_out": Case(LoRAXS(rank=2, alpha=4.0, in_axes=(0, 1)), (4, 8, 16), 2 * 2,
                       loraxs("hdr,rq,qo->hdo"), identity="none", why=_GAUSS),
    "loraxs_stacked": Case(LoRAXS(rank=2, init="zeros", batch_axes=0), (3, 12, 10),
                           3 * 2 * 2, loraxs("lir,lrq,lqo->lio")),
    "loraxs_experts_mid": Case(LoRAXS(rank=2, batch_axes=1), (6, 3, 5), 3 * 2 * 2,
                               loraxs("eir,erq,eqo->ieo"), identity="none", why=_GAUSS),
}
