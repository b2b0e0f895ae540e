# Two entry points, both self-installing: `make demo` and `make test` (see README Quick start).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_VERSION ?= 2.13.0
DEMO_TRAIN_STEPS ?= 500
# The interpreter's scripts folder first on PATH, so `lipsync` is found in an unactivated venv too.
export PATH := $(shell $(PYTHON) -c "import sysconfig; print(sysconfig.get_path('scripts'))"):$(PATH)

.PHONY: setup system-deps browser-deps python-deps demo demo-weights test test-random lint

# nodejs runs the README's JavaScript example in tests/cli/test_readme.py; espeak-ng is the demo character's
# voice (training speech, default track, the lip-sync quality gate).
system-deps:
	@command -v redis-server >/dev/null && command -v ffmpeg >/dev/null && command -v node >/dev/null \
	  && command -v espeak-ng >/dev/null || { \
	  export DEBIAN_FRONTEND=noninteractive; \
	  (apt-get update -qq && apt-get install -y -qq redis-server ffmpeg nodejs espeak-ng) >/dev/null || \
	  (sudo apt-get update -qq && sudo apt-get install -y -qq redis-server ffmpeg nodejs espeak-ng) >/dev/null; }

# Headless Chromium for tests/api/test_live_page.py; the test skips (with the reason) when this fails.
browser-deps:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  export DEBIAN_FRONTEND=noninteractive; \
	  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 || \
	  (sudo apt-get update -qq && sudo apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 || \
	  echo "chromium could not be installed: the browser test will be skipped"; }

# torch first, pinned, so pip takes the local CPU build instead of pulling the CUDA one.
python-deps:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==$(TORCH_VERSION)
	@$(PIP) install -q -e ".[test]"

setup: system-deps python-deps

# `make demo WAV=speech.wav` renders that instead of the demo's own line.
demo: setup
	$(PYTHON) -m inference_pod.cli demo --out demo-output $(if $(WAV),--audio $(WAV))

# Regenerates inference_pod/assets/demo_unet_w4.pth bit for bit (CPU, same torch version and CPU kind).
DEMO_TRAIN_DIR ?= build/demo-train
demo-weights: setup
	$(PYTHON) -m inference_pod.cli package demo --training-set --version train --out $(DEMO_TRAIN_DIR)/demo-train.zip
	$(PYTHON) -m inference_pod.cli train $(DEMO_TRAIN_DIR)/demo-train.zip --out $(DEMO_TRAIN_DIR)/demo-trained.zip \
	  --device cpu --threads 1 --seed 0 --steps $(DEMO_TRAIN_STEPS) --batch-size 4 --learning-rate 2e-3 \
	  --export-unet inference_pod/assets/demo_unet_w4.pth

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m mypy
	lint-imports

# One worker per core; --dist loadfile keeps a file's tests (and its module-scoped servers) on one worker.
# No test keeps pace with a wall clock, so one phase runs them all, in file order. Collecting nothing fails
# it (pytest exits 5, and make stops on any non-zero status).
test: setup browser-deps lint
	$(PYTHON) -m pytest -q -n auto --dist loadfile

# The same suite in a random order (pytest-randomly: files, and tests within a file, shuffled; module-scoped
# servers still shared): every test must pass whatever ran before it. The seed is printed first;
# `make test-random SEED=1234` reruns that order.
test-random: setup browser-deps
	@seed=$(or $(SEED),$$($(PYTHON) -c "import random; print(random.randrange(1 << 31))")); \
	  echo "random order, seed $$seed (make test-random SEED=$$seed replays it)"; \
	  $(PYTHON) -m pytest -q -n auto --dist loadfile -p randomly --randomly-seed=$$seed
