"""effjax.optim: optax gradient transformations: low-bit states, spike-robust and low-rank
optimizers, gradient projections and scaling rules."""

from effjax.optim._fira import FiraState, fira, fira_adamw
from effjax.optim._galore import GaLoreState, galore, galore_adamw
from effjax.optim._perp_grad import perp_grad, project_out_param_direction
from effjax.optim._quantize_state import DEFAULT_UNSIGNED_FIELDS, quantize_state
from effjax.optim._relayout import abstract_state, relayout
from effjax.optim._spam import scale_by_spam, spam
from effjax.optim._stable_spam import (
    STABLE_SPAM_4BIT,
    STABLE_SPAM_BF16,
    adaptive_grad_norm,
    adaptive_spike_clip,
    cosine_momentum_scale,
    momentum_reset,
    scale_by_stable_spam,
    stable_spam,
)
from effjax.optim.allora import allora_coefficient, allora_lora_delta, scale_by_inverse_param_norm
from effjax.optim.batch_size import (
    adam_hyperparams_for_batch_size,
    lr_for_batch_size,
    scale_learning_rate,
)
from effjax.optim.lowbit import (
    adagrad_8bit,
    adam_4bit,
    adam_8bit,
    adamw_4bit,
    adamw_8bit,
    ademamix_8bit,
    fused_apply,
    lion_8bit,
    rmsprop_8bit,
    scale_by_adam_8bit,
    sgd_8bit,
)
from effjax.optim.memory import state_bytes, state_bytes_breakdown

__all__ = [
    "quantize_state", "DEFAULT_UNSIGNED_FIELDS", "state_bytes", "state_bytes_breakdown",
    "scale_by_adam_8bit", "adam_8bit", "adamw_8bit", "lion_8bit", "sgd_8bit", "rmsprop_8bit",
    "adagrad_8bit", "ademamix_8bit", "adam_4bit", "adamw_4bit", "fused_apply",
    "perp_grad", "project_out_param_direction", "scale_by_inverse_param_norm",
    "allora_coefficient", "allora_lora_delta", "scale_learning_rate", "lr_for_batch_size",
    "adam_hyperparams_for_batch_size",
    "spam", "scale_by_spam", "stable_spam", "scale_by_stable_spam", "adaptive_spike_clip",
    "adaptive_grad_norm", "momentum_reset", "cosine_momentum_scale", "STABLE_SPAM_4BIT",
    "STABLE_SPAM_BF16", "galore", "galore_adamw", "GaLoreState", "fira", "fira_adamw",
    "FiraState", "abstract_state", "relayout",
]
