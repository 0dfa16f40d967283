"""The fuzz case type and the words a clear error must contain (``experiments.fuzz_api``)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

LR = 1e-3


@dataclasses.dataclass(frozen=True)
class Case:
    """One fuzz case.

    Attributes:
      name: unique, ``area/what-was-done``.
      area: ``optim``, ``quant``, ``peft`` or ``compress``.
      call: runs the API on the bad input; its return value goes to ``check``.
      where: a clear error message contains one of these (the leaf path or argument name).
      what: ... and one of these (the bad value, shape or dtype); empty: ``where`` suffices.
      check: for inputs the API must accept: ``check(result)`` returns what is wrong with the
        result (``None`` when it is right). ``None``: the call must raise.
      doc: the right outcome, in words.
    """

    name: str
    area: str
    call: Callable[[], Any]
    where: tuple[str, ...] = ()
    what: tuple[str, ...] = ()
    check: Callable[[Any], str | None] | None = None
    doc: str = ""


# ------------------------------------------------------------------ needles


def leaf(*keys: str) -> tuple[str, ...]:
    """The ways a message may name a dict leaf: ``['a']['b']`` (optax/jax) or ``a/b``."""
    out = ["".join(f"['{k}']" for k in keys), "/".join(keys)]
    if len(keys) == 1:
        out.append(f"'{keys[0]}'")
    return tuple(out)


def val(v: Any) -> tuple[str, ...]:
    """The ways a message may show the bad value ``v``."""
    out = {repr(v), str(v)}
    if isinstance(v, float) and math.isfinite(v):
        out |= {f"{v:g}", f"{v:e}"}
    if isinstance(v, tuple):
        out.add("[" + ",".join(str(x) for x in v) + "]")
        out.add("(" + ",".join(str(x) for x in v) + ")")
    return tuple(out)
