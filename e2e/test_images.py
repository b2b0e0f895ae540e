"""The images, built by `make test-images`, run in containers (podman), as the chart and the operator run them:

- the inference container as the operator's pods run it (user 10001, read-only root, /models and /tmp
  volumes) serves the demo character: health, a frame matching a host `lipsync serve`'s, /metrics, and a
  SIGTERM drain within the grace period; the time from container start to SERVING is printed;
- the operator container, with the args and env the chart renders, against the project's Kubernetes API
  emulation (tests/operator/lsm_harness.py, KMock) on loopback through a mounted kubeconfig: after
  `kubectl apply -f crds/examples/cpu-demo.yaml` it writes the Deployment and the Service;
- the pod it wrote, played by a kubelet stand-in (e2e/kubelet_standin.py) with `podman kube play`: the init
  container fetches the package from a registry on loopback, the server serves it, readiness reported through
  the API turns the LipSyncModel Ready, and deleting the LipSyncModel stops the pod.

Not part of `make test` (it needs the images): `make test-images` builds them and runs this file. Where no
container can run, the session stops at once with one line saying why and a non-zero status."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import cv2
import helm_python as helm
import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "operator"), str(ROOT / "tests" / "chart"), str(ROOT / "tests")]

from chart_support import CHART, container_env, find, render  # noqa: E402
from kubelet_standin import PodmanKubelet, grpc_serving  # noqa: E402
from lsm_harness import (  # noqa: E402
    DEPLOYMENTS,
    LSM,
    NAMESPACE,
    SERVICES,
    Registry,
    cluster,  # noqa: F401  (the fixture: KMock's emulator with the API-server semantics, and a garbage collector)
    condition,
    eventually,
    free_port,
)
from podman_cli import cannot_run_containers, exit_code, logs, podman, remove, running  # noqa: E402

from lipsync_operator import children  # noqa: E402
from lipsync_operator.spec import normalize  # noqa: E402

TAG = os.environ.get("IMAGE_TAG", "0.1.0")
INFERENCE_IMAGE = f"lipsync-inference:{TAG}"
OPERATOR_IMAGE = f"lipsync-operator:{TAG}"
CPU_DEMO = ROOT / "crds" / "examples" / "cpu-demo.yaml"
SERVING_DEADLINE_S = 300


def lipsync(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The host's `lipsync` CLI (this checkout's)."""
    proc = subprocess.run([sys.executable, "-m", "inference_pod.cli", *args], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"lipsync {' '.join(args)}: {proc.stderr[-2000:]}"
    return proc


def wait_serving(port: int, deadline_s: float, why_not=lambda: None) -> None:
    start = time.monotonic()
    while not grpc_serving(port, timeout=2):
        problem = why_not()
        assert problem is None, problem
        assert time.monotonic() - start < deadline_s, f"nothing SERVING on 127.0.0.1:{port} after {deadline_s} s"
        time.sleep(0.2)


def volume(path: Path) -> Path:
    """A directory as an emptyDir is: writable by the pod's user."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o777)
    return path


def port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="session", autouse=True)
def containers_run():
    for image in (INFERENCE_IMAGE, OPERATOR_IMAGE):
        why = cannot_run_containers(f"localhost/{image}")
        if why:
            pytest.exit(f"IMAGES: NO CONTAINER CAN RUN HERE, nothing was tested: {why}", returncode=3)


@pytest.fixture(scope="session")
def demo_package(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("package") / "demo.zip"
    lipsync("package", "demo", "--out", str(out), timeout=600)
    os.chmod(out, 0o644)
    return out


@pytest.fixture(scope="session")
def registry(demo_package, tmp_path_factory) -> Registry:
    """A real package registry (`lipsync package publish`) over HTTP on loopback; it records its requests."""
    root = tmp_path_factory.mktemp("registry")
    lipsync("package", "publish", "--registry", str(root), str(demo_package))
    served = Registry(root)
    served.start()
    yield served
    served.stop()


@pytest.fixture(scope="session")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


# ------------------------------------------------------------------------------------- inference container


def test_the_inference_container_serves_the_demo_as_the_pods_run_it(demo_package, tmp_path):
    models, host_models = volume(tmp_path / "models"), tmp_path / "host-models"
    shutil.copy(demo_package, models / "demo.zip")
    host_models.mkdir()
    shutil.copy(demo_package, host_models / "demo.zip")
    grpc_port, http_port, metrics_port, host_port = free_port(), free_port(), free_port(), free_port()
    drain_s = normalize({"package": {"name": "demo"}})["runtime"]["drainSeconds"]
    grace_s = drain_s + 10          # the pod's grace after its preStop (children.deployment's margin)
    name = "lipsync-images-inference"
    remove(name)
    host = None
    try:
        start = time.monotonic()
        # The operator's server container: its user, read-only root, its two volumes, its env.
        podman("run", "--detach", "--name", name, "--network", "host", "--user", f"{children.RUN_AS}:{children.RUN_AS}",
               "--read-only", "--read-only-tmpfs=false", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
               "--volume", f"{models}:/models", "--volume", f"{volume(tmp_path / 'tmp')}:/tmp",
               "--env", "HOME=/tmp", "--env", "XDG_CACHE_HOME=/tmp/.cache",
               "--env", f"LIPSYNC_SHUTDOWN_GRACE_S={drain_s}",
               INFERENCE_IMAGE, "serve", "--port", str(grpc_port), "--metrics-port", str(metrics_port),
               "--http-port", str(http_port), "--models-dir", "/models", "--preload", "demo")
        wait_serving(grpc_port, SERVING_DEADLINE_S,
                     lambda: None if running(name) else f"the container exited: {logs(name)}")
        print(f"\nIMAGES: inference container start to SERVING: {time.monotonic() - start:.1f} s")
        # The same package served on the host, started only now: the measurement above had the CPU alone.
        host_log = (tmp_path / "host-serve.log").open("wb")
        host = subprocess.Popen([sys.executable, "-m", "inference_pod.cli", "serve", "--port", str(host_port),
                                 "--metrics-port", "0", "--http-port", "0", "--models-dir", str(host_models),
                                 "--preload", "demo"], stdout=host_log, stderr=subprocess.STDOUT)
        wait_serving(host_port, SERVING_DEADLINE_S, lambda: None if host.poll() is None else
                     f"the host's lipsync serve exited: {(tmp_path / 'host-serve.log').read_text()[-2000:]}")

        health = lipsync("client", "--target", f"127.0.0.1:{grpc_port}", "health", "--service", "demo")
        assert "SERVING" in health.stdout, health.stdout
        frames = {}
        for which, port in (("container", grpc_port), ("host", host_port)):
            out = tmp_path / f"{which}.png"
            lipsync("client", "--target", f"127.0.0.1:{port}", "frame", "demo", "12", "--format", "png",
                    "-o", str(out))
            frames[which] = cv2.imread(str(out), cv2.IMREAD_COLOR)
            assert frames[which] is not None, f"{which}: {out} is not an image"
        assert frames["container"].shape == frames["host"].shape
        diff = np.abs(frames["container"].astype(int) - frames["host"].astype(int))
        assert diff.max() <= 2, f"the container's frame differs from the host's by up to {diff.max()} levels"

        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
            metrics = reply.read().decode()
        assert 'lipsync_frames_generated_total{model="demo"' in metrics, metrics[:2000]

        # The kubelet's SIGTERM: the server drains and exits by itself within the grace period.
        start = time.monotonic()
        podman("kill", "--signal", "TERM", name)
        podman("wait", name, timeout=grace_s + 30)
        took = time.monotonic() - start
        print(f"IMAGES: inference container SIGTERM to exit: {took:.1f} s (grace {grace_s} s)")
        assert took < grace_s, f"SIGTERM to exit took {took:.1f} s, the grace period is {grace_s} s"
        assert exit_code(name) == 0, f"exit status {exit_code(name)} after SIGTERM: {logs(name)}"
    finally:
        if host is not None:
            host.terminate()
            host.wait(timeout=60)
        remove(name)


# ---------------------------------------------------------------------------------- operator container


@pytest.fixture()
def kubeconfig(cluster, tmp_path) -> Path:  # noqa: F811
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": str(cluster.url).rstrip("/")}}],
        "users": [{"name": "kmock", "user": {"token": "test-token"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": NAMESPACE}}],
    }))
    path.chmod(0o644)
    return path


@pytest.fixture()
async def operator_container(cluster, kubeconfig, registry, chart, tmp_path):  # noqa: F811
    """The chart's operator container: its image, args, env, user and volumes as rendered, plus a kubeconfig
    (in a cluster the service account's token does that job)."""
    health_port = free_port()   # the host's network is shared: the chart's port value, not a fixed 8080
    docs = render(chart, {"operator": {"healthPort": health_port, "image": {"tag": TAG}},
                          "inference": {"image": {"tag": TAG}}, "registry": {"url": registry.url}})
    (deployment,) = find(docs, "Deployment", "lipsync-operator")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    user = pod["securityContext"]["runAsUser"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert [m["mountPath"] for m in container["volumeMounts"]] == ["/tmp"]
    env = {**container_env(container, docs), "KUBECONFIG": "/var/run/lipsync/kubeconfig"}
    name = "lipsync-images-operator"
    remove(name)
    run = ["run", "--detach", "--name", name, "--network", "host", "--user", f"{user}:{pod['securityContext']['runAsGroup']}",
           "--read-only", "--read-only-tmpfs=false", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
           "--volume", f"{volume(tmp_path / 'operator-tmp')}:/tmp",
           "--volume", f"{kubeconfig}:/var/run/lipsync/kubeconfig:ro"]
    for key, value in env.items():
        run += ["--env", f"{key}={value}"]
    await asyncio.to_thread(podman, *run, container["image"], *container["args"])
    try:
        def healthy() -> bool:
            assert running(name), f"the operator container exited: {logs(name)}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/healthz", timeout=2) as reply:
                    return reply.status == 200
            except OSError:
                return False
        deadline = time.monotonic() + 120
        while not await asyncio.to_thread(healthy):
            assert time.monotonic() < deadline, f"the operator's /healthz never answered: {logs(name)}"
            await asyncio.sleep(0.5)
        yield {"container": container, "env": env, "name": name}
    finally:
        (tmp_path / "operator.log").write_text(logs(name))
        await asyncio.to_thread(podman, "stop", "--time", "10", name, check=False)
        remove(name)


def kubectl(kubeconfig: Path, *args: str) -> str:
    proc = subprocess.run(["kubectl", "--kubeconfig", str(kubeconfig), *args], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, f"kubectl {' '.join(args)}: {proc.stderr.strip()}"
    return proc.stdout


async def apply_cpu_demo(cluster, kubeconfig) -> dict:  # noqa: F811
    """`kubectl apply -f crds/examples/cpu-demo.yaml`, then the operator's Deployment and Service. The emulation
    serves no OpenAPI document for kubectl's client-side validation (--validate=false); the example is
    validated against the CRD's schema in tests/chart/test_crd.py."""
    assert shutil.which("kubectl"), "kubectl is not installed"
    await asyncio.to_thread(kubectl, kubeconfig, "apply", "--validate=false", "-f", str(CPU_DEMO))
    name = yaml.safe_load(CPU_DEMO.read_text())["metadata"]["name"]
    deployment = await eventually(lambda: cluster.get(DEPLOYMENTS, name), timeout=60, what="the Deployment")
    await eventually(lambda: cluster.get(SERVICES, name), timeout=30, what="the Service")
    return deployment


async def test_the_operator_container_writes_the_deployment_and_service(cluster, kubeconfig, registry,  # noqa: F811
                                                                        operator_container):
    deployment = await apply_cpu_demo(cluster, kubeconfig)
    pod = deployment["spec"]["template"]["spec"]
    assert [c["image"] for c in pod["initContainers"] + pod["containers"]] == [INFERENCE_IMAGE] * 2
    fetch = pod["initContainers"][0]["command"]
    assert fetch[:3] == ["lipsync", "package", "fetch"] and registry.url in fetch, fetch
    service = cluster.get(SERVICES, deployment["metadata"]["name"])
    assert {p["port"] for p in service["spec"]["ports"]} >= {children.GRPC_PORT}
    await eventually(lambda: condition(cluster.get(LSM, "demo"), "PackageAvailable")["status"] == "True",
                     timeout=30, what="PackageAvailable")


async def test_the_pod_the_operator_wrote_serves_and_turns_the_model_ready(cluster, kubeconfig, registry,  # noqa: F811
                                                                            operator_container, tmp_path):
    ports = (children.GRPC_PORT, children.HTTP_PORT, children.METRICS_PORT)
    taken = [p for p in ports if port_taken(p)]
    assert not taken, f"the pod shares the host's network and its ports {taken} are taken on this machine"
    deployment = await apply_cpu_demo(cluster, kubeconfig)
    kubelet = PodmanKubelet(deployment, tmp_path)
    played = time.monotonic()
    try:
        await asyncio.to_thread(kubelet.play)
        took = await asyncio.to_thread(kubelet.wait_ready, SERVING_DEADLINE_S)
        print(f"\nIMAGES: played pod ready {took:.1f} s after `kube play` returned")
        # The init container (podman removes it once it finished) downloaded the package from the registry.
        assert [path for when, method, path in registry.requests if when > played and method == "GET"
                and path.endswith(".zip")], registry.requests
        await asyncio.to_thread(kubelet.report_ready, str(cluster.url))
        ready = await eventually(lambda: condition(cluster.get(LSM, "demo"), "Ready"), timeout=30, what="Ready")
        await eventually(lambda: condition(cluster.get(LSM, "demo"), "Ready")["status"] == "True", timeout=60,
                         what=f"Ready=True (was {ready})")

        frame = tmp_path / "frame.jpg"
        await asyncio.to_thread(lipsync, "client", "--target", f"127.0.0.1:{children.GRPC_PORT}", "frame", "demo",
                                "3", "-o", str(frame))
        assert cv2.imread(str(frame)) is not None

        await asyncio.to_thread(kubectl, kubeconfig, "delete", "lipsyncmodel", "demo", "--wait=false")
        await eventually(lambda: cluster.get(DEPLOYMENTS, "demo") is None, timeout=60, what="the Deployment gone")
        start = time.monotonic()
        stopped = await asyncio.to_thread(kubelet.stop_when_gone, str(cluster.url), 60)
        print(f"IMAGES: played pod stopped {time.monotonic() - start:.1f} s after the Deployment was deleted")
        assert stopped == 0, f"the server's exit status after the pod was stopped: {stopped}"
        assert not kubelet.exists()
    finally:
        (tmp_path / "pod.log").write_text(podman("pod", "logs", kubelet.name, check=False).stdout
                                          if kubelet.exists() else "")
        await asyncio.to_thread(kubelet.stop)
