"""kopf handlers: thin entry points onto OperatorContext.reconcile.

Every round reads the run from `body`, kopf's live view of it (kept fresh by kopf's watch),
not with a GET. The daemon per MeritRun is the level-based loop: a round (its first as soon
as kopf sees the run: a new run, or every run after a restart), then sleep until the next
resync, a backoff's end, or a wake-up. A spec edit (a new generation) runs a round at once
(`meritrun_changed`; the daemon then re-plans its sleep without a round of its own); Job
events (`jobwatch`, filtered by the API server) wake the owning run's daemon, which waits
`wake_debounce_seconds` for the burst to settle and then runs one round for all of it.
kopf's own change detection is off (`NoDiffBase`): it would write an annotation per
creation and per edit. Errors never reach kopf from a round: an invalid spec is a status
the pipeline writes, an expected failure a backoff the daemon sleeps (a failure in a commit,
after the round, wakes the run again after the backoff: `OperatorContext._committed`); only
the finalizer's handler raises kopf's TemporaryError, to keep the finalizer until cleanup
succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, timezone
from typing import Any

import kopf

from meritrun import API_GROUP, API_VERSION
from meritrun.api import PLURAL
from meritrun.pipeline import Event

from .context import OperatorContext, api_config
from .login import connection_info
from .manifests import ANNOTATION_PREFIX, FINALIZER
from .reconcile import RoundOutcome

log = logging.getLogger(__name__)
RESOURCE = (API_GROUP, API_VERSION, PLURAL)


@kopf.on.startup()
async def operator_started(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Progress (of the finalizer's handler) in annotations: the CRD's structural schema would
    # prune kopf's default `status.kopf` bookkeeping on every write. No diff-base: nothing
    # here needs kopf's change detection (`NoDiffBase`).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.persistence.finalizer = FINALIZER
    # Our own events say what happened; kopf's "handler succeeded" chatter stays in the log.
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = "meritrun-operator"
    settings.posting.event_name_prefix = "meritrun-"
    settings.watching.server_timeout = 600
    if memo.settings.namespaces:
        # Serving named namespaces needs no cluster-wide watch of namespaces and CRDs: the
        # resources are found once at startup, and the install holds no cluster-scoped RBAC.
        settings.scanning.disabled = True
    ctx = OperatorContext(memo.settings)
    ctx.serve_metrics()
    ctx.watch_jobs()  # Job changes wake their run's daemon (server-side label filter)
    memo.ctx = ctx


@kopf.on.cleanup()
async def operator_stopping(memo: kopf.Memo, **_: Any) -> None:
    for task in list(_posting):  # events of commits still running: the next operator's
        task.cancel()  # rounds post their own
    if getattr(memo, "ctx", None) is not None:
        memo.ctx.close()


@kopf.on.login()
def operator_login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    return connection_info(api_config(memo.settings), now=datetime.now(timezone.utc),
                           reread_seconds=memo.settings.token_reread_seconds)


EVENT_MESSAGE_CHARS = 1000


def merged_events(events: tuple[Event, ...]) -> list[Event]:
    """A round's events with one per (type, reason): a run of K partitions creates K Jobs
    in one round, and K `JobCreated` events would be K more API calls competing with the
    Jobs themselves. The messages are joined ("; ") in order, cut at 1000 characters with a
    count of what was left out (client-go's recorder aggregates similar events likewise)."""
    grouped: dict[tuple[str, str], list[str]] = {}
    for event in events:
        grouped.setdefault((event.type, event.reason), []).append(event.message)
    out = []
    for (kind, reason), messages in grouped.items():
        text, shown = messages[0], 1
        while shown < len(messages) and len(text) + 2 + len(messages[shown]) <= (
                EVENT_MESSAGE_CHARS - 20):
            text, shown = f"{text}; {messages[shown]}", shown + 1
        if shown < len(messages):
            text += f"; and {len(messages) - shown} more"
        out.append(Event(kind, reason, text))  # type: ignore[arg-type]
    return out


_posting: set[asyncio.Future[None]] = set()  # posts waiting for their round's commit


def _post(outcome: RoundOutcome) -> None:
    """The round's events, once its commit has ended: a `JobCreated` is posted when its Job
    exists (or its creation failed and the next round tries again), and a round's Events
    do not compete with its own Job creations for the API server."""
    if outcome.ref is None or not outcome.events:
        return
    task = asyncio.ensure_future(_post_after(outcome))  # in this context: kopf's settings
    _posting.add(task)
    task.add_done_callback(_posting.discard)


async def _post_after(outcome: RoundOutcome) -> None:
    if outcome.commit is not None:
        with contextlib.suppress(Exception):  # a failed commit is reported by the context
            await asyncio.wrap_future(outcome.commit)
    for event in merged_events(outcome.events):
        kopf.event(outcome.ref, type=event.type, reason=event.reason, message=event.message)


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf's change detection, off: no create/update/resume handler needs it (the daemon's
    first round serves a new run and every run after a restart; `meritrun_changed` compares
    generations itself), so kopf stores no last-handled configuration (an annotation patch
    per creation and per spec edit, each a write to the API server) and copies no body per
    event to compare. Every event is then "no change" to kopf, but a deletion, which the
    finalizer handler still serves."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> Any:
        return {}

    def fetch(self, *, body: kopf.Body) -> Any:
        return {}

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: Any) -> None:
        return None


@kopf.on.event(*RESOURCE)
async def meritrun_changed(memo: kopf.Memo, event: dict[str, Any], namespace: str, name: str,
                           body: kopf.Body, **_: Any) -> None:
    """A spec edit (a new generation; our status writes make none) runs a round at once; the
    daemon then re-plans its sleep from it, a failed round's backoff included. A new run
    needs none: its daemon starts with a round."""
    ctx: OperatorContext = memo.ctx
    generation = (body.get("metadata") or {}).get("generation")
    if event.get("type") == "DELETED" or not ctx.new_generation(namespace, name, generation):
        return
    outcome = await ctx.reconcile("update", namespace, name, ctx.request(namespace, name),
                                  body=body)
    _post(outcome)
    ctx.replan(namespace, name)


@kopf.daemon(*RESOURCE, cancellation_timeout=10.0)
async def meritrun_daemon(memo: kopf.Memo, namespace: str, name: str, body: kopf.Body,
                          stopped: kopf.DaemonStopped, **_: Any) -> None:
    ctx: OperatorContext = memo.ctx
    waker = ctx.waker(namespace, name)
    ticket = ctx.request(namespace, name)  # a round of its own to begin with
    while not stopped:
        waker.clear()
        outcome = await ctx.reconcile("daemon", namespace, name, ticket, body=body)
        if outcome.gone:
            return
        _post(outcome)
        if await _sleep(waker, stopped, outcome.delay_seconds):
            # Woken (a Job event, a fast path's round): let the burst settle, then one
            # round for all of it, or none if a fast path's round already covered it.
            await _sleep(None, stopped, ctx.settings.wake_debounce_seconds)
            ticket = ctx.requested(namespace, name)
        else:  # resync, a backoff's end or a deadline: a fresh round
            ticket = ctx.request(namespace, name)


async def _sleep(waker: asyncio.Event | None, stopped: kopf.DaemonStopped,
                 seconds: float | None) -> bool:
    """Sleep until the waker is set (True), the daemon is stopped, or the time is up."""
    woken = asyncio.ensure_future(waker.wait() if waker else asyncio.Event().wait())
    stopping = asyncio.ensure_future(stopped.wait())
    try:
        await asyncio.wait({woken, stopping}, timeout=seconds,
                           return_when=asyncio.FIRST_COMPLETED)
        return woken.done() and not woken.cancelled()
    finally:
        woken.cancel()
        stopping.cancel()


@kopf.on.delete(*RESOURCE)
async def meritrun_deleted(memo: kopf.Memo, namespace: str, name: str, body: kopf.Body,
                           logger: logging.Logger, **_: Any) -> None:
    ctx: OperatorContext = memo.ctx
    try:
        deleted = await ctx.cleanup(namespace, name, dict(body))
    except Exception as e:  # noqa: BLE001 - the finalizer stays until cleanup succeeds
        raise kopf.TemporaryError(f"cleanup failed: {str(e)[:300]}", delay=5.0) from e
    ctx.forget(namespace, name)
    logger.info("deleted %d child objects", deleted)
