"""`mpqueue.shared`'s objects in the broker: who holds what, who waits, and
what a holder's end releases (`objects.SharedObjects` through `BrokerState`)."""

from __future__ import annotations

import pytest

from mpqueue.objects import Deleted
from mpqueue.protocol import Options, Status
from mpqueue.state import PARKED

from .harness import Harness


def client(session: str = "c", thread: int = 1) -> tuple:
    return ("client", session, thread)


def call(h: Harness, who: tuple, name: str, op: str, *args, wait: float = 0.0, reply=None, now: float = 0.0):
    generation = h.state.shared_open(name, KINDS[name][0], KINDS[name][1])
    result = h.state.shared_call(who, name, generation, op, args, reply, wait, now)
    h.settle()
    return result


KINDS = {"lock": ("lock", ()), "rlock": ("rlock", ()), "sem": ("semaphore", (2,)), "q": ("queue", (1,)),
         "q2": ("queue", (0,)), "ev": ("event", ()), "n": ("counter", ()), "d": ("dict", ()),
         "v": ("value", (b"none",))}


def answers(h: Harness) -> list:
    return [(reply, answer) for reply, answer in h.effects.answers]


def test_a_held_lock_parks_the_next_caller_until_released_first_come_first(h):
    assert call(h, client("c", 1), "lock", "acquire") == (True, True)
    assert call(h, client("c", 2), "lock", "acquire", wait=2, reply="r2") is PARKED
    assert call(h, client("c", 3), "lock", "acquire", wait=2, reply="r3") is PARKED
    call(h, client("c", 1), "lock", "release")
    assert answers(h) == [("r2", ("#RETURN", (True, True)))]
    assert call(h, client("c", 1), "lock", "locked") == (True, True)


def test_a_parked_call_whose_wait_ends_is_answered_not_yet(h):
    call(h, client(), "lock", "acquire")
    assert call(h, client("x"), "lock", "acquire", wait=5, reply="r") is PARKED
    assert h.state.next_deadline() == 2.0       # the broker's wait slice: the caller asks again
    h.state.expire(2.0)
    h.settle()
    assert answers(h) == [("r", ("#RETURN", (False, None)))]


def test_releasing_an_unheld_lock_or_another_groups_is_an_error(h):
    with pytest.raises(RuntimeError, match="release unlocked lock"):
        call(h, client(), "lock", "release")
    call(h, client("a"), "lock", "acquire")
    with pytest.raises(RuntimeError, match="held by another client"):
        call(h, client("b"), "lock", "release")
    call(h, client("a", thread=9), "lock", "release")     # any thread of the holder may


def test_an_rlock_is_reentrant_for_its_thread_only(h):
    assert call(h, client("c", 1), "rlock", "acquire") == (True, True)
    assert call(h, client("c", 1), "rlock", "acquire") == (True, True)
    assert call(h, client("c", 2), "rlock", "acquire") == (False, None)
    with pytest.raises(RuntimeError, match="un-acquired"):
        call(h, client("c", 2), "rlock", "release")
    call(h, client("c", 1), "rlock", "release")
    assert call(h, client("c", 2), "rlock", "acquire") == (False, None)
    call(h, client("c", 1), "rlock", "release")
    assert call(h, client("c", 2), "rlock", "acquire") == (True, True)


def test_a_semaphore_is_bounded(h):
    assert call(h, client("a"), "sem", "acquire")[0]
    assert call(h, client("b"), "sem", "acquire")[0]
    assert call(h, client("c"), "sem", "acquire") == (False, None)
    with pytest.raises(ValueError, match="released too many times"):
        call(h, client("c"), "sem", "release")
    call(h, client("a"), "sem", "release")
    assert call(h, client("c"), "sem", "acquire")[0]


def running_job(h: Harness) -> int:
    h.client()
    h.worker()
    h.submit(Options())
    task, = h.fetch()
    return task.id


def test_a_jobs_attempt_ending_any_way_releases_its_locks_and_drops_its_waiters(h):
    job = running_job(h)
    who = ("job", job, 1, 1)
    assert call(h, who, "lock", "acquire") == (True, True)
    assert call(h, who, "sem", "acquire")[0]
    assert call(h, client("c", 5), "lock", "acquire", wait=2, reply="next") is PARKED
    h.report(job, Status.LOST, b"died")         # its process died (retried: a death)
    assert ("next", ("#RETURN", (True, True))) in answers(h)
    assert call(h, client("x"), "sem", "value") == (True, 2)
    with pytest.raises(RuntimeError, match=f"job {job} attempt 1 is over"):
        call(h, who, "lock", "locked")      # that attempt, cut off but alive, is refused


def test_a_presumed_lost_workers_jobs_lose_their_locks(h):
    job = running_job(h)
    call(h, ("job", job, 1, 1), "lock", "acquire")
    h.state.expire(11.0)    # silent past the heartbeat timeout
    h.state.tick(11.0)
    h.settle()
    assert call(h, client("x"), "lock", "acquire") == (True, True)


def test_a_blocked_get_on_a_closed_connection_takes_nothing(h):
    h.state.connected("p")
    assert call(h, client("p"), "q", "get", wait=2, reply="dead") is PARKED
    h.state.connection_closed("p", "dead", 0.0)
    h.settle()
    assert call(h, client("c"), "q", "put", b"item") == (True, None)
    assert answers(h) == []
    assert call(h, client("c"), "q", "get") == (True, b"item")


def test_a_full_queue_parks_put_until_a_get_makes_room(h):
    call(h, client(), "q", "put", b"1")
    assert call(h, client("p"), "q", "put", b"2", wait=2, reply="putter") is PARKED
    assert call(h, client("g"), "q", "get") == (True, b"1")
    assert answers(h) == [("putter", ("#RETURN", (True, None)))]
    assert call(h, client("g"), "q", "get") == (True, b"2")


def test_an_event_wakes_every_waiter(h):
    for i in range(3):
        assert call(h, client(f"w{i}"), "ev", "wait", wait=2, reply=i) is PARKED
    call(h, client(), "ev", "set")
    assert sorted(r for r, _ in answers(h)) == [0, 1, 2]
    assert call(h, client(), "ev", "wait") == (True, True)


def test_counter_dict_value(h):
    assert [call(h, client(), "n", "add", 1)[1] for _ in range(3)] == [1, 2, 3]
    call(h, client(), "d", "set", b"k", b"v")
    assert call(h, client(), "d", "get", b"k") == (True, (True, b"v"))
    assert call(h, client(), "d", "pop", b"nope") == (True, (False, None))
    assert call(h, client(), "v", "cas", b"none", b"5") == (True, True)
    assert call(h, client(), "v", "cas", b"none", b"6") == (True, False)


def test_one_name_one_kind_and_a_deleted_name_fails_its_handles_and_waiters(h):
    generation = h.state.shared_open("x", "queue", (2,))
    with pytest.raises(ValueError, match=r"'x' is a Queue\(maxsize=2\), not a Semaphore\(3\)"):
        h.state.shared_open("x", "semaphore", (3,))
    assert h.state.shared_call(client(), "x", generation, "get", (), "waiting", 2, 0.0) is PARKED
    assert h.state.shared.delete("x")
    h.settle()
    (reply, (kind, error)), = answers(h)
    assert reply == "waiting" and kind == "#ERROR" and isinstance(error, Deleted)
    with pytest.raises(Deleted, match="was deleted"):
        h.state.shared_call(client(), "x", generation, "qsize", (), None, 0, 0.0)
    assert h.state.shared_open("x", "semaphore", (3,)) != generation     # a new one may take the name


def test_a_journal_gets_each_changed_object_whole_and_a_restore_releases_holders_not_back():
    h = Harness(durable=True)
    call(h, client("gone"), "lock", "acquire")
    rows = [args for name, args in h.effects.journal if name == "shared"]
    assert rows and rows[-1][0]["lock"][4] == {("client:gone", 1): 1}
    call(h, client(), "n", "add", 5)
    saved = {name: h.state.shared.snapshot(name) for name in ("lock", "n")}

    again = Harness(durable=True)
    again.state.restore({"id": "j", "next_id": 1, "functions": {}, "clients": {}, "jobs": [], "results": [],
                         "shared": saved}, now=0.0, wall=0.0)
    assert call(again, client(), "n", "get") == (True, 5)
    assert call(again, client("x"), "lock", "acquire") == (False, None)     # still held: its holder may come back
    again.state.expire(10.0)
    again.settle()
    assert call(again, client("x"), "lock", "acquire") == (True, True)


def test_an_attempt_cut_off_and_back_is_refused_after_losing_its_locks(h):
    """A worker presumed lost (silent), its job's lock released and taken by
    another: when that worker rejoins still running the job, the job's calls
    are refused, so two never run inside the lock at once."""
    job = running_job(h)
    call(h, ("job", job, 1, 1), "lock", "acquire")
    h.state.tick(11.0)      # silent past the heartbeat timeout: presumed lost
    h.settle()
    assert call(h, client("x"), "lock", "acquire") == (True, True)
    h.worker(now=12.0, broker_id="b1", running=(job,))      # it rejoins, still running the job
    with pytest.raises(RuntimeError, match="is over for the broker"):
        call(h, ("job", job, 1, 1), "lock", "release")


def test_a_queue_item_got_by_a_job_that_dies_goes_back_first_in_line(h):
    job = running_job(h)
    for item in (b"1", b"2"):
        call(h, client(), "q2", "put", item)
    assert call(h, ("job", job, 1, 1), "q2", "get") == (True, b"1")
    h.report(job, Status.LOST, b"died")
    assert call(h, client(), "q2", "get") == (True, b"1")


def test_a_queue_item_is_the_getters_once_it_calls_again_or_ends_well(h):
    job = running_job(h)
    for item in (b"1", b"2", b"3"):
        call(h, client(), "q2", "put", item)
    assert call(h, ("job", job, 1, 1), "q2", "get") == (True, b"1")
    h.report(job, Status.ERROR, b"raised")      # its code ran to its end
    assert call(h, client("c2"), "q2", "get") == (True, b"2")
    call(h, client("c2"), "q2", "len")          # it called again: it has item 2
    h.state.shared.group_ended("client:c2", failed=True)
    assert call(h, client(), "q2", "get") == (True, b"3")


def test_every_change_reaches_the_journal():
    h = Harness(durable=True)
    call(h, client(), "ev", "set")
    call(h, client(), "ev", "clear")
    assert [args[0]["ev"][3] for name, args in h.effects.journal if name == "shared"] == [False]
    call(h, client(), "rlock", "acquire")
    call(h, client(), "rlock", "acquire")
    assert [args[0]["rlock"][4] for name, args in h.effects.journal if name == "shared"] == [
        {("client:c", 1): 2}]
