"""`nietest daemon` and `nietest ctl`: supervisord and supervisorctl on etc/supervisord.conf.

The daemon validates the settings, creates the directories, prepares the store, takes the lease on
its host name on an external broker (`take_host_name`: a second live daemon with the same
NIETEST_HOST_NAME is refused), exports every value the configuration file expands, and execs
supervisord (`python -m nietest_daemon.programs.supervisord -n`, supervisord with the patches of
internals/supervisor.py) -- so under systemd the main PID is supervisord itself, and SIGTERM to it
stops every worker gracefully (workers first, the embedded broker last, by priority).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import uuid
import xmlrpc.client
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from nietest_daemon.coordination import hosts
from nietest_daemon.coordination.connection import ask_sentinels, broker_primary, redis_client
from nietest_daemon.core.logs import iso_timestamp
from nietest_daemon.core.redaction import redact, set_secrets
from nietest_daemon.core.settings import Settings
from nietest_daemon.internals import supervisor as supervisor_internals

PACKAGE_DIR = Path(__file__).resolve().parent.parent
#: The lease taken at start covers supervisord's start until the host keeper renews it.
START_LEASE_SECONDS = 30.0
#: A holder whose newest sign of life is older than this is dead, not running: its lease is awaited.
SILENT_HOLDER_SECONDS = 3.0


def config_path() -> Path:
    """etc/supervisord.conf of the source tree, else the copy packaged into the wheel."""
    for candidate in (PACKAGE_DIR.parent / "etc" / "supervisord.conf", PACKAGE_DIR / "etc" / "supervisord.conf"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("supervisord.conf not found beside the package")


def _tool(name: str) -> str:
    """A console script of the same environment as this interpreter (supervisorctl)."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found; is the 'supervisor' package installed?")
    return found


def environment(settings: Settings, daemon_id: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(settings.supervisor_env())
    env["NIETEST_PYTHON"] = sys.executable
    if daemon_id:
        env["NIETEST_DAEMON_ID"] = daemon_id  # the host keeper's (programs/host_keeper.py)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def control_proxy(settings: Settings, timeout: float | None = None) -> xmlrpc.client.ServerProxy:
    """XML-RPC proxy to the running supervisord over its unix socket (`timeout`: per connect and read)."""
    return supervisor_internals.control_proxy(f"unix://{settings.control_socket}", timeout)


def is_running(settings: Settings) -> bool:
    if not settings.control_socket.exists():
        return False
    try:
        control_proxy(settings).supervisor.getPID()
        return True
    except (OSError, xmlrpc.client.Fault, xmlrpc.client.ProtocolError):
        return False


def _log_line(event: str, level: str = "info", **fields: Any) -> str:
    """One JSON log line of the daemon before it execs supervisord (to stdout: the journal under systemd)."""
    return json.dumps(
        {
            "timestamp": iso_timestamp(),
            "level": level,
            "event": event,
            "logger": __name__,
            "pid": os.getpid(),
            "process": "daemon",
            **fields,
        }
    )


def _start_line(settings: Settings) -> str:
    """The daemon's start-up log line."""
    return _log_line(
        "daemon starting",
        broker=settings.broker_description,
        store=settings.store_description,
        config=str(config_path()),
        home=str(settings.home),
        queues={
            q.key: {"name": q.name, "processes": q.processes, "threads": q.threads} for q in settings.queues.values()
        },
    )


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def take_host_name(settings: Settings, daemon_id: str) -> str | None:
    """Take the lease on NIETEST_HOST_NAME on the external broker before anything starts; the
    refusal line when another live daemon holds it, else None.

    A holder that may be replaced (`hosts.may_replace`: a dead daemon of this boot) is replaced at
    once; one that gave no sign of life for SILENT_HOLDER_SECONDS (a crash elsewhere, or a machine
    whose boot id is hidden, as systemd's ProcSubset=pid does) is awaited until its lease lapses.
    Then whatever the broker ids of this name hold is the dead predecessor's: it goes back to the
    queues now, nothing of ours runs yet. A broker that does not answer skips all this: the workers
    wait for it, and the host keeper takes the lease once it answers.
    """
    client = redis_client(settings, socket_timeout=5)
    name, lost = settings.host_name, settings.host_lost_seconds
    try:
        now = time.time()
        record = hosts.HostRecord(
            name=name,
            daemon_id=daemon_id,
            address=hosts.client_address(client),
            pid=os.getpid(),  # supervisord's, once this process has exec'd it
            boot_id=hosts.boot_id(),
            home=str(settings.home),
            started_at=now,
            since=now,
        )
        lease = max(lost, START_LEASE_SECONDS)
        taken, other = hosts.take_lease(client, record, lease)
        deadline = time.monotonic() + lost + 1
        while not taken and other is not None:
            if hosts.may_replace(other, _pid_alive(other.pid)):
                taken, other = hosts.take_lease(client, record, lease, replacing=other.daemon_id)
                break
            last = hosts.last_sign_of_life(client, name) or other.since
            if time.time() - last < SILENT_HOLDER_SECONDS or time.monotonic() > deadline:
                break
            time.sleep(0.5)  # a silent holder: its lease lapses within NIETEST_HOST_LOST_SECONDS
            taken, other = hosts.take_lease(client, record, lease)
        if not taken:
            holder = other.describe() if other is not None else f"{name} (no record)"
            return (
                f"nietest: host name {name} is in use by a live daemon: {holder}; "
                "set NIETEST_HOST_NAME to tell them apart"
            )
        if other is not None and other.daemon_id != daemon_id:
            _hand_back_predecessor(settings, other)
    except (redis.RedisError, OSError) as exc:
        print(
            _log_line(
                "broker does not answer; the host keeper takes the host name's lease once it does",
                "warning",
                broker=settings.broker_description,
                error=redact(f"{type(exc).__name__}: {exc}")[:300],
            ),
            flush=True,
        )
    finally:
        client.close()
    return None


def sentinel_problem(settings: Settings) -> str | None:
    """With a `redis+sentinel://` broker URL, what keeps it from naming a usable primary, as the one
    line a command prints before it exits (None: the Sentinels know the master, or the URL names one
    server). No Sentinel answers, none knows the master name, they or the primary refuse the password:
    the line names BROKER_REDIS_URL and shows the URL without its password. A primary that does not
    answer is not a problem here: during a failover the workers wait for the next one."""
    target = settings.sentinel
    if target is None:
        return None
    views = ask_sentinels(settings)
    url = target.shown()
    answered = [v for v in views if v.masters is not None]
    if not answered:
        errors = "; ".join(dict.fromkeys(_short(v.error or "") for v in views))  # each once
        if all(v.refused for v in views):
            what = "the Sentinels refuse us (NIETEST_REDIS_SENTINEL_PASSWORD?)"
        else:
            what = "no Sentinel answers"
        return _one_line(f"BROKER_REDIS_URL: {what} at {url} ({errors})")
    if not any(target.master in (v.masters or {}) for v in answered):
        known = sorted({name for v in answered for name in v.masters or {}})
        watched = f"they watch {', '.join(map(repr, known))}" if known else "they watch no master"
        return _one_line(f"BROKER_REDIS_URL: the Sentinels know no master {target.master!r} ({watched}): {url}")
    client = redis_client(settings, socket_timeout=5, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0))
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        primary = broker_primary(settings) or "?"
        return _one_line(f"BROKER_REDIS_URL: the primary {primary} refuses the URL's user or password ({exc}): {url}")
    except (redis.RedisError, OSError):
        return None  # down, or failing over: the workers wait for it
    finally:
        client.close()
    return None


def _short(error: str) -> str:
    """One Sentinel's error, at most 160 characters (the same error from each is shown once)."""
    return error if len(error) <= 160 else error[:159] + "…"


def _one_line(text: str) -> str:
    return redact(" ".join(text.split()))[:600]


def _hand_back_predecessor(settings: Settings, previous: hosts.HostRecord) -> None:
    """Hand back what the broker ids of this host name hold: the dead predecessor `previous`'s."""
    from nietest_daemon.pipeline.broker import build_broker  # here: `ctl` and `status` import this module

    broker = build_broker(settings)
    try:
        queues = [q.name for q in settings.queues.values()]
        started = time.monotonic()
        count = broker.hand_back_dead(f"{settings.host_name}/", queues)
    finally:
        broker.close()
    if count == 0 and previous.state is hosts.HostState.STOPPED:
        return  # the usual restart after a graceful stop
    print(
        _log_line(
            "host name taken over from a previous daemon; its messages handed back",
            previous=previous.describe(),
            previous_state=previous.state.value,
            messages=count,
            ms=round((time.monotonic() - started) * 1000, 1),
        ),
        flush=True,
    )


#: How the store's errors begin (store/base.py): the daemon's line names the store once, before it.
_NAMED_STORE = re.compile(r"^the task store \(.*?\) ")


def _problem(exc: Exception) -> str:
    """What went wrong while preparing the store, as one short line with every secret masked:
    `unavailable: <driver error>`, `failed: <driver error>`, or `<type>: <message>`."""
    text = " ".join(redact(str(exc)).split())
    named = _NAMED_STORE.match(text)
    if named:
        text = text[named.end() :].removeprefix("is ")
        if text.startswith(("unavailable: ", "failed: ")):
            return text[:500]
    return f"{type(exc).__name__}: {text}"[:500]


def run(settings: Settings) -> int:
    """Exec supervisord (JSON logs, prompt respawn: see nietest_daemon/programs/supervisord.py) in the foreground.

    Returns only when it refuses to start.
    """
    if is_running(settings):
        print(f"nietest: a daemon is already running on {settings.control_socket}", file=sys.stderr)
        return 1
    for directory in (settings.data_dir, settings.log_dir):
        directory.mkdir(parents=True, exist_ok=True)
    settings.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    settings.run_dir.chmod(0o700)
    print(_start_line(settings), flush=True)
    set_secrets(settings.secrets())  # the store's password, masked in whatever its driver says
    from nietest_daemon.store import prepare_store_for  # here: `ctl` and `status` import this module

    try:  # indexes (MongoDB), migrations (PostgreSQL): once here, before any process opens the store
        prepare_store_for(settings)
    except Exception as exc:  # unreachable, refused, a newer schema: say so in one line, start nothing
        print(f"nietest: could not prepare the store ({settings.store_description}): {_problem(exc)}", file=sys.stderr)
        return 1
    daemon_id = uuid.uuid4().hex
    if not settings.embedded_broker:  # the embedded broker is not running yet: the keeper takes the lease
        refused = take_host_name(settings, daemon_id)
        if refused:
            print(refused, file=sys.stderr)
            return 1
    os.chdir(settings.data_dir)
    argv = [sys.executable, "-m", "nietest_daemon.programs.supervisord", "-n", "-c", str(config_path())]
    os.execve(sys.executable, argv, environment(settings, daemon_id))


def ctl(settings: Settings, args: list[str]) -> int:
    """supervisorctl against the running daemon, with the daemon's environment."""
    tool = _tool("supervisorctl")
    os.execve(tool, [tool, "-c", str(config_path()), *args], environment(settings))
