# One command each: `make test` (install + tests), `make demo` (install + quickstart grid + report).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Re-install only when the project metadata changed (idempotent).
# torch/torchvision come first from this machine's local wheels, so nothing else pulls another torch.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q -e ".[test,cluster]"
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache

# The quickstart grid: 5 variants x 2 seeds on tiny synthetic data, CPU only; prints the comparison table.
# Re-running resumes (finished cells are skipped); results in runs/quickstart (MLflow: runs/quickstart/mlflow.db).
demo: install
	$(BIN)/ddsm-bench run ablations/quickstart.yaml --out runs/quickstart
