"""Workers' signs of life, read by the watchdog listener (programs/watchdog.py).

Each worker process beats once a second from a thread of its own (programs/worker.py) into one
sorted set per host: member `<process>/<pid>`, score the time. A process that is stopped
(SIGSTOP), deadlocked, or stuck in a C call that holds the GIL cannot beat, and a worker that
has a message running far past its actor's time limit stops beating on purpose. The watchdog
kills a worker silent for NIETEST_HANG_SECONDS and reports it here for the alerts listener.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import redis

from nietest_daemon.coordination import keys
from nietest_daemon.coordination.connection import drain_json_list, push_json
from nietest_daemon.coordination.events import WorkerUnresponsive, decode_each

BEAT_SECONDS = 1.0
MAX_EVENTS = 1000


def member(process: str, pid: int) -> str:
    return f"{process}/{pid}"


def beat(client: redis.Redis, host: str, process: str, pid: int) -> None:
    client.zadd(keys.lifelines(host), {member(process, pid): time.time()})


def last_beats(client: redis.Redis, host: str, members: Sequence[str]) -> list[float | None]:
    """The last beat (unix time) of each member, None for one that never beat."""
    if not members:
        return []
    return [None if score is None else float(score) for score in client.zmscore(keys.lifelines(host), list(members))]


def forget(client: redis.Redis, host: str, *members: str) -> None:
    """Drop the lifelines of processes that are gone."""
    if members:
        client.zrem(keys.lifelines(host), *members)


def report_unresponsive(client: redis.Redis, event: WorkerUnresponsive) -> None:
    """Tell the alerts listener that the watchdog killed a silent worker."""
    push_json(client, keys.WATCHDOG_EVENTS, event.to_json(), MAX_EVENTS)


def drain_events(client: redis.Redis, limit: int = MAX_EVENTS) -> list[WorkerUnresponsive]:
    """Take (and remove) the pending reports, oldest first; one that is not a report is logged and skipped."""
    items = drain_json_list(client, keys.WATCHDOG_EVENTS, limit)
    return decode_each(WorkerUnresponsive.from_dict, items, "unknown watchdog event")
