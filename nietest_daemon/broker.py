"""The Dramatiq Redis broker built from the settings, plus queue statistics for `nietest status`."""

from __future__ import annotations

import time
from typing import Any
from uuid import uuid4

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import current_millis, dq_name, xq_name
from dramatiq.middleware import (
    AgeLimit,
    Callbacks,
    CurrentMessage,
    Pipelines,
    Retries,
    ShutdownNotifications,
    TimeLimit,
)

from nietest_daemon.logs import get_logger
from nietest_daemon.settings import Settings, redact_url

NAMESPACE = "dramatiq"
log = get_logger(__name__)


class NietestRedisBroker(RedisBroker):
    """RedisBroker whose workers also run queue maintenance on a timer.

    Dramatiq returns the unacked messages of a dead worker (one killed with SIGKILL) to their
    queue only during "maintenance", which it triggers at random on one command in a thousand.
    On a quiet queue that can take many minutes. `maintain()` runs it deliberately, so a
    killed worker's messages come back within about one heartbeat timeout.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._consuming: set[str] = set()

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000):
        """Also called again by a consumer thread restarting after a connection error.

        Such a restart drops the delayed messages the thread held in memory, but they stay in this
        worker's ack set on the broker, and a live worker's messages are never handed back: they
        would be stuck until the process exits. Taking a new broker id on a restart orphans the
        old id instead; it stops heartbeating, and maintenance returns all its messages to their
        queues after the heartbeat timeout (at least once: one still in hand may run twice).
        """
        if queue_name in self._consuming:
            old, self.broker_id = self.broker_id, str(uuid4())
            log.warning(
                "consumer restarted after a broker error; unacked messages will be redelivered",
                old_broker_id=old,
                broker_id=self.broker_id,
                queue=queue_name,
            )
        self._consuming.add(queue_name)
        return super().consume(queue_name, prefetch, timeout)

    def maintain(self, queue_name: str) -> None:
        # "requeue" with no message ids changes nothing but the heartbeat; the 1 asks for maintenance.
        self.scripts["dispatch"](
            keys=[self.namespace],
            args=[
                "requeue",
                current_millis(),
                queue_name,
                self.broker_id,
                self.heartbeat_timeout,
                self.dead_message_ttl,
                1,
                self._max_unpack_size(),
            ],
        )


def redis_client(settings: Settings, **kwargs: Any) -> redis.Redis:
    return redis.Redis.from_url(settings.broker_url, socket_connect_timeout=5, health_check_interval=30, **kwargs)


def build_broker(settings: Settings) -> NietestRedisBroker:
    """The broker of every nietest process; also made the Dramatiq global broker."""
    from nietest_daemon.middleware import CatchExceptions, TaskTracker

    # after_* hooks run in reverse order: Retries decides, CatchExceptions marks, TaskTracker logs.
    middleware = [
        AgeLimit(),
        TimeLimit(),
        ShutdownNotifications(),
        Callbacks(),
        Pipelines(),
        TaskTracker(),
        CatchExceptions(),
        Retries(max_retries=settings.max_retries),
        CurrentMessage(),
    ]
    broker = NietestRedisBroker(
        client=redis_client(settings),
        middleware=middleware,
        namespace=NAMESPACE,
        heartbeat_timeout=int(settings.broker_heartbeat_timeout * 1000),
    )
    dramatiq.set_broker(broker)
    return broker


def wait_for_broker(client: redis.Redis, url: str, stop: Any = None, max_backoff: float = 5.0) -> bool:
    """Block until the broker answers PING; back off up to `max_backoff` seconds between tries.

    Returns False if `stop` (a threading.Event) is set while waiting.
    """
    delay, waited_since, last_report = 0.1, time.monotonic(), 0.0
    while True:
        try:
            client.ping()
            if time.monotonic() - waited_since > 1:
                log.info("broker is reachable", broker=redact_url(url))
            return True
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            now = time.monotonic()
            if now - last_report > 30:
                log.warning("waiting for the broker", broker=redact_url(url), error=str(exc))
                last_report = now
            if stop is not None and stop.wait(delay):
                return False
            if stop is None:
                time.sleep(delay)
            delay = min(delay * 2, max_backoff)


def queue_stats(client: redis.Redis, queue_name: str) -> dict[str, int]:
    """Depth (ready), delayed, in progress (fetched, not acked) and dead-lettered counts."""
    q = f"{NAMESPACE}:{queue_name}"
    dq = f"{NAMESPACE}:{dq_name(queue_name)}"
    with client.pipeline(transaction=False) as pipe:
        pipe.llen(q)
        pipe.hlen(f"{q}.msgs")
        pipe.hlen(f"{dq}.msgs")
        pipe.zcard(f"{NAMESPACE}:{xq_name(queue_name)}")
        ready, messages, delayed, dead = pipe.execute()
    return {
        "ready": ready,
        "in_progress": max(0, messages - ready),
        "delayed": delayed,
        "dead": dead,
    }
