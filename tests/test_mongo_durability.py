"""The MongoDB client's durable settings, and the warning at the daemon's start.

The client is a real `pymongo.MongoClient` (built with `connect=False`, which does no I/O): what it
says of its write concern, read preference, retries and time limit is what it sends. The URIs
ask for weaker settings, which the keyword arguments the store pins must win over. The warning is
read from `prepare` on `testing.mongo_faults`, whose `hello` answers as a replica set or as a
standalone server.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mongomock
import pytest
import structlog
from pymongo import ReadPreference

from nietest_daemon.store import open_store
from nietest_daemon.store.mongo import MongoStore
from nietest_daemon.store.mongo_client import TIMEOUT_MS, overridden_options, uri_options
from nietest_daemon.testing.daemon import clean_env
from nietest_daemon.testing.mongo_faults import STANDALONE_HELLO, FaultyClient, FaultyDatabase

WEAK = (
    "mongodb://u:pw-secret@db1.example:27017,db2.example:27017/task_db?replicaSet=rs0&w=1&journal=false"
    "&readPreference=secondaryPreferred&maxStalenessSeconds=120&readPreferenceTags=dc:east&retryWrites=false"
    "&wTimeoutMS=5&appName=my%20app"
)


@pytest.fixture
def stores() -> Iterator[list[MongoStore]]:
    made: list[MongoStore] = []
    yield made
    for store in made:
        store.close()


def real_client(stores: list[MongoStore], uri: str, **kwargs: Any) -> Any:
    store = MongoStore.from_settings(uri=uri, connect=False, **kwargs)
    stores.append(store)
    return store._client


def test_the_durable_settings_win_over_a_uri_that_asks_for_weaker_ones(stores: list[MongoStore]) -> None:
    client = real_client(stores, WEAK)
    assert client.write_concern.document == {"w": "majority", "j": True}  # no wtimeout: timeoutMS bounds writes
    assert client.read_preference == ReadPreference.PRIMARY  # tags and staleness dropped, not refused
    assert client.options.retry_writes is True
    assert client.options.timeout == TIMEOUT_MS / 1000 == 30.0
    assert client.options.pool_options.metadata["application"] == {"name": "my app"}  # the rest as written
    assert client.codec_options.tz_aware is True


def test_the_settings_of_a_host_without_uri_are_the_same(stores: list[MongoStore]) -> None:
    store = MongoStore.from_settings(host="db.example", port=27018, user="u", password="pw-secret", connect=False)
    stores.append(store)
    client = store._client
    assert client is not None
    assert client.write_concern.document == {"w": "majority", "j": True}
    assert client.read_preference == ReadPreference.PRIMARY and client.options.retry_writes is True
    assert client.options.timeout == 30.0
    assert store.address == "mongodb db.example:27018/task_db" and store._overridden == []


@pytest.mark.parametrize(
    ("query", "timeout"),
    [("", 30.0), ("?timeoutMS=500", 0.5), ("?timeoutMS=0", 30.0), ("?timeoutMS=90000", 30.0)],
)
def test_a_shorter_time_limit_of_the_uri_is_kept_none_and_a_longer_one_are_not(
    stores: list[MongoStore], query: str, timeout: float
) -> None:
    assert real_client(stores, f"mongodb://db.example/task_db{query}").options.timeout == timeout


def test_the_metrics_probe_keeps_its_short_time_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[dict[str, Any]] = []

    def client(*args: Any, **kwargs: Any) -> FaultyClient:
        made.append(kwargs)
        return FaultyClient(mongomock.MongoClient())

    monkeypatch.setattr("pymongo.MongoClient", client)
    open_store(data_dir="/nonexistent", mongo_uri="mongodb://db.example/task_db", timeout_seconds=2.0).close()
    open_store(data_dir="/nonexistent", mongo_uri="mongodb://db.example/task_db").close()
    assert [kwargs["timeoutMS"] for kwargs in made] == [2000, 30_000]
    assert all(kwargs["w"] == "majority" and kwargs["journal"] is True for kwargs in made)


def test_what_the_uri_asked_for_is_told_with_what_it_would_risk() -> None:
    url, asked = uri_options(WEAK)
    assert "readPreferenceTags" not in url and "maxStalenessSeconds" not in url and "wTimeoutMS" not in url
    assert url.startswith("mongodb://u:pw-secret@db1.example:27017,db2.example:27017/task_db?replicaSet=rs0&w=1")
    notes = overridden_options(asked, TIMEOUT_MS)
    assert notes == [
        "MONGO_URI's w=1 is overridden by w=majority (with it, a failover can roll back an acknowledged write:"
        " an image may be paid twice)",
        "MONGO_URI's journal=false is overridden by journal=true (with it, a server crash can lose an"
        " acknowledged write: an image may be paid twice)",
        "MONGO_URI's readPreference=secondaryPreferred is overridden by readPreference=primary (with it, a"
        " secondary lags behind: a retry or a repair would count from stale data)",
        "MONGO_URI's retryWrites=false is overridden by retryWrites=true (with it, a write cut by a failover is"
        " not retried: a finish would leave its count to the repair pass)",
        "MONGO_URI's maxStalenessSeconds is ignored: reads go to the primary",
        "MONGO_URI's readPreferenceTags is ignored: reads go to the primary",
        "MONGO_URI's wTimeoutMS is ignored: timeoutMS bounds every write",
    ]
    assert overridden_options(uri_options("mongodb://h/db?w=majority&journal=true&retryWrites=true")[1], 30_000) == []


# --- the warning at start --------------------------------------------------------------------------------


def prepared(overridden: list[str], hello: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The warnings `prepare` logs for a store whose URI asked for `overridden`, on a server that
    answers `hello` (a replica set's primary by default)."""
    db = FaultyDatabase(mongomock.MongoClient().db)
    if hello is not None:
        db.hello = hello
    store = MongoStore(db, address="mongodb mongodb://u:***@db.example/task_db", overridden=overridden)  # type: ignore[arg-type]
    with structlog.testing.capture_logs() as captured:
        store.prepare()
    return [line for line in captured if line["log_level"] == "warning"]


def test_a_replica_set_with_the_pinned_settings_starts_without_a_warning() -> None:
    assert prepared([]) == []


def test_a_standalone_server_gets_one_warning_saying_what_is_at_risk() -> None:
    (line,) = prepared([], STANDALONE_HELLO)
    assert line["event"] == "MongoDB store: durability at risk"
    assert line["store"] == "mongodb mongodb://u:***@db.example/task_db"
    (risk,) = line["risks"]
    assert risk.startswith("the server is standalone, not a replica set: a write cut by a network error")
    assert "a replica set, even of one member, retries writes" in risk


def test_a_weaker_uri_gets_one_warning_too() -> None:
    notes = overridden_options(uri_options(WEAK)[1], TIMEOUT_MS)
    (line,) = prepared(notes, STANDALONE_HELLO)
    assert line["risks"][: len(notes)] == notes and len(line["risks"]) == len(notes) + 1
    assert any("an image may be paid twice" in risk for risk in line["risks"])


def test_a_mongos_is_no_standalone_server() -> None:
    assert prepared([], {"isWritablePrimary": True, "msg": "isdbgrid", "ok": 1.0}) == []


DAEMON = """
import os, sys
import mongomock, pymongo
from nietest_daemon.testing.mongo_faults import STANDALONE_HELLO, FaultyClient

server = mongomock.MongoClient()


def standalone(*args, **kwargs):
    client = FaultyClient(server)
    client["task_db"].hello = dict(STANDALONE_HELLO)
    return client


pymongo.MongoClient = standalone
os.execve = lambda *args: sys.exit(0)  # where supervisord would start
from nietest_daemon.__main__ import main

sys.exit(main(["daemon"]))
"""


def test_the_daemon_logs_the_warning_as_one_json_line_at_start(short_tmp: Path) -> None:
    uri = "mongodb://nietest:pw-secret@db.example:27017/task_db?w=1"
    env = clean_env(NIETEST_HOME=str(short_tmp), MONGO_URI=uri)
    done = subprocess.run([sys.executable, "-c", DAEMON], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["event"] for line in lines] == ["daemon starting", "MongoDB store: durability at risk"]
    warning = lines[1]
    assert warning["level"] == "warning" and warning["process"] == "daemon"
    assert warning["store"] == "mongodb mongodb://nietest:***@db.example:27017/task_db?w=1"
    assert [risk.split(" (")[0] for risk in warning["risks"]] == [
        "MONGO_URI's w=1 is overridden by w=majority",
        "the server is standalone, not a replica set: a write cut by a network error or a restart is not retried",
    ]
    assert "pw-secret" not in done.stdout + done.stderr
