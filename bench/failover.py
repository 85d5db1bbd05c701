"""The broker fails over (issue 24): two hosts run a campaign on a broker under Redis Sentinel, and
its primary is SIGKILLed twice.

    .venv/bin/python bench/hosts.py --faults failover [--subtasks 600]

bench/hosts.py's cluster and runs, on a rig of two hosts whose broker is a `SentinelSet`
(nietest_daemon/testing/sentinel.py: a primary, a replica and three Sentinels, quorum 2,
down-after 2 s) in the services namespace; the daemons get its `redis+sentinel://` URL. A fault-free
campaign first (the baseline), then one with two failovers:

1. when `fault_at` of the subtasks are terminal, kill -9 the primary; wait until the Sentinels name
   the replica and it answers as the primary; start the killed server again (a replica of the new
   primary, in sync); wait until subtasks end again;
2. when 70 % are terminal (and not before the first failover is over), the same to the new primary.

Each failover is timed from the kill: `promoted`, the Sentinels name the new primary and it answers
as one; `resumed`, the first subtask that ends after the promotion (one that ends in between ran on
what its worker held already); `rejoined`, the killed server back as a replica in sync; and `lag`,
an estimate of the time it cost: for the first, the time from its kill to the second less the
subtasks ended meanwhile at the rate of the 5 s before it; for the second, what the run added
against the baseline less the first's lag. The checks are bench/hosts.py's (nothing lost, no image
job beyond those owed, counters equal a recount, one final notice, the queues drained, no host
declared lost), plus: each failover resumed within Sentinel's detection time (down-after) + 10 s,
and the run added at most twice that against the baseline. An image job beyond those owed is named
with its subtask and when it was made, relative to each kill. tests/test_failover_faults.py runs the
same at CI size.
"""

from __future__ import annotations

import bisect
import functools
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from bench import hosts
from nietest_daemon.testing.fake_nieta import FakeNieta
from nietest_daemon.testing.sentinel import SentinelSet
from nietest_daemon.testing.waiting import wait_for

SECOND_AT = 0.7  # the share of the subtasks terminal when the second primary is killed
RATE_WINDOW = 5.0  # seconds before the first kill over which the fault-free rate is taken


@dataclass
class Failover:
    """One kill of the primary; times in seconds after the kill."""

    killed: float  # time.monotonic() of the kill
    at: float  # seconds from the submit
    terminal: int  # subtasks terminal at the kill
    old: str = ""
    new: str = ""
    promoted: float | None = None
    resumed: float | None = None
    rejoined: float | None = None
    lag: float | None = None

    def describe(self) -> str:
        def s(value: float | None) -> str:
            return "never" if value is None else f"{value:.1f} s"

        return (
            f"primary {self.old} killed at {self.at:.1f} s ({self.terminal} subtasks terminal): {self.new} promoted "
            f"after {s(self.promoted)}, subtasks ending again after {s(self.resumed)}, the killed one back as a "
            f"replica after {s(self.rejoined)}; estimated cost {s(self.lag)}"
        )


class Progress(threading.Thread):
    """Samples the watched task's terminal subtasks (the watcher's count) every 50 ms."""

    def __init__(self, watcher: hosts.Watcher) -> None:
        super().__init__(name="progress", daemon=True)
        self.watcher = watcher
        self.samples: list[tuple[float, int]] = []  # (time.monotonic(), subtasks terminal)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            self.samples.append((time.monotonic(), self.watcher.terminal))
        self.samples.append((time.monotonic(), self.watcher.terminal))  # the last, once stopped

    def _split(self, when: float) -> tuple[list[tuple[float, int]], int]:
        samples = list(self.samples)
        return samples, bisect.bisect_right(samples, when, key=lambda sample: sample[0])

    def count_at(self, when: float) -> int:
        samples, i = self._split(when)
        return samples[i - 1][1] if i else 0

    def first_rise_after(self, when: float) -> float | None:
        """When the count first rose above its value at `when`."""
        samples, i = self._split(when)
        before = samples[i - 1][1] if i else 0
        return next((t for t, count in samples[i:] if count > before), None)


def sentinels_of(cluster: hosts.Cluster) -> SentinelSet:
    found = cluster.rig.sentinels
    assert found is not None, "the failover run needs a cluster whose broker is under Sentinel (sentinels=True)"
    return found


def fail_over(run: hosts.Run, progress: Progress) -> Failover:
    """Kill the primary, wait for the promotion, bring the killed server back as a replica, wait until
    subtasks end again."""
    sentinels, started = sentinels_of(run.cluster), run.watcher.started
    killed = time.monotonic()
    record = Failover(killed, killed - started, run.watcher.terminal)
    old = sentinels.kill_primary()
    record.old = f"{old[0]}:{old[1]}"
    run.note(f"primary {record.old} killed (SIGKILL)")
    new = sentinels.wait_failover(old, timeout=60)
    promoted = time.monotonic()
    record.new, record.promoted = f"{new[0]}:{new[1]}", promoted - killed
    run.note(f"{record.new} promoted {record.promoted:.1f} s after the kill")
    sentinels.restart(old)
    record.rejoined = time.monotonic() - killed
    run.note(f"{record.old} back as a replica of {record.new}, in sync, {record.rejoined:.1f} s after the kill")
    rise = wait_for(
        lambda: progress.first_rise_after(promoted) or run.watcher.ended is not None, 60, "subtasks ending again"
    )
    record.resumed = rise - killed if isinstance(rise, float) else None
    return record


def fault_failover(run: hosts.Run, failovers: list[Failover]) -> tuple[set[str], set[str]]:
    """bench/hosts.py's fault step: two failovers; no host is lost, none comes back."""
    progress = Progress(run.watcher)
    progress.start()
    try:
        for share in (run.cfg.fault_at, SECOND_AT):
            mark = functools.partial(run.watcher.reached, share, run.total)
            wait_for(mark, run.cfg.timeout, f"{share:.0%} of the subtasks terminal", interval=0.05)
            if run.watcher.ended is not None:
                run.report.problems.append(f"the campaign ended before failover {len(failovers) + 1}")
                break
            failovers.append(fail_over(run, progress))
    finally:
        progress.stop.set()
        progress.join(5)
    estimate_lags(failovers, progress)
    return set(), set()


def estimate_lags(failovers: list[Failover], progress: Progress) -> None:
    """The cost of each failover but the last: the time from its kill to the next kill less the subtasks
    ended meanwhile at the rate of the RATE_WINDOW seconds before the first kill. (The last one's is
    what the run added against the baseline less the others': `run_failover`.)"""
    if not failovers:
        return
    first = failovers[0].killed
    rate = (progress.count_at(first) - progress.count_at(first - RATE_WINDOW)) / RATE_WINDOW
    for record, following in zip(failovers, failovers[1:], strict=False):
        until = following.killed
        if rate > 0 and until > record.killed:
            done = progress.count_at(until) - progress.count_at(record.killed)
            record.lag = (until - record.killed) - done / rate


def beyond_owed(api: FakeNieta, failovers: list[Failover]) -> list[str]:
    """The subtasks with image jobs beyond those owed, each job's creation against each kill."""
    by_subtask: dict[str, list[float]] = {}
    timeouts: dict[str, int] = {}
    for job in api.jobs:
        found = re.findall(r"cz-\d{4}", job.text)
        if found:
            key = f"{found[0]}{'/lumina' if job.ops else ''}"
            by_subtask.setdefault(key, []).append(job.created)
            timeouts[key] = timeouts.get(key, 0) + int(job.outcome is not None and job.outcome.action == "timeout")
    lines = []
    for key, created in sorted(by_subtask.items()):
        if len(created) > 1 + min(hosts.TIMEOUT_RESUBMITS, timeouts[key]):
            when = "; ".join(
                ", ".join(f"{t - f.killed:+.1f} s from kill {n}" for n, f in enumerate(failovers, 1)) or "no kill"
                for t in sorted(created)
            )
            lines.append(f"{key}: {len(created)} jobs, made at {when}")
    return lines


def run_failover(cluster: hosts.Cluster, baseline: hosts.HostsReport) -> tuple[hosts.HostsReport, list[Failover]]:
    """One campaign with two failovers on `cluster` (its broker under Sentinel), checked."""
    failovers: list[Failover] = []
    hosts.STEPS["failover"] = functools.partial(fault_failover, failovers=failovers)
    try:
        report = hosts.run_fault(cluster, "failover", baseline)
    finally:
        del hosts.STEPS["failover"]
    limit = sentinels_of(cluster).down_after_ms / 1000 + 10
    report.check(len(failovers) == 2, f"{len(failovers)} failovers, not 2")
    if failovers and report.added_seconds is not None and all(f.lag is not None for f in failovers[:-1]):
        failovers[-1].lag = report.added_seconds - sum(f.lag or 0.0 for f in failovers[:-1])  # what is left of it
    for n, record in enumerate(failovers, 1):
        report.notes.append(f"failover {n}: {record.describe()}")
        resumed = record.resumed
        report.check(
            resumed is not None and resumed <= limit,
            f"failover {n}: subtasks ended again after {resumed} s > {limit:g} s",
        )
    added = report.added_seconds
    report.check(added is not None and added <= 2 * limit, f"two failovers added {added} s > 2 x {limit:g} s")
    for line in beyond_owed(cluster.api, failovers):
        report.notes.append(f"beyond owed: {line}")
    cluster.failed = cluster.failed or bool(report.problems)
    return report, failovers


def failover_config(cfg: hosts.HostsConfig) -> hosts.HostsConfig:
    """`cfg` for the failover cluster: two hosts, the broker under Sentinel."""
    return replace(cfg, hosts=2, sentinels=True)


def run_pair(
    cluster: hosts.Cluster, say: Callable[[str], None] = print
) -> tuple[hosts.HostsReport, hosts.HostsReport, list[Failover]]:
    """The baseline (labelled "sentinel" in the table), then the failover run, on one cluster; their rows said."""
    try:
        baseline = hosts.run_fault(cluster, "baseline")
        baseline.fault = "sentinel"
        say(hosts.row(baseline, cluster.cfg))
        report, failovers = run_failover(cluster, baseline)
        say(hosts.row(report, cluster.cfg))
    finally:
        if cluster.failed:
            keep_sentinel_logs(cluster)
    return baseline, report, failovers


def keep_sentinel_logs(cluster: hosts.Cluster) -> None:
    """Beside the daemons' logs that bench/hosts.py keeps when a run failed."""
    kept = Path(tempfile.gettempdir()) / f"nietest-hosts-{cluster.rig.prefix}" / "sentinels"
    for log in (cluster.rig.tmp / "sentinels").glob("*/*.log"):
        (kept / log.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(log, kept / log.parent.name / log.name)


def run_series(cfg: hosts.HostsConfig, say: Callable[[str], None] = print) -> list[hosts.HostsReport]:
    """bench/hosts.py's "failover" fault: a cluster of its own, its baseline and the failover run."""
    with hosts.Cluster(failover_config(cfg), say) as cluster:
        baseline, report, _ = run_pair(cluster, say)
    return [baseline, report]
