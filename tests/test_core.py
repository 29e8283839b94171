"""The whole job path: submit, run on real workers, results back."""

from __future__ import annotations

import os
import pickle
import random
import sys
import threading
import time

import cloudpickle
import pytest

import mpqueue
from mpqueue import Client, RemoteError

# Workers cannot import this test module: send its functions by value, the
# documented way for code that lives only on the client's machine.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def whoami(delay: float = 0.0) -> int:
    time.sleep(delay)
    return os.getpid()


def test_lambdas_and_closures_run_on_two_workers(cluster):
    cluster.start_worker(1)
    cluster.start_worker(1)
    client = cluster.client()
    offset = 7
    assert client.submit(lambda x: x + offset, 1).result(10) == 8
    pids = set(client.map(lambda _: whoami(0.05), range(40), timeout=30))
    workers = cluster.status()["workers"]
    assert all(w["done"] > 0 for w in workers), workers
    assert len(pids) == 2


def test_map_keeps_input_order(cluster):
    cluster.start_worker(2)
    client = cluster.client()
    delays = [random.random() / 50 for _ in range(60)]
    results = list(client.map(lambda i, d: (time.sleep(d), i)[1], range(60), delays))
    assert results == list(range(60))


def test_map_with_chunks_and_several_iterables(cluster):
    cluster.start_worker(2)
    client = cluster.client()
    assert list(client.map(pow, range(100), [2] * 100, chunksize=7)) == [i ** 2 for i in range(100)]


def test_map_reads_its_input_lazily(cluster):
    cluster.start_worker(2)
    client = cluster.client(max_pending=4)
    consumed = []

    def numbers():
        for i in range(10**9):
            consumed.append(i)
            yield i

    results = client.map(abs, numbers())
    assert [next(results) for _ in range(10)] == list(range(10))
    assert len(consumed) <= 10 + 4


def test_user_exception_keeps_its_type_and_remote_traceback(cluster):
    cluster.start_worker(1)
    client = cluster.client()

    def fails(x):
        raise KeyError(f"no such thing: {x}")   # the failing line

    with pytest.raises(KeyError, match="no such thing: 3") as info:
        client.submit(fails, 3).result(10)
    cause = str(info.value.__cause__)
    assert "the failing line" in cause
    assert "pid" in cause and "Traceback" in cause


class Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("no pickling for me")


class NeedsTwoArgs(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a}-{b}")


def test_exceptions_that_cannot_travel_become_remote_error(cluster):
    cluster.start_worker(1)
    client = cluster.client()

    def raise_unpicklable():
        raise Unpicklable("cannot pickle me")

    with pytest.raises(RemoteError, match="Unpicklable: cannot pickle me") as info:
        client.submit(raise_unpicklable).result(10)
    assert "raise_unpicklable" in info.value.traceback

    def raise_needs_two():
        raise NeedsTwoArgs(1, 2)

    # Pickles fine, but does not unpickle: __init__ does not take its own args.
    with pytest.raises(RemoteError, match="NeedsTwoArgs: 1-2"):
        client.submit(raise_needs_two).result(10)


def test_unpicklable_argument_fails_only_that_submit(cluster):
    cluster.start_worker(1)
    client = cluster.client()
    with pytest.raises(pickle.PicklingError, match="arguments"):
        client.submit(len, threading.Lock())
    with pytest.raises(pickle.PicklingError, match="function"):
        client.submit(threading.Lock().acquire)
    assert client.submit(len, "abc").result(10) == 3


def test_unpicklable_result_fails_only_that_job(cluster):
    cluster.start_worker(1)
    client = cluster.client()
    bad = client.submit(threading.Lock)
    good = [client.submit(abs, -i) for i in range(5)]
    with pytest.raises(pickle.PicklingError, match="result"):
        bad.result(10)
    assert [f.result(10) for f in good] == [0, 1, 2, 3, 4]
    assert client.submit(abs, -9).result(10) == 9   # the worker still serves


def test_large_argument(cluster):
    cluster.start_worker(1)
    client = cluster.client()
    blob = os.urandom(32 << 20)
    assert client.submit(lambda b: (len(b), b[-5:]), blob).result(60) == (len(blob), blob[-5:])


def test_max_pending_blocks_submit_until_a_job_finishes(cluster):
    cluster.start_worker(2)
    client = cluster.client(max_pending=2)
    release = cluster.tmp_path / "release"

    def wait_for_file():
        while not release.exists():
            time.sleep(0.01)
        return "done"

    first = [client.submit(wait_for_file) for _ in range(2)]
    third = []
    submitter = threading.Thread(target=lambda: third.append(client.submit(abs, -3)))
    submitter.start()
    submitter.join(0.5)
    assert submitter.is_alive(), "submit should block while 2 jobs are pending"
    status = cluster.wait_for(lambda s: s["running"] == 2, "both jobs to run")
    assert status["queued"] == 0
    release.touch()
    submitter.join(10)
    assert not submitter.is_alive()
    assert [f.result(10) for f in first] == ["done", "done"]
    assert third[0].result(10) == 3


def test_executor_protocol_and_use_after_shutdown(cluster):
    cluster.start_worker(1)
    with Client(cluster.address) as client:
        assert isinstance(client, __import__("concurrent.futures").futures.Executor)
        assert client.submit(sum, [1, 2]).result(10) == 3
    with pytest.raises(RuntimeError, match="shutdown"):
        client.submit(abs, 1)


def test_local_client_runs_jobs_and_leaves_no_process(isolated):
    from helpers import tagged_processes
    with Client() as client:
        assert sorted(client.map(lambda x: x * x, range(20))) == [x * x for x in range(20)]
        assert tagged_processes(isolated), "the local cluster should be running now"
    deadline = time.monotonic() + 5
    while tagged_processes(isolated) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not tagged_processes(isolated)


def test_a_private_cluster_says_so_at_info(isolated, caplog):
    """No address and no $MPQUEUE_ADDRESS: not a silent local fallback."""
    with caplog.at_level("INFO", logger="mpqueue.client"):
        with Client() as client:
            assert client.submit(abs, -1).result(30) == 1
    said = [r.getMessage() for r in caplog.records if "private cluster" in r.getMessage()]
    assert len(said) == 1 and "set MPQUEUE_ADDRESS" in said[0]


def test_public_api_is_small():
    assert set(mpqueue.__all__) == {
        "Client", "Pool", "MpqueueError", "ConfigError", "BrokerUnavailable", "AuthenticationError",
        "VersionMismatch", "ClusterShutdown", "JobTimeout", "WorkerLost", "PayloadTooLarge", "EnvironmentMismatch",
        "RemoteError", "shared", "__version__"}


def test_a_process_forked_by_a_client_does_not_dial_the_broker(cluster):
    """The stdlib's proxies incref in every forked child: ours do not, so a
    user's fork-context Pool or Process does not make the broker log refusals."""
    import multiprocessing

    from helpers import logs

    cluster.start_worker(1)
    client = cluster.client()
    assert client.submit(abs, -1).result(30) == 1
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(0.2,))
    child.start()
    child.join(10)
    assert child.exitcode == 0
    assert client.submit(abs, -2).result(30) == 2
    time.sleep(0.3)
    assert "incref" not in logs(cluster.broker)
