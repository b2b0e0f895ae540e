"""What a real API server would refuse of the objects the operator writes, checked on what KMock stored.

KMock stores whatever it is given; a real API server validates every write. The harness records each object
the operator creates or changes (lsm_harness.Cluster) and every test's teardown checks them here:

- built-in kinds against the Kubernetes OpenAPI schemas, with kubernetes-validate (strict: unknown fields too);
- what those schemas do not say and the API server still checks: object names (a Service's is a DNS-1035
  label, the others DNS-1123 subdomains), label keys and values (63 characters, their alphabet) wherever
  labels and selectors appear, annotation keys and their total size;
- the custom resources' status against their CRD's schema (jsonschema), and no field the API server would
  prune for being unknown to it.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBE_VERSIONS = ("1.29", "1.37")
CRDS = {"LipSyncModel": ROOT / "crds" / "lipsyncmodels.synctalk.io.yaml",
        "LipSyncPool": ROOT / "crds" / "lipsyncpools.synctalk.io.yaml"}
NOT_IN_SCHEMAS = {"PodMonitor"}   # the Prometheus operator's CRD: no schema here; its metadata is still checked

_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1123_SUBDOMAIN = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
MAX_ANNOTATIONS_BYTES = 256 * 1024


def _name_problems(kind: str, name: str | None) -> list[str]:
    if not name:
        return [f"{kind}: no metadata.name"]
    if kind == "Service":
        ok = len(name) <= 63 and DNS1035_LABEL.match(name)
        rule = "a DNS-1035 label (at most 63 characters)"
    else:
        ok = len(name) <= 253 and DNS1123_SUBDOMAIN.match(name)
        rule = "a DNS-1123 subdomain (at most 253 characters)"
    return [] if ok else [f"{kind} {name!r}: metadata.name must be {rule}"]


def _key_problems(key: str) -> list[str]:
    prefix, _, name = key.rpartition("/")
    problems = []
    if prefix and (len(prefix) > 253 or not DNS1123_SUBDOMAIN.match(prefix)):
        problems.append(f"key {key!r}: prefix must be a DNS-1123 subdomain")
    if len(name) > 63 or not QUALIFIED_NAME.match(name):
        problems.append(f"key {key!r}: name part must be at most 63 characters, alphanumeric at both ends")
    return problems


def _label_problems(where: str, labels: Any) -> list[str]:
    if not isinstance(labels, dict):
        return []
    problems = []
    for key, value in labels.items():
        problems += [f"{where}: label {p}" for p in _key_problems(str(key))]
        if not isinstance(value, str) or value and (len(value) > 63 or not QUALIFIED_NAME.match(value)):
            problems.append(f"{where}: label {key!r} has an invalid value {value!r} "
                            "(at most 63 characters, alphanumeric at both ends)")
    return problems


def _walk_labels(node: Any, path: str) -> list[str]:
    """Every ``labels`` and ``matchLabels`` map in the object (metadata, pod templates, selectors)."""
    problems = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("labels", "matchLabels"):
                problems += _label_problems(f"{path}.{key}", value)
            else:
                problems += _walk_labels(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            problems += _walk_labels(value, f"{path}[{i}]")
    return problems


def metadata_problems(obj: dict) -> list[str]:
    kind, meta = obj.get("kind", "?"), obj.get("metadata") or {}
    generated = meta.get("generateName")   # the API server appends a random suffix (kopf's events)
    problems = _name_problems(kind, meta.get("name") or (generated + "x" if generated else None))
    problems += _walk_labels(obj, kind)
    if kind == "Service":
        problems += _label_problems("Service spec.selector", (obj.get("spec") or {}).get("selector"))
    annotations = meta.get("annotations") or {}
    for key in annotations:
        problems += [f"{kind}: annotation {p}" for p in _key_problems(key)]
    if sum(len(k) + len(str(v)) for k, v in annotations.items()) > MAX_ANNOTATIONS_BYTES:
        problems.append(f"{kind}: annotations exceed {MAX_ANNOTATIONS_BYTES} bytes")
    return problems


@cache
def _status_schema(kind: str) -> dict:
    crd = yaml.safe_load(CRDS[kind].read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]


def _pruned(node: Any, schema: dict, path: str) -> list[str]:
    """Fields a structural schema does not declare: the API server drops them silently."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(node, dict):
        props, extra = schema.get("properties") or {}, schema.get("additionalProperties")
        out = []
        for key, value in node.items():
            if key in props:
                out += _pruned(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                out += _pruned(value, extra, f"{path}.{key}")
            elif extra is not True:
                out.append(f"{path}.{key} is not in the CRD's schema (the API server would drop it)")
        return out
    if isinstance(node, list) and isinstance(schema.get("items"), dict):
        return [p for i, v in enumerate(node) for p in _pruned(v, schema["items"], f"{path}[{i}]")]
    return []


def custom_resource_problems(obj: dict) -> list[str]:
    kind = obj["kind"]
    status = obj.get("status")
    if status is None:
        return []
    schema = _status_schema(kind)
    problems = [f"{kind} status: {e.message} at {'.'.join(map(str, e.absolute_path))}"
                for e in jsonschema.Draft7Validator(schema).iter_errors(status)]
    return problems + _pruned(status, schema, f"{kind} status")


def problems(obj: dict) -> list[str]:
    """Why the API server would refuse (or silently change) ``obj``; empty when it would take it."""
    kind = obj.get("kind", "?")
    found = metadata_problems(obj)
    if kind in CRDS:
        found += custom_resource_problems(obj)
    elif kind not in NOT_IN_SCHEMAS:
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                found.append(f"{kind} {(obj.get('metadata') or {}).get('name')!r} (Kubernetes {version}): "
                             f"{exc.message} at {'.'.join(map(str, exc.path))}")
    return found


def check_writes(writes: list[dict]) -> list[str]:
    """Every distinct object written, checked once; returns the problems, each naming the object."""
    seen: set[str] = set()
    found: list[str] = []
    for obj in writes:
        key = json.dumps(obj, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        found += [p for p in problems(obj) if p not in found]
    return found
