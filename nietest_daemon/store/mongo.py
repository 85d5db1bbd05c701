"""`MongoStore`: MongoDB through pymongo, used when `MONGO_URI` or `MONGO_HOST` is set.

It uses only plain single-document atomic operations (`insert_one`, `insert_many(ordered=False)`,
`find_one_and_update` / `update_one` / `update_many` / an unordered `bulk_write` of `UpdateOne`s,
with filters and `$set` / `$inc` / `$max` / `$push`; `find` and a `$group` aggregate for reads),
so what the mongomock contract suite checks is what a MongoDB server guarantees. No
multi-document transaction: mongomock has no sessions, so such code could run in no test here.
`_id` is the document's `id` (which is stored too).

A finish is exactly-once by its first write: the subtask leaves its active status by one
conditional update, which only one caller wins; only that caller `$inc`s the task, and the caller
whose increment completes the counters finalises the task by another conditional update (from an
active status). Moving the subtask and counting it are two writes, though: a process killed
between them (a SIGKILL, an OOM kill, a failover longer than the client's time limit, within
which pymongo retries the write) leaves the subtask terminal and the counters one short. Nothing
would then finalise the task; `repair_counts`, from the periodic sweep, does, once the task has
been still for a grace period. Every write here that counts is ordered so that a cut leaves the
counters short, never ahead: cancel moves its subtasks before it counts them, retry takes them off
the counters before it moves them.

Indexes (`INDEXES`) are built by `prepare`, which only the daemon calls at start: opening the
store builds nothing, so a user who may only read can run the reading commands, and an upgrade
that adds an index blocks one process, not all.

Durability: the client pins what keeps an acknowledged write through a failover (`w="majority"`,
`journal=True`, primary reads, `retryWrites=True`) and a time limit on every operation
(`timeoutMS`), as keyword arguments, which win over the URI's options (store/mongo_client.py).
`prepare` (the daemon's start) logs one warning naming what is at risk when the URI asked for
something weaker (overridden) or the server is standalone (`durability_risks`). Errors: pymongo's
connection, server selection and timeout errors become `StoreUnavailable`, its others `StoreError`
(`_is_unavailable`; store/base.py translates them at the edge).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pymongo
from bson.errors import BSONError
from pymongo import ReturnDocument, UpdateOne
from pymongo.errors import (
    BulkWriteError,
    ConnectionFailure,
    DuplicateKeyError,
    ExecutionTimeout,
    OperationFailure,
    PyMongoError,
    WTimeoutError,
)

if TYPE_CHECKING:
    from pymongo.collection import Collection
    from pymongo.database import Database

from nietest_daemon.core.logs import get_logger
from nietest_daemon.domain.lifecycle import (
    ACTIVE,
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
    HISTORY_FIELDS,
    TIME_FIELDS,
    CancelOutcome,
    Doc,
    DuplicateTaskError,
    FinishOutcome,
    RepairOutcome,
    RetryOutcome,
    Store,
    StoreError,
    UnknownSubtaskError,
    _statuses,
    as_utc,
    check_retryable,
    check_terminal,
    counters_of,
    history_entry,
    is_short,
    moved_deltas,
    new_subtask_doc,
    new_task_doc,
    reopened_fields,
    round_of,
    utcnow,
)
from nietest_daemon.store.mongo_client import durability_risks, open_client

log = get_logger(__name__)

#: The limit of `prepare`'s index builds (the client's `timeoutMS` is for one write): an index on
#: millions of subtasks takes minutes.
INDEX_BUILD_TIMEOUT_SECONDS = 3600.0
#: The task fields a finish reads back from its `$inc`; the rest of the document is read only to finalise.
_TASK_COUNTER_FIELDS: tuple[str, ...] = (
    "status",
    "total_images",
    *COUNTERS,
    "progress",
    "cancel_requested",
    "error",
)


IndexKeys = tuple[tuple[str, int], ...]

#: The indexes `prepare` builds, by collection (`tasks`, `subtasks`: whatever names the settings
#: give them). Each query of this module is served by one of them, its sort included: equality
#: fields first, then the sort, then ranges (tests/test_store_indexes.py records every query and
#: checks it). Ascending keys: a sort on them backwards (newest first) reads the index backwards.
INDEXES: dict[str, tuple[IndexKeys, ...]] = {
    "tasks": (
        (("created_at", 1), ("_id", 1)),  # list_tasks: newest first
        (("status", 1), ("created_at", 1), ("_id", 1)),  # list_tasks of some statuses; count_tasks
        (("status", 1), ("updated_at", 1), ("_id", 1)),  # repair_counts: processing tasks still since a time
        (("owner", 1), ("created_at", 1), ("_id", 1)),  # list_tasks of an owner
        (("owner", 1), ("status", 1), ("created_at", 1), ("_id", 1)),  # list_tasks of an owner, some statuses
    ),
    "subtasks": (
        (("task_id", 1), ("status", 1), ("_id", 1)),  # a task's subtasks of some statuses by id; counts
        (("task_id", 1), ("_id", 1)),  # a task's subtasks by id, every status (report, export)
        (("task_id", 1), ("updated_at", 1)),  # repair_counts: has a subtask of the task moved lately?
        (("status", 1), ("updated_at", 1), ("_id", 1)),  # find_stale_subtasks
    ),
}
#: Indexes earlier versions built, which those above serve better: `prepare` drops them once the
#: new ones exist (they would only cost every write).
RETIRED_INDEXES: dict[str, tuple[str, ...]] = {
    "tasks": ("status_1_created_at_-1", "created_at_-1"),
    "subtasks": ("task_id_1_status_1", "status_1_updated_at_1"),
}


def _to_bson(value: datetime) -> datetime:
    """Naive UTC, as BSON dates are (avoids aware/naive mix-ups in drivers and mongomock)."""
    return as_utc(value).replace(tzinfo=None)


def _from_mongo(doc: Mapping[str, Any] | None) -> Doc | None:
    if doc is None:
        return None
    out = {k: v for k, v in doc.items() if k != "_id"}
    out.setdefault("id", doc.get("_id"))
    for name in TIME_FIELDS:
        value = out.get(name)
        if isinstance(value, datetime):
            out[name] = as_utc(value)
    return out


def _to_mongo(doc: Mapping[str, Any]) -> Doc:
    out = {k: _to_bson(v) if isinstance(v, datetime) else v for k, v in doc.items()}
    out["_id"] = doc["id"]
    return out


class MongoStore(Store):
    """The MongoDB store: `_id` = the document's id; only atomic single-document operations."""

    DRIVER_ERRORS = (PyMongoError, BSONError)  # BSONError: a document bson cannot encode, or too large

    def __init__(
        self,
        db: Database[Any],
        *,
        task_collection: str = "tasks",
        subtask_collection: str = "subtasks",
        client: pymongo.MongoClient[Any] | None = None,
        address: str | None = None,
        overridden: Iterable[str] = (),
    ) -> None:
        self.db = db
        self.tasks: Collection[Any] = db[task_collection]
        self.subtasks: Collection[Any] = db[subtask_collection]
        self._client = client
        self.address = address or f"mongodb database {db.name}"
        self._overridden = list(overridden)

    def _is_unavailable(self, exc: Exception) -> bool:
        """A connection refused, lost or timed out, no server selectable (`ConnectionFailure`:
        `AutoReconnect`, `NetworkTimeout`, `ServerSelectionTimeoutError`, `NotPrimaryError`), an
        operation or a write concern past its time (`ExecutionTimeout`, `WTimeoutError`, any error
        of `timeoutMS`), or an error the server labels retryable (a failover or a shutdown still
        under way after pymongo's own retry). Every other error (a refused privilege, a document
        too large, a bad query) is no outage: retrying would only repeat it."""
        if isinstance(exc, ConnectionFailure | ExecutionTimeout | WTimeoutError):
            return True
        return isinstance(exc, PyMongoError) and (exc.timeout or exc.has_error_label("RetryableWriteError"))

    def prepare(self) -> None:
        """Build `INDEXES` (each returns at once when it exists), then drop `RETIRED_INDEXES`; log
        one warning when the deployment is less durable than the store needs (`durability_risks`)."""
        with pymongo.timeout(INDEX_BUILD_TIMEOUT_SECONDS):
            for role, collection in (("tasks", self.tasks), ("subtasks", self.subtasks)):
                for keys in INDEXES[role]:
                    self._ensure_index(collection, list(keys))
                present = set(collection.index_information())
                for name in RETIRED_INDEXES[role]:
                    if name in present:
                        collection.drop_index(name)
        risks = durability_risks(self._overridden, self.db.command("hello"))
        if risks:
            log.warning("MongoDB store: durability at risk", store=self.address, risks=risks)

    @staticmethod
    def _ensure_index(collection: Collection[Any], keys: list[tuple[str, int]]) -> None:
        """Create an index (default name); one on the same keys under another name already serves."""
        try:
            collection.create_index(keys)
        except OperationFailure as exc:
            if exc.code not in (85, 86):  # IndexOptionsConflict / IndexKeySpecsConflict
                raise

    @classmethod
    def from_settings(
        cls,
        *,
        uri: str | None = None,
        host: str | None = None,
        port: int = 27017,
        user: str | None = None,
        password: str | None = None,
        db: str = "task_db",
        task_collection: str = "tasks",
        subtask_collection: str = "subtasks",
        timeout_seconds: float | None = None,
        **client_options: Any,
    ) -> MongoStore:
        """Connect with a URI, or host/port/user/password; the database is always `db`. No I/O:
        pymongo connects in the background. The client's settings: `mongo_client.open_client`."""
        opened = open_client(
            uri=uri,
            host=host,
            port=port,
            user=user,
            password=password,
            timeout_seconds=timeout_seconds,
            **client_options,
        )
        return cls(
            opened.client[db],
            task_collection=task_collection,
            subtask_collection=subtask_collection,
            client=opened.client,
            address=opened.address if uri else f"{opened.address}/{db}",
            overridden=opened.overridden,
        )

    # --- tasks ---------------------------------------------------------------------------------------

    def create_task(self, doc: Mapping[str, Any]) -> None:
        task = new_task_doc(doc, utcnow())
        try:
            self.tasks.insert_one(_to_mongo(task))
        except DuplicateKeyError:
            raise DuplicateTaskError(task["id"]) from None

    def get_task(self, task_id: str) -> Doc | None:
        return _from_mongo(self.tasks.find_one({"_id": task_id}))

    def count_tasks(self) -> dict[str, int]:
        return {status: self.tasks.count_documents({"status": status}) for status in STATUSES}

    def list_tasks(
        self, limit: int = 20, status: str | Iterable[str] | None = None, owner: str | None = None
    ) -> list[Doc]:
        wanted = _statuses(status)
        query: Doc = {} if wanted is None else {"status": {"$in": wanted}}
        if owner is not None:
            query["owner"] = owner
        cursor = self.tasks.find(query).sort([("created_at", -1), ("_id", -1)]).limit(int(limit))
        return [d for d in map(_from_mongo, cursor) if d is not None]

    def fail_task(self, task_id: str, error: str) -> bool:
        now = _to_bson(utcnow())
        res = self.tasks.update_one(
            {"_id": task_id, "status": {"$in": list(ACTIVE)}},
            {"$set": {"status": Status.FAILED, "error": error, "updated_at": now, "completed_at": now}},
        )
        return bool(res.modified_count)

    def mark_task_running(self, task_id: str) -> bool:
        now = _to_bson(utcnow())
        res = self.tasks.update_one(
            {"_id": task_id, "status": Status.PENDING}, {"$set": {"status": Status.PROCESSING, "updated_at": now}}
        )
        if res.modified_count:
            self.tasks.update_one({"_id": task_id, "started_at": None}, {"$set": {"started_at": now}})
        return bool(res.modified_count)

    def is_cancel_requested(self, task_id: str) -> bool:
        task = self.tasks.find_one({"_id": task_id}, {"cancel_requested": 1})
        return bool(task and task.get("cancel_requested"))

    # --- subtasks ------------------------------------------------------------------------------------

    def insert_subtasks(self, task_id: str, docs: Iterable[Mapping[str, Any]], *, chunk: int = 1000) -> int:
        now = utcnow()
        batch: list[Doc] = []
        inserted = 0
        for doc in docs:
            batch.append(_to_mongo(new_subtask_doc(task_id, doc, now)))
            if len(batch) >= chunk:
                inserted += self._insert_batch(batch)
                batch = []
        if batch:
            inserted += self._insert_batch(batch)
        return inserted

    def _insert_batch(self, batch: list[Doc]) -> int:
        try:
            return len(self.subtasks.insert_many(batch, ordered=False).inserted_ids)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(e.get("code") != 11000 for e in errors) or exc.details.get("writeConcernErrors"):
                raise
            return int(exc.details.get("nInserted", 0))

    def get_subtask(self, subtask_id: str) -> Doc | None:
        return _from_mongo(self.subtasks.find_one({"_id": subtask_id}))

    def list_subtasks(
        self,
        task_id: str,
        status: str | Iterable[str] | None = None,
        limit: int | None = None,
        *,
        after: str | None = None,
    ) -> list[Doc]:
        wanted = _statuses(status)
        query: Doc = {"task_id": task_id}
        if wanted is not None:
            query["status"] = {"$in": wanted}
        if after is not None:
            query["_id"] = {"$gt": after}
        cursor = self.subtasks.find(query).sort("_id", 1)
        if limit is not None:
            cursor = cursor.limit(int(limit))
        return [d for d in map(_from_mongo, cursor) if d is not None]

    def count_subtasks(self, task_id: str) -> dict[str, int]:
        counts: dict[str, int] = dict.fromkeys(STATUSES, 0)
        for row in self.subtasks.aggregate(
            [{"$match": {"task_id": task_id}}, {"$group": {"_id": "$status", "n": {"$sum": 1}}}]
        ):
            counts[row["_id"]] = int(row["n"])
        return counts

    def start_subtask(self, subtask_id: str) -> Doc | None:
        now = _to_bson(utcnow())
        doc = self.subtasks.find_one_and_update(
            {"_id": subtask_id, "status": {"$in": list(ACTIVE)}},
            {"$set": {"status": Status.PROCESSING, "updated_at": now}, "$inc": {"attempts": 1}},
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:
            return None
        if doc.get("started_at") is None:
            res = self.subtasks.update_one({"_id": subtask_id, "started_at": None}, {"$set": {"started_at": now}})
            if res.modified_count:
                doc["started_at"] = now
            else:  # set by a concurrent start an instant ago
                doc["started_at"] = (self.subtasks.find_one({"_id": subtask_id}, {"started_at": 1}) or {}).get(
                    "started_at"
                )
        return _from_mongo(doc)

    def record_job(self, subtask_id: str, job_uuid: str, seed: int | None) -> bool:
        res = self.subtasks.update_one(
            {"_id": subtask_id, "job_uuid": None},
            {"$set": {"job_uuid": job_uuid, "seed": seed, "updated_at": _to_bson(utcnow())}},
        )
        return bool(res.modified_count)

    def clear_job(self, subtask_id: str, job_uuid: str | None = None) -> bool:
        query: Doc = {"_id": subtask_id, "status": {"$in": list(ACTIVE)}, "job_uuid": {"$ne": None}}
        if job_uuid is not None:
            query["job_uuid"] = job_uuid
        res = self.subtasks.update_one(
            query, {"$set": {"job_uuid": None, "poll_count": 0, "updated_at": _to_bson(utcnow())}}
        )
        return bool(res.modified_count)

    def record_poll(self, subtask_id: str) -> int:
        doc = self.subtasks.find_one_and_update(
            {"_id": subtask_id},
            {"$inc": {"poll_count": 1}, "$set": {"updated_at": _to_bson(utcnow())}},
            projection={"poll_count": 1},
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:
            raise UnknownSubtaskError(subtask_id)
        return int(doc["poll_count"])

    # --- the finish path -----------------------------------------------------------------------------

    def _try_finalise(self, task: Mapping[str, Any], now: datetime) -> tuple[Status | None, Doc | None]:
        """Conditionally finalise a complete task from a non-terminal state: at most one caller wins."""
        if task.get("status") in TERMINAL or not is_done(task):
            return None, None
        status, error = final_task_status(task)
        progress = progress_of(int(task.get("processed_images") or 0), int(task.get("total_images") or 0))
        doc = self.tasks.find_one_and_update(
            {"_id": task["_id"] if "_id" in task else task["id"], "status": {"$in": list(ACTIVE)}},
            {
                "$set": {"status": status, "error": error, "completed_at": _to_bson(now), "updated_at": _to_bson(now)},
                "$max": {"progress": progress},
            },
            return_document=ReturnDocument.AFTER,
        )
        return (status, _from_mongo(doc)) if doc is not None else (None, None)

    def _count_finished(self, task_id: str, status: Status, n: int, now: datetime) -> tuple[Status | None, Doc | None]:
        """Count `n` subtasks this caller moved to the terminal `status` on their task (the finish's
        second write), then finalise the task if that completed it: what `_try_finalise` returns."""
        task = self.tasks.find_one_and_update(
            {"_id": task_id},
            {"$inc": {"processed_images": n, COUNTER_OF[status]: n}, "$set": {"updated_at": _to_bson(now)}},
            projection=dict.fromkeys(_TASK_COUNTER_FIELDS, 1),
            return_document=ReturnDocument.AFTER,
        )
        if task is None:
            return None, None
        progress = progress_of(int(task["processed_images"]), int(task.get("total_images") or 0))
        if progress > float(task.get("progress") or 0.0):
            # $max: concurrent finishers may land in any order, progress only ever goes up.
            self.tasks.update_one({"_id": task_id}, {"$max": {"progress": progress}})
            task["progress"] = progress
        return self._try_finalise(task, now)

    def finish_subtask(
        self, subtask_id: str, status: Status, *, result: str | None = None, error: str | None = None
    ) -> FinishOutcome | None:
        status = check_terminal(status)
        now = utcnow()
        changes: Doc = {"status": status, "updated_at": _to_bson(now), "completed_at": _to_bson(now)}
        if result is not None:
            changes["result"] = result
        if error is not None:
            changes["error"] = error
        before = self.subtasks.find_one_and_update(
            {"_id": subtask_id, "status": {"$in": list(ACTIVE)}},
            {"$set": changes},
            projection={"task_id": 1, "status": 1},
            return_document=ReturnDocument.BEFORE,
        )
        if before is None:
            current = self.subtasks.find_one({"_id": subtask_id}, {"task_id": 1, "status": 1})
            if current is None:
                return None
            return FinishOutcome(subtask_id, current["task_id"], Status(current["status"]), changed=False)
        task_id = before["task_id"]
        final, final_doc = self._count_finished(task_id, status, 1, now)
        return FinishOutcome(
            subtask_id,
            task_id,
            status,
            changed=True,
            finalised=final is not None,
            task_status=final,
            task=final_doc,
        )

    def finalise_task(self, task_id: str) -> Status | None:
        task = self.tasks.find_one({"_id": task_id})
        if task is None:
            return None
        return self._try_finalise(task, utcnow())[0]

    def cancel_task(self, task_id: str, *, chunk: int = 1000) -> CancelOutcome:
        """A thousand pending subtasks at a time: one `update_many` (only those still pending move),
        then one `$inc` of what it moved. A process that dies between the two leaves the counters
        short: `repair_counts` puts them right."""
        now = _to_bson(utcnow())
        res = self.tasks.update_one({"_id": task_id}, {"$set": {"cancel_requested": True, "updated_at": now}})
        if not res.matched_count:
            return CancelOutcome(task_id, found=False)
        self.tasks.update_one({"_id": task_id, "cancel_requested_at": None}, {"$set": {"cancel_requested_at": now}})
        cancelled, finalised, final_status, final_task = 0, False, None, None
        expanded = False
        while True:
            pending = [
                d["_id"]
                for d in self.subtasks.find({"task_id": task_id, "status": Status.PENDING}, {"_id": 1})
                .sort("_id", 1)
                .limit(chunk)
            ]
            expanded = expanded or bool(pending)
            if not pending:
                break
            stamp = utcnow()
            moved = self.subtasks.update_many(
                {"_id": {"$in": pending}, "status": Status.PENDING},
                {"$set": {"status": Status.CANCELLED, "updated_at": _to_bson(stamp), "completed_at": _to_bson(stamp)}},
            ).modified_count
            if moved:
                cancelled += moved
                final, doc = self._count_finished(task_id, Status.CANCELLED, moved, stamp)
                if final is not None:
                    finalised, final_status, final_task = True, final, doc
            if len(pending) < chunk:
                break
        if not expanded and self.subtasks.find_one({"task_id": task_id}, {"_id": 1}) is None:
            # Nothing expanded yet: the task has no subtask, so cancelling it ends it now.
            stamp_bson = _to_bson(utcnow())
            doc = self.tasks.find_one_and_update(
                {"_id": task_id, "status": {"$in": list(ACTIVE)}},
                {"$set": {"status": Status.CANCELLED, "completed_at": stamp_bson, "updated_at": stamp_bson}},
                return_document=ReturnDocument.AFTER,
            )
            if doc is not None:
                finalised, final_status, final_task = True, Status.CANCELLED, _from_mongo(doc)
        return CancelOutcome(task_id, True, cancelled, finalised, final_status, final_task)

    def retry_subtasks(
        self, task_id: str, statuses: Iterable[str] = (Status.FAILED,), *, chunk: int = 1000, attempts: int = 5
    ) -> RetryOutcome:
        wanted = check_retryable(statuses)
        task = self.tasks.find_one({"_id": task_id}, {"status": 1, "round": 1})
        if task is None:
            return RetryOutcome(task_id, found=False)
        was = Status(task["status"])
        if was not in TERMINAL:
            return RetryOutcome(task_id, found=True, status=was)
        processing = self.subtasks.count_documents({"task_id": task_id, "status": Status.PROCESSING})
        if processing:
            return RetryOutcome(task_id, found=True, status=was, processing=processing)
        # 1. The subtasks back to pending, a thousand at a time, each chunk taken off the counters
        # first (`_move_back`). The task is terminal meanwhile, so nothing else moves its subtasks
        # or finalises it; a process that dies here leaves some subtasks pending, the task
        # terminal and its counters short, and the next call goes on from there.
        new_round = round_of(task) + 1
        fields = dict.fromkeys(HISTORY_FIELDS, 1)
        reset = 0
        for status in wanted:
            after: str | None = None
            while True:
                query: Doc = {"task_id": task_id, "status": status}
                if after is not None:
                    query["_id"] = {"$gt": after}
                page = list(self.subtasks.find(query, fields).sort("_id", 1).limit(chunk))
                if page:
                    reset += self._move_back(task_id, status, page, new_round)
                    after = page[-1]["_id"]
                if len(page) < chunk:
                    break
        # 2. The task back to processing if anything is pending (this call's subtasks, or those of
        # a call that died half-way): a compare-and-set on the status and round read, so that two
        # calls never both reopen it. Its counters are left alone: a finish may land at any time.
        for _ in range(attempts):
            current = self.tasks.find_one(
                {"_id": task_id}, {"status": 1, "round": 1, "total_images": 1, "processed_images": 1}
            )
            if current is None:
                return RetryOutcome(task_id, found=False)
            if current["status"] not in TERMINAL:
                return RetryOutcome(task_id, found=True, status=Status(current["status"]), reset=reset)
            if self.subtasks.find_one({"task_id": task_id, "status": Status.PENDING}, {"_id": 1}) is None:
                return RetryOutcome(task_id, found=True, status=was, reset=reset)
            reopen_round = round_of(current) + 1
            changes = reopened_fields(current, reopen_round, utcnow())
            changes["updated_at"] = _to_bson(changes["updated_at"])
            doc = self.tasks.find_one_and_update(
                {"_id": task_id, "status": current["status"], "round": current.get("round")},
                {"$set": changes},
                return_document=ReturnDocument.AFTER,
            )
            if doc is not None:
                return RetryOutcome(task_id, True, was, reset, reopened=True, round=reopen_round, task=_from_mongo(doc))
        raise StoreError(f"task {task_id!r} kept changing while it was reopened; run the retry again")

    def _move_back(self, task_id: str, status: Status, page: list[Doc], new_round: int) -> int:
        """Move these subtasks (read in the terminal `status`) back to pending; how many moved.

        The counters lose them first, the move follows (one unordered bulk write: each subtask's
        own `error_history` entry, each update conditional on its status), and what did not move
        is given back: cut anywhere, the counters are short of the truth, never ahead of it."""
        self.tasks.update_one({"_id": task_id}, {"$inc": moved_deltas(status, len(page))})
        now = _to_bson(utcnow())
        reset: Doc = {
            "status": Status.PENDING,
            "round": new_round,
            "error": None,
            "result": None,
            "job_uuid": None,
            "poll_count": 0,
            "attempts": 0,
            "started_at": None,
            "completed_at": None,
            "updated_at": now,
        }
        moves = [
            UpdateOne(
                {"_id": sub["_id"], "status": status}, {"$set": reset, "$push": {"error_history": history_entry(sub)}}
            )
            for sub in page
        ]
        moved = int(self.subtasks.bulk_write(moves, ordered=False).modified_count)
        if moved < len(page):  # some were moved meanwhile (a retry that did not take the lock)
            self.tasks.update_one({"_id": task_id}, {"$inc": moved_deltas(status, moved - len(page))})
        return moved

    def repair_counts(self, older_than: datetime) -> list[RepairOutcome]:
        cutoff = _to_bson(older_than)
        repaired: list[RepairOutcome] = []
        candidates = list(
            self.tasks.find(
                {"status": Status.PROCESSING, "updated_at": {"$lt": cutoff}},
                {"total_images": 1, **dict.fromkeys(COUNTERS, 1)},
            ).sort([("updated_at", 1), ("_id", 1)])
        )
        for task in candidates:
            task_id = task["_id"]
            if self.subtasks.find_one({"task_id": task_id, "status": {"$in": list(ACTIVE)}}, {"_id": 1}):
                continue  # work left: its finishes count it
            counts = self.count_subtasks(task_id)
            if not is_short(task, counts):
                continue
            if self.subtasks.find_one({"task_id": task_id, "updated_at": {"$gte": cutoff}}, {"_id": 1}):
                continue  # a subtask moved within the grace: its finisher may not have counted it yet
            now = utcnow()
            after = counters_of(counts)
            progress = progress_of(after["processed_images"], int(task.get("total_images") or 0))
            doc = self.tasks.find_one_and_update(
                {"_id": task_id, "status": Status.PROCESSING, **{name: task.get(name) for name in COUNTERS}},
                {"$set": {**after, "progress": progress, "updated_at": _to_bson(now)}},
                projection=dict.fromkeys(_TASK_COUNTER_FIELDS, 1),
                return_document=ReturnDocument.AFTER,
            )
            if doc is None:
                continue  # changed meanwhile: the next pass looks again
            final, final_doc = self._try_finalise(doc, now)
            before = {name: int(task.get(name) or 0) for name in COUNTERS}
            repaired.append(RepairOutcome(task_id, before, after, final is not None, final, final_doc))
        return repaired

    def find_stale_subtasks(self, older_than: datetime, limit: int = 100) -> list[Doc]:
        cursor = (
            self.subtasks.find({"status": Status.PROCESSING, "updated_at": {"$lt": _to_bson(older_than)}})
            .sort([("updated_at", 1), ("_id", 1)])
            .limit(int(limit))
        )
        return [d for d in map(_from_mongo, cursor) if d is not None]

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
