# syntax=docker/dockerfile:1.7
# The LipSyncModel operator: kopf, the lipsync_operator package and the pod's stdlib-only registry index reader;
# none of the inference stack.
#   docker build -f docker/operator.Dockerfile -t lipsync-operator:0.1.0 .
# (or `make images`). PYTHON_IMAGE: any Debian-based Python 3.10+ image with pip (build arg).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# The gRPC stubs the operator uses to call pool pods (LoadModel, UnloadModel, GetStats), from proto/, by
# grpcio-tools of the grpcio version the image runs (read from the one requirements file: stubs refuse a
# grpcio older than the tools that generated them).
FROM ${PYTHON_IMAGE} AS stubs
COPY docker/operator-requirements.txt /tmp/requirements.txt
RUN grpcio=$(sed -n 's/^grpcio==//p' /tmp/requirements.txt) && test -n "$grpcio" \
 && pip install --no-cache-dir --constraint /tmp/requirements.txt "grpcio-tools==$grpcio"
COPY proto/lipsync /src/lipsync
RUN mkdir /out && python -m grpc_tools.protoc -I/src --python_out=/out --grpc_python_out=/out \
      /src/lipsync/v1/lipsync.proto \
 && touch /out/lipsync/__init__.py /out/lipsync/v1/__init__.py

FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app

COPY docker/operator-requirements.txt /tmp/requirements.txt
RUN pip install --requirement /tmp/requirements.txt && rm /tmp/requirements.txt

COPY --from=stubs /out/lipsync /app/lipsync
COPY operator/lipsync_operator /app/lipsync_operator
# The registry index reader the pod uses too (standard library only); inference_pod/__init__.py imports nothing.
COPY inference_pod/__init__.py inference_pod/registry_index.py /app/inference_pod/
# Compiled now: the container runs with a read-only root filesystem.
RUN python -m compileall -q /app/lipsync /app/lipsync_operator /app/inference_pod \
 && python -c "import lipsync_operator.handlers, lipsync.v1.lipsync_pb2_grpc"

# The chart runs it as 10001 with runAsNonRoot; no shell login, no home needed.
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["kopf"]
CMD ["run", "--module=lipsync_operator.handlers", "--standalone", "--all-namespaces", "--liveness=http://0.0.0.0:8080/healthz"]
