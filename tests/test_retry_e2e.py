"""End to end: `nietest retry` on a real daemon, against the fake Nieta API and a fake Feishu bot.

The fake fails three of eight images the first time (two FAILURE, one ILLEGAL_IMAGE); the retry
runs those three again, and they succeed. Afterwards every image is completed, only the three were
paid for twice (creates counted per marker in the fake), the counters are exact, each round had
its one final notice, and the report and the export show the result.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_pipeline_e2e import assert_counters_match, daemon_env, marker_task, notices, submit, subtasks_by_marker
from test_results import Dom

from nietest_daemon.store import Store, open_store_for
from nietest_daemon.testing.daemon import Daemon
from nietest_daemon.testing.fake_feishu import FakeFeishu
from nietest_daemon.testing.fake_nieta import FakeNieta
from nietest_daemon.testing.waiting import wait_for

pytestmark = pytest.mark.e2e

MARKERS = [f"ry-{i}" for i in range(8)]
FAILING = {"ry-1": "failure", "ry-4": "failure", "ry-6": "illegal_image"}


@pytest.fixture
def fakes() -> Iterator[tuple[FakeNieta, FakeFeishu, FakeFeishu]]:
    with FakeNieta(generation_time=0.2) as api, FakeFeishu() as hook, FakeFeishu() as alert_hook:
        yield api, hook, alert_hook


def wait_ended(store: Store, task_id: str, timeout: float = 45.0) -> dict:
    def ended() -> dict | None:
        task = store.get_task(task_id)
        return task if task and task["status"] in ("completed", "failed", "cancelled") else None

    return wait_for(ended, timeout, what=f"task {task_id} to end")


def test_retry_runs_the_failed_images_again_and_pays_only_for_them(
    make_daemon: Callable[..., Daemon], fakes: tuple[FakeNieta, FakeFeishu, FakeFeishu], tmp_path: Path
) -> None:
    api, hook, alert_hook = fakes
    daemon = make_daemon(**daemon_env(api, hook, alert_hook)).start()
    for marker, action in FAILING.items():
        api.add_rule(action, marker=marker, times=1, error=f"{marker} went wrong", generation_time=0.1)
    store = open_store_for(daemon.settings)
    try:
        task_id = submit(daemon, marker_task("retry campaign", MARKERS))
        first = wait_ended(store, task_id)
        assert first["status"] == "completed" and first["error"] == "partially completed: 3 of 8 images failed"
        assert (first["completed_images"], first["failed_images"], first["round"]) == (5, 3, 1)
        wait_for(lambda: len(notices(hook, task_id)) == 2, 20, what="round 1's final notice")
        assert api.created_counts(r"ry-\d") == dict.fromkeys(MARKERS, 1)

        # Round 2: the jobs now take a while, so that the task is surely still running for the second retry.
        api.add_rule("slow", marker="ry-", generation_time=1.5)
        result = daemon.run("retry", task_id)
        assert f"task {task_id}: round 2: 3 failed subtasks run again" in result.stdout, result.stdout
        running = store.get_task(task_id)
        assert running["status"] == "processing" and running["round"] == 2
        assert (running["processed_images"], running["failed_images"], running["completed_images"]) == (5, 0, 5)
        again = daemon.run("retry", task_id, check=False)
        assert again.returncode == 2 and f"task {task_id} is still running (processing)" in again.stderr

        final = wait_ended(store, task_id)
        assert final["status"] == "completed" and final["error"] is None and final["round"] == 2
        assert (final["completed_images"], final["failed_images"], final["processed_images"]) == (8, 0, 8)
        assert final["progress"] == 100.0
        assert_counters_match(store, task_id)
        # Only the three failed images were paid for twice.
        assert api.created_counts(r"ry-\d") == {m: 2 if m in FAILING else 1 for m in MARKERS}
        subs = subtasks_by_marker(store, task_id, r"ry-\d")
        for marker, sub in subs.items():
            assert sub["status"] == "completed" and sub["result"].endswith(f"/_image/{sub['job_uuid']}.png")
            if marker in FAILING:
                [earlier] = sub["error_history"]
                assert earlier["status"] == "failed" and earlier["round"] == 1 and marker in earlier["error"]
                assert earlier["job_uuid"] != sub["job_uuid"] and sub["round"] == 2
            else:
                assert sub["error_history"] == [] and sub["round"] == 1

        # One final notice per round.
        wait_for(lambda: len(notices(hook, task_id)) == 3, 20, what="round 2's final notice")
        titles = [t.split("] ")[-1] for t in notices(hook, task_id)]
        assert titles == ["Task submitted", "Task partially completed", "Task completed"]
        last = [m for m in hook.messages if f"task id: {task_id}" in json.dumps(m)][-1]
        assert "round 2" in json.dumps(last, ensure_ascii=False)
        assert "completed 8 · failed 0 · cancelled 0 of 8" in json.dumps(last, ensure_ascii=False)

        # What the people who ran the campaign look at.
        exported = daemon.run("export", task_id, "--format", "csv").stdout
        rows = list(csv.DictReader(io.StringIO(exported, newline="")))
        assert len(rows) == 8 and {r["status"] for r in rows} == {"completed"}
        assert sorted(r["attempt"] for r in rows) == ["1"] * 5 + ["2"] * 3
        page = tmp_path / "report.html"
        daemon.run("report", task_id, "-o", str(page))
        dom = Dom(page.read_text())
        assert dom.count("td", "completed") == dom.count("img") == 8 and dom.count("details", "hist") == 3
        tasks = json.loads(daemon.run("tasks", "--json").stdout)
        assert [(t["id"], t["status"], t["round"]) for t in tasks] == [(task_id, "completed", 2)]
    finally:
        store.close()
