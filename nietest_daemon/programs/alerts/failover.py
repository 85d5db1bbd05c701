"""The failover watch: a thread of the alerts listener, with a `redis+sentinel://` broker URL only.

Once a second (CHECK_SECONDS) it asks the Sentinels which primary they name and its config epoch,
which Sentinel raises by one at every failover (`connection.ask_sentinels`, `sentinel_primary`).
When that differs from what it saw last, it records it on the broker (`record_primary`:
`keys.BROKER_PRIMARY`, "<epoch> <host:port>", a compare-and-set under WATCH): a newer epoch with
another address replaces the record, and the one listener whose write went through reports the
failover (`BrokerFailover`, the alert `broker failover`). Every daemon on the broker sees the
change; one card goes out. A Sentinel that lags behind still names the old primary at the older
epoch, which changes nothing; the first record (an empty key: a new broker, or one that lost its
data) is silent. A write that fails (the broker is failing over: the clients find the new primary
within seconds) is tried again at the next check.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import redis

from nietest_daemon.coordination import keys
from nietest_daemon.coordination.connection import as_text, ask_sentinels, sentinel_primary, sentinels_of
from nietest_daemon.coordination.events import BrokerFailover
from nietest_daemon.core.logs import get_logger
from nietest_daemon.core.redaction import redact
from nietest_daemon.core.settings import Settings

log = get_logger(__name__)

CHECK_SECONDS = 1.0
#: A failing check is logged again only after this long.
REPEAT_LOG_SECONDS = 60.0


def _recorded(raw: bytes | str | None) -> tuple[int, str] | None:
    """The (epoch, address) of the record, or None when there is none (or it is not one)."""
    if raw is None:
        return None
    epoch, _, address = as_text(raw).partition(" ")
    return (int(epoch), address) if epoch.isdigit() and address else None


def record_primary(client: redis.Redis, address: str, epoch: int) -> str | None:
    """Record `address` at `epoch` as the broker's primary, unless the record is as new already; the
    address it replaced when that was another one (a failover to report), else None."""
    with client.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(keys.BROKER_PRIMARY)
                old = _recorded(pipe.get(keys.BROKER_PRIMARY))
                if old is not None and old[0] >= epoch:
                    pipe.unwatch()
                    return None
                pipe.multi()
                pipe.set(keys.BROKER_PRIMARY, f"{epoch} {address}")
                pipe.execute()
            except redis.WatchError:
                continue  # another listener recorded meanwhile: read it again
            return old[1] if old is not None and old[1] != address else None


class FailoverWatch:
    """Watches the Sentinels for a new primary (see the module doc). `client`: the broker; `host`:
    this daemon's name, in the event."""

    def __init__(self, settings: Settings, client: redis.Redis, host: str | None = None) -> None:
        target = settings.sentinel
        if target is None:
            raise ValueError("the failover watch needs a redis+sentinel:// BROKER_REDIS_URL")
        self.settings = settings
        self.master = target.master
        self.client = client
        self.host = host or settings.host_name
        self.sentinels = sentinels_of(settings)  # kept: its connections are reused every second
        self.seen: tuple[str, int] | None = None  # (address, epoch) recorded last
        self._logged = 0.0

    def check(self) -> BrokerFailover | None:
        """One look: the failover to report, if this watch is the one that recorded it. Raises on a
        broker error (the record is then tried again at the next check)."""
        found = sentinel_primary(ask_sentinels(self.settings, self.sentinels), self.master)
        if found is None or found == self.seen:
            return None
        address, epoch = found
        old = record_primary(self.client, address, epoch)
        self.seen = found
        if old is None:
            return None
        event = BrokerFailover(master=self.master, old=old, new=address, epoch=epoch, seen_by=self.host, at=time.time())
        log.warning("broker failover", master=self.master, old=old, new=address, epoch=epoch)
        return event

    def run(self, stop: threading.Event, report: Callable[[BrokerFailover], None]) -> None:
        """Check every CHECK_SECONDS until `stop`; each failover found goes to `report`."""
        while not stop.is_set():
            try:
                event = self.check()
            except Exception as exc:  # noqa: BLE001 - a broker failing over, say: the next check tries again
                now = time.monotonic()
                if now - self._logged > REPEAT_LOG_SECONDS:
                    self._logged = now
                    log.info("failover watch: cannot record the primary yet", error=redact(str(exc))[:300])
            else:
                if event is not None:
                    report(event)
            stop.wait(CHECK_SECONDS)

    def close(self) -> None:
        for sentinel in self.sentinels.sentinels:
            sentinel.close()
