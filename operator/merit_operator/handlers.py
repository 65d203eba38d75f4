"""kopf handlers: thin entry points onto OperatorContext.reconcile.

The daemon per MeritRun is the level-based loop: a round, then sleep until the next resync,
a backoff's end, or a wake-up. Create/update/resume are fast paths (a round at once, and a
wake-up for the daemon); Job events wake the owning run's daemon. Only here are our errors
translated into kopf's: an invalid spec is a PermanentError (kopf will not retry the handler
until the spec changes), an expected failure a TemporaryError with our backoff as its delay.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from meritrun import API_GROUP, API_VERSION
from meritrun.api import PLURAL

from .context import OperatorContext, api_config
from .manifests import ANNOTATION_PREFIX, FINALIZER, LABEL_RUN
from .reconcile import RoundOutcome
from .settings import Settings

log = logging.getLogger(__name__)
RESOURCE = (API_GROUP, API_VERSION, PLURAL)


@kopf.on.startup()
async def operator_started(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Progress and diff-base in annotations: the CRD's structural schema would prune kopf's
    # default `status.kopf` bookkeeping (and its handler results) on every write.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration")
    settings.persistence.finalizer = FINALIZER
    # Our own events say what happened; kopf's "handler succeeded" chatter stays in the log.
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = "meritrun-operator"
    settings.posting.event_name_prefix = "meritrun-"
    settings.watching.server_timeout = 600
    ctx = OperatorContext(memo.settings)
    ctx.serve_metrics()
    memo.ctx = ctx


@kopf.on.cleanup()
async def operator_stopping(memo: kopf.Memo, **_: Any) -> None:
    if getattr(memo, "ctx", None) is not None:
        memo.ctx.close()


@kopf.on.login()
def operator_login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    settings: Settings = memo.settings
    if not settings.kubeconfig:
        info = kopf.login_with_service_account(settings=kopf.OperatorSettings())
        if info is None:
            raise kopf.LoginError("no service account token: set MERITRUN_KUBECONFIG")
        return info
    config = api_config(settings)
    return kopf.ConnectionInfo(
        server=config.server, token=config.token, ca_data=config.ca_pem,
        certificate_data=config.cert_pem, private_key_data=config.key_pem,
        insecure=config.insecure, default_namespace=config.namespace)


def _post(outcome: RoundOutcome) -> None:
    if outcome.ref is None:
        return
    for event in outcome.events:
        kopf.event(outcome.ref, type=event.type, reason=event.reason, message=event.message)


async def _fast_path(handler: str, memo: kopf.Memo, namespace: str, name: str) -> None:
    ctx: OperatorContext = memo.ctx
    outcome = await ctx.reconcile(handler, namespace, name)
    _post(outcome)
    ctx.wake(namespace, name)  # the daemon re-plans its sleep around the new status
    if outcome.invalid:
        raise kopf.PermanentError(outcome.invalid)
    if outcome.error is not None:
        raise kopf.TemporaryError(str(outcome.error)[:300], delay=outcome.delay_seconds or 1.0)


@kopf.on.create(*RESOURCE)
async def meritrun_created(memo: kopf.Memo, namespace: str, name: str, **_: Any) -> None:
    await _fast_path("create", memo, namespace, name)


@kopf.on.update(*RESOURCE, field="spec")
async def meritrun_updated(memo: kopf.Memo, namespace: str, name: str, **_: Any) -> None:
    await _fast_path("update", memo, namespace, name)


@kopf.on.resume(*RESOURCE)
async def meritrun_resumed(memo: kopf.Memo, namespace: str, name: str, **_: Any) -> None:
    await _fast_path("resume", memo, namespace, name)


@kopf.daemon(*RESOURCE, cancellation_timeout=10.0)
async def meritrun_daemon(memo: kopf.Memo, namespace: str, name: str,
                          stopped: kopf.DaemonStopped, **_: Any) -> None:
    ctx: OperatorContext = memo.ctx
    waker = ctx.waker(namespace, name)
    while not stopped:
        waker.clear()
        outcome = await ctx.reconcile("daemon", namespace, name)
        if outcome.gone:
            return
        _post(outcome)
        woken = asyncio.ensure_future(waker.wait())
        stopping = asyncio.ensure_future(stopped.wait())
        try:
            await asyncio.wait({woken, stopping}, timeout=outcome.delay_seconds,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            stopping.cancel()


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_RUN: kopf.PRESENT})
async def stage_job_changed(memo: kopf.Memo, namespace: str, labels: dict[str, str],
                            **_: Any) -> None:
    memo.ctx.wake(namespace, labels[LABEL_RUN])


@kopf.on.delete(*RESOURCE)
async def meritrun_deleted(memo: kopf.Memo, namespace: str, name: str, body: kopf.Body,
                           logger: logging.Logger, **_: Any) -> None:
    ctx: OperatorContext = memo.ctx
    try:
        with ctx.metrics.round("delete"):
            deleted = await ctx.blocking(ctx.reconciler.cleanup, dict(body))
    except Exception as e:  # noqa: BLE001 - the finalizer stays until cleanup succeeds
        raise kopf.TemporaryError(f"cleanup failed: {str(e)[:300]}", delay=5.0) from e
    ctx.forget(namespace, name)
    logger.info("deleted %d child objects", deleted)
