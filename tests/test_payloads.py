"""Payloads over the cluster's limit fail exactly their own job.

The broker's ``MPQUEUE_MAX_PAYLOAD`` is the cluster's limit: it tells its
clients and workers. Here it is 1 MiB, set on the broker only.
"""

from __future__ import annotations

import os
import stat
import struct
import sys
import time
from pathlib import Path

import cloudpickle
import pytest

from helpers import logs
from mpqueue import PayloadTooLarge, WorkerLost

cloudpickle.register_pickle_by_value(sys.modules[__name__])

LIMIT = 1 << 20


@pytest.fixture
def limited(empty):
    empty.start_broker(env={"MPQUEUE_MAX_PAYLOAD": str(LIMIT)})
    return empty


def count_run(ledger: Path, size: int) -> bytes:
    with open(ledger, "a") as f:
        f.write("ran\n")
    return bytes(size)


def test_an_argument_over_the_limit_is_refused_at_submit(limited):
    limited.start_worker(1)
    client = limited.client()
    with pytest.raises(PayloadTooLarge, match=r"arguments pickle to 2\.0 MiB, over the cluster's "
                                              r"limit of 1\.0 MiB") as info:
        client.submit(len, bytes(2 << 20))
    assert info.value.limit == LIMIT and info.value.size > 2 << 20
    with pytest.raises(PayloadTooLarge):
        list(client.map(len, [b"", bytes(2 << 20)], chunksize=2))
    # Nothing was sent, nothing is stuck: the next jobs run.
    assert client.submit(len, bytes(1000)).result(30) == 1000
    assert list(client.map(len, [b"ab"] * 3)) == [2, 2, 2]


def test_a_result_over_the_limit_fails_its_job_alone(limited):
    workers = [limited.start_worker(1) for _ in range(3)]
    client = limited.client()
    ledger = limited.tmp_path / "ledger"
    with pytest.raises(PayloadTooLarge, match=r"result pickles to 2\.0 MiB, over the cluster's "
                                              r"limit of 1\.0 MiB"):
        client.options(retries=2).submit(count_run, ledger, 2 << 20).result(30)
    assert ledger.read_text() == "ran\n"        # not retried
    # Every worker is still there and runs jobs.
    assert [f.result(30) for f in [client.submit(count_run, ledger, 10) for _ in range(12)]] \
        == [bytes(10)] * 12
    assert all(w.poll() is None for w in workers)
    status = limited.status()
    assert len(status["workers"]) == 3 and all(w["lost"] == 0 for w in status["workers"])


def lie_about_size() -> None:
    """Write a message header announcing 2 GiB on this process's pipe to its
    worker, as a result over the wire's own limit would, then wait."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            if stat.S_ISSOCK(os.fstat(int(fd)).st_mode):
                os.write(int(fd), struct.pack("!iQ", -1, 2 << 30))
        except OSError:
            pass
    time.sleep(60)


def test_a_child_message_the_worker_cannot_take_fails_that_job_and_no_other(cluster):
    worker = cluster.start_worker(1)
    client = cluster.client()
    with pytest.raises(WorkerLost, match="could not read the job's result"):
        client.submit(lie_about_size).result(30)
    assert [f.result(30) for f in [client.submit(abs, -i) for i in range(10)]] == list(range(10))
    assert worker.poll() is None, logs(worker)
    assert "Traceback" not in logs(worker)


def test_an_argument_over_the_default_limit_is_refused_at_submit(cluster):
    """The real thing once: 950 MiB, over the default 900 MiB, with no
    setting changed (before, the client sent it again and again, forever)."""
    client = cluster.client()
    big = bytes(950 << 20)
    with pytest.raises(PayloadTooLarge, match="limit of 900.0 MiB"):
        client.submit(len, big)
    del big
    cluster.start_worker(1)
    assert client.submit(abs, -1).result(30) == 1
