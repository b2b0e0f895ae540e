"""A small JSON client for the Kubernetes API, on top of the official client's configuration and transport.

The official client brings in-cluster and kubeconfig authentication (with token refresh); the typed API
classes are not used because the operator handles its children as plain manifests: server-side apply for
what it owns, JSON merge patches for the status, and one code path for every kind, custom ones included.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import kubernetes
import urllib3

from lipsync_operator.config import API_VERSION, FIELD_MANAGER, KIND, OPERATOR_NAME, PLURAL

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str):
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.applying = ""   # what was being done, for the status message


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    pass


class Unreachable(ApiError):
    """The API server could not be reached (connection or timeout): worth retrying."""


@dataclass(frozen=True)
class Kind:
    api_version: str
    kind: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None, subresource: str | None = None) -> str:
        prefix = f"/api/{self.api_version}" if "/" not in self.api_version else f"/apis/{self.api_version}"
        parts = [prefix]
        if self.namespaced:
            if namespace is None:
                raise ValueError(f"{self.kind} is namespaced: a namespace is needed")
            parts.append(f"namespaces/{namespace}")
        parts.append(self.plural)
        if name is not None:
            parts.append(name)
            if subresource:
                parts.append(subresource)
        return "/".join(parts)


LIPSYNCMODEL = Kind(API_VERSION, KIND, PLURAL)
DEPLOYMENT = Kind("apps/v1", "Deployment", "deployments")
SERVICE = Kind("v1", "Service", "services")
SECRET = Kind("v1", "Secret", "secrets")
HPA = Kind("autoscaling/v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers")
PDB = Kind("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets")
PODMONITOR = Kind("monitoring.coreos.com/v1", "PodMonitor", "podmonitors")
LIPSYNCPOOL = Kind(API_VERSION, "LipSyncPool", "lipsyncpools")
POD = Kind("v1", "Pod", "pods")
EVENT = Kind("v1", "Event", "events")

KINDS = {(k.api_version, k.kind): k
         for k in (LIPSYNCMODEL, LIPSYNCPOOL, DEPLOYMENT, SERVICE, SECRET, HPA, PDB, PODMONITOR, POD)}


def kind_of(obj: dict) -> Kind:
    try:
        return KINDS[(obj["apiVersion"], obj["kind"])]
    except KeyError:
        raise ValueError(f"unsupported kind {obj.get('apiVersion')}/{obj.get('kind')}") from None


class KubeClient:
    def __init__(self, api_client: kubernetes.client.ApiClient, timeout_s: float = 30.0):
        self.api = api_client
        self.api.user_agent = OPERATOR_NAME   # the API server's audit log names who wrote what
        self.timeout_s = timeout_s

    @classmethod
    def from_environment(cls, timeout_s: float = 30.0) -> KubeClient:
        """In a pod: the service account; elsewhere: the kubeconfig ($KUBECONFIG or ~/.kube/config)."""
        configuration = kubernetes.client.Configuration()
        try:
            kubernetes.config.load_incluster_config(client_configuration=configuration)
        except kubernetes.config.ConfigException:
            # The client reads $KUBECONFIG when it is imported; read it now instead.
            kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None,
                                               client_configuration=configuration)
        return cls(kubernetes.client.ApiClient(configuration), timeout_s=timeout_s)

    def close(self) -> None:
        self.api.close()

    # ------------------------------------------------------------------------------------ transport

    def request(self, method: str, path: str, *, query: dict[str, str] | None = None, body: Any = None,
                content_type: str = "application/json") -> dict | None:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        method, url, headers, body, _ = self.api.param_serialize(
            method, path, query_params=list((query or {}).items()), header_params=headers, body=body,
            auth_settings=["BearerToken"])
        try:
            response = self.api.call_api(method, url, header_params=headers, body=body,
                                         _request_timeout=self.timeout_s)
            data = response.read()
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise Unreachable(0, type(exc).__name__, str(exc)) from None
        except kubernetes.client.ApiException as exc:
            raise Unreachable(exc.status or 0, str(exc.reason), str(exc.body or exc)) from None
        if 200 <= response.status < 300:
            return json.loads(data) if data else None
        try:
            status = json.loads(data)
            reason, message = str(status.get("reason", "")), str(status.get("message", ""))
        except (ValueError, AttributeError):
            reason, message = response.reason or "", data.decode("utf-8", "replace")[:2000]
        error = {404: NotFound, 409: Conflict}.get(response.status, ApiError)
        raise error(response.status, reason, message)

    # -------------------------------------------------------------------------------------- objects

    def get(self, kind: Kind, namespace: str | None, name: str) -> dict | None:
        try:
            return self.request("GET", kind.path(namespace, name))
        except NotFound:
            return None

    def list(self, kind: Kind, namespace: str | None, label_selector: str | None = None) -> list[dict]:
        query = {"labelSelector": label_selector} if label_selector else None
        return (self.request("GET", kind.path(namespace), query=query) or {}).get("items") or []

    def apply(self, obj: dict, *, field_manager: str = FIELD_MANAGER) -> dict | None:
        """Server-side apply: creates or updates the fields this manager owns; fields it stops sending go
        away (unless another manager owns them too)."""
        kind = kind_of(obj)
        meta = obj["metadata"]
        return self.request(
            "PATCH", kind.path(meta.get("namespace"), meta["name"]),
            query={"fieldManager": field_manager, "force": "true"},
            body=obj, content_type="application/apply-patch+yaml")

    def patch(self, kind: Kind, namespace: str | None, name: str, patch: dict, *,
              subresource: str | None = None) -> dict | None:
        return self.request("PATCH", kind.path(namespace, name, subresource), body=patch,
                            content_type="application/merge-patch+json")

    def patch_status(self, kind: Kind, namespace: str, name: str, compose: Callable[[dict], dict], *,
                     expect_uid: str | None = None, attempts: int = 5) -> None:
        """Read-modify-write of an object's status: ``compose(obj)`` gives the new status, written only over
        the resourceVersion it was read at, so concurrent writers re-read and retry on 409. Nothing is written
        once the object is gone, or (``expect_uid``) replaced by another of the same name."""
        for _ in range(attempts):
            obj = self.get(kind, namespace, name)
            if obj is None or (expect_uid and obj["metadata"].get("uid") != expect_uid):
                return
            patch: dict[str, Any] = {"status": compose(obj)}
            if obj["metadata"].get("resourceVersion"):
                patch["metadata"] = {"resourceVersion": obj["metadata"]["resourceVersion"]}
            try:
                self.patch(kind, namespace, name, patch, subresource="status")
                return
            except Conflict:
                continue
            except NotFound:
                return  # deleted meanwhile
        log.warning("status of %s %s/%s: gave up after %d conflicting writes", kind.kind, namespace, name, attempts)

    def delete(self, kind: Kind, namespace: str | None, name: str, *, uid: str | None = None) -> bool:
        """Delete (children in the background); with ``uid``, only that very object. False if it was gone."""
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            self.request("DELETE", kind.path(namespace, name), body=body)
            return True
        except NotFound:
            return False

    def serves(self, kind: Kind) -> bool:
        """Whether the API serves ``kind`` (e.g. PodMonitors only where the Prometheus operator is installed)."""
        served = self.served_resources(kind.api_version)
        return served is not None and kind.plural in served

    def served_resources(self, group_version: str) -> set[str] | None:
        """Plural names the API serves under ``group/version``; None when the API is not installed."""
        path = f"/api/{group_version}" if "/" not in group_version else f"/apis/{group_version}"
        try:
            listing = self.request("GET", path) or {}
        except NotFound:
            return None
        return {r.get("name", "") for r in listing.get("resources", []) if "/" not in r.get("name", "")}
