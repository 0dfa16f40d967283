"""experiments/model_trees.py's configurations are the ones effjax reads offline."""

import dataclasses
import json
import math

import gguf
import jax

from effjax.models import bert, minilm, smollm2
from effjax.models._files import distribution_file
from experiments import model_trees


def test_minilm_config_is_the_weights_wheels():
    config = json.loads(distribution_file(minilm.DISTRIBUTION, "model/config.json").read_text())
    assert model_trees.MODELS["MiniLM-L6"] == bert.BertConfig.from_hf(config)


def test_minilm_tree_has_the_weight_files_parameter_count():
    from safetensors import safe_open

    with safe_open(str(minilm.minilm_folder() / "model.safetensors"), "np") as f:
        n = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()
                if k not in minilm._IGNORED)
    tree = model_trees.param_shapes("MiniLM-L6")
    assert sum(x.size for x in jax.tree.leaves(tree)) == n == 22_713_216


def test_smollm2_config_is_the_ggufs():
    reader = gguf.GGUFReader(str(smollm2.smollm2_path()))
    meta = {k: reader.fields[k].contents() for k in smollm2._META_KEYS if k in reader.fields}
    tied = "output.weight" not in {t.name for t in reader.tensors}
    got = smollm2.config_from_gguf(meta, tie_word_embeddings=tied)
    # the file stores eps as float32 (9.99999974e-06); the shapes do not depend on it
    assert dataclasses.replace(got, rms_norm_eps=1e-5) == model_trees.MODELS["SmolLM2-135M"]
    tree = model_trees.param_shapes("SmolLM2-135M")
    n = sum(int(t.n_elements) for t in reader.tensors)
    assert sum(x.size for x in jax.tree.leaves(tree)) == n == 134_515_008


def test_parameter_counts_are_the_published_ones():
    count = {name: sum(x.size for x in jax.tree.leaves(model_trees.param_shapes(name)))
             for name in model_trees.MODELS}
    # MiniLM: above; SmolLM2-135M (tied embeddings); Llama-2-7b-hf's published 6,738,415,616
    assert count == {"MiniLM-L6": 22_713_216, "SmolLM2-135M": 134_515_008,
                     "LLaMA-2-7B": 6_738_415_616}
