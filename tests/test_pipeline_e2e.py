"""End-to-end: the task pipeline on the real daemon, against the fake Nieta API and a fake Feishu bot.

Real parts only: `nietest daemon` (supervisord, worker processes, embedded valkey), the SQLite
store in its data dir, `FakeNieta` (a real HTTP server for both API hosts) and `FakeFeishu`
(a real webhook). One daemon is shared by most cases (module scope); each case uses its own
markers in the prompts, so the fake's records and scripted rules of one case never match
another's. Everything waits on a condition with a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dramatiq
import pytest

from nietest_daemon.clients.nieta import LUMINA_ELEMENT_UUID
from nietest_daemon.coordination import keys
from nietest_daemon.domain.images import RANDOM_SEED_MAX
from nietest_daemon.domain.subtask import Lane
from nietest_daemon.internals.dramatiq_redis import queue_stats
from nietest_daemon.pipeline.subtasks import CREATE_INTERRUPTED
from nietest_daemon.store import Store, open_store_for
from nietest_daemon.testing import task_documents as taskdocs
from nietest_daemon.testing.daemon import ROOT, Daemon
from nietest_daemon.testing.fake_feishu import FakeFeishu
from nietest_daemon.testing.fake_nieta import FakeNieta, Recorded
from nietest_daemon.testing.waiting import wait_for

pytestmark = pytest.mark.e2e

EXAMPLE = ROOT / "examples" / "task.json"
MAX_JOBS = 3  # the shared daemon's cap per API
MAX_POLLS = 12  # the shared daemon's IMAGE_MAX_POLLING_ATTEMPTS / LUMINA_MAX_POLLING_ATTEMPTS
INTERVAL = 0.2  # the shared daemon's polling intervals


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api() -> Iterator[FakeNieta]:
    with FakeNieta(generation_time=0.3) as fake:
        yield fake


@pytest.fixture(scope="module")
def hook() -> Iterator[FakeFeishu]:
    """The task bot (task notices only)."""
    with FakeFeishu() as fake:
        yield fake


@pytest.fixture(scope="module")
def alert_hook() -> Iterator[FakeFeishu]:
    """The alert bot, kept apart so that only task notices reach `hook`."""
    with FakeFeishu() as fake:
        yield fake


def daemon_env(api: FakeNieta, hook: FakeFeishu, alert_hook: FakeFeishu, **overrides: str) -> dict[str, str]:
    env = {
        **api.env(),
        "FEISHU_TASK_WEBHOOK_URL": hook.url,
        "FEISHU_ALERT_WEBHOOK_URL": alert_hook.url,
        "NIETEST_MASTER_PROCESSES": "1",
        "NIETEST_MASTER_THREADS": "2",
        "NIETEST_SUBTASK_PROCESSES": "2",
        "NIETEST_SUBTASK_THREADS": "2",
        "NIETEST_SUBTASK_OPS_PROCESSES": "1",
        "NIETEST_SUBTASK_OPS_THREADS": "2",
        "NIETEST_DRAIN_SECONDS": "5",
        "NIETEST_BROKER_HEARTBEAT_TIMEOUT": "3",
        "NIETEST_MAX_JOBS": str(MAX_JOBS),
        "NIETEST_MAX_LUMINA_JOBS": str(MAX_JOBS),
        "IMAGE_POLLING_INTERVAL": str(INTERVAL),
        "LUMINA_POLLING_INTERVAL": str(INTERVAL),
        "IMAGE_MAX_POLLING_ATTEMPTS": str(MAX_POLLS),
        "LUMINA_MAX_POLLING_ATTEMPTS": str(MAX_POLLS),
    }
    env.update(overrides)
    return env


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="nt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon(home: Path, api: FakeNieta, hook: FakeFeishu, alert_hook: FakeFeishu) -> Iterator[Daemon]:
    """The daemon most cases share: caps of 3 jobs per API, 0.2 s polls, 12 polls per job."""
    (home / "d").mkdir()
    d = Daemon(home / "d", **daemon_env(api, hook, alert_hook))
    d.start()
    yield d
    try:
        d.stop()
    finally:
        d.kill_everything()


@pytest.fixture(scope="module")
def store(daemon: Daemon) -> Iterator[Store]:
    s = open_store_for(daemon.settings)
    yield s
    s.close()


# --- helpers ----------------------------------------------------------------------------------------


def marker_task(name: str, markers: list[str], *, lumina: bool = False) -> dict[str, Any]:
    """A task with one variable prompt: one subtask per marker, the marker in its prompt text."""
    return taskdocs.task_document(
        name,
        [taskdocs.fixed_prompt("1girl, portrait"), taskdocs.variable_prompt("marker", [f"look {m}" for m in markers])],
        is_lumina=lumina,
    )


def write_task(directory: Path, doc: dict[str, Any]) -> Path:
    path = directory / f"task-{uuid.uuid4().hex[:8]}.json"
    path.write_text(json.dumps(doc))
    return path


def submit(daemon: Daemon, doc: dict[str, Any]) -> str:
    result = daemon.run("submit", str(write_task(daemon.home, doc)))
    task_id = result.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", task_id), result.stdout
    return task_id


def wait_task(store: Store, task_id: str, timeout: float = 45.0) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        task = store.get_task(task_id)
        return task if task and task["status"] in ("completed", "failed", "cancelled") else None

    return wait_for(ended, timeout, what=f"task {task_id} to end")


def title(message: dict[str, Any]) -> str:
    return message["card"]["header"]["title"]["content"]


def notices(hook: FakeFeishu, task_id: str) -> list[str]:
    """Titles of the task notices that name this task, in arrival order."""
    return [title(m) for m in hook.messages if isinstance(m, dict) and f"task id: {task_id}" in json.dumps(m)]


def settle(daemon: Daemon, hook: FakeFeishu, task_id: str, timeout: float = 20.0) -> None:
    """Wait for the task's final notice, then until the master queue is drained (nothing else on its way).

    The task turns terminal in the store an instant before its notice is enqueued, so an empty
    master queue alone does not prove the notice has come and gone."""
    wait_for(lambda: len(notices(hook, task_id)) >= 2, timeout, what="the final task notice")
    name = daemon.settings.queue("master").name

    def drained() -> bool:
        stats = queue_stats(daemon.redis, name)
        return stats["ready"] == 0 and stats["in_progress"] == 0 and stats["delayed"] == 0

    wait_for(drained, timeout, what="master queue drained")


def creates_since(api: FakeNieta, start: int) -> list[Recorded]:
    return [r for r in api.requests[start:] if r.endpoint == "create"]


def marker_of(text: str, pattern: str) -> str:
    found = re.findall(pattern, text)
    assert len(found) == 1, (pattern, text)
    return found[0]


def job_text(api: FakeNieta, job_uuid: str | None) -> str:
    job = api.job(job_uuid) if job_uuid else None
    return job.text if job else ""


def subtasks_by_marker(store: Store, task_id: str, pattern: str) -> dict[str, dict[str, Any]]:
    subs = store.list_subtasks(task_id)
    return {marker_of(json.dumps(s["prompts"]), pattern): s for s in subs}


def assert_counters_match(store: Store, task_id: str) -> dict[str, Any]:
    task = store.get_task(task_id)
    assert task is not None
    recount = store.recount(task_id)
    assert {k: task[k] for k in recount} == recount
    return task


# --- 6. validation (first: the daemon is still fresh) ------------------------------------------------


def test_invalid_task_is_refused_and_nothing_is_stored_or_enqueued(daemon: Daemon, store: Store) -> None:
    master = daemon.settings.queue("master").name
    # No master worker consumes while this runs, so an enqueued message would stay visible.
    daemon.run("ctl", "stop", "master:*")
    try:
        assert store.list_tasks(limit=1000) == []
        base = json.loads(EXAMPLE.read_text())
        cases = {
            "name": {k: v for k, v in base.items() if k != "name"},
            "ratio.value": {**base, "ratio": taskdocs.fixed_param("ratio", "wide")},
            "is_lumina.variable_values[1]": {**base, "is_lumina": {**base["is_lumina"], "variable_values": [True, 1]}},
            "prompts[0].type": {**base, "prompts": [{**base["prompts"][0], "type": "image"}, *base["prompts"][1:]]},
        }
        for field, doc in cases.items():
            result = daemon.run("submit", str(write_task(daemon.home, doc)), check=False)
            assert result.returncode != 0, field
            assert result.stdout == "", field
            assert field in result.stderr and "invalid task" in result.stderr, result.stderr
        not_json = daemon.home / "broken.json"
        not_json.write_text('{"name": "x", ')
        result = daemon.run("submit", str(not_json), check=False)
        assert result.returncode != 0 and "task: is not valid JSON" in result.stderr

        assert store.list_tasks(limit=1000) == []
        for key in ("master", "subtask", "subtask_ops"):
            stats = queue_stats(daemon.redis, daemon.settings.queue(key).name)
            assert stats == {"ready": 0, "in_progress": 0, "delayed": 0, "dead": 0}, (key, stats)

        # The control: a valid task is stored pending and its message waits on the master queue.
        task_id = submit(daemon, marker_task("control", ["val-0"]))
        assert store.get_task(task_id)["status"] == "pending"
        assert queue_stats(daemon.redis, master)["ready"] == 1
    finally:
        daemon.run("ctl", "start", "master:*")
    assert wait_task(store, task_id)["status"] == "completed"


# --- 1. the example task ------------------------------------------------------------------------------


def test_example_task_completes_with_one_job_per_subtask(
    daemon: Daemon, store: Store, api: FakeNieta, hook: FakeFeishu
) -> None:
    start = len(api.requests)
    example = json.loads(EXAMPLE.read_text())
    result = daemon.run("submit", str(EXAMPLE), "--wait", timeout=60)
    task_id = result.stdout.strip()
    task = store.get_task(task_id)
    assert task["status"] == "completed" and task["error"] is None
    assert (task["total_images"], task["completed_images"], task["failed_images"]) == (6, 6, 0)
    assert task["progress"] == 100.0
    assert set(task["variables_map"]) == {"0", "1"}
    assert task["variables_map"]["0"]["variable_id"] == "style"
    assert task["variables_map"]["1"]["variable_id"] == "lumina"

    subs = sorted(store.list_subtasks(task_id), key=lambda s: s["variable_indices"])
    styles = [v["value"] for v in example["prompts"][1]["variable_values"]]
    # Dimensions: the style prompt, then is_lumina; Cartesian product, last dimension fastest.
    assert [s["variable_indices"] for s in subs] == [list(c) for c in itertools.product(range(3), range(2))]
    assert [s["id"] for s in subs] == [f"{task_id}:{i}.{j}" for i, j in itertools.product(range(3), range(2))]

    creates = creates_since(api, start)
    assert len(creates) == 6, [r.body for r in creates]  # exactly one make_image per subtask
    by_uuid = {r.job_uuid: r for r in creates}
    for sub in subs:
        style_index, lumina_index = sub["variable_indices"]
        assert sub["status"] == "completed" and sub["error"] is None
        assert sub["is_lumina"] is (lumina_index == 1)
        assert styles[style_index] in json.dumps(sub["prompts"])
        assert (sub["width"], sub["height"]) == (888, 1184)
        assert sub["job_uuid"] in by_uuid
        request = by_uuid[sub["job_uuid"]]
        body = request.body
        assert sub["result"] == f"{api.ops_url if sub['is_lumina'] else api.url}/_image/{sub['job_uuid']}.png"
        assert isinstance(sub["seed"], int) and 1 <= sub["seed"] <= RANDOM_SEED_MAX
        assert body["seed"] == sub["seed"]  # the seed stored is the seed sent
        assert (body["width"], body["height"]) == (888, 1184)
        assert body["rawPrompt"][1]["value"] == styles[style_index]
        element_uuids = [p.get("uuid") for p in body["rawPrompt"]]
        if sub["is_lumina"]:
            assert request.ops and request.path == "/ops/v3/make_image"
            assert body["rawPrompt"][-1]["uuid"] == LUMINA_ELEMENT_UUID
            assert body["rawPrompt"][-1]["name"] == "lumina1"
            assert body["client_args"] == {"ckpt_name": "lumina_2", "cfg": 5.5, "steps": 30}
        else:
            assert not request.ops and request.path == "/v3/make_image"
            assert LUMINA_ELEMENT_UUID not in element_uuids
            assert "client_args" not in body
        # every poll of the job went to the host that created it
        polls = [r for r in api.requests[start:] if r.endpoint == "poll" and r.job_uuid == sub["job_uuid"]]
        assert polls and all(r.ops == request.ops and r.status == 200 for r in polls)
    assert len({s["seed"] for s in subs}) == 6  # no seed given: a random one per subtask

    settle(daemon, hook, task_id)
    assert [t.split("] ")[1] for t in notices(hook, task_id)] == ["Task submitted", "Task completed"]


# --- 2 + 8. FAILURE and ILLEGAL_IMAGE; status --json -------------------------------------------------

PARTIAL = ["pf-0", "pf-1", "pf-2", "pf-3", "pf-4", "pf-5"]


@pytest.fixture(scope="module")
def partial_task(daemon: Daemon, store: Store, api: FakeNieta) -> dict[str, Any]:
    """A task of 6 subtasks: pf-0 and pf-3 end FAILURE, pf-4 ILLEGAL_IMAGE, the others succeed."""
    api.add_rule("failure", marker="pf-0", error="GPU on fire: CUDA out of memory", generation_time=0.1)
    api.add_rule("failure", marker="pf-3", error="GPU on fire: CUDA out of memory", generation_time=0.1)
    api.add_rule("illegal_image", marker="pf-4", error="nsfw score 0.97", generation_time=0.1)
    start = len(api.requests)
    task_id = submit(daemon, marker_task("partial", PARTIAL))
    task = wait_task(store, task_id)
    return {"id": task_id, "task": task, "start": start}


def test_failure_and_moderation_end_their_subtask_at_once(
    daemon: Daemon, store: Store, api: FakeNieta, hook: FakeFeishu, partial_task: dict[str, Any]
) -> None:
    task_id, task = partial_task["id"], partial_task["task"]
    assert task["status"] == "completed"
    assert task["error"] == "partially completed: 3 of 6 images failed"
    assert (task["completed_images"], task["failed_images"], task["cancelled_images"]) == (3, 3, 0)
    assert_counters_match(store, task_id)

    subs = subtasks_by_marker(store, task_id, r"pf-\d")
    assert api.created_counts(r"pf-\d") == dict.fromkeys(PARTIAL, 1)  # one job each, moderation never retried
    expected_errors = {
        "pf-0": "GPU on fire: CUDA out of memory",  # the API's own text, verbatim
        "pf-3": "GPU on fire: CUDA out of memory",
        "pf-4": "refused by moderation (ILLEGAL_IMAGE): nsfw score 0.97",
    }
    for marker, sub in subs.items():
        if marker in expected_errors:
            assert sub["status"] == "failed"
            assert sub["error"] == expected_errors[marker]
            assert sub["result"] is None and sub["job_uuid"]
            job = api.job(sub["job_uuid"])
            assert 1 <= job.polls <= 2, (marker, job.polls)  # ended at once, not after the polling budget
            assert sub["poll_count"] <= 1
        else:
            assert sub["status"] == "completed" and sub["result"] and sub["error"] is None

    settle(daemon, hook, task_id)
    titles = notices(hook, task_id)
    assert len(titles) == 2 and titles[0].endswith("Task submitted"), titles
    assert titles[1].endswith("Task partially completed")
    final = next(m for m in hook.messages if f"task id: {task_id}" in json.dumps(m) and "partially" in title(m))
    text = json.dumps(final)
    assert "completed 3 · failed 3 · cancelled 0 of 6" in json.loads(text)["card"]["elements"][0]["text"]["content"]


def test_status_json_reports_counters_and_errors_by_text(daemon: Daemon, partial_task: dict[str, Any]) -> None:
    task_id = partial_task["id"]
    report = json.loads(daemon.run("status", task_id, "--json").stdout)
    assert report["id"] == task_id and report["name"] == "partial"
    assert report["status"] == "completed" and report["partially_completed"] is True
    assert (report["total_images"], report["processed_images"]) == (6, 6)
    assert (report["completed_images"], report["failed_images"], report["cancelled_images"]) == (3, 3, 0)
    assert report["progress"] == 100.0
    assert report["by_status"] == {"pending": 0, "processing": 0, "completed": 3, "failed": 3, "cancelled": 0}
    assert report["errors"] == [
        {"error": "GPU on fire: CUDA out of memory", "count": 2},
        {"error": "refused by moderation (ILLEGAL_IMAGE): nsfw score 0.97", "count": 1},
    ]
    text = daemon.run("status", task_id).stdout
    assert "partially completed" in text and "2 x GPU on fire" in text
    missing = daemon.run("status", "0" * 32, check=False)
    assert missing.returncode != 0 and "no task" in missing.stderr


# --- 3. TIMEOUT, transient HTTP errors, a job that never ends ---------------------------------------


def test_timeout_and_transient_http_errors_are_retried_within_budget(
    daemon: Daemon, store: Store, api: FakeNieta, hook: FakeFeishu
) -> None:
    markers = ["rt-to", "rt-5c", "rt-4c", "rt-5p", "rt-4p", "rt-ok"]
    api.add_rule("timeout", marker="rt-to", times=1, error="worker lost", generation_time=0.1)
    api.add_rule("http_500", endpoint="create", marker="rt-5c", times=2)
    api.add_rule("http_429", endpoint="create", marker="rt-4c", times=2, retry_after=0.3)
    api.add_rule("http_500", endpoint="poll", marker="rt-5p", times=2)
    api.add_rule("http_429", endpoint="poll", marker="rt-4p", times=3, retry_after=0.2)
    start = len(api.requests)
    task_id = submit(daemon, marker_task("retries", markers))
    task = wait_task(store, task_id)
    assert task["status"] == "completed" and task["error"] is None, task
    assert task["completed_images"] == 6
    assert_counters_match(store, task_id)

    # TIMEOUT earns exactly one new job (TIMEOUT_RESUBMITS = 1); HTTP errors never create extra jobs.
    assert api.created_counts(r"rt-\w\w") == {"rt-to": 2, "rt-5c": 1, "rt-4c": 1, "rt-5p": 1, "rt-4p": 1, "rt-ok": 1}
    subs = subtasks_by_marker(store, task_id, r"rt-\w\w")
    jobs = [j for j in api.jobs if "rt-to" in j.text]
    assert subs["rt-to"]["job_uuid"] == max(jobs, key=lambda j: j.created).uuid  # the new job's result counts
    assert subs["rt-to"]["seed"] == jobs[0].body["seed"] == jobs[1].body["seed"]  # the resubmit keeps the seed
    for sub in subs.values():
        assert sub["status"] == "completed" and sub["result"].endswith(f"/_image/{sub['job_uuid']}.png")

    # The fake really answered the errors, and the pipeline got past them.
    answered = Counter()
    for r in api.requests[start:]:
        text = json.dumps(r.body) if r.endpoint == "create" else job_text(api, r.job_uuid)
        found = re.findall(r"rt-\w\w", text)
        if found and r.status in (429, 500):
            answered[(found[0], r.endpoint, r.status)] += 1
    assert answered == {
        ("rt-5c", "create", 500): 2,
        ("rt-4c", "create", 429): 2,
        ("rt-5p", "poll", 500): 2,
        ("rt-4p", "poll", 429): 3,
    }
    settle(daemon, hook, task_id)
    assert [t.split("] ")[1] for t in notices(hook, task_id)] == ["Task submitted", "Task completed"]


def test_job_pending_past_the_budget_and_repeated_timeouts_fail(
    daemon: Daemon, store: Store, api: FakeNieta, hook: FakeFeishu
) -> None:
    api.add_rule("never", marker="nv-pending")
    api.add_rule("timeout", marker="nv-timeout", times=5, error="queue full", generation_time=0.1)
    submitted = time.monotonic()
    task_id = submit(daemon, marker_task("never", ["nv-pending", "nv-timeout"]))
    task = wait_task(store, task_id)
    elapsed = time.monotonic() - submitted
    assert task["status"] == "failed" and task["failed_images"] == 2
    subs = subtasks_by_marker(store, task_id, r"nv-\w+")

    pending = subs["nv-pending"]
    assert pending["status"] == "failed" and pending["job_uuid"]  # the job uuid stays stored
    assert pending["poll_count"] == MAX_POLLS
    assert api.job(pending["job_uuid"]).polls == MAX_POLLS
    assert pending["job_uuid"] in pending["error"] and f"after {MAX_POLLS} polls" in pending["error"]
    waited = float(re.search(r"over ([0-9.]+) s", pending["error"]).group(1))
    assert MAX_POLLS * INTERVAL <= waited <= elapsed, pending["error"]  # how long it really waited

    timed_out = subs["nv-timeout"]
    assert timed_out["status"] == "failed"
    assert timed_out["error"] == "the API timed the job out (TIMEOUT) 2 times: queue full"
    assert api.created_counts(r"nv-\w+") == {"nv-pending": 1, "nv-timeout": 2}
    settle(daemon, hook, task_id)
    assert [t.split("] ")[1] for t in notices(hook, task_id)] == ["Task submitted", "Task failed"]


# --- 5. cancel during a run --------------------------------------------------------------------------


def test_cancel_during_a_run_stops_new_jobs(daemon: Daemon, store: Store, api: FakeNieta, hook: FakeFeishu) -> None:
    """The cancel lands with jobs in flight and subtasks waiting for a slot, by construction.

    The first MAX_JOBS jobs finish at once; the next MAX_JOBS never do, so they hold every slot
    while the rest wait. Their polls are answered slowly (a polling budget of about 14 s instead
    of 2.4 s), so the cancel always finds them running.
    """
    markers = [f"cx-{i:02d}" for i in range(12)]
    api.add_rule("slow", marker="cx-", generation_time=0.3, times=MAX_JOBS)
    api.add_rule("never", marker="cx-")
    api.add_rule("delay", endpoint="poll", marker="cx-", delay=1.0)
    task_id = submit(daemon, marker_task("cancel me", markers))

    def hanging() -> set[str]:
        """The jobs that never finish, once all of them are created and the daemon polls each."""
        jobs = [j for j in api.jobs if re.search(r"cx-\d\d", j.text) and j.outcome and j.outcome.action == "never"]
        polled = {j.uuid for j in jobs if j.polls >= 1}
        return polled if len(jobs) == MAX_JOBS and len(polled) == MAX_JOBS else set()

    running = wait_for(hanging, 30, what="the first jobs done, the next ones running")
    assert store.get_task(task_id)["status"] == "processing"
    result = daemon.run("cancel", task_id)
    cancelled_at = time.time()
    assert "cancel requested" in result.stdout

    task = wait_task(store, task_id, timeout=30)
    assert task["status"] == "cancelled"
    settle(daemon, hook, task_id)
    creates = [r for r in api.requests_to("create") if re.search(r"cx-\d\d", json.dumps(r.body))]
    # A create that had passed its last cancel check before the cancel returned may still arrive
    # an instant later; none may come after that.
    late = [round(r.time - cancelled_at, 3) for r in creates if r.time > cancelled_at + 0.5]
    assert late == [], late
    # The waiting subtasks never got a job: the hanging ones kept the slots until the cancel.
    assert len(creates) == 2 * MAX_JOBS
    assert api.duplicates(r"cx-\d\d") == {}

    subs = store.list_subtasks(task_id)
    counts = Counter(s["status"] for s in subs)
    assert counts == {"completed": MAX_JOBS, "cancelled": len(markers) - MAX_JOBS}, counts
    assert_counters_match(store, task_id)
    # Running jobs are not polled further once their subtask is cancelled.
    cut_short = [s for s in subs if s["status"] == "cancelled" and s["job_uuid"]]
    assert {s["job_uuid"] for s in cut_short} == running
    for sub in cut_short:
        assert sub["error"] == "task cancelled while its image job ran", sub["error"]
        polls = [r.time for r in api.requests_to("poll") if r.job_uuid == sub["job_uuid"]]
        assert all(t <= sub["completed_at"].timestamp() + 0.5 for t in polls)
    titles = [t.split("] ")[1] for t in notices(hook, task_id)]
    assert titles == ["Task submitted", "Task cancelled"]
    # Every slot came back, and no cancelled subtask is left waiting for one.
    holders = keys.slot_holders(Lane.STANDARD)
    wait_for(lambda: daemon.redis.zcard(holders) == 0, 10, what="slots of the cancelled task freed")
    assert not daemon.redis.exists(keys.sched_ready(Lane.STANDARD, task_id))
    assert not daemon.redis.hexists(keys.sched_task_owner(Lane.STANDARD), task_id)
    # Cancelling again is harmless and sends nothing more.
    daemon.run("cancel", task_id)
    settle(daemon, hook, task_id)
    assert len(notices(hook, task_id)) == 2


# --- 7. the cap -------------------------------------------------------------------------------------


def in_flight_peak(api: FakeNieta, job_uuids: set[str]) -> int:
    """Most jobs in flight at once, seen from the API: from the create until the poll that returned SUCCESS."""
    events: list[tuple[float, int]] = []
    for job_uuid in job_uuids:
        create = next(r for r in api.requests_to("create") if r.job_uuid == job_uuid)
        polls = [r for r in api.requests_to("poll") if r.job_uuid == job_uuid and r.status == 200]
        events += [(create.time, 1), (max(r.time for r in polls), -1)]
    peak = current = 0
    for _, delta in sorted(events, key=lambda e: (e[0], -e[1])):  # at a tie, count the start first
        current += delta
        peak = max(peak, current)
    return peak


def test_jobs_in_flight_never_exceed_the_cap(daemon: Daemon, store: Store, api: FakeNieta) -> None:
    markers = [f"cap-{i:02d}" for i in range(12)]
    api.add_rule("slow", marker="cap-", generation_time=1.0)
    started = time.monotonic()
    task_id = submit(daemon, marker_task("cap", markers))
    # 4 rounds of 3 jobs of ~1 s: every round starts from the admission a finished job makes.
    task = wait_task(store, task_id, timeout=25)
    took = time.monotonic() - started
    assert task["status"] == "completed" and task["completed_images"] == 12
    assert api.created_counts(r"cap-\d\d") == dict.fromkeys(markers, 1)
    uuids = {s["job_uuid"] for s in store.list_subtasks(task_id)}
    assert in_flight_peak(api, uuids) == MAX_JOBS
    assert took < 20, took


# --- 4. kill -9 workers while their subtasks poll ---------------------------------------------------


@pytest.fixture(scope="module")
def kill_api() -> Iterator[FakeNieta]:
    with FakeNieta(generation_time=4.0) as fake:  # jobs run long enough to be polled through a kill
        yield fake


@pytest.fixture(scope="module")
def kill_daemon(home: Path, kill_api: FakeNieta, alert_hook: FakeFeishu) -> Iterator[tuple[Daemon, FakeFeishu]]:
    with FakeFeishu() as task_hook:
        (home / "k").mkdir()
        env = daemon_env(
            kill_api,
            task_hook,
            alert_hook,
            NIETEST_MAX_JOBS="50",
            NIETEST_SUBTASK_THREADS="3",
            IMAGE_MAX_POLLING_ATTEMPTS="200",
        )
        d = Daemon(home / "k", **env)
        d.start()
        yield d, task_hook
        try:
            d.stop()
        finally:
            d.kill_everything()


def kill_9(daemon: Daemon, *names: str) -> dict[str, int]:
    before = daemon.pids()
    for name in names:
        os.kill(before[name], signal.SIGKILL)
    return before


def wait_replaced(daemon: Daemon, before: dict[str, int], *names: str) -> None:
    def replaced() -> bool:
        now = daemon.pids()
        return all(now.get(n) not in (None, before[n]) for n in names)

    wait_for(replaced, 20, what=f"{names} replaced")


def test_kill_9_of_a_worker_while_its_subtasks_poll_loses_nothing(
    kill_daemon: tuple[Daemon, FakeFeishu], kill_api: FakeNieta
) -> None:
    daemon, hook = kill_daemon
    store = open_store_for(daemon.settings)
    markers = [f"k9-{i:02d}" for i in range(10)]
    task_id = submit(daemon, marker_task("kill -9", markers))

    def all_polling() -> bool:
        subs = store.list_subtasks(task_id)
        return len(subs) == 10 and all(s["job_uuid"] and s["poll_count"] >= 1 for s in subs)

    wait_for(all_polling, 20, what="every subtask has a job and polls")
    stored = {s["id"]: s["job_uuid"] for s in store.list_subtasks(task_id)}
    before = kill_9(daemon, "subtask:subtask_00")  # it holds some of the subtasks' poll messages

    task = wait_task(store, task_id, timeout=40)
    assert task["status"] == "completed" and task["error"] is None
    assert task["completed_images"] == 10
    assert_counters_match(store, task_id)
    assert kill_api.duplicates(r"k9-\d\d") == {}  # no second make_image for a subtask with a job uuid
    for sub in store.list_subtasks(task_id):
        assert sub["status"] == "completed"
        assert sub["job_uuid"] == stored[sub["id"]]
        assert sub["result"].endswith(f"/_image/{sub['job_uuid']}.png")
    wait_replaced(daemon, before, "subtask:subtask_00")
    settle(daemon, hook, task_id)
    assert [t.split("] ")[1] for t in notices(hook, task_id)] == ["Task submitted", "Task completed"]
    store.close()


def test_kill_9_of_every_subtask_worker_during_a_create_pays_no_second_job(
    kill_daemon: tuple[Daemon, FakeFeishu], kill_api: FakeNieta
) -> None:
    """The message that was creating a job dies with its worker. The API may have made the job
    (it has no idempotency key), so the redelivery must not create another: the subtask fails,
    saying why, and the others are untouched."""
    daemon, hook = kill_daemon
    store = open_store_for(daemon.settings)
    kill_api.add_rule("delay", endpoint="create", marker="kc-slow", delay=4.0, times=1)
    markers = [f"kc-{i:02d}" for i in range(6)]
    task_id = submit(daemon, marker_task("kill -9 mid-create", [*markers, "kc-slow"]))

    def ready() -> bool:
        subs = subtasks_by_marker(store, task_id, r"kc-\w+")
        slow = [r for r in kill_api.requests_to("create") if "kc-slow" in json.dumps(r.body)]
        polling = all(subs[m]["job_uuid"] and subs[m]["poll_count"] >= 1 for m in markers) if len(subs) == 7 else False
        return polling and len(slow) == 1 and slow[0].status is None  # its create is in flight

    wait_for(ready, 20, what="jobs polling and one create in flight")
    stored = {s["id"]: s["job_uuid"] for s in store.list_subtasks(task_id)}
    slow_id = subtasks_by_marker(store, task_id, r"kc-\w+")["kc-slow"]["id"]
    assert stored[slow_id] is None
    names = [n for n in daemon.pids() if n.startswith("subtask:")]
    before = kill_9(daemon, *names)

    task = wait_task(store, task_id, timeout=40)
    assert task["status"] == "completed" and task["completed_images"] == 6 and task["failed_images"] == 1
    assert_counters_match(store, task_id)
    for sub in store.list_subtasks(task_id):
        if sub["id"] == slow_id:
            assert sub["status"] == "failed" and sub["error"] == CREATE_INTERRUPTED and sub["job_uuid"] is None
        else:
            assert sub["status"] == "completed" and sub["job_uuid"] == stored[sub["id"]]
    # The create cut off by the kill still made its job at the API; no second one was made.
    wait_for(lambda: kill_api.created_count("kc-slow") == 1, 10, what="the orphaned create to finish")
    assert kill_api.duplicates(r"kc-\w+") == {}
    wait_replaced(daemon, before, *names)
    settle(daemon, hook, task_id)
    assert [t.split("] ")[1] for t in notices(hook, task_id)] == ["Task submitted", "Task partially completed"]
    store.close()


def test_final_notice_never_enqueued_is_sent_by_a_redelivered_message(
    daemon: Daemon, store: Store, api: FakeNieta, hook: FakeFeishu
) -> None:
    """The process that finalised a task died before it enqueued the notice: the redelivery of the
    message that finished the last subtask (it finds its subtask terminal) must send it, once."""
    task_id = submit(daemon, marker_task("lost notice", ["ln-0", "ln-1"]))
    assert wait_task(store, task_id)["status"] == "completed"
    settle(daemon, hook, task_id)
    # Undo the enqueue's traces, as if it never happened.
    daemon.redis.delete(keys.notice_final_queued(task_id), keys.notice(task_id, "completed"))
    before = len(notices(hook, task_id))
    sub = store.list_subtasks(task_id)[0]
    queue = daemon.settings.queue("subtask").name
    message = dramatiq.Message(queue_name=queue, actor_name="run_subtask", args=(sub["id"],), kwargs={}, options={})
    for _ in range(2):  # redelivered twice: still one notice
        daemon.broker.enqueue(message.copy(message_id=str(uuid.uuid4())))
    wait_for(lambda: len(notices(hook, task_id)) == before + 1, 20, what="the lost final notice")

    def both_ran() -> bool:
        stats = queue_stats(daemon.redis, queue)
        return stats["ready"] == 0 and stats["in_progress"] == 0

    wait_for(both_ran, 20, what="both copies ran")
    settle(daemon, hook, task_id)
    assert [t.split("] ")[1] for t in notices(hook, task_id)][-1] == "Task completed"
    assert len(notices(hook, task_id)) == before + 1


def test_kill_9_of_the_embedded_broker_mid_run_loses_nothing(
    kill_daemon: tuple[Daemon, FakeFeishu], kill_api: FakeNieta
) -> None:
    """supervisord restarts the broker from its append-only file. The workers' consumers restart
    too, dropping the delayed polls they held in memory; those come back to the queue after the
    heartbeat timeout (the workers take new broker ids), so every subtask still completes, once."""
    daemon, _ = kill_daemon
    store = open_store_for(daemon.settings)
    markers = [f"kb-{i:02d}" for i in range(8)]
    task_id = submit(daemon, marker_task("kill -9 broker", markers))
    wait_for(
        lambda: len(subs := store.list_subtasks(task_id)) == 8 and all(s["job_uuid"] for s in subs),
        20,
        what="every subtask has a job",
    )
    stored = {s["id"]: s["job_uuid"] for s in store.list_subtasks(task_id)}
    valkey_pid = int((daemon.settings.run_dir / "valkey.pid").read_text())
    os.kill(valkey_pid, signal.SIGKILL)

    task = wait_task(store, task_id, timeout=60)
    assert task["status"] == "completed" and task["completed_images"] == 8
    assert_counters_match(store, task_id)
    assert kill_api.duplicates(r"kb-\d\d") == {}
    assert {s["id"]: s["job_uuid"] for s in store.list_subtasks(task_id)} == stored
    log = "".join(p.read_text() for p in daemon.log_files() if p.name.startswith("subtask_"))
    assert "unacked messages will be redelivered" in log
    store.close()
