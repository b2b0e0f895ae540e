"""The Helm chart, rendered offline by the real Helm library (helm-python-sdk), validated against the
Kubernetes schemas, and its values.schema.json refusing bad values."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from lipsync_operator.config import OperatorConfig
from lipsync_operator.spec import METRICS

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "lipsync"
KUBE_VERSIONS = ("1.27", "1.29", "1.37")
RELEASE, NAMESPACE = "lipsync", "lipsync-system"
# The inference pod's metrics (docs/ARCHITECTURE.md and the pod contract).
POD_METRICS = {"lipsync_queue_depth", "lipsync_inflight_requests", "lipsync_frames_generated_total",
               "lipsync_request_duration_seconds", "lipsync_cache_requests_total", "lipsync_device_memory_bytes",
               "lipsync_models_resident", "lipsync_batch_size"}

NON_DEFAULT = {
    "operator": {"image": {"repository": "registry.example.com/ml/lipsync-operator", "tag": "0.1.0-rc1",
                           "pullPolicy": "Always"},
                 "imagePullSecrets": ["regcred"], "watchNamespaces": ["studio", "staging"], "logLevel": "debug",
                 "retry": {"baseSeconds": 2, "maxSeconds": 120}, "httpTimeoutSeconds": 10,
                 "nodeSelector": {"pool": "system"}, "podAnnotations": {"team": "avatars"},
                 "tolerations": [{"key": "system", "operator": "Exists", "effect": "NoSchedule"}],
                 "priorityClassName": "system-cluster-critical"},
    "inference": {"image": {"repository": "registry.example.com/ml/lipsync-inference", "tag": "cuda12"}},
    "registry": {"url": "http://model-registry.studio.svc:8000/"},
    "serviceAccount": {"create": True, "name": "lsm-operator", "annotations": {"iam": "role"}},
    "rbac": {"readPackageSecrets": False},
    "redis": {"enabled": True, "maxMemory": "4gb"},
    "monitoring": {"podMonitorLabels": {"release": "kube-prometheus-stack"},
                   "dashboard": {"namespace": "monitoring", "annotations": {"grafana_folder": "LipSync"}},
                   "adapterRules": {"enabled": False}},
}


class StrictLoader(yaml.SafeLoader):
    """YAML that refuses duplicate keys, as the API server's decoder does."""


def _no_duplicates(loader, node, deep=False):
    keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
    duplicates = {k for k in keys if keys.count(k) > 1}
    if duplicates:
        raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {duplicates}", node.start_mark)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart, values: dict | None = None) -> list[dict]:
    manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in manifests.items():
        if path.endswith("NOTES.txt"):
            continue
        docs += [doc for doc in yaml.load_all(text, Loader=StrictLoader) if doc]
    return docs


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def operator_container(docs: list[dict]) -> dict:
    (dep,) = find(docs, "Deployment", f"{RELEASE}-operator")
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("values", [None, NON_DEFAULT], ids=["defaults", "non-default"])
def test_every_manifest_validates_against_the_kubernetes_schemas(chart, values):
    docs = render(chart, values)
    assert docs
    for crd in chart.crds:
        docs += list(yaml.load_all(crd["data"], Loader=StrictLoader))
    for doc in docs:
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_defaults_install_the_operator_with_cluster_wide_least_privilege(chart):
    docs = render(chart)
    container = operator_container(docs)
    assert container["args"][:3] == ["run", "--module=lipsync_operator", "--standalone"]
    assert "--all-namespaces" in container["args"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    (role,) = find(docs, "ClusterRole", f"{RELEASE}-operator")
    verbs = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert verbs[("synctalk.io", "lipsyncmodels")] == {"get", "list", "watch", "patch"}   # never create/delete
    assert verbs[("", "secrets")] == {"get"}                                                 # never list
    assert "*" not in json.dumps(role["rules"])
    assert not find(docs, "Role") and not find(docs, "Deployment", f"{RELEASE}-redis")
    (binding,) = find(docs, "ClusterRoleBinding", f"{RELEASE}-operator")
    (account,) = find(docs, "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": NAMESPACE}]
    assert container["image"] == f"lipsync-operator:{chart.metadata['appVersion']}"


def test_non_default_values_reach_the_manifests(chart):
    docs = render(chart, NON_DEFAULT)
    container = operator_container(docs)
    assert "--namespace=studio" in container["args"] and "--namespace=staging" in container["args"]
    assert "--all-namespaces" not in container["args"] and "--debug" in container["args"]
    assert container["image"] == "registry.example.com/ml/lipsync-operator:0.1.0-rc1"
    # Namespaced mode: a Role per served namespace, no cluster-wide access to the models' kinds.
    assert sorted(r["metadata"]["namespace"] for r in find(docs, "Role")) == ["staging", "studio"]
    assert not find(docs, "ClusterRole", f"{RELEASE}-operator")
    assert all(("secrets" not in rule["resources"]) for r in find(docs, "Role") for rule in r["rules"])
    assert find(docs, "ServiceAccount", "lsm-operator")
    # The chart's Redis is every model's default cache.
    (redis_svc,) = find(docs, "Service", f"{RELEASE}-redis")
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["LIPSYNC_OPERATOR_DEFAULT_REDIS_URL"] == \
        f"redis://{redis_svc['metadata']['name']}.{NAMESPACE}.svc:6379/0"
    (redis,) = find(docs, "Deployment", f"{RELEASE}-redis")
    assert "4gb" in redis["spec"]["template"]["spec"]["containers"][0]["args"]
    (dashboard,) = find(docs, "ConfigMap", f"{RELEASE}-dashboard")
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "LipSync"}
    assert not find(docs, "ConfigMap", f"{RELEASE}-adapter-rules")


def test_the_operator_reads_what_the_chart_sets(chart):
    """Chart values -> env -> OperatorConfig: the names and formats agree."""
    env = {e["name"]: e["value"] for e in operator_container(render(chart, NON_DEFAULT))["env"]}
    assert all(name.startswith("LIPSYNC_OPERATOR_") for name in env)
    config = OperatorConfig.from_env(env)
    assert config.registry_url == "http://model-registry.studio.svc:8000/"
    assert config.inference_image == "registry.example.com/ml/lipsync-inference:cuda12"
    assert config.monitor_labels == {"release": "kube-prometheus-stack"}
    assert (config.retry_base_seconds, config.retry_max_seconds, config.http_timeout_seconds) == (2, 120, 10)
    assert config.default_redis_url.startswith("redis://")


def test_kopf_accepts_the_operator_arguments(chart):
    help_text = subprocess.run([sys.executable, "-m", "kopf", "run", "--help"], capture_output=True, text=True,
                               check=True).stdout
    for values in (None, NON_DEFAULT, {"operator": {"logLevel": "quiet"}}):
        for arg in operator_container(render(chart, values))["args"][1:]:
            flag = arg.split("=")[0]
            assert re.search(rf"(^|[\s,]){re.escape(flag)}([\s,=]|$)", help_text, re.M), flag


def test_the_dashboard_covers_the_serving_metrics(chart):
    (cm,) = find(render(chart), "ConfigMap", f"{RELEASE}-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"   # what the Grafana sidecar looks for
    dashboard = json.loads(cm["data"]["lipsync-serving.json"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b(lipsync_[a-z_]+)", e)}
    known = POD_METRICS | {f"{m}_{suffix}" for m in POD_METRICS for suffix in ("bucket", "sum", "count")}
    assert used <= known, used - known
    text = " ".join(exprs)
    for needle in ("rate(lipsync_frames_generated_total", "histogram_quantile(0.99", "lipsync_queue_depth",
                   'result="hit"', "lipsync_device_memory_bytes", "count by (lipsyncmodel)"):
        assert needle in text, needle
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "model"} <= variables
    for p in dashboard["panels"]:
        assert p["datasource"]["uid"] == "${datasource}"


def test_the_adapter_rules_serve_the_metrics_the_hpas_target(chart):
    (cm,) = find(render(chart), "ConfigMap", f"{RELEASE}-adapter-rules")
    rules = yaml.safe_load(cm["data"]["config.yaml"])["rules"]
    served = {rule["name"]["as"] for rule in rules}
    assert set(METRICS.values()) <= served
    for rule in rules:
        assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
        assert rule["seriesQuery"].startswith(rule["name"]["as"])
        assert "<<.GroupBy>>" in rule["metricsQuery"]


def test_helm_test_probes_the_installation(chart):
    docs = render(chart, {"redis": {"enabled": True}})
    tests = [d for d in docs if (d["metadata"].get("annotations") or {}).get("helm.sh/hook") == "test"]
    (pod,) = tests
    names = {c["name"] for c in pod["spec"]["containers"]}
    assert names == {"operator-health", "redis-ping"}
    (svc,) = find(docs, "Service", f"{RELEASE}-operator")
    assert f"{svc['metadata']['name']}.{NAMESPACE}.svc:8080/healthz" in pod["spec"]["containers"][0]["command"][-1]


def test_helm_lint_is_clean():
    for values in (None, NON_DEFAULT):
        report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
        assert not report["errors"], report
        assert not [m for m in report["messages"] if m["severity"] >= 2], report


@pytest.mark.parametrize("values, where", [
    ({"operator": {"logLevel": "loud"}}, "/operator/logLevel"),
    ({"operator": {"watchNamespaces": ["Studio_1"]}}, "/operator/watchNamespaces/0"),
    ({"operator": {"healthPort": 80}}, "/operator/healthPort"),
    ({"operator": {"retry": {"baseSeconds": 0, "maxSeconds": 10}}}, "/operator/retry/baseSeconds"),
    ({"operator": {"image": {"repository": "Bad Image"}}}, "/operator/image/repository"),
    ({"operator": {"image": {"pullPolicy": "Sometimes"}}}, "/operator/image/pullPolicy"),
    ({"operator": {"resources": {"limits": {"memory": "lots"}}}}, "/operator/resources/limits/memory"),
    ({"operator": {"replicas": 2}}, "replicas"),
    ({"redis": {"enabled": "yes"}}, "/redis/enabled"),
    ({"redis": {"externalUrl": "memcached://cache"}}, "/redis/externalUrl"),
    ({"redis": {"maxMemory": "lots"}}, "/redis/maxMemory"),
    ({"registry": {"url": "ftp://models"}}, "/registry/url"),
    ({"monitoring": {"podMonitorLabels": {"a": "b,c=d"}}}, "/monitoring/podMonitorLabels"),
    ({"monitoring": {"dashboard": {"enabled": 1}}}, "/monitoring/dashboard/enabled"),
    ({"typo": True}, "typo"),
])
def test_values_schema_refuses_bad_values(chart, values, where):
    with pytest.raises(helm.HelmValuesError) as info:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert where in str(info.value)
