"""The e2e script's deletion step (e2e/run_e2e.py) against the emulated cluster with the real operator:
kubectl talks to the emulator, the operator creates the children, the garbage collector removes them. The
step must pass only when the children it saw before the deletion are gone, and fail when there were none
to see go or one stays."""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
from lsm_harness import (
    DEPLOYMENTS,
    LSM,
    NAMESPACE,
    PDBS,
    SERVICES,
    apply_model,
    condition,
    create_object,
    delete_object,
    eventually,
)

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


@pytest.fixture(scope="module")
def run_e2e():
    spec = importlib.util.spec_from_file_location("run_e2e", Path(__file__).resolve().parents[2] / "e2e" / "run_e2e.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_e2e"] = module
    spec.loader.exec_module(module)
    return module


def e2e_runner(run_e2e, **overrides):
    args = run_e2e.parse_args(["--namespace", NAMESPACE, "--delete-timeout", "15"])
    vars(args).update(overrides)
    return run_e2e.E2E(args)


async def step(runner) -> str:
    """The step in a thread: kubectl blocks, and the emulator answers on this event loop."""
    return await asyncio.to_thread(runner.delete)


async def test_the_deletion_step_sees_each_recorded_child_go(cluster, registry, operator, run_e2e):
    lsm = await apply_model(cluster, run_e2e.MODEL, {"package": {"name": "alice"}})
    for kind in (DEPLOYMENTS, SERVICES, PDBS):
        await eventually(lambda kind=kind: cluster.get(kind, run_e2e.MODEL), what=kind.plural)
    # What the step records, from the API's own answers.
    runner = e2e_runner(run_e2e)
    listings = await asyncio.to_thread(runner.child_listings)
    recorded = run_e2e.owned_children(lsm["metadata"]["uid"], listings)
    assert recorded == {("deployments", "demo"), ("services", "demo"), ("poddisruptionbudgets", "demo")}
    assert run_e2e.still_present(recorded, listings) == recorded
    assert run_e2e.owned_children("some-other-uid", listings) == set()

    detail = await step(runner)
    assert "deployments/demo" in detail and "services/demo" in detail
    assert all(cluster.get(kind, run_e2e.MODEL) is None for kind in (DEPLOYMENTS, SERVICES, PDBS))


async def test_the_deletion_step_fails_when_there_were_no_children(cluster, registry, operator, run_e2e):
    """The model exists but its package is unknown: the operator creates nothing, so the old check (no
    children left afterwards) passed; now the step says there was nothing to see go."""
    await apply_model(cluster, run_e2e.MODEL, {"package": {"name": "nobody"}})
    await eventually(lambda: (c := condition(cluster.get(LSM, run_e2e.MODEL), "PackageAvailable"))
                     and c["status"] == "False", what="the operator to report the package unavailable")
    assert cluster.get(DEPLOYMENTS, run_e2e.MODEL) is None  # reconciled, and nothing created
    with pytest.raises(run_e2e.StepFailed, match="owns no deployments or services"):
        await step(e2e_runner(run_e2e))


async def test_the_deletion_step_fails_without_a_model(cluster, operator_env, run_e2e):
    with pytest.raises(run_e2e.StepFailed):
        await step(e2e_runner(run_e2e))


async def test_the_deletion_step_fails_when_a_child_stays(cluster, registry, operator, run_e2e):
    await apply_model(cluster, run_e2e.MODEL, {"package": {"name": "alice"}})
    await eventually(lambda: cluster.get(SERVICES, run_e2e.MODEL), what="the Service")
    await eventually(lambda: cluster.get(DEPLOYMENTS, run_e2e.MODEL), what="the Deployment")
    runner = e2e_runner(run_e2e, delete_timeout=3)

    async def replace_the_service():
        """Something recreates the Service under the same name once the garbage collector took it."""
        await eventually(lambda: cluster.get(SERVICES, run_e2e.MODEL) is None, timeout=45, what="the Service gone")
        await create_object(cluster, SERVICES, {"apiVersion": "v1", "kind": "Service",
                                                "metadata": {"name": run_e2e.MODEL},
                                                "spec": {"ports": [{"port": 80}]}})
    replacer = asyncio.create_task(replace_the_service())
    with pytest.raises(run_e2e.StepFailed, match="still there: services/demo"):
        await step(runner)
    await replacer
    await delete_object(cluster, SERVICES, run_e2e.MODEL)


def test_the_pure_checks_on_listings(run_e2e):
    owned = {"metadata": {"name": "demo", "ownerReferences": [{"uid": "u1"}]}}
    stranger = {"metadata": {"name": "other"}}
    listings = {"deployments": {"items": [owned]}, "services": {"items": [stranger]}}
    recorded = run_e2e.owned_children("u1", listings)
    assert recorded == {("deployments", "demo")}
    assert run_e2e.missing_kinds(recorded) == ["services"]
    assert run_e2e.still_present(recorded, {"deployments": {"items": []}, "services": {"items": None}}) == set()
