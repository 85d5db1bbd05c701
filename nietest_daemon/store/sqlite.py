"""`SQLiteStore`: the embedded default, a WAL-mode SQLite file in the data dir.

Safe for many worker processes and threads at once: one connection per thread, `BEGIN IMMEDIATE`
around every read-modify-write, a busy timeout instead of failing on a held lock (the file, its
schema and its connections: store/sqlite_file.py). Moving a subtask and counting it on its task
happen in one transaction, and so do a cancel's chunk of subtasks and their count, and a whole
retry (its moves, the counters lost by exactly what moved, the reopened task): a process that dies
anywhere leaves all of it or nothing, so `repair_counts` never finds a task to repair here (it is
implemented all the same: the contract asks it of every store). Opening the file makes its schema
and indexes: `prepare` has nothing left to do.

Two things keep the write lock short, so that ten threads finishing subtasks do not queue on it:
- the threads of one process take turns on a mutex before `BEGIN IMMEDIATE`, and only one of them
  at a time waits in SQLite's busy handler (which sleeps up to 100 ms between tries);
- a task's changing state (counters, progress, cancel flag, updated_at) lives in a small row of
  `task_state`, beside the document (its prompts and variables can be tens of KB): a finish reads
  and rewrites that row only, and the document only when it finalises the task. Reads merge the
  two; every write of a whole task writes both.

A query of several statuses runs once per status, each along an index, and the pages are merged
(`_merged`): one `IN (...)` would sort.
"""

from __future__ import annotations

import heapq
import itertools
import os
import sqlite3
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from nietest_daemon.domain.lifecycle import (
    COUNTER_OF,
    COUNTERS,
    STATUSES,
    TERMINAL,
    Status,
    final_task_status,
    is_done,
    progress_of,
)
from nietest_daemon.store.base import (
    CancelOutcome,
    Doc,
    DuplicateTaskError,
    FinishOutcome,
    RepairOutcome,
    RetryOutcome,
    Store,
    UnknownSubtaskError,
    _statuses,
    as_utc,
    check_retryable,
    check_terminal,
    counters_of,
    is_short,
    iso_text,
    moved_deltas,
    new_subtask_doc,
    new_task_doc,
    reopened_fields,
    round_of,
    utcnow,
)
from nietest_daemon.store.sqlite_file import (
    HISTORY_ENTRY_SQL,
    OWNER_SQL,
    SQLITE_FILENAME,
    STATE_COLUMNS,
    STATE_FIELDS,
    STATE_PLACEHOLDERS,
    STATE_SELECT,
    TERMINAL_SQL,
    SQLiteFile,
    dumps,
    loads,
)

__all__ = ["HISTORY_ENTRY_SQL", "SQLITE_FILENAME", "SQLiteStore"]

_Row = TypeVar("_Row")
#: SQLite's primary result codes that mean the file cannot be used now (`SQLiteStore._is_unavailable`).
_UNAVAILABLE_CODES = frozenset(
    {
        sqlite3.SQLITE_BUSY,  # a lock held past the busy timeout
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_READONLY,  # a file or directory that may not be written (permissions, a read-only mount)
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,  # a missing or unreadable data dir
        sqlite3.SQLITE_PROTOCOL,  # a WAL lock protocol error: a race with another process, retried
    }
)


def _merged(
    pages: Iterable[list[_Row]], limit: int | None, key: Callable[[_Row], tuple[str, str]], *, newest_first: bool
) -> list[_Row]:
    """The rows of one query per status, each page in the order of `key` (a time or an id, then
    the id), merged into one list in that order, each id once, at most `limit` of them."""
    merged = heapq.merge(*pages, key=key, reverse=newest_first)
    unique = (next(rows) for _, rows in itertools.groupby(merged, key=lambda row: key(row)[1]))
    return list(itertools.islice(unique, limit))


def _task_order(row: tuple[Any, ...]) -> tuple[str, str]:
    return row[0], row[1]  # created_at, id


def _subtask_order(doc: Doc) -> tuple[str, str]:
    return doc["id"], doc["id"]


class SQLiteStore(Store):
    """The embedded store: one WAL-mode SQLite file, documents as JSON plus indexed columns."""

    DRIVER_ERRORS = (sqlite3.Error, OSError)

    def __init__(
        self, data_dir: str | os.PathLike[str], *, filename: str = SQLITE_FILENAME, busy_timeout: float = 60.0
    ) -> None:
        self.path = Path(data_dir) / filename
        self.busy_timeout = busy_timeout
        self.address = f"sqlite {self.path}"
        self._file = SQLiteFile(self.path, busy_timeout)

    def _is_unavailable(self, exc: Exception) -> bool:
        """The file cannot be reached, or not now: an OSError (the data dir), or SQLite's codes for
        a lock held past the busy timeout, a file that cannot be opened or written (permissions, a
        read-only or full disk) and I/O errors. Every other code is a bug (an SQL error, a
        constraint) or a damaged file (`SQLITE_CORRUPT`, `SQLITE_NOTADB`) that retrying cannot mend."""
        if isinstance(exc, OSError):
            return True
        code = getattr(exc, "sqlite_errorcode", None)
        return code is not None and code & 0xFF in _UNAVAILABLE_CODES

    # --- row helpers -------------------------------------------------------------------------------

    @staticmethod
    def _read(conn: sqlite3.Connection, table: str, key: str) -> Doc | None:
        row = conn.execute(f"SELECT doc FROM {table} WHERE id = ?", (key,)).fetchone()
        return loads(row[0]) if row else None

    @staticmethod
    def _state_row(task: Mapping[str, Any]) -> tuple[Any, ...]:
        return (
            int(task.get("total_images") or 0),
            *(int(task.get(name) or 0) for name in COUNTERS),
            float(task.get("progress") or 0.0),
            int(bool(task.get("cancel_requested"))),
            iso_text(task["updated_at"]),
            task["id"],
        )

    @staticmethod
    def _with_state(doc_text: str, state: tuple[Any, ...]) -> Doc:
        """A task document, its `task_state` row laid over it."""
        task = loads(doc_text)
        if state[0] is not None:  # a LEFT JOIN found the row
            task.update(zip(STATE_FIELDS, state, strict=True))
            task["cancel_requested"] = bool(task["cancel_requested"])
            task["updated_at"] = as_utc(datetime.fromisoformat(task["updated_at"]))
        return task

    def _read_task(self, conn: sqlite3.Connection, task_id: str) -> Doc | None:
        row = conn.execute(
            f"SELECT t.doc, {STATE_SELECT} FROM tasks t LEFT JOIN task_state s ON s.task_id = t.id WHERE t.id = ?",
            (task_id,),
        ).fetchone()
        return self._with_state(row[0], row[1:]) if row else None

    @classmethod
    def _write_task(cls, conn: sqlite3.Connection, task: Doc) -> None:
        """Write a whole task: its document, and its state row."""
        conn.execute("UPDATE tasks SET status = ?, doc = ? WHERE id = ?", (task["status"], dumps(task), task["id"]))
        cls._write_state(conn, task)

    @classmethod
    def _write_state(cls, conn: sqlite3.Connection, task: Doc) -> None:
        conn.execute(
            f"INSERT OR REPLACE INTO task_state ({STATE_COLUMNS}, task_id) VALUES ({STATE_PLACEHOLDERS}, ?)",
            cls._state_row(task),
        )

    @staticmethod
    def _read_counters(conn: sqlite3.Connection, task_id: str) -> Doc | None:
        """The task's status and `task_state` row (a small read: the document stays on disk)."""
        found = conn.execute(
            f"SELECT t.status, {STATE_SELECT} FROM tasks t JOIN task_state s ON s.task_id = t.id WHERE t.id = ?",
            (task_id,),
        ).fetchone()
        if found is None:
            return None
        view = dict(zip(STATE_FIELDS, found[1:], strict=True))
        return {**view, "id": task_id, "status": found[0], "updated_at": datetime.fromisoformat(view["updated_at"])}

    @classmethod
    def _write_counters(cls, conn: sqlite3.Connection, view: Doc) -> None:
        """Write a counter view back into its task's state row."""
        conn.execute(
            f"UPDATE task_state SET ({STATE_COLUMNS}) = ({STATE_PLACEHOLDERS}) WHERE task_id = ?",
            cls._state_row(view),
        )

    @staticmethod
    def _write_subtask(conn: sqlite3.Connection, sub: Doc) -> None:
        conn.execute(
            "UPDATE subtasks SET status = ?, updated_at = ?, doc = ? WHERE id = ?",
            (sub["status"], iso_text(sub["updated_at"]), dumps(sub), sub["id"]),
        )

    def _modify_subtask(self, subtask_id: str, change: Callable[[Doc], bool]) -> tuple[Doc | None, bool]:
        """Read-modify-write one subtask in a write transaction; `change` edits it and says whether to save."""
        with self._file.tx() as conn:
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
            with self._file.tx() as conn:
                conn.execute(
                    "INSERT INTO tasks (id, status, created_at, doc) VALUES (?, ?, ?, ?)",
                    (task["id"], task["status"], iso_text(task["created_at"]), dumps(task)),
                )
                self._write_state(conn, task)
        except sqlite3.IntegrityError:
            raise DuplicateTaskError(task["id"]) from None

    def get_task(self, task_id: str) -> Doc | None:
        return self._read_task(self._file.conn(), task_id)

    def count_tasks(self) -> dict[str, int]:
        counts: dict[str, int] = dict.fromkeys(STATUSES, 0)
        for status, n in self._file.conn().execute("SELECT status, COUNT(*) FROM tasks GROUP BY status"):
            counts[status] = n
        return counts

    def list_tasks(
        self, limit: int = 20, status: str | Iterable[str] | None = None, owner: str | None = None
    ) -> list[Doc]:
        wanted = _statuses(status)
        sql = (
            f"SELECT t.created_at, t.id, t.doc, {STATE_SELECT} FROM tasks t LEFT JOIN task_state s ON s.task_id = t.id"
        )
        order = " ORDER BY t.created_at DESC, t.id DESC LIMIT ?"
        conn = self._file.conn()
        owned = [] if owner is None else [(f"{OWNER_SQL} = ?", owner)]  # the owner indexes' own expression

        def page(filters: list[tuple[str, str]]) -> list[tuple[Any, ...]]:
            where = " WHERE " + " AND ".join(test for test, _ in filters) if filters else ""
            return conn.execute(sql + where + order, (*(value for _, value in filters), int(limit))).fetchall()

        if wanted is None:
            rows = page(owned)
        else:
            rows = _merged(
                [page([*owned, ("t.status = ?", s)]) for s in wanted], int(limit), _task_order, newest_first=True
            )
        return [self._with_state(r[2], r[3:]) for r in rows]

    def mark_task_running(self, task_id: str) -> bool:
        with self._file.tx() as conn:
            task = self._read_task(conn, task_id)
            if task is None or task["status"] != Status.PENDING:
                return False
            now = utcnow()
            task.update(status=Status.PROCESSING, updated_at=now)
            if task.get("started_at") is None:
                task["started_at"] = now
            self._write_task(conn, task)
            return True

    def is_cancel_requested(self, task_id: str) -> bool:
        # Every subtask message asks this: one small row, never the task document.
        row = (
            self._file.conn()
            .execute("SELECT cancel_requested FROM task_state WHERE task_id = ?", (task_id,))
            .fetchone()
        )
        return bool(row and row[0])

    def fail_task(self, task_id: str, error: str) -> bool:
        with self._file.tx() as conn:
            task = self._read_task(conn, task_id)
            if task is None or task["status"] in TERMINAL:
                return False
            now = utcnow()
            task.update(status=Status.FAILED, error=error, updated_at=now, completed_at=now)
            self._write_task(conn, task)
            return True

    # --- subtasks ------------------------------------------------------------------------------------

    def insert_subtasks(self, task_id: str, docs: Iterable[Mapping[str, Any]], *, chunk: int = 2000) -> int:
        now = utcnow()
        rows: list[tuple[str, str, str, str, str]] = []
        inserted = 0

        def flush() -> int:
            with self._file.tx() as conn:
                before = conn.total_changes
                conn.executemany(
                    "INSERT OR IGNORE INTO subtasks (id, task_id, status, updated_at, doc) VALUES (?, ?, ?, ?, ?)",
                    rows,
                )
                return conn.total_changes - before

        for doc in docs:
            sub = new_subtask_doc(task_id, doc, now)
            rows.append((sub["id"], task_id, sub["status"], iso_text(now), dumps(sub)))
            if len(rows) >= chunk:
                inserted += flush()
                rows = []
        if rows:
            inserted += flush()
        return inserted

    def get_subtask(self, subtask_id: str) -> Doc | None:
        return self._read(self._file.conn(), "subtasks", subtask_id)

    def get_subtask_for_work(self, subtask_id: str) -> tuple[Doc | None, bool]:
        row = (
            self._file.conn()
            .execute(
                "SELECT s.doc, st.cancel_requested FROM subtasks s LEFT JOIN task_state st ON st.task_id = s.task_id"
                " WHERE s.id = ?",
                (subtask_id,),
            )
            .fetchone()
        )
        return (loads(row[0]), bool(row[1])) if row else (None, False)

    def list_subtasks(
        self,
        task_id: str,
        status: str | Iterable[str] | None = None,
        limit: int | None = None,
        *,
        after: str | None = None,
    ) -> list[Doc]:
        wanted = _statuses(status)
        sql = "SELECT doc FROM subtasks WHERE task_id = ?"
        args: list[Any] = [task_id]
        if after is not None:
            sql += " AND id > ?"
            args.append(after)
        tail = " ORDER BY id" + (" LIMIT ?" if limit is not None else "")
        bound = [int(limit)] if limit is not None else []
        conn = self._file.conn()
        if wanted is None:
            return [loads(r[0]) for r in conn.execute(sql + tail, [*args, *bound])]
        sql += " AND status = ?"
        pages = [[loads(r[0]) for r in conn.execute(sql + tail, [*args, s, *bound])] for s in wanted]
        return _merged(pages, limit, _subtask_order, newest_first=False)

    def count_subtasks(self, task_id: str) -> dict[str, int]:
        counts: dict[str, int] = dict.fromkeys(STATUSES, 0)
        rows = self._file.conn().execute(
            "SELECT status, COUNT(*) FROM subtasks WHERE task_id = ? GROUP BY status", (task_id,)
        )
        for status, n in rows:
            counts[status] = n
        return counts

    # start_subtask, record_job and record_poll run on every subtask: each is one UPDATE, in C, with
    # no Python between taking SQLite's write lock and letting it go.

    def start_subtask(self, subtask_id: str) -> Doc | None:
        now = iso_text(utcnow())
        rows = self._file.write(
            "UPDATE subtasks SET status = :processing, updated_at = :now, doc = json_set(doc,"
            " '$.status', :processing, '$.attempts', coalesce(json_extract(doc, '$.attempts'), 0) + 1,"
            " '$.updated_at', :now, '$.started_at', coalesce(json_extract(doc, '$.started_at'), :now))"
            f" WHERE id = :id AND status NOT IN ({TERMINAL_SQL}) RETURNING doc",
            {"processing": Status.PROCESSING, "now": now, "id": subtask_id},
        )
        return loads(rows[0][0]) if rows else None

    def record_job(self, subtask_id: str, job_uuid: str, seed: int | None) -> bool:
        now = iso_text(utcnow())
        rows = self._file.write(
            "UPDATE subtasks SET updated_at = :now,"
            " doc = json_set(doc, '$.job_uuid', :job_uuid, '$.seed', :seed, '$.updated_at', :now)"
            " WHERE id = :id AND json_extract(doc, '$.job_uuid') IS NULL RETURNING 1",
            {"now": now, "job_uuid": job_uuid, "seed": seed, "id": subtask_id},
        )
        return bool(rows)

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
        now = iso_text(utcnow())
        rows = self._file.write(
            "UPDATE subtasks SET updated_at = :now, doc = json_set(doc,"
            " '$.poll_count', coalesce(json_extract(doc, '$.poll_count'), 0) + 1, '$.updated_at', :now)"
            " WHERE id = :id RETURNING json_extract(doc, '$.poll_count')",
            {"now": now, "id": subtask_id},
        )
        if not rows:
            raise UnknownSubtaskError(subtask_id)
        return int(rows[0][0])

    # --- the finish path -----------------------------------------------------------------------------

    @staticmethod
    def _finalise_in_tx(task: Doc, now: datetime) -> Status | None:
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
        status: Status,
        result: str | None,
        error: str | None,
        views: dict[str, Doc],
    ) -> FinishOutcome | None:
        """The finish path inside a write transaction. Each task's counters are read once into
        `views` and counted there; the caller writes them back (`_write_views`) before it commits.
        The task document itself is read and written only by the call that finalises the task."""
        sub = self._read(conn, "subtasks", subtask_id)
        if sub is None:
            return None
        if sub["status"] in TERMINAL:
            return FinishOutcome(subtask_id, sub["task_id"], Status(sub["status"]), changed=False)
        now = utcnow()
        sub.update(status=status, updated_at=now, completed_at=now)
        if result is not None:
            sub["result"] = result
        if error is not None:
            sub["error"] = error
        self._write_subtask(conn, sub)
        view = views.get(sub["task_id"]) or self._read_counters(conn, sub["task_id"])
        if view is None:
            return FinishOutcome(subtask_id, sub["task_id"], status, changed=True)
        for counter in ("processed_images", COUNTER_OF[status]):
            view[counter] = int(view.get(counter) or 0) + 1
        view["progress"] = max(
            float(view.get("progress") or 0.0),
            progress_of(view["processed_images"], int(view.get("total_images") or 0)),
        )
        view["updated_at"] = now
        views[view["id"]] = view
        if view["status"] in TERMINAL or not is_done(view):
            return FinishOutcome(subtask_id, sub["task_id"], status, changed=True)
        self._write_counters(conn, view)
        task = self._read_task(conn, view["id"])
        final = self._finalise_in_tx(task, now) if task is not None else None
        if task is None or final is None:
            return FinishOutcome(subtask_id, sub["task_id"], status, changed=True)
        self._write_task(conn, task)
        view["status"] = final
        return FinishOutcome(
            subtask_id, sub["task_id"], status, changed=True, finalised=True, task_status=final, task=task
        )

    @classmethod
    def _write_views(cls, conn: sqlite3.Connection, views: Mapping[str, Doc]) -> None:
        for view in views.values():
            cls._write_counters(conn, view)

    def finish_subtask(
        self, subtask_id: str, status: Status, *, result: str | None = None, error: str | None = None
    ) -> FinishOutcome | None:
        views: dict[str, Doc] = {}
        with self._file.tx() as conn:
            outcome = self._finish_in_tx(conn, subtask_id, check_terminal(status), result, error, views)
            self._write_views(conn, views)
        return outcome

    def finalise_task(self, task_id: str) -> Status | None:
        with self._file.tx() as conn:
            task = self._read_task(conn, task_id)
            if task is None:
                return None
            final = self._finalise_in_tx(task, utcnow())
            if final is not None:
                self._write_task(conn, task)
            return final

    def cancel_task(self, task_id: str, *, chunk: int = 500) -> CancelOutcome:
        with self._file.tx() as conn:
            task = self._read_task(conn, task_id)
            if task is None:
                return CancelOutcome(task_id, found=False)
            if not task.get("cancel_requested"):
                now = utcnow()
                task.update(cancel_requested=True, cancel_requested_at=now, updated_at=now)
                self._write_task(conn, task)
        cancelled, finalised, final_status, final_task = 0, False, None, None
        while True:
            views: dict[str, Doc] = {}
            with self._file.tx() as conn:
                ids = [
                    r[0]
                    for r in conn.execute(
                        "SELECT id FROM subtasks WHERE task_id = ? AND status = ? ORDER BY id LIMIT ?",
                        (task_id, Status.PENDING, chunk),
                    )
                ]
                for subtask_id in ids:
                    outcome = self._finish_in_tx(conn, subtask_id, Status.CANCELLED, None, None, views)
                    if outcome and outcome.changed:
                        cancelled += 1
                    if outcome and outcome.finalised:
                        finalised, final_status, final_task = True, outcome.task_status, outcome.task
                self._write_views(conn, views)
                if not ids:
                    # Nothing expanded yet: the task has no subtask, so cancelling it ends it now.
                    has_any = conn.execute("SELECT 1 FROM subtasks WHERE task_id = ? LIMIT 1", (task_id,)).fetchone()
                    task = self._read_task(conn, task_id)
                    if not has_any and task is not None and task["status"] not in TERMINAL:
                        now = utcnow()
                        task.update(status=Status.CANCELLED, completed_at=now, updated_at=now)
                        self._write_task(conn, task)
                        finalised, final_status, final_task = True, Status.CANCELLED, task
                    break
        return CancelOutcome(task_id, True, cancelled, finalised, final_status, final_task)

    def retry_subtasks(self, task_id: str, statuses: Iterable[str] = (Status.FAILED,)) -> RetryOutcome:
        wanted = check_retryable(statuses)
        # One transaction: the subtasks and the task move together, so nothing is half done.
        with self._file.tx() as conn:
            task = self._read_task(conn, task_id)
            if task is None:
                return RetryOutcome(task_id, found=False)
            was = Status(task["status"])
            if was not in TERMINAL:
                return RetryOutcome(task_id, found=True, status=was)
            counts = self._count_in_tx(conn, task_id)
            if counts[Status.PROCESSING]:
                return RetryOutcome(task_id, found=True, status=was, processing=counts[Status.PROCESSING])
            new_round = round_of(task) + 1
            now = utcnow()
            reset = 0
            for status in wanted:
                before = conn.total_changes
                conn.execute(
                    "UPDATE subtasks SET status = :pending, updated_at = :now, doc = json_set(doc,"
                    " '$.error_history', json_insert(coalesce(json_extract(doc, '$.error_history'), json('[]')),"
                    f" '$[#]', {HISTORY_ENTRY_SQL}),"
                    " '$.status', :pending, '$.round', :round, '$.error', NULL, '$.result', NULL, '$.job_uuid', NULL,"
                    " '$.poll_count', 0, '$.attempts', 0, '$.started_at', NULL, '$.completed_at', NULL,"
                    " '$.updated_at', :now) WHERE task_id = :task AND status = :status",
                    {
                        "pending": Status.PENDING,
                        "now": iso_text(now),
                        "round": new_round,
                        "task": task_id,
                        "status": status,
                    },
                )
                moved = conn.total_changes - before
                for name, delta in moved_deltas(status, moved).items():
                    task[name] = int(task.get(name) or 0) + delta
                reset += moved
            if not reset and not counts[Status.PENDING]:
                return RetryOutcome(task_id, found=True, status=was)
            task.update(reopened_fields(task, new_round, now))
            self._write_task(conn, task)
            return RetryOutcome(task_id, True, was, reset, reopened=True, round=new_round, task=task)

    @staticmethod
    def _count_in_tx(conn: sqlite3.Connection, task_id: str) -> dict[str, int]:
        counts: dict[str, int] = dict.fromkeys(STATUSES, 0)
        for status, n in conn.execute(
            "SELECT status, COUNT(*) FROM subtasks WHERE task_id = ? GROUP BY status", (task_id,)
        ):
            counts[status] = n
        return counts

    def repair_counts(self, older_than: datetime) -> list[RepairOutcome]:
        cutoff = iso_text(older_than)
        candidates = self._file.conn().execute(
            "SELECT t.id FROM tasks t JOIN task_state s ON s.task_id = t.id WHERE t.status = ? AND s.updated_at < ?",
            (Status.PROCESSING, cutoff),
        )
        repaired: list[RepairOutcome] = []
        for (task_id,) in candidates.fetchall():
            busy = self._file.conn().execute(
                "SELECT 1 FROM subtasks WHERE task_id = ? AND status IN (?, ?) LIMIT 1",
                (task_id, Status.PENDING, Status.PROCESSING),
            )
            if busy.fetchone() is not None:  # work left (a task waiting in line): no write lock taken
                continue
            with self._file.tx() as conn:
                outcome = self._repair_in_tx(conn, task_id, cutoff)
            if outcome is not None:
                repaired.append(outcome)
        return repaired

    def _repair_in_tx(self, conn: sqlite3.Connection, task_id: str, cutoff: str) -> RepairOutcome | None:
        """`repair_counts` of one task, its conditions read again inside the write transaction."""
        view = self._read_counters(conn, task_id)
        if view is None or view["status"] != Status.PROCESSING or iso_text(view["updated_at"]) >= cutoff:
            return None
        counts = self._count_in_tx(conn, task_id)
        if counts[Status.PENDING] or counts[Status.PROCESSING] or not is_short(view, counts):
            return None
        moved_lately = conn.execute(
            "SELECT 1 FROM subtasks WHERE task_id = ? AND updated_at >= ? LIMIT 1", (task_id, cutoff)
        ).fetchone()
        if moved_lately:
            return None
        before = {name: int(view.get(name) or 0) for name in COUNTERS}
        after = counters_of(counts)
        now = utcnow()
        view.update(after, progress=progress_of(after["processed_images"], int(view["total_images"])), updated_at=now)
        self._write_counters(conn, view)
        task = self._read_task(conn, task_id)
        final = self._finalise_in_tx(task, now) if task is not None else None
        if task is not None and final is not None:
            self._write_task(conn, task)
        return RepairOutcome(task_id, before, after, final is not None, final, task if final is not None else None)

    def prepare(self) -> None:
        """Nothing to do: opening the file made its schema and indexes (store/sqlite_file.py)."""

    def find_stale_subtasks(self, older_than: datetime, limit: int = 100) -> list[Doc]:
        rows = self._file.conn().execute(
            "SELECT doc FROM subtasks WHERE status = ? AND updated_at < ? ORDER BY updated_at, id LIMIT ?",
            (Status.PROCESSING, iso_text(older_than), int(limit)),
        )
        return [loads(r[0]) for r in rows]

    # --- a seam for tests ----------------------------------------------------------------------------

    def connection(self) -> sqlite3.Connection:
        """This thread's connection (autocommit): what a test uses to look at the file (pragmas,
        query plans, a trace of the statements the store runs) or to leave it as an earlier version
        of the store or a crash would. A write through it bypasses every rule of the store."""
        return self._file.conn()

    def set_task_fields(self, task_id: str, **fields: Any) -> Doc:
        """Overwrite fields of a stored task as given, in one write transaction; the task after.

        A test's way to put a task in a state no operation of the store makes (a finaliser that
        died after counting, an end an hour ago): no rule of the store is applied."""
        with self._file.tx() as conn:
            task = self._read_task(conn, task_id)
            if task is None:
                raise LookupError(f"no task {task_id!r}")
            task.update(fields)
            self._write_task(conn, task)
            return task

    def close(self) -> None:
        self._file.close()
