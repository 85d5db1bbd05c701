"""Every query of each store is served by one index, its sort included.

The same workload (every operation of `Store`, as the daemon and the commands call them) runs on
each store while its queries are recorded: MongoDB's filters and sorts through
`testing.mongo_faults`, SQLite's statements through its trace callback. Each must be served by an
index: MongoDB's equality fields, then its sort, then its ranges, as a prefix of one index of
`prepare`'s; SQLite's `EXPLAIN QUERY PLAN` with no temporary B-tree (a sort) and no table scan.
A new query without an index fails here, and so does a new operation the workload leaves out.
PostgreSQL's statements are EXPLAINed at scale, with this workload, in tests/test_postgres_plans.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

from test_mongo_store import indexes_of, new_store, stored_campaign

from nietest_daemon.domain.lifecycle import TERMINAL, Status
from nietest_daemon.store import SQLiteStore, Store, utcnow
from nietest_daemon.testing.mongo_faults import Call, FaultyDatabase

Index = list[tuple[str, int]]


# --- every query is served by an index ------------------------------------------------------------------


def _split(filter_: Mapping[str, Any]) -> tuple[set[str], set[str]]:
    """The filter's equality fields (a value, `$eq`, `$in`: points of an index) and range fields."""
    equality, ranges = set(), set()
    for name, value in filter_.items():
        if name.startswith("$"):
            raise AssertionError(f"a top-level {name} in {filter_!r}: say here which index serves it")
        if isinstance(value, Mapping) and any(op.startswith("$") for op in value):
            (equality if set(value) <= {"$eq", "$in"} else ranges).add(name)
        else:
            equality.add(name)
    return equality, ranges


def serves(index: Index, call: Call) -> bool:
    """Whether `index` serves the query alone, its sort included: its keys start with the query's
    equality fields (any order), then its sort keys in order (all in the index's directions, or
    all reversed), and every range field is among the keys after the equality ones."""
    assert call.filter is not None
    equality, ranges = _split(call.filter)
    if "_id" in equality and index == [("_id", 1)]:
        return True  # one document (or a list of them) by its key
    keys = [name for name, _ in index]
    if set(keys[: len(equality)]) != equality:
        return False
    sort = [(name, way) for name, way in call.sort if name not in equality]
    run = index[len(equality) : len(equality) + len(sort)]
    if [name for name, _ in run] != [name for name, _ in sort]:
        return False
    if len({way * index_way for (_, way), (_, index_way) in zip(sort, run, strict=True)}) > 1:
        return False
    return ranges <= set(keys[len(equality) :])


def unserved(db: FaultyDatabase, queries: list[Call]) -> list[Call]:
    by_collection = {name: indexes_of(db, name) for name in {q.collection for q in queries}}
    return [q for q in queries if not any(serves(ix, q) for ix in by_collection[q.collection])]


def workload(store: Store) -> set[str]:
    """Every operation of the store, in the ways the daemon and the commands call them; the
    names of the `Store` methods it called."""
    called: set[str] = set()
    for name in public_methods():
        method = getattr(store, name)

        def spy(*args: Any, _name: str = name, _method: Callable[..., Any] = method, **kwargs: Any) -> Any:
            called.add(_name)
            return _method(*args, **kwargs)

        setattr(store, name, spy)

    ids = stored_campaign(store, "t", styles=6)
    store.get_task("t")
    store.list_tasks()
    store.list_tasks(limit=5, status=Status.PENDING)
    store.list_tasks(limit=100, status=list(TERMINAL))
    store.create_task({"id": "owned", "name": "alice's", "owner": "alice", "total_images": 1})
    store.list_tasks(owner="alice")
    store.list_tasks(limit=5, status=Status.PENDING, owner="alice")
    store.list_tasks(limit=100, status=list(TERMINAL), owner="alice")
    store.count_tasks()
    store.mark_task_running("t")
    store.is_cancel_requested("t")
    store.get_subtask(ids[0])
    store.get_subtask_for_work(ids[0])
    store.start_subtask(ids[0])
    store.record_job(ids[0], "job-0", 7)
    store.record_poll(ids[0])
    store.clear_job(ids[0], "job-0")
    store.finish_subtask(ids[0], Status.COMPLETED, result="https://img/0.png")
    store.finish_subtask(ids[1], Status.FAILED, error="boom")
    store.list_subtasks("t")
    store.list_subtasks("t", status=Status.PENDING, limit=2)
    store.list_subtasks("t", status=[Status.FAILED, Status.CANCELLED], limit=2, after=ids[0])
    list(store.iter_subtasks("t", batch=2))
    list(store.iter_subtasks("t", status=Status.PENDING, batch=2))
    store.count_subtasks("t")
    store.recount("t")
    store.find_stale_subtasks(utcnow() + timedelta(seconds=1))
    store.finalise_task("t")
    store.repair_counts(utcnow() + timedelta(seconds=1))
    store.request_cancel("t")
    store.cancel_task("t")
    store.retry_subtasks("t", [Status.FAILED, Status.CANCELLED])
    store.create_task({"id": "empty", "name": "no subtasks yet", "total_images": 2})
    store.fail_task("empty", "master crashed")
    store.create_task({"id": "unexpanded", "name": "cancelled before its expansion", "total_images": 2})
    store.cancel_task("unexpanded")
    store.insert_subtasks("t", [{"id": ids[2]}])  # a redelivered master's insert: ignored
    store.prepare()
    store.close()
    return called


def public_methods() -> list[str]:
    return sorted(name for name in dir(Store) if not name.startswith("_") and callable(getattr(Store, name)))


def test_every_query_of_the_mongo_store_is_served_by_an_index() -> None:
    """Each filter and sort the store sends (recorded while every operation runs) is served by one
    of the indexes `prepare` builds: equality fields first, then the sort, then the ranges. A new
    query without an index fails here; so does a new operation the workload does not run."""
    store, db = new_store()
    called = workload(store)
    assert called == set(public_methods())
    queries = [q for q in db.queries if q.collection in ("tasks", "subtasks")]
    assert len(queries) > 40
    assert unserved(db, queries) == []
    # `list_tasks(owner=...)`, alone and with statuses, each along an owner index
    owned = [q for q in queries if q.filter and "owner" in q.filter]
    assert len(owned) == 3
    assert serves([("owner", 1), ("created_at", 1), ("_id", 1)], owned[0])
    assert all(serves([("owner", 1), ("status", 1), ("created_at", 1), ("_id", 1)], q) for q in owned[1:])


def test_the_index_check_fails_a_query_no_index_serves() -> None:
    store, db = new_store()
    stored_campaign(store, "t")
    db.db.subtasks.drop_index("task_id_1_status_1__id_1")
    since = len(db.queries)
    store.list_subtasks("t", status=Status.PENDING)
    missing = unserved(db, db.queries[since:])
    assert [(q.collection, dict(q.filter or {}), q.sort) for q in missing] == [
        ("subtasks", {"task_id": "t", "status": {"$in": [Status.PENDING]}}, (("_id", 1),))
    ]
    assert not serves([("status", 1), ("created_at", 1), ("_id", 1)], Call("tasks", "find", {}, (("created_at", -1),)))
    assert serves([("created_at", 1), ("_id", 1)], Call("tasks", "find", {}, (("created_at", -1), ("_id", -1))))
    assert not serves([("created_at", 1), ("_id", 1)], Call("tasks", "find", {}, (("created_at", -1), ("_id", 1))))
    assert not serves(
        [("task_id", 1), ("_id", 1)], Call("subtasks", "find", {"task_id": "t", "updated_at": {"$gte": 1}})
    )
    by_owner = Call("tasks", "find", {"owner": "a", "status": {"$in": ["x", "y"]}}, (("created_at", -1), ("_id", -1)))
    assert not serves([("status", 1), ("created_at", 1), ("_id", 1)], by_owner)
    assert not serves([("owner", 1), ("created_at", 1), ("_id", 1)], by_owner)
    assert serves([("owner", 1), ("status", 1), ("created_at", 1), ("_id", 1)], by_owner)


def test_every_statement_of_the_sqlite_store_is_served_by_an_index(tmp_path: Path) -> None:
    """Every statement the SQLite store runs (traced during the same workload) reads along an
    index: its plan has no temporary B-tree (a sort) and scans no table whole."""
    store = SQLiteStore(tmp_path)
    statements: list[str] = []
    store.connection().set_trace_callback(statements.append)
    called = workload(store)
    assert called == set(public_methods())
    reads = sorted({sql for sql in statements if sql.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE"))})
    assert len(reads) > 20
    with SQLiteStore(tmp_path) as again:
        conn = again.connection()
        plans = {sql: " / ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}")) for sql in reads}
    bad = {
        sql: plan
        for sql, plan in plans.items()
        if "TEMP B-TREE" in plan or any(step.startswith("SCAN") and " USING " not in step for step in plan.split(" / "))
    }
    assert bad == {}
    assert any("subtasks_task_status_id" in plan for plan in plans.values())
    assert any("tasks_status_created_id" in plan for plan in plans.values())
    # `list_tasks(owner=...)`: the owner indexes, whose expression the query repeats exactly
    owned = {sql: plan for sql, plan in plans.items() if "$.owner" in sql}
    assert len(owned) == 2 + len(TERMINAL)  # alone; then once per status asked for
    assert all(
        ("tasks_owner_status_created_id" if "t.status" in sql else "tasks_owner_created_id") in plan
        for sql, plan in owned.items()
    )
