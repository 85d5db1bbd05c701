"""NIETEST_STORE_URL: the store each scheme opens, and what an operator sees when it cannot be used.

The selection runs in-process (a `mongodb://` URL through mongomock, as MONGO_URI is tested; SQLite
for real); the PostgreSQL parts run against the real server (`testing/postgres.py`: the machine's, or
the one .ci/run started; they skip without one), as do the real `nietest daemon` processes that must
refuse to start with one clear line: a database that does not exist, a server that is down, a wrong
password (a private cluster with password authentication: the shared servers trust every local user).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import mongomock
import pytest

from nietest_daemon.core import settings as settings_module
from nietest_daemon.core.settings import StoreKind
from nietest_daemon.programs import metrics as metrics_program
from nietest_daemon.store import SQLiteStore, open_store, open_store_for, prepare_store_for
from nietest_daemon.store.mongo import MongoStore
from nietest_daemon.testing import postgres as pg
from nietest_daemon.testing.daemon import NIETEST, clean_env, pids_of_home
from nietest_daemon.testing.valkey import PrivateValkey

PASSWORD = "s3cr/t#Pw-81"  # '/' and '#' must be percent-encoded in a URL; never shown in any form
QUOTED = quote(PASSWORD, safe="")
needs_postgres = pytest.mark.skipif(pg.server_url() is None, reason=pg.unavailable_reason() or "")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def settings_for(home: Path, **env: str) -> settings_module.Settings:
    return settings_module.load({"NIETEST_HOME": str(home), **env})


def tables_of(url: str) -> list[str]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
        )
        return sorted(r[0] for r in rows)


def databases(url: str) -> set[str]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        return {r[0] for r in conn.execute("SELECT datname FROM pg_database")}


def shown_nowhere(text: str) -> bool:
    return all(form not in text for form in (PASSWORD, QUOTED, "s3cr"))


# --- choosing the store ------------------------------------------------------------------------------


def test_a_sqlite_url_opens_that_file(tmp_path: Path) -> None:
    path = tmp_path / "elsewhere" / "tasks.db"
    settings = settings_for(tmp_path / "home", NIETEST_STORE_URL=f"sqlite://{path}")
    assert settings.store_kind is StoreKind.SQLITE and settings.store_description == f"sqlite {path}"
    store = open_store_for(settings)
    try:
        assert isinstance(store, SQLiteStore) and store.path == path and not any(store.count_tasks().values())
    finally:
        store.close()
    assert path.is_file() and not (tmp_path / "home").exists()  # nothing in the data dir
    with pytest.raises(ValueError, match="absolute path"):
        open_store(data_dir=tmp_path, store_url="sqlite://tasks.db")


def test_a_mongodb_url_is_read_as_mongo_uri_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same client arguments, same database (MONGO_DB, not the URL's path), same collections."""
    made: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def fake_client(*args: Any, **kwargs: Any) -> mongomock.MongoClient:
        made.append((args, kwargs))
        return mongomock.MongoClient()

    monkeypatch.setattr("pymongo.MongoClient", fake_client)
    uri = f"mongodb://nt:{QUOTED}@db.example:27017/ignored?replicaSet=rs0"
    extra = {"MONGO_DB": "campaigns", "SUBTASK_COLLECTION": "subs"}
    stores = []
    for variable in ("MONGO_URI", "NIETEST_STORE_URL"):
        settings = settings_for(tmp_path, **{variable: uri}, **extra)
        assert settings.store_kind is StoreKind.MONGODB
        assert settings.store_description == "mongodb mongodb://nt:***@db.example:27017/ignored?replicaSet=rs0"
        store = open_store_for(settings, timeout_seconds=3)
        assert isinstance(store, MongoStore)
        stores.append((store.db.name, store.subtasks.name, store.address))
        store.close()
    assert stores[0] == stores[1] == ("campaigns", "subs", stores[0][2]) and shown_nowhere(stores[0][2])
    assert made[0] == made[1]


def test_a_postgresql_url_opens_the_postgres_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both schemes, the probe's timeout passed through (store/postgres.py replaced by a recorder)."""
    opened: list[tuple[str, float | None]] = []

    class Recorder:
        @classmethod
        def from_url(cls, url: str, *, timeout_seconds: float | None = None) -> str:
            opened.append((url, timeout_seconds))
            return "the store"

    monkeypatch.setitem(sys.modules, "nietest_daemon.store.postgres", type(sys)("recorder"))
    monkeypatch.setattr(sys.modules["nietest_daemon.store.postgres"], "PostgresStore", Recorder, raising=False)
    for url in ("postgresql://nt@db/nietest", "postgres://nt@db/nietest"):
        store: object = open_store_for(settings_for(tmp_path, NIETEST_STORE_URL=url), timeout_seconds=2.0)
        assert store == "the store"
    assert opened == [("postgresql://nt@db/nietest", 2.0), ("postgres://nt@db/nietest", 2.0)]
    with pytest.raises(ValueError, match="two stores"):
        open_store(data_dir=tmp_path, store_url="postgresql://db/nt", mongo_host="db")


def test_an_embedded_deployment_never_imports_the_shared_stores_drivers(tmp_path: Path) -> None:
    """A worker's imports and its store (SQLite): neither psycopg nor pymongo is loaded."""
    code = (
        "import sys\n"
        "import nietest_daemon.programs.worker, nietest_daemon.programs.metrics, nietest_daemon.pipeline.actors\n"
        "from nietest_daemon.core.settings import load\n"
        "from nietest_daemon.store import open_store_for\n"
        f"open_store_for(load({{'NIETEST_HOME': {str(tmp_path)!r}}})).count_tasks()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('psycopg', 'psycopg_pool', 'pymongo')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# --- the real server -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    """One database for this module's tests that use the real server (a database costs ~0.3 s)."""
    if pg.server_url() is None:
        pytest.skip(pg.unavailable_reason() or "no PostgreSQL server")
    with pg.temporary_database() as url:
        yield url


@needs_postgres
def test_readyz_and_store_up_cover_postgres(database: str, valkey: PrivateValkey, short_tmp: Path) -> None:
    """The metrics program's probe on the real server: ready, `nietest_store_up 1` and the task counts;
    then on a server that is down, not ready with the store named (password masked) and `nietest_store_up 0`."""
    settings = settings_for(short_tmp, BROKER_REDIS_URL=valkey.url, NIETEST_STORE_URL=database)
    prepare_store_for(settings)

    class Running(metrics_program.Probe):
        def processes(self) -> list[Any]:
            return []  # no worker to wait for: the broker and the store decide

    up = metrics_program.Endpoints(Running(settings, "host-p"))
    status, _, body = up.readyz()
    assert status == 200, body
    text = up.metrics()[2].decode()
    assert "nietest_store_up 1.0" in text and 'nietest_tasks{status="pending"} 0.0' in text

    down_url = f"postgresql://nt:{QUOTED}@127.0.0.1:{closed_port()}/nietest?connect_timeout=2"
    down_settings = settings_for(short_tmp, BROKER_REDIS_URL=valkey.url, NIETEST_STORE_URL=down_url)
    down = metrics_program.Endpoints(Running(down_settings, "host-p"))
    status, _, body = down.readyz()
    report = json.loads(body)
    assert status == 503 and [p["component"] for p in report["not_ready"]] == ["store"], report
    assert shown_nowhere(body.decode())
    assert "nietest_store_up 0.0" in down.metrics()[2].decode()


def run_daemon(home: Path, store_url: str) -> subprocess.CompletedProcess[str]:
    env = clean_env(NIETEST_HOME=str(home), NIETEST_STORE_URL=store_url)
    return subprocess.run([*NIETEST, "daemon"], env=env, capture_output=True, text=True, timeout=60, cwd=home.parent)


def assert_refused(done: subprocess.CompletedProcess[str], home: Path, shown_url: str, words: str) -> None:
    """Exit 1, the start line then one stderr line naming the store (password masked); no process left."""
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"nietest: could not prepare the store (postgresql {shown_url}): "), line
    assert words in line and "Traceback" not in line, line
    assert shown_nowhere(done.stdout + done.stderr), done.stdout + done.stderr
    assert json.loads(done.stdout)["store"] == f"postgresql {shown_url}"
    assert not pids_of_home(home)


@needs_postgres
def test_the_daemon_refuses_a_missing_database_or_a_server_down(database: str, short_tmp: Path) -> None:
    """Two real `nietest daemon` processes: each stops at its store in one line, and creates nothing."""
    server = database.rsplit("/", 1)[0]
    missing = f"nt_missing_{os.getpid()}"
    port = closed_port()
    cases = {
        "missing": (f"{server}/{missing}", f"{server}/{missing}", f'database "{missing}" does not exist'),
        "down": (
            f"postgresql://nt:{QUOTED}@127.0.0.1:{port}/nietest",
            f"postgresql://nt:***@127.0.0.1:{port}/nietest",
            "unavailable: ",
        ),
    }
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        done = dict(zip(cases, pool.map(lambda c: run_daemon(short_tmp / c, cases[c][0]), cases), strict=True))
    for case, (_, shown, words) in cases.items():
        assert_refused(done[case], short_tmp / case, shown, words)
    assert missing not in databases(database)  # not created by a failed start


@pytest.fixture(scope="module")
def password_server() -> Iterator[str]:
    """A private PostgreSQL cluster that asks for passwords (scram-sha-256), its superuser `nt` with
    PASSWORD; the URL of its `postgres` database. Run as the `postgres` (else `nobody`) user when root."""
    found = shutil.which("initdb") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))), None)
    if not found:
        pytest.skip("initdb is not installed")
    bindir = Path(os.path.realpath(found)).parent
    directory = Path(tempfile.mkdtemp(prefix="nt-pgpw-", dir="/tmp"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        user = "postgres" if subprocess.run(["id", "-u", "postgres"], capture_output=True).returncode == 0 else "nobody"
        shutil.chown(directory, user)
        as_user = ["runuser", "-u", user, "--"]
    (directory / "pw").write_text(PASSWORD + "\n")
    os.chmod(directory / "pw", 0o644)
    port = closed_port()
    data = directory / "data"

    def pg(program: str, *args: str | Path, check: bool = True) -> None:
        subprocess.run(
            [*as_user, bindir / program, *args], cwd=directory, check=check, capture_output=True, timeout=120
        )

    pg("initdb", "-D", data, "-U", "nt", "-A", "scram-sha-256", "--pwfile", directory / "pw", "--locale=C", "--no-sync")
    options = f"-p {port} -k {directory} -c listen_addresses=127.0.0.1 -c fsync=off"
    pg("pg_ctl", "-D", data, "-l", directory / "log", "-w", "-o", options, "start")
    try:
        yield f"postgresql://nt:{QUOTED}@127.0.0.1:{port}/postgres"
    finally:
        pg("pg_ctl", "-D", data, "-m", "fast", "-w", "stop", check=False)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.e2e  # starts a PostgreSQL cluster of its own: a few seconds
def test_the_daemon_refuses_a_wrong_password(password_server: str, short_tmp: Path) -> None:
    import psycopg

    with psycopg.connect(password_server, autocommit=True) as conn:
        conn.execute("CREATE DATABASE nietest")
    right = password_server.rsplit("/", 1)[0] + "/nietest"
    wrong = right.replace(QUOTED, "not-the-password")
    done = run_daemon(short_tmp / "home", wrong)
    assert_refused(done, short_tmp / "home", right.replace(QUOTED, "***"), "password authentication failed")
    assert "not-the-password" not in done.stdout + done.stderr
    assert tables_of(right) == []  # nothing half-written
    # the right password: the same start prepares the store (its tables made), then would exec supervisord
    prepare_store_for(settings_for(short_tmp / "home", NIETEST_STORE_URL=right))
    assert tables_of(right)


def test_status_names_the_store_with_its_password_masked(short_tmp: Path) -> None:
    """`nietest status` (no daemon running: the report still names the broker and the store)."""
    from nietest_daemon.programs import overview

    url = f"postgresql://nt:{QUOTED}@db.example:5432/nietest?sslmode=require"
    report = overview.collect(settings_for(short_tmp, NIETEST_STORE_URL=url))
    shown = "postgresql postgresql://nt:***@db.example:5432/nietest?sslmode=require"
    assert report["store"] == shown and f"store   {shown}" in overview.render(report).splitlines()
    assert shown_nowhere(json.dumps(report))
