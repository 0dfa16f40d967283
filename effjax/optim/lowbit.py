"""Low-bit versions of the common optax optimizers.

Each alias is ``quantize_state(optax.<name>(...))``: the optax optimizer with the same argument
names, defaults and update rule, whose moments are stored block-wise in 8 bits (bitsandbytes'
format: block 256, signed dynamic map for first moments, unsigned dynamic map for second
moments) or 4 bits (torchao's format: block 128, 4-bit dynamic map for the first moment, linear
map without zero for the second). Tensors with fewer than ``min_quantized_size`` (default
``None``: 4096) elements keep float32 state, as in both anchors. ``block_size`` and
``min_quantized_size`` are static: with ``optax.inject_hyperparams`` leave them at ``None`` or
list them in ``static_args``. See :func:`effjax.optim.quantize_state` for the
non-finite-gradient rule. ``scale_dtype`` (default ``None``: float32, the anchors' format)
may be ``jnp.bfloat16``: block scales rounded up to bfloat16, half their memory (two 8-bit
moments: 2.016 instead of 2.031 bytes per parameter; 4-bit: 1.031 instead of 1.063), see
:mod:`effjax.quant.blockwise`.

Fused steps (``use_kernel``): ``adam_8bit``, ``adamw_8bit``, ``scale_by_adam_8bit``,
``lion_8bit``, ``sgd_8bit``, ``adam_4bit`` and ``adamw_4bit`` can run each quantized leaf's step
fused (dequantize, update, requantize in one pass over each block):

* ``use_kernel=None`` (auto), in a process with one device: the Pallas kernel
  (:mod:`pallas_kernels.optim_update`) on backends where it has been validated on real
  hardware (``pallas_kernels.optim_update.VALIDATED_BACKENDS``: NVIDIA GPUs, checked on an
  H100 with Triton; use :func:`fused_apply` there, so that the kernel also writes the
  parameters: 0.75x ``optax.adamw``'s step time, vs 1.16x for ``update`` + ``apply_updates``,
  ``experiments/README.md``); on a CPU, the native C++ step
  (:mod:`pallas_kernels.native_cpu`, compiled on first use; ``EFFJAX_NATIVE=0`` switches it
  off) for float32 leaves whose blocks are whole rows, and for other leaves (or without a C++
  compiler) the chunked jnp step (``fused_update_chunked``) on 8-bit leaves of at least 4M
  elements and the unfused step on the rest; elsewhere, and with several devices, the
  unfused jnp step (XLA cannot partition a kernel call over
  sharded leaves, it would gather them; ``use_kernel=True`` forces the kernel, e.g. inside
  ``shard_map``, untested).
* ``use_kernel=True``: the Pallas kernel (interpret mode on CPU: slow, for testing).
* ``use_kernel=False``: the unfused jnp step (``quantize_state`` around the optax optimizer).

All paths have the same state pytree (a checkpoint from one continues on another). The chunked
step runs the unfused step's expressions; its states and updates equal the unfused step's bit for
bit in the tests (an FMA contracted differently could still move a code by one step).
The native CPU step rounds every product and sum as written (no FMA) and equals a numpy
float32 reference bit for bit; against the jnp path (where XLA contracts some multiply-adds)
its moments can sit an ulp apart, so a code can flip at a midpoint now and then (measured: 1
code in 8192 after 3 Adam steps; updates within 3e-7 of the largest). Between the jnp paths,
on CPU, ``lion_8bit`` and ``sgd_8bit`` give bit-identical results; the Adam family's updates
(and, through the kernel, its codes) can differ by an ulp or two of float32: XLA contracts
multiply-adds into FMAs depending on how it fuses the graph (see
:mod:`pallas_kernels.optim_update`). On a GPU the compiled kernel and XLA round differently
now and then (measured on an H100: up to 0.0015% of codes after one step, bf16 updates within
2 bf16 ulps). The other aliases have no fused step:
``use_kernel=True`` raises.

Semantics match the anchors: the update uses the new float32 moments before they are
re-quantized; decoupled weight decay is ``-lr * wd * p`` from the old parameter, which is
bitsandbytes' ``p *= 1 - lr * wd`` followed by the Adam step.

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> from effjax.optim import adamw_8bit
  >>> params = {"w": jnp.zeros((128, 128))}
  >>> opt = adamw_8bit(learning_rate=1e-3)
  >>> state = opt.init(params)
  >>> grads = {"w": jnp.ones((128, 128))}
  >>> updates, state = opt.update(grads, state, params)
  >>> params = optax.apply_updates(params, updates)
"""

from typing import Any

import jax.numpy as jnp
import optax
from optax import contrib

from effjax.optim._checks import check_hyperparams
from effjax.optim._fused import (
    adam_family,
    check_use_kernel,
    fused_apply,
    fused_transform,
    lion_family,
    sgd_family,
)
from effjax.optim._quantize_state import quantize_state

__all__ = [
    "scale_by_adam_8bit", "adam_8bit", "adamw_8bit", "lion_8bit", "sgd_8bit", "rmsprop_8bit",
    "adagrad_8bit", "ademamix_8bit", "adam_4bit", "adamw_4bit", "fused_apply",
]

_B8 = dict(bits=8, block_size=256)
_B4 = dict(bits=4, block_size=128)


def _q(inner, cfg, block_size, min_quantized_size, *, name, scale_dtype=None, use_kernel=None,
       spec=None):
    """``quantize_state(inner)`` in the format ``cfg``; with a :class:`FusedSpec` (``inner`` and
    ``spec`` built together by a family of :mod:`effjax.optim._fused`), the fused step."""
    # ``None`` defaults keep these static under ``optax.inject_hyperparams``, which turns
    # every numeric argument into an array hyper-parameter.
    tx = quantize_state(inner, bits=cfg["bits"],
                        block_size=cfg["block_size"] if block_size is None else block_size,
                        min_quantized_size=(4096 if min_quantized_size is None
                                            else min_quantized_size),
                        scale_dtype=jnp.float32 if scale_dtype is None else scale_dtype)
    check_use_kernel(use_kernel, name=name, has_kernel=spec is not None)
    if spec is None:
        return tx
    return fused_transform(tx, spec, name=name, use_kernel=use_kernel)


def scale_by_adam_8bit(b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, *, block_size=None,
                       min_quantized_size=None, scale_dtype=None,
                       use_kernel: bool | None = None) -> optax.GradientTransformationExtraArgs:
    """``optax.scale_by_adam`` with 8-bit moments (Dettmers et al. 2022, Algorithm 1).

    ``m_t = b1 m + (1-b1) g``, ``v_t = b2 v + (1-b2) g^2``,
    ``u_t = (m_t / (1-b1^t)) / (sqrt(v_t / (1-b2^t) + eps_root) + eps)``; ``m_t``, ``v_t`` stored
    as 8-bit codes with a float32 absmax per 256 elements.
    """
    check_hyperparams("scale_by_adam_8bit", b1=b1, b2=b2, eps=eps, eps_root=eps_root)
    inner, spec = adam_family(b1=b1, b2=b2, eps=eps, eps_root=eps_root)
    return _q(inner, _B8, block_size, min_quantized_size, name="scale_by_adam_8bit",
              scale_dtype=scale_dtype, use_kernel=use_kernel, spec=spec)


def adam_8bit(learning_rate: optax.ScalarOrSchedule, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0,
              *, nesterov=False, block_size=None, min_quantized_size=None, scale_dtype=None,
              use_kernel: bool | None = None):
    """``optax.adam`` with 8-bit states (bitsandbytes' ``Adam8bit``)."""
    check_hyperparams("adam_8bit", learning_rate=learning_rate, b1=b1, b2=b2, eps=eps,
                      eps_root=eps_root)
    inner, spec = adam_family(b1=b1, b2=b2, eps=eps, eps_root=eps_root, nesterov=nesterov,
                              learning_rate=learning_rate)
    return _q(inner, _B8, block_size, min_quantized_size, name="adam_8bit",
              scale_dtype=scale_dtype, use_kernel=use_kernel, spec=spec)


def adamw_8bit(learning_rate: optax.ScalarOrSchedule, b1=0.9, b2=0.999, eps=1e-8,
               eps_root=0.0, weight_decay=1e-4, mask: Any = None, *, nesterov=False,
               block_size=None, min_quantized_size=None, scale_dtype=None,
               use_kernel: bool | None = None):
    """``optax.adamw`` with 8-bit states (bitsandbytes' ``AdamW8bit``; note optax's default
    ``weight_decay=1e-4`` where bitsandbytes uses 1e-2)."""
    check_hyperparams("adamw_8bit", learning_rate=learning_rate, b1=b1, b2=b2, eps=eps,
                      eps_root=eps_root, weight_decay=weight_decay)
    inner, spec = adam_family(b1=b1, b2=b2, eps=eps, eps_root=eps_root, nesterov=nesterov,
                              learning_rate=learning_rate, weight_decay=weight_decay, mask=mask)
    return _q(inner, _B8, block_size, min_quantized_size, name="adamw_8bit",
              scale_dtype=scale_dtype, use_kernel=use_kernel, spec=spec)


def lion_8bit(learning_rate: optax.ScalarOrSchedule, b1=0.9, b2=0.99, weight_decay=1e-3,
              mask: Any = None, *, block_size=None, min_quantized_size=None, scale_dtype=None,
              use_kernel: bool | None = None):
    """``optax.lion`` (Chen et al. 2023) with an 8-bit momentum (bitsandbytes' ``Lion8bit``):
    ``u = sign(b1 m + (1-b1) g)``, ``m_t = b2 m + (1-b2) g``."""
    check_hyperparams("lion_8bit", learning_rate=learning_rate, b1=b1, b2=b2,
                      weight_decay=weight_decay)
    inner, spec = lion_family(learning_rate=learning_rate, b1=b1, b2=b2,
                              weight_decay=weight_decay, mask=mask)
    return _q(inner, _B8, block_size, min_quantized_size, name="lion_8bit",
              scale_dtype=scale_dtype, use_kernel=use_kernel, spec=spec)


def sgd_8bit(learning_rate: optax.ScalarOrSchedule, momentum=0.9, nesterov=False, *,
             block_size=None, min_quantized_size=None, scale_dtype=None,
             use_kernel: bool | None = None):
    """``optax.sgd`` with an 8-bit momentum buffer (bitsandbytes' ``SGD8bit``):
    ``m_t = momentum * m + g``, ``u = -lr m_t``. ``momentum`` must be positive (plain SGD has
    no state to quantize)."""
    check_hyperparams("sgd_8bit", learning_rate=learning_rate)
    if momentum is None or (isinstance(momentum, (int, float)) and momentum <= 0):
        raise ValueError(f"sgd_8bit needs momentum > 0, got {momentum!r}")
    inner, spec = sgd_family(learning_rate=learning_rate, momentum=momentum, nesterov=nesterov)
    return _q(inner, _B8, block_size, min_quantized_size, name="sgd_8bit",
              scale_dtype=scale_dtype, use_kernel=use_kernel, spec=spec)


def rmsprop_8bit(learning_rate: optax.ScalarOrSchedule, decay=0.9, eps=1e-8, initial_scale=0.0,
                 eps_in_sqrt=True, centered=False, momentum=None, nesterov=False, *,
                 block_size=None, min_quantized_size=None, scale_dtype=None,
                 use_kernel: bool | None = None):
    """``optax.rmsprop`` with 8-bit states (bitsandbytes' ``RMSprop8bit``):
    ``v_t = decay v + (1-decay) g^2``, ``u = g / sqrt(v_t + eps)`` (``eps_in_sqrt``)."""
    check_hyperparams("rmsprop_8bit", learning_rate=learning_rate, decay=decay, eps=eps,
                      initial_scale=initial_scale)
    return _q(optax.rmsprop(learning_rate, decay, eps, initial_scale, eps_in_sqrt, centered,
                            momentum, nesterov), _B8, block_size, min_quantized_size,
              name="rmsprop_8bit", scale_dtype=scale_dtype, use_kernel=use_kernel)


def adagrad_8bit(learning_rate: optax.ScalarOrSchedule, initial_accumulator_value=0.1,
                 eps=1e-7, *, block_size=None, min_quantized_size=None, scale_dtype=None,
                 use_kernel: bool | None = None):
    """``optax.adagrad`` with an 8-bit accumulator (bitsandbytes' ``Adagrad8bit``):
    ``s_t = s + g^2``, ``u = g / sqrt(s_t + eps)``."""
    check_hyperparams("adagrad_8bit", learning_rate=learning_rate, eps=eps,
                      initial_accumulator_value=initial_accumulator_value)
    return _q(optax.adagrad(learning_rate, initial_accumulator_value, eps), _B8, block_size,
              min_quantized_size, name="adagrad_8bit",
              scale_dtype=scale_dtype, use_kernel=use_kernel)


def ademamix_8bit(learning_rate: optax.ScalarOrSchedule, b1=0.9, b2=0.999, b3=0.9999,
                  alpha=5.0, eps=1e-8, eps_root=0.0, weight_decay=0.0, mask: Any = None, *,
                  block_size=None, min_quantized_size=None, scale_dtype=None,
                  use_kernel: bool | None = None):
    """``optax.contrib.ademamix`` (Pagliardini et al. 2024) with 8-bit ``m1``, ``m2``, ``nu``
    (bitsandbytes' ``AdEMAMix8bit``); ``b3`` and ``alpha`` may be schedules, as in optax."""
    check_hyperparams("ademamix_8bit", learning_rate=learning_rate, b1=b1, b2=b2, b3=b3,
                      alpha=alpha, eps=eps, eps_root=eps_root, weight_decay=weight_decay)
    return _q(contrib.ademamix(learning_rate, b1=b1, b2=b2, b3=b3, alpha=alpha, eps=eps,
                               eps_root=eps_root, weight_decay=weight_decay, mask=mask), _B8,
              block_size, min_quantized_size, name="ademamix_8bit",
              scale_dtype=scale_dtype, use_kernel=use_kernel)


def adam_4bit(learning_rate: optax.ScalarOrSchedule, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0,
              *, block_size=None, min_quantized_size=None, scale_dtype=None,
              use_kernel: bool | None = None):
    """``optax.adam`` with 4-bit states (Li et al. 2023; torchao's ``Adam4bit``)."""
    check_hyperparams("adam_4bit", learning_rate=learning_rate, b1=b1, b2=b2, eps=eps,
                      eps_root=eps_root)
    inner, spec = adam_family(b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                              learning_rate=learning_rate)
    return _q(inner, _B4, block_size, min_quantized_size, name="adam_4bit",
              scale_dtype=scale_dtype, use_kernel=use_kernel, spec=spec)


def adamw_4bit(learning_rate: optax.ScalarOrSchedule, b1=0.9, b2=0.999, eps=1e-8,
               eps_root=0.0, weight_decay=1e-4, mask: Any = None, *, block_size=None,
               min_quantized_size=None, scale_dtype=None, use_kernel: bool | None = None):
    """``optax.adamw`` with 4-bit states (torchao's ``AdamW4bit``)."""
    check_hyperparams("adamw_4bit", learning_rate=learning_rate, b1=b1, b2=b2, eps=eps,
                      eps_root=eps_root, weight_decay=weight_decay)
    inner, spec = adam_family(b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                              learning_rate=learning_rate, weight_decay=weight_decay, mask=mask)
    return _q(inner, _B4, block_size, min_quantized_size, name="adamw_4bit",
              scale_dtype=scale_dtype, use_kernel=use_kernel, spec=spec)
