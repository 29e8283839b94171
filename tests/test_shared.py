"""`mpqueue.shared` on real clusters: two workers, jobs that die, a broker killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import cloudpickle
import pytest

from helpers import eventually, logs, read_line, wait_for_file
from mpqueue import BrokerUnavailable, PayloadTooLarge, shared

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture
def two(cluster):
    """A broker, two workers of two processes, and a client."""
    cluster.start_worker(2)
    cluster.start_worker(2)
    cluster.c = cluster.client()
    return cluster


def add_one(_):
    return shared.Counter("items").add(1)


def test_a_counter_added_to_by_1000_jobs_counts_each_once(two):
    results = list(two.c.map(add_one, range(1000)))
    assert sorted(results) == list(range(1, 1001))
    assert shared.Counter("items").value == 1000


def write_back(i):
    shared.Dict("partials")[f"k{i}"] = [i, i * i]
    shared.List("log").append(i)
    return i


def test_a_dict_and_a_list_written_by_jobs_are_read_back_by_the_client(two):
    list(two.c.map(write_back, range(50)))
    d, log = shared.Dict("partials"), shared.List("log")
    assert len(d) == 50 and d["k7"] == [7, 49] and d.get("nope", "x") == "x" and "k3" in d
    assert sorted(log) == list(range(50)) and len(log) == 50
    assert sorted(d.keys()) == sorted(f"k{i}" for i in range(50))
    status = two.status()
    assert {(o["name"], o["kind"]) for o in status["shared"]} == {("partials", "dict"), ("log", "list")}
    assert all(o["size"] > 0 for o in status["shared"])
    assert "2 shared object(s)" in two.run("status", two.address).stdout


def guarded(i, limit):
    with shared.Semaphore("api", limit):
        start = time.monotonic()
        time.sleep(0.2)
        shared.List("spans").append((start, time.monotonic()))
    return i


def test_a_semaphore_of_2_never_lets_a_third_job_in(two):
    list(two.c.map(guarded, range(12), [2] * 12))
    spans = shared.List("spans").copy()
    assert len(spans) == 12
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    inside = peak = 0
    for _, step in events:
        inside += step
        peak = max(peak, inside)
    assert peak == 2, spans     # four processes ask; two at a time get in


def take_lock_and_die(_):
    shared.Lock("file").acquire()
    os.kill(os.getpid(), signal.SIGKILL)


def take_lock(_):
    with shared.Lock("file") as got:
        return got


def test_a_lock_held_by_a_job_that_kills_itself_goes_to_the_next_job(two):
    dying = two.c.options(retries=0).submit(take_lock_and_die, 0)
    eventually(lambda: dying.done(), "the dying job to end", timeout=60)
    started = time.monotonic()
    assert two.c.submit(take_lock, 0).result(30) is True
    assert time.monotonic() - started < 10
    assert not shared.Lock("file").locked()


def hold_past_timeout(_):
    shared.Lock("slow").acquire()
    time.sleep(60)


def test_a_lock_held_by_a_job_killed_at_its_timeout_is_released(two):
    with pytest.raises(TimeoutError):
        two.c.options(timeout=1).submit(hold_past_timeout, 0).result(30)
    assert shared.Lock("slow").acquire(timeout=10)


def forget_to_release(_):
    shared.Lock("forgotten").acquire()
    return "done"


def test_a_lock_a_job_forgot_to_release_is_released_when_it_ends(two):
    assert two.c.submit(forget_to_release, 0).result(30) == "done"
    assert shared.Lock("forgotten").acquire(timeout=10)


def wait_for_go(_):
    return shared.Event("go").wait(30)


def test_an_event_set_by_the_client_releases_the_jobs_waiting_on_it(two):
    futures = [two.c.submit(wait_for_go, i) for i in range(3)]
    eventually(lambda: two.status()["running"] == 3, "the jobs to wait")
    assert not any(f.done() for f in futures)
    shared.Event("go").set()
    assert [f.result(10) for f in futures] == [True, True, True]


def consume(_):
    return shared.Queue("work").get()


def test_a_consumer_force_cancelled_while_blocked_in_get_takes_no_item(two):
    blocked = two.c.submit(consume, 0)
    eventually(lambda: two.status()["running"] == 1, "the consumer to block")
    time.sleep(0.5)     # its get is parked at the broker
    assert two.c.cancel(blocked, force=True)
    q = shared.Queue("work")
    q.put("item")
    assert q.qsize() == 1
    assert two.c.submit(consume, 1).result(30) == "item"


def test_handles_travel_to_jobs_and_bad_input_is_a_clear_error(two):
    counter = shared.Counter("passed")
    assert two.c.submit(lambda c: c.add(5), counter).result(30) == 5
    d = shared.Dict("bad")
    with pytest.raises(Exception, match="cannot store"):
        d["lock"] = threading.Lock()
    assert len(d) == 0
    for name in ("", "x" * 201, 7):
        with pytest.raises(ValueError, match="non-empty string"):
            shared.Counter(name)
    with pytest.raises(ValueError, match=r"'passed' is a Counter, not a Queue\(maxsize=0\)"):
        shared.Queue("passed")
    shared.delete("bad")
    with pytest.raises(KeyError, match="'bad' was deleted"):
        len(d)


def test_a_value_over_the_limit_is_refused(empty):
    empty.start_broker(env={"MPQUEUE_MAX_PAYLOAD": str(1 << 20)})
    client = empty.client()
    value = shared.Value("big", client=client)
    with pytest.raises(PayloadTooLarge):
        value.set(os.urandom(2 << 20))
    assert value.get() is None


def test_without_a_client_or_address_it_says_how_to_choose(isolated):
    with pytest.raises(Exception, match="open a Client, pass client=, or set MPQUEUE_ADDRESS"):
        shared.Counter("nowhere")


def test_a_lone_address_connection_releases_its_locks_when_it_closes(cluster, monkeypatch):
    cluster.start_worker(1)
    monkeypatch.setenv("MPQUEUE_ADDRESS", cluster.address)
    script = (f"import time\nfrom mpqueue import shared\nshared.Lock('lone').acquire()\n"
              f"open({str(cluster.tmp_path / 'held')!r}, 'w').close()\ntime.sleep(60)\n")
    holder = cluster.popen([sys.executable, "-c", script], "holder")
    wait_for_file(cluster.tmp_path / "held")
    client = cluster.client()
    assert not shared.Lock("lone", client=client).acquire(timeout=0.5)
    holder.kill()
    assert shared.Lock("lone", client=client).acquire(timeout=10)


# -- with a journal ----------------------------------------------------------------


def test_values_and_a_held_lock_survive_a_kill_9_of_a_journal_broker(empty):
    journal = empty.tmp_path / "journal.db"
    empty.start_broker("--journal", str(journal))
    client = empty.client(reconnect_timeout=30)
    shared.Counter("n", client=client).add(41)
    shared.Dict("d", client=client)["k"] = {"v": 1}
    shared.List("l", client=client).extend([1, 2])
    shared.Value("v", client=client).set("best")
    q = shared.Queue("q", client=client)
    q.put("a")
    q.put("b")
    assert shared.Lock("held", client=client).acquire()
    port = empty.address.rsplit(":", 1)[1]
    empty.broker.kill()
    empty.broker.wait(10)
    empty.start_broker("--journal", str(journal), "--port", port)
    eventually(lambda: _alive(client), "the client to reconnect", timeout=30)
    assert shared.Counter("n", client=client).add(1) == 42
    assert shared.Dict("d", client=client)["k"] == {"v": 1}
    assert shared.List("l", client=client).copy() == [1, 2]
    assert shared.Value("v", client=client).get() == "best"
    assert shared.Queue("q", client=client).get(timeout=5) == "a"
    # The lock's holder (this client) came back: it holds it still.
    assert shared.Lock("held", client=client).locked()
    shared.Lock("held", client=client).release()


def _alive(client) -> bool:
    try:
        client.submit(abs, -1)
        return True
    except BrokerUnavailable:
        return False


HOLDER = """
import sys, time
from mpqueue import Client, shared
with Client(sys.argv[1]) as client:
    shared.Lock("theirs", client=client).acquire()
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_lock_whose_holder_does_not_come_back_after_a_restart_is_released(empty):
    """Killed with the broker, its holder never reconnects: once the restarted
    broker has waited max(heartbeat timeout, client grace), the lock is free."""
    fast = {"MPQUEUE_HEARTBEAT_TIMEOUT": "2", "MPQUEUE_CLIENT_GRACE": "1"}
    journal = empty.tmp_path / "journal.db"
    empty.start_broker("--journal", str(journal), env=fast)
    holder = empty.popen([sys.executable, "-c", HOLDER, empty.address], "holder", stdout=subprocess.PIPE)
    assert read_line(holder.stdout, 30).strip() == "held"
    port = empty.address.rsplit(":", 1)[1]
    empty.broker.kill()
    holder.kill()
    empty.broker.wait(10)
    empty.start_broker("--journal", str(journal), "--port", port, env=fast)
    client = empty.client()
    lock = shared.Lock("theirs", client=client)
    assert lock.locked()        # its holder may still come back
    assert lock.acquire(timeout=15)
    assert "releasing the shared locks of client:" in logs(empty.broker)
