"""The failure record: built by one constructor per kind, read by the
client into WorkerLost or JobTimeout, stored by a journal as a dict (the
format older versions wrote and read)."""

from __future__ import annotations

import pickle
import sqlite3

from mpqueue.client import _failure
from mpqueue.errors import JobTimeout, WorkerLost
from mpqueue.journal import Journal
from mpqueue.protocol import Delivery, Failure, Status


def test_a_death_names_its_signal_and_the_client_says_so():
    error = _failure(Delivery(1, Status.LOST, Failure.died(42, -11), 3), abs)
    assert isinstance(error, WorkerLost)
    assert (error.pid, error.exitcode, error.signal, error.attempts) == (42, -11, "SIGSEGV", 3)
    assert str(error).startswith("the process running the job died (killed by SIGSEGV, pid 42 on ")
    assert str(error).endswith(") after 3 attempt(s)")
    assert "exit code 3," in str(_failure(Delivery(1, Status.LOST, Failure.died(42, 3), 1), abs))


def test_a_timeout_names_its_limit():
    error = _failure(Delivery(1, Status.TIMEOUT, Failure.timed_out(42, 1.5, 2), 2), abs)
    assert isinstance(error, JobTimeout)
    assert (error.timeout, error.pid, error.attempts) == (1.5, 42, 2)
    assert str(error).startswith("the job ran past its timeout of 1.5 s; killed pid 42 on ")


def test_a_lost_worker_and_a_memory_kill():
    lost = _failure(Delivery(1, Status.LOST, Failure.worker_lost(9, "box", "w1"), 3), abs)
    assert str(lost) == "worker w1 was lost (pid 9 on box) after 3 attempt(s)"
    big = Failure.too_big(5, 300 << 20, 100 << 20)
    assert (big.exitcode, big.signal) == (-9, "SIGKILL") and "grew to 300 MiB" in big.reason


def test_a_journal_stores_failures_as_dicts_and_reads_older_ones(tmp_path):
    path = str(tmp_path / "journal.db")
    journal = Journal(path)
    failure = Failure.died(42, -9)
    journal.result("c", 1, Delivery(1, Status.LOST, failure, 3), 0.0)
    journal.commit()
    # A row as the versions before Failure wrote it.
    old = {"pid": 7, "host": "h", "timeout": 2.0}
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO results VALUES ('c', 2, 2, ?, ?, 1, 0.0)",
                   (int(Status.TIMEOUT), pickle.dumps(old)))
        (stored,), = db.execute("SELECT payload FROM results WHERE number = 1").fetchall()
    assert pickle.loads(stored) == failure._asdict()
    (_, _, first, _), (_, _, second, _) = journal.load()["results"]
    assert first.payload == failure
    assert second.payload == Failure(7, "h", timeout=2.0)
