"""etc/rsyslog-nietest.conf, for real: rsyslogd tails a real daemon's log dir while supervisord
rotates the files, and forwards every line to a TCP collector on 127.0.0.1.

The config is the shipped file with only its paths, the collector's address and the retry
interval replaced; rsyslogd runs with `-f` on it alone (never /etc/rsyslog.conf), its state,
queue and pid files in a temporary directory, and its own messages kept in a file there
(processInternalMessages: nothing goes to the system's log socket).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nietest_daemon.core.logs import MAX_LINE_BYTES
from nietest_daemon.testing.daemon import ROOT, Daemon
from nietest_daemon.testing.waiting import wait_for

pytestmark = pytest.mark.e2e

CONF = ROOT / "etc" / "rsyslog-nietest.conf"
RSYSLOGD = shutil.which("rsyslogd") or next(
    (p for p in ("/usr/sbin/rsyslogd", "/sbin/rsyslogd") if os.access(p, os.X_OK)), None
)
if RSYSLOGD is None:
    pytest.skip("rsyslogd is not installed (apt-get install rsyslog)", allow_module_level=True)

MAX_BYTES = 64 * 1024
BACKUPS = 10  # enough that no file is rotated away (deleted) during a test: everything is comparable
LOG_FILE = re.compile(r".+\.log(\.\d+)?")


class Collector:
    """A line-oriented TCP log collector on 127.0.0.1, in threads. `down()` closes it gracefully
    (no new connections; open ones get a FIN and are read until the sender closes them), `up()`
    listens again on the same port."""

    def __init__(self) -> None:
        self.port = 0
        self._lines: list[bytes] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []

    def up(self) -> Collector:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        listener.settimeout(0.1)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._spawn(self._accept, listener)
        return self

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            # shutdown() first: close() alone leaves the socket listening while the accept thread is
            # inside accept(), and a connection that lands in the backlog then is reset unread.
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.down()
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()
        for thread in self._threads:
            thread.join(5)

    def lines(self) -> list[bytes]:
        with self._lock:
            return list(self._lines)

    def connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            with self._lock:
                self._conns.append(conn)
            self._spawn(self._read, conn)

    def _read(self, conn: socket.socket) -> None:
        pending = b""
        while True:
            try:
                data = conn.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                break
            *complete, pending = (pending + data).split(b"\n")
            with self._lock:
                self._lines.extend(complete)
        with self._lock:
            if pending:  # a message cut short: recorded as is, so the comparison shows it
                self._lines.append(pending)
            if conn in self._conns:
                self._conns.remove(conn)
        conn.close()


class Rsyslog:
    """rsyslogd -n on the shipped config rendered for a temporary log dir and collector."""

    def __init__(self, workdir: Path, log_dir: Path, port: int) -> None:
        self.workdir = workdir
        self.spool = workdir / "spool"
        self.spool.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "rsyslog.conf"
        self.pidfile = workdir / "rsyslogd.pid"
        self.output = workdir / "rsyslogd.out"
        self.internal = workdir / "rsyslog-internal.log"
        self.proc: subprocess.Popen[bytes] | None = None
        text = CONF.read_text()
        for old, new in {
            '"/var/log/nietest/*.log"': f'"{log_dir}/*.log"',
            '"/var/spool/rsyslog"': f'"{self.spool}"',
            'target="logs.example.internal"': 'target="127.0.0.1"',
            'port="5140"': f'port="{port}"',
            'action.resumeInterval="10"': 'action.resumeInterval="1"',
        }.items():
            assert old in text, f"{CONF.name} no longer contains {old}"
            text = text.replace(old, new)
        code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
        assert "/var/" not in code and "/etc/" not in code, "a system path is left in the rendered config"
        text = (
            'global(processInternalMessages="on")\n'
            + text
            + f'\n# test only: rsyslogd\'s own messages\n*.* action(type="omfile" file="{self.internal}")\n'
        )
        self.conf.write_text(text)
        self.env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID")}

    def validate(self) -> None:
        result = subprocess.run(
            [RSYSLOGD, "-N1", "-f", str(self.conf)], capture_output=True, text=True, timeout=30, env=self.env
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "error" not in (result.stdout + result.stderr).lower(), result.stdout + result.stderr

    def start(self) -> Rsyslog:
        self.pidfile.unlink(missing_ok=True)
        with open(self.output, "ab") as out:
            self.proc = subprocess.Popen(
                [RSYSLOGD, "-n", "-f", str(self.conf), "-i", str(self.pidfile)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=self.env,
                cwd=self.workdir,
            )
        wait_for(lambda: self.pidfile.exists() or self.proc.poll() is not None, 10, what="rsyslogd pid file")
        assert self.proc.poll() is None, f"rsyslogd exited: {self.diagnostics()}"
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM and wait: rsyslogd saves the imfile offsets and the undelivered queue, then exits 0."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        assert code == 0, f"rsyslogd exited {code}: {self.diagnostics()}"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def diagnostics(self) -> str:
        parts = []
        for path in (self.output, self.internal):
            if path.exists():
                parts.append(f"--- {path.name}:\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)


# --- helpers -------------------------------------------------------------------------------------


def file_lines(log_dir: Path) -> Counter[bytes]:
    """Every complete line in the log dir's files (x.log and its backups x.log.N)."""
    lines: Counter[bytes] = Counter()
    for path in log_dir.iterdir():
        if LOG_FILE.fullmatch(path.name):
            data = path.read_bytes()
            lines.update(data[: data.rfind(b"\n") + 1].splitlines())
    return lines


def wait_shipped(collector: Collector, log_dir: Path, rsyslog: Rsyslog, timeout: float = 20.0) -> Counter[bytes]:
    """Until every line in the files has reached the collector; returns what is in the files."""

    def everything_received() -> Counter[bytes] | None:
        in_files = file_lines(log_dir)
        return None if in_files - Counter(collector.lines()) else in_files

    try:
        return wait_for(everything_received, timeout, interval=0.2, what="the collector to have every line")
    except AssertionError as exc:
        missing = file_lines(log_dir) - Counter(collector.lines())
        where = [
            f"{path.name}:{number}"
            for path in sorted(log_dir.iterdir())
            if LOG_FILE.fullmatch(path.name)
            for number, line in enumerate(path.read_bytes().splitlines(), 1)
            if line in missing
        ]
        raise AssertionError(
            f"{exc}; {sum(missing.values())} lines missing, at {where[:20]}\n{rsyslog.diagnostics()}"
        ) from None


def start(daemon: Daemon) -> None:
    daemon.start()
    wait_for(daemon.redis.ping, 20, what="the broker to answer")


def chatter(daemon: Daemon, batches: list[tuple[str, int, int]]) -> None:
    """Workers write log lines (queue, lines, bytes each); returns when they all have."""
    before = sum(t.startswith("chatter:") for t in daemon.done())
    for queue, lines, size in batches:
        daemon.send(queue, "chatter", lines, size)
    wait_for(
        lambda: sum(t.startswith("chatter:") for t in daemon.done()) >= before + len(batches),
        30,
        what="chatter done",
    )


def assert_same_lines(received: list[bytes], in_files: Counter[bytes], log_dir: Path) -> None:
    assert not [p.name for p in log_dir.iterdir() if p.name.endswith(f".log.{BACKUPS}")], "a backup was deleted"
    for line in received:
        assert isinstance(json.loads(line), dict), line[:200]
    got = Counter(received)
    lost, extra = in_files - got, got - in_files
    duplicated = {line: n for line, n in got.items() if n > 1 and n > in_files[line]}
    assert not lost, f"{sum(lost.values())} lines lost, e.g. {next(iter(lost))[:200]!r}"
    assert not duplicated, f"{len(duplicated)} lines duplicated, e.g. {next(iter(duplicated))[:200]!r}"
    assert not extra, f"{sum(extra.values())} lines not in any file, e.g. {next(iter(extra))[:200]!r}"


def rotations(log_dir: Path, name: str) -> int:
    return max((int(p.name.rsplit(".", 1)[1]) for p in log_dir.glob(f"{name}.log.*")), default=0)


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def shipper(make_daemon: Callable[..., Daemon]) -> Iterator[tuple[Daemon, Collector, Rsyslog]]:
    """A daemon (not started), a collector (up) and rsyslogd (running, validated) on its log dir."""
    daemon = make_daemon(NIETEST_LOG_MAX_BYTES=str(MAX_BYTES), NIETEST_LOG_BACKUPS=str(BACKUPS))
    log_dir = daemon.home / "log"
    log_dir.mkdir()
    collector = Collector().up()
    rsyslog = Rsyslog(daemon.home / "rsyslog", log_dir, collector.port)
    rsyslog.validate()
    rsyslog.start()
    try:
        yield daemon, collector, rsyslog
    finally:
        rsyslog.kill()
        collector.close()


# --- tests ---------------------------------------------------------------------------------------


def test_config_tails_the_log_dir_and_forwards_lines_as_is() -> None:
    text = CONF.read_text()
    assert 'mode="inotify"' in text and 'file="/var/log/nietest/*.log"' in text
    assert 'string="%msg%\\n"' in text
    assert 'protocol="tcp"' in text and 'queue.filename="nietest_fwd"' in text and 'queue.saveOnShutdown="on"' in text
    size = re.search(r'maxMessageSize="(\d+)k"', text)
    assert size and int(size.group(1)) * 1024 > 16 * 1024


def test_lines_arrive_byte_for_byte(short_tmp: Path) -> None:
    """What the renderer can write (UTF-8, DEL, U+2028, spaces at the ends, a 16 KiB line) arrives
    exactly as written, one message per line."""
    log_dir = short_tmp / "log"
    log_dir.mkdir()
    collector = Collector().up()
    rsyslog = Rsyslog(short_tmp / "rsyslog", log_dir, collector.port)
    rsyslog.validate()
    rsyslog.start()
    try:
        texts = ["é 中文 🎉", "del\x7fchar", "ls\u2028ps\u2029", " lead", "trail  ", 'back\\slash "q"', "%msg% $!x"]
        lines = [json.dumps({"event": text}, ensure_ascii=False).encode() for text in texts]
        lines.append(b'{"event": "' + b"y" * (MAX_LINE_BYTES - 13) + b'"}')
        assert len(lines[-1]) == MAX_LINE_BYTES
        with open(log_dir / "unit.log", "ab") as out:
            out.write(b"".join(line + b"\n" for line in lines))
        wait_for(lambda: len(collector.lines()) >= len(lines), 10, what="the lines at the collector")
        rsyslog.stop()
        assert collector.lines() == lines
    finally:
        rsyslog.kill()
        collector.close()


def test_every_line_shipped_once_across_rotations(shipper: tuple[Daemon, Collector, Rsyslog]) -> None:
    daemon, collector, rsyslog = shipper
    log_dir = daemon.home / "log"
    start(daemon)
    # Rounds of two workers writing at once, ~50 KB into master_00.log (1 KB lines and one near
    # the 16 KiB cap) and ~25 KB into subtask_ops_00.log, each shipped before the next round: the
    # files rotate while rsyslogd tails them, at most once per round. (imfile opens each new x.log
    # by name; a file written full and rotated away again within milliseconds, before imfile got
    # to it, would be skipped. That takes NIETEST_LOG_MAX_BYTES in a few ms: not a real setting.)
    for _ in range(7):
        chatter(daemon, [("master", 30, 1000), ("master", 1, 15000), ("subtask_ops", 20, 1000)])
        wait_shipped(collector, log_dir, rsyslog)
    assert rotations(log_dir, "master_00") >= 4 and rotations(log_dir, "subtask_ops_00") >= 1
    daemon.stop()
    in_files = wait_shipped(collector, log_dir, rsyslog)
    rsyslog.stop()  # nothing more can arrive: compare everything
    received = collector.lines()
    assert max(len(line) for line in received) > 15000
    assert_same_lines(received, in_files, log_dir)


def test_nothing_lost_while_the_collector_is_down(shipper: tuple[Daemon, Collector, Rsyslog]) -> None:
    daemon, collector, rsyslog = shipper
    log_dir = daemon.home / "log"
    start(daemon)
    chatter(daemon, [("master", 40, 1000)])
    wait_shipped(collector, log_dir, rsyslog)
    shipped_before = len(collector.lines())

    collector.down()
    # While it is down: enough lines that master_00.log rotates (rounds of ~35 KB, so at most one
    # rotation each), then rsyslogd restarts: what it could not deliver must survive on disk.
    rotated = rotations(log_dir, "master_00")
    for _ in range(10):
        chatter(daemon, [("master", 30, 1000)])
        if rotations(log_dir, "master_00") >= rotated + 2:
            break
    assert rotations(log_dir, "master_00") >= rotated + 2
    wait_for(lambda: collector.connections() == 0, 10, what="rsyslogd to find the collector gone")
    rsyslog.stop()
    assert (rsyslog.spool / "nietest_fwd.qi").exists(), f"no disk queue saved on shutdown: {rsyslog.diagnostics()}"
    assert len(collector.lines()) == shipped_before, "lines reached a collector that was down"
    rsyslog.start()
    chatter(daemon, [("master", 20, 1000)])

    collector.up()
    daemon.stop()
    in_files = wait_shipped(collector, log_dir, rsyslog, timeout=30)
    rsyslog.stop()
    assert_same_lines(collector.lines(), in_files, log_dir)
