"""`nietest status`: the hosts on the broker (programs/overview.py), against a private valkey-server
with real host records (coordination/hosts.py) and messages fetched by a real broker."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import dramatiq
import pytest
import redis

from nietest_daemon.coordination import hosts, keys, lifelines
from nietest_daemon.coordination.hosts import HostRecord
from nietest_daemon.core import settings as settings_module
from nietest_daemon.domain.subtask import Lane
from nietest_daemon.internals.dramatiq_redis import NietestRedisBroker, delay_queue_name, process_identity
from nietest_daemon.pipeline.messages import POLL_SUBTASK, PROCESS_TASK, RUN_SUBTASK
from nietest_daemon.programs import overview
from nietest_daemon.testing.valkey import PrivateValkey

LOST = 5.0


@pytest.fixture
def settings(valkey: PrivateValkey, short_tmp: Path) -> settings_module.Settings:
    return settings_module.load(
        {
            "NIETEST_HOME": str(short_tmp),
            "BROKER_REDIS_URL": valkey.url,
            "NIETEST_HOST_NAME": "h1",
            "NIETEST_HOST_LOST_SECONDS": str(LOST),
        }
    )


@pytest.fixture
def client(valkey: PrivateValkey) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(valkey.url)
    yield c
    c.close()


@pytest.fixture
def brokers(valkey: PrivateValkey) -> Iterator[dict[str, NietestRedisBroker]]:
    """One worker's broker per host, each naming its process as a worker does (`<host>/<process>/<pid>/`)."""
    made: dict[str, NietestRedisBroker] = {}
    for host, pid in (("h1", 11), ("h2", 21)):
        broker = NietestRedisBroker(url=valkey.url, middleware=[])
        broker.name_process(process_identity(host, "subtask_00", pid))
        made[host] = broker
    yield made
    for broker in made.values():
        broker.close()


def register(client: redis.Redis, name: str) -> HostRecord:
    record = HostRecord(
        name=name,
        daemon_id=uuid.uuid4().hex,
        address="10.0.0.7",
        pid=os.getpid(),
        boot_id=hosts.boot_id(),
        home=f"/srv/{name}",
        started_at=time.time() - 60,
        since=time.time() - 60,
    )
    assert hosts.take_lease(client, record, LOST)[0]
    return record


def fetch(broker: NietestRedisBroker, queue: str, *messages: tuple[str, tuple, dict]) -> None:
    """Enqueue the messages and fetch them with this worker's broker id: they are held (in its ack set)."""
    for actor, args, kwargs in messages:
        broker.enqueue(dramatiq.Message(queue_name=queue, actor_name=actor, args=args, kwargs=kwargs, options={}))
    assert len(broker.do_fetch(queue, len(messages))) == len(messages)


def test_status_lists_each_host_with_its_workers_held_messages_and_slots(
    settings: settings_module.Settings, client: redis.Redis, brokers: dict[str, NietestRedisBroker]
) -> None:
    subtask = settings.queue("subtask").name
    master = settings.queue("master").name
    now = time.time()

    # h1, this daemon: up; two workers beat, a third has been silent longer than LOST
    register(client, "h1")
    hosts.beat(client, "h1", 100)
    for process, pid, ago in (("subtask_00", 11, 0.5), ("master_00", 12, 1.0), ("subtask_01", 13, LOST + 5)):
        client.zadd(keys.lifelines("h1"), {lifelines.member(process, pid): now - ago})
    fetch(
        brokers["h1"],
        subtask,
        (RUN_SUBTASK[Lane.STANDARD], ("t1:0.0",), {}),
        (POLL_SUBTASK[Lane.LUMINA], (), {"subtask_id": "t1:0.1"}),
    )
    fetch(brokers["h1"], delay_queue_name(subtask), (POLL_SUBTASK[Lane.STANDARD], ("t1:0.0",), {}))  # a next poll
    fetch(brokers["h1"], master, (PROCESS_TASK, ("t1",), {}))  # about a task: no slot
    client.zadd(keys.slot_holders(Lane.STANDARD.value), {"t1:0.0": now + 60, "t9:0.0": now + 60})
    client.zadd(keys.slot_holders(Lane.LUMINA.value), {"t1:0.1": now - 1})  # its lease ran out

    # h2: went silent and was declared lost by h1, which has not handed its work back yet
    register(client, "h2")
    client.zadd(keys.lifelines("h2"), {"subtask_00/21": now - LOST - 2})
    fetch(brokers["h2"], subtask, (RUN_SUBTASK[Lane.LUMINA], ("t2:0.0",), {}))
    client.zadd(keys.slot_holders(Lane.LUMINA.value), {"t2:0.0": now + 60})
    client.delete(keys.host_lease("h2"))
    claimed = hosts.claim_takeover(client, "h2", daemon_id="taker", host="h1", lost_seconds=LOST)
    assert claimed is not None

    # h3: stopped gracefully a while ago
    h3 = register(client, "h3")
    client.zadd(keys.lifelines("h3"), {"subtask_00/31": now - 30, "keeper/30": now - 30})
    hosts.mark_stopped(client, h3)

    report = overview.collect(settings)
    json.dumps(report)  # as `nietest status --json` prints it
    by_name = {h["name"]: h for h in report["hosts"]}
    assert list(by_name) == ["h1", "h2", "h3"]
    h1, h2, h3_entry = by_name["h1"], by_name["h2"], by_name["h3"]
    assert (h1["state"], h1["this_host"], h1["workers"], h1["messages_held"], h1["slots_held"]) == ("up", True, 2, 4, 1)
    assert 0 <= h1["last_sign_of_life_seconds"] < 2
    assert (h2["state"], h2["this_host"], h2["workers"], h2["messages_held"], h2["slots_held"]) == (
        "lost",
        False,
        0,
        1,
        1,
    )
    assert (h2["taken_over_by"], h2["handed_back"]) == ("h1", False)
    assert LOST + 1 < h2["last_sign_of_life_seconds"] < LOST + 10
    assert (h3_entry["state"], h3_entry["workers"], h3_entry["messages_held"], h3_entry["slots_held"]) == (
        "stopped",
        0,
        0,
        0,
    )
    assert 29 < h3_entry["last_sign_of_life_seconds"] < 40 and h3_entry["taken_over_by"] == ""

    text = overview.render(report)
    assert "HOST" in text and "LAST SIGN OF LIFE" in text
    [line1] = [line for line in text.splitlines() if line.startswith("h1 *")]
    assert line1.split()[2:] == ["up", f"{h1['last_sign_of_life_seconds']:.1f}", "s", "ago", "2", "4", "1"]
    [line2] = [line for line in text.splitlines() if line.startswith("h2 ")]
    assert " lost " in line2 and "lost since " in line2 and "being taken over by h1" in line2
    [line3] = [line for line in text.splitlines() if line.startswith("h3 ")]
    assert "stopped since " in line3
    assert "* this daemon's host" in text

    # h1 hands h2's messages back and ends the takeover: h2 holds nothing now, its lifelines are gone
    queues = [q.name for q in settings.queues.values()]
    assert brokers["h1"].hand_back_dead("h2/", queues) == 1
    hosts.forget_processes(client, "h2")
    assert hosts.finish_takeover(client, "h2", "taker")
    h2 = next(h for h in overview.collect(settings)["hosts"] if h["name"] == "h2")
    assert (h2["state"], h2["messages_held"], h2["slots_held"], h2["handed_back"]) == ("lost", 0, 0, True)
    assert h2["last_sign_of_life_seconds"] > LOST  # the record keeps its last sign of life
    text = overview.render(overview.collect(settings))
    assert "taken over by h1" in text and "being taken over" not in text


def test_a_broker_without_hosts_shows_no_host_section(settings: settings_module.Settings) -> None:
    report = overview.collect(settings)
    assert report["hosts"] == [] and "HOST " not in overview.render(report)


def test_an_unreadable_host_record_leaves_the_rest_of_the_status(
    settings: settings_module.Settings, client: redis.Redis
) -> None:
    client.hset(keys.HOSTS, "bad", "not json")
    report = overview.collect(settings)
    assert "unreadable host record" in report["hosts_error"] and "broker_error" not in report
    assert report["queues"][settings.queue("subtask").key]["ready"] == 0
    assert "unreadable host record" in overview.render(report)
