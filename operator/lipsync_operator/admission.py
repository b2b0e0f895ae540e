"""What a LipSyncModel or LipSyncPool may name, by the operator's own configuration, checked before it writes
or fetches anything: its name (its children carry it), its image, its registry and its node store.

Each refusal is an InvalidSpec with one line for the user: the resource's status shows it (Degraded,
reason InvalidSpec), nothing is applied and no connection is opened. The API server's CRD schema refuses
bad names too; the operator checks again for objects stored before that rule, and because the allow-lists
are the operator's configuration, not the CRD's.
"""

from __future__ import annotations

import re

from lipsync_operator.config import OperatorConfig
from lipsync_operator.egress import RefusedURL
from lipsync_operator.images import InvalidImage
from lipsync_operator.spec import InvalidSpec

# A DNS-1035 label: a Service's name, and short enough for a label value and a label key's name part.
NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME = 63


def check_name(kind: str, name: str, carried_by: str) -> None:
    if len(name) <= MAX_NAME and NAME.match(name):
        return
    shown = name if len(name) <= 80 else name[:77] + "..."
    raise InvalidSpec(f"metadata.name {shown!r} ({len(name)} characters) cannot name {carried_by}: a {kind} name "
                      f"is at most {MAX_NAME} lowercase letters, digits and '-', starting with a letter and "
                      "ending with a letter or digit")


def check_image(spec: dict, config: OperatorConfig) -> None:
    image = (spec.get("runtime") or {}).get("image")
    if not image:
        return   # the operator's own inference image
    policy = config.image_policy()
    try:
        allowed = policy.allows(image)
    except InvalidImage as exc:
        raise InvalidSpec(f"spec.runtime.image: {exc}") from None
    if not allowed:
        raise InvalidSpec(f"spec.runtime.image {image!r} is not from a repository the operator runs "
                          f"(operator.allowedImages: {policy.describe()})")


def check_registries(spec: dict, config: OperatorConfig) -> None:
    """The package's registry or URI against the allow-list, its host resolved now (the fetch re-checks the
    addresses it connects to)."""
    package = spec.get("package") or {}
    policy = config.registry_policy()
    for field in ("uri", "registry"):
        url = package.get(field)
        if url:
            try:
                policy.check(url, resolve=True)
            except RefusedURL as exc:
                raise InvalidSpec(f"spec.package.{field}: {exc}") from None


def check_node_store(spec: dict, config: OperatorConfig) -> None:
    """A node-local store is a host directory: only where the operator's configuration names its root."""
    if (spec.get("runtime") or {}).get("nodeStore", {}).get("enabled") and not config.node_store_root:
        raise InvalidSpec("spec.runtime.nodeStore.enabled needs a node store root in the operator's "
                          "configuration (chart value inference.nodeStore.root); none is set, so pods may not share a "
                          "host directory")


def check_model(lsm: dict, spec: dict, config: OperatorConfig) -> None:
    """Raises InvalidSpec; ``spec`` is the normalised spec (lipsync_operator.spec.normalize)."""
    check_name("LipSyncModel", lsm["metadata"]["name"], "its Service and its pods' labels")
    check_image(spec, config)
    check_registries(spec, config)
    check_node_store(spec, config)


def check_pool(lsp: dict, spec: dict, config: OperatorConfig) -> None:
    """Raises InvalidSpec; ``spec`` is the normalised spec (lipsync_operator.spec.normalize_pool)."""
    check_name("LipSyncPool", lsp["metadata"]["name"], "its pods' labels")
    check_image(spec, config)
    check_node_store(spec, config)
