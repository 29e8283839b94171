"""A broker that dies: the journal, and workers and clients that reconnect.

The chaos tests keep a ledger: every job appends its id to a file when it
runs, and the client (a separate process, so that it can be frozen) writes
the results it got. Whatever is killed, every id must be in the ledger and
every future must have its result.
"""

from __future__ import annotations

import json
import pickle
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest

from helpers import kill_tree, logs, python, read_line, wait_for_file
from mpqueue import BrokerUnavailable
from mpqueue.journal import Journal
from mpqueue.protocol import Options

cloudpickle.register_pickle_by_value(sys.modules[__name__])

JOBS = 40
#: Long enough for a broker to come back on a busy machine.
RECONNECT = {"MPQUEUE_RECONNECT_TIMEOUT": "60"}

CLIENT = r"""
import json, os, sys, time
from mpqueue import Client

def job(i, ledger):
    time.sleep(0.05)
    with open(ledger, "a") as f:    # one short append per line: atomic
        f.write(f"{i}\n")
    return i * i

address, ledger, n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
with Client(address) as client:
    futures = [client.submit(job, i, ledger) for i in range(n)]
    print("submitted", flush=True)
    results = [f.result(120) for f in futures]
with open(out, "w") as f:
    json.dump(results, f)
"""




def start_client(cluster, n: int = JOBS) -> subprocess.Popen:
    script = cluster.tmp_path / "client.py"
    script.write_text(CLIENT)
    client = cluster.popen([sys.executable, str(script), cluster.address, str(cluster.tmp_path / "ledger"),
                            str(n), str(cluster.tmp_path / "results.json")], "client", stdout=subprocess.PIPE,
                           env=RECONNECT)
    assert read_line(client.stdout, 30).strip() == "submitted"
    return client


def restart_broker(cluster, journal) -> None:
    """kill -9 the broker, then start it again on the same port and journal."""
    port = cluster.address.rsplit(":", 1)[1]
    cluster.broker.kill()
    cluster.broker.wait(10)
    cluster.start_broker("--journal", str(journal), "--port", port)


def check_ledger(cluster, client: subprocess.Popen, n: int = JOBS) -> None:
    assert client.wait(90) == 0, logs(client)
    assert json.loads((cluster.tmp_path / "results.json").read_text()) == [i * i for i in range(n)]
    ran = {int(line) for line in (cluster.tmp_path / "ledger").read_text().split()}
    assert ran == set(range(n))


@pytest.fixture
def durable(empty):
    journal = empty.tmp_path / "journal.db"
    empty.start_broker("--journal", str(journal))
    empty.journal = journal
    return empty


def test_jobs_queued_before_any_worker_survive_a_broker_kill(durable):
    client = start_client(durable)
    durable.wait_for(lambda s: s["queued"] == JOBS, "every job to reach the broker")
    restart_broker(durable, durable.journal)
    assert durable.status()["queued"] == JOBS
    durable.start_worker(2, env=RECONNECT)
    check_ledger(durable, client)


def test_broker_and_worker_killed_mid_run_lose_nothing(durable):
    first = durable.start_worker(2, env=RECONNECT)
    client = start_client(durable)
    durable.wait_for(lambda s: s["done"] >= JOBS // 4, "a quarter of the jobs to finish")
    restart_broker(durable, durable.journal)
    kill_tree(first.pid)
    durable.start_worker(2, env=RECONNECT)
    check_ledger(durable, client)
    assert "Traceback" not in logs(client)


def test_results_not_yet_collected_survive_a_broker_kill(durable):
    worker = durable.start_worker(2, env=RECONNECT)
    client = start_client(durable)
    durable.wait_for(lambda s: s["queued"] + s["running"] + s["done"] == JOBS, "every job to reach the broker")
    client.send_signal(signal.SIGSTOP)      # a frozen client collects nothing
    try:
        durable.wait_for(lambda s: s["done"] == JOBS, "every job to finish", timeout=30)
        assert durable.status()["results"] > 0
        restart_broker(durable, durable.journal)
        assert durable.status()["results"] > 0
    finally:
        client.send_signal(signal.SIGCONT)
    check_ledger(durable, client)
    # The worker held on through the restart, and says so in one line each way.
    durable.wait_for(lambda s: len(s["workers"]) == 1, "the worker to rejoin")
    log = logs(worker)
    assert "reconnecting" in log and "rejoined" in log and "Traceback" not in log


def test_a_broker_restarted_without_a_journal_fails_the_futures_it_lost(cluster):
    cluster.start_worker(1, env=RECONNECT)
    client = cluster.client(reconnect_timeout=60)
    future = client.submit(time.sleep, 60)
    cluster.wait_for(lambda s: s["running"] == 1, "the job to run")
    port = cluster.address.rsplit(":", 1)[1]
    cluster.broker.kill()
    cluster.start_broker("--port", port)
    with pytest.raises(Exception, match="restarted without a journal") as info:
        future.result(30)
    assert type(info.value) is BrokerUnavailable
    # The worker is still there, serving the new broker.
    cluster.wait_for(lambda s: len(s["workers"]) == 1, "the worker to rejoin")
    assert cluster.client().submit(abs, -3).result(30) == 3


def test_an_idle_client_carries_on_with_a_broker_restarted_without_a_journal(cluster):
    cluster.start_worker(1, env=RECONNECT)
    client = cluster.client(reconnect_timeout=60)
    assert client.submit(abs, -1).result(30) == 1
    port = cluster.address.rsplit(":", 1)[1]
    cluster.broker.kill()
    cluster.start_broker("--port", port)
    cluster.wait_for(lambda s: len(s["workers"]) == 1, "the worker to rejoin")
    assert [f.result(30) for f in [client.submit(abs, -i) for i in range(20)]] == list(range(20))
    client.shutdown()


BROKER_SESSION = r"""
import sys
from mpqueue.broker import Broker
from mpqueue.journal import Journal
from mpqueue.protocol import ClientHello, Options, Outcome, Status, Submission, WorkerHello

broker = Broker(journal=Journal(sys.argv[1]))
broker.register("client", ClientHello(1, "test"))
broker.register("worker", WorkerHello("h", 1, 1, {}))
seq = int(sys.argv[2])
broker.submit("client", [Submission(seq, b"fn", b"args", False, Options())], {b"fn": b"blob"})
(task,), _ = broker.fetch("worker", 1, 0)
broker.report("worker", [Outcome(task.id, Status.OK, b"result %d" % seq)], (1, []))
ack = int(sys.argv[3])
print([(number, delivery.payload.decode()) for number, delivery in broker.collect("client", ack, 0)])
broker.collect("client", ack + 1, 0)      # acknowledge it: the journal keeps no result row
"""


def test_result_numbers_go_on_across_a_restart_that_found_every_result_acknowledged(tmp_path):
    """Numbering from 1 again would make the acknowledgement a client keeps
    across the restart drop its next results unseen. Two runs of a broker on
    one journal, each in its own process, called directly."""
    journal = str(tmp_path / "journal.db")
    first = python(BROKER_SESSION, args=[journal, "1", "0"])
    assert first.stdout.strip() == "[(1, 'result 1')]", first.stderr
    second = python(BROKER_SESSION, args=[journal, "2", "1"])     # it acknowledges 1 as it collects
    assert second.stdout.strip() == "[(2, 'result 2')]", second.stderr


def test_jobs_a_journal_lost_fail_and_the_rest_complete(durable):
    """A journal restored from a backup older than some jobs: those fail, clearly."""
    backup = durable.tmp_path / "backup.db"
    durable.start_worker(1, env=RECONNECT)
    client = durable.client(reconnect_timeout=60)
    go = durable.tmp_path / "go"
    before = client.submit(wait_for_file, go, "before")
    durable.wait_for(lambda s: s["running"] == 1, "the first job to run")
    with sqlite3.connect(durable.journal) as db, sqlite3.connect(backup) as copy:
        db.backup(copy)
    after = client.submit(abs, -2)
    durable.wait_for(lambda s: s["queued"] + s["done"] >= 1, "the second job to reach the broker")
    port = durable.address.rsplit(":", 1)[1]
    durable.broker.kill()
    durable.broker.wait(10)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{durable.journal}{suffix}").unlink(missing_ok=True)
    backup.rename(durable.journal)
    durable.start_broker("--journal", str(durable.journal), "--port", port)
    go.touch()
    assert before.result(30) == "before"
    with pytest.raises(Exception, match="its journal lost it") as info:
        after.result(30)
    assert type(info.value) is BrokerUnavailable
    assert client.submit(abs, -3).result(30) == 3
    client.shutdown()


def test_a_journal_in_use_is_refused(durable):
    result = durable.run("broker", "--port", "0", "--journal", str(durable.journal), timeout=15)
    assert result.returncode == 1
    assert "in use by another broker" in result.stderr


def test_uncollected_results_expire_after_the_result_ttl(empty):
    journal = empty.tmp_path / "journal.db"
    empty.start_broker("--journal", str(journal), "--result-ttl", "2")
    empty.start_worker(1)
    client = start_client(empty, n=3)
    empty.wait_for(lambda s: s["queued"] + s["running"] + s["done"] == 3, "the jobs to reach the broker")
    kill_tree(client.pid)        # it will never collect
    empty.wait_for(lambda s: s["done"] == 3, "the jobs to finish")
    empty.wait_for(lambda s: s["results"] == 0 and s["clients"] == 0, "the results to expire", timeout=15)
    with sqlite3.connect(journal) as db:
        assert db.execute("SELECT count(*) FROM results").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM jobs").fetchone() == (0,)


@pytest.mark.parametrize("content, message", [
    (b"this is not a database at all" * 100, "file is not a database"),
    (None, "not an mpqueue journal"),
], ids=["garbage", "another-sqlite-database"])
def test_a_bad_journal_is_refused_at_start(empty, content, message):
    path = empty.tmp_path / "journal.db"
    if content is None:
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE something (other)")
    else:
        path.write_bytes(content)
    result = empty.run("broker", "--port", "0", "--journal", str(path), timeout=15)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def started_then_wait(ledger: Path, go: Path) -> int:
    with open(ledger, "a") as f:
        f.write("started\n")
    while not go.exists():
        time.sleep(0.05)
    return 7


def test_a_broker_restart_charges_no_death_to_a_live_workers_running_job(durable):
    """Three restarts in a row while one job runs on a healthy worker: it is
    neither run again nor failed as lost (each rejoin once kept the fresh
    connection from being closed as stale, which the broker took for the
    worker dying)."""
    worker = durable.start_worker(1, env=RECONNECT)
    client = durable.client(reconnect_timeout=60)
    ledger, go = durable.tmp_path / "ledger", durable.tmp_path / "go"
    future = client.submit(started_then_wait, ledger, go)
    durable.wait_for(lambda s: s["running"] == 1, "the job to run")
    for _ in range(3):
        restart_broker(durable, durable.journal)
        durable.wait_for(lambda s: len(s["workers"]) == 1 and s["running"] == 1, "the worker to rejoin")
    go.touch()
    assert future.result(30) == 7
    assert ledger.read_text() == "started\n"
    assert "presumed this worker lost" not in logs(worker)
    assert "disconnected" not in logs(durable.broker)


def start_wait_end(ledger: Path, go: Path) -> int:
    with open(ledger, "a") as f:
        f.write("started\n")
    while not go.exists():
        time.sleep(0.05)
    with open(ledger, "a") as f:
        f.write("ended\n")
    return 8


def test_a_result_held_through_a_broker_restart_is_not_run_again(durable):
    """A job that ends while its broker is down: its worker holds the result,
    and names it when it rejoins, so the broker, which queued the job again
    from its journal, does not hand it out a second time."""
    durable.start_worker(1, env=RECONNECT)
    client = durable.client(reconnect_timeout=60)
    ledger, go = durable.tmp_path / "ledger", durable.tmp_path / "go"
    future = client.submit(start_wait_end, ledger, go)
    durable.wait_for(lambda s: s["running"] == 1, "the job to run")
    port = durable.address.rsplit(":", 1)[1]
    durable.broker.kill()
    durable.broker.wait(10)
    go.touch()
    deadline = time.monotonic() + 20
    while "ended" not in ledger.read_text():
        assert time.monotonic() < deadline, "the job did not end"
        time.sleep(0.05)
    durable.start_broker("--journal", str(durable.journal), "--port", port)
    assert future.result(30) == 8
    time.sleep(1)       # a second run, if there were one, would be under way
    assert ledger.read_text() == "started\nended\n"


def side_files(journal: Path) -> list[Path]:
    """The files a journal keeps large arguments in (`Journal._arguments`)."""
    return sorted(Path(f"{journal}-payloads").iterdir())


def test_large_arguments_live_beside_the_journal_and_survive_a_broker_kill(durable):
    """Arguments of 1 MiB and more go to side files, not into SQLite; after
    a kill -9 they come back from there, and go once their job is over."""
    client = durable.client(reconnect_timeout=60)
    blobs = [bytes([i]) * (1 << 20) for i in range(3)]
    futures = [client.submit(len, blob) for blob in blobs] + [client.submit(len, b"small")]
    durable.wait_for(lambda s: s["queued"] == 4, "the jobs to reach the broker")
    sizes = [p.stat().st_size for p in side_files(durable.journal)]
    assert len(sizes) == 3 and min(sizes) > 1 << 20
    with sqlite3.connect(durable.journal) as db:
        assert max(length for length, in db.execute("SELECT length(payload) FROM jobs")) < 1000
    restart_broker(durable, durable.journal)
    durable.start_worker(1, env=RECONNECT)
    assert [f.result(30) for f in futures] == [1 << 20] * 3 + [5]
    durable.wait_for(lambda s: s["results"] == 0, "the results to be acknowledged")
    assert side_files(durable.journal) == []


@pytest.mark.parametrize("damage, error, message", [
    (Path.unlink, FileNotFoundError, r"are gone \(No such file or directory\); the job did not run"),
    (lambda p: p.write_bytes(b"cut"), OSError, r"are 3 bytes, not \d+ \(cut short"),
], ids=["deleted", "cut-short"])
def test_a_job_whose_side_file_is_lost_fails_saying_so_and_the_rest_run(durable, damage, error, message):
    """A side file gone at a restart (deleted by hand, or not on the disk yet
    when the machine lost power) fails its job, not the broker."""
    client = durable.client(reconnect_timeout=60)
    futures = [client.submit(len, bytes([i]) * (1 << 20)) for i in range(2)]
    durable.wait_for(lambda s: s["queued"] == 2, "the jobs to reach the broker")
    first, second = side_files(durable.journal)
    port = durable.address.rsplit(":", 1)[1]
    durable.broker.kill()
    durable.broker.wait(10)
    damage(first)
    durable.start_broker("--journal", str(durable.journal), "--port", port)
    durable.start_worker(1, env=RECONNECT)
    with pytest.raises(error, match=f"kept in {first} next to the journal, {message}") as info:
        futures[0].result(30)
    assert type(info.value) is error
    assert futures[1].result(30) == 1 << 20
    assert client.submit(abs, -3).result(30) == 3
    assert "a job failed: the job's arguments" in logs(durable.broker)
    assert "Traceback" not in logs(durable.broker)
    durable.wait_for(lambda s: s["results"] == 0, "the results to be acknowledged")
    assert side_files(durable.journal) == []


@pytest.mark.parametrize("wrap", [bytes, lambda data: pickle.PickleBuffer(bytearray(data))],
                         ids=["bytes", "out-of-band"])
def test_large_arguments_sent_as_bytes_go_to_a_side_file_too(tmp_path, wrap):
    """As a client on another host sends them (no /dev/shm file; the
    transport hands over a buffer that came out of band): the row keeps
    their size, the side file the bytes, until the job is over."""
    path = str(tmp_path / "journal.db")
    journal = Journal(path)
    big = b"x" * (1 << 20)
    journal.submitted("c", 2, 3, [(1, 1, b"fn", wrap(big), False, Options()),
                                  (2, 2, b"fn", b"small", False, Options())], {b"fn": b"f"})
    journal.commit()
    assert side_files(Path(path)) == [tmp_path / "journal.db-payloads" / "1"]
    assert [job[4] for job in journal.load()["jobs"]] == [big, b"small"]
    journal.forgotten(1)
    assert side_files(Path(path)) != []         # not before the commit
    journal.commit()
    assert side_files(Path(path)) == []


def reversed_bytes(data: bytes) -> bytes:
    return data[::-1]


def test_payloads_out_of_band_are_journaled_as_the_bytes_that_came(durable):
    """Arguments and results of 64 KiB to 1 MiB travel out of band (under
    the threshold of shared memory): the journal stores the argument's pickle
    as it arrived, and a restarted broker hands it on."""
    client = durable.client()
    blobs = [bytes([i]) * (200 << 10) for i in range(3)]
    futures = [client.submit(reversed_bytes, blob) for blob in blobs]
    durable.wait_for(lambda s: s["queued"] == 3, "the jobs to reach the broker")
    with sqlite3.connect(durable.journal) as db:
        stored = [payload for payload, in db.execute("SELECT payload FROM jobs ORDER BY id")]
    assert [cloudpickle.loads(payload) for payload in stored] == [((blob,), {}) for blob in blobs]
    restart_broker(durable, durable.journal)
    durable.start_worker(2)
    assert [f.result(60) for f in futures] == [blob[::-1] for blob in blobs]
