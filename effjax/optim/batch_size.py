"""Learning rate (and Adam hyper-parameters) for a new batch size.

When the batch size grows from ``B0`` to ``B = kappa * B0``:

* SGD (with or without momentum): the linear scaling rule, ``lr = kappa * lr0`` (Goyal et al.,
  "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", arXiv:1706.02677, 2017,
  Sec. 2.1; Krizhevsky, arXiv:1404.5997, 2014).
* Adam and RMSprop: the square-root scaling rule of Malladi, Lyu, Panigrahi & Arora, "On the
  SDEs and Scaling Rules for Adaptive Gradient Algorithms", NeurIPS 2022, arXiv:2205.10287:
  ``lr = sqrt(kappa) * lr0``, ``1 - b = kappa * (1 - b0)`` for each moment's decay and
  ``eps = eps0 / sqrt(kappa)``. :func:`adam_hyperparams_for_batch_size` applies the whole rule;
  :func:`scale_learning_rate` with ``rule="sqrt"`` only its learning-rate part.

Both rules come from matching the SDE (noise scale) of the small-batch run and hold while the
batch stays below the critical batch size; Goyal et al. pair the linear rule with a warm-up.
Every function accepts a schedule (a callable of the step, as optax's) in place of a number and
then returns a schedule.
"""

import math

import numpy as np
import optax

__all__ = ["scale_learning_rate", "lr_for_batch_size", "adam_hyperparams_for_batch_size",
           "SQRT_RULE_OPTIMIZERS", "LINEAR_RULE_OPTIMIZERS"]

SQRT_RULE_OPTIMIZERS = ("adam", "adamw", "rmsprop")
LINEAR_RULE_OPTIMIZERS = ("sgd",)
_RULES = ("sqrt", "linear")


def _check_size(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise TypeError(f"{name} must be a number or a schedule (a callable of the step), "
                        f"got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return float(value)


def _kappa(base_batch_size, batch_size) -> float:
    return (_check_size("batch_size", batch_size)
            / _check_size("base_batch_size", base_batch_size))


def _times(value, factor: float, name: str):
    """``value * factor`` for a number, or the schedule ``step -> value(step) * factor``."""
    if callable(value):
        def scaled(count):
            return value(count) * factor
        return scaled
    return _check_positive(name, value) * factor


def scale_learning_rate(learning_rate: optax.ScalarOrSchedule, base_batch_size: int,
                        batch_size: int, *, rule: str = "sqrt") -> optax.ScalarOrSchedule:
    """The learning rate for ``batch_size``, given one tuned at ``base_batch_size``.

        kappa = batch_size / base_batch_size
        rule="linear":  lr = kappa * lr0          (Goyal et al. 2017; for SGD)
        rule="sqrt":    lr = sqrt(kappa) * lr0    (Malladi et al. 2022; for Adam, RMSprop)

    Args:
      learning_rate: the tuned learning rate ``lr0`` (> 0) or a schedule ``step -> lr0(step)``.
      base_batch_size: the batch size ``lr0`` was tuned at (positive int).
      batch_size: the new batch size (positive int).
      rule: ``"sqrt"`` or ``"linear"``.

    Returns:
      A float, or a schedule when ``learning_rate`` is one.

    Example:
      >>> import optax
      >>> from effjax.optim.batch_size import scale_learning_rate
      >>> scale_learning_rate(1e-3, 256, 1024)  # sqrt(4) = 2
      0.002
      >>> scale_learning_rate(0.1, 256, 1024, rule="linear")
      0.4
      >>> sched = scale_learning_rate(optax.linear_schedule(1.0, 0.0, 10), 64, 16)
      >>> float(sched(0)), float(sched(5))
      (0.5, 0.25)
    """
    if rule not in _RULES:
        raise ValueError(f"rule must be one of {_RULES}, got {rule!r}")
    kappa = _kappa(base_batch_size, batch_size)
    return _times(learning_rate, math.sqrt(kappa) if rule == "sqrt" else kappa,
                  "learning_rate")


def lr_for_batch_size(learning_rate: optax.ScalarOrSchedule, base_batch_size: int,
                      batch_size: int, *, optimizer: str) -> optax.ScalarOrSchedule:
    """:func:`scale_learning_rate` with the rule of ``optimizer``'s family.

    ``"adam"``, ``"adamw"``, ``"rmsprop"``: square-root rule (Malladi et al. 2022);
    ``"sgd"`` (with or without momentum): linear rule (Goyal et al. 2017). For Adam, see
    :func:`adam_hyperparams_for_batch_size` for the full rule (betas and eps too).

    Example:
      >>> from effjax.optim.batch_size import lr_for_batch_size
      >>> lr_for_batch_size(3e-4, 32, 128, optimizer="adamw"), lr_for_batch_size(
      ...     0.1, 32, 128, optimizer="sgd")
      (0.0006, 0.4)
    """
    name = optimizer.lower() if isinstance(optimizer, str) else optimizer
    if name in SQRT_RULE_OPTIMIZERS:
        rule = "sqrt"
    elif name in LINEAR_RULE_OPTIMIZERS:
        rule = "linear"
    else:
        raise ValueError(
            f"no batch-size rule is known for optimizer {optimizer!r}; use one of "
            f"{SQRT_RULE_OPTIMIZERS + LINEAR_RULE_OPTIMIZERS} or call scale_learning_rate "
            "with an explicit rule")
    return scale_learning_rate(learning_rate, base_batch_size, batch_size, rule=rule)


def adam_hyperparams_for_batch_size(base_batch_size: int, batch_size: int, *,
                                    learning_rate: optax.ScalarOrSchedule, b1: float = 0.9,
                                    b2: float = 0.999, eps: float = 1e-8) -> dict:
    """Malladi et al.'s (2022) square-root scaling rule for Adam, all hyper-parameters.

        kappa = batch_size / base_batch_size
        lr = sqrt(kappa) lr0,   1 - b1 = kappa (1 - b1_0),   1 - b2 = kappa (1 - b2_0),
        eps = eps0 / sqrt(kappa)

    ``b1 = 0`` (no momentum: RMSprop, for which the rule scales only ``b2``) stays 0. Returns
    keyword arguments for ``optax.adam`` / ``optax.adamw`` (``learning_rate``, ``b1``,
    ``b2``, ``eps``). Raises ``ValueError`` when ``kappa (1 - b)`` exceeds 1 (no valid decay:
    the batch grew too much for the rule).

    Example:
      >>> import optax
      >>> from effjax.optim.batch_size import adam_hyperparams_for_batch_size
      >>> hp = adam_hyperparams_for_batch_size(256, 1024, learning_rate=1e-3)
      >>> {k: round(v, 12) for k, v in hp.items()}
      {'learning_rate': 0.002, 'b1': 0.6, 'b2': 0.996, 'eps': 5e-09}
      >>> opt = optax.adamw(**hp)
    """
    kappa = _kappa(base_batch_size, batch_size)
    out = {"learning_rate": _times(learning_rate, math.sqrt(kappa), "learning_rate")}
    for name, beta in (("b1", b1), ("b2", b2)):
        if isinstance(beta, bool) or not isinstance(beta, (int, float, np.number)) or not (
                0 <= beta < 1):
            raise ValueError(f"{name} must be a number in [0, 1), got {beta!r}")
        if name == "b1" and beta == 0:
            out[name] = 0.0
            continue
        one_minus = kappa * (1.0 - float(beta))
        if one_minus > 1.0:
            raise ValueError(
                f"the square-root rule gives 1 - {name} = kappa (1 - {name}) = {kappa:g} * "
                f"{1.0 - float(beta):g} = {one_minus:g} > 1 (no valid decay); the batch grew "
                f"too much for {name}={beta!r}")
        out[name] = 1.0 - one_minus
    out["eps"] = _check_positive("eps", eps) / math.sqrt(kappa)
    return out
