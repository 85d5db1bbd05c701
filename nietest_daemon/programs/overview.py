"""`nietest status`: supervised processes, queue statistics, broker and store in use."""

from __future__ import annotations

import json
import socket
import time
import xmlrpc.client
from typing import Any

import redis

from nietest_daemon.coordination import lifelines
from nietest_daemon.coordination.connection import redis_client
from nietest_daemon.coordination.scheduler import Scheduler
from nietest_daemon.core.settings import Settings
from nietest_daemon.domain.process_state import ProcessState
from nietest_daemon.domain.subtask import Lane
from nietest_daemon.internals.dramatiq_redis import queue_stats
from nietest_daemon.internals.supervisor import all_process_info
from nietest_daemon.programs.daemon import control_proxy


def collect(settings: Settings) -> dict[str, Any]:
    report: dict[str, Any] = {
        "broker": settings.broker_description,
        "store": settings.store_description,
        "daemon": {"running": False},
        "processes": [],
        "queues": {},
        "slots": {},
    }
    try:
        proxy = control_proxy(settings)
        report["daemon"] = {"running": True, "pid": proxy.supervisor.getPID()}
        now = time.time()
        for info in all_process_info(proxy):
            running = info["statename"] == ProcessState.RUNNING
            report["processes"].append(
                {
                    "name": f"{info['group']}:{info['name']}",
                    "group": info["group"],
                    "state": info["statename"],
                    "pid": info["pid"] or None,
                    "uptime_seconds": int(now - info["start"]) if running else None,
                    "last_sign_of_life_seconds": None,  # workers only: filled in from the broker below
                    "exit_status": info["exitstatus"],
                    "description": info["description"],
                }
            )
    except (OSError, xmlrpc.client.Fault, xmlrpc.client.ProtocolError) as exc:
        report["daemon"]["error"] = f"control socket {settings.control_socket}: {exc}"

    client = redis_client(settings, socket_timeout=5)
    try:
        for q in settings.queues.values():
            report["queues"][q.key] = {
                "name": q.name,
                "processes": q.processes,
                "threads": q.threads,
                **queue_stats(client, q.name),
            }
        for lane, cap in ((Lane.STANDARD, settings.max_jobs), (Lane.LUMINA, settings.max_lumina_jobs)):
            report["slots"][lane.value] = slot_report(Scheduler(client, lane, cap, lease_seconds=0))
        workers = [p for p in report["processes"] if p["group"] in settings.queues and p["pid"]]
        beats = lifelines.last_beats(
            client, socket.gethostname(), [lifelines.member(p["name"].split(":", 1)[1], p["pid"]) for p in workers]
        )
        for process, beat in zip(workers, beats, strict=True):
            if beat is not None:
                process["last_sign_of_life_seconds"] = round(max(0.0, time.time() - beat), 1)
    except (redis.RedisError, OSError) as exc:
        report["broker_error"] = str(exc)
        for q in settings.queues.values():
            report["queues"].setdefault(q.key, {"name": q.name, "processes": q.processes, "threads": q.threads})
    finally:
        client.close()
    return report


def slot_report(slots: Scheduler) -> dict[str, Any]:
    """One lane's job slots: in use against the cap, subtasks waiting, and each active task's
    priority (its weight) and current share of the slots in use."""
    shares = slots.shares()
    in_use = slots.in_flight()
    return {
        "in_use": in_use,
        "cap": slots.cap,
        "waiting": sum(s.ready for s in shares),
        "tasks": [
            {
                "task_id": s.task_id,
                "priority": s.weight,
                "waiting": s.ready,
                "holding": s.holding,
                "share": round(s.holding / in_use, 3) if in_use else 0.0,
            }
            for s in sorted(shares, key=lambda s: (-s.holding, s.task_id))
        ],
    }


def _uptime(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def render(report: dict[str, Any]) -> str:
    lines = [f"broker  {report['broker']}", f"store   {report['store']}"]
    daemon = report["daemon"]
    lines.append(
        f"daemon  {'running, pid ' + str(daemon['pid']) if daemon['running'] else 'not running'}"
        + (f" ({daemon['error']})" if daemon.get("error") else "")
    )
    if report["processes"]:
        lines += ["", f"{'PROCESS':<28} {'STATE':<10} {'PID':>8} {'UPTIME':>10} {'LAST SIGN OF LIFE':>18}"]
        for p in report["processes"]:
            life = p.get("last_sign_of_life_seconds")
            lines.append(
                f"{p['name']:<28} {p['state']:<10} {p['pid'] or '-':>8} {_uptime(p['uptime_seconds']):>10} "
                f"{'-' if life is None else f'{life:.1f} s ago':>18}"
            )
    lines += ["", f"{'QUEUE':<24} {'PROCS':>5} {'THREADS':>7} {'READY':>7} {'RUNNING':>7} {'DELAYED':>7} {'DEAD':>6}"]
    for q in report["queues"].values():
        lines.append(
            f"{q['name']:<24} {q['processes']:>5} {q['threads']:>7} {q.get('ready', '?'):>7} "
            f"{q.get('in_progress', '?'):>7} {q.get('delayed', '?'):>7} {q.get('dead', '?'):>6}"
        )
    if report["slots"]:
        lines += ["", f"{'JOB SLOTS':<24} {'IN USE':>7} {'CAP':>5} {'WAITING':>8}"]
        for lane, s in report["slots"].items():
            lines.append(f"{lane:<24} {s['in_use']:>7} {s['cap']:>5} {s['waiting']:>8}")
            for t in s["tasks"]:
                lines.append(
                    f"  task {t['task_id']:<32} priority {t['priority']:>3}  holding {t['holding']:>4}"
                    f"  waiting {t['waiting']:>6}  share {t['share']:.0%}"
                )
    if report.get("broker_error"):
        lines.append(f"broker unreachable: {report['broker_error']}")
    return "\n".join(lines)


def run(settings: Settings, *, as_json: bool) -> int:
    report = collect(settings)
    print(json.dumps(report, indent=2) if as_json else render(report))
    return 0 if report["daemon"]["running"] and "broker_error" not in report else 1
