"""The fault-injection run of bench/chaos.py, shortened: two tasks, priorities 1 and 3, sharing the
job slots; a worker killed every ~2 s, the broker faulted once, both webhooks hanging for 6 s,
workers stopped (SIGSTOP) now and then, every other time past the watchdog's 5 s, a leaking
subtask_ops worker recycled, three times the issue's fault rates.

Twice: on the embedded broker (killed) and the SQLite store (30 subtasks a task, at the default
heartbeat timeout, 60 s); and on real shared servers, a database of the machine's Redis and one of
the PostgreSQL server (20 subtasks a task), where every connection of the daemon to each is cut
once (`CLIENT KILL`, `pg_terminate_backend`), as a server restart or a network cut would. The
second run skips, saying why, when either server does not answer
(nietest_daemon/testing/machine_redis.py, nietest_daemon/testing/postgres.py).

The benchmark itself (300 subtasks, the issue's rates, a fault-free baseline beside it) is
`.venv/bin/python bench/chaos.py [--store postgresql]`; its figures are in docs/benchmarks.md.
"""

from __future__ import annotations

from typing import Any

import pytest

from bench import chaos
from nietest_daemon.testing import machine_redis, postgres

pytestmark = pytest.mark.e2e

# one of each job outcome for sure (the random mix may miss one in so few jobs)
SURE_OUTCOMES: list[dict[str, Any]] = [
    {"action": "timeout", "marker": "cz-0001", "times": 1, "error": "chaos: queue full"},
    {"action": "failure", "marker": "cz-0002", "times": 1, "error": "chaos: generation failed"},
    {"action": "illegal_image", "marker": "cz-0003", "times": 1},
]


def short_run(**overrides: Any) -> chaos.ChaosConfig:
    settings: dict[str, Any] = {
        "subtasks": 60,
        "fault_scale": 3.0,
        "kill_every": 2.0,
        "min_kills": 5,
        "hang_at": 4.0,
        "hang_seconds": 6.0,
        "stop_every": 3.0,
        "worker_hang_seconds": 5.0,
        "leak_max_memory": "64MB",  # a few messages' leak: the workers are killed too often to reach more
        "generation_time": 1.0,
        "polling_interval": 0.3,
        "max_jobs": 4,
        "max_lumina_jobs": 3,
        "timeout": 240.0,
        "extra_rules": SURE_OUTCOMES,
        **overrides,
    }
    return chaos.ChaosConfig(**settings)


def run_and_check(cfg: chaos.ChaosConfig) -> chaos.ChaosReport:
    report = chaos.run_chaos(cfg, faults=True, label=f"test {cfg.store}, {cfg.broker} broker")
    print("\n".join(chaos.describe(report)))
    assert report.problems == []
    assert len(report.kills) >= cfg.min_kills and report.broker_killed
    assert report.subtasks == cfg.subtasks and report.lost == 0 and report.duplicate_jobs == 0
    assert report.final_notices == len(cfg.priorities) == 2 and report.kills_alerted == len(report.kills)
    assert report.log_lines > 100 and report.non_json_lines == 0 and report.leaked_secrets == []
    return report


def test_chaos_run_loses_nothing_pays_nothing_twice_and_leaks_nothing() -> None:
    report = run_and_check(short_run())
    assert all(report.faults_seen[kind] > 0 for kind in ("http_500", "dropped", "timeout", "failure")), report
    assert report.stops and report.long_stops and report.unresponsive_kills and report.recycles


def test_chaos_run_on_the_real_redis_and_postgresql_survives_their_connections_being_cut() -> None:
    reason = machine_redis.available() or postgres.unavailable_reason()
    if reason:
        pytest.skip(reason)
    report = run_and_check(short_run(store="postgresql", broker="redis", subtasks=40))
    # Every connection to each server, cut under the workers. Whether a message meets a dead one (and
    # is retried: `store_outages`) depends on timing: the pools check a connection they hand out after
    # a failure, so a cut idle connection costs nothing. What must hold is above: nothing lost, nothing
    # paid twice, every final notice sent once.
    assert report.broker_connections_cut > 0 and report.store_connections_killed > 0, report
    assert report.faults_seen["timeout"] and report.faults_seen["failure"], report
    assert report.stops and report.long_stops and report.unresponsive_kills
