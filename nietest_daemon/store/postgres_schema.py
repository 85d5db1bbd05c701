"""The PostgreSQL store's schema: its tables, indexes and numbered migrations, applied by
`PostgresStore.prepare` (the daemon's start) under an advisory lock, and the SQL the store
shares with them (an `error_history` entry, a task's progress).

Shape. The fields a query filters, sorts or changes are columns (ids, status, owner, times,
counters, the cancel flag, the round; a subtask's job, seed, poll count, attempts, result, error
and its `error_history` as `jsonb`); everything a task or a subtask was created with and never
changes (prompts, variables, `variables_map`, a subtask's `variable_indices`, ...) is one `jsonb`
`doc` per row; a task's `extra` (the task file's fields nietest does not use) is `json`, which
keeps them as they were given, key order included. Why not all in `doc`: a finish updates the
counters of the one hot task row; as columns that is an update of fixed-width values, and the
task's prompts and variables (tens of KB, TOASTed) are not copied by it. Why not all columns: the
submitted fields are read whole and never queried, and new ones need no migration.

Migrations. `MIGRATIONS` is append-only: never edit one that has shipped, add the next number.
`apply_migrations` takes a session advisory lock (`SCHEMA_LOCK_KEY`, per database), makes the
`nietest_schema` table (version, applied_at, description), then applies each missing migration
in its own transaction, recording its version in it. Two daemons starting together: the second
waits on the lock, then finds nothing left to do. A database whose version is newer than this
code's refuses to start (`SchemaTooNew`): an older nietest must not write to a schema it does not
know.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Json, Jsonb

from nietest_daemon.domain.lifecycle import ACTIVE, COUNTERS, Status
from nietest_daemon.store.base import HISTORY_FIELDS, TIME_FIELDS, Doc, StoreError, as_utc, round_of

#: The key of the advisory lock `apply_migrations` holds (per database): "nietest" plus 1.
SCHEMA_LOCK_KEY = 0x6E6965746573_7401
#: How long `prepare` may wait for the lock and for one migration (an index on millions of rows).
MIGRATION_TIMEOUT_SECONDS = 3600

#: A task's columns (the rest of its document is `doc`, its `extra` the `extra` column).
TASK_COLUMNS: tuple[str, ...] = (
    "id", "status", "owner", "created_at", "updated_at", "started_at", "completed_at",
    "total_images", "processed_images", "completed_images", "failed_images", "cancelled_images",
    "progress", "cancel_requested", "cancel_requested_at", "round", "error",
)  # fmt: skip
#: A subtask's columns (the rest of its document is `doc`).
SUBTASK_COLUMNS: tuple[str, ...] = (
    "id", "task_id", "status", "job_uuid", "seed", "poll_count", "attempts", "result", "error",
    "created_at", "updated_at", "started_at", "completed_at", "round", "error_history",
)  # fmt: skip
TASK_SELECT = ", ".join([*TASK_COLUMNS, "extra", "doc"])
SUBTASK_SELECT = ", ".join([*SUBTASK_COLUMNS, "doc"])
ACTIVE_SQL = ", ".join(f"'{status}'" for status in ACTIVE)


@dataclass(frozen=True)
class Migration:
    """One step of the schema: its number (1, 2, ... in order), what it does, its statements."""

    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "tasks and subtasks, with the indexes of every query",
        (
            "CREATE TABLE tasks ("
            " id text PRIMARY KEY,"
            " status text NOT NULL,"
            " owner text,"
            " created_at timestamptz NOT NULL,"
            " updated_at timestamptz NOT NULL,"
            " started_at timestamptz,"
            " completed_at timestamptz,"
            " total_images integer NOT NULL DEFAULT 0,"
            " processed_images integer NOT NULL DEFAULT 0,"
            " completed_images integer NOT NULL DEFAULT 0,"
            " failed_images integer NOT NULL DEFAULT 0,"
            " cancelled_images integer NOT NULL DEFAULT 0,"
            " progress double precision NOT NULL DEFAULT 0,"
            " cancel_requested boolean NOT NULL DEFAULT false,"
            " cancel_requested_at timestamptz,"
            " round integer NOT NULL DEFAULT 1,"
            " error text,"
            " extra json NOT NULL DEFAULT '{}',"
            " doc jsonb NOT NULL)",
            # list_tasks, newest first (read backwards), alone / of some statuses (one scan per
            # status, merged) / of an owner / of an owner and some statuses.
            "CREATE INDEX tasks_created_id ON tasks (created_at, id)",
            "CREATE INDEX tasks_status_created_id ON tasks (status, created_at, id)",
            "CREATE INDEX tasks_owner_created_id ON tasks (owner, created_at, id)",
            "CREATE INDEX tasks_owner_status_created_id ON tasks (owner, status, created_at, id)",
            # No index holds `updated_at`: a finish's update of its task's counters then changes no
            # indexed column, and PostgreSQL updates the hot row in place (HOT), no index touched.
            # repair_counts' processing tasks are found along tasks_status_created_id.
            "CREATE TABLE subtasks ("
            " id text PRIMARY KEY,"
            " task_id text NOT NULL,"
            " status text NOT NULL,"
            " job_uuid text,"
            " seed bigint,"
            " poll_count integer NOT NULL DEFAULT 0,"
            " attempts integer NOT NULL DEFAULT 0,"
            " result text,"
            " error text,"
            " created_at timestamptz NOT NULL,"
            " updated_at timestamptz NOT NULL,"
            " started_at timestamptz,"
            " completed_at timestamptz,"
            " round integer NOT NULL DEFAULT 1,"
            " error_history jsonb NOT NULL DEFAULT '[]',"
            " doc jsonb NOT NULL)",
            # A task's subtasks of one status in id order (several statuses: one scan each,
            # merged); their counts; cancel's pending chunks; retry's moves.
            "CREATE INDEX subtasks_task_status_id ON subtasks (task_id, status, id)",
            # A task's subtasks in id order, every status (report, export: iter_subtasks).
            "CREATE INDEX subtasks_task_id ON subtasks (task_id, id)",
            # find_stale_subtasks: processing subtasks oldest first. Partial: only the few subtasks
            # running now are in it, and the moves of all the others never write to it. (The query
            # names the status as a literal, so that the planner can prove it uses this index.)
            "CREATE INDEX subtasks_processing_updated_id ON subtasks (updated_at, id)"
            f" WHERE status = '{Status.PROCESSING}'",
        ),
    ),
)
#: The schema version this code writes and reads.
SCHEMA_VERSION = MIGRATIONS[-1].version

SCHEMA_TABLE = (
    "CREATE TABLE IF NOT EXISTS nietest_schema (version integer PRIMARY KEY,"
    " applied_at timestamptz NOT NULL DEFAULT now(), description text NOT NULL)"
)


def _iso_sql(column: str) -> str:
    """A timestamptz column as `base.iso_text` writes a time (`2024-05-01T12:00:00.000+00:00`)."""
    return f"""to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"+00:00"')"""


def _history_entry_sql() -> str:
    """`base.history_entry` as SQL over a subtask row (its values before the UPDATE that uses it):
    a jsonb object of the fields `base.HISTORY_FIELDS` names; `round` as `round_of` reads it (a
    positive integer, else 1), times as ISO text."""

    def value(key: str) -> str:
        if key == "round":
            return "CASE WHEN round > 0 THEN round ELSE 1 END"
        if key.endswith("_at"):
            return _iso_sql(key)
        return key

    pairs = ", ".join(f"'{key}', {value(key)}" for key in HISTORY_FIELDS)
    return f"jsonb_build_object({pairs})"


#: An `error_history` entry as SQL, from the one definition of its fields (`base.HISTORY_FIELDS`).
HISTORY_ENTRY_SQL = _history_entry_sql()


def progress_sql(processed: str, total: str) -> str:
    """`lifecycle.progress_of` as SQL (double precision): processed / total * 100, 2 places."""
    return f"(CASE WHEN ({total}) > 0 THEN round(({processed}) * 100.0 / ({total}), 2) ELSE 0 END)::double precision"


# --- the statements of the hot paths ------------------------------------------------------------

#: Move one subtask out of its active status and count it on its task, in one statement. The
#: increments are the finish's status as 0/1 per counter; progress as `progress_of` computes it.
FINISH_SQL = (
    "WITH moved AS ("
    " UPDATE subtasks SET status = %(status)s, updated_at = %(now)s, completed_at = %(now)s,"
    " result = coalesce(%(result)s, result), error = coalesce(%(error)s, error)"
    f" WHERE id = %(id)s AND status IN ({ACTIVE_SQL}) RETURNING task_id"
    "), counted AS ("
    " UPDATE tasks t SET processed_images = processed_images + 1,"
    " completed_images = completed_images + %(completed)s, failed_images = failed_images + %(failed)s,"
    " cancelled_images = cancelled_images + %(cancelled)s,"
    f" progress = greatest(progress, {progress_sql('processed_images + 1', 'total_images')}),"
    " updated_at = %(now)s FROM moved WHERE t.id = moved.task_id"
    " RETURNING t.id, t.status, t.total_images, t.processed_images, t.completed_images, t.failed_images,"
    " t.cancelled_images"
    ") SELECT m.task_id, c.* FROM moved m LEFT JOIN counted c ON true"
)

#: A chunk of a task's pending subtasks cancelled and counted in one statement: picked in id
#: order along (task_id, status, id), moved only if still pending, counted by what moved.
CANCEL_CHUNK_SQL = (
    "WITH picked AS ("
    " SELECT id FROM subtasks WHERE task_id = %(task)s AND status = %(pending)s ORDER BY id LIMIT %(chunk)s"
    "), moved AS ("
    " UPDATE subtasks SET status = %(cancelled)s, updated_at = %(now)s, completed_at = %(now)s"
    " WHERE id = ANY(ARRAY(SELECT id FROM picked)) AND status = %(pending)s RETURNING 1"
    "), n AS (SELECT count(*)::integer AS moved FROM moved"
    "), counted AS ("
    " UPDATE tasks t SET processed_images = processed_images + n.moved,"
    " cancelled_images = cancelled_images + n.moved,"
    f" progress = greatest(progress, {progress_sql('processed_images + n.moved', 'total_images')}),"
    " updated_at = %(now)s FROM n WHERE t.id = %(task)s AND n.moved > 0"
    " RETURNING t.status, t.total_images, t.processed_images, t.completed_images, t.failed_images,"
    " t.cancelled_images"
    ") SELECT (SELECT count(*) FROM picked)::integer AS picked, n.moved, c.* FROM n LEFT JOIN counted c ON true"
)

#: A retry's move of a task's subtasks of one terminal status back to pending, each with its last
#: attempt appended to its `error_history` (SET reads the row's values before the update).
RETRY_MOVE_SQL = (
    "UPDATE subtasks SET status = %(pending)s, round = %(round)s, error = NULL, result = NULL,"
    " job_uuid = NULL, poll_count = 0, attempts = 0, started_at = NULL, completed_at = NULL,"
    f" updated_at = %(now)s, error_history = error_history || jsonb_build_array({HISTORY_ENTRY_SQL})"
    " WHERE task_id = %(task)s AND status = %(status)s"
)


# --- rows and documents ------------------------------------------------------------------------


def dumps(value: Any) -> str:
    return json.dumps(value, default=_json_default, ensure_ascii=False, separators=(",", ":"))


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return as_utc(value).isoformat(timespec="milliseconds")
    raise TypeError(f"cannot store a {type(value).__name__} in the task store")


def text_value(value: Any) -> str | None:
    """A text column's value: PostgreSQL text cannot hold NUL (an API's error message might)."""
    return None if value is None else str(value).replace("\x00", "\ufffd")


def seed_value(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _times_utc(doc: Doc) -> Doc:
    for name in TIME_FIELDS:
        value = doc.get(name)
        if isinstance(value, datetime):
            doc[name] = as_utc(value)
    return doc


def task_doc(row: Mapping[str, Any]) -> Doc:
    """A task document from its row: the `doc` fields, then the columns over them."""
    doc: Doc = dict(row["doc"])
    doc.update((name, row[name]) for name in TASK_COLUMNS)
    doc["extra"] = row["extra"]
    return _times_utc(doc)


def subtask_doc(row: Mapping[str, Any]) -> Doc:
    doc: Doc = dict(row["doc"])
    doc.update((name, row[name]) for name in SUBTASK_COLUMNS)
    return _times_utc(doc)


def task_values(task: Mapping[str, Any]) -> Doc:
    """A task document as its row's values (`TASK_COLUMNS`, `extra`, `doc`)."""
    values: Doc = {name: task.get(name) for name in TASK_COLUMNS}
    values.update(
        owner=text_value(task.get("owner")),
        error=text_value(task.get("error")),
        cancel_requested=bool(task.get("cancel_requested")),
        round=round_of(task),
        extra=Json(task.get("extra") or {}, dumps=dumps),
        doc=Jsonb({k: v for k, v in task.items() if k not in TASK_COLUMNS and k != "extra"}, dumps=dumps),
    )
    for name in ("total_images", *COUNTERS):
        values[name] = int(task.get(name) or 0)
    values["progress"] = float(task.get("progress") or 0.0)
    return values


class SchemaTooNew(StoreError):
    """The database's schema is newer than this code knows: an older nietest must not write to it."""


def schema_version(conn: psycopg.Connection[Any]) -> int:
    """The database's schema version (0: no `nietest_schema` table yet)."""
    row = conn.execute("SELECT to_regclass('nietest_schema') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return 0
    found = conn.execute("SELECT max(version) FROM nietest_schema").fetchone()
    return int(found[0]) if found and found[0] is not None else 0


def apply_migrations(
    conn: psycopg.Connection[Any], address: str, migrations: tuple[Migration, ...] = MIGRATIONS
) -> list[int]:
    """Bring the database to the last of `migrations` (on `conn`, in autocommit mode), under the
    schema lock; the versions this call applied, in order. Raises `SchemaTooNew`. Needs CREATE on
    the schema only while a migration is missing: an up-to-date database is only read."""
    conn.execute(f"SET statement_timeout = {MIGRATION_TIMEOUT_SECONDS * 1000}")
    conn.execute("SELECT pg_advisory_lock(%s)", (SCHEMA_LOCK_KEY,))
    try:
        current = schema_version(conn)
        known = migrations[-1].version
        if current > known:
            raise SchemaTooNew(
                f"the task store ({address}) has schema version {current}, newer than this nietest"
                f" knows (version {known}): upgrade nietest"
            )
        if current == 0:
            with conn.transaction():
                conn.execute(SCHEMA_TABLE)
        applied = {int(row[0]) for row in conn.execute("SELECT version FROM nietest_schema")}
        done: list[int] = []
        for migration in migrations:
            if migration.version in applied:
                continue
            with conn.transaction():
                for statement in migration.statements:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO nietest_schema (version, description) VALUES (%s, %s)",
                    (migration.version, migration.description),
                )
            done.append(migration.version)
        return done
    finally:
        with suppress(psycopg.Error):  # a broken connection: the session's end released the lock
            conn.execute("SELECT pg_advisory_unlock(%s)", (SCHEMA_LOCK_KEY,))
            conn.execute("RESET statement_timeout")
