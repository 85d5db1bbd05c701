"""Running a finished task's failed (and/or cancelled) subtasks again: `nietest retry`.

The retried subtasks go through the same admission as any task's (`admission.queue_task`: the
task's ready lists, fair shares, job slots); nothing else runs again, as every other subtask of a
finished task is terminal and only pending subtasks are queued. The steps, each safe to repeat, in
an order that leaves every crash finishable:

0. take the task's retry lock in the broker (`markers.take_retry_lock`, SET NX with a token and a
   TTL), before anything else; a second retry of the task meanwhile is refused. With MongoDB, two
   retries with different status sets must not interleave (`Store.retry_subtasks`). The lock is
   released at the end by its token (compare-and-delete), so an expired one never frees another's;
1. refuse unless the task is finished, was fully expanded, has no subtask still processing (a
   task failed by its master can have some: their finishes, which may be half-way, come first)
   and has something to run again;
2. `notices.next_round`: the ending round's final notice is enqueued if it never was and the
   round ended within the last hour (each round has its own markers: nothing is dropped);
3. `markers.forget_all`: the chosen subtasks' broker markers go (a failed create's create-sent
   marker above all: the retry pays for a new job on purpose), their poll chains superseded;
4. `Store.retry_subtasks`: the subtasks back to pending (their last attempt kept in
   `error_history`), the counters less exactly what moved, the task back to processing as round
   N + 1;
5. `admission.queue_task`: the task's pending subtasks wait for job slots; admitted ones get run
   messages.

A crash before 4 changed nothing visible: run the retry again (within `RETRY_LOCK_SECONDS`, 300 s,
it is refused while the dead retry's lock lasts). With MongoDB, a crash within 4
leaves some subtasks pending and the task finished, its counters perhaps short: running the retry
again finishes it, and the sweep's repair pass puts the counters right at the round's end (SQLite
does 4 in one transaction). A crash between 4 and 5 leaves a running task whose pending subtasks
wait in no line: the sweep's `admission.repair` queues them within a minute, and so does a second
`nietest retry` (refused, as the task runs, after that same repair).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from nietest_daemon.coordination import markers
from nietest_daemon.core.logs import get_logger
from nietest_daemon.domain.lifecycle import ACTIVE, Status
from nietest_daemon.domain.subtask import Lane
from nietest_daemon.pipeline import admission, notices
from nietest_daemon.pipeline.context import Context
from nietest_daemon.store.base import RetryOutcome, check_retryable

log = get_logger(__name__)


class RetryRefused(Exception):
    """The retry was refused; str() says why, for the command line. `repaired`: the task was running
    and pending subtasks of an interrupted retry were put back in line."""

    def __init__(self, message: str, *, repaired: bool = False) -> None:
        super().__init__(message)
        self.repaired = repaired


@dataclass(frozen=True)
class RetryResult:
    outcome: RetryOutcome
    waiting: dict[Lane, int] = field(default_factory=dict)


@contextmanager
def retry_lock(ctx: Context, task_id: str) -> Iterator[None]:
    """Hold the task's retry lock for the block; RetryRefused if another retry of the task holds it."""
    token = markers.take_retry_lock(ctx.redis, task_id)
    if token is None:
        raise RetryRefused(f"another retry of task {task_id} is in progress; try again once it has finished")
    try:
        yield
    finally:
        if not markers.release_retry_lock(ctx.redis, task_id, token):
            log.warning("the retry lock expired before the retry ended", task_id=task_id)


def still_processing(task_id: str, n: int) -> str:
    """Why a retry of a finished task with subtasks still processing is refused, for the command line."""
    return (
        f"task {task_id} has {n} subtask{'s' if n != 1 else ''} still processing: retry it once "
        f"{'they have' if n != 1 else 'it has'} ended (the sweep ends a stuck one within minutes; "
        f"`nietest status {task_id}` shows them)"
    )


def retry_task(ctx: Context, task_id: str, statuses: Iterable[str] = (Status.FAILED,)) -> RetryResult:
    """Run the task's subtasks in `statuses` again as new image jobs; RetryRefused says why not."""
    wanted = check_retryable(statuses)
    with retry_lock(ctx, task_id):
        return _retry(ctx, task_id, wanted)


def _retry(ctx: Context, task_id: str, wanted: list[Status]) -> RetryResult:
    store = ctx.store
    task = store.get_task(task_id)
    if task is None:
        raise RetryRefused(f"no task {task_id}")
    if task["status"] in ACTIVE:
        repaired = task["status"] == Status.PROCESSING and admission.repair(ctx, task)
        note = "; its pending subtasks, left out of line by an interrupted retry, were queued" if repaired else ""
        raise RetryRefused(
            f"task {task_id} is still running ({task['status']}): retry it once it has finished{note}",
            repaired=repaired,
        )
    counts = store.count_subtasks(task_id)
    total = int(task.get("total_images") or 0)
    if sum(counts.values()) != total:
        raise RetryRefused(
            f"task {task_id} has {sum(counts.values())} of its {total} subtasks (its expansion failed: "
            f"{task.get('error') or 'unknown error'}); submit it again"
        )
    if counts[Status.PROCESSING]:
        raise RetryRefused(still_processing(task_id, counts[Status.PROCESSING]))
    if not any(counts[s] for s in (*wanted, Status.PENDING)):
        raise RetryRefused(f"task {task_id} ({task['status']}) has no {' or '.join(wanted)} subtasks to run again")

    notices.next_round(ctx, task)
    markers.forget_all(ctx.redis, (doc["id"] for doc in store.iter_subtasks(task_id, status=wanted)))
    outcome = store.retry_subtasks(task_id, wanted)
    if outcome.processing:
        raise RetryRefused(still_processing(task_id, outcome.processing))
    if not outcome.reopened or outcome.task is None:
        if outcome.status in ACTIVE:  # reopened meanwhile (a retry that did not take the lock)
            raise RetryRefused(f"task {task_id} is running again already ({outcome.status})")
        raise RetryRefused(f"task {task_id} has no {' or '.join(wanted)} subtasks to run again")
    waiting = admission.queue_task(ctx, outcome.task, store.iter_subtasks(task_id, status=Status.PENDING))
    log.info(
        "task retried",
        task_id=task_id,
        round=outcome.round,
        retried=outcome.reset,
        statuses=wanted,
        waiting={lane.value: n for lane, n in waiting.items() if n},
    )
    return RetryResult(outcome, waiting)
