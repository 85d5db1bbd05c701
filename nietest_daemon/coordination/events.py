"""The events that cross processes through the broker: one typed record and one JSON form each.

- `WorkerUnresponsive`: the watchdog killed a worker that gave no sign of life
  (programs/watchdog.py pushes it on a list, coordination/lifelines.py; the alerts listener
  drains it).
- `FailureRun` / `QueueRecovered`: a queue's run of failed subtasks began / ended (pushed by the
  Lua script of coordination/streaks.py, whose JSON these match; the alerts listener drains them).
- `HostLost` / `HostBack`: a host was declared lost and its work handed back / it beats again
  (coordination/hosts.py pushes them; the alerts listener of any host drains them, so one sends).
- `BrokerFailover`: the Sentinels named a new primary of the broker (programs/alerts/failover.py:
  the alerts listener of the one daemon that recorded the change on the broker first sends it).
- `RecycleMark`: a worker about to exit to be recycled says so (programs/worker.py), under a key
  of its own per process and pid with a TTL (coordination/counters.py). The watchdog and the
  alerts listener both read it; neither deletes it.

Every JSON object names its `kind`. `from_dict`/`from_json` raise ValueError for anything that
is not a complete event of their kind.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Self, TypeVar

from nietest_daemon.core.logs import get_logger

log = get_logger(__name__)

T = TypeVar("T")


def _decode(kind: str, data: object, build: Callable[[Mapping[str, Any]], T]) -> T:
    """`build(data)` if `data` is an object of `kind`; ValueError otherwise (a field missing or mistyped)."""
    if not isinstance(data, Mapping) or data.get("kind") != kind:
        raise ValueError(f"not a {kind!r} event: {str(data)[:200]}")
    try:
        return build(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed {kind!r} event ({type(exc).__name__}: {exc}): {str(data)[:200]}") from exc


def _loads(text: str | bytes) -> object:
    return json.loads(text)  # a JSONDecodeError is a ValueError


@dataclass(frozen=True)
class _Event:
    """What every event shares: its JSON form is its fields plus its `kind`."""

    KIND: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.KIND, **asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: object) -> Self:
        raise NotImplementedError

    @classmethod
    def from_json(cls, text: str | bytes) -> Self:
        return cls.from_dict(_loads(text))


@dataclass(frozen=True)
class WorkerUnresponsive(_Event):
    """The watchdog killed worker `process` (pid `pid`) after `silent_seconds` without a sign of life."""

    KIND: ClassVar[str] = "unresponsive"

    queue: str  # the queue's name, e.g. nietest_subtask
    process: str  # group:name, as supervisorctl names it
    pid: int
    silent_seconds: float
    host: str
    at: float  # unix time of the kill

    @classmethod
    def from_dict(cls, data: object) -> WorkerUnresponsive:
        return _decode(
            cls.KIND,
            data,
            lambda d: cls(
                queue=str(d["queue"]),
                process=str(d["process"]),
                pid=int(d["pid"]),
                silent_seconds=float(d["silent_seconds"]),
                host=str(d["host"]),
                at=float(d["at"]),
            ),
        )


@dataclass(frozen=True)
class FailureRun(_Event):
    """`failures` consecutive subtasks of `queue` failed (the alert threshold); `errors`: the latest, newest first."""

    KIND: ClassVar[str] = "failure_run"

    queue: str
    failures: int
    errors: tuple[str, ...]
    at: float  # unix time

    @classmethod
    def from_dict(cls, data: object) -> FailureRun:
        # Lua's cjson writes an empty table as {}: no errors either way.
        return _decode(
            cls.KIND,
            data,
            lambda d: cls(
                queue=str(d["queue"]),
                failures=int(d["failures"]),
                errors=tuple(str(e) for e in d["errors"] or ()),
                at=float(d["at"]),
            ),
        )


@dataclass(frozen=True)
class QueueRecovered(_Event):
    """A subtask of `queue` succeeded after a run of `failures` failures that had been reported."""

    KIND: ClassVar[str] = "recovered"

    queue: str
    failures: int
    at: float  # unix time

    @classmethod
    def from_dict(cls, data: object) -> QueueRecovered:
        return _decode(
            cls.KIND,
            data,
            lambda d: cls(queue=str(d["queue"]), failures=int(d["failures"]), at=float(d["at"])),
        )


#: What coordination/streaks.py reports.
StreakEvent = FailureRun | QueueRecovered


def streak_event_from_dict(data: object) -> StreakEvent:
    """A `FailureRun` or a `QueueRecovered`, by its `kind`; ValueError for anything else."""
    kind = data.get("kind") if isinstance(data, Mapping) else None
    if kind == QueueRecovered.KIND:
        return QueueRecovered.from_dict(data)
    return FailureRun.from_dict(data)


def streak_event_from_json(text: str | bytes) -> StreakEvent:
    return streak_event_from_dict(_loads(text))


@dataclass(frozen=True)
class RecycleMark(_Event):
    """Worker `process` (pid `pid`) on `host` exits to be recycled, for `reason` (its limit)."""

    KIND: ClassVar[str] = "recycle"

    host: str
    process: str  # supervisord's process name, e.g. subtask_00
    pid: int
    reason: str
    at: float  # unix time of the mark

    @classmethod
    def from_dict(cls, data: object) -> RecycleMark:
        return _decode(
            cls.KIND,
            data,
            lambda d: cls(
                host=str(d["host"]),
                process=str(d["process"]),
                pid=int(d["pid"]),
                reason=str(d["reason"]),
                at=float(d["at"]),
            ),
        )


@dataclass(frozen=True)
class HostLost(_Event):
    """Host `host` gave no sign of life for `silent_seconds`; daemon `taken_over_by` (a host name)
    handed back the `messages` its workers held, which continue `subtasks` subtasks elsewhere."""

    KIND: ClassVar[str] = "host_lost"

    host: str
    silent_seconds: float
    taken_over_by: str
    messages: int
    subtasks: int
    at: float  # unix time of the takeover's end

    @classmethod
    def from_dict(cls, data: object) -> HostLost:
        return _decode(
            cls.KIND,
            data,
            lambda d: cls(
                host=str(d["host"]),
                silent_seconds=float(d["silent_seconds"]),
                taken_over_by=str(d["taken_over_by"]),
                messages=int(d["messages"]),
                subtasks=int(d["subtasks"]),
                at=float(d["at"]),
            ),
        )


@dataclass(frozen=True)
class HostBack(_Event):
    """Host `host`, declared lost `lost_seconds` ago, beats again (its workers were restarted, so
    nothing it held before runs: coordination/hosts.py)."""

    KIND: ClassVar[str] = "host_back"

    host: str
    lost_seconds: float
    workers_restarted: int
    at: float

    @classmethod
    def from_dict(cls, data: object) -> HostBack:
        return _decode(
            cls.KIND,
            data,
            lambda d: cls(
                host=str(d["host"]),
                lost_seconds=float(d["lost_seconds"]),
                workers_restarted=int(d["workers_restarted"]),
                at=float(d["at"]),
            ),
        )


HostEvent = HostLost | HostBack


def host_event_from_dict(data: object) -> HostEvent:
    kind = data.get("kind") if isinstance(data, Mapping) else None
    return HostBack.from_dict(data) if kind == HostBack.KIND else HostLost.from_dict(data)


@dataclass(frozen=True)
class BrokerFailover(_Event):
    """The Sentinels name `new` ("host:port") as the primary of `master`, after `old`: a failover,
    seen first by host `seen_by`; `epoch` is the Sentinels' config epoch of `new` (one more per failover)."""

    KIND: ClassVar[str] = "broker_failover"

    master: str
    old: str
    new: str
    epoch: int
    seen_by: str
    at: float  # unix time it was seen

    @classmethod
    def from_dict(cls, data: object) -> BrokerFailover:
        return _decode(
            cls.KIND,
            data,
            lambda d: cls(
                master=str(d["master"]),
                old=str(d["old"]),
                new=str(d["new"]),
                epoch=int(d["epoch"]),
                seen_by=str(d["seen_by"]),
                at=float(d["at"]),
            ),
        )


def decode_each(decode: Callable[[object], T], items: Iterable[object], what: str) -> list[T]:
    """`decode` of each item; one that is not a valid event is logged (`what`) and skipped."""
    decoded: list[T] = []
    for item in items:
        try:
            decoded.append(decode(item))
        except ValueError as exc:
            log.warning(what, error=str(exc))
    return decoded
