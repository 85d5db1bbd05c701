"""What the fake Nieta API answers, HTTP aside: a response rule's scripted answer, the create
answer's job uuid in each shape, and a created job's state as a poll shows it (from its outcome
rule and its age)."""

from __future__ import annotations

import json
import time
import uuid as uuid_module
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nietest_daemon.testing.fake_nieta.rules import Rule

# A 1x1 transparent PNG: what the fake's artifact urls serve.
PNG_1X1 = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082"
)
HTML_ERROR_PAGE = (
    "<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head>"
    "<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>"
)


@dataclass
class Job:
    """A job the fake created: its prompts, host, timing and outcome rule."""

    uuid: str
    created: float  # monotonic
    created_at: float  # wall clock
    body: Any
    text: str  # the prompts as JSON: what markers are matched against
    ops: bool
    generation_time: float
    outcome: Rule | None = None
    polls: int = 0


@dataclass(frozen=True)
class Answer:
    """One HTTP answer for the server to send."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def dumps(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False).encode()


def scripted(rule: Rule, huge: Callable[[int], bytes]) -> Answer | None:
    """The answer a response rule scripts; None for `drop` (close the connection unanswered).
    `huge(size)`: the body of a `huge` answer."""
    action = rule.action
    if action == "drop":
        return None
    if action == "http_500":
        status = rule.status or 500
        return Answer(status, dumps({"code": status, "message": rule.error or "internal server error"}))
    if action == "http_429":
        headers = {"Retry-After": str(rule.retry_after)} if rule.retry_after is not None else {}
        return Answer(429, dumps({"code": 429, "message": rule.error or "too many requests"}), headers=headers)
    if action == "http":
        status = rule.status or 400
        body = rule.body if rule.body is not None else {"code": status, "message": rule.error or "bad request"}
        content = body.encode() if isinstance(body, str) else body if isinstance(body, bytes) else dumps(body)
        headers = {"Retry-After": str(rule.retry_after)} if rule.retry_after is not None else {}
        return Answer(status, content, rule.content_type or "application/json", headers)
    if action == "html":
        status = rule.status or 502
        return Answer(status, (rule.body or HTML_ERROR_PAGE).encode(), "text/html; charset=utf-8")
    if action == "empty":
        return Answer(rule.status or 200, b"", rule.content_type or "application/json")
    if action == "huge":
        return Answer(rule.status or 200, huge(rule.size))
    if action == "wrong_type":
        return Answer(rule.status or 200, dumps(rule.body if rule.body is not None else [1, 2, 3]))
    if action == "raw":
        body = rule.body if rule.body is not None else ""
        content = body if isinstance(body, bytes) else str(body).encode()
        return Answer(rule.status or 200, content, rule.content_type or "text/plain")
    if action == "unknown_job":
        return Answer(404, dumps({"code": 404, "message": "task not found"}))
    raise AssertionError(f"unhandled action {action}")  # pragma: no cover


def uuid_in_shape(job_uuid: str, shape: str) -> tuple[str, bytes]:
    """The create answer's content type and body, holding `job_uuid` in `shape` (`SHAPES`)."""
    if shape == "string":
        return "application/json", dumps(job_uuid)
    if shape == "bare":
        return "text/plain", job_uuid.encode()
    if shape == "data":
        return "application/json", dumps({"code": 0, "data": job_uuid})
    if shape.startswith("data."):
        return "application/json", dumps({"code": 0, "message": "ok", "data": {shape[5:]: job_uuid}})
    return "application/json", dumps({shape: job_uuid, "status": "PENDING"})


def job_state(job: Job, host: str) -> dict[str, Any]:
    """What a poll of `job` answers now; `host`: the base URL its artifact urls point at."""
    elapsed = time.monotonic() - job.created
    rule = job.outcome
    action = rule.action if rule is not None else "success"
    base: dict[str, Any] = {"uuid": job.uuid, "task_uuid": job.uuid}
    if action == "never" or elapsed < job.generation_time:
        status = "PENDING" if action == "never" or elapsed < job.generation_time / 2 else "RUNNING"
        return {**base, "task_status": status, "artifacts": []}
    image = {"uuid": str(uuid_module.uuid5(uuid_module.NAMESPACE_URL, job.uuid)), "status": "SUCCESS"}
    if action in ("success", "slow"):
        return {**base, "task_status": "SUCCESS", "artifacts": [{**image, "url": f"{host}/_image/{job.uuid}.png"}]}
    if action == "no_url":
        return {**base, "task_status": "SUCCESS", "artifacts": [image]}
    assert rule is not None  # the other outcomes come from a rule
    if action == "failure":
        return {
            **base,
            "task_status": "FAILURE",
            "artifacts": [],
            rule.error_field: rule.error or "generation failed",
        }
    if action == "illegal_image":
        state = {**base, "task_status": "ILLEGAL_IMAGE", "artifacts": [{**image, "status": "ILLEGAL_IMAGE"}]}
        if rule.error:
            state[rule.error_field] = rule.error
        return state
    if action == "timeout":
        state = {**base, "task_status": "TIMEOUT", "artifacts": []}
        if rule.error:
            state[rule.error_field] = rule.error
        return state
    # "status": any task_status, artifacts from `body`
    state = {**base, "task_status": rule.task_status, "artifacts": rule.body if rule.body is not None else []}
    if rule.error:
        state[rule.error_field] = rule.error
    return state
