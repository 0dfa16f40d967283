"""effjax.optim: optax gradient transformations with low-bit states."""

from effjax.optim.lowbit import (
    adagrad_8bit,
    adam_4bit,
    adam_8bit,
    adamw_4bit,
    adamw_8bit,
    ademamix_8bit,
    lion_8bit,
    rmsprop_8bit,
    scale_by_adam_8bit,
    sgd_8bit,
)
from effjax.optim.memory import state_bytes
from effjax.optim.quantize_state import DEFAULT_UNSIGNED_FIELDS, quantize_state

__all__ = [
    "quantize_state", "DEFAULT_UNSIGNED_FIELDS", "state_bytes",
    "scale_by_adam_8bit", "adam_8bit", "adamw_8bit", "lion_8bit", "sgd_8bit", "rmsprop_8bit",
    "adagrad_8bit", "ademamix_8bit", "adam_4bit", "adamw_4bit",
]
