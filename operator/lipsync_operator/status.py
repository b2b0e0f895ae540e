"""A LipSyncModel's status, composed from what the operator observed: the package check, the Deployment's
rollout and any problem applying the spec. Pure functions; the reconciler writes the result.

Conditions (metav1.Condition-shaped):

- PackageAvailable: the registry lists the package and its file is there (reason Verified) or why not.
- Progressing: True while the Deployment rolls out (RollingOut) or new pods start (WaitingForReplicas);
  False once every desired pod is available (RolloutComplete),
  when it exceeded its progress deadline, or when nothing can roll out (the package or spec problem).
- Degraded: True when the desired state cannot be reached: package unavailable, invalid spec, a child
  owned by someone else, or a rollout stuck past the Deployment's progress deadline.
- Ready: True while at least one pod serves (Available), False otherwise (NoReplicasReady, ScaledToZero, ...).
"""

from __future__ import annotations

import datetime
import enum
from dataclasses import dataclass
from typing import Any, Final

CONDITION_TYPES = ("Ready", "PackageAvailable", "Progressing", "Degraded")
# Problems only a reconcile can detect (and clear): the Deployment watcher carries them over.
RECONCILE_PROBLEMS = ("InvalidSpec", "ChildConflict", "ApplyFailed", "PullSecretMissing")


class Keep(enum.Enum):
    """KEEP's type: an enum member, so ``x is KEEP`` narrows ``x``."""
    KEEP = "keep"


KEEP: Final = Keep.KEEP   # "keep what the status says" for the package condition and the problem


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(type_: str, status: bool | None, reason: str, message: str, generation: int | None) -> dict:
    out: dict[str, Any] = {"type": type_, "status": {True: "True", False: "False", None: "Unknown"}[status],
           "reason": reason, "message": message}
    if generation is not None:
        out["observedGeneration"] = generation
    return out


def find(conditions: list[dict] | None, type_: str) -> dict | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)


def merge_conditions(old: list[dict] | None, new: list[dict], timestamp: str,
                     order: tuple[str, ...] = CONDITION_TYPES) -> list[dict]:
    """``new`` in canonical order; lastTransitionTime moves only when a condition's status changes."""
    out = []
    for cond in sorted(new, key=lambda c: order.index(c["type"])):
        prev = find(old, cond["type"])
        if prev is not None and prev.get("status") == cond["status"] and "lastTransitionTime" in prev:
            since = prev["lastTransitionTime"]
        else:
            since = timestamp
        out.append({**cond, "lastTransitionTime": since})
    return out


@dataclass(frozen=True)
class Rollout:
    desired: int
    replicas: int
    updated: int
    ready: int
    available: int
    rolled_out: bool       # every pod runs the current template (some may still be starting)
    complete: bool         # ... and all desired pods are available
    stuck: str | None      # the Deployment's message when it exceeded its progress deadline


def rollout(deployment: dict) -> Rollout:
    spec, st = deployment.get("spec") or {}, deployment.get("status") or {}
    desired = spec.get("replicas", 1)
    replicas, updated = st.get("replicas", 0), st.get("updatedReplicas", 0)
    ready, available = st.get("readyReplicas", 0), st.get("availableReplicas", 0)
    generation = (deployment.get("metadata") or {}).get("generation")
    observed = generation is None or st.get("observedGeneration", 0) >= generation
    progressing = find(st.get("conditions"), "Progressing")
    stuck = None
    if progressing and progressing.get("status") == "False" and progressing.get("reason") == "ProgressDeadlineExceeded":
        stuck = progressing.get("message") or "the rollout exceeded its progress deadline"
    rolled_out = observed and updated >= desired and replicas == updated
    return Rollout(desired=desired, replicas=replicas, updated=updated, ready=ready, available=available,
                   rolled_out=rolled_out, complete=rolled_out and available >= desired, stuck=stuck)


def compose(current: dict, *, generation: int, deployment: dict | None, package_condition=KEEP,
            problem=KEEP, timestamp: str | None = None) -> dict:
    """The full set of rollout-derived status fields and all four conditions.

    ``package_condition``: a fresh PackageAvailable condition, or KEEP the current one.
    ``problem``: (reason, message) of a reconcile problem, None when there is none, or KEEP the current one.
    """
    timestamp = timestamp or now()
    old = current.get("conditions") or []
    if package_condition is KEEP:
        package_condition = find(old, "PackageAvailable") or condition(
            "PackageAvailable", None, "Checking", "the package has not been checked yet", generation)
    if problem is KEEP:
        degraded = find(old, "Degraded")
        problem = ((degraded["reason"], degraded.get("message", ""))
                   if degraded and degraded.get("status") == "True" and degraded.get("reason") in RECONCILE_PROBLEMS
                   else None)
    pkg_ok = package_condition["status"] == "True"
    pkg_why = f"package unavailable: {package_condition.get('message', '')}"

    if deployment is None:
        why = problem or (("PackageUnavailable", pkg_why) if not pkg_ok else ("Pending", "no Deployment yet"))
        state = None
        ready = condition("Ready", False, why[0], why[1], generation)
        progressing = condition("Progressing", False, why[0], why[1], generation)
    else:
        state = rollout(deployment)
        counts = f"{state.available} of {state.desired} replicas available, {state.updated} updated"
        if state.desired == 0:
            ready = condition("Ready", False, "ScaledToZero", "0 replicas desired", generation)
        elif state.available >= 1:
            ready = condition("Ready", True, "Available", counts, generation)
        else:
            ready = condition("Ready", False, "NoReplicasReady", counts, generation)
        if state.stuck:
            progressing = condition("Progressing", False, "ProgressDeadlineExceeded", state.stuck, generation)
        elif not state.rolled_out:
            progressing = condition("Progressing", True, "RollingOut", counts, generation)
        elif not state.complete:
            progressing = condition("Progressing", True, "WaitingForReplicas", counts, generation)
        else:
            progressing = condition("Progressing", False, "RolloutComplete", counts, generation)

    if problem:
        degraded = condition("Degraded", True, problem[0], problem[1], generation)
    elif not pkg_ok:
        degraded = condition("Degraded", True, "PackageUnavailable", pkg_why, generation)
    elif state is not None and state.stuck:
        degraded = condition("Degraded", True, "ProgressDeadlineExceeded", state.stuck, generation)
    else:
        degraded = condition("Degraded", False, "AsExpected", "", generation)

    status: dict[str, Any] = {"conditions": merge_conditions(old, [ready, package_condition, progressing, degraded], timestamp)}
    if state is not None:
        status.update(replicas=state.replicas, readyReplicas=state.ready, updatedReplicas=state.updated)
    return status
