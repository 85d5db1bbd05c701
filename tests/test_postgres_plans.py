"""Every statement of the PostgreSQL store is served by an index, its ORDER BY included, at scale.

A database of this module's own holds 50,000 subtasks (25 tasks of 2,000, inserted by one
`INSERT ... SELECT generate_series`, as a master inserts them: a task's together, in id order) and
5,000 tasks, and is ANALYZEd. tests/test_store_indexes.py's workload (every operation of `Store`,
as the daemon and the commands call them) then runs on it while every statement the store sends is
recorded (`PostgresStore._execute`), and each is EXPLAINed with its own parameters: no plan may
scan `subtasks` sequentially or sort (a Sort node: no index gave the order). `tasks` may be
scanned whole (`count_tasks` reads every task's status), never sorted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from test_store_indexes import public_methods, workload

from nietest_daemon.domain.lifecycle import Status
from nietest_daemon.store import utcnow
from nietest_daemon.store.postgres import PostgresStore
from nietest_daemon.testing import postgres as machine_postgres

pytestmark = pytest.mark.skipif(
    machine_postgres.unavailable_reason() is not None, reason=str(machine_postgres.unavailable_reason())
)

TASKS, LOADED_TASKS, PER_TASK = 5000, 25, 2000

#: A subtask's document, as wide as a real one (the planner weighs a table by its pages).
SUBTASK_DOC = json.dumps(
    {
        "variable_indices": [3, 1],
        "ratio": "1:1",
        "width": 1024,
        "height": 1024,
        "prompts": [{"type": "freetext", "value": "1girl, " + "a style of some length, " * 8, "weight": 1.0}],
    }
)
#: 25 tasks of 2,000 subtasks: the first 20 finished (mostly completed, some failed or cancelled),
#: the last 5 running (pending, processing, finished); 4,975 more tasks without subtasks.
LOAD = (
    "INSERT INTO tasks (id, status, owner, created_at, updated_at, total_images, doc)"
    " SELECT 'load-' || lpad(g::text, 5, '0'),"
    " CASE WHEN g <= 20 THEN 'completed' WHEN g <= 25 THEN 'processing' ELSE"
    " (ARRAY['completed', 'completed', 'failed', 'cancelled', 'pending'])[1 + g % 5] END,"
    " 'owner-' || (g % 40), now() - (g || ' minutes')::interval, now() - (g || ' seconds')::interval,"
    f" CASE WHEN g <= {LOADED_TASKS} THEN {PER_TASK} ELSE 4 END, '{{}}'::jsonb"
    f" FROM generate_series(1, {TASKS}) g",
    "INSERT INTO subtasks (id, task_id, status, seed, created_at, updated_at, doc)"
    " SELECT 'load-' || lpad(t::text, 5, '0') || ':' || lpad(i::text, 5, '0'), 'load-' || lpad(t::text, 5, '0'),"
    " CASE WHEN t <= 20 THEN (ARRAY['completed', 'completed', 'completed', 'failed', 'cancelled'])[1 + i % 5]"
    " ELSE (ARRAY['pending', 'pending', 'processing', 'completed', 'failed'])[1 + i % 5] END,"
    " i, now() - (t || ' hours')::interval, now() - ((t * 10000 + i) || ' milliseconds')::interval,"
    f" '{SUBTASK_DOC}'::jsonb"
    f" FROM generate_series(1, {LOADED_TASKS}) t, generate_series(0, {PER_TASK - 1}) i ORDER BY t, i",
    # The columns the queries filter and sort by, at the server's default statistics target (as
    # autovacuum's ANALYZE): with a coarser one some plans sort.
    "ANALYZE tasks (id, status, owner, created_at, updated_at)",
    "ANALYZE subtasks (id, task_id, status, updated_at)",
)


@pytest.fixture(scope="module")
def loaded_url() -> Iterator[str]:
    with machine_postgres.temporary_database() as url:
        with PostgresStore.from_url(url) as store:
            store.prepare()
        with psycopg.connect(url, autocommit=True) as conn:
            for statement in LOAD:
                conn.execute(statement)  # type: ignore[arg-type]
        yield url


Statement = tuple[str, Any]


def recorded(store: PostgresStore) -> list[Statement]:
    """Start recording every statement `store` sends (its SQL and parameters)."""
    statements: list[Statement] = []
    send = store._execute

    def recording(conn: psycopg.Connection[Any], sql: str, params: Any = None) -> Any:
        statements.append((sql, params))
        return send(conn, sql, params)

    store._execute = recording  # type: ignore[method-assign]
    return statements


def plan_of(conn: psycopg.Connection[Any], sql: str, params: Any) -> dict[str, Any]:
    row = conn.execute(f"EXPLAIN (FORMAT JSON) {sql}", params).fetchone()  # type: ignore[arg-type]
    assert row is not None
    plan = row[0] if not isinstance(row[0], str) else json.loads(row[0])
    return dict(plan[0]["Plan"])


def nodes(plan: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from nodes(child)


def faults(plan: Mapping[str, Any]) -> list[str]:
    """What no index serves in a plan: a sequential scan of `subtasks`, a sort."""
    found = []
    for node in nodes(plan):
        kind = node["Node Type"]
        if kind == "Seq Scan" and node.get("Relation Name") == "subtasks":
            found.append("Seq Scan on subtasks")
        if kind in ("Sort", "Incremental Sort"):
            found.append(f"{kind} by {', '.join(node.get('Sort Key', []))}")
    return found


def describe(plan: Mapping[str, Any]) -> str:
    return " / ".join(
        f"{n['Node Type']}{' using ' + n['Index Name'] if 'Index Name' in n else ''}" for n in nodes(plan)
    )


def at_scale(store: PostgresStore) -> None:
    """The operations that read many subtasks, on a loaded task of 2,000 (running, then finished):
    the planner picks an index by the size it expects, so a tiny task alone would prove little."""
    running, finished = "load-00023", "load-00003"
    store.list_subtasks(running, status=Status.FAILED, limit=100)
    store.list_subtasks(running, status=[Status.PENDING, Status.PROCESSING], limit=100, after=f"{running}:00100")
    list(store.iter_subtasks(running, batch=1000))
    list(store.iter_subtasks(running, status=Status.FAILED, batch=1000))
    store.count_subtasks(running)
    store.get_subtask_for_work(f"{running}:00007")
    assert store.finish_subtask(f"{running}:00002", Status.COMPLETED).changed  # type: ignore[union-attr]
    assert store.cancel_task(running).cancelled == 800
    assert store.retry_subtasks(finished, [Status.FAILED, Status.CANCELLED]).reset == 800
    store.find_stale_subtasks(utcnow() + timedelta(seconds=1), limit=10)
    store.list_tasks(owner="owner-3", status=[Status.COMPLETED, Status.FAILED], limit=10)
    store.repair_counts(utcnow() + timedelta(seconds=1))


def test_every_statement_of_the_postgres_store_is_served_by_an_index(loaded_url: str) -> None:
    store = PostgresStore.from_url(loaded_url)
    statements = recorded(store)
    at_scale(store)
    assert workload(store) == set(public_methods())  # every operation ran (and closed the store)
    distinct = list(
        {(sql, json.dumps(params, default=str, sort_keys=True)): (sql, params) for sql, params in statements}.values()
    )
    assert len({sql for sql, _ in distinct}) > 25
    with psycopg.connect(loaded_url, autocommit=True) as conn:
        plans = [(sql, plan_of(conn, sql, params)) for sql, params in distinct]
    bad = {sql: (faults(plan), describe(plan)) for sql, plan in plans if faults(plan)}
    assert bad == {}
    used = {node.get("Index Name") for _, plan in plans for node in nodes(plan)}
    assert {"subtasks_task_status_id", "subtasks_task_id", "subtasks_processing_updated_id"} <= used
    assert {"tasks_created_id", "tasks_status_created_id", "tasks_owner_created_id"} <= used
    assert "tasks_owner_status_created_id" in used


def test_the_plan_check_fails_a_statement_no_index_serves(loaded_url: str) -> None:
    """Without the index of `find_stale_subtasks` (dropped inside a transaction that is rolled
    back), its statement scans or sorts, and the check says so."""
    store = PostgresStore.from_url(loaded_url)
    statements = recorded(store)
    store.find_stale_subtasks(machine_now(loaded_url))
    store.close()
    [(sql, params)] = statements
    with psycopg.connect(loaded_url) as conn:
        assert faults(plan_of(conn, sql, params)) == []
        conn.execute("DROP INDEX subtasks_processing_updated_id")
        assert faults(plan_of(conn, sql, params)) != []
        conn.rollback()


def machine_now(url: str) -> Any:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT now()").fetchone()
    assert row is not None
    return row[0]
