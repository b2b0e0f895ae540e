"""LipSyncPools: the pool controller. It applies a pool's own children (lipsync_operator.pool_children) and runs
its placement rounds, which put copies of the pool's models on its pods.

Every ``poolIntervalSeconds`` the operator asks each ready pool pod (gRPC at its pod IP) what it holds, how many
frames each model generated and how many live sessions each runs, computes the next placement
(lipsync_operator.placement) and carries it out. A model's demand is the larger of its frame rate and its
sessions at its fps: a session's clock asks for a frame every tick, while its idle frames come from the idle
cache and barely show in the frame rate, so its copies are placed for the session, not for its pauses.

- placing: LoadModel on the pod, then label the pod (the Service sends requests only once the copy is loaded);
- unplacing: remove the label first, wait until the pod's queue for that model is empty, then UnloadModel;
- a pod that is gone, unready or unreachable holds nothing: its models are placed elsewhere at once;
- anything loaded on a pool pod that no pooled model of this pool asks for is unloaded (a deleted model).

What the pods report is the truth: after an operator restart the same placement is read back and kept.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from lipsync_operator import admission, status
from lipsync_operator.config import API_VERSION, OPERATOR_NAME, OperatorConfig
from lipsync_operator.kube import (
    EVENT,
    HPA,
    LIPSYNCMODEL,
    LIPSYNCPOOL,
    PDB,
    POD,
    PODMONITOR,
    ApiError,
    Kind,
    KubeClient,
    NotFound,
)
from lipsync_operator.owners import controller_uid
from lipsync_operator.placement import MIB, Model, Placement, Pod, place, pods_needed
from lipsync_operator.podclient import PodClient, PodReport, PodUnreachable
from lipsync_operator.pool_children import (
    MODEL_LABEL_PREFIX,
    POOL_KIND,
    model_label,
    pool_deployment,
    pool_hpa,
    pool_pdb,
    pool_pod_monitor,
    pool_selector_labels,
    selector_string,
)
from lipsync_operator.pool_status import compose_model_status, compose_pool_problem, compose_pool_status
from lipsync_operator.spec import InvalidSpec, normalize, normalize_pool

log = logging.getLogger(__name__)

DEFAULT_FOOTPRINT = 1024 * MIB
DRAIN_POLL_SECONDS = 0.2
TARGET_LOAD = 0.7          # pods for load: demand at this share of capacity (the HPA adds more on queues)


def _memory(n: int) -> str:
    return f"{n / (1 << 30):.1f}Gi"


@dataclass
class _Live:
    name: str
    ip: str
    report: PodReport
    labels: dict[str, str]
    schedulable: bool


def session_demand(pods: list[_Live], package: dict[str, str]) -> dict[str, float]:
    """Frames/s the models' live sessions ask for, all pods together: sessions x the model's fps."""
    demand: dict[str, float] = {}
    for m, pkg in package.items():
        fps = sum(p.report.sessions.get(pkg, 0) * p.report.fps.get(pkg, 0) for p in pods)
        if fps:
            demand[m] = float(fps)
    return demand


class PoolController:
    def __init__(self, kube: KubeClient, config: OperatorConfig):
        self.kube = kube
        self.config = config
        self.pod_port = config.pod_grpc_port
        self._samples: dict[tuple[str, str], tuple[float, dict[str, int]]] = {}   # (ns, pod) -> (t, frames)
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._full: dict[str, str] = {}     # "ns/model" -> the last PoolFull message posted

    def lock(self, namespace: str, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(f"{namespace}/{name}", threading.Lock())

    # ----------------------------------------------------------------------------------- the pool

    def _spec(self, lsp: dict) -> dict:
        """The pool's normalised spec, admitted by the operator's configuration; raises InvalidSpec."""
        spec = normalize_pool(lsp.get("spec") or {})
        admission.check_pool(lsp, spec, self.config)
        return spec

    def reconcile(self, lsp: dict) -> str | None:
        """The pool's own objects: Deployment, HPA (or none), PDB (or none). Raises InvalidSpec, after writing
        it into the pool's status (Degraded)."""
        namespace, name = lsp["metadata"]["namespace"], lsp["metadata"]["name"]
        generation = lsp["metadata"].get("generation", 0)
        try:
            spec = self._spec(lsp)
        except InvalidSpec as exc:
            self._write_pool_problem(lsp, generation, ("InvalidSpec", str(exc)))
            raise
        desired = [pool_deployment(lsp, spec, self.config)]
        if "autoscaling" in spec:
            desired.append(pool_hpa(lsp, spec, spec["autoscaling"]["minReplicas"]))
        if spec["disruptionBudget"]["enabled"]:
            desired.append(pool_pdb(lsp, spec))
        monitoring = self.kube.serves(PODMONITOR)
        if monitoring and spec["monitoring"]["enabled"]:
            desired.append(pool_pod_monitor(lsp, spec, self.config))
        for child in desired:
            self.kube.apply(child)
        for kind, wanted in ((HPA, "autoscaling" in spec), (PDB, spec["disruptionBudget"]["enabled"]),
                             (PODMONITOR, not monitoring or spec["monitoring"]["enabled"])):
            existing = None if wanted else self.kube.get(kind, namespace, name)
            if existing is not None and controller_uid(existing) == lsp["metadata"]["uid"]:
                self.kube.delete(kind, namespace, name, uid=existing["metadata"]["uid"])
        self._write_pool_problem(lsp, generation, None)
        return f"applied {', '.join(c['kind'] for c in desired)}"

    def run_round(self, namespace: str, pool_name: str) -> Placement | None:
        """One placement round for a pool: read the pods, place, act, write the statuses."""
        with self.lock(namespace, pool_name):
            lsp = self.kube.get(LIPSYNCPOOL, namespace, pool_name)
            if lsp is None or lsp["metadata"].get("deletionTimestamp"):
                return None
            try:
                spec = self._spec(lsp)
            except InvalidSpec:
                return None   # its reconcile reported why
            models = self._pooled_models(namespace, pool_name)
            pods = self._live_pods(namespace, pool_name, spec)
            return self._place(lsp, spec, models, pods)

    def _pooled_models(self, namespace: str, pool: str) -> dict[str, tuple[dict, dict]]:
        """model name -> (LipSyncModel, normalised spec), for the models of this pool whose package is known."""
        out = {}
        for lsm in self.kube.list(LIPSYNCMODEL, namespace):
            if (lsm.get("spec") or {}).get("pool") != pool or lsm["metadata"].get("deletionTimestamp"):
                continue
            try:
                spec = normalize(lsm.get("spec") or {})
                admission.check_model(lsm, spec, self.config)
            except InvalidSpec:
                continue   # its reconcile reported why; nothing of it is placed
            if not ((lsm.get("status") or {}).get("package") or {}).get("version"):
                continue   # its package is not checked (or not available) yet: nothing to load
            out[lsm["metadata"]["name"]] = (lsm, spec)
        return out

    def _live_pods(self, namespace: str, pool: str, spec: dict) -> list[_Live]:
        live = []
        for pod in self.pool_pods(namespace, pool):
            meta, st = pod["metadata"], pod.get("status") or {}
            ip = st.get("podIP")
            ready = st.get("phase") == "Running" and any(
                c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions") or [])
            if not ip or not ready:
                continue                      # not serving: holds nothing, is given nothing
            try:
                with self._client(ip) as client:
                    report = client.report()
            except PodUnreachable as exc:
                log.warning("pool %s: pod %s unreachable: %s", pool, meta["name"], exc)
                continue
            live.append(_Live(meta["name"], ip, report, dict(meta.get("labels") or {}),
                              schedulable=not meta.get("deletionTimestamp") and not report.draining))
        return live

    def pool_pods(self, namespace: str, pool: str) -> list[dict]:
        selector = pool_selector_labels(pool)
        pods = self.kube.list(POD, namespace, selector_string(selector))
        # The selector again, here: an API server that ignored it must not hand us other pods.
        return [p for p in pods if all((p["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items())]

    def _client(self, ip: str) -> PodClient:
        return PodClient(f"{ip}:{self.pod_port}", timeout_s=self.config.api_timeout_seconds)

    def _place(self, lsp: dict, spec: dict, models: dict[str, tuple[dict, dict]], pods: list[_Live]) -> Placement:
        namespace, pool = lsp["metadata"]["namespace"], lsp["metadata"]["name"]
        now = time.monotonic()
        package = {m: s["package"]["name"] for m, (_, s) in models.items()}
        by_package = {p: m for m, p in package.items()}
        current = {m: [p.name for p in pods if package[m] in p.report.loaded] for m in models}
        measured = [b for p in pods for b in p.report.loaded.values()]
        budget_default = spec["modelMemoryBudgetMb"] * MIB

        demand = self._demand(namespace, pods, package, now)
        placement_models = []
        for m, (_, s) in models.items():
            reported = [p.report.loaded[package[m]] for p in pods if package[m] in p.report.loaded]
            footprint = max(reported) if reported else (
                s["placement"]["memoryMb"] * MIB if s["placement"].get("memoryMb")
                else max(measured) if measured else DEFAULT_FOOTPRINT)
            pl = s["placement"]
            placement_models.append(Model(m, footprint, demand_fps=demand.get(m), demand_per_copy=pl["demandPerCopy"],
                                          min_copies=pl["minCopies"], max_copies=pl["maxCopies"]))
        pool_pods = [Pod(p.name, p.report.memory_budget_bytes or budget_default, float(spec["capacityFps"]),
                         schedulable=p.schedulable) for p in pods]
        plan = place(pool_pods, placement_models, current)

        by_name = {p.name: p for p in pods}
        loaded = {p.name: set(p.report.loaded) for p in pods}
        for m, pod in plan.load:
            lsm, _ = models[m]
            version = lsm["status"]["package"]["version"]
            try:
                with self._client(by_name[pod].ip) as client:
                    client.load(package[m], version)
                loaded[pod].add(package[m])
                log.info("pool %s: loaded %s on %s", pool, m, pod)
            except PodUnreachable as exc:
                log.warning("pool %s: loading %s on %s failed: %s", pool, m, pod, exc)
        # Labels follow what is loaded and placed; then copies that go are unloaded, once drained.
        leaving = {(m, pod) for m, pod in plan.unload}
        for p in pods:
            want = {model_label(m) for m in models if package[m] in loaded[p.name] and (m, p.name) not in leaving}
            self._set_labels(namespace, p, want)
        for m, pod in plan.unload:
            self._unload(by_name[pod], package.get(m, m), spec["runtime"]["drainSeconds"])
            loaded[pod].discard(package.get(m, m))
        for p in pods:   # loaded, but no pooled model of this pool asks for it (a deleted model)
            for orphan in sorted(loaded[p.name] - set(by_package)):
                self._unload(p, orphan, spec["runtime"]["drainSeconds"])
                loaded[p.name].discard(orphan)

        ready_copies = {m: sum(1 for p in pods if package[m] in loaded[p.name]) for m in models}
        for m, (lsm, _) in models.items():
            full = None
            if m in plan.missing and plan.full is not None:
                full = f"{plan.missing[m]} of {plan.wanted[m]} copies fit on no pod of pool {pool}: " + plan.full.message()
            self._write_model_status(lsm, pool, copies=len(plan.copies[m]), ready_copies=ready_copies[m],
                                     wanted=plan.wanted[m], full=full)
        needed = pods_needed(placement_models, {m: len(c) for m, c in current.items()}, budget_default,
                             float(spec["capacityFps"]), TARGET_LOAD)
        if "autoscaling" in spec:
            self.kube.apply(pool_hpa(lsp, spec, needed))
        self._write_pool_status(lsp, pods, plan, needed)
        return plan

    def _demand(self, namespace: str, pods: list[_Live], package: dict[str, str], now: float) -> dict:
        """Frames/s per model since the previous round; a model held by a pod seen for the first time has
        no measure yet (None: its copies stay as they are)."""
        rates: dict[str, float] = {}
        unknown: set[str] = set()
        seen = {(namespace, p.name) for p in pods}
        for key in [k for k in self._samples if k[0] == namespace and k not in seen]:
            del self._samples[key]          # a pod that went: its counters mean nothing any more
        for p in pods:
            previous = self._samples.get((namespace, p.name))
            self._samples[(namespace, p.name)] = (now, dict(p.report.frames))
            for m, pkg in package.items():
                if pkg not in p.report.loaded:
                    continue
                if previous is None or now <= previous[0]:
                    unknown.add(m)
                    continue
                delta = p.report.frames.get(pkg, 0) - previous[1].get(pkg, 0)
                rates[m] = rates.get(m, 0.0) + max(0, delta) / (now - previous[0])
        demand = {m: (None if m in unknown else rates.get(m, 0.0)) for m in package}
        for m, sessions_fps in session_demand(pods, package).items():
            measured = demand.get(m)
            demand[m] = sessions_fps if measured is None else max(measured, sessions_fps)
        return demand

    def _set_labels(self, namespace: str, pod: _Live, want: set[str]) -> None:
        have = {k for k in pod.labels if k.startswith(MODEL_LABEL_PREFIX)}
        if have == want:
            return
        patch = {k: None for k in have - want} | {k: "true" for k in want - have}
        try:
            self.kube.patch(POD, namespace, pod.name, {"metadata": {"labels": patch}})
            pod.labels = {**{k: v for k, v in pod.labels.items() if k not in have - want},
                          **{k: "true" for k in want - have}}
        except NotFound:
            pass

    def _unload(self, pod: _Live, model: str, drain_seconds: float) -> None:
        """Its label is already gone: wait for the requests the Service sent before to finish, then unload."""
        deadline = time.monotonic() + drain_seconds
        try:
            with self._client(pod.ip) as client:
                while time.monotonic() < deadline and client.report().queue_depth.get(model, 0) > 0:
                    time.sleep(DRAIN_POLL_SECONDS)
                client.unload(model)
            log.info("unloaded %s from %s", model, pod.name)
        except PodUnreachable as exc:
            log.warning("unloading %s from %s: %s", model, pod.name, exc)

    # -------------------------------------------------------------------------------------- status

    def _write_model_status(self, lsm: dict, pool: str, *, copies: int, ready_copies: int, wanted: int,
                            full: str | None) -> None:
        namespace, name = lsm["metadata"]["namespace"], lsm["metadata"]["name"]
        key = f"{namespace}/{name}"
        if full and self._full.get(key) != full:
            self._event(lsm, "LipSyncModel", "Warning", "PoolFull", full)
        if not full and key in self._full:
            self._event(lsm, "LipSyncModel", "Normal", "Placed", f"all {wanted} copies placed in pool {pool}")
        if full:
            self._full[key] = full
        else:
            self._full.pop(key, None)

        def compose(cur: dict, gen: int) -> dict:
            degraded = status.find(cur.get("conditions"), "Degraded") or {}
            problem = ((degraded["reason"], degraded.get("message", ""))
                       if degraded.get("status") == "True" and degraded.get("reason") in status.RECONCILE_PROBLEMS
                       else None)
            return compose_model_status(cur, generation=gen, package_condition=status.KEEP, problem=problem,
                                        pool=pool, copies=copies, ready_copies=ready_copies, wanted=wanted,
                                        full=full)
        self._patch_status(LIPSYNCMODEL, namespace, name, compose, expect_uid=lsm["metadata"]["uid"])

    def _write_pool_status(self, lsp: dict, pods: list[_Live], plan: Placement, needed: int) -> None:
        namespace, name = lsp["metadata"]["namespace"], lsp["metadata"]["name"]
        all_pods = self.pool_pods(namespace, name)
        used = sum(u.memory_bytes for p, u in plan.use.items())
        budget = sum(p.report.memory_budget_bytes or lsp["spec"]["modelMemoryBudgetMb"] * MIB for p in pods)
        full = plan.full.message() if plan.full else ""
        if plan.full and self._full.get(f"{namespace}/lsp/{name}") != full:
            self._event(lsp, POOL_KIND, "Warning", "PoolFull", full)
        self._full[f"{namespace}/lsp/{name}"] = full

        def compose(cur: dict, gen: int) -> dict:
            return compose_pool_status(
                cur, generation=gen, ready_pods=len(pods), pods=len(all_pods), full=full if plan.full else None,
                needed=needed, models=sum(1 for c in plan.copies.values() if c),
                copies=sum(len(c) for c in plan.copies.values()), memory_used=_memory(used),
                memory_free=_memory(max(0, budget - used)), selector=selector_string(pool_selector_labels(name)))
        self._patch_status(LIPSYNCPOOL, namespace, name, compose, expect_uid=lsp["metadata"]["uid"])

    def _write_pool_problem(self, lsp: dict, generation: int, problem: tuple[str, str] | None) -> None:
        self._patch_status(LIPSYNCPOOL, lsp["metadata"]["namespace"], lsp["metadata"]["name"],
                           lambda cur, gen: compose_pool_problem(cur, generation=generation, problem=problem),
                           expect_uid=lsp["metadata"]["uid"])

    def _patch_status(self, kind: Kind, namespace: str, name: str, compose: Callable[[dict, int], dict],
                      expect_uid: str | None = None) -> None:
        """``compose(current status, generation)``: the new status (see KubeClient.patch_status)."""
        self.kube.patch_status(kind, namespace, name,
                               lambda obj: compose(obj.get("status") or {}, obj["metadata"].get("generation", 0)),
                               expect_uid=expect_uid)

    def _event(self, obj: dict, kind: str, type_: str, reason: str, message: str) -> None:
        """A Kubernetes event on ``obj`` (kubectl describe shows it), named uniquely as kubectl's are."""
        meta = obj["metadata"]
        stamp = status.now()
        event = {"apiVersion": "v1", "kind": "Event",
                 "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"]},
                 "involvedObject": {"apiVersion": API_VERSION, "kind": kind, "name": meta["name"],
                                    "namespace": meta["namespace"], "uid": meta.get("uid")},
                 "type": type_, "reason": reason, "message": message[:1024], "count": 1,
                 "firstTimestamp": stamp, "lastTimestamp": stamp, "source": {"component": OPERATOR_NAME}}
        try:
            self.kube.request("POST", EVENT.path(meta["namespace"]), body=event)
        except ApiError as exc:   # events are best effort: never fail a round for one
            log.warning("event %s on %s: %s", reason, meta["name"], exc)


