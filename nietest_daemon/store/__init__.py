"""The task store: one interface (`Store`), two implementations, one contract.

`open_store` picks MongoDB when a URI or host is configured, else the embedded SQLite file.
"""

from __future__ import annotations

import os

from nietest_daemon.core.settings import Settings
from nietest_daemon.store.base import (
    CancelOutcome,
    Doc,
    DuplicateTaskError,
    FinishOutcome,
    RepairOutcome,
    Store,
    StoreError,
    StoreUnavailable,
    UnknownSubtaskError,
    as_utc,
    utcnow,
)
from nietest_daemon.store.sqlite import SQLITE_FILENAME, SQLiteStore

__all__ = [
    "SQLITE_FILENAME",
    "CancelOutcome",
    "Doc",
    "DuplicateTaskError",
    "FinishOutcome",
    "RepairOutcome",
    "SQLiteStore",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "UnknownSubtaskError",
    "as_utc",
    "open_store",
    "open_store_for",
    "prepare_store_for",
    "utcnow",
]


def open_store(
    *,
    data_dir: str | os.PathLike[str],
    mongo_uri: str | None = None,
    mongo_host: str | None = None,
    mongo_port: int = 27017,
    mongo_user: str | None = None,
    mongo_password: str | None = None,
    mongo_db: str = "task_db",
    task_collection: str = "tasks",
    subtask_collection: str = "subtasks",
    timeout_seconds: float | None = None,
) -> Store:
    """MongoDB when a URI or host is given, else the embedded SQLite file in `data_dir`.

    `timeout_seconds` bounds each MongoDB operation, its server selection and connecting included
    (default: `store.mongo_client.TIMEOUT_MS`, 30 s per operation); a prober that must answer
    quickly passes a short one. Raises `StoreError` (`StoreUnavailable`: the SQLite file cannot be
    opened)."""
    if mongo_uri or mongo_host:
        # Imported here: pymongo costs about 0.2 s of every worker start, and the embedded
        # SQLite deployment never needs it.
        from nietest_daemon.store.mongo import MongoStore

        return MongoStore.from_settings(
            uri=mongo_uri,
            host=mongo_host,
            port=mongo_port,
            user=mongo_user,
            password=mongo_password,
            db=mongo_db,
            task_collection=task_collection,
            subtask_collection=subtask_collection,
            timeout_seconds=timeout_seconds,
        )
    return SQLiteStore(data_dir)


def open_store_for(settings: Settings, timeout_seconds: float | None = None) -> Store:
    """The store the settings name (`open_store` with the settings' MongoDB fields and data dir)."""
    return open_store(
        data_dir=settings.data_dir,
        mongo_uri=settings.mongo_uri,
        mongo_host=settings.mongo_host,
        mongo_port=settings.mongo_port,
        mongo_user=settings.mongo_user,
        mongo_password=settings.mongo_password,
        mongo_db=settings.mongo_db,
        task_collection=settings.task_collection,
        subtask_collection=settings.subtask_collection,
        timeout_seconds=timeout_seconds,
    )


def prepare_store_for(settings: Settings) -> None:
    """Open the store the settings name, `prepare` it (MongoDB: build its indexes, warn about its
    durability) and close it: the daemon's first step, before any worker opens the store. Raises
    `StoreError` (`StoreUnavailable`: not reachable)."""
    store = open_store_for(settings)
    try:
        store.prepare()
    finally:
        store.close()
