"""`SentinelSet`: a Redis primary, one replica and three Sentinels of a test's own (Debian's
`redis-server`, and `redis-sentinel` or `redis-server --sentinel`), on one address and free ports.

The multi-host rig starts one in its services namespace (`popen`, `connect`: its namespace's); tests
of the Sentinel URL start one on 127.0.0.1. `kill_primary` SIGKILLs whichever server is the primary
now; `wait_failover` waits for the Sentinels to name another; `restart` brings a killed server back
(the Sentinels make it a replica of the new primary).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from nietest_daemon.testing.waiting import wait_for

MASTER = "nietest"
Address = tuple[str, int]


def server_path() -> str | None:
    return shutil.which("redis-server")


def unavailable_reason() -> str | None:
    """Why no SentinelSet can start here (None: it can)."""
    if server_path() is None:
        return "`redis-server` is not installed (apt-get install redis-server redis-sentinel; .ci/run does)"
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class SentinelSet:
    """A primary, a replica and three Sentinels (quorum 2) watching them as master `MASTER`."""

    def __init__(
        self,
        directory: Path,
        *,
        host: str = "127.0.0.1",
        ports: list[int] | None = None,  # primary, replica, three Sentinels (default: free ones)
        down_after_ms: int = 2000,
        failover_timeout_ms: int = 10000,
        popen: Callable[[list[str]], subprocess.Popen[Any]] | None = None,
        connect: Callable[[str, int], redis.Redis] | None = None,
        password: str | None = None,  # of the servers (requirepass, masterauth)
        sentinel_password: str | None = None,  # of the Sentinels (NIETEST_REDIS_SENTINEL_PASSWORD)
    ) -> None:
        self.dir = directory
        self.host = host
        ports = ports or [free_port(host) for _ in range(5)]
        self.server_ports, self.sentinel_ports = ports[:2], ports[2:5]
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self._popen = popen or (
            lambda argv: subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
        self._connect = connect or (lambda h, p: redis.Redis(h, p, socket_connect_timeout=1, socket_timeout=2))
        self.password = password
        self.sentinel_password = sentinel_password
        self.procs: dict[int, subprocess.Popen[Any]] = {}  # port -> process
        self._clients: dict[int, redis.Redis] = {}  # port -> the client polling it

    # --- addresses -------------------------------------------------------------------------------

    def url(self, db: int = 0, *, tls: bool = False) -> str:
        """BROKER_REDIS_URL for this set."""
        scheme = "rediss+sentinel" if tls else "redis+sentinel"
        auth = f":{self.password}@" if self.password else ""
        hosts = ",".join(f"{self.host}:{p}" for p in self.sentinel_ports)
        return f"{scheme}://{auth}{hosts}/{MASTER}/{db}"

    def sentinel(self, port: int | None = None) -> redis.Redis:
        return self._client(port or self.sentinel_ports[0], self.sentinel_password)

    def server(self, port: int) -> redis.Redis:
        return self._client(port, self.password)

    def _client(self, port: int, password: str | None) -> redis.Redis:
        """One client per port, kept (it reconnects after a restart): polling makes no client a time."""
        client = self._clients.get(port)
        if client is None:
            client = self._clients[port] = self._connect(self.host, port)
            if password:
                client.connection_pool.connection_kwargs["password"] = password
        return client

    def primary(self) -> Address | None:
        """The primary's address as the first Sentinel that answers names it."""
        for port in self.sentinel_ports:
            try:
                found = self.sentinel(port).execute_command("SENTINEL", "get-master-addr-by-name", MASTER)
            except redis.RedisError:
                continue
            if found:
                return (found[0].decode() if isinstance(found[0], bytes) else found[0], int(found[1]))
        return None

    # --- starting and stopping -------------------------------------------------------------------

    def _server_argv(self, port: int, replica_of: int | None) -> list[str]:
        where = self.dir / f"redis-{port}"
        where.mkdir(parents=True, exist_ok=True)
        argv = [server_path() or "redis-server", "--bind", self.host, "--port", str(port), "--dir", str(where)]
        argv += ["--save", "", "--appendonly", "no", "--protected-mode", "no", "--logfile", str(where / "redis.log")]
        if self.password:
            argv += ["--requirepass", self.password, "--masterauth", self.password]
        if replica_of is not None:
            argv += ["--replicaof", self.host, str(replica_of)]
        return argv

    def _sentinel_argv(self, port: int, primary: int) -> list[str]:
        where = self.dir / f"sentinel-{port}"
        where.mkdir(parents=True, exist_ok=True)
        lines = [
            f"port {port}",
            f"bind {self.host}",
            "protected-mode no",
            f"dir {where}",
            f"logfile {where / 'sentinel.log'}",
            f"sentinel monitor {MASTER} {self.host} {primary} 2",
            f"sentinel down-after-milliseconds {MASTER} {self.down_after_ms}",
            f"sentinel failover-timeout {MASTER} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {MASTER} 1",
        ]
        if self.password:
            lines.append(f"sentinel auth-pass {MASTER} {self.password}")
        if self.sentinel_password:
            lines.append(f"requirepass {self.sentinel_password}")
        conf = where / "sentinel.conf"
        conf.write_text("\n".join(lines) + "\n")
        sentinel = shutil.which("redis-sentinel")
        return [sentinel, str(conf)] if sentinel else [server_path() or "redis-server", str(conf), "--sentinel"]

    def start(self) -> SentinelSet:
        primary, replica = self.server_ports
        self.procs[primary] = self._popen(self._server_argv(primary, None))
        wait_for(lambda: self._answers(primary), 20, what=f"redis primary on {self.host}:{primary}")
        self.procs[replica] = self._popen(self._server_argv(replica, primary))
        wait_for(lambda: self._synced(replica), 20, what=f"redis replica on {self.host}:{replica} in sync")
        for port in self.sentinel_ports:
            self.procs[port] = self._popen(self._sentinel_argv(port, primary))
        wait_for(self.settled, 30, what="three Sentinels that know the primary, its replica and each other")
        return self

    def settled(self) -> bool:
        """Every Sentinel knows the primary, one replica and the two other Sentinels."""
        for port in self.sentinel_ports:
            try:
                state = self.sentinel(port).execute_command("SENTINEL", "master", MASTER)
            except redis.RedisError:
                return False
            fields = dict(zip(state[::2], state[1::2], strict=False)) if isinstance(state, list) else state
            fields = {_text(k): _text(v) for k, v in fields.items()}
            if fields.get("num-slaves") != "1" or fields.get("num-other-sentinels") != "2":
                return False
            if "s_down" in fields.get("flags", "") or "o_down" in fields.get("flags", ""):
                return False
        return True

    def _answers(self, port: int) -> bool:
        try:
            return bool(self.server(port).ping())
        except redis.RedisError:
            return False

    def _synced(self, port: int) -> bool:
        try:
            info = self.server(port).info("replication")
        except redis.RedisError:
            return False
        return info.get("role") == "slave" and info.get("master_link_status") == "up"

    def kill_primary(self) -> Address:
        """SIGKILL the server that is the primary now; its address."""
        address = self.primary()
        assert address is not None, "no Sentinel names a primary"
        self.procs[address[1]].send_signal(signal.SIGKILL)
        self.procs[address[1]].wait(10)
        return address

    def wait_failover(self, old: Address, timeout: float = 30.0) -> Address:
        """Wait until the Sentinels name a primary other than `old` and it answers as one; its address."""

        def promoted() -> Address | None:
            now = self.primary()
            if now is None or now == old:
                return None
            try:
                return now if self.server(now[1]).info("replication").get("role") == "master" else None
            except redis.RedisError:
                return None

        return wait_for(promoted, timeout, what=f"a primary other than {old[0]}:{old[1]}", interval=0.1)

    def restart(self, address: Address) -> None:
        """Start the killed server at `address` again (the Sentinels make it a replica of the primary)."""
        primary = self.primary()
        replica_of = primary[1] if primary and primary != address else None
        self.procs[address[1]] = self._popen(self._server_argv(address[1], replica_of))
        wait_for(lambda: self._synced(address[1]), 30, what=f"{address[0]}:{address[1]} back as a replica in sync")
        wait_for(self.settled, 30, what="the Sentinels settled after the restart")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
        for client in self._clients.values():
            client.close()
        self._clients.clear()

    def __enter__(self) -> SentinelSet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _quiet_popen(argv: list[str]) -> subprocess.Popen[Any]:
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
