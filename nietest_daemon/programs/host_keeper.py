"""The host keeper: this daemon's lease on its host name, and the takeover of the hosts that are lost.

One `HostKeeper` per daemon, a thread of the watchdog program (programs/watchdog.py). Every second:

- it renews the lease (`hosts.renew_lease`) and beats (`hosts.beat`). `Renewal.FENCED`: the host was
  declared lost while it was silent and its work was handed back, so what its workers hold in memory
  must not run: it SIGKILLs them through supervisord (the watchdog's EXITED handling hands back what
  they fetched since), then takes its name back (`hosts.rejoin`) and reports `HostBack`.
  `TAKEN`: another daemon holds the name (logged at most once a minute). `UNREGISTERED`: the broker
  lost its data; the lease is taken again.
- it watches the other hosts: each one up (or lost with a hand-back unfinished) is offered to
  `hosts.claim_takeover`, which exactly one daemon wins. The winner hands back the messages the lost
  host's workers held (`broker_ids_of` / `hand_back_ids`: the broker ids are read once, at the
  claim, so a host that rejoins meanwhile never loses the messages of its new workers), sends again
  the run messages of the subtasks it admitted that never started (`resend_admissions_of`: it may
  have died between an admission and the send), forgets its processes, ends the takeover and
  reports `HostLost`. It claims nothing until it has reached the broker without a failure for
  NIETEST_HOST_LOST_SECONDS: after an outage every lease has lapsed.

On a graceful stop of the daemon (supervisord shutting down) the record says `stopped`: nothing to
take over. Every error is logged and the loop goes on: a broker outage must not end the watchdog.
See coordination/hosts.py for the lease, the fencing and the claim.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
import xmlrpc.client
from dataclasses import replace
from typing import Any

import redis

from nietest_daemon.coordination import counters, hosts, keys
from nietest_daemon.coordination.connection import as_text
from nietest_daemon.coordination.events import HostBack, HostLost
from nietest_daemon.coordination.hosts import Claim, HostRecord, HostState, Renewal
from nietest_daemon.core.logs import get_logger
from nietest_daemon.core.settings import QUEUE_KEYS, Settings
from nietest_daemon.domain.process_state import ProcessState
from nietest_daemon.internals.dramatiq_redis import NietestRedisBroker, broker_ids_of, held_messages
from nietest_daemon.internals.supervisor import all_process_info
from nietest_daemon.pipeline.admission import resend_admissions_of
from nietest_daemon.pipeline.context import build_schedulers
from nietest_daemon.pipeline.messages import ids_of

log = get_logger(__name__)

PASS_SECONDS = 1.0
#: An error that comes back unchanged is logged again only after this long.
REPEAT_LOG_SECONDS = 60.0
#: How long a graceful stop waits for a pass in progress before it gives up marking the host stopped.
STOP_WAIT_SECONDS = 5.0
#: The recycle mark's reason of a worker killed by fencing.
FENCED_REASON = "host fenced: its work was handed back while it was cut off"
#: Worker processes that may hold messages: the ones the fenced keeper kills.
_KILLED_STATES = {ProcessState.RUNNING, ProcessState.STARTING}


class HostKeeper:
    """This daemon's lease and the takeover of lost hosts (see the module doc). `rpc`: supervisord's
    XML-RPC (None outside supervisord: no worker to restart); `client`: the broker connection for
    the lease (one with a read timeout), the broker's own by default."""

    def __init__(
        self,
        settings: Settings,
        broker: NietestRedisBroker,
        rpc: xmlrpc.client.ServerProxy | Any | None,
        *,
        client: redis.Redis | None = None,
        daemon_id: str | None = None,
        supervisor_pid: int | None = None,
    ) -> None:
        self.settings = settings
        self.name = settings.host_name
        self.broker = broker
        self.client = client if client is not None else broker.client
        self.rpc = rpc
        self.daemon_id = daemon_id or os.environ.get("NIETEST_DAEMON_ID") or uuid.uuid4().hex
        self.supervisor_pid = supervisor_pid if supervisor_pid is not None else os.getppid()
        self.pid = os.getpid()
        self.queues = {key: settings.queue(key).name for key in QUEUE_KEYS}  # group -> queue name
        self.schedulers = build_schedulers(settings, self.client)
        self.record: HostRecord | None = None  # ours, once the lease is taken
        self.reached_since: float | None = None  # monotonic: the first pass of the current run of good ones
        self.stopping = threading.Event()
        self._lock = threading.Lock()  # one pass at a time; the graceful stop waits for it
        self._logged: dict[str, float] = {}  # what -> monotonic time it was last logged

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        """Pass after pass, once a second, until `close`."""
        log.info("host keeper starting", host=self.name, daemon_id=self.daemon_id, lost_seconds=self.lost)
        while not self.stopping.is_set():
            started = time.monotonic()
            with self._lock:
                if self.stopping.is_set():
                    return
                try:
                    self.step(started)
                except Exception as exc:  # noqa: BLE001 - logged; the next pass tries again
                    self.reached_since = None
                    self._log_once("failed", "host keeper pass failed", error=f"{type(exc).__name__}: {exc}"[:300])
            self.stopping.wait(max(0.0, PASS_SECONDS - (time.monotonic() - started)))

    @property
    def lost(self) -> float:
        return self.settings.host_lost_seconds

    def step(self, now: float | None = None) -> None:
        """One pass: renew (or take) the lease, beat, then watch the other hosts. Raises on a broker error."""
        now = time.monotonic() if now is None else now
        if self.record is None:
            self._register()
        else:
            self._renew()
        hosts.beat(self.client, self.name, self.pid)
        if self.reached_since is None:
            self.reached_since = now
            self._logged.pop("failed", None)
        if self.record is not None and now - self.reached_since >= self.lost:
            self._watch()

    # --- our lease -------------------------------------------------------------------------------

    def _register(self) -> None:
        """Find the record `nietest daemon` registered for us, or take the lease ourselves (the
        embedded broker, private to this daemon; a broker that did not answer at the start)."""
        current = hosts.get_record(self.client, self.name)
        if current is not None and current.daemon_id == self.daemon_id:
            if current.state is HostState.STOPPED:  # the watchdog alone was restarted after marking it
                self._take(replace(current, state=HostState.UP, since=time.time()), replacing=self.daemon_id)
            else:
                self.record = current
                self._renew()  # now: the lease taken at the start is a long one (or we were lost meanwhile)
            return
        replacing = ""
        if self.settings.embedded_broker:  # nobody else uses this broker: a holder is our dead self
            holder = self.client.get(keys.host_lease(self.name))
            replacing = as_text(holder) if holder else ""
        now = time.time()
        record = HostRecord(
            name=self.name,
            daemon_id=self.daemon_id,
            address=hosts.client_address(self.client),
            pid=self.supervisor_pid,
            boot_id=hosts.boot_id(),
            home=str(self.settings.home),
            started_at=now,
            since=now,
        )
        self._take(record, replacing=replacing)

    def _take(self, record: HostRecord, *, replacing: str) -> None:
        taken, other = hosts.take_lease(self.client, record, self.lost, replacing=replacing)
        if taken:
            self.record = record
            log.info("host lease taken", host=self.name, daemon_id=self.daemon_id)
        else:
            self._name_taken(other)

    def _renew(self) -> None:
        assert self.record is not None
        renewal = hosts.renew_lease(self.client, self.name, self.daemon_id, self.lost)
        if renewal is Renewal.FENCED:
            self._fenced()
        elif renewal is Renewal.TAKEN:
            self._name_taken(hosts.get_record(self.client, self.name))
        elif renewal is Renewal.UNREGISTERED:
            log.warning("the broker has no record of this host (it lost its data?); taking the lease again")
            self._take(replace(self.record, state=HostState.UP, since=time.time()), replacing="")
        else:
            self._logged.pop("taken", None)

    def _name_taken(self, holder: HostRecord | None) -> None:
        self._log_once(
            "taken",
            "another daemon holds this host name; set NIETEST_HOST_NAME to tell them apart",
            level="error",
            host=self.name,
            holder=holder.describe() if holder is not None else "unknown",
        )

    def _fenced(self) -> None:
        """Declared lost while silent: kill the workers (what they hold must not run), then rejoin."""
        lost = hosts.get_record(self.client, self.name)
        if lost is None or lost.daemon_id != self.daemon_id:
            self._name_taken(lost)
            return
        restarted = self.kill_workers()
        self.record = hosts.rejoin(self.client, lost, self.lost)
        lost_for = max(0.0, time.time() - lost.since)
        log.error(
            "this host was declared lost and its work handed back; its workers were restarted",
            host=self.name,
            lost_seconds=round(lost_for, 1),
            taken_over_by=lost.taken_over_by,
            workers_restarted=restarted,
            epoch=lost.epoch,
        )
        hosts.report_event(
            self.client,
            HostBack(host=self.name, lost_seconds=round(lost_for, 1), workers_restarted=restarted, at=time.time()),
        )

    def kill_workers(self) -> int:
        """SIGKILL every worker process of this daemon that may hold messages; how many were killed.
        Each is marked as recycled first: a restart this host asked for, not a crash to alert on."""
        if self.rpc is None:
            return 0
        killed = 0
        for info in all_process_info(self.rpc):
            if info["group"] not in self.queues or info["statename"] not in _KILLED_STATES or not info["pid"]:
                continue
            counters.mark_recycling(self.client, self.name, info["name"], int(info["pid"]), reason=FENCED_REASON)
            try:
                self.rpc.supervisor.signalProcess(f"{info['group']}:{info['name']}", "KILL")
            except xmlrpc.client.Fault as exc:  # it exited meanwhile
                log.info("worker not killed", process_name=info["name"], error=exc.faultString)
                continue
            killed += 1
        return killed

    # --- the other hosts -------------------------------------------------------------------------

    def _watch(self) -> None:
        for record in hosts.all_records(self.client):
            if record.name == self.name or self.stopping.is_set():
                continue
            if record.state is HostState.UP or (record.state is HostState.LOST and not record.handed_back):
                claim = hosts.claim_takeover(
                    self.client, record.name, daemon_id=self.daemon_id, host=self.name, lost_seconds=self.lost
                )
                if claim is not None:
                    self.take_over(*claim)

    def take_over(self, claim: Claim, lost: HostRecord) -> None:
        """Hand back what lost host `lost` held, having won its claim (see the module doc)."""
        started = time.monotonic()
        queues = list(self.queues.values())
        namespace = self.broker.namespace
        ids = broker_ids_of(self.client, f"{lost.name}/", namespace)  # its workers', at the claim
        held = held_messages(self.client, ids, queues, namespace)
        subtasks = {s for s in (ids_of(m).get("subtask_id") for m in held) if s}
        silent = round(max(0.0, lost.since - lost.last_seen), 1)
        log.warning(
            "host silent; taking over its work",
            host=lost.name,
            claim=claim.value,
            silent_seconds=silent,
            epoch=lost.epoch,
            broker_ids=len(ids),
        )
        if not self._pause(self.settings.takeover_pause_seconds):
            return  # stopping: the takeover lock lapses and another daemon resumes
        messages = self.broker.hand_back_ids(ids, queues)
        resent = resend_admissions_of(self.settings, self.schedulers, lost.name, self.broker)
        subtasks.update(resent)
        messages += len(resent)
        current = hosts.get_record(self.client, lost.name)
        if current is not None and current.state is HostState.LOST:  # not back already with new processes
            hosts.forget_processes(self.client, lost.name)
        if not hosts.finish_takeover(self.client, lost.name, self.daemon_id):
            log.warning("takeover lock lapsed before the hand-back ended; another daemon resumes it", host=lost.name)
            return
        hosts.report_event(
            self.client,
            HostLost(
                host=lost.name,
                silent_seconds=silent,
                taken_over_by=self.name,
                messages=messages,
                subtasks=len(subtasks),
                at=time.time(),
            ),
        )
        log.info(
            "host lost; its work handed back",
            host=lost.name,
            silent_seconds=silent,
            messages=messages,
            run_messages_resent=len(resent),
            subtasks=len(subtasks),
            ms=round((time.monotonic() - started) * 1000, 1),
        )

    def _pause(self, seconds: float) -> bool:
        """NIETEST_TAKEOVER_PAUSE_SECONDS (fault injection): wait between the claim and the hand-back,
        keeping our own lease meanwhile; False when stopping. A broker error on the way raises: a
        taker cut off abandons the takeover, which another daemon resumes once its lock lapses."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self.stopping.wait(min(PASS_SECONDS, left)):
                return False
            self._renew()
            hosts.beat(self.client, self.name, self.pid)
        return True

    # --- stopping --------------------------------------------------------------------------------

    def close(self, *, graceful: bool) -> None:
        """End the loop; `graceful` (SIGTERM): if the whole daemon is stopping, mark the host
        `stopped` so that nobody takes it over (its workers drained before the watchdog stops)."""
        self.stopping.set()
        if not self._lock.acquire(timeout=STOP_WAIT_SECONDS):
            log.warning("host keeper busy; the host is not marked stopped")
            return
        try:
            # Stopped before its first pass, it still has the record `nietest daemon` registered.
            record = (self.record or hosts.get_record(self.client, self.name)) if graceful else None
            if record is not None and record.daemon_id == self.daemon_id and self._daemon_stopping():
                hosts.mark_stopped(self.client, record)
                log.info("host marked stopped", host=self.name)
        except Exception as exc:  # noqa: BLE001 - the embedded broker is gone by now, say
            log.warning("could not mark the host stopped", host=self.name, error=f"{type(exc).__name__}: {exc}"[:300])
        finally:
            self._lock.release()

    def _daemon_stopping(self) -> bool:
        """Whether supervisord is shutting down (not only this watchdog restarting)."""
        if self.rpc is None:
            return True
        try:
            state: dict[str, Any] = self.rpc.supervisor.getState()  # type: ignore[assignment]
        except xmlrpc.client.Fault as exc:  # while it shuts down supervisord refuses most calls, saying so
            return bool(exc.faultString == "SHUTDOWN_STATE")
        except (OSError, xmlrpc.client.Error) as exc:
            log.warning("cannot ask supervisord whether it is stopping", error=str(exc)[:300])
            return False
        return bool(state.get("statename") == "SHUTDOWN")

    def _log_once(self, what: str, event: str, *, level: str = "warning", **fields: Any) -> None:
        """Log `event` unless the same `what` was logged within REPEAT_LOG_SECONDS."""
        now = time.monotonic()
        last = self._logged.get(what)
        if last is not None and now - last < REPEAT_LOG_SECONDS:
            return
        self._logged[what] = now
        getattr(log, level)(event, **fields)
