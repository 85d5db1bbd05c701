"""The per-subtask markers that keep delivery at-least-once but work exactly-once.

- Poll chain: the id of the subtask's one current poll message. A redelivered older poll sees
  that it is not current and does nothing, so polling never doubles.
- Creating lock: one message at a time may create a subtask's image job.
- Create-sent marker: claimed atomically just before a create request goes out, deleted once the
  job uuid is stored (or the API refused). Finding it means a create whose outcome nobody knows:
  the API has no idempotency key, so that subtask must never create again (never pay twice).
  Its value is the creating process, so a copy of the message can wait while that process lives.
- TIMEOUT count: per job uuid, so a redelivered poll of the same job counts it once.
- Alive marks: each worker process renews one on a timer; it expires when the process dies.
"""

from __future__ import annotations

import os
import socket
import uuid

import redis

from nietest_daemon.coordination import keys

CHAIN_TTL_SECONDS = 86400
CREATING_LOCK_SECONDS = 180  # longer than one create call with all the client's retries
CREATE_SENT_TTL_SECONDS = 7 * 86400

_UNLOCK = """
if redis.call("get", KEYS[1]) == ARGV[1] then return redis.call("del", KEYS[1]) end
return 0
"""


# --- the poll chain -------------------------------------------------------------------------------


def set_current_poll(client: redis.Redis, subtask_id: str, message_id: str) -> None:
    client.set(keys.poll_chain(subtask_id), message_id, ex=CHAIN_TTL_SECONDS)


def is_current_poll(client: redis.Redis, subtask_id: str, message_id: str | None) -> bool:
    """True unless a newer poll message of the subtask exists (no chain yet, or no message: True)."""
    if message_id is None:
        return True
    current = client.get(keys.poll_chain(subtask_id))
    return current is None or current.decode() == message_id


# --- the creating lock ----------------------------------------------------------------------------


def take_creating_lock(client: redis.Redis, subtask_id: str, owner: str) -> bool:
    """Take the lock for `owner`; True also when `owner` already held it (its message was redelivered
    after its process died: nobody else is creating, so the lock is taken over)."""
    key = keys.creating(subtask_id)
    if client.set(key, owner, nx=True, ex=CREATING_LOCK_SECONDS):
        return True
    holder = client.get(key)
    if holder is None or holder.decode() != owner:
        return False
    client.set(key, owner, ex=CREATING_LOCK_SECONDS)
    return True


def release_creating_lock(client: redis.Redis, subtask_id: str, owner: str) -> None:
    """Delete the lock only if `owner` still holds it (it may have expired and been taken since)."""
    client.eval(_UNLOCK, 1, keys.creating(subtask_id), owner)


# --- the create-sent marker -----------------------------------------------------------------------


def claim_create_sent(client: redis.Redis, subtask_id: str) -> bool:
    """Claim the marker for this process just before a create request; False if it is already there."""
    return bool(client.set(keys.create_sent(subtask_id), process_token(), nx=True, ex=CREATE_SENT_TTL_SECONDS))


def create_sender_alive(client: redis.Redis, subtask_id: str) -> bool:
    """The process that claimed the subtask's create-sent marker is still alive (its create may finish)."""
    holder = client.get(keys.create_sent(subtask_id))
    return holder is not None and bool(client.exists(keys.alive(holder.decode())))


def clear_create_sent(client: redis.Redis, subtask_id: str) -> None:
    client.delete(keys.create_sent(subtask_id))


# --- TIMEOUT answers ------------------------------------------------------------------------------


def count_timeout(client: redis.Redis, subtask_id: str, job_uuid: str) -> int:
    """Record that this job ended TIMEOUT; return how many of the subtask's jobs did."""
    key = keys.timeouts(subtask_id)
    with client.pipeline() as pipe:
        pipe.sadd(key, job_uuid)
        pipe.expire(key, CREATE_SENT_TTL_SECONDS)
        pipe.scard(key)
        return int(pipe.execute()[2])


# --- alive marks ----------------------------------------------------------------------------------

_process_token: tuple[int, str] | None = None


def process_token() -> str:
    """This process, unique across hosts and restarts (pid reuse included)."""
    global _process_token
    if _process_token is None or _process_token[0] != os.getpid():
        _process_token = (os.getpid(), f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}")
    return _process_token[1]


def mark_alive(client: redis.Redis, ttl_seconds: float) -> None:
    """Called by a worker's housekeeping thread on a timer: this process is alive for `ttl_seconds`."""
    client.set(keys.alive(process_token()), "1", ex=max(1, int(ttl_seconds)))
