"""The task-level steps: the master's expansion and dispatch, and cancelling a task."""

from __future__ import annotations

from typing import Any

import redis

from nietest_daemon.coordination import counters
from nietest_daemon.core.logs import get_logger
from nietest_daemon.domain import taskspec
from nietest_daemon.domain.lifecycle import TERMINAL, Status
from nietest_daemon.domain.subtask import Lane
from nietest_daemon.pipeline import admission, notices
from nietest_daemon.pipeline.admission import queue_task
from nietest_daemon.pipeline.context import Context, context
from nietest_daemon.store import CancelOutcome

log = get_logger(__name__)

DISPATCH_BATCH = 1000


def process_task(task_id: str) -> None:
    """Expand a task into its subtasks (idempotently: ids derive from the task and the combination)
    and dispatch the pending ones."""
    ctx = context()
    doc = ctx.store.get_task(task_id)
    if doc is None:
        log.error("no such task; message dropped", task_id=task_id)
        return
    if doc["status"] in TERMINAL:
        return
    task = taskspec.Task.from_document(doc)
    first_run = ctx.store.mark_task_running(task_id)
    batch: list[dict[str, Any]] = []
    created = 0
    for spec in taskspec.expand(task):
        batch.append({"id": spec.subtask_id(task_id), **spec.as_dict()})
        if len(batch) >= DISPATCH_BATCH:
            created += ctx.store.insert_subtasks(task_id, batch)
            batch = []
    if batch:
        created += ctx.store.insert_subtasks(task_id, batch)
    # After the insert (see store/base.py): whichever order this and a cancel race in, no pending
    # subtask survives the cancel.
    if ctx.store.is_cancel_requested(task_id):
        cancel_task(ctx, task_id)
        return
    if first_run:
        notices.task_submitted(ctx, ctx.store.get_task(task_id) or doc)
    # The pending subtasks wait in the broker for a slot, fairly shared with the other tasks; only
    # admitted ones get a run message. Idempotent: a redelivered master rebuilds the same lines.
    waiting = queue_task(
        ctx, ctx.store.get_task(task_id) or doc, ctx.store.list_subtasks(task_id, status=Status.PENDING)
    )
    log.info(
        "task expanded",
        task_id=task_id,
        subtasks=task.total_subtasks,
        new=created,
        waiting={lane.value: n for lane, n in waiting.items() if n},
        priority=task.priority,
    )


def cancel_task(ctx: Context, task_id: str) -> CancelOutcome:
    """Cancel a task: its pending subtasks end `cancelled` (running jobs end at their next poll);
    its waiting line and its slots go at once, to the other tasks; the call that finalised the
    task sends its notice. No message per subtask."""
    outcome = ctx.store.cancel_task(task_id)
    if not outcome.found:
        return outcome
    if outcome.cancelled:
        # Counted under the task's API: the store does not say which lane each cancelled subtask had
        # (they differ only in a task that makes `is_lumina` a variable).
        inc = counters.Increments()
        api = Lane.of(outcome.task or ctx.store.get_task(task_id) or {}).value
        inc.count(counters.SUBTASKS_FINISHED, outcome.cancelled, api=api, outcome=Status.CANCELLED)
        try:
            counters.add_call(ctx.host, inc).run(ctx.redis)
        except redis.RedisError as exc:
            log.warning("could not count the cancelled subtasks in the metrics", task_id=task_id, error=str(exc))
    try:
        admission.cancel(ctx, task_id)
    except redis.RedisError as exc:  # the entries are dropped when admitted (their subtask is cancelled)
        log.warning("could not drop the task's waiting line", task_id=task_id, error=str(exc))
    if outcome.finalised and outcome.task is not None:
        notices.task_finished(ctx, outcome.task)
    return outcome
