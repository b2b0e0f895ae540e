"""A LipSyncPool's children (Deployment, HPA, PDB, PodMonitor) and a pooled model's Service, as plain manifests.

Pure functions, like lipsync_operator.children, whose manifests they reuse: a pool pod is a dedicated model's
pod without a package. A pooled model's Service selects the pool pods labelled
``models.synctalk.io/<model>: "true"`` (set by the placement rounds, lipsync_operator.pool).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from lipsync_operator import children
from lipsync_operator.config import API_VERSION, OPERATOR_NAME, OperatorConfig

POOL_LABEL = "synctalk.io/pool"
MODEL_LABEL_PREFIX = "models.synctalk.io/"
POOL_KIND = "LipSyncPool"


def model_label(model: str) -> str:
    return MODEL_LABEL_PREFIX + model


def pool_selector_labels(pool: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "lipsync-inference", POOL_LABEL: pool}


def selector_string(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def model_service_selector(pool: str, model: str) -> dict[str, str]:
    return {**pool_selector_labels(pool), model_label(model): "true"}



def _pool_metadata(owner: dict, labels: dict[str, str] | None = None) -> dict:
    meta = owner["metadata"]
    return {"name": meta["name"], "namespace": meta["namespace"],
            "labels": {**pool_selector_labels(meta["name"]), "app.kubernetes.io/component": "inference",
                       "app.kubernetes.io/part-of": "lipsync", children.MANAGED_BY_LABEL: OPERATOR_NAME,
                       **(labels or {})},
            "ownerReferences": [{"apiVersion": API_VERSION, "kind": POOL_KIND, "name": meta["name"],
                                 "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}]}


@dataclass(frozen=True)
class _NoPackage:
    """A pool pod preloads nothing: the dedicated pod's manifest, without a package."""
    registry: str
    name: str = ""
    version: str = ""
    sha256: str = ""


def pool_deployment(owner: dict, spec: dict, config: OperatorConfig) -> dict:
    """A dedicated model's Deployment, less its package: no fetch init container, no --preload; the pods
    load what the operator asks for from the registry, within the pool's model memory budget."""
    name = owner["metadata"]["name"]
    as_model = {**copy.deepcopy(spec), "package": {}}
    as_model["runtime"]["memoryBudgetMb"] = spec["modelMemoryBudgetMb"]
    as_model["runtime"]["templateStorage"] = spec["templateStorage"]
    dep = children.deployment({**owner, "metadata": {**owner["metadata"]}}, as_model,
                              _NoPackage(registry=config.registry_url), config)
    pod = dep["spec"]["template"]
    server = pod["spec"]["containers"][0]
    if server["args"][-2:-1] == ["--preload"]:
        server["args"] = server["args"][:-2]
    init = [c for c in pod["spec"].pop("initContainers", []) if c["name"] != "fetch-package"]
    if init:  # a node store's owner step stays
        pod["spec"]["initContainers"] = init
    pod["metadata"]["labels"] = _pool_metadata(owner)["labels"]
    pod["metadata"]["annotations"] = {k: v for k, v in pod["metadata"]["annotations"].items()
                                      if not k.startswith("synctalk.io/package")}
    pod["spec"]["topologySpreadConstraints"][0]["labelSelector"] = {"matchLabels": pool_selector_labels(name)}
    dep["metadata"] = _pool_metadata(owner)
    dep["spec"]["selector"] = {"matchLabels": pool_selector_labels(name)}
    return dep


def pool_hpa(owner: dict, spec: dict, min_pods: int) -> dict:
    hpa = children.horizontal_pod_autoscaler(owner, spec)
    hpa["metadata"] = _pool_metadata(owner)
    auto = spec["autoscaling"]
    # Never below what the copies need in memory; never above the pool's maximum.
    hpa["spec"]["minReplicas"] = max(auto["minReplicas"], min(auto["maxReplicas"], min_pods))
    return hpa


def pool_pdb(owner: dict, spec: dict) -> dict:
    pdb = children.pod_disruption_budget(owner, spec)
    pdb["metadata"] = _pool_metadata(owner)
    pdb["spec"]["selector"] = {"matchLabels": pool_selector_labels(owner["metadata"]["name"])}
    return pdb


def pool_pod_monitor(owner: dict, spec: dict, config: OperatorConfig) -> dict:
    """Scrapes the pool's pods; the dashboard's pool view groups them by the ``lipsyncpool`` label."""
    monitor = children.pod_monitor(owner, spec, config)
    monitor["metadata"] = _pool_metadata(owner, config.monitor_labels)
    monitor["spec"]["selector"] = {"matchLabels": pool_selector_labels(owner["metadata"]["name"])}
    monitor["spec"]["podMetricsEndpoints"][0]["relabelings"] = [
        {"sourceLabels": ["__meta_kubernetes_pod_label_synctalk_io_pool"], "targetLabel": "lipsyncpool"}]
    return monitor


def model_service(lsm: dict, spec: dict) -> dict:
    """The pooled model's Service: the dedicated model's, selecting the pool pods that hold a copy."""
    svc = children.service(lsm, spec)
    svc["spec"]["selector"] = model_service_selector(spec["pool"], lsm["metadata"]["name"])
    return svc

