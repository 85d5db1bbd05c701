"""programs/host_keeper.py and the start's lease (programs/daemon.py) on a real valkey-server, with a
fake supervisord: the fenced host restarts its workers and rejoins, a silent host is taken over by
exactly one keeper and its held messages go back to their queues, nobody claims before it has
reached the broker for NIETEST_HOST_LOST_SECONDS, a stopped host is left alone."""

from __future__ import annotations

import os
import threading
import time
import uuid
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dramatiq
import dramatiq.broker
import pytest
import redis

from nietest_daemon.coordination import counters, hosts, keys
from nietest_daemon.coordination.events import HostBack, HostLost
from nietest_daemon.coordination.hosts import HostRecord, HostState, Renewal
from nietest_daemon.coordination.scheduler import Scheduler
from nietest_daemon.core import settings as settings_module
from nietest_daemon.domain.subtask import Lane
from nietest_daemon.internals.dramatiq_redis import (
    NietestRedisBroker,
    broker_ids_of,
    delay_queue_name,
    held_messages,
    queue_stats,
)
from nietest_daemon.pipeline.broker import build_broker
from nietest_daemon.programs import daemon as daemon_program
from nietest_daemon.programs.host_keeper import FENCED_REASON, HostKeeper
from nietest_daemon.testing.valkey import PrivateValkey
from nietest_daemon.testing.waiting import wait_for

LOST = 3.0


class FakeSupervisor:
    """The XML-RPC calls the keeper makes: the processes, SIGKILL, supervisord's state."""

    def __init__(self, infos: list[dict[str, Any]]) -> None:
        self.infos = infos
        self.signalled: list[tuple[str, str]] = []
        self.state = "RUNNING"

    def getAllProcessInfo(self) -> list[dict[str, Any]]:  # noqa: N802 - supervisord's names
        return self.infos

    def signalProcess(self, name: str, signal: str) -> bool:  # noqa: N802
        self.signalled.append((name, signal))
        return True

    def getState(self) -> dict[str, Any]:  # noqa: N802
        if self.state == "SHUTDOWN":  # what supervisord answers while it shuts down
            raise xmlrpc.client.Fault(6, "SHUTDOWN_STATE")
        return {"statename": self.state, "statecode": 1}


class FakeRpc:
    def __init__(self, infos: list[dict[str, Any]] | None = None) -> None:
        self.supervisor = FakeSupervisor(infos or [])


def info(group: str, name: str, pid: int, state: str = "RUNNING") -> dict[str, Any]:
    return {"group": group, "name": name, "pid": pid, "statename": state, "start": time.time() - 60}


@pytest.fixture
def env(valkey: PrivateValkey, short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setattr(dramatiq.broker, "global_broker", dramatiq.broker.global_broker)
    return {
        "NIETEST_HOME": str(short_tmp),
        "BROKER_REDIS_URL": valkey.url,
        "NIETEST_HOST_LOST_SECONDS": str(LOST),
    }


@pytest.fixture
def made(env: dict[str, str]) -> Iterator[list[NietestRedisBroker]]:
    brokers: list[NietestRedisBroker] = []
    yield brokers
    for broker in brokers:
        broker.close()


@pytest.fixture
def client(valkey: PrivateValkey) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(valkey.url)
    yield c
    c.close()


def settings_of(env: dict[str, str], host: str, **extra: str) -> settings_module.Settings:
    return settings_module.load({**env, "NIETEST_HOST_NAME": host, **extra})


def keeper(
    env: dict[str, str], made: list[NietestRedisBroker], host: str, rpc: FakeRpc | None = None, **extra: str
) -> HostKeeper:
    settings = settings_of(env, host, **extra)
    broker = build_broker(settings)
    made.append(broker)
    return HostKeeper(settings, broker, rpc, daemon_id=f"daemon-{host}-{uuid.uuid4().hex[:6]}", supervisor_pid=1)


def seasoned(k: HostKeeper) -> HostKeeper:
    """As if it had reached the broker for long enough to claim."""
    k.reached_since = time.monotonic() - 10 * LOST
    return k


def register_silent(client: redis.Redis, name: str, silent_for: float = LOST + 2) -> HostRecord:
    """A host that registered, then went silent `silent_for` seconds ago (no lease, an old lifeline)."""
    record = HostRecord(
        name=name,
        daemon_id=uuid.uuid4().hex,
        address="10.0.0.9",
        pid=999999,
        boot_id="another-machine",
        home="/srv/nietest",
        started_at=time.time() - 600,
        since=time.time() - 600,
    )
    assert hosts.take_lease(client, record, LOST)[0]
    client.delete(keys.host_lease(name))
    client.zadd(keys.lifelines(name), {"subtask_00/123": time.time() - silent_for})
    return record


def hold(
    settings: settings_module.Settings, made: list[NietestRedisBroker], identity: str, queue: str, *messages: Any
) -> NietestRedisBroker:
    """A worker with broker ids `<identity>...` that fetched `messages` and died holding them."""
    worker = build_broker(settings)
    made.append(worker)
    worker.name_process(identity)
    worker.declare_queue(queue)
    delayed = [m for m in messages if isinstance(m, tuple)]
    for message in messages:
        if isinstance(message, tuple):
            worker.enqueue(message[0], delay=60_000)
        else:
            worker.enqueue(message)
    if len(messages) > len(delayed):
        assert len(worker.do_fetch(queue, len(messages) - len(delayed))) == len(messages) - len(delayed)
    if delayed:
        assert len(worker.do_fetch(delay_queue_name(queue), len(delayed))) == len(delayed)
    return worker


def message(queue: str, actor: str, *args: Any) -> dramatiq.Message[Any]:
    return dramatiq.Message(queue_name=queue, actor_name=actor, args=args, kwargs={}, options={})


# --- fencing ----------------------------------------------------------------------------------------


def test_a_fenced_host_kills_exactly_its_workers_rejoins_and_reports_it_is_back(
    env: dict[str, str], made: list[NietestRedisBroker], client: redis.Redis
) -> None:
    rpc = FakeRpc(
        [
            info("subtask", "subtask_00", 11),
            info("subtask", "subtask_01", 12, "STARTING"),
            info("master", "master_00", 13),
            info("subtask_ops", "subtask_ops_00", 14, "STOPPED"),  # holds nothing
            info("watchdog", "watchdog", 15),
            info("alerts", "alerts", 16),
            info("metrics", "metrics", 17),
        ]
    )
    mine = keeper(env, made, "h1", rpc)
    mine.step()
    assert hosts.get_record(client, "h1").daemon_id == mine.daemon_id  # type: ignore[union-attr]
    assert rpc.supervisor.signalled == []
    # Cut off past the loss: another daemon declares it lost and hands its work back.
    client.delete(keys.host_lease("h1"))
    client.zadd(keys.lifelines("h1"), {f"keeper/{mine.pid}": time.time() - LOST - 1})
    claim = hosts.claim_takeover(client, "h1", daemon_id="w2", host="h2", lost_seconds=LOST)
    assert claim is not None and hosts.finish_takeover(client, "h1", "w2")
    assert hosts.renew_lease(client, "h1", mine.daemon_id, LOST) == Renewal.FENCED

    mine.step()
    assert sorted(rpc.supervisor.signalled) == [
        ("master:master_00", "KILL"),
        ("subtask:subtask_00", "KILL"),
        ("subtask:subtask_01", "KILL"),
    ]
    # each marked recycled first: the watchdog counts (and the alerts listener reports) no crash
    mark = counters.recycle_mark(client, "h1", "subtask_01", 12)
    assert mark is not None and mark.reason == FENCED_REASON
    assert counters.recycle_mark(client, "h1", "subtask_ops_00", 14) is None
    record = hosts.get_record(client, "h1")
    assert record is not None and record.state is HostState.UP and record.daemon_id == mine.daemon_id
    assert record.epoch == 1  # the loss is remembered
    assert hosts.renew_lease(client, "h1", mine.daemon_id, LOST) == Renewal.OK
    [back] = hosts.drain_events(client)
    assert isinstance(back, HostBack) and back.host == "h1" and back.workers_restarted == 3
    assert 0 <= back.lost_seconds < 5
    mine.step()
    assert len(rpc.supervisor.signalled) == 3 and hosts.drain_events(client) == []  # once


# --- the takeover -----------------------------------------------------------------------------------


def test_a_silent_host_is_taken_over_by_one_keeper_and_its_held_messages_come_back(
    env: dict[str, str], made: list[NietestRedisBroker], client: redis.Redis
) -> None:
    settings = settings_of(env, "h1")
    subtask_q, master_q = settings.queue("subtask").name, settings.queue("master").name
    register_silent(client, "h9")
    # What h9's workers held when it died: two runs and a poll (of two subtasks) and a master message.
    hold(
        settings,
        made,
        "h9/subtask_00/123/",
        subtask_q,
        message(subtask_q, "run_subtask", "t1:0.0"),
        message(subtask_q, "run_subtask", "t1:0.1"),
        (message(subtask_q, "poll_subtask", "t1:0.0"),),
    )
    hold(settings, made, "h9/master_00/124/", master_q, message(master_q, "process_task", "t1"))
    # A host whose name starts alike is not touched.
    hold(settings, made, "h90/subtask_00/125/", subtask_q, message(subtask_q, "run_subtask", "t2:0.0"))
    assert len(held_messages(client, broker_ids_of(client, "h9/"), [subtask_q, master_q])) == 4
    client.set(keys.alive("h9:123:abcd"), "1")
    # And one it admitted (took a slot for) but died before it sent the run message.
    h9_slots = Scheduler(client, Lane.STANDARD, cap=10, lease_seconds=120, host="h9")
    h9_slots.add("t1", ["t1:0.2"])
    assert h9_slots.admit() == ["t1:0.2"]

    one, two = seasoned(keeper(env, made, "h1")), seasoned(keeper(env, made, "h2"))
    passes = [threading.Thread(target=k.step) for k in (one, two)]
    for t in passes:
        t.start()
    for t in passes:
        t.join()

    [lost] = hosts.drain_events(client)
    assert isinstance(lost, HostLost) and lost.host == "h9" and lost.taken_over_by in ("h1", "h2")
    assert lost.messages == 5 and lost.subtasks == 3 and lost.silent_seconds > LOST
    # h90's in progress; t1:0.2's run message sent again
    assert queue_stats(client, subtask_q) == {"ready": 3, "in_progress": 1, "delayed": 1, "dead": 0}
    assert h9_slots.not_started() == 1 and h9_slots.take_admissions("h9") == []  # now the taker's
    assert client.llen(f"dramatiq:{delay_queue_name(subtask_q)}") == 1
    assert queue_stats(client, master_q)["ready"] == 1
    assert broker_ids_of(client, "h9/") == [] and broker_ids_of(client, "h90/") != []
    assert not client.exists(keys.alive("h9:123:abcd"), keys.lifelines("h9"))
    record = hosts.get_record(client, "h9")
    assert record is not None and record.state is HostState.LOST and record.handed_back
    for k in (one, two):  # nobody takes it twice
        k.step()
    assert hosts.drain_events(client) == []


def test_a_taker_stopped_mid_takeover_leaves_it_to_another_which_resumes_it(
    env: dict[str, str], made: list[NietestRedisBroker], client: redis.Redis
) -> None:
    """NIETEST_TAKEOVER_PAUSE_SECONDS holds the taker between its claim and the hand-back."""
    settings = settings_of(env, "h1")
    queue = settings.queue("subtask").name
    register_silent(client, "h9")
    hold(settings, made, "h9/subtask_00/123/", queue, message(queue, "run_subtask", "t1:0.0"))
    taker = seasoned(keeper(env, made, "h1", NIETEST_TAKEOVER_PAUSE_SECONDS="30"))
    paused = threading.Thread(target=taker.step)
    paused.start()
    wait_for(lambda: hosts.get_record(client, "h9").state is HostState.LOST, 10, what="h9 claimed")  # type: ignore[union-attr]
    claimed = time.time()
    wait_for(lambda: (hosts.last_sign_of_life(client, "h1") or 0) > claimed, 5, what="the taker beating in its pause")
    taker.close(graceful=False)  # cut off inside its pause: it hands nothing back
    paused.join(5)
    assert not paused.is_alive() and queue_stats(client, queue)["ready"] == 0
    assert hosts.get_record(client, "h9").handed_back is False  # type: ignore[union-attr]
    client.delete(keys.host_takeover("h9"))  # its lock lapses
    seasoned(keeper(env, made, "h2")).step()
    [lost] = hosts.drain_events(client)
    assert isinstance(lost, HostLost) and lost.taken_over_by == "h2" and lost.messages == 1
    record = hosts.get_record(client, "h9")
    assert record is not None and record.handed_back and record.taken_over_by == "h2"
    assert queue_stats(client, queue)["ready"] == 1


def test_no_claim_before_the_keeper_has_reached_the_broker_for_the_loss_time(
    env: dict[str, str], made: list[NietestRedisBroker], client: redis.Redis
) -> None:
    register_silent(client, "h9")
    k = keeper(env, made, "h1")
    start = time.monotonic()
    k.step(start)  # the first pass that reaches the broker: after an outage every lease has lapsed
    k.step(start + LOST - 0.5)
    assert hosts.get_record(client, "h9").state is HostState.UP  # type: ignore[union-attr]
    k.step(start + LOST)
    assert hosts.get_record(client, "h9").state is HostState.LOST  # type: ignore[union-attr]


def test_a_failing_pass_restarts_the_count_and_the_loop_goes_on(
    env: dict[str, str], made: list[NietestRedisBroker], monkeypatch: pytest.MonkeyPatch
) -> None:
    k = seasoned(keeper(env, made, "h1"))
    calls: list[float | None] = []
    real_step = k.step

    def flaky(now: float | None = None) -> None:
        calls.append(k.reached_since)
        if len(calls) == 2:
            raise redis.ConnectionError("the broker went away")
        real_step(now)

    monkeypatch.setattr(k, "step", flaky)
    monkeypatch.setattr("nietest_daemon.programs.host_keeper.PASS_SECONDS", 0.05)
    loop = threading.Thread(target=k.run)
    loop.start()
    try:
        wait_for(lambda: len(calls) >= 4, 10, what="passes after the failure")
    finally:
        k.close(graceful=False)
        loop.join(5)
    assert calls[0] is not None and calls[2] is None  # counted again from the failure
    assert not loop.is_alive()


def test_a_stopped_host_is_left_alone(env: dict[str, str], made: list[NietestRedisBroker], client: redis.Redis) -> None:
    record = register_silent(client, "h9")
    hosts.mark_stopped(client, record)
    seasoned(keeper(env, made, "h1")).step()
    assert hosts.get_record(client, "h9").state is HostState.STOPPED  # type: ignore[union-attr]
    assert hosts.drain_events(client) == []


def test_a_graceful_stop_marks_the_host_stopped_only_when_supervisord_stops(
    env: dict[str, str], made: list[NietestRedisBroker], client: redis.Redis
) -> None:
    rpc = FakeRpc()
    first = keeper(env, made, "h1", rpc)
    first.step()
    first.close(graceful=True)  # the watchdog alone restarts: the host stays up
    assert hosts.get_record(client, "h1").state is HostState.UP  # type: ignore[union-attr]
    again = HostKeeper(first.settings, first.broker, rpc, daemon_id=first.daemon_id, supervisor_pid=1)
    again.step()
    rpc.supervisor.state = "SHUTDOWN"
    again.close(graceful=True)
    assert hosts.get_record(client, "h1").state is HostState.STOPPED  # type: ignore[union-attr]
    assert not client.exists(keys.host_lease("h1"))
    # The same daemon's watchdog restarted after that (`nietest ctl restart watchdog`): up again.
    third = HostKeeper(first.settings, first.broker, rpc, daemon_id=first.daemon_id, supervisor_pid=1)
    rpc.supervisor.state = "RUNNING"
    third.step()
    assert hosts.get_record(client, "h1").state is HostState.UP  # type: ignore[union-attr]
    assert hosts.renew_lease(client, "h1", first.daemon_id, LOST) == Renewal.OK
    # A daemon stopped before its keeper's first pass: the record `nietest daemon` made is marked.
    rpc.supervisor.state = "SHUTDOWN"
    HostKeeper(first.settings, first.broker, rpc, daemon_id=first.daemon_id, supervisor_pid=1).close(graceful=True)
    assert hosts.get_record(client, "h1").state is HostState.STOPPED  # type: ignore[union-attr]
    HostKeeper(first.settings, first.broker, rpc, daemon_id="another", supervisor_pid=1).close(graceful=True)
    assert hosts.get_record(client, "h1").daemon_id == first.daemon_id  # type: ignore[union-attr]


def test_an_embedded_broker_keeper_takes_its_name_over_from_its_dead_self(
    made: list[NietestRedisBroker], short_tmp: Path, client: redis.Redis, valkey: PrivateValkey, monkeypatch
) -> None:
    """With the embedded broker (here: a keeper told so) the keeper registers itself, replacing anything."""
    monkeypatch.setattr(dramatiq.broker, "global_broker", dramatiq.broker.global_broker)
    settings = settings_module.load({"NIETEST_HOME": str(short_tmp), "NIETEST_HOST_NAME": "solo"})
    broker = build_broker(settings_module.load({"NIETEST_HOME": str(short_tmp), "BROKER_REDIS_URL": valkey.url}))
    made.append(broker)
    assert settings.embedded_broker
    old = HostKeeper(settings, broker, None, daemon_id="old", supervisor_pid=1)
    old.step()
    new = HostKeeper(settings, broker, None, daemon_id="new", supervisor_pid=1)
    new.step()
    assert hosts.get_record(client, "solo").daemon_id == "new"  # type: ignore[union-attr]
    assert client.get(keys.host_lease("solo")) == b"new"


# --- the start's lease (programs/daemon.py) ---------------------------------------------------------


def test_a_second_live_daemon_with_the_same_name_is_refused_naming_the_first(
    env: dict[str, str], client: redis.Redis
) -> None:
    settings = settings_of(env, "h1")
    assert daemon_program.take_host_name(settings, "first") is None
    hosts.beat(client, "h1", os.getpid())
    refused = daemon_program.take_host_name(settings, "second")
    assert refused is not None and refused.startswith("nietest: host name h1 is in use by a live daemon: h1 (")
    assert f"pid {os.getpid()}, started " in refused and refused.endswith("set NIETEST_HOST_NAME to tell them apart")
    assert "\n" not in refused
    assert hosts.get_record(client, "h1").daemon_id == "first"  # type: ignore[union-attr]


def test_a_dead_predecessor_on_this_machine_is_replaced_at_once_and_its_messages_handed_back(
    env: dict[str, str], made: list[NietestRedisBroker], client: redis.Redis
) -> None:
    settings = settings_of(env, "h1")
    queue = settings.queue("subtask").name
    dead = HostRecord(
        name="h1",
        daemon_id="dead",
        address="127.0.0.1",
        pid=2**22 + 1,  # past pid_max: no such process
        boot_id=hosts.boot_id(),
        home=str(settings.home),
        started_at=time.time() - 60,
        since=time.time() - 60,
    )
    hosts.take_lease(client, dead, 600)
    hosts.beat(client, "h1", 5)
    hold(settings, made, "h1/subtask_00/77/", queue, message(queue, "run_subtask", "t1:0.0"))
    started = time.monotonic()
    assert daemon_program.take_host_name(settings, "new") is None
    assert time.monotonic() - started < 2
    assert hosts.get_record(client, "h1").daemon_id == "new"  # type: ignore[union-attr]
    assert queue_stats(client, queue)["ready"] == 1 and broker_ids_of(client, "h1/") == []


def test_a_silent_holder_elsewhere_is_awaited_until_its_lease_lapses(env: dict[str, str], client: redis.Redis) -> None:
    settings = settings_of(env, "h1")
    gone = HostRecord(
        name="h1",
        daemon_id="gone",
        address="10.0.0.8",
        pid=1,
        boot_id="another-machine",
        home="/srv/nietest",
        started_at=time.time() - 60,
        since=time.time() - 60,
    )
    hosts.take_lease(client, gone, 1.5)  # lapses in 1.5 s
    client.zadd(keys.lifelines("h1"), {"keeper/1": time.time() - 5})
    assert daemon_program.take_host_name(settings, "new") is None
    assert hosts.get_record(client, "h1").daemon_id == "new"  # type: ignore[union-attr]


def test_an_unreachable_broker_skips_the_check(env: dict[str, str]) -> None:
    settings = settings_of(env, "h1", BROKER_REDIS_URL="redis://127.0.0.1:1/0")
    assert daemon_program.take_host_name(settings, "x") is None
