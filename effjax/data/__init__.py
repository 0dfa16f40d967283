"""effjax.data: offline data sets and a deterministic batch iterator (builders land with
issue 3)."""

from effjax.data.batches import batches, num_batches

__all__ = ["batches", "num_batches"]
