"""`Daemon`: one real `nietest daemon` (supervisord, workers, embedded valkey) driven by a test.

Also `clean_env`, the environment a test gives the processes it starts, `pids_of_home`, which
finds every process of one daemon, and `host_name_of`, the NIETEST_HOST_NAME a test daemon gets:
several daemons on this machine share its host name, and two live daemons with one name refuse
each other (coordination/hosts.py). Tests and benches run from a source checkout (the package is
installed editable), so the repository root is two levels above this package.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

from nietest_daemon.coordination.connection import redis_client
from nietest_daemon.core import settings as settings_module
from nietest_daemon.domain.process_state import ProcessState
from nietest_daemon.testing.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
"""The repository root (the checkout an editable install points at)."""
TESTS = ROOT / "tests"
"""Where tests/e2e_actors.py lives: the actors a test daemon loads (NIETEST_ACTOR_MODULES)."""
NIETEST = [sys.executable, "-m", "nietest_daemon"]
"""The `nietest` command, run by the interpreter running the tests."""

# The settings of the seed (the environment variables the daemon reads besides NIETEST_*).
_SEED_VARS = {
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


def clean_env(**overrides: str) -> dict[str, str]:
    """The test process's environment without any nietest or seed setting, plus `overrides`."""
    names = {var for var, _ in settings_module.QUEUE_NAME_VARS.values()} | _SEED_VARS
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIETEST_") and k not in names}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT)])
    # Any free port: several daemons run at once (the address is in $NIETEST_RUN_DIR/metrics.addr).
    env["NIETEST_METRICS_ADDR"] = "127.0.0.1:0"
    env.update(overrides)
    return env


def host_name_of(home: Path) -> str:
    """A NIETEST_HOST_NAME unique to a daemon's home: `t-<home dir name>-<digest of its path>`."""
    digest = hashlib.sha256(str(home.absolute()).encode()).hexdigest()[:8]
    label = re.sub(r"[^A-Za-z0-9._-]", "-", home.name)[:40]
    return f"t-{label}-{digest}"


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


def _texts(values: list[bytes | str]) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else v for v in values]


class Daemon:
    """One `nietest daemon` in its own NIETEST_HOME, named `host_name_of(home)` unless `env` names it."""

    def __init__(self, home: Path, **env: str) -> None:
        self.home = home
        env.setdefault("NIETEST_HOST_NAME", host_name_of(home))
        self.env = clean_env(NIETEST_HOME=str(home), **env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.settings = settings_module.load(self.env)
        self._broker: RedisBroker | None = None

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

        def all_running() -> dict[str, list[dict[str, Any]]] | None:
            groups = self.groups()
            running = {g: [p for p in ps if p["state"] == ProcessState.RUNNING] for g, ps in groups.items()}
            if all(len(running.get(g, [])) == n for g, n in expected.items()):
                return running
            return None

        running: dict[str, list[dict[str, Any]]] = wait_for(all_running, timeout, what=f"processes RUNNING: {expected}")
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
        """SIGKILL every process of the daemon (a host that dies), and reap it."""
        self.signal_everything(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def signal_everything(self, signum: int) -> list[int]:
        """Send `signum` to every process of the daemon (SIGSTOP, SIGCONT: a host cut off, then back); their pids."""
        pids = pids_of_home(self.home)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signum)
        return pids

    # --- control & inspection ------------------------------------------------------------------

    def run(self, *args: str, timeout: float = 30.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*NIETEST, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"nietest {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = json.loads(self.run("status", "--json", check=False).stdout)
        return status

    def groups(self) -> dict[str, list[dict[str, Any]]]:
        groups: dict[str, list[dict[str, Any]]] = {}
        for p in self.status()["processes"]:
            groups.setdefault(p["group"], []).append(p)
        return groups

    def pids(self) -> dict[str, int]:
        return {p["name"]: p["pid"] for p in self.status()["processes"] if p["state"] == ProcessState.RUNNING}

    @property
    def redis(self) -> redis.Redis:
        return self.broker.client

    @property
    def broker(self) -> RedisBroker:
        if self._broker is None:
            self._broker = RedisBroker(client=redis_client(self.settings), middleware=[])
        return self._broker

    def send(self, queue_key: str, action: str, *args: Any, **kwargs: Any) -> dramatiq.Message[Any]:
        """Enqueue a message for one of tests/e2e_actors.py's actors on a queue."""
        queue = self.settings.queue(queue_key).name
        message: dramatiq.Message[Any] = dramatiq.Message(
            queue_name=queue, actor_name=f"{action}_{queue_key}", args=args, kwargs=kwargs, options={}
        )
        self.broker.declare_queue(queue)
        return self.broker.enqueue(message)

    def done(self) -> list[str]:
        return _texts(self.redis.lrange("test:done", 0, -1))

    def started(self) -> list[str]:
        return _texts(self.redis.lrange("test:started", 0, -1))

    def log_files(self) -> list[Path]:
        return sorted(p for p in (self.home / "log").iterdir() if p.is_file())
