"""Shared helpers of the offline TFDS builders."""

from __future__ import annotations

import os

import numpy as np


def default_data_dir() -> str:
    """``$EFFJAX_DATA_DIR`` or ``~/.cache/effjax/tfds``: where prepared data sets live."""
    return os.environ.get("EFFJAX_DATA_DIR",
                          os.path.join(os.path.expanduser("~"), ".cache", "effjax", "tfds"))


def to_arrays(source) -> dict[str, np.ndarray]:
    """Stack a ``tfds`` data source (random-access records of numpy values) into arrays."""
    records = [source[i] for i in range(len(source))]
    if not records:
        raise ValueError("empty data source")
    return {k: np.stack([r[k] for r in records]) for k in records[0]}


def prepared_source(builder_cls, split: str, data_dir: str | None = None):
    """Prepare ``builder_cls`` once (array_record under ``data_dir``, default
    :func:`default_data_dir`) and return ``(builder, random-access source of split)``."""
    builder = builder_cls(data_dir=data_dir or default_data_dir(), file_format="array_record")
    builder.download_and_prepare()
    return builder, builder.as_data_source(split=split)
