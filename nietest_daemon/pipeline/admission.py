"""Admission: subtasks wait for a job slot in the broker (coordination/scheduler.py), and only
admitted subtasks get a run message. Every change that can free a slot or add waiting work
ends with `dispatch`, which admits fairly and sends the run messages.

- `queue_task` (the master's expansion, the sweep's repair): a task's pending subtasks wait;
- `release_slot` (a subtask's end, a transient create error): its slot goes to the next;
- `give_back` (a run that finds no slot of its own): it waits again, first in its task's line;
- `cancel` (a cancelled task): its waiting subtasks and slots go at once;
- `resend_admissions_of` (a host keeper's takeover): the run messages a lost host may never have sent.

Each task waits under its owner (`owner_of`): slots are shared between owners first, then between
each owner's tasks by priority (`NIETEST_FAIR_SHARE=owner`), or between tasks only (`task`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import dramatiq

from nietest_daemon.coordination.connection import ScriptCall, run_scripts
from nietest_daemon.coordination.scheduler import Scheduler
from nietest_daemon.core.settings import FairShare, Settings
from nietest_daemon.domain.lifecycle import Status
from nietest_daemon.domain.subtask import Lane, Subtask
from nietest_daemon.pipeline.context import Context
from nietest_daemon.pipeline.messages import RUN_SUBTASK, enqueue, send_run


def weight_of(task: Mapping[str, Any] | None) -> int:
    """A task's share of the slots: its priority, at least 1 (priority 0 counts as 1)."""
    priority = (task or {}).get("priority")
    return max(1, int(priority)) if isinstance(priority, int) and not isinstance(priority, bool) else 1


def owner_of(settings: Settings, task: Mapping[str, Any] | None) -> tuple[str, float]:
    """Who a task waits under, and that owner's weight: its `owner` with its NIETEST_OWNER_WEIGHTS
    weight; the pseudo-owner "" (weight 1) in task mode and for a task stored without one."""
    owner = (task or {}).get("owner")
    if settings.fair_share is FairShare.TASK or not isinstance(owner, str) or not owner:
        return "", 1.0
    return owner, settings.owner_weight(owner)


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
    owner, owner_weight = owner_of(ctx.settings, task)
    waiting = {}
    for lane, ids in by_lane.items():
        waiting[lane] = ctx.schedulers[lane].replace(task["id"], ids, weight, owner=owner, owner_weight=owner_weight)
        dispatch(ctx, lane)
    return waiting


def release_slot(ctx: Context, subtask_id: str, lane: Lane, *also: ScriptCall) -> None:
    """Give the subtask's slot back (harmless when it holds none) and start whoever is admitted next;
    `also`: other script calls to make in the same round trip."""
    slots = ctx.schedulers[lane]
    released, *_ = run_scripts(ctx.redis, slots.release_call(subtask_id), *also)
    dispatch(ctx, lane, slots.admitted_ids(released))


def resend_admissions_of(
    settings: Settings, schedulers: Mapping[Lane, Scheduler], lost_host: str, broker: dramatiq.Broker
) -> list[str]:
    """Send again the run messages of the subtasks that lost host `lost_host` admitted and whose run
    never started (it may have died before it sent them): the host keeper's takeover. Their ids."""
    sent = []
    for lane, slots in schedulers.items():
        for subtask_id in slots.take_admissions(lost_host):
            enqueue(RUN_SUBTASK[lane], settings.queue(lane.queue_key).name, subtask_id, broker=broker)
            sent.append(subtask_id)
    return sent


def give_back(ctx: Context, sub: Subtask) -> None:
    """A run found no slot of its own (its lease ran out, or it is a redelivery): it waits again,
    first in its task's line."""
    task = ctx.store.get_task(sub.task_id)
    owner, owner_weight = owner_of(ctx.settings, task)
    slots = ctx.schedulers[sub.lane]
    slots.add(sub.task_id, [sub.id], weight_of(task), owner=owner, owner_weight=owner_weight, front=True)
    dispatch(ctx, sub.lane)


def cancel(ctx: Context, task_id: str) -> None:
    """A cancelled task's waiting subtasks and slots go at once; the freed slots go to the others."""
    for lane, slots in ctx.schedulers.items():
        slots.cancel(task_id)
        dispatch(ctx, lane)


def repair(ctx: Context, task: Mapping[str, Any]) -> bool:
    """Put back in line the pending subtasks of a running task that neither wait nor hold a slot
    (an admission whose run message was lost with its process, a ready list lost with the broker,
    or left by a version before owners: only an active task's ready list counts, `Scheduler.shares`).
    True when it had to. A task in line keeps its place, under the owner and weights the settings
    give now (a restart may have changed NIETEST_FAIR_SHARE or NIETEST_OWNER_WEIGHTS)."""
    task_id = task["id"]
    pending = ctx.store.count_subtasks(task_id).get(Status.PENDING, 0)
    if not pending:
        return False
    accounted = 0
    active: list[Lane] = []
    for lane, slots in ctx.schedulers.items():
        mine = next(s for s in slots.shares([task_id]) if s.task_id == task_id)
        accounted += mine.ready + mine.holding
        if mine.active:
            active.append(lane)
    if accounted < pending:
        queue_task(ctx, task, ctx.store.list_subtasks(task_id, status=Status.PENDING))
        return True
    owner, owner_weight = owner_of(ctx.settings, task)
    for lane in active:  # records them again; moves the task if its owner changed
        ctx.schedulers[lane].add(task_id, [], weight_of(task), owner=owner, owner_weight=owner_weight)
    return False
