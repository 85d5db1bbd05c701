"""Several hosts on one broker, end to end: real daemons on this machine, each under its own
NIETEST_HOST_NAME, sharing a private valkey-server as their external broker (BROKER_REDIS_URL),
with a real alert webhook (testing/fake_feishu.py).

- a second live daemon with a name in use is refused in one line, starting nothing; a daemon
  SIGKILLed and started again on its name starts at once;
- a host cut off (its whole tree SIGSTOPped) past NIETEST_HOST_LOST_SECONDS is taken over; when it
  resumes it finds itself fenced, restarts its workers and says `Host back`;
- a host killed (every process, SIGKILL) while its workers hold messages: the other daemon declares
  it lost and its messages start there within LOST + 5 s, with a `Host lost` card;
- a graceful stop is never taken over.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
import redis

from nietest_daemon.coordination import hosts, keys
from nietest_daemon.coordination.hosts import HostState
from nietest_daemon.internals.dramatiq_redis import queue_stats
from nietest_daemon.testing.daemon import Daemon, pids_of_home
from nietest_daemon.testing.fake_feishu import FakeFeishu
from nietest_daemon.testing.valkey import PrivateValkey
from nietest_daemon.testing.waiting import wait_for

pytestmark = pytest.mark.e2e

LOST = 3.0
SECRET = "hosts-secret-Zq81-k"


def env_for(broker: PrivateValkey, hook: FakeFeishu | None, name: str, **extra: str) -> dict[str, str]:
    return {
        "BROKER_REDIS_URL": broker.url,
        "NIETEST_HOST_NAME": name,
        "NIETEST_HOST_LOST_SECONDS": str(LOST),
        "NIETEST_BROKER_HEARTBEAT_TIMEOUT": "60",  # Dramatiq's own recovery is far slower than a takeover
        "NIETEST_MASTER_PROCESSES": "1",
        "NIETEST_SUBTASK_PROCESSES": "1",
        "NIETEST_SUBTASK_OPS_PROCESSES": "0",
        "NIETEST_SUBTASK_THREADS": "2",
        "NIETEST_DRAIN_SECONDS": "2",
        "NIETEST_ALERT_COALESCE_SECONDS": "1",
        **({"FEISHU_ALERT_WEBHOOK_URL": hook.url, "FEISHU_WEBHOOK_SECRET": SECRET} if hook else {}),
        **extra,
    }


def title_of(body: Any) -> str:
    return str((body or {}).get("card", {}).get("header", {}).get("title", {}).get("content", ""))


def titles(hook: FakeFeishu) -> list[str]:
    return [title_of(r.body) for r in hook.received]


def card_texts(hook: FakeFeishu, title: str, count: int = 1, timeout: float = 15.0) -> list[str]:
    """The texts of the first `count` cards whose title ends with `title` (the header says `[host] title`)."""
    bodies = wait_for(
        lambda: (
            (found := [r.body for r in hook.received if title_of(r.body).endswith(title)])
            and len(found) >= count
            and found
        ),
        timeout,
        what=f"{count} {title!r} card(s); got {titles(hook)}",
    )
    return [
        "\n".join(e["text"]["content"] for e in b["card"].get("elements", []) if isinstance(e.get("text"), dict))
        for b in bodies
    ]


def record(client: redis.Redis, name: str) -> hosts.HostRecord:
    found = hosts.get_record(client, name)
    assert found is not None, f"no record of host {name}"
    return found


def worker_pids(daemon: Daemon) -> dict[str, int]:
    return {k: v for k, v in daemon.pids().items() if k.split(":")[0] in ("master", "subtask")}


def started_by(daemon: Daemon, pids: set[int]) -> set[str]:
    return {t.split(":")[0] for t in daemon.started() if int(t.split(":")[1]) in pids}


def test_a_name_in_use_is_refused_and_a_killed_daemon_restarts_on_its_name_at_once(
    make_daemon: Callable[..., Daemon], private_valkey: Callable[..., PrivateValkey]
) -> None:
    broker = private_valkey()
    env = env_for(broker, None, "ka", NIETEST_HOST_LOST_SECONDS="20")  # its lease outlives the restart
    first = make_daemon(**env).start()
    client = first.redis
    held = record(client, "ka")

    second = make_daemon(**env).start(wait=False)
    assert second.proc is not None and second.proc.wait(30) == 1
    lines = (second.home / "daemon.out").read_text().splitlines()
    refusals = [line for line in lines if line.startswith("nietest: host name ka is in use by a live daemon: ")]
    assert len(refusals) == 1 and len([line for line in lines if line.startswith("nietest:")]) == 1, lines
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(held.started_at))
    assert f"({held.address}, pid {held.pid}, started {started})" in refusals[0], refusals[0]
    assert not pids_of_home(second.home) and not (second.settings.control_socket.exists())
    assert record(client, "ka").daemon_id == held.daemon_id

    first.kill_everything()
    assert client.get(keys.host_lease("ka")) is not None  # still held by the dead daemon
    again = make_daemon(first.home, **env).start()
    out = [json.loads(line) for line in (again.home / "daemon.out").read_text().splitlines() if line.startswith("{")]
    starting = [r for r in out if r["event"] == "daemon starting"][-1]
    [taken] = [r for r in out if r["event"].startswith("host name taken over from a previous daemon")]
    waited = datetime.fromisoformat(taken["timestamp"]) - datetime.fromisoformat(starting["timestamp"])
    assert waited.total_seconds() < 5, out  # replaced at once, not after the 20 s the lease had left
    now = record(client, "ka")
    assert now.daemon_id != held.daemon_id and now.state is HostState.UP
    lease = keys.host_lease("ka")  # renewed by its keeper (the one taken at the start is longer)
    wait_for(lambda: 0 < client.pttl(lease) <= 20_000, 15, what="its keeper renewing its lease")
    assert again.stop() == 0
    assert record(client, "ka").state is HostState.STOPPED


def test_a_cut_off_host_is_fenced_a_killed_one_taken_over_and_a_stopped_one_left_alone(
    make_daemon: Callable[..., Daemon], private_valkey: Callable[..., PrivateValkey]
) -> None:
    broker = private_valkey()
    with FakeFeishu(secret=SECRET) as hook:
        x = make_daemon(**env_for(broker, hook, "hx"))
        y = make_daemon(**env_for(broker, hook, "hy", NIETEST_SUBTASK_THREADS="4"))  # runs all four at once
        for daemon in (x, y):
            daemon.start(wait=False)
        for daemon in (x, y):
            daemon.wait_running()
        client = x.redis
        queue = x.settings.queue("subtask").name

        # --- a partition (the whole tree of x stopped) past the loss: fenced when it comes back
        before = worker_pids(x)
        old = set(before.values())
        lease = keys.host_lease("hx")  # renewed by x's keeper (the one taken at the start is longer)
        wait_for(lambda: 0 < client.pttl(lease) <= LOST * 1000, 15, what="x's keeper renewing its lease")
        x.signal_everything(signal.SIGSTOP)
        try:
            lost = wait_for(
                lambda: (r := record(client, "hx")).state is HostState.LOST and r.handed_back and r,
                LOST + 10,
                what="x declared lost by y",
            )
        finally:
            x.signal_everything(signal.SIGCONT)
        assert lost.taken_over_by == "hy" and lost.epoch == 1
        [lost_text] = card_texts(hook, "Host lost: hx")
        assert "**hx** gave no sign of life" in lost_text and "taken over by **hy**" in lost_text, lost_text
        wait_for(lambda: record(client, "hx").state is HostState.UP, 15, what="x rejoined")
        [back] = card_texts(hook, "Host back: hx")
        assert f"restarted its {len(before)} workers" in back, back
        after = wait_for(
            lambda: (p := worker_pids(x)) and len(p) == len(before) and not set(p.values()) & old and p,
            20,
            what="x's workers restarted with new pids",
        )
        assert set(after) == set(before)

        # --- x killed (every process) while its worker holds messages: they run on y within LOST + 5 s
        x.wait_running()
        y_subtask = {pid for name, pid in y.pids().items() if name.startswith("subtask:")}
        for pid in y_subtask:  # y's workers take nothing until x is dead (and not for HANG_SECONDS)
            os.kill(pid, signal.SIGSTOP)
        tokens = [f"m{i}" for i in range(4)]
        try:
            for token in tokens:
                x.send("subtask", "record", token, 4.0)
            x_subtask = {pid for name, pid in worker_pids(x).items() if name.startswith("subtask:")}
            wait_for(lambda: len(started_by(x, x_subtask)) == 2, 15, what="x's worker running two")
            wait_for(lambda: queue_stats(client, queue)["ready"] == 0, 10, what="x's worker holding the other two")
            x.kill_everything()
            killed = time.monotonic()
        finally:
            for pid in y_subtask:
                os.kill(pid, signal.SIGCONT)
        wait_for(lambda: started_by(y, y_subtask) == set(tokens), LOST + 5, interval=0.05, what="x's messages on y")
        took = time.monotonic() - killed
        assert took <= LOST + 5, took
        lost_text = card_texts(hook, "Host lost: hx", count=2)[1]
        assert "4 messages it held went back to the queues" in lost_text, lost_text
        wait_for(lambda: {t.split(":")[0] for t in y.done()} >= set(tokens), 15, what="x's messages done on y")

        # --- x starts again on its name at once; y stops gracefully and is never taken over
        x = make_daemon(x.home, **env_for(broker, hook, "hx")).start()
        assert record(client, "hx").state is HostState.UP
        assert y.stop() == 0
        assert record(client, "hy").state is HostState.STOPPED
        watched_until = time.monotonic() + 2 * LOST + 1  # x's keeper watches long enough to claim
        while time.monotonic() < watched_until:
            assert record(client, "hy").state is HostState.STOPPED
            time.sleep(0.2)
        assert not [t for t in titles(hook) if t.endswith("Host lost: hy")]
        assert x.stop() == 0
