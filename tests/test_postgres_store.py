"""What only the PostgreSQL store has, on the machine's real server (skipped where none answers):
its versioned schema (migrations applied once under the advisory lock, two daemons racing, a
newer schema refused, a failed migration leaving nothing, the privileges an up-to-date schema
needs), its session settings, its errors (a missing database, an unknown role, a bad URL, a
statement past its timeout, a connection the server ended), a fork, and the SQL `error_history`
entry equal to the Python one. The contract suite (tests/test_store_contract.py) runs the rest.
"""

from __future__ import annotations

import multiprocessing
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from nietest_daemon.domain.lifecycle import Status
from nietest_daemon.store import StoreError, StoreUnavailable, base
from nietest_daemon.store.postgres import PostgresStore
from nietest_daemon.store.postgres_connection import is_outage
from nietest_daemon.store.postgres_schema import MIGRATIONS, SCHEMA_VERSION, Migration, apply_migrations
from nietest_daemon.testing import postgres as machine_postgres

pytestmark = pytest.mark.skipif(
    machine_postgres.unavailable_reason() is not None, reason=str(machine_postgres.unavailable_reason())
)


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    with machine_postgres.temporary_database() as url:
        yield url


@pytest.fixture
def fresh_url(database_url: str) -> str:
    """A schema of the test's own, empty, and the URL of the module's database with it first on the
    search path (a CREATE DATABASE per test would cost half a second each)."""
    return in_new_schema(database_url)


def in_new_schema(database_url: str) -> str:
    name = f"s_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    return f"{database_url}?options=-csearch_path%3D{name}"


@pytest.fixture
def store(fresh_url: str) -> Iterator[PostgresStore]:
    with PostgresStore.from_url(fresh_url) as made:
        made.prepare()
        yield made


def versions(url: str) -> list[tuple[int, str]]:
    with psycopg.connect(url) as conn:
        return [(int(v), str(d)) for v, d in conn.execute("SELECT version, description FROM nietest_schema ORDER BY 1")]


def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text, text
    return text


# --- the schema ------------------------------------------------------------------------------------------


def test_opening_builds_nothing_and_prepare_makes_the_schema_once(fresh_url: str) -> None:
    with PostgresStore.from_url(fresh_url) as store:
        with pytest.raises(StoreError, match="has no nietest tables: `nietest daemon` makes them") as raised:
            store.get_task("t")
        assert not isinstance(raised.value, StoreUnavailable)
        one_line(raised.value)
        store.prepare()
        store.prepare()  # every start of the daemon: nothing left to do
        assert store.get_task("t") is None
    assert versions(fresh_url) == [(m.version, m.description) for m in MIGRATIONS]
    assert SCHEMA_VERSION == MIGRATIONS[-1].version == len(MIGRATIONS)
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))


PROBE = Migration(
    SCHEMA_VERSION + 1,
    "a test's migration: slow, and counting its runs",
    (
        "CREATE TABLE probe (n integer)",
        "SELECT pg_sleep(0.1)",  # the other daemon reaches the lock meanwhile
        "INSERT INTO probe VALUES (1)",
    ),
)


def test_two_daemons_preparing_together_apply_each_migration_once(fresh_url: str) -> None:
    """Two processes' connections race through every migration and a slow one: both succeed, each
    migration runs once (the second waits on the advisory lock, then finds nothing to do)."""
    migrations = (*MIGRATIONS, PROBE)
    barrier = threading.Barrier(2)
    applied: list[list[int]] = []
    errors: list[BaseException] = []

    def daemon() -> None:
        try:
            with psycopg.connect(fresh_url, autocommit=True) as conn:
                barrier.wait()
                applied.append(apply_migrations(conn, "test", migrations))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=daemon) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert sorted(applied) == [[], [m.version for m in migrations]]
    assert versions(fresh_url) == [(m.version, m.description) for m in migrations]
    with psycopg.connect(fresh_url) as conn:
        assert conn.execute("SELECT count(*) FROM probe").fetchone() == (1,)


def test_a_newer_schema_stops_prepare_naming_both_versions(store: PostgresStore, fresh_url: str) -> None:
    with psycopg.connect(fresh_url) as conn:
        conn.execute("INSERT INTO nietest_schema (version, description) VALUES (99, 'from a later nietest')")
    with pytest.raises(StoreError) as raised:
        store.prepare()
    assert not isinstance(raised.value, StoreUnavailable)
    assert one_line(raised.value) == (
        f"the task store ({store.address}) has schema version 99, newer than this nietest knows"
        f" (version {SCHEMA_VERSION}): upgrade nietest"
    )


def test_a_migration_that_fails_leaves_nothing_half_done(store: PostgresStore, fresh_url: str) -> None:
    broken = Migration(SCHEMA_VERSION + 1, "broken", ("CREATE TABLE half (n integer)", "SELECT no_such_function()"))
    with psycopg.connect(fresh_url, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UndefinedFunction):
            apply_migrations(conn, "test", (*MIGRATIONS, broken))
        assert conn.execute("SELECT to_regclass('half')").fetchone() == (None,)
        assert conn.execute("SELECT pg_try_advisory_lock(1)").fetchone() == (True,)  # no lock left behind
    assert versions(fresh_url)[-1][0] == SCHEMA_VERSION


def test_an_up_to_date_schema_needs_no_create_privilege(
    store: PostgresStore, fresh_url: str, database_url: str
) -> None:
    """The role of docs/stores.md: CONNECT, USAGE and SELECT/INSERT/UPDATE/DELETE, no CREATE: the
    daemon starts (nothing to migrate) and works; on an empty schema its prepare is refused."""
    role = f"nt_role_{uuid.uuid4().hex[:8]}"
    schema = fresh_url.rsplit("%3D", 1)[1]
    empty = in_new_schema(database_url)
    quoted = {
        "role": sql.Identifier(role),
        "schema": sql.Identifier(schema),
        "empty": sql.Identifier(empty.rsplit("%3D", 1)[1]),
    }
    with psycopg.connect(database_url, autocommit=True) as admin:
        for statement in (
            "CREATE ROLE {role} LOGIN",
            "GRANT USAGE ON SCHEMA {schema} TO {role}",
            "GRANT USAGE ON SCHEMA {empty} TO {role}",
            "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {role}",
        ):
            admin.execute(sql.SQL(statement).format(**quoted))
    try:
        with PostgresStore.from_url(fresh_url.replace("//postgres@", f"//{role}@")) as worker:
            worker.prepare()
            worker.create_task({"id": "t", "name": "t", "total_images": 1})
            worker.insert_subtasks("t", [{"id": "t:0"}])
            assert worker.finish_subtask("t:0", Status.COMPLETED).finalised  # type: ignore[union-attr]
        with PostgresStore.from_url(empty.replace("//postgres@", f"//{role}@")) as first:
            with pytest.raises(StoreError, match="InsufficientPrivilege: permission denied for schema") as raised:
                first.prepare()
            assert not isinstance(raised.value, StoreUnavailable)
    finally:
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP OWNED BY {role}").format(**quoted))
            admin.execute(sql.SQL("DROP ROLE {role}").format(**quoted))


# --- sessions and errors -----------------------------------------------------------------------------------


def test_each_session_is_bounded_in_time_in_utc_and_plans_with_its_values(fresh_url: str) -> None:
    for timeout, shown in ((None, "30s"), (2.0, "2s")):
        with PostgresStore(fresh_url, timeout_seconds=timeout) as store, store.connection() as conn:
            settings = dict(
                conn.execute(
                    "SELECT name, setting || coalesce(unit, '') FROM pg_settings WHERE name IN ('statement_timeout',"
                    " 'idle_in_transaction_session_timeout', 'TimeZone', 'plan_cache_mode')"
                ).fetchall()
            )
            millis = int(shown[:-1]) * 1000
            assert settings == {
                "statement_timeout": f"{millis}ms",
                "idle_in_transaction_session_timeout": f"{2 * millis}ms",
                "TimeZone": "UTC",
                "plan_cache_mode": "force_custom_plan",
            }
            assert conn.info.parameter_status("application_name") == "nietest"


def test_a_missing_database_and_an_unknown_role_are_store_errors_in_one_line(database_url: str) -> None:
    server = database_url.rsplit("/", 1)[0]
    for url, says in (
        (f"{server}/nt_no_such_database", 'database "nt_no_such_database" does not exist'),
        (server.replace("//postgres@", "//nt_nobody:s3cret-pass@") + "/postgres", 'role "nt_nobody" does not exist'),
    ):
        with PostgresStore.from_url(url) as store, pytest.raises(StoreError) as raised:
            store.list_tasks()
        assert not isinstance(raised.value, StoreUnavailable)
        text = one_line(raised.value)
        assert text.startswith(f"the task store ({store.address}) failed: OperationalError: connection failed: ")
        assert says in text and "s3cret" not in text


def test_a_bad_url_is_a_store_error_naming_it() -> None:
    with pytest.raises(StoreError) as raised:
        PostgresStore.from_url("postgresql://u:s3cret-pass@db.example/task_db?no_such_option=1")
    assert one_line(raised.value) == (
        "the task store (postgresql postgresql://u:***@db.example/task_db?no_such_option=1) has a bad URL:"
        ' ProgrammingError: invalid URI query parameter: "no_such_option"'
    )


def test_what_means_unavailable() -> None:
    """Connect-time errors carry no SQLSTATE: a refused login is no outage, a refused connection is."""
    refused = 'connection failed: connection to server at "db" (10.0.0.1), port 5432 failed: Connection refused'
    password = (
        'connection failed: connection to server at "db", port 5432 failed:'
        ' FATAL:  password authentication failed for user "nietest"'
    )
    assert is_outage(psycopg.OperationalError(refused))
    assert not is_outage(psycopg.OperationalError(password))
    assert not is_outage(psycopg.OperationalError("connection failed: FATAL:  no pg_hba.conf entry for host"))
    assert not is_outage(psycopg.ProgrammingError("syntax error"))


def test_a_statement_past_its_timeout_is_unavailable_and_runs_again(store: PostgresStore, fresh_url: str) -> None:
    store.create_task({"id": "t", "name": "t", "total_images": 1})
    with PostgresStore(fresh_url, timeout_seconds=0.2) as hurried, psycopg.connect(fresh_url) as holder:
        holder.execute("SELECT 1 FROM tasks WHERE id = 't' FOR UPDATE")  # another session holds the row
        with pytest.raises(StoreUnavailable, match="QueryCanceled: canceling statement due to statement timeout"):
            hurried.mark_task_running("t")
        holder.rollback()
        assert hurried.mark_task_running("t")


def test_a_connection_the_server_ended_is_unavailable_once(store: PostgresStore, database_url: str) -> None:
    """Every connection of the pool ended (a server restart): the operation that meets the first
    is unavailable, and the pool checks the others at once: the next operation works."""
    store.create_task({"id": "t", "name": "t", "total_images": 1})
    with store.connection() as first, store.connection():  # two connections in the pool
        first.execute("SELECT 1")
    database = database_url.rsplit("/", 1)[1]
    with psycopg.connect(database_url, autocommit=True) as admin:
        ended = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s"
            " AND application_name = 'nietest'",
            (database,),
        ).fetchone()
    assert ended is not None and ended[0] >= 1
    with pytest.raises(StoreUnavailable):
        store.get_task("t")
    assert store.get_task("t") is not None  # the pool dropped the dead connection


def _finish_in_child(store: PostgresStore, subtask_id: str) -> None:
    outcome = store.finish_subtask(subtask_id, Status.COMPLETED)
    store.close()  # closes the child's own pool only
    raise SystemExit(0 if outcome is not None and outcome.changed else 1)


def test_a_store_used_before_a_fork_works_on_both_sides(store: PostgresStore) -> None:
    store.create_task({"id": "f", "name": "f", "total_images": 2})
    store.insert_subtasks("f", [{"id": "f:0"}, {"id": "f:1"}])
    child = multiprocessing.get_context("fork").Process(target=_finish_in_child, args=(store, "f:0"))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    last = store.finish_subtask("f:1", Status.FAILED)
    assert last is not None and last.finalised and last.task_status == Status.COMPLETED


# --- the history entry -------------------------------------------------------------------------------------


@pytest.mark.parametrize("ended", [Status.FAILED, Status.CANCELLED])
def test_the_sql_history_entry_is_the_python_one(store: PostgresStore, ended: Status) -> None:
    """The retry builds an `error_history` entry in SQL (`HISTORY_ENTRY_SQL`); MongoDB in Python
    (`history_entry`): equal field by field."""
    store.create_task({"id": "t", "name": "t", "total_images": 1})
    store.insert_subtasks("t", [{"id": "t:0", "seed": 7}])
    if ended == Status.FAILED:
        store.start_subtask("t:0")
        store.record_job("t:0", "job-0", 1007)
    store.finish_subtask("t:0", ended, error="boom")
    before: Any = store.get_subtask("t:0")
    expected = base.history_entry(before)
    assert store.retry_subtasks("t", [ended]).reset == 1
    [entry] = store.get_subtask("t:0")["error_history"]  # type: ignore[index]
    assert entry == expected and set(entry) == set(base.HISTORY_FIELDS)
    if ended == Status.FAILED:
        assert all(value is not None for value in entry.values()), entry
