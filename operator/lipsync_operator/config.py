"""Operator-wide settings, read once from ``LIPSYNC_OPERATOR_*`` environment variables (the chart sets them)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from lipsync_operator.egress import RegistryPolicy
from lipsync_operator.images import ImagePolicy, repository

ENV_PREFIX = "LIPSYNC_OPERATOR_"

GROUP = "synctalk.io"
VERSION = "v1alpha1"
PLURAL = "lipsyncmodels"
KIND = "LipSyncModel"
API_VERSION = f"{GROUP}/{VERSION}"

OPERATOR_NAME = "lipsync-operator"
FIELD_MANAGER = OPERATOR_NAME
FINALIZER = f"{GROUP}/{OPERATOR_NAME}"


def _list(text: str) -> tuple[str, ...]:
    """``a, b`` -> ("a", "b"); blanks ignored."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _labels(text: str) -> dict[str, str]:
    """``k1=v1,k2=v2`` -> dict; blanks ignored."""
    out: dict[str, str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


# An absolute host path of plain segments: no "." or "..", nothing a shell or a YAML reader treats specially.
NODE_STORE_ROOT = re.compile(r"^(/[A-Za-z0-9_][A-Za-z0-9._-]*)+/?$")
# Directories a node store must not be under: the pods' init container makes its directory theirs.
SYSTEM_DIRS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/root", "/run", "/sbin", "/sys",
               "/usr", "/var/run", "/var/lib/kubelet", "/var/lib/containerd", "/var/lib/docker")


def check_node_store_root(root: str) -> None:
    """Raises ValueError naming the setting: the operator refuses to start with a root that could hand a
    system directory to the pods."""
    if not NODE_STORE_ROOT.match(root) or len(root) > 200:
        raise ValueError(f"{ENV_PREFIX}NODE_STORE_ROOT={root!r} is not an absolute path of plain segments "
                         "(letters, digits, '.', '_', '-'; no '.' or '..' segments)")
    clean = root.rstrip("/")
    if any(clean == d or clean.startswith(d + "/") for d in SYSTEM_DIRS):
        raise ValueError(f"{ENV_PREFIX}NODE_STORE_ROOT={root!r} is a system directory; use a directory of "
                         "its own, such as /var/lib/lipsync/store")


@dataclass(frozen=True)
class OperatorConfig:
    registry_url: str = ""                 # default package registry for resources that name none
    inference_image: str = "lipsync-inference:0.1.0"
    default_redis_url: str = ""            # e.g. the chart's Redis; used when a resource names none
    monitor_labels: dict[str, str] = field(default_factory=dict)   # labels Prometheus selects PodMonitors by
    retry_base_seconds: float = 5.0        # package-check backoff: base * 2**retry, capped
    retry_max_seconds: float = 300.0
    http_timeout_seconds: float = 5.0      # registry index and package HEAD requests
    api_timeout_seconds: float = 30.0      # Kubernetes API requests
    pool_interval_seconds: float = 15.0    # how often each LipSyncPool's placement is reconsidered
    pod_grpc_port: int = 50051             # where the operator reaches pool pods (their gRPC port)
    # Registries a resource may name (egress.AllowedRegistry forms), besides registry_url itself, which is
    # always allowed: empty means that registry only (docs/KUBERNETES.md, "What a resource may name").
    allowed_registries: tuple[str, ...] = ()
    # Image repositories a resource may run (``repo`` or ``prefix/*``), besides inference_image's own.
    allowed_images: tuple[str, ...] = ()
    # The node directory under which resources with runtime.nodeStore share extracted packages, one
    # subdirectory per namespace (docs/KUBERNETES.md, "A node-local store"): empty means none may.
    node_store_root: str = ""

    def __post_init__(self) -> None:
        self.registry_policy()   # a malformed entry stops the operator at start, with the entry named
        self.image_policy()
        if self.node_store_root:
            check_node_store_root(self.node_store_root)

    def node_store_path(self, namespace: str) -> str:
        """The host directory a namespace's pods share: the root's subdirectory of that name, so that one
        namespace's pods never see another's packages."""
        return f"{self.node_store_root.rstrip('/')}/{namespace}"

    def registry_policy(self) -> RegistryPolicy:
        """The allow-list the operator fetches under: the default registry (named exactly) and the entries."""
        return RegistryPolicy([*([self.registry_url] if self.registry_url else []), *self.allowed_registries])

    def image_policy(self) -> ImagePolicy:
        """The repositories a resource may run: the default image's and the entries."""
        return ImagePolicy([repository(self.inference_image), *self.allowed_images])

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        env = os.environ if env is None else env

        def get(name: str, default):
            raw = env.get(ENV_PREFIX + name)
            if raw is None or raw == "":
                return default
            try:
                return type(default)(raw)
            except ValueError:
                raise ValueError(f"{ENV_PREFIX}{name}={raw!r} is not a valid {type(default).__name__}") from None

        defaults = cls()
        return cls(
            registry_url=get("REGISTRY_URL", defaults.registry_url),
            inference_image=get("INFERENCE_IMAGE", defaults.inference_image),
            default_redis_url=get("DEFAULT_REDIS_URL", defaults.default_redis_url),
            monitor_labels=_labels(env.get(ENV_PREFIX + "MONITOR_LABELS", "")),
            retry_base_seconds=get("RETRY_BASE_SECONDS", defaults.retry_base_seconds),
            retry_max_seconds=get("RETRY_MAX_SECONDS", defaults.retry_max_seconds),
            http_timeout_seconds=get("HTTP_TIMEOUT_SECONDS", defaults.http_timeout_seconds),
            api_timeout_seconds=get("API_TIMEOUT_SECONDS", defaults.api_timeout_seconds),
            pool_interval_seconds=get("POOL_INTERVAL_SECONDS", defaults.pool_interval_seconds),
            pod_grpc_port=get("POD_GRPC_PORT", defaults.pod_grpc_port),
            allowed_registries=_list(env.get(ENV_PREFIX + "ALLOWED_REGISTRIES", "")),
            allowed_images=_list(env.get(ENV_PREFIX + "ALLOWED_IMAGES", "")),
            node_store_root=get("NODE_STORE_ROOT", defaults.node_store_root),
        )

    def backoff(self, retry: int) -> float:
        """Delay before retry number ``retry`` (0-based): exponential, capped."""
        return min(self.retry_max_seconds, self.retry_base_seconds * (2 ** min(retry, 30)))
