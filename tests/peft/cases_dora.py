"""Conformance rows for DoRA (the equation written plainly on the node's fields).

W' = m * V / sg(||V||_c), V = W + s einsum(a, b), s = alpha / r (rsLoRA: alpha / sqrt r), the
column norm over the kernel's input axes, detached as in PEFT (``detach_norm=True``). Counts by
hand: r (n_in + n_out) + n_out, times the number of slices.
"""

import jax
import jax.numpy as jnp
import numpy as np

from effjax.peft import DoRA
from tests.peft.conformance_case import Case, f32


def dora(eq, in_axes):
    """m * V / sg(||V||_c) with V = W + s einsum(eq, a, b), the norm over ``in_axes``."""
    def ref(n):
        m = n.method
        s = m.alpha / (np.sqrt(m.rank) if m.rslora else m.rank)
        v = f32(n.w) + s * jnp.einsum(eq, f32(n.a), f32(n.b))
        norm = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(v**2, axis=in_axes, keepdims=True)))
        return jnp.expand_dims(f32(n.m), in_axes) * v / norm
    return ref


CASES = {
    "dora_2d": Case(DoRA(rank=3, alpha=6.0), (12, 10), 3 * (12 + 10) + 10,
                    dora("ir,ro->io", (0,))),
    "dora_gauss_rs": Case(DoRA(rank=4, alpha=2.0, init="gaussian", rslora=True), (10, 12),
                          4 * (10 + 12) + 12, dora("ir,ro->io", (0,))),
    "dora_qkv": Case(DoRA(rank=2, alpha=4.0), (16, 4, 8), 2 * (16 + 32) + 32,
                     dora("ir,rhd->ihd", (0,)), sharded=False,
                     why="DoRA computes on the (n_in, heads * head_dim) matrix view, and a "
                         "kernel sharded P('x', None, 'y') on head_dim does not keep 'y' "
                         "through that reshape: XLA returns W' sharded P('x') (a known gap; "
                         "test_dora.py checks the values and pins this sharding)"),
    "dora_out": Case(DoRA(rank=2, alpha=4.0, in_axes=(0, 1)), (4, 8, 16), 2 * (32 + 16) + 16,
                     dora("hdr,ro->hdo", (0, 1))),
    "dora_stacked": Case(DoRA(rank=2, alpha=3.0, batch_axes=0), (3, 12, 10),
                         3 * (2 * (12 + 10) + 10), dora("lir,lro->lio", (1,))),
    "dora_stacked_out": Case(DoRA(rank=2, alpha=2.0, batch_axes=0, in_axes=(1, 2)),
                             (2, 4, 8, 16), 2 * (2 * (32 + 16) + 16),
                             dora("lhdr,lro->lhdo", (1, 2))),
    "dora_pissa": Case(DoRA(rank=3, alpha=6.0, init="pissa"), (12, 10), 3 * (12 + 10) + 10,
                       dora("ir,ro->io", (0,)), identity="close",
                       why="PiSSA moves the top-r SVD part of W into a, b; m is the column norm "
                           "of the reconstructed W_res + s a b = W (up to float32 rounding)"),
}
