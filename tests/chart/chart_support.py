"""The chart as the tests see it: rendered offline by the real Helm library (helm-python-sdk), parsed as the
API server would, and the few things the kubelet would do to a container's environment."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "lipsync"
RELEASE, NAMESPACE = "lipsync", "lipsync-system"


class StrictLoader(yaml.SafeLoader):
    """YAML that refuses duplicate keys, as the API server's decoder does."""


def _no_duplicates(loader, node, deep=False):
    keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
    duplicates = {k for k in keys if keys.count(k) > 1}
    if duplicates:
        raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {duplicates}", node.start_mark)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def render_files(chart: helm.Chart, values: dict | None = None) -> dict[str, str]:
    """Template path -> rendered text, as `helm install` would render it (NOTES.txt included)."""
    return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def render(chart: helm.Chart, values: dict | None = None) -> list[dict]:
    docs = []
    for path, text in render_files(chart, values).items():
        if path.endswith("NOTES.txt"):
            continue
        docs += [doc for doc in yaml.load_all(text, Loader=StrictLoader) if doc]
    return docs


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def containers(docs: list[dict]) -> list[dict]:
    """Every container of every workload and pod, init containers included."""
    out = []
    for doc in docs:
        spec = doc["spec"]["template"]["spec"] if doc["kind"] == "Deployment" else \
            doc["spec"] if doc["kind"] == "Pod" else None
        if spec:
            out += spec.get("initContainers", []) + spec["containers"]
    return out


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion in env values, command and args: defined names are replaced, $$ is a
    literal $, an undefined $(NAME) stays as it is."""
    return _VAR.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def container_env(container: dict, docs: list[dict]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: secretKeyRef values from the rendered Secrets,
    each value expanded with the variables defined before it."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
            continue
        ref = var["valueFrom"]["secretKeyRef"]
        (secret,) = find(docs, "Secret", ref["name"])
        env[var["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
    return env
