"""How every long-running nietest program learns it should stop: SIGTERM or SIGINT, once.

supervisord stops a program with SIGTERM (a terminal's Ctrl-C sends SIGINT). Each program either
polls the request (`stop.is_set()`, `stop.wait(t)`) or, when its main thread blocks in a read or
`serve_forever` that an event cannot wake, asks for `interrupt=True`: the handler then also raises
`SystemExit(0)` in the main thread, which the program catches to shut down.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest(threading.Event):
    """An event set once a stop signal arrived (or the program asked itself to stop).

    `signal_name` names the first signal, None when the program set it itself.
    """

    def __init__(self) -> None:
        super().__init__()
        self.signum: int | None = None

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None


def install_stop_signals(
    *,
    interrupt: bool = False,
    ignore_hangup: bool = False,
    on_stop: Callable[[StopRequest], None] | None = None,
) -> StopRequest:
    """Route SIGTERM and SIGINT to a new `StopRequest`; call from the main thread.

    `interrupt`: also raise SystemExit(0) in the main thread. `ignore_hangup`: ignore SIGHUP (a
    listener must not die of its controlling terminal closing). `on_stop` runs in the handler,
    after the request is set (keep it to a log line).
    """
    stop = StopRequest()

    def handle(signum: int, _frame: FrameType | None) -> None:
        if stop.signum is None:
            stop.signum = signum
        stop.set()
        if on_stop is not None:
            on_stop(stop)
        if interrupt:
            raise SystemExit(0)

    for signum in STOP_SIGNALS:
        signal.signal(signum, handle)
    if ignore_hangup:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return stop
