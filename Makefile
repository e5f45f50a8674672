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

demo: install  ## train (once, cached) the starter model on generated shapes and serve it
	$(VENV)/bin/annoloop starter-model
	@echo
	@echo "annoloop ML backend on http://127.0.0.1:9090 (Ctrl-C stops it). To use it from Label Studio:"
	@echo "  1. Run this with your server and key: LABEL_STUDIO_URL=http://localhost:8080 LABEL_STUDIO_API_KEY=<token> make demo"
	@echo "     (the backend downloads task images from Label Studio with that key)."
	@echo "  2. Label Studio >= 1.23.1 must run with ML_BLOCK_LOCAL_IP=false SSRF_PROTECTION_ENABLED=false to reach a local backend."
	@echo "  3. Create an image project whose labeling config has RectangleLabels with labels circle, square, triangle,"
	@echo "     then Settings > Model > Connect Model, URL http://127.0.0.1:9090."
	@echo "  Images to try it on: .venv/bin/annoloop sample-images --out demo-images --count 20"
	@echo
	$(VENV)/bin/annoloop serve --host 127.0.0.1 --port 9090

bench: install
	$(VENV)/bin/python bench/predict_overhead.py

clean:
	rm -rf $(VENV) $(LS_VENV) .tools .pytest_cache .ruff_cache
