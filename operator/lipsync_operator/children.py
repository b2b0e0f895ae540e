"""The objects a LipSyncModel owns, as plain manifests built from its normalised spec.

Every function here is pure: (owner, spec, resolved package, operator config) -> manifest. The manifests
carry only the fields the operator owns; server-side apply merges them with what others own (the HPA's
replica count, the API server's defaults, a `kubectl rollout restart` annotation).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

from lipsync_operator.config import API_VERSION, KIND, OPERATOR_NAME, OperatorConfig
from lipsync_operator.spec import METRICS, SESSION_METRIC

GRPC_PORT, HTTP_PORT, METRICS_PORT = 50051, 8080, 9090
MODELS_DIR = "/models"
API_KEYS_DIR = "/etc/lipsync/api-keys"
RUN_AS = 10001                      # the inference image's non-root user (docker/inference.Dockerfile)
PRESTOP_SECONDS = 5                 # endpoints controllers and kube-proxy catch up before SIGTERM
MODEL_LABEL = "synctalk.io/model"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"


class PackageRef(Protocol):
    """What a Deployment names of its package: a resolved registry.PackageCheck, or none (a pool pod)."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def sha256(self) -> str: ...
    @property
    def registry(self) -> str: ...


def selector_labels(name: str) -> dict[str, str]:
    # Immutable once the Deployment exists: never add to these.
    return {"app.kubernetes.io/name": "lipsync-inference", MODEL_LABEL: name}


def labels(name: str) -> dict[str, str]:
    return {**selector_labels(name), "app.kubernetes.io/component": "inference",
            "app.kubernetes.io/part-of": "lipsync", MANAGED_BY_LABEL: OPERATOR_NAME}


def selector_string(name: str) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(name).items()))


def endpoint(name: str, namespace: str) -> str:
    return f"{name}.{namespace}.svc:{GRPC_PORT}"


def owner_reference(owner: dict) -> dict:
    meta = owner["metadata"]
    return {"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}


def _metadata(owner: dict, extra_labels: dict[str, str] | None = None, annotations: dict | None = None) -> dict:
    meta = owner["metadata"]
    out = {"name": meta["name"], "namespace": meta["namespace"],
           "labels": {**labels(meta["name"]), **(extra_labels or {})},
           "ownerReferences": [owner_reference(owner)]}
    if annotations:
        out["annotations"] = dict(annotations)
    return out


def _restricted_security_context(read_only_root: bool = True) -> dict:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": read_only_root,
            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}


def _secret_env(name: str, secret: dict) -> dict:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret["name"], "key": secret["key"]}}}


def server_args(spec: dict, package: PackageRef) -> list[str]:
    rt, cache = spec["runtime"], spec["cache"]
    args = ["serve", "--port", str(GRPC_PORT), "--metrics-port", str(METRICS_PORT), "--http-port", str(HTTP_PORT),
            "--models-dir", MODELS_DIR, "--device", rt["device"], "--precision", rt["precision"],
            "--max-batch", str(rt["maxBatch"]), "--max-batch-delay-ms", f"{rt['maxBatchDelayMs']:g}",
            "--max-sessions", str(rt["maxSessions"])]
    if rt.get("memoryBudgetMb"):
        args += ["--memory-budget-mb", str(rt["memoryBudgetMb"])]
    if rt.get("templateStorage"):
        args += ["--template-storage", rt["templateStorage"]]
    if package.registry:
        args += ["--registry-url", package.registry]
    if cache.get("frameTtlSeconds") is not None:
        args += ["--frame-cache-ttl", str(cache["frameTtlSeconds"])]
    if cache.get("featureTtlSeconds") is not None:
        args += ["--feature-cache-ttl", str(cache["featureTtlSeconds"])]
    if rt.get("apiKeysSecret"):
        args += ["--api-keys-file", f"{API_KEYS_DIR}/{rt['apiKeysSecret']['key']}"]
    return args + ["--preload", package.name]


def fetch_args(package: PackageRef) -> list[str]:
    return ["lipsync", "package", "fetch", package.name, "--registry", package.registry,
            "--version", package.version, "--sha256", package.sha256, "--out", MODELS_DIR, "--prepare"]


def node_store_volume(namespace: str, config: OperatorConfig) -> dict:
    """The models volume of pods with runtime.nodeStore: the node's directory for their namespace, shared by
    every such pod on the node (same files, so one copy in the page cache). Created by the kubelet if absent."""
    return {"name": "models", "hostPath": {"path": config.node_store_path(namespace), "type": "DirectoryOrCreate"}}


def node_store_owner(image: str, pull_policy: str) -> dict:
    """The kubelet creates a hostPath directory owned by root, and fsGroup does not apply to hostPath volumes:
    this init container hands the directory (not its contents) to the pods' user. It runs as root with
    CHOWN as its one capability, no shell, and nothing else mounted."""
    return {
        "name": "own-node-store",
        "image": image,
        "imagePullPolicy": pull_policy,
        "command": ["chown", f"{RUN_AS}:{RUN_AS}", MODELS_DIR],
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "runAsNonRoot": False, "runAsUser": 0, "runAsGroup": 0,
                            "capabilities": {"drop": ["ALL"], "add": ["CHOWN"]}},
        "volumeMounts": [{"name": "models", "mountPath": MODELS_DIR}],
    }


def _redis_env(spec: dict, config: OperatorConfig) -> list[dict]:
    cache = spec["cache"]
    if not cache["enabled"]:
        return []
    if cache.get("redisSecret"):
        return [_secret_env("LIPSYNC_REDIS_URL", cache["redisSecret"])]
    url = cache.get("redisUrl") or config.default_redis_url
    return [{"name": "LIPSYNC_REDIS_URL", "value": url}] if url else []


def deployment(owner: dict, spec: dict, package: PackageRef, config: OperatorConfig) -> dict:
    name = owner["metadata"]["name"]
    rt, res, sched = spec["runtime"], spec["resources"], spec["scheduling"]
    image = rt.get("image") or config.inference_image
    gpu = res["gpu"]

    limits = {"memory": res["memory"]}
    if gpu["count"] > 0:
        # Extended resources are limits only (the request follows); MIG and time-sliced shares are just names.
        limits[gpu["resourceName"]] = gpu["count"]
    tmp_mount = {"name": "tmp", "mountPath": "/tmp"}
    models_mount = {"name": "models", "mountPath": MODELS_DIR}
    common_env = [{"name": "HOME", "value": "/tmp"}, {"name": "XDG_CACHE_HOME", "value": "/tmp/.cache"}]

    init_env = list(common_env)
    if spec["package"].get("pullSecret"):
        init_env.append(_secret_env("LIPSYNC_REGISTRY_TOKEN", spec["package"]["pullSecret"]))
    fetch = {
        "name": "fetch-package",
        "image": image,
        "imagePullPolicy": rt["imagePullPolicy"],
        "command": fetch_args(package),
        "env": init_env,
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "securityContext": _restricted_security_context(),
        "volumeMounts": [models_mount, tmp_mount],
    }

    env = [*common_env,
           {"name": "LIPSYNC_LOG_LEVEL", "value": rt["logLevel"]},
           {"name": "LIPSYNC_SHUTDOWN_GRACE_S", "value": str(rt["drainSeconds"])},
           {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
           {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
           *_redis_env(spec, config)]
    if rt.get("iceServersSecret"):  # WebRTC's STUN/TURN servers: TURN credentials stay in the Secret
        env.append(_secret_env("LIPSYNC_ICE_SERVER", rt["iceServersSecret"]))
    mounts: list[dict[str, Any]] = [models_mount, tmp_mount, {"name": "dshm", "mountPath": "/dev/shm"}]
    node_store = bool((rt.get("nodeStore") or {}).get("enabled"))
    volumes: list[dict[str, Any]] = [
        node_store_volume(owner["metadata"]["namespace"], config) if node_store
        else {"name": "models", "emptyDir": {"sizeLimit": res["modelsVolume"]}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": res["sharedMemory"]}},
    ]
    if rt.get("apiKeysSecret"):
        mounts.append({"name": "api-keys", "mountPath": API_KEYS_DIR, "readOnly": True})
        volumes.append({"name": "api-keys", "secret": {"secretName": rt["apiKeysSecret"]["name"],
                                                       "defaultMode": 0o440}})

    grpc_probe = {"grpc": {"port": GRPC_PORT}}
    server = {
        "name": "server",
        "image": image,
        "imagePullPolicy": rt["imagePullPolicy"],
        "command": ["lipsync"],
        "args": server_args(spec, package),
        "env": env,
        "ports": [{"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
                  {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        # Loading a model can take minutes: the startup probe holds liveness off until the first SERVING.
        "startupProbe": {**grpc_probe, "periodSeconds": 5, "timeoutSeconds": 3,
                         "failureThreshold": math.ceil(rt["startupTimeoutSeconds"] / 5)},
        "readinessProbe": {**grpc_probe, "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 2},
        "livenessProbe": {**grpc_probe, "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3},
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_SECONDS)]}}},
        "resources": {"requests": {"cpu": res["cpu"], "memory": res["memory"]}, "limits": limits},
        "securityContext": _restricted_security_context(),
        "volumeMounts": mounts,
    }

    pod_spec: dict = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        # preStop + the server's drain + a margin before SIGKILL.
        "terminationGracePeriodSeconds": PRESTOP_SECONDS + rt["drainSeconds"] + 10,
        "initContainers": [*([node_store_owner(image, rt["imagePullPolicy"])] if node_store else []), fetch],
        "containers": [server],
        "volumes": volumes,
        "topologySpreadConstraints": [{
            "maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": selector_labels(name)}}],
    }
    if rt.get("imagePullSecrets"):
        pod_spec["imagePullSecrets"] = [{"name": n} for n in rt["imagePullSecrets"]]
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
        if sched.get(key):
            pod_spec[key] = sched[key]

    dep_spec: dict = {
        "selector": {"matchLabels": selector_labels(name)},
        "revisionHistoryLimit": 5,
        # Image pull, package download and model load all count against the deadline.
        "progressDeadlineSeconds": rt["startupTimeoutSeconds"] + 600,
        # Never below the current capacity: a new pod loads its model before an old one goes.
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        "template": {
            "metadata": {
                "labels": labels(name),
                "annotations": {
                    "synctalk.io/package": f"{package.name}@{package.version}",
                    "synctalk.io/package-sha256": package.sha256,
                    "prometheus.io/scrape": "true",
                    "prometheus.io/port": str(METRICS_PORT),
                    "prometheus.io/path": "/metrics",
                },
            },
            "spec": pod_spec,
        },
    }
    if "autoscaling" not in spec:
        dep_spec["replicas"] = spec["replicas"]   # with autoscaling the HPA owns the count
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _metadata(owner), "spec": dep_spec}


def service(owner: dict, spec: dict) -> dict:
    name = owner["metadata"]["name"]
    svc = spec["service"]
    headless = svc["type"] == "Headless"
    body: dict = {
        "type": "ClusterIP" if headless else svc["type"],
        "selector": selector_labels(name),
        "ports": [
            {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP",
             "appProtocol": "kubernetes.io/h2c"},
            {"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP", "appProtocol": "http"},
            {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP",
             "appProtocol": "http"},
        ],
    }
    if headless:
        body["clusterIP"] = "None"   # one A record per ready pod: clients balance across their connections
    return {"apiVersion": "v1", "kind": "Service", "metadata": _metadata(owner, annotations=svc.get("annotations")),
            "spec": body}


def horizontal_pod_autoscaler(owner: dict, spec: dict) -> dict:
    name = owner["metadata"]["name"]
    auto = spec["autoscaling"]
    return {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": _metadata(owner),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": auto["minReplicas"],
            "maxReplicas": auto["maxReplicas"],
            "metrics": [_pods_metric(METRICS[auto["metric"]], str(auto["targetAverageValue"]))] + (
                # Live sessions over capacity too: the HPA follows whichever metric asks for more pods.
                [_pods_metric(SESSION_METRIC, f"{round(auto['targetSessionUtilization'] * 1000)}m")]
                if auto.get("targetSessionUtilization") else []),
            "behavior": {
                # Queues grow fast under a burst; new GPU pods take a while to load, so add them early.
                "scaleUp": {"stabilizationWindowSeconds": 0, "selectPolicy": "Max", "policies": [
                    {"type": "Pods", "value": 4, "periodSeconds": 60},
                    {"type": "Percent", "value": 100, "periodSeconds": 60}]},
                "scaleDown": {"stabilizationWindowSeconds": auto["scaleDownStabilizationSeconds"],
                              "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}]},
            },
        },
    }


def _pods_metric(name: str, average: str) -> dict:
    return {"type": "Pods", "pods": {"metric": {"name": name}, "target": {"type": "AverageValue", "averageValue": average}}}


def pod_disruption_budget(owner: dict, spec: dict) -> dict:
    name = owner["metadata"]["name"]
    return {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _metadata(owner),
        "spec": {"selector": {"matchLabels": selector_labels(name)},
                 "maxUnavailable": spec["disruptionBudget"]["maxUnavailable"],
                 # A crash-looping pod must not block node drains.
                 "unhealthyPodEvictionPolicy": "AlwaysAllow"},
    }


def pod_monitor(owner: dict, spec: dict, config: OperatorConfig) -> dict:
    name = owner["metadata"]["name"]
    return {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
        "metadata": _metadata(owner, extra_labels=config.monitor_labels),
        "spec": {
            "selector": {"matchLabels": selector_labels(name)},
            "podMetricsEndpoints": [{
                "port": "metrics", "path": "/metrics", "interval": spec["monitoring"]["interval"],
                # The dashboard and the adapter rules group by this label.
                "relabelings": [{"sourceLabels": ["__meta_kubernetes_pod_label_synctalk_io_model"],
                                 "targetLabel": "lipsyncmodel"}],
            }],
        },
    }
