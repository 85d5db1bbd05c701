"""The middlewares that decide what becomes of a failed message: `BrokerAwareRetries` (retry it
when the broker was unreachable, whatever MAX_RETRIES says) and `CatchExceptions` (a message
failed for good fails its subtask or task, unless the broker was to blame).

Driven without a worker process: the broker of every nietest process (`build_broker`, its whole
middleware stack in its order) on a private valkey-server, a SQLite store, actors named like the
pipeline's whose bodies raise what the test says, and real messages, processed as a Dramatiq
worker thread processes them (`process` below). What a retry leaves is read back from valkey.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dramatiq
import dramatiq.broker
import pytest
import redis
import structlog
from dramatiq.broker import MessageProxy

from nietest_daemon.core import settings as settings_module
from nietest_daemon.core.settings import Settings
from nietest_daemon.domain.subtask import Lane
from nietest_daemon.internals.dramatiq_redis import bodies_key, delay_queue_name
from nietest_daemon.pipeline import context as context_module
from nietest_daemon.pipeline.broker import build_broker
from nietest_daemon.pipeline.context import Context, build_context
from nietest_daemon.pipeline.messages import PROCESS_TASK, RUN_SUBTASK, SEND_NOTICE
from nietest_daemon.pipeline.middleware import broker_aware_retries
from nietest_daemon.pipeline.middleware.broker_aware_retries import BROKER_ERROR_RETRIES
from nietest_daemon.testing.valkey import PrivateValkey

MAX_RETRIES = 1
OUTAGES = [redis.ConnectionError("Error 111 connecting to the broker"), redis.TimeoutError("Timeout reading")]


@dataclass
class Stack:
    settings: Settings
    ctx: Context
    broker: dramatiq.Broker
    failure: list[BaseException] = field(default_factory=list)  # what the actors raise

    @property
    def subtask_queue(self) -> str:
        return self.settings.queue("subtask").name

    @property
    def master_queue(self) -> str:
        return self.settings.queue("master").name

    def declare_actors(self, broker: dramatiq.Broker) -> None:
        """`process_task` and `run_subtask`, as pipeline/actors.py declares them, raising `failure`."""

        def fail(*args: Any) -> None:
            raise self.failure[0]

        for name, queue in ((PROCESS_TASK, self.master_queue), (RUN_SUBTASK[Lane.STANDARD], self.subtask_queue)):
            dramatiq.actor(fail, actor_name=name, queue_name=queue, broker=broker, max_retries=MAX_RETRIES)

    def add_task(self, task_id: str, n: int) -> list[str]:
        """A running task of `n` subtasks, the first one running (processing)."""
        store = self.ctx.store
        store.create_task({"id": task_id, "name": task_id, "total_images": n, "priority": 1})
        ids = [f"{task_id}:{i}" for i in range(n)]
        docs = [
            {"id": sid, "variable_indices": [i], "prompts": [{"type": "freetext", "value": sid, "weight": 1.0}]}
            for i, sid in enumerate(ids)
        ]
        assert store.insert_subtasks(task_id, docs) == n
        assert store.mark_task_running(task_id)
        assert store.start_subtask(ids[0]) is not None
        return ids

    def status(self, subtask_id: str) -> tuple[str, str | None]:
        doc = self.ctx.store.get_subtask(subtask_id)
        assert doc is not None
        return doc["status"], doc.get("error")

    def waiting(self, queue: str) -> list[dict[str, Any]]:
        """The messages on `queue` (a delay queue: `delay_queue_name(...)`), decoded."""
        return [json.loads(raw) for raw in self.ctx.redis.hvals(bodies_key(queue))]


@pytest.fixture
def stack(valkey: PrivateValkey, short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    env = {"NIETEST_HOME": str(short_tmp), "BROKER_REDIS_URL": valkey.url, "MAX_RETRIES": str(MAX_RETRIES)}
    settings = settings_module.load(env)
    monkeypatch.setattr(dramatiq.broker, "global_broker", dramatiq.broker.global_broker)
    broker = build_broker(settings)
    ctx = build_context(settings)
    monkeypatch.setattr(context_module, "_context", ctx)
    made = Stack(settings, ctx, broker)
    made.declare_actors(broker)
    yield made
    ctx.store.close()
    ctx.notifier.close()
    broker.close()


def message(actor_name: str, queue: str, about: str, **options: Any) -> dramatiq.Message:
    return dramatiq.Message(queue_name=queue, actor_name=actor_name, args=(about,), kwargs={}, options=options)


def process(broker: dramatiq.Broker, fetched: dramatiq.Message) -> MessageProxy:
    """Run one fetched message through the broker's middleware and its actor, as a Dramatiq worker
    thread does (dramatiq.worker._WorkerThread.process_message): the hooks before, the actor, then
    the hooks after with its exception."""
    proxy = MessageProxy(fetched)
    broker.emit_before("process_message", proxy)
    try:
        broker.get_actor(proxy.actor_name)(*proxy.args, **proxy.kwargs)
    except BaseException as exc:
        proxy.stuff_exception(exc)
        broker.emit_after("process_message", proxy, exception=exc)
    else:
        broker.emit_after("process_message", proxy, result=None)
    return proxy


def events(captured: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [e for e in captured if e["event"] == event]


# --- an ordinary exception ------------------------------------------------------------------------


def test_an_error_with_retries_left_is_retried_later_and_its_subtask_left_running(stack: Stack) -> None:
    first, _ = stack.add_task("t-left", 2)
    stack.failure = [ValueError("boom")]
    with structlog.testing.capture_logs() as captured:
        done = process(stack.broker, message(RUN_SUBTASK[Lane.STANDARD], stack.subtask_queue, first))
    assert not done.failed
    (retry,) = stack.waiting(delay_queue_name(stack.subtask_queue))  # Dramatiq's own retry, after a backoff
    assert retry["message_id"] == done.message_id and retry["options"]["retries"] == 1
    assert "broker_error_retries" not in retry["options"]
    assert stack.status(first) == ("processing", None)
    assert not events(captured, "marked failed after an unexpected error")


def test_an_error_past_max_retries_fails_the_message_and_its_subtask(stack: Stack) -> None:
    first, second = stack.add_task("t-out", 2)
    stack.failure = [ValueError("boom")]
    with structlog.testing.capture_logs() as captured:
        done = process(
            stack.broker, message(RUN_SUBTASK[Lane.STANDARD], stack.subtask_queue, first, retries=MAX_RETRIES)
        )
    assert done.failed
    assert stack.waiting(delay_queue_name(stack.subtask_queue)) == []  # no retry
    assert stack.status(first) == ("failed", "unexpected error: ValueError: boom")
    assert stack.status(second) == ("pending", None)  # the task's other subtasks run on
    (line,) = events(captured, "marked failed after an unexpected error")
    assert line["subtask_id"] == first and line["error"] == "ValueError: boom"


def test_process_task_failing_for_good_fails_the_task_and_cancels_its_subtasks(stack: Stack) -> None:
    ids = stack.add_task("t-master", 3)
    stack.failure = [RuntimeError("expansion exploded")]
    with structlog.testing.capture_logs() as captured:
        done = process(stack.broker, message(PROCESS_TASK, stack.master_queue, "t-master", retries=MAX_RETRIES))
    assert done.failed
    task = stack.ctx.store.get_task("t-master")
    assert task is not None
    assert (task["status"], task["error"]) == ("failed", "unexpected error: RuntimeError: expansion exploded")
    assert [stack.status(i)[0] for i in ids] == ["processing", "cancelled", "cancelled"]  # pending ones cancelled
    notices = [m for m in stack.waiting(stack.master_queue) if m["actor_name"] == SEND_NOTICE]
    assert [m["args"][0] for m in notices] == ["t-master"]  # the final notice
    (line,) = events(captured, "marked failed after an unexpected error")
    assert line["task_id"] == "t-master"


# --- a broker outage ------------------------------------------------------------------------------


@pytest.mark.parametrize("outage", OUTAGES, ids=type)
def test_a_broker_outage_is_retried_whatever_max_retries_says(stack: Stack, outage: Exception) -> None:
    first, _ = stack.add_task("t-blink", 2)
    stack.failure = [outage]
    fetched = message(RUN_SUBTASK[Lane.STANDARD], stack.subtask_queue, first, retries=MAX_RETRIES)
    with structlog.testing.capture_logs() as captured:
        done = process(stack.broker, fetched)
    assert not done.failed  # although the message has no ordinary retry left
    (retry,) = stack.waiting(delay_queue_name(stack.subtask_queue))
    assert retry["message_id"] == done.message_id
    assert retry["options"]["broker_error_retries"] == 1 and retry["options"]["retries"] == MAX_RETRIES
    assert stack.status(first) == ("processing", None)
    (line,) = events(captured, "broker unreachable during the message; retrying it")
    assert line["subtask_id"] == first and line["error"] == str(outage) and 0 < line["retry_in_ms"] <= 1000


def test_a_broker_outage_past_its_own_budget_fails_the_message_but_leaves_the_subtask_to_the_sweep(
    stack: Stack,
) -> None:
    first, _ = stack.add_task("t-long", 2)
    stack.failure = [redis.ConnectionError("Connection refused")]
    options = {"retries": MAX_RETRIES, "broker_error_retries": BROKER_ERROR_RETRIES}
    with structlog.testing.capture_logs() as captured:
        done = process(stack.broker, message(RUN_SUBTASK[Lane.STANDARD], stack.subtask_queue, first, **options))
    assert done.failed  # the ordinary retries decided, and they were spent
    assert stack.waiting(delay_queue_name(stack.subtask_queue)) == []
    assert stack.status(first) == ("processing", None)  # not the subtask's fault: the sweep resumes it
    (line,) = events(captured, "broker unreachable during the message; left for the sweep")
    assert line["subtask_id"] == first
    assert not events(captured, "marked failed after an unexpected error")


def test_a_broker_outage_whose_retry_cannot_be_enqueued_is_dead_lettered_past_the_patience(
    stack: Stack, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker is still down when the retry copy is to be enqueued: past the patience the message
    is failed (dead-lettered by Dramatiq, not lost), and its subtask is still left to the sweep."""
    first, _ = stack.add_task("t-down", 2)
    down_settings = settings_module.load(
        {"NIETEST_HOME": str(short_tmp), "BROKER_REDIS_URL": f"unix://{short_tmp}/no-broker.sock"}
    )
    down = build_broker(down_settings)  # the same middleware, on a broker that does not answer
    stack.declare_actors(down)
    monkeypatch.setattr(broker_aware_retries, "BROKER_ENQUEUE_PATIENCE_SECONDS", 0.0)
    stack.failure = [redis.ConnectionError("Connection refused")]
    with structlog.testing.capture_logs() as captured:
        done = process(down, message(RUN_SUBTASK[Lane.STANDARD], stack.subtask_queue, first))
    down.close()
    assert done.failed
    assert events(captured, "broker unreachable during the message; retrying it")
    (dead,) = events(captured, "broker unreachable; message dead-lettered")
    assert dead["subtask_id"] == first
    assert stack.status(first) == ("processing", None)
    assert events(captured, "broker unreachable during the message; left for the sweep")


def test_a_message_that_succeeds_is_neither_retried_nor_marked(stack: Stack) -> None:
    first, _ = stack.add_task("t-ok", 2)
    fine = dramatiq.actor(
        lambda subtask_id: None, actor_name="fine", queue_name=stack.subtask_queue, broker=stack.broker
    )
    with structlog.testing.capture_logs() as captured:
        done = process(stack.broker, message(fine.actor_name, stack.subtask_queue, first))
    assert not done.failed
    assert stack.waiting(delay_queue_name(stack.subtask_queue)) == []
    assert stack.status(first) == ("processing", None)
    assert [e["event"] for e in captured if e.get("log_level") in ("warning", "error")] == []
