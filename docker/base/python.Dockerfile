# A Python base without any image registry: Debian's python3 and pip on a bookworm root that
# docker/base/build-local-bases.sh makes with debootstrap and imports (DEBIAN_IMAGE).
# It stands in for python:3.11-slim-bookworm (the operator image's PYTHON_IMAGE) and under the CPU torch base.
ARG DEBIAN_IMAGE=localhost/lipsync-bookworm:minbase
FROM ${DEBIAN_IMAGE}

# The images install into the system Python, as the official python images do (Debian marks it
# externally managed; there is no other Python in the image to protect).
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-pip python-is-python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# EXTRA_CA_CERTS: a PEM bundle in the build context added to the system trust store, which Debian's pip
# reads. Behind a TLS-inspecting proxy this is the host's own bundle (where SSL_CERT_FILE/PIP_CERT point);
# elsewhere an empty file.
ARG EXTRA_CA_CERTS=extra-ca-certs.pem
COPY ${EXTRA_CA_CERTS} /usr/local/share/ca-certificates/extra-ca-certs.crt
RUN update-ca-certificates >/dev/null && python -m pip --version
