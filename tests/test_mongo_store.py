"""The MongoDB store as a real server would treat it: indexes, privileges, round trips, faults.

The store contract (tests/test_store_contract.py) runs on both stores; this file holds what only
MongoDB has: which index serves each query, who builds the indexes, how many round trips a
cancel and a retry take, and a finish cut in two under the whole pipeline. mongomock stands in
for the server behind `testing.mongo_faults` (atomic calls, recorded, failing on demand).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import dramatiq
import dramatiq.broker
import mongomock
import pytest
from pymongo.errors import AutoReconnect

from nietest_daemon.core import settings as settings_module
from nietest_daemon.domain import taskspec
from nietest_daemon.domain.lifecycle import TERMINAL, Status
from nietest_daemon.domain.subtask import Subtask
from nietest_daemon.internals.dramatiq_redis import bodies_key
from nietest_daemon.pipeline import context as context_module
from nietest_daemon.pipeline.broker import build_broker
from nietest_daemon.pipeline.context import Context, build_context
from nietest_daemon.pipeline.retry import RetryRefused, retry_task
from nietest_daemon.pipeline.subtasks import finish
from nietest_daemon.pipeline.sweep import sweep
from nietest_daemon.programs import cli
from nietest_daemon.programs import daemon as daemon_program
from nietest_daemon.programs.metrics import Probe
from nietest_daemon.store import Store, StoreUnavailable, utcnow
from nietest_daemon.store.mongo import INDEXES, MongoStore
from nietest_daemon.testing.mongo_faults import Call, FaultyClient, FaultyDatabase
from nietest_daemon.testing.task_documents import fixed_prompt, task_document, variable_prompt
from nietest_daemon.testing.valkey import PrivateValkey

Index = list[tuple[str, int]]


def new_store() -> tuple[MongoStore, FaultyDatabase]:
    db = FaultyDatabase(mongomock.MongoClient().db)
    store = MongoStore(db)  # type: ignore[arg-type]
    store.prepare()
    return store, db


def stored_campaign(store: Store, task_id: str, styles: int = 3) -> list[str]:
    """A valid task (report and export read its dimensions) expanded into its subtasks."""
    doc = task_document("campaign", [fixed_prompt("1girl"), variable_prompt("style", [f"s{i}" for i in range(styles)])])
    task = taskspec.validate_task(doc)
    store.create_task({"id": task_id, **task.to_document()})
    subs = [{"id": spec.subtask_id(task_id), **spec.as_dict()} for spec in taskspec.expand(task)]
    assert store.insert_subtasks(task_id, subs) == len(subs)
    return [s["id"] for s in subs]


def indexes_of(db: FaultyDatabase, collection: str) -> list[list[tuple[str, int]]]:
    return [list(info["key"]) for info in db.db[collection].index_information().values()]


def test_only_prepare_builds_indexes_and_it_retires_the_old_ones() -> None:
    db = FaultyDatabase(mongomock.MongoClient().db)
    for keys in ([("task_id", 1), ("status", 1)], [("created_at", -1)]):  # as an earlier version built them
        db.db.tasks.create_index(keys) if keys[0][0] == "created_at" else db.db.subtasks.create_index(keys)
    store = MongoStore(db)  # type: ignore[arg-type]
    stored_campaign(store, "t")
    store.list_tasks()
    assert not [c for c in db.calls if c.method.startswith("create_index")]
    store.prepare()
    store.prepare()  # at every daemon start: nothing more to build
    for name, wanted in INDEXES.items():
        assert sorted(indexes_of(db, name)) == sorted([[("_id", 1)], *(list(keys) for keys in wanted)])


# --- a read-only user ------------------------------------------------------------------------------------


class ReadOnlyMongo:
    """MONGO_URI set; every client the code makes (`made`) is one mongomock server's, whose user
    may read and write documents but not build indexes. `seed`: a store to put data in first."""

    def __init__(self) -> None:
        self.server = mongomock.MongoClient()
        self.made: list[FaultyClient] = []
        self.seed = MongoStore(FaultyDatabase(self.server["task_db"]))  # type: ignore[arg-type]

    def client(self, *args: Any, **kwargs: Any) -> FaultyClient:
        self.made.append(FaultyClient(self.server))
        self.made[-1]["task_db"].deny_index_builds()
        return self.made[-1]

    def index_builds(self) -> list[Call]:
        return [c for m in self.made for c in m["task_db"].calls if c.method.startswith("create_index")]


@pytest.fixture
def read_only_mongo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> ReadOnlyMongo:
    mongo = ReadOnlyMongo()
    monkeypatch.setattr("pymongo.MongoClient", mongo.client)
    monkeypatch.setenv("NIETEST_HOME", str(tmp_path))
    monkeypatch.setenv("MONGO_URI", "mongodb://reader:s3cret-passw0rd@db.example:27017/task_db")
    return mongo


def test_a_read_only_user_runs_the_reading_commands(
    read_only_mongo: ReadOnlyMongo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`tasks`, `status TASK`, `report`, `export`, the metrics probe and a worker's context open
    the store without building an index (a user without `createIndex` gets `Unauthorized`)."""
    seed = read_only_mongo.seed
    ids = stored_campaign(seed, "t")
    seed.mark_task_running("t")
    for i, sid in enumerate(ids):
        seed.finish_subtask(sid, Status.COMPLETED, result=f"https://img/{i}.png")
    assert cli.run(["tasks"]) == 0
    assert "\nt " in capsys.readouterr().out
    assert cli.run(["status", "t"]) == 0
    assert "completed" in capsys.readouterr().out
    assert cli.run(["report", "t", "-o", str(tmp_path / "report.html")]) == 0
    assert "3 images" in capsys.readouterr().out
    assert cli.run(["export", "t", "--format", "jsonl"]) == 0
    exported = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(row["subtask_id"] for row in exported if "subtask_id" in row) == sorted(ids)
    assert (tmp_path / "report.html").read_text().count("https://img/") >= len(ids)
    settings = settings_module.load()
    probe = Probe(settings, "host")
    assert probe.store_error() is None
    worker = build_context(settings)
    assert worker.store.get_subtask(ids[0]) is not None
    worker.redis.close()
    assert len(read_only_mongo.made) >= 6 and read_only_mongo.index_builds() == []


def test_the_daemon_prepares_the_store_or_does_not_start(
    read_only_mongo: ReadOnlyMongo, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Indexes are built by `nietest daemon`, before it execs supervisord; if it cannot build them
    (here: a user without the privilege) it says so in one line, naming the store, and exits 1."""
    execs: list[Any] = []
    monkeypatch.setattr(daemon_program.os, "execve", lambda *a: execs.append(a))
    settings = settings_module.load()
    assert daemon_program.run(settings) == 1
    assert execs == []
    err = capsys.readouterr().err
    assert "mongodb mongodb://reader:***@db.example:27017/task_db" in err and "not authorized" in err
    assert "s3cret" not in err

    assert read_only_mongo.index_builds() != []  # it tried
    writable = FaultyClient(read_only_mongo.server)
    monkeypatch.setattr("pymongo.MongoClient", lambda *a, **k: writable)
    daemon_program.run(settings)
    assert len(execs) == 1
    assert [("task_id", 1), ("status", 1), ("_id", 1)] in indexes_of(writable["task_db"], "subtasks")


# --- round trips -----------------------------------------------------------------------------------------


def test_cancel_and_retry_move_subtasks_a_chunk_at_a_time() -> None:
    """A cancel of 300 pending subtasks and a retry of them, in chunks of 100 (1,000 by default):
    a few round trips per chunk (bench/store_round_trips.py counts 50,000), not one or more per
    subtask (900 and 300 before)."""
    store, db = new_store()
    n = 300
    store.create_task({"id": "t", "name": "t", "total_images": n})
    store.insert_subtasks("t", [{"id": f"t-{i:05d}"} for i in range(n)])
    store.mark_task_running("t")
    since = len(db.calls)
    outcome = store.cancel_task("t", chunk=100)
    assert outcome.cancelled == n and outcome.finalised and outcome.task_status == Status.CANCELLED
    assert len(db.calls) - since <= 20
    since = len(db.calls)
    retried = store.retry_subtasks("t", [Status.CANCELLED], chunk=100)
    assert retried.reopened and retried.reset == n
    assert len(db.calls) - since <= 20
    task = store.get_task("t")
    assert task is not None and task["processed_images"] == 0 and task["cancelled_images"] == 0
    assert task["progress"] == 0.0 and task["status"] == Status.PROCESSING


def test_a_cancel_whose_increment_was_lost_is_repaired() -> None:
    store, db = new_store()
    store.create_task({"id": "t", "name": "t", "total_images": 5})
    store.insert_subtasks("t", [{"id": f"t-{i}"} for i in range(5)])
    store.mark_task_running("t")
    store.finish_subtask("t-0", Status.COMPLETED)
    db.fail(lambda c: c.collection == "tasks" and "$inc" in (c.update or {}), AutoReconnect("failover"))
    with pytest.raises(StoreUnavailable):
        store.cancel_task("t")
    assert store.count_subtasks("t")[Status.CANCELLED] == 4
    assert store.cancel_task("t").cancelled == 0  # nothing pending: nothing more to count
    task = store.get_task("t")
    assert task is not None and task["status"] == Status.PROCESSING and task["processed_images"] == 1
    [repair] = store.repair_counts(utcnow() + timedelta(seconds=1))
    assert repair.finalised and repair.task_status == Status.CANCELLED
    assert repair.after == {"processed_images": 5, "completed_images": 1, "failed_images": 0, "cancelled_images": 4}


@pytest.mark.parametrize("applied", [False, True], ids=["before-the-move", "move-applied-reply-lost"])
def test_a_retry_cut_short_never_counts_a_subtask_twice(applied: bool) -> None:
    """A retry takes a moved subtask off the counters before it moves it: cut short anywhere, the
    counters can only fall short of the truth, which the repair pass puts right, and never run
    ahead of it, which would finalise the next round while subtasks are still to run."""
    store, db = new_store()
    store.create_task({"id": "t", "name": "t", "total_images": 4})
    store.insert_subtasks("t", [{"id": f"t-{i}"} for i in range(4)])
    store.mark_task_running("t")
    for i in range(4):
        store.finish_subtask(f"t-{i}", Status.FAILED if i else Status.COMPLETED, error="boom" if i else None)
    db.fail(lambda c: c.method == "bulk_write", AutoReconnect("failover"), applied=applied)
    with pytest.raises(StoreUnavailable):
        store.retry_subtasks("t")
    assert store.get_task("t")["status"] == Status.COMPLETED  # type: ignore[index]
    again = store.retry_subtasks("t")  # the operator runs it again
    assert again.reopened and again.round == 2
    finals = [store.finish_subtask(f"t-{i}", Status.COMPLETED) for i in range(1, 4)]
    task = store.get_task("t")
    assert task is not None and task["processed_images"] <= 4
    if task["status"] not in TERMINAL:  # short: the repair ends it
        assert not any(o and o.finalised for o in finals)
        [repair] = store.repair_counts(utcnow() + timedelta(seconds=1))
        assert repair.finalised
    else:
        assert sum(bool(o and o.finalised) for o in finals) == 1
    task = store.get_task("t")
    assert task is not None and task["status"] == Status.COMPLETED and task["completed_images"] == 4
    assert store.recount("t")["processed_images"] == task["processed_images"] == 4


# --- a finish cut in two, under the pipeline -------------------------------------------------------------


@dataclass
class MongoPipeline:
    """The pipeline's Context in this process, its store a `MongoStore` on a `FaultyDatabase`."""

    ctx: Context
    store: MongoStore
    db: FaultyDatabase

    def notices(self) -> list[tuple[str, list[Any]]]:
        """The `send_notice` messages waiting on the master queue: (actor, args)."""
        bodies = map(json.loads, self.ctx.redis.hvals(bodies_key(self.ctx.settings.queue("master").name)))
        return [(m["actor_name"], m["args"]) for m in bodies if m["actor_name"] == "send_notice"]

    def subtask(self, subtask_id: str) -> Subtask:
        doc = self.store.get_subtask(subtask_id)
        assert doc is not None
        return Subtask.from_doc(doc)


@pytest.fixture
def mongo_pipeline(valkey: PrivateValkey, short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MongoPipeline]:
    settings = settings_module.load({"NIETEST_HOME": str(short_tmp), "BROKER_REDIS_URL": valkey.url})
    monkeypatch.setattr(dramatiq.broker, "global_broker", dramatiq.broker.global_broker)
    broker = build_broker(settings)
    ctx = build_context(settings)
    ctx.store.close()
    store, db = new_store()
    ctx.store = store
    monkeypatch.setattr(context_module, "_context", ctx)
    yield MongoPipeline(ctx, store, db)
    ctx.redis.close()
    broker.close()


def test_a_lost_increment_ends_its_task_with_one_final_notice(mongo_pipeline: MongoPipeline) -> None:
    """The `$inc` of a finish fails after its subtask's move (a failover, or a kill, between the two
    writes): the task stays `processing` with short counters until the sweep's repair pass, once
    the grace has passed, sets them to the recount and finalises it; one final notice, whatever
    else runs (a redelivered message, more sweeps)."""
    pipe, store, ctx = mongo_pipeline, mongo_pipeline.store, mongo_pipeline.ctx
    store.create_task({"id": "t", "name": "t", "total_images": 3})
    store.insert_subtasks("t", [{"id": f"t:{i}", "variable_indices": [i]} for i in range(3)])
    store.mark_task_running("t")

    finish(ctx, pipe.subtask("t:0"), Status.COMPLETED, result="https://img/0.png")
    pipe.db.fail(lambda c: c.collection == "tasks" and "$inc" in (c.update or {}), AutoReconnect("failover"))
    with pytest.raises(StoreUnavailable):
        finish(ctx, pipe.subtask("t:1"), Status.FAILED, error="boom", reason="api_failure")
    finish(ctx, pipe.subtask("t:2"), Status.COMPLETED, result="https://img/2.png")
    assert store.get_task("t")["status"] == Status.PROCESSING  # type: ignore[index]
    assert sweep(ctx)["repaired"] == 0  # within the grace
    assert pipe.notices() == []

    assert sweep(ctx, repair_after_seconds=-1)["repaired"] == 1
    task = store.get_task("t")
    assert task is not None and task["status"] == Status.COMPLETED and task["processed_images"] == 3
    assert task["failed_images"] == 1 and task["error"] == "partially completed: 1 of 3 images failed"
    assert pipe.notices() == [("send_notice", ["t", "partially_completed"])]

    finish(ctx, pipe.subtask("t:1"), Status.FAILED, error="boom", reason="api_failure")  # the message, redelivered
    assert sweep(ctx, repair_after_seconds=-1)["repaired"] == 0
    assert len(pipe.notices()) == 1


def test_nietest_retry_waits_for_the_subtasks_still_processing(mongo_pipeline: MongoPipeline) -> None:
    """A task failed by its master with a subtask still running: `nietest retry` says why it
    refuses and changes nothing; once that subtask has ended, the retry runs."""
    store, ctx = mongo_pipeline.store, mongo_pipeline.ctx
    store.create_task({"id": "t", "name": "t", "total_images": 2})
    store.insert_subtasks("t", [{"id": f"t:{i}", "variable_indices": [i]} for i in range(2)])
    store.mark_task_running("t")
    store.finish_subtask("t:0", Status.FAILED, error="boom")
    store.start_subtask("t:1")
    store.fail_task("t", "master crashed")
    with pytest.raises(RetryRefused, match=r"^task t has 1 subtask still processing: retry it once it has ended"):
        retry_task(ctx, "t")
    assert store.get_subtask("t:0")["status"] == Status.FAILED  # type: ignore[index]
    store.finish_subtask("t:1", Status.FAILED, error="late")
    result = retry_task(ctx, "t")
    assert result.outcome.reopened and result.outcome.reset == 2
    task = store.get_task("t")
    assert task is not None and task["processed_images"] == 0 and task["failed_images"] == 0
