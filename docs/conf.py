"""Sphinx configuration of the effjax documentation site.

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html`` (``make docs``).
The build needs no network: notebooks are rendered from their saved contents (never executed)
and there is no intersphinx mapping to fetch.
"""

import functools
import importlib
import os
import re
import sys
import types

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.errors import PycodeError
from sphinx.pycode import ModuleAnalyzer
from sphinx.util.docutils import SphinxDirective
from sphinx.util.inspect import object_description
from sphinx.util.nodes import nested_parse_with_titles

# Importing the packages (autodoc) must not probe accelerators.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Document the checkout this file lives in, even when another copy of effjax is installed.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

project = "effjax"
author = "effjax contributors"
copyright = "effjax contributors"
release = importlib.import_module("effjax").__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_nb",  # Markdown pages (MyST) and notebooks
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"
exclude_patterns = ["_build", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]

# --- notebooks (myst-nb) -------------------------------------------------------------------
# docs/notebooks is a link to the repository's notebooks/. They are rendered as saved: the
# test suite executes them separately (tests/notebooks), the docs build never does.
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

# --- API reference (autodoc + autosummary + napoleon) ----------------------------------------
# Each API page is ``.. automodule:: effjax.<package>`` with ``:members:``: autodoc follows the
# package's ``__all__`` (imported names included), so every public name is documented under its
# package path (effjax.optim.adamw_8bit), never under the private module that defines it.
autodoc_default_options = {
    "members": True,
    "member-order": "bysource",  # for a module with __all__: the order of __all__
    "show-inheritance": True,
}
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"
autodoc_preserve_defaults = True  # show `b1=0.9`, not the evaluated repr of a default object
autosummary_generate = False  # the summary tables link to the automodule entries on the page

# Google-style docstrings (Args:, Returns:, Raises:, Example:).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_include_init_with_doc = False
# Fields listed under "Attributes:" of a NamedTuple (GaLoreState, MiniLM, ...) are also members
# that autodoc documents ("Alias for field number 0"); as ``.. attribute::`` blocks they would
# be described twice (duplicate-object warnings), as :ivar: fields they are not.
napoleon_use_ivar = True
napoleon_use_rtype = False
napoleon_preprocess_types = False

# Cross-references to names outside these docs (jax.Array, optax.GradientTransformation, ...)
# stay plain text: there is no intersphinx (the build needs no network).
nitpicky = False

# --- HTML ----------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "effjax"
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
}
html_static_path = []


def _public_summary(app, what, name, obj, options, lines):
    """Append to a package's docstring a table of its public names (its ``__all__``).

    The names come from the package itself, so the table lists no private module path and
    needs no edit when a name is added or a module is renamed.
    """
    public = getattr(obj, "__all__", None)
    if what != "module" or not public:
        return
    lines += ["", ".. rubric:: Public names", "", ".. autosummary::", ""]
    lines += [f"   {member}" for member in public]
    lines.append("")


_MULTI_IVAR = re.compile(r"^(\s*):(ivar|vartype) (\w+(?:,\s*\w+)+):(.*)$")


def _split_multi_name_fields(app, what, name, obj, options, lines):
    """Give each name of a multi-name ``Attributes:`` entry its own field.

    Napoleon accepts ``x, y: description`` under ``Args:`` (one field per name) but not under
    ``Attributes:``, where it writes ``:ivar x, y:`` and Sphinx reads ``x,`` as a type. This
    does for attributes what napoleon does for arguments. Runs after napoleon (priority 600).
    """
    out, i = [], 0
    while i < len(lines):
        match = _MULTI_IVAR.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent, kind, names, rest = match.groups()
        block = [rest]
        i += 1
        while i < len(lines) and lines[i].strip() and (
                len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
            block.append(lines[i])
            i += 1
        for field_name in (n.strip() for n in names.split(",")):
            out.append(f"{indent}:{kind} {field_name}:{block[0]}")
            out.extend(block[1:])
    lines[:] = out


@functools.cache
def _type_aliases():
    """``(expanded text, alias name)`` for the type aliases that autodoc would spell out."""
    import chex
    import jax
    import optax
    from sphinx.util.typing import stringify_annotation

    aliases = [("optax.ScalarOrSchedule", optax.ScalarOrSchedule),
               ("optax.Schedule", optax.Schedule),
               ("chex.ArrayTree", chex.ArrayTree),
               ("chex.Numeric", chex.Numeric),
               ("jax.typing.ArrayLike", jax.typing.ArrayLike)]
    pairs = []
    for alias, annotation in aliases:
        for mode in ("smart", "fully-qualified-except-typing"):
            pairs.append((stringify_annotation(annotation, mode), alias))
    return pairs


def _short_type_aliases(app, what, name, obj, options, signature, return_annotation):
    """Write ``optax.ScalarOrSchedule`` (and a few other aliases) in signatures instead of the
    union they stand for (autodoc sees evaluated annotations and cannot recover the alias)."""
    def shorten(text):
        if text:
            for expanded, alias in _type_aliases():
                text = text.replace(expanded, alias)
        return text

    return shorten(signature), shorten(return_annotation)


def _attribute_doc(package, name, obj):
    """The doc comment or docstring of a module-level constant, from the module of ``package``
    (or one of its submodules) that defines it; ``[]`` when it has none."""
    for module_name, module in sorted(sys.modules.items()):
        if not (module_name == package or module_name.startswith(package + ".")):
            continue
        if getattr(module, name, None) is not obj:
            continue
        try:
            docs = ModuleAnalyzer.for_module(module_name).find_attr_docs()
        except PycodeError:
            continue
        if ("", name) in docs:
            return list(docs[("", name)])
    return []


class PackageExtras(SphinxDirective):
    """``.. package-extras:: effjax.quant``: what ``automodule`` leaves out of a package.

    * Constants listed in ``__all__``: autodoc documents a module-level constant only when the
      package's own source gives it a doc comment, so one imported from a submodule would be
      missing; it is written here with the docstring found in the module that defines it.
    * Public submodules listed in ``__all__`` (``effjax.quant.search``): a section each.

    Names are read from the package, so nothing here names a private module.
    """

    required_arguments = 1

    def run(self):
        package = self.arguments[0]
        module = importlib.import_module(package)
        own_docs = ModuleAnalyzer.for_module(package).find_attr_docs()
        constants, submodules = [], []
        for name in module.__all__:
            obj = getattr(module, name)
            if isinstance(obj, types.ModuleType):
                title = f"{package}.{name}"
                submodules += [title, "-" * len(title), "", f".. automodule:: {title}", ""]
            elif not (callable(obj) or ("", name) in own_docs):
                constants += [f".. py:data:: {name}", f"   :module: {package}",
                              f"   :value: {object_description(obj)}", ""]
                constants += [f"   {line}" for line in _attribute_doc(package, name, obj)]
                constants.append("")
        text = (["Constants", "---------", "", *constants] if constants else []) + submodules
        if not text:
            return []
        node = nodes.section()
        nested_parse_with_titles(self.state, StringList(text, source=package), node)
        return node.children


def setup(app):
    app.connect("autodoc-process-docstring", _public_summary)
    app.connect("autodoc-process-docstring", _split_multi_name_fields, priority=600)
    app.connect("autodoc-process-signature", _short_type_aliases)
    app.add_directive("package-extras", PackageExtras)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
