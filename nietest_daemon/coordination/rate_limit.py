"""A request rate limit shared by every process on one Redis: Feishu's webhook limit.

`RateLimiter` keeps each webhook under `per_second` requests a second and `per_minute` a minute.
The count is a sliding-window log in one sorted set per webhook, updated by one Lua script
(lua/rate_limit_acquire.lua) and timed by the Redis server's clock, so processes on hosts whose
clocks disagree still share one count. Without Redis, or for `REDIS_RETRY_AFTER` seconds after
Redis failed, an in-process log stands in: one per process, shared by all its limiters.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable

import redis

from nietest_daemon.coordination import keys
from nietest_daemon.coordination.connection import ScriptCall, lua_script
from nietest_daemon.core.backoff import jittered
from nietest_daemon.core.logs import get_logger
from nietest_daemon.core.redaction import redact

log = get_logger(__name__)

REDIS_RETRY_AFTER = 30.0  # seconds the limiter stays local after a Redis failure

_ACQUIRE = lua_script(__name__, "acquire")  # lua/rate_limit_acquire.lua


class _LocalWindows:
    """The in-process sliding-window logs (by key), for when Redis is absent or failing."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.logs: dict[str, deque[float]] = {}


#: One per process: every limiter of the process counts against the same windows.
_LOCAL_WINDOWS = _LocalWindows()


class RateLimiter:
    """At most `per_second` requests a second and `per_minute` a minute per webhook.

    With a Redis client the count is shared by every process using that Redis; the key is
    `{key_prefix}:{sha256(url)[:24]}`, never the URL. `slack` widens both windows a little so that
    network jitter cannot make the receiver count one request too many.
    """

    def __init__(
        self,
        redis_client: redis.Redis | None,
        key_prefix: str = keys.FEISHU_RATE_LIMIT_PREFIX,
        *,
        per_second: int = 5,
        per_minute: int = 100,
        slack: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.redis = redis_client
        self.key_prefix = key_prefix
        self.per_second = per_second
        self.per_minute = per_minute
        self.second_window = 1.0 + slack
        self.minute_window = 60.0 + slack
        self.clock = clock
        self.sleep = sleep
        self._redis_down_until = float("-inf")

    def key_for(self, webhook_url: str) -> str:
        """The Redis key (and local key) of one webhook: a hash, never the URL."""
        return keys.feishu_rate_limit(hashlib.sha256(webhook_url.encode()).hexdigest()[:24], self.key_prefix)

    def acquire(self, webhook_url: str, timeout: float) -> bool:
        """Take a slot for one request, waiting up to `timeout` seconds; False if none came in time."""
        key = self.key_for(webhook_url)
        deadline = self.clock() + max(0.0, timeout)
        while True:
            wait = self._try_redis(key)
            if wait is None:
                wait = self._try_local(key)
            if wait <= 0:
                return True
            remaining = deadline - self.clock()
            if wait > remaining:
                return False
            self.sleep(wait + jittered(0.02, (0.0, 1.0)))  # up to 20 ms more: waiters do not wake together

    def _try_redis(self, key: str) -> float | None:
        """0 if a slot was taken, else seconds to wait; None when Redis is absent or failing."""
        if self.redis is None or self.clock() < self._redis_down_until:
            return None
        windows = [self.per_second, self.per_minute, int(self.second_window * 1000), int(self.minute_window * 1000)]
        try:
            wait_ms = int(ScriptCall(_ACQUIRE, [key], [*windows, uuid.uuid4().hex[:12]]).run(self.redis))
        except (redis.RedisError, OSError) as exc:
            # Do not ask a failing Redis again for a while: each try can cost its client's retries.
            self._redis_down_until = self.clock() + REDIS_RETRY_AFTER
            log.warning(
                "feishu rate limiter: redis unavailable, limiting this process only",
                error=redact(repr(exc))[:300],
                retry_in=REDIS_RETRY_AFTER,
            )
            return None
        return wait_ms / 1000.0

    def _try_local(self, key: str) -> float:
        now = self.clock()
        with _LOCAL_WINDOWS.lock:
            stamps = _LOCAL_WINDOWS.logs.setdefault(key, deque())
            while stamps and stamps[0] <= now - self.minute_window:
                stamps.popleft()
            if len(stamps) >= self.per_minute:
                return max(0.001, stamps[len(stamps) - self.per_minute] + self.minute_window - now)
            recent = sum(1 for s in stamps if s > now - self.second_window)
            if recent >= self.per_second:
                return max(0.001, stamps[len(stamps) - self.per_second] + self.second_window - now)
            stamps.append(now)
            return 0.0
