"""`nietest metrics`: the Prometheus endpoint and the health checks, one supervised process.

    GET /metrics   the Prometheus text format
    GET /healthz   200 while supervisord answers and no program is FATAL (given up) or UNKNOWN
    GET /readyz    200 when the broker and the store answer and every worker is RUNNING; else 503
                   with a JSON body naming what is not ready

It listens on NIETEST_METRICS_ADDR (127.0.0.1:9464 by default). With NIETEST_METRICS_TOKEN set,
every request needs `Authorization: Bearer <token>` (401 otherwise): set it before binding
anywhere but loopback.

A scrape reads, and never scans: supervisord's process list (one XML-RPC call), the broker (queue
lengths, job slots, the ready lists of the active tasks, and the one hash of counter totals that
coordination/counters.py keeps) and the store's task count per status (its status index). Its cost
does not grow with the number of subtasks (bench/metrics.py). Counters are kept in the broker by
the processes that count, so a worker's kill -9 takes nothing away; a restart is counted by the
watchdog listener, which hears every exit.

Each request has a thread of its own (a client that stalls holds only its own), and every answer
is computed in one probe thread, which keeps the store's one connection; every read it makes is
bounded (PROBE_TIMEOUT_SECONDS: supervisord, the broker, MongoDB), so an answer comes within
ANSWER_DEADLINE_SECONDS whatever is down: a 503 (or `nietest_*_up 0`), never a hung scrape.
"""

from __future__ import annotations

import hmac
import http.client
import itertools
import json
import socket
import time
import xmlrpc.client
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

import redis
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from nietest_daemon.coordination import counters, hosts
from nietest_daemon.coordination.connection import broker_primary, redis_client
from nietest_daemon.coordination.hosts import HostState
from nietest_daemon.coordination.scheduler import Scheduler
from nietest_daemon.core.logs import get_logger
from nietest_daemon.core.loopback import is_loopback
from nietest_daemon.core.redaction import redact, set_secrets
from nietest_daemon.core.settings import Settings
from nietest_daemon.core.stopping import install_stop_signals
from nietest_daemon.domain import process_state
from nietest_daemon.domain.lifecycle import STATUSES
from nietest_daemon.domain.process_state import ProcessState
from nietest_daemon.domain.subtask import Lane
from nietest_daemon.internals.dramatiq_redis import queue_stats
from nietest_daemon.internals.supervisor import ProcessInfo, all_process_info
from nietest_daemon.programs.alerts.kinds import AlertKind
from nietest_daemon.programs.daemon import control_proxy
from nietest_daemon.store import Store, open_store_for

log = get_logger(__name__)

QUEUE_STATES = ("ready", "delayed", "in_progress", "dead")
REQUEST_TIMEOUT_SECONDS = 5.0  # per read of a request: a client that stalls is dropped
PROBE_TIMEOUT_SECONDS = 2.0  # per read of supervisord, the broker, the store
ANSWER_DEADLINE_SECONDS = 15.0  # an answer not computed by then is a 503

#: Label sets of the counters that are always exported, at 0 until counted: `rate()` and
#: `increase()` then see a series' first increment.
_ZERO_FILLED: tuple[tuple[counters.Family, dict[str, tuple[str, ...]]], ...] = (
    (counters.SUBTASKS_FINISHED, {"api": counters.APIS, "outcome": counters.OUTCOMES}),
    (counters.SUBTASK_FAILURES, {"api": counters.APIS, "reason": counters.FAILURE_REASONS}),
    (
        counters.API_REQUESTS,
        {"api": counters.APIS, "endpoint": counters.ENDPOINTS, "code_class": counters.CODE_CLASSES},
    ),
    (counters.FEISHU_MESSAGES, {"bot": counters.BOTS, "outcome": counters.FEISHU_OUTCOMES}),
    (counters.ALERTS, {"kind": tuple(kind.value for kind in AlertKind)}),
    (counters.IMAGE_JOB_SECONDS, {"api": counters.APIS}),
    (counters.API_REQUEST_SECONDS, {"api": counters.APIS, "endpoint": counters.ENDPOINTS}),
)


def _combinations(labels: dict[str, tuple[str, ...]]) -> Iterator[dict[str, str]]:
    for values in itertools.product(*labels.values()):
        yield dict(zip(labels, values, strict=True))


class Probe:
    """What one scrape or health check reads: supervisord, the broker, the store."""

    def __init__(self, settings: Settings, host: str) -> None:
        self.settings = settings
        self.host = host
        self.redis = redis_client(settings, socket_timeout=PROBE_TIMEOUT_SECONDS)
        self._store: Store | None = None
        self.slots = {
            Lane.STANDARD: Scheduler(self.redis, Lane.STANDARD, settings.max_jobs, lease_seconds=0),
            Lane.LUMINA: Scheduler(self.redis, Lane.LUMINA, settings.max_lumina_jobs, lease_seconds=0),
        }

    def store(self) -> Store:
        if self._store is None:
            self._store = open_store_for(self.settings, timeout_seconds=PROBE_TIMEOUT_SECONDS)
        return self._store

    def processes(self) -> list[ProcessInfo] | None:
        """supervisord's process list, or None when it does not answer."""
        try:
            return all_process_info(control_proxy(self.settings, PROBE_TIMEOUT_SECONDS))
        except (OSError, xmlrpc.client.Error, http.client.HTTPException) as exc:
            log.warning("supervisord does not answer", error=str(exc)[:300])
            return None

    def broker_error(self) -> str | None:
        try:
            self.redis.ping()
        except (redis.RedisError, OSError) as exc:
            return redact(f"{type(exc).__name__}: {exc}")[:300]
        return None

    def primary(self) -> str | None:
        """ "host:port" of the broker's server now (with Sentinels: the primary they name, else None)."""
        try:
            return broker_primary(self.settings)
        except (redis.RedisError, OSError) as exc:
            log.warning("cannot ask the Sentinels for the primary", error=redact(str(exc))[:300])
            return None

    def store_error(self) -> str | None:
        try:
            self.store().count_tasks()
        except Exception as exc:  # noqa: BLE001 - any failure of the store is "not ready"
            return redact(f"{type(exc).__name__}: {exc}")[:300]
        return None

    def workers(self, infos: list[ProcessInfo]) -> list[ProcessInfo]:
        return [i for i in infos if i["group"] in self.settings.queues]


class NietestCollector(Collector):
    """The metric families of one scrape (docs/metrics.md lists them)."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    def collect(self) -> Iterator[Metric]:
        infos = self.probe.processes()
        yield _gauge(
            "nietest_supervisor_up", "1 when supervisord answers the metrics program.", [], [([], infos is not None)]
        )
        yield from self._processes(infos or [])
        broker_ok = self.probe.broker_error() is None
        yield _gauge("nietest_broker_up", "1 when the broker answers a PING.", [], [([], broker_ok)])
        primary = self.probe.primary()
        yield _gauge(
            "nietest_broker_primary",
            "1 for the broker's server now: the primary the Sentinels name (none when none does), or the one server.",
            ["address"],
            [([primary], 1)] if primary else [],
        )
        if broker_ok:
            try:
                yield from self._broker(infos or [])
            except (redis.RedisError, OSError) as exc:
                log.warning("broker read failed during a scrape", error=str(exc)[:300])
        yield from self._tasks()

    def _processes(self, infos: list[ProcessInfo]) -> Iterator[Metric]:
        labels = ["program", "process"]
        up = [([i["group"], i["name"]], i["statename"] == ProcessState.RUNNING) for i in infos]
        start = [([i["group"], i["name"]], i["start"]) for i in infos if i["start"]]
        yield _gauge("nietest_process_up", "1 while the supervised process is RUNNING.", labels, up)
        yield _gauge(
            "nietest_process_start_time_seconds", "Unix time the supervised process last started.", labels, start
        )

    def _broker(self, infos: list[ProcessInfo]) -> Iterator[Metric]:
        probe = self.probe
        depth = GaugeMetricFamily(
            "nietest_queue_messages", "Messages of each queue by state (broker-wide).", labels=["queue", "state"]
        )
        for q in probe.settings.queues.values():
            stats = queue_stats(probe.redis, q.name)
            for state in QUEUE_STATES:
                depth.add_metric([q.name, state], stats[state])
        yield depth
        in_use = GaugeMetricFamily("nietest_job_slots_in_use", "Image-job slots held (broker-wide).", labels=["api"])
        capacity = GaugeMetricFamily(
            "nietest_job_slots_capacity", "Image-job slots (NIETEST_MAX_JOBS, NIETEST_MAX_LUMINA_JOBS).", labels=["api"]
        )
        waiting = GaugeMetricFamily(
            "nietest_subtasks_waiting", "Subtasks waiting for an image-job slot (broker-wide).", labels=["api"]
        )
        for lane, slots in probe.slots.items():
            in_use.add_metric([lane.value], slots.in_flight())
            capacity.add_metric([lane.value], slots.cap)
            waiting.add_metric([lane.value], slots.waiting())
        yield from (in_use, capacity, waiting)
        yield from self._hosts()
        yield from render_totals(counters.read(probe.redis, probe.host), infos)

    def _hosts(self) -> Iterator[Metric]:
        """The daemons registered on the broker by state (coordination/hosts.py), each state at 0 until seen."""
        try:
            states = [record.state for record in hosts.all_records(self.probe.redis)]
        except (ValueError, TypeError) as exc:  # a record this version cannot read: no gauge, the rest stands
            log.warning("unreadable host record during a scrape", error=str(exc)[:300])
            return
        yield _gauge(
            "nietest_hosts",
            "Daemons registered on the broker by state: up, lost (silent, work taken over), stopped (broker-wide).",
            ["state"],
            [([state.value], states.count(state)) for state in HostState],
        )

    def _tasks(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("nietest_tasks", "Tasks in the store by status.", labels=["status"])
        try:
            counts = self.probe.store().count_tasks()
        except Exception as exc:  # noqa: BLE001 - the store being away must not fail the scrape
            log.warning("store read failed during a scrape", error=str(exc)[:300])
            yield _gauge("nietest_store_up", "1 when the task store answers.", [], [([], False)])
            return
        yield _gauge("nietest_store_up", "1 when the task store answers.", [], [([], True)])
        for status in STATUSES:
            family.add_metric([status], counts.get(status, 0))
        yield family


def _gauge(
    name: str, help_text: str, labels: list[str], samples: Sequence[tuple[list[str], float]]
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, help_text, labels=labels)
    for values, value in samples:
        family.add_metric(values, float(value))
    return family


def render_totals(totals: dict[str, float], infos: list[ProcessInfo]) -> Iterator[Metric]:
    """The counter and histogram families from the broker's totals (coordination/counters.py), with
    the fixed label sets (and every supervised process's restarts) at 0 until counted."""
    series: dict[str, dict[tuple[tuple[str, str], ...], dict[str, float]]] = {f.name: {} for f in counters.FAMILIES}
    for field, value in totals.items():
        name, labels = counters.parse_field(field)
        for family in counters.FAMILIES:
            if name == family.name or (family.kind == "histogram" and name.startswith(family.name + "_")):
                suffix = name[len(family.name) :]
                key = tuple((label, labels.get(label, "")) for label in family.labels)
                entry = series[family.name].setdefault(key, {})
                entry[suffix + ("@" + labels["le"] if "le" in labels else "")] = value
                break
    for family, label_sets in _ZERO_FILLED:
        for combo in _combinations(label_sets):
            series[family.name].setdefault(tuple((label, combo[label]) for label in family.labels), {})
    for info in infos:
        for reason in counters.RESTART_REASONS:
            key = (("program", info["group"]), ("process", info["name"]), ("reason", reason))
            series[counters.PROCESS_RESTARTS.name].setdefault(key, {})
    for family in counters.FAMILIES:
        label_names = list(family.labels)
        if family.kind == "counter":
            counter = CounterMetricFamily(family.name, family.help, labels=label_names)
            for key, values in sorted(series[family.name].items()):
                counter.add_metric([v for _, v in key], values.get("", 0.0))
            yield counter
            continue
        histogram = HistogramMetricFamily(family.name, family.help, labels=label_names)
        for key, values in sorted(series[family.name].items()):
            cumulative, buckets = 0.0, []
            for bound in (*family.buckets, float("inf")):
                cumulative += values.get("_bucket@" + counters.format_le(bound), 0.0)
                buckets.append((counters.format_le(bound), cumulative))
            histogram.add_metric([v for _, v in key], buckets, values.get("_sum", 0.0))
        yield histogram


class Endpoints:
    """The three endpoints' answers: (status, content type, body), each computed in the one probe
    thread (`answer`)."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(NietestCollector(probe))
        self.routes: dict[str, Callable[[], tuple[int, str, bytes]]] = {
            "/metrics": self.metrics,
            "/healthz": self.healthz,
            "/readyz": self.readyz,
        }
        self._probe_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="probe")

    def answer(self, path: str) -> tuple[int, str, bytes]:
        route = self.routes[path]
        try:
            return self._probe_thread.submit(route).result(timeout=ANSWER_DEADLINE_SECONDS)
        except FutureTimeout:
            log.error("no answer in time", path=path, deadline_seconds=ANSWER_DEADLINE_SECONDS)
            return 503, "text/plain", b"the probe is still busy with an earlier request; try again\n"

    def metrics(self) -> tuple[int, str, bytes]:
        return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)

    def healthz(self) -> tuple[int, str, bytes]:
        infos = self.probe.processes()
        if infos is None:
            return _json(503, {"healthy": False, "reason": "supervisord does not answer"})
        failing = [
            {"process": f"{i['group']}:{i['name']}", "state": i["statename"]}
            for i in infos
            # Not failing: BACKOFF and EXITED pass as supervisord restarts a process; only giving up is.
            if i["statename"] in process_state.FAILING
        ]
        return _json(503 if failing else 200, {"healthy": not failing, "failing": failing})

    def readyz(self) -> tuple[int, str, bytes]:
        not_ready: list[dict[str, Any]] = []
        broker = self.probe.broker_error()
        if broker:
            not_ready.append({"component": "broker", "error": broker})
        store = self.probe.store_error()
        if store:
            not_ready.append({"component": "store", "error": store})
        infos = self.probe.processes()
        if infos is None:
            not_ready.append({"component": "supervisord", "error": "does not answer"})
        else:
            for info in self.probe.workers(infos):
                if info["statename"] != ProcessState.RUNNING:
                    not_ready.append(
                        {
                            "component": "worker",
                            "process": f"{info['group']}:{info['name']}",
                            "state": info["statename"],
                        }
                    )
        return _json(503 if not_ready else 200, {"ready": not not_ready, "not_ready": not_ready})


def _json(status: int, body: dict[str, Any]) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(body).encode() + b"\n"


def make_handler(endpoints: Endpoints, token: str | None) -> type[BaseHTTPRequestHandler]:
    expected = f"Bearer {token}".encode() if token else None

    class Handler(BaseHTTPRequestHandler):
        timeout = REQUEST_TIMEOUT_SECONDS
        server_version = "nietest-metrics"
        sys_version = ""

        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            started = time.monotonic()
            path = self.path.split("?", 1)[0]
            if expected is not None:
                given = (self.headers.get("Authorization") or "").encode()
                if not hmac.compare_digest(given, expected):
                    self._answer(401, "text/plain", b"unauthorized\n", {"WWW-Authenticate": "Bearer"})
                    return
            if path not in endpoints.routes:
                self._answer(404, "text/plain", b"not found: try /metrics, /healthz or /readyz\n")
                return
            try:
                status, content_type, body = endpoints.answer(path)
            except Exception:
                log.exception("endpoint failed", path=path)
                status, content_type, body = 500, "text/plain", b"internal error; see the metrics log\n"
            self._answer(status, content_type, body)
            if status != 200:  # a probe every few seconds would otherwise fill the log
                log.info("request", path=path, status=status, ms=round((time.monotonic() - started) * 1000, 1))

        def _answer(self, status: int, content_type: str, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the http.server API
            pass  # requests are logged as JSON above; the default writes unstructured lines to stderr

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        self.address_family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        super().__init__(addr, handler)


def serve(settings: Settings, addr: tuple[str, int], host: str | None = None) -> ThreadingHTTPServer:
    """The bound server (not yet serving): `serve_forever()` it."""
    endpoints = Endpoints(Probe(settings, host or settings.host_name))
    return _Server(addr, make_handler(endpoints, settings.metrics_token))


def run(settings: Settings) -> int:
    """`nietest metrics`, as supervisord runs it (numprocs 0 when NIETEST_METRICS_ADDR is empty)."""
    set_secrets(settings.secrets())
    if settings.metrics_addr is None:
        log.info("metrics off: NIETEST_METRICS_ADDR is empty")
        return 0
    if not settings.metrics_token and not is_loopback(settings.metrics_addr[0]):
        log.warning(
            "metrics endpoints bound beyond loopback without NIETEST_METRICS_TOKEN: anyone who reaches "
            "the port can read them",
            addr=settings.metrics_addr[0],
        )
    try:
        server = serve(settings, settings.metrics_addr)
    except OSError as exc:
        log.error("cannot listen", addr=settings.metrics_addr, error=str(exc))
        return 1

    stop = install_stop_signals(interrupt=True)
    # An AF_INET or AF_INET6 server's address starts (host, port); typeshed also allows bytes hosts.
    host, port = cast(tuple[str, int], server.server_address[:2])
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    addr_file = settings.metrics_addr_file
    partial = addr_file.with_suffix(".tmp")
    partial.write_text(shown + "\n")
    partial.replace(addr_file)  # a reader sees the whole address or none
    log.info("metrics listening", addr=shown, token=bool(settings.metrics_token))
    try:
        server.serve_forever()
    except SystemExit:
        log.info("metrics stopping", signal=stop.signal_name)
    finally:
        server.server_close()
        addr_file.unlink(missing_ok=True)
    return 0
