"""The daemon's counters and histograms, kept in the broker so that they outlive any one process.

Every process that counts something (workers, the listeners) adds to one hash per host,
`nietest:metrics:<host>` (field: the series, value: its total), with HINCRBYFLOAT: a worker's
`kill -9` resets nothing, and the totals never go backwards while the broker keeps its data.
The `metrics` program reads the hash with one HGETALL per scrape (programs/metrics.py): its size
is the number of series (a few hundred), whatever the number of tasks or subtasks.

Two ways in, one format:
- `add_call(host, increments)`: increments made in the same round trip as other script calls.
  A subtask's end is counted this way, in `pipeline.subtasks.finish`'s one round trip: lost only
  if its process dies between the store's update and that round trip (counting is at most once).
- `TALLY`, the process's buffer for frequent events (API requests, Feishu messages): counted in
  memory and flushed (`Tally.flush`) once a second by the worker's lifeline thread and by the
  listeners. A `kill -9` loses at most the last second's increments of that one process; a
  flush that fails keeps its increments for the next one.

A histogram's buckets are stored one field per bucket (not cumulative); the reader adds them up.
Label values come from the small fixed sets below: no task or subtask id is ever a label.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

import redis

from nietest_daemon.coordination import keys
from nietest_daemon.coordination.connection import ScriptCall, lua_script
from nietest_daemon.coordination.events import RecycleMark
from nietest_daemon.coordination.lifelines import member
from nietest_daemon.domain.lifecycle import Status

APIS = ("standard", "lumina")
OUTCOMES: tuple[Status, ...] = (Status.COMPLETED, Status.FAILED, Status.CANCELLED)  # a subtask's end
FAILURE_REASONS = ("moderation", "api_failure", "timeout", "transport", "interrupted", "other")
ENDPOINTS = ("create", "poll")
CODE_CLASSES = ("2xx", "3xx", "4xx", "5xx", "error")  # error: no HTTP answer (timeout, connection)
RESTART_REASONS = ("crash", "hang", "recycle")
BOTS = ("task", "alert")
FEISHU_OUTCOMES = ("sent", "failed", "rate_limited")

FIELD_SEP = "\x1f"  # between a field's name and its labels, and between labels


@dataclass(frozen=True)
class Family:
    """One counter or histogram family, as the exposition declares it."""

    name: str
    kind: str  # "counter" | "histogram"
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()


SUBTASKS_FINISHED = Family(
    "nietest_subtasks_finished_total",
    "counter",
    "Subtasks that reached a terminal state, by API and outcome.",
    ("api", "outcome"),
)
SUBTASK_FAILURES = Family(
    "nietest_subtask_failures_total",
    "counter",
    "Failed subtasks by API and reason (moderation, api_failure, timeout, transport, interrupted, other).",
    ("api", "reason"),
)
IMAGE_JOB_SECONDS = Family(
    "nietest_image_job_seconds",
    "histogram",
    "Seconds from a subtask's image job creation to its terminal state.",
    ("api",),
    (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
)
API_REQUESTS = Family(
    "nietest_api_requests_total",
    "counter",
    "HTTP requests to the Nieta API (each attempt), by API, endpoint and status class (error: no answer).",
    ("api", "endpoint", "code_class"),
)
API_REQUEST_SECONDS = Family(
    "nietest_api_request_seconds",
    "histogram",
    "Seconds per HTTP request to the Nieta API (each attempt).",
    ("api", "endpoint"),
    (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
PROCESS_RESTARTS = Family(
    "nietest_process_restarts_total",
    "counter",
    "Unrequested exits of supervised processes (each one restarted), by reason: crash, hang (killed by "
    "the watchdog), recycle (past its memory or message limit).",
    ("program", "process", "reason"),
)
FEISHU_MESSAGES = Family(
    "nietest_feishu_messages_total",
    "counter",
    "Feishu messages by bot (task, alert) and outcome (sent, failed, rate_limited).",
    ("bot", "outcome"),
)
ALERTS = Family("nietest_alerts_total", "counter", "Operations alerts sent, by kind.", ("kind",))

FAMILIES: tuple[Family, ...] = (
    SUBTASKS_FINISHED,
    SUBTASK_FAILURES,
    IMAGE_JOB_SECONDS,
    API_REQUESTS,
    API_REQUEST_SECONDS,
    PROCESS_RESTARTS,
    FEISHU_MESSAGES,
    ALERTS,
)
FAMILY_BY_NAME = {f.name: f for f in FAMILIES}


def series_field(family: Family, suffix: str = "", **labels: str) -> str:
    """The hash field of one series: `<name><suffix>` then `label=value` pairs, in the family's order."""
    parts = [family.name + suffix]
    parts += [f"{name}={labels[name]}" for name in family.labels]
    if "le" in labels:
        parts.append(f"le={labels['le']}")
    return FIELD_SEP.join(parts)


def parse_field(field: str) -> tuple[str, dict[str, str]]:
    """`series_field`'s inverse: (name with suffix, labels)."""
    name, *pairs = field.split(FIELD_SEP)
    return name, dict(pair.split("=", 1) for pair in pairs)


def code_class(status_code: int | None) -> str:
    """The `code_class` label of an HTTP status (None: no answer)."""
    if status_code is None or not 200 <= status_code <= 599:
        return "error"
    return f"{status_code // 100}xx"


def format_le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


class Increments:
    """Increments to the totals, by field; `count` and `observe` check labels against the family."""

    def __init__(self) -> None:
        self.fields: dict[str, float] = {}

    def __bool__(self) -> bool:
        return bool(self.fields)

    def _add(self, field: str, amount: float) -> None:
        self.fields[field] = self.fields.get(field, 0.0) + amount

    def count(self, family: Family, amount: float = 1.0, **labels: str) -> None:
        assert family.kind == "counter" and set(labels) == set(family.labels), (family.name, labels)
        self._add(series_field(family, **labels), amount)

    def observe(self, family: Family, value: float, **labels: str) -> None:
        assert family.kind == "histogram" and set(labels) == set(family.labels), (family.name, labels)
        value = max(0.0, float(value))
        index = bisect.bisect_left(family.buckets, value)
        bound = family.buckets[index] if index < len(family.buckets) else math.inf
        self._add(series_field(family, "_bucket", le=format_le(bound), **labels), 1.0)
        self._add(series_field(family, "_sum", **labels), value)  # the count is the +Inf bucket's

    def merge(self, fields: Mapping[str, float]) -> None:
        for field, amount in fields.items():
            self._add(field, amount)


_ADD_SCRIPT = lua_script(__name__, "add")  # lua/counters_add.lua


def add_call(host: str, increments: Increments) -> ScriptCall:
    """Add `increments` to the host's totals, as a call to run with others (`connection.run_scripts`)."""
    args: list[str] = []
    for field, amount in increments.fields.items():
        args += [field, repr(amount)]
    return ScriptCall(_ADD_SCRIPT, [keys.metrics(host)], args)


def read(client: redis.Redis, host: str) -> dict[str, float]:
    """The host's totals, by field."""
    return {
        (k.decode() if isinstance(k, bytes) else k): float(v) for k, v in client.hgetall(keys.metrics(host)).items()
    }


class Tally:
    """A process's buffer of increments for frequent events; thread-safe. See the module docstring."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending = Increments()

    def api_request(self, api: str, endpoint: str, status_code: int | None, seconds: float) -> None:
        """One HTTP request to the Nieta API (the client's `observe` hook)."""
        with self._lock:
            self._pending.count(API_REQUESTS, api=api, endpoint=endpoint, code_class=code_class(status_code))
            self._pending.observe(API_REQUEST_SECONDS, seconds, api=api, endpoint=endpoint)

    def feishu_message(self, bot: str, outcome: str) -> None:
        """What became of one Feishu message (the client's `on_result` hook)."""
        with self._lock:
            self._pending.count(FEISHU_MESSAGES, bot=bot, outcome=outcome)

    def alert(self, kind: str) -> None:
        with self._lock:
            self._pending.count(ALERTS, kind=kind)

    def take(self) -> Increments:
        with self._lock:
            taken, self._pending = self._pending, Increments()
        return taken

    def flush(self, client: redis.Redis, host: str) -> bool:
        """Add what was counted since the last flush to the host's totals; kept for the next try on error."""
        taken = self.take()
        if not taken:
            return True
        try:
            add_call(host, taken).run(client)
        except (redis.RedisError, OSError):
            # Kept for the next flush. A reply lost after the script ran counts these twice: rarer
            # and milder than losing them whenever the broker blinks.
            with self._lock:
                self._pending.merge(taken.fields)
            return False
        return True


#: The process's one buffer (the API and Feishu clients' hooks feed it).
TALLY = Tally()


# --- restart reasons ----------------------------------------------------------------------------
#: How long a recycle mark lives. Its readers (the watchdog's count of the exit, the alerts
#: listener's rule) look at it when supervisord reports the exit, within a second or so.
RECYCLE_MARK_SECONDS = 300


def mark_recycling(client: redis.Redis, host: str, process: str, pid: int, *, reason: str = "") -> None:
    """A worker about to exit to be recycled says so (a `RecycleMark`), before it exits.

    Read, never taken: the watchdog and the alerts listener both hear the exit, in either order,
    and both read the mark; it expires after RECYCLE_MARK_SECONDS. Its key names the process
    and its pid, so no later process of that name reads it as its own.
    """
    mark = RecycleMark(host=host, process=process, pid=pid, reason=reason, at=time.time())
    client.set(keys.recycling(host, member(process, pid)), mark.to_json(), ex=RECYCLE_MARK_SECONDS)


def recycle_mark(client: redis.Redis, host: str, process: str, pid: int) -> RecycleMark | None:
    """The mark of that process's exit, None if it left none (ValueError if the value is no mark)."""
    raw = client.get(keys.recycling(host, member(process, pid)))
    return None if raw is None else RecycleMark.from_json(raw)
