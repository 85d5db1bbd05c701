"""The seed's two middlewares, done right.

- `TaskTracker`: binds `queue`, `actor`, `message_id` and the task / subtask id to every log line
  an actor writes, and logs one JSON line per message with its queue latency, duration and
  outcome.
- `BrokerAwareRetries`: Dramatiq's Retries, except that an actor which failed only because the
  broker was unreachable is retried (with a short backoff) whatever MAX_RETRIES says: the
  failure is not the message's, and a dead letter would leave its subtask to the sweep.
- `CatchExceptions`: when an actor fails for good (after Dramatiq's own retries, MAX_RETRIES),
  the subtask or task it worked on is marked failed with the error text, so nothing stays
  `processing`; the traceback is logged as a structured field by the worker thread, and the
  worker keeps running.

Order matters: Dramatiq calls `after_*` hooks in reverse order, so `build_broker` lists
TaskTracker, then CatchExceptions, then Retries: Retries decides first whether the message
failed for good, CatchExceptions then marks it, TaskTracker logs the final outcome.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import dramatiq
import redis
import structlog
from dramatiq.middleware import Middleware, Retries

from nietest_daemon.logs import get_logger

log = get_logger("nietest_daemon.tracker")

#: actor name -> the keyword its first argument is logged as.
ID_ARGUMENT = {
    "process_task": "task_id",
    "send_notice": "task_id",
    "run_subtask": "subtask_id",
    "run_lumina_subtask": "subtask_id",
    "poll_subtask": "subtask_id",
    "poll_lumina_subtask": "subtask_id",
}


def _ids(message: Any) -> dict[str, str]:
    key = ID_ARGUMENT.get(message.actor_name)
    if key and message.args and isinstance(message.args[0], str):
        return {key: message.args[0][:200]}
    return {}


class TaskTracker(Middleware):
    def __init__(self) -> None:
        self._local = threading.local()

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        self._local.started = time.monotonic()
        structlog.contextvars.bind_contextvars(actor=message.actor_name, message_id=message.message_id, **_ids(message))

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


#: Retries of a message whose actor failed on a broker connection error (about 17 minutes in all).
BROKER_ERROR_RETRIES = 20
BROKER_ERROR_MAX_BACKOFF_MS = 60_000
BROKER_ENQUEUE_PATIENCE_SECONDS = 600.0


class BrokerAwareRetries(Retries):
    def after_process_message(self, broker: dramatiq.Broker, message: Any, *, result=None, exception=None) -> None:
        attempts = message.options.get("broker_error_retries", 0)
        if not isinstance(exception, redis.ConnectionError | redis.TimeoutError) or attempts >= BROKER_ERROR_RETRIES:
            super().after_process_message(broker, message, result=result, exception=exception)
            return
        message.options["broker_error_retries"] = attempts + 1
        delay = min(BROKER_ERROR_MAX_BACKOFF_MS, 500 * 2**attempts)
        log.warning(
            "broker unreachable during the message; retrying it",
            error=str(exception),
            retry_in_ms=delay,
            **_ids(message),
        )
        # The broker may still be down. The retry copy must exist before the original is acked
        # (Dramatiq acks it after this hook, and will keep trying until the broker is back), so
        # keep trying too; past the patience the original is failed: dead-lettered, not lost.
        deadline = time.monotonic() + BROKER_ENQUEUE_PATIENCE_SECONDS
        pause = 0.5
        while True:
            try:
                broker.enqueue(message, delay=delay)
                return
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if time.monotonic() >= deadline:
                    log.error("broker unreachable; message dead-lettered", error=str(exc), **_ids(message))
                    message.fail()
                    return
                time.sleep(pause)
                pause = min(5.0, pause * 2)


class CatchExceptions(Middleware):
    def after_process_message(self, broker: dramatiq.Broker, message: Any, *, result=None, exception=None) -> None:
        if exception is None or not message.failed:
            return
        ids = _ids(message)
        if isinstance(exception, redis.ConnectionError | redis.TimeoutError):
            # The broker blinked: not the subtask's fault. It stays processing and the sweep resumes it.
            log.warning("broker unreachable during the message; left for the sweep", error=str(exception), **ids)
            return
        error = f"{type(exception).__name__}: {exception}"[:2000]
        try:
            from nietest_daemon import pipeline

            ctx = pipeline.context()
            if "subtask_id" in ids:
                sub = ctx.store.get_subtask(ids["subtask_id"])
                if sub is not None:
                    pipeline.finish(ctx, sub, pipeline.FAILED, error=f"unexpected error: {error}")
            elif "task_id" in ids and message.actor_name == pipeline.PROCESS_TASK:
                task_id = ids["task_id"]
                if ctx.store.fail_task(task_id, f"unexpected error: {error}"):
                    ctx.store.cancel_task(task_id)  # its subtasks must not run on
                    task = ctx.store.get_task(task_id)
                    if task is not None:
                        pipeline.notices.task_finished(ctx, task)
            else:
                return
            log.error("marked failed after an unexpected error", error=error, **ids)
        except Exception:
            log.exception("could not mark the failure", **ids)
