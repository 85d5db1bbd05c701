"""Task notices to the Feishu task bot : one message per task event, never per subtask.

The party that causes an event (the master's first run: `submitted`; the call that finalised
the task: `completed`, `partially_completed`, `failed` or `cancelled`) enqueues a `send_notice`
message on the master queue. A task run again (`nietest retry`) is finalised once more: each
round (the task's `round`) has its own final notice, told apart by the round in its marker.
That message survives a worker crash (it lives in the broker), a
Redis marker keeps a redelivered one from posting twice, and a webhook that is down costs one
bounded attempt: the notice is logged with its content and never fails a task.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nietest_daemon.coordination import keys
from nietest_daemon.core.logs import get_logger
from nietest_daemon.domain.status import CANCELLED, COMPLETED, FAILED, is_partial
from nietest_daemon.pipeline.messages import SEND_NOTICE, enqueue, owner_of_current_message
from nietest_daemon.store.base import round_of

if TYPE_CHECKING:
    from nietest_daemon.pipeline.context import Context

log = get_logger(__name__)

MARKER_TTL_SECONDS = 7 * 86400
SEVERITY = {
    "submitted": "info",
    "completed": "success",
    "partially_completed": "warning",
    "failed": "critical",
    "cancelled": "warning",
}
TITLES = {
    "submitted": "Task submitted",
    "completed": "Task completed",
    "partially_completed": "Task partially completed",
    "failed": "Task failed",
    "cancelled": "Task cancelled",
}


def final_event(task: dict[str, Any]) -> str:
    if task.get("status") == COMPLETED:
        return "partially_completed" if is_partial(task) else "completed"
    return {FAILED: "failed", CANCELLED: "cancelled"}.get(task.get("status"), "completed")


def _enqueue(ctx: Context, task: dict[str, Any], event: str) -> None:
    # The round only from the second on: the first round's message is what it always was.
    rounds = (round_of(task),) if round_of(task) > 1 else ()
    enqueue(SEND_NOTICE, ctx.settings.queue("master").name, task["id"], event, *rounds)


def task_submitted(ctx: Context, task: dict[str, Any]) -> None:
    _enqueue(ctx, task, "submitted")


def task_finished(ctx: Context, task: dict[str, Any]) -> None:
    _enqueue(ctx, task, final_event(task))
    ctx.redis.set(keys.notice_final_queued(task["id"]), "1", ex=MARKER_TTL_SECONDS)


def ensure_final(ctx: Context, task_id: str) -> None:
    """Enqueue the final notice of a terminal task if nobody did.

    Called when a message finds its subtask already terminal: the process that finalised the task
    may have died between the store update and the enqueue, and this redelivered message is the
    only trace left of it. A notice enqueued twice still posts once (`deliver` checks its marker).
    """
    if ctx.redis.exists(keys.notice_final_queued(task_id)):
        return
    task = ctx.store.get_task(task_id)
    if task is not None and task.get("status") in (COMPLETED, FAILED, CANCELLED):
        log.warning("final task notice was never enqueued; enqueuing it now", task_id=task_id)
        task_finished(ctx, task)


def next_round(ctx: Context, task_id: str) -> None:
    """Called by a retry before the task is reopened: the ending round's final notice is enqueued
    if nobody did (the round-stamped marker keeps it from posting twice), then the marker that says
    so is dropped, so that the next round's finaliser, or `ensure_final`, speaks for that round."""
    ensure_final(ctx, task_id)
    ctx.redis.delete(keys.notice_final_queued(task_id))


def link(ctx: Context, task_id: str) -> str | None:
    base = ctx.settings.frontend_base_url
    return f"{base.rstrip('/')}/tasks/{task_id}" if base else None


def card_lines(ctx: Context, task: dict[str, Any], event: str, round: int | None = None) -> list[str]:
    round = round_of(task) if round is None else round
    total = int(task.get("total_images") or 0)
    lines = [f"**{task.get('name')}**", f"task id: {task['id']}"]
    if event == "submitted":
        lines.append(f"images: {total}")
    else:
        if round > 1:
            lines.append(f"round {round}: the failed or cancelled images ran again (`nietest retry`)")
        lines.append(
            f"completed {task.get('completed_images', 0)} · failed {task.get('failed_images', 0)} · "
            f"cancelled {task.get('cancelled_images', 0)} of {total}"
        )
        if task.get("error"):
            lines.append(f"note: {task['error']}")
    url = link(ctx, task["id"])
    if url:
        lines.append(f"[open in the front end]({url})")
    return lines


def deliver(ctx: Context, task_id: str, event: str, round: int = 1) -> None:
    """Post one task notice (the body of the `send_notice` actor); at most once per task, round and event."""
    # The marker is claimed with this message's id before the post: a second message for the same
    # notice (enqueued twice) skips it, while a redelivery of this very message (its process died
    # mid-post) may post again.
    marker = keys.notice(task_id, event, round)
    claim = f"sending:{owner_of_current_message()}"
    if not ctx.redis.set(marker, claim, nx=True, ex=MARKER_TTL_SECONDS):
        held = ctx.redis.get(marker)
        if held is None or held.decode() != claim:
            return
    task = ctx.store.get_task(task_id)
    if task is None:
        log.error("notice for an unknown task dropped", task_id=task_id, notice=event)
        return
    lines = card_lines(ctx, task, event, round)
    result = ctx.notifier.send_card(TITLES.get(event, event), lines, SEVERITY.get(event, "info"))
    ctx.redis.set(marker, "sent", ex=MARKER_TTL_SECONDS)
    if result.delivered:
        log.info("task notice sent", task_id=task_id, notice=event)
    elif not result.skipped:
        log.error("task notice not delivered", task_id=task_id, notice=event, error=result.error, content=lines)
    else:
        log.info("task notice (no webhook configured)", task_id=task_id, notice=event, content=lines)
