"""The operator's spec normalisation agrees with the CRD: same defaults, same cross-field rules."""

from __future__ import annotations

import copy

import pytest
import yaml
from lsm_harness import CRD_PATH

from lipsync_operator.spec import DEFAULTS, InvalidSpec, normalize, with_defaults

SPEC_SCHEMA = yaml.safe_load(CRD_PATH.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"][
    "properties"]["spec"]


def crd_defaults(schema: dict, prefix: str = "") -> dict:
    """Every default the schema declares, by dotted path."""
    out = {}
    for key, sub in (schema.get("properties") or {}).items():
        path = f"{prefix}{key}"
        if "default" in sub:
            out[path] = sub["default"]
        out.update(crd_defaults(sub, path + "."))
    return out


def apiserver_defaulting(obj, schema: dict):
    """The API server's structural defaulting: a missing field with a default gets it, then defaulting
    descends into objects that are present (including ones that just got a default)."""
    if not isinstance(obj, dict):
        return obj
    out = dict(obj)
    for key, sub in (schema.get("properties") or {}).items():
        if key not in out and "default" in sub:
            out[key] = copy.deepcopy(sub["default"])
        if key in out:
            out[key] = apiserver_defaulting(out[key], sub)
    return out


def test_the_operator_knows_exactly_the_crd_defaults():
    assert DEFAULTS == crd_defaults(SPEC_SCHEMA)


@pytest.mark.parametrize("spec", [
    {"package": {"name": "alice"}},
    {"package": {"name": "alice", "pullSecret": {"name": "s"}}, "autoscaling": {"maxReplicas": 3}},
    {"package": {"name": "alice"}, "runtime": {"apiKeysSecret": {"name": "k"}, "precision": "fp32"},
     "cache": {"redisSecret": {"name": "r"}}, "resources": {"gpu": {"count": 0}}},
    {"package": {"name": "alice"}, "resources": {"memory": "2Gi"}, "service": {"type": "Headless"}},
])
def test_defaulting_matches_the_api_server(spec):
    assert with_defaults(spec) == apiserver_defaulting(spec, SPEC_SCHEMA)


def test_normalize_fills_in_one_replica_without_autoscaling():
    assert normalize({"package": {"name": "a"}})["replicas"] == 1
    assert "replicas" not in normalize({"package": {"name": "a"}, "autoscaling": {"maxReplicas": 2}})


@pytest.mark.parametrize("spec, message", [
    ({"package": {}}, "package.name"),
    ({"package": {"name": "a", "uri": "http://r/a.zip", "registry": "http://r/"}}, "alternatives"),
    ({"package": {"name": "a"}, "replicas": 1, "autoscaling": {"maxReplicas": 2}}, "not both"),
    ({"package": {"name": "a"}, "autoscaling": {"minReplicas": 3, "maxReplicas": 2}}, "must not exceed"),
    ({"package": {"name": "a"}, "autoscaling": {"maxReplicas": 2, "targetAverageValue": "0"}}, "positive"),
    ({"package": {"name": "a"}, "autoscaling": {"maxReplicas": 2, "targetSessionUtilization": 0}}, "from 0.01 to 1"),
    ({"package": {"name": "a"}, "autoscaling": {"maxReplicas": 2, "targetSessionUtilization": 0.5},
      "runtime": {"maxSessions": 0}}, "needs runtime.maxSessions above 0"),
    ({"package": {"name": "a"}, "cache": {"redisUrl": "redis://r", "redisSecret": {"name": "s"}}}, "alternatives"),
    ({"package": {"name": "a"}, "resources": {"memory": "lots"}}, "resources.memory"),
    ({"package": {"name": "a"}, "disruptionBudget": {"maxUnavailable": "half"}}, "maxUnavailable"),
])
def test_normalize_refuses_what_the_crd_rules_refuse(spec, message):
    with pytest.raises(InvalidSpec, match=message):
        normalize(spec)
