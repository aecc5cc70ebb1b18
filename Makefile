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

# antspyx (the ANTs tests) pins numpy<2.4 and scipy<1.16 in its metadata but runs with the current ones: its own
# requirements are installed first, then antspyx itself without dependencies, so nothing is downgraded.
ANTS_DEPS ?= pandas statsmodels webcolors scikit-learn requests Pillow
ANTS_PIN ?= antspyx==0.6.3

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet $(ANTS_DEPS)
	$(PY) -m pip install --quiet --no-deps $(ANTS_PIN)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/brainshift demo --out demo_output
	$(VENV)/bin/brainshift register -p demo_output/preop_t1.nii.gz -t demo_output/intraop_t1.nii.gz \
		--mask demo_output/brain_mask.nii.gz -o demo_output/register

test: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -m "not slow" -n $(PYTEST_WORKERS)

test-slow: $(STAMP)
	$(PY) -m pytest -m slow -n $(PYTEST_WORKERS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) demo_output .pytest_cache build src/*.egg-info
