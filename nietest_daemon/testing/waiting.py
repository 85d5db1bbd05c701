"""`wait_for`: the one polling helper of the tests and benches (a condition, with a deadline)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class WaitTimeout(AssertionError, TimeoutError):
    """The condition did not hold by the deadline: a failed assertion in a test, a timeout in a bench."""


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 20.0,
    what: str = "",
    *,
    interval: float = 0.1,
    ignore: tuple[type[BaseException], ...] = (Exception,),
) -> Any:
    """Poll `predicate` until it returns a truthy value, and return that value.

    An exception of a type in `ignore` counts as "not yet" (a socket not made yet, a daemon not
    answering yet); the last value or exception seen is in the WaitTimeout raised at the deadline.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
        except ignore as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what or predicate}: last={last!r}")
        time.sleep(interval)
