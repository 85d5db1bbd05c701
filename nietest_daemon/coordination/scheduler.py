"""Fair admission of one lane's subtasks to its job slots, shared by every process on the broker.

A subtask waiting for a slot costs one list entry (its id) in the broker, not a message:

- `add(task, ids, weight)` appends a task's subtask ids to its ready list and makes the task
  active (a member of the lane's task set, scored by its *pass*);
- `admit()` is one atomic script: while a slot is free, it takes the active task with the
  lowest pass, pops its next subtask, makes it a slot holder (with a lease) and advances the
  task's pass by 1 / weight. It returns the admitted ids: the caller enqueues a run message for
  each, and for nothing else.

This is stride scheduling, a weighted round-robin: N active tasks of equal weight are admitted in
turn whatever their sizes and arrival order; a task of weight 3 is admitted three times as often
as one of weight 1. A task whose ready list runs dry leaves the set, so a task that cannot use its
share leaves it to the others; a task that becomes ready starts at the pass of the last admission
(`clock`), so it neither jumps ahead of the others nor waits behind credit they built up.

Holders are scored by their lease expiry; every poll `renew`s it, so the slot of a holder whose
process died comes back by itself. `cancel(task)`
drops a task's ready list, its entry and its holders in one step, whatever its size.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import redis

from nietest_daemon.coordination import keys
from nietest_daemon.coordination.connection import ScriptCall, as_text, lua_script

#: Ids pushed per command (a Lua `unpack` and one round trip stay small).
PUSH_BATCH = 1000

# The scripts, in lua/scheduler_<name>.lua (their KEYS and ARGV are described there).
_ADD_SCRIPT = lua_script(__name__, "add")
_ADMIT_SCRIPT = lua_script(__name__, "admit")
_HOLD_SCRIPT = lua_script(__name__, "hold")
_CANCEL_SCRIPT = lua_script(__name__, "cancel")


@dataclass(frozen=True)
class TaskShare:
    """One active task of a lane, as `nietest status` shows it."""

    task_id: str
    weight: int
    ready: int  # subtasks waiting for a slot
    holding: int  # slots its subtasks hold now


class Scheduler:
    """The job slots of one lane (`standard` or `lumina`) and the fair queue in front of them.

    Subtask ids must be `<task id>:<suffix>` (domain/taskspec.py makes them so): `cancel` finds a
    task's slot holders by that prefix.
    """

    def __init__(
        self,
        client: redis.Redis,
        api: str,
        cap: int,
        lease_seconds: float,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.api = api
        self.cap = cap
        self.lease_seconds = lease_seconds
        self.clock = clock
        self.holders = keys.slot_holders(api)
        self.tasks = keys.sched_tasks(api)
        self.weights = keys.sched_weights(api)

    # --- waiting ---------------------------------------------------------------------------------

    def add(self, task_id: str, subtask_ids: Iterable[str], weight: int = 1, *, front: bool = False) -> int:
        """Queue subtasks of a task for a slot (at the back, or at the front to give a place back);
        the task becomes active with `weight`. How many of its subtasks wait now."""
        ready = keys.sched_ready(self.api, task_id)
        key_list = [self.tasks, self.weights, keys.sched_clock(self.api), ready]
        where = "front" if front else "back"

        def push(batch: list[str]) -> int:
            return int(ScriptCall(_ADD_SCRIPT, key_list, [task_id, weight, where, *batch]).run(self.client))

        waiting = 0
        batch: list[str] = []
        for subtask_id in subtask_ids:
            batch.append(subtask_id)
            if len(batch) >= PUSH_BATCH:
                waiting = push(batch)
                batch = []
        if batch or not waiting:
            waiting = push(batch)
        return waiting

    def replace(self, task_id: str, subtask_ids: Iterable[str], weight: int = 1) -> int:
        """Make `subtask_ids` the task's whole ready list (a re-expansion, a repair): idempotent,
        unlike `add`. Subtasks that hold a slot now are left out. How many wait now."""
        held = {as_text(h) for h in self.client.zrange(self.holders, 0, -1)}
        self.client.delete(keys.sched_ready(self.api, task_id))
        return self.add(task_id, (i for i in subtask_ids if i not in held), weight)

    def admit(self, limit: int = 0, *, releasing: str = "") -> list[str]:
        """Fill the free slots fairly (at most `limit`, 0: all), after giving up the slot of
        `releasing` if given; the admitted subtask ids, in order. One round trip."""
        return self.admitted_ids(self._admit_call(limit, releasing).run(self.client))

    def _admit_call(self, limit: int, releasing: str) -> ScriptCall:
        now = self.clock()
        return ScriptCall(
            _ADMIT_SCRIPT,
            [self.holders, self.tasks, self.weights, keys.sched_clock(self.api)],
            [self.cap, now, now + self.lease_seconds, keys.sched_ready_prefix(self.api), limit, releasing],
        )

    def cancel(self, task_id: str) -> tuple[int, int]:
        """Drop a task's waiting subtasks and free its slots, in one step: (ready entries dropped,
        slots freed). The caller then calls `admit` to hand the freed slots on."""
        dropped, released = ScriptCall(
            _CANCEL_SCRIPT,
            [self.holders, self.tasks, self.weights, keys.sched_ready(self.api, task_id)],
            [task_id, f"{task_id}:"],
        ).run(self.client)
        return int(dropped), int(released)

    # --- holding -----------------------------------------------------------------------------------

    def hold(self, subtask_id: str) -> bool:
        """Called by a subtask's run: True when it holds a slot (its own, renewed, or a free one
        taken, e.g. after its lease ran out); False when none is free (give its place back with
        `add(..., front=True)`)."""
        return bool(self.hold_call(subtask_id).run(self.client))

    def hold_call(self, subtask_id: str) -> ScriptCall:
        """`hold` as a call to run with others (`run_scripts`); its result is truthy when held."""
        now = self.clock()
        return ScriptCall(_HOLD_SCRIPT, [self.holders], [subtask_id, self.cap, now, now + self.lease_seconds])

    def renew(self, subtask_id: str, client: redis.Redis | None = None) -> None:
        """Extend the subtask's lease (if it holds a slot); `client` may be a pipeline to join."""
        (client or self.client).zadd(self.holders, {subtask_id: self.clock() + self.lease_seconds}, xx=True)

    def release(self, subtask_id: str) -> list[str]:
        """Give the slot back and admit whoever is next: the ids the caller must send run messages for."""
        return self.admit(releasing=subtask_id)

    def release_call(self, subtask_id: str) -> ScriptCall:
        """`release` as a call to run with others (`run_scripts`); `admitted_ids` reads its result."""
        return self._admit_call(0, subtask_id)

    @staticmethod
    def admitted_ids(result: Sequence[bytes | str]) -> list[str]:
        return [as_text(m) for m in result]

    # --- looking -----------------------------------------------------------------------------------

    def in_flight(self) -> int:
        return int(self.client.zcount(self.holders, self.clock(), "+inf"))

    def active_tasks(self) -> list[str]:
        return [as_text(t) for t in self.client.zrange(self.tasks, 0, -1)]

    def waiting(self) -> int:
        """Subtasks waiting for a slot, over every active task (one LLEN per active task)."""
        tasks = self.active_tasks()
        if not tasks:
            return 0
        with self.client.pipeline(transaction=False) as pipe:
            for task_id in tasks:
                pipe.llen(keys.sched_ready(self.api, task_id))
            return sum(int(n) for n in pipe.execute())

    def shares(self, task_ids: Sequence[str] = ()) -> list[TaskShare]:
        """Weight, waiting and holding counts of the active tasks (and of `task_ids`, active or not)."""
        tasks = list(dict.fromkeys([*self.active_tasks(), *task_ids]))
        holders = [as_text(h) for h in self.client.zrangebyscore(self.holders, self.clock(), "+inf")]
        with self.client.pipeline(transaction=False) as pipe:
            for task_id in tasks:
                pipe.llen(keys.sched_ready(self.api, task_id))
                pipe.hget(self.weights, task_id)
            answers = pipe.execute()
        shares = []
        for i, task_id in enumerate(tasks):
            ready, weight = answers[2 * i], answers[2 * i + 1]
            holding = sum(1 for h in holders if h.startswith(f"{task_id}:"))
            shares.append(TaskShare(task_id, int(weight or 1), int(ready), holding))
        return shares
