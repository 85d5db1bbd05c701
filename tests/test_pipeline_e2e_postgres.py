"""End to end on the PostgreSQL store: a chosen subset of test_pipeline_e2e.py and test_retry_e2e.py,
the same test functions run again here against daemons whose store is a database of their own on
the machine's PostgreSQL (`NIETEST_STORE_URL`, nietest_daemon/testing/postgres.py; each daemon
prepares it at start, as in a deployment).

The subset covers what the store does on the way of a task: the example task end to end (expand,
start, record the job, finish, finalise), failures and moderation counted and reported by error
text, a cancel during a run, a lost final notice sent by a redelivered message, a worker killed
with `kill -9` while its subtasks poll, and a retry of the failed images (the store's one
transaction). The kill of every subtask worker during a create and the embedded broker's kill are
left to the PostgreSQL chaos run (tests/test_chaos.py), which kills both, and more, for less time.
Skipped, saying why, when no PostgreSQL server answers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import test_pipeline_e2e as shared
import test_retry_e2e as retry

from nietest_daemon.testing import postgres
from nietest_daemon.testing.daemon import Daemon
from nietest_daemon.testing.fake_feishu import FakeFeishu
from nietest_daemon.testing.fake_nieta import FakeNieta

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(postgres.unavailable_reason() is not None, reason=postgres.unavailable_reason() or ""),
]

# test_pipeline_e2e.py's fixtures, found here by name: this module gets its own fakes and daemons.
alert_hook = shared.alert_hook
api = shared.api
home = shared.home
hook = shared.hook
kill_api = shared.kill_api
partial_task = shared.partial_task
store = shared.store  # opened from the daemon's settings: the PostgreSQL store
fakes = retry.fakes

# The tests, run here on PostgreSQL (each also runs in its own module on SQLite).
test_example_task_completes_with_one_job_per_subtask = shared.test_example_task_completes_with_one_job_per_subtask
test_failure_and_moderation_end_their_subtask_at_once = shared.test_failure_and_moderation_end_their_subtask_at_once
test_status_json_reports_counters_and_errors_by_text = shared.test_status_json_reports_counters_and_errors_by_text
test_cancel_during_a_run_stops_new_jobs = shared.test_cancel_during_a_run_stops_new_jobs
test_final_notice_never_enqueued_is_sent_by_a_redelivered_message = (
    shared.test_final_notice_never_enqueued_is_sent_by_a_redelivered_message
)
test_kill_9_of_a_worker_while_its_subtasks_poll_loses_nothing = (
    shared.test_kill_9_of_a_worker_while_its_subtasks_poll_loses_nothing
)
test_retry_runs_the_failed_images_again_and_pays_only_for_them = (
    retry.test_retry_runs_the_failed_images_again_and_pays_only_for_them
)


def start_on_postgresql(directory: Path, env: dict[str, str]) -> Iterator[Daemon]:
    """A daemon in `directory` on a fresh database, stopped before the database is dropped."""
    directory.mkdir()
    with postgres.temporary_database() as url:
        daemon = Daemon(directory, **env, NIETEST_STORE_URL=url)
        daemon.start()
        try:
            yield daemon
        finally:
            try:
                daemon.stop()
            finally:
                daemon.kill_everything()


@pytest.fixture(scope="module")
def daemon(home: Path, api: FakeNieta, hook: FakeFeishu, alert_hook: FakeFeishu) -> Iterator[Daemon]:
    """test_pipeline_e2e.py's shared daemon (caps of 3 jobs per API, 0.2 s polls), on PostgreSQL."""
    yield from start_on_postgresql(home / "d", shared.daemon_env(api, hook, alert_hook))


@pytest.fixture(scope="module")
def kill_daemon(home: Path, kill_api: FakeNieta, alert_hook: FakeFeishu) -> Iterator[tuple[Daemon, FakeFeishu]]:
    """test_pipeline_e2e.py's daemon for the kills (50 jobs, 3 subtask threads), on PostgreSQL."""
    with FakeFeishu() as task_hook:
        env = shared.daemon_env(
            kill_api,
            task_hook,
            alert_hook,
            NIETEST_MAX_JOBS="50",
            NIETEST_SUBTASK_THREADS="3",
            IMAGE_MAX_POLLING_ATTEMPTS="200",
        )
        for started in start_on_postgresql(home / "k", env):
            yield started, task_hook


@pytest.fixture
def make_daemon(make_daemon: Callable[..., Daemon]) -> Iterator[Callable[..., Daemon]]:
    """tests/conftest.py's factory, its daemons on a fresh database (for test_retry_e2e.py's test),
    stopped here, before the database is dropped."""
    made: list[Daemon] = []

    def make(home: Path | None = None, **env: str) -> Daemon:
        made.append(make_daemon(home, **{"NIETEST_STORE_URL": url, **env}))
        return made[-1]

    with postgres.temporary_database() as url:
        yield make
        for daemon in made:
            try:
                daemon.stop(timeout=30)
            finally:
                daemon.kill_everything()
