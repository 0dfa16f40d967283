"""Ordered regex rules ``{regex: method}`` that pick the leaves a rewriter targets.

A leaf's path is its ``'/'``-joined key path (:func:`effjax.compress.key_path_str`; NNX's
trailing ``.value`` is dropped, so a Linen ``params`` dict and an ``nnx.State`` of the same model
give the same paths, e.g. ``'blocks/0/query/kernel'``). For each leaf the **first** rule whose
regex **fullmatches** its path decides: a method targets the leaf, ``None`` excludes it.
A rule that decides no leaf (it matches none, or only leaves an earlier rule claimed) is an
error: the message names the rule and lists the closest paths.

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
  ValueError: rule '.*/kernal' matches no leaf path ...; closest paths: 'head/kernel', ...
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from effjax.peft.base import AdapterMethod

__all__ = ["Rule", "compile_rules", "assign_rules"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
    """One compiled rule: the regex source, the compiled regex and the method (or None)."""

    pattern: str
    regex: re.Pattern
    method: AdapterMethod | None


def compile_rules(rules: Any) -> list[Rule]:
    """Check and compile an ordered mapping (or sequence of pairs) ``{regex: method | None}``."""
    if isinstance(rules, Mapping):
        items = list(rules.items())
    elif isinstance(rules, Sequence) and not isinstance(rules, str):
        items = list(rules)
        if not all(isinstance(it, tuple) and len(it) == 2 for it in items):
            raise TypeError("rules must be a mapping or a sequence of (regex, method | None)")
    else:
        raise TypeError(
            f"rules must be a mapping {{regex: method | None}}, got {type(rules).__name__}")
    if not items:
        raise ValueError("rules is empty: give at least one {regex: method} rule")
    out = []
    for pattern, method in items:
        if not isinstance(pattern, str):
            raise TypeError(f"rule keys must be regex strings, got {pattern!r}")
        if method is not None and not isinstance(method, AdapterMethod):
            raise TypeError(f"rule '{pattern}': value must be an adapter method (e.g. LoRA) or "
                            f"None, got {type(method).__name__}")
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"rule '{pattern}' is not a valid regex: {e}") from None
        out.append(Rule(pattern=pattern, regex=rx, method=method))
    return out


def _close_paths(pattern: str, paths: list[str], n: int = 5) -> str:
    close = difflib.get_close_matches(pattern, paths, n=n, cutoff=0.0) or paths[:n]
    return ", ".join(f"'{p}'" for p in close)


def assign_rules(paths: Sequence[str], rules: Sequence[Rule]) -> list[int | None]:
    """For each path the index of the first rule that fullmatches it (None: no rule).

    Raises:
      ValueError: a rule decides no path; the message names it and lists close paths.
    """
    paths = list(paths)
    matched = [False] * len(rules)
    decided = [False] * len(rules)
    choice: list[int | None] = []
    for path in paths:
        first = None
        for i, rule in enumerate(rules):
            if rule.regex.fullmatch(path):
                matched[i] = True
                if first is None:
                    first = i
        if first is not None:
            decided[first] = True
        choice.append(first)
    for rule, m, d in zip(rules, matched, decided):
        if not m:
            raise ValueError(
                f"rule '{rule.pattern}' matches no leaf path of the {len(paths)} leaves "
                f"(rules fullmatch the '/'-joined path); closest paths: "
                f"{_close_paths(rule.pattern, paths)}")
        if not d:
            raise ValueError(
                f"rule '{rule.pattern}' decides no leaf: every path it matches is claimed by an "
                f"earlier rule (first match wins)")
    return choice
