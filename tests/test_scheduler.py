"""Fair admission (coordination/scheduler.py) against a real valkey-server: caps, weighted
round-robin across tasks, giving a place back, cancel, leases. Deterministic clocks throughout."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator

import pytest
import redis

from nietest_daemon.coordination import keys, streaks
from nietest_daemon.coordination.connection import run_scripts
from nietest_daemon.coordination.scheduler import Scheduler
from nietest_daemon.testing.valkey import PrivateValkey


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def client(valkey: PrivateValkey) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(valkey.url)
    yield c
    c.close()


def ids(task: str, n: int) -> list[str]:
    return [f"{task}:{i}" for i in range(n)]


def task_of(subtask_id: str) -> str:
    return subtask_id.split(":", 1)[0]


def run_steady(s: Scheduler, steps: int) -> Counter[str]:
    """Every step the oldest holder finishes and the freed slot is admitted again: admissions per task."""
    order = s.admit()
    admitted: Counter[str] = Counter(task_of(i) for i in order)
    for _ in range(steps):
        if not order:
            break
        done = order.pop(0)
        nxt = s.release(done)
        order += nxt
        admitted.update(task_of(i) for i in nxt)
    return admitted


def test_admission_fills_the_cap_and_a_release_admits_the_next(client: redis.Redis) -> None:
    s = Scheduler(client, "standard", cap=3, lease_seconds=60, clock=Clock())
    assert s.add("a", ids("a", 5)) == 5
    assert s.admit() == ["a:0", "a:1", "a:2"]
    assert s.admit() == []  # full
    assert (s.in_flight(), s.waiting()) == (3, 2)
    assert s.release("a:1") == ["a:3"]
    assert s.release("a:0") == ["a:4"]
    assert s.release("a:2") == []  # nothing waits
    assert s.active_tasks() == [] and s.waiting() == 0
    assert s.in_flight() == 2


def test_equal_tasks_take_turns_whatever_their_size_and_arrival(client: redis.Redis) -> None:
    s = Scheduler(client, "standard", cap=4, lease_seconds=60, clock=Clock())
    s.add("big", ids("big", 50_000))
    order = s.admit()
    assert order == ids("big", 4)
    s.add("small", ids("small", 3))  # arrives behind a running campaign
    # the next three slots freed go to the small task first, in turn with the big one
    freed = [s.release(order[i]) for i in range(4)]
    assert [task_of(i) for batch in freed for i in batch] == ["small", "big", "small", "big"]
    s.add("other", ids("other", 1000))
    admitted = run_steady(s, 600)
    assert abs(admitted["big"] - admitted["other"]) <= 2, admitted


def test_weights_give_proportional_shares(client: redis.Redis) -> None:
    s = Scheduler(client, "standard", cap=10, lease_seconds=60, clock=Clock())
    s.add("p1", ids("p1", 5000), weight=1)
    s.add("p3", ids("p3", 5000), weight=3)
    admitted = run_steady(s, 4000)
    assert admitted["p3"] / admitted["p1"] == pytest.approx(3.0, rel=0.01), admitted


def test_a_task_that_cannot_use_its_share_leaves_it_to_the_others(client: redis.Redis) -> None:
    s = Scheduler(client, "standard", cap=10, lease_seconds=60, clock=Clock())
    s.add("tail", ids("tail", 2))
    s.add("bulk", ids("bulk", 100))
    admitted = Counter(task_of(i) for i in s.admit())
    assert admitted == {"tail": 2, "bulk": 8}
    assert s.active_tasks() == ["bulk"]


def test_a_task_that_becomes_ready_again_starts_at_the_current_turn(client: redis.Redis) -> None:
    s = Scheduler(client, "standard", cap=1, lease_seconds=60, clock=Clock())
    s.add("long", ids("long", 100))
    order = s.admit()
    for _ in range(50):  # "long" builds up 50 turns of pass while alone
        order = s.release(order[0])
    s.add("late", ids("late", 100))
    admitted = Counter()
    for _ in range(20):
        order = s.release(order[0])
        admitted.update(task_of(i) for i in order)
    assert abs(admitted["late"] - admitted["long"]) <= 2, admitted  # no catch-up burst for either


def test_cancel_drops_a_huge_task_at_once_and_frees_its_slots(client: redis.Redis) -> None:
    s = Scheduler(client, "standard", cap=6, lease_seconds=60, clock=Clock())
    s.add("huge", ids("huge", 50_000))
    s.add("other", ids("other", 10))
    held = s.admit()
    assert Counter(task_of(i) for i in held) == {"huge": 3, "other": 3}
    assert s.cancel("huge") == (50_000 - 3, 3)
    assert not client.exists(keys.sched_ready("standard", "huge"))
    assert s.active_tasks() == ["other"] and s.in_flight() == 3
    assert Counter(task_of(i) for i in s.admit()) == {"other": 3}  # the freed slots go to the others
    assert s.cancel("huge") == (0, 0)  # twice is harmless


def test_a_run_without_a_slot_gives_its_place_back_at_the_front(client: redis.Redis) -> None:
    s = Scheduler(client, "standard", cap=1, lease_seconds=60, clock=Clock())
    s.add("t", ids("t", 3))
    assert s.admit() == ["t:0"]
    assert s.hold("t:0")  # the admitted subtask's run: its own slot, renewed
    assert not s.hold("t:9")  # a redelivered run of a subtask that lost its slot: none free
    s.add("t", ["t:9"], front=True)
    assert s.release("t:0") == ["t:9"]  # first in line again


def test_a_dead_holders_slot_comes_back_when_its_lease_runs_out(client: redis.Redis) -> None:
    clock = Clock()
    s = Scheduler(client, "standard", cap=1, lease_seconds=30, clock=clock)
    s.add("t", ids("t", 2))
    assert s.admit() == ["t:0"]
    clock.now += 29
    s.renew("t:0")
    clock.now += 29
    assert s.admit() == []  # renewed: still held
    clock.now += 2
    assert s.admit() == ["t:1"]  # t:0's holder died without releasing
    assert s.hold("t:0") is False  # its late run finds no free slot


def test_lanes_are_separate(client: redis.Redis) -> None:
    standard = Scheduler(client, "standard", cap=1, lease_seconds=60, clock=Clock())
    lumina = Scheduler(client, "lumina", cap=2, lease_seconds=60, clock=Clock())
    standard.add("t", ["t:s0", "t:s1"])
    lumina.add("t", ["t:l0", "t:l1", "t:l2"])
    assert standard.admit() == ["t:s0"] and lumina.admit() == ["t:l0", "t:l1"]
    assert (standard.waiting(), lumina.waiting()) == (1, 1)


def test_concurrent_admissions_never_exceed_the_cap(client: redis.Redis) -> None:
    cap = 7
    s = Scheduler(client, "standard", cap=cap, lease_seconds=60)
    for t in range(12):
        s.add(f"t{t}", ids(f"t{t}", 40))
    granted: list[str] = []
    lock = threading.Lock()

    def contend() -> None:
        mine = Scheduler(redis.Redis(connection_pool=client.connection_pool), "standard", cap=cap, lease_seconds=60)
        for _ in range(20):
            got = mine.admit(limit=1)
            with lock:
                granted.extend(got)

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(granted) == cap == len(set(granted)) == s.in_flight()
    assert s.waiting() == 12 * 40 - cap


def test_shares_show_weight_waiting_and_holding(client: redis.Redis) -> None:
    s = Scheduler(client, "standard", cap=4, lease_seconds=60, clock=Clock())
    s.add("a", ids("a", 10), weight=3)
    s.add("b", ids("b", 2))
    s.admit()
    by_task = {share.task_id: share for share in s.shares()}
    assert by_task["a"].weight == 3 and by_task["b"].weight == 1
    assert by_task["a"].holding + by_task["b"].holding == 4
    assert by_task["a"].ready + by_task["a"].holding == 10


def test_script_calls_in_one_round_trip_survive_a_script_flush(client: redis.Redis) -> None:
    """run_scripts pipelines EVALSHA; after the server forgets its scripts (a broker restart), each
    call the server answered NOSCRIPT runs again, once, and the others are not repeated."""
    s = Scheduler(client, "standard", cap=2, lease_seconds=60, clock=Clock())
    s.add("a", ids("a", 3))
    assert s.admit() == ["a:0", "a:1"]
    client.script_flush()
    released, streak = run_scripts(
        client, s.release_call("a:0"), streaks.record_outcome_call("q", False, "boom", threshold=5)
    )
    assert s.admitted_ids(released) == ["a:2"]
    assert streak == 1 and streaks.current(client, "q")["failures"] == 1  # recorded once
    client.script_flush()
    held, again = run_scripts(client, s.hold_call("a:1"), s.hold_call("b:9"))
    assert held == 1 and again == 0  # a:1 holds its slot; the cap (a:1, a:2) leaves none for b:9
    assert s.in_flight() == 2
