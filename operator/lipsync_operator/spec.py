"""A LipSyncModel's spec, normalised: the CRD's defaults filled in and the cross-field rules checked.

The API server applies the CRD's defaults and CEL rules before the operator sees an object; the operator
applies them again so that it never depends on that (objects stored before a CRD upgrade, other API
servers). tests/operator/test_spec.py checks that these defaults are exactly the CRD's.
"""

from __future__ import annotations

import copy
import re
from typing import Any

QUANTITY = re.compile(r"^(\+)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE])?$")
PERCENT = re.compile(r"^[0-9]{1,3}%$")

METRICS = {"queueDepth": "lipsync_queue_depth", "inflightRequests": "lipsync_inflight_requests"}
# autoscaling.targetSessionUtilization's metric: a pod's live sessions over its runtime.maxSessions.
SESSION_METRIC = "lipsync_sessions_utilization"
NEEDS_MAX_SESSIONS = "autoscaling.targetSessionUtilization needs runtime.maxSessions above 0"

# The CRD's defaults, by path. An object default ({}) makes its children's defaults apply.
DEFAULTS: dict[str, Any] = {
    "package.pullSecret.key": "token",
    "autoscaling.minReplicas": 1,
    "autoscaling.metric": "queueDepth",
    "autoscaling.targetAverageValue": 8,
    "autoscaling.scaleDownStabilizationSeconds": 300,
    "runtime": {},
    "runtime.imagePullPolicy": "IfNotPresent",
    "runtime.device": "cuda",
    "runtime.precision": "fp16",
    "runtime.maxBatch": 32,
    "runtime.maxBatchDelayMs": 5,
    "runtime.logLevel": "INFO",
    "runtime.apiKeysSecret.key": "api-keys",
    "runtime.iceServersSecret.key": "ice-servers",
    "runtime.drainSeconds": 30,
    "runtime.maxSessions": 4,
    "runtime.startupTimeoutSeconds": 600,
    "runtime.nodeStore.enabled": False,
    "resources": {},
    "resources.gpu": {},
    "resources.gpu.resourceName": "nvidia.com/gpu",
    "resources.gpu.count": 1,
    "resources.memory": "8Gi",
    "resources.cpu": "2",
    "resources.sharedMemory": "1Gi",
    "resources.modelsVolume": "4Gi",
    "cache": {},
    "cache.enabled": True,
    "cache.redisSecret.key": "url",
    "scheduling": {},
    "service": {},
    "service.type": "ClusterIP",
    "disruptionBudget": {},
    "disruptionBudget.enabled": True,
    "disruptionBudget.maxUnavailable": 1,
    "monitoring": {},
    "monitoring.enabled": True,
    "monitoring.interval": "15s",
    "placement.minCopies": 1,
    "placement.maxCopies": 4,
    "placement.demandPerCopy": 100,
}

# A LipSyncPool's defaults: its pods' runtime, resources, cache, ... are a LipSyncModel's.
POOL_DEFAULTS: dict[str, Any] = {
    **{path: value for path, value in DEFAULTS.items()
       if path.split(".")[0] in ("autoscaling", "runtime", "resources", "cache", "scheduling", "disruptionBudget",
                                 "monitoring")},
    "capacityFps": 400,
    # Pooled pods hold many models: their templates stay off the GPU (docs/BENCHMARKS.md, template storage).
    "templateStorage": "host",
    "resources.modelsVolume": "64Gi",
}


class InvalidSpec(ValueError):
    """The spec breaks a rule the CRD's schema cannot express (or that an older CRD did not enforce)."""


def with_defaults(spec: dict, defaults: dict[str, Any] = DEFAULTS) -> dict:
    """A copy of ``spec`` with the CRD's defaults applied the way the API server does: parents first,
    and only inside objects that are present."""
    out = copy.deepcopy(spec)
    for path in sorted(defaults, key=lambda p: p.count(".")):
        *parents, leaf = path.split(".")
        node = out
        for key in parents:
            child = node.get(key)
            if not isinstance(child, dict):
                break
            node = child
        else:
            if leaf not in node:
                node[leaf] = copy.deepcopy(defaults[path])
    return out


def _positive_quantity(value: Any, where: str) -> str:
    text = str(value)
    if isinstance(value, bool) or not QUANTITY.match(text) or float(re.sub(r"[A-Za-z]+$", "", text) or 0) <= 0:
        raise InvalidSpec(f"{where} must be a positive quantity, got {value!r}")
    return text


def normalize(spec: dict) -> dict:
    """Defaults applied and cross-field rules checked; raises InvalidSpec with a message for the user."""
    s = with_defaults(spec or {})
    pkg = s.get("package")
    if not isinstance(pkg, dict) or not pkg.get("name"):
        raise InvalidSpec("spec.package.name is required")
    if pkg.get("uri") and pkg.get("registry"):
        raise InvalidSpec("package.uri and package.registry are alternatives")
    if "pool" in s:
        if "replicas" in s or "autoscaling" in s:
            raise InvalidSpec("a pooled model (spec.pool) has no replicas or autoscaling; spec.placement sets its copies")
        s["placement"] = with_defaults({"placement": s.get("placement") or {}})["placement"]
        _check_placement(s["placement"])
    elif "placement" in s:
        raise InvalidSpec("spec.placement needs spec.pool")
    _check_scaling(s, pooled="pool" in s)
    cache = s["cache"]
    if cache.get("redisUrl") and cache.get("redisSecret"):
        raise InvalidSpec("cache.redisUrl and cache.redisSecret are alternatives")
    res = s["resources"]
    for key in ("memory", "cpu", "sharedMemory", "modelsVolume"):
        res[key] = _positive_quantity(res[key], f"resources.{key}")
    budget = s["disruptionBudget"]["maxUnavailable"]
    if isinstance(budget, str) and not PERCENT.match(budget) or isinstance(budget, int) and budget < 0:
        raise InvalidSpec(f"disruptionBudget.maxUnavailable must be a count or a percentage, got {budget!r}")
    return s


def _check_scaling(s: dict, pooled: bool = False) -> None:
    if "replicas" in s and "autoscaling" in s:
        raise InvalidSpec("set either spec.replicas or spec.autoscaling, not both")
    auto = s.get("autoscaling")
    if auto is not None:
        if "maxReplicas" not in auto:
            raise InvalidSpec("spec.autoscaling.maxReplicas is required")
        if auto["minReplicas"] > auto["maxReplicas"]:
            raise InvalidSpec("autoscaling.minReplicas must not exceed autoscaling.maxReplicas")
        auto["targetAverageValue"] = _positive_quantity(auto["targetAverageValue"], "autoscaling.targetAverageValue")
        target = auto.get("targetSessionUtilization")
        if target is not None:
            if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.01 <= target <= 1:
                raise InvalidSpec(f"autoscaling.targetSessionUtilization must be from 0.01 to 1, got {target!r}")
            if not s["runtime"]["maxSessions"]:
                raise InvalidSpec(NEEDS_MAX_SESSIONS)
    elif not pooled:
        s.setdefault("replicas", 1)


def _check_placement(placement: dict) -> None:
    if placement["minCopies"] > placement["maxCopies"]:
        raise InvalidSpec("placement.minCopies must not exceed placement.maxCopies")


def normalize_pool(spec: dict) -> dict:
    """A LipSyncPool's spec with its defaults applied and its rules checked; raises InvalidSpec."""
    s = with_defaults(spec or {}, POOL_DEFAULTS)
    budget = s.get("modelMemoryBudgetMb")
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 64:
        raise InvalidSpec(f"spec.modelMemoryBudgetMb is required: the memory each pod gives its models, in MiB "
                          f"(at least 64), got {budget!r}")
    if isinstance(s["capacityFps"], bool) or not s["capacityFps"] > 0:
        raise InvalidSpec(f"spec.capacityFps must be positive, got {s['capacityFps']!r}")
    _check_scaling(s)
    res = s["resources"]
    for key in ("memory", "cpu", "sharedMemory", "modelsVolume"):
        res[key] = _positive_quantity(res[key], f"resources.{key}")
    return s
