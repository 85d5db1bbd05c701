"""Fair admission of one lane's subtasks to its job slots, shared by every process on the broker.

A subtask waiting for a slot costs one list entry (its id) in the broker, not a message:

- `add(task, ids, weight, owner=, owner_weight=)` appends a task's subtask ids to its ready list
  and makes the task active: a member of its owner's task set (scored by the task's *pass*), the
  owner a member of the lane's owner set (scored by the owner's pass);
- `admit()` is one atomic script: while a slot is free, it takes the active owner with the lowest
  pass, then that owner's active task with the lowest pass, pops the task's next subtask, makes it
  a slot holder (with a lease) and advances the task's pass by 1 / weight (its priority) and the
  owner's by 1 / owner weight. It returns the admitted ids: the caller enqueues a run message for
  each, and for nothing else.

This is stride scheduling, a weighted round-robin, on two levels: N active owners of equal weight
are admitted in turn whatever the number and sizes of their tasks, an owner of weight 2 twice as
often as one of weight 1; within an owner, its tasks take turns the same way by priority. With
`NIETEST_FAIR_SHARE=task` every task is added under the one pseudo-owner "" (so are tasks without
an owner), which leaves only the level of tasks. A task whose ready list runs dry leaves its owner's
set, and an owner without an active task leaves the lane, so whoever cannot use its share leaves
it to the others. A newly active owner starts at the pass of the owner admitted last (the lane's
clock) and a newly active task at the pass of its owner's task admitted last (the owner's clock):
neither jumps ahead of the others nor waits behind credit they built up.

Holders are scored by their lease expiry; every poll `renew`s it, so the slot of a holder whose
process died comes back by itself. Between its admission and the start of its run (`hold`), a holder
is also *admitted*: scored by its admission time, with the host that admitted it. Its run message
may never have been sent (the admitting process died, or the reply of the admit script was lost in a
cut or a broker restart): an admission older than `RESEND_AFTER_SECONDS` is handed back by the next
`admit` anywhere for its caller to send the run message again, and a host keeper that takes over a
lost host sends those of that host at once (`take_admissions`). A copy of a run message is harmless:
the subtask's markers let one create its job (pipeline/subtasks.py).

`cancel(task)` drops a task's ready list, its entries (and its owner's, when it was the owner's last
task), its holders and admissions in one step, whatever its size.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import redis

from nietest_daemon.coordination import keys
from nietest_daemon.coordination.connection import ScriptCall, as_text, lua_script
from nietest_daemon.core.logs import get_logger

log = get_logger(__name__)

#: Ids pushed per command (a Lua `unpack` and one round trip stay small).
PUSH_BATCH = 1000
#: An admission whose run has not started after this long has its run message sent again: longer
#: than a run message waits in a busy queue, short against the slot lease (120 s).
RESEND_AFTER_SECONDS = 30.0
#: At most this many of those per `admit` (the rest go with the next one).
RESEND_BATCH = 100

# The scripts, in lua/scheduler_<name>.lua (their KEYS and ARGV are described there).
_ADD_SCRIPT = lua_script(__name__, "add")
_ADMIT_SCRIPT = lua_script(__name__, "admit")
_HOLD_SCRIPT = lua_script(__name__, "hold")
_CANCEL_SCRIPT = lua_script(__name__, "cancel")
_READMIT_SCRIPT = lua_script(__name__, "readmit")


@dataclass(frozen=True)
class TaskShare:
    """One task of a lane, as `nietest status` shows it. A task is active while subtasks of it wait;
    one that only holds slots (its line ran dry) is not, and the broker no longer knows its owner
    or weight (`owner` "", `weight` 1)."""

    task_id: str
    weight: int
    ready: int  # subtasks waiting for a slot (0 when not active)
    holding: int  # slots its subtasks hold now
    owner: str = ""
    active: bool = True


@dataclass(frozen=True)
class OwnerShare:
    """One owner of a lane with its tasks ("" is the pseudo-owner of task mode and of ownerless tasks)."""

    owner: str
    weight: float  # as recorded by the last `add` of its tasks (1 for an owner that is not active)
    tasks: tuple[TaskShare, ...]

    @property
    def ready(self) -> int:
        return sum(t.ready for t in self.tasks)

    @property
    def holding(self) -> int:
        return sum(t.holding for t in self.tasks)

    @property
    def active(self) -> bool:
        return any(t.active for t in self.tasks)


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
        host: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.api = api
        self.cap = cap
        self.lease_seconds = lease_seconds
        self.host = host  # who admits through this scheduler (NIETEST_HOST_NAME)
        self.clock = clock
        self.holders = keys.slot_holders(api)
        self.admitted = [keys.sched_admitted(api), keys.sched_admitter(api)]
        self.owners = keys.sched_owners(api)
        self.owner_weights = keys.sched_owner_weights(api)
        self.task_owner = keys.sched_task_owner(api)
        self.weights = keys.sched_weights(api)
        # the keys every script that changes the sets takes, in this order (see lua/scheduler_*.lua)
        self._sets = [
            self.owners,
            self.owner_weights,
            keys.sched_owner_clock(api),
            keys.sched_task_clocks(api),
            self.task_owner,
            self.weights,
        ]

    # --- waiting ---------------------------------------------------------------------------------

    def add(
        self,
        task_id: str,
        subtask_ids: Iterable[str],
        weight: int = 1,
        *,
        owner: str = "",
        owner_weight: float = 1.0,
        front: bool = False,
    ) -> int:
        """Queue subtasks of a task for a slot (at the back, or at the front to give a place back);
        the task becomes active with `weight` under `owner` (moved there if it was active under
        another), the owner with `owner_weight`. How many of its subtasks wait now."""
        key_list = [*self._sets, keys.sched_ready(self.api, task_id), keys.sched_owner_tasks(self.api, owner)]
        head = [task_id, weight, owner, owner_weight, "front" if front else "back"]
        head.append(keys.sched_owner_tasks_prefix(self.api))

        def push(batch: list[str]) -> int:
            return int(ScriptCall(_ADD_SCRIPT, key_list, [*head, *batch]).run(self.client))

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

    def replace(
        self, task_id: str, subtask_ids: Iterable[str], weight: int = 1, *, owner: str = "", owner_weight: float = 1.0
    ) -> int:
        """Make `subtask_ids` the task's whole ready list (a re-expansion, a repair): idempotent,
        unlike `add`. Subtasks that hold a slot now are left out. How many wait now."""
        held = {as_text(h) for h in self.client.zrange(self.holders, 0, -1)}
        self.client.delete(keys.sched_ready(self.api, task_id))
        wanted = (i for i in subtask_ids if i not in held)
        return self.add(task_id, wanted, weight, owner=owner, owner_weight=owner_weight)

    def admit(self, limit: int = 0, *, releasing: str = "") -> list[str]:
        """Fill the free slots fairly (at most `limit`, 0: all), after giving up the slot of
        `releasing` if given: the ids to send a run message for, those admitted now in order, then
        those admitted long ago whose run never started (see the module doc). One round trip."""
        return self.admitted_ids(self._admit_call(limit, releasing).run(self.client))

    def _admit_call(self, limit: int, releasing: str) -> ScriptCall:
        now = self.clock()
        prefixes = [keys.sched_ready_prefix(self.api), keys.sched_owner_tasks_prefix(self.api)]
        resend = [self.host, now - RESEND_AFTER_SECONDS, RESEND_BATCH]
        return ScriptCall(
            _ADMIT_SCRIPT,
            [self.holders, *self._sets, *self.admitted],
            [self.cap, now, now + self.lease_seconds, *prefixes, limit, releasing, *resend],
        )

    def take_admissions(self, lost_host: str) -> list[str]:
        """The admissions of `lost_host` whose run has not started, now this host's: the caller sends
        their run messages again (the lost host may have died before it sent them)."""
        call = ScriptCall(_READMIT_SCRIPT, [self.holders, *self.admitted], [lost_host, self.host, self.clock()])
        return [as_text(m) for m in call.run(self.client)]

    def cancel(self, task_id: str) -> tuple[int, int]:
        """Drop a task's waiting subtasks and free its slots, in one step: (ready entries dropped,
        slots freed). The caller then calls `admit` to hand the freed slots on."""
        dropped, released = ScriptCall(
            _CANCEL_SCRIPT,
            [self.holders, *self._sets, keys.sched_ready(self.api, task_id), *self.admitted],
            [task_id, f"{task_id}:", keys.sched_owner_tasks_prefix(self.api)],
        ).run(self.client)
        return int(dropped), int(released)

    def drop_retired_keys(self) -> int:
        """Delete what a version without owners left in this lane (its task set and clock): the sweep
        calls it; the ready lists it left are put back in line by `admission.repair`."""
        return int(self.client.delete(keys.sched_tasks(self.api), keys.sched_clock(self.api)))

    # --- holding -----------------------------------------------------------------------------------

    def hold(self, subtask_id: str) -> bool:
        """Called by a subtask's run: True when it holds a slot (its own, renewed, or a free one
        taken, e.g. after its lease ran out); False when none is free (give its place back with
        `add(..., front=True)`)."""
        return bool(self.hold_call(subtask_id).run(self.client))

    def hold_call(self, subtask_id: str) -> ScriptCall:
        """`hold` as a call to run with others (`run_scripts`); its result is truthy when held."""
        now = self.clock()
        return ScriptCall(
            _HOLD_SCRIPT, [self.holders, *self.admitted], [subtask_id, self.cap, now, now + self.lease_seconds]
        )

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
    def admitted_ids(result: Sequence[Sequence[bytes | str]]) -> list[str]:
        """The ids an admit script's `result` asks run messages for (admitted now, then sent again)."""
        admitted, resend = result
        if resend:
            log.warning(
                "run messages sent again: admitted, never started",
                subtasks=len(resend),
                subtask_ids=[as_text(m) for m in resend[:5]],
                after_seconds=RESEND_AFTER_SECONDS,
            )
        return [as_text(m) for m in (*admitted, *resend)]

    def not_started(self) -> int:
        """Slot holders admitted whose run has not started yet."""
        return int(self.client.zcard(self.admitted[0]))

    # --- looking -----------------------------------------------------------------------------------

    def in_flight(self) -> int:
        return int(self.client.zcount(self.holders, self.clock(), "+inf"))

    def active_tasks(self) -> list[str]:
        """The tasks with subtasks waiting, by id."""
        return sorted(as_text(t) for t in self.client.hkeys(self.task_owner))

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
        """Owner, weight, waiting and holding counts of the active tasks, of the tasks holding a slot
        and of `task_ids` (active or not). Only an active task's ready list counts as waiting: a list
        left by an older version waits for no admission until `admission.repair` puts it back."""
        owners = {as_text(t): as_text(o) for t, o in self.client.hgetall(self.task_owner).items()}
        holding: dict[str, int] = {}
        for holder in self.client.zrangebyscore(self.holders, self.clock(), "+inf"):
            task_id = as_text(holder).split(":", 1)[0]
            holding[task_id] = holding.get(task_id, 0) + 1
        tasks = list(dict.fromkeys([*sorted(owners), *sorted(holding), *task_ids]))
        active = [t for t in tasks if t in owners]
        with self.client.pipeline(transaction=False) as pipe:
            for task_id in active:
                pipe.llen(keys.sched_ready(self.api, task_id))
                pipe.hget(self.weights, task_id)
            answers = iter(pipe.execute())
        counted = {t: (int(next(answers)), int(next(answers) or 1)) for t in active}
        shares = []
        for task_id in tasks:
            ready, weight = counted.get(task_id, (0, 1))
            owner, is_active = owners.get(task_id, ""), task_id in owners
            shares.append(TaskShare(task_id, weight, ready, holding.get(task_id, 0), owner, is_active))
        return shares

    def owner_shares(self, owners_of: Mapping[str, str] | None = None) -> list[OwnerShare]:
        """The lane's owners with their tasks (`shares()`), by owner. A task that only holds slots
        has left the lane's sets with its owner: `owners_of` (task id -> owner, e.g. read from the
        store) names it; such a task with no entry there counts under ""."""
        shares = self.shares()
        weights = {as_text(o): float(w) for o, w in self.client.hgetall(self.owner_weights).items()}
        grouped: dict[str, list[TaskShare]] = {}
        for share in shares:
            if not share.active:
                share = dataclasses.replace(share, owner=(owners_of or {}).get(share.task_id, ""))
            grouped.setdefault(share.owner, []).append(share)
        return [OwnerShare(owner, weights.get(owner, 1.0), tuple(tasks)) for owner, tasks in sorted(grouped.items())]
