"""Conformance rows for LoRA, DoRA, VeRA, NOLA and Unfreeze (equations written plainly)."""

import jax
import jax.numpy as jnp
import numpy as np

from effjax.peft import NOLA, DoRA, LoRA, Unfreeze, VeRA
from effjax.peft.nola import nola_bases
from tests.peft.conformance_case import Case, f32


def _s(m):
    return m.alpha / (np.sqrt(m.rank) if m.rslora else m.rank)


def lora(eq):
    """W + s einsum(eq, a, b), s = alpha / r (rsLoRA: alpha / sqrt r)."""
    return lambda n: f32(n.w) + _s(n.method) * jnp.einsum(eq, f32(n.a), f32(n.b))


def dora(eq, in_axes):
    """m * V / sg(||V||_c), V = W + s einsum(eq, a, b), the norm over the input axes (PEFT
    detaches the norm)."""
    def ref(n):
        v = f32(n.w) + _s(n.method.lora) * jnp.einsum(eq, f32(n.a), f32(n.b))
        norm = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(v**2, axis=in_axes, keepdims=True)))
        return jnp.expand_dims(f32(n.m), in_axes) * v / norm
    return ref


def vera(eq):
    """W + einsum(eq, A, d, B, b): (A diag(d) B) diag(b) per slice."""
    return lambda n: f32(n.w) + jnp.einsum(eq, f32(n.a), f32(n.lambda_d), f32(n.b),
                                           f32(n.lambda_b))


def nola(n):
    """W + s (A0 + sum_i alpha_i A_i)(sum_j beta_j B_j) per slice (2-D kernel)."""
    m = n.method
    a0, a_bases, b_bases = nola_bases(m.seed, m.rank, m.num_basis_a, m.num_basis_b,
                                      *n.w.shape)
    a = f32(a0) + jnp.einsum("k,kir->ir", f32(n.coef_a).reshape(-1), f32(a_bases))
    b = jnp.einsum("k,kro->ro", f32(n.coef_b).reshape(-1), f32(b_bases))
    return f32(n.w) + m.alpha / m.rank * a @ b


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
    "dora_2d": Case(DoRA(rank=3, alpha=6.0), (12, 10), 3 * (12 + 10) + 10,
                    dora("ir,ro->io", (0,))),
    "dora_out": Case(DoRA(rank=2, alpha=4.0, in_axes=(0, 1)), (4, 8, 16), 2 * (32 + 16) + 16,
                     dora("hdr,ro->hdo", (0, 1))),
    "dora_stacked": Case(DoRA(rank=2, alpha=3.0, batch_axes=0), (3, 12, 10),
                         3 * (2 * (12 + 10) + 10), dora("lir,lro->lio", (1,))),
    "vera_2d": Case(VeRA(rank=3), (12, 10), 3 + 10, vera("ir,r,ro,o->io")),
    "vera_qkv": Case(VeRA(rank=2), (16, 4, 8), 2 + 4 * 8, vera("ir,r,rhd,hd->ihd")),
    "vera_stacked": Case(VeRA(rank=2, batch_axes=0), (3, 12, 10), 3 * (2 + 10),
                         vera("ir,lr,ro,lo->lio")),
    "nola_2d": Case(NOLA(rank=3, num_basis_a=5, num_basis_b=7, alpha=6.0), (12, 10), 5 + 7,
                    nola),
    "unfreeze": Case(Unfreeze(), (6, 5), 30, lambda n: f32(n.w)),
}
