"""Admission by owner (pipeline/admission.py on coordination/scheduler.py), in this process against a
private valkey-server and a SQLite store: tasks wait under their owner, task mode puts every task
under the pseudo-owner "", and a deployment upgraded mid-campaign (ready lists, but none of the
owner sets) is put back in line by the sweep's repair."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import dramatiq
import dramatiq.broker
import pytest

from nietest_daemon.coordination import keys
from nietest_daemon.core import settings as settings_module
from nietest_daemon.core.settings import FairShare
from nietest_daemon.domain.lifecycle import Status
from nietest_daemon.domain.subtask import Lane, Subtask
from nietest_daemon.internals.dramatiq_redis import bodies_key
from nietest_daemon.pipeline import context as context_module
from nietest_daemon.pipeline.admission import give_back, queue_task
from nietest_daemon.pipeline.broker import build_broker
from nietest_daemon.pipeline.context import Context, build_context
from nietest_daemon.pipeline.sweep import sweep
from nietest_daemon.testing.valkey import PrivateValkey


def make_ctx(valkey: PrivateValkey, home: Path, monkeypatch: pytest.MonkeyPatch, **env: str) -> Iterator[Context]:
    settings = settings_module.load(
        {"NIETEST_HOME": str(home), "BROKER_REDIS_URL": valkey.url, "NIETEST_MAX_JOBS": "2", **env}
    )
    monkeypatch.setattr(dramatiq.broker, "global_broker", dramatiq.broker.global_broker)
    broker = build_broker(settings)
    ctx = build_context(settings)
    monkeypatch.setattr(context_module, "_context", ctx)
    yield ctx
    ctx.store.close()
    broker.close()


@pytest.fixture
def ctx(valkey: PrivateValkey, short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Context]:
    yield from make_ctx(valkey, short_tmp, monkeypatch, NIETEST_OWNER_WEIGHTS="alice=3")


@pytest.fixture
def task_mode_ctx(valkey: PrivateValkey, short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Context]:
    yield from make_ctx(valkey, short_tmp, monkeypatch, NIETEST_FAIR_SHARE="task")


def add_task(ctx: Context, task_id: str, n: int, owner: str | None) -> list[str]:
    """A running task of `n` pending subtasks in the store (not queued)."""
    ctx.store.create_task({"id": task_id, "name": task_id, "total_images": n, "priority": 1, "owner": owner})
    ids = [f"{task_id}:{i}" for i in range(n)]
    docs = [{"id": sid, "prompts": [{"type": "freetext", "value": sid, "weight": 1.0}]} for sid in ids]
    assert ctx.store.insert_subtasks(task_id, docs) == n
    ctx.store.mark_task_running(task_id)
    return ids


def queue(ctx: Context, task_id: str) -> None:
    task = ctx.store.get_task(task_id)
    assert task is not None
    queue_task(ctx, task, ctx.store.list_subtasks(task_id, status=Status.PENDING))


def woken(ctx: Context) -> list[str]:
    bodies = ctx.redis.hvals(bodies_key(ctx.settings.queue("subtask").name))
    return sorted(json.loads(raw)["args"][0] for raw in bodies)


def test_tasks_wait_under_their_owner_with_its_weight(ctx: Context) -> None:
    add_task(ctx, "a1", 3, "alice")
    add_task(ctx, "b1", 3, "bob")
    add_task(ctx, "legacy", 3, None)  # stored before owners: the pseudo-owner ""
    for task_id in ("a1", "b1", "legacy"):
        queue(ctx, task_id)
    owners = {o.owner: o for o in ctx.schedulers[Lane.STANDARD].owner_shares()}
    assert set(owners) == {"alice", "bob", ""}
    assert (owners["alice"].weight, owners["bob"].weight, owners[""].weight) == (3.0, 1.0, 1.0)
    assert [t.task_id for t in owners["bob"].tasks] == ["b1"]
    assert len(woken(ctx)) == 2  # the cap


def test_a_run_that_gives_its_place_back_waits_under_its_owner(ctx: Context) -> None:
    (a0,) = add_task(ctx, "a1", 1, "alice")
    queue(ctx, "a1")
    slots = ctx.schedulers[Lane.STANDARD]
    assert slots.active_tasks() == []  # its one subtask was admitted: nothing waits
    slots.client.delete(slots.holders)  # its lease ran out; its run finds no slot of its own
    slots.cap = 0
    doc = ctx.store.get_subtask(a0)
    assert doc is not None
    give_back(ctx, Subtask.from_doc(doc))
    assert [(t.task_id, t.owner, t.ready) for t in slots.shares()] == [("a1", "alice", 1)]


def test_task_mode_puts_every_task_under_one_pseudo_owner(task_mode_ctx: Context) -> None:
    ctx = task_mode_ctx
    add_task(ctx, "a1", 3, "alice")
    add_task(ctx, "b1", 3, "bob")
    queue(ctx, "a1")
    queue(ctx, "b1")
    (only,) = ctx.schedulers[Lane.STANDARD].owner_shares()
    assert only.owner == "" and {t.task_id for t in only.tasks} == {"a1", "b1"}


def test_the_sweep_puts_an_upgraded_deployments_ready_lists_back_in_line(ctx: Context) -> None:
    """Upgraded mid-campaign: the ready list an older version filled is there, none of the owner
    sets: nothing would admit it. The repair counts it as not waiting and queues the task again."""
    ids = add_task(ctx, "old", 5, "alice")
    r, api = ctx.redis, Lane.STANDARD
    r.rpush(keys.sched_ready(api, "old"), *ids)  # as the older version left it
    r.zadd(keys.sched_tasks(api), {"old": 7.0})
    r.hset(keys.sched_weights(api), "old", 1)
    r.set(keys.sched_clock(api), 7.0)
    slots = ctx.schedulers[api]
    assert slots.admit() == [] and slots.waiting() == 0
    assert sweep(ctx)["requeued"] == 1
    assert woken(ctx) == ids[:2] and slots.waiting() == 3
    assert [(t.task_id, t.owner, t.ready, t.holding) for t in slots.shares()] == [("old", "alice", 3, 2)]
    assert not r.exists(keys.sched_tasks(api), keys.sched_clock(api))  # the retired keys are gone
    assert sweep(ctx)["requeued"] == 0  # once


def test_after_a_restart_with_other_settings_the_sweep_moves_tasks_in_line(ctx: Context) -> None:
    """A task keeps its place, under the owner and weights of the settings in force now."""
    add_task(ctx, "a1", 5, "alice")
    queue(ctx, "a1")
    slots = ctx.schedulers[Lane.STANDARD]
    assert [(o.owner, o.weight) for o in slots.owner_shares()] == [("alice", 3.0)]
    ctx.settings = dataclasses.replace(ctx.settings, owner_weights={"alice": 0.5})
    assert sweep(ctx)["requeued"] == 0
    assert [(o.owner, o.weight) for o in slots.owner_shares()] == [("alice", 0.5)]
    ctx.settings = dataclasses.replace(ctx.settings, fair_share=FairShare.TASK)
    assert sweep(ctx)["requeued"] == 0
    assert [(o.owner, o.weight, o.ready, o.holding) for o in slots.owner_shares()] == [("", 1.0, 3, 2)]
    assert not ctx.redis.exists(keys.sched_owner_tasks(Lane.STANDARD, "alice"))
