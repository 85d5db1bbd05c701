"""The one exponential backoff of nietest, and the one Retry-After parser.

Every retry loop (the Nieta and Feishu clients, the pipeline's create and poll retries, the
broker-error retries, waiting for the broker) takes its delays from `backoff()`, so the shape of
a backoff is decided here once.
"""

from __future__ import annotations

import email.utils
import math
import random
from datetime import UTC, datetime

#: Multiplicative jitter ranges. EQUAL spreads a delay over its upper half ("equal jitter": never
#: less than half, so a burst of clients cannot all retry at once); SPREAD by ±20 %.
NO_JITTER = (1.0, 1.0)
EQUAL = (0.5, 1.0)
SPREAD = (0.8, 1.2)
#: ±10 %: timers of several processes (the sweepers) drift apart instead of firing together.
DRIFT = (0.9, 1.1)


def jittered(delay: float, jitter: tuple[float, float]) -> float:
    """`delay` multiplied by a random factor drawn from `jitter` (a (low, high) range)."""
    low, high = jitter
    return delay if low == high == 1.0 else delay * random.uniform(low, high)


def backoff(attempt: int, *, base: float, cap: float = math.inf, jitter: tuple[float, float] = NO_JITTER) -> float:
    """Seconds to wait before retry number `attempt` (0 for the first): `base * 2**attempt`, at most
    `cap`, then multiplied by a random factor drawn from `jitter`."""
    return jittered(min(cap, base * 2 ** min(attempt, 64)), jitter)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds from an HTTP Retry-After value (delta-seconds or an HTTP date); None when absent or
    unusable. Never negative."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)
