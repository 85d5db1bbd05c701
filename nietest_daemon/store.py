"""The task store of DESIGN.md §5: one interface (`Store`), two implementations, one contract.

- `SQLiteStore`: the embedded default, a WAL-mode SQLite file in the data dir, safe for many
  worker processes and threads at once (one connection per thread, `BEGIN IMMEDIATE` around
  every read-modify-write, a busy timeout instead of failing on a held lock).
- `MongoStore`: MongoDB through pymongo, used when `MONGO_URI` or `MONGO_HOST` is set. It uses
  only plain single-document atomic operations (`insert_one`, `insert_many(ordered=False)`,
  `find_one_and_update` / `update_one` with filters and `$set` / `$inc` / `$max`; `find` and a
  `$group` aggregate for reads), so what the mongomock contract suite checks is what a MongoDB
  server guarantees. `_id` is the document's `id` (which is stored too).

Documents are plain dicts carrying an `id` field and the fields of DESIGN §5; times come out
as timezone-aware UTC datetimes (millisecond precision, as BSON stores them). Tasks also
carry `cancel_requested` (bool) and `cancel_requested_at`. `total_images` is taken from the
document given to `create_task` (submit knows the size of the expansion): finalisation
compares against it.

Subtask statuses: pending, processing, completed, failed, cancelled (the last three terminal).
A subtask leaves a non-terminal state exactly once, through `finish_subtask`; only the call
that actually moved it increments the task's counters, and the call whose increment brings
`completed + failed + cancelled` to `total_images` finalises the task, once.

Task status decision: tasks use the same five statuses, no extra one (the front end and the
seed know only these). A task is `pending` until `mark_task_running` makes it `processing`;
when every subtask is terminal it becomes, in this order of precedence:

- `completed` when every subtask completed;
- `cancelled` when a cancel was requested (or any subtask was cancelled);
- `failed` when no subtask completed;
- otherwise `completed` with `error` = "partially completed: N of M images failed" -- a
  *partial* completion. `FinishOutcome.partial` / `is_partial(task)` tell the notifier to send
  the "partially completed" notice of DESIGN §9.

`request_cancel` / `cancel_task` finalise a task that has no subtask at all (the master has
not expanded it yet) as `cancelled` straight away. The master must therefore insert its
subtasks *first* and check `is_cancel_requested` *afterwards* (calling `cancel_task` again
when set): whichever order the two race in, no pending subtask survives a cancel.

Known limit of `MongoStore`: moving the subtask and incrementing the task are two atomic
single-document writes; a process killed between the two loses that one increment (the
subtask is terminal but not counted). `recount` detects it; `finalise_task` finalises a task
whose counters are complete but whose finaliser died. `SQLiteStore` does both in one
transaction.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import pymongo
from pymongo import ReturnDocument
from pymongo.errors import BulkWriteError, DuplicateKeyError, OperationFailure

if TYPE_CHECKING:
    from pymongo.collection import Collection
    from pymongo.database import Database

Doc = dict[str, Any]

PENDING = "pending"
PROCESSING = "processing"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
STATUSES: tuple[str, ...] = (PENDING, PROCESSING, COMPLETED, FAILED, CANCELLED)
ACTIVE: tuple[str, ...] = (PENDING, PROCESSING)
TERMINAL: frozenset[str] = frozenset({COMPLETED, FAILED, CANCELLED})

#: The counter each terminal subtask status increments on its task.
COUNTER_OF: dict[str, str] = {
    COMPLETED: "completed_images",
    FAILED: "failed_images",
    CANCELLED: "cancelled_images",
}
COUNTERS: tuple[str, ...] = ("processed_images", "completed_images", "failed_images", "cancelled_images")

TASK_FIELDS: tuple[str, ...] = (
    "id", "name", "status", "priority", "created_at", "updated_at", "started_at", "completed_at",
    "total_images", "processed_images", "completed_images", "failed_images", "cancelled_images",
    "progress", "prompts", "ratio", "seed", "batch_size", "use_polish", "is_lumina", "lumina_model_name",
    "lumina_cfg", "lumina_step", "variables", "variables_map", "error",
)  # fmt: skip
SUBTASK_FIELDS: tuple[str, ...] = (
    "id", "task_id", "status", "variable_indices", "prompts", "ratio", "width", "height", "seed", "use_polish",
    "is_lumina", "lumina_model_name", "lumina_cfg", "lumina_step", "job_uuid", "poll_count", "attempts",
    "result", "error", "created_at", "updated_at", "started_at", "completed_at",
)  # fmt: skip
TIME_FIELDS: tuple[str, ...] = ("created_at", "updated_at", "started_at", "completed_at", "cancel_requested_at")

SQLITE_FILENAME = "nietest.sqlite3"


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
    that caller, and only it, sends the task notice. `task` is the task document after the
    call's update (None when nothing changed or the task is missing).
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


def progress_of(processed: int, total: int) -> float:
    """processed / total * 100, rounded to 2 places; 0.0 for an empty task."""
    return round(processed * 100.0 / total, 2) if total > 0 else 0.0


def done_count(task: Mapping[str, Any]) -> int:
    """completed + failed + cancelled images of a task."""
    return sum(int(task.get(k) or 0) for k in ("completed_images", "failed_images", "cancelled_images"))


def is_done(task: Mapping[str, Any]) -> bool:
    """Every image of the task is accounted for (and there is at least one)."""
    total = int(task.get("total_images") or 0)
    return total > 0 and done_count(task) >= total


def final_task_status(task: Mapping[str, Any]) -> tuple[str, str | None]:
    """The status (and error note) a task whose subtasks are all terminal ends in; see the module doc."""
    total = int(task.get("total_images") or 0)
    completed = int(task.get("completed_images") or 0)
    failed = int(task.get("failed_images") or 0)
    if total > 0 and completed >= total:
        return COMPLETED, None
    if task.get("cancel_requested") or int(task.get("cancelled_images") or 0) > 0:
        return CANCELLED, task.get("error")
    if completed == 0:
        return FAILED, task.get("error") or f"all {failed} images failed"
    return COMPLETED, f"partially completed: {failed} of {total} images failed"


def is_partial(task: Mapping[str, Any]) -> bool:
    """A finished task that completed some but not all of its images (and was not cancelled)."""
    return task.get("status") == COMPLETED and int(task.get("completed_images") or 0) < int(
        task.get("total_images") or 0
    )


def new_task_doc(doc: Mapping[str, Any], now: datetime) -> Doc:
    """The stored form of a new task: the given fields, every §5 field present, state reset."""
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
    )
    task.update(dict.fromkeys(COUNTERS, 0))
    return task


def new_subtask_doc(task_id: str, doc: Mapping[str, Any], now: datetime) -> Doc:
    """The stored form of a new subtask: the given fields, every §5 field present, state reset."""
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
    )
    if sub.get("variable_indices") is None:
        sub["variable_indices"] = []
    return sub


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
    def insert_subtasks(self, task_id: str, docs: Iterable[Mapping[str, Any]]) -> int:
        """Insert subtasks of a task, ignoring ids already stored; returns how many were new."""

    @abstractmethod
    def get_subtask(self, subtask_id: str) -> Doc | None:
        """The subtask document, or None."""

    @abstractmethod
    def list_subtasks(
        self, task_id: str, status: str | Iterable[str] | None = None, limit: int | None = None
    ) -> list[Doc]:
        """Subtasks of a task ordered by id, optionally only those in `status`."""

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
    def cancel_task(self, task_id: str) -> CancelOutcome:
        """Request cancellation and cancel every pending subtask through the finish path."""

    @abstractmethod
    def is_cancel_requested(self, task_id: str) -> bool:
        """Whether a cancel was requested for the task."""

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
        terminal = {COUNTER_OF[s]: counts[s] for s in TERMINAL}
        return {
            "total_images": sum(counts.values()),
            "processed_images": sum(terminal.values()),
            **terminal,
        }

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_store(
    *,
    data_dir: str | os.PathLike[str],
    mongo_uri: str | None = None,
    mongo_host: str | None = None,
    mongo_port: int = 27017,
    mongo_user: str | None = None,
    mongo_password: str | None = None,
    mongo_db: str = "task_db",
    task_collection: str = "tasks",
    subtask_collection: str = "subtasks",
) -> Store:
    """MongoDB when a URI or host is given, else the embedded SQLite file in `data_dir`."""
    if mongo_uri or mongo_host:
        return MongoStore.from_settings(
            uri=mongo_uri,
            host=mongo_host,
            port=mongo_port,
            user=mongo_user,
            password=mongo_password,
            db=mongo_db,
            task_collection=task_collection,
            subtask_collection=subtask_collection,
        )
    return SQLiteStore(data_dir)


# --- SQLite -------------------------------------------------------------------------------------

_SQLITE_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS tasks (id TEXT PRIMARY KEY, status TEXT NOT NULL, created_at TEXT NOT NULL,"
    " doc TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS tasks_status_created ON tasks (status, created_at)",
    "CREATE INDEX IF NOT EXISTS tasks_created ON tasks (created_at)",
    "CREATE TABLE IF NOT EXISTS subtasks (id TEXT PRIMARY KEY, task_id TEXT NOT NULL, status TEXT NOT NULL,"
    " updated_at TEXT NOT NULL, doc TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS subtasks_task_status ON subtasks (task_id, status)",
    "CREATE INDEX IF NOT EXISTS subtasks_status_updated ON subtasks (status, updated_at)",
)


def _iso(value: datetime) -> str:
    """Fixed-width ISO-8601 UTC text: sorts like the time it names."""
    return as_utc(value).isoformat(timespec="milliseconds")


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return _iso(value)
    raise TypeError(f"cannot store a {type(value).__name__} in the task store")


def _dumps(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, default=_json_default, ensure_ascii=False, separators=(",", ":"))


def _loads(text: str) -> Doc:
    doc: Doc = json.loads(text)
    for name in TIME_FIELDS:
        value = doc.get(name)
        if isinstance(value, str):
            doc[name] = as_utc(datetime.fromisoformat(value))
    return doc


class SQLiteStore(Store):
    """The embedded store: one WAL-mode SQLite file, documents as JSON plus indexed columns."""

    def __init__(
        self, data_dir: str | os.PathLike[str], *, filename: str = SQLITE_FILENAME, busy_timeout: float = 60.0
    ) -> None:
        self.path = Path(data_dir) / filename
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.busy_timeout = busy_timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[sqlite3.Connection] = []
        self._pid = os.getpid()
        self._closed = False
        self._init_schema()

    # --- connections and transactions --------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection (a new one after a fork: a connection never crosses processes)."""
        if self._closed:
            raise StoreError("the store is closed")
        pid = os.getpid()
        if pid != self._pid:  # forked: abandon (never close) the parent's connections
            with self._lock:
                if pid != self._pid:
                    self._pid, self._conns, self._local = pid, [], threading.local()
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: `BEGIN IMMEDIATE` takes the write lock before anything is read."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _init_schema(self) -> None:
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                conn = self._conn()
                if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    conn.execute("PRAGMA journal_mode = WAL")
                with self._tx() as conn:
                    for statement in _SQLITE_SCHEMA:
                        conn.execute(statement)
                return
            except sqlite3.OperationalError as exc:  # another process switching the journal mode
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    # --- row helpers -------------------------------------------------------------------------------

    @staticmethod
    def _read(conn: sqlite3.Connection, table: str, key: str) -> Doc | None:
        row = conn.execute(f"SELECT doc FROM {table} WHERE id = ?", (key,)).fetchone()
        return _loads(row[0]) if row else None

    @staticmethod
    def _write_task(conn: sqlite3.Connection, task: Doc) -> None:
        conn.execute("UPDATE tasks SET status = ?, doc = ? WHERE id = ?", (task["status"], _dumps(task), task["id"]))

    @classmethod
    def _write_tasks(cls, conn: sqlite3.Connection, tasks: Mapping[str, Doc]) -> None:
        for task in tasks.values():
            cls._write_task(conn, task)

    @staticmethod
    def _write_subtask(conn: sqlite3.Connection, sub: Doc) -> None:
        conn.execute(
            "UPDATE subtasks SET status = ?, updated_at = ?, doc = ? WHERE id = ?",
            (sub["status"], _iso(sub["updated_at"]), _dumps(sub), sub["id"]),
        )

    def _modify_subtask(self, subtask_id: str, change: Callable[[Doc], bool]) -> tuple[Doc | None, bool]:
        """Read-modify-write one subtask in a write transaction; `change` edits it and says whether to save."""
        with self._tx() as conn:
            sub = self._read(conn, "subtasks", subtask_id)
            if sub is None:
                return None, False
            changed = change(sub)
            if changed:
                self._write_subtask(conn, sub)
            return sub, changed

    # --- tasks ---------------------------------------------------------------------------------------

    def create_task(self, doc: Mapping[str, Any]) -> None:
        task = new_task_doc(doc, utcnow())
        try:
            with self._tx() as conn:
                conn.execute(
                    "INSERT INTO tasks (id, status, created_at, doc) VALUES (?, ?, ?, ?)",
                    (task["id"], task["status"], _iso(task["created_at"]), _dumps(task)),
                )
        except sqlite3.IntegrityError:
            raise DuplicateTaskError(task["id"]) from None

    def get_task(self, task_id: str) -> Doc | None:
        return self._read(self._conn(), "tasks", task_id)

    def list_tasks(self, limit: int = 20, status: str | Iterable[str] | None = None) -> list[Doc]:
        wanted = _statuses(status)
        sql, args = "SELECT doc FROM tasks", []
        if wanted is not None:
            sql += f" WHERE status IN ({','.join('?' * len(wanted))})"
            args += wanted
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        rows = self._conn().execute(sql, (*args, int(limit))).fetchall()
        return [_loads(r[0]) for r in rows]

    def mark_task_running(self, task_id: str) -> bool:
        with self._tx() as conn:
            task = self._read(conn, "tasks", task_id)
            if task is None or task["status"] != PENDING:
                return False
            now = utcnow()
            task.update(status=PROCESSING, updated_at=now)
            if task.get("started_at") is None:
                task["started_at"] = now
            self._write_task(conn, task)
            return True

    def is_cancel_requested(self, task_id: str) -> bool:
        # Every subtask message asks this: read the one field in SQLite's C JSON parser rather than
        # decoding the whole task (prompts and variables_map can be tens of KB) in Python.
        row = (
            self._conn()
            .execute("SELECT json_extract(doc, '$.cancel_requested') FROM tasks WHERE id = ?", (task_id,))
            .fetchone()
        )
        return bool(row and row[0])

    def fail_task(self, task_id: str, error: str) -> bool:
        with self._tx() as conn:
            task = self._read(conn, "tasks", task_id)
            if task is None or task["status"] in TERMINAL:
                return False
            now = utcnow()
            task.update(status=FAILED, error=error, updated_at=now, completed_at=now)
            self._write_task(conn, task)
            return True

    # --- subtasks ------------------------------------------------------------------------------------

    def insert_subtasks(self, task_id: str, docs: Iterable[Mapping[str, Any]], *, chunk: int = 2000) -> int:
        now = utcnow()
        rows: list[tuple[str, str, str, str, str]] = []
        inserted = 0

        def flush() -> int:
            with self._tx() as conn:
                before = conn.total_changes
                conn.executemany(
                    "INSERT OR IGNORE INTO subtasks (id, task_id, status, updated_at, doc) VALUES (?, ?, ?, ?, ?)",
                    rows,
                )
                return conn.total_changes - before

        for doc in docs:
            sub = new_subtask_doc(task_id, doc, now)
            rows.append((sub["id"], task_id, sub["status"], _iso(now), _dumps(sub)))
            if len(rows) >= chunk:
                inserted += flush()
                rows = []
        if rows:
            inserted += flush()
        return inserted

    def get_subtask(self, subtask_id: str) -> Doc | None:
        return self._read(self._conn(), "subtasks", subtask_id)

    def list_subtasks(
        self, task_id: str, status: str | Iterable[str] | None = None, limit: int | None = None
    ) -> list[Doc]:
        wanted = _statuses(status)
        sql, args = "SELECT doc FROM subtasks WHERE task_id = ?", [task_id]
        if wanted is not None:
            sql += f" AND status IN ({','.join('?' * len(wanted))})"
            args += wanted
        sql += " ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        return [_loads(r[0]) for r in self._conn().execute(sql, args).fetchall()]

    def count_subtasks(self, task_id: str) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        rows = self._conn().execute(
            "SELECT status, COUNT(*) FROM subtasks WHERE task_id = ? GROUP BY status", (task_id,)
        )
        for status, n in rows:
            counts[status] = n
        return counts

    def start_subtask(self, subtask_id: str) -> Doc | None:
        def change(sub: Doc) -> bool:
            if sub["status"] in TERMINAL:
                return False
            now = utcnow()
            sub.update(status=PROCESSING, attempts=int(sub.get("attempts") or 0) + 1, updated_at=now)
            if sub.get("started_at") is None:
                sub["started_at"] = now
            return True

        sub, changed = self._modify_subtask(subtask_id, change)
        return sub if changed else None

    def record_job(self, subtask_id: str, job_uuid: str, seed: int | None) -> bool:
        def change(sub: Doc) -> bool:
            if sub.get("job_uuid") is not None:
                return False
            sub.update(job_uuid=job_uuid, seed=seed, updated_at=utcnow())
            return True

        return self._modify_subtask(subtask_id, change)[1]

    def clear_job(self, subtask_id: str, job_uuid: str | None = None) -> bool:
        def change(sub: Doc) -> bool:
            if sub["status"] in TERMINAL or sub.get("job_uuid") is None:
                return False
            if job_uuid is not None and sub["job_uuid"] != job_uuid:
                return False
            sub.update(job_uuid=None, poll_count=0, updated_at=utcnow())
            return True

        return self._modify_subtask(subtask_id, change)[1]

    def record_poll(self, subtask_id: str) -> int:
        def change(sub: Doc) -> bool:
            sub.update(poll_count=int(sub.get("poll_count") or 0) + 1, updated_at=utcnow())
            return True

        sub, _ = self._modify_subtask(subtask_id, change)
        if sub is None:
            raise UnknownSubtaskError(subtask_id)
        return int(sub["poll_count"])

    # --- the finish path -----------------------------------------------------------------------------

    @staticmethod
    def _finalise_in_tx(task: Doc, now: datetime) -> str | None:
        """Finalise `task` (already read in this transaction) if it is complete and not terminal yet."""
        if task["status"] in TERMINAL or not is_done(task):
            return None
        status, error = final_task_status(task)
        task.update(status=status, error=error, completed_at=now, updated_at=now)
        task["progress"] = max(
            float(task.get("progress") or 0.0), progress_of(task["processed_images"], task["total_images"])
        )
        return status

    def _finish_in_tx(
        self,
        conn: sqlite3.Connection,
        subtask_id: str,
        status: str,
        result: str | None,
        error: str | None,
        tasks: dict[str, Doc],
    ) -> FinishOutcome | None:
        """The finish path inside a write transaction. Task documents are read once into `tasks` and
        updated there; the caller writes them back (`_write_tasks`) before it commits."""
        sub = self._read(conn, "subtasks", subtask_id)
        if sub is None:
            return None
        if sub["status"] in TERMINAL:
            return FinishOutcome(subtask_id, sub["task_id"], sub["status"], changed=False)
        now = utcnow()
        sub.update(status=status, updated_at=now, completed_at=now)
        if result is not None:
            sub["result"] = result
        if error is not None:
            sub["error"] = error
        self._write_subtask(conn, sub)
        task = tasks.get(sub["task_id"]) or self._read(conn, "tasks", sub["task_id"])
        if task is None:
            return FinishOutcome(subtask_id, sub["task_id"], status, changed=True)
        for counter in ("processed_images", COUNTER_OF[status]):
            task[counter] = int(task.get(counter) or 0) + 1
        task["progress"] = max(
            float(task.get("progress") or 0.0), progress_of(task["processed_images"], task["total_images"])
        )
        task["updated_at"] = now
        final = self._finalise_in_tx(task, now)
        tasks[task["id"]] = task
        return FinishOutcome(
            subtask_id, sub["task_id"], status, changed=True, finalised=final is not None, task_status=final, task=task
        )

    def finish_subtask(
        self, subtask_id: str, status: str, *, result: str | None = None, error: str | None = None
    ) -> FinishOutcome | None:
        _check_terminal(status)
        tasks: dict[str, Doc] = {}
        with self._tx() as conn:
            outcome = self._finish_in_tx(conn, subtask_id, status, result, error, tasks)
            self._write_tasks(conn, tasks)
        return outcome

    def finalise_task(self, task_id: str) -> str | None:
        with self._tx() as conn:
            task = self._read(conn, "tasks", task_id)
            if task is None:
                return None
            final = self._finalise_in_tx(task, utcnow())
            if final is not None:
                self._write_task(conn, task)
            return final

    def cancel_task(self, task_id: str, *, chunk: int = 500) -> CancelOutcome:
        with self._tx() as conn:
            task = self._read(conn, "tasks", task_id)
            if task is None:
                return CancelOutcome(task_id, found=False)
            if not task.get("cancel_requested"):
                now = utcnow()
                task.update(cancel_requested=True, cancel_requested_at=now, updated_at=now)
                self._write_task(conn, task)
        cancelled, finalised, final_status, final_task = 0, False, None, None
        while True:
            tasks: dict[str, Doc] = {}
            with self._tx() as conn:
                ids = [
                    r[0]
                    for r in conn.execute(
                        "SELECT id FROM subtasks WHERE task_id = ? AND status = ? ORDER BY id LIMIT ?",
                        (task_id, PENDING, chunk),
                    )
                ]
                for subtask_id in ids:
                    outcome = self._finish_in_tx(conn, subtask_id, CANCELLED, None, None, tasks)
                    if outcome and outcome.changed:
                        cancelled += 1
                    if outcome and outcome.finalised:
                        finalised, final_status, final_task = True, outcome.task_status, outcome.task
                self._write_tasks(conn, tasks)
                if not ids:
                    # Nothing expanded yet: the task has no subtask, so cancelling it ends it now.
                    has_any = conn.execute("SELECT 1 FROM subtasks WHERE task_id = ? LIMIT 1", (task_id,)).fetchone()
                    task = self._read(conn, "tasks", task_id)
                    if not has_any and task is not None and task["status"] not in TERMINAL:
                        now = utcnow()
                        task.update(status=CANCELLED, completed_at=now, updated_at=now)
                        self._write_task(conn, task)
                        finalised, final_status, final_task = True, CANCELLED, task
                    break
        return CancelOutcome(task_id, True, cancelled, finalised, final_status, final_task)

    def find_stale_subtasks(self, older_than: datetime, limit: int = 100) -> list[Doc]:
        rows = self._conn().execute(
            "SELECT doc FROM subtasks WHERE status = ? AND updated_at < ? ORDER BY updated_at, id LIMIT ?",
            (PROCESSING, _iso(older_than), int(limit)),
        )
        return [_loads(r[0]) for r in rows]

    def close(self) -> None:
        with self._lock:
            conns, self._conns = (self._conns, []) if self._pid == os.getpid() else ([], [])
            self._closed = True
        for conn in conns:
            with suppress(sqlite3.Error):
                conn.close()


# --- MongoDB ------------------------------------------------------------------------------------


def _to_bson(value: datetime) -> datetime:
    """Naive UTC, as BSON dates are (avoids aware/naive mix-ups in drivers and mongomock)."""
    return as_utc(value).replace(tzinfo=None)


def _from_mongo(doc: Mapping[str, Any] | None) -> Doc | None:
    if doc is None:
        return None
    out = {k: v for k, v in doc.items() if k != "_id"}
    out.setdefault("id", doc.get("_id"))
    for name in TIME_FIELDS:
        value = out.get(name)
        if isinstance(value, datetime):
            out[name] = as_utc(value)
    return out


def _to_mongo(doc: Mapping[str, Any]) -> Doc:
    out = {k: _to_bson(v) if isinstance(v, datetime) else v for k, v in doc.items()}
    out["_id"] = doc["id"]
    return out


class MongoStore(Store):
    """The MongoDB store: `_id` = the document's id; only atomic single-document operations."""

    def __init__(
        self,
        db: Database[Any],
        *,
        task_collection: str = "tasks",
        subtask_collection: str = "subtasks",
        client: pymongo.MongoClient[Any] | None = None,
        create_indexes: bool = True,
    ) -> None:
        self.db = db
        self.tasks: Collection[Any] = db[task_collection]
        self.subtasks: Collection[Any] = db[subtask_collection]
        self._client = client
        if create_indexes:
            self._ensure_index(self.subtasks, [("task_id", 1), ("status", 1)])
            self._ensure_index(self.subtasks, [("status", 1), ("updated_at", 1)])
            self._ensure_index(self.tasks, [("status", 1), ("created_at", -1)])
            self._ensure_index(self.tasks, [("created_at", -1)])

    @staticmethod
    def _ensure_index(collection: Collection[Any], keys: list[tuple[str, int]]) -> None:
        """Create an index (default name); one on the same keys under another name already serves."""
        try:
            collection.create_index(keys)
        except OperationFailure as exc:
            if exc.code not in (85, 86):  # IndexOptionsConflict / IndexKeySpecsConflict
                raise

    @classmethod
    def from_settings(
        cls,
        *,
        uri: str | None = None,
        host: str | None = None,
        port: int = 27017,
        user: str | None = None,
        password: str | None = None,
        db: str = "task_db",
        task_collection: str = "tasks",
        subtask_collection: str = "subtasks",
        **client_options: Any,
    ) -> MongoStore:
        """Connect with a URI, or host/port/user/password; the database is always `db`."""
        options: dict[str, Any] = {"tz_aware": True, "serverSelectionTimeoutMS": 10_000, **client_options}
        if uri:
            client: pymongo.MongoClient[Any] = pymongo.MongoClient(uri, **options)
        elif host:
            if user is not None:
                options.setdefault("username", user)
            if password is not None:
                options.setdefault("password", password)
            client = pymongo.MongoClient(host=host, port=port, **options)
        else:
            raise ValueError("MongoStore.from_settings needs a uri or a host")
        return cls(client[db], task_collection=task_collection, subtask_collection=subtask_collection, client=client)

    # --- tasks ---------------------------------------------------------------------------------------

    def create_task(self, doc: Mapping[str, Any]) -> None:
        task = new_task_doc(doc, utcnow())
        try:
            self.tasks.insert_one(_to_mongo(task))
        except DuplicateKeyError:
            raise DuplicateTaskError(task["id"]) from None

    def get_task(self, task_id: str) -> Doc | None:
        return _from_mongo(self.tasks.find_one({"_id": task_id}))

    def list_tasks(self, limit: int = 20, status: str | Iterable[str] | None = None) -> list[Doc]:
        wanted = _statuses(status)
        query: Doc = {} if wanted is None else {"status": {"$in": wanted}}
        cursor = self.tasks.find(query).sort([("created_at", -1), ("_id", -1)]).limit(int(limit))
        return [d for d in map(_from_mongo, cursor) if d is not None]

    def fail_task(self, task_id: str, error: str) -> bool:
        now = _to_bson(utcnow())
        res = self.tasks.update_one(
            {"_id": task_id, "status": {"$in": list(ACTIVE)}},
            {"$set": {"status": FAILED, "error": error, "updated_at": now, "completed_at": now}},
        )
        return bool(res.modified_count)

    def mark_task_running(self, task_id: str) -> bool:
        now = _to_bson(utcnow())
        res = self.tasks.update_one(
            {"_id": task_id, "status": PENDING}, {"$set": {"status": PROCESSING, "updated_at": now}}
        )
        if res.modified_count:
            self.tasks.update_one({"_id": task_id, "started_at": None}, {"$set": {"started_at": now}})
        return bool(res.modified_count)

    def is_cancel_requested(self, task_id: str) -> bool:
        task = self.tasks.find_one({"_id": task_id}, {"cancel_requested": 1})
        return bool(task and task.get("cancel_requested"))

    # --- subtasks ------------------------------------------------------------------------------------

    def insert_subtasks(self, task_id: str, docs: Iterable[Mapping[str, Any]], *, chunk: int = 1000) -> int:
        now = utcnow()
        batch: list[Doc] = []
        inserted = 0
        for doc in docs:
            batch.append(_to_mongo(new_subtask_doc(task_id, doc, now)))
            if len(batch) >= chunk:
                inserted += self._insert_batch(batch)
                batch = []
        if batch:
            inserted += self._insert_batch(batch)
        return inserted

    def _insert_batch(self, batch: list[Doc]) -> int:
        try:
            return len(self.subtasks.insert_many(batch, ordered=False).inserted_ids)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(e.get("code") != 11000 for e in errors) or exc.details.get("writeConcernErrors"):
                raise
            return int(exc.details.get("nInserted", 0))

    def get_subtask(self, subtask_id: str) -> Doc | None:
        return _from_mongo(self.subtasks.find_one({"_id": subtask_id}))

    def list_subtasks(
        self, task_id: str, status: str | Iterable[str] | None = None, limit: int | None = None
    ) -> list[Doc]:
        wanted = _statuses(status)
        query: Doc = {"task_id": task_id}
        if wanted is not None:
            query["status"] = {"$in": wanted}
        cursor = self.subtasks.find(query).sort("_id", 1)
        if limit is not None:
            cursor = cursor.limit(int(limit))
        return [d for d in map(_from_mongo, cursor) if d is not None]

    def count_subtasks(self, task_id: str) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        for row in self.subtasks.aggregate(
            [{"$match": {"task_id": task_id}}, {"$group": {"_id": "$status", "n": {"$sum": 1}}}]
        ):
            counts[row["_id"]] = int(row["n"])
        return counts

    def start_subtask(self, subtask_id: str) -> Doc | None:
        now = _to_bson(utcnow())
        doc = self.subtasks.find_one_and_update(
            {"_id": subtask_id, "status": {"$in": list(ACTIVE)}},
            {"$set": {"status": PROCESSING, "updated_at": now}, "$inc": {"attempts": 1}},
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:
            return None
        if doc.get("started_at") is None:
            res = self.subtasks.update_one({"_id": subtask_id, "started_at": None}, {"$set": {"started_at": now}})
            if res.modified_count:
                doc["started_at"] = now
            else:  # set by a concurrent start an instant ago
                doc["started_at"] = (self.subtasks.find_one({"_id": subtask_id}, {"started_at": 1}) or {}).get(
                    "started_at"
                )
        return _from_mongo(doc)

    def record_job(self, subtask_id: str, job_uuid: str, seed: int | None) -> bool:
        res = self.subtasks.update_one(
            {"_id": subtask_id, "job_uuid": None},
            {"$set": {"job_uuid": job_uuid, "seed": seed, "updated_at": _to_bson(utcnow())}},
        )
        return bool(res.modified_count)

    def clear_job(self, subtask_id: str, job_uuid: str | None = None) -> bool:
        query: Doc = {"_id": subtask_id, "status": {"$in": list(ACTIVE)}, "job_uuid": {"$ne": None}}
        if job_uuid is not None:
            query["job_uuid"] = job_uuid
        res = self.subtasks.update_one(
            query, {"$set": {"job_uuid": None, "poll_count": 0, "updated_at": _to_bson(utcnow())}}
        )
        return bool(res.modified_count)

    def record_poll(self, subtask_id: str) -> int:
        doc = self.subtasks.find_one_and_update(
            {"_id": subtask_id},
            {"$inc": {"poll_count": 1}, "$set": {"updated_at": _to_bson(utcnow())}},
            projection={"poll_count": 1},
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:
            raise UnknownSubtaskError(subtask_id)
        return int(doc["poll_count"])

    # --- the finish path -----------------------------------------------------------------------------

    def _try_finalise(self, task: Mapping[str, Any], now: datetime) -> tuple[str | None, Doc | None]:
        """Conditionally finalise a complete task from a non-terminal state: at most one caller wins."""
        if task.get("status") in TERMINAL or not is_done(task):
            return None, None
        status, error = final_task_status(task)
        progress = progress_of(int(task.get("processed_images") or 0), int(task.get("total_images") or 0))
        doc = self.tasks.find_one_and_update(
            {"_id": task["_id"] if "_id" in task else task["id"], "status": {"$in": list(ACTIVE)}},
            {
                "$set": {"status": status, "error": error, "completed_at": _to_bson(now), "updated_at": _to_bson(now)},
                "$max": {"progress": progress},
            },
            return_document=ReturnDocument.AFTER,
        )
        return (status, _from_mongo(doc)) if doc is not None else (None, None)

    def finish_subtask(
        self, subtask_id: str, status: str, *, result: str | None = None, error: str | None = None
    ) -> FinishOutcome | None:
        _check_terminal(status)
        now = utcnow()
        changes: Doc = {"status": status, "updated_at": _to_bson(now), "completed_at": _to_bson(now)}
        if result is not None:
            changes["result"] = result
        if error is not None:
            changes["error"] = error
        before = self.subtasks.find_one_and_update(
            {"_id": subtask_id, "status": {"$in": list(ACTIVE)}},
            {"$set": changes},
            projection={"task_id": 1, "status": 1},
            return_document=ReturnDocument.BEFORE,
        )
        if before is None:
            current = self.subtasks.find_one({"_id": subtask_id}, {"task_id": 1, "status": 1})
            if current is None:
                return None
            return FinishOutcome(subtask_id, current["task_id"], current["status"], changed=False)
        task_id = before["task_id"]
        task = self.tasks.find_one_and_update(
            {"_id": task_id},
            {"$inc": {"processed_images": 1, COUNTER_OF[status]: 1}, "$set": {"updated_at": _to_bson(now)}},
            return_document=ReturnDocument.AFTER,
        )
        if task is None:
            return FinishOutcome(subtask_id, task_id, status, changed=True)
        progress = progress_of(int(task["processed_images"]), int(task.get("total_images") or 0))
        if progress > float(task.get("progress") or 0.0):
            # $max: concurrent finishers may land in any order, progress only ever goes up.
            self.tasks.update_one({"_id": task_id}, {"$max": {"progress": progress}})
            task["progress"] = progress
        final, final_doc = self._try_finalise(task, now)
        return FinishOutcome(
            subtask_id,
            task_id,
            status,
            changed=True,
            finalised=final is not None,
            task_status=final,
            task=final_doc if final_doc is not None else _from_mongo(task),
        )

    def finalise_task(self, task_id: str) -> str | None:
        task = self.tasks.find_one({"_id": task_id})
        if task is None:
            return None
        return self._try_finalise(task, utcnow())[0]

    def cancel_task(self, task_id: str, *, chunk: int = 1000) -> CancelOutcome:
        now = _to_bson(utcnow())
        res = self.tasks.update_one({"_id": task_id}, {"$set": {"cancel_requested": True, "updated_at": now}})
        if not res.matched_count:
            return CancelOutcome(task_id, found=False)
        self.tasks.update_one({"_id": task_id, "cancel_requested_at": None}, {"$set": {"cancel_requested_at": now}})
        cancelled, finalised, final_status, final_task = 0, False, None, None
        while True:
            pending = [
                d["_id"]
                for d in self.subtasks.find({"task_id": task_id, "status": PENDING}, {"_id": 1})
                .sort("_id", 1)
                .limit(chunk)
            ]
            if not pending:
                break
            for subtask_id in pending:
                outcome = self.finish_subtask(subtask_id, CANCELLED)
                if outcome and outcome.changed:
                    cancelled += 1
                if outcome and outcome.finalised:
                    finalised, final_status, final_task = True, outcome.task_status, outcome.task
        if self.subtasks.find_one({"task_id": task_id}, {"_id": 1}) is None:
            # Nothing expanded yet: the task has no subtask, so cancelling it ends it now.
            stamp = _to_bson(utcnow())
            doc = self.tasks.find_one_and_update(
                {"_id": task_id, "status": {"$in": list(ACTIVE)}},
                {"$set": {"status": CANCELLED, "completed_at": stamp, "updated_at": stamp}},
                return_document=ReturnDocument.AFTER,
            )
            if doc is not None:
                finalised, final_status, final_task = True, CANCELLED, _from_mongo(doc)
        return CancelOutcome(task_id, True, cancelled, finalised, final_status, final_task)

    def find_stale_subtasks(self, older_than: datetime, limit: int = 100) -> list[Doc]:
        cursor = (
            self.subtasks.find({"status": PROCESSING, "updated_at": {"$lt": _to_bson(older_than)}})
            .sort([("updated_at", 1), ("_id", 1)])
            .limit(int(limit))
        )
        return [d for d in map(_from_mongo, cursor) if d is not None]

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
