"""The task store's interface (`Store`), its documents, errors and outcomes.

Two implementations follow one contract (tests/test_store_contract.py runs against both):
`SQLiteStore` (store/sqlite.py, the embedded default) and `MongoStore` (store/mongo.py).

Documents are plain dicts carrying an `id` field and the stored fields listed below; times come
out as timezone-aware UTC datetimes (millisecond precision, as BSON stores them). Tasks also
carry `cancel_requested` (bool) and `cancel_requested_at`. `total_images` is taken from the
document given to `create_task` (submit knows the size of the expansion): finalisation
compares against it. `owner` (domain/owners.py: who submitted the task; None in a task stored
before owners existed), `extra` (the task JSON's fields nietest does not use; {} when none) and
`payload_sha256` (a producer message's digest, else None) are taken from that document as they
are; `list_tasks` filters by owner along an index.

A subtask leaves a non-terminal state exactly once, through `finish_subtask`; only the call
that actually moved it increments the task's counters, and the call whose increment brings
`completed + failed + cancelled` to `total_images` finalises the task, once, with the status
`domain.lifecycle.final_task_status` decides.

Where moving the subtask and counting it are two writes (MongoDB), a process that dies between
them leaves the subtask terminal and uncounted: the task's counters fall short and nobody
finalises it. `repair_counts`, run by the periodic sweep, finds such a task once it has been
still for a grace period, sets its counters to the recount and finalises it, once. Every store
implements it (in SQLite it never finds anything: its finish is one transaction). Counters may
fall short of the truth and be repaired; no operation of a store may make them run ahead of it,
which would finalise a task with subtasks still to run.

A finished task can be run again (`retry_subtasks`: `nietest retry`): its failed and/or cancelled
subtasks go back to `pending`, each keeping what its last attempt left (`error`, job, seed, times)
as one more entry of its `error_history`, the counters lose exactly the subtasks moved (never a
recount, which a finish landing half-way would make wrong), and the task goes back to
`processing` with its `round` (1 at submit) one higher. The task notices of a round are told
apart by that number. A retry is refused while any subtask of the task is still processing.

`prepare` builds what the store's queries need (MongoDB's indexes): the daemon calls it once at
start; no command or worker does, so that a user who may only read can run the reading commands.

Nothing but a `StoreError` leaves a store for a driver's error (`Store.__init_subclass__` wraps
every public method of an implementation, and its constructor, in one translation: the
implementation says which of its driver's errors mean `StoreUnavailable`). `StoreUnavailable` is
an outage (`core.outage.Outage`): the store could not be reached or did not answer in time, the
operation may or may not have been applied, and since every operation is safe to repeat the
caller runs it again later (the pipeline retries the message; the command line prints one line and
exits 1). Any other error of a driver is a `StoreError` with the driver's error chained (a bug, or
a store a person must look at: a refused privilege, a damaged file). Errors of the store's own
(`DuplicateTaskError`, `UnknownSubtaskError`) and a bad argument (`ValueError`) pass as they are.
Messages name the store by its `address`, password masked, and pass through the one redactor.

`request_cancel` / `cancel_task` finalise a task that has no subtask at all (the master has
not expanded it yet) as `cancelled` straight away. The master must therefore insert its
subtasks *first* and check `is_cancel_requested` *afterwards* (calling `cancel_task` again
when set): whichever order the two race in, no pending subtask survives a cancel.
"""

from __future__ import annotations

import functools
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Self

from nietest_daemon.core.outage import Outage
from nietest_daemon.core.redaction import redact
from nietest_daemon.domain.lifecycle import (
    COUNTER_OF,
    COUNTERS,
    TERMINAL,
    Status,
    is_partial,
    progress_of,
)

Doc = dict[str, Any]
TASK_FIELDS: tuple[str, ...] = (
    "id", "name", "status", "priority", "created_at", "updated_at", "started_at", "completed_at",
    "total_images", "processed_images", "completed_images", "failed_images", "cancelled_images",
    "progress", "prompts", "ratio", "seed", "batch_size", "use_polish", "is_lumina", "lumina_model_name",
    "lumina_cfg", "lumina_step", "variables", "variables_map", "error", "round", "owner", "extra",
    "payload_sha256",
)  # fmt: skip
SUBTASK_FIELDS: tuple[str, ...] = (
    "id", "task_id", "status", "variable_indices", "prompts", "ratio", "width", "height", "seed", "use_polish",
    "is_lumina", "lumina_model_name", "lumina_cfg", "lumina_step", "job_uuid", "poll_count", "attempts",
    "result", "error", "created_at", "updated_at", "started_at", "completed_at", "round", "error_history",
)  # fmt: skip
#: The subtask statuses `retry_subtasks` runs again.
RETRYABLE: frozenset[Status] = frozenset({Status.FAILED, Status.CANCELLED})
TIME_FIELDS: tuple[str, ...] = ("created_at", "updated_at", "started_at", "completed_at", "cancel_requested_at")


class StoreError(Exception):
    """Base class of the store's own errors, and of its drivers' errors as the store's edge translates them."""


class StoreUnavailable(StoreError, Outage):
    """The store could not be reached or did not answer in time (a connection refused or lost, a
    server selection or operation timeout, a database file locked past the busy timeout or that
    cannot be opened): nothing was wrong with the operation, which may or may not have been
    applied. Run it again later."""

    service = "store"


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
    status: Status
    changed: bool
    finalised: bool = False
    task_status: Status | None = None
    task: Doc | None = None

    @property
    def partial(self) -> bool:
        """The task this call finalised completed only some of its images."""
        return self.finalised and self.task is not None and is_partial(self.task)


@dataclass(frozen=True)
class RetryOutcome:
    """What one `retry_subtasks` call did.

    `found`: the task exists. `status`: its status as this call found it (an active one means the
    call was refused and changed nothing). `processing`: subtasks of the task still processing
    (not 0: the call was refused and changed nothing). `reset`: subtasks this call moved back to
    pending. `reopened`: this call moved the task back to `processing`, as round `round`, and
    `task` is then its document. A task without anything to run again stays as it was
    (`reopened` false).
    """

    task_id: str
    found: bool
    status: Status | None = None
    reset: int = 0
    reopened: bool = False
    round: int | None = None
    task: Doc | None = None
    processing: int = 0


@dataclass(frozen=True)
class RepairOutcome:
    """One task whose counters `repair_counts` set to the recount: `before` and `after` them
    (`COUNTERS`); `finalised`: this call also finalised the task (`task_status`, `task`: its
    document), and its caller, only it, sends the final notice."""

    task_id: str
    before: dict[str, int]
    after: dict[str, int]
    finalised: bool = False
    task_status: Status | None = None
    task: Doc | None = None


@dataclass(frozen=True)
class CancelOutcome:
    """What one `cancel_task` call did: pending subtasks it cancelled, and whether it finalised the task."""

    task_id: str
    found: bool
    cancelled: int = 0
    finalised: bool = False
    task_status: Status | None = None
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
        status=Status.PENDING,
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
    if task["extra"] is None:
        task["extra"] = {}
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
        status=Status.PENDING,
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


#: What a subtask's last attempt leaves in its `error_history` when it runs again: these fields of
#: the subtask, each under its own name; `round` read as `round_of` reads it, times as ISO-8601
#: text. The one definition of an entry: `history_entry` builds it in Python (MongoDB),
#: `store.sqlite.HISTORY_ENTRY_SQL` in SQL from the same names.
HISTORY_FIELDS: tuple[str, ...] = ("round", "status", "error", "job_uuid", "seed", "started_at", "completed_at")


def history_entry(sub: Mapping[str, Any]) -> Doc:
    """The `error_history` entry of the subtask's last attempt (`HISTORY_FIELDS`)."""
    entry = {key: sub.get(key) for key in HISTORY_FIELDS}
    entry["round"] = round_of(sub)
    return {key: iso_text(value) if isinstance(value, datetime) else value for key, value in entry.items()}


def counters_of(counts: Mapping[str, int]) -> dict[str, int]:
    """A task's counters (`COUNTERS`) from the number of its subtasks in each status."""
    terminal = {COUNTER_OF[s]: int(counts.get(s, 0)) for s in TERMINAL}
    return {"processed_images": sum(terminal.values()), **terminal}


def reopened_fields(task: Mapping[str, Any], new_round: int, now: datetime) -> Doc:
    """The fields a retry sets on a finished task it runs again (`task`: its counters once the
    moved subtasks were taken off): processing as `new_round`, progress from those counters, no
    end, no error, no cancel. The counters themselves are not set: a finish may land meanwhile."""
    return {
        "status": Status.PROCESSING,
        "round": new_round,
        "progress": progress_of(max(0, int(task.get("processed_images") or 0)), int(task.get("total_images") or 0)),
        "completed_at": None,
        "error": None,
        "cancel_requested": False,
        "cancel_requested_at": None,
        "updated_at": now,
    }


def moved_deltas(status: Status, moved: int) -> dict[str, int]:
    """The counter changes of `moved` subtasks leaving the terminal `status` (a retry): `$inc` values."""
    return {"processed_images": -moved, COUNTER_OF[status]: -moved}


def is_short(task: Mapping[str, Any], counts: Mapping[str, int]) -> bool:
    """The task's counters count fewer finished subtasks than its subtasks say (`counts`: per
    status): a finish whose increment was lost."""
    return int(task.get("processed_images") or 0) < counters_of(counts)["processed_images"]


#: How long a task and its subtasks must have been still before `repair_counts` touches it (the
#: sweep's default): far longer than a finish can stay between its two writes (pymongo gives up on
#: each write after the client's `timeoutMS`, 30 s: `store.mongo_client.TIMEOUT_MS`), and not so
#: long that a task waits noticeably for its end.
REPAIR_GRACE_SECONDS = 300.0


def check_retryable(statuses: Iterable[str]) -> list[Status]:
    """The statuses a retry runs again, sorted; ValueError unless they are some of `RETRYABLE`."""
    wanted = sorted({str(status) for status in statuses})
    if not wanted or not set(wanted) <= RETRYABLE:
        raise ValueError(f"retry takes {' and/or '.join(sorted(RETRYABLE))} subtasks, got {wanted!r}")
    return [Status(status) for status in wanted]


def check_terminal(status: str) -> Status:
    """`status` as a terminal Status; ValueError unless it is one (what `finish_subtask` takes)."""
    if status not in TERMINAL:
        raise ValueError(f"finish_subtask needs a terminal status ({', '.join(sorted(TERMINAL))}), got {str(status)!r}")
    return Status(status)


def _statuses(status: str | Iterable[str] | None) -> list[str] | None:
    if status is None:
        return None
    return [status] if isinstance(status, str) else list(status)


# --- the edge: drivers' errors become StoreErrors ------------------------------------------------

#: The longest driver message a translated error carries (pymongo's describe the whole topology).
_DETAIL_CHARS = 300
#: Where a driver's message turns from the error to its settings and every server's state (pymongo).
_DETAIL_TAILS = (" (configured timeouts:", ", Timeout:", ", Topology Description:")


def _detail(exc: BaseException) -> str:
    """The driver's error as one short line: its type and the first part of its message."""
    text = " ".join(str(exc).split())
    for tail in _DETAIL_TAILS:
        text = text.split(tail, 1)[0]
    if len(text) > _DETAIL_CHARS:
        text = text[: _DETAIL_CHARS - 1] + "\u2026"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def translated(store: Store, exc: Exception) -> StoreError | None:
    """The StoreError a driver's `exc` becomes at `store`'s edge (None: not a driver's error, it
    passes as it is): `StoreUnavailable` when the implementation says so, else `StoreError`."""
    if isinstance(exc, StoreError) or not isinstance(exc, store.DRIVER_ERRORS):
        return None
    address = getattr(store, "address", None) or type(store).__name__
    if store._is_unavailable(exc):
        return StoreUnavailable(redact(f"the task store ({address}) is unavailable: {_detail(exc)}"))
    return StoreError(redact(f"the task store ({address}) failed: {_detail(exc)}"))


@contextmanager
def _edge(store: Store) -> Iterator[None]:
    """Around a method of `store`: a driver's error leaves it `translated`, the driver's chained."""
    try:
        yield
    except Exception as exc:
        error = translated(store, exc)
        if error is None:
            raise
        raise error from exc


def _at_the_edge(method: Callable[..., Any]) -> Callable[..., Any]:
    """`method` of a Store, run at the store's edge (`_edge`); a generator's items too."""
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def generator(self: Store, *args: Any, **kwargs: Any) -> Iterator[Any]:
            with _edge(self):
                yield from method(self, *args, **kwargs)

        wrapper: Callable[..., Any] = generator
    else:

        @functools.wraps(method)
        def call(self: Store, *args: Any, **kwargs: Any) -> Any:
            with _edge(self):
                return method(self, *args, **kwargs)

        wrapper = call
    wrapper.__store_edge__ = True  # type: ignore[attr-defined]
    return wrapper


# --- the interface ------------------------------------------------------------------------------


class Store(ABC):
    """The task store every part of the pipeline talks to. All operations are safe to repeat.

    An implementation names its driver's errors (`DRIVER_ERRORS`) and which of them mean the store
    is unavailable (`_is_unavailable`); its public methods and constructor are wrapped at class
    creation, so no driver error leaves it untranslated (see the module's docstring)."""

    #: The errors of this store's driver, translated at its edge.
    DRIVER_ERRORS: ClassVar[tuple[type[Exception], ...]] = ()
    #: How errors and logs name the store (`sqlite <file>`, `mongodb <uri>`), its password masked.
    address: str = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, member in list(vars(cls).items()):
            public = name == "__init__" or not name.startswith("_")
            if public and inspect.isfunction(member) and not getattr(member, "__store_edge__", False):
                setattr(cls, name, _at_the_edge(member))

    def _is_unavailable(self, exc: Exception) -> bool:
        """Whether this driver error (one of `DRIVER_ERRORS`) means the store could not be reached
        or did not answer in time, rather than a bug or a fault a person must fix."""
        return False

    @abstractmethod
    def create_task(self, doc: Mapping[str, Any]) -> None:
        """Store a new task: status pending, counters 0, created_at now. Raises DuplicateTaskError."""

    @abstractmethod
    def get_task(self, task_id: str) -> Doc | None:
        """The task document, or None."""

    @abstractmethod
    def list_tasks(
        self, limit: int = 20, status: str | Iterable[str] | None = None, owner: str | None = None
    ) -> list[Doc]:
        """Tasks, newest first, optionally only those in `status` (one or several) and only those of
        `owner`; each query along one index, its order included."""

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
        self, subtask_id: str, status: Status, *, result: str | None = None, error: str | None = None
    ) -> FinishOutcome | None:
        """The one move of a subtask to a terminal state, counted and finalising exactly once; None if unknown."""

    @abstractmethod
    def retry_subtasks(self, task_id: str, statuses: Iterable[str] = (Status.FAILED,)) -> RetryOutcome:
        """Run a finished task's subtasks in `statuses` (failed and/or cancelled) again.

        Refused (nothing changed) unless the task is terminal, and while any of its subtasks is
        still processing (`RetryOutcome.processing`: its finish may be between its two writes).
        Each such subtask goes back to pending: its last attempt appended to `error_history`,
        then `error`, `result`, `job_uuid`, `poll_count`, `attempts`, `started_at` and
        `completed_at` reset (the seed stays), `round` the task's new round; the counters lose
        exactly the subtasks moved (deltas, never a recount: a finish landing meanwhile counts
        as it should). Then, if any subtask is pending (this call's, or those a call that died
        half-way left), the task goes back to processing as round `round + 1`, in one
        conditional update: `completed_at`, `error` and the cancel request cleared. A repeated
        call finishes what an interrupted one began; an interrupted one can leave the counters
        short (never ahead), which `repair_counts` puts right at the round's end.

        Concurrent calls for one task must be serialised by the caller (`pipeline.retry` holds the
        task's retry lock in the broker): with MongoDB, one could reopen the task while the other
        still moves subtasks under the round it read.
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
    def finalise_task(self, task_id: str) -> Status | None:
        """Finalise a task whose counters are complete but which is not terminal yet; the status if this call did."""

    @abstractmethod
    def find_stale_subtasks(self, older_than: datetime, limit: int = 100) -> list[Doc]:
        """Processing subtasks whose updated_at is before `older_than`, oldest first."""

    @abstractmethod
    def repair_counts(self, older_than: datetime) -> list[RepairOutcome]:
        """Put right the counters of tasks a lost increment left short; the tasks it repaired.

        A task qualifies when it is `processing`, none of its subtasks is pending or processing,
        its counters count fewer finished subtasks than its subtasks do, and neither it nor any
        of its subtasks has changed since `older_than` (the grace, `REPAIR_GRACE_SECONDS` in the
        sweep: a finish between its two writes has moved its subtask and not yet counted it, and
        must not be counted twice). Its counters are then set to the recount by a compare-and-set
        on the counters read (a change meanwhile leaves it to the next pass), and the task is
        finalised if complete, at most once with any concurrent finaliser: the caller sends the
        final notice of each `finalised` outcome.
        """

    @abstractmethod
    def prepare(self) -> None:
        """Build what the store's queries need (MongoDB: its indexes); safe to repeat. Called by the
        daemon at start, and by nothing else: other commands and workers only open the store."""

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
