# The entry points, all self-installing: `make demo`, `make serve` and `make test` (see README Quick start).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_VERSION ?= 2.13.0
DEMO_TRAIN_STEPS ?= 500
# The interpreter's scripts folder first on PATH, so `lipsync` is found in an unactivated venv too.
export PATH := $(shell $(PYTHON) -c "import sysconfig; print(sysconfig.get_path('scripts'))"):$(PATH)

.PHONY: setup system-deps browser-deps python-deps demo serve demo-weights test test-random lint images test-images

# nodejs runs the docs' JavaScript examples in tests/cli/test_readme.py; espeak-ng is the demo character's
# voice (training speech, default track, the lip-sync quality gate); redis-server is for the tests (and for
# pods run with --redis-url); ffmpeg muxes the demo's mp4 and decodes compressed audio.
# Each step says what it installs before it starts: apt-get and pip can take minutes.
SYSTEM_PACKAGES := redis-server ffmpeg nodejs espeak-ng
system-deps:
	@command -v redis-server >/dev/null && command -v ffmpeg >/dev/null && command -v node >/dev/null \
	  && command -v espeak-ng >/dev/null || { \
	  echo "make: installing system packages with apt-get: $(SYSTEM_PACKAGES) (a few minutes)"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  (apt-get update -qq && apt-get install -y -qq $(SYSTEM_PACKAGES)) >/dev/null || \
	  (sudo apt-get update -qq && sudo apt-get install -y -qq $(SYSTEM_PACKAGES)) >/dev/null || { \
	    echo "make: could not install $(SYSTEM_PACKAGES): install them yourself (apt-get install ...)"; exit 1; }; \
	  echo "make: installed $(SYSTEM_PACKAGES)"; }

# Headless Chromium for tests/api/test_live_page.py; the test skips (with the reason) when this fails.
browser-deps:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  echo "make: installing chromium and chromium-driver with apt-get, for the live-page test (a few minutes)"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 || \
	  (sudo apt-get update -qq && sudo apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 || \
	  echo "make: chromium could not be installed: the browser test will be skipped"; }

# torch first, pinned, so pip takes the local CPU build instead of pulling the CUDA one.
python-deps:
	@$(PYTHON) -c "import torch" 2>/dev/null || { \
	  echo "make: installing torch==$(TORCH_VERSION) with pip (the CPU build where pip finds it first; minutes)"; \
	  $(PIP) install -q torch==$(TORCH_VERSION); }
	@echo "make: installing this project and its test dependencies with pip (pip install -e \".[test]\")"
	@$(PIP) install -q -e ".[test]"

setup: system-deps python-deps

# A pod with the demo character on free loopback ports, the demo's line played into a live session in real
# time, demo-output/demo.mp4 and PNG frames from what came back; the pod stops when it is done.
# `make demo WAV=speech.wav` plays that instead of the demo's own line.
demo: setup
	$(PYTHON) -m inference_pod.cli demo --out demo-output $(if $(WAV),--audio $(WAV))

# A pod with the demo character until Ctrl-C: gRPC on localhost:50051, the live page on http://localhost:8080/
# (printed when ready). Loopback only and no metrics port (9090 is often a local Prometheus). No Redis needed:
# `make serve REDIS_URL=redis://localhost:6379` uses one. Any other `lipsync serve` flag goes in SERVE_FLAGS,
# e.g. `make serve SERVE_FLAGS="--port 50052 --http-port 8081"` when those ports are taken.
# Ctrl-C drains the pod, which exits 0 (make itself then reports the interrupt, as make does).
SERVE_FLAGS ?=
serve: setup
	$(PYTHON) -m inference_pod.cli serve --demo --paste feather --host 127.0.0.1 --metrics-port 0 $(if $(REDIS_URL),--redis-url $(REDIS_URL)) $(SERVE_FLAGS)

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

# Both images (docs/KUBERNETES.md), with docker where its daemon answers, else podman. BASE_IMAGE picks the
# inference image's torch base (empty: the Dockerfile's CUDA default; a CPU torch image for kind and CPU
# clusters); PYTHON_IMAGE the operator's Python. podman reads docker/containers.conf, the settings a host like
# the CI machine needs (runc, cgroupfs, the caller's ulimits, host network); set CONTAINERS_CONF to use yours.
CONTAINER_ENGINE ?= $(shell docker info >/dev/null 2>&1 && echo docker || { command -v podman >/dev/null && echo podman; } || echo docker)
IMAGE_TAG ?= 0.1.0
BASE_IMAGE ?=
PYTHON_IMAGE ?=
ENGINE_BUILD = $(CONTAINER_ENGINE) build $(if $(filter podman,$(CONTAINER_ENGINE)),--network host --ignorefile $(1).dockerignore) -f $(1)
images test-images: export CONTAINERS_CONF ?= $(CURDIR)/docker/containers.conf
images:
	$(call ENGINE_BUILD,docker/operator.Dockerfile) $(if $(PYTHON_IMAGE),--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE)) \
	  -t lipsync-operator:$(IMAGE_TAG) .
	$(call ENGINE_BUILD,docker/inference.Dockerfile) $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) \
	  -t lipsync-inference:$(IMAGE_TAG) .

# Builds both images on local bases (no image registry: debootstrap, Debian's Python, the CPU torch wheel)
# and runs the chain in containers: e2e/test_images.py (the project installed first unless `make test` did). Installs podman, runc, catatonit and debootstrap when
# missing (as root, or with sudo).
test-images:
	@$(PYTHON) -c "import inference_pod, kmock, helm_python, sys; sys.exit(not inference_pod.__file__.startswith('$(CURDIR)/'))" \
	  2>/dev/null || $(MAKE) python-deps
	@command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null && command -v catatonit >/dev/null || { \
	  echo "test-images: installing podman, runc, catatonit (the pods' pause process) and debootstrap (apt)"; export DEBIAN_FRONTEND=noninteractive; \
	  (apt-get update -qq && apt-get install -y -qq --no-install-recommends podman runc catatonit debootstrap) >/dev/null || \
	  (sudo apt-get update -qq && sudo apt-get install -y -qq --no-install-recommends podman runc catatonit debootstrap) >/dev/null || \
	  { echo "test-images: FAILED: podman, runc, catatonit or debootstrap could not be installed with apt"; exit 1; }; }
	PYTHON=$(PYTHON) TORCH_VERSION=$(TORCH_VERSION) docker/base/build-local-bases.sh
	$(MAKE) images CONTAINER_ENGINE=podman BASE_IMAGE=localhost/lipsync-torch-cpu:$(TORCH_VERSION) \
	  PYTHON_IMAGE=localhost/lipsync-python:bookworm IMAGE_TAG=$(IMAGE_TAG)
	IMAGE_TAG=$(IMAGE_TAG) $(PYTHON) -m pytest -q -p no:cacheprovider -s e2e/test_images.py
