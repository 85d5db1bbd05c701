"""`PostgresStore`: PostgreSQL through psycopg 3, for daemons on several machines sharing a store.

Exactly-once by single statements. A finish is one `UPDATE ... RETURNING` with two data-modifying
steps: the subtask leaves its active status (a conditional update: one caller wins, PostgreSQL
re-checks the condition on the row it waited for) and, in the same statement, its task's counters
are incremented; so the counters are never short of the subtasks and never ahead of them. The
finish whose increment completes the counters then finalises the task in a transaction that
locks its row (`_finalise`: from a non-terminal status only, so once); a process that dies between
the two leaves a complete task, which the sweep's `finalise_task` ends. A cancel moves a chunk of
pending subtasks and counts them in one statement (`CANCEL_CHUNK` at a time: about ten statements
for 50,000 subtasks); a retry is one transaction (the task's row locked, one set-based UPDATE per
status, the counters less exactly what moved, the task reopened). `repair_counts` is implemented
as in the other stores; it finds nothing here unless someone edits the tables by hand.

Schema: store/postgres_schema.py (columns for what is queried or changed, `jsonb` for the rest;
numbered migrations applied by `prepare` under an advisory lock). Opening the store builds
nothing and connects to nothing: the first operation in a process connects.

Connections (store/postgres_connection.py): one pool per process, made at the first operation in
that process, every wait bounded by the timeout. Errors: every psycopg error leaves as a
`StoreError`; those that say the server could not be reached or answer in time as
`StoreUnavailable` (`is_outage`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from nietest_daemon.core.logs import get_logger
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
    new_subtask_doc,
    new_task_doc,
    reopened_fields,
    round_of,
    utcnow,
)
from nietest_daemon.store.postgres_connection import POOL_MAX_SIZE, Connections, is_outage
from nietest_daemon.store.postgres_schema import (
    ACTIVE_SQL,
    CANCEL_CHUNK_SQL,
    FINISH_SQL,
    RETRY_MOVE_SQL,
    SCHEMA_VERSION,
    SUBTASK_COLUMNS,
    SUBTASK_SELECT,
    TASK_SELECT,
    apply_migrations,
    dumps,
    seed_value,
    subtask_doc,
    task_doc,
    task_values,
    text_value,
)

__all__ = ["PostgresStore"]

log = get_logger(__name__)

#: Pending subtasks a cancel moves and counts per statement.
CANCEL_CHUNK = 5000
#: Subtasks `insert_subtasks` sends per statement.
INSERT_CHUNK = 2000


def _distinct(statuses: list[str] | None) -> list[str] | None:
    return None if statuses is None else [str(s) for s in dict.fromkeys(statuses)]


class PostgresStore(Store):
    """The PostgreSQL store: single-statement exactly-once moves, one connection pool per process."""

    DRIVER_ERRORS = (psycopg.Error,)  # the pool's errors (PoolTimeout, ...) are psycopg errors too

    def __init__(self, url: str, *, timeout_seconds: float | None = None, max_connections: int = POOL_MAX_SIZE) -> None:
        self._pool = Connections(url, timeout_seconds=timeout_seconds, max_connections=max_connections)
        self.address = self._pool.address
        self.timeout_seconds = self._pool.timeout_seconds

    @classmethod
    def from_url(cls, url: str, *, timeout_seconds: float | None = None) -> PostgresStore:
        """The store at a `postgresql://` (or `postgres://`) URL; no I/O (a malformed URL: a
        StoreError). `timeout_seconds` bounds each statement, connecting and waiting for a
        connection (default `postgres_connection.DEFAULT_TIMEOUT_SECONDS`)."""
        return cls(url, timeout_seconds=timeout_seconds)

    def _is_unavailable(self, exc: Exception) -> bool:
        """`postgres_connection.is_outage`: the server could not be reached or did not answer in
        time, or refused for now (shutting down, out of connections, a deadlock); not a refused
        login, a missing database or role, a refused privilege or an SQL error."""
        return is_outage(exc)

    def _connection(self) -> AbstractContextManager[psycopg.Connection[Any]]:
        return self._pool.connection()

    def _execute(
        self, conn: psycopg.Connection[Any], sql: str, params: Mapping[str, Any] | tuple[Any, ...] | None = None
    ) -> psycopg.Cursor[dict[str, Any]]:
        """Every statement of the store goes through here (tests/test_postgres_plans.py records them)."""
        return conn.cursor(row_factory=dict_row).execute(sql, params)

    def _one(self, sql: str, params: Mapping[str, Any] | tuple[Any, ...]) -> dict[str, Any] | None:
        with self._connection() as conn:
            return self._execute(conn, sql, params).fetchone()

    def _all(self, sql: str, params: Mapping[str, Any] | tuple[Any, ...]) -> list[dict[str, Any]]:
        with self._connection() as conn:
            return self._execute(conn, sql, params).fetchall()

    # --- tasks ---------------------------------------------------------------------------------------

    def create_task(self, doc: Mapping[str, Any]) -> None:
        task = new_task_doc(doc, utcnow())
        values = task_values(task)
        names = list(values)
        sql = (
            f"INSERT INTO tasks ({', '.join(names)}) VALUES ({', '.join(f'%({n})s' for n in names)})"
            " ON CONFLICT (id) DO NOTHING"
        )
        with self._connection() as conn:
            if self._execute(conn, sql, values).rowcount == 0:
                raise DuplicateTaskError(task["id"])

    def get_task(self, task_id: str) -> Doc | None:
        row = self._one(f"SELECT {TASK_SELECT} FROM tasks WHERE id = %s", (task_id,))
        return task_doc(row) if row else None

    def count_tasks(self) -> dict[str, int]:
        counts: dict[str, int] = dict.fromkeys(STATUSES, 0)
        for row in self._all("SELECT status, count(*) AS n FROM tasks GROUP BY status", ()):
            counts[row["status"]] = int(row["n"])
        return counts

    def list_tasks(
        self, limit: int = 20, status: str | Iterable[str] | None = None, owner: str | None = None
    ) -> list[Doc]:
        wanted = _distinct(_statuses(status))
        if wanted == []:
            return []
        params: dict[str, Any] = {"limit": int(limit), "owner": owner}
        owned = ["owner = %(owner)s"] if owner is not None else []
        order = " ORDER BY created_at DESC, id DESC LIMIT %(limit)s"

        def query(tests: list[str]) -> str:
            return f"SELECT {TASK_SELECT} FROM tasks" + (" WHERE " + " AND ".join(tests) if tests else "") + order

        if wanted is None:
            sql = query(owned)
        else:
            # One index scan per status (each in order), merged: one `status = ANY` would sort.
            params.update((f"s{i}", s) for i, s in enumerate(wanted))
            parts = [f"({query([*owned, f'status = %(s{i})s'])})" for i in range(len(wanted))]
            sql = parts[0][1:-1] if len(parts) == 1 else f"SELECT * FROM ({' UNION ALL '.join(parts)}) u" + order
        return [task_doc(row) for row in self._all(sql, params)]

    def mark_task_running(self, task_id: str) -> bool:
        now = utcnow()
        row = self._one(
            "UPDATE tasks SET status = %(processing)s, updated_at = %(now)s, started_at = coalesce(started_at, %(now)s)"
            " WHERE id = %(id)s AND status = %(pending)s RETURNING 1 AS changed",
            {"processing": Status.PROCESSING, "pending": Status.PENDING, "now": now, "id": task_id},
        )
        return row is not None

    def is_cancel_requested(self, task_id: str) -> bool:
        row = self._one("SELECT cancel_requested FROM tasks WHERE id = %s", (task_id,))
        return bool(row and row["cancel_requested"])

    def fail_task(self, task_id: str, error: str) -> bool:
        now = utcnow()
        row = self._one(
            "UPDATE tasks SET status = %(failed)s, error = %(error)s, updated_at = %(now)s, completed_at = %(now)s"
            f" WHERE id = %(id)s AND status IN ({ACTIVE_SQL}) RETURNING 1 AS changed",
            {"failed": Status.FAILED, "error": text_value(error), "now": now, "id": task_id},
        )
        return row is not None

    # --- subtasks ------------------------------------------------------------------------------------

    def insert_subtasks(self, task_id: str, docs: Iterable[Mapping[str, Any]], *, chunk: int = INSERT_CHUNK) -> int:
        now = utcnow()
        # One JSON array per chunk, unpacked by the server: a jsonb[] parameter costs psycopg far
        # more (each element quoted in Python) than the insert itself.
        sql = (
            "INSERT INTO subtasks (id, task_id, status, seed, created_at, updated_at, doc)"
            " SELECT u.id, %(task)s, %(pending)s, u.seed, %(now)s, %(now)s, u.doc"
            " FROM jsonb_to_recordset(%(rows)s) AS u(id text, seed bigint, doc jsonb)"
            " ON CONFLICT (id) DO NOTHING"
        )
        inserted = 0
        rows: list[Doc] = []

        def flush(conn: psycopg.Connection[Any]) -> int:
            params = {"task": task_id, "pending": Status.PENDING, "now": now, "rows": Jsonb(rows, dumps=dumps)}
            return self._execute(conn, sql, params).rowcount

        with self._connection() as conn:
            for doc in docs:
                sub = new_subtask_doc(task_id, doc, now)
                rest = {k: v for k, v in sub.items() if k not in SUBTASK_COLUMNS}
                rows.append({"id": sub["id"], "seed": seed_value(sub.get("seed")), "doc": rest})
                if len(rows) >= chunk:
                    inserted += flush(conn)
                    rows = []
            if rows:
                inserted += flush(conn)
        return inserted

    def get_subtask(self, subtask_id: str) -> Doc | None:
        row = self._one(f"SELECT {SUBTASK_SELECT} FROM subtasks WHERE id = %s", (subtask_id,))
        return subtask_doc(row) if row else None

    def get_subtask_for_work(self, subtask_id: str) -> tuple[Doc | None, bool]:
        columns = ", ".join(f"s.{name}" for name in (*SUBTASK_COLUMNS, "doc"))
        row = self._one(
            f"SELECT {columns}, (SELECT t.cancel_requested FROM tasks t WHERE t.id = s.task_id)"
            " AS task_cancel_requested FROM subtasks s WHERE s.id = %s",
            (subtask_id,),
        )
        return (subtask_doc(row), bool(row["task_cancel_requested"])) if row else (None, False)

    def list_subtasks(
        self,
        task_id: str,
        status: str | Iterable[str] | None = None,
        limit: int | None = None,
        *,
        after: str | None = None,
    ) -> list[Doc]:
        wanted = _distinct(_statuses(status))
        if wanted == []:
            return []
        params: dict[str, Any] = {"task": task_id, "after": after, "limit": None if limit is None else int(limit)}
        tests = ["task_id = %(task)s", *(["id > %(after)s"] if after is not None else [])]
        tail = " ORDER BY id" + (" LIMIT %(limit)s" if limit is not None else "")

        def query(more: list[str]) -> str:
            return f"SELECT {SUBTASK_SELECT} FROM subtasks WHERE " + " AND ".join([*tests, *more]) + tail

        if wanted is None:
            sql = query([])
        else:
            params.update((f"s{i}", s) for i, s in enumerate(wanted))
            parts = [f"({query([f'status = %(s{i})s'])})" for i in range(len(wanted))]
            sql = parts[0][1:-1] if len(parts) == 1 else f"SELECT * FROM ({' UNION ALL '.join(parts)}) u" + tail
        return [subtask_doc(row) for row in self._all(sql, params)]

    def count_subtasks(self, task_id: str) -> dict[str, int]:
        with self._connection() as conn:
            return self._count(conn, task_id)[0]

    def _count(self, conn: psycopg.Connection[Any], task_id: str) -> tuple[dict[str, int], datetime | None]:
        """The task's subtasks per status, and when the last of them changed (None: it has none)."""
        counts: dict[str, int] = dict.fromkeys(STATUSES, 0)
        latest: datetime | None = None
        rows = self._execute(
            conn,
            "SELECT status, count(*) AS n, max(updated_at) AS latest FROM subtasks WHERE task_id = %s GROUP BY status",
            (task_id,),
        )
        for row in rows:
            counts[row["status"]] = int(row["n"])
            latest = row["latest"] if latest is None else max(latest, row["latest"])
        return counts, latest

    def start_subtask(self, subtask_id: str) -> Doc | None:
        row = self._one(
            "UPDATE subtasks SET status = %(processing)s, attempts = attempts + 1, updated_at = %(now)s,"
            f" started_at = coalesce(started_at, %(now)s) WHERE id = %(id)s AND status IN ({ACTIVE_SQL})"
            f" RETURNING {SUBTASK_SELECT}",
            {"processing": Status.PROCESSING, "now": utcnow(), "id": subtask_id},
        )
        return subtask_doc(row) if row else None

    def record_job(self, subtask_id: str, job_uuid: str, seed: int | None) -> bool:
        row = self._one(
            "UPDATE subtasks SET job_uuid = %(job)s, seed = %(seed)s, updated_at = %(now)s"
            " WHERE id = %(id)s AND job_uuid IS NULL RETURNING 1 AS changed",
            {"job": text_value(job_uuid), "seed": seed_value(seed), "now": utcnow(), "id": subtask_id},
        )
        return row is not None

    def clear_job(self, subtask_id: str, job_uuid: str | None = None) -> bool:
        same = "" if job_uuid is None else " AND job_uuid = %(job)s"
        row = self._one(
            "UPDATE subtasks SET job_uuid = NULL, poll_count = 0, updated_at = %(now)s"
            f" WHERE id = %(id)s AND status IN ({ACTIVE_SQL}) AND job_uuid IS NOT NULL{same} RETURNING 1 AS changed",
            {"job": job_uuid, "now": utcnow(), "id": subtask_id},
        )
        return row is not None

    def record_poll(self, subtask_id: str) -> int:
        row = self._one(
            "UPDATE subtasks SET poll_count = poll_count + 1, updated_at = %(now)s WHERE id = %(id)s"
            " RETURNING poll_count",
            {"now": utcnow(), "id": subtask_id},
        )
        if row is None:
            raise UnknownSubtaskError(subtask_id)
        return int(row["poll_count"])

    # --- the finish path -----------------------------------------------------------------------------

    def finish_subtask(
        self, subtask_id: str, status: Status, *, result: str | None = None, error: str | None = None
    ) -> FinishOutcome | None:
        status = check_terminal(status)
        params = {
            "status": status,
            "now": utcnow(),
            "result": text_value(result),
            "error": text_value(error),
            "id": subtask_id,
            "completed": int(status == Status.COMPLETED),
            "failed": int(status == Status.FAILED),
            "cancelled": int(status == Status.CANCELLED),
        }
        with self._connection() as conn:
            row = self._execute(conn, FINISH_SQL, params).fetchone()
            if row is None:  # not moved: unknown, or terminal already (read again: it may have just moved)
                current = self._execute(conn, "SELECT task_id, status FROM subtasks WHERE id = %s", (subtask_id,))
                found = current.fetchone()
                if found is None:
                    return None
                return FinishOutcome(subtask_id, found["task_id"], Status(found["status"]), changed=False)
            task_id = row["task_id"]
            if row["id"] is None or row["status"] in TERMINAL or not is_done(row):
                return FinishOutcome(subtask_id, task_id, status, changed=True)
            final, task = self._finalise(conn, task_id)
        return FinishOutcome(
            subtask_id, task_id, status, changed=True, finalised=final is not None, task_status=final, task=task
        )

    def _finalise(self, conn: psycopg.Connection[Any], task_id: str) -> tuple[Status | None, Doc | None]:
        """Finalise a complete task from a non-terminal status, its row locked: at most once."""
        with conn.transaction():
            row = self._execute(
                conn, f"SELECT {TASK_SELECT} FROM tasks WHERE id = %s FOR UPDATE", (task_id,)
            ).fetchone()
            if row is None:
                return None, None
            task = task_doc(row)
            if task["status"] in TERMINAL or not is_done(task):
                return None, None
            status, error = final_task_status(task)
            now = utcnow()
            updated = self._execute(
                conn,
                "UPDATE tasks SET status = %(status)s, error = %(error)s, completed_at = %(now)s, updated_at = %(now)s,"
                f" progress = greatest(progress, %(progress)s) WHERE id = %(id)s RETURNING {TASK_SELECT}",
                {
                    "status": status,
                    "error": text_value(error),
                    "now": now,
                    "progress": progress_of(int(task["processed_images"]), int(task["total_images"])),
                    "id": task_id,
                },
            ).fetchone()
        return (status, task_doc(updated)) if updated else (None, None)

    def finalise_task(self, task_id: str) -> Status | None:
        with self._connection() as conn:
            return self._finalise(conn, task_id)[0]

    def cancel_task(self, task_id: str, *, chunk: int = CANCEL_CHUNK) -> CancelOutcome:
        now = utcnow()
        with self._connection() as conn:
            found = self._execute(
                conn,
                "UPDATE tasks SET cancel_requested = true,"
                " cancel_requested_at = coalesce(cancel_requested_at, %(now)s),"
                " updated_at = CASE WHEN cancel_requested THEN updated_at ELSE %(now)s END"
                " WHERE id = %(id)s RETURNING 1 AS found",
                {"now": now, "id": task_id},
            ).fetchone()
            if found is None:
                return CancelOutcome(task_id, found=False)
            cancelled, expanded = 0, False
            final: Status | None = None
            final_task: Doc | None = None
            while True:
                params = {
                    "task": task_id,
                    "pending": Status.PENDING,
                    "cancelled": Status.CANCELLED,
                    "chunk": chunk,
                    "now": utcnow(),
                }
                row = self._execute(conn, CANCEL_CHUNK_SQL, params).fetchone()
                assert row is not None  # the statement always returns its one row
                cancelled += row["moved"]
                expanded = expanded or row["picked"] > 0
                if row["status"] is not None and row["status"] not in TERMINAL and is_done(row):
                    status, doc = self._finalise(conn, task_id)
                    if status is not None:
                        final, final_task = status, doc
                if row["picked"] < chunk:
                    break
            if not expanded and final is None:
                final, final_task = self._cancel_unexpanded(conn, task_id)
        return CancelOutcome(task_id, True, cancelled, final is not None, final, final_task)

    def _cancel_unexpanded(self, conn: psycopg.Connection[Any], task_id: str) -> tuple[Status | None, Doc | None]:
        """A task with no subtask at all (its master has not expanded it yet) ends cancelled now."""
        # ORDER BY id: along (task_id, id), whatever the planner thinks of the task's size.
        if self._execute(
            conn, "SELECT 1 AS one FROM subtasks WHERE task_id = %s ORDER BY id LIMIT 1", (task_id,)
        ).fetchone():
            return None, None
        now = utcnow()
        row = self._execute(
            conn,
            "UPDATE tasks SET status = %(cancelled)s, completed_at = %(now)s, updated_at = %(now)s"
            f" WHERE id = %(id)s AND status IN ({ACTIVE_SQL}) RETURNING {TASK_SELECT}",
            {"cancelled": Status.CANCELLED, "now": now, "id": task_id},
        ).fetchone()
        return (Status.CANCELLED, task_doc(row)) if row else (None, None)

    def retry_subtasks(self, task_id: str, statuses: Iterable[str] = (Status.FAILED,)) -> RetryOutcome:
        wanted = check_retryable(statuses)
        with self._connection() as conn, conn.transaction():
            # One transaction, the task's row locked: no finish counts meanwhile, nothing is half done.
            row = self._execute(
                conn, f"SELECT {TASK_SELECT} FROM tasks WHERE id = %s FOR UPDATE", (task_id,)
            ).fetchone()
            if row is None:
                return RetryOutcome(task_id, found=False)
            task = task_doc(row)
            was = Status(task["status"])
            if was not in TERMINAL:
                return RetryOutcome(task_id, found=True, status=was)
            counts, _ = self._count(conn, task_id)
            if counts[Status.PROCESSING]:
                return RetryOutcome(task_id, found=True, status=was, processing=counts[Status.PROCESSING])
            new_round = round_of(task) + 1
            now = utcnow()
            moved: dict[str, int] = {name: 0 for name in COUNTERS}
            for status in wanted:
                params = {"pending": Status.PENDING, "round": new_round, "now": now, "task": task_id, "status": status}
                n = self._execute(conn, RETRY_MOVE_SQL, params).rowcount
                moved["processed_images"] += n
                moved[COUNTER_OF[status]] += n
            reset = moved["processed_images"]
            if not reset and not counts[Status.PENDING]:
                return RetryOutcome(task_id, found=True, status=was)
            for name, n in moved.items():
                task[name] = int(task[name]) - n
            fields = reopened_fields(task, new_round, now)
            updated = self._execute(
                conn,
                "UPDATE tasks SET processed_images = processed_images - %(processed_images)s,"
                " completed_images = completed_images - %(completed_images)s,"
                " failed_images = failed_images - %(failed_images)s,"
                " cancelled_images = cancelled_images - %(cancelled_images)s,"
                " status = %(status)s, round = %(round)s, progress = %(progress)s, completed_at = NULL, error = NULL,"
                " cancel_requested = false, cancel_requested_at = NULL, updated_at = %(updated_at)s"
                f" WHERE id = %(id)s RETURNING {TASK_SELECT}",
                {**moved, **fields, "id": task_id},
            ).fetchone()
            assert updated is not None  # its row is locked by this transaction
            return RetryOutcome(task_id, True, was, reset, reopened=True, round=new_round, task=task_doc(updated))

    def repair_counts(self, older_than: datetime) -> list[RepairOutcome]:
        cutoff = as_utc(older_than)
        repaired: list[RepairOutcome] = []
        with self._connection() as conn:
            candidates = self._execute(
                conn,
                "SELECT id FROM tasks WHERE status = %s AND updated_at < %s",
                (Status.PROCESSING, cutoff),
            ).fetchall()
            for candidate in candidates:
                counts, _ = self._count(conn, candidate["id"])  # no lock taken for a task with work left
                if counts[Status.PENDING] or counts[Status.PROCESSING]:
                    continue
                outcome = self._repair(conn, candidate["id"], cutoff)
                if outcome is not None:
                    repaired.append(outcome)
        return repaired

    def _repair(self, conn: psycopg.Connection[Any], task_id: str, cutoff: datetime) -> RepairOutcome | None:
        """`repair_counts` of one task, its conditions read again with its row locked."""
        with conn.transaction():
            row = self._execute(
                conn, f"SELECT {TASK_SELECT} FROM tasks WHERE id = %s FOR UPDATE", (task_id,)
            ).fetchone()
            if row is None or row["status"] != Status.PROCESSING or row["updated_at"] >= cutoff:
                return None
            counts, latest = self._count(conn, task_id)
            if counts[Status.PENDING] or counts[Status.PROCESSING] or not is_short(row, counts):
                return None
            if latest is not None and latest >= cutoff:
                return None  # a subtask moved within the grace
            before = {name: int(row[name]) for name in COUNTERS}
            after = counters_of(counts)
            self._execute(
                conn,
                "UPDATE tasks SET processed_images = %(processed_images)s, completed_images = %(completed_images)s,"
                " failed_images = %(failed_images)s, cancelled_images = %(cancelled_images)s,"
                " progress = %(progress)s, updated_at = %(now)s WHERE id = %(id)s",
                {
                    **after,
                    "progress": progress_of(after["processed_images"], int(row["total_images"])),
                    "now": utcnow(),
                    "id": task_id,
                },
            )
            final, task = self._finalise(conn, task_id)  # a savepoint inside this transaction
        return RepairOutcome(task_id, before, after, final is not None, final, task)

    def find_stale_subtasks(self, older_than: datetime, limit: int = 100) -> list[Doc]:
        rows = self._all(
            f"SELECT {SUBTASK_SELECT} FROM subtasks WHERE status = '{Status.PROCESSING}' AND updated_at < %s"
            " ORDER BY updated_at, id LIMIT %s",  # the status a literal: the partial index's own
            (as_utc(older_than), int(limit)),
        )
        return [subtask_doc(row) for row in rows]

    def prepare(self) -> None:
        """Apply the missing migrations under the schema lock (store/postgres_schema.py); a schema
        newer than this code's raises `SchemaTooNew`, a StoreError naming both versions."""
        with self._connection() as conn:
            applied = apply_migrations(conn, self.address)
        if applied:
            log.info("PostgreSQL store: schema migrated", store=self.address, applied=applied, version=SCHEMA_VERSION)

    # --- seams for tests -----------------------------------------------------------------------------

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A connection of the pool (autocommit): what a test uses to look at the tables or to leave
        them as a crash would. A write through it bypasses every rule of the store."""
        with self._connection() as conn:
            yield conn

    def set_task_fields(self, task_id: str, **fields: Any) -> Doc:
        """Overwrite fields of a stored task as given (no rule of the store applied); the task after."""
        with self._connection() as conn, conn.transaction():
            row = self._execute(
                conn, f"SELECT {TASK_SELECT} FROM tasks WHERE id = %s FOR UPDATE", (task_id,)
            ).fetchone()
            if row is None:
                raise LookupError(f"no task {task_id!r}")
            task = {**task_doc(row), **fields}
            values = task_values(task)
            assignments = ", ".join(f"{name} = %({name})s" for name in values if name != "id")
            self._execute(conn, f"UPDATE tasks SET {assignments} WHERE id = %(id)s", values)
            return task

    def close(self) -> None:
        self._pool.close()
