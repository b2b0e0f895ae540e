"""Harness for running the real kopf operator against KMock's Kubernetes API emulator.

KMock's emulator stores objects and streams watch events, but it is deliberately simple: it merges patches
as plain dicts and knows nothing of object metadata. ``Cluster`` adds, in the emulator's own terms, the
API-server behaviour the operator relies on (as KMock's docs suggest: inherit and implement):

- metadata: uid, resourceVersion, generation (bumped on spec changes), creationTimestamp, namespace;
- optimistic concurrency: a patch carrying a stale metadata.resourceVersion gets 409 Conflict;
- the status subresource: /status patches change only .status, main-resource patches never do;
- server-side apply (application/apply-patch+yaml): creates a missing object, records managedFields, and
  removes the fields a manager applied before but no longer sends, unless another apply manager still
  sends them; a plain patch takes over the fields it sets (as the HPA's scale updates do);
- DeleteOptions preconditions on uid; metadata.generateName on create;
- lists carry their kind and apiVersion, and the core group's discovery says `v1` (kubectl, which
  e2e/run_e2e.py drives, needs both);
- admission refusals on demand (``cluster.refusals[resource] = message``), as a policy webhook would;
- validation: every object the operator (or kopf on its behalf) creates or changes is recorded, and each
  test's teardown checks them as an API server would (api_validation.py: kubernetes-validate, names,
  labels, the CRDs' status schemas); one refusal fails the test.

The garbage collector (kube-controller-manager's job) runs beside it as a task that deletes, through the
API, every object whose owners are all gone. Nothing of the operator is mocked: it talks HTTP to this
server with the same client code it uses in a cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import http.server
import itertools
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import kmock
import kopf
import kubernetes
import pytest
import yaml
from api_validation import check_writes
from conditions import DEFAULT_TIMEOUT_S

import lipsync_operator.handlers  # noqa: F401  (registers the handlers in kopf's default registry)

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "lipsyncmodels.synctalk.io.yaml"
POOL_CRD_PATH = ROOT / "crds" / "lipsyncpools.synctalk.io.yaml"
APPLY = "application/apply-patch+yaml"
# The test's own requests and the garbage collector's come from KMock's client; everything else is the
# operator's (its own client, lipsync_operator.kube, and kopf's: progress annotations, events).
TEST_AGENT = "kmock/"
NAMESPACE = "studio"

LSM = kmock.resource("synctalk.io", "v1alpha1", "lipsyncmodels")
LSP = kmock.resource("synctalk.io", "v1alpha1", "lipsyncpools")
PODS = kmock.resource("", "v1", "pods")
DEPLOYMENTS = kmock.resource("apps", "v1", "deployments")
SERVICES = kmock.resource("", "v1", "services")
SECRETS = kmock.resource("", "v1", "secrets")
EVENTS = kmock.resource("", "v1", "events")
HPAS = kmock.resource("autoscaling", "v2", "horizontalpodautoscalers")
PDBS = kmock.resource("policy", "v1", "poddisruptionbudgets")
PODMONITORS = kmock.resource("monitoring.coreos.com", "v1", "podmonitors")
CHILD_RESOURCES = (DEPLOYMENTS, SERVICES, HPAS, PDBS, PODMONITORS)


def api_path(resource: kmock.resource, namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
    base = f"/api/{resource.version}" if resource.group == "" else f"/apis/{resource.group}/{resource.version}"
    parts = [base] + ([f"namespaces/{namespace}"] if namespace else []) + [resource.plural]
    parts += [name] if name else []
    parts += [sub] if sub else []
    return "/".join(parts)


def _strip_nones(patch: Any) -> Any:
    if isinstance(patch, dict):
        return {k: _strip_nones(v) for k, v in patch.items() if v is not None}
    return patch


def _merge(base: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(base) if isinstance(base, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge(out.get(key), value)
    return out


def _fields_v1(obj: Any) -> dict:
    """managedFields' FieldsV1 for an applied configuration (lists as leaves)."""
    if not isinstance(obj, dict):
        return {}
    return {f"f:{k}": _fields_v1(v) for k, v in obj.items() if k not in ("apiVersion", "kind")}


def _still_owned(removals: dict, other: Any) -> dict:
    """``removals`` without the paths another apply manager still sends: those stay."""
    if not isinstance(other, dict):
        return removals
    out = {}
    for key, value in removals.items():
        if key in other and value is None:
            continue
        out[key] = _still_owned(value, other[key]) if isinstance(value, dict) and key in other else value
    return out


def _drop_paths(applied: Any, patch: Any) -> None:
    """An update (not an apply) takes over the fields it sets: apply managers no longer own them."""
    if not isinstance(applied, dict) or not isinstance(patch, dict):
        return
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(applied.get(key), dict):
            _drop_paths(applied[key], value)
        elif key in applied and key != "metadata":
            del applied[key]


def _removed_paths(old: Any, new: Any) -> dict | None:
    """A merge patch of nulls for the fields in ``old`` that ``new`` no longer has (lists are atomic)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return None
    out: dict = {}
    for key, value in old.items():
        if key not in new:
            out[key] = None
        else:
            sub = _removed_paths(value, new[key])
            if sub:
                out[key] = sub
    return out


@attrs.define(kw_only=True)
class Cluster(kmock.KubernetesEmulator):
    """KMock's emulator plus the API-server semantics listed in the module docstring."""

    _versions: Any = attrs.field(factory=lambda: itertools.count(1000), init=False)
    _applied: dict = attrs.field(factory=dict, init=False)   # (resource, ns, name, manager) -> last applied
    refusals: dict = attrs.field(factory=dict, init=False)   # resource -> message: an admission webhook says no
    written: list = attrs.field(factory=list, init=False)    # what the operator created or changed, as stored

    def _now(self) -> str:
        return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def _current(self, key) -> dict | None:
        if key in self._objects and not self._objects[key].deleted:
            return self._objects[key].raw
        return None

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        response = await self._emulate(request)
        if request.resource is not None and isinstance(request.data, dict) \
                and request.method in (kmock.method.POST, kmock.method.PATCH, kmock.method.PUT) \
                and not request.headers.get("User-Agent", "").startswith(TEST_AGENT):
            meta = request.data.get("metadata") or {}
            key = (request.resource, request.namespace or meta.get("namespace"), request.name or meta.get("name"))
            stored = self._current(key) if key[2] else None
            obj = copy.deepcopy(stored if stored is not None else request.data)
            resource = request.resource
            obj.setdefault("apiVersion", f"{resource.group}/{resource.version}" if resource.group else resource.version)
            obj.setdefault("kind", self.resources[resource].kind)
            self.written.append(obj)
        return response

    async def _emulate(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        method = request.method
        if request.resource is None or not isinstance(request.data, dict) and method != kmock.method.DELETE:
            return await super()._handle(request)
        if request.resource in self.refusals and method in (kmock.method.POST, kmock.method.PATCH, kmock.method.DELETE):
            raise kmock.KubernetesError(status=403, reason="Forbidden", message=(
                f'admission webhook "policy.example.com" denied the request: {self.refusals[request.resource]}'))
        if request.action == kmock.action.CREATE:
            meta = request.data.setdefault("metadata", {})
            if request.namespace:
                meta.setdefault("namespace", request.namespace)
            meta.update(uid=str(uuid.uuid4()), resourceVersion=str(next(self._versions)), generation=1,
                        creationTimestamp=self._now())
            if not meta.get("name") and meta.get("generateName"):   # kopf's events
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        elif method == kmock.method.PATCH and request.name is not None:
            key = (request.resource, request.namespace, request.name)
            current = self._current(key)
            is_apply = request.headers.get("Content-Type", "").startswith(APPLY)
            if is_apply:
                manager = request.params.get("fieldManager", "")
                previous = self._applied.get((*key, manager))
                self._applied[(*key, manager)] = copy.deepcopy(request.data)
                managed = [{"manager": m, "operation": "Apply", "fieldsType": "FieldsV1", "fieldsV1": _fields_v1(cfg)}
                           for (*k, m), cfg in self._applied.items() if tuple(k) == key]
                if current is None:
                    return await self._create_by_apply(request, key, managed)
                removals = _removed_paths(previous, request.data) or {}
                removals.pop("status", None)
                for (*k, m), other in self._applied.items():
                    if tuple(k) == key and m != manager:
                        removals = _still_owned(removals, other)
                request.data.update(_merge(removals, request.data))
            elif current is None:
                return await super()._handle(request)   # 404 from the emulator
            elif request.subresource != "status":
                for (*k, _), cfg in self._applied.items():
                    if tuple(k) == key:
                        _drop_paths(cfg, request.data)
            meta = request.data.setdefault("metadata", {})
            expected = meta.pop("resourceVersion", None)
            if expected is not None and expected != current["metadata"].get("resourceVersion"):
                raise kmock.KubernetesError(status=409, reason="Conflict", message=(
                    f"the object has been modified; please apply your changes to the latest version "
                    f"(have {current['metadata'].get('resourceVersion')}, got {expected})"))
            # The status subresource and the main resource never change each other's part.
            if request.subresource == "status":
                for field in list(request.data):
                    if field not in ("status", "metadata"):
                        del request.data[field]
                request.data["metadata"] = meta = {}
            else:
                request.data.pop("status", None)
                for immutable in ("uid", "generation", "creationTimestamp", "namespace", "name", "managedFields"):
                    meta.pop(immutable, None)
            if is_apply:
                meta["managedFields"] = managed
            after = _merge(current, request.data)
            meta["resourceVersion"] = str(next(self._versions))
            if after.get("spec") != current.get("spec"):
                meta["generation"] = current["metadata"].get("generation", 1) + 1
        elif method == kmock.method.DELETE and request.name is not None:
            key = (request.resource, request.namespace, request.name)
            current = self._current(key)
            wanted = ((request.data or {}).get("preconditions") or {}).get("uid")
            if current is not None and wanted and wanted != current["metadata"].get("uid"):
                raise kmock.KubernetesError(status=409, reason="Conflict", message="uid precondition failed")
            for manager_key in [k for k in self._applied if k[:3] == key]:
                del self._applied[manager_key]
        return await super()._handle(request)

    async def _create_by_apply(self, request: kmock.Request, key, managed: list) -> aiohttp.web.StreamResponse:
        obj = _strip_nones(copy.deepcopy(request.data))
        meta = obj.setdefault("metadata", {})
        meta.update(namespace=request.namespace, name=request.name, uid=str(uuid.uuid4()),
                    resourceVersion=str(next(self._versions)), generation=1, creationTimestamp=self._now(),
                    managedFields=managed)
        obj.pop("status", None)
        async with self._lock:
            if key in self._objects:
                self._objects[key].create(obj)
            else:
                self._objects[key] = obj
            await self._buses[request.resource].put({"type": "ADDED", "object": self._objects[key].raw})
        return aiohttp.web.json_response(obj, status=201)

    async def _serve_version(self, request: kmock.Request):
        doc = await super()._serve_version(request)
        doc["groupVersion"] = doc["groupVersion"].lstrip("/")   # the core group: "v1", not "/v1"
        return doc

    async def _serve_list(self, request: kmock.Request):
        listing = await super()._serve_list(request)
        resource = request.resource
        api_version = f"{resource.group}/{resource.version}" if resource.group else resource.version
        return {"apiVersion": api_version, "kind": f"{self.resources[resource].kind}List", **listing}

    # ----------------------------------------------------------------------------------- test helpers

    def live(self, resource: kmock.resource, namespace: str = NAMESPACE) -> dict[str, dict]:
        return {name: obj.raw for (res, ns, name), obj in self._objects.items()
                if res == resource and ns == namespace and not obj.deleted}

    def get(self, resource: kmock.resource, name: str, namespace: str = NAMESPACE) -> dict | None:
        return self.live(resource, namespace).get(name)

    def creations(self, resource: kmock.resource, name: str, namespace: str = NAMESPACE) -> int:
        """How many times the object came into existence (POST or apply-create)."""
        key = (resource, namespace, name)
        if key not in self._objects:
            return 0
        history = list(self._objects[key].history)
        return sum(1 for i, v in enumerate(history) if v is not None and (i == 0 or history[i - 1] is None))


async def garbage_collector(cluster: Cluster, interval: float = 0.05) -> None:
    """kube-controller-manager's garbage collector: delete objects whose owners are all gone."""
    while True:
        live = {obj.raw["metadata"].get("uid") for obj in cluster.objects.values() if not obj.deleted}
        for (resource, namespace, name), obj in list(cluster.objects.items()):
            if obj.deleted:
                continue
            refs = obj.raw.get("metadata", {}).get("ownerReferences") or []
            if refs and not any(ref.get("uid") in live for ref in refs):
                async with cluster.delete(api_path(resource, namespace, name)):
                    pass
        await asyncio.sleep(interval)  # the emulated controller's own period: it polls, as the real one resyncs


def declare_resources(cluster: Cluster, *, monitoring: bool = False) -> None:
    crd = yaml.safe_load(CRD_PATH.read_text())
    names = crd["spec"]["names"]
    version = crd["spec"]["versions"][0]
    verbs = {"get", "list", "watch", "create", "patch", "update", "delete"}
    cluster.resources[f"{crd['spec']['group']}/{version['name']}/{names['plural']}"] = kmock.ResourceInfo(
        kind=names["kind"], singular=names["singular"], namespaced=crd["spec"]["scope"] == "Namespaced",
        shortnames=set(names["shortNames"]), categories=set(names.get("categories", [])), verbs=verbs,
        subresources=set(version["subresources"]))
    pool = yaml.safe_load(POOL_CRD_PATH.read_text())
    pool_names, pool_version = pool["spec"]["names"], pool["spec"]["versions"][0]
    cluster.resources[f"{pool['spec']['group']}/{pool_version['name']}/{pool_names['plural']}"] = kmock.ResourceInfo(
        kind=pool_names["kind"], singular=pool_names["singular"], namespaced=True,
        shortnames=set(pool_names["shortNames"]), categories=set(pool_names["categories"]), verbs=verbs,
        subresources=set(pool_version["subresources"]))
    # kopf's own backbone: it waits for namespaces and CRDs to be discoverable before watching anything.
    cluster.resources["v1/namespaces"] = kmock.ResourceInfo(kind="Namespace", namespaced=False, verbs=verbs)
    cluster.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = kmock.ResourceInfo(
        kind="CustomResourceDefinition", namespaced=False, verbs=verbs)
    builtin = {"apps/v1/deployments": ("Deployment", {"status", "scale"}),
               "v1/services": ("Service", {"status"}),
               "v1/secrets": ("Secret", set()),
               "v1/events": ("Event", set()),
               "autoscaling/v2/horizontalpodautoscalers": ("HorizontalPodAutoscaler", {"status"}),
               "policy/v1/poddisruptionbudgets": ("PodDisruptionBudget", {"status"}),
               "v1/pods": ("Pod", {"status"})}
    if monitoring:
        builtin["monitoring.coreos.com/v1/podmonitors"] = ("PodMonitor", set())
    for key, (kind, subresources) in builtin.items():
        cluster.resources[key] = kmock.ResourceInfo(kind=kind, namespaced=True, verbs=verbs,
                                                    subresources=subresources)


@pytest.fixture()
async def cluster(request) -> Cluster:
    monitoring = bool(request.node.get_closest_marker("monitoring"))
    async with Cluster() as emulator, kmock.Server(emulator):
        declare_resources(emulator, monitoring=monitoring)
        gc = asyncio.create_task(garbage_collector(emulator))
        try:
            yield emulator
        finally:
            gc.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await gc
        refused = await asyncio.to_thread(check_writes, emulator.written)
        assert not refused, "the operator wrote what an API server would refuse:\n" + "\n".join(refused)


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "monitoring: the emulated cluster serves monitoring.coreos.com/v1")


# ---------------------------------------------------------------------------------------- registry


class Registry:
    """A real package registry: a directory with index.json, served by http.server on 127.0.0.1."""

    def __init__(self, root: Path):
        self.root = root
        self.packages: list[dict] = []
        self.requests: list[tuple[float, str, str]] = []   # (time, method, path)
        self.fail_index: int = 0                             # answer 503 to this many index requests
        self.redirect_index: str | None = None               # answer index requests with 302 to this URL
        self._server: http.server.ThreadingHTTPServer | None = None

    def add(self, name: str, version: str, payload: bytes | None = None) -> dict:
        import hashlib
        payload = payload if payload is not None else f"{name}-{version}".encode() * 64
        rel = f"{name}/{version}/{name}-{version}.zip"
        (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
        (self.root / rel).write_bytes(payload)
        entry = {"name": name, "version": version, "size": len(payload),
                 "sha256": hashlib.sha256(payload).hexdigest(), "url": rel}
        self.packages = [p for p in self.packages if (p["name"], p["version"]) != (name, version)] + [entry]
        (self.root / "index.json").write_text(json.dumps({"packages": self.packages}))
        return entry

    def start(self, port: int = 0) -> str:
        registry = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(registry.root), **kwargs)

            def log_message(self, *args):
                pass

            def _record(self) -> bool:
                registry.requests.append((time.monotonic(), self.command, self.path))
                if self.path.endswith("/index.json") and registry.redirect_index:
                    self.send_response(302)
                    self.send_header("Location", registry.redirect_index)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return False
                if self.path.endswith("/index.json") and registry.fail_index > 0:
                    registry.fail_index -= 1
                    self.send_error(503, "registry is warming up")
                    return False
                return True

            def do_GET(self):
                if self._record():
                    super().do_GET()

            def do_HEAD(self):
                if self._record():
                    super().do_HEAD()

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self.url

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@pytest.fixture()
def registry(tmp_path) -> Registry:
    reg = Registry(tmp_path / "registry")
    reg.root.mkdir()
    reg.add("alice", "1.0.0")
    reg.add("alice", "1.2.0")
    reg.add("bob", "3")
    reg.start()
    yield reg
    reg.stop()


def free_port() -> int:
    """A port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------- operator


@pytest.fixture()
def operator_env(cluster, registry, tmp_path, monkeypatch) -> dict[str, str]:
    """Environment for an operator talking to the emulator: kubeconfig plus fast retries."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": str(cluster.url).rstrip("/")}}],
        "users": [{"name": "kmock", "user": {"token": "test-token"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": NAMESPACE}}],
    }))
    env = {
        "KUBECONFIG": str(kubeconfig),
        "LIPSYNC_OPERATOR_REGISTRY_URL": registry.url,
        "LIPSYNC_OPERATOR_INFERENCE_IMAGE": "lipsync-inference:test",
        "LIPSYNC_OPERATOR_DEFAULT_REDIS_URL": "redis://lipsync-redis.lipsync-system.svc:6379/0",
        "LIPSYNC_OPERATOR_MONITOR_LABELS": "release=kube-prometheus-stack",
        "LIPSYNC_OPERATOR_RETRY_BASE_SECONDS": "0.2",
        "LIPSYNC_OPERATOR_RETRY_MAX_SECONDS": "1",
        "LIPSYNC_OPERATOR_HTTP_TIMEOUT_SECONDS": "2",
        # The test registries listen on loopback: allowed by name (the default registry is allowed anyway).
        "LIPSYNC_OPERATOR_ALLOWED_REGISTRIES": "127.0.0.1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # The kubernetes client reads $KUBECONFIG once, at import (kopf's login uses that); a process started
    # with this environment would have seen it then.
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
    return env


def fast_settings() -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    settings.queueing.exit_timeout = 0.5
    settings.background.instant_exit_timeout = 0.1
    return settings


class RunningOperator:
    """The real kopf operator with this project's handlers, in a thread with its own event loop (the test's
    loop serves the emulator; kopf, when it stops, cancels every task of the loop it runs in)."""

    def __init__(self):
        self.stop_flag = threading.Event()
        self.ready_flag = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="kopf", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            asyncio.run(kopf.operator(
                registry=kopf.get_default_registry(), settings=fast_settings(), clusterwide=True,
                standalone=True, stop_flag=self.stop_flag, ready_flag=self.ready_flag, memo=kopf.Memo()))
        except BaseException as exc:   # surfaced by stop()
            self.error = exc

    async def stop(self) -> None:
        self.stop_flag.set()
        await asyncio.to_thread(self.thread.join, 20)
        assert not self.thread.is_alive(), "the operator did not stop"
        if self.error is not None:
            raise self.error


@pytest.fixture()
async def start_operator(operator_env):
    running: list[RunningOperator] = []

    async def start() -> RunningOperator:
        op = RunningOperator()
        running.append(op)
        ready = await asyncio.to_thread(op.ready_flag.wait, 20)
        assert ready, "the operator did not start"
        return op

    yield start
    for op in running:
        if op.thread.is_alive():
            await op.stop()


@pytest.fixture()
async def operator(start_operator) -> RunningOperator:
    return await start_operator()


class OperatorProcess:
    """``kopf run -m lipsync_operator.handlers``: the operator exactly as the container runs it."""

    def __init__(self, env: dict[str, str], log: Path):
        self.log = log
        self._env = {**os.environ, **env}
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kopf", "run", "-m", "lipsync_operator.handlers", "--standalone", "--all-namespaces",
            env=self._env, stdout=self.log.open("ab"), stderr=asyncio.subprocess.STDOUT)

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        await self.proc.wait()

    async def terminate(self) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.terminate()
        return await asyncio.wait_for(self.proc.wait(), timeout=20)


# ------------------------------------------------------------------------------------ cluster actions


async def apply_model(cluster: Cluster, name: str, spec: dict, namespace: str = NAMESPACE) -> dict:
    """kubectl apply of a new LipSyncModel."""
    body = {"apiVersion": "synctalk.io/v1alpha1", "kind": "LipSyncModel",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}
    async with cluster.post(api_path(LSM, namespace), json=body) as resp:
        assert resp.status in (200, 201), await resp.text()
        return await resp.json()


async def patch_model(cluster: Cluster, name: str, patch: dict, namespace: str = NAMESPACE) -> dict:
    async with cluster.patch(api_path(LSM, namespace, name), json=patch,
                             headers={"Content-Type": "application/merge-patch+json"}) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def delete_object(cluster: Cluster, resource: kmock.resource, name: str, namespace: str = NAMESPACE) -> None:
    async with cluster.delete(api_path(resource, namespace, name)) as resp:
        assert resp.status == 200, await resp.text()


async def create_object(cluster: Cluster, resource: kmock.resource, body: dict, namespace: str = NAMESPACE) -> dict:
    async with cluster.post(api_path(resource, namespace), json=body) as resp:
        assert resp.status in (200, 201), await resp.text()
        return await resp.json()


async def roll_out(cluster: Cluster, name: str, *, available: int | None = None, namespace: str = NAMESPACE,
                   stuck: bool = False) -> None:
    """The Deployment controller's part: report the Deployment's pods (all updated; ``available`` of them)."""
    dep = cluster.get(DEPLOYMENTS, name, namespace)
    assert dep is not None, f"no Deployment {name}"
    desired = dep["spec"].get("replicas", 1)
    available = desired if available is None else available
    conditions = [{"type": "Available", "status": "True" if available >= desired else "False",
                   "reason": "MinimumReplicasAvailable"}]
    if stuck:
        conditions.append({"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                           "message": f'ReplicaSet "{name}-7d9f" has timed out progressing.'})
    else:
        conditions.append({"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"})
    status = {"observedGeneration": dep["metadata"]["generation"], "replicas": desired, "updatedReplicas": desired,
              "readyReplicas": available, "availableReplicas": available, "conditions": conditions}
    async with cluster.patch(api_path(DEPLOYMENTS, namespace, name, "status"), json={"status": status},
                             headers={"Content-Type": "application/merge-patch+json"}) as resp:
        assert resp.status == 200, await resp.text()


async def eventually(check: Callable[[], Any], timeout: float = DEFAULT_TIMEOUT_S, what: str = "condition") -> Any:
    """Poll ``check`` (giving the event loop, hence the emulator, time to serve) until it returns truthy."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
            last_error = None
        except (KeyError, TypeError, AssertionError) as exc:
            last_error = exc
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}" + (f": {last_error!r}" if last_error else ""))


def condition(obj: dict | None, type_: str) -> dict | None:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond["type"] == type_:
            return cond
    return None
