"""What a LipSyncModel or LipSyncPool may name, by the operator's configuration (lipsync_operator.admission):
registries (no SSRF), images and names. The real operator against KMock; refused registries are real HTTP
servers on loopback that must never see a request."""

from __future__ import annotations

import pytest
from lsm_harness import (
    DEPLOYMENTS,
    LSM,
    LSP,
    NAMESPACE,
    SERVICES,
    Registry,
    apply_model,
    condition,
    create_object,
    eventually,
)


def invalid_spec(cluster, resource, name: str) -> str | None:
    """The Degraded=True InvalidSpec message, once the operator wrote it."""
    cond = condition(cluster.get(resource, name), "Degraded")
    if cond and cond["status"] == "True" and cond["reason"] == "InvalidSpec":
        return cond["message"]
    return None


@pytest.fixture()
def intruder(tmp_path):
    """A registry the operator is not allowed to use, with a package it would happily roll out."""
    reg = Registry(tmp_path / "intruder")
    reg.root.mkdir()
    reg.add("alice", "1.0.0")
    reg.start()
    yield reg
    reg.stop()


async def test_registries_outside_the_allow_list_are_refused_and_never_contacted(
        cluster, registry, intruder, start_operator, monkeypatch):
    # Any host, but nothing internal: loopback, link-local and metadata addresses stay out of reach.
    monkeypatch.setenv("LIPSYNC_OPERATOR_ALLOWED_REGISTRIES", "*")
    await start_operator()
    port = intruder.url.rsplit(":", 1)[1].strip("/")
    cases = {
        "loopback": ({"registry": intruder.url}, "127.0.0.1 is a loopback address"),
        "by-uri": ({"uri": f"{intruder.url}alice/1.0.0/alice-1.0.0.zip"}, "loopback address"),
        "by-name": ({"registry": f"http://localhost:{port}/"}, "localhost is a loopback address"),
        "metadata": ({"registry": "http://169.254.169.254/latest/meta-data/"}, "cloud metadata address"),
        "metadata-v6": ({"registry": "http://[fd00:ec2::254]/"}, "cloud metadata address"),
        "link-local": ({"registry": "http://169.254.10.1:8000/"}, "link-local address"),
        "credentials": ({"registry": f"http://user:pw@{intruder.url[7:]}"}, "credentials in a registry URL"),
    }
    for name, (package, _) in cases.items():
        await apply_model(cluster, name, {"package": {"name": "alice", **package}})
    for name, (_, why) in cases.items():
        message = await eventually(lambda n=name: invalid_spec(cluster, LSM, n), what=f"{name}: InvalidSpec")
        assert why in message and "\n" not in message, message
        assert message.startswith("spec.package."), message
    # The allowed default registry still works beside them.
    await apply_model(cluster, "fine", {"package": {"name": "alice"}})
    await eventually(lambda: cluster.get(DEPLOYMENTS, "fine"), what="the allowed model's Deployment")
    assert intruder.requests == []
    assert not any(cluster.get(DEPLOYMENTS, name) for name in cases)


async def test_by_default_only_the_configured_registry_is_allowed(cluster, registry, intruder, start_operator,
                                                                    monkeypatch):
    monkeypatch.delenv("LIPSYNC_OPERATOR_ALLOWED_REGISTRIES")
    await start_operator()
    await apply_model(cluster, "elsewhere", {"package": {"name": "alice", "registry": intruder.url}})
    message = await eventually(lambda: invalid_spec(cluster, LSM, "elsewhere"), what="InvalidSpec")
    assert "is not under an allowed registry" in message and registry.url in message
    await apply_model(cluster, "home", {"package": {"name": "alice", "registry": registry.url}})
    await eventually(lambda: cluster.get(DEPLOYMENTS, "home"), what="the default registry's Deployment")
    assert intruder.requests == [] and cluster.get(DEPLOYMENTS, "elsewhere") is None


async def test_a_redirect_out_of_the_allowed_registry_is_not_followed(cluster, registry, intruder, start_operator,
                                                                       monkeypatch):
    monkeypatch.delenv("LIPSYNC_OPERATOR_ALLOWED_REGISTRIES")   # the default registry only
    registry.redirect_index = f"{intruder.url}index.json"
    await start_operator()
    await apply_model(cluster, "alice", {"package": {"name": "alice"}})

    def refused():
        cond = condition(cluster.get(LSM, "alice"), "PackageAvailable")
        return cond if cond and cond["reason"] == "RegistryRefused" else None

    cond = await eventually(refused, what="PackageAvailable=False RegistryRefused")
    assert cond["status"] == "False" and f"{intruder.url}index.json is refused" in cond["message"]
    assert any(path.endswith("index.json") for _, _, path in registry.requests)
    assert intruder.requests == [] and cluster.get(DEPLOYMENTS, "alice") is None


async def test_only_allowed_images_run(cluster, registry, start_operator, monkeypatch):
    monkeypatch.setenv("LIPSYNC_OPERATOR_ALLOWED_IMAGES", "registry.example.com/lipsync/*")
    await start_operator()
    await apply_model(cluster, "miner", {"package": {"name": "alice"},
                                         "runtime": {"image": "docker.io/attacker/miner:latest"}})
    await apply_model(cluster, "bad-ref", {"package": {"name": "alice"}, "runtime": {"image": "Not An Image"}})
    await apply_model(cluster, "own-tag", {"package": {"name": "alice"},
                                           "runtime": {"image": "docker.io/library/lipsync-inference:next"}})
    await apply_model(cluster, "mirror", {"package": {"name": "alice"},
                                          "runtime": {"image": "registry.example.com/lipsync/inference:2"}})
    message = await eventually(lambda: invalid_spec(cluster, LSM, "miner"), what="InvalidSpec")
    assert "'docker.io/attacker/miner:latest' is not from a repository the operator runs" in message
    assert "registry.example.com/lipsync/*" in message
    assert "is not an image reference" in await eventually(lambda: invalid_spec(cluster, LSM, "bad-ref"))
    for name, image in (("own-tag", "docker.io/library/lipsync-inference:next"),
                        ("mirror", "registry.example.com/lipsync/inference:2")):
        dep = await eventually(lambda n=name: cluster.get(DEPLOYMENTS, n), what=f"{name}'s Deployment")
        assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == image
    assert cluster.get(DEPLOYMENTS, "miner") is None and cluster.get(DEPLOYMENTS, "bad-ref") is None


async def test_a_name_its_children_cannot_carry_is_refused(cluster, registry, operator):
    too_long = "a" * 64          # a Service name and a label value stop at 63
    longest = "b" * 63
    await apply_model(cluster, too_long, {"package": {"name": "alice"}})
    await apply_model(cluster, longest, {"package": {"name": "alice"}})
    message = await eventually(lambda: invalid_spec(cluster, LSM, too_long), what="InvalidSpec")
    assert "(64 characters) cannot name its Service" in message and "at most 63" in message
    await eventually(lambda: cluster.get(SERVICES, longest) and cluster.get(DEPLOYMENTS, longest),
                     what="the 63-character model's children")
    assert cluster.get(SERVICES, too_long) is None and cluster.get(DEPLOYMENTS, too_long) is None
    # (the harness checks every object written above as an API server would: the teardown fails otherwise)


def pool(name: str, **spec) -> dict:
    return {"apiVersion": "synctalk.io/v1alpha1", "kind": "LipSyncPool",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"modelMemoryBudgetMb": 64, "replicas": 1, "runtime": {"device": "cpu"}, **spec}}


async def test_a_pool_with_an_unusable_name_or_image_is_refused(cluster, registry, start_operator, monkeypatch):
    monkeypatch.setenv("LIPSYNC_OPERATOR_POOL_INTERVAL_SECONDS", "0.3")   # as tests/operator/test_pool.py
    await start_operator()
    await create_object(cluster, LSP, pool("p" * 64))
    await create_object(cluster, LSP, pool("miners", runtime={"image": "docker.io/attacker/miner:latest"}))
    await create_object(cluster, LSP, pool("fine"))
    assert "cannot name its pods' labels" in await eventually(lambda: invalid_spec(cluster, LSP, "p" * 64))
    assert "is not from a repository the operator runs" in await eventually(
        lambda: invalid_spec(cluster, LSP, "miners"))
    await eventually(lambda: cluster.get(DEPLOYMENTS, "fine"), what="the valid pool's Deployment")
    await eventually(lambda: (condition(cluster.get(LSP, "fine"), "Degraded") or {}).get("status") == "False")
    assert cluster.get(DEPLOYMENTS, "p" * 64) is None and cluster.get(DEPLOYMENTS, "miners") is None


async def test_a_node_store_needs_the_operators_root(cluster, registry, start_operator, monkeypatch):
    monkeypatch.setenv("LIPSYNC_OPERATOR_POOL_INTERVAL_SECONDS", "0.3")
    await start_operator()
    await apply_model(cluster, "shared", {"package": {"name": "alice"}, "runtime": {"nodeStore": {"enabled": True}}})
    await create_object(cluster, LSP, pool("shared-pool", runtime={"device": "cpu", "nodeStore": {"enabled": True}}))
    await apply_model(cluster, "own", {"package": {"name": "alice"}})
    assert "needs a node store root" in await eventually(lambda: invalid_spec(cluster, LSM, "shared"))
    assert "inference.nodeStore.root" in await eventually(lambda: invalid_spec(cluster, LSP, "shared-pool"))
    await eventually(lambda: cluster.get(DEPLOYMENTS, "own"), what="the model without a node store")
    assert cluster.get(DEPLOYMENTS, "shared") is None and cluster.get(DEPLOYMENTS, "shared-pool") is None


async def test_with_a_root_a_node_store_model_shares_its_namespaces_directory(cluster, registry, start_operator,
                                                                            monkeypatch):
    monkeypatch.setenv("LIPSYNC_OPERATOR_NODE_STORE_ROOT", "/var/lib/lipsync/store")
    await start_operator()
    await apply_model(cluster, "shared", {"package": {"name": "alice"}, "runtime": {"nodeStore": {"enabled": True}}})
    dep = await eventually(lambda: cluster.get(DEPLOYMENTS, "shared"), what="the node store model's Deployment")
    volumes = dep["spec"]["template"]["spec"]["volumes"]
    assert {"name": "models", "hostPath": {"path": f"/var/lib/lipsync/store/{NAMESPACE}",
                                           "type": "DirectoryOrCreate"}} in volumes
