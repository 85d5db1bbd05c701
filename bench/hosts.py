"""Fault runs with several hosts (issue 23): three daemons on one broker and one store, while a host
is killed, cut off, cut off in the middle of handing back another's work, or the broker crashes.

    .venv/bin/python bench/hosts.py [--subtasks 600] [--lost-seconds 5] [--partition-seconds 60]
                                    [--faults kill,partition,taker,broker,failover]

The multi-host rig (nietest_daemon/testing/multihost.py) puts three hosts `h1..h3` on this machine as
network namespaces, each running a real `nietest daemon` under its own NIETEST_HOST_NAME, and one
services namespace with a valkey broker (append-only file), a PostgreSQL store, the fake Nieta API and
two fake Feishu webhooks (task notices, alerts). The daemons are kept across the runs; a host killed
by one run is started again before the next. Each run submits one campaign (half standard, half
Lumina subtasks: bench/chaos.py's task) at real polling intervals scaled down, strikes when
`fault_at` of its subtasks are terminal, and times it from submit to the task's end:

- **baseline**: no fault;
- **kill**: every process of h3 SIGKILLed (`Rig.kill_host`): the others declare it lost after
  NIETEST_HOST_LOST_SECONDS and hand back what it held. It must add at most LOST + 5 s;
- **partition**: h2's traffic dropped (nftables) for `partition_seconds`, then healed: it is
  declared lost and taken over meanwhile, and on its return its keeper finds itself fenced, restarts
  its workers and says `Host back`. No image job beyond those owed, nothing lost;
- **taker**: every daemon restarted with NIETEST_TAKEOVER_PAUSE_SECONDS; h3 killed; the daemon that
  claims it (`taken_over_by`) is cut off inside the pause, before it hands anything back; the third
  one resumes the hand-back once the taker's lock lapses (and declares the taker lost too); heal;
- **broker**: the broker SIGKILLed and started again on its append-only file with every host
  running: nothing lost, no double job, and no host declared lost;
- **failover**: the broker's primary SIGKILLed twice, under Sentinel, on two hosts of its own (bench/failover.py).

After each run it checks (bench/chaos.py's checks): every subtask in exactly one terminal state;
the task's counters equal a recount; no subtask created more image jobs than it was owed (one, plus
the TIMEOUT resubmits: none in this mix, the fake API answers without faults); exactly one final
notice; the queues drained; the `Host lost:` / `Host back:` alerts name the hosts the fault hit, and
no other host. It prints one table row per run; exit status 1 if any check failed.
tests/test_hosts_faults.py runs the same at CI sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg

from bench import chaos
from nietest_daemon.coordination import hosts, keys, lifelines
from nietest_daemon.coordination.connection import as_text
from nietest_daemon.coordination.hosts import HostRecord, HostState
from nietest_daemon.domain.lifecycle import COUNTER_OF, TERMINAL, Status
from nietest_daemon.domain.subtask import Lane
from nietest_daemon.internals.dramatiq_redis import bodies_key, dead_letter_name, queue_stats
from nietest_daemon.pipeline.subtasks import TIMEOUT_RESUBMITS
from nietest_daemon.store.postgres import PostgresStore
from nietest_daemon.testing.daemon import NIETEST, Daemon
from nietest_daemon.testing.fake_feishu import FakeFeishu
from nietest_daemon.testing.fake_nieta import FakeNieta
from nietest_daemon.testing.multihost import Rig, postgres_bindir
from nietest_daemon.testing.waiting import wait_for

FAULTS = ("kill", "partition", "taker", "broker", "failover")
WHAT = {
    "baseline": "none (baseline)",
    "kill": "kill h3 (SIGKILL, every process)",
    "partition": "partition h2 {p:g} s, heal",
    "taker": "kill h3, partition its taker",
    "broker": "kill -9 the broker, restart",
    "sentinel": "none (2 hosts, Sentinel: baseline)",
    "failover": "kill -9 the primary, twice",
}
KILLED, CUT = "h3", "h2"
WORKER_GROUPS = chaos.WORKER_GROUPS
_HOST_CARD = re.compile(r"Host (lost|back): (\S+)$")


@dataclass
class HostsConfig:
    subtasks: int = 600  # half standard, half Lumina
    lost_seconds: float = 5.0  # NIETEST_HOST_LOST_SECONDS
    partition_seconds: float = 60.0
    takeover_pause: float = 3.0  # NIETEST_TAKEOVER_PAUSE_SECONDS, for the "taker" run only
    fault_at: float = 0.4  # the share of the subtasks terminal when the fault strikes
    generation_time: float = 1.0  # the fake API's, per image job
    polling_interval: float = 0.5  # IMAGE_ / LUMINA_POLLING_INTERVAL
    max_jobs: int = 24  # NIETEST_MAX_JOBS, and as many Lumina ones
    threads: int = 6  # per subtask / subtask_ops worker process (one process each per host)
    heartbeat_timeout: float = 60.0  # NIETEST_BROKER_HEARTBEAT_TIMEOUT (its default)
    timeout: float = 600.0  # a run's campaign must end within this
    hosts: int = 3
    sentinels: bool = False  # the broker: a primary, a replica, three Sentinels (bench/failover.py), not one valkey


@dataclass
class HostsReport(chaos.ChaosReport):
    fault: str = ""
    added_seconds: float | None = None  # wall time against the baseline's
    jobs_owed: int = 0
    host_alerts: list[str] = field(default_factory=list)  # "lost h3", "back h2", in arrival order
    taker: str = ""  # the "taker" run: the host cut off inside its hand-back
    threads_died: list[str] = field(default_factory=list)  # worker threads ended by an exception
    notes: list[str] = field(default_factory=list)  # what the fault did, when


# --- the daemons, the store, the cluster -----------------------------------------------------------


class HostDaemon(Daemon):
    """testing/daemon.py's `Daemon` on a rig host: started in the host's namespace, and its commands
    (`nietest status`, `submit`) run there too, since they reach the broker and the store."""

    def __init__(self, rig: Rig, host: str, home: Path, env: dict[str, str]) -> None:
        super().__init__(home, **env)
        self.rig, self.host = rig, host
        self.env = {**env, "NIETEST_HOME": str(home)}  # rig.daemon_env's: no proxy variable

    def start(self, wait: bool = True) -> HostDaemon:
        self.proc = self.rig.start_daemon(self.host, self.home, self.env)
        if wait:
            self.wait_running(90)
        return self

    def run(self, *args: str, timeout: float = 30.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = self.rig.popen(
            self.host,
            [*NIETEST, *args],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check and result.returncode != 0:
            raise RuntimeError(f"nietest {' '.join(args)} on {self.host} failed ({result.returncode}): {err.strip()}")
        return result


class RigStore(PostgresStore):
    """The rig's store, read from this process over one connection made in the services namespace
    (the store's own pool connects from its threads, outside every rig namespace). One thread."""

    def __init__(self, rig: Rig) -> None:
        assert rig.postgres_url is not None
        super().__init__(rig.postgres_url)
        self._conn = rig.connect_postgres(autocommit=True, connect_timeout=5)

    def _connection(self) -> contextlib.nullcontext[psycopg.Connection[Any]]:
        return contextlib.nullcontext(self._conn)

    def close(self) -> None:
        self._conn.close()


class Cluster:
    """The rig, its services, the fakes, and one daemon per host, kept across the runs."""

    def __init__(self, cfg: HostsConfig, say: Callable[[str], None] = print) -> None:
        self.cfg, self.say = cfg, say
        self.daemons: dict[str, HostDaemon] = {}
        self.pause = 0.0  # the daemons' NIETEST_TAKEOVER_PAUSE_SECONDS
        self.failed = False  # a run failed: its logs are kept
        self._stack = contextlib.ExitStack()
        try:
            self._build()
        except BaseException:
            self._stack.close()
            raise

    def _build(self) -> None:
        begun = time.monotonic()
        self.rig = self._stack.enter_context(Rig(hosts=self.cfg.hosts))
        self.rig.start_sentinels() if self.cfg.sentinels else self.rig.start_redis()
        self.rig.start_postgres()
        with self.rig.entered("svc"):
            self.api = FakeNieta(
                host=self.rig.services_ip, generation_time=self.cfg.generation_time, marker_regex=r"cz-\d{4}"
            )
            hooks = [FakeFeishu(chaos.WEBHOOK_SECRET, host=self.rig.services_ip) for _ in range(2)]
            self._stack.enter_context(self.api)
            self.task_hook, self.alert_hook = (self._stack.enter_context(hook) for hook in hooks)
        self.redis = self.rig.redis_client(socket_timeout=5, socket_connect_timeout=5)
        self._stack.callback(self.redis.close)
        self.store = RigStore(self.rig)
        self._stack.callback(self.store.close)
        self.start("h1")  # alone first: it makes the store's tables
        self.start(*self.rig.hosts[1:])
        self.say(f"rig {self.rig.prefix}: {self.cfg.hosts} hosts, services up in {time.monotonic() - begun:.1f} s")

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Everything goes with the rig: every process in its namespaces is killed. The daemons'
        logs are kept when a run failed (`failed`), in /tmp/nietest-hosts-<rig prefix>/."""
        if self.failed and hasattr(self, "rig"):
            kept = Path(tempfile.gettempdir()) / f"nietest-hosts-{self.rig.prefix}"
            for host in self.rig.hosts:
                with contextlib.suppress(OSError):
                    shutil.copytree(self.rig.tmp / host / "log", kept / host, dirs_exist_ok=True)
            self.say(f"a run failed: the daemons' logs are kept in {kept}")
        self._stack.close()

    def env(self, host: str) -> dict[str, str]:
        cfg = self.cfg
        polls = str(max(60, int(6 * cfg.generation_time / cfg.polling_interval)))
        return self.rig.daemon_env(
            host,
            **self.api.env(),
            FEISHU_TASK_WEBHOOK_URL=self.task_hook.url,
            FEISHU_ALERT_WEBHOOK_URL=self.alert_hook.url,
            FEISHU_WEBHOOK_SECRET=chaos.WEBHOOK_SECRET,
            NIETEST_HOST_LOST_SECONDS=str(cfg.lost_seconds),
            NIETEST_TAKEOVER_PAUSE_SECONDS=str(self.pause),
            NIETEST_METRICS_ADDR="",
            NIETEST_MASTER_PROCESSES="1",
            NIETEST_MASTER_THREADS="2",
            NIETEST_MASTER_OPS_PROCESSES="0",
            NIETEST_SUBTASK_PROCESSES="1",
            NIETEST_SUBTASK_THREADS=str(cfg.threads),
            NIETEST_SUBTASK_OPS_PROCESSES="1",
            NIETEST_SUBTASK_OPS_THREADS=str(cfg.threads),
            NIETEST_DRAIN_SECONDS="5",
            NIETEST_ALERT_COALESCE_SECONDS="1",
            NIETEST_BROKER_HEARTBEAT_TIMEOUT=str(cfg.heartbeat_timeout),
            NIETEST_MAX_JOBS=str(cfg.max_jobs),
            NIETEST_MAX_LUMINA_JOBS=str(cfg.max_jobs),
            IMAGE_POLLING_INTERVAL=str(cfg.polling_interval),
            LUMINA_POLLING_INTERVAL=str(cfg.polling_interval),
            IMAGE_MAX_POLLING_ATTEMPTS=polls,
            LUMINA_MAX_POLLING_ATTEMPTS=polls,
        )

    def start(self, *names: str) -> float:
        """Start the hosts' daemons (each in its home, kept across restarts); seconds until all run."""
        begun = time.monotonic()
        started = []
        for host in names:
            home = self.rig.tmp / host
            home.mkdir(exist_ok=True)
            daemon = HostDaemon(self.rig, host, home, self.env(host))
            self.daemons[host] = daemon.start(wait=False)
            started.append(daemon)
        for daemon in started:
            daemon.wait_running(90)
            # RUNNING is supervisord's word a second after the spawn; a worker still importing (10 s
            # and more on a busy machine) consumes nothing, and a keeper not started renews nothing.
            wait_for(functools.partial(self.working, daemon), 90, f"{daemon.host}'s keeper and workers beat")
        return time.monotonic() - begun

    def working(self, daemon: HostDaemon) -> bool:
        """Whether the daemon's keeper and every worker process it runs now beat in the broker."""
        workers = {name: pid for name, pid in daemon.pids().items() if name.split(":")[0] in WORKER_GROUPS}
        wanted = {lifelines.member(name.split(":", 1)[1], pid) for name, pid in workers.items()}
        fresh = time.time() - 3
        beats = {as_text(m) for m in self.redis.zrangebyscore(keys.lifelines(daemon.host), fresh, "+inf")}
        return bool(workers) and wanted <= beats and any(m.startswith(f"{hosts.KEEPER_PROCESS}/") for m in beats)

    def alive(self, host: str) -> bool:
        proc = self.daemons[host].proc
        return proc is not None and proc.poll() is None

    def ensure(self, pause: float) -> list[str]:
        """Every host's daemon running, with NIETEST_TAKEOVER_PAUSE_SECONDS `pause` (a change of
        pause restarts them all, gracefully); what was done."""
        done = []
        if pause != self.pause:
            for host in [h for h in self.rig.hosts if self.alive(h)]:
                self.daemons[host].stop(120)
            self.pause = pause
            done.append(f"every daemon restarted with NIETEST_TAKEOVER_PAUSE_SECONDS={pause:g}")
        dead = [h for h in self.rig.hosts if not self.alive(h)]
        if dead:
            seconds = self.start(*dead)
            done.append(f"{', '.join(dead)} started again in {seconds:.1f} s")
        return done

    def record(self, host: str) -> HostRecord | None:
        return hosts.get_record(self.redis, host)

    def queue_names(self) -> list[str]:
        settings = self.daemons["h1"].settings
        return [settings.queue(key).name for key in WORKER_GROUPS]

    def submit(self, document: dict[str, Any], label: str) -> str:
        path = self.rig.tmp / f"task-{label}.json"
        path.write_text(json.dumps(document))
        return self.daemons["h1"].run("submit", str(path), timeout=60).stdout.strip()


# --- one run ---------------------------------------------------------------------------------------


class Watcher(threading.Thread):
    """Follows one task in the store (a connection of its own): subtasks terminal, and when it ended."""

    def __init__(self, cluster: Cluster, task_id: str, started: float) -> None:
        super().__init__(name="watcher", daemon=True)
        self.store = RigStore(cluster.rig)
        self.task_id, self.started = task_id, started
        self.terminal = 0
        self.ended: float | None = None  # seconds from the submit to the task's end
        self.error: str | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.wait(0.1):
                try:
                    task = self.store.get_task(self.task_id)
                except psycopg.Error as exc:  # the store answers again in a moment
                    self.error = f"{type(exc).__name__}: {exc}"
                    continue
                if task is None:
                    continue
                self.terminal = sum(int(task.get(counter) or 0) for counter in COUNTER_OF.values())
                if task["status"] in TERMINAL:
                    self.ended = time.monotonic() - self.started
                    return
        finally:
            self.store.close()

    def reached(self, share: float, total: int) -> bool:
        return self.ended is not None or self.terminal >= share * total


@dataclass
class Run:
    """What a fault step gets: the cluster, the task being watched, the report it adds notes to."""

    cluster: Cluster
    watcher: Watcher
    report: HostsReport
    total: int

    @property
    def cfg(self) -> HostsConfig:
        return self.cluster.cfg

    def at(self) -> str:
        return f"{time.monotonic() - self.watcher.started:.1f} s"

    def note(self, text: str) -> None:
        self.report.notes.append(f"{self.at()}: {text}")

    def strike_time(self) -> None:
        """Wait for mid-campaign (`fault_at` of the subtasks terminal)."""
        reached = functools.partial(self.watcher.reached, self.cfg.fault_at, self.total)
        wait_for(reached, self.cfg.timeout, "mid-campaign", interval=0.05)

    def wait_record(self, host: str, test: Callable[[HostRecord], bool], timeout: float, what: str) -> HostRecord:
        found: HostRecord = wait_for(
            lambda: (r := self.cluster.record(host)) is not None and test(r) and r,
            timeout,
            f"host {host}: {what}",
            interval=0.05,
        )
        return found

    def taken_over(self, host: str, since: float, timeout: float) -> HostRecord:
        """Wait until `host` was declared lost and its work handed back; noted with how long it took."""
        record = self.wait_record(host, lambda r: r.state is HostState.LOST and r.handed_back, timeout, "handed back")
        self.note(
            f"{host} declared lost, its work handed back by {record.taken_over_by} "
            f"{time.monotonic() - since:.1f} s after the fault"
        )
        return record

    def back(self, host: str) -> HostRecord:
        """Wait until `host`'s keeper found itself fenced and rejoined (up again, a later epoch)."""
        record = self.wait_record(
            host, lambda r: r.state is HostState.UP and r.epoch > 0, 60 + 2 * self.cfg.lost_seconds, "up again"
        )
        self.note(f"{host} up again (epoch {record.epoch})")
        return record


def fault_kill(run: Run) -> tuple[set[str], set[str]]:
    run.strike_time()
    killed = time.monotonic()
    processes = run.cluster.rig.kill_host(KILLED)
    run.note(f"{KILLED} killed ({processes} processes)")
    run.taken_over(KILLED, killed, run.cfg.lost_seconds + 30)
    return {KILLED}, set()


def fault_partition(run: Run) -> tuple[set[str], set[str]]:
    run.strike_time()
    rig = run.cluster.rig
    cut = time.monotonic()
    rig.partition(CUT)
    run.note(f"{CUT} cut off")
    try:
        run.taken_over(CUT, cut, run.cfg.lost_seconds + 30)
        time.sleep(max(0.0, run.cfg.partition_seconds - (time.monotonic() - cut)))  # the partition's length
    finally:
        rig.heal(CUT)
    run.note(f"{CUT} healed after {time.monotonic() - cut:.1f} s")
    run.back(CUT)
    return {CUT}, {CUT}


def fault_taker(run: Run) -> tuple[set[str], set[str]]:
    cfg, rig = run.cfg, run.cluster.rig
    run.strike_time()
    killed = time.monotonic()
    rig.kill_host(KILLED)
    run.note(f"{KILLED} killed")
    others = set(rig.hosts) - {KILLED}
    claimed = run.wait_record(
        KILLED,
        lambda r: r.state is HostState.LOST and not r.handed_back and r.taken_over_by in others,
        cfg.lost_seconds + 30,
        "claimed, not handed back yet",
    )
    taker = run.report.taker = claimed.taken_over_by
    rig.partition(taker)
    run.note(f"{KILLED} claimed by {taker}, which is cut off inside its {cfg.takeover_pause:g} s pause")
    try:
        done = run.taken_over(KILLED, killed, 2 * cfg.lost_seconds + cfg.takeover_pause + 30)
        run.report.check(done.taken_over_by != taker, f"{KILLED}'s hand-back ended by its cut-off taker {taker}")
        run.taken_over(taker, killed, 2 * cfg.lost_seconds + cfg.takeover_pause + 30)
    finally:
        rig.heal(taker)
    run.note(f"{taker} healed")
    run.back(taker)
    return {KILLED, taker}, {taker}


def fault_broker(run: Run) -> tuple[set[str], set[str]]:
    run.strike_time()
    begun = time.monotonic()
    run.cluster.rig.restart_redis()
    run.note(f"broker killed (SIGKILL) and answering again after {time.monotonic() - begun:.1f} s")
    return set(), set()


STEPS: dict[str, Callable[[Run], tuple[set[str], set[str]]]] = {
    "kill": fault_kill,
    "partition": fault_partition,
    "taker": fault_taker,
    "broker": fault_broker,
}


def run_fault(cluster: Cluster, fault: str, baseline: HostsReport | None = None) -> HostsReport:
    """One campaign through the cluster with `fault` ("baseline": none) at mid-campaign, checked."""
    cfg = cluster.cfg
    report = HostsReport(f"{fault}", store="postgresql", fault=fault)
    for what in cluster.ensure(cfg.takeover_pause if fault == "taker" else 0.0):
        report.notes.append(f"before: {what}")
    cluster.api.reset()
    alerts_from = len(cluster.alert_hook.received)
    document = chaos.task_document(cfg.subtasks, prefix="cz")
    total = 2 * (cfg.subtasks // 2)
    started, started_at = time.monotonic(), time.time()
    task_id = cluster.submit(document, fault)
    watcher = Watcher(cluster, task_id, started)
    watcher.start()
    run = Run(cluster, watcher, report, total)
    lost: set[str] = set()
    back: set[str] = set()
    failed_before, cluster.failed = cluster.failed, True  # until its checks are done
    try:
        if fault != "baseline":
            lost, back = STEPS[fault](run)
        try:
            wait_for(lambda: watcher.ended is not None, cfg.timeout, f"task {task_id} to end", interval=0.2)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; {diagnose(cluster, task_id, started_at)}") from exc
    finally:
        watcher.stop.set()
        watcher.join(10)
    assert watcher.ended is not None
    report.wall_seconds = watcher.ended
    if baseline is not None:
        report.added_seconds = report.wall_seconds - baseline.wall_seconds
    cluster.say(f"[{fault}] task ended after {report.wall_seconds:.1f} s; settling")
    settle(cluster, task_id, report)
    task = cluster.store.get_task(task_id)
    assert task is not None
    subtasks = cluster.store.list_subtasks(task_id)
    chaos.check_subtasks(report, task, subtasks)
    chaos.check_notices(report, cluster.task_hook, task_id)
    chaos.check_jobs(report, cluster.api, subtasks)
    report.jobs_owed = owed(cluster.api, len(subtasks))
    check_host_alerts(report, cluster.alert_hook, alerts_from, lost, back)
    report.threads_died = threads_died(cluster, started_at)
    if fault == "kill" and report.added_seconds is not None:
        limit = cfg.lost_seconds + 5
        report.check(report.added_seconds <= limit, f"a host kill added {report.added_seconds:.1f} s > LOST + 5 s")
    for host in cluster.rig.hosts:
        if cluster.alive(host):
            record = cluster.record(host)
            report.check(record is not None and record.state is HostState.UP, f"host {host} is not up: {record}")
    cluster.failed = failed_before or bool(report.problems)
    return report


def diagnose(cluster: Cluster, task_id: str, since: float) -> str:
    """Why a campaign has not ended: its subtasks not ended, each with where it waits (a job slot, its
    task's line, a message), the queues, and the worker threads that died since `since`. A pending
    subtask that holds a slot with no message was admitted by a process that died before it sent the
    run message: it waits for the slot's lease to lapse, then for the sweep to put it back in line."""
    waiting = cluster.store.list_subtasks(task_id, status=[Status.PENDING, Status.PROCESSING])
    where = []
    for sub in sorted(waiting, key=lambda s: s["status"] != Status.PENDING)[:5]:  # the stranded first
        lane = Lane.of(sub)
        holds = cluster.redis.zscore(keys.slot_holders(lane.value), sub["id"]) is not None
        line = cluster.redis.lpos(keys.sched_ready(lane.value, task_id), sub["id"]) is not None
        where.append(f"{sub['id']} {sub['status']} (slot: {holds}, in line: {line})")
    queues = {name: queue_stats(cluster.redis, name) for name in cluster.queue_names()}
    return (
        f"{len(waiting)} subtasks not ended ({dict(Counter(s['status'] for s in waiting))}): {where}; "
        f"queues {queues}; worker threads died: {threads_died(cluster, since)}"
    )


def owed(api: FakeNieta, subtasks: int) -> int:
    """Image jobs the subtasks were owed: one each, plus a new one after a TIMEOUT (TIMEOUT_RESUBMITS)."""
    timeouts: Counter[str] = Counter()
    for job in api.jobs:
        found = re.findall(r"cz-\d{4}", job.text)
        if found and job.outcome is not None and job.outcome.action == "timeout":
            timeouts[f"{found[0]}/{job.ops}"] += 1
    return subtasks + sum(min(TIMEOUT_RESUBMITS, n) for n in timeouts.values())


def settle(cluster: Cluster, task_id: str, report: HostsReport) -> None:
    """Wait for the final notice and for every queue to drain (nothing more on its way)."""
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: chaos.final_notices(cluster.task_hook, task_id), 60, "the final task notice")
    client, names = cluster.redis, cluster.queue_names()

    def drained() -> bool:  # delayed polls of ended subtasks are left out: they find them ended
        return not any(queue_stats(client, n)["ready"] or queue_stats(client, n)["in_progress"] for n in names)

    try:
        wait_for(drained, 90, "every queue to drain", interval=0.5)
    except TimeoutError:
        stats = {n: queue_stats(client, n) for n in names}
        report.problems.append(f"the queues did not drain: {stats}")
    dead = {n: queue_stats(client, n)["dead"] for n in names}
    if any(dead.values()):
        bodies = [as_text(b)[:300] for n in names for b in client.hvals(bodies_key(dead_letter_name(n)))]
        report.problems.append(f"dead-lettered messages: {dead}: {bodies[:3]}")


def threads_died(cluster: Cluster, since: float) -> list[str]:
    """The threads of the hosts' processes that an exception ended since `since` (unix time), as
    `<host> <process> <thread>: <exception>`. Not a check of the runs, a finding: a Dramatiq consumer
    thread whose restart fails (its `close` raising while the broker does not answer) is gone for
    good, and its process never consumes that queue again."""
    found = []
    for host in cluster.rig.hosts:
        for path in sorted((cluster.rig.tmp / host / "log").glob("*.log")):
            with open(path, errors="replace") as lines:
                for line in lines:
                    if "unhandled exception in thread" not in line:
                        continue
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        record = json.loads(line)
                        when = datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()
                        if when >= since:
                            errors = [f"{e['exc_type']}: {e['exc_value']}" for e in record.get("exception") or []]
                            where = f"{host} {record.get('process')} {record.get('thread_name')}"
                            found.append(f"{where}: {errors[0] if errors else '?'}")
    return found


def host_cards(hook: FakeFeishu, since: int) -> list[str]:
    """The `Host lost:` / `Host back:` alerts since the `since`-th request: "lost h3", "back h2"."""
    found = []
    for received in hook.received[since:]:
        title, _ = chaos.card_text(received.body)
        match = _HOST_CARD.search(title)
        if match:
            found.append(f"{match.group(1)} {match.group(2)}")
    return found


def check_host_alerts(report: HostsReport, hook: FakeFeishu, since: int, lost: set[str], back: set[str]) -> None:
    """A `Host lost` alert for each host the fault hit, a `Host back` for each that came back, none else."""
    wanted = {f"lost {h}" for h in lost} | {f"back {h}" for h in back}
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: wanted <= set(host_cards(hook, since)), 30, "the host alerts")
    report.host_alerts = host_cards(hook, since)
    seen = set(report.host_alerts)
    report.check(wanted <= seen, f"host alerts missing: {sorted(wanted - seen)} (got {report.host_alerts})")
    report.check(seen <= wanted, f"host alerts not expected: {sorted(seen - wanted)}")
    report.check(
        all(n == 1 for n in Counter(report.host_alerts).values()), f"host alerts repeated: {report.host_alerts}"
    )


# --- the series and its table ----------------------------------------------------------------------


def run_series(cfg: HostsConfig, faults: list[str], say: Callable[[str], None] = print) -> list[HostsReport]:
    """The baseline, then each fault, on one cluster (the "taker" last: it restarts the daemons); "failover" apart."""
    order = sorted((f for f in faults if f != "failover"), key=lambda f: f == "taker")
    reports: list[HostsReport] = []
    with Cluster(cfg, say) if order else contextlib.nullcontext() as cluster:
        for fault in ["baseline", *order] if order else []:
            reports.append(run_fault(cluster, fault, reports[0] if reports else None))
            say(row(reports[-1], cfg))
    if "failover" in faults:
        from bench import failover  # it builds on this module

        reports += failover.run_series(cfg, say)
    return reports


HEADER = (
    f"{'fault':<34} {'wall s':>7} {'added s':>8} {'jobs/owed':>10} {'beyond':>6} {'lost':>5}  "
    f"{'host alerts':<28} result"
)


def row(report: HostsReport, cfg: HostsConfig) -> str:
    added = "-" if report.added_seconds is None else f"{report.added_seconds:+.1f}"
    jobs = f"{report.jobs_created}/{report.jobs_owed}"
    alerts = ", ".join(report.host_alerts) or "none"
    result = "PASS" if not report.problems else "FAIL"
    what = WHAT[report.fault].format(p=cfg.partition_seconds)
    return (
        f"{what:<34} {report.wall_seconds:>7.1f} {added:>8} {jobs:>10} {report.duplicate_jobs:>6} "
        f"{report.lost:>5}  {alerts:<28} {result}"
    )


def describe(report: HostsReport) -> list[str]:
    lines = [f"[{report.fault}] {note}" for note in report.notes]
    lines.append(f"[{report.fault}] task {report.task_status}; subtasks {report.statuses}")
    if report.errors:
        lines.append(f"[{report.fault}] failure reasons: {report.errors}")
    if report.threads_died:
        lines.append(f"[{report.fault}] worker threads ended by an exception: {report.threads_died}")
    if report.problems:
        lines.append(f"[{report.fault}] FAIL: " + "; ".join(report.problems))
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subtasks", type=int, default=600, help="subtasks of the campaign, half of them Lumina")
    parser.add_argument("--lost-seconds", type=float, default=5.0, help="NIETEST_HOST_LOST_SECONDS")
    parser.add_argument("--partition-seconds", type=float, default=60.0, help="how long the partition run cuts h2 off")
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"a comma-separated subset of {','.join(FAULTS)}")
    args = parser.parse_args()
    faults = [f for f in args.faults.split(",") if f]
    if unknown := sorted(set(faults) - set(FAULTS)):
        parser.error(f"unknown faults {unknown}; known: {', '.join(FAULTS)}")
    if reason := Rig.available() or (None if postgres_bindir() else "PostgreSQL is not installed"):
        print(f"bench/hosts.py cannot run here: {reason}", file=sys.stderr)
        return 2
    cfg = HostsConfig(subtasks=args.subtasks, lost_seconds=args.lost_seconds, partition_seconds=args.partition_seconds)
    print(f"python {platform.python_version()}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}")
    print(
        f"3 hosts, 2 for the failover (1 master, 1 subtask and 1 subtask_ops process of {cfg.threads} threads each); "
        f"{cfg.subtasks} subtasks, NIETEST_MAX_JOBS {cfg.max_jobs} (+ as many Lumina), generation "
        f"{cfg.generation_time:g} s, polling {cfg.polling_interval:g} s; NIETEST_HOST_LOST_SECONDS "
        f"{cfg.lost_seconds:g}; faults at {cfg.fault_at:.0%} of the subtasks",
        flush=True,
    )
    print(HEADER, flush=True)
    reports = run_series(cfg, faults, lambda line: print(line, flush=True))
    print(f"\n{HEADER}")
    for report in reports:
        print(row(report, cfg))
    for report in reports:
        print("\n".join(describe(report)))
    return 1 if any(r.problems for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
