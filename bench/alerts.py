"""How long an operations alert takes, and how many webhook requests a burst of restarts costs.

    .venv/bin/python bench/alerts.py [--kills 10] [--burst 50] [--windows 10,1,0] [--burst-windows 10,1]

Runs the real `nietest daemon` (supervisord, the `alerts` listener, worker processes, the embedded
valkey) in a temporary NIETEST_HOME, with a signed fake Feishu webhook on 127.0.0.1
(nietest_daemon/testing/fake_feishu.py: a real HTTP server that checks every signature). Nothing leaves the host.

1. Latency: for each NIETEST_ALERT_COALESCE_SECONDS in --windows, a daemon with --kills subtask
   workers; each worker is killed with SIGKILL once, one after the other (so no crash loop forms,
   with the default thresholds); the time from the kill to the webhook receiving the restart
   alert, median and max of the --kills kills.
2. Burst: for each window in --burst-windows, a daemon with --burst subtask workers, all killed
   with SIGKILL at the same moment; the number of webhook requests until every replacement runs
   and two windows have passed quietly, the most in any second and any minute, the size of the
   messages, and the time until the first arrived.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from nietest_daemon.core import settings as settings_module
from nietest_daemon.domain.process_state import ProcessState
from nietest_daemon.programs.daemon import control_proxy
from nietest_daemon.testing.fake_feishu import FakeFeishu
from nietest_daemon.testing.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent

SECRET = "bench-secret-7c1f"
SCRUB = {"BROKER_REDIS_URL", "REDIS_HOST", "MONGO_URI", "MONGO_HOST", "FEISHU_WEBHOOK_URL", "FEISHU_TASK_WEBHOOK_URL"}


class Run:
    """One daemon with `workers` subtask processes and the alerts listener, talking to `hook`."""

    def __init__(self, hook: FakeFeishu, workers: int, window: float) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="nta-", dir="/tmp"))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NIETEST_", "FEISHU_")) and k not in SCRUB}
        env.update(
            NIETEST_HOME=str(self.home),
            NIETEST_METRICS_ADDR="127.0.0.1:0",  # any free port: never in the way of a running daemon
            NIETEST_MASTER_PROCESSES="0",
            NIETEST_SUBTASK_PROCESSES=str(workers),
            NIETEST_SUBTASK_OPS_PROCESSES="0",
            NIETEST_SUBTASK_THREADS="2",
            NIETEST_DRAIN_SECONDS="2",
            NIETEST_ALERT_COALESCE_SECONDS=f"{window:g}",
            FEISHU_ALERT_WEBHOOK_URL=hook.url,
            FEISHU_WEBHOOK_SECRET=SECRET,
        )
        self.settings = settings_module.load(env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nietest_daemon", "daemon"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            cwd=self.home,
        )
        self.workers = workers
        wait_for(self.all_running, 120, "every process RUNNING")

    def all_running(self) -> bool:
        """Every process RUNNING: the subtask workers, the broker and the listeners and the metrics program."""
        infos = control_proxy(self.settings).supervisor.getAllProcessInfo()
        workers = sum(1 for i in infos if i["group"] == "subtask")
        return workers == self.workers and all(i["statename"] == ProcessState.RUNNING for i in infos)

    def running(self) -> dict[str, int]:
        infos = control_proxy(self.settings).supervisor.getAllProcessInfo()
        return {f"{i['group']}:{i['name']}": i["pid"] for i in infos if i["statename"] == ProcessState.RUNNING}

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(120)
        finally:
            shutil.rmtree(self.home, ignore_errors=True)


def latency_series(window: float, kills: int) -> list[float]:
    with FakeFeishu(secret=SECRET) as hook:
        run = Run(hook, kills, window)
        try:
            time.sleep(1.5)  # let the listener hear every start; an idle daemon, as in production
            latencies = []
            for n in range(kills):
                name = f"subtask:subtask_{n:02d}"
                before = len(hook.received)
                pid = run.running()[name]
                killed = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                received = wait_for(lambda b=before: hook.received[b:], window + 30, f"the alert for {name}")
                latencies.append(received[0].time - killed)
                wait_for(lambda nm=name, p=pid: run.running().get(nm) not in (None, p), 30, f"{name} replaced")
            assert all(r.sign_ok for r in hook.received)
            return latencies
        finally:
            run.stop()


def burst(window: float, workers: int) -> dict[str, Any]:
    with FakeFeishu(secret=SECRET) as hook:
        run = Run(hook, workers, window)
        try:
            time.sleep(1.5)
            pids = run.running()
            victims = {name: pid for name, pid in pids.items() if name.startswith("subtask:")}
            killed = time.monotonic()
            for pid in victims.values():
                os.kill(pid, signal.SIGKILL)
            first = wait_for(lambda: hook.received, window + 60, "the first alert")[0]
            wait_for(
                lambda: all(run.running().get(n) not in (None, p) for n, p in victims.items()),
                180,
                "every replacement RUNNING",
                interval=0.2,
            )
            quiet_until = time.monotonic() + 2 * window + 2
            while time.monotonic() < quiet_until:  # a bounded wait for any straggling message
                time.sleep(0.2)
            requests = hook.received
            per_second = max(sum(1 for r in requests if q.time <= r.time < q.time + 1.0) for q in requests)
            per_minute = max(sum(1 for r in requests if q.time <= r.time < q.time + 60.0) for q in requests)
            return {
                "restarts": len(victims),
                "requests": len(requests),
                "max_requests_in_1s": per_second,
                "max_requests_in_60s": per_minute,
                "first_after": first.time - killed,
                "bytes": [len(r.raw) for r in requests],
                "listed": [sum(name in (r.raw.decode()) for name in victims) for r in requests],
                "signed": all(r.sign_ok for r in requests),
            }
        finally:
            run.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--burst", type=int, default=50)
    parser.add_argument("--windows", default="10,1,0", help="coalescing windows (s) to measure latency with")
    parser.add_argument("--burst-windows", default="10,1", help="coalescing windows (s) for the burst")
    args = parser.parse_args()
    windows = [float(w) for w in args.windows.split(",")]
    burst_windows = [float(w) for w in args.burst_windows.split(",")]

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    print(
        f"command: .venv/bin/python bench/alerts.py --kills {args.kills} --burst {args.burst} "
        f"--windows {args.windows} --burst-windows {args.burst_windows}"
    )
    print(f"machine: {os.cpu_count()} cores, {cpu}, Python {platform.python_version()}, {platform.system()}")
    print(f"kill -9 of a worker -> restart alert received by the webhook ({args.kills} kills per window):")
    for window in windows:
        values = latency_series(window, args.kills)
        print(
            f"  NIETEST_ALERT_COALESCE_SECONDS={window:<4g}  median {statistics.median(values):6.2f} s   "
            f"min {min(values):6.2f} s   max {max(values):6.2f} s"
        )
    ok = True
    for window in burst_windows:
        result = burst(window, args.burst)
        print(f"burst: {result['restarts']} workers killed at once, NIETEST_ALERT_COALESCE_SECONDS={window:g}:")
        print(
            f"  webhook requests          : {result['requests']} (at most {result['max_requests_in_1s']} in any "
            f"second, {result['max_requests_in_60s']} in any minute)"
        )
        print(f"  workers listed per message: {result['listed']}")
        print(f"  message sizes (bytes)     : {result['bytes']}  (Feishu's limit: 20 KB)")
        print(f"  first message after       : {result['first_after']:.2f} s; all signed: {result['signed']}")
        within = (
            result["max_requests_in_1s"] <= 5 and result["max_requests_in_60s"] <= 100 and max(result["bytes"]) < 20_000
        )
        small = result["requests"] <= 5
        print(f"  within Feishu's limits (5/s, 100/min, 20 KB): {'yes' if within else 'NO'}; small (<= 5): {small}")
        ok = ok and within and (small or window < 10)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
