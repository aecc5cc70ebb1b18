# brainshift: `make demo` runs the main job on the built-in brain, `make test` runs the test suite.
# Both create .venv on first use. torch is pinned here (the CPU build on this machine's disk) before the
# package is installed, so the package's own looser torch range installs nothing more.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_PIN ?= torch==2.13.0
PYTEST_WORKERS ?= 2

.PHONY: demo test test-slow lint bench clean install

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/brainshift demo --out demo_output

test: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(PY) -m pytest -m "not slow" -n $(PYTEST_WORKERS)

test-slow: $(STAMP)
	$(PY) -m pytest -m slow -n $(PYTEST_WORKERS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf $(VENV) demo_output .pytest_cache build src/*.egg-info
