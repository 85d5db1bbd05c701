"""The watchdog issue: prompt hand-back of an exited worker's messages, hang detection, recycling.

- Hand-back, against a private valkey-server with Dramatiq's real Redis broker: a "worker" broker
  fetches messages (they sit in its ack sets, as in a process killed with SIGKILL), and the
  watchdog, told by a PROCESS_STATE_EXITED event, returns exactly that process's messages.
- Hang detection: the watchdog's check against lifelines, and a real daemon with a SIGSTOPped
  worker.
- Recycling: the limits, and a real daemon whose worker leaks past NIETEST_SUBTASK_MAX_MEMORY.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dramatiq
import dramatiq.broker
import pytest

from bench.pipeline import task_file
from nietest_daemon.coordination import counters, keys, lifelines
from nietest_daemon.core import settings as settings_module
from nietest_daemon.internals.dramatiq_redis import (
    NietestRedisBroker,
    delay_queue_name,
    heartbeats_key,
    process_identity,
    queue_stats,
)
from nietest_daemon.pipeline.broker import build_broker
from nietest_daemon.pipeline.middleware.in_hand import InHand
from nietest_daemon.programs.watchdog import Watchdog
from nietest_daemon.programs.worker import RECYCLE_MIN_SECONDS, Recycling, resident_bytes
from nietest_daemon.store import open_store_for
from nietest_daemon.testing.daemon import Daemon
from nietest_daemon.testing.fake_nieta import FakeNieta
from nietest_daemon.testing.valkey import PrivateValkey
from nietest_daemon.testing.waiting import wait_for

HOST = "host-a"


@pytest.fixture
def settings(valkey: PrivateValkey, short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> settings_module.Settings:
    monkeypatch.setattr(dramatiq.broker, "global_broker", dramatiq.broker.global_broker)
    return settings_module.load({"NIETEST_HOME": str(short_tmp), "BROKER_REDIS_URL": valkey.url})


@pytest.fixture
def brokers(settings: settings_module.Settings) -> Iterator[list[NietestRedisBroker]]:
    made: list[NietestRedisBroker] = []
    yield made
    for broker in made:
        broker.close()


def worker(
    settings: settings_module.Settings, made: list[NietestRedisBroker], name: str, pid: int
) -> NietestRedisBroker:
    broker = build_broker(settings)
    broker.name_process(process_identity(HOST, name, pid))
    made.append(broker)
    # The consumer runs only messages of a known actor of its queue (it dead-letters the rest).
    for queue in (settings.queue("subtask").name, settings.queue("master").name):
        dramatiq.actor(lambda *_: None, actor_name=f"noop_{queue}", queue_name=queue, broker=broker)
    return broker


def fetch(broker: NietestRedisBroker, queue: str, n: int) -> None:
    """Fetch `n` messages into the broker's ack set and never ack them (a process about to die)."""
    consumer = broker.consume(queue, prefetch=n, timeout=100)
    got = 0
    while got < n:
        if next(consumer) is not None:
            got += 1


def enqueue(broker: NietestRedisBroker, queue: str, n: int, *, delay_ms: int | None = None) -> None:
    for i in range(n):
        message = dramatiq.Message(queue_name=queue, actor_name=f"noop_{queue}", args=(i,), kwargs={}, options={})
        broker.enqueue(message, delay=delay_ms)


def exited(name: str, pid: int, group: str = "subtask", expected: int = 0) -> tuple[dict[str, str], str]:
    payload = f"processname:{name} groupname:{group} from_state:RUNNING expected:{expected} pid:{pid}"
    return {"eventname": "PROCESS_STATE_EXITED", "len": str(len(payload))}, payload


def test_an_exited_workers_messages_go_back_at_once_and_a_live_ones_stay(
    settings: settings_module.Settings, brokers: list[NietestRedisBroker]
) -> None:
    queue = settings.queue("subtask").name
    dead = worker(settings, brokers, "subtask_00", 4242)
    live = worker(settings, brokers, "subtask_01", 4343)
    enqueue(dead, queue, 10)
    fetch(dead, queue, 6)
    fetch(live, queue, 4)
    assert queue_stats(dead.client, queue) == {"ready": 0, "in_progress": 10, "delayed": 0, "dead": 0}

    watchdog = Watchdog(settings, worker(settings, brokers, "watchdog", 1), HOST)
    watchdog.handle(*exited("subtask_00", 4242))
    stats = queue_stats(dead.client, queue)
    assert stats["ready"] == 6 and stats["in_progress"] == 4  # the live worker keeps its 4
    ids = {m.decode() for m in dead.client.zrange(heartbeats_key(), 0, -1)}
    assert not any(i.startswith(process_identity(HOST, "subtask_00", 4242)) for i in ids)
    assert any(i.startswith(process_identity(HOST, "subtask_01", 4343)) for i in ids)


def test_held_delayed_messages_go_back_to_the_delay_queue(
    settings: settings_module.Settings, brokers: list[NietestRedisBroker]
) -> None:
    queue = settings.queue("subtask").name
    dead = worker(settings, brokers, "subtask_00", 4242)
    enqueue(dead, queue, 3, delay_ms=60_000)  # the polls a worker holds until they are due
    fetch(dead, delay_queue_name(queue), 3)
    watchdog = Watchdog(settings, worker(settings, brokers, "watchdog", 1), HOST)
    assert watchdog.hand_back("subtask", "subtask_00", 4242, expected=False) == 3
    assert dead.client.llen(f"dramatiq:{delay_queue_name(queue)}") == 3


def test_other_hosts_other_pids_and_other_events_are_left_alone(
    settings: settings_module.Settings, brokers: list[NietestRedisBroker]
) -> None:
    queue = settings.queue("subtask").name
    w = worker(settings, brokers, "subtask_00", 4242)
    enqueue(w, queue, 2)
    fetch(w, queue, 2)
    for host, event in (
        ("host-b", exited("subtask_00", 4242)),  # the same name and pid on another daemon's host
        (HOST, exited("subtask_00", 4243)),  # an earlier process of that name
        (HOST, exited("alerts", 4242, group="alerts")),  # not a worker
        (HOST, ({"eventname": "PROCESS_STATE_BACKOFF"}, "processname:subtask_00 groupname:subtask")),
    ):
        Watchdog(settings, worker(settings, brokers, "watchdog", 1), host).handle(*event)
    assert queue_stats(w.client, queue)["in_progress"] == 2


def test_a_silent_worker_is_killed_once_and_reported(
    settings: settings_module.Settings, brokers: list[NietestRedisBroker]
) -> None:
    watchdog = Watchdog(settings, worker(settings, brokers, "watchdog", 1), HOST)
    killed: list[str] = []
    watchdog.kill = killed.append
    client = watchdog.broker.client
    now = time.time()
    watchdog.watching_since = now - 600  # watching long enough (else silence counts from its first check)
    hang = settings.hang_seconds

    def info(name: str, pid: int, started: float, state: str = "RUNNING") -> dict[str, Any]:
        return {"group": name.rsplit("_", 1)[0], "name": name, "pid": pid, "statename": state, "start": started}

    infos = [
        info("subtask_00", 10, now - 600),  # beat just now
        info("subtask_01", 11, now - 600),  # last beat hang + 1 s ago
        info("master_00", 12, now - 2),  # started 2 s ago, no beat yet
        info("subtask_ops_00", 13, now - 600),  # never beat since its start long ago
        info("alerts", 14, now - 600),  # not a worker
        info("master_ops_00", 15, now - 600, state="STOPPING"),  # draining: not checked
    ]
    client.zadd(keys.lifelines(HOST), {"subtask_00/10": now, "subtask_01/11": now - hang - 1})
    assert watchdog.check(infos, now) == ["subtask:subtask_01", "subtask_ops:subtask_ops_00"]
    assert killed == ["subtask:subtask_01", "subtask_ops:subtask_ops_00"]
    assert watchdog.check(infos, now + 1) == []  # killed once, until it is gone
    # Their exits count as hangs in nietest_process_restarts_total; another process's as a crash.
    assert watchdog.count_restart("subtask", "subtask_01", 11) == "hang"
    assert watchdog.count_restart("subtask_ops", "subtask_ops_00", 13) == "hang"
    assert watchdog.count_restart("subtask", "subtask_00", 10) == "crash"
    events = lifelines.drain_events(client)
    assert [(e.process, e.pid, e.queue, e.host) for e in events] == [
        ("subtask:subtask_01", 11, settings.queue("subtask").name, HOST),
        ("subtask_ops:subtask_ops_00", 13, settings.queue("subtask_ops").name, HOST),
    ]
    assert events[0].silent_seconds == pytest.approx(hang + 1, abs=0.2)
    # After the broker was out of reach, silence counts again from the first check that reads it.
    watchdog.watching_since = None
    infos.append(info("subtask_02", 16, now - 600))
    assert watchdog.check(infos, now + 2) == []  # silent for 600 s, but unseen for 0
    assert "subtask:subtask_02" in watchdog.check(infos, now + 2 + hang + 0.5)


def test_in_hand_tells_a_message_stuck_past_its_time_limit() -> None:
    in_hand = InHand()
    quick = dramatiq.Message(queue_name="q", actor_name="quick", args=(), kwargs={}, options={})
    slow = dramatiq.Message(queue_name="q", actor_name="slow", args=(), kwargs={}, options={})
    in_hand.before_process_message(None, quick)  # type: ignore[arg-type]
    in_hand.before_process_message(None, slow)  # type: ignore[arg-type]
    limits = {"quick": 0.0, "slow": 3600.0}
    assert in_hand.overdue(limits.__getitem__, grace=10) == []
    [(message, ran)] = in_hand.overdue(limits.__getitem__, grace=0)
    assert message is quick and ran >= 0
    in_hand.after_process_message(None, quick)  # type: ignore[arg-type]
    assert in_hand.overdue(limits.__getitem__, grace=0) == []


# --- a real daemon -----------------------------------------------------------------------------------


@pytest.mark.e2e
def test_kill_9_of_a_polling_worker_costs_seconds_not_the_heartbeat_timeout(
    make_daemon: Callable[..., Daemon], short_tmp: Path
) -> None:
    """At the default heartbeat timeout (60 s), the polls the killed worker held come back at once
    and its replacement finishes the task."""
    with FakeNieta(generation_time=3.0) as api:
        daemon = make_daemon(
            **api.env(),
            NIETEST_BROKER_HEARTBEAT_TIMEOUT="60",
            NIETEST_SUBTASK_OPS_PROCESSES="0",
            NIETEST_SUBTASK_PROCESSES="1",  # it then holds every subtask's next poll when it is killed
            NIETEST_SUBTASK_THREADS="5",
            IMAGE_POLLING_INTERVAL="0.5",
        )
        daemon.start()
        store = open_store_for(daemon.settings)
        path = task_file(short_tmp, 20)  # one subtask per value "bench style <i>"
        task_id = daemon.run("submit", str(path)).stdout.strip()

        def all_polling() -> bool:
            subs = store.list_subtasks(task_id)
            return len(subs) == 20 and all(s["job_uuid"] and s["poll_count"] >= 1 for s in subs)

        wait_for(all_polling, 30, what="every subtask polling")
        os.kill(daemon.pids()["subtask:subtask_00"], signal.SIGKILL)
        killed_at = time.monotonic()
        task = wait_for(
            lambda: (t := store.get_task(task_id)) and t["status"] in ("completed", "failed") and t,
            30,
            what="the task to end",
        )
        assert task["status"] == "completed" and task["completed_images"] == 20
        assert time.monotonic() - killed_at < 10  # the jobs end 3 s after they started; 60 s without the watchdog
        lines = [json.loads(line) for p in daemon.log_files() if p.name == "watchdog.log" for line in p.open()]
        handed = [r for r in lines if r["event"] == "exited worker's messages handed back"]
        assert handed and handed[0]["process_name"] == "subtask_00" and handed[0]["messages"] > 0
        assert len(api.created_counts(r"bench style \d+")) == 20 and api.duplicates(r"bench style \d+") == {}
        store.close()
        daemon.stop()


# --- recycling ---------------------------------------------------------------------------------------


def test_recycling_limits_and_their_reason() -> None:
    mb = 1024**2
    long_ago = time.monotonic() - RECYCLE_MIN_SECONDS
    assert Recycling(0, 0, started=long_ago).check(processed=10**6, resident=10**12) is None  # no limits
    young = Recycling(100 * mb, 1)
    assert young.check(processed=5, resident=130 * mb) is None  # not before RECYCLE_MIN_SECONDS: no failed start
    by_memory = Recycling(100 * mb, 0, started=long_ago)
    assert by_memory.check(processed=5, resident=99 * mb) is None
    assert by_memory.check(processed=5, resident=130 * mb) == "resident memory 130 MB is past 100 MB"
    assert by_memory.check(processed=6, resident=10 * mb) == "resident memory 130 MB is past 100 MB"  # it stays
    by_count = Recycling(0, 1000, started=long_ago)
    assert by_count.check(processed=999, resident=mb) is None
    assert by_count.check(processed=1000, resident=mb) == "1000 messages processed, the limit is 1000"
    assert resident_bytes() > 10 * mb  # this test process


def test_recycling_settings_default_to_512mb_and_no_count() -> None:
    settings = settings_module.load({"NIETEST_HOME": "/tmp/x", "NIETEST_SUBTASK_MAX_MEMORY": "1GB"})
    assert settings.queue("subtask").max_memory == 1024**3 and settings.queue("subtask").max_messages == 0
    assert settings.queue("master").max_memory == 512 * 1024**2
    off = settings_module.load({"NIETEST_HOME": "/tmp/x", "NIETEST_MASTER_MAX_MEMORY": "0"})
    assert off.queue("master").max_memory == 0


@pytest.mark.e2e
def test_a_leaking_worker_recycles_once_without_an_alert_and_loses_nothing(
    make_daemon: Callable[..., Daemon],
) -> None:
    daemon = make_daemon(NIETEST_SUBTASK_MAX_MEMORY="100MB", NIETEST_SUBTASK_PROCESSES="1")
    daemon.start()
    old = daemon.pids()["subtask:subtask_00"]
    daemon.send("subtask", "hog", "hog-1", 80)  # about 45 MB + 80 MB: past the limit
    for i in range(5):
        daemon.send("subtask", "record", f"after-{i}", 0.2)
    new = wait_for(lambda: (p := daemon.pids().get("subtask:subtask_00")) not in (None, old) and p, 30)
    assert new != old
    wait_for(lambda: {f"after-{i}" for i in range(5)} <= {t.split(":")[0] for t in daemon.done()}, 30)
    records = [json.loads(line) for p in daemon.log_files() for line in p.read_text().splitlines() if line.strip()]
    recycling = [r for r in records if r["event"] == "recycling: draining, then exiting for a fresh worker"]
    assert len(recycling) == 1 and recycling[0]["pid"] == old and "past 100 MB" in recycling[0]["reason"]
    exited = [r for r in records if r.get("logger") == "supervisord" and "exited: subtask_00" in r["event"]]
    assert exited and "exit status 75" in exited[0]["event"]
    wait_for(lambda: any(r["event"] == "worker recycled" for r in alerts_records(daemon)), 10)
    assert not [r for r in alerts_records(daemon) if r["event"] == "alert"]  # one recycle: logged, not alerted
    # Counted as a recycle, not a crash, in nietest_process_restarts_total.
    restarts = {
        counters.parse_field(f)[1]["reason"]: v
        for f, v in counters.read(daemon.redis, daemon.settings.host_name).items()
        if counters.parse_field(f)[0] == counters.PROCESS_RESTARTS.name
    }
    assert restarts == {"recycle": 1.0}


def alerts_records(daemon: Daemon) -> list[dict[str, Any]]:
    path = daemon.settings.log_dir / "alerts.log"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
