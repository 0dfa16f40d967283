"""A small deterministic batch iterator for jit-compiled training loops.

``batches(data, batch_size, seed=..., epochs=...)`` yields dicts of numpy arrays with a fixed
leading size, so a jitted step compiles once. Epoch ``e`` visits the examples in the order
``np.random.default_rng([seed, e]).permutation(n)``: the same seed gives the same batches on
every machine, and resuming at epoch ``e`` needs no saved iterator state.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

__all__ = ["batches", "num_batches"]


def _length(data: Mapping[str, np.ndarray]) -> int:
    if not data:
        raise ValueError("batches needs at least one array")
    lengths = {name: len(a) for name, a in data.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"all arrays need the same leading length, got {lengths}")
    return next(iter(lengths.values()))


def num_batches(n: int, batch_size: int, *, drop_remainder: bool = True) -> int:
    """Batches per epoch for ``n`` examples."""
    return n // batch_size if drop_remainder else -(-n // batch_size)


def batches(
    data: Mapping[str, np.ndarray],
    batch_size: int,
    *,
    seed: int = 0,
    epochs: int | None = 1,
    shuffle: bool = True,
    drop_remainder: bool = True,
    start_epoch: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield batches ``{name: array[idx]}`` over ``epochs`` passes (``None``: forever).

    Args:
      data: arrays sharing their leading (example) axis.
      batch_size: examples per batch.
      seed: shuffling seed; epoch ``e`` uses the permutation of ``default_rng([seed, e])``.
      epochs: number of passes, or ``None`` to repeat forever.
      shuffle: visit examples in a per-epoch random order (else in order).
      drop_remainder: drop the last, smaller batch of each epoch (fixed shapes for ``jit``).
      start_epoch: first epoch number (to resume a run).

    Example:
      >>> import numpy as np
      >>> from effjax.data import batches
      >>> data = {"x": np.arange(10), "y": np.arange(10) * 2}
      >>> [b["x"].shape for b in batches(data, 4, epochs=1)]
      [(4,), (4,)]
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if epochs is not None and epochs < 0:
        raise ValueError(f"epochs must be >= 0 or None, got {epochs!r}")
    n = _length(data)
    if drop_remainder and n < batch_size:
        raise ValueError(f"{n} examples cannot fill one batch of {batch_size} "
                         "(pass drop_remainder=False)")
    epoch = start_epoch
    while epochs is None or epoch < start_epoch + epochs:
        order = (np.random.default_rng([seed, epoch]).permutation(n) if shuffle
                 else np.arange(n))
        for b in range(num_batches(n, batch_size, drop_remainder=drop_remainder)):
            idx = order[b * batch_size:(b + 1) * batch_size]
            yield {name: np.asarray(a)[idx] for name, a in data.items()}
        epoch += 1
