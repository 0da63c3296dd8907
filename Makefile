# Quickstart: `make demo` (simulator demonstrations → 2-rank CPU training → closed-loop evaluation) and `make test`.
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
DEMO_DATA := data/instruct
DEMO_RUN := runs/instruct_cpu
DEMO_EVAL := runs/instruct_cpu_eval
DEMO_TASKS := touch_red,touch_green,touch_blue,touch_yellow
EVAL_ARGS := --suite instruct --tasks $(DEMO_TASKS) --episodes 20 --workers 2 --ensemble

.PHONY: install demo test test-fast lint lock clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml $(LOCK) | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" -e ".[dev]" -c $(LOCK)
	$(PY) -m vla_scale.train.build_ops  # DeepSpeed's CPU Adam (optimizer offload), compiled once here, not per run
	touch $(STAMP)

install: $(STAMP)

$(DEMO_DATA)/robot/manifest.json: | $(STAMP)
	$(PY) -m data_tools collect instruct $(DEMO_DATA) --tasks $(DEMO_TASKS) --episodes 600 --paired-scenes \
		--action-noise 0.4 --workers 2 --overwrite

# Closed loop: train on the instruct suite's demonstrations, then run the policy in the simulator on held-out
# scenes with the right instructions, with swapped ones, and a random-action baseline.
demo: $(STAMP) $(DEMO_DATA)/robot/manifest.json
	rm -rf $(DEMO_RUN) $(DEMO_EVAL)
	launchers/train.sh configs/instruct_cpu.yaml
	$(VENV)/bin/vla-scale export $(DEMO_RUN) $(DEMO_EVAL)/policy
	$(VENV)/bin/vla-scale eval $(DEMO_EVAL)/policy $(EVAL_ARGS) --videos 1 --label policy --out $(DEMO_EVAL)/policy_eval
	$(VENV)/bin/vla-scale eval $(DEMO_EVAL)/policy $(EVAL_ARGS) --videos 0 --swap-instruction --label swapped \
		--out $(DEMO_EVAL)/swapped
	$(VENV)/bin/vla-scale eval $(EVAL_ARGS) --agent random --videos 0 --label random --out $(DEMO_EVAL)/random
	$(VENV)/bin/vla-scale eval-report $(DEMO_EVAL)/policy_eval $(DEMO_EVAL)/swapped $(DEMO_EVAL)/random
	@echo "rollout videos: $(DEMO_EVAL)/policy_eval/videos"

# Test processes (pytest-xdist): the suite is mostly single-threaded Python, so one per core.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

# Unit tier for the edit loop: everything except the real multi-process jobs.
test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder -m "not integration"

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
