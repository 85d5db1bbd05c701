"""End-to-end: the real pipeline against a Nieta API that answers garbage, on create and on poll.

The fixtures are test_pipeline_e2e.py's (imported, so this module gets its own daemon and its
own fake API): `nietest daemon` with 1 master and 2+1 subtask worker processes, 0.2 s polls and a
cap of 3 jobs per API. One task of one subtask per marker; the fake answers each marker's
requests with its own kind of garbage (HTML error pages, empty and huge bodies, JSON of the wrong
type or shape, lone surrogates, a job uuid the poll endpoint does not know). Each such subtask
must fail with an error that says what was wrong, the others complete, the task's counters add
up, and no worker process crashes (same pids before and after, no dead letter, no unhandled
exception in any worker log).

Garbage that is retryable on poll (an unusable 200 body) is polled again, POLL_ERROR_RETRIES
times, before the subtask fails. A 5xx HTML page is retryable too, but the client's own backoff
(5 attempts, ~6 s) times the pipeline's retries would take ~40 s on poll and ~60 s on create for
a page that never goes away, so here it comes twice and then goes away (the subtask completes);
the pages that must fail the subtask are a 403 (a WAF) and a 200 (a captive portal).
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import pytest
import test_pipeline_e2e as shared

from nietest_daemon.clients.nieta import MAX_BODY_BYTES
from nietest_daemon.internals.dramatiq_redis import queue_stats
from nietest_daemon.pipeline.subtasks import POLL_ERROR_RETRIES
from nietest_daemon.store import Store
from nietest_daemon.testing.daemon import Daemon
from nietest_daemon.testing.fake_nieta import FakeNieta

pytestmark = pytest.mark.e2e

# test_pipeline_e2e.py's fixtures, found here by name: this module gets its own daemon and fake API.
alert_hook = shared.alert_hook
api = shared.api
daemon = shared.daemon
home = shared.home
hook = shared.hook
store = shared.store

GHOST_JOB = str(uuid.uuid4())  # a job uuid the API hands out but its poll endpoint does not know
WAF_PAGE = (
    "<html><head><title>403 Forbidden</title><style>h1 {color: red}</style></head>"
    "<body><h1>403 Forbidden</h1><p>Request blocked by WAF rule 9241</p></body></html>"
)

#: marker -> (rule options, what the subtask's error must contain). Every rule applies always.
FAIL_ON_CREATE: dict[str, tuple[dict[str, Any], list[str]]] = {
    "bx-c-waf": ({"action": "html", "status": 403, "body": WAF_PAGE}, ["make_image: HTTP 403", "blocked by WAF"]),
    "bx-c-portal": ({"action": "html", "status": 200}, ["HTTP 200 without a job uuid", "502 Bad Gateway"]),
    "bx-c-empty": ({"action": "empty"}, ["HTTP 200 without a job uuid: (empty body)"]),
    "bx-c-huge": ({"action": "huge", "size": 3 * MAX_BODY_BYTES}, [f"(body larger than {MAX_BODY_BYTES} bytes)"]),
    "bx-c-list": ({"action": "wrong_type"}, ["without a job uuid: [1, 2, 3]"]),
    "bx-c-float": ({"action": "wrong_type", "body": {"uuid": 12.5, "data": [GHOST_JOB]}}, ['"uuid": 12.5']),
    "bx-c-surrogate": (
        {"action": "raw", "body": '{"uuid": "\\ud800-job"}', "content_type": "application/json"},
        ["without a job uuid", "\\ud800-job"],
    ),
    "bx-c-ghost": (
        {"action": "raw", "body": json.dumps(GHOST_JOB), "content_type": "application/json"},
        [f"could not poll image job {GHOST_JOB}: artifact/task: HTTP 404: task not found"],
    ),
}
FAIL_ON_POLL: dict[str, tuple[dict[str, Any], list[str]]] = {
    "bx-p-portal": ({"action": "html", "status": 200}, ["unusable body: <!DOCTYPE html>", "502 Bad Gateway"]),
    "bx-p-empty": ({"action": "empty"}, ["HTTP 200 with an unusable body: (empty body)"]),
    "bx-p-huge": ({"action": "huge", "size": 2 * MAX_BODY_BYTES}, [f"(body larger than {MAX_BODY_BYTES} bytes)"]),
    "bx-p-list": ({"action": "wrong_type"}, ["unusable body: [1, 2, 3]"]),
    "bx-p-number": ({"action": "wrong_type", "body": 42}, ["unusable body: 42"]),
    "bx-p-status": (
        {"action": "wrong_type", "body": {"task_status": 42, "artifacts": {"url": 7}}},
        ["unknown task_status '42'"],
    ),
    "bx-p-artifacts": (
        {"action": "wrong_type", "body": {"task_status": "SUCCESS", "artifacts": "https://x.invalid/1.png"}},
        ["succeeded without an image url"],
    ),
    "bx-p-unknown": ({"action": "unknown_job"}, ["artifact/task: HTTP 404: task not found"]),
    "bx-p-surrogate": (
        {"action": "raw", "body": '{"task_status": "FAILURE", "err_msg": "GPU \\ud800 melted"}'},
        ["GPU \ufffd melted"],
    ),
}
#: Garbage that goes away after two answers: retried, then the subtask completes with one job.
RECOVER: dict[str, dict[str, Any]] = {
    "bx-r-c502": {"action": "html", "endpoint": "create", "times": 2},  # retried inside the client
    "bx-r-p502": {"action": "html", "endpoint": "poll", "times": 2},
    "bx-r-pempty": {"action": "empty", "endpoint": "poll", "times": 2},  # retried by the pipeline
}
HEALTHY = ["bx-ok-0", "bx-ok-1"]
PATTERN = r"bx-(?:[cpr]-[a-z0-9]+|ok-\d)"
#: Polls a subtask makes when every answer is retryable garbage: the first and its retries.
RETRIED_POLLS = {"bx-p-portal", "bx-p-empty", "bx-p-huge", "bx-p-list", "bx-p-number"}


def markers() -> list[str]:
    return [*FAIL_ON_CREATE, *FAIL_ON_POLL, *RECOVER, *HEALTHY]


def worker_log_text(d: Daemon) -> str:
    return "".join(p.read_text(errors="replace") for p in d.log_files() if p.name.startswith(("master", "subtask")))


def test_markers_select_one_subtask_each() -> None:
    names = markers()
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(PATTERN, m) for m in names)
    assert not [(a, b) for a in names for b in names if a != b and a in b]  # the fake matches substrings


def test_garbage_answers_fail_only_their_subtask_with_a_clear_error(
    daemon: Daemon, store: Store, api: FakeNieta
) -> None:
    for marker, (options, _) in FAIL_ON_CREATE.items():
        api.add({**options, "endpoint": "create", "marker": marker})
    for marker, (options, _) in FAIL_ON_POLL.items():
        api.add({**options, "endpoint": "poll", "marker": marker})
    for marker, options in RECOVER.items():
        api.add({**options, "marker": marker})
    daemon.wait_running()
    pids = daemon.pids()
    crashes_before = worker_log_text(daemon).count("unhandled exception")

    task_id = shared.submit(daemon, shared.marker_task("garbage answers", markers()))
    task = shared.wait_task(store, task_id, timeout=90)

    failing = {**FAIL_ON_CREATE, **FAIL_ON_POLL}
    assert task["status"] == "completed", task
    assert task["error"] == f"partially completed: {len(failing)} of {len(markers())} images failed"
    assert (task["completed_images"], task["failed_images"], task["cancelled_images"]) == (
        len(RECOVER) + len(HEALTHY),
        len(failing),
        0,
    )
    assert task["total_images"] == task["processed_images"] == len(markers())
    shared.assert_counters_match(store, task_id)

    subs = shared.subtasks_by_marker(store, task_id, PATTERN)
    assert sorted(subs) == sorted(markers())
    for marker, (_, words) in failing.items():
        sub = subs[marker]
        assert sub["status"] == "failed", (marker, sub)
        for word in words:
            assert word in sub["error"], (marker, word, sub["error"])
        assert len(sub["error"]) < 1000, (marker, len(sub["error"]))
        sub["error"].encode()  # storable text: no lone surrogate made it through
    for marker in FAIL_ON_CREATE:
        if marker != "bx-c-ghost":
            assert subs[marker]["error"].startswith("could not create the image job: "), subs[marker]["error"]
            assert subs[marker]["job_uuid"] is None  # nothing usable to poll
    assert "<" not in subs["bx-c-waf"]["error"].split("HTTP 403")[1]  # the page's text, not its markup
    assert subs["bx-c-ghost"]["job_uuid"] == GHOST_JOB
    for marker in [*RECOVER, *HEALTHY]:
        sub = subs[marker]
        assert sub["status"] == "completed" and sub["error"] is None, (marker, sub)
        assert sub["result"] == f"{api.url}/_image/{sub['job_uuid']}.png"

    # Each subtask paid for at most one job: a garbled create is not sent again (the job may exist).
    created = api.created_counts(PATTERN)
    assert {m: created.get(m, 0) for m in FAIL_ON_CREATE} == dict.fromkeys(FAIL_ON_CREATE, 0)
    assert {m: created[m] for m in [*FAIL_ON_POLL, *RECOVER, *HEALTHY]} == dict.fromkeys(
        [*FAIL_ON_POLL, *RECOVER, *HEALTHY], 1
    )
    creates = [r for r in api.requests_to("create") if re.search(PATTERN, json.dumps(r.body))]
    per_marker = {m: sum(1 for r in creates if m in json.dumps(r.body)) for m in [*FAIL_ON_CREATE, "bx-r-c502"]}
    assert per_marker == {**dict.fromkeys(FAIL_ON_CREATE, 1), "bx-r-c502": 3}

    # Retryable garbage on poll is polled again within the budget, then fails; final garbage at once.
    polls = {m: sum(1 for r in api.requests_to("poll") if r.job_uuid == subs[m]["job_uuid"]) for m in FAIL_ON_POLL}
    assert polls == {
        **{m: 1 + POLL_ERROR_RETRIES for m in RETRIED_POLLS},
        "bx-p-status": 1,
        "bx-p-unknown": 1,
        "bx-p-surrogate": 1,
        "bx-p-artifacts": 2,  # a SUCCESS without a url is polled once more
    }
    assert sum(1 for r in api.requests_to("poll") if r.job_uuid == GHOST_JOB) == 1

    # No worker crashed, restarted or dead-lettered a message.
    assert daemon.pids() == pids
    for key in ("master", "subtask", "subtask_ops"):
        assert queue_stats(daemon.redis, daemon.settings.queue(key).name)["dead"] == 0, key
    assert worker_log_text(daemon).count("unhandled exception") == crashes_before
