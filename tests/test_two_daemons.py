"""Two daemons on one broker and one store: how a deployment outgrows one machine.

Each daemon has its own home (supervisord, sockets, logs); both use one broker and one store. The
job-slot cap is global, tasks submitted through either daemon progress, and the slots are shared
between them fairly. Twice: on a private valkey-server and one SQLite file (the daemons share a
data dir), and on real shared servers, as on several hosts: the machine's Redis (a database number
of its own) and the machine's PostgreSQL (a database of its own), each daemon with its own data
dir. The second skips, saying why, when either server does not answer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from nietest_daemon.domain.lifecycle import TERMINAL
from nietest_daemon.store import open_store_for
from nietest_daemon.testing import machine_redis, postgres
from nietest_daemon.testing import task_documents as taskdocs
from nietest_daemon.testing.daemon import Daemon
from nietest_daemon.testing.fake_nieta import FakeNieta
from nietest_daemon.testing.valkey import PrivateValkey
from nietest_daemon.testing.waiting import wait_for

pytestmark = pytest.mark.e2e

CAP = 3


def marker_task(name: str, markers: list[str]) -> dict[str, Any]:
    """One variable prompt: a subtask per marker, the marker its prompt's whole text."""
    return taskdocs.task_document(name, [taskdocs.variable_prompt("marker", markers)])


def in_flight_peak(api: FakeNieta) -> int:
    """Most jobs in flight at once, seen from the API: from the create until the first SUCCESS poll."""
    events: list[tuple[float, int]] = []
    for job in {r.job_uuid for r in api.requests_to("create") if r.job_uuid}:
        create = min(r.time for r in api.requests_to("create") if r.job_uuid == job)
        done = [r.time for r in api.requests_to("poll") if r.job_uuid == job and r.status == 200]
        events += [(create, 1), (max(done), -1)]
    peak = current = 0
    for _, delta in sorted(events, key=lambda e: (e[0], -e[1])):
        current += delta
        peak = max(peak, current)
    return peak


def test_two_daemons_share_one_cap_and_both_progress(
    make_daemon: Callable[..., Daemon], private_valkey: Callable[..., PrivateValkey], short_tmp: Path
) -> None:
    broker = private_valkey()
    run_two_daemons(make_daemon, {"BROKER_REDIS_URL": broker.url, "NIETEST_DATA_DIR": str(short_tmp / "shared-data")})


def test_two_daemons_on_the_machines_redis_and_postgresql(make_daemon: Callable[..., Daemon]) -> None:
    """The same on real servers: neither daemon runs a broker, and their store is PostgreSQL (both
    prepare it at start, under its advisory lock, at the same moment)."""
    missing = machine_redis.available() or postgres.unavailable_reason()
    if missing:
        pytest.skip(missing)
    with ExitStack() as servers:
        broker_url = servers.enter_context(machine_redis.claimed_database())
        store_url = servers.enter_context(postgres.temporary_database())
        shown = run_two_daemons(make_daemon, {"BROKER_REDIS_URL": broker_url, "NIETEST_STORE_URL": store_url})
        assert shown == f"postgresql {store_url}", shown  # `nietest status` names it (no password to mask here)


def run_two_daemons(make_daemon: Callable[..., Daemon], shared: dict[str, str]) -> str:
    """Two daemons on the broker and store `shared` names, started together, stopped before the
    servers are emptied; the store as `nietest status --json` names it."""
    with FakeNieta(generation_time=0.5) as api:
        env = {
            **api.env(),
            **shared,
            "NIETEST_MAX_JOBS": str(CAP),
            "IMAGE_POLLING_INTERVAL": "0.1",
            "NIETEST_SUBTASK_OPS_PROCESSES": "0",
        }
        one, two = make_daemon(**env), make_daemon(**env)
        try:
            shown = check_two_daemons(api, one, two)
        finally:
            for daemon in (one, two):
                daemon.stop()
    check_jobs(api, two)
    return shown


def check_two_daemons(api: FakeNieta, one: Daemon, two: Daemon) -> str:
    """Start both, run two tasks through them and a third through one with its subtask workers stopped."""
    for daemon in (one, two):  # together: both prepare the store at once
        daemon.start(wait=False)
    for daemon in (one, two):
        daemon.wait_running()
    assert one.settings.control_socket != two.settings.control_socket
    tasks = {}
    for daemon, name in ((one, "one"), (two, "two")):
        path = daemon.home / f"{name}.json"
        path.write_text(json.dumps(marker_task(name, [f"{name}-{i:02d}" for i in range(9)])))
        tasks[name] = daemon.run("submit", str(path)).stdout.strip()
    # `nietest status` on either daemon shows the shared slots and both tasks' shares.
    slots = wait_for(
        lambda: (s := two.status()["slots"]["standard"]) and len(s["tasks"]) == 2 and s,
        30,
        what="both tasks waiting for the shared slots",
    )
    assert slots["cap"] == CAP and slots["in_use"] <= CAP
    assert {t["task_id"] for t in slots["tasks"]} == set(tasks.values())
    assert all(t["priority"] == 1 and 0.0 <= t["share"] <= 1.0 for t in slots["tasks"])
    store = open_store_for(one.settings)
    try:

        def completed(task_id: str) -> None:
            task = wait_for(
                lambda: (doc := store.get_task(task_id)) and doc["status"] in TERMINAL and doc,
                90,
                what=f"task {task_id} to end",
            )
            assert task["status"] == "completed" and task["completed_images"] == task["total_images"], task

        for task_id in tasks.values():
            completed(task_id)
        # Either daemon's workers take what the other's master queued: with one's subtask
        # workers stopped, a task submitted through one is done by two's. (Which workers take
        # which message while both run is up to Dramatiq's consumers: an idle one backs off.)
        one.run("ctl", "stop", "subtask:*")
        path = one.home / "three.json"
        path.write_text(json.dumps(marker_task("three", [f"three-{i:02d}" for i in range(4)])))
        completed(one.run("submit", str(path)).stdout.strip())
    finally:
        store.close()
    return str(two.status()["store"])


def check_jobs(api: FakeNieta, two: Daemon) -> None:
    # One cap for both daemons, and no image paid twice.
    assert in_flight_peak(api) == CAP
    names = [f"{n}-{i:02d}" for n in ("one", "two") for i in range(9)] + [f"three-{i:02d}" for i in range(4)]
    assert api.created_counts(r"(?:one|two|three)-\d\d") == dict.fromkeys(names, 1)
    created_by_two = sum(
        line.count('"image job created"')
        for log in two.settings.log_dir.glob("subtask_*.log")
        for line in log.read_text().splitlines()
    )
    assert created_by_two >= 4, f"{two.home}: the third task's creates are not in its workers' logs"
