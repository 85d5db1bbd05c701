"""The Redis connection every nietest process opens to the broker, and waiting for it to answer."""

from __future__ import annotations

import threading
import time
from typing import Any

import redis

from nietest_daemon.core.backoff import backoff
from nietest_daemon.core.logs import get_logger
from nietest_daemon.core.redaction import redact_url
from nietest_daemon.core.settings import Settings

log = get_logger(__name__)


def redis_client(settings: Settings, **kwargs: Any) -> redis.Redis:
    return redis.Redis.from_url(settings.broker_url, socket_connect_timeout=5, health_check_interval=30, **kwargs)


def wait_for_broker(
    client: redis.Redis, url: str, stop: threading.Event | None = None, max_backoff: float = 5.0
) -> bool:
    """Block until the broker answers PING; back off up to `max_backoff` seconds between tries.

    Returns False if `stop` is set while waiting.
    """
    attempt, waited_since, last_report = 0, time.monotonic(), 0.0
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
            delay = backoff(attempt, base=0.1, cap=max_backoff)
            attempt += 1
            if stop is not None and stop.wait(delay):
                return False
            if stop is None:
                time.sleep(delay)
