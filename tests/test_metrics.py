"""The metrics issue, quick tier: counters kept in the broker, the hooks of the API and Feishu
clients, the watchdog's count of restarts, and the metrics program's endpoints, against a private
valkey-server and a real SQLite store (no supervisord: tests/test_prometheus_e2e.py runs the daemon
and a real Prometheus)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from threading import Thread

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from redis.backoff import NoBackoff
from redis.retry import Retry

from nietest_daemon.clients.feishu import FeishuClient
from nietest_daemon.clients.nieta import NietaClient, NietaError
from nietest_daemon.coordination import counters, hosts, keys
from nietest_daemon.coordination.hosts import HostRecord
from nietest_daemon.core import settings as settings_module
from nietest_daemon.internals.dramatiq_redis import NietestRedisBroker
from nietest_daemon.pipeline.broker import build_broker
from nietest_daemon.programs import metrics as metrics_program
from nietest_daemon.programs.watchdog import Watchdog
from nietest_daemon.testing.valkey import PrivateValkey

HOST = "host-m"
TOKEN = "t0ken-for-the-metrics-endpoints"


@pytest.fixture
def settings(valkey: PrivateValkey, short_tmp: Path) -> settings_module.Settings:
    return settings_module.load(
        {"NIETEST_HOME": str(short_tmp), "BROKER_REDIS_URL": valkey.url, "NIETEST_METRICS_ADDR": "127.0.0.1:0"}
    )


@pytest.fixture
def client(valkey: PrivateValkey) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(valkey.url)
    yield c
    c.close()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by (name, sorted labels)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def rendered(totals: dict[str, float], infos: list[dict] | None = None) -> dict:
    from prometheus_client import generate_latest
    from prometheus_client.registry import Collector, CollectorRegistry

    class Fixed(Collector):
        def collect(self):
            return metrics_program.render_totals(totals, infos or [])

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed())
    return samples(generate_latest(registry).decode())


# --- the totals in the broker ----------------------------------------------------------------------


def test_increments_add_up_in_the_broker_and_render_as_counters_and_histograms(client: redis.Redis) -> None:
    inc = counters.Increments()
    inc.count(counters.SUBTASKS_FINISHED, api="standard", outcome="completed")
    inc.count(counters.SUBTASKS_FINISHED, 2, api="lumina", outcome="failed")
    for seconds in (0.5, 3.0, 3.0, 5000.0):
        inc.observe(counters.IMAGE_JOB_SECONDS, seconds, api="standard")
    counters.add_call(HOST, inc).run(client)
    counters.add_call(HOST, inc).run(client)  # a second process adds to the same totals
    totals = counters.read(client, HOST)
    got = rendered(totals)

    assert got[("nietest_subtasks_finished_total", (("api", "standard"), ("outcome", "completed")))] == 2
    assert got[("nietest_subtasks_finished_total", (("api", "lumina"), ("outcome", "failed")))] == 4
    # Zero-filled: the fixed label sets exist before their first increment.
    assert got[("nietest_subtasks_finished_total", (("api", "lumina"), ("outcome", "cancelled")))] == 0
    assert got[("nietest_subtask_failures_total", (("api", "standard"), ("reason", "moderation")))] == 0
    bucket = "nietest_image_job_seconds_bucket"
    assert got[(bucket, (("api", "standard"), ("le", "1.0")))] == 2  # cumulative
    assert got[(bucket, (("api", "standard"), ("le", "2.0")))] == 2
    assert got[(bucket, (("api", "standard"), ("le", "5.0")))] == 6
    assert got[(bucket, (("api", "standard"), ("le", "1800.0")))] == 6
    assert got[(bucket, (("api", "standard"), ("le", "+Inf")))] == 8
    assert got[("nietest_image_job_seconds_count", (("api", "standard"),))] == 8
    assert got[("nietest_image_job_seconds_sum", (("api", "standard"),))] == pytest.approx(2 * 5006.5)
    assert got[(bucket, (("api", "lumina"), ("le", "+Inf")))] == 0


def test_restarts_are_zero_filled_for_every_supervised_process() -> None:
    infos = [{"group": "subtask", "name": "subtask_00"}, {"group": "broker", "name": "broker"}]
    got = rendered({}, infos)
    for program, process in (("subtask", "subtask_00"), ("broker", "broker")):
        for reason in counters.RESTART_REASONS:
            labels = (("process", process), ("program", program), ("reason", reason))
            assert got[("nietest_process_restarts_total", labels)] == 0


def test_a_tally_keeps_its_increments_while_the_broker_is_away(client: redis.Redis) -> None:
    tally = counters.Tally()
    tally.api_request("standard", "poll", 200, 0.03)
    tally.api_request("standard", "poll", None, 5.0)
    tally.feishu_message("task", "sent")
    # No retries: redis-py's default retries a refused connection with backoffs of about a second.
    away = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    assert tally.flush(away, HOST) is False
    tally.alert("crash")
    assert tally.flush(client, HOST) is True
    assert tally.flush(client, HOST) is True  # nothing left: nothing added twice
    got = rendered(counters.read(client, HOST))
    requests = "nietest_api_requests_total"
    assert got[(requests, (("api", "standard"), ("code_class", "2xx"), ("endpoint", "poll")))] == 1
    assert got[(requests, (("api", "standard"), ("code_class", "error"), ("endpoint", "poll")))] == 1
    assert got[("nietest_api_request_seconds_count", (("api", "standard"), ("endpoint", "poll")))] == 2
    assert got[("nietest_feishu_messages_total", (("bot", "task"), ("outcome", "sent")))] == 1
    assert got[("nietest_alerts_total", (("kind", "crash"),))] == 1


def test_code_classes() -> None:
    assert [counters.code_class(c) for c in (200, 204, 302, 404, 429, 503, None, 0, 999)] == [
        "2xx",
        "2xx",
        "3xx",
        "4xx",
        "4xx",
        "5xx",
        "error",
        "error",
        "error",
    ]


# --- the clients' hooks ----------------------------------------------------------------------------


def test_the_nieta_client_reports_every_attempt() -> None:
    seen: list[tuple[str, str, int | None]] = []
    answers = iter([503, 200])

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/make_image"):
            return httpx.Response(next(answers), text='"job-1"')
        raise httpx.ConnectError("refused", request=request)

    client = NietaClient(
        "tok-abcdef",
        "http://127.0.0.1:9/api",
        "http://127.0.0.1:9/ops",
        transport=httpx.MockTransport(handler),
        sleep=lambda _: None,
        max_retries=1,
        observe=lambda api, endpoint, code, seconds: seen.append((api, endpoint, code)),
    )
    assert client.create_job({"prompts": [], "is_lumina": True}) == "job-1"
    with pytest.raises(NietaError):
        client.poll_job("job-1", is_lumina=False)
    assert seen == [
        ("lumina", "create", 503),
        ("lumina", "create", 200),
        ("standard", "poll", None),
        ("standard", "poll", None),
    ]


@pytest.mark.parametrize(
    ("status", "body", "outcome"),
    [
        (200, {"code": 0}, "sent"),
        (429, {"code": 9499, "msg": "too many requests"}, "rate_limited"),
        (500, {"code": 1}, "failed"),
        (200, {"code": 19024, "msg": "key words not found"}, "failed"),
    ],
)
def test_the_feishu_client_reports_each_message(status: int, body: dict, outcome: str) -> None:
    seen: list[str] = []
    # A hook of its own: the in-process rate limit of a hook is shared by every client of the process.
    hook = f"http://127.0.0.1:9/open-apis/bot/v2/hook/{status}-{body['code']}"
    client = FeishuClient(
        hook,
        None,
        host="h",
        transport=httpx.MockTransport(lambda _: httpx.Response(status, json=body)),
        sleep=lambda _: None,
        on_result=seen.append,
    )
    client.send_card("title", "text")
    assert seen == [outcome]
    FeishuClient(None, on_result=seen.append).send_card("t", "x")  # not configured: not a message
    assert seen == [outcome]


# --- the watchdog counts restarts ------------------------------------------------------------------


def exited(group: str, name: str, pid: int, expected: int) -> tuple[dict[str, str], str]:
    headers = {"eventname": "PROCESS_STATE_EXITED"}
    return headers, f"processname:{name} groupname:{group} from_state:RUNNING expected:{expected} pid:{pid}"


def test_the_watchdog_counts_each_unrequested_exit_with_its_reason(
    settings: settings_module.Settings, client: redis.Redis
) -> None:
    broker: NietestRedisBroker = build_broker(settings)
    try:
        watchdog = Watchdog(settings, broker, HOST)
        watchdog.handle(*exited("subtask", "subtask_00", 101, expected=0))  # a crash
        counters.mark_recycling(client, HOST, "subtask_01", 102)
        watchdog.handle(*exited("subtask", "subtask_01", 102, expected=0))  # said it recycles
        watchdog.hung["subtask_00/103"] = 0.0
        watchdog.handle(*exited("subtask", "subtask_00", 103, expected=0))  # killed for silence
        watchdog.handle(*exited("subtask", "subtask_00", 104, expected=1))  # stopped on request
        watchdog.handle(*exited("broker", "broker", 105, expected=0))  # not a worker: still a restart
        backoff = {"eventname": "PROCESS_STATE_BACKOFF"}
        watchdog.handle(backoff, "processname:master_00 groupname:master from_state:STARTING tries:1")
        got = rendered(counters.read(client, HOST))
    finally:
        broker.close()
    restarts = "nietest_process_restarts_total"
    assert got[(restarts, (("process", "subtask_00"), ("program", "subtask"), ("reason", "crash")))] == 1
    assert got[(restarts, (("process", "subtask_01"), ("program", "subtask"), ("reason", "recycle")))] == 1
    assert got[(restarts, (("process", "subtask_00"), ("program", "subtask"), ("reason", "hang")))] == 1
    assert got[(restarts, (("process", "broker"), ("program", "broker"), ("reason", "crash")))] == 1
    assert got[(restarts, (("process", "master_00"), ("program", "master"), ("reason", "crash")))] == 1  # at start
    assert sum(v for (name, _), v in got.items() if name == restarts) == 5
    # Read, not taken: the alerts listener reads the same mark; it expires on its own.
    assert 0 < client.ttl(keys.recycling(HOST, "subtask_01/102")) <= counters.RECYCLE_MARK_SECONDS


# --- the endpoints ---------------------------------------------------------------------------------


@pytest.fixture
def server(settings: settings_module.Settings) -> Iterator[str]:
    """The metrics program's server, without supervisord (it does not answer)."""
    httpd = metrics_program.serve(settings, ("127.0.0.1", 0), host=HOST)
    thread = Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_the_endpoints_say_what_is_missing(server: str, client: redis.Redis) -> None:
    inc = counters.Increments()
    inc.count(counters.ALERTS, kind="fatal")
    counters.add_call(HOST, inc).run(client)

    status, text = get(server + "/metrics")
    assert status == 200
    got = samples(text)
    assert got[("nietest_supervisor_up", ())] == 0
    assert got[("nietest_broker_up", ())] == 1
    assert got[("nietest_store_up", ())] == 1
    assert got[("nietest_alerts_total", (("kind", "fatal"),))] == 1
    assert got[("nietest_tasks", (("status", "pending"),))] == 0
    assert got[("nietest_queue_messages", (("queue", "nietest_subtask"), ("state", "ready")))] == 0
    assert got[("nietest_job_slots_capacity", (("api", "standard"),))] == 50

    status, text = get(server + "/healthz")
    assert status == 503 and json.loads(text)["healthy"] is False
    status, text = get(server + "/readyz")
    body = json.loads(text)
    assert status == 503 and body["ready"] is False
    assert [item["component"] for item in body["not_ready"]] == ["supervisord"]
    assert get(server + "/nope")[0] == 404


def test_the_exposition_passes_promtool(server: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (.ci/run installs Debian's prometheus)")
    _, text = get(server + "/metrics")
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), check.stdout + check.stderr


def test_the_hosts_gauge_counts_the_daemons_on_the_broker_by_state(server: str, client: redis.Redis) -> None:
    def hosts_gauge() -> dict[str, float]:
        status, text = get(server + "/metrics")
        assert status == 200
        return {dict(labels)["state"]: v for (name, labels), v in samples(text).items() if name == "nietest_hosts"}

    assert hosts_gauge() == {"up": 0, "lost": 0, "stopped": 0}  # every state, before any daemon registered
    records = {}
    for name in ("h1", "h2", "h3", "h4"):
        records[name] = HostRecord(name, uuid.uuid4().hex, "10.0.0.1", 1, "", "/srv", time.time(), since=time.time())
        assert hosts.take_lease(client, records[name], 3.0)[0]
    hosts.mark_stopped(client, records["h3"])
    client.delete(keys.host_lease("h4"))
    client.zadd(keys.lifelines("h4"), {"subtask_00/1": time.time() - 10})
    assert hosts.claim_takeover(client, "h4", daemon_id=records["h1"].daemon_id, host="h1", lost_seconds=3.0)
    assert hosts_gauge() == {"up": 2, "lost": 1, "stopped": 1}
    client.hset(keys.HOSTS, "h5", "not json")  # a record this version cannot read: no gauge, the rest stands
    status, text = get(server + "/metrics")
    assert status == 200 and "nietest_hosts" not in text and "nietest_job_slots_in_use" in text


def test_a_token_guards_every_endpoint(settings: settings_module.Settings) -> None:
    guarded = settings_module.load(
        {
            "NIETEST_HOME": str(settings.home),
            "BROKER_REDIS_URL": settings.broker_url,
            "NIETEST_METRICS_TOKEN": TOKEN,
        }
    )
    assert TOKEN in guarded.secrets()
    httpd = metrics_program.serve(guarded, ("127.0.0.1", 0), host=HOST)
    Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        for path in ("/metrics", "/healthz", "/readyz"):
            assert get(base + path)[0] == 401
            assert get(base + path, token="wrong")[0] == 401
        assert get(base + "/metrics", token=TOKEN)[0] == 200
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_wedged_supervisord_or_a_stalling_client_cannot_hang_the_endpoints(
    settings: settings_module.Settings, server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics_program, "PROBE_TIMEOUT_SECONDS", 0.5)  # read per probe of supervisord
    # A control socket that accepts and never answers: supervisord wedged.
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    wedged = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    wedged.bind(str(settings.control_socket))
    wedged.listen(8)
    # A client that sends half a request and stalls.
    host, port = server.removeprefix("http://").split(":")
    stalling = socket.create_connection((host, int(port)))
    stalling.sendall(b"GET /metrics HTTP/1.1\r\n")
    try:
        started = time.monotonic()
        status, text = get(server + "/metrics")
        assert status == 200 and samples(text)[("nietest_supervisor_up", ())] == 0
        status, body = get(server + "/healthz")
        assert status == 503 and json.loads(body)["reason"] == "supervisord does not answer"
        # Each answer waited out the probe's timeout on supervisord once, not the stalled client.
        assert time.monotonic() - started < 3 * metrics_program.PROBE_TIMEOUT_SECONDS
    finally:
        stalling.close()
        wedged.close()
        settings.control_socket.unlink()


class FixedProbe(metrics_program.Probe):
    """supervisord's answer given, the rest real: the health rules on process states."""

    infos: list[dict] = []

    def processes(self) -> list[dict]:
        return self.infos


def test_health_fails_only_on_a_program_given_up_on(settings: settings_module.Settings) -> None:
    probe = FixedProbe(settings, HOST)
    endpoints = metrics_program.Endpoints(probe)

    def info(group: str, name: str, state: str) -> dict:
        return {"group": group, "name": name, "statename": state, "start": 1, "pid": 1}

    running = [info("subtask", "subtask_00", "RUNNING"), info("master", "master_00", "RUNNING")]
    probe.infos = [*running, info("subtask", "subtask_01", "BACKOFF"), info("broker", "broker", "EXITED")]
    assert endpoints.healthz()[0] == 200  # restarting: not failing
    status, _, body = endpoints.readyz()
    assert status == 503 and [p["process"] for p in json.loads(body)["not_ready"]] == ["subtask:subtask_01"]
    probe.infos = [*running, info("subtask", "subtask_01", "FATAL")]
    status, _, body = endpoints.healthz()
    assert status == 503 and json.loads(body)["failing"] == [{"process": "subtask:subtask_01", "state": "FATAL"}]
    probe.infos = running
    assert endpoints.healthz()[0] == 200 and endpoints.readyz()[0] == 200


def test_a_broken_hook_never_costs_an_answer() -> None:
    def broken(*_args: object) -> None:
        raise RuntimeError("hook bug")

    nieta = NietaClient(
        "tok-abcdef",
        "http://127.0.0.1:9/api",
        "http://127.0.0.1:9/ops",
        transport=httpx.MockTransport(lambda _: httpx.Response(200, text='"job-2"')),
        observe=broken,
    )
    assert nieta.create_job({"prompts": []}) == "job-2"  # the job is paid for: its uuid is kept
    feishu = FeishuClient(
        "http://127.0.0.1:9/open-apis/bot/v2/hook/broken-hook",
        host="h",
        transport=httpx.MockTransport(lambda _: httpx.Response(200, json={"code": 0})),
        on_result=broken,
    )
    assert feishu.send_card("title", "text").delivered
