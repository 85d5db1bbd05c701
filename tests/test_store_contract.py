"""Contract suite of the task store, run against every implementation.

`SQLiteStore` runs for real, on a file in tmp_path (threads and, separately, processes).

`PostgresStore` runs for real, on the machine's PostgreSQL server (`testing.postgres`): one
database for this module, created and dropped by the `postgres_url` fixture, emptied before each
test; skipped, with the reason, where no server answers.

`MongoStore` runs on `mongomock.MongoClient().db`: mongomock stands in because no MongoDB
server can run on our machines. mongomock executes each operation in Python and is *not*
atomic per operation (its `find_one_and_update` is a find, then an update by `_id` that drops
the filter), so the Mongo store runs on `testing.mongo_faults.FaultyDatabase`, a thin proxy that
holds one lock for the duration of every single collection call. That restores exactly what a
MongoDB server guarantees -- each single-document operation is atomic -- and nothing more: any
correctness the store needs beyond that (ordering between its operations) is still exercised by
the races. The same proxy fails a chosen write (as a failover or a killed process would leave it)
and runs two operations' calls in a chosen order (`Turns`), for the cases a server can produce
and mongomock never does.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import bson
import mongomock
import psycopg
import pytest
import store_race
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymongo.errors import AutoReconnect
from test_task_size import task_just_under_the_limit

from nietest_daemon.domain.lifecycle import STATUSES, TERMINAL, Status, final_task_status, is_partial
from nietest_daemon.domain.taskspec import Task, validate_task
from nietest_daemon.store import (
    DuplicateTaskError,
    FinishOutcome,
    SQLiteStore,
    Store,
    StoreUnavailable,
    UnknownSubtaskError,
    open_store,
    utcnow,
)
from nietest_daemon.store import base as store_base
from nietest_daemon.store.base import iso_text
from nietest_daemon.store.mongo import MongoStore
from nietest_daemon.store.postgres import PostgresStore
from nietest_daemon.store.sqlite import HISTORY_ENTRY_SQL
from nietest_daemon.testing import postgres as machine_postgres
from nietest_daemon.testing.mongo_faults import Call, FaultyDatabase, Turns, interleavings

COUNTER_FIELDS = ("processed_images", "completed_images", "failed_images", "cancelled_images")


# --- fixtures ------------------------------------------------------------------------------------------


class StoreFactory:
    """Handles on one shared store (several handles = several clients of one database). `kind`
    names the store; `db` is the Mongo store's `FaultyDatabase` (None for the others); `url` the
    PostgreSQL database's (emptied here: one database serves the whole module)."""

    def __init__(self, kind: str, tmp_path: Path, url: str | None = None) -> None:
        self.kind = kind
        self.opened: list[Store] = []
        self.db = FaultyDatabase(mongomock.MongoClient().db) if kind == "mongo" else None
        self.url = url
        self._data_dir = tmp_path / "data"
        if url is not None:
            empty_postgres(url)

    def __call__(self) -> Store:
        if self.url is not None:
            handle: Store = PostgresStore.from_url(self.url)
        elif self.db is None:
            handle = SQLiteStore(self._data_dir)
        else:
            handle = MongoStore(self.db, task_collection="tasks", subtask_collection="subtasks")  # type: ignore[arg-type]
        if not self.opened:
            handle.prepare()  # as the daemon does at start, once
        self.opened.append(handle)
        return handle


def empty_postgres(url: str) -> None:
    """Empty the store's tables (a database per test would cost a CREATE DATABASE each; DELETE of a
    test's few rows is ten times quicker than TRUNCATE, which makes new files)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM subtasks")
        conn.execute("DELETE FROM tasks")


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A database of this module's own on the machine's PostgreSQL, its schema made; dropped after."""
    reason = machine_postgres.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with machine_postgres.temporary_database() as url:
        with PostgresStore.from_url(url) as store:
            store.prepare()
        yield url


@pytest.fixture(params=["sqlite", "mongo", "postgres"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    factory = StoreFactory(request.param, tmp_path, url)
    yield factory
    for s in factory.opened:
        s.close()


@pytest.fixture
def store(make_store: StoreFactory) -> Store:
    return make_store()


def task_doc(task_id: str, total: int, **extra: Any) -> dict[str, Any]:
    return {
        "id": task_id,
        "name": f"campaign {task_id}",
        "priority": 1,
        "total_images": total,
        "prompts": [{"type": "freetext", "value": "1girl", "weight": 1.0}],
        "ratio": "1:1",
        "seed": 42,
        "batch_size": 1,
        "use_polish": False,
        "is_lumina": False,
        "variables": {},
        "variables_map": {"0": {"variable_id": "v", "variable_name": "x", "variable_type": "ratio", "values": []}},
        **extra,
    }


def sub_ids(task_id: str, n: int) -> list[str]:
    return [f"{task_id}-{i:05d}" for i in range(n)]


def sub_docs(task_id: str, n: int) -> list[dict[str, Any]]:
    return [
        {"id": sid, "variable_indices": [i], "ratio": "1:1", "width": 1024, "height": 1024, "seed": i}
        for i, sid in enumerate(sub_ids(task_id, n))
    ]


def make_task(store: Store, task_id: str, n: int) -> list[str]:
    store.create_task(task_doc(task_id, n))
    assert store.insert_subtasks(task_id, sub_docs(task_id, n)) == n
    return sub_ids(task_id, n)


def counters(task: dict[str, Any]) -> dict[str, int]:
    return {k: task[k] for k in ("total_images", *COUNTER_FIELDS)}


def assert_aware_utc(value: Any) -> None:
    assert isinstance(value, datetime) and value.utcoffset() == timedelta(0), value


# --- tasks ---------------------------------------------------------------------------------------------


def test_create_and_get_task(store: Store) -> None:
    doc = task_doc("t1", 4)
    store.create_task(doc)
    assert "status" not in doc  # the caller's dict is not modified
    task = store.get_task("t1")
    assert task is not None
    assert task["id"] == "t1" and task["name"] == "campaign t1" and task["status"] == Status.PENDING
    assert task["total_images"] == 4 and task["progress"] == 0.0
    assert all(task[k] == 0 for k in COUNTER_FIELDS)
    assert task["prompts"] == doc["prompts"] and task["variables_map"] == doc["variables_map"]
    assert task["cancel_requested"] is False and task["error"] is None
    assert_aware_utc(task["created_at"])
    assert task["updated_at"] == task["created_at"]
    assert task["started_at"] is None and task["completed_at"] is None
    assert set(store_base.TASK_FIELDS) <= set(task)
    assert store.get_task("nope") is None


def test_duplicate_task_is_refused(store: Store) -> None:
    store.create_task(task_doc("t1", 1))
    with pytest.raises(DuplicateTaskError, match="t1"):
        store.create_task(task_doc("t1", 2))
    assert store.get_task("t1")["total_images"] == 1  # type: ignore[index]
    with pytest.raises(ValueError, match="id"):
        store.create_task({"name": "no id"})


def test_list_tasks_newest_first_and_by_status(store: Store) -> None:
    for i in range(5):
        store.create_task(task_doc(f"t{i}", 1))
        time.sleep(0.003)  # distinct millisecond timestamps
    assert [t["id"] for t in store.list_tasks()] == ["t4", "t3", "t2", "t1", "t0"]
    assert [t["id"] for t in store.list_tasks(limit=2)] == ["t4", "t3"]
    assert store.mark_task_running("t1")
    assert [t["id"] for t in store.list_tasks(status=Status.PROCESSING)] == ["t1"]
    active = [Status.PROCESSING, Status.PENDING]
    assert [t["id"] for t in store.list_tasks(status=active, limit=3)] == ["t4", "t3", "t2"]


def test_list_tasks_of_an_owner_alone_and_with_statuses(store: Store) -> None:
    owners = ["alice", "bob", "alice", None, "alice", "bob"]
    for i, owner in enumerate(owners):
        store.create_task(task_doc(f"t{i}", 1, **({} if owner is None else {"owner": owner})))
        time.sleep(0.003)  # distinct millisecond timestamps
    store.mark_task_running("t2")
    store.fail_task("t4", "broken")
    assert [t["id"] for t in store.list_tasks(owner="alice")] == ["t4", "t2", "t0"]
    assert [t["id"] for t in store.list_tasks(owner="alice", limit=2)] == ["t4", "t2"]
    assert [t["owner"] for t in store.list_tasks(owner="bob")] == ["bob", "bob"]
    assert [t["id"] for t in store.list_tasks(owner="alice", status=Status.PENDING)] == ["t0"]
    active = [Status.PENDING, Status.PROCESSING]
    assert [t["id"] for t in store.list_tasks(owner="alice", status=active)] == ["t2", "t0"]
    assert [t["id"] for t in store.list_tasks(owner="alice", status=[*active, Status.FAILED], limit=2)] == ["t4", "t2"]
    assert store.list_tasks(owner="carol") == [] and store.list_tasks(owner="bob", status=Status.FAILED) == []
    assert [t["id"] for t in store.list_tasks(status=Status.PENDING)] == ["t5", "t3", "t1", "t0"]  # every owner
    assert store.get_task("t3")["owner"] is None  # type: ignore[index]


def test_owner_extra_and_payload_digest_are_stored_and_extra_round_trips(store: Store) -> None:
    extra = {"user_id": 42, "meta": {"ids": [2**63 - 1, -(2**63), 0], "x": 0.5, "deep": [[{"a": None}]]}}
    task = validate_task({**task_document_input(), **extra})
    assert task.extra == extra
    store.create_task({"id": "t", "owner": "42", "payload_sha256": "ab" * 32, **task.to_document()})
    got = store.get_task("t")
    assert got is not None
    assert (got["owner"], got["payload_sha256"], got["extra"]) == ("42", "ab" * 32, extra)
    assert Task.from_document(got) == task
    assert Task.from_document(store.list_tasks(owner="42")[0]) == task
    store.mark_task_running("t")  # a whole-task write keeps them
    store.fail_task("t", "broken")
    again = store.get_task("t")
    assert again is not None and again["owner"] == "42" and again["extra"] == extra
    store.create_task(task_doc("plain", 1))  # a document without them (a test's, or an older caller's)
    plain = store.get_task("plain")
    assert plain is not None and (plain["owner"], plain["extra"], plain["payload_sha256"]) == (None, {}, None)


def task_document_input() -> dict[str, Any]:
    return {"name": "campaign", "prompts": [{"type": "freetext", "value": "1girl", "weight": 1.0}]}


def test_a_task_stored_before_owners_existed_reads_fine(make_store: StoreFactory) -> None:
    """A document with no `owner`, `extra` or `payload_sha256` at all (stored by an earlier version)
    reads back, is listed, is a valid task with no extra, and is no owner's."""
    store = make_store()
    task = validate_task(task_document_input())
    doc = {"id": "old", **task.to_document()}
    store.create_task(doc)
    if make_store.kind == "postgres":
        pytest.skip("no PostgreSQL store predates owners: its first schema has them")
    if make_store.db is not None:
        make_store.db.db.tasks.update_one({"_id": "old"}, {"$unset": {"owner": "", "extra": "", "payload_sha256": ""}})
    else:
        assert isinstance(store, SQLiteStore)
        store.connection().execute(
            "UPDATE tasks SET doc = json_remove(doc, '$.owner', '$.extra', '$.payload_sha256') WHERE id = 'old'"
        )
    old = store.get_task("old")
    assert old is not None and not {"owner", "extra", "payload_sha256"} & set(old)
    assert old.get("owner") is None and Task.from_document(old) == task and Task.from_document(old).extra == {}
    assert [t["id"] for t in store.list_tasks()] == ["old"]
    assert store.list_tasks(owner="alice") == [] and store.list_tasks(owner="alice", status=Status.PENDING) == []
    assert store.mark_task_running("old") and store.get_task("old")["status"] == Status.PROCESSING  # type: ignore[index]


def test_a_sqlite_file_from_before_owners_gets_its_owner_indexes(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path) as s:
        s.create_task(task_doc("t", 1))
        for name in ("tasks_owner_created_id", "tasks_owner_status_created_id"):
            s.connection().execute(f"DROP INDEX {name}")  # the file as an earlier version left it
    with SQLiteStore(tmp_path) as again:
        names = {row[0] for row in again.connection().execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"tasks_owner_created_id", "tasks_owner_status_created_id"} <= names
        assert again.list_tasks(owner="alice") == [] and [t["id"] for t in again.list_tasks()] == ["t"]


def test_count_tasks_by_status(store: Store) -> None:
    assert store.count_tasks() == dict.fromkeys(STATUSES, 0)
    for i in range(4):
        store.create_task(task_doc(f"t{i}", 1))
    store.mark_task_running("t1")
    store.fail_task("t2", "broken")
    assert store.count_tasks() == {
        **dict.fromkeys(STATUSES, 0),
        Status.PENDING: 2,
        Status.PROCESSING: 1,
        Status.FAILED: 1,
    }


def test_mark_task_running_once(store: Store) -> None:
    store.create_task(task_doc("t", 1))
    assert store.mark_task_running("t") is True
    task = store.get_task("t")
    assert task["status"] == Status.PROCESSING  # type: ignore[index]
    assert_aware_utc(task["started_at"])  # type: ignore[index]
    assert store.mark_task_running("t") is False
    assert store.get_task("t")["started_at"] == task["started_at"]  # type: ignore[index]
    assert store.mark_task_running("missing") is False


# --- subtasks ------------------------------------------------------------------------------------------


def test_insert_subtasks_is_idempotent(store: Store) -> None:
    store.create_task(task_doc("t", 7))
    docs = sub_docs("t", 7)
    assert store.insert_subtasks("t", docs[:5]) == 5
    assert store.insert_subtasks("t", docs[:5]) == 0
    assert store.insert_subtasks("t", docs[3:]) == 2  # 3 and 4 present, 5 and 6 new
    assert store.count_subtasks("t") == {**dict.fromkeys(STATUSES, 0), Status.PENDING: 7}
    sub = store.get_subtask("t-00006")
    assert sub is not None
    assert sub["task_id"] == "t" and sub["status"] == Status.PENDING and sub["variable_indices"] == [6]
    assert sub["job_uuid"] is None and sub["poll_count"] == 0 and sub["attempts"] == 0
    assert sub["result"] is None and sub["error"] is None and sub["width"] == 1024
    assert_aware_utc(sub["created_at"])
    assert set(store_base.SUBTASK_FIELDS) <= set(sub)
    assert store.get_subtask("missing") is None


def test_insert_thousands_of_subtasks(store: Store) -> None:
    store.create_task(task_doc("big", 5000))
    started = time.monotonic()
    assert store.insert_subtasks("big", sub_docs("big", 5000)) == 5000
    assert store.insert_subtasks("big", iter(sub_docs("big", 5000))) == 0
    assert time.monotonic() - started < 10
    assert store.count_subtasks("big")[Status.PENDING] == 5000


def test_list_subtasks(store: Store) -> None:
    ids = make_task(store, "t", 6)
    make_task(store, "other", 2)
    assert [s["id"] for s in store.list_subtasks("t")] == ids
    assert [s["id"] for s in store.list_subtasks("t", limit=2)] == ids[:2]
    store.finish_subtask(ids[1], Status.COMPLETED)
    store.start_subtask(ids[3])
    assert [s["id"] for s in store.list_subtasks("t", status=Status.PENDING)] == [ids[0], ids[2], ids[4], ids[5]]
    assert [s["id"] for s in store.list_subtasks("t", status=[Status.COMPLETED, Status.PROCESSING])] == [ids[1], ids[3]]
    assert store.count_subtasks("t") == {
        Status.PENDING: 4,
        Status.PROCESSING: 1,
        Status.COMPLETED: 1,
        Status.FAILED: 0,
        Status.CANCELLED: 0,
    }


def test_start_subtask(store: Store) -> None:
    (sid,) = make_task(store, "t", 1)
    first = store.start_subtask(sid)
    assert first is not None and first["status"] == Status.PROCESSING and first["attempts"] == 1
    assert_aware_utc(first["started_at"])
    time.sleep(0.003)
    again = store.start_subtask(sid)  # a redelivery
    assert again is not None and again["attempts"] == 2
    assert again["started_at"] == first["started_at"] and again["updated_at"] > first["updated_at"]
    store.finish_subtask(sid, Status.FAILED, error="boom")
    assert store.start_subtask(sid) is None
    assert store.get_subtask(sid)["status"] == Status.FAILED  # type: ignore[index]
    assert store.start_subtask("missing") is None


def test_record_job_first_writer_wins(store: Store) -> None:
    (sid,) = make_task(store, "t", 1)
    store.start_subtask(sid)
    assert store.record_job(sid, "job-a", 111) is True
    assert store.record_job(sid, "job-b", 222) is False
    sub = store.get_subtask(sid)
    assert sub["job_uuid"] == "job-a" and sub["seed"] == 111  # type: ignore[index]
    # A TIMEOUT resubmit clears only the job it saw.
    assert store.clear_job(sid, "job-b") is False
    assert store.record_poll(sid) == 1
    assert store.clear_job(sid, "job-a") is True
    assert store.clear_job(sid, "job-a") is False
    sub = store.get_subtask(sid)
    assert sub["job_uuid"] is None and sub["poll_count"] == 0  # type: ignore[index]
    assert store.record_job(sid, "job-c", 333) is True
    assert store.get_subtask(sid)["job_uuid"] == "job-c"  # type: ignore[index]


@contextmanager
def tight_thread_switching() -> Iterator[None]:
    """Make the interpreter switch threads very often, so races interleave inside operations."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def test_record_job_race(make_store: StoreFactory) -> None:
    s = make_store()
    (sid,) = make_task(s, "t", 1)
    barrier = threading.Barrier(8)
    wins: list[str] = []

    def run(i: int) -> None:
        handle = make_store()
        barrier.wait()
        if handle.record_job(sid, f"job-{i}", i):
            wins.append(f"job-{i}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    with tight_thread_switching():
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert len(wins) == 1
    assert s.get_subtask(sid)["job_uuid"] == wins[0]  # type: ignore[index]


def test_record_poll(store: Store) -> None:
    (sid,) = make_task(store, "t", 1)
    assert [store.record_poll(sid) for _ in range(3)] == [1, 2, 3]
    assert store.get_subtask(sid)["poll_count"] == 3  # type: ignore[index]
    with pytest.raises(UnknownSubtaskError):
        store.record_poll("missing")


# --- the finish path -----------------------------------------------------------------------------------


def test_finish_changes_counters_once(store: Store) -> None:
    ids = make_task(store, "t", 4)
    first = store.finish_subtask(ids[0], Status.COMPLETED, result="https://img/0.png")
    assert isinstance(first, FinishOutcome)
    assert first.changed and not first.finalised and first.status == Status.COMPLETED and first.task_id == "t"
    assert first.task is None  # only the finish that finalises reads the whole task document
    again = store.finish_subtask(ids[0], Status.FAILED, error="late duplicate")
    assert again is not None and not again.changed and not again.finalised and again.status == Status.COMPLETED
    sub = store.get_subtask(ids[0])
    assert sub["status"] == Status.COMPLETED and sub["result"] == "https://img/0.png" and sub["error"] is None  # type: ignore[index]
    assert_aware_utc(sub["completed_at"])  # type: ignore[index]
    task = store.get_task("t")
    assert counters(task) == {  # type: ignore[arg-type]
        "total_images": 4,
        "processed_images": 1,
        "completed_images": 1,
        "failed_images": 0,
        "cancelled_images": 0,
    }
    assert task["progress"] == 25.0 and task["status"] == Status.PENDING  # type: ignore[index]
    assert store.finish_subtask("missing", Status.COMPLETED) is None
    with pytest.raises(ValueError, match="terminal"):
        store.finish_subtask(ids[1], Status.PROCESSING)


def test_counters_equal_recount(store: Store) -> None:
    ids = make_task(store, "t", 40)
    rng = random.Random(7)
    for _ in range(150):
        sid = rng.choice(ids)
        op = rng.random()
        if op < 0.3:
            store.start_subtask(sid)
        elif op < 0.4:
            store.record_poll(sid)
        else:
            store.finish_subtask(sid, rng.choice([Status.COMPLETED, Status.FAILED, Status.CANCELLED]), result="u")
        task = store.get_task("t")
        recount = store.recount("t")
        assert counters(task) == {k: recount[k] for k in counters(task)}  # type: ignore[arg-type]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ops=st.lists(
        st.tuples(st.integers(0, 5), st.sampled_from([Status.COMPLETED, Status.FAILED, Status.CANCELLED])), max_size=20
    )
)
def test_finish_sequences_property(make_store: StoreFactory, ops: list[tuple[int, str]]) -> None:
    """Any sequence of finishes, repeats included: counters = recount, finalised at most once, iff all terminal."""
    s = make_store()
    task_id = f"h{time.monotonic_ns()}"
    ids = make_task(s, task_id, 6)
    finalisers = [o for i, status in ops if (o := s.finish_subtask(ids[i], status)) and o.finalised]
    task = s.get_task(task_id)
    recount = s.recount(task_id)
    assert counters(task) == {k: recount[k] for k in counters(task)}  # type: ignore[arg-type]
    all_done = len({i for i, _ in ops}) == 6
    assert len(finalisers) == (1 if all_done else 0)
    assert (task["status"] in TERMINAL) == all_done  # type: ignore[index]


def race_finish(make_store: StoreFactory, task_id: str, ids: list[str], workers: int) -> list[FinishOutcome]:
    """`workers` threads, each with its own handle, all finishing every subtask in their own order."""
    barrier = threading.Barrier(workers)
    outcomes: list[FinishOutcome] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def run(seed: int) -> None:
        try:
            handle = make_store()
            rng = random.Random(seed)
            order = ids[:]
            rng.shuffle(order)
            barrier.wait()
            for sid in order:
                outcome = handle.finish_subtask(
                    sid, rng.choice([Status.COMPLETED, Status.COMPLETED, Status.FAILED]), result=f"r{seed}"
                )
                assert outcome is not None
                with lock:
                    outcomes.append(outcome)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in range(workers)]
    with tight_thread_switching():
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not errors, errors
    return outcomes


def test_exactly_once_finalisation_under_threads(make_store: StoreFactory) -> None:
    s = make_store()
    ids = make_task(s, "race", 120)
    s.mark_task_running("race")
    outcomes = race_finish(make_store, "race", ids, workers=8)
    assert len(outcomes) == 8 * 120
    changed = [o for o in outcomes if o.changed]
    assert sorted(o.subtask_id for o in changed) == sorted(ids)  # each subtask moved exactly once
    finalisers = [o for o in outcomes if o.finalised]
    assert len(finalisers) == 1
    task = s.get_task("race")
    assert task is not None
    recount = s.recount("race")
    assert counters(task) == {k: recount[k] for k in counters(task)}
    assert task["processed_images"] == 120 and task["progress"] == 100.0
    assert task["status"] == finalisers[0].task_status == final_task_status(task)[0]
    assert_aware_utc(task["completed_at"])
    wins = Counter(o.status for o in changed)
    assert wins[Status.COMPLETED] == task["completed_images"] and wins[Status.FAILED] == task["failed_images"]


def test_sqlite_exactly_once_across_processes(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    s = SQLiteStore(data_dir)
    ids = make_task(s, "mp", 200)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    results = ctx.Queue()
    args = [(str(data_dir), ids, i, barrier, results) for i in range(4)]
    procs = [ctx.Process(target=store_race.finish_every_subtask, args=a) for a in args]
    for p in procs:
        p.start()
    collected = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    changed = [sid for c, _ in collected for sid in c]
    finalised = [status for _, f in collected for status in f]
    assert sorted(changed) == sorted(ids)
    assert len(finalised) == 1
    task = s.get_task("mp")
    assert task is not None
    recount = s.recount("mp")
    assert counters(task) == {k: recount[k] for k in counters(task)}
    assert task["processed_images"] == 200 and task["status"] == finalised[0]
    s.close()


def _forked_finish(handle: SQLiteStore, subtask_id: str) -> None:
    outcome = handle.finish_subtask(subtask_id, Status.COMPLETED)
    handle.close()
    raise SystemExit(0 if outcome is not None and outcome.changed else 1)


def test_sqlite_store_opened_before_a_fork(tmp_path: Path) -> None:
    """A forked child never reuses the parent's connection: it opens its own and both keep working."""
    s = SQLiteStore(tmp_path)
    ids = make_task(s, "f", 2)
    child = multiprocessing.get_context("fork").Process(target=_forked_finish, args=(s, ids[0]))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert s.finish_subtask(ids[1], Status.FAILED).finalised  # type: ignore[union-attr]
    assert s.get_task("f")["status"] == Status.COMPLETED  # type: ignore[index]
    s.close()


# --- task status rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("statuses", "expected", "partial"),
    [
        ([Status.COMPLETED, Status.COMPLETED, Status.COMPLETED], Status.COMPLETED, False),
        ([Status.COMPLETED, Status.FAILED, Status.COMPLETED], Status.COMPLETED, True),
        ([Status.FAILED, Status.FAILED, Status.FAILED], Status.FAILED, False),
        ([Status.FAILED, Status.CANCELLED, Status.COMPLETED], Status.CANCELLED, False),
    ],
)
def test_task_status_rules(store: Store, statuses: list[str], expected: str, partial: bool) -> None:
    ids = make_task(store, "t", len(statuses))
    store.mark_task_running("t")
    outcomes = [
        store.finish_subtask(sid, status, error=None if status == Status.COMPLETED else "x")
        for sid, status in zip(ids, statuses, strict=True)
    ]
    assert [bool(o and o.finalised) for o in outcomes] == [False] * (len(ids) - 1) + [True]
    last = outcomes[-1]
    assert last is not None and last.task_status == expected and last.partial is partial
    task = store.get_task("t")
    assert task is not None and task["status"] == expected and task["progress"] == 100.0
    assert_aware_utc(task["completed_at"])
    if partial:
        assert task["error"] == "partially completed: 1 of 3 images failed"
        assert is_partial(task)
    elif expected == Status.COMPLETED:
        assert task["error"] is None
    assert store.finalise_task("t") is None  # already final: never twice


def test_final_task_status_function() -> None:
    base = {"total_images": 4, "completed_images": 0, "failed_images": 0, "cancelled_images": 0}
    assert final_task_status({**base, "completed_images": 4}) == (Status.COMPLETED, None)
    assert final_task_status({**base, "completed_images": 4, "cancel_requested": True})[0] == Status.COMPLETED
    assert final_task_status({**base, "completed_images": 3, "cancelled_images": 1})[0] == Status.CANCELLED
    assert final_task_status({**base, "failed_images": 4, "cancel_requested": True})[0] == Status.CANCELLED
    assert final_task_status({**base, "failed_images": 4})[0] == Status.FAILED
    assert final_task_status({**base, "completed_images": 1, "failed_images": 3}) == (
        Status.COMPLETED,
        "partially completed: 3 of 4 images failed",
    )


def test_finalise_task_repairs_a_complete_task(store: Store) -> None:
    ids = make_task(store, "t", 2)
    store.finish_subtask(ids[0], Status.COMPLETED)
    assert store.finalise_task("t") is None  # not complete yet
    assert store.finish_subtask(ids[1], Status.COMPLETED).finalised  # type: ignore[union-attr]
    assert store.finalise_task("t") is None
    assert store.finalise_task("missing") is None


# --- cancel --------------------------------------------------------------------------------------------


def test_cancel_moves_pending_to_cancelled_and_finalises_when_all_terminal(store: Store) -> None:
    ids = make_task(store, "t", 6)
    store.mark_task_running("t")
    store.finish_subtask(ids[0], Status.COMPLETED)
    store.start_subtask(ids[1])  # running: its job is not polled further, finished by its actor
    assert store.is_cancel_requested("t") is False
    assert store.request_cancel("t") == 4
    assert store.is_cancel_requested("t") is True
    assert store.count_subtasks("t") == {
        Status.PENDING: 0,
        Status.PROCESSING: 1,
        Status.COMPLETED: 1,
        Status.FAILED: 0,
        Status.CANCELLED: 4,
    }
    task = store.get_task("t")
    assert task["status"] == Status.PROCESSING and task["cancelled_images"] == 4 and task["processed_images"] == 5  # type: ignore[index]
    assert store.request_cancel("t") == 0  # idempotent
    assert store.start_subtask(ids[2]) is None  # cancelled is terminal
    last = store.finish_subtask(ids[1], Status.CANCELLED)
    assert last is not None and last.changed and last.finalised and last.task_status == Status.CANCELLED
    task = store.get_task("t")
    assert task["status"] == Status.CANCELLED and task["completed_images"] == 1  # type: ignore[index]
    recount = store.recount("t")
    assert counters(task) == {k: recount[k] for k in counters(task)}  # type: ignore[arg-type]


def test_cancel_of_all_pending_finalises_in_the_cancel_call(store: Store) -> None:
    make_task(store, "t", 3)
    outcome = store.cancel_task("t")
    assert outcome.found and outcome.cancelled == 3 and outcome.finalised and outcome.task_status == Status.CANCELLED
    assert store.get_task("t")["status"] == Status.CANCELLED  # type: ignore[index]
    again = store.cancel_task("t")
    assert again.cancelled == 0 and not again.finalised


def test_cancel_before_expansion(store: Store) -> None:
    store.create_task(task_doc("t", 2))
    outcome = store.cancel_task("t")
    assert outcome.finalised and outcome.cancelled == 0 and outcome.task_status == Status.CANCELLED
    # The master expands late, then sees the flag and cancels again: counted, never finalised twice.
    assert store.insert_subtasks("t", sub_docs("t", 2)) == 2
    assert store.is_cancel_requested("t")
    late = store.cancel_task("t")
    assert late.cancelled == 2 and not late.finalised
    task = store.get_task("t")
    assert task["status"] == Status.CANCELLED and task["cancelled_images"] == 2  # type: ignore[index]
    assert store.request_cancel("missing") == 0
    assert store.cancel_task("missing").found is False
    assert store.is_cancel_requested("missing") is False


def test_cancel_racing_finishers(make_store: StoreFactory) -> None:
    s = make_store()
    ids = make_task(s, "t", 60)
    barrier = threading.Barrier(4)
    finalisers: list[str | None] = []

    def finisher(seed: int) -> None:
        handle = make_store()
        order = ids[:]
        random.Random(seed).shuffle(order)
        barrier.wait()
        for sid in order:
            o = handle.finish_subtask(sid, Status.COMPLETED)
            if o and o.finalised:
                finalisers.append(o.task_status)

    def canceller() -> None:
        handle = make_store()
        barrier.wait()
        o = handle.cancel_task("t")
        if o.finalised:
            finalisers.append(o.task_status)

    threads = [threading.Thread(target=finisher, args=(i,)) for i in range(3)] + [threading.Thread(target=canceller)]
    with tight_thread_switching():
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert len(finalisers) == 1
    task = s.get_task("t")
    recount = s.recount("t")
    assert counters(task) == {k: recount[k] for k in counters(task)}  # type: ignore[arg-type]
    assert task["processed_images"] == 60 and task["status"] == finalisers[0]  # type: ignore[index]


# --- the sweep -----------------------------------------------------------------------------------------


def test_find_stale_subtasks(store: Store) -> None:
    ids = make_task(store, "t", 4)
    store.start_subtask(ids[0])
    store.start_subtask(ids[1])
    time.sleep(0.005)
    cut = utcnow()
    time.sleep(0.005)
    store.start_subtask(ids[2])
    time.sleep(0.005)
    store.record_poll(ids[1])  # progress: no longer stale, and now the most recently updated
    store.start_subtask(ids[3])
    store.finish_subtask(ids[3], Status.COMPLETED)
    stale = store.find_stale_subtasks(cut, limit=10)
    assert [s["id"] for s in stale] == [ids[0]]
    assert_aware_utc(stale[0]["updated_at"])
    later = datetime.now(UTC) + timedelta(seconds=1)
    assert [s["id"] for s in store.find_stale_subtasks(later, limit=10)] == [ids[0], ids[2], ids[1]]
    assert len(store.find_stale_subtasks(later, limit=2)) == 2
    naive = (later.replace(tzinfo=None), cut - timedelta(hours=1))
    assert len(store.find_stale_subtasks(naive[0])) == 3  # a naive time is taken as UTC
    assert store.find_stale_subtasks(naive[1]) == []


# --- opening -------------------------------------------------------------------------------------------


def test_open_store_picks_sqlite_or_mongo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sqlite = open_store(data_dir=tmp_path)
    assert isinstance(sqlite, SQLiteStore) and sqlite.path == tmp_path / "nietest.sqlite3"
    sqlite.close()

    made: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def fake_client(*args: Any, **kwargs: Any) -> mongomock.MongoClient:
        made.append((args, kwargs))
        return mongomock.MongoClient()

    monkeypatch.setattr("pymongo.MongoClient", fake_client)
    by_uri = open_store(
        data_dir=tmp_path, mongo_uri="mongodb://u:p@db.example:27017", mongo_db="x", task_collection="tk"
    )
    assert isinstance(by_uri, MongoStore) and by_uri.tasks.name == "tk" and by_uri.db.name == "x"
    assert made[-1][0] == ("mongodb://u:p@db.example:27017",)
    by_uri.close()
    by_host = open_store(
        data_dir=tmp_path, mongo_host="db.example", mongo_port=27018, mongo_user="u", mongo_password="p"
    )
    assert isinstance(by_host, MongoStore) and by_host.subtasks.name == "subtasks" and by_host.db.name == "task_db"
    assert made[-1][1]["host"] == "db.example" and made[-1][1]["port"] == 27018 and made[-1][1]["username"] == "u"
    by_host.close()


def test_sqlite_is_wal_and_survives_reopen(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path)
    make_task(s, "t", 2)
    assert s.connection().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    s.close()
    with pytest.raises(store_base.StoreError):
        s.get_task("t")
    with SQLiteStore(tmp_path) as again:
        assert again.count_subtasks("t")[Status.PENDING] == 2


def test_fail_task_is_conditional(store) -> None:
    store.create_task({"id": "tf1", "name": "t", "total_images": 2})
    assert store.fail_task("tf1", "master crashed: boom") is True
    task = store.get_task("tf1")
    assert task["status"] == Status.FAILED and task["error"] == "master crashed: boom" and task["completed_at"]
    assert store.fail_task("tf1", "again") is False
    assert store.get_task("tf1")["error"] == "master crashed: boom"
    assert store.fail_task("missing", "x") is False


def test_sqlite_file_from_before_task_state(tmp_path: Path) -> None:
    """A data file whose tasks keep their counters in the document only (written before the
    `task_state` table existed) opens with those counters, and its tasks finish and finalise."""
    s = SQLiteStore(tmp_path)
    ids = make_task(s, "t", 3)
    s.connection().execute("DROP TABLE task_state")  # the file as an earlier version left it
    s.connection().execute(
        "UPDATE tasks SET status = ?, doc = json_set(doc, '$.status', ?, '$.processed_images', 1,"
        " '$.completed_images', 1, '$.progress', 33.33, '$.cancel_requested', json('false')) WHERE id = 't'",
        (Status.PROCESSING, Status.PROCESSING),
    )
    s.connection().execute("UPDATE subtasks SET status = ? WHERE id = ?", (Status.COMPLETED, ids[0]))
    s.close()
    with SQLiteStore(tmp_path) as again:
        task = again.get_task("t")
        assert task is not None and task["status"] == Status.PROCESSING and task["progress"] == 33.33
        assert counters(task) == {
            "total_images": 3,
            "processed_images": 1,
            "completed_images": 1,
            "failed_images": 0,
            "cancelled_images": 0,
        }
        assert not again.is_cancel_requested("t")
        assert again.finish_subtask(ids[1], Status.COMPLETED, result="https://img/1.png").finalised is False  # type: ignore[union-attr]
        last = again.finish_subtask(ids[2], Status.FAILED, error="boom")
        assert last is not None and last.finalised and last.task is not None
        assert (
            last.task["status"] == Status.COMPLETED
            and last.task["completed_images"] == 2
            and last.task["progress"] == 100.0
        )
        assert again.list_tasks()[0]["processed_images"] == 3


def test_get_subtask_for_work_reads_the_subtask_and_its_tasks_cancel_flag(store: Store) -> None:
    ids = make_task(store, "t", 2)
    sub, cancel = store.get_subtask_for_work(ids[0])
    assert sub is not None and sub["id"] == ids[0] and sub["status"] == Status.PENDING and cancel is False
    assert store.start_subtask(ids[0]) is not None
    store.cancel_task("t")  # cancels the pending one; the processing one is left to its worker
    sub, cancel = store.get_subtask_for_work(ids[0])
    assert sub is not None and sub["status"] == Status.PROCESSING and cancel is True
    assert store.get_subtask_for_work("missing") == (None, False)


# --- retry (nietest retry) and paging ------------------------------------------------------------------


def finished_task(store: Store, task_id: str, outcomes: list[str]) -> list[str]:
    """A task whose subtasks ended as `outcomes` (each with a job, a seed and, failing, an error)."""
    ids = make_task(store, task_id, len(outcomes))
    store.mark_task_running(task_id)
    for i, (sid, status) in enumerate(zip(ids, outcomes, strict=True)):
        if status != Status.CANCELLED:
            store.start_subtask(sid)
            store.record_job(sid, f"job-{i}", 1000 + i)
        result = f"https://img/{i}.png" if status == Status.COMPLETED else None
        store.finish_subtask(sid, status, result=result, error=None if status == Status.COMPLETED else f"boom {i}")
    return ids


def test_new_documents_start_in_round_1(store: Store) -> None:
    make_task(store, "t", 1)
    assert store.get_task("t")["round"] == 1  # type: ignore[index]
    sub = store.get_subtask(sub_ids("t", 1)[0])
    assert sub is not None and sub["round"] == 1 and sub["error_history"] == []


@pytest.mark.parametrize("round_value", ["missing", 1, 3, 0, -2, True, 2.5, "2"])
@pytest.mark.parametrize("ended", [Status.FAILED, Status.CANCELLED])
def test_the_sql_history_entry_is_the_python_one(tmp_path: Path, round_value: object, ended: Status) -> None:
    """SQLite builds a retry's `error_history` entry in SQL (`HISTORY_ENTRY_SQL`), MongoDB in Python
    (`history_entry`): both from `HISTORY_FIELDS`, and equal field by field, odd rounds included."""
    s = SQLiteStore(tmp_path)
    (sid,) = finished_task(s, "t", [ended])
    conn = s.connection()
    if round_value == "missing":  # a document written before rounds existed
        conn.execute("UPDATE subtasks SET doc = json_remove(doc, '$.round') WHERE id = ?", (sid,))
    else:
        conn.execute(
            "UPDATE subtasks SET doc = json_set(doc, '$.round', json(?)) WHERE id = ?", (json.dumps(round_value), sid)
        )
    sub = s.get_subtask(sid)
    assert sub is not None
    (text,) = conn.execute(f"SELECT {HISTORY_ENTRY_SQL} FROM subtasks WHERE id = ?", (sid,)).fetchone()
    in_sql, in_python = json.loads(text), store_base.history_entry(sub)
    assert list(in_sql) == list(in_python) == list(store_base.HISTORY_FIELDS)
    for key in store_base.HISTORY_FIELDS:
        assert (key, in_sql[key]) == (key, in_python[key])
    expected_round = round_value if type(round_value) is int and round_value > 0 else 1
    assert in_python["status"] == ended and in_python["round"] == expected_round
    if ended == Status.FAILED:  # it ran: every field has a value
        assert all(value is not None for value in in_python.values()), in_python
    s.close()


def test_statuses_are_stored_and_shown_as_their_text(tmp_path: Path) -> None:
    """A `Status` is a str: stored, sent as JSON or BSON and printed, it is the plain word."""
    s = SQLiteStore(tmp_path)
    (sid,) = finished_task(s, "t", [Status.FAILED])
    row = s.connection().execute(
        "SELECT status, typeof(status), json_extract(doc, '$.status') FROM subtasks WHERE id = ?", (sid,)
    )
    assert row.fetchone() == ("failed", "text", "failed")
    assert type(s.get_subtask(sid)["status"]) is str  # type: ignore[index]
    s.close()
    assert json.dumps({Status.FAILED: [Status.CANCELLED]}) == '{"failed": ["cancelled"]}'
    assert json.dumps({"s": Status.PENDING}, indent=1) == '{\n "s": "pending"\n}'
    assert bson.decode(bson.encode({"status": Status.FAILED})) == {"status": "failed"}
    assert f"{Status.PROCESSING} {Status.COMPLETED!s}" == "processing completed"
    with pytest.raises(ValueError, match=r"got \['completed'\]"):  # the text, not the member's repr
        store_base.check_retryable([Status.COMPLETED])
    with pytest.raises(ValueError, match=r"got 'pending'$"):
        store_base.check_terminal(Status.PENDING)


def test_retry_runs_failed_subtasks_again_with_exact_counters(store: Store) -> None:
    ids = finished_task(
        store,
        "t",
        [Status.COMPLETED, Status.FAILED, Status.COMPLETED, Status.FAILED, Status.CANCELLED, Status.COMPLETED],
    )
    before = store.get_task("t")
    assert before is not None and before["status"] == Status.CANCELLED and before["processed_images"] == 6
    done_before = {sid: store.get_subtask(sid) for sid in (ids[0], ids[2], ids[5])}

    outcome = store.retry_subtasks("t", [Status.FAILED])
    assert outcome.found and outcome.reopened and outcome.reset == 2 and outcome.round == 2
    assert outcome.status == Status.CANCELLED  # as the call found it
    task = store.get_task("t")
    assert task is not None and outcome.task is not None and outcome.task["status"] == Status.PROCESSING
    assert task["status"] == Status.PROCESSING and task["round"] == 2
    assert counters(task) == {
        "total_images": 6,
        "processed_images": 4,
        "completed_images": 3,
        "failed_images": 0,
        "cancelled_images": 1,
    }
    assert task["progress"] == 66.67 and task["completed_at"] is None and task["error"] is None
    assert counters(task) == {**store.recount("t")}
    for i in (1, 3):
        sub = store.get_subtask(ids[i])
        assert sub is not None and sub["status"] == Status.PENDING and sub["round"] == 2
        assert (sub["job_uuid"], sub["result"], sub["error"], sub["attempts"], sub["poll_count"]) == (
            None,
            None,
            None,
            0,
            0,
        )
        assert sub["started_at"] is None and sub["completed_at"] is None
        assert sub["seed"] == 1000 + i  # the same image is made again
        [entry] = sub["error_history"]
        assert entry["round"] == 1 and entry["status"] == Status.FAILED and entry["error"] == f"boom {i}"
        assert entry["job_uuid"] == f"job-{i}" and entry["seed"] == 1000 + i
        assert isinstance(entry["completed_at"], str) and entry["completed_at"].startswith("20")
    for sid, doc in done_before.items():  # nothing else runs again
        assert store.get_subtask(sid) == doc
    assert store.get_subtask(ids[4])["status"] == Status.CANCELLED  # type: ignore[index]

    # Refused while the task runs; the round's subtasks finish and count as usual.
    assert store.retry_subtasks("t", [Status.FAILED, Status.CANCELLED]).reopened is False
    assert store.finish_subtask(ids[1], Status.COMPLETED, result="https://img/1b.png").finalised is False  # type: ignore[union-attr]
    last = store.finish_subtask(ids[3], Status.FAILED, error="boom again")
    assert last is not None and last.finalised and last.task is not None and last.task["round"] == 2
    assert last.task["status"] == Status.CANCELLED  # one image is still cancelled

    # Round 3: the cancelled one and the one that failed again.
    outcome = store.retry_subtasks("t", [Status.CANCELLED, Status.FAILED])
    assert outcome.reopened and outcome.reset == 2 and outcome.round == 3
    assert [e["error"] for e in store.get_subtask(ids[3])["error_history"]] == ["boom 3", "boom again"]  # type: ignore[index]
    assert [e["status"] for e in store.get_subtask(ids[4])["error_history"]] == [Status.CANCELLED]  # type: ignore[index]
    store.finish_subtask(ids[3], Status.COMPLETED, result="https://img/3c.png")
    last = store.finish_subtask(ids[4], Status.COMPLETED, result="https://img/4c.png")
    assert last is not None and last.finalised and last.task_status == Status.COMPLETED
    task = store.get_task("t")
    assert task is not None and task["error"] is None and task["progress"] == 100.0 and task["round"] == 3
    assert (
        counters(task)
        == {**store.recount("t")}
        == {
            "total_images": 6,
            "processed_images": 6,
            "completed_images": 6,
            "failed_images": 0,
            "cancelled_images": 0,
        }
    )


def test_retry_refusals(store: Store) -> None:
    assert store.retry_subtasks("missing").found is False
    ids = make_task(store, "t", 2)
    pending = store.retry_subtasks("t")
    assert pending.found and not pending.reopened and pending.status == Status.PENDING
    store.mark_task_running("t")
    store.finish_subtask(ids[0], Status.FAILED, error="x")
    running = store.retry_subtasks("t")
    assert not running.reopened and running.status == Status.PROCESSING and running.reset == 0
    assert store.get_subtask(ids[0])["status"] == Status.FAILED  # type: ignore[index]
    store.finish_subtask(ids[1], Status.COMPLETED)
    nothing = store.retry_subtasks("t", [Status.CANCELLED])  # no cancelled subtask: nothing changes
    assert nothing.found and not nothing.reopened and nothing.reset == 0
    assert store.get_task("t")["status"] == Status.COMPLETED and store.get_task("t")["round"] == 1  # type: ignore[index]
    with pytest.raises(ValueError, match="failed"):
        store.retry_subtasks("t", [Status.COMPLETED])
    with pytest.raises(ValueError):
        store.retry_subtasks("t", [])


def test_retry_cancelled_subtasks_of_a_cancelled_task_clears_the_cancel(store: Store) -> None:
    ids = make_task(store, "t", 3)
    store.mark_task_running("t")
    store.finish_subtask(ids[0], Status.COMPLETED)
    assert store.cancel_task("t").finalised
    assert store.is_cancel_requested("t")
    outcome = store.retry_subtasks("t", [Status.CANCELLED])
    assert outcome.reopened and outcome.reset == 2
    assert not store.is_cancel_requested("t")  # else the pipeline would cancel them at once
    task = store.get_task("t")
    assert task is not None and task["cancel_requested"] is False and task["cancelled_images"] == 0


def test_concurrent_retries_reopen_the_task_once(make_store: StoreFactory) -> None:
    store = make_store()
    finished_task(store, "t", [Status.FAILED] * 40 + [Status.COMPLETED] * 10)
    handles = [make_store() for _ in range(4)]
    barrier = threading.Barrier(len(handles))
    outcomes = []

    def go(handle: Store) -> None:
        barrier.wait()
        outcomes.append(handle.retry_subtasks("t"))

    with tight_thread_switching():
        threads = [threading.Thread(target=go, args=(h,)) for h in handles]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sum(o.reopened for o in outcomes) == 1
    assert sum(o.reset for o in outcomes) == 40  # each subtask moved once
    task = store.get_task("t")
    assert task is not None and task["round"] == 2 and task["status"] == Status.PROCESSING
    assert counters(task) == {**store.recount("t")}
    assert all(len(s["error_history"]) == 1 for s in store.list_subtasks("t", status=Status.PENDING))


def test_mongo_retry_interrupted_after_the_subtasks_is_finished_by_the_next_call() -> None:
    """With MongoDB the subtasks move before the task: a process that dies in between leaves them
    pending under a finished task, and running the retry again goes on from there."""
    db = FaultyDatabase(mongomock.MongoClient().db)
    store = MongoStore(db)  # type: ignore[arg-type]
    ids = finished_task(store, "t", [Status.FAILED, Status.FAILED, Status.COMPLETED])
    db.fail(lambda call: call.collection == "tasks" and call.method == "find_one_and_update", AutoReconnect("died"))
    with pytest.raises(StoreUnavailable):
        store.retry_subtasks("t")
    assert store.get_task("t")["status"] == Status.COMPLETED  # type: ignore[index]
    assert store.count_subtasks("t")[Status.PENDING] == 2
    outcome = store.retry_subtasks("t")
    assert outcome.reopened and outcome.reset == 0 and outcome.round == 2
    task = store.get_task("t")
    assert task is not None and counters(task) == {**store.recount("t")} and task["failed_images"] == 0
    assert all(len(store.get_subtask(i)["error_history"]) == 1 for i in ids[:2])  # type: ignore[index]


def test_iter_subtasks_pages_through_a_task_in_id_order(store: Store) -> None:
    ids = make_task(store, "t", 2345)
    make_task(store, "u", 3)
    assert [s["id"] for s in store.iter_subtasks("t", batch=1000)] == ids
    assert [s["id"] for s in store.iter_subtasks("t", batch=2345)] == ids
    assert [s["id"] for s in store.list_subtasks("t", limit=3, after=ids[10])] == ids[11:14]
    store.finish_subtask(ids[5], Status.FAILED, error="x")
    store.finish_subtask(ids[2000], Status.FAILED, error="y")
    assert [s["id"] for s in store.iter_subtasks("t", status=Status.FAILED, batch=1)] == [ids[5], ids[2000]]
    assert list(store.iter_subtasks("missing")) == []


# --- lost increments, exact retries ---------------------------------------------------------------------


def is_task_increment(call: Call) -> bool:
    """The Mongo store's write that counts finished subtasks on their task."""
    return call.collection == "tasks" and isinstance(call.update, dict) and "$inc" in call.update


def lose_the_count(make_store: StoreFactory, store: Store, subtask_id: str, status: Status) -> None:
    """Leave the subtask terminal but uncounted, as a finisher that died (or lost its connection for
    good) between its two writes leaves it with MongoDB. SQLite's finish is one transaction and
    cannot be cut in two: there the test writes the subtask's row itself."""
    if make_store.db is not None:
        make_store.db.fail(is_task_increment, AutoReconnect("connection lost between the finish's two writes"))
        with pytest.raises(StoreUnavailable):
            store.finish_subtask(subtask_id, status)
        return
    if isinstance(store, PostgresStore):
        with store.connection() as conn:
            conn.execute(
                "UPDATE subtasks SET status = %s, updated_at = %s, completed_at = %s WHERE id = %s",
                (status, utcnow(), utcnow(), subtask_id),
            )
        return
    assert isinstance(store, SQLiteStore)
    now = iso_text(utcnow())
    store.connection().execute(
        "UPDATE subtasks SET status = ?, updated_at = ?, doc = json_set(doc, '$.status', ?, '$.updated_at', ?,"
        " '$.completed_at', ?) WHERE id = ?",
        (status, now, status, now, now, subtask_id),
    )


def assert_exact(store: Store, task_id: str) -> dict[str, Any]:
    """The task's counters are its subtasks' recount; the task."""
    task = store.get_task(task_id)
    assert task is not None
    recount = store.recount(task_id)
    assert {k: task[k] for k in COUNTER_FIELDS} == {k: recount[k] for k in COUNTER_FIELDS}, (task_id, task["status"])
    return task


def test_prepare_can_run_again(make_store: StoreFactory) -> None:
    """The daemon prepares the store at every start (the factory did once already)."""
    store = make_store()
    store.prepare()
    make_task(store, "t", 2)
    assert [s["id"] for s in store.list_subtasks("t")] == sub_ids("t", 2)


def test_a_lost_increment_is_repaired_once_the_grace_has_passed(make_store: StoreFactory) -> None:
    """A finish whose `$inc` never landed leaves its task `processing` for ever unless repaired:
    the repair pass sets the counters to the recount and finalises the task, once, but only once
    no subtask of the task has moved within the grace (a finisher may be between its two writes)."""
    store = make_store()
    ids = make_task(store, "t", 4)
    store.mark_task_running("t")
    store.finish_subtask(ids[0], Status.COMPLETED, result="https://img/0.png")
    store.finish_subtask(ids[1], Status.COMPLETED, result="https://img/1.png")
    store.finish_subtask(ids[2], Status.COMPLETED, result="https://img/2.png")
    time.sleep(0.005)
    cut = utcnow()
    time.sleep(0.005)
    lose_the_count(make_store, store, ids[3], Status.FAILED)
    assert store.get_subtask(ids[3])["status"] == Status.FAILED  # type: ignore[index]
    again = store.finish_subtask(ids[3], Status.FAILED)  # the redelivered message: nothing to count
    assert again is not None and not again.changed
    task = store.get_task("t")
    assert task is not None and task["status"] == Status.PROCESSING and task["processed_images"] == 3
    assert store.finalise_task("t") is None  # its counters are short: nothing else would end it

    # The task was last counted before `cut`, its last subtask moved after it: within the grace.
    assert store.repair_counts(cut) == []
    assert store.repair_counts(cut - timedelta(hours=1)) == []
    [repair] = store.repair_counts(utcnow() + timedelta(seconds=1))
    assert repair.task_id == "t" and repair.finalised and repair.task_status == Status.COMPLETED
    assert repair.before["processed_images"] == 3 and repair.before["failed_images"] == 0
    assert repair.after == {"processed_images": 4, "completed_images": 3, "failed_images": 1, "cancelled_images": 0}
    assert repair.task is not None and repair.task["status"] == Status.COMPLETED and is_partial(repair.task)
    task = assert_exact(store, "t")
    assert task["status"] == Status.COMPLETED and task["progress"] == 100.0
    assert task["error"] == "partially completed: 1 of 4 images failed"
    assert_aware_utc(task["completed_at"])
    assert store.repair_counts(utcnow() + timedelta(seconds=1)) == []  # once
    assert store.finalise_task("t") is None


def test_the_repair_waits_for_a_task_with_work_left(make_store: StoreFactory) -> None:
    """Short counters with a subtask still pending or processing: the task is not done, so its
    counters are left to the finishes to come (the last of them does not finalise: the repair does,
    after it). Exact counters and finished tasks are never touched."""
    store = make_store()
    ids = make_task(store, "t", 3)
    store.mark_task_running("t")
    lose_the_count(make_store, store, ids[0], Status.COMPLETED)
    store.start_subtask(ids[1])
    later = utcnow() + timedelta(seconds=1)
    assert store.repair_counts(later) == []
    store.finish_subtask(ids[1], Status.COMPLETED)
    assert store.repair_counts(utcnow() + timedelta(seconds=1)) == []  # ids[2] still pending
    last = store.finish_subtask(ids[2], Status.CANCELLED)
    assert last is not None and last.changed and not last.finalised
    [repair] = store.repair_counts(utcnow() + timedelta(seconds=1))
    assert repair.finalised and repair.task_status == Status.CANCELLED
    assert_exact(store, "t")

    exact = make_task(store, "u", 2)
    store.mark_task_running("u")
    store.finish_subtask(exact[0], Status.COMPLETED)
    finished = make_task(store, "v", 1)
    store.finish_subtask(finished[0], Status.COMPLETED)
    assert store.repair_counts(utcnow() + timedelta(seconds=1)) == []
    assert store.get_task("u")["status"] == Status.PROCESSING  # type: ignore[index]


def test_retry_is_refused_while_a_subtask_is_processing(store: Store) -> None:
    """A task failed by its master can still have a subtask processing: its finish may be between
    its two writes, so the retry waits until it has ended, changing nothing meanwhile."""
    ids = make_task(store, "t", 3)
    store.mark_task_running("t")
    store.finish_subtask(ids[0], Status.FAILED, error="boom")
    store.start_subtask(ids[1])
    store.finish_subtask(ids[2], Status.COMPLETED)
    assert store.fail_task("t", "master crashed")
    refused = store.retry_subtasks("t")
    assert refused.found and not refused.reopened and refused.reset == 0
    assert refused.status == Status.FAILED and refused.processing == 1
    assert store.get_subtask(ids[0])["status"] == Status.FAILED  # type: ignore[index]
    store.finish_subtask(ids[1], Status.FAILED, error="late")
    outcome = store.retry_subtasks("t")
    assert outcome.reopened and outcome.reset == 2 and outcome.processing == 0
    task = assert_exact(store, "t")
    assert task["status"] == Status.PROCESSING and task["processed_images"] == 1 and task["failed_images"] == 0


def test_retry_moves_exactly_and_counts_by_difference(store: Store) -> None:
    """The retry takes off the counters exactly the subtasks it moved: a count that was already
    short stays short by as much (the repair pass, not the retry, puts it right), never reset."""
    ids = finished_task(store, "t", [Status.FAILED, Status.CANCELLED, Status.COMPLETED, Status.FAILED])
    before = store.get_task("t")
    assert before is not None
    outcome = store.retry_subtasks("t", [Status.FAILED, Status.CANCELLED])
    assert outcome.reopened and outcome.reset == 3
    task = assert_exact(store, "t")
    assert task["processed_images"] == before["processed_images"] - 3
    assert (task["failed_images"], task["cancelled_images"], task["completed_images"]) == (0, 0, 1)
    assert task["progress"] == 25.0
    for sid in (ids[0], ids[1], ids[3]):
        store.finish_subtask(sid, Status.COMPLETED)
    assert assert_exact(store, "t")["status"] == Status.COMPLETED


def _interleaving_case(store: Store, task_id: str, target: str) -> tuple[str, Status]:
    """A finished task for the finisher-and-retry races: the subtask a finisher ends meanwhile,
    and how. `processing`: a task failed by its master with one subtask still running, which
    ends failed (so the retry may take it too); `retried`: a stale message ends a failed subtask,
    which only moves if the retry made it pending first."""
    outcomes = [Status.COMPLETED, Status.FAILED, Status.FAILED, Status.FAILED]
    if target == "processing":
        ids = make_task(store, task_id, 4)
        store.mark_task_running(task_id)
        store.finish_subtask(ids[0], Status.COMPLETED)
        store.finish_subtask(ids[1], Status.FAILED, error="boom")
        store.finish_subtask(ids[3], Status.FAILED, error="boom")
        store.start_subtask(ids[2])
        assert store.fail_task(task_id, "master crashed")
        return ids[2], Status.FAILED
    ids = finished_task(store, task_id, outcomes)
    return ids[1], Status.COMPLETED


@pytest.mark.parametrize("target", ["processing", "retried"])
def test_a_finisher_and_a_retry_in_every_order(make_store: StoreFactory, target: str) -> None:
    """Every interleaving of one finish's writes with a retry's (MongoDB: each collection call is a
    step; SQLite: each operation is one transaction, so the two orders). After each, the counters
    equal the recount; then the round runs to its end and is finalised exactly once, exactly."""
    store = make_store()
    db = make_store.db
    wanted = [Status.FAILED]

    def steps(run: Callable[[], Any]) -> int:
        if db is None:
            run()
            return 1
        since = len(db.calls)
        run()
        return len(db.calls) - since

    # The steps of each, alone, before and after the other: enough turns for every order.
    sid, ends = _interleaving_case(store, "solo-1", target)
    finish_first = steps(lambda: store.finish_subtask(sid, ends))
    retry_second = steps(lambda: store.retry_subtasks("solo-1", wanted))
    sid, ends = _interleaving_case(store, "solo-2", target)
    retry_first = steps(lambda: store.retry_subtasks("solo-2", wanted))
    finish_second = steps(lambda: store.finish_subtask(sid, ends))
    orders = list(interleavings(retry=max(retry_first, retry_second), finish=max(finish_first, finish_second)))
    assert len(orders) > 1
    for n, order in enumerate(orders):
        task_id = f"o{n}"
        sid, ends = _interleaving_case(store, task_id, target)
        work = {
            "retry": lambda task_id=task_id: store.retry_subtasks(task_id, wanted),
            "finish": lambda sid=sid, ends=ends: store.finish_subtask(sid, ends),
        }
        if db is None:
            for name in order:
                work[name]()
        else:
            db.turns = Turns(order)
            try:
                db.turns.run(**work)
            finally:
                db.turns = None
        assert_exact(store, task_id)
        finalised = 0
        for sub in store.list_subtasks(task_id, status=[Status.PENDING, Status.PROCESSING]):
            outcome = store.finish_subtask(sub["id"], Status.COMPLETED)
            finalised += bool(outcome and outcome.finalised)
        task = assert_exact(store, task_id)
        assert task["status"] in TERMINAL, (order, task["status"])
        assert finalised == (1 if task["round"] == 2 else 0), order
        if db is not None:  # mongomock reads every document for every query: keep the collections small
            db.db.tasks.delete_many({})
            db.db.subtasks.delete_many({})


# --- size ----------------------------------------------------------------------------------------------


def test_a_task_just_under_the_size_limit_is_stored_and_read_back(store: Store) -> None:
    """The largest task the task format takes (domain/task_size.py: 8 MiB stored) fits in every
    store: MongoDB refuses a document over 16 MiB of BSON, as the wrapper does (pymongo's
    `DocumentTooLarge`), which the previous version's document of this task, its variable values
    stored twice, passed (tests/test_task_size.py)."""
    task = validate_task(task_just_under_the_limit())
    store.create_task({"id": "big", **task.to_document()})
    got = store.get_task("big")
    assert got is not None and Task.from_document(got) == task
    assert store.list_tasks(limit=1)[0]["id"] == "big"
