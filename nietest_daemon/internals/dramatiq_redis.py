"""Every use of Dramatiq 2.2's private internals, in this one module.

nietest needs four things Dramatiq's public API does not give:
- a consumer that checks each fetched body before Dramatiq decodes it (`NietestRedisConsumer`,
  a subclass of the private `_RedisConsumer` whose `__next__` it mirrors);
- queue maintenance on a timer (`NietestRedisBroker.maintain`: the broker's `dispatch` Lua script,
  called with its positional arguments), so a dead worker's messages come back promptly;
- a new broker id when a consumer thread restarts after a connection error, and broker ids that
  name their process (`<host>/<process>/<pid>/<random>`), so that the messages of a process that
  exited, or of every process of a lost host, can be handed back at once
  (`NietestRedisBroker.hand_back_dead`, `broker_ids_of`, `held_messages`) instead of after the
  heartbeat timeout;
- the broker's key layout (`dramatiq:<queue>`, `.msgs`, `.DQ`, `.XQ`, `__acks__.<broker id>.<queue>`)
  for queue statistics and for handing back messages (`requeue`, the private `do_requeue` command).

tests/test_internals_surface.py pins this surface: after a Dramatiq upgrade it fails first, and
says what changed. Change this module and that test together.
"""

from __future__ import annotations

import time
from typing import Any
from uuid import uuid4

import dramatiq
import redis
from dramatiq.broker import MessageProxy
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.common import compute_backoff, current_millis, dq_name, q_name, xq_name
from dramatiq.errors import ActorNotFound, ConnectionClosed, DecodeError

from nietest_daemon.coordination.connection import as_text, lua_script
from nietest_daemon.core.logs import get_logger
from nietest_daemon.internals.message_checks import arguments_problem, envelope_problem

NAMESPACE = "dramatiq"
log = get_logger(__name__)

__all__ = [
    "NAMESPACE",
    "NietestRedisBroker",
    "NietestRedisConsumer",
    "ack_set_key",
    "heartbeats_key",
    "held_messages",
    "process_identity",
    "bodies_key",
    "broker_ids_of",
    "dead_letter_name",
    "delay_queue_name",
    "queue_key",
    "queue_stats",
    "requeue",
]


# --- the broker's key layout ----------------------------------------------------------------------


def ack_set_key(broker_id: str, queue_name: str, namespace: str = NAMESPACE) -> str:
    """The set of message ids one worker (broker id) fetched from a queue and has not acked."""
    return f"{namespace}:__acks__.{broker_id}.{queue_name}"


def heartbeats_key(namespace: str = NAMESPACE) -> str:
    """The sorted set of broker ids by their last heartbeat (ms); maintenance takes an id whose
    heartbeat is older than the heartbeat timeout for dead and hands back its messages."""
    return f"{namespace}:__heartbeats__"


def process_identity(host: str, process: str, pid: int) -> str:
    """The prefix of the broker ids of one worker process (`/` never occurs in a process name)."""
    return f"{host}/{process}/{pid}/"


def bodies_key(queue_name: str, namespace: str = NAMESPACE) -> str:
    """The hash of message id -> body of a queue."""
    return f"{namespace}:{queue_name}.msgs"


def queue_key(queue_name: str, namespace: str = NAMESPACE) -> str:
    """The list of ready message ids of a queue."""
    return f"{namespace}:{queue_name}"


def delay_queue_name(queue_name: str) -> str:
    """The name of a queue's delay queue (`<queue>.DQ`)."""
    return dq_name(queue_name)


def dead_letter_name(queue_name: str) -> str:
    """The name of a queue's dead-letter set (`<queue>.XQ`)."""
    return xq_name(queue_name)


def broker_ids_of(client: redis.Redis, identity: str, namespace: str = NAMESPACE) -> list[str]:
    """The broker ids with a heartbeat that start with `identity`: one process's (`process_identity`)
    or a whole host's (`<host>/`)."""
    return [m for m in map(as_text, client.zrange(heartbeats_key(namespace), 0, -1)) if m.startswith(identity)]


def held_messages(
    client: redis.Redis, broker_ids: list[str], queue_names: list[str], namespace: str = NAMESPACE
) -> list[dramatiq.Message[Any]]:
    """The messages `broker_ids` fetched and have not acked, on `queue_names` and their delay
    queues (what a hand-back returns); a body that is gone or does not decode is left out."""
    queues = [name for queue in queue_names for name in (queue, delay_queue_name(queue))]
    pairs = [(broker_id, queue) for broker_id in broker_ids for queue in queues]
    if not pairs:
        return []
    with client.pipeline(transaction=False) as pipe:
        for broker_id, queue in pairs:
            pipe.smembers(ack_set_key(broker_id, queue, namespace))
        held = pipe.execute()
    with client.pipeline(transaction=False) as pipe:
        asked = [(queue, sorted(ids)) for (_, queue), ids in zip(pairs, held, strict=True) if ids]
        for queue, ids in asked:
            pipe.hmget(bodies_key(queue, namespace), ids)
        bodies = pipe.execute() if asked else []
    messages: list[dramatiq.Message[Any]] = []
    for body in (b for found in bodies for b in found if b is not None):
        try:
            messages.append(dramatiq.Message.decode(body))
        except DecodeError:  # a bad body is the consumer's to dead-letter, not ours to count
            continue
    return messages


def requeue(broker: RedisBroker, queue_name: str, messages: list[Any]) -> list[str]:
    """Hand messages this worker fetched back to their queue at once (its shutdown); their
    broker-side ids (`options["redis_message_id"]`, set by the Redis broker), which it returns."""
    ids = [m.options["redis_message_id"] for m in messages if "redis_message_id" in m.options]
    if ids:
        broker.do_requeue(queue_name, *ids)
    return ids


#: Takes the ids without a body off an ack set; lua/dramatiq_redis_release_orphans.lua says how.
_RELEASE_ORPHANS = lua_script(__name__, "release_orphans")


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
        except (redis.ConnectionError, redis.TimeoutError) as e:
            # A timeout too (a network cut gives timeouts, not refusals): Dramatiq restarts a consumer
            # on ConnectionClosed, but any other error ends its thread and the worker consumes no more.
            raise ConnectionClosed(e) from None

    def ack(self, message: MessageProxy) -> None:
        try:
            super().ack(message)
        except redis.TimeoutError as e:  # as in `__next__`: restart the consumer, do not end its thread
            raise ConnectionClosed(e) from None

    def nack(self, message: MessageProxy) -> None:
        try:
            super().nack(message)
        except redis.TimeoutError as e:
            raise ConnectionClosed(e) from None

    def requeue(self, messages: Any) -> None:
        """As Dramatiq's, with a broker error raised as `ConnectionClosed`: its consumer thread calls
        this from `close()`, which survives only that; any other error ends the thread for good (the
        process never consumes its queue again). What was not requeued stays in the old broker id's
        ack set, handed back after the heartbeat timeout (`consume` takes a new id on the restart)."""
        try:
            super().requeue(messages)
        except (redis.ConnectionError, redis.TimeoutError) as e:
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
        problem = envelope_problem(fields, self.queue_name)
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
                problem = arguments_problem(actor, fields["args"], fields["kwargs"])
        if problem is not None:
            self._reject(data, problem, fields)
            return None
        return dramatiq.Message(**{**fields, "args": tuple(fields["args"])})

    def _release_orphans(self) -> None:
        """Take the ids without a body off this worker's ack set (atomically), one log line each."""
        acks = ack_set_key(self.broker.broker_id, self.queue_name, self.broker.namespace)
        bodies = bodies_key(self.queue_name, self.broker.namespace)
        for redis_id in _RELEASE_ORPHANS(keys=[acks, bodies], client=self.broker.client):
            log.error("message id without a body dropped", queue=self.queue_name, redis_message_id=redis_id.decode())

    def _reject(self, data: bytes, reason: str, fields: dict[str, Any]) -> None:
        """Dead-letter the fetched message whose body is `data`, with a log line."""
        options = fields.get("options")
        claimed = options.get("redis_message_id") if isinstance(options, dict) else None
        redis_id = self._held_id(data, claimed if isinstance(claimed, str) else None)
        about: dict[str, str] = {
            k: fields[k][:200] for k in ("message_id", "actor_name") if k in fields and isinstance(fields[k], str)
        }
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
        acks = ack_set_key(self.broker.broker_id, self.queue_name, self.broker.namespace)
        bodies = bodies_key(self.queue_name, self.broker.namespace)
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
        self._identity = ""

    def name_process(self, identity: str) -> None:
        """Make this worker's broker ids start with `identity` (`process_identity`), before it
        consumes: whoever sees the process exit can then hand its messages back at once."""
        self._identity = identity
        self.broker_id = self._new_broker_id()

    def _new_broker_id(self) -> str:
        return f"{self._identity}{uuid4().hex}" if self._identity else str(uuid4())

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
            old, self.broker_id = self.broker_id, self._new_broker_id()
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

    def hand_back_dead(self, identity: str, queue_names: list[str]) -> int:
        """Hand back at once the messages held by the broker ids of a process that has exited
        (`identity`, its `process_identity`), or of every process of a lost host (`<host>/`).
        Returns how many messages that was.

        Only for processes known to be gone (supervisord saw it exit, the host was declared lost):
        the messages of a live one would run twice.
        """
        return self.hand_back_ids(broker_ids_of(self.client, identity, self.namespace), queue_names)

    def hand_back_ids(self, dead: list[str], queue_names: list[str]) -> int:
        """Hand back the messages held by the broker ids `dead`: each is marked dead (heartbeat 0)
        and maintenance runs on `queue_names` and their delay queues. How many messages that was."""
        beats = heartbeats_key(self.namespace)
        if not dead:
            return 0
        queues = [name for queue in queue_names for name in (queue, delay_queue_name(queue))]
        with self.client.pipeline(transaction=False) as pipe:
            for broker_id in dead:
                for queue in queues:
                    pipe.scard(ack_set_key(broker_id, queue, self.namespace))
            held = sum(pipe.execute())
        self.client.zadd(beats, dict.fromkeys(dead, 0))
        for queue in queues:
            self.maintain(queue)
        return held


def queue_stats(client: redis.Redis, queue_name: str) -> dict[str, int]:
    """Depth (ready), delayed, in progress (fetched, not acked) and dead-lettered counts."""
    with client.pipeline(transaction=False) as pipe:
        pipe.llen(queue_key(queue_name))
        pipe.hlen(bodies_key(queue_name))
        pipe.hlen(bodies_key(delay_queue_name(queue_name)))
        pipe.zcard(queue_key(dead_letter_name(queue_name)))
        ready, messages, delayed, dead = pipe.execute()
    return {
        "ready": ready,
        "in_progress": max(0, messages - ready),
        "delayed": delayed,
        "dead": dead,
    }
