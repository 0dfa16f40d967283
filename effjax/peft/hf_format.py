"""Hugging Face PEFT's adapter format: export effjax LoRA / DoRA adapters, import PEFT's.

A PEFT LoRA adapter is a folder with ``adapter_config.json`` (``peft_type: "LORA"``, ``r``,
``lora_alpha``, ``use_rslora``, ``use_dora``, ``target_modules``, ``rank_pattern``,
``alpha_pattern``, ...) and ``adapter_model.safetensors`` holding, for each adapted torch
module ``<name>`` (e.g. ``model.layers.0.self_attn.q_proj``)::

    base_model.model.<name>.lora_A.weight           (r, in)     = A^T
    base_model.model.<name>.lora_B.weight           (out, r)    = B^T
    base_model.model.<name>.lora_magnitude_vector   (out,)      = m      (DoRA only)

(``peft.utils.save_and_load.get_peft_model_state_dict``: the adapter name ``default`` is
stripped from the keys; DoRA's ``lora_magnitude_vector.default.weight`` is stored without
``.weight``). PEFT's layer computes ``base(x) + s * lora_B(lora_A(x))`` with
:math:`s = \\alpha / r` (:math:`\\alpha/\\sqrt r` with ``use_rslora``), where :math:`\\alpha`
and :math:`r` are ``alpha_pattern`` / ``rank_pattern`` entries for the module if one matches,
else ``lora_alpha`` / ``r``. effjax's :class:`~effjax.peft.LoRAWeight` over a Flax kernel
:math:`W` ``(in, out)`` holds :math:`A` ``(in, r)`` and :math:`B` ``(r, out)`` with
:math:`W' = W + s\\,AB`, i.e. exactly PEFT's ``W.T + s * (lora_B @ lora_A).T``: the two
formats differ by a transpose of each factor. DoRA's magnitude :math:`m` ``(out,)`` is the
same vector in both (the norm of each output unit's weights over the inputs).

**Module names.** Which effjax parameter is which torch module is the model's business, so it
is given as ``module_names``, either

* a callable ``path -> name | None`` on the effjax leaf path (``'layers/0/self_attn/q_proj/kernel'``
  -> ``'model.layers.0.self_attn.q_proj'``), returning for a *stacked* kernel (layers scanned
  into leading axes) a nested sequence of names whose nesting matches the leading axes
  (``[f'model.layers.{i}.mlp.up_proj' for i in range(L)]`` for a kernel ``(L, in, out)``); or
* ordered rules ``{regex: template}``: the first regex that fullmatches the path gives the
  name ``match.expand(template)`` (``\\1`` / ``\\g<name>`` refer to groups); positional
  fields ``{0}``, ``{1}``, ... in the template mark a stacked kernel and are filled with the
  slice index along leading axis 0, 1, ... (``{r'scan/(\\w+)/kernel': r'model.layers.{0}.\\1'}``).

:func:`llama_module_names` is the mapping for :class:`effjax.models.llama.Llama` (SmolLM2):
its parameters are those of ``transformers``' ``LlamaForCausalLM``, with the query and key
rows already in Hugging Face's order (:func:`effjax.models.smollm2.unpermute_qk` undoes
llama.cpp's permutation when the GGUF is read), so the LoRA factors of ``q_proj`` / ``k_proj``
map with the plain transpose, no row permutation.

Stacked kernels are split into one torch module per slice on export and stacked again on
import (the names' nesting gives the number of leading batch axes). Kernels with several
input or output axes (a ``DenseGeneral`` / ``Einsum`` kernel) are flattened row-major over
their input axes and over their output axes, which is how a ``torch.nn.Linear`` over the
flattened features sees them.

Supported: LoRA (``kaiming`` / ``gaussian`` inits, and EVA, whose frozen kernel is the base
kernel), rsLoRA, DoRA; per-module ranks and alphas (``rank_pattern`` / ``alpha_pattern``);
QLoRA (an adapter over a quantized :class:`~effjax.compress.QuantizedWeight` base exports its
factors like any other, and an import over quantized weights wraps them without a dense copy).
Not supported, with an error naming the path or field: other adapter nodes; adapters whose
frozen kernel is a residual (PiSSA, OLoRA, CorDA: PEFT would apply them to the original base
weight); PEFT adapters of another ``peft_type``, with trained biases (``bias``, ``lora_bias``),
``modules_to_save``, embedding or convolution LoRA, layer replication and the other fields
listed in :data:`UNSUPPORTED_FIELDS`.

References:
  Hugging Face PEFT, ``src/peft/utils/save_and_load.py``, ``src/peft/tuners/lora/config.py``
  and ``layer.py`` (peft 0.21).
"""

from __future__ import annotations

import collections
import difflib
import json
import os
import re
import string
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from effjax._optional import import_optional
from effjax.compress import is_quantized
from effjax.peft.base import AdapterMethod, is_adapter
from effjax.peft.dora import DoRA, DoRAWeight
from effjax.peft.eva import EVA
from effjax.peft.layout import place_like
from effjax.peft.lora import LoRA, LoRAWeight
from effjax.peft.tree import adapter_paths
from effjax.selection import rewrite, tree_paths

__all__ = ["save_peft_adapter", "load_peft_adapter", "to_peft_state_dict",
           "from_peft_state_dict", "llama_module_names", "UNSUPPORTED_FIELDS"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_A, _B, _M = ".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"

#: PEFT ``adapter_config.json`` fields whose non-default values effjax cannot represent:
#: ``{field: (default values accepted, why)}``. :func:`from_peft_state_dict` raises on any
#: other value.
UNSUPPORTED_FIELDS: dict[str, tuple[tuple[Any, ...], str]] = {
    "bias": (("none",), "trained biases"),
    "lora_bias": ((False,), "a bias on lora_B"),
    "modules_to_save": ((None, ()), "fully trained modules (use effjax.peft.Unfreeze)"),
    "layer_replication": ((None, ()), "layer replication"),
    "use_qalora": ((False,), "QA-LoRA pooling"),
    "use_bdlora": ((None, False), "block-diagonal LoRA"),
    "alora_invocation_tokens": ((None, ()), "activated LoRA (input-dependent)"),
    "target_parameters": ((None, ()), "LoRA on nn.Parameter targets"),
    "trainable_token_indices": ((None, ()), "trainable tokens"),
    "megatron_config": ((None,), "Megatron parallel layers"),
    "arrow_config": ((None,), "Arrow routing"),
    "monteclora_config": ((None,), "MonteCLoRA"),
    "kasa_config": ((None,), "KaSA"),
    "velora_config": ((None,), "VeLoRA"),
}


# --------------------------------------------------------------------------------------------
# module names


def llama_module_names(path: str) -> str | None:
    """Torch module name of a :class:`effjax.models.llama.Llama` (SmolLM2) kernel path.

    The mapping of ``transformers``' ``LlamaForCausalLM`` (the inverse of the table in
    :mod:`effjax.models.smollm2`)::

        layers/N/self_attn/{q,k,v,o}_proj/kernel  -> model.layers.N.self_attn.{q,k,v,o}_proj
        layers/N/mlp/{gate,up,down}_proj/kernel   -> model.layers.N.mlp.{gate,up,down}_proj
        lm_head/kernel                            -> lm_head

    Other paths (norms, the embedding) give ``None``. effjax's ``q_proj`` / ``k_proj`` kernels
    are Hugging Face's weights transposed (rows in Hugging Face's RoPE order), so their LoRA
    factors need no row permutation.

    Args:
      path: an effjax leaf path (NNX ``State`` or its pure dict).

    Returns:
      The module name, or None.

    Example:
      >>> llama_module_names('layers/3/self_attn/q_proj/kernel')
      'model.layers.3.self_attn.q_proj'
      >>> llama_module_names('layers/0/mlp/down_proj/kernel')
      'model.layers.0.mlp.down_proj'
      >>> llama_module_names('norm/weight') is None
      True
    """
    m = _LLAMA.fullmatch(path)
    if m is None:
        return "lm_head" if path == "lm_head/kernel" else None
    return f"model.layers.{m.group(1)}.{m.group(2)}.{m.group(3)}"


_LLAMA = re.compile(r"layers/(\d+)/(self_attn|mlp)/((?:q|k|v|o|gate|up|down)_proj)/kernel")


def _fields(template: str) -> int:
    """Number of leading batch axes a rule template names (positional fields ``{0}``...)."""
    nums = set()
    for _, field, _, _ in string.Formatter().parse(template):
        if field is None:
            continue
        if not field.isdigit():
            raise ValueError(f"module name template {template!r}: only positional fields "
                             f"{{0}}, {{1}}, ... (slice indices of stacked kernels) are "
                             f"allowed, got {{{field}}}")
        nums.add(int(field))
    if nums != set(range(len(nums))):
        raise ValueError(f"module name template {template!r} uses fields {sorted(nums)}; they "
                         f"must be {{0}}, ..., {{k-1}} (one per leading stacked axis)")
    return len(nums)


def _resolver(module_names: Any) -> Callable[[str, tuple[int, ...]], np.ndarray | None]:
    """``(path, shape) -> names`` (an object array whose shape is the stacked leading axes,
    ``()`` for a plain kernel) or None, from a callable or a rule table."""
    if isinstance(module_names, Mapping):
        rules = []
        for pattern, template in module_names.items():
            if not isinstance(pattern, str) or not isinstance(template, str):
                raise TypeError(f"module_names rules map regex strings to name templates, got "
                                f"{pattern!r}: {template!r}")
            try:
                rules.append((re.compile(pattern), template, _fields(template)))
            except re.error as e:
                raise ValueError(f"module_names rule {pattern!r} is not a valid regex: "
                                 f"{e}") from None

        def resolve(path: str, shape: tuple[int, ...]) -> np.ndarray | None:
            for rx, template, k in rules:
                m = rx.fullmatch(path)
                if m is None:
                    continue
                name = m.expand(template)
                if k > len(shape) - 2:
                    raise ValueError(f"module_names rule {rx.pattern!r} names {k} stacked "
                                     f"axes for '{path}' of shape {shape}, which has "
                                     f"{len(shape)} axes (in and out need 2)")
                out = np.empty(shape[:k], object)
                for idx in np.ndindex(*shape[:k]):
                    out[idx] = name.format(*idx)
                return out
            return None

        return resolve
    if not callable(module_names):
        raise TypeError(f"module_names must be a callable path -> name or a rule table "
                        f"{{regex: template}}, got {type(module_names).__name__}")

    def resolve_fn(path: str, shape: tuple[int, ...]) -> np.ndarray | None:
        names = module_names(path)
        if names is None:
            return None
        if isinstance(names, str):
            out = np.empty((), object)
            out[()] = names
            return out
        out = np.array(names, dtype=object)
        if out.ndim == 0 or not all(isinstance(x, str) for x in out.ravel()):
            raise TypeError(f"module_names({path!r}) must return a module name, a nested "
                            f"sequence of names (stacked kernels) or None, got {names!r}")
        return out

    return resolve_fn


# --------------------------------------------------------------------------------------------
# export


def _check_exportable(path: str, node: Any) -> None:
    if not isinstance(node, (LoRAWeight, DoRAWeight)):
        raise TypeError(f"the adapter at '{path}' is a {type(node).__name__} "
                        f"({node.method.name}); PEFT's LoRA format holds LoRA, rsLoRA and "
                        f"DoRA adapters only (merge it with effjax.peft.merge instead)")
    method = node.method
    residual = (not isinstance(method, (LoRA, EVA))
                or (isinstance(method, LoRA) and method.init not in ("kaiming", "gaussian")))
    if residual:
        init = getattr(method, "init", method.name)
        raise ValueError(f"the adapter at '{path}' ({method.name}, init={init!r}) keeps a "
                         f"residual kernel W - s A0 B0 as its frozen weight; a PEFT adapter is "
                         f"applied to the original weight, so exporting A, B alone would change "
                         f"the model (merge it with effjax.peft.merge instead)")


def to_peft_state_dict(tree: Any, *, module_names: Any,
                       base_model_name_or_path: str | None = None
                       ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """PEFT's adapter state dict and ``adapter_config.json`` content for ``tree``'s adapters.

    For each LoRA / DoRA node at ``path`` (one module per slice of a stacked kernel, named by
    ``module_names``): ``lora_A.weight`` :math:`= A^\\top` ``(r, n_in)``, ``lora_B.weight``
    :math:`= B^\\top` ``(n_out, r)`` and, for DoRA, ``lora_magnitude_vector`` :math:`= m`
    ``(n_out,)``, under ``base_model.model.<name>.``; arrays keep their dtype. The config holds
    ``r`` and ``lora_alpha`` of the most common (rank, alpha) and ``rank_pattern`` /
    ``alpha_pattern`` entries (escaped full module names) for the others, ``use_rslora``,
    ``use_dora``, ``target_modules`` (the sorted module names) and PEFT's defaults otherwise.

    Args:
      tree: a param tree holding LoRA / DoRA nodes (from :func:`effjax.peft.inject`).
      module_names: a callable ``path -> name`` or rules ``{regex: template}`` (see the module
        docstring; :func:`llama_module_names` for effjax's Llama / SmolLM2).
      base_model_name_or_path: stored in the config (PEFT's field of that name).

    Returns:
      ``(tensors, config)``: ``{key: numpy array}`` and the config as a dict.

    Raises:
      ValueError: no adapter nodes; a node the mapping gives no name (named by path), two
        nodes with one module name, a stacked node whose names do not match its stacked axes,
        nodes that disagree on ``rslora`` or mix LoRA and DoRA (PEFT keeps one flag per
        adapter), an adapter with a residual frozen kernel (PiSSA, OLoRA, CorDA).
      TypeError: an adapter node of another method (named by path).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from effjax.peft import LoRA, inject
      >>> params = {'fc': {'kernel': jnp.ones((6, 4))}}
      >>> tree = inject(params, {'fc/kernel': LoRA(rank=2, alpha=4.0)}, key=jax.random.key(0))
      >>> tensors, config = to_peft_state_dict(tree, module_names={r'(\\w+)/kernel': r'\\1'})
      >>> {k: v.shape for k, v in tensors.items()}
      {'base_model.model.fc.lora_A.weight': (2, 6), 'base_model.model.fc.lora_B.weight': (4, 2)}
      >>> config['r'], config['lora_alpha'], config['target_modules']
      (2, 4.0, ['fc'])
    """
    nodes = adapter_paths(tree)
    if not nodes:
        raise ValueError("the tree holds no adapter nodes: nothing to export (inject first)")
    resolve = _resolver(module_names)
    tensors: dict[str, np.ndarray] = {}
    owner: dict[str, str] = {}
    hyper: dict[str, tuple[int, float]] = {}
    flags = {}
    for path, node in nodes.items():
        _check_exportable(path, node)
        lay = node.layout
        names = resolve(path, lay.shape)
        if names is None:
            raise ValueError(f"module_names gives no torch module name for the adapter at "
                             f"'{path}' (shape {lay.shape})")
        if names.shape != lay.batch_shape:
            raise ValueError(f"the adapter at '{path}' has stacked axes of shape "
                             f"{lay.batch_shape} (batch_axes={lay.batch_axes}), but "
                             f"module_names gives names of shape {names.shape}")
        flags[path] = (node.method.rslora, isinstance(node, DoRAWeight))
        r = node.rank
        a = np.asarray(node.a).reshape(lay.batch_shape + (lay.n_in, r))
        b = np.asarray(node.b).reshape(lay.batch_shape + (r, lay.n_out))
        m = (np.asarray(node.m).reshape(lay.batch_shape + (lay.n_out,))
             if isinstance(node, DoRAWeight) else None)
        for idx in np.ndindex(*lay.batch_shape):
            name = names[idx]
            if name in owner:
                raise ValueError(f"module name '{name}' is given to the adapters at "
                                 f"'{owner[name]}' and '{path}'")
            owner[name] = path
            hyper[name] = (r, float(node.method.alpha))
            tensors[_PREFIX + name + _A] = np.ascontiguousarray(a[idx].T)
            tensors[_PREFIX + name + _B] = np.ascontiguousarray(b[idx].T)
            if m is not None:
                tensors[_PREFIX + name + _M] = np.ascontiguousarray(m[idx])
    for what, i in (("rslora", 0), ("DoRA", 1)):
        values = {f[i] for f in flags.values()}
        if len(values) > 1:
            with_, without = ([p for p, f in flags.items() if f[i] == v] for v in (True, False))
            raise ValueError(f"a PEFT adapter has one {what} flag, but the adapters at "
                             f"{with_[:3]} use {what} and those at {without[:3]} do not; save "
                             f"them as two adapters")
    (rslora, dora), = set(flags.values())
    (r, alpha), _ = collections.Counter(hyper.values()).most_common(1)[0]
    rank_pattern = {re.escape(n): h[0] for n, h in sorted(hyper.items()) if h[0] != r}
    alpha_pattern = {re.escape(n): h[1] for n, h in sorted(hyper.items()) if h[1] != alpha}
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": alpha, "use_rslora": rslora, "use_dora": dora,
        "target_modules": sorted(hyper), "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern, "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
    }
    return tensors, config


def save_peft_adapter(path: str | os.PathLike, tree: Any, *, module_names: Any,
                      base_model_name_or_path: str | None = None,
                      overwrite: bool = False) -> None:
    """Write ``tree``'s LoRA / DoRA adapters as a Hugging Face PEFT adapter folder.

    ``path/adapter_model.safetensors`` and ``path/adapter_config.json``, as
    :func:`to_peft_state_dict` computes them; ``peft.PeftModel.from_pretrained(model, path)``
    loads them over the torch model whose modules ``module_names`` names.

    Args:
      path: the folder (created if missing).
      tree: a param tree holding LoRA / DoRA nodes.
      module_names: a callable ``path -> name`` or rules ``{regex: template}`` (see the module
        docstring; :func:`llama_module_names` for effjax's Llama / SmolLM2).
      base_model_name_or_path: stored in the config.
      overwrite: replace the two files if ``path`` holds them already (else raise).

    Raises:
      FileExistsError: the files exist and ``overwrite`` is False.
      ValueError, TypeError: as :func:`to_peft_state_dict`.

    Example:
      >>> import jax, jax.numpy as jnp, tempfile, os
      >>> from effjax.peft import LoRA, inject, materialize
      >>> params = {'fc': {'kernel': jnp.ones((6, 4))}}
      >>> tree = inject(params, {'fc/kernel': LoRA(rank=2)}, key=jax.random.key(0))
      >>> tree['fc']['kernel'] = tree['fc']['kernel'].replace(b=jnp.full((2, 4), 0.5))
      >>> d = os.path.join(tempfile.mkdtemp(), 'adapter')
      >>> names = {r'(\\w+)/kernel': r'\\1'}
      >>> save_peft_adapter(d, tree, module_names=names)
      >>> sorted(os.listdir(d))
      ['adapter_config.json', 'adapter_model.safetensors']
      >>> back = load_peft_adapter(d, params, module_names=names)
      >>> bool(jnp.array_equal(materialize(back)['fc']['kernel'],
      ...                      materialize(tree)['fc']['kernel']))
      True
    """
    st = import_optional("safetensors.numpy", extra="models",
                         feature="effjax.peft.save_peft_adapter", distribution="safetensors")
    tensors, config = to_peft_state_dict(tree, module_names=module_names,
                                         base_model_name_or_path=base_model_name_or_path)
    path = os.fspath(path)
    files = [os.path.join(path, n) for n in (WEIGHTS_NAME, CONFIG_NAME)]
    if not overwrite and any(os.path.exists(f) for f in files):
        raise FileExistsError(f"save_peft_adapter: {path} already holds a PEFT adapter; pass "
                              f"overwrite=True to replace it")
    os.makedirs(path, exist_ok=True)
    st.save_file(tensors, files[0], metadata={"format": "pt"})
    with open(files[1], "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


# --------------------------------------------------------------------------------------------
# import


def _check_config(config: Mapping[str, Any]) -> None:
    kind = config.get("peft_type")
    if kind != "LORA":
        raise ValueError(f"PEFT adapter of peft_type {kind!r}: only 'LORA' adapters (LoRA, "
                         f"rsLoRA, DoRA) can be loaded into effjax")
    for field, (ok, what) in UNSUPPORTED_FIELDS.items():
        value = config.get(field, ok[0])
        same = tuple(value) if isinstance(value, list) else value
        if same not in ok and same != {}:
            raise ValueError(f"PEFT adapter config {field}={value!r} ({what}) is not supported "
                             f"by effjax's import (supported: {ok[0]!r})")


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern ``p`` with ``re.match(rf"(.*\\.)?({p})$",
    name)`` gives the value, else ``default``."""
    for p, v in patterns.items():
        if re.match(rf"(.*\.)?({p})$", name):
            return v
    return default


def _split_key(key: str) -> tuple[str, str]:
    """``(module name, kind)`` of a state-dict key; kind is 'a', 'b' or 'm'."""
    name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
    for suffix, kind in ((_A, "a"), (_B, "b"), (_M, "m")):
        if name.endswith(suffix):
            return name[:-len(suffix)], kind
    what = ("embedding LoRA (lora_embedding_A/B)" if "lora_embedding" in key else
            "a bias" if key.endswith(".bias") else "an unknown entry")
    raise ValueError(f"PEFT adapter tensor '{key}' is {what}; effjax imports lora_A.weight, "
                     f"lora_B.weight and lora_magnitude_vector only")


def from_peft_state_dict(tensors: Mapping[str, Any], config: Mapping[str, Any],
                         base_params: Any, *, module_names: Any, rules: Any = None) -> Any:
    """Inject a PEFT LoRA / DoRA adapter (state dict + config) into ``base_params``.

    Every module of the adapter must be the name ``module_names`` gives some kernel (or slice
    of a stacked kernel) of ``base_params``; that kernel becomes a
    :class:`~effjax.peft.LoRAWeight` (:class:`~effjax.peft.DoRAWeight` with ``use_dora``) with
    rank :math:`r` from ``lora_A``, :math:`\\alpha` from ``alpha_pattern`` / ``lora_alpha``,
    rsLoRA from ``use_rslora``, :math:`A` = ``lora_A.T``, :math:`B` = ``lora_B.T`` (and
    :math:`m`), cast to the adapter dtype :func:`effjax.peft.inject` would give (the config's
    ``dtype``, else the kernel's, float32 over bfloat16 / float16 kernels as PEFT's
    ``autocast_adapter_dtype``) and sharded like the kernel; the nodes are built from the
    loaded values directly (nothing is drawn at random). Stacked kernels need every slice's
    module and one rank and alpha for all slices.

    A PEFT adapter trained from PiSSA / OLoRA / CorDA initialization (``init_lora_weights``)
    belongs on the residual base model it was saved with; pass that model's params.

    Args:
      tensors: ``{key: array}`` as ``adapter_model.safetensors`` holds it (keys with or
        without the ``base_model.model.`` prefix).
      config: the ``adapter_config.json`` content.
      base_params: the param tree (Linen ``params`` dict, NNX ``State`` or pure dict).
      module_names: a callable ``path -> name`` or rules ``{regex: template}`` (see the module
        docstring; :func:`llama_module_names` for effjax's Llama / SmolLM2).
      rules: optional ``{regex: LoRA(...)}`` giving the layout and dtype fields (``in_axes``,
        ``out_axes``, ``batch_axes``, ``dtype``) of matching kernels; rank, alpha and rsLoRA
        always come from the adapter. Default: a stacked kernel's leading axes are batch
        axes, then the first axis is the input, the rest the output.

    Returns:
      The adapted tree.

    Raises:
      ValueError: a ``peft_type`` other than ``"LORA"`` or an unsupported config field
        (:data:`UNSUPPORTED_FIELDS`); a tensor that is not ``lora_A`` / ``lora_B`` /
        ``lora_magnitude_vector``; a module the mapping gives no kernel (the message lists
        the closest module names); a module without ``lora_A`` or ``lora_B``; a stacked
        kernel with slices missing or with different ranks or alphas; a factor whose shape
        does not fit the kernel (the message names the module, the path and both shapes);
        a rank that disagrees with the config's ``r`` / ``rank_pattern``.
      TypeError: a targeted kernel that is not a floating array (named with its path).

    Example:
      >>> import jax.numpy as jnp, numpy as np
      >>> from effjax.peft import materialize
      >>> params = {'fc': {'kernel': jnp.zeros((3, 2))}}
      >>> tensors = {'base_model.model.fc.lora_A.weight': np.ones((1, 3), np.float32),
      ...            'base_model.model.fc.lora_B.weight': np.array([[1.0], [2.0]], np.float32)}
      >>> config = {'peft_type': 'LORA', 'r': 1, 'lora_alpha': 2}
      >>> tree = from_peft_state_dict(tensors, config, params,
      ...                             module_names={r'(\\w+)/kernel': r'\\1'})
      >>> materialize(tree)['fc']['kernel']  # W + (alpha / r) A B = 2 * ones(3, 1) @ [[1, 2]]
      Array([[2., 4.],
             [2., 4.],
             [2., 4.]], dtype=float32)
    """
    _check_config(config)
    dora = bool(config.get("use_dora", False))
    rslora = bool(config.get("use_rslora", False))
    modules: dict[str, dict[str, np.ndarray]] = {}
    for k, v in tensors.items():
        name, kind = _split_key(k)
        if kind == "m" and not dora:
            raise ValueError(f"PEFT adapter tensor '{k}' is a DoRA magnitude, but the config "
                             f"has use_dora=False")
        modules.setdefault(name, {})[kind] = np.asarray(v)
    if not modules:
        raise ValueError("the PEFT adapter holds no LoRA tensors")
    for name, parts in modules.items():
        need = ("a", "b", "m") if dora else ("a", "b")
        missing = [_PREFIX + name + {"a": _A, "b": _B, "m": _M}[x] for x in need
                   if x not in parts]
        if missing:
            raise ValueError(f"PEFT adapter module '{name}' has no {missing}")

    # which kernel (and slice) each module name is
    resolve = _resolver(module_names)
    paths, leaves, _ = tree_paths(base_params, is_leaf=_is_node)
    where: dict[str, tuple[str, tuple[int, ...]]] = {}
    names_at: dict[str, np.ndarray] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for p, leaf in zip(paths, leaves):
        shape = tuple(getattr(leaf, "shape", ()))
        if is_adapter(leaf) or len(shape) < 2:
            continue
        names = resolve(p, shape)
        if names is None:
            continue
        if names.shape != shape[:names.ndim] or len(shape) - names.ndim < 2:
            raise ValueError(f"module_names gives names of shape {names.shape} for '{p}' of "
                             f"shape {shape}: a stacked kernel's names must match its leading "
                             f"axes and leave 2 axes (in, out)")
        names_at[p], shapes[p] = names, shape
        for idx in np.ndindex(*names.shape):
            if names[idx] in where:
                raise ValueError(f"module_names gives the name '{names[idx]}' to "
                                 f"'{where[names[idx]][0]}' and '{p}'")
            where[names[idx]] = (p, idx)
    for name in modules:
        if name not in where:
            close = difflib.get_close_matches(name, list(where), n=5, cutoff=0.5)
            raise ValueError(f"PEFT adapter module '{name}' is not a kernel of the param tree "
                             f"under module_names ({len(where)} module names map to kernels); "
                             f"closest: {close or 'none'}")

    template_rules = _template_rules(rules)
    targets: dict[str, AdapterMethod] = {}
    values: dict[str, dict[str, np.ndarray]] = {}
    for p, names in names_at.items():
        present = [idx for idx in np.ndindex(*names.shape) if names[idx] in modules]
        if not present:
            continue
        absent = [names[idx] for idx in np.ndindex(*names.shape) if names[idx] not in modules]
        if absent:
            raise ValueError(f"the stacked kernel '{p}' has adapters for "
                             f"{len(present)} of its {names.size} modules; missing "
                             f"{absent[:3]}{' ...' if len(absent) > 3 else ''}")
        hyper = {}
        for idx in present:
            name = names[idx]
            r = modules[name]["a"].shape[0] if modules[name]["a"].ndim == 2 else None
            if r is None:
                raise ValueError(f"PEFT adapter module '{name}': lora_A.weight has shape "
                                 f"{modules[name]['a'].shape}, expected (r, in) (convolution "
                                 f"LoRA is not supported)")
            want_r = _pattern_value(config.get("rank_pattern") or {}, name, config.get("r", r))
            if int(want_r) != r:
                raise ValueError(f"PEFT adapter module '{name}': lora_A.weight has rank {r} but "
                                 f"the config's r / rank_pattern gives {want_r}")
            alpha = float(_pattern_value(config.get("alpha_pattern") or {}, name,
                                         config.get("lora_alpha", 8)))
            hyper[name] = (r, alpha)
        if len(set(hyper.values())) > 1:
            raise ValueError(f"the stacked kernel '{p}' is one effjax node with one rank and "
                             f"alpha, but its modules have (rank, alpha) {hyper}")
        (r, alpha), = set(hyper.values())
        shape = shapes[p]
        method = _method(p, shape, names.ndim, template_rules, dora=dora, rank=r, alpha=alpha,
                         rslora=rslora)
        lay = method.layout(shape)
        if lay.batch_shape != names.shape:
            raise ValueError(f"'{p}' of shape {shape}: the layout's stacked axes "
                             f"{lay.batch_axes} (shape {lay.batch_shape}) do not match the "
                             f"module names' shape {names.shape}")
        # staged in float32 or the file's wider dtype; cast to the adapter dtype in build()
        stage = np.result_type(np.float32, *(x.dtype for i in present
                                             for x in modules[names[i]].values()))
        a = np.empty(lay.batch_shape + (lay.n_in, r), stage)
        b = np.empty(lay.batch_shape + (r, lay.n_out), stage)
        m = np.empty(lay.batch_shape + (lay.n_out,), stage)
        for idx in present:
            name, parts = names[idx], modules[names[idx]]
            for kind, want in (("a", (r, lay.n_in)), ("b", (lay.n_out, r)),
                               ("m", (lay.n_out,))):
                if kind not in parts:
                    continue
                got = parts[kind].shape
                if got != want:
                    field = {"a": _A, "b": _B, "m": _M}[kind][1:]
                    raise ValueError(f"PEFT adapter module '{name}': {field} has shape {got}, "
                                     f"but the kernel '{p}' of shape {shape} (in {lay.n_in}, "
                                     f"out {lay.n_out}) needs {want}")
            a[idx] = parts["a"].T
            b[idx] = parts["b"].T
            if dora:
                m[idx] = parts["m"]
        targets[p] = method
        values[p] = {"a": a.reshape(lay.batch_shape + lay.in_shape + (r,)),
                     "b": b.reshape(lay.batch_shape + (r,) + lay.out_shape)}
        if dora:
            values[p]["m"] = m.reshape(lay.batch_shape + lay.out_shape)

    def build(path: str, w: Any, target: tuple[LoRA, dict[str, np.ndarray]]) -> Any:
        method, vals = target
        lay = method.layout(w.shape)
        dtype = method.adapter_dtype(w.dtype)

        def put(x: np.ndarray, dims: tuple[int | None, ...]) -> jax.Array:
            x = jnp.asarray(x, dtype)  # a quantized base (QLoRA): default placement
            return place_like(x, w, dims) if isinstance(w, jax.Array) else x

        a = put(vals["a"], lay.batch_axes + lay.in_axes + (None,))
        b = put(vals["b"], lay.batch_axes + (None,) + lay.out_axes)
        if "m" in vals:
            m = put(vals["m"], lay.batch_axes + lay.out_axes)
            return DoRAWeight(w=w, a=a, b=b, m=m, method=method, layout=lay)
        return LoRAWeight(w=w, a=a, b=b, method=method, layout=lay)

    rules = {re.escape(p): (targets[p], values[p]) for p in targets}
    return rewrite(base_params, rules, build, is_leaf=_is_node, floating=True)


def _is_node(x: Any) -> bool:
    """Adapter nodes and quantized weights: the leaves a walk over base params stops at."""
    return is_adapter(x) or is_quantized(x)


def _template_rules(rules: Any) -> list[tuple[re.Pattern, LoRA]]:
    if rules is None:
        return []
    if not isinstance(rules, Mapping):
        raise TypeError(f"rules must be a mapping {{regex: LoRA(...)}}, got "
                        f"{type(rules).__name__}")
    out = []
    for pattern, method in rules.items():
        if not isinstance(method, LoRA):
            raise TypeError(f"rule {pattern!r}: the layout template must be a LoRA or DoRA "
                            f"config, got {type(method).__name__}")
        out.append((re.compile(pattern), method))
    return out


def _method(path: str, shape: tuple[int, ...], n_stacked: int, rules, *, dora: bool,
            rank: int, alpha: float, rslora: bool) -> LoRA:
    template = next((m for rx, m in rules if rx.fullmatch(path)), None)
    layout = {"batch_axes": tuple(range(n_stacked))}
    extra = {}
    if template is not None:
        layout = {f: getattr(template, f) for f in ("in_axes", "out_axes", "batch_axes")}
        if not layout["batch_axes"] and n_stacked:
            layout["batch_axes"] = tuple(range(n_stacked))
        extra = {"dtype": template.dtype, "init": template.init}
        if isinstance(template, DoRA) and dora:
            extra["detach_norm"] = template.detach_norm
    cls = DoRA if dora else LoRA
    return cls(rank=rank, alpha=alpha, rslora=rslora, **layout, **extra)


def load_peft_adapter(path: str | os.PathLike, base_params: Any, *, module_names: Any,
                      rules: Any = None) -> Any:
    """Load a Hugging Face PEFT LoRA / DoRA adapter folder into ``base_params``.

    Reads ``path/adapter_config.json`` and ``path/adapter_model.safetensors`` (as written by
    ``peft.PeftModel.save_pretrained`` or :func:`save_peft_adapter`) and calls
    :func:`from_peft_state_dict`.

    Args:
      path: the adapter folder.
      base_params: the param tree to adapt.
      module_names: a callable ``path -> name`` or rules ``{regex: template}`` (see the module
        docstring; :func:`llama_module_names` for effjax's Llama / SmolLM2).
      rules: optional layout / dtype templates, as in :func:`from_peft_state_dict`.

    Returns:
      The adapted tree.

    Raises:
      FileNotFoundError: a file is missing (an adapter saved as ``adapter_model.bin`` must be
        converted to safetensors first).
      ValueError, TypeError: as :func:`from_peft_state_dict`.

    Example:
      >>> import jax, jax.numpy as jnp, tempfile, os
      >>> from effjax.peft import DoRA, inject
      >>> params = {'fc': {'kernel': jnp.ones((6, 4))}}
      >>> tree = inject(params, {'fc/kernel': DoRA(rank=2)}, key=jax.random.key(0))
      >>> d = tempfile.mkdtemp()
      >>> save_peft_adapter(d, tree, module_names={'fc/kernel': 'fc'})
      >>> back = load_peft_adapter(d, params, module_names={'fc/kernel': 'fc'})
      >>> type(back['fc']['kernel']).__name__, back['fc']['kernel'].m.shape
      ('DoRAWeight', (4,))
    """
    st = import_optional("safetensors.numpy", extra="models",
                         feature="effjax.peft.load_peft_adapter", distribution="safetensors")
    path = os.fspath(path)
    files = [os.path.join(path, n) for n in (CONFIG_NAME, WEIGHTS_NAME)]
    for f in files:
        if not os.path.exists(f):
            raise FileNotFoundError(f"load_peft_adapter: {f} does not exist (a PEFT adapter "
                                    f"folder holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    with open(files[0]) as f:
        config = json.load(f)
    tensors = st.load_file(files[1])
    return from_peft_state_dict(tensors, config, base_params, module_names=module_names,
                                rules=rules)

