"""The task pipeline's concurrency, overhead and memory, against the fake Nieta API on loopback.

    .venv/bin/python bench/pipeline.py [--subtasks 500] [--store sqlite|postgresql]

1. Concurrency: 500 subtasks, fake generation time 2 s, polling interval 0.5 s,
   NIETEST_MAX_JOBS=200, 2 subtask processes x 5 threads. Wall time to finish the task for
   (a) nietest, (b) a baseline actor written the way the replaced system did it (the worker
   thread sleeps between polls), same processes and threads, and (c) the lower bound
   ceil(500 / 200) x (2 s + 0.5 s). The fake API's own load is printed beside.
2. Overhead: zero generation time and the shortest polling interval (0.05 s): subtasks per
   second through the whole pipeline (store writes included) versus bare Dramatiq no-op
   messages per second on the same broker and processes; and where the CPU went during the
   pipeline rounds, per subtask: the workers, the broker, the fake API and (PostgreSQL) the
   server's processes serving the daemon's database.
3. Memory: peak resident memory (VmHWM) of each subtask worker with 500 jobs in flight.
Every phase runs a real `nietest daemon` (embedded valkey broker; the SQLite store in its data dir,
or with `--store postgresql` a fresh database of the PostgreSQL server that
nietest_daemon/testing/postgres.py finds: bench/stores.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import dramatiq
import httpx
import redis

from bench import stores
from nietest_daemon.coordination.connection import redis_client
from nietest_daemon.core import settings as settings_module
from nietest_daemon.domain.lifecycle import TERMINAL
from nietest_daemon.programs.daemon import control_proxy
from nietest_daemon.store import open_store_for
from nietest_daemon.testing import task_documents as taskdocs
from nietest_daemon.testing.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent

TOKEN = "bench-token-0123456789"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class FakeAPI:
    """nietest_daemon/testing/fake_nieta in its own process (so its CPU use is measurable)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nietest_daemon.testing.fake_nieta", "--token", TOKEN, "--no-record"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        ready = json.loads(self.proc.stdout.readline())
        self.url = ready["url"]
        self.http = httpx.Client(base_url=self.url, timeout=10)

    def configure(self, generation_time: float) -> None:
        self.http.post("/_fake/config", json={"generation_time": generation_time}).raise_for_status()
        self.http.post("/_fake/reset").raise_for_status()

    def stats(self) -> dict:
        return self.http.get("/_fake/stats").json()

    def env(self) -> dict[str, str]:
        return {"NIETA_XTOKEN": TOKEN, "NIETA_API_BASE_URL": self.url, "NIETA_OPS_API_BASE_URL": self.url + "/ops"}

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


@contextlib.contextmanager
def daemon(store: str = "sqlite", **overrides: str) -> Iterator[tuple[settings_module.Settings, dict[str, str]]]:
    """A real `nietest daemon` in a fresh home on `store` (bench/stores.py), stopped on exit."""
    with stores.store_env(store) as store_settings, _daemon(**store_settings, **overrides) as started:
        yield started


@contextlib.contextmanager
def _daemon(**overrides: str) -> Iterator[tuple[settings_module.Settings, dict[str, str]]]:
    home = Path(tempfile.mkdtemp(prefix="ntp-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIETEST_")}
    env.update(
        NIETEST_HOME=str(home),
        NIETEST_METRICS_ADDR="127.0.0.1:0",  # any free port: never in the way of a running daemon
        NIETEST_MASTER_PROCESSES="1",
        NIETEST_SUBTASK_PROCESSES="2",
        NIETEST_SUBTASK_THREADS="5",
        NIETEST_SUBTASK_OPS_PROCESSES="0",
        NIETEST_ACTOR_MODULES="baseline_actors",
        PYTHONPATH=os.pathsep.join([str(ROOT / "bench"), str(ROOT)]),
        **overrides,
    )
    settings = settings_module.load(env)
    proc = subprocess.Popen(
        [sys.executable, "-m", "nietest_daemon", "daemon"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(settings.control_socket.exists, 30, "control socket")
        proxy = control_proxy(settings)
        wait_for(
            lambda: all(p["statename"] == "RUNNING" for p in proxy.supervisor.getAllProcessInfo()),
            60,
            "processes RUNNING",
        )
        # supervisord calls the embedded broker RUNNING a moment before valkey has made its socket.
        client = redis_client(settings)
        try:
            wait_for(client.ping, 30, "the broker answers")
        finally:
            client.close()
        yield settings, env
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        shutil.rmtree(home, ignore_errors=True)


def worker_pids(settings: settings_module.Settings, group: str) -> list[int]:
    return [p["pid"] for p in control_proxy(settings).supervisor.getAllProcessInfo() if p["group"] == group]


def cpu_by_part(settings: settings_module.Settings, api_pid: int) -> dict[str, float]:
    """CPU seconds used so far by each part of the daemon, the fake API and the store's server."""
    parts = {f"{group} workers": worker_pids(settings, group) for group in ("master", "subtask")}
    valkey = settings.run_dir / "valkey.pid"
    parts["broker (valkey)"] = [int(valkey.read_text())] if valkey.exists() else []
    parts["fake API"] = [api_pid]
    used = {name: sum(cpu_seconds(pid) for pid in pids) for name, pids in parts.items()}
    if settings.store_url:
        used["PostgreSQL server"] = stores.server_cpu_seconds(settings.store_url)
    return used


def task_file(directory: Path, subtasks: int) -> Path:
    values = [f"bench style {i}" for i in range(subtasks)]
    task = taskdocs.task_document(f"bench {subtasks}", [taskdocs.variable_prompt("v", values, name="style")])
    path = directory / f"bench-{subtasks}.json"
    path.write_text(json.dumps(task))
    return path


def submit(env: dict[str, str], path: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "nietest_daemon", "submit", str(path)], capture_output=True, text=True, env=env
    )
    if out.returncode != 0:
        raise SystemExit(f"nietest submit failed: {out.stderr.strip()}")
    return out.stdout.strip()


def run_task(settings: settings_module.Settings, env: dict[str, str], path: Path, timeout: float) -> tuple[float, dict]:
    """Submit through the CLI; return the task's time from its submission to its end, and the task.

    Both ends are the task's stored timestamps (`created_at`, written by `nietest submit`, and
    `completed_at`): the CLI's own interpreter start is not pipeline time, and the bench's polling
    neither shifts the figure nor competes for the CPU with a tight loop."""
    task_id = submit(env, path)
    store = open_store_for(settings)
    task = wait_for(
        lambda: (t := store.get_task(task_id)) and t["status"] in TERMINAL and t,
        timeout,
        "the task to end",
        interval=0.2,
    )
    store.close()
    return (task["completed_at"] - task["created_at"]).total_seconds(), task


def enqueue_many(settings: settings_module.Settings, actor: str, args_list: list[tuple]) -> redis.Redis:
    from dramatiq.brokers.redis import RedisBroker

    client = redis.Redis.from_url(settings.broker_url)
    broker = RedisBroker(client=client, middleware=[])
    queue = settings.queue("subtask").name
    for args in args_list:
        broker.enqueue(dramatiq.Message(queue_name=queue, actor_name=actor, args=args, kwargs={}, options={}))
    return client


OVERHEAD_ROUNDS = 3


def _figures(values: list[float]) -> str:
    return ", ".join(f"{v:.0f}" for v in values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subtasks", type=int, default=500)
    parser.add_argument("--skip-baseline", action="store_true", help="skip (b), which takes about two minutes")
    stores.add_store_option(parser)
    args = parser.parse_args()
    n = args.subtasks
    work = Path(tempfile.mkdtemp(prefix="ntp-bench-"))
    api = FakeAPI()
    results: dict[str, object] = {}
    try:
        # 1. concurrency --------------------------------------------------------------------------------
        api.configure(generation_time=2.0)
        limits = {"NIETEST_MAX_JOBS": "200", "IMAGE_POLLING_INTERVAL": "0.5"}
        with daemon(args.store, **api.env(), **limits) as (settings, env):
            fake_cpu = cpu_seconds(api.proc.pid)
            elapsed, task = run_task(settings, env, task_file(work, n), timeout=300)
            fake_cpu = cpu_seconds(api.proc.pid) - fake_cpu
            stats = api.stats()
            results["a"] = (elapsed, task["completed_images"], stats, fake_cpu)
            if not args.skip_baseline:
                api.configure(generation_time=2.0)
                started = time.monotonic()
                client = enqueue_many(settings, "baseline_subtask", [(i, 0.5) for i in range(n)])
                wait_for(lambda: int(client.get("bench:baseline_done") or 0) >= n, 1200, "baseline done", interval=0.1)
                results["b"] = time.monotonic() - started
        bound = math.ceil(n / 200) * (2.0 + 0.5)

        # 2. overhead: rounds of the pipeline and of no-ops, alternating, medians ------------------------
        api.configure(generation_time=0.0)
        limits = {"NIETEST_MAX_JOBS": "100000", "IMAGE_POLLING_INTERVAL": "0.05"}
        with daemon(args.store, **api.env(), **limits) as (settings, env):
            pipeline_rates, noop_rates, completed = [], [], 0
            client = redis.Redis.from_url(settings.broker_url)
            cpu: dict[str, float] = {}
            for _ in range(OVERHEAD_ROUNDS):
                before = cpu_by_part(settings, api.proc.pid)
                elapsed, task = run_task(settings, env, task_file(work, n), timeout=300)
                for part, seconds in cpu_by_part(settings, api.proc.pid).items():
                    cpu[part] = cpu.get(part, 0.0) + seconds - before.get(part, 0.0)
                pipeline_rates.append(n / elapsed)
                completed += task["completed_images"]
                client.delete("bench:noop_done")
                started = time.monotonic()
                enqueue_many(settings, "bench_noop", [()] * (n * 4)).close()
                wait_for(lambda: int(client.get("bench:noop_done") or 0) >= n * 4, 300, "no-ops done", interval=0.01)
                noop_rates.append(n * 4 / (time.monotonic() - started))
            client.close()
            pipeline_rate, noop_rate = statistics.median(pipeline_rates), statistics.median(noop_rates)
            results["overhead"] = (pipeline_rate, noop_rate, pipeline_rates, noop_rates, completed)
            results["cpu"] = {part: 1000 * seconds / completed for part, seconds in cpu.items()}

        # 3. memory at 500 jobs in flight ----------------------------------------------------------------
        api.configure(generation_time=15.0)
        limits = {"NIETEST_MAX_JOBS": "100000", "IMAGE_POLLING_INTERVAL": "0.5"}
        with daemon(args.store, **api.env(), **limits) as (settings, env):
            store_task = task_file(work, n)
            submit(env, store_task)
            wait_for(lambda: api.stats()["jobs"] >= n, 60, "all jobs in flight", interval=0.1)
            time.sleep(3)  # a few polling rounds with every job in flight
            pids = worker_pids(settings, "subtask")
            results["memory"] = [(status_kib(p, "VmHWM"), status_kib(p, "VmRSS")) for p in pids]
            results["in_flight"] = api.stats()["jobs"]
    finally:
        api.close()
        shutil.rmtree(work, ignore_errors=True)

    elapsed, completed, stats, fake_cpu = results["a"]
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        "?",
    )
    print(f"machine: {os.cpu_count()} cores, {cpu}, Python {platform.python_version()}; store: {args.store}")
    print(f"1. concurrency: {n} subtasks, generation 2 s, polling 0.5 s, NIETEST_MAX_JOBS=200, 2 x 5 threads")
    print(f"   (a) nietest                      {elapsed:7.1f} s   ({completed} completed)")
    if "b" in results:
        speedup = results["b"] / elapsed
        print(f"   (b) baseline, thread polls       {results['b']:7.1f} s   -> nietest {speedup:.1f}x faster")
    print(f"   (c) lower bound ceil({n}/200)*2.5 {bound:7.1f} s   -> nietest at {elapsed / bound:.2f}x it")
    print(
        f"   fake API during (a): {stats['requests']} requests, {stats['requests_per_second']} req/s, peak "
        f"{stats['peak_requests_per_second']}/s, mean service {stats['mean_service_ms']} ms, "
        f"max in flight {stats['max_in_flight']}, CPU {fake_cpu:.1f} s in {elapsed:.1f} s"
    )
    pipeline_rate, noop_rate, pipeline_rates, noop_rates, completed = results["overhead"]
    ratio = pipeline_rate / noop_rate
    print(
        f"2. overhead: generation 0 s, polling 0.05 s, {OVERHEAD_ROUNDS} rounds of {n} subtasks and of {4 * n} "
        f"no-ops, alternating ({completed} subtasks completed); medians"
    )
    print(f"   pipeline        {pipeline_rate:7.1f} subtasks/s        (rounds: {_figures(pipeline_rates)})")
    print(f"   bare Dramatiq   {noop_rate:7.1f} no-op messages/s  (rounds: {_figures(noop_rates)})")
    print(
        f"   ratio           {ratio:.3f} subtasks per no-op message "
        f"(a subtask is 3 messages with the poll's hop through the delay queue, 2 HTTP calls, 3 store writes)"
    )
    cpu = results["cpu"]
    print(
        f"   CPU per subtask in the pipeline rounds: {sum(cpu.values()):.2f} ms ("
        + ", ".join(f"{part} {ms:.2f}" for part, ms in cpu.items())
        + ")"
    )
    print(f"3. memory with {results['in_flight']} jobs in flight, per subtask worker (peak VmHWM / current VmRSS):")
    for hwm, rss in results["memory"]:
        print(f"   {hwm / 1024:6.1f} MiB / {rss / 1024:6.1f} MiB")
    ok = "b" not in results or results["b"] / elapsed >= 10
    ok = ok and elapsed / bound <= 1.5 and ratio >= 0.1
    print(f"targets (>= 10x the baseline, <= 1.5x the bound, overhead ratio >= 0.1): {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
