"""The writes that guard a payment reach a replica of the broker before the payment can happen
(coordination/connection.replicated): the create-sent marker before a create goes out, the TIMEOUT
count before a resubmit, a final notice's claim before its post. Against a real primary and replica
(Debian's redis-server, testing/sentinel.SentinelSet; the Sentinels are not needed here)."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from nietest_daemon.coordination import connection, keys, markers
from nietest_daemon.coordination.connection import NotReplicated, replica_count, replicated
from nietest_daemon.testing import sentinel
from nietest_daemon.testing.sentinel import SentinelSet

pytestmark = pytest.mark.e2e  # real servers: about 7 s to start and settle


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSet]:
    if reason := sentinel.unavailable_reason():
        pytest.skip(reason)
    with SentinelSet(Path(tmp_path_factory.mktemp("sentinels"))) as found:
        yield found


@pytest.fixture
def primary(servers: SentinelSet) -> Iterator[redis.Redis]:
    address = servers.primary()
    assert address is not None
    client = redis.Redis(*address, socket_timeout=5)
    connection._replicas.clear()
    yield client
    client.close()


def replica_of(servers: SentinelSet, primary: redis.Redis) -> redis.Redis:
    port = next(p for p in servers.server_ports if p != primary.connection_pool.connection_kwargs["port"])
    return redis.Redis(servers.host, port, socket_timeout=5)


def test_a_guarding_write_is_on_the_replica_when_it_returns(servers: SentinelSet, primary: redis.Redis) -> None:
    assert replica_count(primary) == 1
    for i in range(50):
        primary.set(keys.create_sent(f"t:{i}"), "me")
        markers.make_create_sent_durable(primary, f"t:{i}")
    replica = replica_of(servers, primary)
    assert all(replica.exists(keys.create_sent(f"t:{i}")) for i in range(50))  # no wait needed: WAIT did it
    assert markers.count_timeout(primary, "t:0", "job-1") == 1
    assert replica.scard(keys.timeouts("t:0")) == 1


def test_without_a_replica_nothing_waits(tmp_path: Path) -> None:
    with SentinelSet(tmp_path) as alone:
        address = alone.primary()
        assert address is not None
        client = redis.Redis(*address)
        replica = replica_of(alone, client)
        replica.replicaof("no", "one")  # the replica leaves: the primary has none
        connection._replicas.clear()
        started = time.monotonic()
        assert replicated(client, lambda pipe: pipe.set("k", "v")) == [True]
        assert time.monotonic() - started < 0.5 and replica_count(client) == 0


def test_a_replica_that_does_not_acknowledge_raises_a_broker_outage(
    servers: SentinelSet, primary: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connection, "REPLICA_ACK_MS", 300)
    port = next(p for p in servers.server_ports if p != primary.connection_pool.connection_kwargs["port"])
    replica = servers.procs[port]
    assert replica_count(primary) == 1
    primary.set(keys.create_sent("t:stuck"), "me")  # the marker begin_create claimed
    replica.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(NotReplicated) as info:
            markers.make_create_sent_durable(primary, "t:stuck")
        assert isinstance(info.value, connection.BROKER_OUTAGE_ERRORS)  # the message is run again later
    finally:
        replica.send_signal(signal.SIGCONT)
    connection._replicas.clear()
    markers.make_create_sent_durable(primary, "t:stuck")  # acknowledged again
