"""coordination/hosts.py on a real valkey-server: the lease on a host name, renewal and fencing, and
the takeover that exactly one daemon wins."""

from __future__ import annotations

import os
import threading
import time
import uuid

import pytest
import redis

from nietest_daemon.coordination import hosts, keys
from nietest_daemon.coordination.hosts import Claim, HostRecord, HostState, Renewal
from nietest_daemon.testing.valkey import PrivateValkey

LOST = 3.0


@pytest.fixture
def client(valkey: PrivateValkey) -> redis.Redis:
    return redis.Redis.from_url(valkey.url)


def record(name: str = "h1", **changes: object) -> HostRecord:
    base = HostRecord(
        name=name,
        daemon_id=uuid.uuid4().hex,
        address="10.0.0.1",
        pid=os.getpid(),
        boot_id=hosts.boot_id(),
        home="/srv/nietest",
        started_at=time.time(),
        since=time.time(),
    )
    return HostRecord(**{**base.__dict__, **changes})  # type: ignore[arg-type]


def silence(client: redis.Redis, name: str, seconds_ago: float) -> None:
    """As if the host's lease lapsed and its newest lifeline is `seconds_ago` old."""
    client.delete(keys.host_lease(name))
    client.delete(keys.lifelines(name))
    client.zadd(keys.lifelines(name), {"subtask_00/1": time.time() - seconds_ago})


def test_a_second_live_daemon_with_the_same_name_is_refused_with_the_holders_record(client: redis.Redis) -> None:
    first, second = record(), record()
    assert hosts.take_lease(client, first, LOST) == (True, None)
    taken, holder = hosts.take_lease(client, second, LOST)
    assert not taken and holder == first
    assert "10.0.0.1" in holder.describe() and f"pid {first.pid}" in holder.describe()
    # a dead holder on this boot may be replaced, naming it
    taken, previous = hosts.take_lease(client, second, LOST, replacing=first.daemon_id)
    assert taken and previous == first and hosts.get_record(client, "h1") == second
    assert hosts.may_replace(first, pid_alive=False) and not hosts.may_replace(first, pid_alive=True)


def test_renewal_keeps_the_lease_and_a_lapse_nobody_acted_on_is_forgiven(client: redis.Redis) -> None:
    mine = record()
    hosts.take_lease(client, mine, LOST)
    assert hosts.renew_lease(client, "h1", mine.daemon_id, LOST) == Renewal.OK
    assert 0 < client.pttl(keys.host_lease("h1")) <= LOST * 1000
    client.delete(keys.host_lease("h1"))  # a broker restart, say
    assert hosts.renew_lease(client, "h1", mine.daemon_id, LOST) == Renewal.OK
    assert client.get(keys.host_lease("h1")) == mine.daemon_id.encode()
    assert hosts.renew_lease(client, "h1", "someone-else", LOST) == Renewal.TAKEN
    client.delete(keys.HOSTS)
    assert hosts.renew_lease(client, "h2", mine.daemon_id, LOST) == Renewal.UNREGISTERED


def test_a_silent_host_is_declared_lost_once_and_fenced_when_it_comes_back(
    client: redis.Redis, valkey: PrivateValkey
) -> None:
    lost = record("h1")
    hosts.take_lease(client, lost, LOST)
    hosts.beat(client, "h1", 4242)
    # alive: its lease is held, then its lifeline is fresh
    assert hosts.claim_takeover(client, "h1", daemon_id="w2", host="h2", lost_seconds=LOST) is None
    client.delete(keys.host_lease("h1"))
    assert hosts.claim_takeover(client, "h1", daemon_id="w2", host="h2", lost_seconds=LOST) is None
    silence(client, "h1", LOST + 1)
    # many claimers at once: exactly one wins
    results: list[object] = []
    claimers = [
        threading.Thread(
            target=lambda n=n: results.append(
                hosts.claim_takeover(
                    redis.Redis.from_url(valkey.url),
                    "h1",
                    daemon_id=f"w{n}",
                    host=f"h{n}",
                    lost_seconds=LOST,
                )
            )
        )
        for n in range(2, 8)
    ]
    for t in claimers:
        t.start()
    for t in claimers:
        t.join()
    won = [r for r in results if r is not None]
    assert len(won) == 1
    claim, taken = won[0]  # type: ignore[misc]
    assert claim == Claim.NEW and taken.state == HostState.LOST and taken.epoch == 1 and not taken.handed_back
    assert LOST + 0.5 < time.time() - taken.last_seen < LOST + 5
    winner = client.get(keys.host_takeover("h1")).decode()
    assert hosts.finish_takeover(client, "h1", "not-the-winner") is False
    assert hosts.finish_takeover(client, "h1", winner) is True
    assert hosts.get_record(client, "h1").handed_back  # type: ignore[union-attr]
    assert hosts.claim_takeover(client, "h1", daemon_id="w9", host="h9", lost_seconds=LOST) is None
    # the lost daemon comes back: fenced until it rejoins (after restarting its workers)
    assert hosts.renew_lease(client, "h1", lost.daemon_id, LOST) == Renewal.FENCED
    back = hosts.rejoin(client, hosts.get_record(client, "h1"), LOST)  # type: ignore[arg-type]
    assert back.state == HostState.UP and back.epoch == 1
    assert hosts.renew_lease(client, "h1", lost.daemon_id, LOST) == Renewal.OK


def test_a_hand_back_whose_taker_vanished_is_resumed_by_another(client: redis.Redis) -> None:
    hosts.take_lease(client, record("h1"), LOST)
    silence(client, "h1", LOST + 1)
    claim, _ = hosts.claim_takeover(client, "h1", daemon_id="w2", host="h2", lost_seconds=LOST)  # type: ignore[misc]
    assert claim == Claim.NEW
    # w2 is cut off mid-way: while its lock lives nobody else takes over; once it lapses, one resumes
    assert hosts.claim_takeover(client, "h1", daemon_id="w3", host="h3", lost_seconds=LOST) is None
    client.delete(keys.host_takeover("h1"))
    claim, resumed = hosts.claim_takeover(client, "h1", daemon_id="w3", host="h3", lost_seconds=LOST)  # type: ignore[misc]
    assert claim == Claim.RESUME and resumed.taken_over_by == "h3" and resumed.epoch == 1
    assert hosts.finish_takeover(client, "h1", "w2") is False  # the vanished taker comes back late
    assert hosts.finish_takeover(client, "h1", "w3") is True


def test_a_stopped_host_is_never_taken_over(client: redis.Redis) -> None:
    mine = record("h1")
    hosts.take_lease(client, mine, LOST)
    hosts.mark_stopped(client, mine)
    silence(client, "h1", LOST + 10)
    assert hosts.get_record(client, "h1").state == HostState.STOPPED  # type: ignore[union-attr]
    assert hosts.claim_takeover(client, "h1", daemon_id="w2", host="h2", lost_seconds=LOST) is None


def test_forgetting_a_lost_hosts_processes_drops_its_alive_marks_only(client: redis.Redis) -> None:
    client.set(keys.alive("h1:100:abcd"), "1")
    client.set(keys.alive("h1:101:abce"), "1")
    client.set(keys.alive("h10:100:abcd"), "1")
    hosts.beat(client, "h1", 1)
    assert hosts.forget_processes(client, "h1") == 2
    assert client.exists(keys.alive("h10:100:abcd")) and not client.exists(keys.lifelines("h1"))
