"""`nietest status`: supervised processes, queue statistics, broker and store in use, each lane's
job slots (the share of each owner and of each of its tasks), and the hosts on the broker."""

from __future__ import annotations

import json
import time
import xmlrpc.client
from typing import Any

import dramatiq
import redis
from dramatiq.errors import DecodeError

from nietest_daemon.coordination import hosts, keys, lifelines
from nietest_daemon.coordination.connection import as_text, broker_primary, redis_client
from nietest_daemon.coordination.hosts import HostRecord, HostState
from nietest_daemon.coordination.scheduler import OwnerShare, Scheduler, TaskShare
from nietest_daemon.core.settings import FairShare, Settings
from nietest_daemon.domain.process_state import ProcessState
from nietest_daemon.domain.subtask import Lane
from nietest_daemon.internals.dramatiq_redis import (
    ack_set_key,
    bodies_key,
    delay_queue_name,
    heartbeats_key,
    queue_stats,
)
from nietest_daemon.internals.supervisor import all_process_info
from nietest_daemon.pipeline.messages import ids_of
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
        "hosts": [],
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

    if settings.sentinel is not None:  # where the Sentinels say the broker is now (None: none names one)
        report["broker_primary"] = broker_primary(settings)
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
            client, settings.host_name, [lifelines.member(p["name"].split(":", 1)[1], p["pid"]) for p in workers]
        )
        for process, beat in zip(workers, beats, strict=True):
            if beat is not None:
                process["last_sign_of_life_seconds"] = round(max(0.0, time.time() - beat), 1)
        try:
            report["hosts"] = host_report(client, settings)
        except (ValueError, TypeError) as exc:  # a record this version cannot read: the rest still stands
            report["hosts_error"] = f"unreadable host record: {exc}"[:300]
    except (redis.RedisError, OSError) as exc:
        report["broker_error"] = str(exc)
        for q in settings.queues.values():
            report["queues"].setdefault(q.key, {"name": q.name, "processes": q.processes, "threads": q.threads})
    finally:
        client.close()
    return report


def host_report(client: redis.Redis, settings: Settings, now: float | None = None) -> list[dict[str, Any]]:
    """Every host that registered on the broker (coordination/hosts.py): its state, its last sign of
    life, its workers that beat within NIETEST_HOST_LOST_SECONDS, the messages its workers hold
    (fetched, not acked: what a takeover would hand back) and the job slots held by those messages'
    subtasks. A lost host says since when and who took it over."""
    now = time.time() if now is None else now
    records = hosts.all_records(client)
    broker_ids = [as_text(m) for m in client.zrange(heartbeats_key(), 0, -1)] if records else []
    queues = [name for q in settings.queues.values() for name in (q.name, delay_queue_name(q.name))]
    entries = []
    for record in records:
        held = held_messages(client, [b for b in broker_ids if b.startswith(f"{record.name}/")], queues)
        subtasks = _subtasks_of(client, held)
        entries.append(_host_entry(client, record, settings, now, held, subtasks))
    return entries


def _host_entry(
    client: redis.Redis,
    record: HostRecord,
    settings: Settings,
    now: float,
    held: dict[str, set[str]],
    subtasks: set[str],
) -> dict[str, Any]:
    # A takeover forgets the lost host's lifelines: its record keeps the newest it had.
    life = hosts.last_sign_of_life(client, record.name) or record.last_seen or None
    recent = client.zrangebyscore(keys.lifelines(record.name), now - settings.host_lost_seconds, "+inf")
    return {
        "name": record.name,
        "this_host": record.name == settings.host_name,
        "state": record.state.value,
        "since": record.since,
        "address": record.address,
        "pid": record.pid,
        "started_at": record.started_at,
        "last_sign_of_life_seconds": None if life is None else round(max(0.0, now - life), 1),
        "workers": sum(1 for m in map(as_text, recent) if not m.startswith(f"{hosts.KEEPER_PROCESS}/")),
        "messages_held": sum(len(ids) for ids in held.values()),
        "slots_held": _slots_held(client, subtasks, now),
        "taken_over_by": record.taken_over_by if record.state is HostState.LOST else "",
        "handed_back": record.handed_back,
    }


def held_messages(client: redis.Redis, broker_ids: list[str], queues: list[str]) -> dict[str, set[str]]:
    """queue -> the ids of the messages the broker ids fetched from it and did not ack (their ack sets)."""
    with client.pipeline(transaction=False) as pipe:
        for broker_id in broker_ids:
            for queue in queues:
                pipe.smembers(ack_set_key(broker_id, queue))
        found = pipe.execute() if broker_ids else []
    held: dict[str, set[str]] = {}
    for i, ids in enumerate(found):
        if ids:
            held.setdefault(queues[i % len(queues)], set()).update(map(as_text, ids))
    return held


def _subtasks_of(client: redis.Redis, held: dict[str, set[str]]) -> set[str]:
    """The subtask ids the held messages are about (their bodies, in each queue's hash)."""
    subtasks: set[str] = set()
    for queue, ids in held.items():
        for body in client.hmget(bodies_key(queue), sorted(ids)):
            if body is None:
                continue
            try:
                message = dramatiq.Message.decode(body if isinstance(body, bytes) else body.encode())
                subtask = ids_of(message).get("subtask_id")
            except DecodeError:
                continue  # a body no worker could run holds no slot either
            if subtask:
                subtasks.add(subtask)
    return subtasks


def _slots_held(client: redis.Redis, subtasks: set[str], now: float) -> int:
    """How many of `subtasks` hold a job slot of either lane (an unexpired lease)."""
    if not subtasks:
        return 0
    ordered = sorted(subtasks)
    holding: set[str] = set()
    for lane in Lane:
        scores = client.zmscore(keys.slot_holders(lane.value), ordered)
        holding.update(s for s, score in zip(ordered, scores, strict=True) if score is not None and score >= now)
    return len(holding)


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


def _utc(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


def _host_lines(entries: list[dict[str, Any]]) -> list[str]:
    """One line per host: the counts, then what a state other than `up` means."""
    lines = [
        "",
        f"{'HOST':<28} {'STATE':<10} {'LAST SIGN OF LIFE':>18} {'WORKERS':>7} {'MESSAGES':>8} {'SLOTS':>5}",
    ]
    for h in entries:
        name = _shown(h["name"]) + (" *" if h["this_host"] else "")
        life = h["last_sign_of_life_seconds"]
        line = (
            f"{name:<28} {h['state']:<10} {'-' if life is None else f'{life:.1f} s ago':>18} "
            f"{h['workers']:>7} {h['messages_held']:>8} {h['slots_held']:>5}"
        )
        if h["state"] == HostState.LOST:
            taker = _shown(h["taken_over_by"]) or "?"
            line += f"  lost since {_utc(h['since'])}, " + (
                f"taken over by {taker}" if h["handed_back"] else f"being taken over by {taker}"
            )
        elif h["state"] == HostState.STOPPED:
            line += f"  stopped since {_utc(h['since'])}"
        lines.append(line)
    if any(h["this_host"] for h in entries):
        lines.append("* this daemon's host (NIETEST_HOST_NAME)")
    return lines


def render(report: dict[str, Any]) -> str:
    lines = [f"broker  {report['broker']}"]
    if "broker_primary" in report:  # a Sentinel URL: the primary they name now
        lines.append(f"primary {report['broker_primary'] or 'none: no Sentinel names a primary now'}")
    lines.append(f"store   {report['store']}")
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
    if report.get("hosts"):
        lines += _host_lines(report["hosts"])
    if report.get("hosts_error"):
        lines.append(report["hosts_error"])
    if report.get("broker_error"):
        lines.append(f"broker unreachable: {report['broker_error']}")
    return "\n".join(lines)


def run(settings: Settings, *, as_json: bool) -> int:
    report = collect(settings)
    print(json.dumps(report, indent=2) if as_json else render(report))
    return 0 if report["daemon"]["running"] and "broker_error" not in report else 1
