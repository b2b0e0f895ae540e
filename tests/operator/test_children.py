"""The child manifests for a range of specs: valid Kubernetes objects that say what the spec says."""

from __future__ import annotations

import kubernetes_validate
import pytest

from lipsync_operator import children
from lipsync_operator.config import OperatorConfig
from lipsync_operator.registry import PackageCheck
from lipsync_operator.spec import normalize

OWNER = {"metadata": {"name": "alice", "namespace": "studio", "uid": "0b7d1d7e-5f0e-4a8e-9a53-0c2f1e0c1a11"}}
PACKAGE = PackageCheck(True, "Verified", "", name="alice", version="1.2.0", sha256="ab" * 32, size=1,
                       url="http://registry.studio.svc/alice/1.2.0/alice-1.2.0.zip",
                       registry="http://registry.studio.svc/")
CONFIG = OperatorConfig(registry_url="http://registry.studio.svc/", inference_image="lipsync-inference:1",
                        default_redis_url="redis://redis:6379/0", monitor_labels={"release": "prom"})

SPECS = {
    "minimal": {"package": {"name": "alice"}},
    "everything": {
        "package": {"name": "alice", "version": "1.2.0", "pullSecret": {"name": "reg", "key": "tok"}},
        "autoscaling": {"minReplicas": 2, "maxReplicas": 8, "metric": "queueDepth", "targetAverageValue": 4},
        "runtime": {"image": "own/inference:2", "imagePullPolicy": "Always", "imagePullSecrets": ["pull"],
                    "precision": "fp32", "maxBatch": 64, "maxBatchDelayMs": 2.5, "memoryBudgetMb": 9000,
                    "logLevel": "DEBUG", "apiKeysSecret": {"name": "keys"}, "drainSeconds": 60,
                    "iceServersSecret": {"name": "turn"},
                    "startupTimeoutSeconds": 900},
        "resources": {"gpu": {"resourceName": "nvidia.com/gpu.shared", "count": 2}, "memory": 17179869184,
                      "cpu": "3500m", "sharedMemory": "2Gi", "modelsVolume": "10Gi"},
        "cache": {"redisUrl": "rediss://cache:6380/1", "frameTtlSeconds": 60, "featureTtlSeconds": 0},
        "scheduling": {"nodeSelector": {"gpu": "l4"}, "priorityClassName": "inference",
                       "tolerations": [{"key": "gpu", "operator": "Equal", "value": "l4", "effect": "NoSchedule"}],
                       "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                           "nodeSelectorTerms": [{"matchExpressions": [
                               {"key": "zone", "operator": "In", "values": ["a", "b"]}]}]}}}},
        "service": {"type": "Headless"},
        "disruptionBudget": {"maxUnavailable": "50%"},
        "monitoring": {"interval": "5s"},
    },
    "cpu": {"package": {"name": "alice"}, "runtime": {"device": "cpu", "precision": "fp32"},
            "resources": {"gpu": {"count": 0}}, "cache": {"enabled": False}, "service": {"type": "NodePort"}},
}


def build(spec: dict) -> dict[str, dict]:
    s = normalize(spec)
    out = {"Deployment": children.deployment(OWNER, s, PACKAGE, CONFIG), "Service": children.service(OWNER, s),
           "PodDisruptionBudget": children.pod_disruption_budget(OWNER, s),
           "PodMonitor": children.pod_monitor(OWNER, s, CONFIG)}
    if "autoscaling" in s:
        out["HorizontalPodAutoscaler"] = children.horizontal_pod_autoscaler(OWNER, s)
    return out


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("version", ["1.29", "1.37"])
def test_manifests_validate_against_the_kubernetes_schemas(name, version):
    for kind, manifest in build(SPECS[name]).items():
        if kind != "PodMonitor":   # a CRD of the Prometheus operator, not in the Kubernetes schemas
            kubernetes_validate.validate(manifest, version, strict=True)


def test_every_setting_reaches_the_pods():
    m = build(SPECS["everything"])
    pod = m["Deployment"]["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    args, env = server["args"], {e["name"]: e for e in server["env"]}
    assert server["image"] == pod["initContainers"][0]["image"] == "own/inference:2"
    assert " ".join(args).endswith("--api-keys-file /etc/lipsync/api-keys/api-keys --preload alice")
    for flag, value in [("--precision", "fp32"), ("--max-batch", "64"), ("--max-batch-delay-ms", "2.5"),
                        ("--memory-budget-mb", "9000"), ("--frame-cache-ttl", "60"), ("--feature-cache-ttl", "0"),
                        ("--registry-url", PACKAGE.registry), ("--device", "cuda")]:
        assert args[args.index(flag) + 1] == value, flag
    assert env["LIPSYNC_REDIS_URL"]["value"] == "rediss://cache:6380/1"
    assert env["LIPSYNC_LOG_LEVEL"]["value"] == "DEBUG"
    assert env["LIPSYNC_SHUTDOWN_GRACE_S"]["value"] == "60"
    assert env["LIPSYNC_ICE_SERVER"]["valueFrom"]["secretKeyRef"] == {"name": "turn", "key": "ice-servers"}
    assert pod["terminationGracePeriodSeconds"] >= 60 + children.PRESTOP_SECONDS
    init_env = {e["name"]: e for e in pod["initContainers"][0]["env"]}
    assert init_env["LIPSYNC_REGISTRY_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "reg", "key": "tok"}
    assert server["resources"]["limits"]["nvidia.com/gpu.shared"] == 2
    assert server["resources"]["requests"] == {"cpu": "3500m", "memory": "17179869184"}
    assert pod["imagePullSecrets"] == [{"name": "pull"}] and pod["priorityClassName"] == "inference"
    assert pod["affinity"]["nodeAffinity"] and pod["tolerations"][0]["value"] == "l4"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["api-keys"]["secret"]["secretName"] == "keys"
    assert volumes["models"]["emptyDir"]["sizeLimit"] == "10Gi"
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}
    assert server["startupProbe"]["failureThreshold"] * server["startupProbe"]["periodSeconds"] >= 900
    assert "replicas" not in m["Deployment"]["spec"]
    hpa = m["HorizontalPodAutoscaler"]["spec"]
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == "lipsync_queue_depth"
    assert hpa["metrics"][0]["pods"]["target"]["averageValue"] == "4"
    assert m["PodDisruptionBudget"]["spec"]["maxUnavailable"] == "50%"
    assert m["Service"]["spec"]["clusterIP"] == "None"
    assert m["PodMonitor"]["spec"]["podMetricsEndpoints"][0]["interval"] == "5s"


def test_a_cpu_model_asks_for_no_accelerator_and_no_cache():
    m = build(SPECS["cpu"])
    (server,) = m["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert server["resources"]["limits"] == {"memory": "8Gi"}
    assert "LIPSYNC_REDIS_URL" not in {e["name"] for e in server["env"]}
    assert server["args"][server["args"].index("--device") + 1] == "cpu"
    assert m["Deployment"]["spec"]["replicas"] == 1


def test_the_operator_wide_redis_is_the_default():
    (server,) = build(SPECS["minimal"])["Deployment"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in server["env"]}
    assert env["LIPSYNC_REDIS_URL"]["value"] == CONFIG.default_redis_url


def test_the_selector_is_stable_across_spec_changes():
    # The Deployment's selector is immutable: no spec setting may change it.
    selectors = {str(build(spec)["Deployment"]["spec"]["selector"]) for spec in SPECS.values()}
    assert len(selectors) == 1


@pytest.mark.parametrize("name", SPECS)
def test_the_inference_cli_accepts_what_the_operator_runs(name):
    """The pod contract, checked with the pod's own parser: `lipsync serve` gets the server's args and
    env, `lipsync package fetch` the init container's."""
    from inference_pod.cli import build_parser
    from inference_pod.serving.settings import Settings

    pod = build(SPECS[name])["Deployment"]["spec"]["template"]["spec"]
    (server,), (init,) = pod["containers"], pod["initContainers"]
    parser = build_parser()
    assert server["command"] == ["lipsync"]
    env = {e["name"]: e["value"] for e in server["env"] if "value" in e}
    settings = Settings.from_args(parser.parse_args(server["args"]), env=env)
    assert (settings.port, settings.metrics_port, settings.http_port) == (50051, 9090, 8080)
    assert str(settings.models_dir) == children.MODELS_DIR and settings.preload == ["alice"]
    spec = normalize(SPECS[name])
    assert (settings.device, settings.precision, settings.max_batch) == \
        (spec["runtime"]["device"], spec["runtime"]["precision"], spec["runtime"]["maxBatch"])
    assert settings.log_level == spec["runtime"]["logLevel"]
    assert settings.shutdown_grace_s == spec["runtime"]["drainSeconds"]
    if "value" in {k for e in server["env"] if e["name"] == "LIPSYNC_REDIS_URL" for k in e}:
        assert settings.redis_url == env["LIPSYNC_REDIS_URL"]

    assert init["command"][0] == "lipsync"
    fetch = parser.parse_args(init["command"][1:])
    assert (fetch.command, fetch.package_command) == ("package", "fetch")
    assert (fetch.name, fetch.registry, fetch.version, fetch.sha256) == \
        (PACKAGE.name, PACKAGE.registry, PACKAGE.version, PACKAGE.sha256)
    assert str(fetch.out) == children.MODELS_DIR


NODE_STORE_CONFIG = OperatorConfig(registry_url=CONFIG.registry_url, inference_image="lipsync-inference:1",
                                   node_store_root="/var/lib/lipsync/store")


@pytest.mark.parametrize("version", ["1.29", "1.37"])
def test_a_node_store_shares_the_namespaces_host_directory_as_models(version):
    spec = normalize({"package": {"name": "alice"}, "runtime": {"nodeStore": {"enabled": True}}})
    dep = children.deployment(OWNER, spec, PACKAGE, NODE_STORE_CONFIG)
    pod = dep["spec"]["template"]["spec"]
    models = next(v for v in pod["volumes"] if v["name"] == "models")
    # One directory per namespace: a tenant never maps another namespace's packages.
    assert models == {"name": "models", "hostPath": {"path": "/var/lib/lipsync/store/studio",
                                                     "type": "DirectoryOrCreate"}}
    owner_step, fetch = pod["initContainers"]
    assert fetch["name"] == "fetch-package" and "--prepare" in fetch["command"]
    # The kubelet creates the directory as root: one step hands it (not its contents) to the pods' user,
    # with CHOWN as its only capability.
    assert owner_step["command"] == ["chown", f"{children.RUN_AS}:{children.RUN_AS}", children.MODELS_DIR]
    assert owner_step["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    assert owner_step["securityContext"]["allowPrivilegeEscalation"] is False
    assert owner_step["volumeMounts"] == [{"name": "models", "mountPath": children.MODELS_DIR}]
    assert all(m["name"] == "models" and m["mountPath"] == children.MODELS_DIR
               for c in (fetch, pod["containers"][0]) for m in c["volumeMounts"] if m["name"] == "models")
    kubernetes_validate.validate(dep, version, strict=True)


def test_without_a_node_store_each_pod_has_its_own_models_volume():
    for spec in ({"package": {"name": "alice"}},
                 {"package": {"name": "alice"}, "runtime": {"nodeStore": {"enabled": False}}}):
        pod = children.deployment(OWNER, normalize(spec), PACKAGE, NODE_STORE_CONFIG)["spec"]["template"]["spec"]
        models = next(v for v in pod["volumes"] if v["name"] == "models")
        assert models == {"name": "models", "emptyDir": {"sizeLimit": "4Gi"}}
        assert [c["name"] for c in pod["initContainers"]] == ["fetch-package"]


@pytest.mark.parametrize("root", ["relative/store", "/", "/var/lib/../../etc", "/etc/lipsync", "/proc",
                                  "/var/lib/kubelet/pods", "/data/$(whoami)", "/data/ store"])
def test_the_operator_refuses_a_node_store_root_that_is_not_a_plain_own_directory(root):
    with pytest.raises(ValueError, match="LIPSYNC_OPERATOR_NODE_STORE_ROOT"):
        OperatorConfig.from_env({"LIPSYNC_OPERATOR_NODE_STORE_ROOT": root})


def test_the_node_store_root_comes_from_the_environment():
    config = OperatorConfig.from_env({"LIPSYNC_OPERATOR_NODE_STORE_ROOT": "/mnt/nvme0/lipsync/"})
    assert config.node_store_path("studio") == "/mnt/nvme0/lipsync/studio"
    assert OperatorConfig.from_env({}).node_store_root == ""
