"""The periodic sweep: nothing stays `processing` forever, and no finished task misses its notice.

Run by the master workers on a timer; a Redis lock lets one process sweep per round, across
every daemon on the broker.

Limit of the notice fallback: it looks at the 100 most recently created finished tasks, those that
ended 1 to 60 minutes ago (`notices.FINAL_NOTICE_WINDOW`). A retried old task whose finaliser (a
sweep's `finalise_task`, `nietest cancel`) died before enqueueing its notice is not among them: that
round may get no final notice.
"""

from __future__ import annotations

import threading
from datetime import timedelta

from nietest_daemon.coordination import keys
from nietest_daemon.core.backoff import DRIFT, jittered
from nietest_daemon.core.logs import get_logger
from nietest_daemon.core.settings import Settings
from nietest_daemon.domain.lifecycle import FAILED, TERMINAL
from nietest_daemon.domain.subtask import Subtask
from nietest_daemon.pipeline import admission, notices
from nietest_daemon.pipeline.context import Context, context
from nietest_daemon.pipeline.messages import schedule_poll, send_run
from nietest_daemon.pipeline.subtasks import MAX_ATTEMPTS, finish
from nietest_daemon.store import utcnow
from nietest_daemon.store.base import round_of

log = get_logger(__name__)


def stale_after(settings: Settings) -> float:
    """How long a processing subtask may go without progress before the sweep acts on it."""
    budget = max(
        settings.image_max_polling_attempts * settings.image_polling_interval,
        settings.lumina_max_polling_attempts * settings.lumina_polling_interval,
    )
    return max(300.0, 2 * budget)


def sweep(ctx: Context, *, older_than_seconds: float | None = None) -> dict[str, int]:
    """Resume (or fail) subtasks stuck in processing; finalise tasks whose finaliser died."""
    age = stale_after(ctx.settings) if older_than_seconds is None else older_than_seconds  # 0 means "all"
    cutoff = utcnow() - timedelta(seconds=age)
    resumed = failed = finalised = requeued = 0
    for doc in ctx.store.find_stale_subtasks(cutoff, limit=1000):
        sub = Subtask.from_doc(doc)
        if sub.attempts >= MAX_ATTEMPTS:
            finish(
                ctx,
                sub,
                FAILED,
                error=f"no progress after {sub.attempts} attempts; given up by the sweep",
                reason="interrupted",
            )
            failed += 1
        elif sub.job_uuid:
            schedule_poll(ctx, sub.id, sub.lane, delay=0)
            resumed += 1
        else:
            ctx.store.start_subtask(sub.id)  # counts the attempt and refreshes updated_at
            send_run(ctx, sub.id, sub.lane)
            resumed += 1
    for task in ctx.store.list_tasks(limit=100, status="processing"):
        if ctx.store.finalise_task(task["id"]):
            finalised += 1
            notices.task_finished(ctx, ctx.store.get_task(task["id"]) or task)
        elif admission.repair(ctx, task):
            requeued += 1
    for lane in ctx.schedulers:  # a slot freed by an expired lease, or by a release whose dispatch was lost
        admission.dispatch(ctx, lane)
    # A finaliser that died between the store update and the enqueue of the notice (a sweep, or
    # `nietest cancel`) leaves no message to redeliver: look at the tasks that ended lately. Only
    # the 100 finished tasks created last: a retried older task is not among them.
    now = utcnow()
    for task in ctx.store.list_tasks(limit=100, status=TERMINAL):
        ended = task.get("completed_at")
        if ended is not None and timedelta(seconds=60) < now - ended < notices.FINAL_NOTICE_WINDOW:
            notices.ensure_final(ctx, task["id"], round_of(task))
    if resumed or failed or finalised or requeued:
        log.warning("sweep acted", resumed=resumed, failed=failed, finalised_tasks=finalised, requeued_tasks=requeued)
    return {"resumed": resumed, "failed": failed, "finalised": finalised, "requeued": requeued}


def run_sweeper(stop: threading.Event, interval: float = 60.0) -> None:
    """In a master worker: sweep every `interval` s; a Redis lock lets one process do it per round."""
    while not stop.wait(jittered(interval, DRIFT)):
        try:
            ctx = context()
            if ctx.redis.set(keys.SWEEP_LOCK, "1", nx=True, ex=max(1, int(interval * 0.8))):
                sweep(ctx)
        except Exception:
            log.exception("sweep failed")
