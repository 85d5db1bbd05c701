"""Hosts: the daemons that share one broker, each under a name (NIETEST_HOST_NAME) it leases.

**The lease.** A daemon takes a lease on its name before it starts anything (`take_lease`, from
`nietest daemon`) and its host keeper renews it every second (`renew_lease`); the lease's TTL is
NIETEST_HOST_LOST_SECONDS. A second live daemon with the same name finds the lease held and refuses
to start (the holder's record names its address and start time), so two daemons never share one
metrics hash, one set of lifelines, or the broker ids of `<host>/<process>/<pid>/`. A daemon that
restarts on the same machine after a crash may take its predecessor's lease at once: same boot id,
and its pid is gone.

**The record** (`HostRecord`, the hash `keys.HOSTS`) says who the daemon is (address, pid, start)
and its state: `up`, `lost`, or `stopped` (a graceful stop: its workers drained, nothing to take).

**Lost, and the takeover.** A host is lost when its lease lapsed and its newest lifeline (its keeper
and its workers beat into `keys.lifelines(host)`) is older than NIETEST_HOST_LOST_SECONDS. Every
daemon's keeper looks; `claim_takeover` is one script, so exactly one wins: it flips the record to
`lost` (its epoch + 1) and takes the host's takeover lock. The winner hands back the messages the
lost host's workers held and ends with `finish_takeover`. A winner that is itself cut off mid-way
never finishes: its lock lapses and another daemon's claim resumes the hand-back (each step is
idempotent).

**Fencing.** A lost host that comes back finds its record `lost` when it renews (`FENCED`): its
work was handed back and may be running elsewhere. Its keeper kills its workers (what they held
in memory must not run) before it renews again (`rejoin`). What runs meanwhile is already safe by
the per-subtask guards: a create checks the stored job uuid under the creating lock and the
create-sent marker; a finish counts once (a conditional store update); a slot is a set member per
subtask; a final notice is claimed once.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import redis

from nietest_daemon.coordination import keys
from nietest_daemon.coordination.connection import as_text, drain_json_list, lua_script, push_json
from nietest_daemon.coordination.events import HostEvent, decode_each, host_event_from_dict

#: The keeper's own lifeline member (beside the workers' `<process>/<pid>`).
KEEPER_PROCESS = "keeper"

_TAKE = lua_script(__name__, "take")  # lua/hosts_take.lua
_RENEW = lua_script(__name__, "renew")  # lua/hosts_renew.lua
_CLAIM = lua_script(__name__, "claim")  # lua/hosts_claim.lua
_HANDED = lua_script(__name__, "handed")  # lua/hosts_handed.lua


class HostState(StrEnum):
    UP = "up"
    LOST = "lost"
    STOPPED = "stopped"


class Renewal(StrEnum):
    """What `renew_lease` found."""

    OK = "ok"
    FENCED = "fenced"  # declared lost meanwhile: kill the workers, then `rejoin`
    TAKEN = "taken"  # another daemon holds the name
    UNREGISTERED = "unregistered"  # the broker lost its data: `take_lease` again


class Claim(StrEnum):
    NEW = "new"  # this call declared the host lost
    RESUME = "resume"  # a hand-back whose taker vanished


def boot_id() -> str:
    """This machine's boot id: a daemon that restarts on the same boot may replace its dead self."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class HostRecord:
    name: str
    daemon_id: str  # unique per daemon start
    address: str  # the daemon's address as the broker sees it (`CLIENT INFO`), "" if unknown
    pid: int  # the daemon's pid (supervisord's: `nietest daemon` execs it)
    boot_id: str
    home: str
    started_at: float
    state: HostState = HostState.UP
    since: float = 0.0  # when the state last changed
    epoch: int = 0  # how many times the host was declared lost
    handed_back: bool = True  # False from a loss until its work was handed back
    taken_over_by: str = ""  # the host name of the daemon that handed back its work, last time
    last_seen: float = 0.0  # its newest lifeline when it was declared lost
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> HostRecord:
        data = json.loads(raw)
        known = {f for f in cls.__dataclass_fields__}
        fields = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        fields["state"] = HostState(fields.get("state", HostState.UP))
        fields["epoch"] = int(fields.get("epoch", 0))
        fields["pid"] = int(fields.get("pid", 0))
        return cls(**{**fields, "extra": {**fields.get("extra", {}), **extra}})

    def describe(self) -> str:
        """`<name> (<address>, pid <pid>, started <UTC time>)`, for the refusal line."""
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started_at))
        return f"{self.name} ({self.address or 'address unknown'}, pid {self.pid}, started {started})"


def lease_ms(lost_seconds: float) -> int:
    return max(1000, int(lost_seconds * 1000))


def client_address(client: redis.Redis) -> str:
    """This connection's address as the broker sees it (`ip:port` of `CLIENT INFO`), without the port."""
    try:
        info = client.client_info()
    except redis.ResponseError:
        return ""
    addr = str(info.get("addr", ""))
    if addr.startswith("/"):  # a unix socket: the broker is on this machine
        return "a local unix socket"
    return addr.rsplit(":", 1)[0] if ":" in addr else addr


def get_record(client: redis.Redis, name: str) -> HostRecord | None:
    raw = client.hget(keys.HOSTS, name)
    return None if raw is None else HostRecord.from_json(raw)


def all_records(client: redis.Redis) -> list[HostRecord]:
    """Every host that registered on this broker, by name."""
    return [HostRecord.from_json(raw) for _, raw in sorted(client.hgetall(keys.HOSTS).items())]


def may_replace(holder: HostRecord, pid_alive: bool) -> bool:
    """Whether a daemon starting on this machine may take `holder`'s lease before it lapses: the
    holder ran on this boot of this machine, in the same home, and its pid is gone."""
    return bool(holder.boot_id) and holder.boot_id == boot_id() and not pid_alive


def take_lease(
    client: redis.Redis, record: HostRecord, lost_seconds: float, *, replacing: str = ""
) -> tuple[bool, HostRecord | None]:
    """Register `record` and take the lease on its name. (True, the previous record) when taken;
    (False, the holder's record) when another live daemon holds it. `replacing`: a dead holder's
    daemon id that may be replaced (`may_replace`)."""
    taken, previous = _TAKE(
        keys=[keys.host_lease(record.name), keys.HOSTS],
        args=[record.name, record.daemon_id, record.to_json(), lease_ms(lost_seconds), replacing],
        client=client,
    )
    return bool(taken), (HostRecord.from_json(previous) if previous else None)


def renew_lease(client: redis.Redis, name: str, daemon_id: str, lost_seconds: float) -> Renewal:
    result = _RENEW(
        keys=[keys.host_lease(name), keys.HOSTS], args=[name, daemon_id, lease_ms(lost_seconds)], client=client
    )
    return Renewal(as_text(result))


def beat(client: redis.Redis, name: str, pid: int) -> None:
    """The keeper's own lifeline (a host without workers is alive too)."""
    client.zadd(keys.lifelines(name), {f"{KEEPER_PROCESS}/{pid}": time.time()})


def last_sign_of_life(client: redis.Redis, name: str) -> float | None:
    top = client.zrevrange(keys.lifelines(name), 0, 0, withscores=True)
    return float(top[0][1]) if top else None


def rejoin(client: redis.Redis, record: HostRecord, lost_seconds: float) -> HostRecord:
    """A fenced daemon whose workers were restarted takes its name back: `up` again, same epoch."""
    back = replace(record, state=HostState.UP, since=time.time())
    taken, _ = take_lease(client, back, lost_seconds, replacing=record.daemon_id)
    if not taken:
        raise RuntimeError(f"host name {record.name} was taken by another daemon while this one was lost")
    return back


def mark_stopped(client: redis.Redis, record: HostRecord) -> None:
    """A graceful stop: the record says `stopped` (nothing to take over) and the lease goes."""
    current = get_record(client, record.name)
    if current is not None and current.daemon_id != record.daemon_id:
        return  # another daemon has the name now
    with client.pipeline() as pipe:
        pipe.hset(keys.HOSTS, record.name, replace(record, state=HostState.STOPPED, since=time.time()).to_json())
        pipe.delete(keys.host_lease(record.name))
        pipe.execute()


def claim_takeover(
    client: redis.Redis, name: str, *, daemon_id: str, host: str, lost_seconds: float
) -> tuple[Claim, HostRecord] | None:
    """Try to become the one daemon that hands back lost host `name`'s work (see the module doc)."""
    found = _CLAIM(
        keys=[keys.HOSTS, keys.host_lease(name), keys.lifelines(name), keys.host_takeover(name)],
        args=[name, daemon_id, host, lost_seconds, lease_ms(lost_seconds)],
        client=client,
    )
    if not found:
        return None
    kind, raw = found
    return Claim(as_text(kind)), HostRecord.from_json(raw)


def finish_takeover(client: redis.Redis, name: str, daemon_id: str) -> bool:
    """The hand-back is done; False when this daemon's lock lapsed meanwhile (another resumed it)."""
    return bool(_HANDED(keys=[keys.HOSTS, keys.host_takeover(name)], args=[name, daemon_id], client=client))


def forget_processes(client: redis.Redis, name: str) -> int:
    """After a hand-back: drop the lost host's lifelines and its processes' alive marks, so that a
    create it left in doubt is settled at once (coordination/markers.py) rather than when the mark
    expires. How many alive marks went."""
    marks = list(client.scan_iter(match=keys.alive_pattern(name), count=1000))
    with client.pipeline(transaction=False) as pipe:
        pipe.delete(keys.lifelines(name))
        if marks:
            pipe.delete(*marks)
        pipe.execute()
    return len(marks)


MAX_EVENTS = 1000


def report_event(client: redis.Redis, event: HostEvent) -> None:
    """Tell the alerts listeners (whichever drains first sends it, once)."""
    push_json(client, keys.HOST_EVENTS, event.to_json(), MAX_EVENTS)


def drain_events(client: redis.Redis, limit: int = MAX_EVENTS) -> list[HostEvent]:
    """Take (and remove) the pending host events, oldest first; one that is not an event is logged and skipped."""
    return decode_each(host_event_from_dict, drain_json_list(client, keys.HOST_EVENTS, limit), "unknown host event")
