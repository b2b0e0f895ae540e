"""A pooled LipSyncModel's status and a LipSyncPool's, composed from what the operator observed. Pure functions;
the controllers (lipsync_operator.reconcile, lipsync_operator.pool) write the result."""

from __future__ import annotations

from typing import Any

from lipsync_operator import status

POOL_CONDITION_TYPES = ("Ready", "Full", "Degraded")

def compose_model_status(current: dict, *, generation: int, package_condition, problem, pool: str,
                         copies: int | None = None, ready_copies: int | None = None, wanted: int | None = None,
                         full: str | None = None) -> dict:
    """A pooled model's status: Ready while one copy serves; Progressing while copies are being placed;
    Degraded when the spec, the package or the pool (full) stands in the way."""
    old = current.get("conditions") or []
    copies = current.get("copies", 0) if copies is None else copies
    ready_copies = current.get("readyCopies", 0) if ready_copies is None else ready_copies
    if package_condition is status.KEEP:
        package_condition = status.find(old, "PackageAvailable") or status.condition(
            "PackageAvailable", None, "Checking", "the package has not been checked yet", generation)
    counts = f"{ready_copies} of {copies} copies ready in pool {pool}"
    ready = status.condition("Ready", ready_copies > 0, "Available" if ready_copies else "NoCopyReady", counts,
                             generation)
    placing = wanted is not None and ready_copies < wanted
    progressing = status.condition("Progressing", placing, "PlacingCopies" if placing else "Placed", counts,
                                   generation)
    if problem:
        degraded = status.condition("Degraded", True, problem[0], problem[1], generation)
    elif package_condition["status"] != "True":
        degraded = status.condition("Degraded", True, "PackageUnavailable", package_condition.get("message", ""),
                                    generation)
    elif full:
        degraded = status.condition("Degraded", True, "PoolFull", full, generation)
    else:
        degraded = status.condition("Degraded", False, "AsExpected", "", generation)
    return {"conditions": status.merge_conditions(old, [ready, package_condition, progressing, degraded],
                                                  status.now()),
            "pool": pool, "copies": copies, "readyCopies": ready_copies}



def _pool_degraded(old: list[dict], generation: int, problem: Any) -> dict:
    """The pool's Degraded condition: (reason, message) of a spec problem, None for none, or KEEP the current."""
    if problem is status.KEEP:
        kept = status.find(old, "Degraded")
        return kept or status.condition("Degraded", False, "AsExpected", "", generation)
    if problem:
        return status.condition("Degraded", True, problem[0], problem[1], generation)
    return status.condition("Degraded", False, "AsExpected", "", generation)


def compose_pool_problem(current: dict, *, generation: int, problem: tuple[str, str] | None) -> dict:
    """After the pool's own reconcile: its Degraded condition (InvalidSpec or none); the rest as it was."""
    old = current.get("conditions") or []
    keep = [c for c in old if c.get("type") in POOL_CONDITION_TYPES and c.get("type") != "Degraded"]
    return {"conditions": status.merge_conditions(old, [*keep, _pool_degraded(old, generation, problem)],
                                                  status.now(), POOL_CONDITION_TYPES)}


def compose_pool_status(current: dict, *, generation: int, ready_pods: int, pods: int, full: str | None,
                        needed: int, models: int, copies: int, memory_used: str, memory_free: str,
                        selector: str) -> dict:
    """After a placement round: pods, copies, memory and the Ready and Full conditions (Degraded kept)."""
    old = current.get("conditions") or []
    conditions = [
        status.condition("Ready", bool(ready_pods), "PodsReady" if ready_pods else "NoPodReady",
                         f"{ready_pods} of {pods} pods ready", generation),
        status.condition("Full", full is not None, "CopiesDoNotFit" if full is not None else "Room",
                         full or f"{needed} pods needed", generation),
        _pool_degraded(old, generation, status.KEEP),
    ]
    return {"replicas": pods, "readyReplicas": ready_pods, "observedGeneration": generation,
            "selector": selector, "podsNeeded": needed, "models": models, "copies": copies,
            "memoryUsed": memory_used, "memoryFree": memory_free,
            "conditions": status.merge_conditions(old, conditions, status.now(), POOL_CONDITION_TYPES)}
