"""`Client` keeps the `concurrent.futures.Executor` contract, as the stdlib documents it:
``wait``, ``as_completed``, ``add_done_callback``, ``map(timeout=...)``,
``shutdown(cancel_futures=True)``, and no use after shutdown."""

from __future__ import annotations

import concurrent.futures
import sys
import threading
import time
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION, as_completed, wait

import cloudpickle
import pytest

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def wait_for_file(path, value=None):
    while not path.exists():
        time.sleep(0.01)
    return value


def fail(message):
    raise ValueError(message)


def eventually(predicate, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


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
