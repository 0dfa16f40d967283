"""The public surface: what ``pip install effjax`` brings and what ``import effjax`` gives.

* the light core (quant, optim, peft, nn, compress, models' plain modules) imports without
  tensorflow-datasets, torch or the loaders' readers, and without starting a JAX backend;
* a subpackage whose optional dependency is missing fails with the extra to install;
* pyproject.toml's runtime dependencies are exactly the light set, and the test extra holds
  every other extra's packages.

Imports run in fresh subprocesses (the test process has everything imported already).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import tomllib

import pytest

import effjax
from effjax._optional import import_optional

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIGHT = ("quant", "optim", "peft", "nn", "compress", "models")
OPTIONAL = ("tensorflow_datasets", "torch", "sklearn", "safetensors", "tokenizers", "gguf",
            "matplotlib", "transformers", "tensorflow")


def run_python(code: str) -> dict:
    """Run ``code`` in a fresh interpreter at the repository root; it prints one JSON line."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def block(*modules: str) -> str:
    """Code that makes ``import m`` fail for each of ``modules`` (as if not installed)."""
    return "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules)


@pytest.fixture(scope="module")
def light_import() -> dict:
    """Import effjax and its light subpackages with tfds and torch blocked; report state."""
    return run_python(block("tensorflow_datasets", "torch") + f"""
import json
import effjax
for name in {LIGHT!r}:
    getattr(effjax, name)
from jax._src import xla_bridge
initialized = xla_bridge.backends_are_initialized()
import jax
jax.devices()  # the probe is live: it sees a backend once one starts
print(json.dumps({{
    "loaded": [m for m in {OPTIONAL!r} if sys.modules.get(m) is not None],
    "subpackages": sorted(n for n in {LIGHT!r} if "effjax." + n in sys.modules),
    "backend_at_import": initialized,
    "backend_after_devices": xla_bridge.backends_are_initialized(),
}}))
""")


def test_light_subpackages_import_without_tfds_or_torch(light_import):
    assert light_import["subpackages"] == sorted(LIGHT)
    assert light_import["loaded"] == []


def test_import_starts_no_jax_backend(light_import):
    assert light_import["backend_after_devices"], "the probe does not see backends"
    assert not light_import["backend_at_import"], (
        "importing effjax.{quant,optim,peft,nn,compress,models} initialized a JAX backend")


def test_import_effjax_alone_loads_no_subpackage():
    report = run_python("""
import json, sys
import effjax
print(json.dumps({"modules": sorted(m for m in sys.modules
                                    if m.split(".")[0] in ("effjax", "jax", "flax", "optax")),
                  "dir": dir(effjax), "all": effjax.__all__}))
""")
    assert report["modules"] == ["effjax"]
    subpackages = ["compress", "data", "models", "nn", "optim", "peft", "quant"]
    assert sorted(report["all"]) == subpackages
    assert set(subpackages) <= set(report["dir"])


def test_every_listed_subpackage_is_a_package():
    for name in effjax.__all__:
        assert (ROOT / "effjax" / name / "__init__.py").is_file(), name
    listed = {p.parent.name for p in (ROOT / "effjax").glob("*/__init__.py")}
    assert listed == set(effjax.__all__), "effjax.__all__ and effjax/*/ disagree"


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'optimizers'"):
        effjax.optimizers  # noqa: B018
    assert not hasattr(effjax, "_optional_thing")


def test_data_without_tfds_names_the_extra():
    report = run_python(block("tensorflow_datasets") + """
import json
import effjax
errors = []
for attempt in (lambda: __import__("effjax.data"), lambda: effjax.data,
                lambda: __import__("effjax.data.shakespeare")):
    try:
        attempt()
        errors.append(None)
    except ImportError as e:
        errors.append(str(e))
print(json.dumps(errors))
""")
    assert report == ["effjax.data needs tensorflow-datasets: pip install 'effjax[data]'"] * 3


def test_model_loaders_without_their_readers_name_the_extra():
    report = run_python(block("safetensors", "tokenizers", "gguf", "sklearn") + """
import json
import effjax.models
import effjax.data
from effjax.models import smollm2
from effjax.data import digits
errors = []
for attempt in (lambda: smollm2.read_gguf("unused.gguf"),
                lambda: smollm2.tokenizer_from_gguf({}),
                effjax.models.load_minilm,
                digits._sklearn_digits):
    try:
        attempt()
        errors.append(None)
    except ImportError as e:
        errors.append(str(e))
print(json.dumps(errors))
""")
    assert report == [
        "effjax.models.smollm2.read_gguf needs gguf: pip install 'effjax[models]'",
        "effjax.models.smollm2.tokenizer_from_gguf needs tokenizers: "
        "pip install 'effjax[models]'",
        "effjax.models.load_minilm needs safetensors: pip install 'effjax[models]'",
        "the digits data set needs scikit-learn: pip install 'effjax[data]'",
    ]


def test_import_optional():
    assert import_optional("json", extra="data", feature="x").__name__ == "json"
    with pytest.raises(ImportError, match=re.escape("f needs a-b: pip install 'effjax[e]'")) as e:
        import_optional("no_such_module_xyz.sub", extra="e", feature="f", distribution="a-b")
    assert isinstance(e.value.__cause__, ImportError)


def _name(requirement: str) -> str:
    """The normalized (PEP 503) distribution name of a requirement string."""
    name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip()).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(scope="module")
def project() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def test_runtime_dependencies_are_the_light_set(project):
    names = sorted(_name(r) for r in project["dependencies"])
    assert names == sorted(["jax", "optax", "flax", "orbax-checkpoint", "chex", "numpy"])


def test_extras(project):
    extras = project["optional-dependencies"]
    data = {_name(r) for r in extras["data"]}
    assert {"tensorflow-datasets", "importlib-resources", "scikit-learn"} <= data
    assert {_name(r) for r in extras["models"]} == {"safetensors", "tokenizers", "gguf"}
    assert {"sphinx", "myst-nb", "sphinx-book-theme"} <= {_name(r) for r in extras["docs"]}
    assert "torch" not in {_name(r) for r in extras["demo"]}
    # The test suite needs every other extra's packages, with the same version bounds.
    test = {r.replace(" ", "") for r in extras["test"]}
    for extra in ("data", "models", "docs", "demo"):
        missing = {r.replace(" ", "") for r in extras[extra]} - test
        assert not missing, f"the test extra lacks {extra}'s {sorted(missing)}"
    assert "torch==2.13.0" in test  # a wheel of it is on disk; other versions download GBs
