"""The daemon under systemd's Type=notify: this test plays systemd's side on a NOTIFY_SOCKET.

supervisord (internals/supervisor.py, `install_systemd_notify`) sends READY=1 once every
autostarted program is RUNNING, STATUS= lines with the counts, WATCHDOG=1 from its main loop
every half WATCHDOG_USEC, and STOPPING=1 when it stops. A stopped (hung) main loop sends no ping.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from supervisor.states import ProcessStates, SupervisorStates

from nietest_daemon.internals.supervisor import SystemdNotifier
from nietest_daemon.testing.daemon import Daemon
from nietest_daemon.testing.waiting import wait_for


class FakeSystemd:
    """A NOTIFY_SOCKET: every datagram, with the time it arrived."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.received: list[tuple[float, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._listen, daemon=True)
        self.thread.start()

    def _listen(self) -> None:
        while not self.stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            for line in data.decode().splitlines():
                self.received.append((time.monotonic(), line))

    def lines(self, prefix: str) -> list[tuple[float, str]]:
        return [(t, line) for t, line in list(self.received) if line.startswith(prefix)]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def systemd(short_tmp: Path) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(short_tmp / "notify.sock")
    yield fake
    fake.close()


def test_notifier_tells_ready_once_status_on_change_and_stopping(systemd: FakeSystemd) -> None:
    def proc(state: int, autostart: bool = True) -> SimpleNamespace:
        return SimpleNamespace(get_state=lambda: state, config=SimpleNamespace(autostart=autostart))

    workers = {"subtask_00": proc(ProcessStates.STARTING), "subtask_01": proc(ProcessStates.RUNNING)}
    groups = {"subtask": SimpleNamespace(processes=workers), "off": SimpleNamespace(processes={"x": proc(0, False)})}
    supervisor = SimpleNamespace(process_groups=groups, options=SimpleNamespace(mood=SupervisorStates.RUNNING))
    notifier = SystemdNotifier(str(systemd.path), watchdog_usec=None)
    notifier.update(supervisor)
    notifier.update(supervisor)  # nothing changed: nothing sent
    workers["subtask_00"] = proc(ProcessStates.RUNNING)
    notifier.update(supervisor)
    supervisor.options.mood = SupervisorStates.SHUTDOWN
    notifier.update(supervisor)
    expected = [
        "STATUS=1 of 2 processes RUNNING, 1 STARTING",
        "STATUS=2 of 2 processes RUNNING",
        "READY=1",
        "STOPPING=1",
    ]
    wait_for(lambda: [line for _, line in systemd.received] == expected, 5, what=f"{expected}")
    assert not systemd.lines("WATCHDOG=1")  # no WATCHDOG_USEC: no pings


@pytest.mark.e2e
def test_ready_status_watchdog_and_stopping(make_daemon: Callable[..., Daemon], systemd: FakeSystemd) -> None:
    daemon = make_daemon(NOTIFY_SOCKET=str(systemd.path), WATCHDOG_USEC="2000000")
    daemon.start(wait=False)
    wait_for(lambda: systemd.lines("READY=1"), 60, what="READY=1")
    # READY came once every program was RUNNING: supervisord's own view says so right after it.
    infos = daemon.groups()
    assert infos and all(p["state"] == "RUNNING" for ps in infos.values() for p in ps), infos
    ready_at = systemd.lines("READY=1")[0][0]
    statuses = [line for _, line in systemd.lines("STATUS=")]
    total = sum(len(ps) for ps in infos.values())
    assert f"STATUS={total} of {total} processes RUNNING" in statuses
    assert any("STARTING" in s for s in statuses)  # the counts as they changed, before READY
    assert len(systemd.lines("READY=1")) == 1

    # The watchdog: a ping at least every second (half of WATCHDOG_USEC) ...
    wait_for(lambda: len([t for t, _ in systemd.lines("WATCHDOG=1") if t > ready_at]) >= 3, 10, what="pings")
    pings = [t for t, _ in systemd.lines("WATCHDOG=1") if t > ready_at]
    assert max(b - a for a, b in zip(pings, pings[1:], strict=False)) < 1.9
    # ... and none while supervisord's loop is stopped (what a hang looks like to systemd).
    supervisord_pid = daemon.proc.pid  # `nietest daemon` execs supervisord: the same pid
    os.kill(supervisord_pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    time.sleep(3)
    silent = [t for t, _ in systemd.lines("WATCHDOG=1") if t > stopped_at + 0.2]
    os.kill(supervisord_pid, signal.SIGCONT)
    assert silent == []
    resumed = time.monotonic()
    wait_for(lambda: [t for t, _ in systemd.lines("WATCHDOG=1") if t > resumed], 5, what="pings again")

    assert daemon.stop() == 0
    assert systemd.lines("STOPPING=1")
