"""The multi-host test rig (issue 23): several "hosts" on this one machine, as Linux network namespaces.

    with Rig(hosts=3) as rig:
        broker, store = rig.start_redis(), rig.start_postgres()
        with rig.entered("svc"):
            api = FakeNieta(host=rig.services_ip).start()   # its listening socket lives in the services ns
        home = ...
        daemon = rig.start_daemon("h1", home, rig.daemon_env("h1", **api.env()))
        rig.partition("h1"); ...; rig.heal("h1")
        rig.kill_host("h2"); rig.restart_redis()

The services namespace `<prefix>-svc` holds a bridge `br0` carrying the services' address, a private valkey (append-only
file on) and a private PostgreSQL cluster, and the fake servers a test starts there with `entered()`. Or, for the
broker, `start_sentinels()`: a primary, a replica and three Sentinels (`testing/sentinel.py`, `rig.sentinels`), the
daemons given their `redis+sentinel://` URL. Each host namespace `<prefix>-hN` is joined to the bridge by a veth pair:
`eth0` in the host, `hN` on the bridge. Every link lives inside the rig's own namespaces, so nothing is added to the
machine's network, no traffic can leave them, two rigs never clash over names or addresses, and deleting the namespaces
removes every link. The test process itself stays in the machine's namespace, where a rig address is not routed: a
connection to one from there would leave by the default route (and on some machines even be answered). Reach the
services with `entered()`, `redis_client()`, `connect_postgres()`, or from a process started with `popen()`;
`testing/daemon.py: Daemon`'s own broker client cannot.

Each rig records itself in /run/nietest-rigs/<prefix>.json (its owner's pid and start time) before it
makes anything: `cleanup_stale()`, run when any rig starts, removes the rigs whose owner died without
closing them (a test run killed by a timeout, say).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import functools
import ipaddress
import itertools
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg
import redis
from redis.sentinel import Sentinel, SentinelManagedConnection

from nietest_daemon.internals.valkey import valkey_server_path
from nietest_daemon.testing import sentinel
from nietest_daemon.testing.daemon import clean_env
from nietest_daemon.testing.waiting import wait_for

NETWORK = ipaddress.ip_network("10.231.0.0/16")
"""Every rig's subnet is in here; the fake servers accept it as a listen address (RIG_NETWORK in each)."""
REGISTRY = Path("/run/nietest-rigs")
"""One JSON record per live rig: what `cleanup_stale()` needs to remove it once its owner is dead."""
REDIS_PORT = 6379
POSTGRES_PORT = 5432
SENTINEL_PORTS = [REDIS_PORT, REDIS_PORT + 1, 26379, 26380, 26381]  # primary, replica, three Sentinels
"""Fixed ports: each rig's services have an address (and a namespace) of their own."""
BRIDGE = "br0"
HOST_LINK = "eth0"
PARTITION_TABLE = "nietest_partition"
PARTITIONS = ("nft", "link")
SERVICES = "svc"

_DEFAULT_PREFIX = re.compile(r"^ntrig(\d+)x\d+-")
_PREFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")
_PROXY_VARS = {"http_proxy", "https_proxy", "ftp_proxy", "all_proxy", "no_proxy"}
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_numbers = itertools.count(1)
_open_rigs: set[Rig] = set()
_hooks_installed = False


# --- namespaces and their processes ---------------------------------------------------------------


def _setns(fd: int) -> None:
    """setns(2) for the calling thread only (Python 3.11 has no os.setns)."""
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _run(argv: list[str], *, stdin: str | None = None, timeout: float = 30.0, **kwargs: Any) -> str:
    """Run a tool of the rig; its stderr is in the error when it fails."""
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout, **kwargs)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def netns_names() -> list[str]:
    """The named network namespaces of the machine (`ip netns list`, without running it)."""
    try:
        return sorted(os.listdir("/run/netns"))
    except FileNotFoundError:
        return []


def pids_in(netns: str) -> set[int]:
    """Every live process in the named namespace (as `ip netns pids`), except this one."""
    try:
        st = os.stat(f"/run/netns/{netns}")
    except FileNotFoundError:
        return set()
    key, me, found = (st.st_dev, st.st_ino), os.getpid(), set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != me:
            try:
                ns = os.stat(f"/proc/{entry.name}/ns/net")
            except OSError:  # gone, or a zombie: it left its namespaces when it exited
                continue
            if (ns.st_dev, ns.st_ino) == key:
                found.add(int(entry.name))
    return found


def kill_namespace(netns: str, timeout: float = 10.0) -> int:
    """SIGKILL every process in the namespace until none is left (children forked meanwhile too);
    how many were killed."""
    killed: set[int] = set()

    def none_left() -> bool:
        pids = pids_in(netns)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed.update(pids)
        return not pids

    wait_for(none_left, timeout, what=f"no process left in {netns}", interval=0.01)
    return len(killed)


def _entering(base: type[Any], enter: Callable[[], contextlib.AbstractContextManager[None]]) -> type[Any]:
    """The redis-py connection class `base`, each of its connections made inside a namespace (`enter`)."""

    def _connect(self: Any) -> Any:
        with enter():
            return base._connect(self)

    return type(f"{base.__name__}InNamespace", (base,), {"_connect": _connect})


def _client_in(enter: Callable[[], contextlib.AbstractContextManager[None]], host: str, port: int) -> redis.Redis:
    """A client of host:port whose connections are made inside a namespace (`enter`), 1-2 s timeouts."""
    conn = _entering(redis.Connection, enter)
    pool = redis.ConnectionPool(connection_class=conn, host=host, port=port, socket_connect_timeout=1, socket_timeout=2)
    return redis.Redis(connection_pool=pool)


def _delete_namespace(netns: str) -> None:
    if os.path.exists(f"/run/netns/{netns}"):
        _run(["ip", "netns", "delete", netns])


def _start_time(pid: int) -> str | None:
    """A process's start time (field 22 of /proc/<pid>/stat): with its pid, names it across pid reuse."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None = None) -> bool:
    now = _start_time(pid)
    return now is not None and (start is None or now == start)


# --- PostgreSQL -----------------------------------------------------------------------------------


def postgres_bindir() -> Path | None:
    """Where initdb and pg_ctl are (as .ci/run's pg_bindir), or None when PostgreSQL is not installed."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    dirs = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")]
    dirs.sort(key=lambda d: [int(x) if x.isdigit() else 0 for x in d.parent.name.split(".")])
    return dirs[-1] if dirs else None


def _postgres_user() -> str:
    """Root may not run initdb or postgres: the `postgres` user when there is one, else nobody."""
    try:
        pwd.getpwnam("postgres")
        return "postgres"
    except KeyError:
        return "nobody"


def _stop_postgres(bindir: str, data: str, user: str) -> None:
    if os.path.exists(os.path.join(data, "postmaster.pid")):
        # Immediate: the rig's data is thrown away; the postmaster still removes its shared memory.
        _run(["runuser", "-u", user, "--", f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "-w", "-t", "20", "stop"])


# --- stale rigs -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _registry_locked() -> Iterator[None]:
    REGISTRY.mkdir(parents=True, exist_ok=True)
    with open(REGISTRY / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _destroy(record: dict[str, Any]) -> list[str]:
    """Remove what a rig record names, whatever state it is in; the problems met (none: all gone)."""
    problems = []
    pg = record.get("postgres")
    if pg:
        try:
            _stop_postgres(pg["bindir"], pg["data"], pg["user"])
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            problems.append(f"stopping PostgreSQL: {exc}")
    for netns in record["namespaces"]:
        try:
            kill_namespace(netns)
        except AssertionError as exc:
            problems.append(str(exc))
    for netns in record["namespaces"]:
        try:
            _delete_namespace(netns)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            problems.append(str(exc))
    if record.get("tmp"):
        shutil.rmtree(record["tmp"], ignore_errors=True)
    return problems


def cleanup_stale() -> list[str]:
    """Remove every rig whose owning process is dead (processes, PostgreSQL, namespaces, temp dir);
    the namespaces removed. Rigs of live processes are left alone, whoever they belong to."""
    removed: list[str] = []
    with _registry_locked():
        recorded: set[str] = set()
        for path in sorted(REGISTRY.glob("*.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                path.unlink(missing_ok=True)  # records are written whole (os.replace): not one of ours
                continue
            recorded.update(record["namespaces"])
            if _alive(record["pid"], record.get("start")):
                continue
            present = [ns for ns in record["namespaces"] if os.path.exists(f"/run/netns/{ns}")]
            if not _destroy(record):
                path.unlink(missing_ok=True)
            removed += present
        for netns in netns_names():  # a default-named rig's namespace left without a record
            match = _DEFAULT_PREFIX.match(netns)
            if match and netns not in recorded and not _alive(int(match[1])):
                removed += [netns] if not _destroy({"namespaces": [netns]}) else []
    return removed


def _close_open_rigs() -> None:
    for rig in list(_open_rigs):
        with contextlib.suppress(Exception):
            rig.close()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Close the rigs, then die of SIGTERM as the process would have without this handler."""
    _close_open_rigs()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _install_exit_hooks() -> None:
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(_close_open_rigs)
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)


@functools.cache
def _availability() -> str | None:
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "the multi-host rig needs root (network namespaces, veth pairs, nftables)"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables"), ("runuser", "util-linux")):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (apt-get install {package}; .ci/run does)"
    probe = f"ntprobe{os.getpid()}"
    try:
        _run(["ip", "netns", "add", probe])
        try:
            _run(
                ["ip", "-n", probe, "-batch", "-"],
                stdin=f"link add {BRIDGE} type bridge\nlink add veth0 type veth peer name veth1\n",
            )
            _run(["ip", "netns", "exec", probe, "nft", "list", "tables"])
        finally:
            _delete_namespace(probe)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        return f"this machine cannot make the rig's namespaces and links: {exc}"
    return None


# --- the rig --------------------------------------------------------------------------------------


class Rig:
    """Context manager. Namespaces `<prefix>-svc`, `<prefix>-h1..hN`, a bridge, veth pairs."""

    def __init__(self, hosts: int = 3, *, prefix: str | None = None, subnet: str | None = None) -> None:
        if hosts < 1:
            raise ValueError("a rig has at least one host")
        number = next(_numbers)
        self.prefix = prefix or f"ntrig{os.getpid()}x{number}"
        if not _PREFIX.match(self.prefix):
            raise ValueError(f"a rig prefix is up to 40 letters, digits, '_', '.' or '-', not {self.prefix!r}")
        self.network = ipaddress.ip_network(subnet or f"10.231.{(os.getpid() + number) % 254 + 1}.0/24")
        if self.network.num_addresses < hosts + 12:
            raise ValueError(f"{self.network} is too small for {hosts} hosts")
        self.services_ip = str(self.network[1])
        self.hosts = [f"h{i}" for i in range(1, hosts + 1)]
        self._host_ips = {host: str(self.network[10 + i]) for i, host in enumerate(self.hosts, 1)}
        self.redis_url: str | None = None
        self.postgres_url: str | None = None
        self._procs: list[subprocess.Popen[Any]] = []
        self._partitions: dict[str, set[str]] = {host: set() for host in self.hosts}
        self._redis_proc: subprocess.Popen[Any] | None = None
        self._redis_args: list[str] = []
        self.sentinels: sentinel.SentinelSet | None = None
        self._closed = False
        cleanup_stale()
        self._record_path = REGISTRY / f"{self.prefix}.json"
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-", dir="/tmp"))
        self.tmp.chmod(0o755)  # PostgreSQL's user must get to its directory
        self._record: dict[str, Any] = {
            "pid": os.getpid(),
            "start": _start_time(os.getpid()),
            "namespaces": [self.namespace(n) for n in [SERVICES, *self.hosts]],
            "tmp": str(self.tmp),
            "postgres": None,
        }
        with _registry_locked():
            if self._record_path.exists():
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise RuntimeError(f"a live rig already has the prefix {self.prefix!r} ({self._record_path})")
            self._save_record()
        _open_rigs.add(self)
        _install_exit_hooks()
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _save_record(self) -> None:
        part = self._record_path.with_suffix(".part")
        part.write_text(json.dumps(self._record))
        os.replace(part, self._record_path)

    def _build(self) -> None:
        svc = self.namespace(SERVICES)
        for netns in self._record["namespaces"]:
            _run(["ip", "netns", "add", netns])
        lines = [
            "link set lo up",
            f"link add {BRIDGE} type bridge",
            f"addr add {self.services_ip}/{self.network.prefixlen} dev {BRIDGE}",
            f"link set {BRIDGE} up",
        ]
        for host in self.hosts:
            lines += [
                f"link add {host} type veth peer name {HOST_LINK} netns {self.namespace(host)}",
                f"link set {host} master {BRIDGE} up",
            ]
        _run(["ip", "-n", svc, "-batch", "-"], stdin="\n".join(lines) + "\n")
        for host in self.hosts:
            lines = [
                "link set lo up",
                f"addr add {self.host_ip(host)}/{self.network.prefixlen} dev {HOST_LINK}",
                f"link set {HOST_LINK} up",
            ]
            _run(["ip", "-n", self.namespace(host), "-batch", "-"], stdin="\n".join(lines) + "\n")

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Rig({self.prefix!r}, {self.network}, hosts={self.hosts}{', closed' if self._closed else ''})"

    @staticmethod
    def available() -> str | None:
        """None when this machine can run a rig (root, `ip`, `nft`, namespaces and links); else why not."""
        return _availability()

    # --- names and addresses -----------------------------------------------------------------------

    def host_ip(self, host: str) -> str:
        return self._host_ips[host]

    def namespace(self, host_or_svc: str) -> str:
        """The netns name of "svc" or a host ("h1"); a rig's netns name is accepted as is."""
        if host_or_svc == SERVICES or host_or_svc in self._partitions:
            return f"{self.prefix}-{host_or_svc}"
        if host_or_svc.startswith(f"{self.prefix}-") and host_or_svc[len(self.prefix) + 1 :] in [SERVICES, *self.hosts]:
            return host_or_svc
        raise KeyError(f"{host_or_svc!r} is not {SERVICES!r} nor one of the rig's hosts {self.hosts}")

    @property
    def namespaces(self) -> list[str]:
        return list(self._record["namespaces"])

    @contextlib.contextmanager
    def entered(self, ns: str) -> Iterator[None]:
        """The calling thread joins the namespace, and returns to its own on exit. Sockets made inside
        stay in that namespace (a server's listening socket, a client's connection)."""
        target = os.open(f"/run/netns/{self.namespace(ns)}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            back = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(target)
                try:
                    yield
                finally:
                    _setns(back)
            finally:
                os.close(back)
        finally:
            os.close(target)

    def popen(self, ns: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start `argv` in the namespace (`ip netns exec` execs it: the Popen's pid is the program's).
        Returns once the process is in the namespace (or has exited): a `kill_host` right after
        must not miss a process still on its way in."""
        netns = self.namespace(ns)
        st = os.stat(f"/run/netns/{netns}")
        proc = subprocess.Popen(["ip", "netns", "exec", netns, *argv], **kwargs)
        self._procs.append(proc)

        def inside() -> bool:
            try:
                now = os.stat(f"/proc/{proc.pid}/ns/net")
            except OSError:  # exited
                return True
            return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino) or proc.poll() is not None

        wait_for(inside, 10, what=f"{argv[0]} in {netns}", interval=0.001)
        return proc

    # --- clients reaching the services from the test process -------------------------------------

    def redis_client(self, ns: str = SERVICES, **kwargs: Any) -> redis.Redis:
        """A client of the services' Redis (with `start_sentinels()`: of the primary the Sentinels name now) whose
        every connection is made from inside `ns`: the test process is in no rig namespace."""
        if self.redis_url is None:
            raise RuntimeError("start_redis() or start_sentinels() first")
        enter = functools.partial(self.entered, ns)
        if self.sentinels is None:
            return redis.Redis.from_url(self.redis_url, connection_class=_entering(redis.Connection, enter), **kwargs)
        found = Sentinel([])
        found.sentinels = [_client_in(enter, self.services_ip, p) for p in self.sentinels.sentinel_ports]
        managed = _entering(SentinelManagedConnection, enter)
        client: redis.Redis = found.master_for(sentinel.MASTER, connection_class=managed, **kwargs)
        return client

    def connect_postgres(self, ns: str = SERVICES, **kwargs: Any) -> psycopg.Connection[Any]:
        """A connection to the services' PostgreSQL, made from inside `ns`."""
        if self.postgres_url is None:
            raise RuntimeError("start_postgres() first")
        with self.entered(ns):
            return psycopg.connect(self.postgres_url, **kwargs)

    # --- the services -----------------------------------------------------------------------------

    def start_redis(self) -> str:
        """A valkey-server in the services namespace, every write in its append-only file before the
        answer (so a restart loses nothing acknowledged); its URL."""
        if self._redis_args or self.sentinels:
            raise RuntimeError("the rig's Redis is started already")
        directory = self.tmp / "redis"
        directory.mkdir()
        where = ["--dir", str(directory), "--logfile", str(directory / "valkey.log")]
        self._redis_args = [valkey_server_path(), "--bind", self.services_ip, "--port", str(REDIS_PORT), *where]
        self._redis_args += ["--protected-mode", "no", "--appendonly", "yes", "--appendfsync", "always", "--save", ""]
        self.redis_url = f"redis://{self.services_ip}:{REDIS_PORT}/0"
        self.start_redis_again()
        return self.redis_url

    def start_sentinels(self, down_after_ms: int = 2000) -> str:
        """The broker as a primary, a replica and three Sentinels (quorum 2, `down_after_ms`) in the services
        namespace, on fixed ports (`rig.sentinels`); its `redis+sentinel://` URL, which `daemon_env` passes on."""
        if self.redis_url is not None:
            raise RuntimeError("the rig's broker is started already")
        if reason := sentinel.unavailable_reason():
            raise RuntimeError(reason)
        quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        self.sentinels = sentinel.SentinelSet(
            self.tmp / "sentinels",
            host=self.services_ip,
            ports=SENTINEL_PORTS,
            down_after_ms=down_after_ms,
            popen=lambda argv: self.popen(SERVICES, argv, **quiet),
            connect=functools.partial(_client_in, functools.partial(self.entered, SERVICES)),
        )
        self.sentinels.start()
        self.redis_url = self.sentinels.url(0)
        return self.redis_url

    def _redis_answers(self) -> bool:
        client = self.redis_client(socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()

    def kill_redis(self) -> None:
        """SIGKILL the services' Redis (the first half of an outage)."""
        proc, self._redis_proc = self._redis_proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def start_redis_again(self) -> None:
        """Start the services' Redis on its directory and port (it reloads its AOF); wait until it answers."""
        if not self._redis_args:
            raise RuntimeError("start_redis() first")
        if self._redis_proc is not None and self._redis_proc.poll() is None:
            raise RuntimeError("the rig's Redis is running")
        self._redis_proc = self.popen(
            SERVICES, self._redis_args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for(self._redis_answers, 20, what=f"the rig's Redis answers ({self.tmp / 'redis' / 'valkey.log'})")

    def restart_redis(self) -> None:
        """A Redis crash and restart: SIGKILL, start again on the same AOF, wait until it answers."""
        self.kill_redis()
        self.start_redis_again()

    def start_postgres(self) -> str:
        """A private PostgreSQL cluster in the services namespace (trust auth, fsync off), run by the
        `postgres` user (or nobody) as .ci/run's start_private_postgres; its URL."""
        if self.postgres_url is not None:
            raise RuntimeError("the rig's PostgreSQL is started already")
        bindir = postgres_bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed (no initdb; apt-get install postgresql)")
        user = _postgres_user()
        directory, data = self.tmp / "pg", self.tmp / "pg" / "data"
        directory.mkdir()
        shutil.chown(directory, user)
        as_user = ["runuser", "-u", user, "--"]
        initdb = [f"{bindir}/initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C"]
        _run([*as_user, *initdb, "--no-sync"], cwd=directory, timeout=120)
        with open(data / "pg_hba.conf", "a") as hba:  # initdb's trust covers loopback only
            hba.write(f"host all all {self.network} trust\n")
        self._record["postgres"] = {"bindir": str(bindir), "data": str(data), "user": user}
        with _registry_locked():
            self._save_record()
        options = (
            f"-p {POSTGRES_PORT} -k {directory} -c listen_addresses={self.services_ip} -c fsync=off"
            " -c max_connections=200"
        )
        pg_ctl = [f"{bindir}/pg_ctl", "-D", str(data), "-l", str(directory / "server.log"), "-w", "-t", "60"]
        with open(directory / "pg_ctl.out", "w") as out:  # the postmaster must not hold a pipe of ours
            code = subprocess.call(
                ["ip", "netns", "exec", self.namespace(SERVICES), *as_user, *pg_ctl, "-o", options, "start"],
                cwd=directory,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=90,
            )
        if code != 0:
            raise RuntimeError(f"pg_ctl start failed ({code}): see {directory / 'server.log'}")
        self.postgres_url = f"postgresql://postgres@{self.services_ip}:{POSTGRES_PORT}/postgres"

        def answers() -> bool:
            with self.connect_postgres(connect_timeout=2, autocommit=True) as conn:
                return conn.execute("select 1").fetchone() == (1,)

        wait_for(answers, 30, what="the rig's PostgreSQL answers")
        return self.postgres_url

    # --- the hosts' daemons -----------------------------------------------------------------------

    def daemon_env(self, host: str, **extra: str) -> dict[str, str]:
        """The environment of a host's `nietest daemon`: its host name, the services' broker and store
        (once started), and no proxy variable (httpx trusts them for a non-loopback API address)."""
        env = clean_env(NIETEST_HOST_NAME=host)
        if self.redis_url is not None:
            env["BROKER_REDIS_URL"] = self.redis_url
        if self.postgres_url is not None:
            env["NIETEST_STORE_URL"] = self.postgres_url
        env = {k: v for k, v in env.items() if k.lower() not in _PROXY_VARS}
        env.update(extra)
        return env

    def start_daemon(self, host: str, home: Path, env: dict[str, str]) -> subprocess.Popen[Any]:
        """`nietest daemon` in the host's namespace, in its own session, its output in <home>/daemon.out.
        `env` (from daemon_env) gets NIETEST_HOME=home unless it names one."""
        if host not in self._partitions:
            raise KeyError(f"{host!r} is not one of the rig's hosts {self.hosts}")
        env = {"NIETEST_HOME": str(home), **env}
        with open(home / "daemon.out", "ab") as out:
            return self.popen(
                host,
                [sys.executable, "-m", "nietest_daemon", "daemon"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=home,
            )

    # --- faults -----------------------------------------------------------------------------------

    def _reap(self) -> None:
        """Collect the exit of every process the rig started that has died (no zombies left)."""
        for proc in self._procs:
            proc.poll()
        self._procs = [p for p in self._procs if p.returncode is None]

    def kill_host(self, host: str) -> int:
        """SIGKILL every process in the host's namespace, as a host that loses power; how many."""
        if host not in self._partitions:
            raise KeyError(f"{host!r} is not one of the rig's hosts {self.hosts}")
        killed = kill_namespace(self.namespace(host))
        self._reap()
        return killed

    def partition(self, host: str, how: str = "nft") -> None:
        """Cut the host off: "nft", an nftables table in the host dropping everything in and out on its
        link (connections stay open, packets vanish); "link", its bridge port down (no carrier)."""
        if how not in PARTITIONS:
            raise ValueError(f"partition how: one of {PARTITIONS}, not {how!r}")
        cuts = self._partitions[host]
        if how in cuts:
            return
        if how == "nft":
            ruleset = (
                f"table inet {PARTITION_TABLE} {{\n"
                f'  chain in {{ type filter hook input priority -300; policy accept; iifname "{HOST_LINK}" drop; }}\n'
                f'  chain out {{ type filter hook output priority -300; policy accept; oifname "{HOST_LINK}" drop; }}\n'
                "}\n"
            )
            _run(["ip", "netns", "exec", self.namespace(host), "nft", "-f", "-"], stdin=ruleset)
        else:
            _run(["ip", "-n", self.namespace(SERVICES), "link", "set", host, "down"])
        cuts.add(how)

    def heal(self, host: str) -> None:
        """Undo every partition of the host."""
        cuts = self._partitions[host]
        if "nft" in cuts:
            _run(["ip", "netns", "exec", self.namespace(host), "nft", "delete", "table", "inet", PARTITION_TABLE])
        if "link" in cuts:
            _run(["ip", "-n", self.namespace(SERVICES), "link", "set", host, "up"])
        cuts.clear()

    # --- the end ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop PostgreSQL, kill every process in every rig namespace, delete the namespaces (and so
        every link and the bridge), the temp dir and the record. Idempotent; also run at exit."""
        if self._closed:
            return
        self._closed = True
        _open_rigs.discard(self)
        problems = _destroy(self._record)
        for proc in self._procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                problems.append(f"process {proc.pid} ({proc.args!r}) did not exit")
        self._procs = []
        self._redis_proc = None
        if self.sentinels is not None:
            self.sentinels.stop()  # its processes are gone: its clients are closed
        if not problems:
            self._record_path.unlink(missing_ok=True)  # else cleanup_stale() tries again once we are gone
        if problems:
            raise RuntimeError(f"the rig {self.prefix} is not entirely cleaned up: {'; '.join(problems)}")
