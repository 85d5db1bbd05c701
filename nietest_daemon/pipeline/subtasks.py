"""The subtask state machine: take a job slot, create ONE image job, poll it to its end.

    run_subtask(subtask_id)      SUBTASK_QUEUE (run_lumina_subtask on SUBTASK_OPS_QUEUE)
        sent only for a subtask admitted to a job slot (pipeline/admission.py): create one image
        job, store its uuid and seed, then schedule the first poll
    poll_subtask(subtask_id)     poll once; still running -> schedule the next poll
                                 (a delayed message: no thread waits between polls)

- A subtask with a stored job uuid never creates another job (a redelivered or swept subtask
  polls it); only an API `TIMEOUT` earns a new job, `TIMEOUT_RESUBMITS` times. A create cut off by
  the death of its process fails the subtask rather than risk a second job (coordination/markers.py).
- The creating lock keeps two deliveries from creating two jobs at once; the poll chain lets only
  the newest poll message of a subtask act, so a redelivered poll never doubles the polling.
- The end of a subtask goes through `finish`, i.e. `Store.finish_subtask`, the one conditional
  update from a non-terminal state: it alone counts the subtask and finalises the task (once), and
  only the call that finalised sends the task's notice.
"""

from __future__ import annotations

from dataclasses import dataclass

from nietest_daemon.clients.nieta import JobState, NietaError
from nietest_daemon.coordination import counters, markers, streaks
from nietest_daemon.coordination.connection import run_scripts
from nietest_daemon.core.backoff import SPREAD, backoff
from nietest_daemon.core.logs import get_logger
from nietest_daemon.domain.images import choose_seed
from nietest_daemon.domain.lifecycle import TERMINAL, Status
from nietest_daemon.domain.subtask import Lane, Subtask
from nietest_daemon.pipeline import notices
from nietest_daemon.pipeline.admission import give_back, release_slot
from nietest_daemon.pipeline.context import Context, context
from nietest_daemon.pipeline.messages import (
    current_message_id,
    enqueue_poll,
    owner_of_current_message,
    schedule_poll,
    send_run,
)
from nietest_daemon.store import utcnow
from nietest_daemon.store.base import round_of

log = get_logger(__name__)

TIMEOUT_RESUBMITS = 1  # new jobs a subtask may create after the API answered TIMEOUT
CREATE_ERROR_RETRIES = 3  # actor-level retries of a transient create failure (each after the client's own)
POLL_ERROR_RETRIES = 5  # consecutive transient poll failures tolerated
CREATING_RECHECK_SECONDS = 15.0  # a run that finds another message creating the job looks again this late
CREATE_INTERRUPTED = (
    "its worker died while creating the image job; not created again, as the API may already have made it "
    "(an image is never paid for twice)"
)
CREATE_IN_DOUBT = (
    "the image job's create got no answer; not sent again, as the API may already have made it "
    "(an image is never paid for twice)"
)
MAX_ATTEMPTS = 8  # starts of one subtask (redeliveries, sweeps) before it is given up


# --- ending a subtask -----------------------------------------------------------------------------


def finish(
    ctx: Context,
    sub: Subtask,
    status: Status,
    *,
    result: str | None = None,
    error: str | None = None,
    reason: str = "other",
) -> None:
    """Move a subtask to a terminal state (once), free its slot, update streaks and metrics, notify
    on finalisation. `reason`: a failure's metrics label (`counters.FAILURE_REASONS`)."""
    outcome = ctx.store.finish_subtask(sub.id, status, result=result, error=error)
    counted = outcome is not None and outcome.changed
    # One round trip frees the slot, drops the subtask's markers, records the queue's failure streak
    # and counts the end in the metrics.
    also = [markers.forget_markers_call(sub.id)]
    if counted and status in (Status.COMPLETED, Status.FAILED):
        also.append(
            streaks.record_outcome_call(
                ctx.queue_of(sub.lane), status == Status.COMPLETED, error, threshold=ctx.settings.alert_failure_streak
            )
        )
    if counted:
        also.append(counters.add_call(ctx.host, _finish_increments(sub, status, reason)))
    release_slot(ctx, sub.id, sub.lane, *also)
    if outcome is None or not outcome.changed:
        return
    log.info("subtask finished", subtask_id=sub.id, task_id=sub.task_id, status=status, error=error, result=result)
    if outcome.finalised and outcome.task is not None:
        notices.task_finished(ctx, outcome.task)


def _finish_increments(sub: Subtask, status: Status, reason: str) -> counters.Increments:
    assert reason in counters.FAILURE_REASONS, reason
    inc = counters.Increments()
    api = sub.lane.value
    inc.count(counters.SUBTASKS_FINISHED, api=api, outcome=status)
    if status == Status.FAILED:
        inc.count(counters.SUBTASK_FAILURES, api=api, reason=reason)
    if sub.job_uuid and sub.started_at is not None:  # a job was created: its time to the end
        seconds = (utcnow() - sub.started_at).total_seconds()
        inc.observe(counters.IMAGE_JOB_SECONDS, seconds, api=api)
    return inc


def _error_reason(exc: NietaError) -> str:
    """A failed API call's metrics reason: the API answered (api_failure) or never did (transport)."""
    return "transport" if exc.status_code is None else "api_failure"


# --- the actors' bodies ---------------------------------------------------------------------------


def _active_subtask(ctx: Context, subtask_id: str, *, cancelled: str) -> Subtask | None:
    """The subtask if there is work to do on it; else None, after tidying up what its end left."""
    doc, cancel_requested = ctx.store.get_subtask_for_work(subtask_id)
    if doc is None:
        log.error("no such subtask; message dropped", subtask_id=subtask_id)
        return None
    sub = Subtask.from_doc(doc)
    if sub.status in TERMINAL:
        # It may have been admitted (a slot taken for it) after it ended: give the slot on.
        release_slot(ctx, subtask_id, sub.lane)
        # Or it is the redelivery of the message that finalised the task, from a process that died
        # before it enqueued the task's notice.
        notices.ensure_final(ctx, sub.task_id, round_of(doc))
        return None
    if cancel_requested:
        finish(ctx, sub, Status.CANCELLED, error=cancelled)
        return None
    return sub


def run_subtask(subtask_id: str, errors: int = 0) -> None:
    """Create the subtask's image job (at most one per TIMEOUT budget), then hand over to polling."""
    ctx = context()
    sub = _active_subtask(ctx, subtask_id, cancelled="task cancelled")
    if sub is None:
        return
    lane = sub.lane
    if sub.job_uuid:  # redelivered or resumed: poll the job we already paid for
        _, interval = ctx.polling(lane)
        schedule_poll(ctx, sub.id, lane, delay=interval)
        return
    if sub.attempts >= MAX_ATTEMPTS:
        finish(
            ctx,
            sub,
            Status.FAILED,
            error=f"given up after {sub.attempts} attempts to start the image job",
            reason="interrupted",
        )
        return
    owner = owner_of_current_message()
    # One round trip: the job slot, the creating lock and the create-sent marker.
    held, begun = run_scripts(
        ctx.redis, ctx.schedulers[lane].hold_call(subtask_id), markers.begin_create_call(subtask_id, owner)
    )
    if not held:
        # Admitted once, but its slot is gone (its lease ran out while the message waited, or this is
        # a redelivered copy) and none is free: back to the front of its task's line; no message waits.
        if begun != markers.BUSY:
            markers.end_create(ctx.redis, subtask_id, owner, clear_create_sent=begun == markers.LOCKED_AND_CLAIMED)
        give_back(ctx, sub)
        return
    if begun == markers.BUSY:
        # Another message is creating this job right now (it schedules the polls), or its process
        # died mid-create (the lock then expires): look again later, never drop it.
        send_run(ctx, subtask_id, lane, delay=CREATING_RECHECK_SECONDS, errors=errors)
        return
    run = CreateRun(claimed=begun == markers.LOCKED_AND_CLAIMED)
    try:
        _create_job(ctx, subtask_id, lane, errors, run)
    finally:
        # One round trip: the marker goes (unless a create is in doubt), the first poll becomes
        # current, the lock goes.
        markers.end_create(
            ctx.redis, subtask_id, owner, clear_create_sent=run.claimed and not run.in_doubt, poll=run.poll
        )


@dataclass
class CreateRun:
    """One run's hold on the create of a subtask's job, as `run_subtask` ends it."""

    claimed: bool  # this run claimed the create-sent marker
    in_doubt: bool = False  # a create request went out and its answer is not stored
    poll: str | None = None  # the poll message enqueued, to make current


def _create_job(ctx: Context, subtask_id: str, lane: Lane, errors: int, run: CreateRun) -> None:
    if run.claimed:  # before anything can send a create: a broker failover must not lose the marker
        markers.make_create_sent_durable(ctx.redis, subtask_id)
    doc = ctx.store.start_subtask(subtask_id)
    if doc is None:  # became terminal meanwhile
        release_slot(ctx, subtask_id, lane)
        return
    sub = Subtask.from_doc(doc)
    max_polls, interval = ctx.polling(lane)
    if sub.job_uuid:
        run.poll = enqueue_poll(ctx, sub.id, lane, delay=interval)
        return
    # cancel_task cancels pending subtasks only: one that a cancel found processing (start_subtask
    # above ran first) is left to us, so look again now that it is processing: a cancelled task
    # pays for no new job.
    if ctx.store.is_cancel_requested(sub.task_id):
        finish(ctx, sub, Status.CANCELLED, error="task cancelled")
        return
    if ctx.nieta is None:
        finish(ctx, sub, Status.FAILED, error="NIETA_XTOKEN is not set on the workers")
        return
    # The API has no idempotency key: a create whose process died before its uuid was stored may
    # have made a job nobody can find. Creating another would pay twice, so such a subtask fails
    # (see coordination/markers.py) -- unless the creating process still lives: this message can
    # be a copy redelivered after a broker blip, so look again later.
    if not run.claimed:
        if markers.create_sender_alive(ctx.redis, subtask_id):
            send_run(ctx, subtask_id, lane, delay=CREATING_RECHECK_SECONDS, errors=errors)
            return
        finish(ctx, sub, Status.FAILED, error=CREATE_INTERRUPTED, reason="interrupted")
        return
    seed = sub.seed or choose_seed(None)
    run.in_doubt = True  # from here until the API's answer is known or stored
    try:
        job_uuid = ctx.nieta.create_job({**sub.doc, "seed": seed})
    except NietaError as exc:
        if exc.in_doubt:  # the API may have made the job: never create again (the marker stays until this ends)
            finish(ctx, sub, Status.FAILED, error=f"{CREATE_IN_DOUBT}: {exc}", reason="interrupted")
            run.in_doubt = False  # ended: nothing creates for it again
            return
        run.in_doubt = False  # the API answered with an error (or never got the request)
        if exc.retryable and errors < CREATE_ERROR_RETRIES:
            delay = max(exc.retry_after or 0.0, backoff(errors, base=5.0, jitter=SPREAD))
            log.warning(
                "image job not created; retrying later",
                subtask_id=subtask_id,
                error=str(exc),
                retry_in_seconds=round(delay, 1),
            )
            release_slot(ctx, subtask_id, lane)
            send_run(ctx, subtask_id, lane, delay=delay, errors=errors + 1)
            return
        finish(ctx, sub, Status.FAILED, error=f"could not create the image job: {exc}", reason=_error_reason(exc))
        return
    recorded = ctx.store.record_job(subtask_id, job_uuid, seed)
    run.in_doubt = False  # a death before the marker goes (with the lock) is as one before this line
    if not recorded:
        log.error("a job uuid was already stored; this job is a duplicate", subtask_id=subtask_id, job_uuid=job_uuid)
        stored = ctx.store.get_subtask(subtask_id)
        job_uuid = (stored or {}).get("job_uuid") or job_uuid
    log.info(
        "image job created",
        subtask_id=subtask_id,
        task_id=sub.task_id,
        job_uuid=job_uuid,
        seed=seed,
        max_polls=max_polls,
    )
    run.poll = enqueue_poll(ctx, subtask_id, lane, delay=interval)


def poll_subtask(subtask_id: str, errors: int = 0, no_url: int = 0) -> None:
    """Poll the subtask's job once; end the subtask on a terminal state, else schedule the next poll.

    Only the current poll message of a subtask may go on polling it (the poll chain): a stale copy
    (redelivered) stops before anything that continues the chain. It is asked only there, not on
    every poll: an ending is safe from any copy (`finish` counts a subtask once, a TIMEOUT's job is
    cleared once), and most polls of a short job end it.
    """
    ctx = context()
    message_id = current_message_id()

    def superseded() -> bool:
        return not markers.is_current_poll(ctx.redis, subtask_id, message_id)

    sub = _active_subtask(ctx, subtask_id, cancelled="task cancelled while its image job ran")
    if sub is None:
        return
    lane = sub.lane
    if not sub.job_uuid:
        if not superseded():
            send_run(ctx, subtask_id, lane)
        return
    if ctx.nieta is None:
        finish(ctx, sub, Status.FAILED, error="NIETA_XTOKEN is not set on the workers")
        return
    max_polls, interval = ctx.polling(lane)
    try:
        status = ctx.nieta.poll_job(sub.job_uuid, lane.is_lumina)
    except NietaError as exc:
        if exc.retryable and errors < POLL_ERROR_RETRIES:
            if superseded():
                return
            delay = max(exc.retry_after or 0.0, backoff(errors, base=interval, cap=60.0))
            schedule_poll(ctx, subtask_id, lane, delay=delay, renew=True, errors=errors + 1, no_url=no_url)
            return
        finish(
            ctx, sub, Status.FAILED, error=f"could not poll image job {sub.job_uuid}: {exc}", reason=_error_reason(exc)
        )
        return

    if status.state == JobState.PENDING:
        if superseded():
            return
        polls = ctx.store.record_poll(subtask_id)
        if polls >= max_polls:
            finish(
                ctx,
                sub,
                Status.FAILED,
                error=f"image job {sub.job_uuid} still {status.raw_status or 'pending'} after {polls} polls "
                f"over {_waited(sub, polls * interval):.1f} s (polling budget {max_polls} x {interval:g} s)",
                reason="timeout",
            )
            return
        schedule_poll(ctx, subtask_id, lane, delay=interval, renew=True)
    elif status.state == JobState.SUCCESS and status.url:
        finish(ctx, sub, Status.COMPLETED, result=status.url)
    elif status.state == JobState.SUCCESS:
        if no_url:
            finish(
                ctx,
                sub,
                Status.FAILED,
                error=f"image job {sub.job_uuid} succeeded without an image url",
                reason="api_failure",
            )
        elif not superseded():
            schedule_poll(ctx, subtask_id, lane, delay=interval, no_url=1)
    elif status.state == JobState.MODERATED:
        error = f"refused by moderation (ILLEGAL_IMAGE): {status.error or ''}".rstrip(": ")
        finish(ctx, sub, Status.FAILED, error=error, reason="moderation")
    elif status.state == JobState.TIMEOUT:
        # Counted in the broker per job uuid (a redelivered poll of the same job counts it once), not
        # in the message: a swept or redelivered subtask must not earn a fresh budget.
        timed_out = markers.count_timeout(ctx.redis, subtask_id, sub.job_uuid)
        if timed_out > TIMEOUT_RESUBMITS:
            error = f"the API timed the job out (TIMEOUT) {timed_out} times: {status.error or ''}".rstrip(": ")
            finish(ctx, sub, Status.FAILED, error=error, reason="timeout")
            return
        log.warning(
            "the API timed the job out; creating a new one",
            subtask_id=subtask_id,
            job_uuid=sub.job_uuid,
            resubmit=timed_out,
        )
        if ctx.store.clear_job(subtask_id, sub.job_uuid):
            markers.clear_create_sent(ctx.redis, subtask_id)  # left over if its creator died after storing the uuid
            send_run(ctx, subtask_id, lane)
    else:  # JobState.FAILURE
        finish(
            ctx,
            sub,
            Status.FAILED,
            error=status.error or f"image job failed ({status.raw_status})",
            reason="api_failure",
        )


def _waited(sub: Subtask, nominal: float) -> float:
    """Seconds since the subtask started (its first job, before any TIMEOUT resubmit), at least `nominal`."""
    if sub.started_at is None:
        return nominal
    return max(nominal, (utcnow() - sub.started_at).total_seconds())
