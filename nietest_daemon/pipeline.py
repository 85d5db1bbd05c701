"""The task pipeline of DESIGN.md §4: master expansion and the subtask state machine.

Message flow (every step idempotent; delivery is at least once):

    process_task(task_id)                 master queue: expand, store subtasks, dispatch
      └─ run_subtask(subtask_id)          SUBTASK_QUEUE, or run_lumina_subtask on SUBTASK_OPS_QUEUE
           take a job slot (or wait for one without holding a thread), create ONE image job,
           store its uuid and seed, then schedule the first poll
           └─ poll_subtask(subtask_id)    poll once; still running -> schedule the next poll
                                          (a delayed message: no thread waits between polls)

- A subtask with a stored job uuid never creates another job (a redelivered or swept
  subtask polls it); only an API `TIMEOUT` earns a new job, `TIMEOUT_RESUBMITS` times. A create
  cut off by the death of its process fails the subtask rather than risk a second job.
- A per-subtask "creating" lock keeps two deliveries from creating two jobs at once; a
  per-subtask chain token lets only the newest poll message of a subtask act, so a redelivered
  poll never doubles the polling.
- The end of a subtask goes through `Store.finish_subtask`, the one conditional update from a
  non-terminal state: it alone counts the subtask and finalises the task (once), and only the
  call that finalised sends the task's notice.
- `sweep()` (run by the master workers on a timer) resumes or fails subtasks stuck in
  `processing` past their deadline and finalises tasks whose finaliser died.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import dramatiq
import redis
from dramatiq.middleware import CurrentMessage

from nietest_daemon import notices, streaks, taskspec
from nietest_daemon.broker import redis_client
from nietest_daemon.feishu import FeishuClient
from nietest_daemon.jobslots import JobSlots
from nietest_daemon.logs import get_logger
from nietest_daemon.nieta import NietaClient, NietaError, choose_seed
from nietest_daemon.settings import Settings
from nietest_daemon.store import (
    CANCELLED,
    COMPLETED,
    FAILED,
    PENDING,
    TERMINAL,
    CancelOutcome,
    Store,
    open_store,
    utcnow,
)

log = get_logger(__name__)

#: Actor names (the CLI enqueues by name, without importing the actors).
PROCESS_TASK = "process_task"
RUN_SUBTASK = {False: "run_subtask", True: "run_lumina_subtask"}
POLL_SUBTASK = {False: "poll_subtask", True: "poll_lumina_subtask"}

TIMEOUT_RESUBMITS = 1  # new jobs a subtask may create after the API answered TIMEOUT
CREATE_ERROR_RETRIES = 3  # actor-level retries of a transient create failure (each after the client's own)
POLL_ERROR_RETRIES = 5  # consecutive transient poll failures tolerated
WAIT_RECHECK_SECONDS = 30.0  # a waiting subtask re-checks for a slot this often, in case a wake-up was lost
WAIT_RECHECK_MAX_SECONDS = 600.0  # ... times (1 + waiters / cap), at most this
CREATING_LOCK_SECONDS = 180  # longer than one create call with all the client's retries
CREATING_RECHECK_SECONDS = 15.0  # a run that finds another message creating the job looks again this late
CHAIN_TTL_SECONDS = 86400
DISPATCH_BATCH = 1000
CREATE_SENT_TTL_SECONDS = 7 * 86400
CREATE_INTERRUPTED = (
    "its worker died while creating the image job; not created again, as the API may already have made it "
    "(an image is never paid for twice)"
)
MAX_ATTEMPTS = 8  # starts of one subtask (redeliveries, sweeps) before it is given up


@dataclass
class Context:
    """What the pipeline needs in one process, built once."""

    settings: Settings
    store: Store
    redis: redis.Redis
    nieta: NietaClient | None
    notifier: FeishuClient
    slots: dict[bool, JobSlots]

    def queue_of(self, is_lumina: bool) -> str:
        return self.settings.queue("subtask_ops" if is_lumina else "subtask").name

    def polling(self, is_lumina: bool) -> tuple[int, float]:
        s = self.settings
        if is_lumina:
            return s.lumina_max_polling_attempts, s.lumina_polling_interval
        return s.image_max_polling_attempts, s.image_polling_interval


_context: Context | None = None
_context_lock = threading.Lock()


def context(settings: Settings | None = None) -> Context:
    global _context
    with _context_lock:
        if _context is None:
            if settings is None:
                from nietest_daemon import settings as settings_module

                settings = settings_module.load()
            _context = build_context(settings)
        return _context


def build_context(settings: Settings) -> Context:
    client = redis_client(settings, socket_timeout=10)
    lease = max(120.0, 10 * max(settings.image_polling_interval, settings.lumina_polling_interval))
    nieta = None
    if settings.nieta_xtoken:
        nieta = NietaClient(settings.nieta_xtoken, settings.nieta_api_base_url, settings.nieta_ops_api_base_url)
    notifier = FeishuClient(
        settings.feishu_task_webhook_url,
        settings.feishu_webhook_secret,
        client,
        host=socket.gethostname(),
    )
    return Context(
        settings=settings,
        store=open_store_for(settings),
        redis=client,
        nieta=nieta,
        notifier=notifier,
        slots={
            False: JobSlots(client, "standard", settings.max_jobs, lease),
            True: JobSlots(client, "lumina", settings.max_lumina_jobs, lease),
        },
    )


def open_store_for(settings: Settings) -> Store:
    return open_store(
        data_dir=settings.data_dir,
        mongo_uri=settings.mongo_uri,
        mongo_host=settings.mongo_host,
        mongo_port=settings.mongo_port,
        mongo_user=settings.mongo_user,
        mongo_password=settings.mongo_password,
        mongo_db=settings.mongo_db,
        task_collection=settings.task_collection,
        subtask_collection=settings.subtask_collection,
    )


# --- sending messages -----------------------------------------------------------------------------


def enqueue(actor_name: str, queue_name: str, *args: Any, delay: float = 0.0, **kwargs: Any) -> dramatiq.Message:
    """Enqueue a message for an actor by name (the CLI has no actor objects)."""
    broker = dramatiq.get_broker()
    delay_ms = int(delay * 1000) if delay > 0 else 0
    # due_ms: when the message is meant to run, so TaskTracker's queue latency excludes a deliberate delay.
    options = {"due_ms": int(time.time() * 1000) + delay_ms}
    message = dramatiq.Message(queue_name=queue_name, actor_name=actor_name, args=args, kwargs=kwargs, options=options)
    return broker.enqueue(message, delay=delay_ms or None)


def send_run(ctx: Context, subtask_id: str, is_lumina: bool, *, delay: float = 0.0, **kwargs: Any) -> None:
    enqueue(RUN_SUBTASK[is_lumina], ctx.queue_of(is_lumina), subtask_id, delay=delay, **kwargs)


def _chain_key(subtask_id: str) -> str:
    return f"nietest:chain:{subtask_id}"


def schedule_poll(ctx: Context, sub: dict[str, Any], *, delay: float, **kwargs: Any) -> None:
    """Enqueue the subtask's next poll and make it the only poll message that may act."""
    is_lumina = bool(sub.get("is_lumina"))
    message = enqueue(POLL_SUBTASK[is_lumina], ctx.queue_of(is_lumina), sub["id"], delay=delay, **kwargs)
    # Set after the enqueue: a crash in between leaves the older message current, never none.
    ctx.redis.set(_chain_key(sub["id"]), message.message_id, ex=CHAIN_TTL_SECONDS)


def _creating_key(subtask_id: str) -> str:
    return f"nietest:creating:{subtask_id}"


_UNLOCK = """
if redis.call("get", KEYS[1]) == ARGV[1] then return redis.call("del", KEYS[1]) end
return 0
"""


def _create_sent_key(subtask_id: str) -> str:
    """Claimed just before a create request goes out; deleted once its uuid is stored or the API refused."""
    return f"nietest:create-sent:{subtask_id}"


def _count_timeout(ctx: Context, subtask_id: str, job_uuid: str) -> int:
    """Record that this job ended TIMEOUT; return how many of the subtask's jobs did."""
    key = f"nietest:timeouts:{subtask_id}"
    with ctx.redis.pipeline() as pipe:
        pipe.sadd(key, job_uuid)
        pipe.expire(key, CREATE_SENT_TTL_SECONDS)
        pipe.scard(key)
        return int(pipe.execute()[2])


_process_token: tuple[int, str] | None = None


def process_token() -> str:
    """This process, unique across hosts and restarts (pid reuse included)."""
    global _process_token
    if _process_token is None or _process_token[0] != os.getpid():
        _process_token = (os.getpid(), f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}")
    return _process_token[1]


def _alive_key(token: str) -> str:
    return f"nietest:alive:{token}"


def mark_alive(client: redis.Redis, ttl_seconds: float) -> None:
    """Called by a worker's housekeeping thread on a timer: this process is alive for `ttl_seconds`."""
    client.set(_alive_key(process_token()), "1", ex=max(1, int(ttl_seconds)))


def owner_of_current_message() -> str:
    message = CurrentMessage.get_current_message()
    return message.message_id if message is not None else f"local-{random.getrandbits(64):x}"


def _unlock(ctx: Context, key: str, owner: str) -> None:
    """Delete the lock only if `owner` still holds it (it may have expired and been taken since)."""
    ctx.redis.eval(_UNLOCK, 1, key, owner)


def _is_current_poll(ctx: Context, subtask_id: str) -> bool:
    message = CurrentMessage.get_current_message()
    current = ctx.redis.get(_chain_key(subtask_id))
    return message is None or current is None or current.decode() == message.message_id


# --- ending a subtask -----------------------------------------------------------------------------


def release_slot(ctx: Context, subtask_id: str, is_lumina: bool) -> None:
    """Give the subtask's slot back (or its place in the waiting list) and wake the waiter it went to.

    `JobSlots.release` hands a free slot to the longest waiter: that waiter is woken by this call
    or by nobody (the slot then idles until the waiter's delayed re-check), so every release must
    go through here, also for a subtask that finds itself terminal: it may hold a handed-on slot.
    """
    woken = ctx.slots[is_lumina].release(subtask_id)
    if woken:
        send_run(ctx, woken, is_lumina)


def finish(
    ctx: Context, sub: dict[str, Any], status: str, *, result: str | None = None, error: str | None = None
) -> None:
    """Move a subtask to a terminal state (once), free its slot, update streaks, notify on finalisation."""
    outcome = ctx.store.finish_subtask(sub["id"], status, result=result, error=error)
    is_lumina = bool(sub.get("is_lumina"))
    release_slot(ctx, sub["id"], is_lumina)
    if outcome is None or not outcome.changed:
        return
    log.info(
        "subtask finished", subtask_id=sub["id"], task_id=sub["task_id"], status=status, error=error, result=result
    )
    if status in (COMPLETED, FAILED):
        try:
            streaks.record(
                ctx.redis,
                ctx.queue_of(is_lumina),
                status == COMPLETED,
                error,
                threshold=ctx.settings.alert_failure_streak,
            )
        except redis.RedisError as exc:
            log.warning("could not record the failure streak", error=str(exc))
    if outcome.finalised and outcome.task is not None:
        notices.task_finished(ctx, outcome.task)


def cancel_task(ctx: Context, task_id: str) -> CancelOutcome:
    """Cancel a task: its pending subtasks end `cancelled` (running jobs end at their next poll),
    they leave the slot waiting lists, and the call that finalised the task sends its notice."""
    outcome = ctx.store.cancel_task(task_id)
    if not outcome.found:
        return outcome
    for slots in ctx.slots.values():
        try:
            slots.forget_waiting(f"{task_id}:")
        except redis.RedisError as exc:  # they leave the list when their wake-up comes instead
            log.warning("could not clear the slot waiting list", task_id=task_id, error=str(exc))
    if outcome.finalised and outcome.task is not None:
        notices.task_finished(ctx, outcome.task)
    return outcome


# --- the actors' bodies ---------------------------------------------------------------------------


def process_task(task_id: str) -> None:
    """Expand a task into its subtasks (idempotently) and dispatch the pending ones."""
    ctx = context()
    doc = ctx.store.get_task(task_id)
    if doc is None:
        log.error("no such task; message dropped", task_id=task_id)
        return
    if doc["status"] in TERMINAL:
        return
    task = taskspec.validate_task(doc)
    first_run = ctx.store.mark_task_running(task_id)
    batch: list[dict[str, Any]] = []
    created = 0
    for spec in taskspec.expand(task):
        batch.append({"id": spec.subtask_id(task_id), **spec.as_dict()})
        if len(batch) >= DISPATCH_BATCH:
            created += ctx.store.insert_subtasks(task_id, batch)
            batch = []
    if batch:
        created += ctx.store.insert_subtasks(task_id, batch)
    if ctx.store.is_cancel_requested(task_id):
        cancel_task(ctx, task_id)
        return
    if first_run:
        notices.task_submitted(ctx, ctx.store.get_task(task_id) or doc)
    pending = ctx.store.list_subtasks(task_id, status=PENDING)
    for sub in pending:
        send_run(ctx, sub["id"], bool(sub.get("is_lumina")))
    log.info("task expanded", task_id=task_id, subtasks=task.total_subtasks, new=created, dispatched=len(pending))


def _active_subtask(ctx: Context, subtask_id: str, *, cancelled: str) -> dict[str, Any] | None:
    """The subtask if there is work to do on it; else None, after tidying up what its end left."""
    sub = ctx.store.get_subtask(subtask_id)
    if sub is None:
        log.error("no such subtask; message dropped", subtask_id=subtask_id)
        return None
    if sub["status"] in TERMINAL:
        # It may still sit in the waiting list (cancelled while it waited) and this message may be
        # the wake-up of a freed slot: leave the list and hand the wake-up on, or it is lost.
        release_slot(ctx, subtask_id, bool(sub.get("is_lumina")))
        # Or it is the redelivery of the message that finalised the task, from a process that died
        # before it enqueued the task's notice.
        notices.ensure_final(ctx, sub["task_id"])
        return None
    if ctx.store.is_cancel_requested(sub["task_id"]):
        finish(ctx, sub, CANCELLED, error=cancelled)
        return None
    return sub


def run_subtask(subtask_id: str, errors: int = 0) -> None:
    """Create the subtask's image job (at most one per TIMEOUT budget), then hand over to polling."""
    ctx = context()
    sub = _active_subtask(ctx, subtask_id, cancelled="task cancelled")
    if sub is None:
        return
    is_lumina = bool(sub.get("is_lumina"))
    if sub.get("job_uuid"):  # redelivered or resumed: poll the job we already paid for
        _, interval = ctx.polling(is_lumina)
        schedule_poll(ctx, sub, delay=interval)
        return
    if sub.get("attempts", 0) >= MAX_ATTEMPTS:
        finish(ctx, sub, FAILED, error=f"given up after {sub['attempts']} attempts to start the image job")
        return
    slots = ctx.slots[is_lumina]
    if not slots.acquire(subtask_id):
        # Waiting: a released slot wakes us; the delayed re-check only covers a lost wake-up, so
        # it backs off with the length of the queue (50 000 waiters must not spin every 30 s).
        backlog = 1 + slots.waiting_count() / max(1, slots.cap)
        delay = min(WAIT_RECHECK_MAX_SECONDS, WAIT_RECHECK_SECONDS * backlog) * random.uniform(0.8, 1.2)
        send_run(ctx, subtask_id, is_lumina, delay=delay, errors=errors)
        return
    lock = _creating_key(subtask_id)
    owner = owner_of_current_message()
    if not ctx.redis.set(lock, owner, nx=True, ex=CREATING_LOCK_SECONDS):
        holder = ctx.redis.get(lock)
        if holder is None or holder.decode() != owner:
            # Another message is creating this job right now (it schedules the polls), or its
            # process died mid-create (the lock then expires): look again later, never drop it.
            send_run(ctx, subtask_id, is_lumina, delay=CREATING_RECHECK_SECONDS, errors=errors)
            return
        # The lock is this very message's: it was redelivered because the process that held it
        # died. Nobody else is creating; take the lock over.
        ctx.redis.set(lock, owner, ex=CREATING_LOCK_SECONDS)
    try:
        _create_job(ctx, subtask_id, is_lumina, errors)
    finally:
        _unlock(ctx, lock, owner)


def _create_job(ctx: Context, subtask_id: str, is_lumina: bool, errors: int) -> None:
    sub = ctx.store.start_subtask(subtask_id)
    if sub is None:  # became terminal meanwhile
        release_slot(ctx, subtask_id, is_lumina)
        return
    max_polls, interval = ctx.polling(is_lumina)
    if sub.get("job_uuid"):
        schedule_poll(ctx, sub, delay=interval)
        return
    # cancel_task cancels pending subtasks only: one that a cancel found processing (start_subtask
    # above ran first) is left to us, so look again now that it is processing: a cancelled task
    # pays for no new job.
    if ctx.store.is_cancel_requested(sub["task_id"]):
        finish(ctx, sub, CANCELLED, error="task cancelled")
        return
    if ctx.nieta is None:
        finish(ctx, sub, FAILED, error="NIETA_XTOKEN is not set on the workers")
        return
    # The API has no idempotency key: a create whose process died before its uuid was stored may
    # have made a job nobody can find. Creating another would pay twice, so such a subtask fails.
    # The marker is claimed atomically: it exists from just before the request until the uuid is
    # stored (or the API refused), so finding it here means a create whose outcome nobody knows yet.
    # Its value is the creating process: while that process lives, its create may still finish
    # (this message can be a copy redelivered after a broker blip), so look again later.
    sent_key = _create_sent_key(subtask_id)
    if not ctx.redis.set(sent_key, process_token(), nx=True, ex=CREATE_SENT_TTL_SECONDS):
        holder = ctx.redis.get(sent_key)
        if holder is not None and ctx.redis.exists(_alive_key(holder.decode())):
            send_run(ctx, subtask_id, is_lumina, delay=CREATING_RECHECK_SECONDS, errors=errors)
            return
        finish(ctx, sub, FAILED, error=CREATE_INTERRUPTED)
        return
    seed = sub.get("seed") or choose_seed(None)
    try:
        job_uuid = ctx.nieta.create_job({**sub, "seed": seed})
    except NietaError as exc:
        ctx.redis.delete(sent_key)  # the API answered with an error (or never got the request): no job
        if exc.retryable and errors < CREATE_ERROR_RETRIES:
            delay = max(exc.retry_after or 0.0, 5.0 * 2**errors) * random.uniform(0.8, 1.2)
            log.warning(
                "image job not created; retrying later",
                subtask_id=subtask_id,
                error=str(exc),
                retry_in_seconds=round(delay, 1),
            )
            release_slot(ctx, subtask_id, is_lumina)
            send_run(ctx, subtask_id, is_lumina, delay=delay, errors=errors + 1)
            return
        finish(ctx, sub, FAILED, error=f"could not create the image job: {exc}")
        return
    recorded = ctx.store.record_job(subtask_id, job_uuid, seed)
    ctx.redis.delete(sent_key)
    if not recorded:
        log.error("a job uuid was already stored; this job is a duplicate", subtask_id=subtask_id, job_uuid=job_uuid)
        sub = ctx.store.get_subtask(subtask_id) or sub
    else:
        sub = {**sub, "job_uuid": job_uuid, "seed": seed}
    log.info(
        "image job created",
        subtask_id=subtask_id,
        task_id=sub["task_id"],
        job_uuid=sub["job_uuid"],
        seed=seed,
        max_polls=max_polls,
    )
    schedule_poll(ctx, sub, delay=interval)


def poll_subtask(subtask_id: str, errors: int = 0, no_url: int = 0) -> None:
    """Poll the subtask's job once; end the subtask on a terminal state, else schedule the next poll."""
    ctx = context()
    if not _is_current_poll(ctx, subtask_id):
        return  # a newer poll message of this subtask exists
    sub = _active_subtask(ctx, subtask_id, cancelled="task cancelled while its image job ran")
    if sub is None:
        return
    is_lumina = bool(sub.get("is_lumina"))
    if not sub.get("job_uuid"):
        send_run(ctx, subtask_id, is_lumina)
        return
    if ctx.nieta is None:
        finish(ctx, sub, FAILED, error="NIETA_XTOKEN is not set on the workers")
        return
    max_polls, interval = ctx.polling(is_lumina)
    try:
        status = ctx.nieta.poll_job(sub["job_uuid"], is_lumina)
    except NietaError as exc:
        if exc.retryable and errors < POLL_ERROR_RETRIES:
            delay = max(exc.retry_after or 0.0, min(60.0, interval * 2**errors))
            ctx.slots[is_lumina].renew(subtask_id)
            schedule_poll(ctx, sub, delay=delay, errors=errors + 1, no_url=no_url)
            return
        finish(ctx, sub, FAILED, error=f"could not poll image job {sub['job_uuid']}: {exc}")
        return

    if status.state == "pending":
        polls = ctx.store.record_poll(subtask_id)
        if polls >= max_polls:
            finish(
                ctx,
                sub,
                FAILED,
                error=f"image job {sub['job_uuid']} still {status.raw_status or 'pending'} after {polls} polls "
                f"over {_waited(sub, polls * interval):.1f} s (polling budget {max_polls} x {interval:g} s)",
            )
            return
        ctx.slots[is_lumina].renew(subtask_id)
        schedule_poll(ctx, sub, delay=interval)
    elif status.state == "success" and status.url:
        finish(ctx, sub, COMPLETED, result=status.url)
    elif status.state == "success":
        if no_url:
            finish(ctx, sub, FAILED, error=f"image job {sub['job_uuid']} succeeded without an image url")
        else:
            schedule_poll(ctx, sub, delay=interval, no_url=1)
    elif status.state == "moderated":
        finish(ctx, sub, FAILED, error=f"refused by moderation (ILLEGAL_IMAGE): {status.error or ''}".rstrip(": "))
    elif status.state == "timeout":
        # Counted in the broker per job uuid (a redelivered poll of the same job counts it once), not
        # in the message: a swept or redelivered subtask must not earn a fresh budget.
        timed_out = _count_timeout(ctx, subtask_id, sub["job_uuid"])
        if timed_out > TIMEOUT_RESUBMITS:
            error = f"the API timed the job out (TIMEOUT) {timed_out} times: {status.error or ''}".rstrip(": ")
            finish(ctx, sub, FAILED, error=error)
            return
        log.warning(
            "the API timed the job out; creating a new one",
            subtask_id=subtask_id,
            job_uuid=sub["job_uuid"],
            resubmit=timed_out,
        )
        if ctx.store.clear_job(subtask_id, sub["job_uuid"]):
            ctx.redis.delete(_create_sent_key(subtask_id))  # left over if its creator died after storing the uuid
            send_run(ctx, subtask_id, is_lumina)
    else:
        finish(ctx, sub, FAILED, error=status.error or f"image job failed ({status.raw_status})")


def _waited(sub: dict[str, Any], nominal: float) -> float:
    """Seconds since the subtask started (its first job, before any TIMEOUT resubmit), at least `nominal`."""
    started = sub.get("started_at")
    if started is None:
        return nominal
    return max(nominal, (utcnow() - started).total_seconds())


# --- the periodic sweep ---------------------------------------------------------------------------


def stale_after(settings: Settings) -> float:
    """How long a processing subtask may go without progress before the sweep acts on it."""
    budget = max(
        settings.image_max_polling_attempts * settings.image_polling_interval,
        settings.lumina_max_polling_attempts * settings.lumina_polling_interval,
    )
    return max(300.0, 2 * budget)


def sweep(ctx: Context, *, older_than_seconds: float | None = None) -> dict[str, int]:
    """Resume (or fail) subtasks stuck in processing; finalise tasks whose finaliser died."""
    age = stale_after(ctx.settings) if older_than_seconds is None else older_than_seconds  # 0 means "all"
    cutoff = utcnow() - timedelta(seconds=age)
    resumed = failed = finalised = 0
    for sub in ctx.store.find_stale_subtasks(cutoff, limit=1000):
        is_lumina = bool(sub.get("is_lumina"))
        if sub.get("attempts", 0) >= MAX_ATTEMPTS:
            finish(ctx, sub, FAILED, error=f"no progress after {sub['attempts']} attempts; given up by the sweep")
            failed += 1
        elif sub.get("job_uuid"):
            schedule_poll(ctx, sub, delay=0)
            resumed += 1
        else:
            ctx.store.start_subtask(sub["id"])  # counts the attempt and refreshes updated_at
            send_run(ctx, sub["id"], is_lumina)
            resumed += 1
    for task in ctx.store.list_tasks(limit=100, status="processing"):
        if ctx.store.finalise_task(task["id"]):
            finalised += 1
            notices.task_finished(ctx, ctx.store.get_task(task["id"]) or task)
    # A finaliser that died between the store update and the enqueue of the notice (a sweep, or
    # `nietest cancel`) leaves no message to redeliver: look at the tasks that ended lately.
    now = utcnow()
    for task in ctx.store.list_tasks(limit=100, status=TERMINAL):
        ended = task.get("completed_at")
        if ended is not None and timedelta(seconds=60) < now - ended < timedelta(hours=1):
            notices.ensure_final(ctx, task["id"])
    if resumed or failed or finalised:
        log.warning("sweep acted", resumed=resumed, failed=failed, finalised_tasks=finalised)
    return {"resumed": resumed, "failed": failed, "finalised": finalised}


def run_sweeper(stop: threading.Event, interval: float = 60.0) -> None:
    """In a master worker: sweep every `interval` s; a Redis lock lets one process do it per round."""
    while not stop.wait(interval * random.uniform(0.9, 1.1)):
        try:
            ctx = context()
            if ctx.redis.set("nietest:sweep", "1", nx=True, ex=max(1, int(interval * 0.8))):
                sweep(ctx)
        except Exception:
            log.exception("sweep failed")
