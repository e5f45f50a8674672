# annoloop: `make demo` runs the main job, `make test` runs the tests. Both set themselves up.
SHELL := /bin/bash
PYTHON ?= python3
UV_VERSION := 0.13.8
UV := .tools/bin/uv
VENV := .venv
LS_VENV := .ls-venv
export YOLO_OFFLINE := 1
export MODEL_DIR ?= $(CURDIR)/models

.PHONY: install test lint demo bench clean

install: $(VENV)/.installed $(LS_VENV)/.installed  ## idempotent: .venv (annoloop) and .ls-venv (Label Studio 1.23.2)

$(UV):
	$(PYTHON) -m venv .tools
	.tools/bin/pip install -q "uv==$(UV_VERSION)"

$(VENV)/.installed: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen
	@touch $@

# Label Studio pins Django and much else, so it lives in its own environment and is spoken to over HTTP.
$(LS_VENV)/.installed: requirements/label-studio.txt | $(UV)
	@[ -x $(LS_VENV)/bin/python ] || $(UV) venv --python $(PYTHON) $(LS_VENV)
	$(UV) pip install --python $(LS_VENV)/bin/python -r requirements/label-studio.txt
	@touch $@

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install lint
	$(VENV)/bin/pytest -ra

# The whole loop on this machine (no Docker): Redis, Label Studio, backend, worker, scheduled sync, and a simulated
# annotator for a few rounds; then it keeps running for you. DEMO_DATA=path/to/voc-folder uses your images.
demo: install
	$(VENV)/bin/annoloop demo $(DEMO_ARGS)

bench: install
	$(VENV)/bin/python bench/predict_overhead.py

clean:
	rm -rf $(VENV) $(LS_VENV) .tools .pytest_cache .ruff_cache
