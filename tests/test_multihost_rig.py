"""The multi-host test rig (nietest_daemon/testing/multihost.py) does what the fault-run tests rely on:
hosts reach the services (Redis, PostgreSQL, the fake API and webhook) over the rig's links, a
partition cuts a host off and a heal joins it again (both ways), killing a host kills all it runs,
a Redis restart keeps what was written, and nothing the rig made outlives it: not when the test
raises, not when its process dies (cleanup_stale, atexit, SIGTERM)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from nietest_daemon.testing import fake_feishu
from nietest_daemon.testing.daemon import Daemon, pids_of_home
from nietest_daemon.testing.fake_feishu import FakeFeishu
from nietest_daemon.testing.fake_nieta import FakeNieta
from nietest_daemon.testing.fake_nieta import server as fake_nieta_server
from nietest_daemon.testing.multihost import (
    NETWORK,
    REDIS_PORT,
    REGISTRY,
    Rig,
    cleanup_stale,
    netns_names,
    pids_in,
    postgres_bindir,
)
from nietest_daemon.testing.waiting import wait_for

pytestmark = pytest.mark.e2e

PROBE = """
import json, sys, urllib.request
import psycopg, redis
redis_url, pg_url, api_url, hook_url = sys.argv[1:]
out = {}
client = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=2)
out["redis_client"] = client.client_info()["addr"]
out["redis_hits"] = client.incr("probe:hits")
if pg_url:
    with psycopg.connect(pg_url, connect_timeout=2) as conn:
        out["pg_client"] = conn.execute("select host(inet_client_addr())").fetchone()[0]
direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
out["api"] = json.load(direct.open(api_url + "/_fake/stats", timeout=2))["requests"]
post = urllib.request.Request(hook_url, json.dumps({"msg_type": "text", "content": {"text": "hi"}}).encode(),
                              {"Content-Type": "application/json"})
out["hook"] = json.load(direct.open(post, timeout=2))["code"]
print(json.dumps(out))
"""

SMALL_DAEMON = {
    "NIETEST_MASTER_PROCESSES": "1",
    "NIETEST_SUBTASK_PROCESSES": "1",
    "NIETEST_SUBTASK_OPS_PROCESSES": "1",
    "NIETEST_ACTOR_MODULES": "e2e_actors",
}


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    reason = Rig.available()
    if reason:
        pytest.skip(reason)
    with Rig(hosts=2) as rig:
        rig.start_redis()
        if postgres_bindir() is not None:
            rig.start_postgres()
        yield rig


@pytest.fixture(scope="module")
def fakes(rig: Rig) -> Iterator[tuple[FakeNieta, FakeFeishu]]:
    """The fake API and webhook listening in the services namespace, started by this process."""
    with rig.entered("svc"):
        api = FakeNieta(host=rig.services_ip).start()
        hook = FakeFeishu(host=rig.services_ip).start()
    yield api, hook
    api.stop()
    hook.stop()


def reaches(rig: Rig, host: str, port: int = REDIS_PORT) -> bool:
    """A TCP connection from the host to a service opens (the calling thread, inside the host)."""
    with rig.entered(host):
        try:
            socket.create_connection((rig.services_ip, port), timeout=0.3).close()
            return True
        except OSError:
            return False


def gone(pid: int) -> bool:
    """The process has exited (a zombie not reaped yet counts: it runs nothing and holds no namespace)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def leftovers(prefix: str, tmp: Path, pids: set[int]) -> dict[str, Any]:
    """Whatever of a rig is still there: namespaces (as `ip netns list` says), processes, files."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {
        "namespaces": [ns for ns in netns_names() if ns.startswith(f"{prefix}-")],
        "ip netns list": [line for line in listed.splitlines() if line.startswith(f"{prefix}-")],
        "processes": sorted(p for p in pids if not gone(p)),
        "tmp": tmp.exists(),
        "record": (REGISTRY / f"{prefix}.json").exists(),
    }


NOTHING = {"namespaces": [], "ip netns list": [], "processes": [], "tmp": False, "record": False}


# --- reaching the services -------------------------------------------------------------------------


def test_hosts_reach_redis_postgres_and_the_fakes(rig: Rig, fakes: tuple[FakeNieta, FakeFeishu]) -> None:
    api, hook = fakes
    assert api.url == f"http://{rig.services_ip}:{api.port}" and hook.url.startswith(f"http://{rig.services_ip}:")
    for host in rig.hosts:
        proc = rig.popen(
            host,
            [sys.executable, "-c", PROBE, rig.redis_url or "", rig.postgres_url or "", api.url, hook.url],
            env=rig.daemon_env(host),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        seen = json.loads(out)
        assert seen["redis_client"].split(":")[0] == rig.host_ip(host)  # it came over the host's link
        if rig.postgres_url:
            assert seen["pg_client"] == rig.host_ip(host)
        assert seen["hook"] == 0
    assert rig.redis_client().get("probe:hits") == str(len(rig.hosts)).encode()
    assert len(hook.received) == len(rig.hosts)


def test_daemon_env_names_the_services_and_drops_proxies(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "HTTPS_PROXY", "ALL_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "http://10.9.9.9:3128")
    env = rig.daemon_env("h2", NIETEST_DRAIN_SECONDS="5")
    assert not [k for k in env if k.lower().endswith("_proxy")]
    assert env["NIETEST_HOST_NAME"] == "h2" and env["BROKER_REDIS_URL"] == rig.redis_url
    assert env.get("NIETEST_STORE_URL") == rig.postgres_url and env["NIETEST_DRAIN_SECONDS"] == "5"


def test_fakes_listen_on_loopback_or_the_rig_only() -> None:
    assert fake_nieta_server.RIG_NETWORK == fake_feishu.RIG_NETWORK == NETWORK
    for make in (lambda h: FakeNieta(host=h), lambda h: FakeFeishu(host=h)):
        for outside in ("10.0.0.1", "192.168.1.1", "0.0.0.0"):
            with pytest.raises(ValueError, match="loopback"):
                make(outside)


# --- faults ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["nft", "link"])
def test_partition_cuts_a_host_off_and_heal_joins_it_again(rig: Rig, how: str) -> None:
    client = rig.redis_client("h1", socket_timeout=0.5, socket_connect_timeout=0.5)
    assert client.ping()  # a connection open before the cut: its packets will vanish, not bounce
    rig.partition("h1", how)
    try:
        wait_for(lambda: not reaches(rig, "h1"), 5, what=f"h1 cut off ({how})")
        with pytest.raises(redis.exceptions.TimeoutError):
            client.ping()
        assert reaches(rig, "h2")  # the other host is not
    finally:
        rig.heal("h1")
    wait_for(lambda: reaches(rig, "h1"), 10, what=f"h1 joined again ({how})")
    assert wait_for(client.ping, 10, what="h1's client answered again")
    client.close()


def test_kill_host_kills_every_process_in_it(rig: Rig) -> None:
    tree = rig.popen("h2", ["sh", "-c", "sleep 300 & sleep 300 & setsid sleep 300 & wait"])
    namespace = rig.namespace("h2")
    pids = wait_for(lambda: len(pids_in(namespace)) == 4 and pids_in(namespace), 10, what="sh and 3 sleeps")
    assert rig.kill_host("h2") == 4
    assert tree.wait(5) == -signal.SIGKILL
    assert wait_for(lambda: all(gone(p) for p in pids), 5, what="the tree gone")
    assert reaches(rig, "h2")  # a dead host's namespace and link stay: it can be started again


def test_kill_host_kills_a_daemon(rig: Rig) -> None:
    home = rig.tmp / "kill-daemon"
    home.mkdir()
    env = rig.daemon_env("h1", **SMALL_DAEMON)
    daemon = Daemon(home, **env)
    daemon.proc = rig.start_daemon("h1", home, env)
    running = daemon.wait_running(60)
    processes = pids_of_home(home)
    assert len(processes) >= 1 + sum(len(group) for group in running.values())  # supervisord and its programs
    assert rig.kill_host("h1") == len(processes)
    assert daemon.proc.wait(5) == -signal.SIGKILL and not pids_of_home(home)


def test_restart_redis_keeps_what_was_written(rig: Rig) -> None:
    client = rig.redis_client(socket_timeout=1, socket_connect_timeout=1)
    client.set("rig:kept", "before the crash")
    first = client.info("server")["process_id"]
    rig.restart_redis()
    assert client.get("rig:kept") == b"before the crash"
    assert client.info("server")["process_id"] != first
    rig.kill_redis()
    with pytest.raises(redis.exceptions.ConnectionError):
        client.ping()
    assert not reaches(rig, "h1")
    rig.start_redis_again()
    assert client.get("rig:kept") == b"before the crash"
    client.close()


# --- nothing outlives the rig ----------------------------------------------------------------------


def test_close_leaves_nothing_behind() -> None:
    if reason := Rig.available():
        pytest.skip(reason)
    links = root_links()
    rig = Rig(hosts=2)
    rig.start_redis()
    rig.popen("h1", ["sleep", "300"])
    pids = set().union(*(pids_in(ns) for ns in rig.namespaces))
    assert len(pids) == 2  # valkey, sleep
    rig.close()
    rig.close()  # idempotent
    assert leftovers(rig.prefix, rig.tmp, pids) == NOTHING
    assert root_links() - links == set()  # every link lived in the rig's namespaces


def test_a_rig_whose_test_raised_is_cleaned_up() -> None:
    if reason := Rig.available():
        pytest.skip(reason)
    seen: dict[str, Any] = {}
    with pytest.raises(RuntimeError, match="the test failed"), Rig(hosts=1) as doomed:
        doomed.start_redis()
        if postgres_bindir() is not None:
            doomed.start_postgres()
        doomed.popen("h1", ["sleep", "300"])
        seen = {"prefix": doomed.prefix, "tmp": doomed.tmp}
        seen["pids"] = set().union(*(pids_in(ns) for ns in doomed.namespaces))
        raise RuntimeError("the test failed")
    assert len(seen["pids"]) >= 2
    assert leftovers(seen["prefix"], seen["tmp"], seen["pids"]) == NOTHING


LEFT_BEHIND = """
import os, signal, sys
from nietest_daemon.testing.multihost import Rig, pids_in
rig = Rig(hosts=1)
rig.start_redis()
rig.popen("h1", ["sleep", "300"])
pids = sorted(set().union(*(pids_in(ns) for ns in rig.namespaces)))
print(rig.prefix, rig.tmp, *pids, flush=True)
if sys.argv[1] == "sigkill":
    os.kill(os.getpid(), signal.SIGKILL)
elif sys.argv[1] == "sigterm":
    sys.stdin.read()
"""


def left_behind(ending: str) -> tuple[subprocess.Popen[str], str, Path, set[int]]:
    """A process that makes a rig and then ends as told, without closing the rig."""
    child = subprocess.Popen(
        [sys.executable, "-c", LEFT_BEHIND, ending], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    prefix, tmp, *pids = child.stdout.readline().split()
    return child, prefix, Path(tmp), {int(p) for p in pids}


def test_cleanup_stale_removes_a_rig_of_a_dead_process() -> None:
    if reason := Rig.available():
        pytest.skip(reason)
    child, prefix, tmp, pids = left_behind("sigkill")
    assert child.wait(30) == -signal.SIGKILL
    left = leftovers(prefix, tmp, pids)
    assert len(left["namespaces"]) == 2 and len(left["processes"]) == 2 and left["record"]
    assert sorted(cleanup_stale()) == sorted(left["namespaces"])
    assert leftovers(prefix, tmp, pids) == NOTHING


@pytest.mark.parametrize("ending", ["exit", "sigterm"])
def test_a_process_that_ends_without_closing_its_rig_removes_it(ending: str) -> None:
    if reason := Rig.available():
        pytest.skip(reason)
    child, prefix, tmp, pids = left_behind(ending)
    assert len(pids) == 2
    if ending == "sigterm":
        child.send_signal(signal.SIGTERM)
    else:
        child.communicate()
    assert child.wait(30) == (-signal.SIGTERM if ending == "sigterm" else 0)
    assert leftovers(prefix, tmp, pids) == NOTHING
