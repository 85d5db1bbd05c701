"""Fault injection: two tasks of different priorities through a real daemon while workers, the broker
and the APIs misbehave.

    .venv/bin/python bench/chaos.py [--subtasks 300] [--kill-every 3] [--min-kills 10] [--seed 7]
                                    [--store sqlite|postgresql] [--broker embedded|redis]

Two runs of the same two tasks (priorities 1 and 3, submitted together, each of standard and
Lumina subtasks mixed, sharing the job slots) on a real `nietest daemon`
(its embedded valkey broker, or with `--broker redis` a database of the machine's Redis; a SQLite
store, or with `--store postgresql` a temporary database of the PostgreSQL server
nietest_daemon/testing/postgres.py finds: bench/stores.py), against
nietest_daemon/testing/fake_nieta and two nietest_daemon/testing/fake_feishu.py webhooks, all on
127.0.0.1:

1. **baseline**: no faults;
2. **chaos**: the fake API answers with random latency and a fault mix (5% HTTP 500, 2% 429,
   1% dropped connections, 2% FAILURE, 1% ILLEGAL_IMAGE, 1% TIMEOUT, per request or job); a
   random worker is killed with SIGKILL every few seconds until the tasks end (at least
   `--min-kills`); the embedded broker's valkey-server is killed with SIGKILL once (on the
   machine's Redis, every connection to the run's database is cut instead: `CLIENT KILL`); both
   webhooks hang (accept, never answer) for a while; on PostgreSQL, every connection of the
   daemon to its database is terminated once (`pg_terminate_backend`, as a server restart or a
   network cut would leave them), a quarter of the way through the kills.

After each run it checks, and prints: every subtask reached exactly one terminal state; each
task's counters equal a recount and its final state follows from them; no subtask created more
image jobs than 1 + the TIMEOUT resubmits it was owed; the queues are empty; exactly one final
notice was sent per task; the kills were alerted (coalesced); every log line of every process is
JSON; no log holds the token, a webhook URL, the webhook secret or a password. Exit status 1 if
any check failed. tests/test_chaos.py runs a smaller version of the same (`run_chaos`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from bench import stores
from nietest_daemon.domain.lifecycle import COUNTER_OF, TERMINAL, Status, final_task_status
from nietest_daemon.internals.dramatiq_redis import bodies_key, dead_letter_name, queue_stats
from nietest_daemon.pipeline.subtasks import TIMEOUT_RESUBMITS
from nietest_daemon.programs.daemon import control_proxy
from nietest_daemon.store import open_store_for
from nietest_daemon.testing import machine_redis
from nietest_daemon.testing import task_documents as taskdocs
from nietest_daemon.testing.daemon import Daemon
from nietest_daemon.testing.fake_feishu import FakeFeishu
from nietest_daemon.testing.fake_nieta import FakeNieta
from nietest_daemon.testing.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent

WORKER_GROUPS = ("master", "master_ops", "subtask", "subtask_ops")
FINAL_TITLES = ("Task completed", "Task partially completed", "Task failed", "Task cancelled")
MONGO_PASSWORD = "chaos-Mongo-pw-5b1e"  # given to the daemon (unused by the SQLite store) to prove it is never logged
# In the PostgreSQL store's URL: the test server trusts its loopback clients (never asks for it),
# so it is given to the daemon only to prove that it is never logged.
STORE_PASSWORD = "chaos-Pg-pw-37c0"
WEBHOOK_SECRET = "chaos-hook-secret-91ad"


def fault_rules(scale: float = 1.0) -> list[dict[str, Any]]:
    """The issue's fault mix; `scale` multiplies every rate (the short test run uses more faults)."""

    def p(rate: float) -> float:
        return min(1.0, rate * scale)

    return [
        {"action": "http_500", "endpoint": "any", "probability": p(0.05)},
        {"action": "http_429", "endpoint": "any", "probability": p(0.02), "retry_after": 1},
        {"action": "drop", "endpoint": "any", "probability": p(0.01)},
        {"action": "failure", "probability": p(0.02), "error": "chaos: generation failed"},
        {"action": "illegal_image", "probability": p(0.01)},
        {"action": "timeout", "probability": p(0.01), "error": "chaos: queue full"},
    ]


#: The workers bench/chaos_leak.py makes leak.
LEAKING_GROUP = "subtask_ops"

#: The marker prefix of each task's prompts (a marker names the subtask in the fake API's jobs).
MARKER_PREFIXES = ("cz", "cy", "cx", "cw")


@dataclass
class ChaosConfig:
    subtasks: int = 300  # over all the tasks; half standard, half Lumina
    priorities: tuple[int, ...] = (1, 3)  # one task each, submitted together
    faults: bool = True
    fault_scale: float = 1.0
    kill_every: float = 3.0  # seconds between worker kills (jittered)
    min_kills: int = 10  # the task is made to last long enough for this many
    kill_broker: bool = True  # the embedded one is killed; the machine's Redis has its connections cut
    stop_every: float = 5.0  # seconds between SIGSTOPs of a random worker (jittered; 0: none)
    worker_hang_seconds: float = 10.0  # NIETEST_HANG_SECONDS: a worker stopped longer is killed
    leak_max_memory: str = "128MB"  # NIETEST_SUBTASK_OPS_MAX_MEMORY, which bench/chaos_leak.py leaks past ("": none)
    hang_seconds: float = 10.0  # both webhooks hang this long, from `hang_at` into the run
    hang_at: float = 8.0
    generation_time: float = 2.0
    latency: float = 0.01
    latency_jitter: float = 0.15
    polling_interval: float = 0.5
    max_jobs: int = 10
    max_lumina_jobs: int = 8
    timeout: float = 900.0
    seed: int = 7
    store: str = "sqlite"  # or "postgresql": a temporary database of testing/postgres.py's server
    broker: str = "embedded"  # or "redis": a database of the machine's Redis (testing/machine_redis.py)
    kill_store: bool = True  # PostgreSQL only: terminate the daemon's connections to its database once
    heartbeat_timeout: float = 60.0  # NIETEST_BROKER_HEARTBEAT_TIMEOUT
    extra_rules: list[dict[str, Any]] = field(default_factory=list)  # taken before the random mix


@dataclass
class ChaosReport:
    label: str
    wall_seconds: float = 0.0
    task_seconds: dict[int, float] = field(default_factory=dict)  # priority -> its task's wall time
    subtasks: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    task_status: str = ""
    kills: list[str] = field(default_factory=list)
    kill_times: list[float] = field(default_factory=list)  # time.time() of each kill
    stops: list[tuple[str, float]] = field(default_factory=list)  # SIGSTOPped worker, for how long
    long_stops: int = 0  # stops longer than NIETEST_HANG_SECONDS + 2 s
    unresponsive_kills: int = 0  # workers the watchdog killed for silence
    recycles: int = 0  # workers that recycled past their memory limit
    broker_killed: bool = False  # the broker's fault happened (killed, or its connections cut)
    broker_connections_cut: int = 0  # the machine's Redis: the connections to the run's database cut at once
    store: str = "sqlite"
    store_connections_killed: int = 0  # PostgreSQL: the daemon's connections terminated at once
    store_outages: int = 0  # messages retried because the store could not be reached
    lost: int = 0  # subtasks not in exactly one terminal state
    jobs_created: int = 0
    duplicate_jobs: int = 0  # jobs beyond 1 + the TIMEOUT resubmits owed
    faults_seen: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    final_notices: int = 0
    alerts: list[str] = field(default_factory=list)
    kills_alerted: int = 0
    log_lines: int = 0
    non_json_lines: int = 0
    leaked_secrets: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def check(self, ok: bool, problem: str) -> None:
        if not ok:
            self.problems.append(problem)


def task_document(subtasks: int, *, prefix: str = "cz", priority: int = 1) -> dict[str, Any]:
    """One variable prompt (a marker `<prefix>-NNNN` per value) times is_lumina [false, true]."""
    markers = [f"look {prefix}-{i:04d}" for i in range(subtasks // 2)]
    return taskdocs.task_document(
        f"chaos {subtasks} priority {priority}",
        [taskdocs.fixed_prompt("1girl, portrait"), taskdocs.variable_prompt("marker", markers)],
        priority=priority,
        is_lumina=taskdocs.variable_param("is_lumina", [False, True], variable_id="lumina", variable_name="Lumina"),
        lumina_model_name="lumina_2",
        lumina_cfg=5.5,
        lumina_step=30,
    )


class ChaosDaemon(Daemon):
    """testing/daemon.py's `Daemon` with bench/ on its path (for bench/chaos_leak.py), and
    supervisord's own view of its workers (with their start times)."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        super().__init__(home, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "bench")]), **env)

    def workers(self, *, running_for: float = 0.0) -> list[dict[str, Any]]:
        now = time.time()
        return [
            p
            for p in control_proxy(self.settings).supervisor.getAllProcessInfo()
            if p["group"] in WORKER_GROUPS and p["statename"] == "RUNNING" and now - p["start"] >= running_for
        ]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(*args, timeout=60, check=False)


@contextlib.contextmanager
def environment(cfg: ChaosConfig, *, faults: bool) -> Iterator[tuple[ChaosDaemon, FakeNieta, FakeFeishu, FakeFeishu]]:
    home = Path(tempfile.mkdtemp(prefix="ntc-", dir="/tmp"))  # short: unix socket paths
    rules = [*cfg.extra_rules, *fault_rules(cfg.fault_scale)] if faults else []
    api = FakeNieta(
        generation_time=cfg.generation_time,
        latency=cfg.latency,
        latency_jitter=cfg.latency_jitter if faults else 0.0,
        rules=rules,
        marker_regex=r"cz-\d{4}",
    )
    task_hook, alert_hook = FakeFeishu(WEBHOOK_SECRET), FakeFeishu(WEBHOOK_SECRET)
    daemon: ChaosDaemon | None = None
    with (
        api,
        task_hook,
        alert_hook,
        stores.store_env(cfg.store, password=STORE_PASSWORD) as store,
        stores.broker_env(cfg.broker) as broker,
    ):
        try:
            max_polls = max(60, int(6 * cfg.generation_time / cfg.polling_interval))
            env = {
                **api.env(),
                **store,
                **broker,
                "NIETEST_BROKER_HEARTBEAT_TIMEOUT": str(cfg.heartbeat_timeout),
                "FEISHU_TASK_WEBHOOK_URL": task_hook.url,
                "FEISHU_ALERT_WEBHOOK_URL": alert_hook.url,
                "FEISHU_WEBHOOK_SECRET": WEBHOOK_SECRET,
                "MONGO_PASSWORD": MONGO_PASSWORD,
                "NIETEST_MASTER_PROCESSES": "1",
                "NIETEST_MASTER_THREADS": "2",
                "NIETEST_MASTER_OPS_PROCESSES": "1",
                "NIETEST_SUBTASK_PROCESSES": "2",
                "NIETEST_SUBTASK_THREADS": "4",
                "NIETEST_SUBTASK_OPS_PROCESSES": "1",
                "NIETEST_SUBTASK_OPS_THREADS": "4",
                "NIETEST_DRAIN_SECONDS": "5",
                "NIETEST_HANG_SECONDS": str(cfg.worker_hang_seconds),
                "NIETEST_ACTOR_MODULES": "chaos_leak" if cfg.leak_max_memory else "",
                "NIETEST_SUBTASK_OPS_MAX_MEMORY": cfg.leak_max_memory or "512MB",
                "NIETEST_MAX_JOBS": str(cfg.max_jobs),
                "NIETEST_MAX_LUMINA_JOBS": str(cfg.max_lumina_jobs),
                "IMAGE_POLLING_INTERVAL": str(cfg.polling_interval),
                "LUMINA_POLLING_INTERVAL": str(cfg.polling_interval),
                "IMAGE_MAX_POLLING_ATTEMPTS": str(max_polls),
                "LUMINA_MAX_POLLING_ATTEMPTS": str(max_polls),
            }
            daemon = ChaosDaemon(home, env)
            daemon.start(wait=False).wait_running(60)
            yield daemon, api, task_hook, alert_hook
        finally:
            if daemon is not None and daemon.proc is not None:
                try:
                    daemon.stop(120)
                except (subprocess.TimeoutExpired, TimeoutError):
                    daemon.kill_everything()  # nothing of this home may outlive the daemon
            shutil.rmtree(home, ignore_errors=True)


class Chaos(threading.Thread):
    """Kills a random worker every `kill_every` s (at least `min_kills`), the broker once, hangs the
    webhooks, and SIGSTOPs a random worker every `stop_every` s (then SIGCONT), every other time for
    longer than NIETEST_HANG_SECONDS (the watchdog kills it), else for less (it resumes)."""

    def __init__(self, cfg: ChaosConfig, daemon: ChaosDaemon, hooks: list[FakeFeishu], rng: random.Random) -> None:
        super().__init__(name="chaos", daemon=True)
        self.cfg, self.target, self.hooks, self.rng = cfg, daemon, hooks, rng
        self.stop = threading.Event()
        self.kills: list[str] = []
        self.kill_times: list[float] = []
        self.broker_killed = False
        self.broker_cut = 0  # connections cut, on the machine's Redis
        self.store_killed: int | None = None  # connections terminated, once done
        self.errors: list[str] = []
        self.stops: list[tuple[str, float]] = []
        self.stopped: list[tuple[float, int]] = []  # (resume at, pid)
        self.next_stop = cfg.stop_every

    def _victims(self) -> list[dict[str, Any]]:
        """Workers to kill or stop: not the leaking one (it is left to recycle on its own), and none
        restarted a moment ago (supervisord counts a death within `startsecs` as a failed start, and
        ten of those in a row would make it FATAL)."""
        leaking = LEAKING_GROUP if self.cfg.leak_max_memory else None
        return [v for v in self.target.workers(running_for=2.0) if v["group"] != leaking]

    def _stops(self, elapsed: float) -> None:
        """SIGCONT the workers whose stop is over; SIGSTOP another when one is due."""
        for resume_at, pid in [s for s in self.stopped if s[0] <= elapsed]:
            self.stopped.remove((resume_at, pid))
            with contextlib.suppress(ProcessLookupError):  # the watchdog killed it meanwhile
                os.kill(pid, signal.SIGCONT)
        if self.cfg.stop_every <= 0 or elapsed < self.next_stop:
            return
        self.next_stop = elapsed + self.cfg.stop_every * self.rng.uniform(0.7, 1.3)
        stopped_pids = {pid for _, pid in self.stopped}
        victims = [v for v in self._victims() if v["pid"] not in stopped_pids]
        if victims:
            victim = self.rng.choice(victims)
            # Every other stop outlasts NIETEST_HANG_SECONDS (the watchdog's case), the others resume.
            hang = self.cfg.worker_hang_seconds
            seconds = self.rng.uniform(1.0, 0.5 * hang) if len(self.stops) % 2 else self.rng.uniform(1.5, 2.0) * hang
            os.kill(victim["pid"], signal.SIGSTOP)
            self.stopped.append((elapsed + seconds, victim["pid"]))
            self.stops.append((f"{victim['group']}:{victim['name']}", round(seconds, 1)))

    def _fault_broker(self) -> int:
        """Kill the embedded valkey-server; cut every connection to the machine's Redis database."""
        if self.cfg.broker == "redis":
            return machine_redis.cut_clients(self.target.settings.broker_url)
        os.kill(int((self.target.settings.run_dir / "valkey.pid").read_text()), signal.SIGKILL)
        return 0

    def run(self) -> None:
        started = time.monotonic()
        hung = False
        broker_at = self.cfg.kill_every * (self.cfg.min_kills // 2 + 0.5)  # mid-way through the kills
        store_at = self.cfg.kill_every * (self.cfg.min_kills // 4 + 0.5)  # a quarter of the way
        store_url = self.target.settings.store_url if self.cfg.kill_store else None
        next_kill = self.cfg.kill_every * self.rng.uniform(0.7, 1.3)
        while not self.stop.wait(0.2):
            elapsed = time.monotonic() - started
            try:
                self._stops(elapsed)
                if elapsed < next_kill:
                    continue
                next_kill = elapsed + self.cfg.kill_every * self.rng.uniform(0.7, 1.3)
                if not hung and elapsed >= self.cfg.hang_at and self.cfg.hang_seconds > 0:
                    for hook in self.hooks:
                        hook.hang_for(self.cfg.hang_seconds)
                    hung = True
                if store_url and self.store_killed is None and elapsed >= store_at:
                    self.store_killed = stores.terminate_connections(store_url)
                    continue
                if self.cfg.kill_broker and not self.broker_killed and elapsed >= broker_at:
                    self.broker_cut, self.broker_killed = self._fault_broker(), True
                    continue
                # A stopped worker is the watchdog's to kill (or to see resume).
                stopped = {pid for _, pid in self.stopped}
                victims = [v for v in self._victims() if v["pid"] not in stopped]
                if victims:
                    victim = self.rng.choice(victims)
                    os.kill(victim["pid"], signal.SIGKILL)
                    self.kill_times.append(time.time())
                    self.kills.append(f"{victim['group']}:{victim['name']}")
            except Exception as exc:  # noqa: BLE001 - reported, the run goes on
                self.errors.append(f"{type(exc).__name__}: {exc}")
        for _, pid in self.stopped:  # nothing stays stopped after the run
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def card_text(message: Any) -> tuple[str, str]:
    card = message.get("card", {}) if isinstance(message, dict) else {}
    title = card.get("header", {}).get("title", {}).get("content", "")
    return title, json.dumps(card, ensure_ascii=False)


def run_chaos(cfg: ChaosConfig, *, faults: bool, label: str, say: Callable[[str], None] = print) -> ChaosReport:
    report = ChaosReport(label, store=cfg.store)
    rng = random.Random(cfg.seed)
    random.seed(cfg.seed)  # the fake's fault draws (approximately repeatable: threads interleave)
    per_task = cfg.subtasks // len(cfg.priorities)
    with environment(cfg, faults=faults) as (daemon, api, task_hook, alert_hook):
        chaos = Chaos(cfg, daemon, [task_hook, alert_hook], rng) if faults else None
        started = time.monotonic()
        task_ids: dict[str, int] = {}  # task id -> priority
        for prefix, priority in zip(MARKER_PREFIXES, cfg.priorities, strict=False):
            task_path = daemon.settings.home / f"chaos-task-{prefix}.json"
            task_path.write_text(json.dumps(task_document(per_task, prefix=prefix, priority=priority)))
            submitted = daemon.cli("submit", str(task_path))
            if submitted.returncode != 0:
                raise RuntimeError(f"nietest submit failed: {submitted.stderr.strip()}")
            task_ids[submitted.stdout.strip()] = priority
        say(f"[{label}] tasks {task_ids} (id: priority): {per_task} subtasks each, submitted")
        if chaos is not None:
            chaos.start()
        store = open_store_for(daemon.settings)
        ended: dict[str, float] = {}

        def all_ended() -> bool:
            for task_id in task_ids.keys() - ended.keys():
                task = store.get_task(task_id)
                if task is not None and task["status"] in TERMINAL:
                    ended[task_id] = time.monotonic() - started
            return len(ended) == len(task_ids)

        try:
            wait_for(all_ended, cfg.timeout, "the tasks to end", interval=0.2)
            report.wall_seconds = max(ended.values())
            report.task_seconds = {priority: ended[task_id] for task_id, priority in task_ids.items()}
            if chaos is not None:
                # The kill schedule must have run its course even if the tasks were quick.
                wait_for(lambda: len(chaos.kills) >= cfg.min_kills, cfg.kill_every * (cfg.min_kills + 5), "kills")
                chaos.stop.set()
                chaos.join(30)
                report.kills, report.kill_times = chaos.kills, chaos.kill_times
                report.broker_killed, report.broker_connections_cut = chaos.broker_killed, chaos.broker_cut
                report.check(not chaos.errors, f"chaos thread errors: {chaos.errors[:3]}")
                report.store_connections_killed = chaos.store_killed or 0
                if cfg.store == "postgresql" and cfg.kill_store:
                    report.check(bool(chaos.store_killed), "no connection of the daemon to its store was terminated")
                report.stops = chaos.stops
            say(f"[{label}] tasks ended after {report.wall_seconds:.1f} s; settling")
            settle(daemon, task_hook, list(task_ids), report)
            tasks = [store.get_task(task_id) for task_id in task_ids]
            subtasks = {task_id: store.list_subtasks(task_id) for task_id in task_ids}
        finally:
            store.close()
        for task in tasks:
            assert task is not None
            check_subtasks(report, task, subtasks[task["id"]])
            check_notices(report, task_hook, task["id"])
        check_jobs(report, api, [s for subs in subtasks.values() for s in subs])
        if faults:
            check_alerts(report, alert_hook, daemon.settings.alert_coalesce_seconds)
        check_logs(report, daemon, api, task_hook, alert_hook)
        if faults:
            check_watchdog(report, daemon, cfg)
    return report


def check_watchdog(report: ChaosReport, daemon: ChaosDaemon, cfg: ChaosConfig) -> None:
    """The watchdog killed the workers stopped for too long; a leaking worker recycled."""
    records = [
        json.loads(line) for path in daemon.log_files() for line in path.read_text(errors="replace").splitlines()
    ]
    report.unresponsive_kills = sum(1 for r in records if r.get("event") == "worker unresponsive; killing it")
    report.recycles = sum(1 for r in records if str(r.get("event", "")).startswith("recycling:"))
    # pipeline/middleware: "store unreachable during the message; retrying it" (or "left for the sweep")
    report.store_outages = sum(1 for r in records if str(r.get("event", "")).startswith("store unreachable"))
    report.long_stops = sum(1 for _, seconds in report.stops if seconds > cfg.worker_hang_seconds + 2)
    report.check(
        not report.long_stops or report.unresponsive_kills > 0,
        f"{report.long_stops} workers stopped past NIETEST_HANG_SECONDS, none killed by the watchdog",
    )
    if cfg.leak_max_memory:
        report.check(report.recycles > 0, "the leaking worker never recycled")


def settle(daemon: ChaosDaemon, task_hook: FakeFeishu, task_ids: list[str], report: ChaosReport) -> None:
    """Wait for the final notices and for every queue to be empty (nothing more on its way)."""
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: all(final_notices(task_hook, t) for t in task_ids), 60, "the final task notices")
    client = redis.Redis.from_url(daemon.settings.broker_url)

    def drained() -> bool:
        # Delayed messages are left out: what is still delayed once the task has ended are polls and
        # create retries of subtasks that ended meanwhile (they find their subtask ended and do nothing).
        for key in WORKER_GROUPS:
            stats = queue_stats(client, daemon.settings.queue(key).name)
            if stats["ready"] or stats["in_progress"]:
                return False
        return True

    try:
        wait_for(drained, 90, "every queue to drain", interval=0.5)
    except TimeoutError:
        stats = {key: queue_stats(client, daemon.settings.queue(key).name) for key in WORKER_GROUPS}
        report.problems.append(f"the queues did not drain within 90 s of the task's end: {stats}")
    dead = {key: queue_stats(client, daemon.settings.queue(key).name)["dead"] for key in WORKER_GROUPS}
    if any(dead.values()):
        bodies = [
            body.decode(errors="replace")[:400]
            for key in WORKER_GROUPS
            for body in client.hvals(bodies_key(dead_letter_name(daemon.settings.queue(key).name)))
        ]
        why = [
            line[:600]
            for path in daemon.log_files()
            for line in path.read_text(errors="replace").splitlines()
            if "dead-letter" in line or "Retries exceeded" in line or "unhandled exception" in line
        ]
        report.problems.append(f"dead-lettered messages: {dead}: {bodies[:3]}; log: {why[:5]}")
    client.close()


def final_notices(hook: FakeFeishu, task_id: str) -> list[str]:
    titles = [card_text(m)[0] for m in hook.messages if f"task id: {task_id}" in json.dumps(m, ensure_ascii=False)]
    return [t for t in titles if t.split("] ")[-1] in FINAL_TITLES]


def check_subtasks(report: ChaosReport, task: dict[str, Any], subtasks: list[dict[str, Any]]) -> None:
    """One task's subtasks and counters, added to the report."""
    report.subtasks += len(subtasks)
    statuses = Counter(s["status"] for s in subtasks)
    report.statuses = dict(Counter(report.statuses) + statuses)
    partially = " (partially)" if task.get("error", "") and "partial" in task["error"] else ""
    report.task_status = ", ".join(
        filter(None, [report.task_status, f"priority {task['priority']}: {task['status']}{partially}"])
    )
    ids = [s["id"] for s in subtasks]
    lost = sum(1 for s in subtasks if s["status"] not in TERMINAL) + (int(task["total_images"]) - len(set(ids)))
    report.lost += lost
    report.check(
        len(ids) == len(set(ids)) == int(task["total_images"]),
        f"{len(ids)} subtasks stored for task {task['id']} of {task['total_images']}",
    )
    report.check(lost == 0, f"{lost} subtasks of task {task['id']} lost (not terminal: {dict(statuses)})")
    recount = {counter: statuses.get(status, 0) for status, counter in COUNTER_OF.items()}
    stored = {k: int(task.get(k) or 0) for k in recount}
    report.check(stored == recount, f"task {task['id']} counters {stored} != recount {recount}")
    expected, _ = final_task_status({**task, **recount})
    report.check(task["status"] == expected, f"task status {task['status']!r}, its subtasks say {expected.value!r}")
    errors: Counter[str] = Counter(report.errors)
    for s in subtasks:
        if s["status"] == Status.FAILED:
            errors[(s.get("error") or "").split(":")[0][:70]] += 1
    report.errors = dict(errors.most_common())


def check_jobs(report: ChaosReport, api: FakeNieta, subtasks: list[dict[str, Any]]) -> None:
    """At most 1 + the TIMEOUT resubmits owed per subtask; every stored job uuid is a real job."""
    by_subtask: dict[tuple[str, bool], list[Any]] = {}
    for job in api.jobs:
        found = re.findall(rf"(?:{'|'.join(MARKER_PREFIXES)})-\d{{4}}", job.text)
        if found:
            by_subtask.setdefault((found[0], job.ops), []).append(job)
    report.jobs_created = sum(len(jobs) for jobs in by_subtask.values())
    extra = 0
    for jobs in by_subtask.values():
        timeouts = sum(1 for j in jobs if j.outcome is not None and j.outcome.action == "timeout")
        extra += max(0, len(jobs) - (1 + min(TIMEOUT_RESUBMITS, timeouts)))
    report.duplicate_jobs = extra
    report.check(extra == 0, f"{extra} image jobs beyond what their subtasks were owed")
    known = {j.uuid for jobs in by_subtask.values() for j in jobs}
    unknown = [s["id"] for s in subtasks if s.get("job_uuid") and s["job_uuid"] not in known]
    report.check(not unknown, f"subtasks with a job uuid the API never made: {unknown[:3]}")
    statuses = Counter(r.status for r in api.requests if r.endpoint in ("create", "poll"))
    outcomes = Counter(j.outcome.action for j in api.jobs if j.outcome is not None)
    report.faults_seen = {
        "http_500": statuses.get(500, 0),
        "http_429": statuses.get(429, 0),
        "dropped": statuses.get(None, 0),
        **{k: outcomes.get(k, 0) for k in ("failure", "illegal_image", "timeout")},
    }


def check_notices(report: ChaosReport, hook: FakeFeishu, task_id: str) -> None:
    finals = final_notices(hook, task_id)
    report.final_notices += len(finals)
    report.check(len(finals) == 1, f"{len(finals)} final notices for task {task_id}: {finals}")


def unalerted(report: ChaosReport, hook: FakeFeishu) -> list[int]:
    """Indexes of the kills no alert accounts for.

    A kill is accounted for by a restart or crash-loop alert naming its process that arrived after
    it, or by a crash-loop alert about that process before it (the design mutes the restarts of a
    process in a crash loop until it has run a whole window)."""
    cards = [(r.wall, *card_text(r.body)) for r in hook.received]
    missing = []
    for index, (kill, at) in enumerate(zip(report.kills, report.kill_times, strict=True)):
        name = kill.split(":")[1]
        after = any(
            t >= at and name in text and ("restart" in title.lower() or "crash loop" in title.lower())
            for t, title, text in cards
        )
        muted = any(t < at and name in text and "crash loop" in title.lower() for t, title, text in cards)
        if not (after or muted):
            missing.append(index)
    return missing


def check_alerts(report: ChaosReport, hook: FakeFeishu, coalesce_seconds: float) -> None:
    """Every kill is accounted for by an alert; fewer alert messages than kills (coalesced)."""
    # The last kills' alerts may still wait in their coalescing window (or behind the hang's retries).
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: not unalerted(report, hook), coalesce_seconds + 30, "alerts accounting for every kill")
    report.alerts = [card_text(m)[0] for m in hook.messages]
    about_kills = [t for t in report.alerts if "restart" in t.lower() or "crash loop" in t.lower()]
    missing = unalerted(report, hook)
    report.kills_alerted = len(report.kills) - len(missing)
    report.check(bool(about_kills), "no restart alert arrived")
    report.check(not missing, f"kills no alert accounts for: {[report.kills[i] for i in missing]}")
    report.check(len(about_kills) < max(2, len(report.kills)), "restart alerts were not coalesced")


def check_logs(report: ChaosReport, daemon: ChaosDaemon, api: FakeNieta, *hooks: FakeFeishu) -> None:
    secrets = {"the Nieta token": api.token, "the webhook secret": WEBHOOK_SECRET, "the Mongo password": MONGO_PASSWORD}
    if daemon.settings.store_url and STORE_PASSWORD in daemon.settings.store_url:
        secrets["the store password"] = STORE_PASSWORD
    for n, hook in enumerate(hooks):
        secrets[f"webhook URL {n}"] = hook.url
        secrets[f"webhook token {n}"] = hook.token
    lines = bad = 0
    leaked: set[str] = set()
    for path in daemon.log_files():
        data = path.read_bytes()
        for name, value in secrets.items():
            if value.encode() in data:
                leaked.add(f"{name} in {path.name}")
        for line in data.splitlines():
            if not line.strip():
                continue
            lines += 1
            try:
                if not isinstance(json.loads(line), dict):
                    bad += 1
            except ValueError:
                bad += 1
    report.log_lines, report.non_json_lines, report.leaked_secrets = lines, bad, sorted(leaked)
    report.check(lines > 0, "no log lines at all")
    report.check(bad == 0, f"{bad} log lines are not JSON objects")
    report.check(not leaked, f"secrets in the logs: {sorted(leaked)}")


def describe(report: ChaosReport) -> list[str]:
    lines = [
        f"[{report.label}] wall time {report.wall_seconds:.1f} s (by priority: "
        + ", ".join(f"{p}: {t:.1f} s" for p, t in report.task_seconds.items())
        + f"); tasks {report.task_status}; subtasks {report.statuses}",
        f"[{report.label}] kills survived: {len(report.kills)} workers (SIGKILL) + broker: {report.broker_killed}"
        + (f" (connections cut: {report.broker_connections_cut})" if report.broker_connections_cut else "")
        + (
            f" + store connections: {report.store_connections_killed} (messages retried for it: {report.store_outages})"
            if report.store == "postgresql"
            else ""
        )
        + f"; subtasks lost: {report.lost}; image jobs: {report.jobs_created}, "
        f"beyond those owed: {report.duplicate_jobs}",
        f"[{report.label}] workers stopped (SIGSTOP, then SIGCONT): {len(report.stops)}, "
        f"{report.long_stops} of them past NIETEST_HANG_SECONDS; killed by the watchdog for silence: "
        f"{report.unresponsive_kills}; recycled past their memory limit: {report.recycles}",
        f"[{report.label}] faults answered: {report.faults_seen}",
        f"[{report.label}] failure reasons: {report.errors}",
        f"[{report.label}] final task notices: {report.final_notices}; alerts: {len(report.alerts)} messages "
        f"naming {report.kills_alerted} of {len(report.kills)} kills",
        f"[{report.label}] log lines: {report.log_lines}, not JSON: {report.non_json_lines}, "
        f"secrets found: {report.leaked_secrets or 'none'}",
    ]
    if report.alerts:
        lines.append(f"[{report.label}] alert titles: {Counter(t.split('] ')[-1] for t in report.alerts)}")
    lines.append(f"[{report.label}] " + ("PASS" if not report.problems else "FAIL: " + "; ".join(report.problems)))
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subtasks", type=int, default=300, help="subtasks of the task, half of them Lumina")
    parser.add_argument("--kill-every", type=float, default=3.0, help="seconds between worker kills")
    parser.add_argument("--min-kills", type=int, default=10, help="at least this many worker kills")
    parser.add_argument("--seed", type=int, default=7, help="seed of the kill schedule and the fault draws")
    parser.add_argument("--skip-baseline", action="store_true", help="only the chaos run")
    stores.add_store_option(parser)
    stores.add_broker_option(parser)
    args = parser.parse_args()
    cfg = ChaosConfig(
        subtasks=args.subtasks,
        kill_every=args.kill_every,
        min_kills=args.min_kills,
        seed=args.seed,
        store=args.store,
        broker=args.broker,
    )
    print(f"python {platform.python_version()}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}")
    print(f"store: {args.store}; broker: {args.broker}")
    reports = []
    if not args.skip_baseline:
        reports.append(run_chaos(cfg, faults=False, label="baseline"))
        print("\n".join(describe(reports[-1])), flush=True)
    reports.append(run_chaos(cfg, faults=True, label="chaos"))
    print("\n".join(describe(reports[-1])), flush=True)
    if len(reports) == 2:
        base, chaos = reports
        print(
            f"wall time: chaos {chaos.wall_seconds:.1f} s vs baseline {base.wall_seconds:.1f} s "
            f"({chaos.wall_seconds / base.wall_seconds:.2f}x)"
        )
    return 1 if any(r.problems for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
