"""The task store: one interface (`Store`), three implementations, one contract.

- `SQLiteStore` (store/sqlite.py): the embedded default, one file on one host;
- `MongoStore` (store/mongo.py): MongoDB, shared by daemons on several hosts;
- `PostgresStore` (store/postgres.py): PostgreSQL, shared as well.

`open_store` picks one: by the scheme of a store URL (NIETEST_STORE_URL: `postgresql://`,
`mongodb://`, `sqlite:///abs/path.db`), else MongoDB when a MongoDB URI or host is given, else the
SQLite file in the data dir. The drivers of the shared stores (pymongo, psycopg) are imported only
when their store is opened: a worker of the embedded deployment never pays for them.
"""

from __future__ import annotations

import os

from nietest_daemon.core.settings import Settings, StoreKind
from nietest_daemon.core.store_urls import sqlite_path_of
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
    "StoreKind",
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
    store_url: str | None = None,
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
    """The store `store_url` names by its scheme (a `mongodb://` one read as `mongo_uri` is, with
    `mongo_db` and the collections); else MongoDB when a URI or host is given; else the embedded
    SQLite file in `data_dir`. Opening builds nothing: `prepare` does (the daemon's start).

    `timeout_seconds` bounds each operation of a shared store, its connecting included (defaults:
    `store.mongo_client.TIMEOUT_MS`, 30 s; PostgreSQL's in store/postgres.py); a prober that must
    answer quickly passes a short one. Raises `StoreError` (`StoreUnavailable`: the SQLite file
    cannot be opened); ValueError for a URL no store reads, or a URL and a MongoDB URI or host."""
    if store_url:
        if mongo_uri or mongo_host:
            raise ValueError("a store URL and a MongoDB URI or host name two stores: give one")
        kind = StoreKind.of_url(store_url)
        if kind is StoreKind.POSTGRESQL:
            # Imported here, as pymongo is below: an embedded deployment's workers never load psycopg.
            from nietest_daemon.store.postgres import PostgresStore

            return PostgresStore.from_url(store_url, timeout_seconds=timeout_seconds)
        if kind is StoreKind.SQLITE:
            path = sqlite_path_of(store_url)
            return SQLiteStore(path.parent, filename=path.name)
        mongo_uri = store_url
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
    """The store the settings name (`Settings.store_kind`): `open_store` with NIETEST_STORE_URL,
    the MongoDB fields and the data dir."""
    return open_store(
        data_dir=settings.data_dir,
        store_url=settings.store_url,
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
    """Open the store the settings name, `prepare` it and close it: the daemon's first step, before
    any worker opens the store. MongoDB builds its indexes and warns about its durability;
    PostgreSQL applies its migrations under an advisory lock; SQLite made its schema when opened.
    Raises `StoreError` (`StoreUnavailable`: not reachable)."""
    store = open_store_for(settings)
    try:
        store.prepare()
    finally:
        store.close()
