"""effjax: cheap training and fine-tuning of big models in JAX."""

import importlib

from effjax import optim, quant

__version__ = "0.1.0.dev0"
__all__ = ["data", "optim", "quant"]


def __getattr__(name):
    # ``effjax.data`` needs tensorflow-datasets (its builders subclass tfds's): it is imported
    # on first use, so that the optimizers and kernels import without it.
    if name == "data":
        return importlib.import_module("effjax.data")
    raise AttributeError(f"module 'effjax' has no attribute {name!r}")
