"""Files the alerts listener reads and writes beside supervisord: supervisord's own log (for the
exit status of a process, which the PROCESS_STATE event does not carry) and its marker file."""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nietest_daemon.core.logs import get_logger
from nietest_daemon.internals.supervisor import EXITED_LINE

log = get_logger(__name__)

#: The marker's file name in the run dir.
MARKER_NAME = "alerts.running"


def _parse_timestamp(value: str) -> float | None:
    for fmt, tz in (("%Y-%m-%dT%H:%M:%S.%fZ", UTC), ("%Y-%m-%d %H:%M:%S,%f", None)):
        try:
            parsed = datetime.strptime(value, fmt)
        except ValueError:
            continue
        return parsed.replace(tzinfo=tz).timestamp() if tz else parsed.timestamp()
    return None


class ExitLog:
    """Follows supervisord.log for its `exited: NAME (terminated by SIGKILL; not expected)` lines.

    supervisord writes that line before the EXITED/BACKOFF event reaches any listener, so
    `take(name)` right after the event finds it. The event itself carries no exit status.
    Lines are consumed in order per process; lines older than `max_age` are forgotten (so a
    restarted listener does not pair a new event with an exit its predecessor reported).
    """

    PRIME_BYTES = 64 * 1024

    def __init__(self, path: Path, max_age: float = 60.0) -> None:
        self.path = path
        self.max_age = max_age
        self._inode: int | None = None
        self._offset = 0
        self._partial = b""
        self._pending: dict[str, deque[tuple[float, str]]] = {}

    def take(self, name: str, now_wall: float) -> str | None:
        """The description of `name`'s oldest unreported exit, e.g. "terminated by SIGKILL"."""
        try:
            self._read_new(now_wall)
        except OSError as exc:
            log.warning("cannot read supervisord's log", path=str(self.path), error=str(exc))
        entries = self._pending.get(name)
        while entries:
            at, desc = entries.popleft()
            if at >= now_wall - self.max_age:
                return desc
        return None

    def _read_new(self, now_wall: float) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        chunks: list[bytes] = []
        if self._inode is None:  # first read: the recent past only
            self._offset = max(0, st.st_size - self.PRIME_BYTES)
        elif st.st_ino != self._inode or st.st_size < self._offset:
            # rotated: finish the old file (now supervisord.log.1) if it is still there, then start over
            rotated = self.path.with_name(self.path.name + ".1")
            with contextlib.suppress(OSError):
                if os.stat(rotated).st_ino == self._inode:
                    with open(rotated, "rb") as old:
                        old.seek(self._offset)
                        chunks.append(old.read())
            self._offset = 0
        with open(self.path, "rb") as current:
            current.seek(self._offset)
            chunks.append(current.read())
            self._offset = current.tell()
        self._inode = st.st_ino
        data = self._partial + b"".join(chunks)
        lines = data.split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            self._add(raw.decode("utf-8", "replace"), now_wall)

    def _add(self, line: str, now_wall: float) -> None:
        if "exited: " not in line:
            return
        at: float | None = None
        text = line
        if line.startswith("{"):
            try:
                record = json.loads(line)
                text = str(record.get("event", ""))
                at = _parse_timestamp(str(record.get("timestamp", "")))
            except ValueError:
                pass
        else:
            at = _parse_timestamp(line[:23])
        match = EXITED_LINE.search(text)
        if not match:
            return
        desc = re.sub(r";\s*(not )?expected$", "", match.group("desc")).strip()
        self._pending.setdefault(match.group("name"), deque(maxlen=100)).append((at or now_wall, desc))


class Marker:
    """`alerts.running` in the run dir: present while a listener runs, removed by a clean stop.

    Found at start, it means the previous listener was killed or crashed. It also keeps the
    times of recent unclean restarts, so a listener that keeps dying is called a crash loop.
    """

    def __init__(self, path: Path, window: float) -> None:
        self.path = path
        self.window = window

    def start(self, now_wall: float) -> tuple[dict[str, Any] | None, int]:
        """Write ours; return the previous listener's record if it did not stop cleanly, and the restart count."""
        previous: dict[str, Any] | None = None
        with contextlib.suppress(OSError, ValueError):
            loaded = json.loads(self.path.read_text())
            if isinstance(loaded, dict):
                previous = loaded
        restarts: list[float] = []
        if previous is not None:
            restarts = [float(t) for t in previous.get("restarts", []) if float(t) > now_wall - self.window]
            restarts.append(now_wall)
        record = {"pid": os.getpid(), "started_at": now_wall, "restarts": restarts}
        try:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(record))
            tmp.replace(self.path)
        except OSError as exc:
            log.warning("cannot write the listener marker", path=str(self.path), error=str(exc))
        return previous, len(restarts)

    def clean_stop(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
