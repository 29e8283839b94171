"""Queue, leases, deaths and retries: the rules, with a fake clock."""

from __future__ import annotations

import pytest

from mpqueue.protocol import Failure, Options, Status, Submission
from mpqueue.state import PARKED, max_deaths

from .harness import SETTINGS, Harness


def test_priorities_first_then_submission_order(h):
    h.worker()
    h.submit(Options(priority=0), Options(priority=5), Options(priority=0), Options(priority=9))
    order = [t.id for t in h.fetch(n=1)] + [t.id for t in h.fetch(n=1)] + [t.id for t in h.fetch(n=2)]
    assert order == [103, 101, 100, 102]


def test_a_requeued_job_keeps_its_place_among_its_priority(h):
    h.worker("w1")
    h.submit(Options(), Options())
    (first,) = h.fetch("w1", n=1)
    h.worker("w2")
    h.state.unregister("w1", 1.0)       # a clean stop: it goes back, charged nothing
    h.settle()
    h.submit(Options())
    assert [t.id for t in h.fetch("w2", n=3, now=1.0)] == [first.id, 101, 102]


def test_a_worker_silent_past_the_heartbeat_timeout_loses_its_jobs_each_charged_a_death(h):
    h.worker("w1", now=0.0)
    h.submit(Options(), Options())
    held = h.fetch("w1", now=0.0)
    assert len(held) == 2
    assert not h.state.tick(SETTINGS.heartbeat_timeout)           # not past it yet
    assert h.state.status(SETTINGS.heartbeat_timeout, 0.0)["workers"]
    h.state.tick(SETTINGS.heartbeat_timeout + 0.1)
    h.settle()
    status = h.state.status(20.0, 0.0)
    assert status["workers"] == [] and status["queued"] == 2
    h.worker("w2", now=20.0)
    again = h.fetch("w2", now=20.0)
    assert [t.attempt for t in again] == [2, 2]
    assert [h.state._jobs[t.id].deaths for t in again] == [1, 1]


def test_a_report_or_a_fetch_counts_as_a_heartbeat(h):
    h.worker("w1", now=0.0)
    h.fetch("w1", now=8.0)
    h.state.report("w1", [], (0, []), 16.0)
    h.state.tick(25.0)
    assert len(h.state.status(25.0, 0.0)["workers"]) == 1


@pytest.mark.parametrize("retries", [0, 2, 5])
def test_a_job_fails_with_worker_lost_after_max_3_or_retries_plus_1_deaths(h, retries):
    deaths = max(3, retries + 1)
    assert max_deaths(Options(retries=retries)) == deaths
    (seq,) = h.submit(Options(retries=retries))
    for n in range(deaths):
        h.worker(f"w{n}", now=float(n))
        (task,) = h.fetch(f"w{n}", now=float(n))
        assert task.attempt == n + 1
        assert h.collect() == []
        h.state.connection_closed(f"w{n}", None, float(n))      # its last connection: it died
        h.settle()
    ((number, delivery),) = h.collect()
    assert delivery.seq == seq and delivery.status is Status.LOST and delivery.attempts == deaths
    assert delivery.payload == Failure(7, "h", reason=f"worker w{deaths - 1} was lost")


def test_a_child_death_counts_and_requeues_at_once_until_the_limit(h):
    h.worker()
    h.submit(Options())
    for attempt in (1, 2, 3):
        (task,) = h.fetch()
        assert task.attempt == attempt
        h.report(task.id, Status.LOST, Failure.died(1, -9), retryable=True)
    assert h.fetch() == []
    ((_, delivery),) = h.collect()
    assert delivery.status is Status.LOST and delivery.attempts == 3


def test_a_clean_stop_charges_neither_an_attempt_nor_a_death(h):
    h.worker("w1")
    h.submit(Options())
    h.fetch("w1")
    h.state.unregister("w1", 1.0)
    h.worker("w2")
    (task,) = h.fetch("w2")
    assert task.attempt == 1 and h.state._jobs[task.id].deaths == 0


def test_released_jobs_go_back_uncharged(h):
    h.worker()
    h.submit(Options(), Options())
    tasks = h.fetch()
    h.state.release("w", [t.id for t in tasks])
    assert [t.attempt for t in h.fetch()] == [1, 1]


def test_retries_back_off_exponentially_capped(h):
    h.worker()
    h.submit(Options(retries=3, retry_delay=0.1))
    now, delays = 0.0, []
    for _ in range(3):
        (task,) = h.fetch(now=now)
        h.report(task.id, Status.ERROR, b"exc", retryable=True, now=now)
        due = h.effects.timer_at
        assert due is not None
        delays.append(round(due - now, 9))
        assert h.fetch(now=due - 0.001) == []            # not before it is due
        h.state.expire(due)
        h.settle()
        now = due
    assert delays == [0.1, 0.2, 0.4]
    (task,) = h.fetch(now=now)
    assert task.attempt == 4
    h.report(task.id, Status.ERROR, b"exc", retryable=True, now=now)    # out of retries
    ((_, delivery),) = h.collect(now=now)
    assert delivery.status is Status.ERROR and delivery.attempts == 4


def test_the_backoff_jitters_between_half_and_one_and_a_half_and_is_capped():
    h = Harness()
    h.client()
    h.worker()
    h.submit(Options(retries=5, retry_delay=20.0))
    (task,) = h.fetch()
    job = h.state._jobs[task.id]
    for factor, expected in ((0.5, 10.0), (1.5, 30.0), (1.0, 20.0)):
        h.jitter.factor = factor
        assert h.state.backoff(job) == expected
    job.attempts = 2        # the second try: 40 s, capped
    assert h.state.backoff(job) == SETTINGS.retry_delay_cap


def test_deaths_do_not_count_against_retries(h):
    h.worker()
    h.submit(Options(retries=1))
    (task,) = h.fetch()
    h.report(task.id, Status.LOST, Failure.died(1, 1), retryable=True)
    (task,) = h.fetch()
    h.report(task.id, Status.ERROR, b"exc", retryable=True)       # its one retry
    h.state.expire(h.effects.timer_at)
    h.settle()
    (task,) = h.fetch(now=10.0)
    assert task.attempt == 3
    h.report(task.id, Status.ERROR, b"exc", retryable=True)
    ((_, delivery),) = h.collect()
    assert delivery.status is Status.ERROR


def test_a_timeout_is_retried_only_if_retry_timeouts(h):
    h.worker()
    h.submit(Options(retries=1, retry_timeouts=False), Options(retries=1))
    first, second = h.fetch()
    h.report(first.id, Status.TIMEOUT, Failure.timed_out(1, 1.0, 1))
    h.report(second.id, Status.TIMEOUT, Failure.timed_out(1, 1.0, 1))
    assert [d.seq for _, d in h.collect()] == [1]
    assert h.effects.timer_at is None and h.state.next_deadline() is not None


def test_a_submit_batch_sent_again_is_not_queued_twice(h):
    h.worker()
    batch = [Submission(seq, b"fn", b"a", False, Options()) for seq in (1, 2, 3)]
    h.state.submit("c", batch, {b"fn": b"blob"}, 0.0)
    h.state.submit("c", batch, {b"fn": b"blob"}, 0.0)
    h.state.submit("c", batch[1:] + [Submission(4, b"fn", b"a", False, Options())], {b"fn": b"blob"}, 0.0)
    h.settle()
    assert [t.id for t in h.fetch()] == [100, 101, 102, 103]


def test_a_result_reported_twice_counts_once(h):
    h.worker()
    h.submit(Options())
    (task,) = h.fetch()
    h.report(task.id, payload=b"first")
    h.report(task.id, payload=b"second")
    assert [d.payload for _, d in h.collect()] == [b"first"]
    assert h.state.status(0.0, 0.0)["done"] == 1


def test_a_parked_fetch_is_answered_by_the_submit_that_makes_it_answerable(h):
    h.worker()
    assert h.fetch(wait=5.0, reply="fetch-call") is PARKED
    assert h.effects.timer_at == SETTINGS.wait_slice        # answered empty by then at the latest
    h.submit(Options())
    ((reply, (tag, (tasks, functions))),) = h.effects.answers
    assert reply == "fetch-call" and tag == "#RETURN"
    assert [t.attempt for t in tasks] == [1] and functions == {b"fn": b"blob"}


def test_a_parked_fetch_whose_wait_runs_out_is_answered_empty(h):
    h.worker()
    assert h.fetch(wait=1.0, reply="f") is PARKED
    h.state.expire(0.5)
    assert h.settle().answers == []
    h.state.expire(1.0)
    assert h.settle().answers == [("f", ("#RETURN", ([], {})))]
    assert h.state.next_deadline() is None


def test_fetch_says_none_once_the_cluster_shuts_down_and_queued_jobs_fail(h):
    h.worker()
    assert h.fetch(wait=1.0, reply="f") is PARKED
    h.submit(Options(), now=0.0)
    h.fetch(wait=1.0, reply="f2")
    h.closing = True
    assert h.state.tick(1.0) is False         # a worker is still there
    assert ("f2", ("#RETURN", None)) in h.settle().answers and h.effects.wake_control
    h.state.unregister("w", 1.0)
    h.settle()
    assert h.state.tick(1.0) is False        # a result waits for its connected client
    assert [d.status for _, d in h.collect(now=1.0)] == [Status.SHUTDOWN]
    h.collect(ack=1, now=1.0)
    assert h.state.tick(1.0) is True
    h.submit(Options(), now=2.0)
    assert [(n, d.status) for n, d in h.collect(ack=1, now=2.0)] == [(2, Status.SHUTDOWN)]


def test_a_shared_queue_is_split_among_workers(h):
    h.worker("w1")
    h.worker("w2")
    h.submit(*[Options()] * 10)
    assert len(h.fetch("w1", n=64)) == 5


def test_parked_fetches_each_get_their_share_of_the_queue_as_it_was_when_jobs_came(h):
    """Not a share taken anew after each lease, which shrank down the line (10, 9, ... 1)
    and left a third of the jobs to many calls of a job or two each."""
    workers = [f"w{i}" for i in range(50)]
    for w in workers:
        h.worker(w)
        assert h.fetch(w, n=64, wait=2.0, reply=w) is PARKED
    h.submit(*[Options()] * 500)
    assert sorted(len(tasks) for _, (_, (tasks, _)) in h.effects.answers) == [10] * 50


def test_a_fetch_takes_its_share_of_the_latest_submit_not_of_what_is_left_of_it(h):
    """Of 100 jobs and 50 workers, each fetch takes 2, down to the last:
    not 1 each once fewer than 50 are left (a call per job)."""
    for i in range(50):
        h.worker(f"w{i}")
    h.submit(*[Options()] * 100)
    assert [len(h.fetch(f"w{i}", n=64)) for i in range(50)] == [2] * 50
    h.submit(*[Options()] * 10)     # a new submit: a share of what is queued now
    assert len(h.fetch("w0", n=64)) == 1
