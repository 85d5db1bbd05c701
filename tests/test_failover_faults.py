"""The broker fails over, twice, under a campaign (issue 24): bench/failover.py at CI size.

Two hosts (real daemons in the multi-host rig's namespaces) share a PostgreSQL store and a broker
under Redis Sentinel: a primary, a replica and three Sentinels (quorum 2, down-after 2 s) in the
services namespace, the daemons given its `redis+sentinel://` URL. A fault-free campaign first; then
one where the primary is SIGKILLed at 40 % of the subtasks, the replica promoted, the killed server
started again as its replica, and the new primary SIGKILLed in turn at 70 %. Checked: no subtask
lost, no image job beyond those owed, the counters equal a recount, one final notice, the queues
drained, no host declared lost; each failover has subtasks ending again within Sentinel's detection
time + 10 s of the kill, and the two add at most twice that against the fault-free campaign.

CI size: 400 subtasks rather than 600, and NIETEST_BROKER_HEARTBEAT_TIMEOUT 20 s rather than 60 s
(as tests/test_hosts_faults.py). The benchmark, at full size: `.venv/bin/python bench/hosts.py
--faults failover`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench import failover
from bench import hosts as bench
from nietest_daemon.testing import sentinel
from nietest_daemon.testing.multihost import Rig, postgres_bindir

pytestmark = pytest.mark.e2e

#: bench/failover.py's problems about time rather than loss or pay-once.
TIME_PROBLEMS = ("two failovers added", "subtasks ended again after")

CI = failover.failover_config(bench.HostsConfig(subtasks=400, heartbeat_timeout=20.0, timeout=120.0))


@pytest.fixture(scope="module")
def cluster() -> Iterator[bench.Cluster]:
    reason = (
        Rig.available()
        or sentinel.unavailable_reason()
        or (None if postgres_bindir() else "PostgreSQL is not installed")
    )
    if reason:
        pytest.skip(reason)
    with bench.Cluster(CI) as cluster:
        yield cluster


def test_two_failovers_lose_nothing_pay_nothing_twice_and_each_costs_at_most_detection_plus_10_s(
    cluster: bench.Cluster,
) -> None:
    baseline, report, failovers = failover.run_pair(cluster, say=print)
    print("\n".join([bench.HEADER, bench.row(baseline, CI), bench.row(report, CI)]))
    print("\n".join([*bench.describe(baseline), *bench.describe(report)]))
    assert baseline.problems == []
    # the time targets are checked last (xfail while open), everything else here
    assert [p for p in report.problems if not any(t in p for t in TIME_PROBLEMS)] == []
    assert report.subtasks == CI.subtasks and report.lost == 0 and report.duplicate_jobs == 0
    assert report.jobs_created <= report.jobs_owed == CI.subtasks
    assert report.final_notices == 1
    assert report.host_alerts == []
    limit = sentinels_down_after(cluster) + 10
    assert [f.old != f.new for f in failovers] == [True, True]
    assert failovers[1].old == failovers[0].new  # the promoted one was killed in turn
    assert all(f.resumed is not None for f in failovers)
    within = all(f.resumed is not None and f.resumed <= limit for f in failovers)
    if not (within and report.added_seconds is not None and report.added_seconds <= 2 * limit):
        # Known open (issue 24): a consumer thread restarted after the broker error drops what it held in
        # memory (its prefetched bodies, a delay queue's delayed polls), which wait in its old broker id's
        # ack set for NIETEST_BROKER_HEARTBEAT_TIMEOUT. Everything above still holds.
        pytest.xfail(f"a failover cost more than detection + 10 s ({limit:.0f} s): {failovers}")


def sentinels_down_after(cluster: bench.Cluster) -> float:
    return failover.sentinels_of(cluster).down_after_ms / 1000
