"""The machine's PostgreSQL for tests: its URL, why it is not there, and fresh databases on it.

`server_url()` is `TEST_POSTGRES_URL` when set, else the machine's server at
`postgresql://postgres@127.0.0.1:5432/postgres` if it answers within a second, else None (tests
skip with `unavailable_reason()`; `.ci/run` makes sure one answers). `temporary_database()`
creates a database `nt_<hex>` for its caller and drops it after (`WITH (FORCE)`: connections a
test left open do not keep it), so that test runs on one server never share one.
"""

from __future__ import annotations

import functools
import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

ENV = "TEST_POSTGRES_URL"
MACHINE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
PREFIX = "nt_"


@functools.cache
def _probe() -> tuple[str | None, str | None]:
    """(the server's URL, None) or (None, why not): asked once per process."""
    url = os.environ.get(ENV) or MACHINE_URL
    params = conninfo_to_dict(url)
    host, port = str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432)
    if not host.startswith("/"):
        try:
            socket.create_connection((host, port), timeout=1).close()
        except OSError as exc:
            return None, f"no PostgreSQL server answers at {host}:{port} ({exc}); set {ENV} to use another"
    try:
        psycopg.connect(url, connect_timeout=2, autocommit=True).close()
    except psycopg.Error as exc:
        return None, f"the PostgreSQL server at {host}:{port} refused the test connection: {' '.join(str(exc).split())}"
    return url, None


def server_url() -> str | None:
    """The URL of a PostgreSQL server tests may create databases on, or None."""
    return _probe()[0]


def unavailable_reason() -> str | None:
    """None when `server_url()` answers; else why not (a test skips with it)."""
    return _probe()[1]


def database_url(url: str, name: str) -> str:
    """`url` naming the database `name` instead of its own."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@contextmanager
def temporary_database() -> Iterator[str]:
    """The URL of a fresh, empty database for the caller, dropped on exit. Its commits do not wait
    for the disk (`synchronous_commit = off`, on this database only): a test's data never needs to
    outlive a crash of the server, and the suite runs faster."""
    url = server_url()
    if url is None:
        raise RuntimeError(unavailable_reason() or "no PostgreSQL server")
    name = f"{PREFIX}{uuid.uuid4().hex[:16]}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        admin.execute(sql.SQL("ALTER DATABASE {} SET synchronous_commit = off").format(sql.Identifier(name)))
    try:
        yield database_url(url, name)
    finally:
        with suppress(psycopg.Error), psycopg.connect(url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
