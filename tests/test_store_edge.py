"""Errors at the store's edge: nothing but a `StoreError` leaves a store for a driver's error, and
`StoreUnavailable` (the store cannot be reached now) is an outage everywhere above it.

- Every method of the `Store` interface (the list is read from the interface, so a new method
  fails here until it is added), on a MongoDB server whose every call fails as an unreachable
  server's or a failover's do (`testing.mongo_faults`), raises `StoreUnavailable`, naming the store
  with its password masked and chaining pymongo's error; a refused privilege is a `StoreError` and
  no outage. SQLite: the same for a file locked past the busy timeout, and a damaged file.
- The pipeline retries a message that failed on `StoreUnavailable`, whatever MAX_RETRIES says, and
  does not fail its subtask (the real middleware stack, driven as tests/test_middleware.py does).
- PostgreSQL, for real: every method on a server that is down (a port nothing listens on) raises
  `StoreUnavailable`, on a database that does not exist a `StoreError` and no outage.
- The command line prints one line naming the store, and exits 1 (real `nietest` processes).
"""

from __future__ import annotations

import socket
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dramatiq
import dramatiq.broker
import mongomock
import psycopg
import pytest
import structlog
from pymongo.errors import (
    AutoReconnect,
    ExecutionTimeout,
    NetworkTimeout,
    OperationFailure,
    ServerSelectionTimeoutError,
)
from test_middleware import Stack, events, message, process

from nietest_daemon.core import settings as settings_module
from nietest_daemon.core.outage import Outage
from nietest_daemon.domain.lifecycle import Status
from nietest_daemon.domain.subtask import Lane
from nietest_daemon.internals.dramatiq_redis import delay_queue_name
from nietest_daemon.pipeline import context as context_module
from nietest_daemon.pipeline.broker import build_broker
from nietest_daemon.pipeline.context import build_context
from nietest_daemon.pipeline.messages import RUN_SUBTASK
from nietest_daemon.store import SQLiteStore, Store, StoreError, StoreUnavailable, open_store, utcnow
from nietest_daemon.store.mongo import MongoStore
from nietest_daemon.store.postgres import PostgresStore
from nietest_daemon.testing import postgres as machine_postgres
from nietest_daemon.testing.daemon import NIETEST, clean_env
from nietest_daemon.testing.mongo_faults import FaultyClient
from nietest_daemon.testing.valkey import PrivateValkey

URI = "mongodb://nietest:s3cret-pass@db.example:27017/task_db"
SHOWN = "mongodb://nietest:***@db.example:27017/task_db"

#: One call of every method of the interface, on a store holding `stored` below.
CALLS: dict[str, Callable[[Store], Any]] = {
    "create_task": lambda s: s.create_task({"id": "new", "name": "new", "total_images": 1}),
    "get_task": lambda s: s.get_task("t"),
    "list_tasks": lambda s: s.list_tasks(),
    "count_tasks": lambda s: s.count_tasks(),
    "insert_subtasks": lambda s: s.insert_subtasks("t", [{"id": "t:9"}]),
    "get_subtask": lambda s: s.get_subtask("t:0"),
    "get_subtask_for_work": lambda s: s.get_subtask_for_work("t:0"),
    "list_subtasks": lambda s: s.list_subtasks("t"),
    "iter_subtasks": lambda s: list(s.iter_subtasks("t")),
    "count_subtasks": lambda s: s.count_subtasks("t"),
    "recount": lambda s: s.recount("t"),
    "mark_task_running": lambda s: s.mark_task_running("t"),
    "fail_task": lambda s: s.fail_task("t", "boom"),
    "start_subtask": lambda s: s.start_subtask("t:0"),
    "record_job": lambda s: s.record_job("t:0", "job", 7),
    "clear_job": lambda s: s.clear_job("t:0"),
    "record_poll": lambda s: s.record_poll("t:0"),
    "finish_subtask": lambda s: s.finish_subtask("t:0", Status.COMPLETED, result="https://img/0.png"),
    "finalise_task": lambda s: s.finalise_task("t"),
    "cancel_task": lambda s: s.cancel_task("t"),
    "request_cancel": lambda s: s.request_cancel("t"),
    "is_cancel_requested": lambda s: s.is_cancel_requested("t"),
    "retry_subtasks": lambda s: s.retry_subtasks("done", [Status.FAILED]),
    "find_stale_subtasks": lambda s: s.find_stale_subtasks(utcnow()),
    "repair_counts": lambda s: s.repair_counts(utcnow()),
    "prepare": lambda s: s.prepare(),
}


def interface() -> set[str]:
    """Every public method of `Store` but `close` (which only lets go of connections)."""
    return {name for name in dir(Store) if not name.startswith("_") and callable(getattr(Store, name))} - {"close"}


def stored(store: Store) -> None:
    """A running task `t` of three subtasks, and a finished task `done` with a failed one."""
    store.create_task({"id": "t", "name": "t", "total_images": 3})
    store.insert_subtasks("t", [{"id": f"t:{i}"} for i in range(3)])
    store.mark_task_running("t")
    store.create_task({"id": "done", "name": "done", "total_images": 1})
    store.insert_subtasks("done", [{"id": "done:0"}])
    store.mark_task_running("done")
    store.finish_subtask("done:0", Status.FAILED, error="boom")


def test_the_table_calls_every_method_of_the_interface() -> None:
    assert set(CALLS) == interface()


# --- MongoDB -----------------------------------------------------------------------------------------------


@pytest.fixture
def mongo(monkeypatch: pytest.MonkeyPatch) -> Iterator[MongoStore]:
    """A Mongo store opened from a URI with a password, on a mongomock server behind `FaultyClient`."""
    server = mongomock.MongoClient()
    monkeypatch.setattr("pymongo.MongoClient", lambda *args, **kwargs: FaultyClient(server))
    store = open_store(data_dir="/nonexistent", mongo_uri=URI)
    assert isinstance(store, MongoStore)
    store.prepare()
    stored(store)
    yield store
    store.close()


OUTAGES = [
    ServerSelectionTimeoutError(
        "db.example:27017: [Errno 111] Connection refused, Timeout: 30s, Topology Description: <...>"
    ),
    AutoReconnect("connection closed"),
    NetworkTimeout("db.example:27017: timed out"),
    ExecutionTimeout("operation exceeded time limit", code=50),
]


@pytest.mark.parametrize("outage", OUTAGES, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("method", sorted(CALLS))
def test_every_method_of_the_mongo_store_raises_store_unavailable_when_the_server_is_away(
    mongo: MongoStore, method: str, outage: Exception
) -> None:
    mongo.db.fail(lambda call: True, outage, times=None)  # type: ignore[attr-defined]
    with pytest.raises(StoreUnavailable) as raised:
        CALLS[method](mongo)
    error = raised.value
    assert isinstance(error, StoreError) and isinstance(error, Outage) and error.service == "store"
    assert error.__cause__ is outage  # the driver's error, chained
    assert str(error).startswith(f"the task store (mongodb {SHOWN}) is unavailable: {type(outage).__name__}: ")
    assert "s3cret" not in str(error) and "Topology Description" not in str(error) and "\n" not in str(error)


@pytest.mark.parametrize("method", sorted(CALLS))
def test_a_refused_privilege_is_a_store_error_and_no_outage(mongo: MongoStore, method: str) -> None:
    refused = OperationFailure("not authorized on task_db to execute command", code=13)
    mongo.db.fail(lambda call: True, refused, times=None)  # type: ignore[attr-defined]
    with pytest.raises(StoreError) as raised:
        CALLS[method](mongo)
    assert not isinstance(raised.value, StoreUnavailable) and raised.value.__cause__ is refused
    assert str(raised.value).startswith(f"the task store (mongodb {SHOWN}) failed: OperationFailure: not authorized")


def test_what_the_store_raises_of_its_own_passes_as_it_is(mongo: MongoStore) -> None:
    with pytest.raises(ValueError, match="terminal"):
        mongo.finish_subtask("t:0", Status.PENDING)
    with pytest.raises(StoreError, match="already exists") as raised:
        mongo.create_task({"id": "t", "name": "again"})
    assert type(raised.value).__name__ == "DuplicateTaskError"


# --- SQLite ------------------------------------------------------------------------------------------------


def locked_error(tmp_path: Path) -> sqlite3.OperationalError:
    """The error SQLite raises for a file another process holds locked past the busy timeout."""
    holder = sqlite3.connect(tmp_path / "locked.sqlite3", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        sqlite3.connect(tmp_path / "locked.sqlite3", timeout=0, isolation_level=None).execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        assert exc.sqlite_errorcode == sqlite3.SQLITE_BUSY
        return exc
    finally:
        holder.close()
    raise AssertionError("the second writer was not refused")


@pytest.mark.parametrize("method", sorted(set(CALLS) - {"prepare"}))  # SQLite's prepare has nothing to do
def test_every_method_of_the_sqlite_store_raises_store_unavailable_on_a_locked_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    store = SQLiteStore(tmp_path / "data")
    stored(store)
    busy = locked_error(tmp_path)

    def locked() -> sqlite3.Connection:
        raise busy

    monkeypatch.setattr(store._file, "conn", locked)
    with pytest.raises(StoreUnavailable) as raised:
        CALLS[method](store)
    assert raised.value.__cause__ is busy
    path = tmp_path / "data" / "nietest.sqlite3"
    assert str(raised.value) == f"the task store (sqlite {path}) is unavailable: OperationalError: database is locked"


def test_a_sqlite_file_locked_by_another_process_past_the_busy_timeout_is_unavailable(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path, busy_timeout=0.2)
    holder = sqlite3.connect(store.path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process, in the middle of a long write
    try:
        with pytest.raises(StoreUnavailable, match="database is locked"):
            store.create_task({"id": "t", "name": "t", "total_images": 1})
        assert store.get_task("t") is None  # reads go on (WAL)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    store.create_task({"id": "t", "name": "t", "total_images": 1})  # and the retry succeeds
    store.close()


def test_a_damaged_sqlite_file_is_a_store_error_and_no_outage(tmp_path: Path) -> None:
    (tmp_path / "nietest.sqlite3").write_bytes(b"not a database, " * 100)
    with pytest.raises(StoreError, match="file is not a database") as raised:
        SQLiteStore(tmp_path)  # the constructor, which makes the schema, is at the edge too
    assert not isinstance(raised.value, StoreUnavailable)
    assert isinstance(raised.value.__cause__, sqlite3.DatabaseError)


# --- PostgreSQL ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(CALLS))
def test_every_method_of_the_postgres_store_raises_store_unavailable_when_the_server_is_down(method: str) -> None:
    """A real connection to a port nothing listens on: refused at once, named in one line."""
    port = closed_port()
    store = PostgresStore.from_url(f"postgresql://nietest:s3cret-pass@127.0.0.1:{port}/task_db")
    with pytest.raises(StoreUnavailable) as raised:
        CALLS[method](store)
    text = str(raised.value)
    assert text.startswith(
        f"the task store (postgresql postgresql://nietest:***@127.0.0.1:{port}/task_db) is unavailable:"
        " OperationalError: connection failed: "
    )
    assert "Connection refused" in text and "s3cret" not in text and "\n" not in text
    assert isinstance(raised.value.__cause__, psycopg.OperationalError)
    store.close()


@pytest.mark.skipif(
    machine_postgres.unavailable_reason() is not None, reason=str(machine_postgres.unavailable_reason())
)
@pytest.mark.parametrize("method", sorted(CALLS))
def test_every_method_of_the_postgres_store_on_a_missing_database_is_a_store_error(method: str) -> None:
    """The machine's server, a database that does not exist: no outage, retrying cannot mend it."""
    url = machine_postgres.database_url(machine_postgres.server_url() or "", "nt_no_such_database")
    store = PostgresStore.from_url(url)
    with pytest.raises(StoreError) as raised:
        CALLS[method](store)
    assert not isinstance(raised.value, StoreUnavailable)
    assert str(raised.value).startswith(
        f"the task store ({store.address}) failed: OperationalError: connection failed:"
    )
    assert 'database "nt_no_such_database" does not exist' in str(raised.value)
    store.close()


# --- the pipeline: an outage, not the message's fault ---------------------------------------------------


@pytest.fixture
def stack_without_retries(valkey: PrivateValkey, short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    """tests/test_middleware.py's stack, with MAX_RETRIES=0 (the default) and actors without retries."""
    settings = settings_module.load(
        {"NIETEST_HOME": str(short_tmp), "BROKER_REDIS_URL": valkey.url, "MAX_RETRIES": "0"}
    )
    monkeypatch.setattr(dramatiq.broker, "global_broker", dramatiq.broker.global_broker)
    broker = build_broker(settings)
    ctx = build_context(settings)
    monkeypatch.setattr(context_module, "_context", ctx)
    made = Stack(settings, ctx, broker)

    def fail(*args: Any) -> None:
        raise made.failure[0]

    dramatiq.actor(
        fail, actor_name=RUN_SUBTASK[Lane.STANDARD], queue_name=made.subtask_queue, broker=broker, max_retries=0
    )
    yield made
    ctx.store.close()
    ctx.notifier.close()
    broker.close()


def test_a_store_outage_is_retried_whatever_max_retries_says_and_fails_no_subtask(
    stack_without_retries: Stack,
) -> None:
    stack = stack_without_retries
    first, _ = stack.add_task("t-store", 2)
    outage = StoreUnavailable("the task store (mongodb mongodb://u:***@db/task_db) is unavailable: AutoReconnect: x")
    stack.failure = [outage]
    with structlog.testing.capture_logs() as captured:
        done = process(stack.broker, message(RUN_SUBTASK[Lane.STANDARD], stack.subtask_queue, first))
    assert not done.failed  # not dead-lettered, although the message has no retry left
    (retry,) = stack.waiting(delay_queue_name(stack.subtask_queue))  # run again, after a backoff
    assert retry["message_id"] == done.message_id and retry["options"]["broker_error_retries"] == 1
    assert stack.status(first) == ("processing", None)  # not failed
    (line,) = events(captured, "store unreachable during the message; retrying it")
    assert line["subtask_id"] == first and line["error"] == str(outage) and 0 < line["retry_in_ms"] <= 1000
    assert not events(captured, "marked failed after an unexpected error")


def test_any_other_store_error_fails_the_message_as_an_error_does(stack_without_retries: Stack) -> None:
    stack = stack_without_retries
    first, _ = stack.add_task("t-bug", 2)
    stack.failure = [StoreError("the task store (sqlite /x) failed: DatabaseError: file is not a database")]
    done = process(stack.broker, message(RUN_SUBTASK[Lane.STANDARD], stack.subtask_queue, first))
    assert done.failed
    assert stack.waiting(delay_queue_name(stack.subtask_queue)) == []
    assert stack.status(first)[0] == "failed"


# --- the command line --------------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("argv", [["tasks"], ["status", "0123456789abcdef"]], ids=" ".join)
def test_the_command_line_says_in_one_line_that_the_store_is_unavailable(short_tmp: Path, argv: list[str]) -> None:
    """MongoDB at a closed port (a short `timeoutMS` in the URI: a shorter limit than the pinned
    30 s is kept): one line on stderr naming the store, its password masked, and exit 1."""
    port = closed_port()
    uri = f"mongodb://nietest:s3cret-pass@127.0.0.1:{port}/task_db?timeoutMS=500"
    env = clean_env(NIETEST_HOME=str(short_tmp), MONGO_URI=uri)
    done = subprocess.run([*NIETEST, *argv], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith(
        f"nietest: the task store (mongodb mongodb://nietest:***@127.0.0.1:{port}/task_db?timeoutMS=500) is"
        " unavailable: ServerSelectionTimeoutError: "
    )
    assert "Connection refused" in line and "s3cret" not in line and "Traceback" not in done.stderr


def test_the_command_line_names_a_damaged_sqlite_store_in_one_line(short_tmp: Path) -> None:
    data = short_tmp / "data"
    data.mkdir()
    (data / "nietest.sqlite3").write_bytes(b"not a database, " * 100)
    done = subprocess.run(
        [*NIETEST, "tasks"], env=clean_env(NIETEST_HOME=str(short_tmp)), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"nietest: the task store (sqlite {data / 'nietest.sqlite3'}) failed: DatabaseError: file is not a database"
    ]
