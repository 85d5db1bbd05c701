"""The seed's producer actor, `test_submit_master(task_id, task_data)`, in this process.

A private valkey-server (the real Dramatiq Redis broker: the messages it enqueues are read back
from valkey, not run) and a real SQLite store. The end-to-end run, a message enqueued as the seed's
back end does on a running daemon, is tests/test_producer_e2e.py.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dramatiq
import dramatiq.broker
import pytest

from nietest_daemon.core import settings as settings_module
from nietest_daemon.domain.lifecycle import Status
from nietest_daemon.internals.dramatiq_redis import bodies_key, queue_key
from nietest_daemon.internals.message_checks import arguments_problem
from nietest_daemon.pipeline import context as context_module
from nietest_daemon.pipeline.broker import build_broker
from nietest_daemon.pipeline.context import Context, build_context
from nietest_daemon.pipeline.messages import PROCESS_TASK, SEED_SUBMIT, SEND_NOTICE, ids_of
from nietest_daemon.pipeline.producer import INVALID_NAME, payload_digest, submit_from_producer
from nietest_daemon.testing.daemon import ROOT
from nietest_daemon.testing.valkey import PrivateValkey

TASK_ID = "3f2a9c1e-7b4d-4e2a-9c1f-0a1b2c3d4e5f"  # what the seed's back end makes: a uuid4 with dashes
EXAMPLE: dict[str, Any] = json.loads((ROOT / "examples" / "task.json").read_text())


def payload(**changes: Any) -> dict[str, Any]:
    """The front end's task JSON as the seed's back end sends it: the task, plus `user_id` and a field of its own."""
    return {**copy.deepcopy(EXAMPLE), "user_id": "alice", "front_end_version": "2.3.1", **changes}


@pytest.fixture
def ctx(valkey: PrivateValkey, short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Context]:
    settings = settings_module.load({"NIETEST_HOME": str(short_tmp), "BROKER_REDIS_URL": valkey.url})
    monkeypatch.setattr(dramatiq.broker, "global_broker", dramatiq.broker.global_broker)
    broker = build_broker(settings)
    context = build_context(settings)
    monkeypatch.setattr(context_module, "_context", context)
    yield context
    context.store.close()
    broker.close()


def master_messages(ctx: Context) -> list[tuple[str, list[Any]]]:
    """(actor, args) of the messages waiting on the master queue, in no particular order."""
    name = ctx.settings.queue("master").name
    return sorted((m["actor_name"], m["args"]) for m in map(json.loads, ctx.redis.hvals(bodies_key(name))))


def clear_master(ctx: Context) -> None:
    name = ctx.settings.queue("master").name
    ctx.redis.delete(queue_key(name), bodies_key(name))


def test_a_valid_payload_is_stored_under_its_id_with_its_owner_and_run_as_a_submitted_task(ctx: Context) -> None:
    submit_from_producer(TASK_ID, payload())

    task = ctx.store.get_task(TASK_ID)
    assert task is not None
    assert task["status"] == Status.PENDING and task["name"] == EXAMPLE["name"]
    assert task["total_images"] == 6  # examples/task.json: 3 styles x standard/Lumina
    assert task["owner"] == "alice"
    assert task["extra"] == {"user_id": "alice", "front_end_version": "2.3.1"}  # kept, not rejected
    assert task["payload_sha256"] == payload_digest(payload())
    assert master_messages(ctx) == [(PROCESS_TASK, [TASK_ID])]  # exactly what `nietest submit` enqueues


def test_owner_wins_over_user_id_and_no_owner_at_all_is_allowed(ctx: Context) -> None:
    submit_from_producer("t-owner", payload(owner="ci-bot"))
    submit_from_producer("t-nobody", {k: v for k, v in payload().items() if k != "user_id"})
    assert (ctx.store.get_task("t-owner") or {})["owner"] == "ci-bot"
    assert (ctx.store.get_task("t-nobody") or {})["owner"] is None


def test_a_redelivered_message_creates_nothing_twice_and_carries_on(ctx: Context) -> None:
    submit_from_producer(TASK_ID, payload())
    first = ctx.store.get_task(TASK_ID)
    clear_master(ctx)

    submit_from_producer(TASK_ID, payload())  # the same message again (its worker died after the store)

    assert ctx.store.get_task(TASK_ID) == first
    assert ctx.store.count_tasks()[Status.PENDING] == 1
    # The master message may have been lost with the first delivery: it is sent again (the master is idempotent).
    assert master_messages(ctx) == [(PROCESS_TASK, [TASK_ID])]


def test_a_different_payload_under_an_existing_id_is_refused_and_the_stored_task_left_alone(ctx: Context) -> None:
    submit_from_producer(TASK_ID, payload())
    stored = ctx.store.get_task(TASK_ID)
    clear_master(ctx)

    submit_from_producer(TASK_ID, payload(name="another campaign"))

    assert ctx.store.get_task(TASK_ID) == stored
    assert master_messages(ctx) == []


def test_a_finished_task_is_not_run_again_by_a_late_duplicate(ctx: Context) -> None:
    submit_from_producer(TASK_ID, payload())
    ctx.store.cancel_task(TASK_ID)
    clear_master(ctx)
    submit_from_producer(TASK_ID, payload())
    assert (ctx.store.get_task(TASK_ID) or {})["status"] == Status.CANCELLED
    assert master_messages(ctx) == []


@pytest.mark.parametrize(
    ("task_data", "field"),
    [
        (payload(prompts=[]), "prompts"),
        (payload(ratio={"type": "ratio", "value": "0:3", "is_variable": False}), "ratio"),
        (payload(priority="high"), "priority"),
        (payload(user_id="x" * 500), "user_id"),
        (payload(user_id="alice\nbob"), "user_id"),
        ({k: v for k, v in payload().items() if k != "name"}, "name"),
        ("not an object", "task_data"),
        (None, "task_data"),
    ],
    ids=["no-prompts", "bad-ratio", "bad-priority", "long-owner", "owner-line-break", "no-name", "string", "null"],
)
def test_an_invalid_payload_becomes_a_failed_task_naming_the_field_with_a_failed_notice(
    ctx: Context, task_data: Any, field: str
) -> None:
    submit_from_producer(TASK_ID, task_data)

    task = ctx.store.get_task(TASK_ID)
    assert task is not None, "an invalid payload must leave a trace the front end can see"
    assert task["status"] == Status.FAILED
    assert task["error"].startswith(f"invalid task: {field}"), task["error"]
    assert task["name"] in (EXAMPLE["name"], INVALID_NAME)
    assert master_messages(ctx) == [(SEND_NOTICE, [TASK_ID, "failed"])]

    clear_master(ctx)
    submit_from_producer(TASK_ID, task_data)  # redelivered: one failed task, one notice
    assert master_messages(ctx) == []
    assert ctx.store.count_tasks()[Status.FAILED] == 1


@pytest.mark.parametrize("task_id", ["", "a:b", "x" * 129, "../etc", " lead", 42, None])
def test_a_task_id_that_cannot_name_a_task_stores_nothing(ctx: Context, task_id: Any) -> None:
    submit_from_producer(task_id, payload())
    assert sum(ctx.store.count_tasks().values()) == 0
    assert master_messages(ctx) == []


def test_the_seed_back_ends_message_fits_the_actor_as_the_consumer_checks_it() -> None:
    actor = SimpleNamespace(actor_name=SEED_SUBMIT, fn=submit_from_producer)
    assert arguments_problem(actor, [], {"task_id": TASK_ID, "task_data": payload()}) is None  # type: ignore[arg-type]
    assert arguments_problem(actor, [TASK_ID, payload()], {}) is None  # type: ignore[arg-type]
    # Any task_data fits: an invalid one is stored as a failed task, never dead-lettered.
    assert arguments_problem(actor, [], {"task_id": TASK_ID, "task_data": "junk"}) is None  # type: ignore[arg-type]
    message = SimpleNamespace(actor_name=SEED_SUBMIT, args=(), kwargs={"task_id": TASK_ID, "task_data": {}})
    assert ids_of(message) == {"task_id": TASK_ID}  # log lines about the message name its task
