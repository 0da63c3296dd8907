# Quickstart: `make demo` (toy data → 2-rank CPU training → summary) and `make test`.
# Both create .venv on first use and install the project into it; later runs only
# reinstall when pyproject.toml changes.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Pinned so a CPU machine never resolves torch to a multi-GB CUDA build. On GPU
# clusters, install the torch build for your CUDA first and set TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# Exact versions the suite was last run with (pip-tools; torch excluded, see TORCH_SPEC).
LOCK := configs/requirements.lock
DEMO_DATA := data/synth
DEMO_RUN := runs/demo_cpu

.PHONY: install demo test test-fast lint lock clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml $(LOCK) | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" -e ".[dev]" -c $(LOCK)
	touch $(STAMP)

install: $(STAMP)

$(DEMO_DATA)/robot/manifest.json: | $(STAMP)
	$(PY) -m data_tools synth $(DEMO_DATA)

demo: $(STAMP) $(DEMO_DATA)/robot/manifest.json
	rm -rf $(DEMO_RUN)
	launchers/train.sh configs/demo_cpu.yaml
	$(VENV)/bin/vla-scale summary $(DEMO_RUN) --max-ratio 0.3

test: $(STAMP)
	$(PY) -m pytest -q

# Unit tier for the edit loop: everything except the real multi-process jobs.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not integration"

# Refresh the lock after changing pyproject.toml (UPGRADE=1 also moves pinned versions forward).
lock: | $(PY)
	$(PY) -m pip install -q pip-tools
	$(PY) -m piptools compile -q --strip-extras --extra dev --unsafe-package torch --no-emit-index-url --no-emit-find-links \
		$(if $(UPGRADE),--upgrade) --output-file $(LOCK) pyproject.toml

lint: $(STAMP)
	$(VENV)/bin/ruff check vla_scale data_tools tests
	$(VENV)/bin/ruff format --check vla_scale data_tools tests

clean:
	rm -rf $(VENV) runs data .pytest_cache
