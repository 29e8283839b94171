"""Every job's story: each attempt and how it ended, one final state per
job, the bounded ring of finished jobs, and the totals."""

from __future__ import annotations

import pytest

from mpqueue.history import FINAL, End, Record, State
from mpqueue.journal import Journal
from mpqueue.protocol import Failure, Options, Outcome, Raised, Status

from .harness import EPOCH, SETTINGS, Harness


def run(h: Harness, status: Status = Status.OK, payload=b"r", retryable: bool = False, raised=None,
        now: float = 1.0, pid: int = 42):
    """Fetch one job and report how its attempt ended, as a worker's child would say."""
    (task,) = h.fetch(n=1, now=now)
    h.state.report("w", [Outcome(task.id, status, payload, retryable, pid, EPOCH + now, EPOCH + now + 0.5,
                                 raised)], (0, []), now + 0.5)
    h.settle()
    return task


def story(h: Harness, job_id: int) -> Record:
    (found,) = h.state.jobs(10.0, job_id=job_id)
    return Record.from_dict(found)


def test_a_job_that_returns_is_done_with_where_and_when_it_ran(h):
    h.worker(host="box")
    h.submit(Options())
    task = run(h)
    record = story(h, task.id)
    assert (record.state, record.cause, record.finished) == (State.DONE, "", EPOCH + 1.5)
    (attempt,) = record.attempts
    assert (attempt.worker, attempt.host, attempt.pid) == ("w", "box", 42)
    assert (attempt.started, attempt.ended, attempt.end) == (EPOCH + 1.0, EPOCH + 1.5, End.RESULT)


def test_what_a_job_raised_is_kept_as_text_with_its_traceback(h):
    h.worker()
    h.submit(Options(retries=1))
    raised = Raised("builtins.ValueError", "bad input\nsecond line", "Traceback ...\nValueError: bad input")
    task = run(h, Status.ERROR, b"opaque", True, raised)
    waiting = story(h, task.id)
    assert waiting.state is State.RETRYING and waiting.cause == "after raised ValueError: bad input"
    h.state.expire(10.0)
    run(h, Status.ERROR, b"opaque", True, raised, now=10.0)
    record = story(h, task.id)
    assert record.state is State.FAILED and record.cause == "raised ValueError: bad input"
    assert [a.end for a in record.attempts] == [End.RAISED, End.RAISED]
    assert record.attempts[-1].traceback.endswith("ValueError: bad input")
    assert h.state.counters.retried == 1 and h.state.counters.failed == 1


@pytest.mark.parametrize("status, failure, final, cause", [
    (Status.TIMEOUT, Failure.timed_out(42, 1.5, 1), State.TIMED_OUT, "timeout after 1.5 s"),
    (Status.LOST, Failure.died(42, -11), State.LOST, "died SIGSEGV"),
    (Status.LOST, Failure.died(42, 3), State.LOST, "died exit code 3"),
    (Status.LOST, Failure.too_big(42, 300 << 20, 100 << 20), State.LOST, "memory 300 MiB > 100 MiB"),
])
def test_a_process_that_dies_or_is_killed_says_how(h, status, failure, final, cause):
    h.worker()
    h.submit(Options())
    retryable = status is Status.LOST       # as the worker says of a death
    for attempt in range(3):                # a death is tried again, up to 3 in all
        task = run(h, status, failure, retryable, now=float(attempt))
        if story(h, task.id).state in FINAL:
            break
    record = story(h, task.id)
    assert (record.state, record.cause) == (final, cause)
    assert all(a.pid == 42 for a in record.attempts)
    counters = h.state.counters
    assert (counters.lost, counters.timed_out) == ((3, 0) if status is Status.LOST else (0, 1))


def test_a_lost_worker_ends_the_attempt_it_held_and_the_third_loss_ends_the_job(h):
    h.submit(Options())
    for n in range(3):
        h.worker(f"w{n}", now=100.0 * n)
        (task,) = h.fetch(f"w{n}", now=100.0 * n)
        h.state.report(f"w{n}", [], (1, [task.id]), 100.0 * n + 1)     # it runs
        h.state.tick(100.0 * n + 1 + SETTINGS.heartbeat_timeout + 1)
        h.settle()
    record = story(h, task.id)
    assert record.state is State.LOST
    assert [a.worker for a in record.attempts] == ["w0", "w1", "w2"]
    assert record.attempts[0].started == EPOCH + 1      # when its report had it running
    assert record.cause == "lost worker w2 silent for 11 s"


def test_a_cancel_ends_a_job_once_queued_or_running(h):
    h.worker()
    queued, running = h.submit(Options(), Options())
    (task,) = h.fetch(n=1)
    h.state.report("w", [], (1, [task.id]), 0.0)
    assert h.state.cancel("c", [running], False, 1.0) == [True]        # the queued one (not leased)
    pending = h.state.cancel("c", [queued], True, 2.0)
    h.state.answered({task.id: True})
    assert h.state.conclude(pending, 3.0) == [True]
    h.settle()
    first, second = (story(h, i) for i in (task.id, task.id + 1))
    assert (first.state, first.cause) == (State.CANCELLED, "cancelled by its client")
    assert [a.end for a in first.attempts] == [End.CANCELLED] and second.attempts == ()
    assert h.state.counters.cancelled == 2


def test_jobs_left_queued_at_shutdown_end_shut_down(h):
    h.submit(Options())
    h.closing = True
    h.state.tick(1.0)
    (record,) = h.state.jobs(1.0)
    assert record["state"] == "shutdown" and record["cause"] == "the cluster shut down before it ran"


def test_the_ring_keeps_the_last_n_finished_jobs_newest_first_and_filters():
    h = Harness(history=3)
    h.client()
    h.worker()
    h.submit(*[Options()] * 5)
    ids = [run(h, now=float(n)).id for n in range(4)]
    h.fetch(n=1, now=4.5)
    h.state.report("w", [], (1, [ids[-1] + 1]), 5.0)       # the fifth runs now
    listed = h.state.jobs(6.0)
    assert [r["id"] for r in listed] == [ids[-1] + 1, ids[3], ids[2], ids[1]]   # ids[0] fell out
    assert listed[0]["state"] == "running" and listed[0]["attempts"][0]["started"] == EPOCH + 5
    assert [r["id"] for r in h.state.jobs(6.0, limit=2)] == [ids[-1] + 1, ids[3]]
    assert [r["id"] for r in h.state.jobs(6.0, running=True)] == [ids[-1] + 1]
    assert h.state.jobs(6.0, failed=True) == [] and h.state.jobs(6.0, job_id=ids[0]) == []


def test_every_job_ends_in_exactly_one_final_state(h):
    h.worker()
    h.submit(*[Options()] * 4)
    run(h)
    run(h, Status.ERROR, b"x", False, Raised("builtins.KeyError", "'k'", ""))
    (seq,) = h.submit(Options())
    h.state.cancel("c", [seq], False, 1.0)
    h.state.unregister("w", 2.0)
    h.closing = True
    h.state.tick(2.0)
    h.settle()
    records = h.state.jobs(3.0, limit=100)
    assert sorted(r["state"] for r in records) == ["cancelled", "done", "failed", "shutdown", "shutdown"]
    assert len({r["id"] for r in records}) == 5
    counters = h.state.counters
    assert counters.submitted == 5 and counters.done + counters.failed + counters.cancelled == 5


def test_a_journal_keeps_the_history_and_gives_it_back(durable, tmp_path):
    durable.worker()
    durable.submit(Options())
    task = run(durable)
    (rows,) = [args for name, args in durable.effects.journal if name == "history"]
    journal = Journal(str(tmp_path / "journal.db"))
    for _ in range(3):
        journal.history(*rows)
    journal.commit()
    back = Journal.load(journal)["history"]
    assert back == [Record.from_row(row) for row in rows[0]] * 3
    assert back[0].id == task.id and back[0].attempts[0].pid == 42
    many = [(i, *rows[0][0][1:]) for i in range(250)]
    journal.history(many, 50)
    journal.commit()
    assert [r.id for r in journal.load()["history"]] == list(range(200, 250))
