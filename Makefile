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
DEMO_DATA := data/synth
DEMO_RUN := runs/demo_cpu

.PHONY: install demo test lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" -e ".[dev]"
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

lint: $(STAMP)
	$(VENV)/bin/ruff check vla_scale data_tools tests
	$(VENV)/bin/ruff format --check vla_scale data_tools tests

clean:
	rm -rf $(VENV) runs data .pytest_cache
