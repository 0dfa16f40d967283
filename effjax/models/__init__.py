"""effjax.models: small Flax NNX reference models and loaders for real pretrained weights."""

from effjax.models.char_transformer import (
    CharTransformer,
    CharTransformerConfig,
    next_token_loss,
)
from effjax.models.classifiers import CNN, MLP

__all__ = ["MLP", "CNN", "CharTransformer", "CharTransformerConfig", "next_token_loss"]
