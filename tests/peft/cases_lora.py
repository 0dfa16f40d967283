"""Conformance rows for LoRA (PiSSA / OLoRA inits) and Unfreeze (equations written plainly)."""

import jax.numpy as jnp
import numpy as np

from effjax.peft import LoRA, Unfreeze
from tests.peft.conformance_case import Case, f32


def _s(m):
    return m.alpha / (np.sqrt(m.rank) if m.rslora else m.rank)


def lora(eq):
    """W + s einsum(eq, a, b), s = alpha / r (rsLoRA: alpha / sqrt r)."""
    return lambda n: f32(n.w) + _s(n.method) * jnp.einsum(eq, f32(n.a), f32(n.b))


CASES = {
    "lora_2d": Case(LoRA(rank=3, alpha=6.0), (12, 10), 3 * (12 + 10), lora("ir,ro->io")),
    "lora_gauss_rs": Case(LoRA(rank=4, alpha=2.0, init="gaussian", rslora=True), (10, 12),
                          4 * (10 + 12), lora("ir,ro->io")),
    "lora_qkv": Case(LoRA(rank=2, alpha=4.0), (16, 4, 8), 2 * (16 + 4 * 8),
                     lora("ir,rhd->ihd")),
    "lora_out": Case(LoRA(rank=2, alpha=4.0, in_axes=(0, 1)), (4, 8, 16), 2 * (4 * 8 + 16),
                     lora("hdr,ro->hdo")),
    "lora_out_by_out_axes": Case(LoRA(rank=2, alpha=4.0, out_axes=-1), (4, 8, 16),
                                 2 * (4 * 8 + 16), lora("hdr,ro->hdo")),
    "lora_stacked": Case(LoRA(rank=2, alpha=3.0, batch_axes=(0,)), (3, 12, 10),
                         3 * 2 * (12 + 10), lora("lir,lro->lio")),
    "lora_stacked_out": Case(LoRA(rank=2, alpha=2.0, batch_axes=0, in_axes=(1, 2)),
                             (2, 4, 8, 16), 2 * 2 * (4 * 8 + 16), lora("lhdr,lro->lhdo")),
    "lora_experts_mid": Case(LoRA(rank=2, alpha=2.0, batch_axes=(1,)), (6, 3, 5),
                             3 * 2 * (6 + 5), lora("eir,ero->ieo")),
    "lora_experts_last": Case(LoRA(rank=2, alpha=2.0, batch_axes=-1), (6, 5, 3),
                              3 * 2 * (6 + 5), lora("eir,ero->ioe")),
    "pissa": Case(LoRA(rank=3, alpha=3.0, init="pissa"), (12, 10), 3 * (12 + 10),
                  lora("ir,ro->io"), identity="close",
                  why="PiSSA moves the top-r SVD part of W into a, b: W_res + a b = W up to "
                      "float32 rounding"),
    "olora": Case(LoRA(rank=3, alpha=3.0, init="olora"), (12, 10), 3 * (12 + 10),
                  lora("ir,ro->io"), identity="close",
                  why="OLoRA moves Q R of W's first r columns into a, b"),
    "unfreeze": Case(Unfreeze(), (6, 5), 30, lambda n: f32(n.w)),
}
