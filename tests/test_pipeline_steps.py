"""The pipeline's steps in this process: admission to the job slots, creating, polling, cancelling,
the sweep, and failure streaks.

All against a private valkey-server (real Redis semantics, real Lua); the pipeline cases also use
a real SQLite store in a temporary directory, the real Dramatiq Redis broker (messages are
inspected in valkey, not run) and the fake Nieta API over HTTP.

The cases marked `@on_both_stores` (a finish counted once, cancels, the sweep's resume, finalise
and repair, a retry) run on the PostgreSQL store as well: one database of the machine's server for
the module, its schema made once, emptied before each case (they skip, saying why, when no server
answers). The others do not touch what differs between the stores.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import dramatiq
import dramatiq.broker
import psycopg
import pytest
import redis
from dramatiq.middleware import CurrentMessage
from redis.backoff import NoBackoff
from redis.retry import Retry

from nietest_daemon.clients.feishu import SendResult
from nietest_daemon.clients.nieta import NietaClient
from nietest_daemon.coordination import keys, markers, streaks
from nietest_daemon.coordination.connection import NotReplicated
from nietest_daemon.coordination.scheduler import RESEND_AFTER_SECONDS
from nietest_daemon.core import settings as settings_module
from nietest_daemon.domain.lifecycle import Status
from nietest_daemon.domain.subtask import Lane, Subtask
from nietest_daemon.internals.dramatiq_redis import bodies_key, delay_queue_name, queue_key
from nietest_daemon.pipeline import context as context_module
from nietest_daemon.pipeline import notices
from nietest_daemon.pipeline import sweep as sweep_module
from nietest_daemon.pipeline.admission import queue_task, release_slot, resend_admissions_of
from nietest_daemon.pipeline.broker import build_broker
from nietest_daemon.pipeline.context import Context, build_context
from nietest_daemon.pipeline.subtasks import (
    CREATE_IN_DOUBT,
    CREATE_INTERRUPTED,
    MAX_ATTEMPTS,
    finish,
    poll_subtask,
    run_subtask,
)
from nietest_daemon.pipeline.sweep import sweep
from nietest_daemon.pipeline.task_steps import cancel_task
from nietest_daemon.store.postgres import PostgresStore
from nietest_daemon.testing import postgres
from nietest_daemon.testing.fake_nieta import FakeNieta
from nietest_daemon.testing.valkey import PrivateValkey
from nietest_daemon.testing.waiting import wait_for

# --- the pipeline in this process ------------------------------------------------------------------


class Pipeline:
    """The pipeline's Context in this process: a private broker, a SQLite store, the fake API."""

    def __init__(self, ctx: Context, broker: dramatiq.Broker, api: FakeNieta) -> None:
        self.ctx = ctx
        self.broker = broker
        self.api = api
        self.queue = ctx.settings.queue("subtask").name

    def add_task(self, task_id: str, n: int, *, queue: bool = True, priority: int = 1) -> list[str]:
        """A running task of `n` subtasks; `queue`: in line for the slots, as the master leaves it
        (the admitted ones' run messages are on the queue)."""
        self.ctx.store.create_task({"id": task_id, "name": task_id, "total_images": n, "priority": priority})
        ids = [f"{task_id}:{i}" for i in range(n)]
        docs = [
            {"id": sid, "variable_indices": [i], "prompts": [{"type": "freetext", "value": sid, "weight": 1.0}]}
            for i, sid in enumerate(ids)
        ]
        assert self.ctx.store.insert_subtasks(task_id, docs) == n
        self.ctx.store.mark_task_running(task_id)
        if queue:
            task = self.ctx.store.get_task(task_id)
            assert task is not None
            queue_task(self.ctx, task, self.ctx.store.list_subtasks(task_id, status=Status.PENDING))
        return ids

    def messages(self, *, delayed: bool = False) -> list[tuple[str, str]]:
        """(actor, subtask id) of the messages waiting on the subtask queue (or its delay queue)."""
        name = delay_queue_name(self.queue) if delayed else self.queue
        client = self.ctx.redis
        found = []
        for raw in client.hvals(bodies_key(name)):
            message = json.loads(raw)
            found.append((message["actor_name"], message["args"][0]))
        return sorted(found)

    def woken(self) -> list[str]:
        return [sid for actor, sid in self.messages() if actor == "run_subtask"]

    def clear(self) -> None:
        for name in (self.queue, delay_queue_name(self.queue)):
            self.ctx.redis.delete(queue_key(name), bodies_key(name))


def holders(pipe: Pipeline, lane: Lane = Lane.STANDARD) -> list[str]:
    return sorted(m.decode() for m in pipe.ctx.redis.zrange(pipe.ctx.schedulers[lane].holders, 0, -1))


def subtask(pipe: Pipeline, subtask_id: str) -> Subtask:
    doc = pipe.ctx.store.get_subtask(subtask_id)
    assert doc is not None
    return Subtask.from_doc(doc)


@pytest.fixture(scope="module")
def _module_api() -> Iterator[FakeNieta]:
    with FakeNieta(generation_time=0.0) as api:
        yield api


@pytest.fixture(scope="module")
def _postgres_url() -> Iterator[str]:
    """One database of the machine's PostgreSQL for this module's cases on that store, its schema
    made once (as a daemon's start does); dropped after."""
    reason = postgres.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with postgres.temporary_database() as url:
        with PostgresStore.from_url(url) as store:
            store.prepare()
        yield url


def _emptied(url: str) -> str:
    """The database with no task left (DELETE: a few rows; TRUNCATE would make new files)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM subtasks")
        conn.execute("DELETE FROM tasks")
    return url


#: Run the case with the SQLite store and with the PostgreSQL store (`pipe`'s parameter).
on_both_stores = pytest.mark.parametrize("pipe", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
def pipe(
    request: pytest.FixtureRequest,
    valkey: PrivateValkey,
    short_tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
    _module_api: FakeNieta,
) -> Iterator[Pipeline]:
    """The pipeline on a SQLite store in `short_tmp`, or (parameter "postgresql") on the module's database."""
    server = valkey
    api = _module_api
    api.reset()  # one fake API for the module (stopping a server costs ~50 ms), emptied for each test
    env = {
        "NIETEST_HOME": str(short_tmp),
        "BROKER_REDIS_URL": server.url,
        "NIETEST_MAX_JOBS": "1",
        **api.env(),
    }
    if getattr(request, "param", "sqlite") == "postgresql":
        env["NIETEST_STORE_URL"] = _emptied(request.getfixturevalue("_postgres_url"))
    settings = settings_module.load(env)
    monkeypatch.setattr(dramatiq.broker, "global_broker", dramatiq.broker.global_broker)
    broker = build_broker(settings)
    ctx = build_context(settings)
    # No client retries: a transient error surfaces at once as a retryable NietaError.
    ctx.nieta = NietaClient(api.token, api.url, api.ops_url, max_retries=0)
    monkeypatch.setattr(context_module, "_context", ctx)
    yield Pipeline(ctx, broker, api)
    ctx.nieta.close()
    ctx.store.close()
    broker.close()


@pytest.fixture
def client(valkey: PrivateValkey) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(valkey.url)
    yield c
    c.close()


def waiting(pipe: Pipeline, lane: Lane = Lane.STANDARD) -> int:
    return pipe.ctx.schedulers[lane].waiting()


def test_only_admitted_subtasks_get_a_message_and_a_finished_one_admits_the_next(pipe: Pipeline) -> None:
    a, b, c = pipe.add_task("t", 3)  # cap 1
    assert pipe.woken() == [a] and holders(pipe) == [a]
    assert waiting(pipe) == 2 and pipe.messages(delayed=True) == []  # waiting costs no message
    pipe.clear()
    run_subtask(a)  # creates the job, schedules its first poll
    assert pipe.messages(delayed=True) == [("poll_subtask", a)]
    assert len(pipe.api.requests_to("create")) == 1

    finish(pipe.ctx, subtask(pipe, a), Status.COMPLETED, result="http://x/a.png")
    assert pipe.woken() == [b]
    assert holders(pipe) == [b]  # admitted before its run starts
    assert waiting(pipe) == 1


def test_a_subtask_cancelled_while_it_waited_hands_its_admission_on(pipe: Pipeline) -> None:
    a, b, c = pipe.add_task("t", 3)
    pipe.clear()
    run_subtask(a)
    # b is cancelled while it waits (store only: its place in the line stays).
    assert pipe.ctx.store.finish_subtask(b, Status.CANCELLED).changed
    finish(pipe.ctx, subtask(pipe, a), Status.COMPLETED, result="http://x/a.png")
    assert pipe.woken() == [b]
    pipe.clear()
    run_subtask(b)  # the admission reaches a cancelled subtask ...
    assert pipe.woken() == [c]  # ... which passes the slot to the next instead of losing it
    assert holders(pipe) == [c]
    assert len(pipe.api.requests_to("create")) == 1


@on_both_stores
def test_cancel_drops_the_tasks_line_and_slots_for_the_others(pipe: Pipeline) -> None:
    (a,) = pipe.add_task("cx", 1)  # holds the only slot
    pipe.add_task("cx2", 0, queue=False)
    more = [f"cx:{i}" for i in range(1, 4)]
    pipe.ctx.store.insert_subtasks(
        "cx", [{"id": sid, "prompts": [{"type": "freetext", "value": sid, "weight": 1.0}]} for sid in more]
    )
    pipe.ctx.schedulers[Lane.STANDARD].add("cx", more)
    (other,) = pipe.add_task("other", 1)
    assert waiting(pipe) == 4 and holders(pipe) == [a]
    pipe.clear()
    outcome = cancel_task(pipe.ctx, "cx")
    assert outcome.cancelled == 4
    assert pipe.ctx.schedulers[Lane.STANDARD].active_tasks() == []
    assert pipe.woken() == [other] and holders(pipe) == [other]  # its slot went to the other task at once


def test_a_run_whose_slot_is_gone_goes_back_to_the_front_of_its_line(pipe: Pipeline) -> None:
    a, b, c = pipe.add_task("t", 3)
    pipe.clear()
    pipe.ctx.redis.zrem(pipe.ctx.schedulers[Lane.STANDARD].holders, a)  # its lease ran out ...
    assert pipe.ctx.schedulers[Lane.STANDARD].hold("intruder:0")  # ... and the slot went elsewhere
    run_subtask(a)
    assert pipe.api.requests_to("create") == [] and pipe.messages() == [] and pipe.messages(delayed=True) == []
    assert pipe.ctx.redis.lrange(keys.sched_ready(Lane.STANDARD, "t"), 0, -1) == [a.encode(), b.encode(), c.encode()]
    release_slot(pipe.ctx, "intruder:0", Lane.STANDARD)
    assert pipe.woken() == [a]


def test_a_create_that_fails_for_now_frees_its_slot_for_the_next(pipe: Pipeline) -> None:
    a, b = pipe.add_task("t", 2)
    pipe.api.add_rule("http_500", marker=a, times=1)
    pipe.clear()
    run_subtask(a)  # the create answers 500: retryable, so a tries again later
    assert [r.status for r in pipe.api.requests_to("create")] == [500]
    assert pipe.woken() == [b]  # a gave its slot back and b was admitted
    assert pipe.messages(delayed=True) == [("run_subtask", a)]
    assert holders(pipe) == [b]
    assert pipe.ctx.store.get_subtask(a)["job_uuid"] is None


def test_a_create_whose_answer_was_lost_fails_its_subtask_and_is_never_sent_again(pipe: Pipeline) -> None:
    """The connection dropped after the API read the request: it may have made the job, so a second
    create could pay twice; the subtask fails (`nietest retry` may pay again, knowingly)."""
    a, b = pipe.add_task("t", 2)
    pipe.api.add_rule("drop", marker=a, times=1)
    pipe.clear()
    run_subtask(a)
    sub = pipe.ctx.store.get_subtask(a)
    assert sub["status"] == Status.FAILED and sub["error"].startswith(CREATE_IN_DOUBT)
    assert len(pipe.api.requests_to("create")) == 1 and pipe.messages(delayed=True) == []
    assert pipe.woken() == [b] and holders(pipe) == [b]  # its slot went to the next
    run_subtask(a)  # a copy of its message
    assert len(pipe.api.requests_to("create")) == 1


def test_no_create_goes_out_before_a_broker_replica_has_the_marker(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failover could lose a marker no replica has: the run stops before the create, clears the
    marker and the lock, and its message is run again later (a broker outage error)."""
    (a,) = pipe.add_task("t", 1)

    def not_acknowledged(client: redis.Redis, subtask_id: str) -> None:
        raise NotReplicated("no broker replica acknowledged")

    with monkeypatch.context() as patched:
        patched.setattr(markers, "make_create_sent_durable", not_acknowledged)
        with pytest.raises(NotReplicated):
            run_subtask(a)
    assert pipe.api.requests_to("create") == []
    assert not pipe.ctx.redis.exists(keys.create_sent(a), keys.creating(a))
    run_subtask(a)  # the retry, once a replica acknowledges (here: none to wait for)
    assert len(pipe.api.requests_to("create")) == 1


def test_an_admission_whose_run_message_was_never_sent_is_sent_again(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The admitting process died (or lost the admit script's reply) before it sent the run message:
    the takeover of its host sends it at once; otherwise the next admission after RESEND_AFTER_SECONDS."""
    pipe.ctx.schedulers[Lane.STANDARD].cap = 3
    for slots in pipe.ctx.schedulers.values():
        slots.host = "lost-host"
    a, b, c = pipe.add_task("t", 3)
    run_subtask(a)  # started: a's admission is settled
    pipe.clear()  # b's and c's run messages are lost with their sender
    for slots in pipe.ctx.schedulers.values():
        slots.host = "taker"
    assert resend_admissions_of(pipe.ctx.settings, pipe.ctx.schedulers, "lost-host", pipe.broker) == [b, c]
    assert pipe.woken() == [b, c]
    run_subtask(b)
    pipe.clear()  # c's copy lost again; nobody takes over: the period does it
    later = time.time() + RESEND_AFTER_SECONDS + 1
    monkeypatch.setattr(pipe.ctx.schedulers[Lane.STANDARD], "clock", lambda: later)
    finish(pipe.ctx, subtask(pipe, a), Status.COMPLETED, result="http://x/a.png")  # a release admits
    assert pipe.woken() == [c]
    run_subtask(c)
    assert pipe.ctx.schedulers[Lane.STANDARD].not_started() == 0
    assert len(pipe.api.requests_to("create")) == 3


def test_a_poll_of_a_finished_subtask_frees_its_slot_for_the_next(pipe: Pipeline) -> None:
    a, b = pipe.add_task("t", 2)
    pipe.clear()
    run_subtask(a)
    # a ends by another path (a cancel seen by the store) while it still holds the slot.
    assert pipe.ctx.store.finish_subtask(a, Status.CANCELLED).changed
    pipe.clear()
    poll_subtask(a)
    assert pipe.woken() == [b]
    assert holders(pipe) == [b]


def test_a_redelivered_master_rebuilds_the_same_line(pipe: Pipeline) -> None:
    a, b, c = pipe.add_task("t", 3)
    task = pipe.ctx.store.get_task("t")
    assert task is not None
    queue_task(pipe.ctx, task, pipe.ctx.store.list_subtasks("t", status=Status.PENDING))  # again
    assert holders(pipe) == [a] and waiting(pipe) == 2  # a (admitted) is not queued twice


def test_the_sweep_puts_lost_admissions_back_in_line(pipe: Pipeline) -> None:
    a, b, c = pipe.add_task("t", 3)
    pipe.ctx.redis.delete(keys.sched_ready(Lane.STANDARD, "t"))  # the line was lost (the broker died) ...
    pipe.ctx.redis.zrem(pipe.ctx.schedulers[Lane.STANDARD].holders, a)  # ... and a's admission with its process
    pipe.clear()
    assert sweep(pipe.ctx)["requeued"] == 1
    assert pipe.woken() == [a] and waiting(pipe) == 2
    assert sweep(pipe.ctx)["requeued"] == 0  # once


def test_priority_3_gets_three_times_the_slots_of_priority_1(pipe: Pipeline) -> None:
    pipe.ctx.schedulers[Lane.STANDARD].cap = 4
    pipe.add_task("low", 40, priority=1)  # alone at first: it takes every slot
    holding = holders(pipe)
    assert len(holding) == 4
    pipe.add_task("high", 40, priority=3)
    taken: list[str] = []
    for _ in range(20):  # the oldest holder finishes; the scheduler picks who gets the slot
        admitted = pipe.ctx.schedulers[Lane.STANDARD].release(holding.pop(0))
        holding += admitted
        taken += [sid.split(":")[0] for sid in admitted]
    assert len(taken) == 20, (taken, holding)
    assert (taken.count("high"), taken.count("low")) in {(15, 5), (16, 4)}, taken


@contextmanager
def running_as(pipe: Pipeline, actor: str, subtask_id: str, message_id: str | None = None) -> Iterator[None]:
    """Run pipeline steps as if inside the message `actor(subtask_id)` (a new id unless given)."""
    message = dramatiq.Message(queue_name=pipe.queue, actor_name=actor, args=(subtask_id,), kwargs={}, options={})
    if message_id is not None:
        message = message.copy(message_id=message_id)
    current = CurrentMessage()
    current.before_process_message(pipe.broker, message)
    try:
        yield
    finally:
        current.after_process_message(pipe.broker, message)


def test_a_stale_poll_copy_does_not_go_on_polling(pipe: Pipeline) -> None:
    (a,) = pipe.add_task("t", 1)
    pipe.api.add_rule("never")  # the job stays pending
    pipe.clear()
    run_subtask(a)
    assert pipe.messages(delayed=True) == [("poll_subtask", a)]
    first = pipe.ctx.redis.get(keys.poll_chain(a))
    assert first is not None
    pipe.clear()
    with running_as(pipe, "poll_subtask", a):  # a redelivered copy of an older poll
        poll_subtask(a)
    assert pipe.messages(delayed=True) == []  # stopped before the next poll
    assert subtask(pipe, a).doc.get("poll_count", 0) == 0 and pipe.ctx.redis.get(keys.poll_chain(a)) == first
    with running_as(pipe, "poll_subtask", a, first.decode()):  # the current poll goes on
        poll_subtask(a)
    assert pipe.messages(delayed=True) == [("poll_subtask", a)] and subtask(pipe, a).doc["poll_count"] == 1
    assert pipe.ctx.redis.get(keys.poll_chain(a)) not in (None, first)
    assert holders(pipe) == [a]


@on_both_stores
def test_any_poll_copy_may_end_a_subtask_and_it_is_counted_once(pipe: Pipeline) -> None:
    (a,) = pipe.add_task("t", 1)
    pipe.clear()
    run_subtask(a)  # the fake's job succeeds at once
    for _ in range(2):  # two stale copies: the first ends the subtask, the second finds it ended
        with running_as(pipe, "poll_subtask", a):
            poll_subtask(a)
    task = pipe.ctx.store.get_task("t")
    assert task is not None and task["status"] == Status.COMPLETED and task["completed_images"] == 1
    assert len(pipe.api.requests_to("poll")) == 1 and holders(pipe) == []
    assert not pipe.ctx.redis.exists(keys.poll_chain(a), keys.creating(a), keys.create_sent(a))  # nothing left


def test_a_run_that_finds_another_creating_comes_back_later(pipe: Pipeline) -> None:
    (a,) = pipe.add_task("t", 1)
    pipe.ctx.redis.set(keys.creating(a), "another-message", ex=60)
    run_subtask(a)
    assert pipe.api.requests_to("create") == []
    assert pipe.messages(delayed=True) == [("run_subtask", a)]  # not dropped
    assert pipe.ctx.redis.get(keys.creating(a)) == b"another-message"  # not stolen
    pipe.ctx.redis.delete(keys.creating(a))
    run_subtask(a)
    sub = pipe.ctx.store.get_subtask(a)
    assert sub["status"] == Status.PROCESSING and sub["job_uuid"] and sub["seed"]
    assert pipe.ctx.redis.get(keys.creating(a)) is None


@on_both_stores
def test_no_job_is_created_for_a_task_cancelled_before_the_create(pipe: Pipeline) -> None:
    (a,) = pipe.add_task("t", 1)
    real_start = pipe.ctx.store.start_subtask

    def start_then_cancel(subtask_id: str) -> Any:
        sub = real_start(subtask_id)  # the subtask is processing now ...
        pipe.ctx.store.cancel_task("t")  # ... when the cancel comes: it cancels pending subtasks only
        return sub

    pipe.ctx.store.start_subtask = start_then_cancel  # type: ignore[method-assign]
    run_subtask(a)
    assert pipe.api.requests_to("create") == []
    assert pipe.ctx.store.get_subtask(a)["status"] == Status.CANCELLED
    assert pipe.ctx.store.get_task("t")["status"] == Status.CANCELLED
    assert pipe.ctx.schedulers[Lane.STANDARD].in_flight() == 0


@on_both_stores
def test_the_sweep_resumes_or_fails_subtasks_stuck_in_processing(pipe: Pipeline) -> None:
    polled, unstarted, exhausted, fresh = pipe.add_task("t", 4, queue=False)
    store = pipe.ctx.store
    store.start_subtask(polled)
    store.record_job(polled, "job-1", 7)  # its poll messages were lost
    store.start_subtask(unstarted)  # its process died before the create
    for _ in range(MAX_ATTEMPTS):
        store.start_subtask(exhausted)
    store.start_subtask(fresh)
    assert sweep(pipe.ctx, older_than_seconds=3600) == {
        "resumed": 0,
        "failed": 0,
        "finalised": 0,
        "requeued": 0,
        "repaired": 0,
    }

    # a cutoff a second ahead: every processing subtask counts as stuck
    assert sweep(pipe.ctx, older_than_seconds=-1) == {
        "resumed": 3,
        "failed": 1,
        "finalised": 0,
        "requeued": 0,
        "repaired": 0,
    }
    assert pipe.messages() == sorted([("poll_subtask", polled), ("run_subtask", unstarted), ("run_subtask", fresh)])
    assert store.get_subtask(exhausted)["status"] == Status.FAILED
    assert "given up by the sweep" in store.get_subtask(exhausted)["error"]
    assert store.get_subtask(unstarted)["attempts"] == 2  # the resumption counts as an attempt


@on_both_stores
def test_the_sweep_finalises_a_task_whose_finaliser_died(pipe: Pipeline) -> None:
    (a,) = pipe.add_task("t", 1)
    store = pipe.ctx.store
    assert store.finish_subtask(a, Status.COMPLETED, result="http://x/a.png").finalised
    # As if the finaliser had died after counting (MongoStore's two writes): counters complete,
    # the task still processing.
    store.set_task_fields("t", status=Status.PROCESSING, completed_at=None)
    master = pipe.ctx.settings.queue("master").name
    pipe.ctx.redis.delete(queue_key(master), bodies_key(master))
    assert sweep(pipe.ctx)["finalised"] == 1
    assert store.get_task("t")["status"] == Status.COMPLETED
    notices = [json.loads(m) for m in pipe.ctx.redis.hvals(bodies_key(master))]
    assert [(m["actor_name"], m["args"]) for m in notices] == [("send_notice", ["t", "completed"])]
    assert sweep(pipe.ctx)["finalised"] == 0  # once


@on_both_stores
def test_the_sweep_repairs_counters_a_lost_increment_left_short(pipe: Pipeline) -> None:
    """A finish whose increment never landed (MongoStore's two writes; by hand elsewhere) leaves the
    task processing for ever: once it has been still for the grace, the sweep sets its counters to
    the recount, finalises it and enqueues its final notice, once."""
    a, b = pipe.add_task("t", 2, queue=False)
    store = pipe.ctx.store
    finish(pipe.ctx, subtask(pipe, a), Status.COMPLETED, result="http://x/a.png")
    assert store.finish_subtask(b, Status.FAILED, error="boom").finalised
    store.set_task_fields("t", status=Status.PROCESSING, completed_at=None, processed_images=1, failed_images=0)
    master = pipe.ctx.settings.queue("master").name
    pipe.ctx.redis.delete(queue_key(master), bodies_key(master))
    assert sweep(pipe.ctx)["repaired"] == 0  # within the grace: a finisher may be between its writes
    assert sweep(pipe.ctx, repair_after_seconds=-1)["repaired"] == 1
    task = store.get_task("t")
    assert task is not None and task["status"] == Status.COMPLETED and task["error"].startswith("partially")
    assert {k: task[k] for k in store.recount("t")} == store.recount("t")
    assert master_notices(pipe) == [["t", "partially_completed"]]
    assert sweep(pipe.ctx, repair_after_seconds=-1)["repaired"] == 0  # once


def test_the_sweep_enqueues_a_final_notice_its_finaliser_never_sent(pipe: Pipeline) -> None:
    """A finaliser that died between the store update and the enqueue (a sweep, or `nietest cancel`)
    leaves no message to redeliver: the sweep sends the notice of a task that ended 1-60 minutes ago."""
    (a,) = pipe.add_task("t", 1)
    store = pipe.ctx.store
    assert store.finish_subtask(a, Status.COMPLETED, result="http://x/a.png").finalised  # no notice enqueued
    master = pipe.ctx.settings.queue("master").name

    def notices() -> list[tuple[str, list[str]]]:
        return [(m["actor_name"], m["args"]) for m in map(json.loads, pipe.ctx.redis.hvals(bodies_key(master)))]

    sweep(pipe.ctx)
    assert notices() == []  # it ended less than a minute ago: its finaliser may still be at it
    store.set_task_fields("t", completed_at=store.get_task("t")["completed_at"] - timedelta(minutes=5))
    sweep(pipe.ctx)
    assert notices() == [("send_notice", ["t", "completed"])]
    sweep(pipe.ctx)
    assert len(notices()) == 1  # once


def test_a_create_of_a_live_process_is_waited_for_and_a_dead_ones_is_never_repeated(pipe: Pipeline) -> None:
    """The create marker names the process that sent the request. A second delivery (a copy
    redelivered after a broker blip) waits while that process lives; once it is gone, the
    subtask fails rather than pay for a second image."""
    (a,) = pipe.add_task("t", 1)
    client = pipe.ctx.redis
    client.set(keys.create_sent(a), "otherhost:42:cafe0123")
    client.set(keys.alive("otherhost:42:cafe0123"), "1", ex=60)
    run_subtask(a)
    assert pipe.messages(delayed=True) == [("run_subtask", a)]  # looks again later
    assert pipe.ctx.store.get_subtask(a)["status"] == Status.PROCESSING and pipe.api.jobs == []

    client.delete(keys.alive("otherhost:42:cafe0123"))  # that process died
    run_subtask(a)
    sub = pipe.ctx.store.get_subtask(a)
    assert sub["status"] == Status.FAILED and sub["error"] == CREATE_INTERRUPTED
    assert pipe.api.jobs == []  # no second create


def test_an_end_of_create_cut_off_by_the_broker_is_made_again_by_the_housekeeping(pipe: Pipeline) -> None:
    """A run cut off by a broker outage (a failover) before its create went out: its marker must not
    make every later run wait for a create that is not in flight while this process lives."""
    (a,) = pipe.add_task("t", 1)
    client = pipe.ctx.redis
    client.set(keys.create_sent(a), markers.process_token())
    client.set(keys.creating(a), "msg-1")
    away = redis.Redis(unix_socket_path="/nonexistent/broker.sock", retry=Retry(NoBackoff(), 0))
    with pytest.raises(redis.ConnectionError):
        markers.end_create(away, a, "msg-1", clear_create_sent=True, poll="poll-1")
    assert client.exists(keys.create_sent(a), keys.creating(a)) == 2
    with pytest.raises(redis.ConnectionError):
        markers.end_pending_creates(away)  # still away: kept for the next round
    assert markers.end_pending_creates(client) == 1
    assert not client.exists(keys.create_sent(a), keys.creating(a), keys.poll_chain(a))  # no stale poll made current
    assert markers.end_pending_creates(client) == 0
    run_subtask(a)
    assert len(pipe.api.requests_to("create")) == 1


def test_the_create_marker_is_cleared_once_the_job_is_stored(pipe: Pipeline) -> None:
    (a,) = pipe.add_task("t", 1)
    run_subtask(a)
    assert pipe.ctx.store.get_subtask(a)["job_uuid"] and len(pipe.api.jobs) == 1
    assert not pipe.ctx.redis.exists(keys.create_sent(a))


# --- failure streaks ---------------------------------------------------------------------------------


def test_a_run_of_failures_is_reported_once_and_its_end_once(client: redis.Redis) -> None:
    q = "nietest_subtask"
    assert streaks.record(client, q, True, threshold=3) == 0
    assert streaks.drain_events(client) == []  # success without a run: nothing to report
    for i in range(1, 3):
        assert streaks.record(client, q, False, f"error {i}", threshold=3) == i
    assert streaks.drain_events(client) == []  # below the threshold
    assert streaks.record(client, q, False, "error 3", threshold=3) == 3
    assert streaks.record(client, q, False, "x" * 1000, threshold=3) == 4  # no second event for the same run
    events = streaks.drain_events(client)
    assert len(events) == 1
    assert events[0].KIND == "failure_run" and events[0].queue == q and events[0].failures == 3
    assert events[0].errors == ("error 3", "error 2", "error 1")  # newest first
    current = streaks.current(client, q)
    assert current["failures"] == 4 and current["errors"][0] == "x" * streaks.MAX_ERROR_CHARS

    assert streaks.record(client, q, True, threshold=3) == 0
    events = streaks.drain_events(client)
    assert [(e.KIND, e.failures) for e in events] == [("recovered", 4)]
    assert streaks.current(client, q) == {"queue": q, "failures": 0, "errors": []}
    assert streaks.drain_events(client) == []  # drained


def test_streaks_are_per_queue_and_safe_from_many_threads(client: redis.Redis) -> None:
    def fail(queue: str) -> None:
        for _ in range(50):
            streaks.record(client, queue, False, "boom", threshold=100)

    threads = [threading.Thread(target=fail, args=(q,)) for q in ("a", "a", "b", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert streaks.current(client, "a")["failures"] == 100
    assert streaks.current(client, "b")["failures"] == 100
    events = streaks.drain_events(client)
    assert sorted((e.KIND, e.queue) for e in events) == [("failure_run", "a"), ("failure_run", "b")]
    streaks.record(client, "a", True, threshold=100)
    assert streaks.current(client, "b")["failures"] == 100  # a's success does not end b's run
    assert [e.queue for e in streaks.drain_events(client)] == ["a"]


def test_the_sweep_runs_once_per_round_however_many_sweepers(pipe: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every master process of every daemon runs a sweeper; the broker lock lets one sweep a round."""
    rounds: list[float] = []
    monkeypatch.setattr(sweep_module, "sweep", lambda ctx, **_: rounds.append(time.monotonic()) or {})
    stop = threading.Event()
    sweepers = [threading.Thread(target=sweep_module.run_sweeper, args=(stop, 0.1)) for _ in range(4)]
    for t in sweepers:
        t.start()
    wait_for(lambda: len(rounds) >= 2, 10, what="two sweep rounds")
    stop.set()
    for t in sweepers:
        t.join(5)
    # 4 sweepers waking every ~0.1 s would sweep ~40 times a second; the lock (at least 1 s) allows one.
    gaps = [b - a for a, b in zip(rounds, rounds[1:], strict=False)]
    assert all(gap >= 0.9 for gap in gaps), gaps


# --- retry (nietest retry) ----------------------------------------------------------------------------


def master_notices(pipe: Pipeline) -> list[list[Any]]:
    master = pipe.ctx.settings.queue("master").name
    bodies = [json.loads(m) for m in pipe.ctx.redis.hvals(bodies_key(master))]
    return sorted(m["args"] for m in bodies if m["actor_name"] == "send_notice")


@on_both_stores
def test_retry_runs_only_the_failed_subtasks_through_the_job_slots(pipe: Pipeline) -> None:
    from nietest_daemon.pipeline.retry import retry_task

    a, b, c = pipe.add_task("t", 3, queue=False)
    store, client = pipe.ctx.store, pipe.ctx.redis
    for sid, status in ((a, Status.COMPLETED), (b, Status.FAILED), (c, Status.FAILED)):
        finish(pipe.ctx, subtask(pipe, sid), status, result="http://x/a.png" if sid == a else None, error="boom")
    assert store.get_task("t")["status"] == Status.COMPLETED and master_notices(pipe) == [["t", "partially_completed"]]
    client.set(keys.create_sent(b), "deadhost:1:feed")  # b's create died in doubt: it failed, never paid twice
    client.sadd(keys.timeouts(c), "job-c")

    result = retry_task(pipe.ctx, "t")
    assert result.outcome.reopened and result.outcome.round == 2 and result.outcome.reset == 2
    task = store.get_task("t")
    assert task["status"] == Status.PROCESSING and (task["failed_images"], task["processed_images"]) == (0, 1)
    assert not client.exists(keys.create_sent(b), keys.timeouts(c), keys.notice_final_queued("t", 2))
    assert client.exists(keys.notice_final_queued("t"))  # round 1's stays: each round has its own
    assert client.get(keys.poll_chain(b)) == markers.RETRIED_CHAIN.encode()  # no older poll may act
    assert not client.exists(keys.retry_lock("t"))  # released
    # One job slot (NIETEST_MAX_JOBS=1): b is admitted and gets its run message, c waits in line; a never runs.
    assert pipe.woken() == [b] and holders(pipe) == [b] and waiting(pipe) == 1
    run_subtask(b)
    assert len(pipe.api.jobs) == 1 and store.get_subtask(b)["job_uuid"] == pipe.api.jobs[0].uuid
    assert store.get_subtask(b)["error_history"][0]["error"] == "boom"

    # Round 2 ends with its own final notice (the round's number rides along from round 2 on).
    finish(pipe.ctx, subtask(pipe, b), Status.COMPLETED, result="http://x/b.png")
    finish(pipe.ctx, subtask(pipe, c), Status.COMPLETED, result="http://x/c.png")
    assert store.get_task("t")["status"] == Status.COMPLETED and store.get_task("t")["completed_images"] == 3
    assert master_notices(pipe) == [["t", "completed", 2], ["t", "partially_completed"]]
    assert keys.notice("t", "completed", 2) != keys.notice("t", "completed")
    assert client.exists(keys.notice_final_queued("t", 2))


def test_retry_refusals(pipe: Pipeline) -> None:
    from nietest_daemon.pipeline.retry import RetryRefused, retry_task

    with pytest.raises(RetryRefused, match="no task nope"):
        retry_task(pipe.ctx, "nope")
    a, b = pipe.add_task("t", 2)
    finish(pipe.ctx, subtask(pipe, a), Status.FAILED, error="boom")
    with pytest.raises(RetryRefused, match=r"task t is still running \(processing\): retry it once it has finished$"):
        retry_task(pipe.ctx, "t")
    finish(pipe.ctx, subtask(pipe, b), Status.COMPLETED, result="http://x/b.png")
    with pytest.raises(RetryRefused, match="has no cancelled subtasks to run again"):
        retry_task(pipe.ctx, "t", [Status.CANCELLED])
    # A task whose master failed half-way through the expansion has fewer subtasks than images.
    pipe.ctx.store.create_task({"id": "half", "name": "half", "total_images": 3})
    pipe.ctx.store.insert_subtasks("half", [{"id": "half:0", "variable_indices": [0]}])
    pipe.ctx.store.fail_task("half", "unexpected error: out of memory")
    pipe.ctx.store.cancel_task("half")
    with pytest.raises(RetryRefused, match="has 1 of its 3 subtasks .*out of memory.*submit it again"):
        retry_task(pipe.ctx, "half", ["failed", "cancelled"])
    assert not any(sid.startswith("half") for sid in pipe.woken()) and pipe.api.jobs == []


def test_the_command_refuses_with_a_clear_message(pipe: Pipeline, capsys: pytest.CaptureFixture[str]) -> None:
    from nietest_daemon.programs import task_commands

    pipe.add_task("t", 1, queue=False)
    assert task_commands.retry(pipe.ctx.settings, "missing", failed=True, cancelled=False) == 2
    assert capsys.readouterr().err == "nietest: no task missing\n"
    assert task_commands.retry(pipe.ctx.settings, "t", failed=False, cancelled=True) == 2
    assert "nietest: task t is still running (processing)" in capsys.readouterr().err
    pipe.ctx.redis.set(keys.retry_lock("t"), "another-retry", ex=60)
    assert task_commands.retry(pipe.ctx.settings, "t", failed=True, cancelled=False) == 2
    assert capsys.readouterr().err.startswith("nietest: another retry of task t is in progress")


@on_both_stores
def test_a_retry_interrupted_before_it_queued_is_finished_by_the_sweep_or_a_second_retry(pipe: Pipeline) -> None:
    from nietest_daemon.pipeline.retry import RetryRefused, retry_task

    a, b = pipe.add_task("t", 2, queue=False)
    finish(pipe.ctx, subtask(pipe, a), Status.FAILED, error="boom")
    finish(pipe.ctx, subtask(pipe, b), Status.COMPLETED, result="http://x/b.png")
    # As if `nietest retry` had died after the store update, before it queued anything.
    assert pipe.ctx.store.retry_subtasks("t").reopened
    assert pipe.woken() == [] and waiting(pipe) == 0
    with pytest.raises(RetryRefused, match="still running.*were queued") as refused:
        retry_task(pipe.ctx, "t")
    assert refused.value.repaired and pipe.woken() == [a]
    assert sweep(pipe.ctx)["requeued"] == 0  # in line already; the sweep would have done the same
    pipe.clear()
    pipe.ctx.redis.delete(pipe.ctx.schedulers[Lane.STANDARD].holders)
    assert sweep(pipe.ctx)["requeued"] == 1 and pipe.woken() == [a]


def _set_completed_at(pipe: Pipeline, task_id: str, ago: timedelta) -> None:
    """Move the end of a finished task into the past."""
    store = pipe.ctx.store
    store.set_task_fields(task_id, completed_at=store.get_task(task_id)["completed_at"] - ago)


def test_a_second_retry_of_a_task_is_refused_while_the_first_holds_its_lock(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two retries with different status sets must not interleave (with MongoDB, the second would
    move subtasks to pending behind the counters the first recounted): the second is refused
    before it touches anything, whether it comes while the first is half-way or before it."""
    from nietest_daemon.pipeline.retry import RetryRefused, retry_task

    a, b, c = pipe.add_task("t", 3, queue=False)
    store, client = pipe.ctx.store, pipe.ctx.redis
    finish(pipe.ctx, subtask(pipe, a), Status.FAILED, error="boom")
    finish(pipe.ctx, subtask(pipe, b), Status.CANCELLED, error="task cancelled")
    client.set(keys.create_sent(b), "deadhost:1:feed")
    assert store.finish_subtask(c, Status.COMPLETED, result="http://x/c.png").finalised  # its notice never enqueued
    before = master_notices(pipe)

    # Held by another `nietest retry` (the lock is in the broker: any process): refused, nothing touched.
    client.set(keys.retry_lock("t"), "another-retry", ex=60)
    with pytest.raises(RetryRefused, match="another retry of task t is in progress"):
        retry_task(pipe.ctx, "t", [Status.CANCELLED])
    assert master_notices(pipe) == before and client.exists(keys.create_sent(b))
    assert not client.exists(keys.poll_chain(b)) and store.get_subtask(b)["status"] == Status.CANCELLED
    assert client.get(keys.retry_lock("t")) == b"another-retry"  # not ours: left alone
    client.delete(keys.retry_lock("t"))

    # A second retry (--cancelled) while the first (--failed) is between its markers and the store.
    refusals: list[str] = []
    real = store.retry_subtasks

    def half_way(task_id: str, statuses: Any = (Status.FAILED,)) -> Any:
        with pytest.raises(RetryRefused) as refused:
            retry_task(pipe.ctx, "t", [Status.CANCELLED])
        refusals.append(str(refused.value))
        return real(task_id, statuses)

    monkeypatch.setattr(store, "retry_subtasks", half_way)
    result = retry_task(pipe.ctx, "t", [Status.FAILED])
    assert refusals == ["another retry of task t is in progress; try again once it has finished"]
    assert result.outcome.reopened and result.outcome.reset == 1
    assert store.get_subtask(b)["status"] == Status.CANCELLED and client.exists(keys.create_sent(b))
    task = store.get_task("t")
    assert (task["status"], task["cancelled_images"], task["completed_images"]) == (Status.PROCESSING, 1, 1)
    assert store.recount("t")["cancelled_images"] == 1
    assert not client.exists(keys.retry_lock("t"))  # released at the end


def test_the_retry_lock_is_released_only_by_its_taker(client: redis.Redis) -> None:
    token = markers.take_retry_lock(client, "t")
    assert token is not None and markers.take_retry_lock(client, "t") is None
    assert 0 < client.ttl(keys.retry_lock("t")) <= markers.RETRY_LOCK_SECONDS
    # Expired and taken by another retry meanwhile: the first one's release leaves it.
    client.set(keys.retry_lock("t"), "someone-else")
    assert not markers.release_retry_lock(client, "t", token) and client.exists(keys.retry_lock("t"))
    assert markers.release_retry_lock(client, "t", "someone-else") and not client.exists(keys.retry_lock("t"))


def test_a_stale_poll_of_the_ended_round_does_not_act_after_a_retry(pipe: Pipeline) -> None:
    """The retry supersedes every older poll message of a retried subtask: a redelivered poll of
    round 1 must not send a run message past fair admission (one job slot, held by round 2)."""
    from nietest_daemon.pipeline.retry import retry_task

    (a,) = pipe.add_task("t", 1)
    pipe.api.add_rule("never")  # the job stays pending
    pipe.clear()
    run_subtask(a)
    first = pipe.ctx.redis.get(keys.poll_chain(a))
    assert first is not None
    finish(pipe.ctx, subtask(pipe, a), Status.FAILED, error="boom")  # its poll chain goes with it
    assert not pipe.ctx.redis.exists(keys.poll_chain(a))
    retry_task(pipe.ctx, "t")
    assert pipe.woken() == [a] and holders(pipe) == [a]  # admitted once, through the job slots
    pipe.clear()
    with running_as(pipe, "poll_subtask", a, first.decode()):  # round 1's poll, redelivered
        poll_subtask(a)
    assert pipe.messages() == [] and pipe.messages(delayed=True) == []
    # The round's own run goes on, and its first poll is the current one.
    run_subtask(a)
    assert pipe.messages(delayed=True) == [("poll_subtask", a)] and len(pipe.api.jobs) == 2
    assert pipe.ctx.redis.get(keys.poll_chain(a)) not in (None, first, markers.RETRIED_CHAIN.encode())


def test_each_round_has_its_own_final_notice_marker(pipe: Pipeline) -> None:
    """Round 1's finaliser was slow: a retry made up for its notice, then the finaliser enqueued it
    too (and marked round 1 done). Round 2's finaliser then died before its enqueue: the redelivered
    message of round 2's last subtask still sends round 2's notice; a stale round-1 message never
    speaks for round 2."""
    from nietest_daemon.pipeline.retry import retry_task

    a, b = pipe.add_task("t", 2, queue=False)
    store = pipe.ctx.store
    store.finish_subtask(a, Status.COMPLETED, result="http://x/a.png")
    ended = store.finish_subtask(b, Status.FAILED, error="boom")  # finalised; the notice not enqueued yet
    assert ended.finalised and ended.task is not None
    retry_task(pipe.ctx, "t")
    assert master_notices(pipe) == [["t", "partially_completed"]]  # made up for by the retry
    notices.task_finished(pipe.ctx, ended.task)  # the slow finaliser of round 1, at last
    assert store.finish_subtask(b, Status.COMPLETED, result="http://x/b.png").finalised  # round 2's dies here
    assert len(master_notices(pipe)) == 2  # round 1's, twice (posted once: `deliver`'s marker)

    notices.ensure_final(pipe.ctx, "t", 1)  # a stale message of round 1
    run_subtask(a)  # its subtask ended in round 1
    assert len(master_notices(pipe)) == 2
    run_subtask(b)  # the redelivered message of round 2's last subtask
    assert len(master_notices(pipe)) == 3 and ["t", "completed", 2] in master_notices(pipe)
    run_subtask(b)
    sweep(pipe.ctx)
    assert len(master_notices(pipe)) == 3  # once


def test_a_retry_makes_up_for_the_ending_rounds_notice_only_if_it_ended_lately(pipe: Pipeline) -> None:
    """A round that ended over an hour ago (the sweep's window) is no news: its markers may have
    expired (after 7 days), and the retry must not post its notice again."""
    from nietest_daemon.pipeline.retry import retry_task

    client = pipe.ctx.redis
    for task_id, ago in (("old", timedelta(days=8)), ("hour", timedelta(minutes=61)), ("new", timedelta(minutes=5))):
        (sid,) = pipe.add_task(task_id, 1, queue=False)
        finish(pipe.ctx, subtask(pipe, sid), Status.FAILED, error="boom")  # its notice enqueued
        _set_completed_at(pipe, task_id, ago)
    for task_id in ("old", "new"):  # their markers expired (or their finaliser died before its enqueue)
        client.delete(keys.notice_final_queued(task_id))
    master = pipe.ctx.settings.queue("master").name
    client.delete(queue_key(master), bodies_key(master))
    for task_id in ("old", "hour", "new"):
        assert retry_task(pipe.ctx, task_id).outcome.reopened
    assert master_notices(pipe) == [["new", "failed"]]


def test_a_late_final_notice_shows_its_own_round(pipe: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """The final notice's message carries the round as it ended: delivered after a retry reopened
    the task, its card still shows that round's counts, not the next round's."""
    from nietest_daemon.pipeline.retry import retry_task

    cards: list[list[str]] = []

    def send_card(title: str, content: Any, severity: str = "info", **kwargs: Any) -> SendResult:
        cards.append([title, *content])
        return SendResult(True, 1)

    monkeypatch.setattr(pipe.ctx.notifier, "send_card", send_card)
    a, b, c = pipe.add_task("t", 3, queue=False)
    for sid, status in ((a, Status.COMPLETED), (b, Status.FAILED), (c, Status.FAILED)):
        finish(pipe.ctx, subtask(pipe, sid), status, result="http://x/a.png" if sid == a else None, error="boom")
    master = pipe.ctx.settings.queue("master").name
    [message] = [json.loads(m) for m in pipe.ctx.redis.hvals(bodies_key(master))]
    assert message["kwargs"]["snapshot"]["failed_images"] == 2
    retry_task(pipe.ctx, "t")  # round 2: failed 0, the task processing
    notices.deliver(pipe.ctx, *message["args"], **message["kwargs"])  # round 1's notice, late
    [card] = cards
    assert card[0] == "Task partially completed"
    assert (
        "completed 1 · failed 2 · cancelled 0 of 3" in card
        and "note: partially completed: 2 of 3 images failed" in card
    )
    # A message enqueued before snapshots existed: the task as read.
    notices.deliver(pipe.ctx, "t", "failed", 1)
    assert "completed 1 · failed 0 · cancelled 0 of 3" in cards[1]
