"""Operations alerts end to end: the real daemon (supervisord running the real `alerts` listener,
real worker processes, the embedded valkey or a private one) and a real HTTP webhook on 127.0.0.1
(nietest_daemon/testing/fake_feishu.py) that checks every request's signature and answers scripted codes.

Everything polls with a deadline. Where a test asserts that something did *not* happen (no second
alert), it waits a bounded settle time of a few coalescing windows.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nietest_daemon.core import settings as settings_module
from nietest_daemon.internals.supervisor import control_proxy
from nietest_daemon.testing.daemon import ROOT, Daemon, clean_env
from nietest_daemon.testing.fake_feishu import FakeFeishu, Hang, Received
from nietest_daemon.testing.waiting import wait_for

pytestmark = pytest.mark.e2e

SECRET = "alert-secret-Q7w9-x"


# --- reading what the webhook received ---------------------------------------------------------------


@dataclass
class Card:
    title: str
    text: str
    template: str
    request: Received

    @property
    def delivered(self) -> bool:
        return self.request.reply.status == 200 and self.request.reply.code == 0 and not self.request.reply.hang


def cards(hook: FakeFeishu, start: int = 0) -> list[Card]:
    found = []
    for request in hook.received[start:]:
        card = (request.body or {}).get("card", {})
        header = card.get("header", {})
        texts = [e["text"]["content"] for e in card.get("elements", []) if isinstance(e.get("text"), dict)]
        found.append(
            Card(header.get("title", {}).get("content", ""), "\n".join(texts), header.get("template"), request)
        )
    return found


def wait_cards(
    hook: FakeFeishu, start: int, match: Callable[[Card], bool], count: int = 1, timeout: float = 20.0
) -> list[Card]:
    return wait_for(
        lambda: (found := [c for c in cards(hook, start) if match(c)]) and len(found) >= count and found,
        timeout,
        what=f"{count} matching card(s); got {[c.title for c in cards(hook, start)]}",
    )


def settle(seconds: float) -> None:
    """A bounded wait before asserting that nothing more arrived (not a synchronisation)."""
    time.sleep(seconds)


def all_signed(hook: FakeFeishu) -> bool:
    return all(r.sign_ok for r in hook.received)


# --- driving the daemon ------------------------------------------------------------------------------


def listener_running(daemon: Daemon) -> int:
    return wait_for(lambda: daemon.pids().get("alerts:alerts"), 15, what="the alerts listener RUNNING")


def kill_and_wait_replaced(daemon: Daemon, name: str) -> float:
    """kill -9 one process; wait until its replacement is RUNNING; return the monotonic time of the kill."""
    old = wait_for(lambda: daemon.pids().get(name), 20, what=f"{name} RUNNING")
    killed = time.monotonic()
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: daemon.pids().get(name) not in (None, old), 20, what=f"{name} replaced and RUNNING")
    return killed


def alerts_log(daemon: Daemon) -> list[dict[str, Any]]:
    path = daemon.home / "log" / "alerts.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def supervisord_log(home: Path) -> str:
    return (home / "log" / "supervisord.log").read_text()


def base_env(hook: FakeFeishu, **extra: str) -> dict[str, str]:
    return {
        "NIETEST_MASTER_THREADS": "2",
        "NIETEST_SUBTASK_THREADS": "2",
        "NIETEST_SUBTASK_OPS_THREADS": "2",
        "NIETEST_DRAIN_SECONDS": "2",
        "NIETEST_BROKER_HEARTBEAT_TIMEOUT": "3",
        "NIETEST_ACTOR_MODULES": "e2e_actors",
        "FEISHU_ALERT_WEBHOOK_URL": hook.url,
        "FEISHU_WEBHOOK_SECRET": SECRET,
        **extra,
    }


# --- one daemon for the cases that only need kills and scripted answers ---------------------------------


@dataclass
class Shared:
    daemon: Daemon
    hook: FakeFeishu


@pytest.fixture(scope="module")
def shared() -> Iterator[Shared]:
    home = Path(tempfile.mkdtemp(prefix="nt-", dir="/tmp"))
    with FakeFeishu(secret=SECRET) as hook:
        daemon = Daemon(
            home,
            **base_env(
                hook,
                NIETEST_MASTER_PROCESSES="1",
                NIETEST_SUBTASK_PROCESSES="4",
                NIETEST_SUBTASK_OPS_PROCESSES="1",
                NIETEST_ALERT_COALESCE_SECONDS="1",
                NIETEST_ALERT_CRASH_LOOP_RESTARTS="3",
                NIETEST_ALERT_CRASH_LOOP_WINDOW="8",
                NIETEST_ALERT_FAILURE_STREAK="3",
            ),
        )
        daemon.start()
        listener_running(daemon)
        try:
            yield Shared(daemon, hook)
            assert all_signed(hook), "every request the listener sent carried a valid signature"
            log = supervisord_log(home)
            assert "overflowed" not in log and "protocol error" not in log
        finally:
            try:
                daemon.stop()
            finally:
                daemon.kill_everything()
                shutil.rmtree(home, ignore_errors=True)


def test_workers_killed_together_are_one_message_listing_them(shared: Shared) -> None:
    daemon, hook = shared.daemon, shared.hook
    daemon.wait_running()
    start = len(hook.received)
    victims = ["subtask:subtask_00", "subtask:subtask_01", "subtask:subtask_02"]
    before = daemon.pids()
    for name in victims:
        os.kill(before[name], signal.SIGKILL)
    [card] = wait_cards(hook, start, lambda c: "restart" in c.title, timeout=15)
    assert card.title.endswith("] 3 worker restarts") and "nietest_subtask" in card.title
    assert card.template == "orange"
    for name in victims:
        assert name in card.text
    assert card.text.count("terminated by SIGKILL") == 3
    settle(3)  # three windows: no second message about the same exits
    assert len(cards(hook, start)) == 1 and card.delivered


def test_four_kills_are_one_crash_loop_alert_then_a_recovery(shared: Shared) -> None:
    daemon, hook = shared.daemon, shared.hook
    daemon.wait_running()
    start = len(hook.received)
    name = "master:master_00"
    kills = [kill_and_wait_replaced(daemon, name) for _ in range(4)]
    assert kills[2] - kills[0] < 8, "three kills must fall within the 8 s window"
    [loop] = wait_cards(hook, start, lambda c: "Crash loop" in c.title, timeout=10)
    assert loop.template == "red" and name in loop.title and "nietest_master" in loop.title
    assert "exited unexpectedly 3 times within" in loop.text
    # recovery: after it has run for a whole window (8 s) without exiting
    [recovered] = wait_cards(hook, start, lambda c: "Recovered" in c.title, timeout=25)
    assert recovered.template == "green" and name in recovered.title
    assert recovered.request.time - kills[-1] >= 8
    got = cards(hook, start)
    assert [c.title for c in got].count(loop.title) == 1
    assert got.index(loop) < got.index(recovered)
    # restarts before the loop was recognised may have been alerted; none after it
    restarts = [c for c in got if "restart" in c.title]
    assert len(restarts) <= 2 and all(got.index(c) < got.index(loop) for c in restarts)


def test_run_of_failed_subtasks_then_recovery(shared: Shared) -> None:
    daemon, hook = shared.daemon, shared.hook
    daemon.wait_running()
    start = len(hook.received)
    done_before = len([t for t in daemon.done() if t.startswith("outcome:")])
    for error in ("ILLEGAL_IMAGE: the image was refused", "ILLEGAL_IMAGE: the image was refused", "HTTP 502"):
        daemon.send("subtask", "outcome", False, error)
    [run] = wait_cards(hook, start, lambda c: "failed subtasks" in c.title, timeout=15)
    assert run.template == "red" and "nietest_subtask" in run.title
    assert "3 consecutive subtasks failed" in run.text
    assert run.text.index("2× ILLEGAL_IMAGE") < run.text.index("1× HTTP 502")
    wait_for(lambda: len([t for t in daemon.done() if t.startswith("outcome:")]) == done_before + 3, 10)
    daemon.send("subtask", "outcome", True)
    [recovered] = wait_cards(hook, start, lambda c: "recovered" in c.title.lower(), timeout=15)
    assert recovered.template == "green" and "after 3 consecutive failures" in recovered.text
    assert [c.title for c in cards(hook, start)] == [run.title, recovered.title]


def test_rate_limited_answer_is_retried_until_delivered(shared: Shared) -> None:
    daemon, hook = shared.daemon, shared.hook
    daemon.wait_running()
    start = len(hook.received)
    hook.script(9499, 0)
    kill_and_wait_replaced(daemon, "subtask:subtask_03")
    first, second = wait_cards(hook, start, lambda c: "subtask_03" in c.title, count=2, timeout=15)
    assert first.request.reply.code == 9499 and second.delivered
    assert first.text == second.text and first.request.sign_ok and second.request.sign_ok
    delivered = wait_for(
        lambda: [
            r for r in alerts_log(daemon) if r["event"] == "feishu message delivered" and "subtask_03" in r["title"]
        ],
        10,
    )
    assert delivered[-1]["attempts"] == 2


def test_configuration_error_is_not_retried(shared: Shared) -> None:
    daemon, hook = shared.daemon, shared.hook
    daemon.wait_running()
    start = len(hook.received)
    hook.script(19021)
    kill_and_wait_replaced(daemon, "subtask_ops:subtask_ops_00")
    [refused] = wait_cards(hook, start, lambda c: "subtask_ops_00" in c.title, timeout=15)
    assert refused.request.reply.code == 19021
    # The next alert is the next request: a retry of the refused one would have come first.
    kill_and_wait_replaced(daemon, "subtask:subtask_03")
    wait_cards(hook, start, lambda c: "subtask_03" in c.title, timeout=15)
    assert [c.title for c in cards(hook, start)] == [refused.title, cards(hook, start)[1].title]
    assert "subtask_03" in cards(hook, start)[1].title
    errors = [r for r in alerts_log(daemon) if r["event"] == "feishu configuration error"]
    assert errors and errors[-1]["code"] == 19021 and "signature" in errors[-1]["hint"]


def test_listener_restart_is_reported(shared: Shared) -> None:
    daemon, hook = shared.daemon, shared.hook
    daemon.wait_running()
    start = len(hook.received)
    old = listener_running(daemon)
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: daemon.pids().get("alerts:alerts") not in (None, old), 20, what="a new listener RUNNING")
    [card] = wait_cards(hook, start, lambda c: "listener restarted" in c.title, timeout=15)
    assert f"pid {old}" in card.text and card.template == "orange"
    settle(2)
    assert len(cards(hook, start)) == 1  # and no "restart" alert about the listener itself


# --- one alert within 15 s with the default window -----------------------------------------------------


def test_kill_9_gives_exactly_one_restart_alert_within_15_s(make_daemon) -> None:
    with FakeFeishu(secret=SECRET) as hook:
        daemon = make_daemon(**base_env(hook)).start()  # NIETEST_ALERT_COALESCE_SECONDS: the default, 10 s
        listener_running(daemon)
        killed = kill_and_wait_replaced(daemon, "subtask:subtask_01")
        [card] = wait_cards(hook, 0, lambda c: True, timeout=16)
        latency = card.request.time - killed
        assert latency <= 15, latency
        assert "Worker restarted: subtask:subtask_01" in card.title and "nietest_subtask" in card.title
        assert "terminated by SIGKILL" in card.text and "now RUNNING" in card.text
        assert card.request.sign_ok and card.delivered
        settle(2)
        assert len(hook.received) == 1
        daemon.stop()


# --- FATAL -----------------------------------------------------------------------------------------------


def test_program_failing_at_once_ends_fatal_with_one_alert(make_daemon, short_tmp: Path) -> None:
    modules = short_tmp / "modules"
    modules.mkdir()
    token = "tok-FATAL-Secret-8812"
    (modules / "broken_actors.py").write_text(
        "import os\nraise RuntimeError('actor module refuses to load with ' + os.environ['NIETA_XTOKEN'])\n"
    )
    with FakeFeishu(secret=SECRET) as hook:
        daemon = make_daemon(
            **base_env(
                hook,
                NIETEST_MASTER_PROCESSES="0",
                NIETEST_SUBTASK_PROCESSES="1",
                NIETEST_SUBTASK_OPS_PROCESSES="0",
                NIETEST_START_RETRIES="2",
                NIETEST_ALERT_COALESCE_SECONDS="2",
                NIETEST_ACTOR_MODULES="broken_actors",
                NIETA_XTOKEN=token,
                PYTHONPATH=os.pathsep.join([str(modules), str(ROOT)]),
            )
        ).start(wait=False)
        wait_for(
            lambda: {p["name"]: p["state"] for p in daemon.status()["processes"]}.get("subtask:subtask_00") == "FATAL",
            40,
            what="subtask_00 FATAL",
        )
        [card] = wait_cards(hook, 0, lambda c: "FATAL" in c.title, timeout=10)
        assert "FATAL" in card.title and "subtask:subtask_00" in card.title and card.template == "red"
        assert "RuntimeError: actor module refuses to load with ***" in card.text
        assert card.text.count("(while starting)") == 3  # startretries=2: three failed starts
        assert token not in json.dumps(card.request.body)
        settle(3)  # more than the window (2 s): nothing else was waiting in one
        # The FATAL alert replaces a restart or crash-loop alert still in its window. On a loaded
        # machine the import may outlast `startsecs` (supervisord then counts a run, not a failed
        # start) and the exits spread over more than the 2 s window: such alerts go out first.
        others = [c for c in cards(hook) if c.title != card.title]
        assert [c for c in cards(hook) if "FATAL" in c.title] == [card]
        assert all(
            ("Crash loop" in c.title or "restarted" in c.title) and "subtask:subtask_00" in c.title for c in others
        ), others
        assert len(others) <= 2
        daemon.stop()


# --- the broker unreachable at worker start ------------------------------------------------------------


def test_unreachable_broker_is_reported_once_then_its_return(make_daemon, private_valkey) -> None:
    server = private_valkey(start=False)
    with FakeFeishu(secret=SECRET) as hook:
        daemon = make_daemon(
            **base_env(
                hook,
                BROKER_REDIS_URL=server.url,
                NIETEST_MASTER_PROCESSES="0",
                NIETEST_SUBTASK_PROCESSES="1",
                NIETEST_SUBTASK_OPS_PROCESSES="0",
                NIETEST_ALERT_COALESCE_SECONDS="1",
            )
        ).start()  # workers are RUNNING while they wait for the broker
        [down] = wait_cards(hook, 0, lambda c: "Broker unreachable" in c.title, timeout=20)
        assert down.template == "red" and "Workers cannot start or consume" in down.text
        server.start()
        [up] = wait_cards(hook, 0, lambda c: "Broker reachable again" in c.title, timeout=15)
        assert up.template == "green"
        log = daemon.home / "log" / "subtask_00.log"
        wait_for(lambda: "worker started" in log.read_text(), 20, what="the worker started once the broker was up")
        assert [c.title for c in cards(hook)] == [down.title, up.title]
        daemon.stop()


# --- a webhook that never answers ----------------------------------------------------------------------


def _notify_round(daemon: Daemon, count: int) -> float:
    tokens = [uuid.uuid4().hex for _ in range(count)]
    started = time.monotonic()
    for token in tokens:
        daemon.send("subtask", "notify", token)
    wait_for(
        lambda: {t.split(":")[0] for t in daemon.done()} >= set(tokens), 30, interval=0.02, what="notices processed"
    )
    return time.monotonic() - started


def test_hanging_webhook_slows_neither_workers_nor_the_listener(make_daemon) -> None:
    with FakeFeishu(secret=SECRET) as hook, FakeFeishu(secret=SECRET) as task_hook:
        daemon = make_daemon(
            **base_env(
                hook,
                FEISHU_TASK_WEBHOOK_URL=task_hook.url,
                NIETEST_SUBTASK_PROCESSES="2",
                NIETEST_ALERT_COALESCE_SECONDS="0.5",
            )
        ).start()
        listener_running(daemon)
        _notify_round(daemon, 5)  # warm up: clients created, connections open
        baseline = _notify_round(daemon, 30)

        hook.script(*[Hang(120)] * 50)
        task_hook.script(*[Hang(120)] * 200)
        hung = _notify_round(daemon, 30)
        print(f"30 notices: {baseline:.2f} s with the webhook answering, {hung:.2f} s with it hanging")
        # a worker that waited for the webhook would take 30 x 3 s / 4 threads here
        assert hung < baseline * 3 + 1.5, (baseline, hung)

        # The listener: its alert hangs in the sender thread, and it goes on acknowledging events.
        victim = "subtask:subtask_00"
        kill_and_wait_replaced(daemon, victim)
        wait_for(lambda: len(hook.received) >= 1, 10, what="the restart alert sent (and hanging)")
        kill_and_wait_replaced(daemon, "master:master_00")
        wait_for(
            lambda: any(
                r["event"] == "process state" and r.get("process_key") == "master:master_00" and r["state"] == "RUNNING"
                for r in alerts_log(daemon)[-50:]
            ),
            5,
            what="the listener saw master_00 RUNNING again while its webhook hangs",
        )
        # ... and its engine went on too: the second alert is made (it waits behind the hanging one)
        wait_for(
            lambda: any(r["event"] == "alert" and "master:master_00" in r["subjects"] for r in alerts_log(daemon)),
            5,
            what="the second alert made while the first one hangs",
        )
        assert "overflowed" not in supervisord_log(daemon.home)
        stopped = time.monotonic()
        daemon.stop()
        assert time.monotonic() - stopped < 30


# --- a burst of 200 events -------------------------------------------------------------------------------


def _listener_section() -> dict[str, str]:
    """The [eventlistener:alerts] section of the real etc/supervisord.conf, verbatim."""
    parser = configparser.RawConfigParser(inline_comment_prefixes=None)
    parser.read(ROOT / "etc" / "supervisord.conf")
    return dict(parser["eventlistener:alerts"])


def _burst_config(home: Path, buffer_size: str | None = None) -> Path:
    section = _listener_section()
    if buffer_size is not None:
        section["buffer_size"] = buffer_size
    listener = "\n".join(f"{k}={v}" for k, v in section.items())
    config = home / "burst.conf"
    config.write_text(
        f"""[unix_http_server]
file={home}/run/supervisor.sock
chmod=0700

[supervisord]
nodaemon=true
logfile={home}/log/supervisord.log
pidfile={home}/run/supervisord.pid
childlogdir={home}/log

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[program:burst]
command=sleep 600
process_name=%(program_name)s_%(process_num)02d
numprocs=50
startsecs=0
autorestart=true
stopsignal=KILL
stdout_logfile=NONE
stderr_logfile=NONE

[eventlistener:alerts]
{listener}
"""
    )
    return config


def _run_burst(buffer_size: str | None) -> tuple[str, list[dict[str, Any]]]:
    """supervisord (ours) with 50 `sleep`s and the real listener section; stop and start the group twice."""
    home = Path(tempfile.mkdtemp(prefix="ntb-", dir="/tmp"))
    for sub in ("run", "log", "data"):
        (home / sub).mkdir()
    settings = settings_module.load({"NIETEST_HOME": str(home)})
    env = clean_env(**{**settings.supervisor_env(), "NIETEST_PYTHON": sys.executable})
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nietest_daemon.programs.supervisord",
            "-n",
            "-c",
            str(_burst_config(home, buffer_size)),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:

        def rpc() -> Any:  # a fresh connection each time: a failed call leaves a transport unusable
            return control_proxy(f"unix://{home}/run/supervisor.sock").supervisor

        def states() -> dict[str, str]:
            return {p["name"]: p["statename"] for p in rpc().getAllProcessInfo()}

        wait_for(lambda: set(states().values()) == {"RUNNING"} and len(states()) == 51, 30, what="all RUNNING")
        log_path = home / "log" / "alerts.log"

        def seen() -> list[dict[str, Any]]:
            return [json.loads(line) for line in log_path.read_text().splitlines() if '"process state"' in line]

        if buffer_size is None:
            wait_for(lambda: len(seen()) >= 100, 20, what="the 100 start events (STARTING, RUNNING)")
        for _ in range(2):
            rpc().stopProcessGroup("burst")  # 50 STOPPING + 50 STOPPED in one go
            rpc().startProcessGroup("burst")  # 50 STARTING + 50 RUNNING
        if buffer_size is None:
            wait_for(lambda: len(seen()) >= 500, 20, what="all 500 events at the listener")
        else:
            wait_for(lambda: "overflowed" in supervisord_log(home), 20, what="an overflow")
        rpc().stopProcessGroup("burst")
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        return supervisord_log(home), seen()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        shutil.rmtree(home, ignore_errors=True)


def test_a_burst_of_events_reaches_the_listener_without_overflow() -> None:
    assert int(_listener_section()["buffer_size"]) >= 1024
    log, seen = _run_burst(None)
    assert "overflowed" not in log and "protocol error" not in log
    assert len(seen) >= 500  # 100 at start + 2 x 200 (STOPPING, STOPPED, STARTING, RUNNING of 50)
    assert {r["state"] for r in seen} == {"STARTING", "RUNNING", "STOPPING", "STOPPED"}
    # The same burst with supervisord's default buffer (10) does overflow: the burst is a real one.
    log, _ = _run_burst("10")
    assert "event buffer overflowed" in log
