"""End-to-end: garbage placed straight on each queue never loops, never vanishes unlogged, never stops a worker.

Each message is written the way Dramatiq's Redis broker stores one (dispatch.lua): the body in the
hash `dramatiq:<queue>.msgs` under an id, the id pushed on the list `dramatiq:<queue>`. Every kind of
garbage must end either dead-lettered (`dramatiq:<queue>.XQ`, body kept for inspection) with an
error line naming it and what is wrong, or consumed with an error line that says so. Then the
worker still runs valid messages on all its threads, its process was never restarted, and nothing
of the queue is left ready, in flight, held or scheduled for a retry.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from nietest_daemon.internals.dramatiq_redis import (
    ack_set_key,
    bodies_key,
    dead_letter_name,
    delay_queue_name,
    queue_key,
)
from nietest_daemon.testing.daemon import ROOT, Daemon
from nietest_daemon.testing.waiting import wait_for

pytestmark = pytest.mark.e2e

QUEUES = ("master", "master_ops", "subtask", "subtask_ops")
THREADS = 2
REQUIRED_KEYS = {"timestamp", "level", "event", "logger", "pid", "process"}
#: Worker log lines that mean a consumer or a worker thread broke on a message.
BROKEN = (
    "Consumer encountered",  # dramatiq: the consumer thread died and restarts
    "consumer restarted",  # nietest: ... and took a new broker id
    "unhandled exception in thread",  # a worker thread died
    "Unhandled error during post_process_message",  # an ack or nack failed
    "Unexpected failure in",  # a middleware hook raised
    "Found 'None' message",  # dramatiq left a body-less id in the ack set
)

#: Per queue: actors of that queue taking an id, with the error line each writes for an unknown id.
ID_ACTORS: dict[str, list[tuple[str, list[Any], str]]] = {
    "master": [
        ("process_task", ["no-such-task"], "no such task; message dropped"),
        ("send_notice", ["no-such-task", "completed"], "notice for an unknown task dropped"),
    ],
    "master_ops": [],  # reserved queue: no real actor
    "subtask": [
        ("run_subtask", ["no-such-subtask"], "no such subtask; message dropped"),
        ("poll_subtask", ["no-such-subtask"], "no such subtask; message dropped"),
    ],
    "subtask_ops": [
        ("run_lumina_subtask", ["no-such-subtask"], "no such subtask; message dropped"),
        ("poll_lumina_subtask", ["no-such-subtask"], "no such subtask; message dropped"),
    ],
}
#: An actor that exists, on another queue than the key's.
FOREIGN_ACTOR = {
    "master": "run_subtask",
    "master_ops": "process_task",
    "subtask": "process_task",
    "subtask_ops": "run_subtask",
}
DROP = object()  # a field set to DROP is left out of the body


@dataclass
class Case:
    name: str
    body: bytes | None  # None: an id on the list with no body in the hash
    expect: str  # "dead" (in the XQ), "consumed" (ran and said why it did nothing), "dropped" (no body)
    says: str  # in the log line: the reason of a dead letter, the event of a consumed message
    redis_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    message_id: str | None = None


def cases_for(key: str, queue: str) -> list[Case]:
    record = f"record_{key}"  # tests/e2e_actors.py: record(token: str, seconds: float = 0.0)

    def msg(name: str, expect: str, says: str, actor: str, args: list[Any], /, **fields: Any) -> Case:
        """A well-formed Dramatiq message body, with `fields` replaced; `options` keep the redis id."""
        case = Case(name, None, expect, says)
        body: dict[str, Any] = {
            "queue_name": queue,
            "actor_name": actor,
            "args": args,
            "kwargs": {},
            "message_id": str(uuid.uuid4()),
            "message_timestamp": int(time.time() * 1000),
            **fields,
        }
        options = body.get("options", {})
        if isinstance(options, dict) and not options.pop("no_redis_id", False):
            options = {"redis_message_id": case.redis_id, **options}
        body["options"] = options
        body = {k: v for k, v in body.items() if v is not DROP}
        case.body = json.dumps(body).encode()
        case.message_id = body["message_id"] if isinstance(body.get("message_id"), str) else None
        return case

    def raw(name: str, body: bytes | None, says: str) -> Case:
        return Case(name, body, "dead" if body is not None else "dropped", says)

    cases = [
        raw("not JSON", b"hello {this is not json", "not JSON"),
        raw("not UTF-8", b"\xff\xfe\x00{\x80garbage\xc3", "not UTF-8"),
        raw("JSON array", b"[1, 2, 3]", "not a JSON object"),
        raw("JSON string", b'"process_task"', "not a JSON object"),
        raw("JSON null", b"null", "not a JSON object"),
        raw("empty body", b"", "not JSON"),
        raw("huge, not JSON", b"\x00garbage" * 400_000, "not JSON"),  # 3.6 MB
        raw("missing fields", json.dumps({"actor_name": record, "args": ["x"]}).encode(), "missing field"),
        raw("id without a body", None, "message id without a body dropped"),
        msg("no kwargs field", "dead", "missing field 'kwargs'", record, ["t"], kwargs=DROP),
        msg("unknown field", "dead", "unknown fields ['surprise']", record, ["t"], surprise=1),
        msg("args not a list", "dead", "field 'args' must be list", record, [], args="token"),
        msg("options not an object", "dead", "field 'options' must be dict", record, ["t"], options=5),
        msg("message_id not a string", "dead", "field 'message_id' must be str", record, ["t"], message_id=[1]),
        msg("timestamp not a number", "dead", "field 'message_timestamp'", record, ["t"], message_timestamp="now"),
        msg("no redis_message_id", "dead", "redis_message_id is missing", record, ["t"], options={"no_redis_id": 1}),
        msg("queue_name of another queue", "dead", "is not this queue", record, ["t"], queue_name="elsewhere"),
        msg(
            "option of the wrong type",
            "dead",
            "option 'retries' must be a number",
            record,
            ["t"],
            options={"retries": "many"},
        ),
        msg("retry forever", "dead", "'max_retries' is null", record, ["t"], options={"max_retries": None}),
        msg("code in options", "dead", "option 'throws' cannot come", record, ["t"], options={"throws": "ValueError"}),
        msg("unknown actor", "dead", "no actor named 'no_such_actor'", "no_such_actor", ["t"]),
        msg("actor of another queue", "dead", "belongs to queue", FOREIGN_ACTOR[key], ["no-such-id"]),
        msg("missing arguments", "dead", "missing a required argument: 'token'", record, []),
        msg("too many arguments", "dead", "too many positional arguments", record, ["t", 1.0, "extra"]),
        msg("unknown kwargs", "dead", "unexpected keyword argument 'bogus'", record, ["t"], kwargs={"bogus": 1}),
        msg("wrong type (int for str)", "dead", "argument 'token' of record_", record, [123]),
        msg("wrong type (str for float)", "dead", "argument 'seconds' of record_", record, ["t", "slow"]),
        msg("wrong type (object for str)", "dead", "must be str, not dict", record, [{"token": "t"}]),
    ]
    for actor, args, says in ID_ACTORS[key]:
        cases.append(msg(f"{actor} of an unknown id", "consumed", says, actor, args))
        cases.append(msg(f"{actor} with a wrong-typed id", "dead", "must be str, not list", actor, [args, *args[1:]]))
        cases.append(msg(f"{actor} with no arguments", "dead", "missing a required argument", actor, []))
    if ID_ACTORS[key]:
        actor, args, says = ID_ACTORS[key][0]
        cases.append(msg("huge, valid, unknown id", "consumed", says, actor, ["x" * 3_000_000, *args[1:]]))
    else:
        cases.append(msg("huge, unknown actor", "dead", "no actor named", "no_such_actor", ["x" * 3_000_000]))
    return cases


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    """One daemon, one worker process per queue (master_ops included), MAX_RETRIES > 0."""
    home = Path(tempfile.mkdtemp(prefix="nt-", dir="/tmp"))
    counts = {f"NIETEST_{k.upper()}_PROCESSES": "1" for k in QUEUES}
    threads = {f"NIETEST_{k.upper()}_THREADS": str(THREADS) for k in QUEUES}
    d = Daemon(
        home,
        **counts,
        **threads,
        # Retries on: a message that cannot run must still end at once, not after backoffs.
        MAX_RETRIES="3",
        NIETEST_DRAIN_SECONDS="5",
        NIETEST_BROKER_HEARTBEAT_TIMEOUT="3",
        NIETEST_ACTOR_MODULES="e2e_actors",
    )
    d.start()
    yield d
    try:
        d.stop()
    finally:
        d.kill_everything()
        shutil.rmtree(home, ignore_errors=True)


def complete_lines(path: Path) -> list[str]:
    """The lines of a log file, less a last one still being written."""
    return path.read_text(encoding="utf-8").split("\n")[:-1]


def worker_lines(daemon: Daemon, key: str) -> list[dict[str, Any]]:
    """Every log line of the queue's worker processes (`<key>_NN.log`), parsed."""
    lines = []
    for path in daemon.log_files():
        if path.name.rsplit("_", 1)[0] == key and path.name.endswith(".log"):
            lines += [json.loads(line) for line in complete_lines(path)]
    return lines


def log_line_for(case: Case, lines: list[dict[str, Any]]) -> dict[str, Any] | None:
    for line in lines:
        if line.get("level") != "error":
            continue
        if case.expect == "dead":
            if line["event"] == "bad message dead-lettered" and line.get("redis_message_id") == case.redis_id:
                return line
        elif case.expect == "dropped":
            if line["event"] == case.says and line.get("redis_message_id") == case.redis_id:
                return line
        elif line.get("message_id") == case.message_id and line["event"] == case.says:
            return line
    return None


@pytest.mark.parametrize("key", QUEUES)
def test_garbage_is_dead_lettered_or_failed_and_the_worker_goes_on(daemon: Daemon, key: str) -> None:
    daemon.wait_running()
    r = daemon.redis
    queue = daemon.settings.queue(key).name
    q = queue_key(queue)
    dq = delay_queue_name(queue)
    pids = daemon.pids()
    cases = cases_for(key, queue)

    for case in cases:
        with r.pipeline(transaction=True) as pipe:
            if case.body is not None:
                pipe.hset(bodies_key(queue), case.redis_id, case.body)
            pipe.rpush(q, case.redis_id)
            pipe.execute()
    # After the garbage, in the same FIFO list: a valid message runs.
    token = uuid.uuid4().hex
    daemon.send(key, "record", token)
    wait_for(lambda: any(t.startswith(token) for t in daemon.done()), 20, what=f"a valid message on {queue}")

    def held() -> list[str]:
        return [k.decode() for name in (queue, delay_queue_name(queue)) for k in r.keys(ack_set_key("*", name))]

    def unsettled() -> list[str]:
        """What is not dealt with yet: cases without their log line, and what the queue still has."""
        lines = worker_lines(daemon, key)
        left = [f"{c.name}: no log line" for c in cases if not log_line_for(c, lines)]
        left += [f"{n} ready" for n in [r.llen(q)] if n] + [f"{n} bodies" for n in [r.hlen(bodies_key(queue))] if n]
        return left + [f"held in {k}" for k in held()]

    try:
        wait_for(lambda: not unsettled(), 20, what=f"every bad message of {queue} dealt with and logged")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nstill: {unsettled()}") from None
    lines = worker_lines(daemon, key)
    dead = {m.decode() for m in r.zrange(queue_key(dead_letter_name(queue)), 0, -1)}
    problems = []
    for case in cases:
        line = log_line_for(case, lines)
        assert line is not None
        if case.expect == "dead":
            if case.redis_id not in dead:
                problems.append(f"{case.name}: not dead-lettered")
            elif r.hget(bodies_key(dead_letter_name(queue)), case.redis_id) != case.body:
                problems.append(f"{case.name}: dead letter's body not kept as it was")
            if case.says not in line["reason"]:
                problems.append(f"{case.name}: reason {line['reason']!r} does not say {case.says!r}")
            if case.message_id and line.get("message_id") != case.message_id:
                problems.append(f"{case.name}: log line does not name message {case.message_id}")
        elif case.redis_id in dead:
            problems.append(f"{case.name}: dead-lettered, expected {case.expect}")
    assert not problems, "\n".join(problems)

    # Nothing left: not ready, in flight, held by a worker, or scheduled for a retry.
    assert r.llen(q) == 0 and r.hlen(bodies_key(queue)) == 0 and not held()
    assert r.llen(queue_key(dq)) == 0 and r.hlen(bodies_key(dq)) == 0
    # No consumer or worker thread broke, no process was restarted.
    broken = [f"{line['event'][:120]}" for line in lines if any(b in line["event"] for b in BROKEN)]
    assert not broken, broken
    assert daemon.pids() == pids

    # Every worker thread is still alive: THREADS slow messages run at once.
    tokens = [uuid.uuid4().hex for _ in range(THREADS)]
    for t in tokens:
        daemon.send(key, "record", t, 1.5)
    wait_for(lambda: all(any(s.startswith(t) for s in daemon.started()) for t in tokens), 10, what="all started")
    assert not [t for t in tokens if any(s.startswith(t) for s in daemon.done())], "ran one after the other"
    wait_for(lambda: all(any(s.startswith(t) for s in daemon.done()) for t in tokens), 10, what="all done")


#: The garbage of test_logs_stay_json: the biggest and the least decodable of cases_for's messages.
LOG_GARBAGE = {"not UTF-8", "huge, not JSON", "huge, valid, unknown id", "huge, unknown actor"}


def line_kinds(record: dict[str, Any]) -> set[str]:
    """What kind of hard line a log record is, of those test_logs_stay_json must have seen."""
    kinds = set()
    if record["event"] == "bad message dead-lettered" and "not UTF-8" in record.get("reason", ""):
        kinds.add("dead letter of a body not UTF-8")
    if record.get("truncated") is True:
        kinds.add("line cut to the cap")
    if "exception" in record:
        kinds.add("exception")
    if record["logger"] == "stdout":
        kinds.add("stray print")
    return kinds


def test_logs_stay_json(daemon: Daemon) -> None:
    """Garbage on every queue (multi-MB bodies, invalid UTF-8, a multi-MB id), then an actor logging
    40 KB lines and one printing and raising: every line of every log is JSON, with its keys, ≤ 16 KiB.

    The test makes all of it itself, so it checks the same whether it runs alone or after the others.
    """
    daemon.wait_running()
    r = daemon.redis
    garbage: dict[str, list[Case]] = {}
    for key in QUEUES:
        queue = daemon.settings.queue(key).name
        garbage[key] = [case for case in cases_for(key, queue) if case.name in LOG_GARBAGE]
        for case in garbage[key]:
            assert case.body is not None
            with r.pipeline(transaction=True) as pipe:
                pipe.hset(bodies_key(queue), case.redis_id, case.body)
                pipe.rpush(queue_key(queue), case.redis_id)
                pipe.execute()
        daemon.send(key, "chatter", 2, 40_000)
        daemon.send(key, "leak", "redis://:hunter2@example.invalid:6379/0")
    wanted = {"dead letter of a body not UTF-8", "line cut to the cap", "exception", "stray print"}

    def missing() -> list[str]:
        """Per queue: the garbage without its log line, and the kinds of line not written yet."""
        left = []
        for key, cases in garbage.items():
            lines = worker_lines(daemon, key)
            left += [f"{key}: {case.name}: no log line" for case in cases if not log_line_for(case, lines)]
            seen = set().union(*map(line_kinds, lines))
            left += [f"{key}: no {kind}" for kind in sorted(wanted - seen)]
        return left

    try:
        wait_for(lambda: not missing(), 30, what="every queue's worker has logged its garbage")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nstill: {missing()}") from None

    checked: dict[str, int] = {}
    for path in daemon.log_files():
        for n, line in enumerate(complete_lines(path), 1):
            record = json.loads(line)
            assert record.keys() >= REQUIRED_KEYS, f"{path.name}:{n} {line[:200]}"
            assert len(line.encode()) <= 16 * 1024, f"{path.name}:{n} is {len(line.encode())} bytes"
            for kind in line_kinds(record) | {"any"}:
                checked[kind] = checked.get(kind, 0) + 1
    print(f"checked {checked['any']} lines in {len(daemon.log_files())} files: {dict(sorted(checked.items()))}")
    assert wanted <= checked.keys()


def test_a_worker_thread_that_dies_is_logged_with_its_exception() -> None:
    """Before, a foreign queue_name killed a worker thread and the log hook itself failed on it."""
    script = """
import io, json, threading
from nietest_daemon.core import logs
out = io.StringIO()
logs.configure("probe", stream=out, capture_std=False)
thread = threading.Thread(target=lambda: {}["nietest_elsewhere"], name="worker-thread-3")
thread.start()
thread.join()
print(out.getvalue())
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "Exception in threading.excepthook" not in result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0]["event"] == "unhandled exception in thread" and lines[0]["thread_name"] == "worker-thread-3"
    assert lines[0]["exception"][0]["exc_type"] == "KeyError"
    assert "nietest_elsewhere" in lines[0]["exception"][0]["exc_value"]
