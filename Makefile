# Two commands after `git clone`:  make demo  (the main job on the embedded default)  and  make test.
# Both install everything they need into .venv first (pip; see README for why not uv/poetry).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
BENCH  ?=
export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: install demo test test-fast bench gpu-wheels lint clean stack

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required (bpy 4.2 wheels exist only for 3.11); set PYTHON=/path/to/python3.11"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[render,dev]'
	touch $@

demo: install  # the whole DAG (render -> pretrain -> stage1 -> pseudo_gt -> stage2 -> evaluate -> register) on the embedded default; re-running is free
	$(VENV)/bin/geco run --config configs/local.yaml

test: install
	$(PY) -m pytest -q --durations=25

test-fast: install
	$(PY) -m pytest -q -m "not slow and not blender"

bench: install
	$(PY) -m benchmarks $(BENCH)

gpu-wheels:  # the wheels a bare GPU machine lacks for `python3 -m benchmarks gpu`, into .whl/ (benchmarks/gpu.py)
	benchmarks/gpu_prepare.sh

lint: install
	$(VENV)/bin/ruff check geco pipelines cli jobs tests benchmarks

clean:
	rm -rf outputs mlruns.db mlruns mlartifacts .pytest_cache

# The evaluation report's 3D viewer (geco/eval/viewer): `npm ci` of its pinned package-lock.json, then one
# esbuild bundle (dist/geco-viewer.js) that geco.eval.report copies into each report. Needs Node.js >= 18 + npm.
VIEWER := geco/eval/viewer
install: $(VIEWER)/dist/geco-viewer.js
.PHONY: viewer
viewer: $(VIEWER)/dist/geco-viewer.js
$(VIEWER)/dist/geco-viewer.js: $(VIEWER)/package.json $(VIEWER)/package-lock.json $(VIEWER)/src/viewer.js
	@command -v npm >/dev/null || { echo "make: npm (Node.js >= 18) is needed to build the report's 3D viewer (e.g. apt-get install nodejs npm)"; exit 1; }
	cd $(VIEWER) && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error && npm run --silent build

stack: install  # S3 (SeaweedFS) + MLflow on 127.0.0.1 for development, the servers the tests use; Ctrl-C stops them
	$(PY) -m infra.stack $(if $(RAY),--ray)
