"""A stand-in for the kubelet (and the Deployment controller's status report): it plays the pod template of a
Deployment the operator wrote with `podman kube play`, probes the server the way the template's readiness
probe says, reports the pod's readiness in the Deployment's status through the API, and stops the pod when
the Deployment is gone.

The template runs as written except for the four places, all in ``pod_for_kube_play``, where Debian's
podman 4.3 `kube play` differs from a kubelet."""

from __future__ import annotations

import copy
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from podman_cli import podman

# podman refuses annotation values longer than this (Kubernetes allows up to 256 KiB for all of them).
PODMAN_ANNOTATION_MAX = 63


def pod_for_kube_play(deployment: dict) -> dict:
    """The Pod a kubelet would run for ``deployment``'s template, in the form podman 4.3 `kube play` accepts.

    Only these differ from the template as written:
    1. Host network: this machine has no container networking (no CNI), so the pod joins the host's
       network (hostNetwork: true) and its containers' ``ports`` are dropped, which podman rejects on a
       host-network pod. The containers listen on the same ports either way.
    2. podman does not support the fieldRef ``metadata.namespace``: such env values are written in as the
       value the kubelet would give (the Deployment's namespace).
    3. Played as a Pod with ``restartPolicy: OnFailure``, not as the Deployment (whose pods are always
       ``Always``): podman applies the restart policy to init containers too and restarts a finished init
       container forever under ``Always``, where a kubelet runs it once. The server is still restarted
       when it fails.
    4. podman refuses annotation values over 63 characters (the package's sha256 is 64): those are dropped.
    """
    template = copy.deepcopy(deployment["spec"]["template"])
    meta, spec = template.get("metadata") or {}, template["spec"]
    namespace = deployment["metadata"]["namespace"]
    spec["hostNetwork"] = True                                                           # 1
    spec["restartPolicy"] = "OnFailure"                                                  # 3
    for container in spec.get("initContainers", []) + spec["containers"]:
        container.pop("ports", None)                                                     # 1
        for var in container.get("env", []):
            field = ((var.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
            if field == "metadata.namespace":
                var.pop("valueFrom")
                var["value"] = namespace                                                 # 2
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items()
                   if len(str(v)) <= PODMAN_ANNOTATION_MAX}                              # 4
    metadata = {"name": deployment["metadata"]["name"], "namespace": namespace,
                "labels": meta.get("labels") or {}, "annotations": annotations}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}   # 3


def grpc_serving(port: int, timeout: float = 3.0) -> bool:
    """The template's gRPC readiness probe (grpc.health.v1 Check of the whole server), from the node."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


class PodmanKubelet:
    """Plays one Deployment's pod; ``workdir`` keeps the played YAML (for a look afterwards)."""

    def __init__(self, deployment: dict, workdir: Path):
        self.deployment = deployment
        self.pod = pod_for_kube_play(deployment)
        self.name = self.pod["metadata"]["name"]
        self.file = workdir / f"{self.name}-pod.yaml"
        self.server = self.pod["spec"]["containers"][0]
        self.grace = int(self.pod["spec"].get("terminationGracePeriodSeconds", 30))

    def play(self) -> None:
        self.stop()   # a pod of that name left by an earlier run
        self.file.write_text(yaml.safe_dump(self.pod, sort_keys=False))
        podman("kube", "play", str(self.file), timeout=300)

    def container(self, name: str) -> str:
        return f"{self.name}-{name}"

    def ready(self) -> bool:
        probe = self.server.get("readinessProbe") or {}
        if "grpc" not in probe:
            raise NotImplementedError(f"the stand-in probes gRPC readiness only, not {sorted(probe)}")
        return grpc_serving(int(probe["grpc"]["port"]), timeout=float(probe.get("timeoutSeconds", 3)))

    def wait_ready(self, timeout: float) -> float:
        """Seconds until the readiness probe passed; the init container must have finished cleanly first."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.ready():
                return time.monotonic() - start
            time.sleep(0.5)
        logs = podman("pod", "logs", self.name, check=False, timeout=30)
        raise AssertionError(f"pod {self.name} not ready within {timeout:.0f} s; its logs end:\n"
                             + (logs.stdout + logs.stderr)[-3000:])

    def status_patch(self) -> dict:
        """What the kubelet's pod status becomes in the Deployment's status (the Deployment controller's sum)."""
        generation = self.deployment["metadata"].get("generation", 1)
        return {"status": {
            "observedGeneration": generation, "replicas": 1, "updatedReplicas": 1, "readyReplicas": 1,
            "availableReplicas": 1,
            "conditions": [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
                           {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}]}}

    def _deployment_url(self, api: str, sub: str = "") -> str:
        meta = self.deployment["metadata"]
        return f"{api.rstrip('/')}/apis/apps/v1/namespaces/{meta['namespace']}/deployments/{meta['name']}{sub}"

    def report_ready(self, api: str) -> None:
        """PATCH the Deployment's status subresource through the API server, as the controllers would."""
        request = urllib.request.Request(self._deployment_url(api, "/status"), method="PATCH",
                                         data=json.dumps(self.status_patch()).encode(),
                                         headers={"Content-Type": "application/merge-patch+json"})
        with urllib.request.urlopen(request, timeout=10) as reply:
            assert reply.status == 200, reply.status

    def deployment_gone(self, api: str) -> bool:
        try:
            with urllib.request.urlopen(self._deployment_url(api), timeout=10):
                return False
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return True
            raise

    def exists(self) -> bool:
        return podman("pod", "exists", self.name, check=False).returncode == 0

    def stop(self) -> int | None:
        """As the kubelet deletes a pod: SIGTERM, at most the grace period, then the pod is removed.
        Returns the server's exit status (None when there was no pod)."""
        if not self.exists():
            return None
        podman("pod", "stop", "--time", str(self.grace), self.name, timeout=self.grace + 60)
        status = podman("inspect", "--format", "{{.State.ExitCode}}", self.container(self.server["name"]))
        podman("pod", "rm", "--force", self.name, timeout=60)
        return int(status.stdout.strip())

    def stop_when_gone(self, api: str, timeout: float) -> int | None:
        """Watch the Deployment; once the API says it is gone, stop the pod (its server's exit status)."""
        deadline = time.monotonic() + timeout
        while not self.deployment_gone(api):
            assert time.monotonic() < deadline, f"Deployment {self.name} still there after {timeout} s"
            time.sleep(0.5)
        return self.stop()
