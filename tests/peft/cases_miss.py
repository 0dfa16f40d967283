"""Conformance rows for MiSS / Bone (the equations written plainly on the node's fields).

balance: W'[i, o] = W[i, o] + D[i mod r, o]; mini: W'[i, o] = W[i, o] + D[i mod r, o mod m];
bat: W'_{ca} = W_{ca} + b_a (W_{ca} + I) on r x r blocks (input block c, output block a).
Counts by hand: r n_out (balance, bat), r m (mini), times the number of slices.

The bat rows use kernels whose shards on the 2 x 4 test mesh are whole r x r blocks (rows per
device and columns per device multiples of r): bat mixes the rows of a block, so a shard
boundary inside a block makes XLA re-shard and choose the output's sharding itself (the values
stay right; see effjax.peft.miss).
"""

import jax.numpy as jnp
import numpy as np

from effjax.peft.miss import Bone, MiSS
from tests.peft.conformance_case import Case, f32


def balance(n_in, in_shape=None):
    """W + D[i mod r] over the flattened input index i (``in_shape``: the input axes)."""
    def ref(n):
        d = f32(n.block)[np.arange(n_in) % n.method.rank]  # (n_in, *out)
        return f32(n.w) + (d if in_shape is None else d.reshape(in_shape + d.shape[1:]))
    return ref


def stacked_balance(n):
    return f32(n.w) + f32(n.block)[:, np.arange(n.w.shape[1]) % n.method.rank, :]


def mini(n):
    n_in, n_out = n.w.shape
    i, o = np.arange(n_in) % n.method.rank, np.arange(n_out) % n.method.mini_rank
    return f32(n.w) + f32(n.block)[i[:, None], o[None, :]]


def bat_matrix(w, b, r):
    """Blockwise W_ca + b_a (W_ca + I) on a 2-D (n_in, n_out) matrix, by explicit loops."""
    eye = jnp.eye(r)
    rows = []
    for c in range(w.shape[0] // r):
        row = []
        for a in range(w.shape[1] // r):
            blk = w[c * r:(c + 1) * r, a * r:(a + 1) * r]
            row.append(blk + b[a] @ (blk + eye))
        rows.append(jnp.concatenate(row, axis=1))
    return jnp.concatenate(rows, axis=0)


def bat(n):
    w = f32(n.w)
    return bat_matrix(w.reshape(w.shape[0], -1), f32(n.block), n.method.rank).reshape(w.shape)


def bat_stacked(n):
    return jnp.stack([bat_matrix(f32(n.w[s]), f32(n.block[s]), n.method.rank)
                      for s in range(n.w.shape[0])])


CASES = {
    "miss_2d": Case(MiSS(rank=3), (12, 10), 3 * 10, balance(12)),
    "miss_2d_remainder": Case(MiSS(rank=5), (12, 10), 5 * 10, balance(12),
                              why="12 % 5 != 0: the last shard is D's first 2 rows (PEFT pads)"),
    "miss_qkv": Case(MiSS(rank=4), (16, 4, 8), 4 * 32, balance(16)),
    "miss_out": Case(MiSS(rank=6, in_axes=(0, 1)), (4, 8, 16), 6 * 16, balance(32, (4, 8))),
    "miss_stacked": Case(MiSS(rank=4, batch_axes=0), (3, 12, 10), 3 * 4 * 10, stacked_balance),
    "miss_mini": Case(MiSS(rank=3, variant="mini", mini_rank=5), (12, 10), 3 * 5, mini),
    "miss_bat": Case(Bone(rank=4, variant="bat"), (16, 8), (8 // 4) * 4 * 4, bat),
    "miss_bat_qkv": Case(MiSS(rank=4, variant="bat"), (8, 2, 4), (8 // 4) * 4 * 4, bat),
    "miss_bat_stacked": Case(MiSS(rank=4, variant="bat", batch_axes=0), (2, 8, 16),
                             2 * (16 // 4) * 4 * 4, bat_stacked),
    "miss_kaiming": Case(MiSS(rank=3, init="kaiming"), (12, 10), 3 * 10, balance(12),
                         identity="none",
                         why="init='kaiming' is PEFT's init_weights=False: D is random, so "
                             "W' != W at initialization by design"),
}
