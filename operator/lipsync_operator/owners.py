"""Who controls an object: the owner references both controllers (models and pools) read. Pure functions."""

from __future__ import annotations

from lipsync_operator.config import API_VERSION, KIND


def controller_uid(obj: dict) -> str | None:
    """The uid of the object's controller (the owner reference with controller: true), if any."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return ref.get("uid")
    return None


def controller_owner(obj: dict, kind: str = KIND) -> dict | None:
    """The controlling owner reference of a child when the controller is one of ours of ``kind``."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == kind and ref.get("apiVersion") == API_VERSION:
            return ref
    return None
