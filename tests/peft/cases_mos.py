"""Conformance rows for MoS (the paper's equation written plainly on the node's fields).

Per layer s: vector k of A_s (resp. B_s) is the concatenation of the l pool shards
pool[idx[s, k l + i]], i = 0..l-1; W'_s = W_s + (alpha / r) sum_k a_{s,k} b_{s,k}^T.
Counts by hand: e L (n_in + n_out), L the number of stacked layers.
"""

import math

import jax.numpy as jnp

from effjax.peft.mos import MoS
from tests.peft.conformance_case import Case, f32


def _vectors(pool, idx, r, n_sh):
    """[concat_i pool[idx[k l + i]] for k < r] as an (r, n) array, written with loops."""
    return jnp.stack([jnp.concatenate([pool[idx[k * n_sh + i]] for i in range(n_sh)])
                      for k in range(r)])


def _layer(n, w, idx_a, idx_b):
    m = n.method
    a = _vectors(f32(n.pool_a), idx_a, m.rank, m.num_shards)  # (r, n_in)
    b = _vectors(f32(n.pool_b), idx_b, m.rank, m.num_shards)  # (r, n_out)
    delta = sum(jnp.outer(a[k], b[k]) for k in range(m.rank))
    return f32(w) + m.alpha / m.rank * delta.reshape(w.shape)


def single(n):
    """An unstacked kernel (one layer); multi-axis kernels flatten in (first axis) / out."""
    return _layer(n, n.w.reshape(n.w.shape[0], -1), n.idx_a, n.idx_b).reshape(n.w.shape)


def stacked(in_ndim):
    """Layers on axis 0; the next ``in_ndim`` axes are the input."""
    def ref(n):
        out = []
        for s in range(n.w.shape[0]):
            w = n.w[s]
            n_in = math.prod(w.shape[:in_ndim])
            out.append(_layer(n, w.reshape(n_in, -1), n.idx_a[s], n.idx_b[s]).reshape(w.shape))
        return jnp.stack(out)
    return ref


CASES = {
    # one layer: r - p <= e - p forces r <= e (no sharing across layers)
    "mos_2d": Case(MoS(rank=3, pool_rank=3, private_rank=1, num_shards=2), (12, 10),
                   3 * 1 * (12 + 10), single),
    "mos_qkv": Case(MoS(rank=2, pool_rank=2, private_rank=0, num_shards=4), (16, 4, 8),
                    2 * 1 * (16 + 32), single),
    # 4 layers share the pools: rank 4 per layer for the parameters of rank 2
    "mos_stacked": Case(MoS(rank=4, pool_rank=2, private_rank=1, num_shards=2, batch_axes=0),
                        (4, 12, 10), 2 * 4 * (12 + 10), stacked(1)),
    "mos_stacked_no_private": Case(MoS(rank=3, pool_rank=1, private_rank=0, num_shards=1,
                                       alpha=3.0, batch_axes=0), (3, 8, 6), 1 * 3 * (8 + 6),
                                   stacked(1)),
    "mos_stacked_out": Case(MoS(rank=4, pool_rank=2, private_rank=1, num_shards=2,
                                batch_axes=0, in_axes=(1, 2)), (3, 4, 8, 16),
                            2 * 3 * (32 + 16), stacked(2)),
}
