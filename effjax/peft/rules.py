"""Ordered regex rules ``{regex: method}`` that pick the leaves :func:`effjax.peft.inject` adapts.

The rules are :mod:`effjax.selection`'s (the one selection layer of effjax): a leaf's path is
its ``'/'``-joined key path (:func:`effjax.selection.path_str`; NNX's trailing ``.value`` is
dropped, so a Linen ``params`` dict and an ``nnx.State`` of the same model give the same paths,
e.g. ``'blocks/0/query/kernel'``). For each leaf the **first** rule whose regex **fullmatches**
its path decides: a method targets the leaf, ``None`` excludes it. A rule that decides no leaf
(it matches none, or only leaves an earlier rule claimed) is an error: the message names the
rule and lists the closest paths. Here the values must be adapter methods.

Example:
  >>> from effjax.peft import LoRA
  >>> paths = ['dense/kernel', 'dense/bias', 'head/kernel']
  >>> rules = compile_rules({r'head/.*': None, r'.*/kernel': LoRA(rank=2)})
  >>> assign_rules(paths, rules)  # index of the deciding rule; 'head/kernel' is excluded
  [1, None, 0]
  >>> assign_rules(paths, compile_rules({r'.*/kernal': LoRA(rank=2)}))
  ... # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  ValueError: rule '.*/kernal' matches no leaf path ...; closest paths: 'dense/kernel', ...
"""

from __future__ import annotations

from typing import Any

from effjax.peft.base import AdapterMethod
from effjax.selection import Rule, assign_rules
from effjax.selection import compile_rules as _compile

__all__ = ["Rule", "compile_rules", "assign_rules"]


def compile_rules(rules: Any) -> list[Rule]:
    """Check and compile an ordered mapping (or sequence of pairs) ``{regex: method | None}``
    whose values are adapter methods (:func:`effjax.selection.compile_rules`)."""
    return _compile(rules, accept=AdapterMethod, what="an adapter method (e.g. LoRA)")
