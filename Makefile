# effjax: `make demo` and `make test` create .venv if needed, then run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m experiments.demo_8bit

test: $(STAMP)
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/python -m pytest -q -n 2 --doctest-modules effjax tests

lint: $(STAMP)
	$(BIN)/ruff check effjax pallas_kernels experiments tests

bench: $(STAMP)
	$(BIN)/python -m experiments.bench_optim

clean:
	rm -rf $(VENV) .pytest_cache
