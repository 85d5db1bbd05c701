"""End to end: Debian's real Prometheus scrapes a real daemon's `metrics` program.

The daemon runs a task against the fake Nieta API; through Prometheus's HTTP API the test checks
that the series are scraped with the right values, that a worker's `kill -9` shows up in
`nietest_process_restarts_total` while no counter goes backwards, that the alert rules load and
evaluate, and that every query of the Grafana dashboard parses and names metrics that exist.
The health endpoints are checked on the same daemon: a stopped queue makes /readyz name it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_files import RULES_FILE, alert_rules, dashboard_queries, metric_names

from bench.pipeline import task_file
from nietest_daemon.testing.daemon import Daemon
from nietest_daemon.testing.fake_feishu import FakeFeishu
from nietest_daemon.testing.fake_nieta import FakeNieta
from nietest_daemon.testing.waiting import wait_for

pytestmark = pytest.mark.e2e

SUBTASKS = 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """Debian's prometheus on a free loopback port, scraping one target every second."""

    def __init__(self, directory: Path, target: str) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            if os.environ.get("CI"):
                pytest.fail("prometheus is not installed: .ci/run installs Debian's package")
            pytest.skip("prometheus is not installed (.ci/run installs Debian's package)")
        self.port = free_port()
        config = directory / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {RULES_FILE}\n"
            "scrape_configs:\n  - job_name: nietest\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        self.log = open(directory / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        wait_for(lambda: self.get("/-/ready", raw=True), 60, what="prometheus ready")

    def get(self, path: str, raw: bool = False, **params: str) -> Any:
        url = self.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read()
        return body if raw else json.loads(body)

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = self.get("/api/v1/query", query=expr)
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def value(self, expr: str) -> float | None:
        """The value of a query that yields one sample (None when it yields none)."""
        result = self.query(expr)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


@pytest.fixture
def prometheus_for(short_tmp: Path) -> Iterator[Callable[[str], Prometheus]]:
    started: list[Prometheus] = []

    def start(target: str) -> Prometheus:
        directory = short_tmp / f"prom{len(started)}"
        directory.mkdir()
        started.append(Prometheus(directory, target))
        return started[-1]

    yield start
    for p in started:
        p.stop()


def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """One scrape of the metrics program itself, by (name, sorted labels)."""
    with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_prometheus_scrapes_the_daemon(
    make_daemon: Callable[..., Daemon], prometheus_for: Callable[[str], Prometheus], short_tmp: Path
) -> None:
    with FakeNieta(generation_time=0.2) as api, FakeFeishu() as hook:
        daemon = make_daemon(
            **api.env(),
            FEISHU_WEBHOOK_URL=hook.url,
            NIETEST_SUBTASK_PROCESSES="1",
            NIETEST_SUBTASK_OPS_PROCESSES="0",
            IMAGE_POLLING_INTERVAL="0.2",
            # Only the watchdog can hand a killed worker's messages back within the test's time.
            NIETEST_BROKER_HEARTBEAT_TIMEOUT="60",
        ).start()
        addr_file = daemon.settings.metrics_addr_file
        addr = wait_for(lambda: addr_file.exists() and addr_file.read_text().strip(), 30, what="metrics address")
        prom = prometheus_for(addr)
        base = f"http://{addr}"

        # Scraped: every supervised process is up.
        def processes_up() -> set[str] | None:
            up = {r["metric"]["process"] for r in prom.query("nietest_process_up == 1")}
            return up if {"master_00", "subtask_00", "broker", "metrics", "alerts", "watchdog"} <= up else None

        wait_for(processes_up, 60, what="nietest_process_up of every process in Prometheus")

        # A task's work, counted.
        daemon.run("submit", str(task_file(short_tmp, SUBTASKS)))
        completed = 'sum(nietest_subtasks_finished_total{outcome="completed"})'
        wait_for(lambda: prom.value(completed) == SUBTASKS, 90, what=f"{completed} == {SUBTASKS}")
        # The API requests are counted in each worker's memory and added to the broker once a second.
        creates = 'sum(nietest_api_requests_total{endpoint="create", code_class="2xx"})'
        wait_for(lambda: prom.value(creates) == SUBTASKS, 30, what=f"{creates} == {SUBTASKS}")
        polls = 'sum(nietest_api_requests_total{endpoint="poll", code_class="2xx"})'
        wait_for(lambda: prom.value(polls) >= SUBTASKS, 30, what=f"{polls} >= {SUBTASKS}")
        assert prom.value("sum(nietest_api_request_seconds_count)") == prom.value("sum(nietest_api_requests_total)")
        assert prom.value('sum(nietest_image_job_seconds_count{api="standard"})') == SUBTASKS
        assert prom.value('sum(nietest_subtasks_finished_total{outcome!="completed"})') == 0
        wait_for(lambda: prom.value('nietest_tasks{status="completed"}') == 1, 30, what="the task counted completed")
        wait_for(
            lambda: prom.value('sum(nietest_feishu_messages_total{bot="task", outcome="sent"})') == 2,
            30,
            what="the submitted and final notices counted sent",
        )
        assert len(hook.messages) >= 2

        # A worker's kill -9 while it runs a message: its in-progress count drops at once (the
        # message is back in the queue before the replacement worker has started), the exit is
        # counted as a crash of that process, and no counter goes backwards.
        def in_progress_and_ready() -> tuple[float, float]:
            got = scrape(base)
            queue = (("queue", "nietest_subtask"),)
            return got[("nietest_queue_messages", (*queue, ("state", "in_progress")))], got[
                ("nietest_queue_messages", (*queue, ("state", "ready")))
            ]

        daemon.send("subtask", "record", "long", 60)
        wait_for(lambda: "long" in [t.split(":")[0] for t in daemon.started()], 30, what="the long message running")
        assert in_progress_and_ready() == (1, 0)
        pid = daemon.pids()["subtask:subtask_00"]
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: in_progress_and_ready() == (0, 1), 5, what="the killed worker's message back", interval=0.02)
        assert time.monotonic() - killed < 2.0
        crash = 'nietest_process_restarts_total{process="subtask_00", reason="crash"}'
        wait_for(lambda: prom.value(crash) == 1, 60, what=f"{crash} == 1")
        wait_for(lambda: prom.value('nietest_process_up{process="subtask_00"}') == 1, 60, what="subtask_00 up again")
        assert prom.value(completed) == SUBTASKS
        assert prom.value("sum(resets(nietest_subtasks_finished_total[10m]))") == 0
        assert prom.value("sum(resets(nietest_api_requests_total[10m]))") == 0
        assert prom.value('sum(nietest_process_restarts_total{reason!="crash"})') == 0

        # The alert rules load and evaluate against the real series.
        names = {rule["alert"] for rule in alert_rules()}

        def rules_evaluated() -> bool:
            groups = prom.get("/api/v1/rules")["data"]["groups"]
            loaded = {r["name"]: r for g in groups for r in g["rules"]}
            return names <= set(loaded) and all(loaded[n].get("health") == "ok" for n in names)

        wait_for(rules_evaluated, 30, what=f"alert rules {sorted(names)} loaded and evaluated")

        # Every dashboard query parses and names metrics that Prometheus has.
        present = set(prom.get("/api/v1/label/__name__/values")["data"])
        for expr in dashboard_queries():
            answer = prom.get("/api/v1/query", query=expr)
            assert answer["status"] == "success", (expr, answer)
            missing = metric_names(expr) - present
            assert not missing, f"dashboard query {expr!r} names metrics Prometheus has not scraped: {missing}"

        # Health: a stopped queue is not "failing" (healthz) but makes the daemon not ready.
        assert get(base + "/healthz") == (200, {"healthy": True, "failing": []})
        assert get(base + "/readyz") == (200, {"ready": True, "not_ready": []})
        daemon.run("ctl", "stop", "subtask:*")
        status, body = get(base + "/readyz")
        assert status == 503
        assert body["not_ready"] == [{"component": "worker", "process": "subtask:subtask_00", "state": "STOPPED"}]
        assert get(base + "/healthz")[0] == 200
        daemon.run("ctl", "start", "subtask:*")
        wait_for(lambda: get(base + "/readyz")[0] == 200, 30, what="ready again")
