"""The chart's RBAC allows every API request the real operator makes, and nothing in it goes unused."""

from __future__ import annotations

import base64
from pathlib import Path

import helm_python as helm
import pytest
import yaml
from lsm_harness import (
    DEPLOYMENTS,
    HPAS,
    LSM,
    PODMONITORS,
    SECRETS,
    OperatorProcess,
    apply_model,
    condition,
    create_object,
    delete_object,
    eventually,
    patch_model,
)

CHART = Path(__file__).resolve().parents[2] / "charts" / "lipsync"


def chart_rules(values: dict | None = None) -> list[dict]:
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values, name="lipsync", namespace="lipsync-system")
    docs = [d for d in yaml.safe_load_all(rendered["lipsync/templates/rbac.yaml"]) if d]
    return [rule for d in docs if d["kind"] in ("ClusterRole", "Role") for rule in d["rules"]]


def allowed(rules: list[dict], verb: str, group: str, resource: str) -> bool:
    return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules)


def verb_of(request) -> str:
    if request.method == "GET":
        return "watch" if request.params.get("watch") == "true" else ("get" if request.name else "list")
    return {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[request.method.value]


@pytest.mark.monitoring
async def test_the_cluster_role_allows_every_request_the_operator_makes(cluster, registry, operator_env, tmp_path):
    # As the container runs it: `kopf run` also sets up the logging that posts Kubernetes events.
    operator = OperatorProcess(operator_env, tmp_path / "operator.log")
    await operator.start()
    try:
        await scenario(cluster, registry)
    finally:
        assert await operator.terminate() == 0

    rules = chart_rules()
    seen = set()
    for request in list(cluster):
        if request.headers.get("User-Agent", "").startswith("kmock/"):
            continue   # the test's and the garbage collector's own requests
        if request.resource is None or not request.resource.plural:
            continue   # discovery: /api, /apis, /apis/<group>/<version> are open to every account
        resource = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
        need = (verb_of(request), request.resource.group, resource)
        seen.add(need)
        assert allowed(rules, *need), f"the chart does not allow {need}"
    # The scenario exercised the interesting permissions (else this test would prove little).
    for need in [("watch", "synctalk.io", "lipsyncmodels"), ("patch", "synctalk.io", "lipsyncmodels/status"),
                 ("patch", "apps", "deployments"), ("delete", "autoscaling", "horizontalpodautoscalers"),
                 ("delete", "monitoring.coreos.com", "podmonitors"), ("get", "", "secrets"),
                 ("create", "", "events")]:
        assert need in seen, need


async def scenario(cluster, registry) -> None:
    await create_object(cluster, SECRETS, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "reg"},
                                           "data": {"token": base64.b64encode(b"t").decode()}})
    registry.fail_index = 1   # one failed check: kopf reports it as a Kubernetes event
    await apply_model(cluster, "alice", {"package": {"name": "alice", "pullSecret": {"name": "reg"}},
                                         "autoscaling": {"maxReplicas": 3}})
    await eventually(lambda: cluster.get(HPAS, "alice") and cluster.get(PODMONITORS, "alice"), timeout=60,
                     what="children")
    await patch_model(cluster, "alice", {"spec": {"autoscaling": None, "replicas": 2,
                                                  "monitoring": {"enabled": False}}})
    await eventually(lambda: cluster.get(HPAS, "alice") is None and cluster.get(PODMONITORS, "alice") is None)
    await delete_object(cluster, DEPLOYMENTS, "alice")
    await eventually(lambda: cluster.get(DEPLOYMENTS, "alice"), what="the Deployment again")
    await eventually(lambda: (condition(cluster.get(LSM, "alice"), "Ready") or {}).get("reason") == "NoReplicasReady")
    await delete_object(cluster, LSM, "alice")
    await eventually(lambda: cluster.get(DEPLOYMENTS, "alice") is None)


def test_without_package_secrets_the_operator_cannot_read_secrets():
    assert not allowed(chart_rules({"rbac": {"readPackageSecrets": False}}), "get", "", "secrets")
    assert allowed(chart_rules(), "get", "", "secrets")
    assert not any(allowed(chart_rules(), verb, "", "secrets") for verb in ("list", "watch"))
