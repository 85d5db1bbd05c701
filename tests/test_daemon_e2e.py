"""End-to-end: the real daemon (supervisord + worker processes + embedded valkey)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from nietest_daemon.testing.daemon import ROOT, Daemon, clean_env, pids_of_home
from nietest_daemon.testing.waiting import wait_for

pytestmark = pytest.mark.e2e

REQUIRED_KEYS = {"timestamp", "level", "event", "logger", "pid", "process"}


@pytest.fixture(scope="module")
def daemon():
    """One daemon shared by the tests that only poke at it (kills, stop/start, logs)."""
    home = Path(tempfile.mkdtemp(prefix="nt-", dir="/tmp"))
    d = Daemon(
        home,
        NIETEST_MASTER_PROCESSES="1",
        NIETEST_SUBTASK_PROCESSES="2",
        NIETEST_SUBTASK_OPS_PROCESSES="1",
        NIETEST_MASTER_THREADS="2",
        NIETEST_SUBTASK_THREADS="3",
        NIETEST_SUBTASK_OPS_THREADS="2",
        NIETEST_DRAIN_SECONDS="5",
        NIETEST_BROKER_HEARTBEAT_TIMEOUT="3",
        NIETEST_LOG_MAX_BYTES="64KB",
        NIETEST_LOG_BACKUPS="2",
        NIETEST_ACTOR_MODULES="e2e_actors",
        NIETA_XTOKEN="tok-SECRET-4f1c9a",
    )
    d.start()
    yield d
    try:
        d.stop()
    finally:
        d.kill_everything()
        shutil.rmtree(home, ignore_errors=True)


def test_every_configured_process_runs(daemon: Daemon) -> None:
    running = wait_for(
        lambda: (r := daemon.wait_running()).get("alerts") and r.get("watchdog") and r, 15, what="the listeners too"
    )
    assert {g: len(ps) for g, ps in running.items() if ps} == {
        "alerts": 1,
        "watchdog": 1,
        "metrics": 1,
        "broker": 1,
        "master": 1,
        "subtask": 2,
        "subtask_ops": 1,
    }
    groups = ("master", "subtask", "subtask_ops")
    status = wait_for(
        lambda: (
            (s := daemon.status())
            and all(p["last_sign_of_life_seconds"] is not None for p in s["processes"] if p["group"] in groups)
            and s
        ),
        10,
        what="every worker's first sign of life",
    )
    workers = [p for p in status["processes"] if p["group"] in groups]
    assert len(workers) == 4 and all(0 <= p["last_sign_of_life_seconds"] < 5 for p in workers)
    assert all(p["last_sign_of_life_seconds"] is None for p in status["processes"] if p["group"] == "alerts")
    assert status["queues"]["master_ops"]["processes"] == 0
    assert not [p for p in status["processes"] if p["group"] == "master_ops"]
    assert status["broker"].startswith("embedded valkey unix://")
    assert status["store"].startswith("sqlite ")
    assert all(p["uptime_seconds"] is not None and p["pid"] for p in status["processes"])
    # the human form shows the same
    text = daemon.run("status").stdout
    assert "subtask:subtask_01" in text and "RUNNING" in text and "nietest_subtask_ops" in text
    assert "LAST SIGN OF LIFE" in text and " s ago" in text


def test_control_socket_is_private(daemon: Daemon) -> None:
    sock = daemon.settings.control_socket
    assert sock.exists()
    assert (sock.stat().st_mode & 0o777) == 0o700
    assert (daemon.settings.run_dir.stat().st_mode & 0o077) == 0
    for path in (daemon.settings.run_dir / "broker.sock", daemon.settings.run_dir):
        assert path.exists() and (path.stat().st_mode & 0o077) == 0, path
    # Another user really cannot talk to supervisord (or the embedded broker) through them.
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root to act as another user")
    probe = (
        "import socket, sys\n"
        "for path in sys.argv[1:]:\n"
        "    s = socket.socket(socket.AF_UNIX)\n"
        "    try:\n"
        "        s.connect(path)\n"
        "    except PermissionError:\n"
        "        print('denied', path)\n"
        "    else:\n"
        "        print('CONNECTED', path)\n"
    )
    other = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", os.sys.executable, "-c", probe]
    result = subprocess.run(
        [*other, str(sock), str(daemon.settings.run_dir / "broker.sock")], capture_output=True, text=True, timeout=30
    )
    assert result.stdout.split() == ["denied", str(sock), "denied", str(daemon.settings.run_dir / "broker.sock")], (
        result.stdout + result.stderr
    )


def test_kill_9_replaces_only_that_worker(daemon: Daemon) -> None:
    daemon.wait_running()
    before = daemon.pids()
    victim = "subtask:subtask_00"
    os.kill(before[victim], signal.SIGKILL)

    def replaced():
        now = daemon.pids()
        return now if now.get(victim) not in (None, before[victim]) else None

    after = wait_for(replaced, 15, what="a new subtask_00 RUNNING")
    assert {k: v for k, v in after.items() if k != victim} == {k: v for k, v in before.items() if k != victim}
    # and the queue is consumed again
    token = uuid.uuid4().hex
    daemon.send("subtask", "record", token)
    wait_for(lambda: any(t.startswith(token) for t in daemon.done()), 15, what="message processed after kill")


def test_worker_exiting_0_on_its_own_is_restarted(daemon: Daemon) -> None:
    daemon.wait_running()
    before = daemon.pids()
    victim = "subtask_ops:subtask_ops_00"
    os.kill(before[victim], signal.SIGTERM)  # graceful exit 0 that supervisord did not ask for
    after = wait_for(
        lambda: (n := daemon.pids()).get(victim) not in (None, before[victim]) and n,
        20,
        what="subtask_ops_00 restarted",
    )
    assert {k: v for k, v in after.items() if k != victim} == {k: v for k, v in before.items() if k != victim}
    log = (daemon.home / "log" / "supervisord.log").read_text()
    assert "exited: subtask_ops_00 (exit status 0; not expected)" in log


def test_stop_and_start_one_queue(daemon: Daemon) -> None:
    daemon.wait_running()
    before = daemon.pids()
    daemon.run("ctl", "stop", "subtask:*")
    groups = daemon.groups()
    assert {p["state"] for p in groups["subtask"]} == {"STOPPED"}
    assert all(p["state"] == "RUNNING" for g, ps in groups.items() if g != "subtask" for p in ps)
    assert {k: v for k, v in daemon.pids().items()} == {k: v for k, v in before.items() if not k.startswith("subtask:")}

    # while stopped, messages wait in the queue and status counts them
    tokens = [uuid.uuid4().hex for _ in range(3)]
    for token in tokens:
        daemon.send("subtask", "record", token)
    assert daemon.status()["queues"]["subtask"]["ready"] == 3

    # plain supervisorctl on the same file, with the daemon's run dir, controls it too
    env = clean_env(NIETEST_RUN_DIR=str(daemon.settings.run_dir))
    supervisorctl = Path(os.sys.executable).parent / "supervisorctl"
    result = subprocess.run(
        [str(supervisorctl), "-c", str(ROOT / "etc" / "supervisord.conf"), "start", "subtask:*"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    daemon.wait_running()
    wait_for(
        lambda: all(any(t.startswith(tok) for t in daemon.done()) for tok in tokens),
        20,
        what="queued messages processed after start",
    )
    assert daemon.status()["queues"]["subtask"]["ready"] == 0


def test_logs_are_json_and_rotate(daemon: Daemon) -> None:
    daemon.wait_running()
    # 300 lines of ~1 KB each through one worker: several times NIETEST_LOG_MAX_BYTES (64 KB).
    daemon.send("master", "chatter", 300, 1000)
    wait_for(lambda: any(t.startswith("chatter:") for t in daemon.done()), 20, what="chatter done")
    rotated = wait_for(
        lambda: [p for p in daemon.log_files() if p.name.startswith("master_00.log.")], 10, what="rotated master_00 log"
    )
    assert {p.name for p in rotated} <= {"master_00.log.1", "master_00.log.2"}  # NIETEST_LOG_BACKUPS=2
    for path in daemon.log_files():
        # supervisord rotates after a write that crosses the limit: a file may exceed it by one read chunk
        assert path.stat().st_size <= 3 * 64 * 1024, path
        for n, line in enumerate(path.read_text().splitlines(), 1):
            record = json.loads(line)  # every line, of every process, is JSON
            assert record.keys() >= REQUIRED_KEYS, f"{path.name}:{n} {line[:200]}"
            assert record["timestamp"].endswith("Z") and len(record["timestamp"]) == 24
            assert len(line.encode()) <= 16 * 1024


def test_secrets_never_reach_a_log(daemon: Daemon) -> None:
    url = "redis://admin:hunter2-PASSWORD@10.0.0.1:6379/0"
    daemon.send("subtask", "leak", url)
    wait_for(lambda: any(t.startswith("leak:") for t in daemon.done()), 15, what="leak actor ran")
    # the failure is logged (with a structured exception) and the message dead-lettered
    wait_for(lambda: daemon.status()["queues"]["subtask"]["dead"] >= 1, 10, what="dead letter")
    text = "".join(p.read_text() for p in daemon.log_files())
    assert "tok-SECRET-4f1c9a" not in text
    assert "hunter2-PASSWORD" not in text
    failures = [
        json.loads(line)
        for p in daemon.log_files()
        for line in p.read_text().splitlines()
        if "unhandled exception" in line and "leak_subtask" in line
    ]
    assert failures and failures[0]["exception"][0]["exc_type"] == "RuntimeError"


def test_bad_settings_refuse_to_start(short_tmp: Path) -> None:
    cases = {
        "NIETEST_SUBTASK_PROCESSES": "-1",
        "NIETEST_MASTER_THREADS": "many",
        "BROKER_REDIS_URL": "http://127.0.0.1:6379",
        "REDIS_PORT": "70000",
        "NIETEST_LOG_MAX_BYTES": "huge",
        "NIETEST_SUBTASKS_PROCESSES": "2",
        "SUBTASK_QUEUE": "nietest_master",
        "IMAGE_POLLING_INTERVAL": "-2",
    }
    for variable, value in cases.items():
        home = short_tmp / f"bad-{variable.lower()}"
        env = clean_env(NIETEST_HOME=str(home), **{variable: value})
        result = subprocess.run(
            [os.sys.executable, "-m", "nietest_daemon", "daemon"], env=env, capture_output=True, text=True, timeout=30
        )
        assert result.returncode != 0, variable
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and variable in lines[0], (variable, result.stderr)
        assert not home.exists(), f"{variable}: the daemon created {home} before refusing"
        assert not pids_of_home(home)


def test_graceful_stop_finishes_in_hand_work_and_leaves_nothing(make_daemon) -> None:
    daemon = make_daemon().start()
    token = uuid.uuid4().hex
    daemon.send("subtask", "record", token, 3.0)
    wait_for(lambda: any(t.startswith(token) for t in daemon.started()), 15, what="message started")
    redis_url = daemon.settings.broker_url
    assert daemon.stop() == 0  # waits until no process of the daemon is left
    # restart to read the broker (embedded: its data is in the data dir)
    daemon.start()
    assert any(t.startswith(token) for t in daemon.done()), "in-hand message not finished within the drain"
    assert daemon.settings.broker_url == redis_url


def test_message_past_the_drain_budget_is_redelivered(make_daemon) -> None:
    daemon = make_daemon(NIETEST_DRAIN_SECONDS="1", NIETEST_SUBTASK_PROCESSES="1").start()
    token = uuid.uuid4().hex
    daemon.send("subtask", "record", token, 8.0)
    wait_for(lambda: any(t.startswith(token) for t in daemon.started()), 15, what="message started")
    assert daemon.stop() == 0
    daemon.start()
    # handed back to the queue at shutdown: it runs again after the restart and completes
    wait_for(lambda: any(t.startswith(token) for t in daemon.done()), 30, what="redelivered message done")
    assert len([t for t in daemon.started() if t.startswith(token)]) == 2


def test_queued_messages_survive_a_daemon_restart(make_daemon) -> None:
    daemon = make_daemon().start()
    daemon.run("ctl", "stop", "subtask:*")
    tokens = [uuid.uuid4().hex for _ in range(5)]
    for token in tokens:
        daemon.send("subtask", "record", token)
    assert daemon.stop() == 0
    daemon.start()
    wait_for(
        lambda: all(any(t.startswith(tok) for t in daemon.done()) for tok in tokens),
        30,
        what="messages enqueued before the restart delivered after it",
    )


def test_killed_workers_messages_come_back(make_daemon) -> None:
    """kill -9 mid-message: the message returns after the heartbeat timeout (3 s here)."""
    daemon = make_daemon(NIETEST_SUBTASK_PROCESSES="1").start()
    token = uuid.uuid4().hex
    daemon.send("subtask", "record", token, 1.0)
    started = wait_for(lambda: [t for t in daemon.started() if t.startswith(token)], 15, what="started")
    os.kill(int(started[0].split(":")[1]), signal.SIGKILL)
    wait_for(lambda: any(t.startswith(token) for t in daemon.done()), 30, what="message redelivered and done")


def test_external_broker_with_password(private_valkey, make_daemon) -> None:
    server = private_valkey(password="pw-Very-Secret-77")
    daemon = make_daemon(BROKER_REDIS_URL=server.url).start()
    status = daemon.status()
    assert not [p for p in status["processes"] if p["group"] == "broker"]  # no embedded broker
    assert "pw-Very-Secret-77" not in json.dumps(status) and ":***@" in status["broker"]
    token = uuid.uuid4().hex
    daemon.send("subtask", "record", token)
    wait_for(lambda: any(t.startswith(token) for t in daemon.done()), 15, what="processed via external broker")
    assert daemon.stop() == 0
    for path in daemon.log_files():
        assert "pw-Very-Secret-77" not in path.read_text(), path


def test_workers_wait_for_a_late_broker(private_valkey, make_daemon) -> None:
    server = private_valkey(start=False)
    daemon = make_daemon(BROKER_REDIS_URL=server.url, NIETEST_SUBTASK_PROCESSES="1").start(wait=False)
    log = daemon.home / "log" / "subtask_00.log"
    wait_for(lambda: log.exists() and "waiting for the broker" in log.read_text(), 20, what="waiting logged")
    daemon.wait_running()  # RUNNING while waiting, not crash-looping into FATAL
    server.start()
    wait_for(lambda: "worker started" in log.read_text(), 20, what="worker started once the broker came up")
    assert "FATAL" not in json.dumps(daemon.status())


def test_seed_entry_points(make_daemon) -> None:
    daemon = make_daemon()
    env = dict(daemon.env)
    proc = subprocess.Popen(
        [os.sys.executable, "-m", "nietest_daemon.start_dramatiq", "subtask", "--processes", "3", "--threads", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    daemon.proc = proc
    running = wait_for(
        lambda: (g := daemon.groups()) and len([p for p in g.get("subtask", []) if p["state"] == "RUNNING"]) == 3 and g,
        30,
    )
    assert not running.get("master") and not running.get("subtask_ops")
    assert daemon.stop() == 0

    script = subprocess.Popen(
        [str(ROOT / "scripts" / "start_dramatiq_workers.sh"), "-q", "master", "-p", "2", "-t", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    daemon.proc = script
    running = wait_for(
        lambda: (g := daemon.groups()) and len([p for p in g.get("master", []) if p["state"] == "RUNNING"]) == 2 and g,
        30,
    )
    assert not running.get("subtask")
    assert daemon.stop() == 0


def test_systemd_unit_verifies(short_tmp: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    unit = (ROOT / "systemd" / "nietest.service").read_text()
    # verify checks that ExecStart's binary exists: point it at this checkout's interpreter.
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    local = unit.replace(exec_start, f"ExecStart={os.sys.executable} -m nietest_daemon daemon")
    path = short_tmp / "nietest.service"
    path.write_text(local)
    result = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (result.stdout + result.stderr).splitlines() if "nietest.service" in line]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr


def test_systemd_unit_exposure_is_at_most_4(short_tmp: Path) -> None:
    """`systemd-analyze security --offline` on the shipped unit; README.md quotes the score."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(ROOT / "systemd" / "nietest.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(r"Overall exposure level for nietest\.service: ([0-9.]+)", result.stdout)
    assert found, result.stdout + result.stderr
    score = float(found.group(1))
    assert score <= 4.0, result.stdout
    assert f"**{score} " in (ROOT / "README.md").read_text(), f"README.md does not quote the score {score}"


def test_broker_error_in_an_actor_is_retried_not_dead_lettered(daemon: Daemon) -> None:
    """MAX_RETRIES is 0 and the actor has max_retries=0, yet a failure that is only the broker being
    unreachable is retried (short backoff): a dead letter would strand the work."""
    token = f"blink-{uuid.uuid4().hex[:8]}"
    dead = daemon.status()["queues"]["subtask"]["dead"]  # other tests share this daemon
    daemon.send("subtask", "blink", token, 2)
    wait_for(lambda: any(t.startswith(token) for t in daemon.done()), 20, what="the blinking actor succeeded")
    assert daemon.status()["queues"]["subtask"]["dead"] == dead
    event = "broker unreachable during the message; retrying it"
    lines = [json.loads(line) for p in daemon.log_files() for line in p.read_text().splitlines() if event in line]
    retried = [r for r in lines if r.get("actor") == "blink_subtask"]
    assert sorted(r["retry_in_ms"] for r in retried) == [500, 1000]  # the two retries may run in either process
