"""Argument checks shared by the adapter methods' configs (one copy each).

Each field check returns the normalized value (``int``, ``float``, ``bool``) and raises
``TypeError`` for a value of the wrong kind or ``ValueError`` for one out of range, with a
message that names the method and the field. The kernel checks (:func:`check_kernel`,
:func:`check_size_limits`) run once per leaf before every ``adapt``
(:class:`effjax.peft.KernelAdapter`); ``inject`` puts the leaf's path, shape and dtype in
front of their messages.

**Size bounds.** A size field (a rank, a number of bases) too large for the kernel is refused
before anything is allocated, so a typo such as ``rank=10**9`` is a clear error, not an
out-of-memory crash. Each method declares its bounds (``KernelAdapter.size_limits``), of two
kinds:

* ``rank <= max(n_in, n_out)`` for trainable low-rank factors (LoRA, DoRA, NOLA, MoS): the
  update :math:`AB` has rank at most :math:`\\min(n_{in}, n_{out})`; PEFT accepts a larger
  ``r`` (it only adds redundant parameters), effjax accepts up to :math:`\\max(n_{in},
  n_{out})`, where the factors already hold at least twice the kernel's elements.
* :func:`element_budget` for frozen random features whose count may usefully exceed the
  kernel's sides (VeRA's and RandLoRA's rank, NOLA's numbers of bases; VeRA's paper uses
  ``r = 1024`` on 768-wide layers): the arrays the field scales may hold at most
  :math:`\\max(64\\,n_{in} n_{out}, 2^{24})` elements.

Methods whose rank indexes singular vectors (PiSSA/OLoRA inits, LoRA-XS, LoRA-SB, LaMDA,
SVFit, LoLDU, CorDA, WeLore; EVA: ``n_in``; MiSS: ``n_in``) check ``rank <= min(n_in,
n_out)`` in their own ``adapt``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_int", "check_rank", "check_seed", "check_number", "check_alpha", "check_bool",
           "adapter_dtype", "as_float_kernel", "SizeLimit", "element_budget", "check_kernel",
           "check_size_limits", "budget_text", "factor_rank_limit", "budget_limit", "short_repr",
           "instance_hint"]


def check_int(v: Any, name: str, lo: int, method: str) -> int:
    """``v`` as an int ``>= lo``; ``TypeError``/``ValueError`` naming ``method`` and ``name``."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{method} {name} must be an int, got {v!r}")
    if v < lo:
        raise ValueError(f"{method} {name} must be >= {lo}, got {v}")
    return int(v)


def check_rank(rank: Any, name: str) -> int:
    """A rank: an int >= 1 (``name`` is the method's name, for the message)."""
    return check_int(rank, "rank", 1, name)


def check_seed(seed: Any, method: str) -> int:
    """A PRNG seed: an int in ``[0, 2**32)``."""
    seed = check_int(seed, "seed", 0, method)
    if seed >= 2**32:
        raise ValueError(f"{method} seed must be < 2**32, got {seed}")
    return seed


def check_number(v: Any, name: str, method: str, *, positive: bool = False,
                 nonnegative: bool = False) -> float:
    """``v`` as a finite float (bools are not numbers here), ``> 0`` if ``positive``, ``>= 0``
    if ``nonnegative``."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.number)):
        raise TypeError(f"{method} {name} must be a number, got {v!r}")
    bound = " and > 0" if positive else " and >= 0" if nonnegative else ""
    if not math.isfinite(v) or (positive and not v > 0) or (nonnegative and not v >= 0):
        raise ValueError(f"{method} {name} must be finite{bound}, got {v}")
    return float(v)


def check_alpha(alpha: Any, name: str) -> float | None:
    """None or a finite nonzero number."""
    if alpha is None:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.number)):
        raise TypeError(f"{name} alpha must be None or a number, got {alpha!r}")
    if not math.isfinite(alpha) or alpha == 0:
        raise ValueError(f"{name} alpha must be finite and nonzero, got {alpha}")
    return float(alpha)


def check_bool(v: Any, name: str, method: str) -> bool:
    """``v``, which must be a bool."""
    if not isinstance(v, bool):
        raise TypeError(f"{method} {name} must be a bool, got {v!r}")
    return v


def adapter_dtype(dtype: Any, w_dtype: Any) -> jnp.dtype:
    """The config's dtype, or the kernel's dtype widened to float32 for 16-bit kernels."""
    if dtype is not None:
        return jnp.dtype(dtype)
    w_dtype = jnp.dtype(w_dtype)
    return jnp.dtype(jnp.float32) if w_dtype.itemsize < 4 else w_dtype


def as_float_kernel(w: Any, name: str) -> jax.Array:
    """``w`` as a jax array; ``TypeError`` unless it is floating."""
    w = jnp.asarray(w) if not isinstance(w, jax.Array) else w
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"{name} needs a floating kernel, got dtype {w.dtype}")
    return w


class SizeLimit(NamedTuple):
    """An upper bound of a method's size field for one kernel (``KernelAdapter.size_limits``).

    Attributes:
      field: the config field (``'rank'``, ``'num_basis_a'``, ...).
      limit: its largest accepted value for this kernel.
      reason: why, in words, for the error message (e.g. which bound and which arrays grow).
    """

    field: str
    limit: int
    reason: str


#: The factor and floor of :func:`element_budget`.
BUDGET_FACTOR, BUDGET_FLOOR = 64, 2**24


def element_budget(n_in: int, n_out: int) -> int:
    """Most elements the frozen random arrays of one adapted kernel may hold:
    :math:`\\max(64\\,n_{in} n_{out}, 2^{24})` (64 times the kernel's matrix, and at least
    16M elements, 64 MiB in float32, so defaults stay valid on small kernels)."""
    return max(BUDGET_FACTOR * int(n_in) * int(n_out), BUDGET_FLOOR)


def budget_text(n_in: int, n_out: int) -> str:
    """How :func:`element_budget` is computed, for error messages."""
    return (f"max({BUDGET_FACTOR} n_in n_out, 2**24) = {element_budget(n_in, n_out):,d} "
            f"elements")


def factor_rank_limit(lay: Any, field: str = "rank") -> SizeLimit:
    """``field <= max(n_in, n_out)``: the bound of a trainable low-rank factor's rank."""
    lo, hi = min(lay.n_in, lay.n_out), max(lay.n_in, lay.n_out)
    return SizeLimit(field, hi, f"the update A B has rank at most min(n_in, n_out) = {lo}, and "
                                f"a {field} above max(n_in, n_out) = {hi} only adds redundant "
                                f"parameters (PEFT accepts r > min(n_in, n_out); effjax up to "
                                f"max(n_in, n_out))")


def budget_limit(lay: Any, field: str, per_unit: int, arrays: str) -> SizeLimit:
    """``field * per_unit <= element_budget``: the bound of a count of frozen random features
    whose ``arrays`` hold ``per_unit`` elements per unit of ``field``."""
    return SizeLimit(field, element_budget(lay.n_in, lay.n_out) // max(int(per_unit), 1),
                     f"{arrays} would hold {field} x {per_unit:,d} elements, and effjax bounds "
                     f"the frozen arrays of one kernel at {budget_text(lay.n_in, lay.n_out)}")


def _kernel_text(lay: Any) -> str:
    batch = f", {lay.n_batch} slices over batch_axes={lay.batch_axes}" if lay.batch_axes else ""
    return f"a kernel of shape {lay.shape} (n_in={lay.n_in}, n_out={lay.n_out}{batch})"


def check_kernel(lay: Any, method: str) -> None:
    """``ValueError`` for a zero-size kernel (no weight to adapt)."""
    if math.prod(lay.shape) == 0:
        raise ValueError(f"{method} cannot adapt {_kernel_text(lay)}: it is zero-size, so there "
                         f"is no weight to adapt; exclude the leaf with a None rule placed "
                         f"before this one (the first matching rule decides)")


def check_size_limits(config: Any, lay: Any, limits: Sequence[SizeLimit]) -> None:
    """``ValueError`` naming the field, its value, the kernel and the bound for the first
    field of ``config`` above its :class:`SizeLimit`."""
    for field, limit, reason in limits:
        value = getattr(config, field)
        if value > limit:
            raise ValueError(f"{config.name} {field}={value} is too large for "
                             f"{_kernel_text(lay)}: {reason}; pass {field} <= {limit}")


def instance_hint(cls: type) -> str:
    """``'pass an instance, e.g. LoRA(rank=8)'`` for a config class passed where a config is
    expected (``Name()`` for a class without a ``rank`` field)."""
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else ()
    example = f"{cls.__name__}(rank=8)" if "rank" in names else f"{cls.__name__}()"
    return f"pass an instance, e.g. {example}"


def short_repr(v: Any, n: int = 80) -> str:
    """``repr(v)``, cut to ``n`` characters (for values shown in error messages)."""
    r = repr(v)
    return r if len(r) <= n else r[:n - 3] + "..."
