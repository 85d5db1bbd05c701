"""The fault-injection run of bench/chaos.py, shortened: two tasks of 30 subtasks, priorities 1 and 3,
sharing the job slots; a worker killed every ~2 s, the broker killed once, both webhooks hanging for
6 s, workers stopped (SIGSTOP) now and then, every other time past the watchdog's 5 s, a
leaking subtask_ops worker recycled, three times the issue's fault rates, at the default heartbeat
timeout (60 s).

The benchmark itself (300 subtasks, the issue's rates, a fault-free baseline beside it) is
`.venv/bin/python bench/chaos.py`; its figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import pytest

from bench import chaos

pytestmark = pytest.mark.e2e


def test_chaos_run_loses_nothing_pays_nothing_twice_and_leaks_nothing() -> None:
    cfg = chaos.ChaosConfig(
        subtasks=60,
        fault_scale=3.0,
        kill_every=2.0,
        min_kills=5,
        hang_at=4.0,
        hang_seconds=6.0,
        stop_every=3.0,
        worker_hang_seconds=5.0,
        leak_max_memory="64MB",  # a few messages' leak: the workers are killed too often to reach more
        generation_time=1.0,
        polling_interval=0.3,
        max_jobs=4,
        max_lumina_jobs=3,
        timeout=240.0,
        # one of each job outcome for sure (the random mix may miss one in so few jobs)
        extra_rules=[
            {"action": "timeout", "marker": "cz-0001", "times": 1, "error": "chaos: queue full"},
            {"action": "failure", "marker": "cz-0002", "times": 1, "error": "chaos: generation failed"},
            {"action": "illegal_image", "marker": "cz-0003", "times": 1},
        ],
    )
    report = chaos.run_chaos(cfg, faults=True, label="test")
    print("\n".join(chaos.describe(report)))
    assert report.problems == []
    assert len(report.kills) >= cfg.min_kills and report.broker_killed
    assert report.subtasks == 60 and report.lost == 0 and report.duplicate_jobs == 0
    assert all(report.faults_seen[kind] > 0 for kind in ("http_500", "dropped", "timeout", "failure")), report
    assert report.final_notices == len(cfg.priorities) == 2 and report.kills_alerted == len(report.kills)
    assert report.log_lines > 100 and report.non_json_lines == 0 and report.leaked_secrets == []
    assert report.stops and report.long_stops and report.unresponsive_kills and report.recycles
