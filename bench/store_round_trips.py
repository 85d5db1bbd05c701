"""Round trips to MongoDB of cancelling and of retrying a 50,000-subtask task (counted, not timed).

    .venv/bin/python bench/store_round_trips.py [--subtasks 50000]

The Mongo store on mongomock behind `testing.mongo_faults.FaultyDatabase`, which counts every
collection call (one call, one round trip; a `bulk_write` is one). Two cases, each on a fresh
task of `--subtasks` subtasks:

- cancel: every subtask pending (expanded, none admitted yet): `Store.cancel_task`;
- retry: every subtask failed, the task failed: `Store.retry_subtasks([failed])`.

The numbers before issue 20 (one `finish_subtask` per cancelled subtask, one `update_one` per
retried one) were measured with this script on the code of that time and are printed beside
today's. mongomock scans every document for each query; the bench looks documents up by `_id`
directly when a filter names them (`_fast_id_lookup`), which changes how long it takes, never
what is counted.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mongomock  # noqa: E402
import mongomock.collection  # noqa: E402
from mongomock.filtering import filter_applies  # noqa: E402

from nietest_daemon.domain.lifecycle import Status  # noqa: E402
from nietest_daemon.store.mongo import MongoStore  # noqa: E402
from nietest_daemon.testing.mongo_faults import FaultyDatabase  # noqa: E402

#: Measured with this script on the code before issue 20 (commit 6bb730b and the issue-19 work in
#: progress on it), `--subtasks 50000`: round trips in all, and by collection and method.
BEFORE: dict[str, tuple[int, dict[str, int]]] = {
    "cancel": (
        110_055,
        {
            "subtasks.find": 51,
            "subtasks.find_one": 1,
            "subtasks.find_one_and_update": 50_000,
            "tasks.find_one_and_update": 50_001,
            "tasks.update_one": 10_002,
        },
    ),
    "retry": (
        50_006,
        {
            "subtasks.aggregate": 1,
            "subtasks.find": 1,
            "subtasks.update_one": 50_000,
            "tasks.find_one": 3,
            "tasks.find_one_and_update": 1,
        },
    ),
}


def _fast_id_lookup() -> None:
    """mongomock reads every document of a collection for every query; a query naming `_id`
    (one, or `$in` a list) reads those documents only. Same results, so the same count."""
    original = mongomock.collection.Collection._iter_documents

    def iter_documents(self: Any, filter: Any) -> Iterator[Any]:
        ids = filter.get("_id") if isinstance(filter, Mapping) else None
        if isinstance(ids, Mapping) and set(ids) == {"$in"}:
            keys = list(ids["$in"])
        elif isinstance(ids, str):
            keys = [ids]
        else:
            return original(self, filter)  # type: ignore[no-any-return]
        docs = [self._store[key] for key in keys if key in self._store]
        return (doc for doc in docs if filter_applies(filter, doc))

    mongomock.collection.Collection._iter_documents = iter_documents


def fresh_store() -> tuple[MongoStore, FaultyDatabase]:
    db = FaultyDatabase(mongomock.MongoClient().db)
    store = MongoStore(db)  # type: ignore[arg-type]
    store.prepare()
    return store, db


def a_task(store: MongoStore, task_id: str, n: int) -> None:
    store.create_task({"id": task_id, "name": task_id, "total_images": n})
    docs = ({"id": f"{task_id}-{i:06d}", "variable_indices": [i], "seed": i} for i in range(n))
    assert store.insert_subtasks(task_id, docs) == n
    store.mark_task_running(task_id)


def measure(name: str, store: MongoStore, db: FaultyDatabase, operation: Any) -> tuple[int, dict[str, int]]:
    since = len(db.calls)
    started = time.monotonic()
    outcome = operation()
    took = time.monotonic() - started
    calls = db.calls[since:]
    by_method = Counter(f"{c.collection}.{c.method}" for c in calls)
    print(f"  {name}: {len(calls):,} round trips ({took:.1f} s in mongomock) -> {outcome!r:.160}")
    return len(calls), dict(by_method)


def cancel_case(n: int) -> tuple[int, dict[str, int]]:
    store, db = fresh_store()
    a_task(store, "c", n)
    result = measure("cancel", store, db, lambda: store.cancel_task("c"))
    task = store.get_task("c")
    assert task is not None and task["status"] == Status.CANCELLED and task["cancelled_images"] == n, task
    return result


def retry_case(n: int) -> tuple[int, dict[str, int]]:
    store, db = fresh_store()
    a_task(store, "r", n)
    # Every subtask failed, counted: written directly (50,000 finishes would only be slow).
    raw = db.db
    raw.subtasks.update_many(
        {"task_id": "r"}, {"$set": {"status": Status.FAILED, "error": "boom", "job_uuid": "job", "attempts": 1}}
    )
    raw.tasks.update_one(
        {"_id": "r"},
        {"$set": {"status": Status.FAILED, "processed_images": n, "failed_images": n, "progress": 100.0}},
    )
    result = measure("retry", store, db, lambda: store.retry_subtasks("r", [Status.FAILED]))
    task = store.get_task("r")
    assert task is not None and task["status"] == Status.PROCESSING and task["processed_images"] == 0, task
    assert store.count_subtasks("r")[Status.PENDING] == n
    return result


def show(name: str, before: tuple[int, dict[str, int]] | None, after: tuple[int, dict[str, int]]) -> None:
    line = f"{name:>7}: after {after[0]:>9,} round trips"
    if before is not None:
        line += f"   before {before[0]:>9,}   ({before[0] / max(1, after[0]):,.0f} x fewer)"
    print(line)
    for label, measured in (("before", before), ("after", after)):
        if measured is not None:
            methods = sorted(measured[1].items())
            print(f"{'':>9}{label:>6}: " + ", ".join(f"{method} {k:,}" for method, k in methods))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subtasks", type=int, default=50_000)
    args = parser.parse_args()
    _fast_id_lookup()
    print(f"a task of {args.subtasks:,} subtasks, MongoStore on mongomock")
    cancel = cancel_case(args.subtasks)
    retry = retry_case(args.subtasks)
    same_size = args.subtasks == 50_000
    print()
    show("cancel", BEFORE.get("cancel") if same_size else None, cancel)
    show("retry", BEFORE.get("retry") if same_size else None, retry)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
