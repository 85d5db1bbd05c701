"""Per-queue runs of failed subtasks, kept in Redis for the alerts listener.

Every subtask outcome calls `record()` (from any worker process). One Lua script keeps, per
queue, the current count of consecutive failures and the latest error texts, and appends an
event to one list exactly when a run starts (the count reaches the threshold) and when it
ends (the first success after such a run). The `alerts` listener drains those events, so no
run is missed between two of its ticks and none is reported twice.

Keys (namespace `nietest:streak`):
  nietest:streak:<queue>          hash: failures, last_failure_at, last_success_at
  nietest:streak:<queue>:errors   list: latest error texts of the current run (newest first, 100 max)
  nietest:streak:events           list: JSON events {kind: "failure_run"|"recovered", queue, failures, errors, at}
                                  (coordination/events.py: FailureRun, QueueRecovered)
"""

from __future__ import annotations

import time
from typing import Any

import redis

from nietest_daemon.coordination import keys
from nietest_daemon.coordination.connection import ScriptCall, drain_json_list, lua_script
from nietest_daemon.coordination.events import StreakEvent, decode_each, streak_event_from_dict

EVENTS_KEY = keys.STREAK_EVENTS
MAX_EVENTS = 1000
MAX_ERROR_CHARS = 300

_RECORD_SCRIPT = lua_script(__name__, "record")  # lua/streaks_record.lua


def _keys(queue: str) -> list[str]:
    return [keys.streak(queue), keys.streak_errors(queue), EVENTS_KEY]


def record(client: redis.Redis, queue: str, ok: bool, error: str | None = None, *, threshold: int) -> int:
    """Record one subtask outcome on `queue`; returns the current run of consecutive failures."""
    return int(record_outcome_call(queue, ok, error, threshold=threshold).run(client))


def record_outcome_call(queue: str, ok: bool, error: str | None = None, *, threshold: int) -> ScriptCall:
    """`record` as a call to run with others (`connection.run_scripts`)."""
    text = (error or "unknown error")[:MAX_ERROR_CHARS]
    args = ["1" if ok else "0", text, threshold, f"{time.time():.3f}", queue, MAX_EVENTS]
    return ScriptCall(_RECORD_SCRIPT, _keys(queue), args)


def current(client: redis.Redis, queue: str) -> dict[str, Any]:
    """The queue's current run: failures (int) and its latest error texts."""
    key, errs, _ = _keys(queue)
    failures = client.hget(key, "failures")
    errors = [e.decode() if isinstance(e, bytes) else e for e in client.lrange(errs, 0, 99)]
    return {"queue": queue, "failures": int(failures or 0), "errors": errors}


def drain_events(client: redis.Redis, limit: int = MAX_EVENTS) -> list[StreakEvent]:
    """Take (and remove) the pending run events, oldest first; one of no known kind is logged and skipped."""
    return decode_each(streak_event_from_dict, drain_json_list(client, EVENTS_KEY, limit), "unknown streak event")
