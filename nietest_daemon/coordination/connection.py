"""The Redis connection every nietest process opens to the broker: opening it, waiting for it to
answer, telling an outage from other errors, and the one loader of the Lua scripts run on it."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.client import Pipeline
from redis.commands.core import Script
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel

from nietest_daemon.core.backoff import backoff
from nietest_daemon.core.logs import get_logger
from nietest_daemon.core.outage import Outage
from nietest_daemon.core.redaction import redact_url
from nietest_daemon.core.settings import Settings

log = get_logger(__name__)

#: The folder of Lua scripts beside the modules that run them (package data: it ships in the wheel).
LUA_DIR = "lua"


def redis_client(settings: Settings, **kwargs: Any) -> redis.Redis:
    """A client of the broker: of the one server BROKER_REDIS_URL names, or of the primary its
    Sentinels name (found again on every new connection, so after a failover too)."""
    kwargs = {"socket_connect_timeout": 5, "health_check_interval": 30, **kwargs}
    target = settings.sentinel
    if target is None:
        return redis.Redis.from_url(settings.broker_url, **kwargs)
    client: redis.Redis = sentinels_of(settings).master_for(  # type: ignore[no-untyped-call]
        target.master, db=target.db, username=target.username, password=target.password, ssl=target.tls, **kwargs
    )
    return client


def sentinels_of(settings: Settings) -> Sentinel:
    """The Sentinels of BROKER_REDIS_URL, asked with NIETEST_REDIS_SENTINEL_PASSWORD."""
    target = settings.sentinel
    assert target is not None
    # No retry of one Sentinel (redis-py's default tries three more times, with backoff: about 4 s per
    # Sentinel that is down, at every discovery): the next Sentinel is the retry.
    ask: dict[str, Any] = {
        "socket_connect_timeout": 2,
        "socket_timeout": 2,
        "ssl": target.tls,
        "retry": Retry(NoBackoff(), 0),
    }
    if settings.redis_sentinel_password:
        ask["password"] = settings.redis_sentinel_password
    return Sentinel(list(target.sentinels), sentinel_kwargs=ask)  # type: ignore[no-untyped-call]


def broker_primary(settings: Settings) -> str | None:
    """Where the broker is now, "host:port": with Sentinels, the primary they name (None when none
    answers); else the one server of BROKER_REDIS_URL (its socket path for a unix URL)."""
    if settings.sentinel is None:
        parts = urlsplit(settings.broker_url)
        return parts.path if parts.scheme == "unix" else f"{parts.hostname}:{parts.port or 6379}"
    try:
        host, port = sentinels_of(settings).discover_master(settings.sentinel.master)  # type: ignore[no-untyped-call]
    except (MasterNotFoundError, redis.RedisError):
        return None
    return f"{host}:{port}"


@dataclass(frozen=True)
class SentinelView:
    """What one Sentinel of BROKER_REDIS_URL said: the masters it watches (name -> its state, as
    redis-py parses `SENTINEL MASTERS`), or `error` when it did not answer or refused us."""

    address: str  # host:port
    masters: dict[str, dict[str, Any]] | None
    error: str | None = None
    refused: bool = False  # it answered with an error (a password, say), rather than not at all


def ask_sentinels(settings: Settings, sentinels: Sentinel | None = None) -> list[SentinelView]:
    """Ask each Sentinel of BROKER_REDIS_URL for the masters it watches, one after the other
    (`sentinels`: a `Sentinel` kept between calls, else a new one; its connections stay open)."""
    sentinels = sentinels if sentinels is not None else sentinels_of(settings)
    views = []
    for client in sentinels.sentinels:
        kwargs = client.connection_pool.connection_kwargs
        address = f"{kwargs.get('host')}:{kwargs.get('port')}"
        try:
            masters: dict[str, dict[str, Any]] = client.sentinel_masters()  # type: ignore[assignment]
            views.append(SentinelView(address, masters))
        except (redis.AuthenticationError, redis.ResponseError) as exc:  # the former is a ConnectionError
            views.append(SentinelView(address, None, f"{type(exc).__name__}: {exc}", refused=True))
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            views.append(SentinelView(address, None, f"{type(exc).__name__}: {exc}"))
        except redis.RedisError as exc:
            views.append(SentinelView(address, None, f"{type(exc).__name__}: {exc}", refused=True))
    return views


def sentinel_primary(views: Sequence[SentinelView], master: str) -> tuple[str, int] | None:
    """The primary of `master` the Sentinels name, "host:port", with its config epoch (one more per
    failover): the newest epoch among those that see it up as a master; None when none does."""
    best: tuple[str, int] | None = None
    for view in views:
        state = (view.masters or {}).get(master)
        if not state or not state.get("is_master") or state.get("is_sdown") or state.get("is_odown"):
            continue
        epoch = int(state.get("config-epoch") or 0)
        if best is None or epoch > best[1]:
            best = (f"{state['ip']}:{state['port']}", epoch)
    return best


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


#: How long a write that guards a payment waits for a replica of the broker to acknowledge it.
REPLICA_ACK_MS = 2000
#: How long a process trusts what it last read of the broker's replicas (INFO replication).
REPLICAS_CACHE_SECONDS = 2.0
_replicas: dict[int, tuple[float, int]] = {}  # id of a connection pool -> (monotonic time, replicas)


class NotReplicated(redis.ConnectionError):
    """The broker's replica did not acknowledge, in time, a write that guards a payment (a failover
    now could lose it). A broker outage error: the message is run again later, as for any outage."""


def replica_count(client: redis.Redis) -> int:
    """How many replicas the broker has now (cached for REPLICAS_CACHE_SECONDS)."""
    pool = id(client.connection_pool)
    now = time.monotonic()
    cached = _replicas.get(pool)
    if cached is None or now - cached[0] > REPLICAS_CACHE_SECONDS:
        info = client.info("replication")
        cached = (now, int(info.get("connected_slaves", 0)) if info.get("role") == "master" else 0)
        _replicas[pool] = cached
    return cached[1]


def replicated(client: redis.Redis, write: Callable[[Pipeline], object]) -> list[Any]:
    """Make the writes `write` adds to a pipeline, then, when the broker has replicas, WAIT until one
    has them: a failover (Redis replicates asynchronously) then cannot lose them. Their results.
    Raises `NotReplicated` when no replica acknowledged within REPLICA_ACK_MS. WAIT covers the
    writes of its own connection only: hence the one pipeline."""
    replicas = replica_count(client)
    try:
        with client.pipeline(transaction=False) as pipe:
            write(pipe)
            if replicas:
                pipe.execute_command("WAIT", 1, REPLICA_ACK_MS)  # type: ignore[no-untyped-call]
            results = pipe.execute()
    except BROKER_OUTAGE_ERRORS:
        _replicas.pop(id(client.connection_pool), None)  # a failover, maybe: the new primary's count differs
        raise
    if replicas:
        if int(results[-1]) < 1:
            _replicas.pop(id(client.connection_pool), None)  # look again next time: the replica may be gone
            raise NotReplicated(f"no broker replica acknowledged a guarding write within {REPLICA_ACK_MS} ms")
        results = results[:-1]
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
