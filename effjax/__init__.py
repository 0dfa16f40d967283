"""effjax: cheap training and fine-tuning of big models in JAX."""

from effjax import data, optim, quant

__version__ = "0.1.0.dev0"
__all__ = ["data", "optim", "quant"]
