"""How fast a killed worker is replaced, and what the daemon's processes cost in memory.

    .venv/bin/python bench/restart.py [--kills 10]

Starts `nietest daemon` on the embedded broker in a temporary NIETEST_HOME with one subtask
worker, then `kill -9`s it N times. For each kill it measures, from the kill:
  - respawn: until supervisord reports the replacement process (its new pid);
  - consuming: until a message enqueued right after the kill has been processed by the
    replacement (interpreter start, imports, broker connection, first fetch).
The baseline, in the same run, is stock supervisord on the same etc/supervisord.conf.
Then it prints the resident memory (VmRSS) of supervisord, of one idle worker, and of the
embedded broker (its relay process plus valkey-server).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

from nietest_daemon.core import settings as settings_module
from nietest_daemon.programs import daemon as daemon_module
from nietest_daemon.programs.daemon import control_proxy
from nietest_daemon.testing.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent


def spawn_times(log: Path, process: str) -> list[float]:
    """Epoch times of supervisord's "spawned: '<process>'" lines, in its JSON or its stock text format."""
    times = []
    for line in log.read_text().splitlines():
        if f"spawned: '{process}'" not in line:
            continue
        if line.startswith("{"):
            stamp = json.loads(line)["timestamp"]
            times.append(datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp())
        else:  # "2026-11-28 02:35:00,640 INFO spawned: ..." in local time
            times.append(time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000)
    return times


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def run_series(kills: int, stock: bool) -> tuple[list[float], list[float], dict[str, int]]:
    """Start a daemon (ours, or stock supervisord on the same configuration), kill -9 its worker `kills` times."""
    home = Path(tempfile.mkdtemp(prefix="ntb-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIETEST_")}
    env.update(
        NIETEST_HOME=str(home),
        NIETEST_METRICS_ADDR="127.0.0.1:0",  # any free port: never in the way of a running daemon
        NIETEST_MASTER_PROCESSES="1",
        NIETEST_SUBTASK_PROCESSES="1",
        NIETEST_SUBTASK_OPS_PROCESSES="1",
        NIETEST_SUBTASK_THREADS="5",
        NIETEST_ACTOR_MODULES="bench_actors",
        PYTHONPATH=os.pathsep.join([str(ROOT / "bench"), str(ROOT)]),
    )
    settings = settings_module.load(env)
    if stock:
        for directory in (settings.data_dir, settings.log_dir, settings.run_dir):
            directory.mkdir(parents=True, exist_ok=True)
        command = [str(Path(sys.executable).parent / "supervisord"), "-n", "-c", str(daemon_module.config_path())]
        env = {**env, **settings.supervisor_env(), "NIETEST_PYTHON": sys.executable}
    else:
        command = [sys.executable, "-m", "nietest_daemon", "daemon"]
    daemon = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, cwd=home
    )
    wait_for(settings.control_socket.exists, 30, "the control socket")
    proxy = control_proxy(settings)
    client = redis.Redis.from_url(settings.broker_url)
    broker = RedisBroker(client=client, middleware=[])
    queue = settings.queue("subtask").name

    def info(name: str) -> dict:
        return proxy.supervisor.getProcessInfo(name)

    tokens: list[str] = []

    def enqueue_ping() -> None:
        tokens.append(uuid.uuid4().hex)
        message = dramatiq.Message(queue_name=queue, actor_name="bench_ping", args=(tokens[-1],), kwargs={}, options={})
        broker.enqueue(message)

    def wait_ping() -> tuple[float, int]:
        """When the last message was processed (CLOCK_BOOTTIME), and by which pid."""
        _, value = client.blpop([f"bench:{tokens[-1]}"], timeout=60)
        when, pid = value.decode().split(":")
        return float(when), int(pid)

    try:
        wait_for(
            lambda: all(p["statename"] == "RUNNING" for p in proxy.supervisor.getAllProcessInfo()),
            60,
            "every process RUNNING",
        )
        # supervisord calls the embedded broker RUNNING a moment before valkey has made its socket.
        wait_for(client.ping, 30, "the broker answers")
        enqueue_ping()  # warm: the worker is consuming
        wait_ping()
        respawn, consuming, kills_wall = [], [], []
        for _ in range(kills):
            old = info("subtask:subtask_00")["pid"]
            killed_at = time.clock_gettime(time.CLOCK_BOOTTIME)
            kills_wall.append(time.time())
            os.kill(old, signal.SIGKILL)
            enqueue_ping()
            processed_at, new_pid = wait_ping()
            assert new_pid != old, "message processed by the killed worker?"
            consuming.append(processed_at - killed_at)
            wait_for(lambda: info("subtask:subtask_00")["statename"] == "RUNNING", 30, "RUNNING again")
        # Respawn times come from supervisord's own log ("spawned: ..." lines, ms timestamps): asking
        # supervisord over its socket would wake its main loop and hide the delay being measured.
        spawns = spawn_times(settings.log_dir / "supervisord.log", "subtask_00")
        for killed in kills_wall:
            respawn.append(min(t for t in spawns if t >= killed - 0.002) - killed)
        time.sleep(3)  # let the last replacement settle to idle before measuring memory
        broker_pid = info("broker:broker")["pid"]
        memory = {
            "supervisord": rss_kib(daemon.pid),
            "idle worker (subtask, 5 threads)": rss_kib(info("subtask:subtask_00")["pid"]),
            "embedded broker: relay process": rss_kib(broker_pid),
            "embedded broker: valkey-server": sum(rss_kib(p) for p in children(broker_pid)),
        }
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(120)
        client.close()
        shutil.rmtree(home, ignore_errors=True)
    return respawn, consuming, memory


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10)
    args = parser.parse_args()

    stock_respawn, stock_consuming, _ = run_series(args.kills, stock=True)
    respawn, consuming, memory = run_series(args.kills, stock=False)

    def ms(values: list[float]) -> str:
        return f"median {statistics.median(values) * 1000:6.0f} ms   max {max(values) * 1000:6.0f} ms"

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    print(f"machine: {os.cpu_count()} cores, {cpu}, Python {platform.python_version()}")
    print(f"kill -9 of one worker, {args.kills} times each; time from the kill until ...")
    print("  baseline: stock supervisord on the same etc/supervisord.conf")
    print(f"    the replacement process is started       : {ms(stock_respawn)}")
    print(f"    the replacement has processed a message  : {ms(stock_consuming)}")
    print("  nietest daemon (supervisord with prompt respawn)")
    print(f"    the replacement process is started       : {ms(respawn)}")
    print(f"    the replacement has processed a message  : {ms(consuming)}")
    print("resident memory (VmRSS), nietest daemon:")
    for name, kib in memory.items():
        print(f"  {name:<34} {kib / 1024:6.1f} MiB")
    target = statistics.median(consuming) < 1.0
    print(f"target (median < 1 s until consuming): {'met' if target else 'MISSED'}")
    return 0 if target else 1


if __name__ == "__main__":
    sys.exit(main())
