"""The LipSyncPool CRD and the pool fields of the LipSyncModel CRD: valid, shipped by the chart, their defaults
the operator's, their examples accepted, and what their CEL rules refuse refused by the operator too."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from lsm_harness import CRD_PATH

from lipsync_operator.spec import POOL_DEFAULTS, InvalidSpec, normalize, normalize_pool

ROOT = Path(__file__).resolve().parents[2]
POOL_CRD_PATH = ROOT / "crds" / "lipsyncpools.synctalk.io.yaml"
POOL_CRD = yaml.safe_load(POOL_CRD_PATH.read_text())
VERSION = POOL_CRD["spec"]["versions"][0]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]
LSM_SCHEMA = yaml.safe_load(CRD_PATH.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
EXAMPLE = ROOT / "crds" / "examples" / "pool-many-characters.yaml"


def crd_defaults(schema: dict, prefix: str = "") -> dict:
    out = {}
    for key, sub in (schema.get("properties") or {}).items():
        if "default" in sub:
            out[f"{prefix}{key}"] = sub["default"]
        out.update(crd_defaults(sub, f"{prefix}{key}."))
    return out


def rules(schema: dict) -> str:
    found = []

    def walk(node: dict) -> None:
        found.extend(r["message"] for r in node.get("x-kubernetes-validations", []))
        for sub in (node.get("properties") or {}).values():
            walk(sub)
    walk(schema)
    return " | ".join(found)


def test_the_chart_ships_the_same_pool_crd():
    assert (ROOT / "charts" / "lipsync" / "crds" / POOL_CRD_PATH.name).read_bytes() == POOL_CRD_PATH.read_bytes()


@pytest.mark.parametrize("version", ["1.27", "1.29", "1.37"])
def test_the_pool_crd_is_a_valid_custom_resource_definition(version):
    kubernetes_validate.validate(POOL_CRD, version, strict=True)


def test_pool_names_subresources_and_printer_columns():
    names = POOL_CRD["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == ("LipSyncPool", "lipsyncpools", ["lsp"])
    assert VERSION["subresources"] == {"status": {}, "scale": {
        "specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector"}}
    columns = {c["name"]: c["jsonPath"] for c in VERSION["additionalPrinterColumns"]}
    assert {"Pods", "Models", "Memory-Used", "Memory-Free"} <= set(columns)
    lsm_columns = {c["name"]: c["jsonPath"] for c in
                   yaml.safe_load(CRD_PATH.read_text())["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert {"Pool", "Copies", "Ready-Copies"} <= set(lsm_columns)
    for schema, paths in ((SCHEMA, columns.values()), (LSM_SCHEMA, lsm_columns.values())):
        for path in paths:   # every column points at a field the schema has
            parts = path.split("[")[0].strip(".").split(".")
            if parts[0] == "metadata":
                continue
            node = schema
            for part in parts:
                node = node["properties"][part]


def test_the_operator_applies_the_pool_crds_defaults():
    assert crd_defaults(SCHEMA["properties"]["spec"]) == POOL_DEFAULTS


def test_the_example_validates_and_normalises():
    docs = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]
    kinds = [d["kind"] for d in docs]
    assert kinds.count("LipSyncPool") == 1 and kinds.count("LipSyncModel") >= 2
    for doc in docs:
        schema = SCHEMA if doc["kind"] == "LipSyncPool" else LSM_SCHEMA
        jsonschema.Draft7Validator(schema).validate(doc)
    pool = normalize_pool(docs[0]["spec"])
    assert pool["capacityFps"] == 400 and pool["runtime"]["device"] == "cuda"
    model = normalize(docs[2]["spec"])
    assert model["placement"] == {"minCopies": 1, "maxCopies": 4, "demandPerCopy": 100}
    assert "replicas" not in model            # a pooled model has no pods of its own


@pytest.mark.parametrize("spec, message", [
    ({"package": {"name": "a"}, "pool": "p", "replicas": 2}, "a pooled model (spec.pool) has no replicas"),
    ({"package": {"name": "a"}, "pool": "p", "autoscaling": {"maxReplicas": 2}}, "a pooled model"),
    ({"package": {"name": "a"}, "placement": {"maxCopies": 2}}, "spec.placement needs spec.pool"),
    ({"package": {"name": "a"}, "pool": "p", "placement": {"minCopies": 3, "maxCopies": 2}},
     "placement.minCopies must not exceed placement.maxCopies"),
])
def test_what_the_cel_rules_refuse_the_operator_refuses_too(spec, message):
    jsonschema.Draft7Validator(LSM_SCHEMA["properties"]["spec"]).validate(spec)   # the schema lets it through
    assert message in rules(LSM_SCHEMA)
    with pytest.raises(InvalidSpec, match=message.replace("(", r"\(").replace(")", r"\)")):
        normalize(spec)


@pytest.mark.parametrize("spec, where", [
    ({}, "modelMemoryBudgetMb"),
    ({"modelMemoryBudgetMb": 8}, "modelMemoryBudgetMb"),
    ({"modelMemoryBudgetMb": 1024, "replicas": 2, "autoscaling": {"maxReplicas": 3}}, "not both"),
    ({"modelMemoryBudgetMb": 1024, "resources": {"memory": "lots"}}, "resources.memory"),
    ({"modelMemoryBudgetMb": 1024, "runtime": {"maxSessions": 0},
      "autoscaling": {"maxReplicas": 3, "targetSessionUtilization": 0.5}}, "needs runtime.maxSessions above 0"),
])
def test_a_broken_pool_is_refused_with_a_clear_message(spec, where):
    with pytest.raises(InvalidSpec, match=where):
        normalize_pool(copy.deepcopy(spec))
