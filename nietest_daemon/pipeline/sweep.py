"""The periodic sweep: nothing stays `processing` forever, and no finished task misses its notice.

It also repairs lost counts (`Store.repair_counts`): a finish whose increment never landed (its
process died between the subtask's write and the task's, with MongoDB) leaves the task short and
`processing` for ever; once the task has been still for `REPAIR_GRACE_SECONDS` (5 minutes), its
counters are set to the recount and it is finalised, with its final notice, within a sweep or two.

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
from nietest_daemon.domain.lifecycle import TERMINAL, Status
from nietest_daemon.domain.subtask import Subtask
from nietest_daemon.pipeline import admission, notices
from nietest_daemon.pipeline.context import Context, context
from nietest_daemon.pipeline.messages import schedule_poll, send_run
from nietest_daemon.pipeline.subtasks import MAX_ATTEMPTS, finish
from nietest_daemon.store import utcnow
from nietest_daemon.store.base import REPAIR_GRACE_SECONDS, round_of

log = get_logger(__name__)


def stale_after(settings: Settings) -> float:
    """How long a processing subtask may go without progress before the sweep acts on it."""
    budget = max(
        settings.image_max_polling_attempts * settings.image_polling_interval,
        settings.lumina_max_polling_attempts * settings.lumina_polling_interval,
    )
    return max(300.0, 2 * budget)


def sweep(
    ctx: Context, *, older_than_seconds: float | None = None, repair_after_seconds: float = REPAIR_GRACE_SECONDS
) -> dict[str, int]:
    """Resume (or fail) subtasks stuck in processing; finalise tasks whose finaliser died; repair
    the counters of tasks still for `repair_after_seconds` that a lost increment left short."""
    age = stale_after(ctx.settings) if older_than_seconds is None else older_than_seconds  # 0 means "all"
    cutoff = utcnow() - timedelta(seconds=age)
    resumed = failed = finalised = requeued = repaired = 0
    for doc in ctx.store.find_stale_subtasks(cutoff, limit=1000):
        sub = Subtask.from_doc(doc)
        if sub.attempts >= MAX_ATTEMPTS:
            finish(
                ctx,
                sub,
                Status.FAILED,
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
    for repair in ctx.store.repair_counts(utcnow() - timedelta(seconds=repair_after_seconds)):
        repaired += 1
        log.warning(
            "task counters repaired: a finish's increment was lost",
            task_id=repair.task_id,
            before=repair.before,
            after=repair.after,
            finalised=repair.finalised,
        )
        if repair.finalised and repair.task is not None:  # the one call that finalised it: the notice
            notices.task_finished(ctx, repair.task)
    for task in ctx.store.list_tasks(limit=100, status=Status.PROCESSING):
        if ctx.store.finalise_task(task["id"]):
            finalised += 1
            notices.task_finished(ctx, ctx.store.get_task(task["id"]) or task)
        elif admission.repair(ctx, task):
            requeued += 1
    for lane, slots in ctx.schedulers.items():
        slots.drop_retired_keys()  # left by a version before owners (its ready lists: admission.repair)
        admission.dispatch(ctx, lane)  # a slot freed by an expired lease, or by a release whose dispatch was lost
    # A finaliser that died between the store update and the enqueue of the notice (a sweep, or
    # `nietest cancel`) leaves no message to redeliver: look at the tasks that ended lately. Only
    # the 100 finished tasks created last: a retried older task is not among them.
    now = utcnow()
    for task in ctx.store.list_tasks(limit=100, status=TERMINAL):
        ended = task.get("completed_at")
        if ended is not None and timedelta(seconds=60) < now - ended < notices.FINAL_NOTICE_WINDOW:
            notices.ensure_final(ctx, task["id"], round_of(task))
    if resumed or failed or finalised or requeued or repaired:
        log.warning(
            "sweep acted",
            resumed=resumed,
            failed=failed,
            finalised_tasks=finalised,
            requeued_tasks=requeued,
            repaired_tasks=repaired,
        )
    return {"resumed": resumed, "failed": failed, "finalised": finalised, "requeued": requeued, "repaired": repaired}


def run_sweeper(stop: threading.Event, interval: float = 60.0) -> None:
    """In a master worker: sweep every `interval` s; a Redis lock lets one process do it per round."""
    while not stop.wait(jittered(interval, DRIFT)):
        try:
            ctx = context()
            if ctx.redis.set(keys.SWEEP_LOCK, "1", nx=True, ex=max(1, int(interval * 0.8))):
                sweep(ctx)
        except Exception:
            log.exception("sweep failed")
