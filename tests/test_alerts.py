"""The alerts listener's parts: the rules (Engine, on a fake clock), supervisord's log, the marker,
and the listener protocol spoken by a real `nietest alerts` process.

The end-to-end cases (a real supervisord, real workers, valkey, a real webhook) are in
test_alerts_e2e.py.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nietest_daemon.coordination.events import (
    BrokerFailover,
    FailureRun,
    HostBack,
    HostLost,
    QueueRecovered,
    WorkerUnresponsive,
)
from nietest_daemon.core.redaction import set_secrets
from nietest_daemon.core.settings import load
from nietest_daemon.domain.process_state import ProcessState
from nietest_daemon.programs.alerts.engine import BROKER_GRACE_SECONDS, Engine
from nietest_daemon.programs.alerts.inputs import (
    BrokerPing,
    FromBroker,
    Input,
    ListenerRestart,
    ProcessSnapshot,
    SupervisorEvent,
)
from nietest_daemon.programs.alerts.kinds import AlertKind
from nietest_daemon.programs.alerts.listener import Listener
from nietest_daemon.programs.alerts.records import Alert, Item
from nietest_daemon.programs.alerts.render import log_tail, render_log_line
from nietest_daemon.programs.alerts.supervisor_log import MARKER_NAME, ExitLog, Marker
from nietest_daemon.testing.daemon import clean_env
from nietest_daemon.testing.waiting import wait_for

HOME = "/tmp/nt-unit-alerts"


def make_engine(
    sent: list[Alert],
    *,
    statuses: dict[str, list[str]] | None = None,
    log_lines: list[str] | None = None,
    recycle_marks: set[tuple[str, int]] | None = None,
    **env: str,
) -> Engine:
    settings = load(
        {
            "NIETEST_HOME": HOME,
            "NIETEST_ALERT_COALESCE_SECONDS": "10",
            "NIETEST_ALERT_CRASH_LOOP_RESTARTS": "3",
            "NIETEST_ALERT_CRASH_LOOP_WINDOW": "60",
            "NIETEST_ALERT_FAILURE_STREAK": "5",
            **env,
        }
    )
    statuses = statuses or {}
    marks = recycle_marks if recycle_marks is not None else set()

    def exit_status(name: str, wall: float) -> str | None:
        queue = statuses.get(name)
        return queue.pop(0) if queue else "terminated by SIGKILL"

    return Engine(
        settings,
        sent.append,
        exit_status=exit_status,
        is_recycle=lambda proc, pid: (proc.name, pid) in marks,
        read_log=lambda proc: log_lines or [],
        own_group="alerts",
    )


class Clock:
    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = 1_800_000_000.0

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


def event(engine: Engine, clock: Clock, state: str, name: str, group: str | None = None, **extra: Any) -> None:
    group = group or name.rsplit("_", 1)[0]
    fields = {"processname": name, "groupname": group, **extra}
    payload = " ".join(f"{k}:{v}" for k, v in fields.items())
    engine.handle(SupervisorEvent(f"PROCESS_STATE_{state}", payload, clock.mono, clock.wall))


def start(engine: Engine, clock: Clock, name: str, pid: int) -> None:
    event(engine, clock, "STARTING", name, from_state="STOPPED", tries=0)
    clock.advance(1)
    event(engine, clock, "RUNNING", name, from_state="STARTING", pid=pid)


def crash(engine: Engine, clock: Clock, name: str, pid: int, new_pid: int) -> None:
    event(engine, clock, "EXITED", name, from_state="RUNNING", expected=0, pid=pid)
    event(engine, clock, "STARTING", name, from_state="EXITED", tries=0)
    clock.advance(1)
    event(engine, clock, "RUNNING", name, from_state="STARTING", pid=new_pid)


def run_for(engine: Engine, clock: Clock, seconds: float, step: float = 0.5) -> None:
    end = clock.mono + seconds
    while clock.mono < end:
        clock.advance(step)
        engine.tick(clock.mono)


# --- the rules -------------------------------------------------------------------------------------


def test_one_restart_is_one_alert_after_the_window_with_status_and_runtime() -> None:
    sent: list[Alert] = []
    engine, clock = make_engine(sent), Clock()
    start(engine, clock, "subtask_00", 100)
    clock.advance(125)
    crash(engine, clock, "subtask_00", 100, 101)
    run_for(engine, clock, 8)
    assert sent == []  # the coalescing window (10 s from the exit) is still open
    run_for(engine, clock, 1.5)
    assert len(sent) == 1
    alert = sent[0]
    assert (alert.kind, alert.severity, alert.queue) == ("restart", "warning", "nietest_subtask")
    assert alert.title == "Worker restarted: subtask:subtask_00"
    assert "terminated by SIGKILL after running 2m06s" in alert.content
    assert "now RUNNING (pid 101)" in alert.content
    run_for(engine, clock, 60)
    assert len(sent) == 1


def test_a_burst_of_restarts_is_one_message_listing_them() -> None:
    sent: list[Alert] = []
    engine, clock = make_engine(sent), Clock()
    for i in range(8):
        start(engine, clock, f"subtask_{i:02d}", 100 + i)
    clock.advance(30)
    for i in range(8):
        event(engine, clock, "EXITED", f"subtask_{i:02d}", from_state="RUNNING", expected=0, pid=100 + i)
        clock.advance(0.3)
    event(engine, clock, "EXITED", "master_00", from_state="RUNNING", expected=0, pid=5)
    run_for(engine, clock, 12)
    assert len(sent) == 1
    alert = sent[0]
    assert alert.title == "9 worker restarts" and alert.queue is None  # two queues: none in the title
    assert all(f"subtask:subtask_{i:02d}" in alert.content for i in range(8)) and "master:master_00" in alert.content


def test_expected_exits_and_requested_stops_are_not_alerted() -> None:
    sent: list[Alert] = []
    engine, clock = make_engine(sent), Clock()
    start(engine, clock, "subtask_00", 100)
    event(engine, clock, "STOPPING", "subtask_00", from_state="RUNNING", pid=100)
    event(engine, clock, "STOPPED", "subtask_00", from_state="STOPPING", pid=100)
    start(engine, clock, "subtask_00", 101)
    event(engine, clock, "EXITED", "subtask_00", from_state="RUNNING", expected=1, pid=101)
    # the listener's own group is ignored (it cannot report its own death anyway)
    event(engine, clock, "EXITED", "alerts", group="alerts", from_state="RUNNING", expected=0, pid=7)
    run_for(engine, clock, 30)
    assert sent == []


def test_crash_loop_is_one_critical_alert_then_one_recovery_after_a_steady_window() -> None:
    sent: list[Alert] = []
    engine, clock = make_engine(sent, NIETEST_ALERT_COALESCE_SECONDS="1"), Clock()
    start(engine, clock, "master_00", 10)
    clock.advance(5)
    for n in range(6):  # six exits, 3 s apart: a loop from the third on
        crash(engine, clock, "master_00", 10 + n, 11 + n)
        run_for(engine, clock, 2)
    kinds = [a.kind for a in sent]
    assert kinds == ["restart", "restart", "crash_loop"]
    loop = sent[2]
    assert loop.severity == "critical" and loop.title == "Crash loop: master:master_00"
    assert "exited unexpectedly 3 times within 1m00s" in loop.content
    run_for(engine, clock, 55)
    assert [a.kind for a in sent] == kinds  # still not steady for a whole window
    run_for(engine, clock, 10)
    assert [a.kind for a in sent] == [*kinds, "process_recovered"]
    assert sent[-1].severity == "success" and "3 more unexpected exits meanwhile" in sent[-1].content
    # after the recovery, a single crash is a plain restart again
    crash(engine, clock, "master_00", 20, 21)
    run_for(engine, clock, 2)
    assert sent[-1].kind == "restart"


def test_fast_crash_loop_inside_one_window_is_only_the_loop_alert() -> None:
    sent: list[Alert] = []
    engine, clock = make_engine(sent), Clock()
    start(engine, clock, "master_00", 10)
    for n in range(4):
        crash(engine, clock, "master_00", 10 + n, 11 + n)
    run_for(engine, clock, 12)
    assert [a.kind for a in sent] == ["crash_loop"]  # the pending restart alerts were folded into it


def test_fatal_replaces_the_pending_loop_alert_and_shows_the_log() -> None:
    sent: list[Alert] = []
    lines = ["02:50:46 critical unhandled exception [RuntimeError: broken actor module]"]
    engine, clock = make_engine(sent, log_lines=lines, NIETEST_ALERT_COALESCE_SECONDS="2"), Clock()
    for tries in range(3):  # exits during start: BACKOFF, no restart alerts
        event(engine, clock, "STARTING", "subtask_00", from_state="BACKOFF", tries=tries)
        clock.advance(0.2)
        event(engine, clock, "BACKOFF", "subtask_00", from_state="STARTING", tries=tries + 1)
    event(engine, clock, "FATAL", "subtask_00", from_state="BACKOFF")
    run_for(engine, clock, 5)
    assert [a.kind for a in sent] == ["fatal"]
    fatal = sent[0]
    assert fatal.severity == "critical" and fatal.title == "FATAL: supervisord gave up on subtask:subtask_00"
    assert "broken actor module" in fatal.content and "nietest ctl start subtask:subtask_00" in fatal.content
    assert fatal.content.count("(while starting)") == 3


def test_failure_run_and_recovery_from_streak_events() -> None:
    sent: list[Alert] = []
    engine, clock = make_engine(sent, NIETEST_ALERT_COALESCE_SECONDS="0"), Clock()
    errors = ["ILLEGAL_IMAGE: moderation"] * 3 + ["HTTP 502 from the API"] * 2
    engine.handle(FromBroker(FailureRun("nietest_subtask", 5, tuple(errors), 1), clock.mono))
    engine.handle(FromBroker(QueueRecovered("nietest_subtask", 9, 2), clock.mono))
    assert [a.kind for a in sent] == ["failure_run", "queue_recovered"]
    run, recovered = sent
    assert run.queue == "nietest_subtask" and run.severity == "critical"
    assert "5 consecutive subtasks failed" in run.content
    assert run.content.index("3× ILLEGAL_IMAGE") < run.content.index("2× HTTP 502")
    assert recovered.severity == "success" and "after 9 consecutive failures" in recovered.content


def test_a_lost_host_and_its_return_are_one_card_each() -> None:
    sent: list[Alert] = []
    engine, clock = make_engine(sent), Clock()
    engine.handle(FromBroker(HostLost("h9", 12.4, "h1", 7, 5, clock.wall), clock.mono))
    clock.advance(30)
    engine.handle(FromBroker(HostBack("h9", 31.0, 4, clock.wall), clock.mono))
    engine.handle(FromBroker(HostBack("h8", 1.0, 1, clock.wall), clock.mono))
    run_for(engine, clock, 11)
    lost, back = sent
    assert lost.title == "Host lost: h9" and lost.severity == "critical" and lost.queue is None
    assert "**h9** gave no sign of life for 12s" in lost.content and "taken over by **h1**" in lost.content
    assert "7 messages it held went back to the queues, continuing 5 subtasks" in lost.content
    assert back.title == "2 hosts back" and back.severity == "success"
    assert "**h9** beats again, 31s after it was declared lost" in back.content
    assert "restarted its 4 workers" in back.content and "restarted its 1 worker " in back.content


def test_broker_outage_is_reported_once_after_the_grace_then_its_end() -> None:
    sent: list[Alert] = []
    engine, clock = make_engine(sent, NIETEST_ALERT_COALESCE_SECONDS="0"), Clock()
    engine.handle(BrokerPing(False, "ConnectionError: refused", clock.mono, clock.wall))
    clock.advance(3)
    engine.handle(BrokerPing(True, None, clock.mono, clock.wall))  # a blip: nothing
    for _ in range(30):
        engine.handle(BrokerPing(False, "ConnectionError: refused", clock.mono, clock.wall))
        clock.advance(1)
        engine.tick(clock.mono)
    assert [a.kind for a in sent] == ["broker_down"]
    assert "refused" in sent[0].content
    engine.handle(BrokerPing(True, None, clock.mono, clock.wall))
    engine.tick(clock.mono)
    assert [a.kind for a in sent] == ["broker_down", "broker_up"]
    assert "after 30s unreachable" in sent[1].content


def test_snapshot_gives_the_run_time_of_processes_started_before_the_listener() -> None:
    sent: list[Alert] = []
    engine, clock = make_engine(sent, NIETEST_ALERT_COALESCE_SECONDS="0"), Clock()
    infos = [
        {"group": "subtask", "name": "subtask_00", "statename": "RUNNING", "pid": 42, "start": clock.wall - 3600},
        {"group": "alerts", "name": "alerts", "statename": "RUNNING", "pid": 7, "start": clock.wall - 1},
    ]
    engine.handle(ProcessSnapshot(infos, clock.mono, clock.mono, clock.wall))
    assert "alerts:alerts" not in engine.procs
    event(engine, clock, "EXITED", "subtask_00", from_state="RUNNING", expected=0, pid=42)
    assert "after running 1h00m" in sent[0].content


def test_a_worker_killed_for_silence_is_one_unresponsive_alert_in_place_of_its_restart() -> None:
    sent: list[Alert] = []
    engine, clock = make_engine(sent), Clock()
    start(engine, clock, "subtask_00", 11)
    clock.advance(60)
    event(engine, clock, "EXITED", "subtask_00", from_state="RUNNING", expected=0, pid=11)  # the watchdog's SIGKILL
    event(engine, clock, "STARTING", "subtask_00", from_state="EXITED", tries=0)
    clock.advance(1)
    event(engine, clock, "RUNNING", "subtask_00", from_state="STARTING", pid=12)
    report = WorkerUnresponsive("nietest_subtask", "subtask:subtask_00", 11, 31.2, "host-a", clock.wall)
    engine.handle(FromBroker(report, clock.mono))
    clock.advance(30)
    engine.tick(clock.mono)
    assert [a.kind for a in sent] == ["unresponsive"]
    alert = sent[0]
    assert alert.severity == "warning" and alert.queue == "nietest_subtask"
    assert alert.title == "Worker unresponsive: subtask:subtask_00"
    assert "no sign of life for 31 s" in alert.content and "now RUNNING (pid 12)" in alert.content


def test_a_recycle_is_no_crash_and_is_alerted_only_when_it_comes_again_within_the_window() -> None:
    sent: list[Alert] = []
    statuses = {"subtask_00": ["exit status 75; not expected"] * 4}
    marks = {("subtask_00", pid) for pid in (11, 12, 13, 14)}  # each left its recycle mark before exiting
    engine, clock = (
        make_engine(sent, statuses=statuses, recycle_marks=marks, NIETEST_ALERT_COALESCE_SECONDS="0"),
        Clock(),
    )
    start(engine, clock, "subtask_00", 11)
    for pid in (12, 13, 14):  # three recycles 70 s apart (window 60 s): none alerted, no crash loop
        clock.advance(70)
        crash(engine, clock, "subtask_00", pid - 1, pid)
    assert sent == []
    clock.advance(20)  # a fourth, 20 s after the third
    crash(engine, clock, "subtask_00", 14, 15)
    assert [a.kind for a in sent] == ["recycle"]
    assert sent[0].title == "Worker recycled twice within the window: subtask:subtask_00"
    assert "a fast leak, or a limit set too low" in sent[0].content


def test_secrets_in_streak_errors_are_redacted() -> None:
    set_secrets(["tok-Unit-SECRET-99"])
    try:
        sent: list[Alert] = []
        engine, clock = make_engine(sent, NIETEST_ALERT_COALESCE_SECONDS="0"), Clock()
        errors = ["failed with tok-Unit-SECRET-99 at redis://u:hunter2@h/0"] * 5
        engine.handle(FromBroker(FailureRun("q", 5, tuple(errors), 0.0), clock.mono))
        assert "tok-Unit-SECRET-99" not in sent[0].content and "hunter2" not in sent[0].content
    finally:
        set_secrets([])


def test_exit_status_75_without_a_recycle_mark_is_a_plain_restart() -> None:
    """A recycle is known from the worker's mark, not from its exit status."""
    sent: list[Alert] = []
    statuses = {"subtask_00": ["exit status 75"], "subtask_01": ["terminated by SIGKILL"]}
    marks = {("subtask_01", 21)}  # a mark says recycle, whatever the status
    engine, clock = (
        make_engine(sent, statuses=statuses, recycle_marks=marks, NIETEST_ALERT_COALESCE_SECONDS="0"),
        Clock(),
    )
    start(engine, clock, "subtask_00", 20)
    start(engine, clock, "subtask_01", 21)
    clock.advance(100)
    event(engine, clock, "EXITED", "subtask_00", from_state="RUNNING", expected=0, pid=20)
    event(engine, clock, "EXITED", "subtask_01", from_state="RUNNING", expected=0, pid=21)
    assert [(a.kind, a.subjects) for a in sent] == [("restart", ["subtask:subtask_00"])]
    assert "exit status 75 after running" in sent[0].content
    assert (
        list(engine.procs["subtask:subtask_01"].recycles) == [clock.mono]
        and not engine.procs["subtask:subtask_01"].exits
    )


def test_the_recycle_mark_is_looked_up_for_a_worker_exit_with_the_broker_reachable_only() -> None:
    asked: list[tuple[str, int]] = []
    settings_env = {"NIETEST_HOME": HOME, "NIETEST_ALERT_COALESCE_SECONDS": "0"}
    engine = Engine(load(settings_env), [].append, is_recycle=lambda proc, pid: asked.append((proc.key, pid)) or False)
    clock = Clock()
    event(engine, clock, "EXITED", "broker", group="broker", from_state="RUNNING", expected=0, pid=5)  # not a worker
    event(engine, clock, "EXITED", "subtask_00", from_state="RUNNING", expected=1, pid=6)  # asked for
    event(engine, clock, "BACKOFF", "subtask_00", from_state="STARTING")  # died while starting: no pid
    event(engine, clock, "EXITED", "subtask_00", from_state="RUNNING", expected=0, pid=7)
    assert asked == [("subtask:subtask_00", 7)]
    engine.handle(BrokerPing(False, "ConnectionError: refused", clock.mono, clock.wall))
    event(engine, clock, "EXITED", "subtask_00", from_state="RUNNING", expected=0, pid=8)  # no worker could mark
    assert asked == [("subtask:subtask_00", 7)]


# --- the kinds -------------------------------------------------------------------------------------


def test_alert_kinds_carry_severity_titles_and_the_send_order() -> None:
    order = list(AlertKind)
    for problem, recovery in (
        (AlertKind.CRASH_LOOP, AlertKind.PROCESS_RECOVERED),
        (AlertKind.FATAL, AlertKind.PROCESS_RECOVERED),
        (AlertKind.FAILURE_RUN, AlertKind.QUEUE_RECOVERED),
        (AlertKind.BROKER_DOWN, AlertKind.BROKER_UP),
        (AlertKind.HOST_LOST, AlertKind.HOST_BACK),
    ):
        assert order.index(problem) < order.index(recovery)
        assert recovery.severity == "success" and problem.severity == "critical"
    assert AlertKind.RESTART.card_title(["subtask:subtask_00"], workers=True) == "Worker restarted: subtask:subtask_00"
    assert AlertKind.RESTART.card_title(["a:a", "b:b"], workers=False) == "2 process restarts"
    assert AlertKind.FAILURE_RUN.card_title(["q", "q", "r"], workers=False) == "Runs of failed subtasks on 2 queues"
    for kind in AlertKind:  # every template formats
        assert "{" not in kind.card_title(["x:y"], workers=True) + kind.card_title(["x:y", "z:w"], workers=True)


def test_kinds_due_together_go_out_in_the_enums_order() -> None:
    sent: list[Alert] = []
    engine = make_engine(sent)
    for kind in reversed(AlertKind):
        engine._add(Item(kind, None, "s", lambda: "text"), 1000.0)
    engine.tick(1000.0 + 10)
    assert [a.kind for a in sent] == list(AlertKind)


# --- one entry for every input: Engine.handle ------------------------------------------------------


def _inputs(clock: Clock) -> dict[str, tuple[Input, Callable[[Engine, list[Alert]], bool]]]:
    """One input of every kind, and what shows that the engine took it."""
    mono, wall = clock.mono, clock.wall
    snapshot = [{"group": "subtask", "name": "subtask_03", "statename": "RUNNING", "pid": 43, "start": wall - 60}]
    return {
        "supervisor event": (
            SupervisorEvent(
                "PROCESS_STATE_FATAL", "processname:master_00 groupname:master from_state:BACKOFF", mono, wall
            ),
            lambda engine, sent: [a.kind for a in sent] == ["fatal"] and engine.events == 1,
        ),
        "broker ping": (
            BrokerPing(False, "ConnectionError: refused", mono - BROKER_GRACE_SECONDS, wall - BROKER_GRACE_SECONDS),
            lambda engine, sent: [a.kind for a in sent] == ["broker_down"] and "refused" in sent[0].content,
        ),
        "snapshot": (
            ProcessSnapshot(snapshot, mono, mono, wall),
            lambda engine, sent: (
                (p := engine.procs["subtask:subtask_03"]).state is ProcessState.RUNNING
                and p.pid == 43
                and p.spawned_at == mono - 60
            ),
        ),
        "watchdog report": (
            FromBroker(WorkerUnresponsive("nietest_subtask", "subtask:subtask_02", 42, 40.0, "h", wall), mono),
            lambda engine, sent: [a.kind for a in sent] == ["unresponsive"] and "(pid 42)" in sent[0].content,
        ),
        "failure run": (
            FromBroker(FailureRun("nietest_subtask", 5, ("boom",) * 5, wall), mono),
            lambda engine, sent: [a.kind for a in sent] == ["failure_run"] and "5× boom" in sent[0].content,
        ),
        "queue recovered": (
            FromBroker(QueueRecovered("nietest_subtask", 7, wall), mono),
            lambda engine, sent: [a.kind for a in sent] == ["queue_recovered"],
        ),
        "host lost": (
            FromBroker(HostLost("h9", 11.0, "h1", 3, 2, wall), mono),
            lambda engine, sent: [a.title for a in sent] == ["Host lost: h9"] and "3 messages" in sent[0].content,
        ),
        "host back": (
            FromBroker(HostBack("h9", 20.0, 2, wall), mono),
            lambda engine, sent: [a.title for a in sent] == ["Host back: h9"] and "2 workers" in sent[0].content,
        ),
        "broker failover": (
            FromBroker(BrokerFailover("nietest", "10.0.0.1:6379", "10.0.0.2:6379", 1, "h1", wall), mono),
            lambda engine, sent: (
                [a.title for a in sent] == ["Broker failover: nietest now at 10.0.0.2:6379 (was 10.0.0.1:6379)"]
            ),
        ),
        "listener restart": (
            ListenerRestart(pid=77, started_at=wall - 30, restarts=1, mono=mono),
            lambda engine, sent: (
                [a.kind for a in sent] == ["listener_restart"] and "(pid 77, up since" in sent[0].content
            ),
        ),
    }


def test_the_inputs_cover_every_kind() -> None:
    inputs = [i for i, _ in _inputs(Clock()).values()]
    assert {type(i) for i in inputs} == set(typing.get_args(Input))
    reported = typing.get_args(typing.get_type_hints(FromBroker)["event"])
    assert {type(i.event) for i in inputs if isinstance(i, FromBroker)} == set(reported)


@pytest.mark.parametrize("name", list(_inputs(Clock())))
def test_engine_handle_takes_each_kind_of_input(name: str) -> None:
    sent: list[Alert] = []
    engine, clock = make_engine(sent, NIETEST_ALERT_COALESCE_SECONDS="0"), Clock()
    given, took = _inputs(clock)[name]
    engine.handle(given)
    engine.tick(clock.mono)
    assert took(engine, sent), (name, [(a.kind, a.content) for a in sent])


def test_the_shutdown_drain_hands_every_kind_of_input_to_the_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The drain once knew only three kinds: a listener stopped right after its start dropped the
    report of its predecessor's unclean end (and the broker and snapshot inputs) without a word."""
    monkeypatch.delenv("SUPERVISOR_SERVER_URL", raising=False)
    settings = load({"NIETEST_HOME": str(tmp_path), "NIETEST_ALERT_COALESCE_SECONDS": "10"})
    listener = Listener(settings, io.BytesIO(), -1)
    try:
        sent: list[Alert] = []
        handled: list[Input] = []
        engine = listener.engine
        engine.send = sent.append  # not the Feishu client, nor the process's metrics
        real_handle = engine.handle
        monkeypatch.setattr(engine, "handle", lambda event: (handled.append(event), real_handle(event)))
        inputs = [i for i, _ in _inputs(Clock()).values()]
        for given in inputs:
            listener.inbox.put(given)
        listener.drain()
        engine.flush_all()
    finally:
        listener.redis.close()
    assert handled == inputs and listener.inbox.empty()
    assert {a.kind for a in sent} == {
        "fatal",
        "unresponsive",
        "failure_run",
        "queue_recovered",
        "host_lost",
        "host_back",
        "broker_failover",
        "listener_restart",
    }
    assert engine.procs["subtask:subtask_03"].pid == 43 and engine.broker_down_since is not None


# --- supervisord's log, process logs, the marker -------------------------------------------------


def _supervisord_line(event: str, at: float) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at * 1000) % 1000:03d}Z"
    return json.dumps({"timestamp": stamp, "level": "warning", "event": event, "logger": "supervisord"}) + "\n"


def test_exit_log_pairs_events_with_exited_lines_across_rotation(tmp_path: Path) -> None:
    path = tmp_path / "supervisord.log"
    now = time.time()
    path.write_text(_supervisord_line("exited: subtask_00 (exit status 1; not expected)", now - 600))  # old
    exits = ExitLog(path)
    assert exits.take("subtask_00", now) is None  # an exit older than a minute is not paired
    with path.open("a") as f:
        f.write(_supervisord_line("spawned: 'subtask_00' with pid 5", now))
        f.write(_supervisord_line("exited: subtask_00 (terminated by SIGKILL; not expected)", now))
        f.write(_supervisord_line("exited: master_00 (exit status 0; not expected)", now))
    assert exits.take("subtask_00", now) == "terminated by SIGKILL"
    assert exits.take("subtask_00", now) is None
    # rotation: the rest of the old file is read from supervisord.log.1, then the new file
    with path.open("a") as f:
        f.write(_supervisord_line("exited: subtask_01 (terminated by SIGSEGV (core dumped); not expected)", now))
    path.rename(tmp_path / "supervisord.log.1")
    path.write_text(_supervisord_line("exited: subtask_01 (exit status 3; not expected)", now))
    assert exits.take("subtask_01", now) == "terminated by SIGSEGV (core dumped)"
    assert exits.take("subtask_01", now) == "exit status 3"
    assert exits.take("master_00", now) == "exit status 0"


def test_log_lines_show_event_texts_and_never_secrets(tmp_path: Path) -> None:
    set_secrets(["tok-Log-SECRET-1234"])
    try:
        record = {
            "timestamp": "2026-11-28T02:45:46.970Z",
            "level": "critical",
            "event": "unhandled exception",
            "exception": [{"exc_type": "RuntimeError", "exc_value": "no token tok-Log-SECRET-1234", "frames": []}],
        }
        assert (
            render_log_line(json.dumps(record)) == "02:45:46 critical unhandled exception [RuntimeError: no token ***]"
        )
        assert render_log_line("Traceback (most recent call last): redis://:pw1234@h/0") == (
            "Traceback (most recent call last): redis://:***@h/0"
        )
        path = tmp_path / "w.log"
        path.write_text("".join(json.dumps({**record, "event": f"line {i}"}) + "\n" for i in range(40)))
        tail = log_tail(path, lines=5)
        assert [line.split(" ")[3] for line in tail] == ["35", "36", "37", "38", "39"]
    finally:
        set_secrets([])


def test_marker_tells_an_unclean_end_from_a_clean_stop(tmp_path: Path) -> None:
    marker = Marker(tmp_path / "alerts.running", window=300)
    assert marker.start(1000.0) == (None, 0)
    marker.clean_stop()
    assert marker.start(1100.0) == (None, 0)
    previous, restarts = Marker(tmp_path / "alerts.running", window=300).start(1200.0)  # the first was "killed"
    assert previous is not None and previous["started_at"] == 1100.0 and restarts == 1
    previous, restarts = Marker(tmp_path / "alerts.running", window=300).start(1300.0)
    assert restarts == 2
    previous, restarts = Marker(tmp_path / "alerts.running", window=300).start(1700.0)
    assert restarts == 1  # the earlier restarts left the window


# --- the protocol, spoken by a real `nietest alerts` process -------------------------------------


def _envelope(serial: int, eventname: str, payload: str) -> bytes:
    header = f"ver:3.0 server:supervisor serial:{serial} pool:alerts poolserial:{serial} eventname:{eventname}"
    return f"{header} len:{len(payload)}\n{payload}".encode()


@pytest.fixture
def listener_home(short_tmp: Path) -> Path:
    for sub in ("run", "log", "data"):
        (short_tmp / sub).mkdir()
    return short_tmp


def test_stdout_carries_nothing_but_the_protocol(listener_home: Path) -> None:
    env = clean_env(NIETEST_HOME=str(listener_home), NIETEST_ALERT_COALESCE_SECONDS="0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "nietest_daemon", "alerts"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:

        def expect(data: bytes) -> None:
            assert proc.stdout.read(len(data)) == data

        events = [
            ("PROCESS_STATE_STARTING", "processname:subtask_00 groupname:subtask from_state:STOPPED tries:0"),
            ("PROCESS_STATE_RUNNING", "processname:subtask_00 groupname:subtask from_state:STARTING pid:4242"),
            ("TICK_5", "when:1800000000"),
            # an alert: with no webhook it is logged (to stderr), never printed
            ("PROCESS_STATE_EXITED", "processname:subtask_00 groupname:subtask from_state:RUNNING expected:0 pid:4242"),
            ("PROCESS_STATE_FATAL", "processname:master_00 groupname:master from_state:BACKOFF"),
            # a payload with multi-byte characters: supervisord's len counts characters
            ("PROCESS_GROUP_ADDED", "groupname:größe"),
        ]
        expect(b"READY\n")
        for serial, (name, payload) in enumerate(events):
            started = time.monotonic()
            proc.stdin.write(_envelope(serial, name, payload))
            proc.stdin.flush()
            expect(b"RESULT 2\nOK")
            expect(b"READY\n")
            assert time.monotonic() - started < 1.0  # acknowledged at once
        log_path = listener_home / "stderr.json"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        log_path.write_bytes(err)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert out == b""  # nothing after the last READY
    records = [json.loads(line) for line in err.decode().splitlines()]  # every stderr line is JSON
    assert all(r["process"] == "alerts" for r in records)
    kinds = [r.get("kind") for r in records if r["event"] == "alert"]
    assert kinds == ["restart", "fatal"]
    assert any(r["event"] == "feishu webhook not configured; message logged only" for r in records)
    assert not (listener_home / "run" / MARKER_NAME).exists()  # a clean stop removes the marker


def test_listener_exits_cleanly_when_supervisord_goes_away(listener_home: Path) -> None:
    env = clean_env(NIETEST_HOME=str(listener_home))
    proc = subprocess.Popen(
        [sys.executable, "-m", "nietest_daemon", "alerts"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.read(6) == b"READY\n"
    proc.stdin.close()
    assert proc.wait(20) == 0
    assert proc.stdout.read() == b""
    wait_for(lambda: not (listener_home / "run" / MARKER_NAME).exists(), 5)


def test_unparsable_header_makes_the_listener_exit_for_a_restart(listener_home: Path) -> None:
    env = clean_env(NIETEST_HOME=str(listener_home))
    proc = subprocess.run(
        [sys.executable, "-m", "nietest_daemon", "alerts"],
        env=env,
        input=b"this is not a header\n",
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode != 0 and proc.stdout == b"READY\n"
    assert "listener protocol error" in proc.stderr.decode()
    assert (listener_home / "run" / MARKER_NAME).exists()  # the next one will report the restart


def test_alerts_command_is_documented() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "nietest_daemon", "alerts", "--help"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0 and "event listener" in result.stdout


# --- the Feishu client as the listener uses it ----------------------------------------------------


def test_closing_while_the_webhook_hangs_logs_the_alert_in_flight() -> None:
    """The listener exits right after close(): an alert still waiting for its answer must be logged."""
    import structlog

    from nietest_daemon.clients.feishu import FeishuClient
    from nietest_daemon.testing.fake_feishu import FakeFeishu, Hang

    with FakeFeishu(secret="s3cret-x") as hook, structlog.testing.capture_logs() as events:
        hook.script(Hang(30))
        client = FeishuClient(
            hook.url, "s3cret-x", None, host="h", timeout=20, deadline=25, max_attempts=1, trust_env=False
        )
        assert client.submit_card("Crash loop: master:master_00", "the content that must not be lost", "critical")
        wait_for(lambda: hook.received, 5)
        started = time.monotonic()
        client.close(timeout=0.5)
        assert time.monotonic() - started < 3
    lost = [e for e in events if e["event"] == "feishu message not delivered"]
    assert [e["content"] for e in lost] == ["the content that must not be lost"]
    # The hook is gone: the sender thread's one attempt fails now. Let it end here, not log into a later test.
    sender = client._worker
    assert sender is not None
    sender.join(10)
    assert not sender.is_alive()
