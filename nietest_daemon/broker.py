"""The Dramatiq Redis broker built from the settings, plus queue statistics for `nietest status`."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import time
import types
import typing
from typing import Any
from uuid import uuid4

import dramatiq
import redis
from dramatiq.broker import MessageProxy
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.common import compute_backoff, current_millis, dq_name, q_name, xq_name
from dramatiq.errors import ActorNotFound, ConnectionClosed
from dramatiq.middleware import (
    AgeLimit,
    Callbacks,
    CurrentMessage,
    Pipelines,
    ShutdownNotifications,
    TimeLimit,
)

from nietest_daemon.logs import get_logger
from nietest_daemon.settings import Settings, redact_url

NAMESPACE = "dramatiq"
log = get_logger(__name__)

# --- messages that cannot run ----------------------------------------------------------------------
#
# Dramatiq 2.x trusts every body it fetches. Garbage placed on a queue by hand (or by a buggy
# producer) breaks its consumer in ways that never end:
# - a body that does not decode (not UTF-8, not JSON, not an object, missing or unknown fields)
#   raises DecodeError out of the consumer; the consumer thread restarts, the message stays in the
#   old broker id's ack set, and maintenance puts it back on the queue: a redelivery loop, forever;
# - `options` that is not an object, or a `message_id` that is not a string, crash it the same way;
# - a `queue_name` other than the consumed queue kills the worker thread that runs it (Dramatiq
#   looks up the consumer by that name), so a process can go on RUNNING with no worker thread left;
# - no `options.redis_message_id`: the ack fails, and the message stays held until its worker exits,
#   then runs again;
# - option types the middleware does arithmetic on (`retries`, `max_retries`, ...) break Retries,
#   a null `max_retries` retries forever, and a `throws` option (in Python, an exception class)
#   kills the worker thread as soon as the actor raises.
# Arguments that do not fit the actor (missing, extra, or of the wrong JSON type) can never
# succeed, so retrying them (MAX_RETRIES, with backoff) only delays the inevitable.
#
# NietestRedisConsumer checks each body before Dramatiq sees it, and dead-letters the ones that
# cannot run (the queue's `.XQ` set, where `nietest status` counts them) with one log line naming
# the message and what is wrong. The worker goes on with the next message.

#: The fields of a message (dramatiq.Message) and the JSON types they must have.
_MESSAGE_FIELDS = frozenset(f.name for f in dataclasses.fields(dramatiq.Message))
_FIELDS: dict[str, tuple[type, ...]] = {
    "queue_name": (str,),
    "actor_name": (str,),
    "args": (list,),
    "kwargs": (dict,),
    "options": (dict,),
    "message_id": (str,),
    "message_timestamp": (int, float),
}
_OPTIONAL_FIELDS = {"message_id", "message_timestamp"}
#: Options that Dramatiq's middleware computes with: a number (or absent; `eta` may be null).
_NUMERIC_OPTIONS = (
    "eta",
    "retries",
    "max_retries",
    "min_backoff",
    "max_backoff",
    "time_limit",
    "max_age",
    "due_ms",
    "broker_error_retries",
)
#: Options that only a Python caller can set (an exception class): never valid in a JSON body.
_CODE_OPTIONS = ("throws",)
#: Argument annotations that are checked against the decoded JSON value; any other is not checked.
_JSON_TYPES: dict[Any, tuple[type, ...]] = {
    str: (str,),
    int: (int,),
    float: (int, float),
    bool: (bool,),
    list: (list,),
    tuple: (list,),
    dict: (dict,),
    type(None): (type(None),),
}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _envelope_problem(fields: Any, queue_name: str) -> str | None:
    """What makes a decoded body unfit to be a message of `queue_name`, or None."""
    if not isinstance(fields, dict):
        return f"not a JSON object (a JSON {type(fields).__name__})"
    for name, kinds in _FIELDS.items():
        if name not in fields:
            if name not in _OPTIONAL_FIELDS:
                return f"missing field {name!r}"
        elif not isinstance(fields[name], kinds) or isinstance(fields[name], bool):
            return f"field {name!r} must be {' or '.join(k.__name__ for k in kinds)}, not {type(fields[name]).__name__}"
    unknown = sorted(set(fields) - _MESSAGE_FIELDS)
    if unknown:
        return f"unknown fields {unknown}"[:200]
    if fields["queue_name"] != queue_name:
        return f"its queue_name {fields['queue_name'][:100]!r} is not this queue"
    options = fields["options"]
    if not isinstance(options.get("redis_message_id"), str):
        return "options.redis_message_id is missing or not a string"
    for name in _NUMERIC_OPTIONS:
        if options.get(name) is not None and not _is_number(options[name]):
            return f"option {name!r} must be a number, not {type(options[name]).__name__}"
    if "max_retries" in options and options["max_retries"] is None:
        return "option 'max_retries' is null (retry forever)"
    for name in _CODE_OPTIONS:
        if name in options:
            return f"option {name!r} cannot come from a message"
    return None


def _json_kinds(hint: Any) -> tuple[type, ...] | None:
    """The JSON value types an annotation admits; None when it is not one we check."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        parts = [_json_kinds(arg) for arg in typing.get_args(hint)]
        return None if any(p is None for p in parts) else tuple(k for p in parts for k in p or ())
    return _JSON_TYPES.get(origin or hint)


@functools.cache
def _signature(fn: Any) -> tuple[inspect.Signature, dict[str, tuple[tuple[type, ...], str]]]:
    """An actor function's signature and, per parameter, the JSON types its annotation admits."""
    signature = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # an annotation that does not resolve: check the arity only
        hints = {}
    checks = {}
    for name, param in signature.parameters.items():
        kinds = _json_kinds(hints.get(name, Any))
        if kinds is not None and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            checks[name] = (kinds, getattr(hints[name], "__name__", None) or str(hints[name]))
    # Shown in log lines with resolved annotations (`task_id: str`, not `task_id: 'str'`).
    shown = signature.replace(
        parameters=[p.replace(annotation=hints.get(n, p.annotation)) for n, p in signature.parameters.items()],
        return_annotation=inspect.Signature.empty,
    )
    return shown, checks


def _arguments_problem(actor: dramatiq.Actor, args: list[Any], kwargs: dict[str, Any]) -> str | None:
    """Why `actor(*args, **kwargs)` cannot work, or None."""
    try:
        signature, checks = _signature(actor.fn)
    except (TypeError, ValueError):  # a callable without a readable signature: leave it to the actor
        return None
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        return f"arguments do not fit {actor.actor_name}{signature}: {exc}"
    for name, value in bound.arguments.items():
        if name in checks and not isinstance(value, checks[name][0]):
            return f"argument {name!r} of {actor.actor_name} must be {checks[name][1]}, not {type(value).__name__}"
    return None


#: Removes from an ack set (KEYS[1]) the ids with no body in the queue's hash (KEYS[2]); returns them.
#: One script, so an id acked by a worker thread meanwhile is never mistaken for one without a body.
_RELEASE_ORPHANS = """
local released = {}
for _, id in ipairs(redis.call("smembers", KEYS[1])) do
    if redis.call("hexists", KEYS[2], id) == 0 then
        redis.call("srem", KEYS[1], id)
        table.insert(released, id)
    end
end
return released
"""


def _preview(data: bytes) -> str:
    return repr(data[:120]) + (f"... ({len(data)} bytes)" if len(data) > 120 else "")


class NietestRedisConsumer(_RedisConsumer):
    """Dramatiq's Redis consumer, plus: a fetched message that cannot run is dead-lettered, logged.

    `__next__` mirrors `_RedisConsumer.__next__` of Dramatiq 2.2 (fetch up to the prefetch, back
    off while the queue is empty) with the check of each body added between the fetch and the
    decode. A fetched id with no body (placed on the list by hand) is taken off this worker's ack
    set, where Dramatiq would leave it, and logged.
    """

    def __next__(self) -> MessageProxy | None:
        try:
            while True:
                if not self.message_cache:
                    # Prefetch up to the limit; when nothing came, long-poll up to the idle timeout.
                    messages: list[bytes | None] = []
                    if self.outstanding_message_count < self.prefetch:
                        messages = self.broker.do_fetch(self.queue_name, self.prefetch - self.outstanding_message_count)
                        self.message_cache = messages
                    if not messages:
                        self.misses, backoff_ms = compute_backoff(self.misses, max_backoff=self.timeout)
                        time.sleep(backoff_ms / 1000)
                        return None
                data = self.message_cache.pop(0)
                self.misses = 0
                message = self._check(data)
                if message is not None:
                    self.queued_message_ids.add(message.message_id)
                    return MessageProxy(message)
        except redis.ConnectionError as e:
            raise ConnectionClosed(e) from None

    def _check(self, data: bytes | None) -> dramatiq.Message | None:
        """The message in `data`; or None, after dead-lettering (or dropping) what cannot run."""
        if data is None:  # an id pushed on the list with no body in the hash: nothing to run or keep
            self._release_orphans()
            return None
        try:
            fields = dramatiq.get_encoder().decode(data)
        except Exception as exc:
            cause = getattr(exc, "error", None) or exc
            kind = "not UTF-8" if isinstance(cause, UnicodeDecodeError) else "not JSON"
            self._reject(data, f"{kind}: {str(cause)[:200]}", {})
            return None
        problem = _envelope_problem(fields, self.queue_name)
        if problem is not None:
            self._reject(data, problem, fields if isinstance(fields, dict) else {})
            return None
        try:
            actor = self.broker.get_actor(fields["actor_name"])
        except ActorNotFound:
            problem = f"no actor named {fields['actor_name'][:100]!r}"
        else:
            if actor.queue_name != q_name(self.queue_name):
                problem = f"actor {actor.actor_name} belongs to queue {actor.queue_name}"
            else:
                problem = _arguments_problem(actor, fields["args"], fields["kwargs"])
        if problem is not None:
            self._reject(data, problem, fields)
            return None
        return dramatiq.Message(**{**fields, "args": tuple(fields["args"])})

    def _release_orphans(self) -> None:
        """Take the ids without a body off this worker's ack set (atomically), one log line each."""
        acks = f"{self.broker.namespace}:__acks__.{self.broker.broker_id}.{self.queue_name}"
        bodies = f"{self.broker.namespace}:{self.queue_name}.msgs"
        for redis_id in self.broker.scripts["release_orphans"](keys=[acks, bodies]):
            log.error("message id without a body dropped", queue=self.queue_name, redis_message_id=redis_id.decode())

    def _reject(self, data: bytes, reason: str, fields: dict[str, Any]) -> None:
        """Dead-letter the fetched message whose body is `data`, with a log line."""
        options = fields.get("options")
        claimed = options.get("redis_message_id") if isinstance(options, dict) else None
        redis_id = self._held_id(data, claimed if isinstance(claimed, str) else None)
        about = {k: fields[k][:200] for k in ("message_id", "actor_name") if k in fields and isinstance(fields[k], str)}
        if "actor_name" in about:
            about["actor"] = about.pop("actor_name")
        if redis_id is None:
            # Cannot happen while this worker holds the message; logged rather than lost silently.
            log.error(
                "bad message not found among this worker's messages; not dead-lettered",
                queue=self.queue_name,
                reason=reason,
                size_bytes=len(data),
                preview=_preview(data),
                **about,
            )
            return
        self.broker.do_nack(self.queue_name, redis_id)
        log.error(
            "bad message dead-lettered",
            queue=self.queue_name,
            redis_message_id=redis_id,
            reason=reason,
            size_bytes=len(data),
            preview=_preview(data),
            **about,
        )

    def _held_id(self, data: bytes, claimed: str | None) -> str | None:
        """The id under which this worker fetched `data`: its ack set, matched by body.

        The fetch script returns bodies without their ids, and a bad body may name no id (or a
        wrong one); the ack set holds only what this worker fetched and has not acked, so it is small.
        """
        client = self.broker.client
        acks = f"{self.broker.namespace}:__acks__.{self.broker.broker_id}.{self.queue_name}"
        bodies = f"{self.broker.namespace}:{self.queue_name}.msgs"
        if claimed is not None and client.sismember(acks, claimed) and client.hget(bodies, claimed) == data:
            return claimed
        held = sorted(client.smembers(acks))
        if not held:
            return None
        for redis_id, body in zip(held, client.hmget(bodies, held), strict=True):
            if body == data:
                return redis_id.decode()
        return None


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
        self.scripts["release_orphans"] = self.client.register_script(_RELEASE_ORPHANS)

    @property
    def consumer_class(self) -> type[NietestRedisConsumer]:
        return NietestRedisConsumer

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
    from nietest_daemon.middleware import BrokerAwareRetries, CatchExceptions, TaskTracker

    # after_* hooks run in reverse order: Retries decides, CatchExceptions marks, TaskTracker logs.
    middleware = [
        AgeLimit(),
        TimeLimit(),
        ShutdownNotifications(),
        Callbacks(),
        Pipelines(),
        TaskTracker(),
        CatchExceptions(),
        BrokerAwareRetries(max_retries=settings.max_retries),
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
