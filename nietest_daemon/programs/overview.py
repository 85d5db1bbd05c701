"""`nietest status`: supervised processes, queue statistics, broker and store in use, and each lane's
job slots: the share of each owner and of each of its tasks."""

from __future__ import annotations

import json
import socket
import time
import xmlrpc.client
from typing import Any

import redis

from nietest_daemon.coordination import lifelines
from nietest_daemon.coordination.connection import redis_client
from nietest_daemon.coordination.scheduler import OwnerShare, Scheduler, TaskShare
from nietest_daemon.core.settings import FairShare, Settings
from nietest_daemon.domain.process_state import ProcessState
from nietest_daemon.domain.subtask import Lane
from nietest_daemon.internals.dramatiq_redis import queue_stats
from nietest_daemon.internals.supervisor import all_process_info
from nietest_daemon.programs.daemon import control_proxy
from nietest_daemon.store import StoreError, open_store_for

#: How long `status` waits for the store when it names the owners of tasks that only hold slots.
STORE_TIMEOUT_SECONDS = 5.0


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
        lanes = [
            Scheduler(client, Lane.STANDARD, settings.max_jobs, lease_seconds=0),
            Scheduler(client, Lane.LUMINA, settings.max_lumina_jobs, lease_seconds=0),
        ]
        owners = owners_of_holders(settings, lanes)
        for slots in lanes:
            report["slots"][str(slots.api)] = slot_report(slots, owners, settings.fair_share)
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


def owners_of_holders(settings: Settings, lanes: list[Scheduler]) -> dict[str, str]:
    """The owners of tasks that hold slots with nothing left waiting, read from the store (the broker
    forgets a task's owner once its line runs dry). Empty in task mode, or when the store does not answer."""
    if settings.fair_share is FairShare.TASK:
        return {}
    tasks = {s.task_id for slots in lanes for s in slots.shares() if not s.active}
    if not tasks:
        return {}
    owners: dict[str, str] = {}
    try:
        store = open_store_for(settings, timeout_seconds=STORE_TIMEOUT_SECONDS)
        try:
            for task_id in sorted(tasks):
                owner = (store.get_task(task_id) or {}).get("owner")
                if isinstance(owner, str):
                    owners[task_id] = owner
        finally:
            store.close()
    except StoreError:
        pass  # shown under the owner "" (none): the broker's part of the report still stands
    return owners


def _share(holding: int, in_use: int) -> float:
    return round(holding / in_use, 3) if in_use else 0.0


def _task_entry(share: TaskShare, in_use: int) -> dict[str, Any]:
    return {
        "task_id": share.task_id,
        "owner": share.owner,
        "priority": share.weight,
        "waiting": share.ready,
        "holding": share.holding,
        "share": _share(share.holding, in_use),
        "active": share.active,  # False: its line ran dry, only its running subtasks hold slots
    }


def slot_report(
    slots: Scheduler, owners_of: dict[str, str] | None = None, fair_share: FairShare = FairShare.OWNER
) -> dict[str, Any]:
    """One lane's job slots: in use against the cap, subtasks waiting, each owner's weight and share
    of the slots in use, and each of its tasks' priority (its weight) and share."""
    owners: list[OwnerShare] = slots.owner_shares(owners_of)
    in_use = slots.in_flight()

    def by_holding(shares: list[TaskShare] | tuple[TaskShare, ...]) -> list[TaskShare]:
        return sorted(shares, key=lambda s: (-s.holding, s.task_id))

    return {
        "in_use": in_use,
        "cap": slots.cap,
        "waiting": sum(o.ready for o in owners),
        "fair_share": fair_share.value,
        "owners": [
            {
                "owner": o.owner,
                "weight": o.weight,
                "waiting": o.ready,
                "holding": o.holding,
                "share": _share(o.holding, in_use),
                "tasks": [_task_entry(t, in_use) for t in by_holding(o.tasks)],
            }
            for o in sorted(owners, key=lambda o: (-o.holding, o.owner))
        ],
        "tasks": [_task_entry(t, in_use) for t in by_holding([t for o in owners for t in o.tasks])],
    }


def _uptime(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def _shown(text: str) -> str:
    """An owner as one line of plain text (names are validated printable; this is the last guard)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _slot_lines(lane: str, slots: dict[str, Any]) -> list[str]:
    """One lane: its counts, then each owner (owner mode) and each of its tasks with their shares."""
    lines = [f"{lane:<24} {slots['in_use']:>7} {slots['cap']:>5} {slots['waiting']:>8}"]
    by_owner = slots.get("fair_share") == FairShare.OWNER
    for o in slots.get("owners", []):
        indent = "  "
        if by_owner:
            owner = _shown(o["owner"]) or "(none)"
            lines.append(
                f"  owner {owner:<33} weight {o['weight']:>5g}  holding {o['holding']:>4}"
                f"  waiting {o['waiting']:>6}  share {o['share']:.0%}"
            )
            indent = "    "
        for t in o["tasks"]:
            lines.append(
                f"{indent}task {t['task_id']:<32} priority {t['priority']:>3}  holding {t['holding']:>4}"
                f"  waiting {t['waiting']:>6}  share {t['share']:.0%}"
            )
    return lines


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
        for lane, slots in report["slots"].items():
            lines += _slot_lines(lane, slots)
    if report.get("broker_error"):
        lines.append(f"broker unreachable: {report['broker_error']}")
    return "\n".join(lines)


def run(settings: Settings, *, as_json: bool) -> int:
    report = collect(settings)
    print(json.dumps(report, indent=2) if as_json else render(report))
    return 0 if report["daemon"]["running"] and "broker_error" not in report else 1
