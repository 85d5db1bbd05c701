"""The task store's interface (`Store`), its documents, errors and outcomes.

Two implementations follow one contract (tests/test_store_contract.py runs against both):
`SQLiteStore` (store/sqlite.py, the embedded default) and `MongoStore` (store/mongo.py).

Documents are plain dicts carrying an `id` field and the stored fields listed below; times come
out as timezone-aware UTC datetimes (millisecond precision, as BSON stores them). Tasks also
carry `cancel_requested` (bool) and `cancel_requested_at`. `total_images` is taken from the
document given to `create_task` (submit knows the size of the expansion): finalisation
compares against it.

A subtask leaves a non-terminal state exactly once, through `finish_subtask`; only the call
that actually moved it increments the task's counters, and the call whose increment brings
`completed + failed + cancelled` to `total_images` finalises the task, once, with the status
`domain.status.final_task_status` decides.

A finished task can be run again (`retry_subtasks`: `nietest retry`): its failed and/or cancelled
subtasks go back to `pending`, each keeping what its last attempt left (`error`, job, seed, times)
as one more entry of its `error_history`, and the task goes back to `processing` with its
counters recomputed from its subtasks and its `round` (1 at submit) one higher. The task notices
of a round are told apart by that number.

`request_cancel` / `cancel_task` finalise a task that has no subtask at all (the master has
not expanded it yet) as `cancelled` straight away. The master must therefore insert its
subtasks *first* and check `is_cancel_requested` *afterwards* (calling `cancel_task` again
when set): whichever order the two race in, no pending subtask survives a cancel.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    pass

from nietest_daemon.domain.lifecycle import (
    CANCELLED,
    COUNTER_OF,
    COUNTERS,
    FAILED,
    PENDING,
    PROCESSING,
    TERMINAL,
    is_partial,
    progress_of,
)

Doc = dict[str, Any]
TASK_FIELDS: tuple[str, ...] = (
    "id", "name", "status", "priority", "created_at", "updated_at", "started_at", "completed_at",
    "total_images", "processed_images", "completed_images", "failed_images", "cancelled_images",
    "progress", "prompts", "ratio", "seed", "batch_size", "use_polish", "is_lumina", "lumina_model_name",
    "lumina_cfg", "lumina_step", "variables", "variables_map", "error", "round",
)  # fmt: skip
SUBTASK_FIELDS: tuple[str, ...] = (
    "id", "task_id", "status", "variable_indices", "prompts", "ratio", "width", "height", "seed", "use_polish",
    "is_lumina", "lumina_model_name", "lumina_cfg", "lumina_step", "job_uuid", "poll_count", "attempts",
    "result", "error", "created_at", "updated_at", "started_at", "completed_at", "round", "error_history",
)  # fmt: skip
#: The subtask statuses `retry_subtasks` runs again.
RETRYABLE: frozenset[str] = frozenset({FAILED, CANCELLED})
TIME_FIELDS: tuple[str, ...] = ("created_at", "updated_at", "started_at", "completed_at", "cancel_requested_at")


class StoreError(Exception):
    """Base class of the store's own errors."""


class DuplicateTaskError(StoreError):
    """`create_task` was given an id that is already stored."""

    def __init__(self, task_id: str) -> None:
        super().__init__(f"task {task_id!r} already exists")
        self.task_id = task_id


class UnknownSubtaskError(StoreError, LookupError):
    """An operation that needs an existing subtask was given an unknown id."""

    def __init__(self, subtask_id: str) -> None:
        super().__init__(f"no subtask {subtask_id!r}")
        self.subtask_id = subtask_id


@dataclass(frozen=True)
class FinishOutcome:
    """What one `finish_subtask` call did.

    `changed`: this call moved the subtask to a terminal state and counted it (at most one call
    per subtask). `finalised`: this call also finalised the task (at most one call per task);
    that caller, and only it, sends the task notice. `task` is the finalised task document (None
    unless `finalised`): a finish that does not end its task never reads the whole document,
    whose prompts and variables can be tens of KB, so that the cost of a finish does not grow with
    the size of its task.
    """

    subtask_id: str
    task_id: str
    status: str
    changed: bool
    finalised: bool = False
    task_status: str | None = None
    task: Doc | None = None

    @property
    def partial(self) -> bool:
        """The task this call finalised completed only some of its images."""
        return self.finalised and self.task is not None and is_partial(self.task)


@dataclass(frozen=True)
class RetryOutcome:
    """What one `retry_subtasks` call did.

    `found`: the task exists. `status`: its status as this call found it (an active one means the
    call was refused and changed nothing). `reset`: subtasks this call moved back to pending.
    `reopened`: this call moved the task back to `processing`, as round `round`, and `task` is
    then its document. A task without anything to run again stays as it was (`reopened` false).
    """

    task_id: str
    found: bool
    status: str | None = None
    reset: int = 0
    reopened: bool = False
    round: int | None = None
    task: Doc | None = None


@dataclass(frozen=True)
class CancelOutcome:
    """What one `cancel_task` call did: pending subtasks it cancelled, and whether it finalised the task."""

    task_id: str
    found: bool
    cancelled: int = 0
    finalised: bool = False
    task_status: str | None = None
    task: Doc | None = None


# --- shared rules -------------------------------------------------------------------------------


def utcnow() -> datetime:
    """Now, UTC, truncated to milliseconds (BSON precision, so both stores agree)."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def as_utc(value: datetime) -> datetime:
    """An aware UTC datetime; a naive one is taken to be UTC already."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def iso_text(value: datetime) -> str:
    """A time as fixed-width ISO-8601 UTC text with milliseconds (it sorts like the time it names):
    how the SQLite store keeps times, `error_history` entries hold them, and exports print them."""
    return as_utc(value).isoformat(timespec="milliseconds")


def new_task_doc(doc: Mapping[str, Any], now: datetime) -> Doc:
    """The stored form of a new task: the given fields, every stored field present, state reset."""
    if not doc.get("id"):
        raise ValueError("task document needs an 'id'")
    task: Doc = {name: None for name in TASK_FIELDS}
    task.update(doc)
    task.update(
        id=str(doc["id"]),
        status=PENDING,
        created_at=now,
        updated_at=now,
        started_at=None,
        completed_at=None,
        total_images=int(doc.get("total_images") or 0),
        progress=0.0,
        error=None,
        cancel_requested=False,
        cancel_requested_at=None,
        round=1,
    )
    task.update(dict.fromkeys(COUNTERS, 0))
    return task


def new_subtask_doc(task_id: str, doc: Mapping[str, Any], now: datetime) -> Doc:
    """The stored form of a new subtask: the given fields, every stored field present, state reset."""
    if not doc.get("id"):
        raise ValueError("subtask document needs an 'id'")
    sub: Doc = {name: None for name in SUBTASK_FIELDS}
    sub.update(doc)
    sub.update(
        id=str(doc["id"]),
        task_id=task_id,
        status=PENDING,
        job_uuid=None,
        poll_count=0,
        attempts=0,
        result=None,
        error=None,
        created_at=now,
        updated_at=now,
        started_at=None,
        completed_at=None,
        round=1,
        error_history=[],
    )
    if sub.get("variable_indices") is None:
        sub["variable_indices"] = []
    return sub


def round_of(doc: Mapping[str, Any]) -> int:
    """The round of a task (or the round a subtask last ran in): 1 until a retry, and for a
    document stored before rounds existed."""
    value = doc.get("round")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1


def history_entry(sub: Mapping[str, Any]) -> Doc:
    """What a subtask's last attempt leaves in its `error_history` when it runs again; times as
    ISO-8601 text in both stores. Keep in step with `SQLiteStore`'s `_HISTORY_ENTRY` (SQL)."""

    def iso(value: Any) -> Any:
        return iso_text(value) if isinstance(value, datetime) else value

    return {
        "round": round_of(sub),
        "status": sub.get("status"),
        "error": sub.get("error"),
        "job_uuid": sub.get("job_uuid"),
        "seed": sub.get("seed"),
        "started_at": iso(sub.get("started_at")),
        "completed_at": iso(sub.get("completed_at")),
    }


def counters_of(counts: Mapping[str, int]) -> dict[str, int]:
    """A task's counters (`COUNTERS`) from the number of its subtasks in each status."""
    terminal = {COUNTER_OF[s]: int(counts.get(s, 0)) for s in TERMINAL}
    return {"processed_images": sum(terminal.values()), **terminal}


def reopened_fields(task: Mapping[str, Any], counts: Mapping[str, int], new_round: int, now: datetime) -> Doc:
    """The fields a retry sets on a finished task it runs again: processing as `new_round`, its
    counters those of its subtasks (`counts`: subtasks per status), no end, no error, no cancel."""
    counters = counters_of(counts)
    return {
        "status": PROCESSING,
        "round": new_round,
        **counters,
        "progress": progress_of(counters["processed_images"], int(task.get("total_images") or 0)),
        "completed_at": None,
        "error": None,
        "cancel_requested": False,
        "cancel_requested_at": None,
        "updated_at": now,
    }


def check_retryable(statuses: Iterable[str]) -> list[str]:
    """The statuses a retry runs again, sorted; ValueError unless they are some of `RETRYABLE`."""
    wanted = sorted(set(statuses))
    if not wanted or not set(wanted) <= RETRYABLE:
        raise ValueError(f"retry takes {' and/or '.join(sorted(RETRYABLE))} subtasks, got {wanted!r}")
    return wanted


def _check_terminal(status: str) -> None:
    if status not in TERMINAL:
        raise ValueError(f"finish_subtask needs a terminal status ({', '.join(sorted(TERMINAL))}), got {status!r}")


def _statuses(status: str | Iterable[str] | None) -> list[str] | None:
    if status is None:
        return None
    return [status] if isinstance(status, str) else list(status)


# --- the interface ------------------------------------------------------------------------------


class Store(ABC):
    """The task store every part of the pipeline talks to. All operations are safe to repeat."""

    @abstractmethod
    def create_task(self, doc: Mapping[str, Any]) -> None:
        """Store a new task: status pending, counters 0, created_at now. Raises DuplicateTaskError."""

    @abstractmethod
    def get_task(self, task_id: str) -> Doc | None:
        """The task document, or None."""

    @abstractmethod
    def list_tasks(self, limit: int = 20, status: str | Iterable[str] | None = None) -> list[Doc]:
        """Tasks, newest first, optionally only those in `status` (one or several)."""

    @abstractmethod
    def count_tasks(self) -> dict[str, int]:
        """Number of tasks per status (every status present, 0 when none), from the status index."""

    @abstractmethod
    def insert_subtasks(self, task_id: str, docs: Iterable[Mapping[str, Any]]) -> int:
        """Insert subtasks of a task, ignoring ids already stored; returns how many were new."""

    @abstractmethod
    def get_subtask(self, subtask_id: str) -> Doc | None:
        """The subtask document, or None."""

    @abstractmethod
    def list_subtasks(
        self,
        task_id: str,
        status: str | Iterable[str] | None = None,
        limit: int | None = None,
        *,
        after: str | None = None,
    ) -> list[Doc]:
        """Subtasks of a task ordered by id, optionally only those in `status`, only those whose id
        is above `after` (paging)."""

    def iter_subtasks(
        self, task_id: str, status: str | Iterable[str] | None = None, *, batch: int = 1000
    ) -> Iterator[Doc]:
        """Every subtask of a task (in `status`), ordered by id, read `batch` at a time: what
        reads a whole task (report, export) without holding its 50 000 documents at once. Pages by
        id, so no cursor stays open between pages."""
        after: str | None = None
        while True:
            page = self.list_subtasks(task_id, status, batch, after=after)
            yield from page
            if len(page) < batch:
                return
            after = page[-1]["id"]

    @abstractmethod
    def count_subtasks(self, task_id: str) -> dict[str, int]:
        """Number of subtasks of a task per status (every status present, 0 when none)."""

    @abstractmethod
    def mark_task_running(self, task_id: str) -> bool:
        """pending -> processing, started_at set; True if this call changed the task."""

    @abstractmethod
    def fail_task(self, task_id: str, error: str) -> bool:
        """A task that cannot be worked on (its master failed): non-terminal -> failed with `error`, once.

        Its remaining pending subtasks are left to `cancel_task`; True if this call changed the task.
        """

    @abstractmethod
    def start_subtask(self, subtask_id: str) -> Doc | None:
        """pending/processing -> processing, attempts += 1, started_at once; the doc, or None if terminal/unknown."""

    @abstractmethod
    def record_job(self, subtask_id: str, job_uuid: str, seed: int | None) -> bool:
        """Store the image job's uuid and seed unless one is stored already (first writer wins)."""

    @abstractmethod
    def clear_job(self, subtask_id: str, job_uuid: str | None = None) -> bool:
        """Forget the job of a non-terminal subtask (TIMEOUT resubmit), only if it is still `job_uuid` when given.

        Resets poll_count to 0. True if this call cleared it.
        """

    @abstractmethod
    def record_poll(self, subtask_id: str) -> int:
        """poll_count += 1 atomically; returns the new count. Raises UnknownSubtaskError."""

    @abstractmethod
    def finish_subtask(
        self, subtask_id: str, status: str, *, result: str | None = None, error: str | None = None
    ) -> FinishOutcome | None:
        """The one move of a subtask to a terminal state, counted and finalising exactly once; None if unknown."""

    @abstractmethod
    def retry_subtasks(self, task_id: str, statuses: Iterable[str] = (FAILED,)) -> RetryOutcome:
        """Run a finished task's subtasks in `statuses` (failed and/or cancelled) again.

        Refused (nothing changed) unless the task is terminal. Each such subtask goes back to
        pending: its last attempt appended to `error_history`, then `error`, `result`, `job_uuid`,
        `poll_count`, `attempts`, `started_at` and `completed_at` reset (the seed stays), `round`
        the task's new round. Then, if any subtask is pending (this call's, or those a call that
        died half-way left), the task goes back to processing as round `round + 1`, in one
        conditional update: counters recomputed from its subtasks, `completed_at`, `error` and the
        cancel request cleared. A repeated call finishes what an interrupted one began.

        Concurrent calls for one task must be serialised by the caller (`pipeline.retry` holds the
        task's retry lock in the broker). With MongoDB, two calls with different status sets can
        interleave: one that found the task finished goes on moving its subtasks to pending after
        the other reopened it and recounted its counters, which then count those subtasks wrong.
        """

    @abstractmethod
    def cancel_task(self, task_id: str) -> CancelOutcome:
        """Request cancellation and cancel every pending subtask through the finish path."""

    @abstractmethod
    def is_cancel_requested(self, task_id: str) -> bool:
        """Whether a cancel was requested for the task."""

    def get_subtask_for_work(self, subtask_id: str) -> tuple[Doc | None, bool]:
        """The subtask document (or None) and whether a cancel was requested for its task: what
        every subtask message reads first. One read where the store can join them."""
        sub = self.get_subtask(subtask_id)
        return sub, sub is not None and self.is_cancel_requested(sub["task_id"])

    @abstractmethod
    def finalise_task(self, task_id: str) -> str | None:
        """Finalise a task whose counters are complete but which is not terminal yet; the status if this call did."""

    @abstractmethod
    def find_stale_subtasks(self, older_than: datetime, limit: int = 100) -> list[Doc]:
        """Processing subtasks whose updated_at is before `older_than`, oldest first."""

    @abstractmethod
    def close(self) -> None:
        """Release connections."""

    def request_cancel(self, task_id: str) -> int:
        """Mark the task cancel-requested, cancel its pending subtasks; how many were cancelled."""
        return self.cancel_task(task_id).cancelled

    def recount(self, task_id: str) -> dict[str, int]:
        """The task's counters recomputed from its subtasks (total_images = number of subtasks)."""
        counts = self.count_subtasks(task_id)
        return {"total_images": sum(counts.values()), **counters_of(counts)}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
