"""`MongoStore`: MongoDB through pymongo, used when `MONGO_URI` or `MONGO_HOST` is set.

It uses only plain single-document atomic operations (`insert_one`, `insert_many(ordered=False)`,
`find_one_and_update` / `update_one` with filters and `$set` / `$inc` / `$max`; `find` and a
`$group` aggregate for reads), so what the mongomock contract suite checks is what a MongoDB
server guarantees. `_id` is the document's `id` (which is stored too).

Known limit: moving the subtask and incrementing the task are two atomic single-document
writes; a process killed between the two loses that one increment (the subtask is terminal but
not counted). `recount` detects it; `finalise_task` finalises a task whose counters are complete
but whose finaliser died.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pymongo
from pymongo import ReturnDocument
from pymongo.errors import BulkWriteError, DuplicateKeyError, OperationFailure

if TYPE_CHECKING:
    from pymongo.collection import Collection
    from pymongo.database import Database

from nietest_daemon.domain.lifecycle import (
    ACTIVE,
    CANCELLED,
    COUNTER_OF,
    COUNTERS,
    FAILED,
    PENDING,
    PROCESSING,
    STATUSES,
    TERMINAL,
    final_task_status,
    is_done,
    progress_of,
)
from nietest_daemon.store.base import (
    TIME_FIELDS,
    CancelOutcome,
    Doc,
    DuplicateTaskError,
    FinishOutcome,
    RetryOutcome,
    Store,
    StoreError,
    UnknownSubtaskError,
    _check_terminal,
    _statuses,
    as_utc,
    check_retryable,
    history_entry,
    new_subtask_doc,
    new_task_doc,
    reopened_fields,
    round_of,
    utcnow,
)

#: The task fields a finish reads back from its `$inc`; the rest of the document is read only to finalise.
_TASK_COUNTER_FIELDS: tuple[str, ...] = (
    "status",
    "total_images",
    *COUNTERS,
    "progress",
    "cancel_requested",
    "error",
)


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

    def __init__(
        self,
        db: Database[Any],
        *,
        task_collection: str = "tasks",
        subtask_collection: str = "subtasks",
        client: pymongo.MongoClient[Any] | None = None,
        create_indexes: bool = True,
    ) -> None:
        self.db = db
        self.tasks: Collection[Any] = db[task_collection]
        self.subtasks: Collection[Any] = db[subtask_collection]
        self._client = client
        if create_indexes:
            self._ensure_index(self.subtasks, [("task_id", 1), ("status", 1)])
            self._ensure_index(self.subtasks, [("task_id", 1), ("_id", 1)])  # a task's subtasks by id, paged
            self._ensure_index(self.subtasks, [("status", 1), ("updated_at", 1)])
            self._ensure_index(self.tasks, [("status", 1), ("created_at", -1)])
            self._ensure_index(self.tasks, [("created_at", -1)])

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
        **client_options: Any,
    ) -> MongoStore:
        """Connect with a URI, or host/port/user/password; the database is always `db`."""
        options: dict[str, Any] = {"tz_aware": True, "serverSelectionTimeoutMS": 10_000, **client_options}
        if uri:
            client: pymongo.MongoClient[Any] = pymongo.MongoClient(uri, **options)
        elif host:
            if user is not None:
                options.setdefault("username", user)
            if password is not None:
                options.setdefault("password", password)
            client = pymongo.MongoClient(host=host, port=port, **options)
        else:
            raise ValueError("MongoStore.from_settings needs a uri or a host")
        return cls(client[db], task_collection=task_collection, subtask_collection=subtask_collection, client=client)

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

    def list_tasks(self, limit: int = 20, status: str | Iterable[str] | None = None) -> list[Doc]:
        wanted = _statuses(status)
        query: Doc = {} if wanted is None else {"status": {"$in": wanted}}
        cursor = self.tasks.find(query).sort([("created_at", -1), ("_id", -1)]).limit(int(limit))
        return [d for d in map(_from_mongo, cursor) if d is not None]

    def fail_task(self, task_id: str, error: str) -> bool:
        now = _to_bson(utcnow())
        res = self.tasks.update_one(
            {"_id": task_id, "status": {"$in": list(ACTIVE)}},
            {"$set": {"status": FAILED, "error": error, "updated_at": now, "completed_at": now}},
        )
        return bool(res.modified_count)

    def mark_task_running(self, task_id: str) -> bool:
        now = _to_bson(utcnow())
        res = self.tasks.update_one(
            {"_id": task_id, "status": PENDING}, {"$set": {"status": PROCESSING, "updated_at": now}}
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
        counts = dict.fromkeys(STATUSES, 0)
        for row in self.subtasks.aggregate(
            [{"$match": {"task_id": task_id}}, {"$group": {"_id": "$status", "n": {"$sum": 1}}}]
        ):
            counts[row["_id"]] = int(row["n"])
        return counts

    def start_subtask(self, subtask_id: str) -> Doc | None:
        now = _to_bson(utcnow())
        doc = self.subtasks.find_one_and_update(
            {"_id": subtask_id, "status": {"$in": list(ACTIVE)}},
            {"$set": {"status": PROCESSING, "updated_at": now}, "$inc": {"attempts": 1}},
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

    def _try_finalise(self, task: Mapping[str, Any], now: datetime) -> tuple[str | None, Doc | None]:
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

    def finish_subtask(
        self, subtask_id: str, status: str, *, result: str | None = None, error: str | None = None
    ) -> FinishOutcome | None:
        _check_terminal(status)
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
            return FinishOutcome(subtask_id, current["task_id"], current["status"], changed=False)
        task_id = before["task_id"]
        task = self.tasks.find_one_and_update(
            {"_id": task_id},
            {"$inc": {"processed_images": 1, COUNTER_OF[status]: 1}, "$set": {"updated_at": _to_bson(now)}},
            projection=dict.fromkeys(_TASK_COUNTER_FIELDS, 1),
            return_document=ReturnDocument.AFTER,
        )
        if task is None:
            return FinishOutcome(subtask_id, task_id, status, changed=True)
        progress = progress_of(int(task["processed_images"]), int(task.get("total_images") or 0))
        if progress > float(task.get("progress") or 0.0):
            # $max: concurrent finishers may land in any order, progress only ever goes up.
            self.tasks.update_one({"_id": task_id}, {"$max": {"progress": progress}})
            task["progress"] = progress
        final, final_doc = self._try_finalise(task, now)
        return FinishOutcome(
            subtask_id,
            task_id,
            status,
            changed=True,
            finalised=final is not None,
            task_status=final,
            task=final_doc,
        )

    def finalise_task(self, task_id: str) -> str | None:
        task = self.tasks.find_one({"_id": task_id})
        if task is None:
            return None
        return self._try_finalise(task, utcnow())[0]

    def cancel_task(self, task_id: str, *, chunk: int = 1000) -> CancelOutcome:
        now = _to_bson(utcnow())
        res = self.tasks.update_one({"_id": task_id}, {"$set": {"cancel_requested": True, "updated_at": now}})
        if not res.matched_count:
            return CancelOutcome(task_id, found=False)
        self.tasks.update_one({"_id": task_id, "cancel_requested_at": None}, {"$set": {"cancel_requested_at": now}})
        cancelled, finalised, final_status, final_task = 0, False, None, None
        while True:
            pending = [
                d["_id"]
                for d in self.subtasks.find({"task_id": task_id, "status": PENDING}, {"_id": 1})
                .sort("_id", 1)
                .limit(chunk)
            ]
            if not pending:
                break
            for subtask_id in pending:
                outcome = self.finish_subtask(subtask_id, CANCELLED)
                if outcome and outcome.changed:
                    cancelled += 1
                if outcome and outcome.finalised:
                    finalised, final_status, final_task = True, outcome.task_status, outcome.task
        if self.subtasks.find_one({"task_id": task_id}, {"_id": 1}) is None:
            # Nothing expanded yet: the task has no subtask, so cancelling it ends it now.
            stamp = _to_bson(utcnow())
            doc = self.tasks.find_one_and_update(
                {"_id": task_id, "status": {"$in": list(ACTIVE)}},
                {"$set": {"status": CANCELLED, "completed_at": stamp, "updated_at": stamp}},
                return_document=ReturnDocument.AFTER,
            )
            if doc is not None:
                finalised, final_status, final_task = True, CANCELLED, _from_mongo(doc)
        return CancelOutcome(task_id, True, cancelled, finalised, final_status, final_task)

    def retry_subtasks(self, task_id: str, statuses: Iterable[str] = (FAILED,), *, attempts: int = 20) -> RetryOutcome:
        wanted = check_retryable(statuses)
        task = self.tasks.find_one({"_id": task_id}, {"status": 1, "round": 1})
        if task is None:
            return RetryOutcome(task_id, found=False)
        if task["status"] not in TERMINAL:
            return RetryOutcome(task_id, found=True, status=task["status"])
        new_round = round_of(task) + 1
        # 1. Each subtask back to pending, one conditional single-document update each: only while it
        # is still in a retried status, so two retries never both move it. The task is terminal
        # meanwhile, so nothing else moves its subtasks or finalises it; a process that dies here
        # leaves some subtasks pending and the task terminal, and the next call goes on from there.
        reset = 0
        now = _to_bson(utcnow())
        fields = {"status": 1, "error": 1, "job_uuid": 1, "seed": 1, "started_at": 1, "completed_at": 1, "round": 1}
        for sub in self.subtasks.find({"task_id": task_id, "status": {"$in": wanted}}, fields).sort("_id", 1):
            res = self.subtasks.update_one(
                {"_id": sub["_id"], "status": {"$in": wanted}},
                {
                    "$set": {
                        "status": PENDING,
                        "round": new_round,
                        "error": None,
                        "result": None,
                        "job_uuid": None,
                        "poll_count": 0,
                        "attempts": 0,
                        "started_at": None,
                        "completed_at": None,
                        "updated_at": now,
                    },
                    "$push": {"error_history": history_entry(sub)},
                },
            )
            reset += res.modified_count
        # 2. The task back to processing, its counters recounted from its subtasks: a
        # compare-and-set on the status, round and counters read, so a concurrent change (another
        # retry, a late finish) makes it look again rather than overwrite.
        for _ in range(attempts):
            current = self.tasks.find_one({"_id": task_id}, dict.fromkeys(("status", "round", *COUNTERS), 1))
            if current is None:
                return RetryOutcome(task_id, found=False)
            if current["status"] not in TERMINAL:
                return RetryOutcome(task_id, found=True, status=current["status"], reset=reset)
            counts = self.count_subtasks(task_id)
            if not counts[PENDING] and not counts[PROCESSING]:
                return RetryOutcome(task_id, found=True, status=current["status"], reset=reset)
            full = self.tasks.find_one({"_id": task_id}, {"total_images": 1}) or {}
            new_round = round_of(current) + 1
            changes = reopened_fields(full, counts, new_round, utcnow())
            changes["updated_at"] = _to_bson(changes["updated_at"])
            match: Doc = {"_id": task_id, "status": current["status"], "round": current.get("round")}
            match.update({name: current.get(name) for name in COUNTERS})
            doc = self.tasks.find_one_and_update(match, {"$set": changes}, return_document=ReturnDocument.AFTER)
            if doc is not None:
                return RetryOutcome(
                    task_id, True, current["status"], reset, reopened=True, round=new_round, task=_from_mongo(doc)
                )
        raise StoreError(f"task {task_id!r} kept changing while it was reopened; run the retry again")

    def find_stale_subtasks(self, older_than: datetime, limit: int = 100) -> list[Doc]:
        cursor = (
            self.subtasks.find({"status": PROCESSING, "updated_at": {"$lt": _to_bson(older_than)}})
            .sort([("updated_at", 1), ("_id", 1)])
            .limit(int(limit))
        )
        return [d for d in map(_from_mongo, cursor) if d is not None]

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
