"""What a LipSyncPool and a pooled LipSyncModel own, built from their specs (pure functions)."""

from __future__ import annotations

import kubernetes_validate
import pytest

from lipsync_operator.config import OperatorConfig
from lipsync_operator.pool_children import (
    model_label,
    model_service,
    pool_deployment,
    pool_hpa,
    pool_pod_monitor,
    pool_selector_labels,
)
from lipsync_operator.pool_status import compose_model_status
from lipsync_operator.spec import normalize, normalize_pool
from lipsync_operator.status import KEEP, condition

CONFIG = OperatorConfig(registry_url="http://registry.models.svc/", inference_image="lipsync-inference:1",
                        monitor_labels={"release": "prom"})
POOL = {"apiVersion": "synctalk.io/v1alpha1", "kind": "LipSyncPool",
        "metadata": {"name": "studio", "namespace": "ns", "uid": "u-pool"}}
MODEL = {"apiVersion": "synctalk.io/v1alpha1", "kind": "LipSyncModel",
         "metadata": {"name": "alice", "namespace": "ns", "uid": "u-alice"}}


def pool_spec(**extra) -> dict:
    return normalize_pool({"modelMemoryBudgetMb": 40960, **extra})


def owner(obj: dict) -> dict:
    (ref,) = obj["metadata"]["ownerReferences"]
    return ref


def test_pool_pods_preload_nothing_and_keep_to_the_model_budget():
    dep = pool_deployment(POOL, pool_spec(), CONFIG)
    pod = dep["spec"]["template"]
    (server,) = pod["spec"]["containers"]
    args = server["args"]
    assert "--preload" not in args and "initContainers" not in pod["spec"]
    assert args[args.index("--memory-budget-mb") + 1] == "40960"
    assert args[args.index("--registry-url") + 1] == CONFIG.registry_url
    assert dep["spec"]["selector"]["matchLabels"] == pool_selector_labels("studio")
    assert pool_selector_labels("studio").items() <= pod["metadata"]["labels"].items()
    assert "synctalk.io/model" not in pod["metadata"]["labels"]       # no dedicated model's Service picks them
    assert not any(k.startswith("synctalk.io/package") for k in pod["metadata"]["annotations"])
    assert owner(dep)["kind"] == "LipSyncPool" and owner(dep)["uid"] == "u-pool"
    assert dep["spec"]["replicas"] == 1
    for version in ("1.29", "1.37"):
        kubernetes_validate.validate(dep, version, strict=True)


@pytest.mark.parametrize("storage, expected", [(None, "host"), ("device", "device"), ("compressed", "compressed")])
def test_pool_pods_get_the_pools_template_storage(storage, expected):
    spec = pool_spec(**({"templateStorage": storage} if storage else {}))
    (server,) = pool_deployment(POOL, spec, CONFIG)["spec"]["template"]["spec"]["containers"]
    args = server["args"]
    assert args.count("--template-storage") == 1 and args[args.index("--template-storage") + 1] == expected


def test_a_dedicated_model_passes_its_template_storage_only_when_set():
    from lipsync_operator.children import deployment
    from lipsync_operator.registry import PackageCheck

    package = PackageCheck(available=True, reason="", message="", name="alice", version="1", sha256="0" * 64,
                           registry=CONFIG.registry_url)
    for runtime, expected in (({}, None), ({"templateStorage": "compressed"}, "compressed")):
        spec = normalize({"package": {"name": "alice"}, "runtime": runtime})
        args = deployment(MODEL, spec, package, CONFIG)["spec"]["template"]["spec"]["containers"][0]["args"]
        assert (args[args.index("--template-storage") + 1] if "--template-storage" in args else None) == expected


@pytest.mark.parametrize("needed, expected", [(0, 2), (3, 3), (50, 10)])
def test_the_pool_hpa_keeps_the_pods_the_copies_need_within_its_bounds(needed, expected):
    spec = pool_spec(autoscaling={"minReplicas": 2, "maxReplicas": 10})
    hpa = pool_hpa(POOL, spec, needed)
    assert hpa["spec"]["minReplicas"] == expected and hpa["spec"]["maxReplicas"] == 10
    assert hpa["spec"]["scaleTargetRef"]["name"] == "studio" and owner(hpa)["kind"] == "LipSyncPool"


def test_the_pool_monitor_labels_series_with_the_pool():
    monitor = pool_pod_monitor(POOL, pool_spec(), CONFIG)
    assert monitor["spec"]["selector"]["matchLabels"] == pool_selector_labels("studio")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["relabelings"] == [{"sourceLabels": ["__meta_kubernetes_pod_label_synctalk_io_pool"],
                                        "targetLabel": "lipsyncpool"}]


@pytest.mark.parametrize("service_type, headless", [("ClusterIP", False), ("Headless", True)])
def test_a_pooled_models_service_selects_the_pool_pods_labelled_for_it(service_type, headless):
    spec = normalize({"package": {"name": "alice"}, "pool": "studio", "service": {"type": service_type}})
    svc = model_service(MODEL, spec)
    assert svc["metadata"]["name"] == "alice"          # alice.ns.svc:50051, as for a dedicated model
    assert svc["spec"]["selector"] == {**pool_selector_labels("studio"), model_label("alice"): "true"}
    assert (svc["spec"].get("clusterIP") == "None") is headless
    assert owner(svc)["kind"] == "LipSyncModel" and owner(svc)["uid"] == "u-alice"


def test_a_pooled_models_status_says_copies_and_why_not():
    ok = condition("PackageAvailable", True, "Verified", "", 1)
    st = compose_model_status({}, generation=1, package_condition=ok, problem=None, pool="studio", copies=2,
                              ready_copies=1, wanted=2)
    conds = {c["type"]: c for c in st["conditions"]}
    assert (st["pool"], st["copies"], st["readyCopies"]) == ("studio", 2, 1)
    assert conds["Ready"]["status"] == "True" and conds["Progressing"]["reason"] == "PlacingCopies"
    assert conds["Degraded"]["status"] == "False"
    full = compose_model_status(st, generation=1, package_condition=KEEP, problem=None, pool="studio", copies=0,
                                ready_copies=0, wanted=1, full="1 of 1 copies fit on no pod")
    conds = {c["type"]: c for c in full["conditions"]}
    assert conds["Ready"]["status"] == "False" and conds["Degraded"]["reason"] == "PoolFull"
    assert conds["PackageAvailable"]["status"] == "True"      # kept
    kept = compose_model_status(full, generation=1, package_condition=KEEP, problem=None, pool="studio")
    assert (kept["copies"], kept["readyCopies"]) == (0, 0)


def test_pool_pods_share_the_node_store_and_keep_its_owner_step():
    config = OperatorConfig(registry_url=CONFIG.registry_url, inference_image="lipsync-inference:1",
                            node_store_root="/var/lib/lipsync/store")
    dep = pool_deployment(POOL, pool_spec(runtime={"nodeStore": {"enabled": True}}), config)
    pod = dep["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["own-node-store"]   # no package to fetch
    assert {"name": "models", "hostPath": {"path": "/var/lib/lipsync/store/ns", "type": "DirectoryOrCreate"}} \
        in pod["volumes"]
    for version in ("1.29", "1.37"):
        kubernetes_validate.validate(dep, version, strict=True)
