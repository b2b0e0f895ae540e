# syntax=docker/dockerfile:1.7
# The inference pod: a CUDA PyTorch runtime plus this project's `lipsync` CLI (gRPC 50051, HTTP 8080,
# metrics 9090). The operator runs it as `lipsync serve ...` and, in the init container, as
# `lipsync package fetch ...`.
#   docker build -f docker/inference.Dockerfile -t lipsync-inference:0.1.0 .
# Pick a pytorch/pytorch tag whose CUDA version your nodes' driver supports (BASE_IMAGE build arg).
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime

FROM ${BASE_IMAGE} AS build
WORKDIR /src
RUN pip install --no-cache-dir "setuptools>=69" wheel "grpcio-tools>=1.60"
COPY pyproject.toml setup.py README.md ./
COPY proto ./proto
COPY inference_pod ./inference_pod
# The build hook (setup.py) generates the gRPC stubs from proto/ into the wheel.
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .

FROM ${BASE_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache
COPY --from=build /wheels /wheels
# The base image's torch satisfies the project's torch requirement, so pip keeps it (and its CUDA build).
RUN pip install /wheels/*.whl \
 && rm -rf /wheels \
 && python -c "import torch, inference_pod, lipsync.v1.lipsync_pb2_grpc" \
 && lipsync --help >/dev/null \
 && mkdir -p /models && chown 10001:10001 /models

# Non-root, as the operator's pods require (runAsNonRoot, runAsUser 10001); /models and /tmp are volumes there.
# /models exists in the image too, so a bare `docker run` starts (serve refuses a --models-dir that is missing).
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051 8080 9090
ENTRYPOINT ["lipsync"]
CMD ["serve", "--port", "50051", "--metrics-port", "9090", "--http-port", "8080", "--models-dir", "/models"]
