"""One row of the effjax.peft conformance table, and the collection of all rows.

Each method adds a module ``tests/peft/cases_<method>.py`` defining ``CASES = {name: Case(...)}``;
``tests/peft/test_conformance.py`` runs every check on every row. A row's ``reference`` is the
paper's equation written plainly (einsum / matmul on the node's fields), never the method's own
``materialize``.
"""

from __future__ import annotations

import dataclasses
import importlib
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Case:
    """A method config on one kernel shape, with what the checks expect of it.

    Attributes:
      method: the method config (rule value) injected at ``layer/kernel``.
      shape: the kernel's shape.
      trainable: the trainable-parameter count, written out by hand from the paper's formula.
      reference: ``node -> dense kernel``: the method's equation written plainly on the node's
        fields, computed in float32 (cast each field with ``.astype(jnp.float32)``); it must be
        differentiable in the trainable fields (the gradient check differentiates it).
      identity: what ``materialize`` right after ``inject`` promises: ``"exact"`` (equals the
        base bit for bit), ``"close"`` (reconstructs it to ``identity_tol`` relative to the
        kernel's max abs: SVD / LU / QR-based inits that split W) or ``"none"`` (the method
        changes W at init by design; say why in ``why``).
      identity_tol: tolerance for ``"close"`` (float32).
      calibration: ``params -> {path: data}`` for data-driven methods (passed to ``inject``).
      bf16_rtol: relative tolerance of the bfloat16 check (default: one bf16 ulp).
      sharded: whether the 8-device sharding check applies (False only with a reason in ``why``).
      why: a note explaining any non-default choice above.
    """

    method: Any
    shape: tuple[int, ...]
    trainable: int
    reference: Callable[[Any], Any]
    identity: str = "exact"
    identity_tol: float = 1e-5
    calibration: Callable[[Any], dict] | None = None
    bf16_rtol: float = 2.0**-7
    sharded: bool = True
    why: str = ""

    def __post_init__(self):
        if self.identity not in ("exact", "close", "none"):
            raise ValueError(f"identity must be exact/close/none, got {self.identity!r}")


def f32(x):
    """``x`` as float32 (shorthand for references)."""
    return jnp.asarray(x).astype(jnp.float32)


def params_for(shape, dtype=jnp.float32, seed=0):
    """The test's param tree: the targeted ``layer/kernel``, a bias, and an untargeted kernel."""
    rng = np.random.default_rng(seed)
    return {"layer": {"kernel": jnp.asarray(rng.standard_normal(shape), dtype),
                      "bias": jnp.asarray(rng.standard_normal(shape[-1]), dtype)},
            "other": {"kernel": jnp.asarray(rng.standard_normal((3, 2)), dtype)}}


def perturb(tree, seed=2):
    """Give every trainable leaf random values (zero-initialized factors would hide errors)."""
    from effjax.peft import combine, split

    trainable, frozen = split(tree)
    rng = np.random.default_rng(seed)
    noisy = jax.tree.map(  # keeps each leaf's sharding
        lambda x: jax.device_put(np.asarray(np.asarray(x, np.float32)
                                            + rng.standard_normal(x.shape), x.dtype),
                                 x.sharding),
        trainable)
    return combine(noisy, frozen)


def paths(tree):
    """The '/'-joined paths of every array leaf of ``tree``."""
    from effjax.selection import path_str

    return {path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def collect_cases() -> dict[str, Case]:
    """Every ``CASES`` of ``tests/peft/cases_*.py``, names prefixed by nothing (must be unique)."""
    out: dict[str, Case] = {}
    for f in sorted(pathlib.Path(__file__).parent.glob("cases_*.py")):
        mod = importlib.import_module(f"tests.peft.{f.stem}")
        for name, case in mod.CASES.items():
            if name in out:
                raise ValueError(f"conformance case {name!r} is defined twice ({f.name})")
            out[name] = case
    return out
