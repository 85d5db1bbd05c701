"""Task notices to the Feishu task bot : one message per task event, never per subtask.

The party that causes an event (the master's first run: `submitted`; the call that finalised
the task: `completed`, `partially_completed`, `failed` or `cancelled`) enqueues a `send_notice`
message on the master queue. A task run again (`nietest retry`) is finalised once more: each
round (the task's `round`) has its own final notice, told apart by the round in its markers, and
the final notice's message carries what its card shows of the round (`snapshot_of`), so that a
late one never shows the next round's counters. That message survives a worker crash (it lives
in the broker), a Redis marker keeps a redelivered one from posting twice, and a webhook that is
down costs one bounded attempt: the notice is logged with its content and never fails a task.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from nietest_daemon.clients.feishu import Severity
from nietest_daemon.coordination import keys
from nietest_daemon.coordination.connection import as_text, replicated
from nietest_daemon.core.logs import get_logger
from nietest_daemon.domain.lifecycle import TERMINAL, Status, is_partial
from nietest_daemon.pipeline.messages import SEND_NOTICE, enqueue, owner_of_current_message
from nietest_daemon.store.base import round_of, utcnow

if TYPE_CHECKING:
    from nietest_daemon.pipeline.context import Context

log = get_logger(__name__)

MARKER_TTL_SECONDS = 7 * 86400
#: How long after a task's end its final notice is still made up for if it was never enqueued (by
#: the sweep, and by a retry for the round it ends); a later one would be news of the past.
FINAL_NOTICE_WINDOW = timedelta(hours=1)
#: The fields of a finished task that its final notice's card shows (`snapshot_of`).
SNAPSHOT_FIELDS = ("status", "completed_images", "failed_images", "cancelled_images", "total_images", "error")
SEVERITY: dict[str, Severity] = {
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
    status = task.get("status")
    if status == Status.FAILED:
        return "failed"
    if status == Status.CANCELLED:
        return "cancelled"
    return "partially_completed" if is_partial(task) else "completed"


def snapshot_of(task: Mapping[str, Any]) -> dict[str, Any]:
    """What the final notice's card shows of a finished task, as it ended its round."""
    return {name: task.get(name) for name in SNAPSHOT_FIELDS}


def _enqueue(ctx: Context, task: dict[str, Any], event: str, **kwargs: Any) -> None:
    # The round only from the second on: the first round's message is what it always was.
    rounds = (round_of(task),) if round_of(task) > 1 else ()
    enqueue(SEND_NOTICE, ctx.settings.queue("master").name, task["id"], event, *rounds, **kwargs)


def task_submitted(ctx: Context, task: dict[str, Any]) -> None:
    _enqueue(ctx, task, "submitted")


def task_finished(ctx: Context, task: dict[str, Any]) -> None:
    """Enqueue the final notice of the round `task` (finished) ended, with its snapshot, and mark it enqueued."""
    _enqueue(ctx, task, final_event(task), snapshot=snapshot_of(task))
    ctx.redis.set(keys.notice_final_queued(task["id"], round_of(task)), "1", ex=MARKER_TTL_SECONDS)


def ensure_final(ctx: Context, task_id: str, round: int) -> None:
    """Enqueue the final notice of round `round` of a terminal task if nobody did.

    Called when a message finds its subtask already terminal (`round`: the round the subtask last
    ran in): the process that finalised the task may have died between the store update and the
    enqueue, and this redelivered message is the only trace left of it; and by the sweep (the
    task's round as it read it). Only while the task is still terminal in that very round: a stale
    message of an earlier round never speaks for a later one. A notice enqueued twice still posts
    once (`deliver` checks its marker).
    """
    if ctx.redis.exists(keys.notice_final_queued(task_id, round)):
        return
    task = ctx.store.get_task(task_id)
    if task is not None and task.get("status") in TERMINAL and round_of(task) == round:
        log.warning("final task notice was never enqueued; enqueuing it now", task_id=task_id, round=round)
        task_finished(ctx, task)


def ended_lately(task: Mapping[str, Any]) -> bool:
    """The task ended within `FINAL_NOTICE_WINDOW`: a final notice never enqueued is still news."""
    ended = task.get("completed_at")
    return ended is not None and utcnow() - ended < FINAL_NOTICE_WINDOW


def next_round(ctx: Context, task: dict[str, Any]) -> None:
    """Called by a retry before the finished `task` is reopened: the ending round's final notice is
    enqueued if nobody did and the round ended lately (within `FINAL_NOTICE_WINDOW`: an older end
    is no news, and its markers may have expired). Each round has its own markers, so nothing is
    dropped: the next round's finaliser, or `ensure_final`, speaks for that round."""
    if ended_lately(task):
        ensure_final(ctx, task["id"], round_of(task))


def link(ctx: Context, task_id: str) -> str | None:
    base = ctx.settings.frontend_base_url
    return f"{base.rstrip('/')}/tasks/{task_id}" if base else None


def card_lines(ctx: Context, task: dict[str, Any], event: str, round: int | None = None) -> list[str]:
    round = round_of(task) if round is None else round
    total = int(task.get("total_images") or 0)
    lines = [f"**{task.get('name')}**", f"task id: {task['id']}"]
    if task.get("owner"):
        lines.append(f"owner: {task['owner']}")
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


def deliver(ctx: Context, task_id: str, event: str, round: int = 1, snapshot: Mapping[str, Any] | None = None) -> None:
    """Post one task notice (the body of the `send_notice` actor); at most once per task, round and event.

    `snapshot` (a final notice's, `snapshot_of`): the card shows the round as it ended, not the
    task as it is now (run again meanwhile); without it (a message enqueued before snapshots), the
    task as read."""
    # The marker is claimed with this message's id before the post: a second message for the same
    # notice (enqueued twice) skips it, while a redelivery of this very message (its process died
    # mid-post) may post again.
    marker = keys.notice(task_id, event, round)
    claim = f"sending:{owner_of_current_message()}"
    # The claim is on a replica before the post (`replicated`): a broker failover cannot lose it.
    if not replicated(ctx.redis, lambda pipe: pipe.set(marker, claim, nx=True, ex=MARKER_TTL_SECONDS))[0]:
        held = ctx.redis.get(marker)
        if held is None or as_text(held) != claim:
            return
    task = ctx.store.get_task(task_id)
    if task is None:
        log.error("notice for an unknown task dropped", task_id=task_id, notice=event)
        return
    if snapshot:
        task = {**task, **{name: snapshot[name] for name in SNAPSHOT_FIELDS if name in snapshot}}
    lines = card_lines(ctx, task, event, round)
    result = ctx.notifier.send_card(TITLES.get(event, event), lines, SEVERITY.get(event, "info"))
    ctx.redis.set(marker, "sent", ex=MARKER_TTL_SECONDS)
    if result.delivered:
        log.info("task notice sent", task_id=task_id, notice=event)
    elif not result.skipped:
        log.error("task notice not delivered", task_id=task_id, notice=event, error=result.error, content=lines)
    else:
        log.info("task notice (no webhook configured)", task_id=task_id, notice=event, content=lines)
