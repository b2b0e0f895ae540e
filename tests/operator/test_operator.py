"""The real kopf operator (lipsync_operator's handlers) against KMock's emulated Kubernetes API.

The test plays kubectl (creating, changing and deleting LipSyncModels) and the Deployment controller
(reporting ready pods); the emulator plays the API server and the garbage collector; the operator is
the one under test, talking HTTP to the emulator exactly as it would to a cluster.
"""

from __future__ import annotations

import asyncio
import logging

import kubernetes_validate
import pytest
from lsm_harness import (
    DEPLOYMENTS,
    EVENTS,
    HPAS,
    LSM,
    LSP,
    NAMESPACE,
    PDBS,
    PODMONITORS,
    SERVICES,
    OperatorProcess,
    Registry,
    apply_model,
    condition,
    create_object,
    delete_object,
    eventually,
    free_port,
    patch_model,
    roll_out,
)

KUBE_VERSIONS = ("1.29", "1.37")


def status_of(cluster, name: str) -> dict:
    return (cluster.get(LSM, name) or {}).get("status") or {}


def has_condition(cluster, name: str, type_: str, status: str, reason: str | None = None) -> bool:
    cond = condition(cluster.get(LSM, name), type_)
    return bool(cond and cond["status"] == status and (reason is None or cond["reason"] == reason))


def owner_of(obj: dict) -> dict:
    refs = obj["metadata"]["ownerReferences"]
    assert len(refs) == 1, refs
    return refs[0]


def args_value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def entry(registry: Registry, name: str, version: str) -> dict:
    return next(p for p in registry.packages if (p["name"], p["version"]) == (name, version))


async def test_creates_owned_children_and_follows_the_rollout(cluster, registry, operator):
    spec = {
        "package": {"name": "alice", "version": "1.0.0"},
        "replicas": 2,
        "runtime": {"precision": "bf16", "maxBatch": 16, "memoryBudgetMb": 6000},
        "resources": {"gpu": {"resourceName": "nvidia.com/mig-1g.10gb", "count": 1}, "memory": "12Gi"},
        "cache": {"redisSecret": {"name": "redis-auth"}, "frameTtlSeconds": 600},
        "scheduling": {"nodeSelector": {"gpu": "a100"},
                       "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
        "service": {"type": "Headless"},
    }
    lsm = await apply_model(cluster, "alice", spec)
    dep = await eventually(lambda: cluster.get(DEPLOYMENTS, "alice"), what="the Deployment")
    svc = await eventually(lambda: cluster.get(SERVICES, "alice"), what="the Service")
    pdb = await eventually(lambda: cluster.get(PDBS, "alice"), what="the PodDisruptionBudget")
    assert cluster.get(HPAS, "alice") is None   # fixed replicas: no autoscaler

    for child in (dep, svc, pdb):
        ref = owner_of(child)
        assert ref == {"apiVersion": "synctalk.io/v1alpha1", "kind": "LipSyncModel", "name": "alice",
                       "uid": lsm["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
        assert child["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "lipsync-operator"

    pod = dep["spec"]["template"]["spec"]
    (init,), (server,) = pod["initContainers"], pod["containers"]
    assert init["command"] == ["lipsync", "package", "fetch", "alice", "--registry", registry.url,
                               "--version", "1.0.0", "--sha256", entry(registry, "alice", "1.0.0")["sha256"],
                               "--out", "/models", "--prepare"]
    args = server["args"]
    assert args[0] == "serve"
    assert [args_value(args, f) for f in ("--port", "--metrics-port", "--http-port", "--models-dir")] == \
        ["50051", "9090", "8080", "/models"]
    assert [args_value(args, f) for f in ("--precision", "--max-batch", "--memory-budget-mb", "--preload")] == \
        ["bf16", "16", "6000", "alice"]
    assert args_value(args, "--frame-cache-ttl") == "600" and "--feature-cache-ttl" not in args
    env = {e["name"]: e for e in server["env"]}
    assert env["LIPSYNC_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "redis-auth", "key": "url"}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"] == {"port": 50051}
    assert server["startupProbe"]["failureThreshold"] * server["startupProbe"]["periodSeconds"] >= 600
    assert pod["securityContext"]["runAsNonRoot"] is True
    for container in (init, server):
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert server["resources"]["limits"] == {"memory": "12Gi", "nvidia.com/mig-1g.10gb": 1}
    assert pod["nodeSelector"] == {"gpu": "a100"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["terminationGracePeriodSeconds"] > 30   # preStop + the server's 30 s drain
    assert dep["spec"]["replicas"] == 2
    assert svc["spec"]["clusterIP"] == "None"
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"grpc": 50051, "http": 8080, "metrics": 9090}

    await eventually(lambda: has_condition(cluster, "alice", "Progressing", "True", "RollingOut"),
                     what="Progressing=True")
    st = status_of(cluster, "alice")
    assert has_condition(cluster, "alice", "PackageAvailable", "True", "Verified")
    assert has_condition(cluster, "alice", "Ready", "False", "NoReplicasReady")
    assert has_condition(cluster, "alice", "Degraded", "False")
    assert st["endpoint"] == f"alice.{NAMESPACE}.svc:50051"
    assert st["package"]["version"] == "1.0.0" and st["observedGeneration"] == 1

    await roll_out(cluster, "alice")   # the Deployment controller: both pods ready
    await eventually(lambda: has_condition(cluster, "alice", "Ready", "True", "Available"), what="Ready=True")
    await eventually(lambda: has_condition(cluster, "alice", "Progressing", "False", "RolloutComplete"))
    st = status_of(cluster, "alice")
    assert (st["replicas"], st["readyReplicas"]) == (2, 2)
    assert st["selector"] == "app.kubernetes.io/name=lipsync-inference,synctalk.io/model=alice"


@pytest.mark.monitoring
async def test_children_are_valid_kubernetes_objects(cluster, registry, operator):
    await apply_model(cluster, "bob", {
        "package": {"name": "bob"},
        "autoscaling": {"minReplicas": 1, "maxReplicas": 4},
        "runtime": {"apiKeysSecret": {"name": "bob-keys"}},
        "service": {"type": "LoadBalancer", "annotations": {"example.com/internal": "true"}},
    })
    await eventually(lambda: all(cluster.get(r, "bob") for r in (DEPLOYMENTS, SERVICES, HPAS, PDBS, PODMONITORS)),
                     what="all five children")
    for resource in (DEPLOYMENTS, SERVICES, HPAS, PDBS):
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(cluster.get(resource, "bob"), version, strict=True)
    monitor = cluster.get(PODMONITORS, "bob")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"   # operator-wide setting
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["selector"]["matchLabels"] == \
        cluster.get(DEPLOYMENTS, "bob")["spec"]["selector"]["matchLabels"]

    await patch_model(cluster, "bob", {"spec": {"monitoring": {"enabled": False}}})
    await eventually(lambda: cluster.get(PODMONITORS, "bob") is None, what="the PodMonitor to go")


async def test_autoscaling_leaves_the_replica_count_to_the_hpa(cluster, registry, operator):
    await apply_model(cluster, "carol", {
        "package": {"name": "alice"},
        "autoscaling": {"minReplicas": 2, "maxReplicas": 6, "metric": "inflightRequests",
                        "targetAverageValue": "1500m"},
    })
    hpa = await eventually(lambda: cluster.get(HPAS, "carol"), what="the HPA")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "carol"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert hpa["spec"]["metrics"] == [{"type": "Pods", "pods": {
        "metric": {"name": "lipsync_inflight_requests"},
        "target": {"type": "AverageValue", "averageValue": "1500m"}}}]
    dep = await eventually(lambda: cluster.get(DEPLOYMENTS, "carol"))
    assert "replicas" not in dep["spec"]

    # The HPA controller scales the Deployment; the operator's next apply must not undo that.
    async with cluster.patch(f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/carol", json={"spec": {"replicas": 5}},
                             headers={"Content-Type": "application/merge-patch+json"}) as resp:
        assert resp.status == 200
    await patch_model(cluster, "carol", {"spec": {"runtime": {"maxBatch": 8}}})
    await eventually(lambda: "8" in cluster.get(DEPLOYMENTS, "carol")["spec"]["template"]["spec"]["containers"][0]
                     ["args"], what="the new max batch")
    assert cluster.get(DEPLOYMENTS, "carol")["spec"]["replicas"] == 5

    # Back to a fixed count: the HPA goes, the count is the operator's again.
    await patch_model(cluster, "carol", {"spec": {"autoscaling": None, "replicas": 3}})
    await eventually(lambda: cluster.get(HPAS, "carol") is None, what="the HPA to go")
    await eventually(lambda: cluster.get(DEPLOYMENTS, "carol")["spec"]["replicas"] == 3, what="3 replicas")


async def test_autoscaling_on_sessions_targets_active_over_max_sessions(cluster, registry, operator):
    """autoscaling.targetSessionUtilization: the pods run --max-sessions (runtime.maxSessions) and the HPA
    also follows lipsync_sessions_utilization, for a dedicated model and for a pool; off again, it goes."""
    await apply_model(cluster, "erin", {
        "package": {"name": "alice"}, "runtime": {"maxSessions": 6},
        "autoscaling": {"maxReplicas": 8, "targetSessionUtilization": 0.75},
    })
    hpa = await eventually(lambda: cluster.get(HPAS, "erin"), what="the HPA")
    assert hpa["spec"]["metrics"] == [
        {"type": "Pods", "pods": {"metric": {"name": "lipsync_queue_depth"},
                                  "target": {"type": "AverageValue", "averageValue": "8"}}},
        {"type": "Pods", "pods": {"metric": {"name": "lipsync_sessions_utilization"},
                                  "target": {"type": "AverageValue", "averageValue": "750m"}}}]
    dep = await eventually(lambda: cluster.get(DEPLOYMENTS, "erin"), what="the Deployment")
    assert args_value(dep["spec"]["template"]["spec"]["containers"][0]["args"], "--max-sessions") == "6"

    await patch_model(cluster, "erin", {"spec": {"autoscaling": {"targetSessionUtilization": None}}})
    await eventually(lambda: len(cluster.get(HPAS, "erin")["spec"]["metrics"]) == 1, what="the session target gone")

    # Without a session limit there is no utilization to target: refused with the CRD rule's words.
    await apply_model(cluster, "fred", {"package": {"name": "alice"}, "runtime": {"maxSessions": 0},
                                        "autoscaling": {"maxReplicas": 2, "targetSessionUtilization": 0.5}})
    await eventually(lambda: has_condition(cluster, "fred", "Degraded", "True", "InvalidSpec"), what="refused")
    assert "needs runtime.maxSessions above 0" in condition(cluster.get(LSM, "fred"), "Degraded")["message"]
    assert cluster.get(HPAS, "fred") is None

    await create_object(cluster, LSP, {"apiVersion": "synctalk.io/v1alpha1", "kind": "LipSyncPool",
                                       "metadata": {"name": "studio", "namespace": NAMESPACE},
                                       "spec": {"modelMemoryBudgetMb": 64, "runtime": {"device": "cpu"},
                                                "autoscaling": {"maxReplicas": 4, "targetSessionUtilization": 0.5}}})
    pool_hpa = await eventually(lambda: cluster.get(HPAS, "studio"), what="the pool's HPA")
    assert pool_hpa["spec"]["metrics"][1]["pods"] == {
        "metric": {"name": "lipsync_sessions_utilization"}, "target": {"type": "AverageValue", "averageValue": "500m"}}
    pool_dep = await eventually(lambda: cluster.get(DEPLOYMENTS, "studio"), what="the pool's Deployment")
    assert args_value(pool_dep["spec"]["template"]["spec"]["containers"][0]["args"], "--max-sessions") == "4"


async def test_turning_autoscaling_on_keeps_the_current_pods(cluster, registry, operator):
    await apply_model(cluster, "dave", {"package": {"name": "alice"}, "replicas": 3})
    await eventually(lambda: (cluster.get(DEPLOYMENTS, "dave") or {}).get("spec", {}).get("replicas") == 3)
    await patch_model(cluster, "dave", {"spec": {"replicas": None, "autoscaling": {"minReplicas": 1,
                                                                                   "maxReplicas": 5}}})
    await eventually(lambda: cluster.get(HPAS, "dave"), what="the HPA")
    await eventually(lambda: status_of(cluster, "dave").get("observedGeneration") == 2)
    # Server-side apply would reset a field nobody applies any more to its default (1 pod): the operator
    # hands the count over first, and the HPA takes it from there.
    assert cluster.get(DEPLOYMENTS, "dave")["spec"]["replicas"] == 3


async def test_an_annotation_rechecks_the_registry_for_a_newer_version(cluster, registry, operator):
    await apply_model(cluster, "alice", {"package": {"name": "alice"}})   # unpinned: the newest
    await eventually(lambda: status_of(cluster, "alice").get("package", {}).get("version") == "1.2.0")
    registry.add("alice", "1.3.0")
    await patch_model(cluster, "alice", {"metadata": {"annotations": {"synctalk.io/reconcile": "1"}}})
    await eventually(lambda: status_of(cluster, "alice").get("package", {}).get("version") == "1.3.0",
                     what="the newer version")
    command = cluster.get(DEPLOYMENTS, "alice")["spec"]["template"]["spec"]["initContainers"][0]["command"]
    assert args_value(command, "--version") == "1.3.0"


async def test_an_update_rolls_the_deployment(cluster, registry, operator):
    await apply_model(cluster, "alice", {"package": {"name": "alice", "version": "1.0.0"},
                                         "scheduling": {"nodeSelector": {"pool": "gpu"}}})
    await eventually(lambda: cluster.get(DEPLOYMENTS, "alice"))
    await roll_out(cluster, "alice")
    await eventually(lambda: has_condition(cluster, "alice", "Ready", "True"))
    generation = cluster.get(DEPLOYMENTS, "alice")["metadata"]["generation"]

    await patch_model(cluster, "alice", {"spec": {"package": {"version": "1.2.0"}, "runtime": {"precision": "fp32"},
                                                  "scheduling": {"nodeSelector": None}}})

    def rolled() -> bool:
        dep = cluster.get(DEPLOYMENTS, "alice")
        return dep["metadata"]["generation"] > generation and \
            "1.2.0" in dep["spec"]["template"]["spec"]["initContainers"][0]["command"]
    await eventually(rolled, what="the new template")
    template = cluster.get(DEPLOYMENTS, "alice")["spec"]["template"]
    assert args_value(template["spec"]["containers"][0]["args"], "--precision") == "fp32"
    assert template["metadata"]["annotations"]["synctalk.io/package"] == "alice@1.2.0"
    assert "nodeSelector" not in template["spec"]   # removed from the spec, removed from the pods

    # Old pods still serve while the new ones roll out.
    await eventually(lambda: status_of(cluster, "alice").get("observedGeneration") == 2)
    await eventually(lambda: has_condition(cluster, "alice", "Progressing", "True", "RollingOut"))
    assert has_condition(cluster, "alice", "Ready", "True")
    assert status_of(cluster, "alice")["package"]["version"] == "1.2.0"
    await roll_out(cluster, "alice")
    await eventually(lambda: has_condition(cluster, "alice", "Progressing", "False", "RolloutComplete"))


async def test_deletion_removes_the_children_through_owner_references(cluster, registry, operator):
    await apply_model(cluster, "alice", {"package": {"name": "alice"}, "service": {"type": "NodePort"}})
    await eventually(lambda: cluster.get(DEPLOYMENTS, "alice") and cluster.get(SERVICES, "alice")
                     and cluster.get(PDBS, "alice"), what="the children")
    await eventually(lambda: status_of(cluster, "alice").get("conditions"))
    assert not cluster.get(LSM, "alice")["metadata"].get("finalizers")   # deletion never waits for the operator

    await delete_object(cluster, LSM, "alice")
    assert cluster.get(LSM, "alice") is None
    for resource in (DEPLOYMENTS, SERVICES, PDBS):
        await eventually(lambda r=resource: cluster.get(r, "alice") is None, what=f"{resource.plural} to go")
    # A quiet period, not a synchronisation: that the operator does not bring them back can only be watched
    # for a while (a re-creation would be there within it: it recreates a deleted child at once, see below).
    await asyncio.sleep(0.5)
    for resource in (DEPLOYMENTS, SERVICES, PDBS):
        assert cluster.get(resource, "alice") is None
        assert cluster.creations(resource, "alice") == 1


async def test_a_deleted_child_is_recreated(cluster, registry, operator):
    lsm = await apply_model(cluster, "alice", {"package": {"name": "alice"}})
    await eventually(lambda: cluster.get(DEPLOYMENTS, "alice") and cluster.get(SERVICES, "alice"))
    await delete_object(cluster, DEPLOYMENTS, "alice")
    await delete_object(cluster, SERVICES, "alice")
    dep = await eventually(lambda: cluster.get(DEPLOYMENTS, "alice"), what="a new Deployment")
    await eventually(lambda: cluster.get(SERVICES, "alice"), what="a new Service")
    assert owner_of(dep)["uid"] == lsm["metadata"]["uid"]
    assert cluster.creations(DEPLOYMENTS, "alice") == 2 and cluster.creations(SERVICES, "alice") == 2


async def test_switching_to_headless_replaces_the_service(cluster, registry, operator):
    await apply_model(cluster, "alice", {"package": {"name": "alice"}})
    await eventually(lambda: cluster.get(SERVICES, "alice"))
    await patch_model(cluster, "alice", {"spec": {"service": {"type": "Headless"}}})
    await eventually(lambda: (cluster.get(SERVICES, "alice") or {}).get("spec", {}).get("clusterIP") == "None",
                     what="a headless Service")
    assert cluster.creations(SERVICES, "alice") == 2   # clusterIP is immutable: a new Service


async def test_an_unreachable_registry_shows_in_the_status_and_is_retried(cluster, tmp_path, operator):
    port = free_port()
    await apply_model(cluster, "dora", {"package": {"name": "dora", "registry": f"http://127.0.0.1:{port}/"}})
    await eventually(lambda: has_condition(cluster, "dora", "PackageAvailable", "False", "RegistryUnreachable"),
                     what="PackageAvailable=False")
    assert has_condition(cluster, "dora", "Degraded", "True", "PackageUnavailable")
    assert has_condition(cluster, "dora", "Ready", "False", "PackageUnavailable")
    assert f"127.0.0.1:{port}" in condition(cluster.get(LSM, "dora"), "PackageAvailable")["message"]
    assert cluster.get(DEPLOYMENTS, "dora") is None   # nothing rolls out without its package
    # ... and `kubectl describe lsm dora` shows why, as a Warning event.
    await eventually(lambda: any(e["involvedObject"]["name"] == "dora" and e["reason"] == "RegistryUnreachable"
                                 and e["type"] == "Warning" for e in cluster.live(EVENTS).values()),
                     what="a Warning event")

    # The registry comes up on that address: the retries find it, with no change to the resource.
    late = Registry(tmp_path / "late")
    late.root.mkdir()
    late.add("dora", "2")
    late.start(port)
    try:
        await eventually(lambda: has_condition(cluster, "dora", "PackageAvailable", "True"),
                         what="the retry to succeed")
        await eventually(lambda: cluster.get(DEPLOYMENTS, "dora"), what="the Deployment")
        assert has_condition(cluster, "dora", "Degraded", "False")
    finally:
        late.stop()


async def test_registry_errors_are_retried_with_exponential_backoff(cluster, registry, operator):
    registry.fail_index = 3
    await apply_model(cluster, "alice", {"package": {"name": "alice"}})
    await eventually(lambda: has_condition(cluster, "alice", "PackageAvailable", "False", "RegistryError"))
    await eventually(lambda: cluster.get(DEPLOYMENTS, "alice"), what="success after the retries")
    times = [t for t, method, path in registry.requests if method == "GET" and path.endswith("/index.json")]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    # Base 0.2 s doubling (capped at 1 s): the waits are 0.2, 0.4, 0.8.
    assert len(gaps) >= 3
    for gap, expected in zip(gaps, (0.2, 0.4, 0.8), strict=False):
        assert gap >= expected * 0.9, gaps


async def test_an_unavailable_new_version_keeps_the_running_pods(cluster, registry, operator):
    await apply_model(cluster, "alice", {"package": {"name": "alice", "version": "1.0.0"}})
    await eventually(lambda: cluster.get(DEPLOYMENTS, "alice"))
    await roll_out(cluster, "alice")
    await eventually(lambda: has_condition(cluster, "alice", "Ready", "True"))

    await patch_model(cluster, "alice", {"spec": {"package": {"version": "9.9.9"}}})
    await eventually(lambda: has_condition(cluster, "alice", "PackageAvailable", "False", "VersionNotFound"))
    assert has_condition(cluster, "alice", "Degraded", "True", "PackageUnavailable")
    assert has_condition(cluster, "alice", "Ready", "True")   # the old pods serve on
    command = cluster.get(DEPLOYMENTS, "alice")["spec"]["template"]["spec"]["initContainers"][0]["command"]
    assert args_value(command, "--version") == "1.0.0"   # no rollout to a package that cannot be fetched


async def test_an_invalid_spec_is_reported_not_applied(cluster, registry, operator):
    # The CRD's CEL rule refuses this in a cluster; an object stored before that rule still gets a clear status.
    await apply_model(cluster, "eve", {"package": {"name": "alice"}, "replicas": 2,
                                       "autoscaling": {"minReplicas": 1, "maxReplicas": 3}})
    await eventually(lambda: has_condition(cluster, "eve", "Degraded", "True", "InvalidSpec"))
    assert "not both" in condition(cluster.get(LSM, "eve"), "Degraded")["message"]
    assert cluster.get(DEPLOYMENTS, "eve") is None

    await patch_model(cluster, "eve", {"spec": {"replicas": None}})   # fixed: the next change reconciles
    await eventually(lambda: cluster.get(DEPLOYMENTS, "eve"), what="the Deployment after the fix")
    await eventually(lambda: has_condition(cluster, "eve", "Degraded", "False"))


async def test_an_object_owned_by_someone_else_is_not_taken_over(cluster, registry, operator):
    foreign = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "alice", "namespace": NAMESPACE},
               "spec": {"selector": {"app": "legacy"}, "ports": [{"port": 80}]}}
    await create_object(cluster, SERVICES, foreign)
    await apply_model(cluster, "alice", {"package": {"name": "alice"}})
    await eventually(lambda: has_condition(cluster, "alice", "Degraded", "True", "ChildConflict"))
    assert cluster.get(SERVICES, "alice")["spec"]["selector"] == {"app": "legacy"}
    assert "ownerReferences" not in cluster.get(SERVICES, "alice")["metadata"]

    await delete_object(cluster, SERVICES, "alice")   # the user clears the way; a retry takes it from there
    await eventually(lambda: (cluster.get(SERVICES, "alice") or {}).get("metadata", {}).get("ownerReferences"),
                     what="the operator's Service")
    await eventually(lambda: has_condition(cluster, "alice", "Degraded", "False"))


async def test_a_refused_child_shows_in_the_status_and_is_retried(cluster, registry, operator):
    cluster.refusals[DEPLOYMENTS] = "GPU workloads need a cost-center label"   # e.g. a Gatekeeper policy
    await apply_model(cluster, "alice", {"package": {"name": "alice"}})
    await eventually(lambda: has_condition(cluster, "alice", "Degraded", "True", "ApplyFailed"))
    message = condition(cluster.get(LSM, "alice"), "Degraded")["message"]
    assert "Deployment alice" in message and "cost-center" in message
    assert has_condition(cluster, "alice", "PackageAvailable", "True")

    del cluster.refusals[DEPLOYMENTS]   # the policy is fixed: the retries get through
    await eventually(lambda: cluster.get(DEPLOYMENTS, "alice"), what="the Deployment")
    await eventually(lambda: has_condition(cluster, "alice", "Degraded", "False"))


async def test_a_pooled_model_names_the_old_child_the_api_would_not_delete(cluster, registry, operator):
    """A dedicated model moved into a pool gives up its Deployment; a refused deletion names that child."""
    await apply_model(cluster, "alice", {"package": {"name": "alice"}})
    await eventually(lambda: cluster.get(DEPLOYMENTS, "alice"), what="the dedicated Deployment")
    cluster.refusals[DEPLOYMENTS] = "deleting GPU workloads needs a change ticket"
    await patch_model(cluster, "alice", {"spec": {"pool": "studio"}})
    await eventually(lambda: has_condition(cluster, "alice", "Degraded", "True", "ApplyFailed"))
    message = condition(cluster.get(LSM, "alice"), "Degraded")["message"]
    assert "deleting Deployment alice" in message and "change ticket" in message

    del cluster.refusals[DEPLOYMENTS]
    await eventually(lambda: cluster.get(DEPLOYMENTS, "alice") is None, what="the Deployment gone")
    await eventually(lambda: has_condition(cluster, "alice", "Degraded", "False"))


async def test_a_status_write_re_reads_and_retries_when_another_writer_got_in_first(cluster, operator_env):
    """Status writes go over the resourceVersion they read: a write that lost the race is composed again
    from the winner's status, so neither write is lost."""
    from lipsync_operator.kube import LIPSYNCMODEL, KubeClient

    await apply_model(cluster, "carol", {"package": {"name": "alice"}})   # no operator: only these writes
    kube = KubeClient.from_environment()
    read_at = []

    def compose(obj: dict) -> dict:
        read_at.append(obj["metadata"]["resourceVersion"])
        if len(read_at) == 1:   # another writer, between this read and this write
            kube.patch(LIPSYNCMODEL, NAMESPACE, "carol", {"status": {"endpoint": "theirs"}}, subresource="status")
        return {**(obj.get("status") or {}), "selector": "mine"}

    try:
        await asyncio.to_thread(kube.patch_status, LIPSYNCMODEL, NAMESPACE, "carol", compose)
    finally:
        kube.close()
    assert len(read_at) == 2 and read_at[0] != read_at[1]
    assert {k: status_of(cluster, "carol").get(k) for k in ("endpoint", "selector")} == {
        "endpoint": "theirs", "selector": "mine"}


async def test_the_operator_restarts_at_any_moment_without_duplicates(cluster, registry, operator_env, tmp_path):
    """``kopf run -m lipsync_operator.handlers`` in a subprocess, killed (SIGKILL) and started again."""
    first = OperatorProcess(operator_env, tmp_path / "operator.log")
    await first.start()
    await apply_model(cluster, "alice", {"package": {"name": "alice"}, "replicas": 1})
    await eventually(lambda: cluster.get(DEPLOYMENTS, "alice"), timeout=60, what="the first operator's work")
    await first.kill()   # wherever it was

    # Changed while no operator runs: the next one must notice.
    await patch_model(cluster, "alice", {"spec": {"replicas": 3}})
    second = OperatorProcess(operator_env, tmp_path / "operator.log")
    await second.start()
    try:
        await eventually(lambda: cluster.get(DEPLOYMENTS, "alice")["spec"]["replicas"] == 3, timeout=60,
                         what="the change made while the operator was down")
        await eventually(lambda: status_of(cluster, "alice").get("observedGeneration") == 2)
        await roll_out(cluster, "alice")
        await eventually(lambda: has_condition(cluster, "alice", "Ready", "True"))
    finally:
        assert await second.terminate() == 0, (tmp_path / "operator.log").read_text()[-3000:]
    for resource in (DEPLOYMENTS, SERVICES, PDBS):
        assert cluster.creations(resource, "alice") == 1
    assert len(cluster.live(DEPLOYMENTS)) == 1


async def test_the_start_line_names_the_redis_host_not_its_password(start_operator, monkeypatch, caplog):
    monkeypatch.setenv("LIPSYNC_OPERATOR_DEFAULT_REDIS_URL", "redis://:hunter2-secret@lipsync-redis.ns.svc:6379/0")
    with caplog.at_level(logging.INFO):
        op = await start_operator()
        await op.stop()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "redis host='lipsync-redis.ns.svc'" in logged
    assert "hunter2" not in logged
