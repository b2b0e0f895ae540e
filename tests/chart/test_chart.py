"""The Helm chart, rendered offline by the real Helm library (helm-python-sdk), validated against the
Kubernetes schemas, and its values.schema.json refusing bad values."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from chart_support import (
    CHART,
    NAMESPACE,
    RELEASE,
    StrictLoader,
    container_env,
    containers,
    find,
    render,
    render_files,
)

from lipsync_operator import children
from lipsync_operator.config import OperatorConfig
from lipsync_operator.egress import RefusedURL
from lipsync_operator.spec import METRICS, SESSION_METRIC

KUBE_VERSIONS = ("1.27", "1.29", "1.37")
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
                 "priorityClassName": "system-cluster-critical",
                 "allowedRegistries": ["*.models.example.com", "https://cdn.example.com/lipsync/"],
                 "allowedImages": ["registry.example.com/ml/*"]},
    "inference": {"image": {"repository": "registry.example.com/ml/lipsync-inference", "tag": "cuda12"},
                  "nodeStore": {"root": "/mnt/nvme0/lipsync"}},
    "registry": {"url": "http://model-registry.studio.svc:8000/"},
    "serviceAccount": {"create": True, "name": "lsm-operator", "annotations": {"iam": "role"}},
    "rbac": {"scope": "namespace", "readPackageSecrets": False},
    "redis": {"enabled": True, "maxMemory": "4gb", "auth": {"password": "correct-horse-battery-staple"}},
    "monitoring": {"podMonitorLabels": {"release": "kube-prometheus-stack"},
                   "dashboard": {"namespace": "monitoring", "annotations": {"grafana_folder": "LipSync"}},
                   "adapterRules": {"enabled": False}},
}


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
    assert container["args"][:3] == ["run", "--module=lipsync_operator.handlers", "--standalone"]
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
    assert container["resources"]["limits"]["cpu"]


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
    env = container_env(container, docs)
    assert env["LIPSYNC_OPERATOR_DEFAULT_REDIS_URL"] == \
        f"redis://:correct-horse-battery-staple@{redis_svc['metadata']['name']}.{NAMESPACE}.svc:6379/0"
    (redis,) = find(docs, "Deployment", f"{RELEASE}-redis")
    assert "4gb" in redis["spec"]["template"]["spec"]["containers"][0]["args"]
    (dashboard,) = find(docs, "ConfigMap", f"{RELEASE}-dashboard")
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "LipSync"}
    assert not find(docs, "ConfigMap", f"{RELEASE}-adapter-rules")


def test_the_operator_reads_what_the_chart_sets(chart):
    """Chart values -> env -> OperatorConfig: the names and formats agree."""
    docs = render(chart, NON_DEFAULT)
    env = container_env(operator_container(docs), docs)
    assert all(name.startswith("LIPSYNC_OPERATOR_") for name in env)
    config = OperatorConfig.from_env(env)
    assert config.registry_url == "http://model-registry.studio.svc:8000/"
    assert config.inference_image == "registry.example.com/ml/lipsync-inference:cuda12"
    assert config.monitor_labels == {"release": "kube-prometheus-stack"}
    assert (config.retry_base_seconds, config.retry_max_seconds, config.http_timeout_seconds) == (2, 120, 10)
    assert config.default_redis_url.startswith("redis://:correct-horse-battery-staple@")
    assert config.allowed_registries == ("*.models.example.com", "https://cdn.example.com/lipsync/")
    assert config.allowed_images == ("registry.example.com/ml/*",)
    assert config.node_store_path("studio") == "/mnt/nvme0/lipsync/studio"
    policy = config.registry_policy()
    policy.check("http://model-registry.studio.svc:8000/models/")      # registry.url: always allowed
    policy.check("https://eu.models.example.com/")
    with pytest.raises(RefusedURL):
        policy.check("http://169.254.169.254/latest/meta-data/")
    assert config.image_policy().allows("registry.example.com/ml/custom-inference:2")
    assert not config.image_policy().allows("docker.io/attacker/miner:latest")


def test_by_default_the_operator_fetches_from_registry_url_only_and_runs_the_inference_image_only(chart):
    docs = render(chart, {"registry": {"url": "http://model-registry.studio.svc:8000/"}})
    config = OperatorConfig.from_env(container_env(operator_container(docs), docs))
    config.registry_policy().check("http://model-registry.studio.svc:8000/")
    for elsewhere in ("http://other-registry.studio.svc:8000/", "http://169.254.169.254/"):
        with pytest.raises(RefusedURL):
            config.registry_policy().check(elsewhere)
    assert config.image_policy().allows(f"lipsync-inference:{chart.metadata['appVersion']}")
    assert config.image_policy().allows("docker.io/library/lipsync-inference:other")
    assert not config.image_policy().allows("docker.io/attacker/miner:latest")
    assert config.node_store_root == ""   # no resource may share a host directory until one is named


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
    bases = used | {re.sub(r"_(bucket|sum|count)$", "", m) for m in used}
    assert POD_METRICS <= bases, POD_METRICS - bases
    text = " ".join(exprs)
    for needle in ("rate(lipsync_frames_generated_total", "histogram_quantile(0.99", "lipsync_queue_depth",
                   'result="hit"', "lipsync_device_memory_bytes", "count by (lipsyncmodel)"):
        assert needle in text, needle
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "model"} <= variables
    for p in dashboard["panels"]:
        assert p["datasource"]["uid"] == "${datasource}"


# Labels a scrape adds to every pod series (Prometheus' target labels and the PodMonitors' relabelings).
SCRAPE_LABELS = {"namespace", "pod", "container", "instance", "job", "lipsyncmodel", "lipsyncpool"}


def exported_series() -> dict[str, set[str]]:
    """Every series name the inference pod exports (serving/metrics.py), with the labels it may carry."""
    from prometheus_client.metrics import MetricWrapperBase

    from inference_pod.serving.metrics import Metrics

    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    series: dict[str, set[str]] = {}
    for metric in vars(Metrics()).values():
        if isinstance(metric, MetricWrapperBase):
            for suffix in suffixes[metric._type]:
                series[metric._name + suffix] = set(metric._labelnames) | ({"le"} if suffix == "_bucket" else set())
    return series


def dashboard_exprs(chart) -> list[str]:
    (cm,) = find(render(chart), "ConfigMap", f"{RELEASE}-dashboard")
    dashboard = json.loads(cm["data"]["lipsync-serving.json"])
    variables = [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]] + variables


def test_every_dashboard_query_names_a_series_the_pod_exports_with_its_labels(chart):
    """A panel that names a metric the pod does not export (or filters on a label it does not carry) stays
    empty without an error anywhere: each name and each label matcher is checked against serving/metrics.py."""
    exported = exported_series()
    for expr in dashboard_exprs(chart):
        for name, matchers in re.findall(r"\b(lipsync_[a-z_]+)(?:\{([^}]*)\})?", expr):
            assert name in exported, f"{name} is not exported by the pod (serving/metrics.py): {expr}"
            labels = set(re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)", matchers))
            assert labels <= exported[name] | SCRAPE_LABELS, (name, labels - exported[name] - SCRAPE_LABELS)


def test_the_dashboard_shows_the_live_sessions(chart):
    text = " ".join(dashboard_exprs(chart))
    for needle in ("lipsync_sessions_active", "lipsync_sessions_max", "lipsync_sessions_utilization",
                   "sum by (kind) (rate(lipsync_session_frames_total",
                   "histogram_quantile(0.99, sum by (le) (rate(lipsync_session_speech_latency_seconds_bucket",
                   "rate(lipsync_session_barge_ins_total", "rate(lipsync_sessions_refused_total"):
        assert needle in text, needle


def test_the_adapter_rules_serve_the_metrics_the_hpas_target(chart):
    (cm,) = find(render(chart), "ConfigMap", f"{RELEASE}-adapter-rules")
    rules = yaml.safe_load(cm["data"]["config.yaml"])["rules"]
    served = {rule["name"]["as"] for rule in rules}
    assert set(METRICS.values()) | {SESSION_METRIC} <= served
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


def test_namespace_scope_without_names_serves_the_release_namespace(chart):
    docs = render(chart, {"rbac": {"scope": "namespace"}})
    args = operator_container(docs)["args"]
    assert f"--namespace={NAMESPACE}" in args and "--all-namespaces" not in args
    (role,) = find(docs, "Role")
    (binding,) = find(docs, "RoleBinding")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == NAMESPACE
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    # Cluster-wide, only the discovery role: reading CRDs and namespaces.
    (cluster_role,) = find(docs, "ClusterRole")
    assert {v for rule in cluster_role["rules"] for v in rule["verbs"]} == {"list", "watch"}
    assert {r for rule in cluster_role["rules"] for r in rule["resources"]} == \
        {"customresourcedefinitions", "namespaces"}
    # Package Secrets are then readable in the served namespace only.
    assert any("secrets" in rule["resources"] for rule in role["rules"])


def test_watch_namespaces_without_the_namespace_scope_is_refused_with_the_fix(chart):
    with pytest.raises(helm.HelmRenderError) as info:
        render(chart, {"operator": {"watchNamespaces": ["studio"]}})
    assert "set rbac.scope=namespace" in str(info.value)


def test_images_are_pinned_by_digest_when_given(chart):
    digests = {key: "sha256:" + f"{n}" * 64 for n, key in enumerate(("operator", "inference", "redis", "tests"))}
    values = {key: {"image": {"digest": digest}} for key, digest in digests.items()}
    values["tests"]["image"]["repository"] = "registry.example.com/probe"
    values["redis"]["enabled"] = True
    docs = render(chart, values)
    images = {c["name"]: c["image"] for c in containers(docs)}
    assert images["operator"] == f"lipsync-operator@{digests['operator']}"
    assert images["redis"] == f"redis@{digests['redis']}"
    assert images["redis-ping"] == f"redis@{digests['redis']}"
    assert images["operator-health"] == f"registry.example.com/probe@{digests['tests']}"
    env = container_env(operator_container(docs), docs)
    assert OperatorConfig.from_env(env).inference_image == f"lipsync-inference@{digests['inference']}"
    # Without a tests image of its own, the helm test pod runs the pinned operator image.
    del values["tests"]
    images = {c["name"]: c["image"] for c in containers(render(chart, values))}
    assert images["operator-health"] == images["operator"]


def _selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions with In) against an object's labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In", expr
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def _admitted(policy: dict, pod_labels: dict, namespace: str) -> bool:
    """Whether an ingress NetworkPolicy admits a pod with these labels in this namespace."""
    ns_labels = {"kubernetes.io/metadata.name": namespace}
    for rule in policy["spec"].get("ingress", []):
        for peer in rule.get("from", []):
            pods_ok = _selects(peer.get("podSelector", {}), pod_labels)
            # No namespaceSelector: the policy's own namespace.
            ns_ok = _selects(peer["namespaceSelector"], ns_labels) if "namespaceSelector" in peer else \
                namespace == policy["metadata"]["namespace"]
            if pods_ok and ns_ok:
                return True
    return False


@pytest.mark.parametrize("scope, served", [("cluster", ["studio", NAMESPACE]), ("namespace", ["studio"])])
def test_only_inference_pods_and_the_helm_test_may_reach_redis(chart, scope, served):
    values = {"redis": {"enabled": True}, "rbac": {"scope": scope}}
    if scope == "namespace":
        values["operator"] = {"watchNamespaces": served}
    docs = render(chart, values)
    (policy,) = find(docs, "NetworkPolicy", f"{RELEASE}-redis")
    (redis,) = find(docs, "Deployment", f"{RELEASE}-redis")
    assert _selects(policy["spec"]["podSelector"], redis["spec"]["template"]["metadata"]["labels"])
    (port,) = policy["spec"]["ingress"][0]["ports"]
    assert port["port"] in {p["name"] for p in redis["spec"]["template"]["spec"]["containers"][0]["ports"]}
    # The pods the operator creates for a LipSyncModel, in the namespaces it serves.
    inference = children.labels("alice")
    for namespace in served:
        assert _admitted(policy, inference, namespace), namespace
    if scope == "namespace":
        assert not _admitted(policy, inference, "elsewhere")
    (test_pod,) = find(docs, "Pod")
    assert _admitted(policy, test_pod["metadata"]["labels"], NAMESPACE)
    assert not _admitted(policy, test_pod["metadata"]["labels"], "elsewhere")
    (operator,) = find(docs, "Deployment", f"{RELEASE}-operator")
    for labels, namespace in ((operator["spec"]["template"]["metadata"]["labels"], NAMESPACE),
                              ({"app": "anything"}, NAMESPACE), ({}, "studio")):
        assert not _admitted(policy, labels, namespace), labels
    # Every pod the chart runs is covered by some policy (nothing is open by omission).
    policies = find(docs, "NetworkPolicy")
    for doc in find(docs, "Deployment") + find(docs, "Pod"):
        labels = doc["spec"]["template"]["metadata"]["labels"] if doc["kind"] == "Deployment" else \
            doc["metadata"]["labels"]
        assert any(_selects(p["spec"]["podSelector"], labels) for p in policies), doc["metadata"]["name"]
    assert not find(render(chart, {**values, "networkPolicy": {"enabled": False}}), "NetworkPolicy")


def test_redis_password_given_generated_or_from_an_existing_secret(chart):
    def secret_password(values: dict) -> str:
        docs = render(chart, {"redis": {"enabled": True, **values}})
        (redis,) = find(docs, "Deployment", f"{RELEASE}-redis")
        return container_env(redis["spec"]["template"]["spec"]["containers"][0], docs)["REDIS_PASSWORD"]

    assert secret_password({"auth": {"password": "correct-horse-battery-staple"}}) == "correct-horse-battery-staple"
    generated = [secret_password({}) for _ in range(2)]
    assert all(re.fullmatch(r"[A-Za-z0-9]{32}", p) for p in generated), generated
    assert generated[0] != generated[1]   # random per install (an upgrade reads the existing Secret back)
    docs = render(chart, {"redis": {"enabled": True, "auth": {"existingSecret": "team-redis"}}})
    assert not find(docs, "Secret")
    refs = [v["valueFrom"]["secretKeyRef"] for c in containers(docs) for v in c.get("env", []) if "valueFrom" in v]
    assert refs and all(ref == {"name": "team-redis", "key": "password"} for ref in refs)
    with pytest.raises(helm.HelmRenderError) as info:
        render(chart, {"redis": {"enabled": True, "auth": {"existingSecret": "team-redis",
                                                           "password": "correct-horse-battery-staple"}}})
    assert "alternatives" in str(info.value)


def test_notes_tell_where_the_redis_password_is(chart):
    notes = render_files(chart, {"redis": {"enabled": True}})["lipsync/templates/NOTES.txt"]
    assert f"redis://:PASSWORD@{RELEASE}-redis.{NAMESPACE}.svc:6379/0" in notes
    assert f"kubectl get secret -n {NAMESPACE} {RELEASE}-redis" in notes
    assert "$(" not in notes


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
    ({"operator": {"image": {"digest": "sha256:abc"}}}, "/operator/image/digest"),
    ({"inference": {"image": {"digest": "latest"}}}, "/inference/image/digest"),
    ({"rbac": {"scope": "global"}}, "/rbac/scope"),
    ({"redis": {"auth": {"password": "hunter2"}}}, "/redis/auth/password"),
    ({"redis": {"auth": {"password": "a password with spaces"}}}, "/redis/auth/password"),
    ({"networkPolicy": {"enabled": "on"}}, "/networkPolicy/enabled"),
    ({"typo": True}, "typo"),
    ({"operator": {"allowedRegistries": ["ftp://models"]}}, "/operator/allowedRegistries/0"),
    ({"operator": {"allowedRegistries": ["a b"]}}, "/operator/allowedRegistries/0"),
    ({"operator": {"allowedImages": ["Attacker/Miner"]}}, "/operator/allowedImages/0"),
    ({"inference": {"nodeStore": {"root": "var/lib/lipsync"}}}, "/inference/nodeStore/root"),
    ({"inference": {"nodeStore": {"root": "/var/lib/../../etc"}}}, "/inference/nodeStore/root"),
    ({"inference": {"nodeStore": {"path": "/var/lib/lipsync"}}}, "/inference/nodeStore"),
])
def test_values_schema_refuses_bad_values(chart, values, where):
    with pytest.raises(helm.HelmValuesError) as info:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert where in str(info.value)
