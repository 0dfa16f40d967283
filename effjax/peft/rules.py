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

from collections.abc import Mapping, Sequence
from typing import Any

from effjax.peft._checks import instance_hint, short_repr
from effjax.peft.base import AdapterMethod
from effjax.selection import Rule, assign_rules
from effjax.selection import compile_rules as _compile

__all__ = ["Rule", "compile_rules", "assign_rules"]

_WHAT = "an adapter method (e.g. LoRA(rank=8))"


def _check_value(pattern: Any, value: Any) -> None:
    """``TypeError`` for a rule value that is not a method config or None, showing it."""
    if value is None or isinstance(value, AdapterMethod):
        return
    where = f"rule {pattern!r}"
    if isinstance(value, type) and issubclass(value, AdapterMethod):
        raise TypeError(f"{where}: got the class {value.__name__}, not a method config; "
                        f"{instance_hint(value)}")
    what = f"the class {short_repr(value)}" if isinstance(value, type) else (
        f"{type(value).__name__} {short_repr(value)}")
    raise TypeError(f"{where}: value must be {_WHAT} or None, got {what}")


def _items(rules: Any) -> list:
    """The ``(regex, value)`` pairs of ``rules``; ``TypeError`` showing a bad ``rules``."""
    if isinstance(rules, Mapping):
        return list(rules.items())
    form = f"a mapping {{regex: {_WHAT} | None}}, e.g. {{r'.*/kernel': LoRA(rank=8)}}"
    if isinstance(rules, str) or not isinstance(rules, Sequence):
        hint = (f"; to adapt the leaves matching {rules!r} write {{{rules!r}: LoRA(rank=8)}}"
                if isinstance(rules, str) else "")
        raise TypeError(f"rules must be {form}, got {type(rules).__name__} "
                        f"{short_repr(rules)}{hint}")
    for i, it in enumerate(rules):
        if not (isinstance(it, tuple) and len(it) == 2):
            hint = (f"; each regex needs its method: {{{it!r}: LoRA(rank=8)}}"
                    if isinstance(it, str) else "")
            raise TypeError(f"rules must be {form} or a sequence of (regex, method | None) "
                            f"tuples, got a {type(rules).__name__} whose item {i} is "
                            f"{type(it).__name__} {short_repr(it)}{hint}")
    return list(rules)


def compile_rules(rules: Any) -> list[Rule]:
    """Check and compile an ordered mapping (or sequence of pairs) ``{regex: method | None}``
    whose values are adapter methods (:func:`effjax.selection.compile_rules`).

    Raises:
      TypeError: ``rules`` of another kind, or a value that is not a method config or None
        (a method class instead of an instance included); the message shows the value and
        what to pass instead. ValueError: no rules, a regex that does not compile.

    Example:
      >>> from effjax.peft import LoRA
      >>> compile_rules({r'.*/kernel': LoRA})
      Traceback (most recent call last):
      TypeError: rule '.*/kernel': got the class LoRA, not a method config; pass an \
instance, e.g. LoRA(rank=8)
    """
    if isinstance(rules, list) and rules and all(isinstance(r, Rule) for r in rules):
        return rules  # already compiled (and checked)
    items = _items(rules)
    for it in items:
        _check_value(*it)
    return _compile(items, accept=AdapterMethod, what=_WHAT)
