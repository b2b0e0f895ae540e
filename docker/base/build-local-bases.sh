#!/usr/bin/env bash
# Builds, with podman and no image registry, the base images the project's Dockerfiles start from:
#   localhost/lipsync-bookworm:minbase   a Debian bookworm root (debootstrap --variant=minbase, from the
#                                        mirror apt already uses here), imported with `podman import`
#   localhost/lipsync-python:bookworm    Debian's python3 and pip on it   (the operator's PYTHON_IMAGE)
#   localhost/lipsync-torch-cpu:TORCH    the CPU torch wheel on that      (the inference image's BASE_IMAGE)
# Each is kept in podman's storage; a second run reuses them (podman's layer cache), so only the first run
# on a machine pays for debootstrap. Work files go to $WORK (default build/images).
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${WORK:-build/images}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PYTHON=${PYTHON:-python3}
DEBIAN_IMAGE=localhost/lipsync-bookworm:minbase
PYTHON_IMAGE=localhost/lipsync-python:bookworm
TORCH_IMAGE=localhost/lipsync-torch-cpu:$TORCH_VERSION
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/docker/containers.conf}
mkdir -p "$WORK"

took() { echo "== $1: $(( $(date +%s) - $2 )) s"; }

# podman build with its output in a log; on failure the log's end and one line saying what failed.
build() {
  local log="$WORK/$1.log"; shift
  podman build --network host "$@" >"$log" 2>&1 || {
    tail -n 20 "$log" >&2; echo "IMAGES FAILED: podman build $* (log: $log)" >&2; exit 1; }
}

# The Debian mirror apt is configured with (deb822 sources first, then the classic list).
apt_mirror() {
  { awk '/^URIs:/ {print $2}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true
    awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; break}}' \
      /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true
  } | grep -v -- '-security' | head -n 1 || true
}

if ! podman image exists "$DEBIAN_IMAGE"; then
  start=$(date +%s)
  mirror=$(apt_mirror)
  [ -n "$mirror" ] || { echo "IMAGES FAILED: no Debian mirror in apt's sources to debootstrap from" >&2; exit 1; }
  rm -rf "$WORK/rootfs"
  debootstrap --variant=minbase bookworm "$WORK/rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 || {
    echo "IMAGES FAILED: debootstrap bookworm from $mirror failed; see $WORK/debootstrap.log" >&2; exit 1; }
  rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
  tar -C "$WORK/rootfs" -c . | podman import --quiet - "$DEBIAN_IMAGE" >/dev/null
  rm -rf "$WORK/rootfs"
  took "debian root ($DEBIAN_IMAGE)" "$start"
fi

# The build-time CA bundle: the one this host's TLS clients are told to use, if any.
mkdir -p "$WORK/python-context"
ca=${SSL_CERT_FILE:-${PIP_CERT:-}}
if [ -n "$ca" ] && [ -f "$ca" ]; then cp "$ca" "$WORK/python-context/extra-ca-certs.pem"; else
  : >"$WORK/python-context/extra-ca-certs.pem"; fi
start=$(date +%s)
build python-base -f docker/base/python.Dockerfile --build-arg DEBIAN_IMAGE="$DEBIAN_IMAGE" \
  --build-arg EXTRA_CA_CERTS=extra-ca-certs.pem -t "$PYTHON_IMAGE" "$WORK/python-context"
took "python base ($PYTHON_IMAGE)" "$start"

# The CPU torch wheel from wherever pip finds it here (its find-links or cache), never a CUDA build.
rm -rf "$WORK/torch-context" && mkdir -p "$WORK/torch-context/wheels"
"$PYTHON" -m pip download --quiet --no-deps --only-binary :all: --python-version 3.11 \
  -d "$WORK/torch-context/wheels" "torch==$TORCH_VERSION"
wheel=$(ls "$WORK"/torch-context/wheels/torch-*.whl)
case "$wheel" in *+cpu*) ;; *) echo "IMAGES FAILED: pip found no CPU build of torch $TORCH_VERSION (got $wheel)" >&2
  exit 1 ;; esac
start=$(date +%s)
build torch-cpu-base -f docker/base/torch-cpu.Dockerfile --build-arg PYTHON_IMAGE="$PYTHON_IMAGE" \
  --build-arg TORCH_VERSION="$TORCH_VERSION" -t "$TORCH_IMAGE" "$WORK/torch-context"
took "CPU torch base ($TORCH_IMAGE)" "$start"
