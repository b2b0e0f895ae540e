"""The operator's entry point: ``kopf run --module=lipsync_operator.handlers`` (the chart and the image run it).

Importing this module registers the kopf handlers below; nothing else in the package registers any, so
``lipsync_operator.placement`` and the rest import without side effects (``lipsync bench pool`` does).
The handlers delegate to the model controller (lipsync_operator.reconcile) and the pool controller
(lipsync_operator.pool), both built at startup from the ``LIPSYNC_OPERATOR_*`` settings.

- create / update / resume (operator start): reconcile; an unavailable package or a conflicting child is
  retried with exponential backoff (kopf.TemporaryError), an invalid spec waits for the next change.
  Any change re-reconciles, annotations included: ``kubectl annotate lsm NAME synctalk.io/reconcile=$(date +%s)``
  re-checks the registry (an unpinned version then follows the newest one).
- Deployment events: the owner's status follows the rollout.
- A deleted child (Deployment, Service, HPA, PDB, PodMonitor) is recreated at once.
- Deletion needs no handler and no finalizer: the children carry owner references and the garbage
  collector removes them; deleting a LipSyncModel never waits for the operator.
- LipSyncPools: create / update / resume apply the pool's Deployment, HPA and PDB; a daemon per pool runs
  its placement rounds (lipsync_operator.pool), which load pooled models onto the pool's pods.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import urlsplit

import kopf

from lipsync_operator.children import MANAGED_BY_LABEL
from lipsync_operator.config import FINALIZER, GROUP, OPERATOR_NAME, PLURAL, VERSION, OperatorConfig
from lipsync_operator.kube import KubeClient
from lipsync_operator.owners import controller_owner
from lipsync_operator.pool import PoolController
from lipsync_operator.reconcile import GiveUp, Reconciler, RetryLater
from lipsync_operator.spec import InvalidSpec

POOL_PLURAL = "lipsyncpools"
OWNED = {MANAGED_BY_LABEL: OPERATOR_NAME}
STORAGE_PREFIX = f"operator.{GROUP}"
CHILD_RESOURCES = [("apps", "v1", "deployments"), ("", "v1", "services"),
                   ("autoscaling", "v2", "horizontalpodautoscalers"), ("policy", "v1", "poddisruptionbudgets"),
                   ("monitoring.coreos.com", "v1", "podmonitors")]


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    # Progress and the diff base live in annotations: the API server prunes unknown status fields. kopf
    # ignores every annotation under its prefix, so it is not synctalk.io/ (synctalk.io/reconcile is the
    # user's way to ask for a reconcile).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=STORAGE_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=STORAGE_PREFIX, key="last-handled-configuration")
    settings.persistence.finalizer = FINALIZER      # none is needed today; named ours if one ever is
    # The handlers post their own Kubernetes events (kubectl describe lsm); kopf's log lines are not events.
    settings.posting.level = logging.INFO
    settings.posting.loggers = False
    settings.watching.server_timeout = 300          # re-list now and then: robust against lost watch events
    settings.watching.client_timeout = 330
    config = OperatorConfig.from_env()
    kube = KubeClient.from_environment(timeout_s=config.api_timeout_seconds)
    memo.reconciler = Reconciler(kube, config)
    memo.pools = PoolController(kube, config)
    # the Redis host only: the chart's default URL carries the password
    redis_host = urlsplit(config.default_redis_url).hostname if config.default_redis_url else None
    logger.info("lipsync-operator: registry=%r image=%r redis host=%r; allowed registries: %s; allowed images: %s; "
                "node store root: %s", config.registry_url or None, config.inference_image, redis_host,
                config.registry_policy().describe(), config.image_policy().describe(),
                config.node_store_root or "none (runtime.nodeStore refused)")


@kopf.on.cleanup()
def close(memo: kopf.Memo, **_: Any) -> None:
    reconciler = getattr(memo, "reconciler", None)
    if reconciler is not None:
        reconciler.kube.close()


@kopf.on.resume(group=GROUP, version=VERSION, plural=PLURAL)
@kopf.on.create(group=GROUP, version=VERSION, plural=PLURAL)
@kopf.on.update(group=GROUP, version=VERSION, plural=PLURAL)
def reconcile_model(body: kopf.Body, retry: int, memo: kopf.Memo, **_: Any) -> None:
    try:
        summary = memo.reconciler.reconcile(_plain(body), retry=retry)
    except RetryLater as exc:
        kopf.warn(body, reason=exc.reason, message=str(exc))
        raise kopf.TemporaryError(str(exc), delay=exc.delay) from None
    except GiveUp as exc:
        kopf.warn(body, reason=exc.reason, message=str(exc))
        raise kopf.PermanentError(str(exc)) from None
    if summary:
        kopf.info(body, reason="Reconciled", message=summary)


@kopf.on.event("apps", "v1", "deployments", labels=OWNED, when=lambda event, **_: event.get("type") != "DELETED")
def deployment_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    owner = controller_owner(_plain(body))
    if owner is not None:
        memo.reconciler.sync_status(body.metadata.namespace, owner["name"], owner["uid"], _plain(body))


def _child_deleted(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    owner = controller_owner(_plain(body))
    if owner is None:
        return
    try:
        if memo.reconciler.heal(body.metadata.namespace, owner["name"], owner["uid"]):
            logger.info("recreated %s %s", body.get("kind"), body.metadata.name)
    except (RetryLater, GiveUp) as exc:
        logger.warning("recreating %s: %s", body.metadata.name, exc)


for _group, _version, _plural in CHILD_RESOURCES:
    kopf.on.event(_group, _version, _plural, labels=OWNED, id=f"{_plural}_deleted",
                  when=lambda event, **_: event.get("type") == "DELETED")(_child_deleted)


# ------------------------------------------------------------------------------------- LipSyncPools


@kopf.on.resume(group=GROUP, version=VERSION, plural=POOL_PLURAL)
@kopf.on.create(group=GROUP, version=VERSION, plural=POOL_PLURAL)
@kopf.on.update(group=GROUP, version=VERSION, plural=POOL_PLURAL)
def reconcile_pool(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    try:
        summary = memo.pools.reconcile(_plain(body))
    except InvalidSpec as exc:
        kopf.warn(body, reason="InvalidSpec", message=str(exc))
        raise kopf.PermanentError(f"invalid spec: {exc}") from None
    if summary:
        kopf.info(body, reason="Reconciled", message=summary)


@kopf.daemon(group=GROUP, version=VERSION, plural=POOL_PLURAL, cancellation_timeout=5.0)
async def place_pool(body: kopf.Body, memo: kopf.Memo, stopped: kopf.DaemonStopped, logger: kopf.Logger,
                     **_: Any) -> None:
    """Each pool's placement rounds, one after another, until the pool goes (or the operator stops).

    An async daemon whose rounds run in a thread: when the operator stops, kopf cancels the task at once
    (a sync daemon's thread could outlive the operator's loop), and only a round already running finishes."""
    pools = memo.pools
    namespace, name = body.metadata.namespace, body.metadata.name
    while not stopped:
        try:
            await asyncio.to_thread(pools.run_round, namespace, name)
        except Exception as exc:   # one failed round (API or pod trouble) must not end the pool's rounds
            logger.warning("pool %s/%s: placement round failed: %s", namespace, name, exc)
        await stopped.wait(pools.config.pool_interval_seconds)


def _plain(body: kopf.Body) -> dict[str, Any]:
    """kopf's live body view as a plain dict snapshot."""
    return {key: _thaw(value) for key, value in body.items()}


def _thaw(value: Any) -> Any:
    if hasattr(value, "items"):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_thaw(v) for v in value]
    return value
