"""Status composition from the Deployment's rollout, the package check and reconcile problems."""

from __future__ import annotations

from lipsync_operator.status import KEEP, compose, condition, find

OK = condition("PackageAvailable", True, "Verified", "listed", 1)
MISSING = condition("PackageAvailable", False, "VersionNotFound", "no version 9", 1)


def deployment(desired=2, replicas=2, updated=2, ready=2, available=2, generation=1, observed=1, stuck=False):
    conditions = [{"type": "Progressing", "status": "False" if stuck else "True",
                   "reason": "ProgressDeadlineExceeded" if stuck else "NewReplicaSetAvailable",
                   "message": "timed out"}]
    return {"metadata": {"generation": generation}, "spec": {"replicas": desired},
            "status": {"observedGeneration": observed, "replicas": replicas, "updatedReplicas": updated,
                       "readyReplicas": ready, "availableReplicas": available, "conditions": conditions}}


def states(status: dict) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_a_complete_rollout():
    st = compose({}, generation=1, deployment=deployment(), package_condition=OK, problem=None)
    assert states(st) == {"Ready": ("True", "Available"), "PackageAvailable": ("True", "Verified"),
                          "Progressing": ("False", "RolloutComplete"), "Degraded": ("False", "AsExpected")}
    assert (st["replicas"], st["readyReplicas"], st["updatedReplicas"]) == (2, 2, 2)
    assert [c["type"] for c in st["conditions"]] == ["Ready", "PackageAvailable", "Progressing", "Degraded"]


def test_rolling_out_while_old_pods_serve():
    st = compose({}, generation=2, deployment=deployment(replicas=3, updated=1, available=2, generation=2,
                                                         observed=2), package_condition=OK, problem=None)
    assert states(st)["Progressing"] == ("True", "RollingOut")
    assert states(st)["Ready"] == ("True", "Available")


def test_a_deployment_not_yet_observed_is_rolling_out():
    st = compose({}, generation=1, deployment=deployment(generation=3, observed=2), package_condition=OK,
                 problem=None)
    assert states(st)["Progressing"] == ("True", "RollingOut")


def test_new_pods_starting_after_a_scale_up():
    st = compose({}, generation=1, deployment=deployment(desired=4, replicas=4, updated=4, ready=2, available=2),
                 package_condition=OK, problem=None)
    assert states(st)["Progressing"] == ("True", "WaitingForReplicas")
    assert states(st)["Degraded"] == ("False", "AsExpected")


def test_a_stuck_rollout_is_degraded():
    st = compose({}, generation=1, deployment=deployment(updated=1, available=0, ready=0, stuck=True),
                 package_condition=OK, problem=None)
    assert states(st)["Progressing"] == ("False", "ProgressDeadlineExceeded")
    assert states(st)["Degraded"] == ("True", "ProgressDeadlineExceeded")
    assert states(st)["Ready"] == ("False", "NoReplicasReady")


def test_scaled_to_zero():
    st = compose({}, generation=1, deployment=deployment(desired=0, replicas=0, updated=0, ready=0, available=0),
                 package_condition=OK, problem=None)
    assert states(st)["Ready"] == ("False", "ScaledToZero")


def test_no_package_no_deployment():
    st = compose({}, generation=1, deployment=None, package_condition=MISSING, problem=None)
    assert states(st)["Ready"] == ("False", "PackageUnavailable")
    assert states(st)["Degraded"] == ("True", "PackageUnavailable")
    assert "no version 9" in find(st["conditions"], "Degraded")["message"]
    assert "replicas" not in st


def test_the_deployment_watcher_keeps_what_only_a_reconcile_knows():
    first = compose({}, generation=1, deployment=None, package_condition=OK,
                    problem=("ChildConflict", "Service alice is not ours"))
    later = compose(first, generation=1, deployment=deployment(), package_condition=KEEP, problem=KEEP)
    assert states(later)["Degraded"] == ("True", "ChildConflict")
    assert states(later)["PackageAvailable"] == ("True", "Verified")
    cleared = compose(later, generation=1, deployment=deployment(), package_condition=OK, problem=None)
    assert states(cleared)["Degraded"] == ("False", "AsExpected")


def test_transition_times_move_only_on_a_status_change():
    first = compose({}, generation=1, deployment=deployment(available=0, ready=0), package_condition=OK,
                    problem=None, timestamp="2030-01-01T00:00:00Z")
    same = compose(first, generation=1, deployment=deployment(available=0, ready=0), package_condition=OK,
                   problem=None, timestamp="2030-01-01T00:05:00Z")
    ready = compose(same, generation=1, deployment=deployment(), package_condition=OK, problem=None,
                    timestamp="2030-01-01T00:09:00Z")
    times = {c["type"]: c["lastTransitionTime"] for c in ready["conditions"]}
    assert times["Ready"] == "2030-01-01T00:09:00Z"              # False -> True
    assert times["PackageAvailable"] == "2030-01-01T00:00:00Z"   # unchanged since the first
