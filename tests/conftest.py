"""Fixtures: daemons in fresh homes, private valkey servers, short temporary directories.

The helpers they hand out live in nietest_daemon.testing (`Daemon`, `PrivateValkey`, `clean_env`).
Everything polls with a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from nietest_daemon.testing.daemon import Daemon
from nietest_daemon.testing.valkey import PrivateValkey


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temporary directory: unix socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="nt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_daemon(short_tmp: Path) -> Iterator[Callable[..., Daemon]]:
    """Factory of daemons in fresh homes; every one is stopped (or killed) at the end."""
    made: list[Daemon] = []

    def make(home: Path | None = None, **env: str) -> Daemon:
        home = home or short_tmp / uuid.uuid4().hex[:6]
        home.mkdir(exist_ok=True)
        defaults = {
            "NIETEST_MASTER_PROCESSES": "1",
            "NIETEST_SUBTASK_PROCESSES": "2",
            "NIETEST_SUBTASK_OPS_PROCESSES": "1",
            "NIETEST_MASTER_THREADS": "2",
            "NIETEST_SUBTASK_THREADS": "2",
            "NIETEST_SUBTASK_OPS_THREADS": "2",
            "NIETEST_DRAIN_SECONDS": "5",
            "NIETEST_BROKER_HEARTBEAT_TIMEOUT": "3",
            "NIETEST_ACTOR_MODULES": "e2e_actors",
        }
        daemon = Daemon(home, **{**defaults, **env})
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        if daemon.proc is not None and daemon.proc.poll() is None:
            try:
                daemon.stop(timeout=30)
            except Exception:
                daemon.kill_everything()
        else:
            daemon.kill_everything()


@pytest.fixture
def private_valkey(short_tmp: Path) -> Iterator[Callable[..., PrivateValkey]]:
    servers: list[PrivateValkey] = []

    def make(password: str | None = None, start: bool = True) -> PrivateValkey:
        server = PrivateValkey(short_tmp, password)
        servers.append(server)
        return server.start() if start else server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def _shared_valkey_server() -> Iterator[PrivateValkey]:
    directory = Path(tempfile.mkdtemp(prefix="nt-", dir="/tmp"))
    server = PrivateValkey(directory).start()
    yield server
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def valkey(_shared_valkey_server: PrivateValkey) -> PrivateValkey:
    """One private valkey-server for the whole session, emptied before each test that asks for it
    (starting a server per test costs about 0.2 s). Tests that stop or break the server, or need a
    password, use `private_valkey` instead."""
    client = redis.Redis.from_url(_shared_valkey_server.url)
    try:
        client.flushall()
        client.script_flush()
    finally:
        client.close()
    return _shared_valkey_server
