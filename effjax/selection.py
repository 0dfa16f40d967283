"""Selecting leaves (and layers) by ordered regex rules: the one selection layer of effjax.

Every rewriter (:func:`effjax.peft.inject`, :func:`effjax.compress.fake_quantize_params`,
:func:`effjax.peft.calibrate`, activation fake quantization, the adapter-aware layers) picks
what it acts on through this module, so paths, rule order and errors are the same everywhere.

**Paths.** A leaf's path is its ``'/'``-joined key path (:func:`path_str`): dict keys, sequence
indices and attribute names; NNX's trailing ``.value`` is dropped, so a Linen ``params`` dict
and an ``nnx.State`` of the same model give the same paths (``'blocks/0/query/kernel'``).

**Rules.** An ordered mapping (or sequence of pairs) ``{regex: value}``. For each path the
**first** rule whose regex **fullmatches** it decides: a value targets the leaf, ``None``
excludes it. A rule that decides nothing (it matches no path, or only paths an earlier rule
claimed) is an error, because a typo would otherwise silently adapt nothing. The message
names the rule and suggests the closest paths, compared by their last components (the module
and parameter names: a rule ``'.*/q_proj/kernel'`` on a BERT tree suggests
``'.../query/kernel'``), one path per repeated layer.

Example:
  >>> import jax.numpy as jnp
  >>> params = {'dense': {'kernel': jnp.ones((2, 2)), 'bias': jnp.zeros(2)}}
  >>> rewrite(params, {r'.*/kernel': 2.0}, lambda path, leaf, scale: scale * leaf)['dense']
  {'bias': Array([0., 0.], dtype=float32), 'kernel': Array([[2., 2.],
         [2., 2.]], dtype=float32)}
  >>> rewrite(params, {r'.*/kernal': 2.0}, lambda path, leaf, scale: scale * leaf)
  ... # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  ValueError: rule '.*/kernal' matches no leaf path of the 2 candidates ...; closest paths: \
'dense/kernel', ...
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["path_str", "tree_paths", "Rule", "compile_rules", "assign_rules", "closest_paths",
           "rewrite", "selector", "no_selection_message"]


def path_str(path: Sequence[Any]) -> str:
    """The ``'/'``-joined string of a ``jax.tree_util`` key path, as rules match it.

    Dict keys, sequence indices and attribute names are joined with ``'/'``; a trailing
    ``.value`` attribute (the array inside an NNX ``Variable`` of an ``nnx.State``) is dropped,
    so Linen ``params`` and NNX ``State`` trees give the same paths. Plain keys (an NNX module
    path such as ``('blocks', 0, 'query')``) are joined as they are.

    Example:
      >>> from jax.tree_util import DictKey, GetAttrKey, SequenceKey
      >>> path_str((DictKey('blocks'), SequenceKey(0), DictKey('kernel'), GetAttrKey('value')))
      'blocks/0/kernel'
      >>> path_str(('blocks', 0, 'query'))
      'blocks/0/query'
    """
    path = list(path)
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    return "/".join(parts)


def tree_paths(tree: Any, is_leaf: Callable[[Any], bool] | None = None):
    """``(paths, leaves, treedef)`` of ``tree``, paths as :func:`path_str` gives them."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [path_str(p) for p, _ in flat], [x for _, x in flat], treedef


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
    """One compiled rule: the regex source, the compiled regex and its value (None: exclude).

    ``method`` is the same value under the name the adapter rewriters use."""

    pattern: str
    regex: re.Pattern
    value: Any

    @property
    def method(self) -> Any:
        return self.value


def _describe(accept: Any) -> str:
    if isinstance(accept, type):
        return accept.__name__
    if isinstance(accept, tuple):
        return " or ".join(t.__name__ for t in accept)
    return "a rule value"


def compile_rules(rules: Any, *, accept: type | tuple[type, ...] | None = None,
                  what: str | None = None) -> list[Rule]:
    """Check and compile ordered rules ``{regex: value | None}`` (a mapping or pairs).

    Args:
      rules: a mapping ``{regex: value | None}`` (its order is the rule order), a sequence
        of ``(regex, value | None)`` pairs, or a list this function returned (kept as is).
      accept: the type(s) a value must have (None: anything but ``None`` is a value).
      what: how to call a value in errors (default: the accepted type's name).

    Raises:
      TypeError: rules of another kind, a key that is not a string, a value of the wrong type.
      ValueError: no rules, a regex that does not compile.
    """
    what = what or _describe(accept)
    if isinstance(rules, list) and rules and all(isinstance(r, Rule) for r in rules):
        return rules  # already compiled (and checked)
    if isinstance(rules, Mapping):
        items = list(rules.items())
    elif isinstance(rules, Sequence) and not isinstance(rules, str):
        items = list(rules)
        for i, it in enumerate(items):
            if not (isinstance(it, tuple) and len(it) == 2):
                raise TypeError(f"rules must be a mapping or a sequence of (regex, {what} | None) "
                                f"pairs; item {i} is {type(it).__name__} {it!r}")
    else:
        raise TypeError(
            f"rules must be a mapping {{regex: {what} | None}}, got {type(rules).__name__}")
    if not items:
        raise ValueError(f"rules is empty: give at least one {{regex: {what}}} rule")
    out = []
    for pattern, value in items:
        if not isinstance(pattern, str):
            raise TypeError(f"rule keys must be regex strings, got {pattern!r}")
        if value is not None and accept is not None and not isinstance(value, accept):
            if isinstance(value, type):
                raise TypeError(f"rule '{pattern}': got the class {value.__name__}, not "
                                f"{what}; pass an instance, e.g. {value.__name__}(...)")
            raise TypeError(f"rule '{pattern}': value must be {what} or None, got "
                            f"{type(value).__name__} {value!r}")
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"rule '{pattern}' is not a valid regex: {e}") from None
        out.append(Rule(pattern=pattern, regex=rx, value=value))
    return out


_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def _layer_key(path: str) -> str:
    """The path with its layer indices hidden: one suggestion per repeated layer."""
    return re.sub(r"(?<=/)\d+(?=/|$)|^\d+(?=/|$)", "*", path)


def _name_similarity(name: str, comp: str) -> float:
    """Similarity of two names in [0, 1]; a name's first ``_`` part that starts ``comp`` counts
    (HF's abbreviations: ``q_proj`` ~ ``query``, ``v_proj`` ~ ``value``, ``o_proj`` ~
    ``output``)."""
    r = difflib.SequenceMatcher(None, name, comp).ratio()
    first = name.split("_")[0]
    if first and first != name and comp.startswith(first):
        r = max(r, 0.6 + 0.4 * len(first) / len(comp))
    return r


def _score(names: list[str], comps: list[str]) -> float:
    """How well the pattern's names match a path's components, the last ones weighing most."""
    if not names or not comps:
        return 0.0
    total = 0.0
    for j, name in enumerate(reversed(names)):
        weight = 1.0 / (j + 1)
        best = 0.0
        for i, comp in enumerate(reversed(comps)):
            best = max(best, _name_similarity(name.lower(), comp.lower()) - 0.02 * i)
        total += weight * best
    return total


def closest_paths(pattern: str, paths: Sequence[str], n: int = 5) -> list[str]:
    """Up to ``n`` of ``paths`` closest to ``pattern``, one per repeated layer.

    The pattern's names (``'q_proj'``, ``'kernel'`` in ``r'.*/q_proj/kernel'``) are compared
    with each path's components, the last names weighing most; paths that differ only in a
    layer index count once (the first is shown).

    Example:
      >>> paths = [f'layer/{i}/attention/{m}/{p}' for i in range(3)
      ...          for m in ('query', 'key', 'value') for p in ('kernel', 'bias')]
      >>> closest_paths(r'.*/q_proj/kernel', paths, n=2)
      ['layer/0/attention/query/kernel', 'layer/0/attention/key/kernel']
    """
    names = _NAME.findall(pattern)
    groups: dict[str, str] = {}
    for p in paths:
        groups.setdefault(_layer_key(p), p)
    reps = list(groups.values())
    if not names:
        return reps[:n]
    scored = [(-_score(names, p.split("/")), i, p) for i, p in enumerate(reps)]
    return [p for _, _, p in sorted(scored)[:n]]


def _no_match_message(rule: Rule, paths: list[str], what: str) -> str:
    close = ", ".join(f"'{p}'" for p in closest_paths(rule.pattern, paths)) or "none"
    msg = (f"rule '{rule.pattern}' matches no {what} of the {len(paths)} candidates "
           f"(rules fullmatch the '/'-joined path); closest paths: {close}")
    if _NAME.fullmatch(rule.pattern) and any(
            rule.pattern in p.split("/") for p in paths):
        msg += (f". A rule matches the whole path, not a module name: for the kernels of the "
                f"'{rule.pattern}' layers write r'.*/{rule.pattern}/kernel'")
    return msg


def assign_rules(paths: Sequence[str], rules: Sequence[Rule], *, what: str = "leaf path",
                 check: bool = True) -> list[int | None]:
    """For each path the index of the first rule that fullmatches it (None: no rule).

    Args:
      paths: the candidate paths.
      rules: compiled rules (:func:`compile_rules`).
      what: how to call a path in errors.
      check: raise if a rule decides no path.

    Raises:
      ValueError: (``check``) a rule matches no path (the message lists the closest paths),
        or every path it matches is claimed by an earlier rule.
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
    if check:
        for rule, m, d in zip(rules, matched, decided):
            if not m:
                raise ValueError(_no_match_message(rule, paths, what))
            if not d:
                raise ValueError(
                    f"rule '{rule.pattern}' decides no leaf: every path it matches is claimed "
                    f"by an earlier rule (first match wins)")
    return choice


def _where(path: str, leaf: Any, rule: Rule) -> str:
    dtype = getattr(leaf, "dtype", None)
    dtype = type(leaf).__name__ if dtype is None else dtype
    return (f"leaf '{path}' (shape {tuple(getattr(leaf, 'shape', ()))}, dtype {dtype}), "
            f"rule '{rule.pattern}'")


def rewrite(tree: Any, rules: Any, fn: Callable[[str, Any, Any], Any], *,
            accept: type | tuple[type, ...] | None = None, what: str | None = None,
            is_leaf: Callable[[Any], bool] | None = None, floating: bool = False) -> Any:
    """``tree`` with each leaf a rule targets replaced by ``fn(path, leaf, value)``.

    The first rule that fullmatches a leaf's path decides: a value ``v`` gives
    ``fn(path, leaf, v)``, ``None`` keeps the leaf; leaves no rule matches are kept. A rule
    that decides no leaf is an error (see the module docstring). The result has ``tree``'s
    structure (a Linen dict stays a dict, an ``nnx.State`` a ``State``).

    Args:
      tree: any pytree (Linen ``params``, NNX ``State``, nested containers).
      rules: ordered ``{regex: value | None}`` (:func:`compile_rules`).
      fn: ``(path, leaf, value) -> new leaf``. A ``ValueError``/``TypeError`` it raises is
        re-raised with the leaf's path, shape, dtype and rule in front of its message.
      accept: the type(s) rule values must have; what: their name in errors.
      is_leaf: stop flattening at these nodes (e.g. adapter nodes), as ``jax.tree_util``.
      floating: a targeted leaf must be a floating array (``TypeError`` naming it otherwise).

    Returns:
      A new tree; the input is not modified.
    """
    compiled = compile_rules(rules, accept=accept, what=what)
    paths, leaves, treedef = tree_paths(tree, is_leaf=is_leaf)
    choice = assign_rules(paths, compiled)
    out = []
    for path, leaf, c in zip(paths, leaves, choice):
        rule = None if c is None else compiled[c]
        if rule is None or rule.value is None:
            out.append(leaf)
            continue
        if floating:
            dtype = getattr(leaf, "dtype", None)
            if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
                raise TypeError(f"{_where(path, leaf, rule)}: the rule targets a leaf that is "
                                f"not a floating array")
        try:
            out.append(fn(path, leaf, rule.value))
        except (ValueError, TypeError) as e:
            raise type(e)(f"{_where(path, leaf, rule)}: {e}") from None
    return jax.tree_util.tree_unflatten(treedef, out)


def selector(where: Any) -> Callable[[str, Any], bool]:
    """``(path, obj) -> bool`` from ``where``: None (everything), a regex fullmatched against
    the path, or a predicate ``(path, obj) -> bool`` (returned as it is).

    Example:
      >>> sel = selector(r'blocks/\\d+/query')
      >>> sel('blocks/0/query', None), sel('blocks/0/key', None)
      (True, False)
    """
    if where is None:
        return lambda path, obj: True
    if isinstance(where, str):
        try:
            rx = re.compile(where)
        except re.error as e:
            raise ValueError(f"where='{where}' is not a valid regex: {e}") from None
        return lambda path, obj: rx.fullmatch(path) is not None
    if callable(where):
        return where
    raise TypeError(f"where must be None, a regex string or a callable, got {where!r}")


def no_selection_message(where: Any, candidates: Sequence[str], kind: str) -> str:
    """The error for a ``where`` that selects none of ``candidates`` (paths of ``kind``)."""
    desc = f"'{where}'" if isinstance(where, str) else repr(where)
    shown = closest_paths(where, candidates, n=12) if isinstance(where, str) else \
        list(candidates)[:12]
    names = ", ".join(f"'{p}'" for p in shown) or "none"
    return (f"where={desc} selects none of the {len(candidates)} {kind}; closest paths: "
            f"{names}")
