"""A cap on image jobs in flight per API, shared by every worker process.

Holders are members of a Redis sorted set scored by the expiry of their lease. A subtask takes
a slot before it creates a job and gives it back when it reaches a terminal state; every poll
renews the lease, so the slot of a holder that crashed comes back by itself when its lease runs
out. A subtask that finds no free slot joins a FIFO waiting set and is woken (re-enqueued) by
the release that frees one, so nothing spins while it waits.

A release hands the freed slot straight to the longest waiter (it becomes a holder with a fresh
lease before it is woken): a subtask arriving between the release and the wake-up cannot take
the slot and push the woken one to the back of the line, so waiters are served in order. A
woken subtask that no longer needs the slot (cancelled meanwhile) releases it, which hands it on.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import redis

from nietest_daemon.coordination import keys

# KEYS: holders, waiting. ARGV: member, cap, now, lease expiry.
_ACQUIRE = """
redis.call("zremrangebyscore", KEYS[1], "-inf", ARGV[3])
if redis.call("zscore", KEYS[1], ARGV[1]) or redis.call("zcard", KEYS[1]) < tonumber(ARGV[2]) then
  redis.call("zadd", KEYS[1], ARGV[4], ARGV[1])
  redis.call("zrem", KEYS[2], ARGV[1])
  return 1
end
redis.call("zadd", KEYS[2], "NX", ARGV[3], ARGV[1])
return 0
"""

# KEYS: holders, waiting. ARGV: member, now, cap, lease expiry.
# Returns the waiter the free slot was handed to (the caller wakes it), if anyone waits.
_RELEASE = """
redis.call("zrem", KEYS[1], ARGV[1])
redis.call("zrem", KEYS[2], ARGV[1])
redis.call("zremrangebyscore", KEYS[1], "-inf", ARGV[2])
if redis.call("zcard", KEYS[1]) < tonumber(ARGV[3]) then
  local next = redis.call("zpopmin", KEYS[2])
  if next[1] then
    redis.call("zadd", KEYS[1], ARGV[4], next[1])
    return next[1]
  end
end
return false
"""


class JobSlots:
    """Slots of one API (`standard` or `lumina`)."""

    def __init__(
        self, client: redis.Redis, api: str, cap: int, lease_seconds: float, *, clock: Callable[[], float] = time.time
    ) -> None:
        """`api` is a lane (`standard` or `lumina`); `clock` gives the wall time leases are scored by
        (every process sharing the slots must agree on it: the default, time.time)."""
        self.client = client
        self.clock = clock
        self.cap = cap
        self.lease_seconds = lease_seconds
        self.holders = keys.slot_holders(api)
        self.waiting = keys.slot_waiting(api)
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)

    def acquire(self, member: str) -> bool:
        """Take (or renew) a slot for `member`; False puts it on the waiting list."""
        now = self.clock()
        args = [member, self.cap, now, now + self.lease_seconds]
        return bool(self._acquire(keys=[self.holders, self.waiting], args=args))

    def renew(self, member: str) -> None:
        self.client.zadd(self.holders, {member: self.clock() + self.lease_seconds}, xx=True)

    def release(self, member: str) -> str | None:
        """Give the slot back (or leave the waiting list); a free slot goes to the longest waiter,
        which is returned: the caller must wake it (its `acquire` then finds the slot its own)."""
        now = self.clock()
        woken = self._release(keys=[self.holders, self.waiting], args=[member, now, self.cap, now + self.lease_seconds])
        return woken.decode() if isinstance(woken, bytes) else woken

    def forget_waiting(self, prefix: str) -> int:
        """Take every waiting member whose name starts with `prefix` off the waiting list (a cancelled
        task's subtasks: `"<task_id>:"`), so that no wake-up is spent on them; how many were removed."""
        pattern = re.sub(r"([\\*?\[\]])", r"\\\1", prefix) + "*"
        removed = 0
        batch: list[bytes] = []
        for member, _ in self.client.zscan_iter(self.waiting, match=pattern, count=1000):
            batch.append(member)
            if len(batch) >= 1000:
                removed += int(self.client.zrem(self.waiting, *batch))
                batch = []
        if batch:
            removed += int(self.client.zrem(self.waiting, *batch))
        return removed

    def in_flight(self) -> int:
        return int(self.client.zcount(self.holders, self.clock(), "+inf"))

    def waiting_count(self) -> int:
        return int(self.client.zcard(self.waiting))
