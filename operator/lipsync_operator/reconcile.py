"""Reconcile one LipSyncModel: check its package, apply its children, delete the ones it no longer needs,
and write its status. Idempotent (server-side apply, fixed child names), so it can run any number of times,
from any handler, and after an operator restart mid-way.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable

from lipsync_operator import admission, children, status
from lipsync_operator.config import FIELD_MANAGER, OperatorConfig
from lipsync_operator.kube import (
    DEPLOYMENT,
    HPA,
    LIPSYNCMODEL,
    PDB,
    PODMONITOR,
    SECRET,
    SERVICE,
    ApiError,
    Kind,
    KubeClient,
    Unreachable,
    kind_of,
)
from lipsync_operator.owners import controller_uid
from lipsync_operator.pool_children import model_service as pooled_service
from lipsync_operator.pool_status import compose_model_status
from lipsync_operator.registry import PackageCheck, check_package
from lipsync_operator.spec import InvalidSpec, normalize

log = logging.getLogger(__name__)

MONITORING_CACHE_SECONDS = 60.0
HANDOVER_MANAGER = f"{FIELD_MANAGER}-replicas-handover"
STATUS_WRITE_ATTEMPTS = 5


class RetryLater(Exception):
    """Not done; try again after ``delay`` seconds (the status already says why)."""

    def __init__(self, reason: str, message: str, delay: float):
        super().__init__(message)
        self.reason = reason
        self.delay = delay


class GiveUp(Exception):
    """Retrying cannot help until the resource changes (the status already says why)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class ChildConflict(Exception):
    pass


def applies_replicas(deployment: dict, manager: str = FIELD_MANAGER) -> bool:
    """Whether ``manager`` owns spec.replicas through server-side apply (per the managedFields)."""
    for entry in (deployment.get("metadata") or {}).get("managedFields") or []:
        if entry.get("manager") == manager and entry.get("operation") == "Apply" and \
                "f:replicas" in ((entry.get("fieldsV1") or {}).get("f:spec") or {}):
            return True
    return False


class Reconciler:
    def __init__(self, kube: KubeClient, config: OperatorConfig):
        self.kube = kube
        self.config = config
        self._locks: dict[str, threading.Lock] = defaultdict(threading.Lock)
        self._locks_guard = threading.Lock()
        self._monitoring: tuple[bool, float] | None = None

    def _lock(self, namespace: str, name: str) -> threading.Lock:
        # The change handlers and the child watchers run in kopf's thread pool: one at a time per object.
        with self._locks_guard:
            return self._locks[f"{namespace}/{name}"]

    # ------------------------------------------------------------------------------------ reconcile

    def reconcile(self, lsm: dict, *, retry: int = 0) -> str | None:
        """Returns what was done, for an event (None: the model is gone or going); raises RetryLater or GiveUp
        when it could not be done. Only the identity (namespace, name, uid) of ``lsm`` is used."""
        namespace, name, uid = lsm["metadata"]["namespace"], lsm["metadata"]["name"], lsm["metadata"]["uid"]
        with self._lock(namespace, name):
            # The body a handler got can be stale (a queued watch event): act on what the API has now, and
            # never recreate the children of a model that is gone (they would only be garbage again).
            live = self.kube.get(LIPSYNCMODEL, namespace, name)
            if live is None or live["metadata"].get("uid") != uid:
                return None
            lsm = live
            meta = lsm["metadata"]
            generation = meta.get("generation", 0)
            if meta.get("deletionTimestamp"):
                return None   # the garbage collector removes the children (owner references)
            try:
                spec = normalize(lsm.get("spec") or {})
                admission.check_model(lsm, spec, self.config)   # before any fetch or write
            except InvalidSpec as exc:
                self.write_status(namespace, name, observed_generation=generation, problem=("InvalidSpec", str(exc)))
                raise GiveUp("InvalidSpec", f"invalid spec: {exc}") from None

            package = self._check_package(namespace, spec)
            pkg_condition = status.condition("PackageAvailable", package.available, package.reason,
                                             package.message, generation)
            if "pool" in spec:
                return self._reconcile_pooled(lsm, spec, package, pkg_condition, retry)
            if not package.available:
                # Leave any running Deployment alone: its pods keep serving the package they have.
                self.write_status(namespace, name, observed_generation=generation, package_condition=pkg_condition,
                                  problem=None)
                delay = self.config.backoff(retry)
                raise RetryLater(package.reason, f"package unavailable ({package.reason}): {package.message}; "
                                 f"retrying in {delay:g}s", delay)

            desired = [children.deployment(lsm, spec, package, self.config), children.service(lsm, spec)]
            unwanted: list[Kind] = []
            if "autoscaling" in spec:
                desired.append(children.horizontal_pod_autoscaler(lsm, spec))
            else:
                unwanted.append(HPA)
            if spec["disruptionBudget"]["enabled"]:
                desired.append(children.pod_disruption_budget(lsm, spec))
            else:
                unwanted.append(PDB)
            if self._monitoring_installed():   # without the API there is nothing to create, or to delete
                if spec["monitoring"]["enabled"]:
                    desired.append(children.pod_monitor(lsm, spec, self.config))
                else:
                    unwanted.append(PODMONITOR)

            def report(problem: tuple[str, str]) -> None:
                self.write_status(namespace, name, observed_generation=generation, package_condition=pkg_condition,
                                  problem=problem)

            applied = self._apply_children(lsm, desired, unwanted, retry, report)
            self.write_status(namespace, name, observed_generation=generation, package_condition=pkg_condition,
                              problem=None, package=package, deployment=applied["Deployment"])
            summary = f"{package.name} {package.version}: applied {', '.join(sorted(applied))}"
            if unwanted:
                summary += f"; no {', '.join(k.kind for k in unwanted)}"
            log.info("reconciled %s/%s: %s", namespace, name, summary)
            return summary

    def _reconcile_pooled(self, lsm: dict, spec: dict, package: PackageCheck, pkg_condition: dict,
                          retry: int) -> str:
        """A pooled model owns only its Service; the pool's placement rounds load it onto pool pods."""
        meta = lsm["metadata"]
        namespace, name, generation = meta["namespace"], meta["name"], meta.get("generation", 0)

        def report(problem: tuple[str, str] | None, with_package: bool = False) -> None:
            self._write_pooled_status(lsm, spec, observed_generation=generation, package_condition=pkg_condition,
                                      problem=problem, package=package if with_package else None)

        if not package.available:
            report(None)
            delay = self.config.backoff(retry)
            raise RetryLater(package.reason, f"package unavailable ({package.reason}): {package.message}; "
                             f"retrying in {delay:g}s", delay)
        dedicated = [kind for kind in (DEPLOYMENT, HPA, PDB, PODMONITOR)   # what it owned as a dedicated model
                     if kind is not PODMONITOR or self._monitoring_installed()]
        self._apply_children(lsm, [pooled_service(lsm, spec)], dedicated, retry, report)
        report(None, with_package=True)
        summary = f"{package.name} {package.version}: applied Service; placed by pool {spec['pool']}"
        log.info("reconciled %s/%s: %s", namespace, name, summary)
        return summary

    def _apply_children(self, lsm: dict, desired: list[dict], unwanted: list[Kind], retry: int,
                        report: Callable[[tuple[str, str]], None]) -> dict[str, dict | None]:
        """Apply the children a model should own and delete the kinds it should not, by kind. A child the
        API server refuses is reported by name (the status, then a retry with backoff)."""
        meta = lsm["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        applied: dict[str, dict | None] = {}
        try:
            for child in desired:
                try:
                    applied[child["kind"]] = self._apply_owned(child, uid)
                except ApiError as exc:
                    exc.applying = f"{child['kind']} {name}"
                    raise
            for kind in unwanted:
                try:
                    self._delete_owned(kind, namespace, name, uid)
                except ApiError as exc:
                    exc.applying = f"deleting {kind.kind} {name}"
                    raise
        except ChildConflict as exc:
            raise self._refused("ChildConflict", str(exc), retry, report) from None
        except Unreachable:
            raise
        except ApiError as exc:
            # Refused by the API server: validation, an admission policy, a quota.
            message = f"{exc.applying}: {exc.status} {exc.reason}: {exc.message}"
            raise self._refused("ApplyFailed", message, retry, report) from None
        return applied

    def _refused(self, code: str, message: str, retry: int, report: Callable[[tuple[str, str]], None]) -> RetryLater:
        """A child the API server would not take: reported in the status, then retried with backoff."""
        report((code, message))
        delay = self.config.backoff(retry)
        return RetryLater(code, f"{message}; retrying in {delay:g}s", delay)

    def heal(self, namespace: str, name: str, uid: str) -> str | None:
        """A child went away (e.g. a deleted Deployment): reconcile its owner, if the owner is still there."""
        return self.reconcile({"metadata": {"namespace": namespace, "name": name, "uid": uid}})

    def sync_status(self, namespace: str, name: str, uid: str, deployment: dict) -> None:
        """The Deployment moved: carry its rollout into the owner's status."""
        with self._lock(namespace, name):
            self.write_status(namespace, name, deployment=deployment, expect_uid=uid)

    # ------------------------------------------------------------------------------------- children

    def _apply_owned(self, child: dict, owner_uid: str) -> dict | None:
        kind = kind_of(child)
        meta = child["metadata"]
        existing = self.kube.get(kind, meta["namespace"], meta["name"])
        if existing is not None and controller_uid(existing) != owner_uid:
            raise ChildConflict(f"{kind.kind} {meta['name']} already exists and is not owned by this LipSyncModel")
        if existing is not None and kind is DEPLOYMENT and "replicas" not in child["spec"] \
                and "replicas" in (existing.get("spec") or {}) and applies_replicas(existing):
            # Autoscaling takes over a fixed count. Dropping replicas from our apply would reset it to 1
            # (nobody else owns it yet); a second manager holds the current count until the HPA sets it.
            self.kube.apply({"apiVersion": "apps/v1", "kind": "Deployment",
                             "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
                             "spec": {"replicas": existing["spec"]["replicas"]}}, field_manager=HANDOVER_MANAGER)
        if existing is not None and kind is SERVICE:
            # clusterIP is immutable: switching to or from Headless means a new Service.
            was_headless = (existing.get("spec") or {}).get("clusterIP") == "None"
            if was_headless != (child["spec"].get("clusterIP") == "None"):
                self.kube.delete(SERVICE, meta["namespace"], meta["name"], uid=existing["metadata"].get("uid"))
        return self.kube.apply(child)

    def _delete_owned(self, kind: Kind, namespace: str, name: str, owner_uid: str) -> None:
        existing = self.kube.get(kind, namespace, name)
        if existing is not None and controller_uid(existing) == owner_uid:
            self.kube.delete(kind, namespace, name, uid=existing["metadata"].get("uid"))

    def _monitoring_installed(self) -> bool:
        cached = self._monitoring
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        installed = self.kube.serves(PODMONITOR)
        self._monitoring = (installed, time.monotonic() + MONITORING_CACHE_SECONDS)
        return installed

    # -------------------------------------------------------------------------------------- package

    def _check_package(self, namespace: str, spec: dict) -> PackageCheck:
        pkg = spec["package"]
        token = None
        if pkg.get("pullSecret"):
            ref = pkg["pullSecret"]
            secret = self.kube.get(SECRET, namespace, ref["name"])
            encoded = ((secret or {}).get("data") or {}).get(ref["key"])
            if encoded is None:
                return PackageCheck(False, "PullSecretMissing",
                                    f"secret {ref['name']} with key {ref['key']} not found in {namespace}",
                                    name=pkg["name"])
            token = base64.b64decode(encoded).decode("utf-8").strip()
        return check_package(pkg, default_registry=self.config.registry_url, policy=self.config.registry_policy(),
                             token=token, timeout=self.config.http_timeout_seconds)

    # --------------------------------------------------------------------------------------- status

    def write_status(self, namespace: str, name: str, *, observed_generation: int | None = None,
                     package_condition=status.KEEP, problem=status.KEEP, package: PackageCheck | None = None,
                     deployment: dict | None | status.Keep = status.KEEP, expect_uid: str | None = None) -> None:
        """Read-modify-write of the status, guarded by resourceVersion: concurrent writers retry on 409."""

        def compose(lsm: dict) -> dict:
            current = lsm.get("status") or {}
            dep = self.kube.get(DEPLOYMENT, namespace, name) if deployment is status.KEEP else deployment
            if dep is not None and controller_uid(dep) != lsm["metadata"].get("uid"):
                dep = None
            generation = lsm["metadata"].get("generation", 0)
            new = status.compose(current, generation=generation, deployment=dep,
                                 package_condition=package_condition, problem=problem)
            new["selector"] = children.selector_string(name)
            new["endpoint"] = children.endpoint(name, namespace)
            if observed_generation is not None:
                new["observedGeneration"] = observed_generation
            if package is not None:
                new["package"] = package.status()
            return new

        self.kube.patch_status(LIPSYNCMODEL, namespace, name, compose, expect_uid=expect_uid,
                               attempts=STATUS_WRITE_ATTEMPTS)

    def _write_pooled_status(self, lsm: dict, spec: dict, *, observed_generation: int | None,
                             package_condition: dict, problem: tuple[str, str] | None,
                             package: PackageCheck | None = None) -> None:
        """A pooled model's package and problems; its copies stay as the pool's last round counted them."""
        namespace, name = lsm["metadata"]["namespace"], lsm["metadata"]["name"]

        def compose(obj: dict) -> dict:
            new = compose_model_status(obj.get("status") or {}, generation=obj["metadata"].get("generation", 0),
                                       package_condition=package_condition, problem=problem, pool=spec["pool"])
            new["endpoint"] = children.endpoint(name, namespace)
            if observed_generation is not None:
                new["observedGeneration"] = observed_generation
            if package is not None:
                new["package"] = package.status()
            return new

        self.kube.patch_status(LIPSYNCMODEL, namespace, name, compose, attempts=STATUS_WRITE_ATTEMPTS)
