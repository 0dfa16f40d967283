"""effjax: cheap training and fine-tuning of big models in JAX.

The subpackages are imported on first use (``effjax.optim`` after ``import effjax`` works), so
``import effjax`` itself loads none of them:

* :mod:`effjax.quant`: number formats and block-wise quantization.
* :mod:`effjax.optim`: optax gradient transformations (low-bit states, SPAM, GaLore, ...).
* :mod:`effjax.peft`: adapters (the LoRA family) as param-tree rewriters.
* :mod:`effjax.compress`: weight quantization, QAT and sparsity rewriters.
* :mod:`effjax.nn`: Flax layers and losses.
* :mod:`effjax.data`: offline data sets (needs ``pip install 'effjax[data]'``).
* :mod:`effjax.models`: small NNX models; the pretrained-weight loaders need
  ``pip install 'effjax[models]'``.
"""

__version__ = "0.1.0.dev0"

# Add "merge" here when effjax/merge/ lands.
_SUBPACKAGES = ("compress", "data", "models", "nn", "optim", "peft", "quant")

__all__ = list(_SUBPACKAGES)


def __getattr__(name: str):
    # A subpackage whose optional dependency is missing raises the ImportError of
    # effjax._optional.import_optional, which names the extra to install.
    if name in _SUBPACKAGES:
        import importlib

        return importlib.import_module(f"effjax.{name}")
    raise AttributeError(f"module 'effjax' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_SUBPACKAGES})
