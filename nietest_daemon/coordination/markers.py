"""The per-subtask markers that keep delivery at-least-once but work exactly-once.

- Poll chain: the id of the subtask's one current poll message. A redelivered older poll sees
  that it is not current and does nothing, so polling never doubles.
- Creating lock: one message at a time may create a subtask's image job.
- Create-sent marker: claimed atomically with the creating lock, deleted once the job uuid is
  stored, the API refused, or the run ended without sending a create. Finding it means a create
  whose outcome nobody knows: the API has no idempotency key, so that subtask must never create
  again (never pay twice). Its value is the creating process, so a copy of the message can wait
  while that process lives.
- TIMEOUT count: per job uuid, so a redelivered poll of the same job counts it once.
- Alive marks: each worker process renews one on a timer; it expires when the process dies.
- Retry lock: one `nietest retry` of a task at a time (pipeline/retry.py).
"""

from __future__ import annotations

import itertools
import os
import threading
import uuid
from collections.abc import Iterable

import redis
from redis.client import Pipeline

from nietest_daemon.coordination import keys
from nietest_daemon.coordination.connection import (
    BROKER_OUTAGE_ERRORS,
    ScriptCall,
    as_text,
    lua_script,
    replicated,
)
from nietest_daemon.core.settings import default_host_name

CHAIN_TTL_SECONDS = 86400
CREATING_LOCK_SECONDS = 180  # longer than one create call with all the client's retries
CREATE_SENT_TTL_SECONDS = 7 * 86400

# --- the poll chain -------------------------------------------------------------------------------


def set_current_poll(client: redis.Redis, subtask_id: str, message_id: str) -> None:
    client.set(keys.poll_chain(subtask_id), message_id, ex=CHAIN_TTL_SECONDS)


def is_current_poll(client: redis.Redis, subtask_id: str, message_id: str | None) -> bool:
    """True unless a newer poll message of the subtask exists (no chain yet, or no message: True)."""
    if message_id is None:
        return True
    current = client.get(keys.poll_chain(subtask_id))
    return current is None or as_text(current) == message_id


# --- the creating lock and the create-sent marker -------------------------------------------------

#: What `begin_create_call` finds.
LOCKED_AND_CLAIMED = 1  # this message may create the job
LOCKED_IN_DOUBT = 2  # locked, but an earlier create's outcome is unknown (its marker is there)
BUSY = 0  # another message holds the lock: it is creating the job now

_BEGIN_CREATE = lua_script(__name__, "begin_create")  # lua/markers_begin_create.lua
_END_CREATE = lua_script(__name__, "end_create")  # lua/markers_end_create.lua


def begin_create_call(subtask_id: str, owner: str) -> ScriptCall:
    """Take the creating lock for `owner` and claim the create-sent marker for this process, in one
    step; the result is `LOCKED_AND_CLAIMED`, `LOCKED_IN_DOUBT` or `BUSY`.

    The lock is taken over when `owner` already held it (its message was redelivered after its
    process died: nobody else is creating). Whoever took the lock ends with `end_create`.
    """
    return ScriptCall(
        _BEGIN_CREATE,
        [keys.creating(subtask_id), keys.create_sent(subtask_id)],
        [owner, CREATING_LOCK_SECONDS, process_token(), CREATE_SENT_TTL_SECONDS],
    )


def end_create(
    client: redis.Redis, subtask_id: str, owner: str, *, clear_create_sent: bool, poll: str | None = None
) -> None:
    """Delete the lock if `owner` still holds it (it may have expired and been taken since). In the
    same round trip: `clear_create_sent` when this run claimed the marker and no create of its is
    in doubt (the job uuid is stored, the API answered, or no request went out), and `poll`, the id
    of the poll message just enqueued, made the subtask's current poll."""
    try:
        _end_create(client, subtask_id, owner, clear_create_sent, poll)
    except BROKER_OUTAGE_ERRORS:
        # Cut off by a broker outage (a failover, a restart): left as it is, the marker would make every
        # later run of the subtask wait for a create that is not in flight, while this process lives.
        # The worker's housekeeping makes the call again (`end_pending_creates`), without the poll: by
        # then a later poll may be current.
        with _pending_lock:
            _pending_ends[subtask_id] = (owner, clear_create_sent)
        raise


def end_pending_creates(client: redis.Redis) -> int:
    """Make again the `end_create` calls a broker outage cut off (in this process); how many were
    made. Raises on a broker error (the rest wait for the next call)."""
    with _pending_lock:
        pending = list(_pending_ends.items())
    for subtask_id, (owner, clear) in pending:
        _end_create(client, subtask_id, owner, clear, None)
        with _pending_lock:
            if _pending_ends.get(subtask_id) == (owner, clear):
                del _pending_ends[subtask_id]
    return len(pending)


_pending_ends: dict[str, tuple[str, bool]] = {}  # subtask id -> (lock owner, clear the marker)
_pending_lock = threading.Lock()


def _end_create(client: redis.Redis, subtask_id: str, owner: str, clear: bool, poll: str | None) -> None:
    _END_CREATE(
        keys=[keys.creating(subtask_id), keys.create_sent(subtask_id), keys.poll_chain(subtask_id)],
        args=[owner, int(clear), poll or "", CHAIN_TTL_SECONDS],
        client=client,
    )


def create_sender_alive(client: redis.Redis, subtask_id: str) -> bool:
    """The process that claimed the subtask's create-sent marker is still alive (its create may finish)."""
    holder = client.get(keys.create_sent(subtask_id))
    return holder is not None and bool(client.exists(keys.alive(as_text(holder))))


def clear_create_sent(client: redis.Redis, subtask_id: str) -> None:
    client.delete(keys.create_sent(subtask_id))


# --- the end of a subtask -------------------------------------------------------------------------

_FORGET = lua_script(__name__, "forget")  # lua/markers_forget.lua


def forget_markers_call(subtask_id: str) -> ScriptCall:
    """Drop an ended subtask's poll chain and TIMEOUT count (a stale message finds the subtask ended
    and does nothing); else each would stay in the broker for a day after the subtask's end."""
    return ScriptCall(_FORGET, [keys.poll_chain(subtask_id), keys.timeouts(subtask_id)], [])


#: The poll chain of a subtask that is to run again: no poll message is current until the new
#: round's first poll (`end_create`) takes its place.
RETRIED_CHAIN = "retried"


def forget_all(client: redis.Redis, subtask_ids: Iterable[str], *, batch: int = 1000) -> int:
    """Reset the markers of ended subtasks that are to run again (`nietest retry`): the TIMEOUT
    count and the create-sent marker of a create in doubt (whose subtask failed rather than pay
    twice; running it again pays for a new job on purpose) go, and the poll chain is set to
    `RETRIED_CHAIN` rather than deleted: a missing chain makes any poll message current, so a stale
    poll of the ending round would act (send a run message past fair admission); this way every
    older poll is superseded. How many subtasks it looked at."""
    seen = 0
    ids = iter(subtask_ids)
    while chunk := list(itertools.islice(ids, batch)):
        with client.pipeline(transaction=False) as pipe:
            pipe.delete(*(key(i) for i in chunk for key in (keys.timeouts, keys.create_sent)))
            for subtask_id in chunk:
                pipe.set(keys.poll_chain(subtask_id), RETRIED_CHAIN, ex=CHAIN_TTL_SECONDS)
            pipe.execute()
        seen += len(chunk)
    return seen


# --- the retry lock -------------------------------------------------------------------------------

RETRY_LOCK_SECONDS = 300  # far longer than a retry takes (50 000 subtasks: seconds)

_RELEASE_LOCK = lua_script(__name__, "release_lock")  # lua/markers_release_lock.lua


def take_retry_lock(client: redis.Redis, task_id: str, *, ttl: int = RETRY_LOCK_SECONDS) -> str | None:
    """Take the task's retry lock; the token to release it with, or None if another retry holds it."""
    token = uuid.uuid4().hex
    return token if client.set(keys.retry_lock(task_id), token, nx=True, ex=ttl) else None


def release_retry_lock(client: redis.Redis, task_id: str, token: str) -> bool:
    """Release the task's retry lock if `token` still holds it (it may have expired and been taken
    since): compare-and-delete in one script. True if this call released it."""
    return bool(_RELEASE_LOCK(keys=[keys.retry_lock(task_id)], args=[token], client=client))


# --- TIMEOUT answers ------------------------------------------------------------------------------


def count_timeout(client: redis.Redis, subtask_id: str, job_uuid: str) -> int:
    """Record that this job ended TIMEOUT; return how many of the subtask's jobs did. The count
    decides whether a new job is paid for: a replica has it before this returns (`replicated`)."""
    key = keys.timeouts(subtask_id)

    def write(pipe: Pipeline) -> None:
        pipe.sadd(key, job_uuid)
        pipe.expire(key, CREATE_SENT_TTL_SECONDS)
        pipe.scard(key)

    return int(replicated(client, write)[2])


def make_create_sent_durable(client: redis.Redis, subtask_id: str) -> None:
    """Before a create goes out: a replica of the broker has the create-sent marker (and everything
    written before it), so that a failover cannot lose it and let a copy pay again. Raises
    `NotReplicated` (a broker outage: the run is tried again later, the marker cleared meanwhile)."""
    replicated(client, lambda pipe: pipe.expire(keys.create_sent(subtask_id), CREATE_SENT_TTL_SECONDS))


# --- alive marks ----------------------------------------------------------------------------------

_process_token: tuple[int, str] | None = None


def process_token() -> str:
    """This process, unique across hosts and restarts (pid reuse included): `<host>:<pid>:<random>`,
    the host being the daemon's NIETEST_HOST_NAME (a takeover finds a lost host's marks by it)."""
    global _process_token
    if _process_token is None or _process_token[0] != os.getpid():
        host = os.environ.get("NIETEST_HOST_NAME") or default_host_name()
        _process_token = (os.getpid(), f"{host}:{os.getpid()}:{uuid.uuid4().hex[:8]}")
    return _process_token[1]


def mark_alive(client: redis.Redis, ttl_seconds: float) -> None:
    """Called by a worker's housekeeping thread on a timer: this process is alive for `ttl_seconds`."""
    client.set(keys.alive(process_token()), "1", ex=max(1, int(ttl_seconds)))
