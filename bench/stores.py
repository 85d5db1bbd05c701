"""The task store a bench runs on: `--store sqlite` (the default) or `--store postgresql`; and its
broker: `--broker embedded` (the default: the daemon's own valkey-server) or `--broker redis` (a
database of the machine's Redis of its own: nietest_daemon/testing/machine_redis.py).

SQLite is the file in the daemon's data dir, as in a default deployment. PostgreSQL is a fresh
database (`nt_<hex>`) on the server nietest_daemon/testing/postgres.py finds (the machine's on
127.0.0.1:5432, or `TEST_POSTGRES_URL`), created for one daemon and dropped after it:
the daemon gets it as `NIETEST_STORE_URL` and prepares it (its migrations) at start, as in a
deployment. Its commits do not wait for the disk (`synchronous_commit = off` on that database,
see `temporary_database`); the SQLite store's do not either (WAL, `synchronous = NORMAL`), so
neither store's figures include an fsync per write.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

from nietest_daemon.core.settings import Settings
from nietest_daemon.store import SQLiteStore, Store
from nietest_daemon.store.postgres import PostgresStore
from nietest_daemon.testing import machine_redis, postgres

STORES = ("sqlite", "postgresql")
BROKERS = ("embedded", "redis")


def add_store_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store",
        choices=STORES,
        default="sqlite",
        help="the task store: the SQLite file in the daemon's data dir, or a temporary PostgreSQL database",
    )


def add_broker_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--broker",
        choices=BROKERS,
        default="embedded",
        help="the broker: the daemon's embedded valkey-server, or a database of the machine's Redis (127.0.0.1:6379)",
    )


@contextlib.contextmanager
def broker_env(kind: str) -> Iterator[dict[str, str]]:
    """The daemon's broker settings for `kind`: none for the embedded broker, else BROKER_REDIS_URL
    naming a database of the machine's Redis claimed for the run (emptied and released on exit)."""
    if kind == "embedded":
        yield {}
        return
    if kind != "redis":
        raise ValueError(f"no broker {kind!r}: one of {', '.join(BROKERS)}")
    reason = machine_redis.available()
    if reason:
        raise SystemExit(f"--broker redis: {reason}")
    with machine_redis.claimed_database() as url:
        yield {"BROKER_REDIS_URL": url}


@contextlib.contextmanager
def store_env(kind: str, *, password: str | None = None) -> Iterator[dict[str, str]]:
    """The daemon's store settings for `kind`: none for SQLite (the data dir's file), else
    NIETEST_STORE_URL naming a temporary PostgreSQL database, dropped on exit (after the daemon,
    which the caller stops first). `password` goes into the URL: the test server trusts its
    loopback clients and never asks for it, so only a check that it is never logged uses it."""
    if kind == "sqlite":
        yield {}
        return
    if kind != "postgresql":
        raise ValueError(f"no store {kind!r}: one of {', '.join(STORES)}")
    reason = postgres.unavailable_reason()
    if reason:
        raise SystemExit(f"--store postgresql: {reason}")
    with postgres.temporary_database() as url:
        if password:
            parts = urlsplit(url)
            netloc = f"{parts.username or 'postgres'}:{password}@{parts.hostname}:{parts.port or 5432}"
            url = urlunsplit(parts._replace(netloc=netloc))
        yield {"NIETEST_STORE_URL": url}


@contextlib.contextmanager
def bench_store(kind: str, directory: Path) -> Iterator[Store]:
    """A store for a bench that drives it in this process (no daemon): a SQLite file in
    `directory`, or a temporary PostgreSQL database, prepared (migrated) as a daemon's start would."""
    if kind == "sqlite":
        sqlite = SQLiteStore(directory)
        try:
            yield sqlite
        finally:
            sqlite.close()
        return
    with store_env(kind) as env:
        store = PostgresStore.from_url(env["NIETEST_STORE_URL"])
        try:
            store.prepare()
            yield store
        finally:
            store.close()


def store_mib(settings: Settings) -> float:
    """The store's size on disk: the SQLite file with its WAL, or the PostgreSQL database's
    (`pg_database_size`: tables, indexes and their free space)."""
    if settings.store_url and settings.store_kind == "postgresql":
        with psycopg.connect(settings.store_url, autocommit=True, connect_timeout=5) as conn:
            row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
        return int(row[0] if row else 0) / 2**20
    db = settings.sqlite_path
    return sum(p.stat().st_size for p in db.parent.glob(db.name + "*")) / 2**20


def server_cpu_seconds(url: str) -> float:
    """CPU seconds used so far by the server processes serving the database of `url` (its
    backends, found by the database name in their titles: the server must run on this machine)."""
    name = urlsplit(url).path.lstrip("/")
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")[0]
            if title.startswith("postgres:") and f" {name} " in f"{title} ":
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / ticks
        except OSError:
            continue  # it ended meanwhile
    return total


def terminate_connections(url: str) -> int:
    """End every other session on the PostgreSQL store's database, as a server restart would (the
    pools find their connections dead at their next statement); how many there were."""
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
    return int(row[0]) if row else 0
