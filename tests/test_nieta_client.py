"""The Nieta image API client against the fake API on 127.0.0.1 (no mocked HTTP)."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import structlog

from nietest_daemon.clients.nieta import (
    LUMINA_ELEMENT_UUID,
    JobState,
    JobStatus,
    NietaClient,
    NietaError,
    build_make_image_body,
    parse_job_status,
)
from nietest_daemon.domain.images import RANDOM_SEED_MAX, SeedError, choose_seed, random_seed
from nietest_daemon.domain.images import ratio_to_size as dimensions_from_ratio
from nietest_daemon.testing.fake_nieta import DEFAULT_TOKEN, FakeNieta, Rule

TOKEN = DEFAULT_TOKEN
CHAR_UUID = "0f6b7a3e-8d1c-4c1e-9e55-3f0c2b1a9d77"
ELEM_UUID = "7d2a9c41-5b3e-4f60-8a1d-2e9f0c6b4a13"
LUMINA_ELEMENT = {
    "type": "elementum",
    "value": LUMINA_ELEMENT_UUID,
    "uuid": LUMINA_ELEMENT_UUID,
    "weight": 1.0,
    "name": "lumina1",
    "img_url": "https://oss.talesofai.cn/picture_s/1y7f53e6itfn_0.jpeg",
    "domain": "",
    "parent": "",
    "label": None,
    "sort_index": 0,
    "status": "IN_USE",
    "polymorphi_values": {},
    "sub_type": None,
}


def subtask(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "prompts": [
            {"type": "freetext", "value": "a cat on a roof", "weight": 1.0},
            {
                "type": "oc_vtoken_adaptor",
                "value": CHAR_UUID,
                "uuid": CHAR_UUID,
                "name": "Alice",
                "img_url": "https://img.example/alice.png",
                "weight": 0.8,
            },
            {"type": "freetext", "value": "", "weight": 1.0},  # empty: dropped
            {
                "type": "elementum",
                "value": ELEM_UUID,
                "uuid": ELEM_UUID,
                "name": "sunset",
                "img_url": "https://img.example/sunset.png",
                "weight": 1.2,
            },
            {"type": "oc_vtoken_adaptor", "value": "", "uuid": "", "name": "nobody", "img_url": "", "weight": 1},
        ],
        "width": 1184,
        "height": 888,
        "seed": 123456,
        "use_polish": True,
        "is_lumina": False,
        "lumina_model_name": None,
        "lumina_cfg": None,
        "lumina_step": None,
    }
    base.update(overrides)
    return base


def entity(ptype: str, uuid: str, name: str, img_url: str, weight: float) -> dict[str, Any]:
    return {
        "type": ptype,
        "value": uuid,
        "uuid": uuid,
        "weight": weight,
        "name": name,
        "img_url": img_url,
        "domain": "",
        "parent": "",
        "label": None,
        "sort_index": 0,
        "status": "IN_USE",
        "polymorphi_values": {},
        "sub_type": None,
    }


EXPECTED_RAW_PROMPT = [
    {"type": "freetext", "value": "a cat on a roof", "weight": 1.0},
    entity("oc_vtoken_adaptor", CHAR_UUID, "Alice", "https://img.example/alice.png", 0.8),
    entity("elementum", ELEM_UUID, "sunset", "https://img.example/sunset.png", 1.2),
]


class Sleeps(list):
    """An injectable sleep that records the delays and does not wait."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def api(_module_api: FakeNieta) -> Iterator[FakeNieta]:
    """The module's fake API, reset for each test (starting a server per test costs ~30 ms x 150)."""
    settings = {name: getattr(_module_api, name) for name in _FAKE_SETTINGS}
    _module_api.reset()
    yield _module_api
    for name, value in settings.items():
        setattr(_module_api, name, value)


_FAKE_SETTINGS = ("generation_time", "latency", "latency_jitter", "create_shape", "strict_hosts", "record")


@pytest.fixture(scope="module")
def _module_api() -> Iterator[FakeNieta]:
    with FakeNieta() as fake:
        yield fake


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def client(api: FakeNieta, sleeps: Sleeps) -> Iterator[NietaClient]:
    with NietaClient(TOKEN, api.url, api.ops_url, max_retries=3, backoff_base=0.01, sleep=sleeps) as c:
        yield c


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_no_token(exc: BaseException, token: str = TOKEN) -> None:
    for text in (str(exc), repr(exc), *map(str, exc.args), str(getattr(exc, "api_message", ""))):
        assert token not in text


# --- request bodies -------------------------------------------------------------------------------


def test_standard_body_is_exactly_the_documented_one() -> None:
    body = build_make_image_body(subtask(lumina_model_name="ignored", lumina_cfg=5.0, lumina_step=30))
    assert body == {
        "storyId": "",
        "jobType": "universal",
        "width": 1184,
        "height": 888,
        "rawPrompt": EXPECTED_RAW_PROMPT,
        "seed": 123456,
        "meta": {"entrance": "PICTURE,PURE"},
        "context_model_series": None,
        "negative_freetext": "",
        "advanced_translator": True,
    }
    assert "client_args" not in body  # standard jobs never carry client_args


def test_lumina_body_appends_the_lumina_element_and_client_args() -> None:
    body = build_make_image_body(
        subtask(is_lumina=True, use_polish=False, lumina_model_name="lumina-v2", lumina_cfg=5.5, lumina_step=30)
    )
    assert body == {
        "storyId": "",
        "jobType": "universal",
        "width": 1184,
        "height": 888,
        "rawPrompt": [*EXPECTED_RAW_PROMPT, LUMINA_ELEMENT],
        "seed": 123456,
        "meta": {"entrance": "PICTURE,PURE"},
        "context_model_series": None,
        "negative_freetext": "",
        "advanced_translator": False,
        "client_args": {"ckpt_name": "lumina-v2", "cfg": 5.5, "steps": 30},
    }


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, None),
        ({"lumina_model_name": "m1"}, {"ckpt_name": "m1"}),
        ({"lumina_cfg": 4.0}, {"cfg": 4.0}),
        ({"lumina_step": 25, "lumina_cfg": 0}, {"cfg": 0, "steps": 25}),
    ],
)
def test_lumina_client_args_keep_only_non_null_values(fields: dict[str, Any], expected: Any) -> None:
    body = build_make_image_body(subtask(is_lumina=True, **fields))
    assert body.get("client_args") == expected
    assert ("client_args" in body) == (expected is not None)


def test_prompt_shapes_and_dropping() -> None:
    body = build_make_image_body(
        subtask(
            prompts=[
                {"type": "freetext", "value": "   ", "weight": 1},
                {"type": "freetext", "value": None, "weight": 1},
                {"type": "elementum", "value": None, "uuid": ELEM_UUID, "name": "e", "img_url": "u", "weight": 2},
            ]
        )
    )
    assert body["rawPrompt"] == [entity("elementum", ELEM_UUID, "e", "u", 2)]
    with pytest.raises(NietaError, match=r"prompts\[0\]\.type") as info:
        build_make_image_body(subtask(prompts=[{"type": "bogus", "value": "x"}]))
    assert info.value.retryable is False


def test_seeds() -> None:
    seeds = {random_seed() for _ in range(200)}
    assert all(1 <= s <= RANDOM_SEED_MAX for s in seeds) and len(seeds) > 190
    assert choose_seed(42) == 42
    assert choose_seed("7") == 7
    for empty in (None, 0):
        assert 1 <= choose_seed(empty) <= RANDOM_SEED_MAX
    assert 1 <= build_make_image_body(subtask(seed=None))["seed"] <= RANDOM_SEED_MAX
    with pytest.raises(SeedError):
        choose_seed("abc")
    with pytest.raises(NietaError, match="seed must be an integer"):
        build_make_image_body(subtask(seed="abc"))


@pytest.mark.parametrize(
    ("ratio", "size"),
    [
        ("1:1", (1024, 1024)),
        ("4:3", (1184, 888)),
        ("3:4", (888, 1184)),
        ("16:9", (1368, 768)),
        ("9:16", (768, 1368)),
        ("3:2", (1256, 840)),
        ("2:3", (840, 1256)),
        ("21:9", (1568, 672)),
        ("nonsense", (1024, 1024)),
        ("0:1", (1024, 1024)),
        (None, (1024, 1024)),
    ],
)
def test_dimensions_from_ratio(ratio: Any, size: tuple[int, int]) -> None:
    assert dimensions_from_ratio(ratio) == size


# --- create_job ------------------------------------------------------------------------------------


def test_create_sends_headers_and_body_to_the_right_host(api: FakeNieta, client: NietaClient) -> None:
    standard = client.create_job(subtask())
    lumina = client.create_job(subtask(is_lumina=True, lumina_step=20))
    first, second = api.requests_to("create")
    assert (first.path, first.ops, first.job_uuid) == ("/v3/make_image", False, standard)
    assert (second.path, second.ops, second.job_uuid) == ("/ops/v3/make_image", True, lumina)
    for request in (first, second):
        assert request.method == "POST"
        assert request.headers["content-type"] == "application/json"
        assert request.headers["x-platform"] == "nieta-app/web"
        assert request.headers["x-token"] == TOKEN
    assert first.body == build_make_image_body(subtask())
    assert second.body["rawPrompt"][-1] == LUMINA_ELEMENT
    assert second.body["client_args"] == {"steps": 20}


@pytest.mark.parametrize(
    "shape",
    ["string", "bare", "uuid", "task_uuid", "id", "task_id", "data", "data.uuid", "data.task_uuid", "data.id"]
    + ["data.task_id"],
)
def test_create_accepts_every_uuid_shape(api: FakeNieta, client: NietaClient, shape: str) -> None:
    api.add_rule("shape", shape=shape)
    job_uuid = client.create_job(subtask())
    assert job_uuid == api.requests_to("create")[0].job_uuid


@pytest.mark.parametrize(
    ("rule", "excerpt"),
    [
        (Rule("empty"), "(empty body)"),
        (Rule("wrong_type"), "[1, 2, 3]"),
        (Rule("wrong_type", body={"code": 0, "data": {"uuid": None}}), '"uuid": null'),
        (Rule("wrong_type", body="has spaces in it"), "has spaces"),
        (Rule("raw", body="OK", content_type="text/plain"), "OK"),
        (Rule("html", status=200), "502 Bad Gateway"),
        (Rule("huge", size=3 * 1024 * 1024), "larger than"),
        (Rule("raw", body=b"\xff\xfe\x00garbage", content_type="application/json"), "garbage"),
    ],
)
def test_create_with_unparsable_2xx_body_is_a_final_error(
    api: FakeNieta, client: NietaClient, rule: Rule, excerpt: str
) -> None:
    api.add(rule)
    with pytest.raises(NietaError) as info:
        client.create_job(subtask())
    assert info.value.retryable is False
    assert info.value.status_code == 200
    assert "without a job uuid" in str(info.value) and excerpt in str(info.value)
    assert len(str(info.value)) < 700
    assert len(api.requests_to("create")) == 1  # not retried: the job may exist


# --- poll_job --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "state", "error", "raw"),
    [
        (None, JobState.SUCCESS, None, "SUCCESS"),
        (Rule("failure", error="CUDA out of memory"), JobState.FAILURE, "CUDA out of memory", "FAILURE"),
        (Rule("failure", error="bad prompt", error_field="error"), JobState.FAILURE, "bad prompt", "FAILURE"),
        (Rule("status", task_status="FAILED", error="x1"), JobState.FAILURE, "x1", "FAILED"),
        (Rule("status", task_status="ERROR"), JobState.FAILURE, "image job failed (ERROR)", "ERROR"),
        (Rule("status", task_status="RUNNING"), JobState.PENDING, None, "RUNNING"),
        (Rule("status", task_status="QUEUING"), JobState.PENDING, None, "QUEUING"),
        (Rule("never"), JobState.PENDING, None, "PENDING"),
        (Rule("illegal_image"), JobState.MODERATED, "image refused by moderation (ILLEGAL_IMAGE)", "ILLEGAL_IMAGE"),
        (Rule("illegal_image", error="nsfw"), JobState.MODERATED, "nsfw", "ILLEGAL_IMAGE"),
        (Rule("timeout", error="worker lost"), JobState.TIMEOUT, "worker lost", "TIMEOUT"),
        (Rule("no_url"), JobState.SUCCESS, None, "SUCCESS"),
        (
            Rule("status", task_status="MELTED", error="boom"),
            JobState.FAILURE,
            "unknown task_status 'MELTED': boom",
            "MELTED",
        ),
    ],
)
def test_status_table(
    api: FakeNieta, client: NietaClient, rule: Rule | None, state: JobState, error: str | None, raw: str
) -> None:
    if rule is not None:
        api.add(rule)
    lumina = raw == "SUCCESS"  # exercise the ops host too
    job_uuid = client.create_job(subtask(is_lumina=lumina))
    status = client.poll_job(job_uuid, lumina)
    assert (status.state, status.error, status.raw_status) == (state, error, raw) and status.state is state
    assert status.done == (state != JobState.PENDING)
    if rule is None:
        assert status.url == f"{api.ops_url}/_image/{job_uuid}.png"
    else:
        assert status.url is None
    poll = api.requests_to("poll")[0]
    assert poll.path == f"{'/ops' if lumina else ''}/v1/artifact/task/{job_uuid}"
    assert poll.headers["x-token"] == TOKEN and poll.headers["x-platform"] == "nieta-app/web"


def test_job_becomes_success_after_the_generation_time(sleeps: Sleeps) -> None:
    with FakeNieta(generation_time=0.3) as api, NietaClient(TOKEN, api.url, api.ops_url, sleep=sleeps) as client:
        job_uuid = client.create_job(subtask())
        assert client.poll_job(job_uuid, False) == JobStatus(JobState.PENDING, raw_status="PENDING")
        time.sleep(0.35)
        assert client.poll_job(job_uuid, False).state == JobState.SUCCESS


def test_parse_job_status_edge_cases() -> None:
    artifacts = [{"status": "FAILURE", "err_msg": "nsfw detected"}, "junk", {"url": ""}, {"url": "https://x/1.png"}]
    assert parse_job_status({"task_status": "SUCCESS", "artifacts": artifacts}).url == "https://x/1.png"
    failed = parse_job_status({"task_status": "failure", "error": "e1", "err_msg": "e2", "artifacts": artifacts})
    assert (failed.state, failed.error) == (JobState.FAILURE, "e1; e2; nsfw detected")
    missing = parse_job_status({"code": 500, "message": "oops"})
    assert missing.state == JobState.FAILURE and missing.raw_status is None and "oops" in missing.error
    odd = parse_job_status({"task_status": 7, "artifacts": "not a list", "error": {"code": 3}})
    assert (odd.state, odd.raw_status, odd.error) == (JobState.FAILURE, "7", "unknown task_status '7': {\"code\": 3}")


@pytest.mark.parametrize(
    "rule",
    [
        Rule("empty", endpoint="poll"),
        Rule("html", endpoint="poll", status=200),
        Rule("wrong_type", endpoint="poll", body=["SUCCESS"]),
        Rule("wrong_type", endpoint="poll", body="SUCCESS"),
        Rule("huge", endpoint="poll"),
        Rule("raw", endpoint="poll", body="{not json"),
    ],
)
def test_poll_with_garbage_body_is_a_retryable_error(api: FakeNieta, client: NietaClient, rule: Rule) -> None:
    job_uuid = client.create_job(subtask())
    api.add(rule)
    with pytest.raises(NietaError, match="unusable body") as info:
        client.poll_job(job_uuid, False)
    assert info.value.retryable is True and info.value.status_code == 200


def test_poll_of_an_unknown_job_is_final(api: FakeNieta, client: NietaClient) -> None:
    job_uuid = client.create_job(subtask())
    api.add_rule("unknown_job", endpoint="poll", times=1)
    for target in (job_uuid, "no-such-job"):
        with pytest.raises(NietaError, match="task not found") as info:
            client.poll_job(target, False)
        assert (info.value.retryable, info.value.status_code) == (False, 404)
    with pytest.raises(NietaError, match="task not found"):
        client.poll_job(job_uuid, True)  # jobs belong to the host that created them
    assert client.poll_job(job_uuid, False).state == JobState.SUCCESS
    with pytest.raises(NietaError, match="invalid job uuid"):
        client.poll_job("", False)


@pytest.mark.parametrize("body", ['"\\ud800-job"', '{"uuid": "job\\u0000x"}', '{"data": {"id": "j\\u00f6b"}}'])
def test_create_refuses_a_job_uuid_that_is_not_printable_ascii(api: FakeNieta, client: NietaClient, body: str) -> None:
    """A lone surrogate in the uuid used to be stored (UnicodeEncodeError) and then polled (quote() raised)."""
    api.add_rule("raw", body=body, content_type="application/json")
    with pytest.raises(NietaError, match="without a job uuid") as info:
        client.create_job(subtask())
    assert info.value.retryable is False
    for bad in ("\ud800", "a b", "j\x00b", 5):
        with pytest.raises(NietaError, match="invalid job uuid"):
            client.poll_job(bad, False)  # type: ignore[arg-type]


def test_lone_surrogates_in_api_text_become_replacement_characters(api: FakeNieta, client: NietaClient) -> None:
    """JSON escapes can carry lone surrogates; no text the client returns may hold one (stores cannot encode it)."""
    job_uuid = client.create_job(subtask())
    body = '{"task_status": "FAIL\\udfffURE", "err_msg": "GPU \\ud800 melted", "artifacts": [{"error": "\\udc80"}]}'
    api.add_rule("raw", endpoint="poll", body=body, times=1)
    status = client.poll_job(job_uuid, False)
    assert status.state == JobState.FAILURE and status.raw_status == "FAIL\ufffdURE"
    assert status.error == "unknown task_status 'FAIL\ufffdURE': GPU \ufffd melted; \ufffd"
    api.add_rule("http", endpoint="poll", status=400, body='{"message": "bad \\ud800 request"}', times=1)
    with pytest.raises(NietaError) as info:
        client.poll_job(job_uuid, False)
    assert str(info.value) == "artifact/task: HTTP 400: bad \ufffd request"
    api.add_rule(
        "raw", endpoint="poll", body='{"task_status": "SUCCESS", "artifacts": [{"url": "https://x/\\ud800.png"}]}'
    )
    assert client.poll_job(job_uuid, False).url == "https://x/\ufffd.png"


# --- retries -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rule",
    [
        Rule("http_500", times=2),
        Rule("http_500", status=503, times=2),
        Rule("http_429", times=2),
        Rule("html", times=2),  # a proxy's 502 page
    ],
)
def test_transient_errors_are_retried_then_succeed(
    api: FakeNieta, client: NietaClient, sleeps: Sleeps, rule: Rule
) -> None:
    api.add(rule)
    assert client.create_job(subtask())
    assert len(api.requests_to("create")) == 3
    assert len(sleeps) == 2
    # jittered exponential backoff: base * 2**n, between half and all of it
    assert 0.005 <= sleeps[0] <= 0.01 and 0.01 <= sleeps[1] <= 0.02


def test_poll_is_retried_too(api: FakeNieta, client: NietaClient) -> None:
    job_uuid = client.create_job(subtask())
    api.add_rule("http_500", endpoint="poll", times=1)
    api.add_rule("drop", endpoint="poll", times=1)
    assert client.poll_job(job_uuid, False).state == JobState.SUCCESS
    assert [r.status for r in api.requests_to("poll")] == [500, None, 200]


def test_retry_after_is_honoured_when_small(api: FakeNieta, client: NietaClient, sleeps: Sleeps) -> None:
    api.add_rule("http_429", retry_after=2, times=1)
    assert client.create_job(subtask())
    assert sleeps == [2.0]


def test_long_retry_after_ends_the_call_retryable(api: FakeNieta, client: NietaClient, sleeps: Sleeps) -> None:
    api.add_rule("http_429", retry_after=120, error="slow down")
    with pytest.raises(NietaError, match="slow down") as info:
        client.create_job(subtask())
    assert (info.value.retryable, info.value.status_code, info.value.retry_after) == (True, 429, 120.0)
    assert "retry after 120s" in str(info.value)
    assert sleeps == [] and len(api.requests_to("create")) == 1


@pytest.mark.parametrize(
    "rule",
    [Rule("drop", times=2), Rule("http", status=504, body="", times=2)],
    ids=["connection dropped", "gateway timeout"],
)
def test_a_create_whose_answer_was_lost_is_in_doubt_and_not_sent_again(
    api: FakeNieta, client: NietaClient, sleeps: Sleeps, rule: Rule
) -> None:
    """The API has no idempotency key: a create that reached it and lost its answer may have made a
    job, and a second create would pay for a second image."""
    api.add(rule)
    with pytest.raises(NietaError) as info:
        client.create_job(subtask())
    assert info.value.in_doubt and not info.value.retryable
    assert "not sent again" in str(info.value)
    assert len(api.requests_to("create")) == 1 and sleeps == []


def test_a_poll_whose_answer_was_lost_is_retried(api: FakeNieta, client: NietaClient) -> None:
    job_uuid = client.create_job(subtask())
    api.add_rule("http", endpoint="poll", status=504, body="", times=1)
    api.add_rule("drop", endpoint="poll", times=1)
    assert client.poll_job(job_uuid, False).state == JobState.SUCCESS


def test_read_timeouts_retry_a_poll_but_leave_a_create_in_doubt(api: FakeNieta, sleeps: Sleeps) -> None:
    with NietaClient(TOKEN, api.url, api.ops_url, read_timeout=0.3, backoff_base=0.01, sleep=sleeps) as client:
        job_uuid = client.create_job(subtask())
        api.add_rule("delay", endpoint="poll", delay=1.0, times=1)
        assert client.poll_job(job_uuid, False).state == JobState.SUCCESS
        assert len(sleeps) == 1
        api.add_rule("delay", delay=1.0, times=1)
        with pytest.raises(NietaError) as info:
            client.create_job(subtask())
    assert info.value.in_doubt and "read timeout" in str(info.value)
    assert len(api.requests_to("create")) == 2 and len(sleeps) == 1


def test_connect_errors_are_retried_until_the_server_is_up() -> None:
    port = free_port()
    started: list[FakeNieta] = []

    def sleep(seconds: float) -> None:
        if len(started) == 0 and seconds > 0:
            started.append(FakeNieta(port=port).start())

    url = f"http://127.0.0.1:{port}"
    try:
        with NietaClient(TOKEN, url, url + "/ops", backoff_base=0.01, sleep=sleep) as client:
            assert client.create_job(subtask())
        assert len(started[0].requests_to("create")) == 1
    finally:
        for fake in started:
            fake.stop()


def test_connect_errors_exhaust_the_budget(sleeps: Sleeps) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    client = NietaClient(TOKEN, url, url, max_retries=2, backoff_base=0.01, sleep=sleeps)
    with client, pytest.raises(NietaError, match="connect error") as info:
        client.poll_job("abc", False)
    assert info.value.retryable is True and info.value.status_code is None
    assert "gave up after 3 attempts" in str(info.value)
    assert len(sleeps) == 2


def test_server_errors_exhaust_the_budget(api: FakeNieta, client: NietaClient, sleeps: Sleeps) -> None:
    api.add_rule("http_500", error="upstream exploded")
    with pytest.raises(NietaError, match="upstream exploded") as info:
        client.create_job(subtask())
    assert (info.value.retryable, info.value.status_code) == (True, 500)
    assert info.value.api_message == "upstream exploded"
    assert len(api.requests_to("create")) == 4 and len(sleeps) == 3


def test_backoff_is_capped() -> None:
    c = NietaClient(TOKEN, "http://127.0.0.1:9", "http://127.0.0.1:9", backoff_base=0.5, backoff_max=4.0)
    try:
        delays = [c._backoff(n) for n in range(10)]
    finally:
        c.close()
    assert all(0.25 <= d <= 4.0 for d in delays) and max(delays[5:]) <= 4.0 and min(delays[5:]) >= 2.0


# --- final errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "text"),
    [
        (Rule("http", status=400, body={"code": 400, "message": "prompt is too long"}), "prompt is too long"),
        (Rule("http", status=422, body={"detail": [{"msg": "width invalid"}]}), "width invalid"),
        (Rule("http", status=403, body="Forbidden: quota exceeded", content_type="text/plain"), "quota exceeded"),
        (Rule("html", status=404), "502 Bad Gateway"),
        (Rule("http", status=400, body=""), "(empty body)"),
        (Rule("http", status=400, body={"message": "x" * 5000}), "xxxx"),
        (Rule("http", status=301, body=""), "HTTP 301"),
    ],
)
def test_client_errors_are_final_with_the_api_text(
    api: FakeNieta, client: NietaClient, sleeps: Sleeps, rule: Rule, text: str
) -> None:
    api.add(rule)
    with pytest.raises(NietaError) as info:
        client.create_job(subtask())
    assert info.value.retryable is False and info.value.status_code == rule.status
    assert text in str(info.value)
    assert "<" not in str(info.value)  # HTML is reduced to its text
    assert len(str(info.value)) <= 560
    assert sleeps == [] and len(api.requests_to("create")) == 1


def test_wrong_token_is_a_final_401(api: FakeNieta, sleeps: Sleeps) -> None:
    wrong = "wrong-token-value-xyz"
    client = NietaClient(wrong, api.url, api.ops_url, sleep=sleeps)
    with client, pytest.raises(NietaError, match="invalid or missing X-Token") as info:
        client.create_job(subtask())
    assert (info.value.retryable, info.value.status_code) == (False, 401)
    assert_no_token(info.value, wrong)
    assert api.requests[0].headers["x-token"] == wrong


# --- the token never leaks ---------------------------------------------------------------------------


def test_token_never_appears_in_errors_or_logs(
    api: FakeNieta, client: NietaClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    echo = f"token {TOKEN} is not allowed"
    rules = [
        Rule("http", status=400, body={"message": echo}),
        Rule("http_500", error=echo),  # retried until the budget runs out, logged on the way
        Rule("raw", body=echo),
        Rule("html", status=403, body=f"<html><body>{echo}</body></html>"),
    ]
    with structlog.testing.capture_logs() as events:
        for rule in rules:
            api.clear_rules()
            api.add(rule)
            with pytest.raises(NietaError) as info:
                client.create_job(subtask())
            assert_no_token(info.value)
            assert "***" in str(info.value)
        api.clear_rules()
        api.add_rule("failure", error=echo)
        status = client.poll_job(client.create_job(subtask()), False)
    assert status.state == JobState.FAILURE and TOKEN not in status.error and "is not allowed" in status.error
    retries = [e for e in events if e["event"] == "nieta request failed, retrying"]
    assert retries and all("is not allowed" in e["error"] for e in retries), "the retries should have been logged"
    assert TOKEN not in json.dumps(events, default=str)
    for record in caplog.records:  # the standard library's records (httpx)
        assert TOKEN not in record.getMessage()
        assert TOKEN not in json.dumps({k: str(v) for k, v in record.__dict__.items()})
    assert TOKEN not in repr(client)


@pytest.mark.parametrize("token", ["", None, "has space", "line\nbreak", "caf\u00e9-token"])
def test_unusable_tokens_are_refused_without_echo(token: Any) -> None:
    with pytest.raises(NietaError) as info:
        NietaClient(token, "http://127.0.0.1:9", "http://127.0.0.1:9")
    assert info.value.retryable is False
    if token:
        assert_no_token(info.value, token)


def test_one_pool_serves_many_threads(api: FakeNieta, client: NietaClient) -> None:
    api.latency = 0.2
    results: list[str] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            results.append(client.create_job(subtask()))
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(60)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    elapsed = time.monotonic() - started
    assert not errors and len(set(results)) == 60
    assert api.stats()["max_in_flight"] >= 30
    assert elapsed < 5.0, f"60 concurrent 0.2 s requests took {elapsed:.2f}s"


# --- the fake itself ------------------------------------------------------------------------------------


def test_fake_handles_hundreds_of_concurrent_requests() -> None:
    # One stdlib connection per thread: a single httpx pool shared by hundreds of threads is itself slow.
    statuses: list[int] = []

    with FakeNieta(latency=0.3) as api:

        def hit() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
            try:
                conn.request("GET", "/v1/artifact/task/nope", headers={"X-Token": TOKEN})
                statuses.append(conn.getresponse().status)
            finally:
                conn.close()

        threads = [threading.Thread(target=hit) for _ in range(300)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
        elapsed = time.monotonic() - started
        stats = api.stats()
    assert statuses == [404] * 300
    assert stats["requests"] == 300 and stats["max_in_flight"] >= 150, stats
    assert elapsed < 6.0, f"300 concurrent 0.3 s requests took {elapsed:.2f}s: {stats}"


def test_fake_scripting_by_nth_and_marker() -> None:
    with FakeNieta(
        rules=[{"action": "http_500", "nth": 2}, {"action": "failure", "marker": "st-9", "times": 1}]
    ) as api:
        with NietaClient(TOKEN, api.url, api.ops_url, max_retries=0) as client:
            client.create_job(subtask(prompts=[{"type": "freetext", "value": "st-1", "weight": 1}]))
            with pytest.raises(NietaError):
                client.create_job(subtask(prompts=[{"type": "freetext", "value": "st-2", "weight": 1}]))
            for _ in range(2):
                job = client.create_job(subtask(prompts=[{"type": "freetext", "value": "st-9", "weight": 1}]))
                last = client.poll_job(job, False)
        assert last.state == JobState.SUCCESS  # the failure rule applied once only
        assert api.created_count("st-9") == 2 and api.created_count("st-2") == 0
        assert api.created_counts(r"st-\d+") == {"st-1": 1, "st-9": 2}
        assert api.duplicates(r"st-\d+") == {"st-9": 2}


def test_fake_runs_standalone() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nietest_daemon.testing.fake_nieta",
            "--port",
            "0",
            "--latency",
            "0.01",
            "--marker-regex",
            r"st-\d+",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        with NietaClient(ready["token"], ready["url"], ready["ops_url"]) as client:
            client.create_job(subtask(prompts=[{"type": "freetext", "value": "st-5", "weight": 1}]))
        with httpx.Client(trust_env=False) as http:
            http.post(f"{ready['url']}/_fake/rules", json={"action": "illegal_image"})
            with NietaClient(ready["token"], ready["url"], ready["ops_url"]) as client:
                assert client.poll_job(client.create_job(subtask()), False).state == JobState.MODERATED
            stats = http.get(f"{ready['url']}/_fake/stats").json()
            counts = http.get(f"{ready['url']}/_fake/created_counts").json()
        assert stats["jobs"] == 2 and stats["by_endpoint"] == {"create": 2, "poll": 1}
        assert counts == {"st-5": 1}
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0 and json.loads(out.strip().splitlines()[-1])["requests"] == 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- the transport seam: no sockets ----------------------------------------------------------------


def test_client_runs_on_a_mock_transport_and_maps_transport_errors() -> None:
    job = "3f8e2a14-9b6d-4c1e-8f00-7a2b9c0d1e2f"
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/v3/make_image":
            return httpx.Response(200, json=job)
        raise httpx.ConnectError("connection refused", request=request)

    transport = httpx.MockTransport(handler)
    sleeps: list[float] = []
    with NietaClient(
        TOKEN, "https://api.invalid", "https://ops.invalid", transport=transport, sleep=sleeps.append
    ) as c:
        assert c.create_job(subtask()) == job
        with pytest.raises(NietaError) as caught:
            c.poll_job(job, False)
    assert seen[0].headers["x-token"] == TOKEN and seen[0].url.host == "api.invalid"
    assert caught.value.retryable and "connect" in str(caught.value).lower()
    assert TOKEN not in str(caught.value)
    assert len(sleeps) == c.max_retries  # every retry waited, on the injected sleep
