"""The Redis connection every nietest process opens to the broker: opening it, waiting for it to
answer, telling an outage from other errors, and the one loader of the Lua scripts run on it."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis
from redis.commands.core import Script

from nietest_daemon.core.backoff import backoff
from nietest_daemon.core.logs import get_logger
from nietest_daemon.core.outage import Outage
from nietest_daemon.core.redaction import redact_url
from nietest_daemon.core.settings import Settings

log = get_logger(__name__)

#: The folder of Lua scripts beside the modules that run them (package data: it ships in the wheel).
LUA_DIR = "lua"


def redis_client(settings: Settings, **kwargs: Any) -> redis.Redis:
    return redis.Redis.from_url(settings.broker_url, socket_connect_timeout=5, health_check_interval=30, **kwargs)


#: The errors of a broker that cannot be reached (down, restarting, the network): nobody's fault
#: but the outage's, so a message that failed on one is not failed for it.
BROKER_OUTAGE_ERRORS: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError)


def unreachable_service(exc: BaseException | None) -> str | None:
    """What `exc` (an actor's exception, say) says could not be reached: "broker" for the broker's
    outage errors, the `service` of any other `Outage` ("store": `StoreUnavailable`), else None.
    The one outage predicate: a message that failed on an outage is run again, not failed."""
    if isinstance(exc, BROKER_OUTAGE_ERRORS):
        return "broker"
    if isinstance(exc, Outage):
        return exc.service
    return None


def lua_script(module: str, name: str) -> Script:
    """The Lua script in `lua/<module>_<name>.lua` beside `module` (pass `__name__`), loaded once
    at import; e.g. `lua_script("nietest_daemon.coordination.scheduler", "admit")` is
    coordination/lua/scheduler_admit.lua. Each call runs it with EVALSHA (the server loads it on
    the first NOSCRIPT) on the client the call passes: `script(keys=..., args=..., client=client)`,
    or `ScriptCall(...).run(client)`, or several calls in one round trip with `run_scripts`."""
    package, _, stem = module.rpartition(".")
    text = resources.files(package).joinpath(LUA_DIR, f"{stem}_{name}.lua").read_bytes()
    return Script(None, text)  # type: ignore[arg-type]  # bytes: no client needed for its SHA


@dataclass(frozen=True)
class ScriptCall:
    """One call of a Lua script, to run alone (`run`) or with others in one round trip (`run_scripts`)."""

    script: Script
    keys: Sequence[str]
    args: Sequence[Any]

    def run(self, client: redis.Redis) -> Any:
        return self.script(keys=self.keys, args=self.args, client=client)


def run_scripts(client: redis.Redis, *calls: ScriptCall) -> list[Any]:
    """Run independent script calls in one round trip; their results, in order.

    A plain pipeline of EVALSHA: redis-py's own script pipelines ask SCRIPT EXISTS first, a second
    round trip. A call the server answers NOSCRIPT (it restarted since) did not run: it is loaded
    and run again, alone; the calls must not depend on each other's order.
    """
    with client.pipeline(transaction=False) as pipe:
        for call in calls:
            pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
        results = pipe.execute(raise_on_error=False)
    for i, (call, result) in enumerate(zip(calls, results, strict=True)):
        if isinstance(result, redis.exceptions.NoScriptError):
            results[i] = call.run(client)
        elif isinstance(result, Exception):
            raise result
    return results


def as_text(reply: object) -> str:
    """A string reply (bytes from a client without `decode_responses`) as text."""
    return reply.decode() if isinstance(reply, bytes) else str(reply)


def push_json(client: redis.Redis, key: str, item: str, limit: int) -> None:
    """Append one JSON item to a list that keeps only its newest `limit` items (the event lists
    `drain_json_list` takes from), in one round trip."""
    with client.pipeline(transaction=False) as pipe:
        pipe.rpush(key, item)
        pipe.ltrim(key, -limit, -1)
        pipe.execute()


def drain_json_list(client: redis.Redis, key: str, limit: int) -> list[Any]:
    """Take (and remove) up to `limit` JSON items from the head of a list, oldest first."""
    with client.pipeline(transaction=True) as pipe:
        pipe.lrange(key, 0, limit - 1)
        pipe.ltrim(key, limit, -1)
        raw, _ = pipe.execute()
    return [json.loads(item) for item in raw]


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
