"""supervisord's event-listener protocol, for the listeners it runs (`alerts`, `watchdog`).

The listener writes READY, supervisord sends one event (a header line with `len`, then that
many characters of payload), the listener answers RESULT 2\nOK, and so on until stdin ends.
Only the listener's protocol may write to its real stdout; see `open_protocol_streams`.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Callable
from typing import BinaryIO

from nietest_daemon.core.logs import get_logger

log = get_logger(__name__)


def parse_tokens(text: str) -> dict[str, str]:
    """`a:1 b:2` (supervisor's header and PROCESS_STATE payload format) as a dict."""
    fields: dict[str, str] = {}
    for token in text.split():
        key, sep, value = token.partition(":")
        if sep:
            fields[key] = value
    return fields


def read_chars(stream: BinaryIO, count: int) -> str:
    """Read a payload of `count` characters (supervisord counts characters, not bytes)."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    parts: list[str] = []
    have = 0
    while have < count:
        chunk = stream.read(count - have)  # every character is at least one byte: never reads past it
        if not chunk:
            raise EOFError("stdin closed in the middle of an event")
        text = decoder.decode(chunk)
        parts.append(text)
        have += len(text)
    return "".join(parts)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def serve_protocol(
    stdin: BinaryIO,
    out_fd: int,
    handle: Callable[[dict[str, str], str], None],
) -> None:
    """READY, one event, hand it over, RESULT 2\\nOK; again, until stdin ends (then returns)."""
    while True:
        _write_all(out_fd, b"READY\n")
        line = stdin.readline()
        if not line.endswith(b"\n"):
            return  # EOF: supervisord is gone
        headers = parse_tokens(line.decode("utf-8", "replace"))
        try:
            length = int(headers["len"])
        except (KeyError, ValueError):
            # Without a length the stream cannot be resynchronised: let supervisord restart us.
            raise ProtocolError(f"event header without a length: {line[:200]!r}") from None
        payload = read_chars(stdin, length)
        try:
            handle(headers, payload)
        except Exception:
            log.exception("event handling failed", eventname=headers.get("eventname"))
        _write_all(out_fd, b"RESULT 2\nOK")


class ProtocolError(RuntimeError):
    pass


def open_protocol_streams() -> tuple[BinaryIO, int]:
    """The protocol's stdin and stdout, taken away from everything else in this process: fd 1 then
    goes to the log (stderr) and fd 0 reads nothing, so no stray print or read can corrupt it."""
    out_fd = os.dup(1)
    os.dup2(2, 1)
    stdin = os.fdopen(os.dup(0), "rb")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return stdin, out_fd
