"""Fair admission (coordination/scheduler.py) against a real valkey-server: caps, weighted
round-robin across owners and within an owner across tasks, giving a place back, cancel, leases.
Deterministic clocks throughout."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator

import pytest
import redis

from nietest_daemon.coordination import keys, streaks
from nietest_daemon.coordination.connection import as_text, run_scripts
from nietest_daemon.coordination.scheduler import RESEND_AFTER_SECONDS, Scheduler, TaskShare
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


def owner_of(subtask_id: str) -> str:
    """Tests name tasks `<owner>-<n>`."""
    return task_of(subtask_id).split("-", 1)[0]


def per_owner(admitted: Counter[str]) -> Counter[str]:
    by_owner: Counter[str] = Counter()
    for task, n in admitted.items():
        by_owner[owner_of(task)] += n
    return by_owner


def sched_keys(client: redis.Redis) -> list[str]:
    return sorted(as_text(k) for k in client.keys(f"{keys.SCHED_PREFIX}:*"))


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
    assert s.hold("t:0")  # its run starts
    clock.now += 29
    s.renew("t:0")
    clock.now += 29
    assert s.admit() == []  # renewed: still held
    clock.now += 2
    assert s.admit() == ["t:1"]  # t:0's holder died without releasing
    assert s.hold("t:0") is False  # its late run finds no free slot


def test_an_admission_whose_run_never_starts_is_handed_out_again_once_per_period(client: redis.Redis) -> None:
    """The sender died (or the admit's reply was lost) before the run message went out: after
    RESEND_AFTER_SECONDS the next admit, from any process, asks for its run message again."""
    clock = Clock()
    mine = Scheduler(client, "standard", cap=2, lease_seconds=120, host="h1", clock=clock)
    other = Scheduler(client, "standard", cap=2, lease_seconds=120, host="h2", clock=clock)
    mine.add("t", ids("t", 3))
    assert mine.admit() == ["t:0", "t:1"]
    assert mine.hold("t:0")  # t:0's run started; t:1's message never went out
    assert mine.not_started() == 1
    clock.now += RESEND_AFTER_SECONDS - 1
    assert other.admit() == []
    clock.now += 2
    assert other.admit() == ["t:1"]  # sent again, by whoever admits next
    assert as_text(client.hget(keys.sched_admitter("standard"), "t:1")) == "h2"
    assert other.admit() == []  # not again before another period
    assert other.hold("t:1") and other.not_started() == 0  # the copy ran
    clock.now += RESEND_AFTER_SECONDS + 1
    assert other.admit() == []


def test_a_lapsed_admission_is_forgotten_and_its_slot_admitted_to_the_next(client: redis.Redis) -> None:
    clock = Clock()
    s = Scheduler(client, "standard", cap=1, lease_seconds=60, clock=clock)
    s.add("t", ids("t", 2))
    assert s.admit() == ["t:0"]
    clock.now += 61  # t:0's lease ran out before its run started (the sweep's repair puts it back)
    assert s.admit() == ["t:1"]
    assert s.not_started() == 1  # t:1 only


def test_a_takeover_takes_the_lost_hosts_admissions_that_never_started(client: redis.Redis) -> None:
    clock = Clock()
    lost = Scheduler(client, "standard", cap=4, lease_seconds=120, host="h3", clock=clock)
    taker = Scheduler(client, "standard", cap=4, lease_seconds=120, host="h1", clock=clock)
    lost.add("t", ids("t", 2))
    taker.add("u", ids("u", 2))
    assert sorted(lost.admit(limit=2)) == ["t:0", "u:0"]
    assert sorted(taker.admit()) == ["t:1", "u:1"]
    assert lost.hold("u:0")  # started: not the lost host's to send any more
    assert taker.take_admissions("h3") == ["t:0"]
    assert taker.take_admissions("h3") == []  # now h1's
    assert taker.take_admissions("h1") == ["t:0", "t:1", "u:1"]


def test_release_and_cancel_forget_admissions(client: redis.Redis) -> None:
    s = Scheduler(client, "standard", cap=4, lease_seconds=60, host="h1", clock=Clock())
    s.add("t", ids("t", 2))
    s.add("u", ids("u", 1))
    assert s.admit() == ["t:0", "u:0", "t:1"]
    s.release("u:0")  # a run that found its subtask ended
    assert s.not_started() == 2
    s.cancel("t")
    assert s.not_started() == 0 and client.hlen(keys.sched_admitter("standard")) == 0


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


# --- owners ----------------------------------------------------------------------------------------


def test_an_owner_with_one_task_gets_half_against_an_owner_with_ten(client: redis.Redis) -> None:
    s = Scheduler(client, "standard", cap=10, lease_seconds=60, clock=Clock())
    for n in range(10):
        s.add(f"a-{n}", ids(f"a-{n}", 300), owner="a")
    s.add("b-0", ids("b-0", 3000), owner="b")
    admitted = run_steady(s, 1000)
    by_owner = per_owner(admitted)
    assert abs(by_owner["b"] - by_owner["a"]) <= 1, by_owner
    a_tasks = [admitted[f"a-{n}"] for n in range(10)]
    assert max(a_tasks) - min(a_tasks) <= 1, admitted  # a's half, in turn between its ten tasks


def test_owner_weights_give_proportional_shares(client: redis.Redis) -> None:
    s = Scheduler(client, "standard", cap=10, lease_seconds=60, clock=Clock())
    s.add("a-0", ids("a-0", 3000), owner="a", owner_weight=2.0)
    s.add("a-1", ids("a-1", 3000), owner="a", owner_weight=2.0)
    s.add("b-0", ids("b-0", 3000), owner="b", owner_weight=1.0)
    s.add("c-0", ids("c-0", 3000), owner="c", owner_weight=0.5)
    admitted = run_steady(s, 700)
    by_owner = per_owner(admitted)
    assert by_owner["a"] / by_owner["b"] == pytest.approx(2.0, rel=0.02), by_owner
    assert by_owner["b"] / by_owner["c"] == pytest.approx(2.0, rel=0.02), by_owner


def test_within_an_owner_priorities_still_share_its_slots(client: redis.Redis) -> None:
    s = Scheduler(client, "standard", cap=10, lease_seconds=60, clock=Clock())
    s.add("a-p3", ids("a-p3", 3000), weight=3, owner="a")
    s.add("a-p1", ids("a-p1", 3000), weight=1, owner="a")
    s.add("b-0", ids("b-0", 3000), owner="b")
    admitted = run_steady(s, 800)
    assert admitted["a-p3"] / admitted["a-p1"] == pytest.approx(3.0, rel=0.02), admitted
    assert admitted["a-p3"] + admitted["a-p1"] == pytest.approx(admitted["b-0"], abs=1), admitted


def test_task_mode_is_the_per_task_round_robin(client: redis.Redis) -> None:
    """NIETEST_FAIR_SHARE=task: every task under the pseudo-owner "" (`admission.owner_of`), so
    eleven equal tasks take one turn each, whoever submitted them."""
    from nietest_daemon.core.settings import FairShare, load
    from nietest_daemon.pipeline.admission import owner_of as admission_owner_of

    task_mode = load({"NIETEST_FAIR_SHARE": "task", "NIETEST_OWNER_WEIGHTS": "a=5"})
    assert task_mode.fair_share is FairShare.TASK
    assert admission_owner_of(task_mode, {"owner": "a"}) == ("", 1.0)
    owner_mode = load({"NIETEST_OWNER_WEIGHTS": "a=5"})
    assert admission_owner_of(owner_mode, {"owner": "a"}) == ("a", 5.0)
    assert admission_owner_of(owner_mode, {"owner": "b"}) == ("b", 1.0)
    assert admission_owner_of(owner_mode, {"owner": None}) == ("", 1.0)  # stored before owners
    assert admission_owner_of(owner_mode, {}) == ("", 1.0)

    s = Scheduler(client, "standard", cap=11, lease_seconds=60, clock=Clock())
    tasks = [f"a-{n}" for n in range(10)] + ["b-0"]
    for task in tasks:
        owner, owner_weight = admission_owner_of(task_mode, {"owner": owner_of(task)})
        s.add(task, ids(task, 100), owner=owner, owner_weight=owner_weight)
    admitted = run_steady(s, 550)
    assert set(admitted) == set(tasks)
    assert max(admitted.values()) - min(admitted.values()) <= 1, admitted
    assert [o.owner for o in s.owner_shares()] == [""]


def test_an_owner_arriving_late_starts_at_the_clock(client: redis.Redis) -> None:
    s = Scheduler(client, "standard", cap=1, lease_seconds=60, clock=Clock())
    s.add("a-0", ids("a-0", 200), owner="a")
    order = s.admit()
    for _ in range(50):  # "a" builds up 50 turns of pass while alone
        order = s.release(order[0])
    s.add("b-0", ids("b-0", 200), owner="b")
    turns = []
    for _ in range(20):
        order = s.release(order[0])
        turns += [owner_of(i) for i in order]
    assert turns[:2] in (["a", "b"], ["b", "a"]) and Counter(turns) == {"a": 10, "b": 10}, turns  # no burst
    # a task arriving late at an active owner starts at that owner's clock: in turn with its sibling
    s.add("b-1", ids("b-1", 200), owner="b")
    b_tasks = []
    for _ in range(20):
        order = s.release(order[0])
        b_tasks += [task_of(i) for i in order if owner_of(i) == "b"]
    assert Counter(b_tasks) == {"b-0": 5, "b-1": 5}, b_tasks


def test_every_key_goes_once_the_tasks_drain_or_are_cancelled(client: redis.Redis) -> None:
    s = Scheduler(client, "standard", cap=3, lease_seconds=60, clock=Clock())
    s.add("a-0", ids("a-0", 4), owner="a", owner_weight=2)
    s.add("a-1", ids("a-1", 50), owner="a", owner_weight=2)
    s.add("b-0", ids("b-0", 50), owner="b")
    s.add("c-0", ids("c-0", 2), owner="c")
    held = s.admit()
    assert s.cancel("a-1")[0] > 0 and s.cancel("b-0")[0] > 0
    assert {o.owner for o in s.owner_shares() if o.active} == {"a", "c"}
    while held:
        held = held[1:] + s.release(held[0])
    assert s.active_tasks() == [] and s.owner_shares() == [] and s.waiting() == 0
    assert sched_keys(client) == []
    assert client.zcard(keys.slot_holders("standard")) == 0
    # and the lane starts afresh: a new owner at pass 0
    s.add("d-0", ids("d-0", 1), owner="d")
    assert client.zscore(keys.sched_owners("standard"), "d") == 0.0
    assert s.cancel("d-0") == (1, 0) and sched_keys(client) == []


def test_an_add_under_another_owner_moves_the_task(client: redis.Redis) -> None:
    s = Scheduler(client, "standard", cap=1, lease_seconds=60, clock=Clock())
    s.add("t-0", ids("t-0", 5), owner="alice", owner_weight=2)
    s.add("u-0", ids("u-0", 5), owner="bob")
    assert s.admit() == ["t-0:0"]
    assert s.replace("t-0", ids("t-0", 5), owner="", owner_weight=1.0) == 4  # a reload in task mode
    by_owner = {o.owner: o for o in s.owner_shares()}
    assert set(by_owner) == {"", "bob"} and [t.task_id for t in by_owner[""].tasks] == ["t-0"]
    assert by_owner[""].weight == 1.0 and by_owner[""].tasks[0].holding == 1
    assert not client.exists(keys.sched_owner_tasks("standard", "alice"))
    assert client.hget(keys.sched_owner_weights("standard"), "alice") is None
    s.add("u-0", [], owner="bob", owner_weight=3)  # the weight is recorded again on every add
    assert {o.owner: o.weight for o in s.owner_shares()}["bob"] == 3.0


def test_owner_shares_show_weight_waiting_and_holding(client: redis.Redis) -> None:
    s = Scheduler(client, "standard", cap=4, lease_seconds=60, clock=Clock())
    s.add("a-0", ids("a-0", 1), weight=2, owner="a", owner_weight=2)
    s.add("a-1", ids("a-1", 10), owner="a", owner_weight=2)
    s.add("b-0", ids("b-0", 10), owner="b")
    s.admit()
    by_task = {share.task_id: share for share in s.shares()}
    assert by_task["a-0"] == TaskShare("a-0", 1, 0, 1, "", active=False)  # its line ran dry: owner forgotten
    assert by_task["a-1"].owner == "a" and by_task["b-0"].owner == "b"
    owners = {o.owner: o for o in s.owner_shares({"a-0": "a"})}  # the caller names the rest (the store)
    assert set(owners) == {"a", "b"} and owners["a"].weight == 2.0 and owners["b"].weight == 1.0
    # weight 2 against 1, ties to the first by name: a, b, a, a
    assert (owners["a"].holding, owners["b"].holding) == (3, 1)
    assert (owners["a"].ready, owners["b"].ready) == (8, 9)
    assert {t.task_id for t in owners["a"].tasks} == {"a-0", "a-1"}


def test_a_ready_list_of_an_older_version_is_not_counted_as_waiting(client: redis.Redis) -> None:
    """Upgraded mid-campaign: the ready list is there, the owner sets are not. Only an active task's
    list counts (so `admission.repair` puts it back in line); the retired keys go."""
    client.rpush(keys.sched_ready("standard", "old"), *ids("old", 5))
    client.zadd(keys.sched_tasks("standard"), {"old": 3.0})
    client.set(keys.sched_clock("standard"), 3.0)
    s = Scheduler(client, "standard", cap=2, lease_seconds=60, clock=Clock())
    assert s.waiting() == 0 and s.shares(["old"]) == [TaskShare("old", 1, 0, 0, "", active=False)]
    assert s.admit() == []
    assert s.drop_retired_keys() == 2
    assert s.replace("old", ids("old", 5), owner="alice") == 5
    assert s.admit() == ["old:0", "old:1"]
