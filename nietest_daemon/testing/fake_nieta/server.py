"""The fake Nieta API's HTTP server: `FakeNieta` (start and stop, scripting, inspection, the
control endpoints) and how it serves a request; what it answers is in answers.py."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import random
import re
import socket
import sys
import threading
import time
import uuid as uuid_module
from collections import Counter
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from nietest_daemon.testing.fake_nieta.answers import PNG_1X1, Job, dumps, job_state, scripted, uuid_in_shape
from nietest_daemon.testing.fake_nieta.rules import SHAPES, Rule

DEFAULT_TOKEN = "fake-nieta-token-0123456789"
OPS_PREFIX = "/ops"
CREATE_PATH = "/v3/make_image"
POLL_PREFIX = "/v1/artifact/task/"
MAX_REQUEST_BYTES = 16 * 1024 * 1024
RIG_NETWORK = ipaddress.ip_network("10.231.0.0/16")
"""Besides loopback, the fake listens only on an address of the multi-host test rig's namespaces
(testing/multihost.py's NETWORK): traffic never leaves the machine."""


@dataclass
class Recorded:
    """One request the fake received."""

    method: str
    path: str
    endpoint: str  # create | poll | other
    ops: bool  # sent to the Lumina (ops) host
    headers: dict[str, str]  # lower-cased names
    body: Any  # the parsed JSON body (None when absent or not JSON)
    raw_body: bytes
    time: float  # time.time() at arrival
    status: int | None = None  # the answer's HTTP status (None: no answer / still in flight)
    job_uuid: str | None = None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], fake: FakeNieta) -> None:
        self.fake = fake
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError | OSError):
            return  # a client went away: normal for a fake that drops connections
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: with Nagle's algorithm on, the body waits for the
    # client's delayed ACK (about 40 ms on Linux), which would cap the pipeline's benchmarks.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        self.server.fake._handle(self)

    def do_POST(self) -> None:  # noqa: N802
        self.server.fake._handle(self)

    def do_PUT(self) -> None:  # noqa: N802
        self.server.fake._handle(self)

    def do_DELETE(self) -> None:  # noqa: N802
        self.server.fake._handle(self)

    record: Recorded | None = None  # the API request being answered, if any

    def send(
        self, status: int, body: bytes, content_type: str = "application/json", headers: dict[str, str] | None = None
    ) -> None:
        if self.record is not None:
            self.record.status = status  # before the client can see the answer (tests read it at once)
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if body and self.command != "HEAD":
                self.wfile.write(body)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, TimeoutError, OSError):
            self.close_connection = True


class FakeNieta:
    """The fake API server. Use as a context manager; thread-safe."""

    def __init__(
        self,
        token: str = DEFAULT_TOKEN,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        generation_time: float = 0.0,
        latency: float = 0.0,
        latency_jitter: float = 0.0,
        rules: list[Rule | dict[str, Any]] | None = None,
        create_shape: str = "string",
        strict_hosts: bool = True,
        record: bool = True,
        marker_regex: str | None = None,
    ) -> None:
        address = ipaddress.ip_address(host)
        if not (address.is_loopback or address in RIG_NETWORK):
            raise ValueError(f"the fake Nieta API listens on loopback or a test rig's {RIG_NETWORK} only, not {host}")
        if create_shape not in SHAPES:
            raise ValueError(f"unknown uuid shape {create_shape!r}")
        self.token = token
        self.host = host
        self.port = port
        self.generation_time = generation_time
        self.latency = latency
        self.latency_jitter = latency_jitter
        self.create_shape = create_shape
        self.strict_hosts = strict_hosts
        self.record = record
        self.marker_regex = re.compile(marker_regex) if marker_regex else None
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._huge_cache: dict[int, bytes] = {}
        self._reset_state()
        for rule in rules or []:
            self.add(rule)

    def _reset_state(self) -> None:
        self._requests: list[Recorded] = []
        self._jobs: dict[str, Job] = {}
        self._counts: Counter[str] = Counter()  # per endpoint
        self._authorized: Counter[str] = Counter()  # per endpoint, what `nth` counts
        self._statuses: Counter[int] = Counter()
        self._marker_counts: Counter[str] = Counter()
        self._per_second: Counter[int] = Counter()
        self._in_flight = 0
        self._max_in_flight = 0
        self._first: float | None = None
        self._last: float | None = None
        self._busy_seconds = 0.0

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> FakeNieta:
        self._server = _Server((self.host, self.port), self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, name="fake-nieta", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with server.sockets_lock:
            sockets = list(server.open_sockets)
        for sock in sockets:  # unblock handler threads waiting on idle keep-alive connections
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> FakeNieta:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Base URL of the standard host."""
        return f"http://{self.host}:{self.port}"

    @property
    def ops_url(self) -> str:
        """Base URL of the Lumina (ops) host."""
        return f"{self.url}{OPS_PREFIX}"

    def env(self) -> dict[str, str]:
        """The settings variables that point nietest at this fake."""
        return {"NIETA_XTOKEN": self.token, "NIETA_API_BASE_URL": self.url, "NIETA_OPS_API_BASE_URL": self.ops_url}

    # --- scripting -------------------------------------------------------------------------------

    def add(self, rule: Rule | dict[str, Any]) -> Rule:
        """Append a rule (a Rule or its dict form)."""
        if isinstance(rule, dict):
            rule = Rule.from_dict(rule)
        with self._lock:
            self._rules.append(rule)
        return rule

    def add_rule(self, action: str, **options: Any) -> Rule:
        """Append `Rule(action, **options)`."""
        return self.add(Rule(action, **options))

    def clear_rules(self) -> None:
        with self._lock:
            self._rules.clear()

    def reset(self) -> None:
        """Forget rules, jobs, recorded requests and stats."""
        with self._lock:
            self._rules.clear()
            self._reset_state()

    # --- inspection ------------------------------------------------------------------------------

    @property
    def requests(self) -> list[Recorded]:
        """Every API request received so far (a copy), in arrival order."""
        with self._lock:
            return list(self._requests)

    def requests_to(self, endpoint: str) -> list[Recorded]:
        """Recorded requests of one endpoint: create, poll or other."""
        return [r for r in self.requests if r.endpoint == endpoint]

    @property
    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def job(self, job_uuid: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_uuid)

    def created_count(self, marker: str) -> int:
        """Jobs created whose prompts contain `marker`."""
        with self._lock:
            return sum(1 for job in self._jobs.values() if marker in job.text)

    def created_counts(self, pattern: str | None = None) -> dict[str, int]:
        """Jobs created per marker: the matches of `pattern` (a regex) in each job's prompts."""
        if pattern is None:
            with self._lock:
                return dict(self._marker_counts)
        regex = re.compile(pattern)
        counts: Counter[str] = Counter()
        for job in self.jobs:
            for found in set(regex.findall(job.text)):
                counts[found if isinstance(found, str) else found[0]] += 1
        return dict(counts)

    def duplicates(self, pattern: str) -> dict[str, int]:
        """Markers with more than one job created (what an idempotent pipeline never does)."""
        return {marker: n for marker, n in self.created_counts(pattern).items() if n > 1}

    def stats(self) -> dict[str, Any]:
        """Throughput and concurrency: show that the fake is not a benchmark's bottleneck."""
        with self._lock:
            total = sum(self._counts.values())
            span = (self._last - self._first) if self._first is not None and self._last is not None else 0.0
            return {
                "requests": total,
                "by_endpoint": dict(self._counts),
                "by_status": {str(k): v for k, v in sorted(self._statuses.items())},
                "jobs": len(self._jobs),
                "in_flight": self._in_flight,
                "max_in_flight": self._max_in_flight,
                "span_seconds": round(span, 3),
                "requests_per_second": round(total / span, 1) if span > 0 else float(total),
                "peak_requests_per_second": max(self._per_second.values(), default=0),
                "mean_service_ms": round(1000 * self._busy_seconds / total, 3) if total else 0.0,
                "latency_seconds": self.latency,
                "generation_time_seconds": self.generation_time,
                "markers": len(self._marker_counts),
            }

    # --- request handling ------------------------------------------------------------------------

    def _handle(self, handler: _Handler) -> None:
        handler.record = None  # a kept-alive connection's handler served other requests before
        arrived = time.time()
        started = time.monotonic()
        parts = urlsplit(handler.path)
        path = parts.path
        try:
            length = int(handler.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        if length > MAX_REQUEST_BYTES:
            handler.close_connection = True
            handler.send(413, dumps({"message": "request too large"}))
            return
        raw = handler.rfile.read(length) if length > 0 else b""

        if path.startswith("/_fake/"):
            self._control(handler, path, parts.query, raw)
            return

        ops = path == OPS_PREFIX or path.startswith(OPS_PREFIX + "/")
        api_path = path[len(OPS_PREFIX) :] if ops else path
        if handler.command == "POST" and api_path == CREATE_PATH:
            endpoint = "create"
        elif handler.command == "GET" and api_path.startswith(POLL_PREFIX):
            endpoint = "poll"
        else:
            endpoint = "other"
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        record = Recorded(
            method=handler.command,
            path=path,
            endpoint=endpoint,
            ops=ops,
            headers={k.lower(): v for k, v in handler.headers.items()},
            body=body,
            raw_body=raw,
            time=arrived,
        )
        handler.record = record
        with self._lock:
            if self.record:
                self._requests.append(record)
            self._counts[endpoint] += 1
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            if self._first is None:
                self._first = started
            self._per_second[int(arrived)] += 1
        status: int | None = None
        try:
            status = self._answer(handler, record, api_path)
        finally:
            finished = time.monotonic()
            record.status = status
            with self._lock:
                self._in_flight -= 1
                self._last = finished
                self._busy_seconds += finished - started
                if status is not None:
                    self._statuses[status] += 1

    def _answer(self, handler: _Handler, record: Recorded, api_path: str) -> int | None:
        """Serve one API request; return the HTTP status sent (None: the connection was dropped)."""
        if self.latency > 0 or self.latency_jitter > 0:
            time.sleep(self.latency + random.uniform(0.0, self.latency_jitter))
        if record.endpoint == "other":
            if record.method == "GET" and api_path.startswith("/_image/"):
                handler.send(200, PNG_1X1, "image/png")
                return 200
            handler.send(404, dumps({"code": 404, "message": f"no route {record.method} {record.path}"}))
            return 404
        if handler.headers.get("X-Token") != self.token:
            handler.send(401, dumps({"code": 401, "message": "invalid or missing X-Token"}))
            return 401

        job: Job | None = None
        if record.endpoint == "create":
            prompts = record.body.get("rawPrompt") if isinstance(record.body, dict) else None
            text = json.dumps(prompts, ensure_ascii=False)
        else:
            job_uuid = api_path[len(POLL_PREFIX) :]
            record.job_uuid = job_uuid
            with self._lock:
                job = self._jobs.get(job_uuid)
                if job is not None and self.strict_hosts and job.ops != record.ops:
                    job = None
            text = job.text if job is not None else ""

        with self._lock:
            self._authorized[record.endpoint] += 1
            nth = self._authorized[record.endpoint]
            response_rule = self._take(record.endpoint, nth, text, record.ops, outcome=False)
            answered = response_rule is not None and response_rule.action not in ("delay", "shape")
            # An outcome rule is used up only by a create that really makes a job.
            creates = record.endpoint == "create" and not answered
            outcome_rule = self._take("create", nth, text, record.ops, outcome=True) if creates else None

        if response_rule is not None and response_rule.delay > 0:
            time.sleep(response_rule.delay)
        if response_rule is not None and response_rule.action not in ("delay", "shape"):
            return self._scripted(handler, response_rule)

        if record.endpoint == "create":
            return self._create(handler, record, text, outcome_rule, response_rule)
        return self._poll(handler, record, job)

    def _take(self, endpoint: str, nth: int, text: str, ops: bool, *, outcome: bool) -> Rule | None:
        for rule in self._rules:
            if rule.is_outcome == outcome and rule.matches(endpoint, nth, text, ops):
                rule.used += 1
                return rule
        return None

    def _scripted(self, handler: _Handler, rule: Rule) -> int | None:
        answer = scripted(rule, self._huge)
        if answer is None:  # drop
            handler.close_connection = True
            with contextlib.suppress(OSError):
                handler.connection.shutdown(socket.SHUT_RDWR)
            return None
        handler.send(answer.status, answer.body, answer.content_type, answer.headers)
        return answer.status

    def _huge(self, size: int) -> bytes:
        with self._lock:
            huge = self._huge_cache.get(size)
            if huge is None:
                huge = self._huge_cache[size] = b'{"uuid": "' + b"x" * size + b'"}'
        return huge

    def _create(
        self, handler: _Handler, record: Recorded, text: str, outcome: Rule | None, modifier: Rule | None
    ) -> int:
        body = record.body
        if not isinstance(body, dict) or not isinstance(body.get("rawPrompt"), list):
            handler.send(400, dumps({"code": 400, "message": "invalid body: rawPrompt is required"}))
            return 400
        generation_time = self.generation_time
        if outcome is not None and outcome.generation_time is not None:
            generation_time = outcome.generation_time
        job = Job(
            uuid=str(uuid_module.uuid4()),
            created=time.monotonic(),
            created_at=time.time(),
            body=body,
            text=text,
            ops=record.ops,
            generation_time=generation_time,
            outcome=outcome,
        )
        record.job_uuid = job.uuid
        with self._lock:
            self._jobs[job.uuid] = job
            if self.marker_regex is not None:
                for found in set(self.marker_regex.findall(text)):
                    self._marker_counts[found if isinstance(found, str) else found[0]] += 1
        shape = modifier.shape if modifier is not None and modifier.action == "shape" else self.create_shape
        content_type, content = uuid_in_shape(job.uuid, shape)
        handler.send(200, content, content_type)
        return 200

    def _poll(self, handler: _Handler, record: Recorded, job: Job | None) -> int:
        if job is None:
            handler.send(404, dumps({"code": 404, "message": "task not found"}))
            return 404
        with self._lock:
            job.polls += 1
        handler.send(200, dumps(job_state(job, self.ops_url if job.ops else self.url)))
        return 200

    # --- control endpoints (standalone use) -------------------------------------------------------

    def _control(self, handler: _Handler, path: str, query: str, raw: bytes) -> None:
        try:
            if path == "/_fake/stats":
                result: Any = self.stats()
            elif path == "/_fake/created_counts":
                pattern = parse_qs(query).get("pattern", [None])[0]
                result = self.created_counts(pattern)
            elif path == "/_fake/rules" and handler.command == "POST":
                data = json.loads(raw or b"[]")
                rules = [self.add(rule) for rule in (data if isinstance(data, list) else [data])]
                result = {"added": len(rules)}
            elif path == "/_fake/rules":
                with self._lock:
                    result = [asdict(rule) for rule in self._rules]
            elif path == "/_fake/reset" and handler.command == "POST":
                self.reset()
                result = {"reset": True}
            elif path == "/_fake/config" and handler.command == "POST":
                data = json.loads(raw or b"{}")
                self.latency = float(data.get("latency", self.latency))
                self.generation_time = float(data.get("generation_time", self.generation_time))
                result = {"latency": self.latency, "generation_time": self.generation_time}
            else:
                handler.send(404, dumps({"message": f"no control endpoint {path}"}))
                return
        except (ValueError, TypeError) as exc:
            handler.send(400, dumps({"message": str(exc)}))
            return
        handler.send(200, dumps(result))
