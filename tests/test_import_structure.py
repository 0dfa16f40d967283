"""The import graph of effjax and pallas_kernels: no cycles, no private names across modules.

Read from the source with ``ast`` (every ``import``, also inside functions, since a lazy import
still ties two modules together), so it fails on a cycle even where Python would tolerate it.
The checks are run on small hand-made graphs first, so a checker that finds nothing cannot
pass by accident.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("effjax", "pallas_kernels")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _is_package(name: str, modules: dict[str, pathlib.Path]) -> bool:
    return modules[name].name == "__init__.py"


def _imports(name: str, path: pathlib.Path, modules) -> list[tuple[str, str | None]]:
    """``(imported module, imported name or None)`` for every import of project code."""
    out = []
    pkg = name if _is_package(name, modules) else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names if a.name.split(".")[0] in PACKAGES]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] not in PACKAGES:
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub, None) if sub in modules else (base, a.name))
    return out


def _graph(modules) -> dict[str, set[str]]:
    return {m: {t for t, _ in _imports(m, p, modules) if t in modules and t != m}
            for m, p in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def _private_imports(modules) -> list[str]:
    """Imports of a private name (``_x``) defined in another module, and imports of another
    package's private module: helpers shared across modules must have public names."""
    bad = []
    for m, p in modules.items():
        own_pkg = m if _is_package(m, modules) else m.rpartition(".")[0]
        for target, name in _imports(m, p, modules):
            if name is not None and name.startswith("_") and target != m:
                bad.append(f"{m} imports {name} from {target}")
            target_pkg, _, last = target.rpartition(".")
            if name is None and last.startswith("_") and target_pkg != own_pkg:
                bad.append(f"{m} imports the private module {target} of another package")
    return bad


def test_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set(), "c": {"b"}}) == []
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}}) == [["a", "b"], ["c", "d"]]


def test_import_reader_sees_lazy_and_relative_imports(tmp_path):
    src = tmp_path / "effjax" / "pkg"
    src.mkdir(parents=True)
    (tmp_path / "effjax" / "__init__.py").write_text("")
    (src / "__init__.py").write_text("from effjax.pkg.a import f\n")
    (src / "a.py").write_text("def f():\n    from effjax.pkg import b\n    return b\n")
    (src / "b.py").write_text("from .a import _helper\nfrom effjax.other import _priv\n")
    mods = {_module_name_at(tmp_path, p): p for p in sorted((tmp_path / "effjax").rglob("*.py"))}
    graph = {m: {t for t, _ in _imports(m, p, mods) if t in mods and t != m}
             for m, p in mods.items()}
    assert graph["effjax.pkg.a"] == {"effjax.pkg.b"}
    assert graph["effjax.pkg.b"] == {"effjax.pkg.a"}
    assert _cycles(graph) == [["effjax.pkg.a", "effjax.pkg.b"]]
    assert "effjax.pkg.b imports _helper from effjax.pkg.a" in _private_imports(mods)


def _module_name_at(root: pathlib.Path, path: pathlib.Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycles():
    cycles = _cycles(_graph(_modules()))
    assert not cycles, "import cycles (each a set of modules importing each other): " + \
        "; ".join(" <-> ".join(c) for c in cycles)


def test_no_private_names_across_modules():
    bad = _private_imports(_modules())
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("pkg", ["effjax.optim", "effjax.peft", "effjax.nn", "effjax.data"])
def test_no_module_shadowed_by_a_function(pkg):
    """``effjax.optim.galore`` must not be both a module file and the function of that name."""
    import importlib
    import pkgutil
    import types

    mod = importlib.import_module(pkg)
    shadowed = [i.name for i in pkgutil.iter_modules(mod.__path__)
                if getattr(mod, i.name, None) is not None
                and not isinstance(getattr(mod, i.name), types.ModuleType)]
    assert not shadowed, f"{pkg}: modules shadowed by a function of the same name: {shadowed}"
