#!/usr/bin/env python3
"""End-to-end check of the Kubernetes path on a real cluster, step by step, with a report at the end.

    python e2e/run_e2e.py --kind lipsync-e2e --build      # a kind cluster: build and load the images
    python e2e/run_e2e.py --context my-gpu-cluster --gpu   # the current or a named kube context

Steps (each reported PASS, FAIL or SKIP with its duration):

 1. preflight        kubectl and helm present, the cluster answers; with --kind, the cluster exists and
                     has the images (built first with --build)
 2. helm install     charts/lipsync into --namespace (Redis on), `--wait`
 3. helm test        the chart's test pod probes the operator (and Redis)
 4. registry         an in-cluster package registry serving the demo character (`lipsync package demo`
                     + `lipsync package publish`, served over HTTP by the inference image)
 5. apply            a LipSyncModel for it (CPU by default, one GPU with --gpu); wait for Ready=True
 6. grpc             from a pod inside the cluster: health check, then GenerateFrame through the Service
 7. scale up         autoscaling 1..3 on in-flight requests, load from inside the cluster, wait for >1
                     replica (SKIP when no custom-metrics API: install Prometheus + prometheus-adapter
                     with the chart's adapter rules, see docs/KUBERNETES.md)
 8. delete           record the children the LipSyncModel owns (its Deployment and Service must be among
                     them), delete it; each recorded child must go
 9. cleanup          helm uninstall and the namespace (kept with --keep)

Only kubectl, helm (and kind, docker for --kind/--build) are needed; everything in the cluster runs from
the two images of docker/.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "lipsync"
MODEL = "demo"
REGISTRY = "model-registry"
# The kinds of the children the deletion step follows (kubectl resource names), and those every
# LipSyncModel has (an HPA only with autoscaling, a PDB unless disabled).
CHILD_RESOURCES = ("deployments", "services", "horizontalpodautoscalers", "poddisruptionbudgets")
ALWAYS_OWNED = ("deployments", "services")


class StepFailed(Exception):
    pass


class StepSkipped(Exception):
    pass


# ------------------------------------------------------------------------------------------ manifests


def registry_manifests(namespace: str, image: str) -> list[dict]:
    """A Deployment + Service serving a registry with the demo character, built by the inference image."""
    labels = {"app.kubernetes.io/name": REGISTRY, "app.kubernetes.io/part-of": "lipsync-e2e"}
    script = (
        "set -e; mkdir -p /tmp/registry; "
        f"lipsync package demo --name {MODEL} --version 1 --out /tmp/{MODEL}-1.zip; "
        f"lipsync package publish /tmp/{MODEL}-1.zip --registry /tmp/registry; "
        "exec python -m http.server 8000 --directory /tmp/registry"
    )
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": REGISTRY, "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "registry", "image": image, "imagePullPolicy": "IfNotPresent",
                        "command": ["sh", "-c", script],
                        "env": [{"name": "HOME", "value": "/tmp"}],
                        "ports": [{"name": "http", "containerPort": 8000}],
                        "readinessProbe": {"httpGet": {"path": "/index.json", "port": "http"}, "periodSeconds": 3},
                        "resources": {"requests": {"cpu": "100m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}},
                        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}},
                        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                    }],
                    "volumes": [{"name": "tmp", "emptyDir": {}}],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": REGISTRY, "namespace": namespace, "labels": labels},
        "spec": {"selector": labels, "ports": [{"name": "http", "port": 8000, "targetPort": "http"}]},
    }
    return [deployment, service]


def model_manifest(namespace: str, gpu: bool) -> dict:
    spec: dict = {"package": {"name": MODEL}, "replicas": 1, "runtime": {"maxBatch": 8}}
    if gpu:
        spec["resources"] = {"gpu": {"resourceName": "nvidia.com/gpu", "count": 1}, "memory": "4Gi"}
    else:
        spec["runtime"].update(device="cpu", precision="fp32")
        spec["resources"] = {"gpu": {"count": 0}, "memory": "2Gi", "cpu": "1"}
    return {"apiVersion": "synctalk.io/v1alpha1", "kind": "LipSyncModel",
            "metadata": {"name": MODEL, "namespace": namespace}, "spec": spec}


def client_pod(name: str, namespace: str, image: str, script: str) -> dict:
    """A one-shot pod inside the cluster that runs ``lipsync client`` calls (the inference image's CLI)."""
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "lipsync-e2e"}},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "client", "image": image, "imagePullPolicy": "IfNotPresent",
                "command": ["sh", "-c", script],
                "env": [{"name": "HOME", "value": "/tmp"},
                        {"name": "LIPSYNC_TARGET", "value": f"{MODEL}.{namespace}.svc:50051"}],
                "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
                "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}},
                "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
            }],
            "volumes": [{"name": "tmp", "emptyDir": {}}],
        },
    }


GRPC_SCRIPT = (
    "set -e; lipsync client health; lipsync client models; "
    f"lipsync client frame {MODEL} 0 --format png -o /tmp/frame.png; "
    "test -s /tmp/frame.png; echo GRPC-OK"
)


def load_script(workers: int, seconds: int) -> str:
    """``workers`` clients streaming frames back to back for ``seconds``: keeps requests in flight."""
    loop = (f"end=$(( $(date +%s) + {seconds} )); while [ $(date +%s) -lt $end ]; do "
            f"lipsync client stream {MODEL} --out-dir /tmp/w$i >/dev/null 2>&1 || sleep 1; done")
    return f"for i in $(seq {workers}); do ( {loop} ) & done; wait; echo LOAD-DONE"


# ------------------------------------------------------------------------------------ deletion check


def owned_children(owner_uid: str, listings: dict[str, dict]) -> set[tuple[str, str]]:
    """(resource, name) of every object in these listings (resource -> a List as the API or `kubectl get -o
    json` returns it) with an owner reference to ``owner_uid``."""
    return {(resource, item["metadata"]["name"])
            for resource, listing in listings.items() for item in listing.get("items") or []
            if any(ref.get("uid") == owner_uid for ref in item["metadata"].get("ownerReferences") or [])}


def missing_kinds(recorded: set[tuple[str, str]]) -> list[str]:
    """The kinds every LipSyncModel owns that are not among ``recorded``: a deletion check without them
    would pass without checking anything."""
    return [resource for resource in ALWAYS_OWNED if resource not in {r for r, _ in recorded}]


def still_present(recorded: set[tuple[str, str]], listings: dict[str, dict]) -> set[tuple[str, str]]:
    """Those of ``recorded`` that the listings still hold, by name: whatever its uid, an object of that name
    is one the deletion should have removed (or something recreated it)."""
    present = {(resource, item["metadata"]["name"])
               for resource, listing in listings.items() for item in listing.get("items") or []}
    return recorded & present


def describe(children: set[tuple[str, str]]) -> str:
    return ", ".join(f"{resource}/{name}" for resource, name in sorted(children))


# --------------------------------------------------------------------------------------------- runner


@dataclass
class Step:
    name: str
    status: str = "PENDING"
    seconds: float = 0.0
    detail: str = ""


@dataclass
class E2E:
    args: argparse.Namespace
    steps: list[Step] = field(default_factory=list)

    # -- commands

    def run(self, *cmd: str, input: str | None = None, check: bool = True, timeout: float = 900) -> str:
        print("  $ " + shlex.join(cmd), flush=True)
        try:
            proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        except FileNotFoundError:
            raise StepFailed(f"{cmd[0]} is not on PATH") from None
        if check and proc.returncode != 0:
            raise StepFailed(f"{shlex.join(cmd[:4])} ... exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
        return proc.stdout

    def kubectl(self, *args: str, **kw) -> str:
        context = ["--context", self.args.context] if self.args.context else []
        return self.run("kubectl", *context, "-n", self.args.namespace, *args, **kw)

    def helm(self, *args: str, **kw) -> str:
        context = ["--kube-context", self.args.context] if self.args.context else []
        return self.run("helm", *context, "-n", self.args.namespace, *args, **kw)

    def apply(self, *manifests: dict) -> None:
        self.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": manifests}))

    def get_json(self, *args: str) -> dict:
        return json.loads(self.kubectl("get", *args, "-o", "json"))

    def wait_until(self, what: str, check, timeout: float, interval: float = 3.0):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                result = check()
                if result:
                    return result
            except StepFailed as exc:
                last = exc
            time.sleep(interval)
        raise StepFailed(f"timed out after {timeout:g}s waiting for {what}" + (f" ({last})" if last else ""))

    def pod_output(self, pod: dict, timeout: float) -> str:
        name = pod["metadata"]["name"]
        self.kubectl("delete", "pod", name, "--ignore-not-found", "--wait=true")
        self.apply(pod)

        def finished():
            phase = self.get_json("pod", name).get("status", {}).get("phase")
            return phase if phase in ("Succeeded", "Failed") else None
        phase = self.wait_until(f"pod {name}", finished, timeout)
        logs = self.kubectl("logs", name, check=False)
        if phase != "Succeeded":
            raise StepFailed(f"pod {name} {phase}: {logs.strip()[-2000:]}")
        return logs

    def lsm_condition(self, type_: str) -> dict:
        lsm = self.get_json("lipsyncmodel", MODEL)
        return next((c for c in lsm.get("status", {}).get("conditions", []) if c["type"] == type_), {})

    # -- steps

    def step(self, name: str, fn) -> bool:
        step = Step(name)
        self.steps.append(step)
        print(f"\n== {name}", flush=True)
        start = time.monotonic()
        try:
            step.detail = fn() or ""
            step.status = "PASS"
        except StepSkipped as exc:
            step.status, step.detail = "SKIP", str(exc)
        except (StepFailed, subprocess.TimeoutExpired) as exc:
            step.status, step.detail = "FAIL", str(exc)
        step.seconds = time.monotonic() - start
        print(f"   {step.status} ({step.seconds:.0f}s) {step.detail}", flush=True)
        return step.status != "FAIL"

    def preflight(self) -> str:
        for tool in ["kubectl", "helm"] + (["kind"] if self.args.kind else []) + (["docker"] if self.args.build else []):
            if shutil.which(tool) is None:
                raise StepFailed(f"{tool} is not on PATH")
        if self.args.build:
            for kind, image in (("operator", self.args.operator_image), ("inference", self.args.inference_image)):
                self.run("docker", "build", "-f", str(ROOT / "docker" / f"{kind}.Dockerfile"), "-t", image, str(ROOT),
                         timeout=3600)
        if self.args.kind:
            clusters = self.run("kind", "get", "clusters").split()
            if self.args.kind not in clusters:
                self.run("kind", "create", "cluster", "--name", self.args.kind, "--wait", "120s")
            self.args.context = self.args.context or f"kind-{self.args.kind}"
            for image in (self.args.operator_image, self.args.inference_image):
                self.run("kind", "load", "docker-image", image, "--name", self.args.kind, timeout=1800)
        version = self.run("kubectl", *(["--context", self.args.context] if self.args.context else []),
                           "version", "-o", "json")
        server = json.loads(version).get("serverVersion", {}).get("gitVersion", "?")
        self.run("kubectl", *(["--context", self.args.context] if self.args.context else []),
                 "create", "namespace", self.args.namespace, check=False)
        return f"server {server}, namespace {self.args.namespace}"

    def helm_install(self) -> str:
        repo, _, tag = self.args.operator_image.rpartition(":")
        irepo, _, itag = self.args.inference_image.rpartition(":")
        self.helm("upgrade", "--install", self.args.release, str(CHART), "--wait", "--timeout", "5m",
                  "--set", f"operator.image.repository={repo}", "--set", f"operator.image.tag={tag}",
                  "--set", f"inference.image.repository={irepo}", "--set", f"inference.image.tag={itag}",
                  "--set", f"registry.url=http://{REGISTRY}.{self.args.namespace}.svc:8000/",
                  "--set", "redis.enabled=true", "--set", "rbac.scope=namespace",
                  "--set", f"operator.watchNamespaces={{{self.args.namespace}}}")
        self.run("kubectl", *(["--context", self.args.context] if self.args.context else []),
                 "wait", "--for=condition=Established", "crd/lipsyncmodels.synctalk.io", "--timeout=60s")
        return "operator, CRD and Redis installed"

    def helm_test(self) -> str:
        self.helm("test", self.args.release, "--timeout", "3m")
        return "helm test passed"

    def registry(self) -> str:
        self.apply(*registry_manifests(self.args.namespace, self.args.inference_image))
        self.kubectl("rollout", "status", f"deployment/{REGISTRY}", "--timeout=10m")
        return f"http://{REGISTRY}.{self.args.namespace}.svc:8000/index.json serves {MODEL}"

    def apply_model(self) -> str:
        self.apply(model_manifest(self.args.namespace, self.args.gpu))

        def ready():
            degraded = self.lsm_condition("Degraded")
            if degraded.get("status") == "True" and degraded.get("reason") == "InvalidSpec":
                raise StepFailed(degraded.get("message", ""))
            return self.lsm_condition("Ready").get("status") == "True"
        self.wait_until("the LipSyncModel to be Ready", ready, self.args.ready_timeout)
        print(self.kubectl("get", "lsm", MODEL, "-o", "wide"))
        status = self.get_json("lipsyncmodel", MODEL)["status"]
        return f"Ready; endpoint {status.get('endpoint')}, package {status.get('package', {}).get('version')}"

    def grpc(self) -> str:
        logs = self.pod_output(client_pod("e2e-grpc", self.args.namespace, self.args.inference_image, GRPC_SCRIPT),
                               timeout=300)
        if "GRPC-OK" not in logs:
            raise StepFailed(logs[-2000:])
        return "health SERVING, ListModels and GenerateFrame answered through the Service"

    def scale_up(self) -> str:
        context = ["--context", self.args.context] if self.args.context else []
        metrics_api = subprocess.run(["kubectl", *context, "get", "--raw", "/apis/custom.metrics.k8s.io/v1beta1"],
                                     capture_output=True, text=True)
        if metrics_api.returncode != 0:
            raise StepSkipped("no custom.metrics.k8s.io API: install Prometheus and prometheus-adapter "
                              "with the chart's adapter rules to autoscale (docs/KUBERNETES.md)")
        patch = {"spec": {"replicas": None, "autoscaling": {"minReplicas": 1, "maxReplicas": 3,
                                                            "metric": "inflightRequests", "targetAverageValue": 1,
                                                            "scaleDownStabilizationSeconds": 60}}}
        self.kubectl("patch", "lipsyncmodel", MODEL, "--type=merge", "-p", json.dumps(patch))
        self.wait_until("the HPA", lambda: self.kubectl("get", "hpa", MODEL, check=False).strip(), 60)
        load = client_pod("e2e-load", self.args.namespace, self.args.inference_image,
                          load_script(self.args.load_workers, self.args.load_seconds))
        self.kubectl("delete", "pod", "e2e-load", "--ignore-not-found", "--wait=true")
        self.apply(load)
        try:
            replicas = self.wait_until(
                "more than one replica",
                lambda: (n := self.get_json("deployment", MODEL)["spec"].get("replicas", 1)) > 1 and n,
                self.args.scale_timeout, interval=10)
        finally:
            self.kubectl("delete", "pod", "e2e-load", "--ignore-not-found", "--wait=false", check=False)
        print(self.kubectl("get", "hpa", MODEL))
        return f"scaled to {replicas} replicas under load"

    def child_listings(self) -> dict[str, dict]:
        return {resource: self.get_json(resource) for resource in CHILD_RESOURCES}

    def delete(self) -> str:
        uid = self.get_json("lipsyncmodel", MODEL)["metadata"]["uid"]
        recorded = owned_children(uid, self.child_listings())
        if missing := missing_kinds(recorded):
            raise StepFailed(f"before the deletion the LipSyncModel owns no {' or '.join(missing)} "
                             f"(only: {describe(recorded) or 'nothing'}): there is nothing to see go")
        print(f"   owned: {describe(recorded)}", flush=True)
        self.kubectl("delete", "lipsyncmodel", MODEL, "--wait=true", "--timeout=2m")
        left = recorded

        def gone():
            nonlocal left
            left = still_present(recorded, self.child_listings())
            return not left
        try:
            self.wait_until("the children to be garbage-collected", gone, self.args.delete_timeout)
        except StepFailed as exc:
            raise StepFailed(f"{exc}; still there: {describe(left)}") from None
        return f"LipSyncModel deleted; gone: {describe(recorded)}"

    def cleanup(self) -> str:
        if self.args.keep:
            raise StepSkipped("--keep: release and namespace left in place")
        self.helm("uninstall", self.args.release, "--wait", check=False)
        self.run("kubectl", *(["--context", self.args.context] if self.args.context else []),
                 "delete", "namespace", self.args.namespace, "--wait=false", check=False)
        if self.args.kind and self.args.delete_kind:
            self.run("kind", "delete", "cluster", "--name", self.args.kind)
        return "uninstalled"

    def main(self) -> int:
        ok = self.step("preflight", self.preflight)
        ok = ok and self.step("helm install", self.helm_install)
        ok = ok and self.step("helm test", self.helm_test)
        ok = ok and self.step("package registry", self.registry)
        applied = ok
        ok = ok and self.step("apply LipSyncModel", self.apply_model)
        ok = ok and self.step("gRPC call from inside the cluster", self.grpc)
        ok = ok and self.step("scale up under load", self.scale_up)
        if applied:   # whatever failed after the apply, the deletion path is still checked
            self.step("delete LipSyncModel", self.delete)
        self.step("cleanup", self.cleanup)
        print("\n" + "=" * 78)
        for s in self.steps:
            print(f"{s.status:5} {s.seconds:6.0f}s  {s.name:36} {s.detail[:200]}")
        failed = [s for s in self.steps if s.status == "FAIL"]
        print("=" * 78 + f"\n{'FAILED' if failed else 'PASSED'}: {len(self.steps) - len(failed)} of "
              f"{len(self.steps)} steps without failure")
        return 1 if failed else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--context", help="kube context (default: the current one; kind-NAME with --kind)")
    p.add_argument("--kind", metavar="NAME", help="use (and create if missing) this kind cluster, load the images")
    p.add_argument("--delete-kind", action="store_true", help="delete the kind cluster at the end")
    p.add_argument("--build", action="store_true", help="docker build both images first (docker/*.Dockerfile)")
    p.add_argument("--namespace", default="lipsync-e2e")
    p.add_argument("--release", default="lipsync")
    p.add_argument("--operator-image", default="lipsync-operator:0.1.0")
    p.add_argument("--inference-image", default="lipsync-inference:0.1.0")
    p.add_argument("--gpu", action="store_true", help="ask for one nvidia.com/gpu (default: CPU inference)")
    p.add_argument("--ready-timeout", type=float, default=900, help="seconds for the model to become Ready")
    p.add_argument("--scale-timeout", type=float, default=600, help="seconds for the scale-up")
    p.add_argument("--delete-timeout", type=float, default=120, help="seconds for the children to go")
    p.add_argument("--load-workers", type=int, default=8)
    p.add_argument("--load-seconds", type=int, default=600)
    p.add_argument("--keep", action="store_true", help="leave the release and namespace for inspection")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(E2E(parse_args()).main())
