"""Admission: subtasks wait for a job slot in the broker (coordination/scheduler.py), and only
admitted subtasks get a run message. Every change that can free a slot or add waiting work
ends with `dispatch`, which admits fairly and sends the run messages.

- `queue_task` (the master's expansion, the sweep's repair): a task's pending subtasks wait;
- `release_slot` (a subtask's end, a transient create error): its slot goes to the next;
- `give_back` (a run that finds no slot of its own): it waits again, first in its task's line;
- `cancel` (a cancelled task): its waiting subtasks and slots go at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from nietest_daemon.coordination.connection import ScriptCall, run_scripts
from nietest_daemon.domain.lifecycle import Status
from nietest_daemon.domain.subtask import Lane, Subtask
from nietest_daemon.pipeline.context import Context
from nietest_daemon.pipeline.messages import send_run


def weight_of(task: Mapping[str, Any] | None) -> int:
    """A task's share of the slots: its priority, at least 1 (priority 0 counts as 1)."""
    priority = (task or {}).get("priority")
    return max(1, int(priority)) if isinstance(priority, int) and not isinstance(priority, bool) else 1


def dispatch(ctx: Context, lane: Lane, admitted: Iterable[str] | None = None) -> int:
    """Send a run message for each admitted subtask (admitting first when `admitted` is None)."""
    ids = ctx.schedulers[lane].admit() if admitted is None else list(admitted)
    for subtask_id in ids:
        send_run(ctx, subtask_id, lane)
    return len(ids)


def queue_task(ctx: Context, task: Mapping[str, Any], pending: Iterable[Mapping[str, Any]]) -> dict[Lane, int]:
    """Make the task's pending subtasks its ready lists (idempotent), then admit: how many wait per lane."""
    by_lane: dict[Lane, list[str]] = {lane: [] for lane in Lane}
    for doc in pending:
        by_lane[Lane.of(doc)].append(doc["id"])
    weight = weight_of(task)
    waiting = {}
    for lane, ids in by_lane.items():
        waiting[lane] = ctx.schedulers[lane].replace(task["id"], ids, weight)
        dispatch(ctx, lane)
    return waiting


def release_slot(ctx: Context, subtask_id: str, lane: Lane, *also: ScriptCall) -> None:
    """Give the subtask's slot back (harmless when it holds none) and start whoever is admitted next;
    `also`: other script calls to make in the same round trip."""
    slots = ctx.schedulers[lane]
    released, *_ = run_scripts(ctx.redis, slots.release_call(subtask_id), *also)
    dispatch(ctx, lane, slots.admitted_ids(released))


def give_back(ctx: Context, sub: Subtask) -> None:
    """A run found no slot of its own (its lease ran out, or it is a redelivery): it waits again,
    first in its task's line."""
    weight = weight_of(ctx.store.get_task(sub.task_id))
    ctx.schedulers[sub.lane].add(sub.task_id, [sub.id], weight, front=True)
    dispatch(ctx, sub.lane)


def cancel(ctx: Context, task_id: str) -> None:
    """A cancelled task's waiting subtasks and slots go at once; the freed slots go to the others."""
    for lane, slots in ctx.schedulers.items():
        slots.cancel(task_id)
        dispatch(ctx, lane)


def repair(ctx: Context, task: Mapping[str, Any]) -> bool:
    """Put back in line the pending subtasks of a running task that neither wait nor hold a slot
    (an admission whose run message was lost with its process, a ready list lost with the broker).
    True when it had to."""
    task_id = task["id"]
    pending = ctx.store.count_subtasks(task_id).get(Status.PENDING, 0)
    if not pending:
        return False
    accounted = 0
    for slots in ctx.schedulers.values():
        share = slots.shares([task_id])
        mine = next((s for s in share if s.task_id == task_id), None)
        if mine is not None:
            accounted += mine.ready + mine.holding
    if accounted >= pending:
        return False
    queue_task(ctx, task, ctx.store.list_subtasks(task_id, status=Status.PENDING))
    return True
