"""`TaskTracker`: binds `queue`, `actor`, `message_id` and the task / subtask id to every log line
an actor writes, and logs one JSON line per message with its queue latency, duration and
outcome.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import dramatiq
import structlog
from dramatiq.middleware import Middleware

from nietest_daemon.core.logs import get_logger
from nietest_daemon.pipeline.messages import ids_of

log = get_logger(__name__)


class TaskTracker(Middleware):
    def __init__(self) -> None:
        self._local = threading.local()

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        self._local.started = time.monotonic()
        structlog.contextvars.bind_contextvars(
            actor=message.actor_name, message_id=message.message_id, **ids_of(message)
        )

    def after_process_message(self, broker: dramatiq.Broker, message: Any, *, result=None, exception=None) -> None:
        started = getattr(self._local, "started", None)
        fields: dict[str, Any] = {
            "duration_ms": round((time.monotonic() - started) * 1000, 1) if started else None,
            "queue_latency_ms": max(
                0, int(time.time() * 1000) - int(message.options.get("due_ms") or message.message_timestamp)
            ),
            "outcome": "ok" if exception is None else ("failed" if message.failed else "retrying"),
        }
        if message.options.get("retries"):
            fields["retries"] = message.options["retries"]
        if exception is not None:
            fields["error"] = f"{type(exception).__name__}: {exception}"[:1000]
        log.info("message processed", **fields)
        structlog.contextvars.unbind_contextvars("actor", "message_id", "task_id", "subtask_id")

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        log.info("message skipped")
        structlog.contextvars.unbind_contextvars("actor", "message_id", "task_id", "subtask_id")
