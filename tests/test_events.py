"""The events that cross processes through the broker (coordination/events.py): each one's JSON
reads back equal, the streak script's own JSON reads as its events, anything else is refused,
and the recycle mark is read (not taken) by both of its readers."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import pytest
import redis

from nietest_daemon.coordination import counters, keys, lifelines
from nietest_daemon.coordination.events import (
    FailureRun,
    QueueRecovered,
    RecycleMark,
    WorkerUnresponsive,
    streak_event_from_json,
)
from nietest_daemon.testing.valkey import PrivateValkey

UNRESPONSIVE = WorkerUnresponsive("nietest_subtask", "subtask:subtask_00", 4242, 31.2, "host-a", 1_800_000_000.5)
RUN = FailureRun("nietest_subtask", 5, ("ILLEGAL_IMAGE: refused", "HTTP 502"), 1_800_000_001.25)
RECOVERED = QueueRecovered("nietest_subtask", 9, 1_800_000_002.0)
MARK = RecycleMark("host-a", "subtask_00", 4242, "resident memory 130 MB is past 100 MB", 1_800_000_003.0)


@pytest.fixture
def client(valkey: PrivateValkey) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(valkey.url)
    yield c
    c.close()


@pytest.mark.parametrize("event", [UNRESPONSIVE, RUN, RECOVERED, MARK], ids=lambda e: type(e).__name__)
def test_each_event_reads_back_equal_from_its_json(
    event: WorkerUnresponsive | FailureRun | QueueRecovered | RecycleMark,
) -> None:
    text = event.to_json()
    assert json.loads(text)["kind"] == event.KIND
    assert type(event).from_json(text) == event
    assert type(event).from_json(text.encode()) == event  # as the broker hands it back
    assert type(event).from_dict(event.to_dict()) == event


def test_streak_events_are_told_apart_by_their_kind() -> None:
    assert streak_event_from_json(RUN.to_json()) == RUN
    assert streak_event_from_json(RECOVERED.to_json()) == RECOVERED
    # As the streak script's cjson writes them: keys in any order, an empty Lua table as {}.
    lua = '{"errors":{},"at":1800000000.123,"kind":"failure_run","queue":"q","failures":3}'
    assert streak_event_from_json(lua) == FailureRun("q", 3, (), 1800000000.123)
    lua = '{"queue":"q","at":1800000000,"failures":4,"kind":"recovered"}'
    assert streak_event_from_json(lua) == QueueRecovered("q", 4, 1800000000.0)


@pytest.mark.parametrize(
    ("decode", "text"),
    [
        (WorkerUnresponsive.from_json, "not json"),
        (WorkerUnresponsive.from_json, "[1, 2]"),
        (WorkerUnresponsive.from_json, RECOVERED.to_json()),  # another kind
        (WorkerUnresponsive.from_json, json.dumps({**UNRESPONSIVE.to_dict(), "pid": "abc"})),
        (WorkerUnresponsive.from_json, json.dumps({k: v for k, v in UNRESPONSIVE.to_dict().items() if k != "host"})),
        (FailureRun.from_json, json.dumps({**RUN.to_dict(), "errors": None, "failures": None})),
        (RecycleMark.from_json, "1"),  # the bare flag a worker of an earlier version set
        (streak_event_from_json, '{"kind": "something_else", "queue": "q"}'),
    ],
)
def test_anything_else_is_a_value_error(decode: Callable[[str], object], text: str) -> None:
    with pytest.raises(ValueError):
        decode(text)


def test_watchdog_reports_go_through_the_broker_and_a_bad_one_is_skipped(client: redis.Redis) -> None:
    client.rpush(keys.WATCHDOG_EVENTS, json.dumps({"kind": "unresponsive", "process": "x"}))
    lifelines.report_unresponsive(client, UNRESPONSIVE)
    assert lifelines.drain_events(client) == [UNRESPONSIVE]
    assert client.llen(keys.WATCHDOG_EVENTS) == 0


def test_the_recycle_mark_is_read_by_both_readers_and_expires_on_its_own(client: redis.Redis) -> None:
    counters.mark_recycling(client, "host-a", "subtask_00", 4242, reason=MARK.reason)
    watchdog = counters.recycle_mark(client, "host-a", "subtask_00", 4242)
    listener = counters.recycle_mark(client, "host-a", "subtask_00", 4242)
    assert watchdog is not None and watchdog == listener
    assert (watchdog.host, watchdog.process, watchdog.pid, watchdog.reason) == (
        "host-a",
        "subtask_00",
        4242,
        MARK.reason,
    )
    assert 0 < client.ttl(keys.recycling("host-a", "subtask_00/4242")) <= counters.RECYCLE_MARK_SECONDS
    # Keyed by process and pid: no other process reads it as its own.
    assert counters.recycle_mark(client, "host-a", "subtask_00", 4243) is None
    assert counters.recycle_mark(client, "host-a", "subtask_01", 4242) is None
    assert counters.recycle_mark(client, "host-b", "subtask_00", 4242) is None
