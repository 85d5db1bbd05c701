"""The SQLite store's file: its schema (tables, indexes, and what a file of an earlier version
needs), the JSON form of the documents in it, and the connections to it (`SQLiteFile`).

The schema and its indexes are made when the file is opened (`CREATE ... IF NOT EXISTS`: nothing
to do once made; the file belongs to the daemon's user, so no privilege can be missing, and an
index a new version adds is built once, by the first process to open the file, under the write
lock). Each query of `SQLiteStore` is served by one of these indexes, its ORDER BY included
(tests/test_store_indexes.py).

Connections: one per thread, in autocommit mode (`BEGIN IMMEDIATE` is explicit), a new set after
a fork (a connection never crosses processes), a busy timeout instead of failing on a held lock,
and the writers of a process taking turns on a mutex before SQLite's lock (`writing`).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import Any

from nietest_daemon.core.store_urls import SQLITE_FILENAME as SQLITE_FILENAME  # one definition, in core
from nietest_daemon.domain.lifecycle import COUNTERS, TERMINAL
from nietest_daemon.store.base import HISTORY_FIELDS, TIME_FIELDS, Doc, StoreError, as_utc, iso_text

#: A task's changing fields, kept in `task_state` (the values there win over the document's).
STATE_FIELDS = ("total_images", *COUNTERS, "progress", "cancel_requested", "updated_at")
STATE_COLUMNS = ", ".join(STATE_FIELDS)
STATE_SELECT = ", ".join(f"s.{name}" for name in STATE_FIELDS)  # from task_state joined as `s`
STATE_PLACEHOLDERS = ", ".join("?" * len(STATE_FIELDS))
TERMINAL_SQL = ", ".join(f"'{status}'" for status in sorted(TERMINAL))
#: A task's owner, as the owner indexes hold it: a query uses this very expression, or no index serves it.
OWNER_SQL = "json_extract(doc, '$.owner')"


def _history_entry_sql() -> str:
    """`base.history_entry` as an SQL expression over a subtask row: a json_object of the fields
    `base.HISTORY_FIELDS` names, each read from the row's document. `round` is read as `round_of`
    reads it (a positive integer, else 1); times are ISO text in the document already."""

    def value(key: str) -> str:
        path = f"json_extract(doc, '$.{key}')"
        if key == "round":
            return f"CASE WHEN json_type(doc, '$.round') = 'integer' AND {path} > 0 THEN {path} ELSE 1 END"
        return path

    pairs = ", ".join(f"'{key}', {value(key)}" for key in HISTORY_FIELDS)
    return f"json_object({pairs})"


#: An `error_history` entry as SQL, from the one definition of its fields (`base.HISTORY_FIELDS`).
HISTORY_ENTRY_SQL = _history_entry_sql()

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS tasks (id TEXT PRIMARY KEY, status TEXT NOT NULL, created_at TEXT NOT NULL,"
    " doc TEXT NOT NULL)",
    # A query of several statuses runs once per status and the pages are merged (`sqlite._merged`).
    "CREATE INDEX IF NOT EXISTS tasks_status_created_id ON tasks (status, created_at, id)",
    "CREATE INDEX IF NOT EXISTS tasks_created_id ON tasks (created_at, id)",
    # `nietest tasks --owner`: a task's owner is in its document only (a task stored before owners
    # existed has none: NULL, never equal to an owner asked for).
    f"CREATE INDEX IF NOT EXISTS tasks_owner_created_id ON tasks ({OWNER_SQL}, created_at, id)",
    f"CREATE INDEX IF NOT EXISTS tasks_owner_status_created_id ON tasks ({OWNER_SQL}, status, created_at, id)",
    "DROP INDEX IF EXISTS tasks_status_created",  # what earlier versions built instead
    "DROP INDEX IF EXISTS tasks_created",
    "CREATE TABLE IF NOT EXISTS subtasks (id TEXT PRIMARY KEY, task_id TEXT NOT NULL, status TEXT NOT NULL,"
    " updated_at TEXT NOT NULL, doc TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS subtasks_task_status_id ON subtasks (task_id, status, id)",
    # A task's subtasks in id order, a page at a time (`iter_subtasks`: report, export), with no sort.
    "CREATE INDEX IF NOT EXISTS subtasks_task_id ON subtasks (task_id, id)",
    "CREATE INDEX IF NOT EXISTS subtasks_status_updated_id ON subtasks (status, updated_at, id)",
    "DROP INDEX IF EXISTS subtasks_task_status",
    "DROP INDEX IF EXISTS subtasks_status_updated",
    "CREATE TABLE IF NOT EXISTS task_state (task_id TEXT PRIMARY KEY, total_images INTEGER NOT NULL,"
    " processed_images INTEGER NOT NULL, completed_images INTEGER NOT NULL, failed_images INTEGER NOT NULL,"
    " cancelled_images INTEGER NOT NULL, progress REAL NOT NULL, cancel_requested INTEGER NOT NULL,"
    " updated_at TEXT NOT NULL)",
    # A data file written before task_state existed: its tasks' state comes out of their documents.
    f"INSERT OR IGNORE INTO task_state ({STATE_COLUMNS}, task_id) SELECT"
    " coalesce(json_extract(doc, '$.total_images'), 0), coalesce(json_extract(doc, '$.processed_images'), 0),"
    " coalesce(json_extract(doc, '$.completed_images'), 0), coalesce(json_extract(doc, '$.failed_images'), 0),"
    " coalesce(json_extract(doc, '$.cancelled_images'), 0), coalesce(json_extract(doc, '$.progress'), 0.0),"
    " coalesce(json_extract(doc, '$.cancel_requested'), 0), coalesce(json_extract(doc, '$.updated_at'), created_at),"
    " id FROM tasks WHERE id NOT IN (SELECT task_id FROM task_state)",
)


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return iso_text(value)
    raise TypeError(f"cannot store a {type(value).__name__} in the task store")


def dumps(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, default=_json_default, ensure_ascii=False, separators=(",", ":"))


def loads(text: str) -> Doc:
    doc: Doc = json.loads(text)
    for name in TIME_FIELDS:
        value = doc.get(name)
        if isinstance(value, str):
            doc[name] = as_utc(datetime.fromisoformat(value))
    return doc


class SQLiteFile:
    """The file at `path`, its schema made, and this process's connections to it."""

    def __init__(self, path: Path, busy_timeout: float) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._write_mutex = threading.Lock()
        self._conns: list[sqlite3.Connection] = []
        self._pid = os.getpid()
        self._closed = False
        path.parent.mkdir(parents=True, exist_ok=True)
        self._make_schema()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    def conn(self) -> sqlite3.Connection:
        """This thread's connection (a new one after a fork: a connection never crosses processes)."""
        if self._closed:
            raise StoreError("the store is closed")
        pid = os.getpid()
        if pid != self._pid:  # forked: abandon (never close) the parent's connections and mutex
            with self._lock:
                if pid != self._pid:
                    self._pid, self._conns, self._local = pid, [], threading.local()
                    self._write_mutex = threading.Lock()
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    @contextmanager
    def writing(self) -> Iterator[sqlite3.Connection]:
        """Held around every write; yields this thread's connection. The threads of a process take
        turns on a mutex before SQLite's lock, rather than meet in SQLite's busy handler, which
        sleeps up to 100 ms between tries while the lock is held for well under one."""
        conn = self.conn()
        with self._write_mutex:
            yield conn

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: `BEGIN IMMEDIATE` takes the write lock before anything is read."""
        with self.writing() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def write(self, sql: str, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """One statement as its own transaction (autocommit); the rows it returns (`RETURNING`)."""
        with self.writing() as conn:
            return conn.execute(sql, params).fetchall()

    def _make_schema(self) -> None:
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                conn = self.conn()
                if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    conn.execute("PRAGMA journal_mode = WAL")
                with self.tx() as conn:
                    for statement in SCHEMA:
                        conn.execute(statement)
                return
            except sqlite3.OperationalError as exc:  # another process switching the journal mode
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        with self._lock:
            conns, self._conns = (self._conns, []) if self._pid == os.getpid() else ([], [])
            self._closed = True
        for conn in conns:
            with suppress(sqlite3.Error):
                conn.close()
