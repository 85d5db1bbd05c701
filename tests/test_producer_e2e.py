"""End to end: a producer written for the seed hands a running daemon a campaign, as it always did.

The seed's web back end enqueues one hand-built message by actor name with a plain Dramatiq
`RedisBroker`: actor `test_submit_master` on the master queue (it hard-codes `test_master`, so the
daemon runs with `STANDARD_QUEUE=test_master`), kwargs `{task_id, task_data}`, with no task stored
beforehand. Run on the embedded broker and on the machine's Redis (a database of its own), against
the fake Nieta API (both hosts: the example task has a Lumina half) and a fake Feishu bot.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dramatiq
import pytest
from dramatiq.brokers.redis import RedisBroker

from nietest_daemon.internals.dramatiq_redis import queue_stats
from nietest_daemon.store import Store, open_store_for
from nietest_daemon.testing import machine_redis
from nietest_daemon.testing.daemon import ROOT, Daemon
from nietest_daemon.testing.fake_feishu import FakeFeishu
from nietest_daemon.testing.fake_nieta import FakeNieta
from nietest_daemon.testing.waiting import wait_for

pytestmark = pytest.mark.e2e

SEED_QUEUE = "test_master"  # what the seed's back end hard-codes
EXAMPLE: dict[str, Any] = json.loads((ROOT / "examples" / "task.json").read_text())


@pytest.fixture(scope="module")
def api() -> Iterator[FakeNieta]:
    with FakeNieta(generation_time=0.2) as fake:
        yield fake


@pytest.fixture(scope="module")
def hook() -> Iterator[FakeFeishu]:
    with FakeFeishu() as fake:
        yield fake


@pytest.fixture(scope="module", params=["embedded", "machine-redis"])
def daemon(request: pytest.FixtureRequest, api: FakeNieta, hook: FakeFeishu) -> Iterator[Daemon]:
    home = Path(tempfile.mkdtemp(prefix="nt-", dir="/tmp"))
    env = {
        **api.env(),
        "STANDARD_QUEUE": SEED_QUEUE,
        "FEISHU_TASK_WEBHOOK_URL": hook.url,
        "NIETEST_MASTER_PROCESSES": "1",
        "NIETEST_MASTER_THREADS": "2",
        "NIETEST_SUBTASK_PROCESSES": "1",
        "NIETEST_SUBTASK_OPS_PROCESSES": "1",
        "NIETEST_DRAIN_SECONDS": "5",
        "NIETEST_MAX_JOBS": "3",
        "NIETEST_MAX_LUMINA_JOBS": "3",
        "IMAGE_POLLING_INTERVAL": "0.2",
        "LUMINA_POLLING_INTERVAL": "0.2",
    }
    with _broker(request.param) as broker_url:
        if broker_url:
            env["BROKER_REDIS_URL"] = broker_url
        d = Daemon(home, **env)
        try:
            d.start()
            yield d
            d.stop()
        finally:
            d.kill_everything()
            shutil.rmtree(home, ignore_errors=True)


class _NoBroker:
    def __enter__(self) -> str:
        return ""

    def __exit__(self, *exc: object) -> None:
        return None


def _broker(kind: str) -> Any:
    """The broker URL to give the daemon ("" for its embedded one)."""
    if kind == "embedded":
        return _NoBroker()
    why = machine_redis.available()
    if why:
        pytest.skip(why)
    return machine_redis.claimed_database()


@pytest.fixture(scope="module")
def store(daemon: Daemon) -> Iterator[Store]:
    s = open_store_for(daemon.settings)
    yield s
    s.close()


@pytest.fixture(scope="module")
def producer(daemon: Daemon) -> Iterator[RedisBroker]:
    """The seed's back end: a plain RedisBroker on the daemon's broker, no nietest code in between."""
    broker = RedisBroker(url=daemon.settings.broker_url)
    yield broker
    broker.close()


def send(producer: RedisBroker, task_id: str, task_data: Any) -> None:
    """Enqueue the seed's message exactly as its back end builds it: by actor name, kwargs only."""
    message: dramatiq.Message[Any] = dramatiq.Message(
        queue_name=SEED_QUEUE,
        actor_name="test_submit_master",
        args=(),
        kwargs={"task_id": task_id, "task_data": task_data},
        options={},
    )
    producer.enqueue(message)


def payload(**changes: Any) -> dict[str, Any]:
    return {**copy.deepcopy(EXAMPLE), "user_id": "alice", "client": {"page": "campaigns", "build": 812}, **changes}


def drained(daemon: Daemon) -> None:
    """Until every message on the master queue was handled (a message is counted until it is acked)."""

    def empty() -> bool:
        stats = queue_stats(daemon.redis, SEED_QUEUE)
        return stats["ready"] == 0 and stats["in_progress"] == 0 and stats["delayed"] == 0

    wait_for(empty, 30, what="master queue drained")


def ended(store: Store, task_id: str, timeout: float = 60.0) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        task = store.get_task(task_id)
        return task if task and task["status"] in ("completed", "failed", "cancelled") else None

    return wait_for(done, timeout, what=f"task {task_id} to end")


def notices(hook: FakeFeishu, task_id: str) -> list[dict[str, Any]]:
    return [m for m in hook.messages if isinstance(m, dict) and f"task id: {task_id}" in json.dumps(m)]


def title(message: dict[str, Any]) -> str:
    """A card's title without the `[host]` it starts with."""
    return str(message["card"]["header"]["title"]["content"]).split("] ", 1)[-1]


def test_the_seed_back_ends_message_runs_a_campaign_end_to_end_both_lanes(
    daemon: Daemon, store: Store, producer: RedisBroker, api: FakeNieta, hook: FakeFeishu
) -> None:
    task_id = str(uuid.uuid4())
    creates_before = len(api.requests_to("create"))
    assert store.get_task(task_id) is None  # no row exists before the message runs

    send(producer, task_id, payload())

    task = ended(store, task_id)
    assert task["status"] == "completed", task
    assert (task["total_images"], task["completed_images"]) == (6, 6)
    assert task["owner"] == "alice"
    assert task["extra"] == {"user_id": "alice", "client": {"page": "campaigns", "build": 812}}
    subs = store.list_subtasks(task_id)
    assert sorted(s["is_lumina"] for s in subs) == [False] * 3 + [True] * 3
    creates = api.requests_to("create")[creates_before:]
    assert len(creates) == 6 and sum(r.ops for r in creates) == 3  # one job per image; half on the Lumina host
    wait_for(lambda: len(notices(hook, task_id)) >= 2, 20, what="the submitted and completed notices")
    cards = notices(hook, task_id)
    assert [title(c) for c in cards] == ["Task submitted", "Task completed"]
    assert all("owner: alice" in json.dumps(c) for c in cards)

    shown = json.loads(daemon.run("status", task_id, "--json").stdout)
    assert shown["owner"] == "alice" and shown["status"] == "completed"
    mine = json.loads(daemon.run("tasks", "--owner", "alice", "--json").stdout)
    assert task_id in [t["id"] for t in mine]

    # The same message again (a redelivery, a double click): nothing is created or paid twice.
    send(producer, task_id, payload())
    drained(daemon)
    assert len(api.requests_to("create")) == creates_before + 6
    assert store.get_task(task_id) == task
    assert len(notices(hook, task_id)) == 2


def test_another_payload_under_a_used_id_is_refused_and_logged(
    daemon: Daemon, store: Store, producer: RedisBroker
) -> None:
    task_id = str(uuid.uuid4())
    send(producer, task_id, payload(name="first"))
    first = ended(store, task_id)

    send(producer, task_id, payload(name="second"))
    drained(daemon)

    assert store.get_task(task_id) == first

    def refused() -> bool:
        return any(
            "producer message refused" in line and task_id in line
            for path in daemon.log_files()
            for line in path.read_text(errors="replace").splitlines()
        )

    wait_for(refused, 10, what="the refusal in the master worker's log")


def test_an_invalid_payload_is_a_failed_task_naming_the_field_with_a_failed_notice(
    daemon: Daemon, store: Store, producer: RedisBroker, hook: FakeFeishu
) -> None:
    task_id = str(uuid.uuid4())
    bad = payload()
    bad["prompts"][1]["variable_values"][2]["weight"] = "heavy"

    send(producer, task_id, bad)

    task = ended(store, task_id, timeout=30)
    assert task["status"] == "failed"
    assert task["error"].startswith("invalid task: prompts[1].variable_values[2].weight"), task["error"]
    assert task["owner"] == "alice"
    wait_for(lambda: notices(hook, task_id), 20, what="the failed notice")
    assert [title(c) for c in notices(hook, task_id)] == ["Task failed"]
    assert "prompts[1].variable_values[2].weight" in json.dumps(notices(hook, task_id)[0])
    dead = queue_stats(daemon.redis, SEED_QUEUE)["dead"]
    assert dead == 0  # never dead-lettered
