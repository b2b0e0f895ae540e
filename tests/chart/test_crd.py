"""The LipSyncModel CRD: a valid, structural CustomResourceDefinition whose own schema accepts the examples
and refuses broken resources."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from lipsync_operator.spec import InvalidSpec, normalize

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "lipsyncmodels.synctalk.io.yaml"
CHART_CRD_PATH = ROOT / "charts" / "lipsync" / "crds" / "lipsyncmodels.synctalk.io.yaml"
EXAMPLES = sorted((ROOT / "crds" / "examples").glob("*.yaml"))

CRD = yaml.safe_load(CRD_PATH.read_text())
VERSION = CRD["spec"]["versions"][0]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]
INT_OR_STRING = [{"type": "integer"}, {"type": "string"}]


def strict(schema: dict) -> dict:
    """The schema as the API server applies it with fieldValidation=Strict (kubectl's default): unknown
    fields are errors instead of being pruned."""
    out = copy.deepcopy(schema)

    def walk(node: dict) -> None:
        if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node.setdefault("additionalProperties", False)
            if node is out:   # apiVersion/kind/metadata are the API server's
                node["properties"]["metadata"] = {"type": "object"}
        for sub in (node.get("properties") or {}).values():
            walk(sub)
        if isinstance(node.get("items"), dict):
            walk(node["items"])
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"])

    walk(out)
    return out


VALIDATOR = jsonschema.Draft7Validator(strict(SCHEMA))


def resources(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_the_chart_ships_the_same_crd():
    assert CHART_CRD_PATH.read_bytes() == CRD_PATH.read_bytes(), \
        "charts/lipsync/crds/ has drifted: cp crds/lipsyncmodels.synctalk.io.yaml charts/lipsync/crds/"


@pytest.mark.parametrize("version", ["1.27", "1.29", "1.37"])
def test_the_crd_is_a_valid_custom_resource_definition(version):
    kubernetes_validate.validate(CRD, version, strict=True)


def test_names_subresources_and_printer_columns():
    spec = CRD["spec"]
    assert (spec["group"], VERSION["name"], spec["names"]["plural"], spec["names"]["kind"]) == \
        ("synctalk.io", "v1alpha1", "lipsyncmodels", "LipSyncModel")
    assert "lsm" in spec["names"]["shortNames"] and spec["scope"] == "Namespaced"
    assert VERSION["subresources"]["status"] == {}
    assert VERSION["subresources"]["scale"] == {"specReplicasPath": ".spec.replicas",
                                                "statusReplicasPath": ".status.replicas",
                                                "labelSelectorPath": ".status.selector"}
    columns = {c["name"]: c for c in VERSION["additionalPrinterColumns"]}
    assert {"Ready", "Replicas", "Endpoint", "Package-Version", "Age"} <= set(columns)
    for column in columns.values():   # every column points at a field the schema has
        path = column["jsonPath"].split("[")[0].strip(".").split(".")
        if path[0] == "metadata":
            continue
        node = SCHEMA
        for part in path:
            node = node["properties"][part]
        assert column["type"] in ("string", "integer", "date", "number", "boolean")


def _walk(node: dict, path: str = ""):
    yield path, node
    for key, sub in (node.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def test_the_schema_is_structural():
    """The API server's structural-schema rules, which it enforces on CRDs with defaults or pruning."""
    for path, node in _walk(SCHEMA):
        if node.get("x-kubernetes-int-or-string"):
            assert "type" not in node, path
            assert node.get("anyOf") == INT_OR_STRING, f"{path}: int-or-string needs exactly {INT_OR_STRING}"
            continue
        if node.get("x-kubernetes-preserve-unknown-fields") and "type" not in node:
            continue
        assert node.get("type"), f"{path} has no type"
        assert "anyOf" not in node and "oneOf" not in node, path
        assert not ("properties" in node and "additionalProperties" in node), path
        if "default" in node:   # defaults must be valid under their own schema
            jsonschema.Draft7Validator(node).validate(node["default"])
    metadata = SCHEMA["properties"]["metadata"]["properties"]
    assert set(metadata) <= {"name", "generateName"}
    for rule_holder in (SCHEMA["properties"]["spec"], SCHEMA["properties"]["spec"]["properties"]["package"]):
        for rule in rule_holder.get("x-kubernetes-validations", []):
            assert rule["rule"] and rule["message"]


def test_status_conditions_are_a_map_keyed_by_type():
    conditions = SCHEMA["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map" and conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert set(conditions["items"]["properties"]["type"]["enum"]) == \
        {"Ready", "PackageAvailable", "Progressing", "Degraded"}


def test_there_are_examples():
    assert len(EXAMPLES) >= 4


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate_against_the_crd_schema(path):
    for resource in resources(path):
        if resource["kind"] == "LipSyncPool":
            continue   # tests/operator/test_pool_crd.py checks these against their own CRD
        assert (resource["apiVersion"], resource["kind"]) == ("synctalk.io/v1alpha1", "LipSyncModel")
        VALIDATOR.validate(resource)
        jsonschema.Draft7Validator(SCHEMA["properties"]["metadata"]).validate(resource["metadata"])
        normalize(resource["spec"])   # and the rules the schema leaves to CEL and the operator


GOOD = {"apiVersion": "synctalk.io/v1alpha1", "kind": "LipSyncModel", "metadata": {"name": "alice"},
        "spec": {"package": {"name": "alice"}}}


def with_spec(**changes) -> dict:
    doc = copy.deepcopy(GOOD)
    doc["spec"].update(changes)
    return doc


@pytest.mark.parametrize("resource, where", [
    ({k: v for k, v in GOOD.items() if k != "spec"}, "spec"),
    (with_spec(package={}), "name"),
    (with_spec(package={"name": "Alice!"}), "Alice!"),
    (with_spec(package={"name": "alice", "sha256": "xyz"}), "xyz"),
    (with_spec(package={"name": "alice", "uri": "ftp://host/alice.zip"}), "ftp://"),
    (with_spec(replicas=-1), "-1"),
    (with_spec(replicas="2"), "'2'"),
    (with_spec(autoscaling={"minReplicas": 1}), "maxReplicas"),
    (with_spec(autoscaling={"maxReplicas": 3, "metric": "cpu"}), "cpu"),
    (with_spec(autoscaling={"maxReplicas": 3, "targetAverageValue": "eight"}), "eight"),
    (with_spec(autoscaling={"maxReplicas": 3, "targetSessionUtilization": 1.5}), "1.5"),
    (with_spec(runtime={"maxSessions": -1}), "-1"),
    (with_spec(runtime={"precision": "int8"}), "int8"),
    (with_spec(runtime={"maxBatch": 0}), "0"),
    (with_spec(resources={"gpu": {"resourceName": "gpu"}}), "gpu"),
    (with_spec(resources={"gpu": {"count": 17}}), "17"),
    (with_spec(resources={"memory": "8 GB"}), "8 GB"),
    (with_spec(cache={"redisUrl": "http://redis"}), "http://redis"),
    (with_spec(service={"type": "ExternalName"}), "ExternalName"),
    (with_spec(scheduling={"tolerations": [{"key": "k", "operator": "Maybe"}]}), "Maybe"),
    (with_spec(replica=2), "replica"),   # a typo: refused under strict field validation
])
def test_the_schema_refuses_broken_resources(resource, where):
    with pytest.raises(jsonschema.ValidationError) as info:
        VALIDATOR.validate(resource)
    assert where in str(info.value)


def test_a_bad_name_is_refused():
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(SCHEMA["properties"]["metadata"]).validate({"name": "Alice_1"})


@pytest.mark.parametrize("spec", [
    {"package": {"name": "a"}, "replicas": 2, "autoscaling": {"maxReplicas": 3}},
    {"package": {"name": "a", "registry": "http://r/", "uri": "http://r/a/1/a-1.zip"}},
    {"package": {"name": "a"}, "autoscaling": {"minReplicas": 4, "maxReplicas": 3}},
    {"package": {"name": "a"}, "autoscaling": {"maxReplicas": 3, "targetSessionUtilization": 0.5},
     "runtime": {"maxSessions": 0}},
])
def test_what_the_cel_rules_refuse_the_operator_refuses_too(spec):
    VALIDATOR.validate(with_spec(**spec))   # the plain schema lets these through ...
    rules = " ".join(r["message"] for _, node in _walk(SCHEMA) for r in node.get("x-kubernetes-validations", []))
    with pytest.raises(InvalidSpec) as info:   # ... a CEL rule (in a cluster) and the operator do not
        normalize(spec)
    assert str(info.value) in rules
