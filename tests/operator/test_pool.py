"""Pools end to end: the real operator against KMock's emulated API, with real ``lipsync serve`` processes as the
pool's pods, each on its own loopback address (127.0.0.11, 127.0.0.12, ... on one port), registered as Pod
objects with that podIP. The test plays kubectl and the kubelet (Pod objects, a dead pod); the operator
loads, labels, unloads and reports; the pods' own gRPC answers say what is really loaded where.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from lsm_harness import (
    DEPLOYMENTS,
    EVENTS,
    LSM,
    LSP,
    NAMESPACE,
    PODS,
    SERVICES,
    apply_model,
    condition,
    create_object,
    delete_object,
    eventually,
    free_port,
)

from inference_pod.tools.demo_character import build_demo_package
from lipsync.v1 import lipsync_pb2 as pb
from lipsync.v1 import lipsync_pb2_grpc as pb_grpc
from lipsync_operator.pool_children import MODEL_LABEL_PREFIX, model_label, pool_selector_labels

FOOTPRINT_MB = 16          # a width-4 demo model reports about 15.2 MiB
BUDGET_MB = 40             # two such models per pod
ROUND_S = 0.3
WAIT_S = 90.0              # a loaded 2-core machine: pod starts and loads take a while


class PoolPod:
    """`lipsync serve` on its own loopback address, and the Pod object the kubelet would report for it."""

    def __init__(self, name: str, ip: str, port: int, registry_url: str, workdir: Path):
        self.name, self.ip, self.port = name, ip, port
        self.models_dir = workdir / name
        self.models_dir.mkdir(parents=True)
        self.log = workdir / f"{name}.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "LIPSYNC_TORCH_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "inference_pod.cli", "serve", "--host", ip, "--port", str(port),
             "--metrics-port", "0", "--http-port", "0", "--models-dir", str(self.models_dir), "--device", "cpu",
             "--registry-url", registry_url, "--memory-budget-mb", str(BUDGET_MB), "--max-batch-delay-ms", "2",
             "--shutdown-grace-s", "1", "--frame-cache-ttl", "0"],  # every frame generated: demand shows
            env=env, stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        self.channel = grpc.insecure_channel(f"{ip}:{port}")
        self.stub = pb_grpc.LipSyncStub(self.channel)

    def loaded(self) -> dict[str, int]:
        reply = self.stub.ListModels(pb.ListModelsRequest(), timeout=10)
        return {m.name: m.memory_bytes for m in reply.models if m.state == pb.MODEL_STATE_LOADED}

    def wait_serving(self) -> None:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            try:
                self.loaded()
                return
            except grpc.RpcError:
                time.sleep(0.2)
        raise AssertionError(f"{self.name} did not start: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.channel.close()

    def pod_object(self, pool: str) -> dict:
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": self.name, "namespace": NAMESPACE, "labels": pool_selector_labels(pool)},
                "status": {"phase": "Running", "podIP": self.ip,
                           "conditions": [{"type": "Ready", "status": "True"}]}}


@pytest.fixture()
def pool_registry(registry, tmp_path):
    """The operator's registry, now with real (tiny) character packages the pods can load."""
    for i, name in enumerate(("ann", "ben", "cat", "dan", "eve")):
        path = tmp_path / "packages" / f"{name}.zip"
        path.parent.mkdir(exist_ok=True)
        build_demo_package(name, path, width=4, frames=6, seed=i, size=(48, 48), audio_seconds=1.0,
                           version="1")
        registry.add(name, "1", path.read_bytes())
    return registry


@pytest.fixture()
def pool_env(operator_env, monkeypatch):
    port = free_port()
    monkeypatch.setenv("LIPSYNC_OPERATOR_POOL_INTERVAL_SECONDS", str(ROUND_S))
    monkeypatch.setenv("LIPSYNC_OPERATOR_POD_GRPC_PORT", str(port))
    return port


@pytest.fixture()
def pods(pool_env, pool_registry, tmp_path):
    started: list[PoolPod] = []

    def start(name: str, ip: str) -> PoolPod:
        pod = PoolPod(name, ip, pool_env, pool_registry.url, tmp_path / "pods")
        started.append(pod)
        return pod

    yield start
    for pod in started:
        if pod.proc.poll() is None:
            pod.kill()


async def add_pod(cluster, pod: PoolPod, pool: str = "studio") -> None:
    await asyncio.to_thread(pod.wait_serving)
    await create_object(cluster, PODS, pod.pod_object(pool))


def selected(cluster, service: dict) -> set[str]:
    """The pods a Service's endpoints controller would pick: every selector label matches."""
    selector = service["spec"]["selector"]
    return {name for name, pod in cluster.live(PODS).items()
            if all((pod["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items())}


async def loaded_on(pods: list[PoolPod]) -> dict[str, set[str]]:
    out = {}
    for pod in pods:
        out[pod.name] = set(await asyncio.to_thread(pod.loaded))
    return out


def labelled(cluster) -> dict[str, set[str]]:
    return {name: {k[len(MODEL_LABEL_PREFIX):] for k in (pod["metadata"].get("labels") or {})
                   if k.startswith(MODEL_LABEL_PREFIX)}
            for name, pod in cluster.live(PODS).items()}


def pooled(name: str, **placement) -> dict:
    return {"package": {"name": name}, "pool": "studio",
            "placement": {"memoryMb": FOOTPRINT_MB, **placement}}


async def create_pool(cluster) -> None:
    await create_object(cluster, LSP, {"apiVersion": "synctalk.io/v1alpha1", "kind": "LipSyncPool",
                                       "metadata": {"name": "studio", "namespace": NAMESPACE},
                                       "spec": {"modelMemoryBudgetMb": 64, "replicas": 2, "capacityFps": 400,
                                                "runtime": {"device": "cpu"}}})


def copies(cluster, name: str) -> tuple[int, int]:
    st = (cluster.get(LSM, name) or {}).get("status") or {}
    return st.get("copies"), st.get("readyCopies")


async def settled(cluster, live_pods: list[PoolPod], models: set[str]) -> dict[str, set[str]]:
    """Every model loaded somewhere, and each pod's labels exactly what it has loaded."""
    async def check():
        loaded = await loaded_on(live_pods)
        labels = labelled(cluster)
        placed = set().union(*loaded.values())
        ok = placed == models and all(labels.get(p.name) == loaded[p.name] for p in live_pods)
        return loaded if ok else None

    deadline = time.monotonic() + WAIT_S
    last = None
    while time.monotonic() < deadline:
        last = await check()
        if last is not None:
            return last
        await asyncio.sleep(0.2)
    raise AssertionError(f"not settled: loaded {await loaded_on(live_pods)}, labels {labelled(cluster)}")


def frame_from(pod: PoolPod, model: str) -> pb.Frame:
    return pod.stub.GenerateFrame(pb.GenerateFrameRequest(model=model, frame_id=3), timeout=30)


async def test_a_pool_places_routes_heals_scales_and_survives_a_restart(cluster, pool_registry, pods,
                                                                         start_operator):
    a, b = pods("pool-a", "127.0.0.11"), pods("pool-b", "127.0.0.12")
    operator = await start_operator()
    await create_pool(cluster)
    dep = await eventually(lambda: cluster.get(DEPLOYMENTS, "studio"), WAIT_S, "the pool's Deployment")
    server = dep["spec"]["template"]["spec"]["containers"][0]
    assert "--preload" not in server["args"] and "initContainers" not in dep["spec"]["template"]["spec"]
    await add_pod(cluster, a)
    await add_pod(cluster, b)
    for name in ("ann", "ben", "cat"):
        await apply_model(cluster, name, pooled(name, maxCopies=2, demandPerCopy=5))

    # Placed within each pod's budget; labels and Services select exactly the pods that loaded the model.
    loaded = await settled(cluster, [a, b], {"ann", "ben", "cat"})
    for pod in (a, b):
        resident = await asyncio.to_thread(pod.loaded)
        assert sum(resident.values()) <= BUDGET_MB << 20, resident
    for name in ("ann", "ben", "cat"):
        svc = await eventually(lambda n=name: cluster.get(SERVICES, n), WAIT_S, f"Service {name}")
        assert svc["spec"]["selector"] == {**pool_selector_labels("studio"), model_label(name): "true"}
        holders = {p for p, models in loaded.items() if name in models}
        assert selected(cluster, svc) == holders
        for pod in (a, b):
            if pod.name in holders:
                frame = await asyncio.to_thread(frame_from, pod, name)
                assert frame.model == name and frame.image
        await eventually(lambda n=name: copies(cluster, n)[1] == len(loaded_on_sync(loaded, n)), WAIT_S,
                         f"{name}'s ready copies in its status")
    assert "Deployment" not in {o["kind"] for o in cluster.live(DEPLOYMENTS).values()
                                if o["metadata"]["name"] in ("ann", "ben", "cat")}
    lsp = await eventually(lambda: (cluster.get(LSP, "studio") or {}).get("status", {}).get("models") == 3 and
                           cluster.get(LSP, "studio"), WAIT_S, "the pool's status")
    assert lsp["status"]["copies"] == 3 and lsp["status"]["memoryUsed"].endswith("Gi")

    # Demand rises: a model gets a second copy on the other pod (the one with room); it falls: back to one.
    stop = threading.Event()
    busy_pod = a if len(loaded["pool-a"]) == 2 else b
    hot = sorted(loaded[busy_pod.name])[0]

    def drive() -> None:
        while not stop.is_set():
            items = [pb.GenerateFrameRequest(model=hot, frame_id=i) for i in range(8)]
            try:
                busy_pod.stub.GenerateBatch(pb.GenerateBatchRequest(items=items), timeout=30)
            except grpc.RpcError:
                time.sleep(0.05)  # a load driver's back-off (the pod may be busy moving models): its pace, not a wait

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    try:
        await eventually(lambda: copies(cluster, hot) == (2, 2), WAIT_S, "a second copy of the hot model")
        both = await loaded_on([a, b])
        assert all(hot in models for models in both.values())
        svc = cluster.get(SERVICES, hot)
        assert selected(cluster, svc) == {"pool-a", "pool-b"}
    finally:
        stop.set()
        driver.join(30)
    await eventually(lambda: copies(cluster, hot) == (1, 1), WAIT_S, "back to one copy")

    # A full pool: two slots per pod, two pods, five models: one fits nowhere until a third pod comes.
    await apply_model(cluster, "dan", pooled("dan"))
    await apply_model(cluster, "eve", pooled("eve"))
    full = await eventually(lambda: (c := condition(cluster.get(LSP, "studio"), "Full")) and
                            c["status"] == "True" and c, WAIT_S, "the pool reported full")
    assert "fit on none of 2 pods" in full["message"] and "MiB" in full["message"]
    unplaced = await eventually(lambda: [n for n in ("dan", "eve") if
                                         (c := condition(cluster.get(LSM, n), "Degraded")) and
                                         c["reason"] == "PoolFull"], WAIT_S, "a model reported PoolFull")
    assert "add pods" in condition(cluster.get(LSM, unplaced[0]), "Degraded")["message"]
    assert any(e.get("reason") == "PoolFull" for e in cluster.live(EVENTS).values())
    c = pods("pool-c", "127.0.0.13")
    await add_pod(cluster, c)
    await eventually(lambda: condition(cluster.get(LSP, "studio"), "Full")["status"] == "False", WAIT_S,
                     "the pool no longer full")
    await eventually(lambda: condition(cluster.get(LSM, unplaced[0]), "Degraded")["status"] == "False", WAIT_S,
                     "the model placed")
    await delete_object(cluster, LSM, "eve")

    # A pod dies: its models are placed on the others at once.
    await settled(cluster, [a, b, c], {"ann", "ben", "cat", "dan"})
    victim_models = set(await asyncio.to_thread(b.loaded))
    b.kill()
    await delete_object(cluster, PODS, "pool-b")
    loaded = await settled(cluster, [a, c], {"ann", "ben", "cat", "dan"})
    assert victim_models <= set().union(*loaded.values())

    # A model deleted: unloaded from its pods, its label gone, its Service collected.
    holders = [p for p in (a, c) if "cat" in loaded[p.name]]
    await delete_object(cluster, LSM, "cat")
    await eventually(lambda: cluster.get(SERVICES, "cat") is None, WAIT_S, "cat's Service collected")
    loaded = await settled(cluster, [a, c], {"ann", "ben", "dan"})
    for pod in holders:
        assert "cat" not in loaded[pod.name]

    # An operator restart changes nothing that works: no load, no unload, the same labels.
    before = (await loaded_on([a, c]), labelled(cluster))
    await operator.stop()
    await start_operator()
    for _ in range(5):  # quiet periods, not synchronisation: nothing may change over several rounds
        await asyncio.sleep(ROUND_S * 3)
        assert (await loaded_on([a, c]), labelled(cluster)) == before


def loaded_on_sync(loaded: dict[str, set[str]], name: str) -> list[str]:
    return [p for p, models in loaded.items() if name in models]


def hold_session(pod: PoolPod, model: str, stop: threading.Event, frames: list[int]) -> None:
    """A live session on ``pod``, paced at the model's fps and idle (no audio), until ``stop``."""
    def requests():
        yield pb.SessionRequest(config=pb.SessionConfig(model=model))
        stop.wait()   # then half-close: the session ends

    for response in pod.stub.Session(requests(), timeout=WAIT_S * 4):
        if response.WhichOneof("message") == "frame":
            frames.append(response.frame.tick)


async def test_a_pool_counts_live_sessions_as_load(cluster, pool_registry, pods, start_operator):
    """A session asks for a frame every tick even while its character idles, whose frames come from the idle
    cache and barely show as generated frames: one session at 25 fps on a model whose copies each carry 20
    frames/s gets it a second copy; when the session ends, the copy goes."""
    a, b = pods("pool-a", "127.0.0.11"), pods("pool-b", "127.0.0.12")
    await start_operator()
    await create_pool(cluster)
    await add_pod(cluster, a)
    await add_pod(cluster, b)
    await apply_model(cluster, "ann", pooled("ann", maxCopies=2, demandPerCopy=20))
    loaded = await settled(cluster, [a, b], {"ann"})
    await eventually(lambda: copies(cluster, "ann") == (1, 1), WAIT_S, "one copy without demand")
    holder = a if "ann" in loaded["pool-a"] else b

    stop, frames = threading.Event(), []
    session = threading.Thread(target=hold_session, args=(holder, "ann", stop, frames), daemon=True)
    session.start()
    try:
        await eventually(lambda: len(frames) > 25, WAIT_S, "the session's frames")
        await eventually(lambda: copies(cluster, "ann") == (2, 2), WAIT_S, "a second copy for the session")
        assert all("ann" in models for models in (await loaded_on([a, b])).values())
        stats = await asyncio.to_thread(holder.stub.GetStats, pb.GetStatsRequest(), timeout=10)
        assert (stats.sessions_active, {m.name: m.sessions_active for m in stats.models}["ann"]) == (1, 1)
    finally:
        stop.set()
        await asyncio.to_thread(session.join, 30)
    await eventually(lambda: copies(cluster, "ann") == (1, 1), WAIT_S, "back to one copy once the session ended")
