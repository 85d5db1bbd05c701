"""`nietest status` without a task id: each lane's owners and their tasks with their shares of the
job slots (programs/overview.py), against a private valkey-server."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis

from nietest_daemon.coordination.scheduler import Scheduler
from nietest_daemon.core.settings import FairShare
from nietest_daemon.programs.overview import render, slot_report
from nietest_daemon.testing.valkey import PrivateValkey


@pytest.fixture
def client(valkey: PrivateValkey) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(valkey.url)
    yield c
    c.close()


def report_of(slots: dict) -> dict:
    return {
        "broker": "b",
        "store": "s",
        "daemon": {"running": True, "pid": 1},
        "processes": [],
        "queues": {},
        "slots": slots,
    }


def test_status_shows_each_owner_and_each_of_its_tasks(client: redis.Redis) -> None:
    s = Scheduler(client, "standard", cap=4, lease_seconds=60)
    s.add("a1", [f"a1:{i}" for i in range(10)], 3, owner="alice", owner_weight=2)
    s.add("b1", [f"b1:{i}" for i in range(10)], owner="bob")
    s.add("b0", ["b0:0"], owner="bob")
    s.admit()  # alice, bob (b0, whose line runs dry), alice, alice: ties go to the first by name
    lane = slot_report(s, {"b0": "bob"})  # the broker forgot b0's owner: the store names it
    assert (lane["in_use"], lane["cap"], lane["waiting"], lane["fair_share"]) == (4, 4, 17, "owner")
    alice, bob = lane["owners"]
    assert (alice["owner"], alice["weight"], alice["holding"], alice["waiting"], alice["share"]) == (
        "alice",
        2.0,
        3,
        7,
        0.75,
    )
    assert (bob["owner"], bob["holding"], bob["share"]) == ("bob", 1, 0.25)
    assert [(t["task_id"], t["owner"], t["active"]) for t in bob["tasks"]] == [
        ("b0", "bob", False),
        ("b1", "bob", True),
    ]
    assert {t["task_id"]: t["priority"] for t in lane["tasks"]} == {"a1": 3, "b1": 1, "b0": 1}
    json.dumps(lane)  # as `nietest status --json` prints it
    text = render(report_of({"standard": lane}))
    assert "owner alice" in text and "weight     2" in text and "share 75%" in text
    assert "    task a1" in text  # a task under its owner


def test_owner_names_are_shown_on_one_line_and_task_mode_lists_tasks_only(client: redis.Redis) -> None:
    s = Scheduler(client, "standard", cap=1, lease_seconds=60)
    s.add("t1", ["t1:0", "t1:1"], owner="eve\n\u202eevil")
    text = render(report_of({"standard": slot_report(s)}))
    assert "eve\\n\\u202eevil" in text and "\u202e" not in text
    s.cancel("t1")
    s.add("t1", ["t1:0"])
    text = render(report_of({"standard": slot_report(s, fair_share=FairShare.TASK)}))
    assert "owner" not in text and "\n  task t1" in text
