"""`Client` keeps the `concurrent.futures.Executor` contract, as the stdlib documents it:
``wait``, ``as_completed``, ``add_done_callback``, ``map(timeout=...)``,
``shutdown(cancel_futures=True)``, and no use after shutdown."""

from __future__ import annotations

import concurrent.futures
import gc
import multiprocessing
import pickle
import sys
import threading
import time
import weakref
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION, as_completed, wait

import cloudpickle
import pytest

from helpers import eventually, wait_for_file

cloudpickle.register_pickle_by_value(sys.modules[__name__])




def fail(message):
    raise ValueError(message)




@pytest.fixture
def client(cluster):
    cluster.start_worker(2)
    return cluster.client()


def test_wait_sorts_done_from_not_done(client, tmp_path):
    release = tmp_path / "release"
    quick = client.submit(abs, -1)
    slow = client.submit(wait_for_file, release, "slow")

    done, not_done = wait([quick, slow], timeout=10, return_when=FIRST_COMPLETED)
    assert (done, not_done) == ({quick}, {slow})

    failing = client.submit(fail, "boom")
    result = wait([quick, failing, slow], timeout=10, return_when=FIRST_EXCEPTION)
    assert (result.done, result.not_done) == ({quick, failing}, {slow})

    started = time.monotonic()
    done, not_done = wait([quick, slow], timeout=0.3, return_when=ALL_COMPLETED)
    assert 0.25 < time.monotonic() - started < 3
    assert (done, not_done) == ({quick}, {slow})

    release.touch()
    done, not_done = wait([quick, slow, failing], timeout=30)
    assert not not_done
    assert slow.result() == "slow"
    with pytest.raises(ValueError, match="boom"):
        failing.result()
    assert isinstance(failing.exception(), ValueError)


def test_as_completed_yields_in_completion_order_and_times_out(client, tmp_path):
    finished = client.submit(abs, -5)
    assert finished.result(10) == 5
    gates = [tmp_path / f"gate{i}" for i in range(3)]
    gated = [client.submit(wait_for_file, gate, i) for i, gate in enumerate(gates)]
    it = as_completed(gated + [finished], timeout=30)
    assert next(it) is finished     # what is done already comes first
    # Two processes: jobs 0 and 1 run, job 2 waits for one of them.
    for i in (1, 2, 0):
        gates[i].touch()
        assert next(it).result() == i
    with pytest.raises(StopIteration):
        next(it)

    never = client.submit(wait_for_file, tmp_path / "never")
    started = time.monotonic()
    with pytest.raises(concurrent.futures.TimeoutError):
        for _ in as_completed([never], timeout=0.3):
            pass
    assert 0.25 < time.monotonic() - started < 3


def test_done_callbacks(client, tmp_path, caplog):
    release = tmp_path / "release"
    calls = []
    future = client.submit(wait_for_file, release, 7)
    future.add_done_callback(lambda f: calls.append(("first", f)))
    future.add_done_callback(lambda f: calls.append(("second", f)))
    time.sleep(0.2)
    assert calls == []
    release.touch()
    assert future.result(10) == 7
    eventually(lambda: len(calls) == 2)
    assert calls == [("first", future), ("second", future)]     # in the order added

    # Added to a finished future: called at once, in the calling thread.
    here = []
    future.add_done_callback(lambda f: here.append(threading.current_thread()))
    assert here == [threading.current_thread()]

    # Failed and cancelled futures call back too; a callback that raises is
    # logged and does not keep the others from running.
    seen = []
    failing = client.submit(fail, "x")
    failing.add_done_callback(lambda f: 1 / 0)
    failing.add_done_callback(seen.append)
    eventually(lambda: seen == [failing])
    assert "exception calling callback" in caplog.text

    blockers = [client.submit(wait_for_file, tmp_path / "never") for _ in range(2)]
    queued = client.submit(abs, -1)
    queued.add_done_callback(seen.append)
    assert queued.cancel()
    assert seen == [failing, queued] and queued.cancelled()
    for blocker in blockers:
        client.cancel(blocker, force=True)


def test_map_timeout_raises_timeout_error(client, tmp_path):
    assert list(client.map(abs, [-1, -2, -3], timeout=10)) == [1, 2, 3]
    started = time.monotonic()
    results = client.map(wait_for_file, [tmp_path / "never"] * 2, timeout=0.3)
    with pytest.raises(concurrent.futures.TimeoutError):
        next(results)
    assert 0.25 < time.monotonic() - started < 3
    # The deadline counts from the call to map, not from next().
    results = client.map(wait_for_file, [tmp_path / "later"], timeout=0.3)
    time.sleep(0.4)
    with pytest.raises(concurrent.futures.TimeoutError):   # the builtin one from 3.11 on
        next(results)


def test_shutdown_cancel_futures_and_use_after_shutdown(cluster, tmp_path):
    cluster.start_worker(1)
    client = cluster.client()
    release = tmp_path / "release"
    running = client.submit(wait_for_file, release, "ran")
    cluster.wait_for(lambda s: s["running"] == 1, "the first job to run")
    queued = [client.submit(abs, -i) for i in range(5)]
    client.shutdown(wait=False, cancel_futures=True)
    # Pending futures are cancelled; a running one is not, and finishes.
    assert all(f.cancelled() for f in queued)
    assert not running.cancelled() and not running.done()
    release.touch()
    assert running.result(10) == "ran"
    client.shutdown(wait=True)      # again: harmless
    with pytest.raises(RuntimeError):
        client.submit(abs, 1)
    with pytest.raises(RuntimeError):
        client.map(abs, [1])


# -- references: what the client holds on to, and for how long ----------------------

def make_set(i):
    return {i}      # a set takes a weak reference: the test can see it go


@pytest.mark.parametrize("chunksize", [1, 3])
def test_map_holds_no_result_it_has_yielded(client, chunksize):
    """A consumer that drops a result frees it (bpo-14406): with big results,
    anything else doubles peak memory."""
    results = client.map(make_set, range(6), chunksize=chunksize)
    for i in range(5):
        item = next(results)
        assert item == {i}
        ref = weakref.ref(item)
        del item
        gc.collect()
        assert ref() is None, f"result {i} is still held after it was yielded"
    assert list(results) == [{5}]


class Holder:
    def method(self):
        return 1


def test_a_done_job_keeps_no_reference_to_its_callable(client):
    """A bound method's object is freed once its job is done, though the
    future is kept: nothing of ours holds the callable."""
    holder = Holder()
    collected = threading.Event()
    ref = weakref.ref(holder, lambda _: collected.set())
    future = client.submit(holder.method)
    del holder
    assert future.result(30) == 1
    gc.collect()
    assert collected.wait(5), f"still held by: {gc.get_referrers(ref())}"


def test_a_function_cache_entry_never_names_another_function(client):
    """Functions made and dropped in a loop reuse ids: each job still runs its own."""
    assert [client.submit(lambda i=i: i * 10).result(30) for i in range(20)] == \
        [i * 10 for i in range(20)]


# -- mistakes that explain themselves --------------------------------------------

@pytest.mark.parametrize("keyword, hint", [
    ("max_workers", "--procs N"),
    ("initializer", "mpqueue.Pool"),
    ("retires", "job options are timeout, retries"),
])
def test_an_unknown_keyword_is_named_with_what_to_use(keyword, hint):
    from mpqueue import Client
    with pytest.raises(TypeError, match=f"Client\\(\\) got an unexpected keyword argument '{keyword}': .*{hint}"):
        Client("127.0.0.1:9", **{keyword: 0})


def test_an_unknown_option_is_named_too(client):
    with pytest.raises(TypeError, match="options\\(\\) got an unexpected keyword argument 'max_workers'"):
        client.options(max_workers=2)


def test_a_manager_proxy_argument_is_refused_at_submit(client):
    manager = multiprocessing.Manager()
    try:
        shared = manager.dict()
        with pytest.raises(pickle.PicklingError, match=r"a multiprocessing manager proxy \(DictProxy\) "
                                                       r"does not work on the cluster"):
            client.submit(len, shared)
        with pytest.raises(pickle.PicklingError, match="ListProxy"):
            list(client.map(len, [[manager.list()]]))
    finally:
        manager.shutdown()
    assert client.submit(len, {"a": 1}).result(30) == 1


def test_a_private_cluster_closed_at_once_stops_at_once(isolated):
    """Client() then shutdown() right away: the worker had not joined its
    broker yet, and once waited for one that was gone, until killed."""
    from mpqueue import Client
    client = Client()
    started = time.monotonic()
    client.shutdown()
    assert time.monotonic() - started < 3
    assert [p.returncode for p in client._cluster.processes] == [0]     # the worker's


def fan_out(address, n):
    """A job that submits jobs of its own to the cluster it runs on."""
    from mpqueue import Client
    with Client(address) as inner:
        return sum(inner.map(abs, range(-n, 0)))


def test_a_job_may_submit_jobs_and_wait_for_them(cluster):
    cluster.start_worker(2)
    client = cluster.client()
    assert client.submit(fan_out, cluster.address, 10).result(60) == sum(range(1, 11))


def test_shutdown_without_wait_returns_at_once_and_the_jobs_still_finish(cluster, tmp_path):
    cluster.start_worker(1)
    client = cluster.client()
    go = tmp_path / "go"
    futures = [client.submit(wait_for_file, go, i) for i in range(3)]
    started = time.monotonic()
    client.shutdown(wait=False)
    assert time.monotonic() - started < 1
    go.touch()
    assert [f.result(30) for f in futures] == [0, 1, 2]
