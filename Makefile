# Two entry points, both self-installing: `make demo` and `make test` (see README Quick start).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_VERSION ?= 2.13.0
# The interpreter's scripts folder first on PATH, so `lipsync` is found in an unactivated venv too.
export PATH := $(shell $(PYTHON) -c "import sysconfig; print(sysconfig.get_path('scripts'))"):$(PATH)

.PHONY: setup system-deps python-deps demo test lint

# nodejs runs the README's JavaScript example in tests/test_readme.py.
system-deps:
	@command -v redis-server >/dev/null && command -v ffmpeg >/dev/null && command -v node >/dev/null || { \
	  export DEBIAN_FRONTEND=noninteractive; \
	  (apt-get update -qq && apt-get install -y -qq redis-server ffmpeg nodejs) >/dev/null || \
	  (sudo apt-get update -qq && sudo apt-get install -y -qq redis-server ffmpeg nodejs) >/dev/null; }

# torch first, pinned, so pip takes the local CPU build instead of pulling the CUDA one.
python-deps:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==$(TORCH_VERSION)
	@$(PIP) install -q -e ".[test]"

setup: system-deps python-deps

demo: setup
	$(PYTHON) -m inference_pod.cli demo --out demo-output

lint:
	$(PYTHON) -m ruff check .

test: setup lint
	$(PYTHON) -m pytest -q
