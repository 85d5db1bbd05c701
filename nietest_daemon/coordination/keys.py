"""Every Redis key nietest itself writes, in one place (Dramatiq's own keys: internals/dramatiq_redis.py).

All live under the `nietest:` prefix on the broker's Redis, beside Dramatiq's `dramatiq:` keys.
Per-subtask and per-task markers carry a TTL; the others are small and bounded.
"""

from __future__ import annotations

PREFIX = "nietest"

# --- job slots (coordination/scheduler.py) -------------------------------------------------------
SLOTS_PREFIX = f"{PREFIX}:slots"


def slot_holders(api: str) -> str:
    """Sorted set: the subtasks holding a job slot of `api`, scored by their lease expiry."""
    return f"{SLOTS_PREFIX}:{api}:holders"


# --- fair admission (coordination/scheduler.py) --------------------------------------------------
# Two levels of stride scheduling per lane: owners (people) by owner pass, then each owner's tasks
# by task pass. A task is *active* while it is in `sched_task_owner`; every key below but the ready
# lists and the weights holds active tasks and owners only, so a lane that drained leaves none.
SCHED_PREFIX = f"{PREFIX}:sched"


def sched_admitted(api: str) -> str:
    """Sorted set: the slot holders of `api` whose run has not started, scored by when they were
    admitted (or their run message last sent): a run message lost with its sender is sent again."""
    return f"{SCHED_PREFIX}:{api}:admitted"


def sched_admitter(api: str) -> str:
    """Hash: subtask id -> the host that admitted it (sent its run message), for `sched_admitted`."""
    return f"{SCHED_PREFIX}:{api}:admitter"


def sched_owners(api: str) -> str:
    """Sorted set: the owners with an active task of `api`, scored by their pass (virtual time)."""
    return f"{SCHED_PREFIX}:{api}:owners"


def sched_owner_weights(api: str) -> str:
    """Hash: owner -> weight (NIETEST_OWNER_WEIGHTS, 1 by default) of the owners in `sched_owners`."""
    return f"{SCHED_PREFIX}:{api}:owner-weights"


def sched_owner_clock(api: str) -> str:
    """The pass of the owner admitted last: where a newly active owner starts (gone when none is active)."""
    return f"{SCHED_PREFIX}:{api}:owner-clock"


def sched_owner_tasks_prefix(api: str) -> str:
    """Prefix of the per-owner task sets; the scripts append the owner ("" in task mode)."""
    return f"{SCHED_PREFIX}:{api}:owner-tasks:"


def sched_owner_tasks(api: str, owner: str) -> str:
    """Sorted set: the active tasks of one owner, scored by their pass."""
    return f"{sched_owner_tasks_prefix(api)}{owner}"


def sched_task_clocks(api: str) -> str:
    """Hash: owner -> the pass of its task admitted last: where that owner's newly active task starts."""
    return f"{SCHED_PREFIX}:{api}:task-clocks"


def sched_task_owner(api: str) -> str:
    """Hash: task id -> its owner, for every active task (the set of active tasks)."""
    return f"{SCHED_PREFIX}:{api}:task-owner"


def sched_weights(api: str) -> str:
    """Hash: task id -> weight (its priority) of the active tasks."""
    return f"{SCHED_PREFIX}:{api}:weights"


def sched_ready_prefix(api: str) -> str:
    """Prefix of the ready lists; the admission script appends the task id."""
    return f"{SCHED_PREFIX}:{api}:ready:"


def sched_ready(api: str, task_id: str) -> str:
    """List: the subtask ids of one task waiting for a slot of `api`, in dispatch order."""
    return f"{sched_ready_prefix(api)}{task_id}"


def sched_tasks(api: str) -> str:
    """Retired (one level of tasks, before owners): a sorted set of tasks by pass. Nothing writes it;
    the sweep deletes what an older version left (`Scheduler.drop_retired_keys`)."""
    return f"{SCHED_PREFIX}:{api}:tasks"


def sched_clock(api: str) -> str:
    """Retired with `sched_tasks`: the pass of the task admitted last."""
    return f"{SCHED_PREFIX}:{api}:clock"


# --- failure streaks (coordination/streaks.py) ---------------------------------------------------
STREAK_PREFIX = f"{PREFIX}:streak"
STREAK_EVENTS = f"{STREAK_PREFIX}:events"


def streak(queue: str) -> str:
    """Hash: failures, last_failure_at, last_success_at of one queue."""
    return f"{STREAK_PREFIX}:{queue}"


def streak_errors(queue: str) -> str:
    """List: the latest error texts of the queue's current run of failures."""
    return f"{STREAK_PREFIX}:{queue}:errors"


# --- per-subtask markers (coordination/markers.py) -----------------------------------------------


def poll_chain(subtask_id: str) -> str:
    """The message id of the subtask's one current poll message."""
    return f"{PREFIX}:chain:{subtask_id}"


def creating(subtask_id: str) -> str:
    """Lock: a message is creating the subtask's image job right now."""
    return f"{PREFIX}:creating:{subtask_id}"


def create_sent(subtask_id: str) -> str:
    """A create request may be out: claimed just before it is sent, deleted once its uuid is stored."""
    return f"{PREFIX}:create-sent:{subtask_id}"


def timeouts(subtask_id: str) -> str:
    """Set: the subtask's job uuids that the API answered TIMEOUT."""
    return f"{PREFIX}:timeouts:{subtask_id}"


def lifelines(host: str) -> str:
    """Sorted set: `<process>/<pid>` of each worker on a host, scored by its last sign of life."""
    return f"{PREFIX}:life:{host}"


#: List: JSON events of the watchdog (a worker killed for silence), drained by the alerts listener.
WATCHDOG_EVENTS = f"{PREFIX}:watchdog:events"


def recycling(host: str, member: str) -> str:
    """A worker (`<process>/<pid>`) exits to be recycled: how the watchdog and the alerts listener tell a
    recycle from a crash. Both only read it; it expires on its own."""
    return f"{PREFIX}:recycling:{host}:{member}"


def alive(process_token: str) -> str:
    """A worker process is alive (renewed by its housekeeping thread; expires when it dies)."""
    return f"{PREFIX}:alive:{process_token}"


# --- hosts (coordination/hosts.py) ---------------------------------------------------------------
#: Hash: host name -> JSON `HostRecord` of every daemon that ever registered on this broker.
HOSTS = f"{PREFIX}:hosts"
#: List: JSON host events (a host lost, a host back), drained by the alerts listener of any host.
HOST_EVENTS = f"{PREFIX}:hosts:events"


def host_lease(host: str) -> str:
    """The live daemon named `host`: its daemon id, with a TTL of NIETEST_HOST_LOST_SECONDS that its
    host keeper renews every second. Gone: the daemon stopped, died or lost the broker."""
    return f"{PREFIX}:host:{host}:lease"


def host_takeover(host: str) -> str:
    """The daemon handing back lost `host`'s work: its daemon id, with a short TTL it renews while it
    works. Gone before the record says `handed_back`: the taker was lost too, another resumes."""
    return f"{PREFIX}:host:{host}:takeover"


def alive_pattern(host: str) -> str:
    """A SCAN pattern of the `alive` marks of every worker process of `host` (coordination/markers.py
    makes each process token start with `<host>:`)."""
    return f"{PREFIX}:alive:{host}:*"


# --- the broker's primary (programs/alerts/failover.py) -----------------------------------------
#: The primary as the alerts listeners last recorded it, "<config epoch> <host:port>" (with a Sentinel
#: URL only): the listener whose compare-and-set changes it reports the failover.
BROKER_PRIMARY = f"{PREFIX}:broker:primary"

# --- tasks and periodic work --------------------------------------------------------------------


def notice(task_id: str, event: str, round: int = 1) -> str:
    """The task notice `event` of the task's `round` (1, then one more per `nietest retry`) was
    claimed ("sending:<message id>") or "sent"."""
    return f"{PREFIX}:notice:{task_id}:{event}" if round <= 1 else f"{PREFIX}:notice:{task_id}:r{round}:{event}"


def notice_final_queued(task_id: str, round: int = 1) -> str:
    """The final notice of the task's `round` was enqueued (round 1 keeps the key it always had)."""
    base = f"{PREFIX}:notice:{task_id}"
    return f"{base}:final-queued" if round <= 1 else f"{base}:r{round}:final-queued"


def retry_lock(task_id: str) -> str:
    """Lock: a `nietest retry` of the task is in progress (a random token, so only its taker deletes it)."""
    return f"{PREFIX}:retry:{task_id}"


SWEEP_LOCK = f"{PREFIX}:sweep"  # one sweep per round across every master process

# --- metrics (coordination/counters.py) ------------------------------------------------------------


def metrics(host: str) -> str:
    """Hash: the totals of every counter and histogram series counted by the processes of `host`."""
    return f"{PREFIX}:metrics:{host}"


# --- Feishu rate limits (clients/feishu.py) ------------------------------------------------------
FEISHU_RATE_LIMIT_PREFIX = f"{PREFIX}:feishu:ratelimit"


def feishu_rate_limit(webhook_digest: str, prefix: str = FEISHU_RATE_LIMIT_PREFIX) -> str:
    """The request log of one webhook, named by a digest of its URL (never the URL: it is a secret)."""
    return f"{prefix}:{webhook_digest}"
