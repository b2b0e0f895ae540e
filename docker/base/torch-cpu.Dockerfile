# A CPU PyTorch base for the inference image (its BASE_IMAGE), for kind and CPU-only clusters:
#   docker build -f docker/base/torch-cpu.Dockerfile -t lipsync-torch-cpu:2.13.0 <context>
# The context's wheels/ folder may hold the CPU torch wheel (then nothing big is downloaded); otherwise pip
# finds it on the index given as PIP_EXTRA_INDEX_URL (PyTorch's CPU wheel index), a build argument.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}
ARG TORCH_VERSION=2.13.0
ARG PIP_EXTRA_INDEX_URL=
COPY wheels/ /tmp/wheels/
RUN pip install --no-cache-dir --find-links /tmp/wheels "torch==${TORCH_VERSION}" \
 && rm -rf /tmp/wheels \
 && python -c "import torch; assert torch.version.cuda is None, 'not a CPU build: ' + torch.__version__"
