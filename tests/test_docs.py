"""The documentation site (docs/) builds with warnings as errors, and its migration page is true.

The build runs Sphinx in a subprocess (its configuration sets environment variables and it
registers docutils roles globally; neither should leak into the test process). Notebooks are
rendered as saved, never executed (tests/notebooks executes them).
"""

import importlib
import re
import subprocess
import sys
import types
from pathlib import Path

# The docs extra is part of the test extra: a missing package fails here, it is never skipped.
import bs4  # noqa: E402  (a dependency of sphinx-book-theme)
import myst_nb  # noqa: E402, F401
import sphinx  # noqa: E402, F401
import sphinx_book_theme  # noqa: E402, F401

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MIGRATING = DOCS / "migrating.md"
PACKAGES = ["optim", "peft", "nn", "quant", "compress", "models", "data"]


def _build(out):
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q",
           str(DOCS), str(out)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _site_problems(out):
    """What is missing from the built pages (written even when a warning fails the build)."""
    problems = []

    def read(page):
        path = out / page
        if not path.exists():
            problems.append(f"{page} was not written")
            return ""
        return path.read_text("utf-8")

    for package in PACKAGES:  # every public name has an entry on its package's page
        html = read(f"api/{package}.html")
        module = importlib.import_module(f"effjax.{package}")
        for name in module.__all__:
            anchor = (f'id="module-effjax.{package}.{name}"'
                      if isinstance(getattr(module, name), types.ModuleType)
                      else f'id="effjax.{package}.{name}"')
            if html and anchor not in html:
                problems.append(f"api/{package}.html has no entry for effjax.{package}.{name}")
    if 'id="effjax.optim.adamw_8bit"' not in read("api/optim.html"):
        problems.append("api/optim.html does not document adamw_8bit")

    quickstart, peft = read("notebooks/01_quickstart.html"), read("notebooks/02_peft.html")
    if not ("effjax quickstart" in quickstart and "adamw_8bit" in quickstart):
        problems.append("notebooks/01_quickstart.html lacks its title or code")
    if not ("PEFT with effjax" in peft and "inject" in peft):
        problems.append("notebooks/02_peft.html lacks its title or code")

    migrating = read("migrating.html")
    for text in ["From bitsandbytes / PEFT to effjax", "AdamW8bit", "merge_and_unload"]:
        if migrating and text not in migrating:
            problems.append(f"migrating.html lacks {text!r}")
    if migrating:  # every {func}/{class} reference links to an API entry
        page = bs4.BeautifulSoup(migrating, "html.parser").find("article")
        refs = page.find_all("code", class_="xref")
        unresolved = [ref.get_text() for ref in refs if ref.find_parent("a") is None]
        if len(refs) < 20 or unresolved:
            problems.append(f"migrating.html: {len(refs)} references, unresolved {unresolved}")

    index = read("index.html")
    for page in ["migrating.html", "notebooks/01_quickstart.html", "api/optim.html"]:
        if page not in index:
            problems.append(f"index.html does not link {page}")
    return problems


def test_site_builds_with_warnings_as_errors(tmp_path):
    """One build (a module-scoped fixture would build once per xdist worker): no Sphinx
    warning, and the API, notebook and migration pages hold what they should."""
    proc = _build(tmp_path / "html")
    problems = [] if proc.returncode == 0 else [
        f"sphinx exited with {proc.returncode}:\n{proc.stdout[-3000:]}{proc.stderr[-8000:]}"]
    problems += _site_problems(tmp_path / "html")
    assert not problems, "\n".join(problems)


def test_migration_page_names_exist():
    """Every ``effjax.<package>.<name>`` the page mentions is a public name of that package."""
    text = MIGRATING.read_text("utf-8")
    names = sorted(set(re.findall(r"\beffjax\.(\w+)\.(\w+)", text)))
    assert len(names) > 20
    wrong = []
    for package, name in names:
        module = importlib.import_module(f"effjax.{package}")
        if name not in getattr(module, "__all__", ()):
            wrong.append(f"effjax.{package}.{name}")
    assert not wrong, f"the migration page names what effjax does not export: {wrong}"


def test_migration_page_code_runs():
    """The page's ```python blocks (effjax code) run as written, in order."""
    text = MIGRATING.read_text("utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S)
    assert len(blocks) >= 4
    namespace = {"__name__": "migrating"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{MIGRATING}:python-block-{i}", "exec"), namespace)
    import jax
    import numpy as np

    materialize = namespace["materialize"]
    restored, tree = materialize(namespace["restored"]), materialize(namespace["tree"])
    assert jax.tree.structure(restored) == jax.tree.structure(tree)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(tree), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
