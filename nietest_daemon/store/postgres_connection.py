"""The PostgreSQL store's connections: one pool per process, a time limit on every wait, how the
store is named, and which of psycopg's errors mean the server is unavailable.

One `psycopg_pool.ConnectionPool` per process, made at the first operation in that process (a
forked child makes its own and never touches its parent's: their sockets are the parent's), in
autocommit mode. Everything that can wait is bounded by the timeout (`DEFAULT_TIMEOUT_SECONDS`, or
the caller's): each statement (`statement_timeout`), a transaction left open and idle
(`idle_in_transaction_session_timeout`, twice that), connecting (`connect_timeout`; a shorter one
in the URL is kept), writes the peer never acknowledges and a peer that died (`tcp_user_timeout`,
keepalives), and waiting for a free connection of the pool. Sessions run in UTC, and plan each
statement with its own values (`plan_cache_mode=force_custom_plan`), as tests/test_postgres_plans.py
EXPLAINs them: a generic plan, made for any task, could read a task of 50,000 subtasks as it
would one of 5 (a prepared statement still skips parsing).

Before the pool is made, one plain connection is made and closed: a wrong password, a missing
database or a server that is down is told at once, in the server's words, rather than as the
pool's timeout 30 s later (the pool only logs why it cannot connect). A pool that times out later
is asked the same way why (`Connections._no_connection`).
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.errors import UndefinedTable
from psycopg_pool import ConnectionPool, PoolTimeout

from nietest_daemon.core.redaction import add_secrets, redact_url
from nietest_daemon.store.base import StoreError

#: The limit of each statement, of connecting and of waiting for a free connection, as MongoDB's
#: `timeoutMS`: far above any statement of the store (a retry of 50,000 subtasks takes one or two
#: seconds) and a server's restart, far below the actors' time limits (5 and 30 minutes), so that a
#: server that stops answering fails the operation (`StoreUnavailable`: run it again later)
#: instead of hanging a worker thread until the watchdog kills its process.
DEFAULT_TIMEOUT_SECONDS = 30.0
#: Connections a process keeps when idle: a command needs one, and an idle worker keeps one warm.
POOL_MIN_SIZE = 1
#: The most a process opens. The pool grows only when a thread would otherwise wait, so a process
#: holds at most as many as its threads use at once (a worker: its `NIETEST_<Q>_THREADS`, 5 by
#: default, and its sweeper). Past 20 threads at once, threads take turns (waiting up to the
#: timeout). Mind the server's `max_connections` (100 by default): every process of every daemon
#: that shares the store counts (docs/stores.md).
POOL_MAX_SIZE = 20
#: An idle connection above the minimum is closed after this long.
POOL_MAX_IDLE_SECONDS = 300.0

#: SQLSTATE classes and codes that say the server cannot do it now (`is_outage`): connection
#: exceptions, a rollback (deadlock, serialization failure), insufficient resources (too many
#: connections, out of memory or disk), operator intervention (a statement cancelled by its
#: timeout, a shutdown, a server starting); a lock not available, an I/O error.
_OUTAGE_CLASSES = frozenset({"08", "40", "53", "57"})
_OUTAGE_CODES = frozenset({"55P03", "58030"})
#: What a connection the server or libpq refused for its settings says (no SQLSTATE at connect
#: time): a person must fix the URL, the password or the server's configuration; retrying cannot.
_REFUSED_LOGIN = re.compile(
    r"authentication failed|no password supplied|no pg_hba\.conf entry|not permitted to log in|does not exist"
    r"|permission denied|invalid (?:integer value|port|connection option|sslmode|URI)|could not parse",
    re.IGNORECASE,
)
_QUERY_PASSWORD = re.compile(r"(?i)([?&]password=)[^&#]*")


def shown_url(url: str) -> str:
    """The URL with its password masked, in the netloc or as a query parameter."""
    return _QUERY_PASSWORD.sub(r"\1***", redact_url(url))


def is_outage(exc: Exception) -> bool:
    """Whether a psycopg error means the server could not be reached or do it now: a connection
    refused, lost or timed out (no SQLSTATE, or class 08), no free connection within the timeout
    (`PoolTimeout`), `_OUTAGE_CLASSES` / `_OUTAGE_CODES`. Not: a refused login, a missing database
    or role (`_REFUSED_LOGIN`), and every other error (a refused privilege, SQL, a program limit),
    which retrying would only repeat."""
    if not isinstance(exc, psycopg.OperationalError):
        return False
    state = exc.sqlstate
    if state:
        return state[:2] in _OUTAGE_CLASSES or state in _OUTAGE_CODES
    return isinstance(exc, PoolTimeout) or not _REFUSED_LOGIN.search(str(exc))


def session_settings(params: Mapping[str, Any], seconds: float) -> dict[str, Any]:
    """The connection parameters nietest adds to the URL's (`params`): time limits, UTC, keepalives."""
    given = str(params.get("connect_timeout") or "").strip()
    connect = max(1, math.ceil(seconds))
    if given.isdigit() and 0 < int(given) < connect:
        connect = int(given)
    millis = int(seconds * 1000)
    limits = (
        f"-c statement_timeout={millis} -c idle_in_transaction_session_timeout={2 * millis} -c TimeZone=UTC"
        " -c plan_cache_mode=force_custom_plan"
    )
    return {
        "connect_timeout": connect,
        "options": f"{params.get('options') or ''} {limits}".strip(),
        "keepalives": 1,
        "keepalives_idle": max(1, int(seconds / 3)),
        "keepalives_interval": max(1, int(seconds / 6)),
        "keepalives_count": 3,
        "tcp_user_timeout": millis,
        "application_name": str(params.get("application_name") or "nietest"),
    }


class Connections:
    """The connections of one store handle: this process's pool, made at its first use here."""

    def __init__(self, url: str, *, timeout_seconds: float | None = None, max_connections: int = POOL_MAX_SIZE) -> None:
        self.address = f"postgresql {shown_url(url)}"
        self.timeout_seconds = float(timeout_seconds or DEFAULT_TIMEOUT_SECONDS)
        self.max_connections = max(POOL_MIN_SIZE, int(max_connections))
        try:
            params = conninfo_to_dict(url)
        except psycopg.Error as exc:
            detail = " ".join(str(exc).split())
            raise StoreError(f"the task store ({self.address}) has a bad URL: {type(exc).__name__}: {detail}") from exc
        add_secrets([str(params["password"])] if params.get("password") else [])
        self._conninfo = make_conninfo(url, **session_settings(params, self.timeout_seconds))
        self._lock = threading.Lock()
        self._pool: ConnectionPool[psycopg.Connection[Any]] | None = None
        self._pid = 0
        self._closed = False

    def connect(self) -> psycopg.Connection[Any]:
        """A connection of its own (not the pool's), autocommit, with the store's settings."""
        return psycopg.connect(self._conninfo, autocommit=True)

    def _get_pool(self) -> ConnectionPool[psycopg.Connection[Any]]:
        if self._closed:
            raise StoreError(f"the task store ({self.address}) is closed")
        pool, pid = self._pool, os.getpid()
        if pool is not None and self._pid == pid:
            return pool
        with self._lock:
            if self._pool is None or self._pid != pid:
                self.connect().close()  # the server's own reason, at once, when it refuses us
                pool = ConnectionPool(
                    self._conninfo,
                    kwargs={"autocommit": True},
                    min_size=POOL_MIN_SIZE,
                    max_size=self.max_connections,
                    timeout=self.timeout_seconds,
                    max_idle=POOL_MAX_IDLE_SECONDS,
                    name="nietest-store",
                    open=False,
                )
                pool.open(wait=False)
                self._pool, self._pid = pool, pid
            return self._pool

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A connection of this process's pool, given back after; a missing table is told as a
        schema the daemon has not made yet."""
        pool = self._get_pool()
        try:
            conn = pool.getconn()
        except PoolTimeout as exc:
            raise self._no_connection(exc) from exc
        try:
            yield conn
        except UndefinedTable as exc:
            raise StoreError(
                f"the task store ({self.address}) has no nietest tables: `nietest daemon` makes them when it"
                f" starts (UndefinedTable: {' '.join(str(exc).split())[:200]})"
            ) from exc
        finally:
            pool.putconn(conn)  # a broken connection is dropped, not given back
            if conn.broken:  # the server restarted or the network failed: the idle ones are likely dead too
                pool.check()

    def _no_connection(self, timeout: PoolTimeout) -> psycopg.Error:
        """Why the pool had no connection for us: the server's reason when a connection of our own
        fails too, else the pool's timeout (every connection was busy)."""
        try:
            self.connect().close()
        except psycopg.OperationalError as exc:
            return exc
        return timeout

    def close(self) -> None:
        """Close this process's pool (a parent's, after a fork, is left alone); no use after."""
        with self._lock:
            pool, self._pool, self._closed = self._pool, None, True
            mine = pool is not None and self._pid == os.getpid()
        if pool is not None and mine:
            pool.close(timeout=5.0)
