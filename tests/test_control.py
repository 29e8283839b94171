"""Job control: timeouts that kill, retries, priorities, cancellation, worker hygiene."""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import pytest

from helpers import python, wait_for_file
from mpqueue import Client, JobTimeout, WorkerLost

cloudpickle.register_pickle_by_value(sys.modules[__name__])




def mark(path: Path, value=None):
    with open(path, "a") as f:
        f.write(f"{value}\n")
    return value


def attempts(counter: Path) -> int:
    """Count this call in ``counter``; return how many calls there have been."""
    with open(counter, "a") as f:
        f.write("x")
    return counter.stat().st_size


def fail_times(counter: Path, times: int, exc: BaseException, value):
    if attempts(counter) <= times:
        raise exc
    return value


def hang_times(counter: Path, times: int, value):
    if attempts(counter) <= times:
        time.sleep(60)
    return value


def misbehave(how: str):
    if how == "raise":
        raise ValueError("as asked")
    if how == "unpicklable-result":
        return threading.Lock()
    if how == "exit":
        os._exit(3)
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "segfault":
        ctypes.string_at(0)
    if how == "hang":
        time.sleep(60)
    if how == "memory":
        hog = []
        while True:
            hog.append(bytearray(8 << 20))
            time.sleep(0.01)
    raise AssertionError(how)


MATRIX = [
    # how, error type, text in the error, attributes of the error
    ("raise", ValueError, "as asked", {}),
    ("unpicklable-result", pickle.PicklingError, "result", {}),
    ("exit", WorkerLost, "exit code 3", {"exitcode": 3, "signal": None, "attempts": 3}),
    ("sigkill", WorkerLost, "SIGKILL", {"exitcode": -9, "signal": "SIGKILL", "attempts": 3}),
    ("segfault", WorkerLost, "SIGSEGV", {"exitcode": -11, "signal": "SIGSEGV", "attempts": 3}),
    ("hang", JobTimeout, "timeout of 1 s", {"timeout": 1, "attempts": 1}),
    ("memory", WorkerLost, "--max-memory-per-child of 300 MiB", {"signal": "SIGKILL", "attempts": 1}),
]


@pytest.mark.parametrize("how, error, text, attributes", MATRIX, ids=[m[0] for m in MATRIX])
def test_a_failing_job_fails_alone_with_its_own_error(cluster, how, error, text, attributes):
    cluster.start_worker(2, "--max-memory-per-child", "300")
    client = cluster.client(timeout=1 if how == "hang" else None)
    slow = [client.submit(lambda i: (time.sleep(0.2), i)[1], i) for i in range(4)]
    bad = client.submit(misbehave, how)
    fast = [client.submit(pow, i, 2) for i in range(20)]
    with pytest.raises(error, match=text) as info:
        bad.result(60)
    for name, value in attributes.items():
        assert getattr(info.value, name) == value, name
    assert [f.result(30) for f in slow] == [0, 1, 2, 3]
    assert [f.result(30) for f in fast] == [i * i for i in range(20)]
    assert client.submit(abs, -1).result(10) == 1           # the worker still serves
    worker = cluster.status()["workers"][0]
    assert worker["timed_out"] == (how == "hang")
    assert worker["lost"] == {"exit": 3, "sigkill": 3, "segfault": 3, "memory": 1}.get(how, 0)


def test_a_timeout_kills_exactly_the_job_that_ran_over(cluster):
    cluster.start_worker(2)
    client = cluster.client()
    neighbour = client.submit(lambda: (time.sleep(1.5), os.getpid())[1])
    over = client.options(timeout=0.5).submit(lambda: (time.sleep(30), os.getpid())[1])
    with pytest.raises(TimeoutError):       # JobTimeout is a TimeoutError
        over.result(10)
    assert neighbour.result(10) > 0         # the other child was untouched


def test_retries_then_success(cluster):
    cluster.start_worker(1)
    client = cluster.client()
    counter = cluster.tmp_path / "count"
    job = client.options(retries=2, retry_delay=0.01).submit(
        fail_times, counter, 2, RuntimeError("flaky"), "third time")
    assert job.result(20) == "third time"
    assert attempts(counter) == 4       # three calls, and ours
    assert cluster.status()["workers"][0]["retried"] == 2


def test_retries_exhausted_raise_the_last_error_naming_the_attempt(cluster):
    cluster.start_worker(1)
    client = cluster.client(retries=1, retry_delay=0.01)
    with pytest.raises(RuntimeError, match="flaky") as info:
        client.submit(fail_times, cluster.tmp_path / "count", 5, RuntimeError("flaky"), None).result(20)
    assert "attempt 2" in str(info.value.__cause__)


def test_retry_on_filters_which_errors_are_retried(cluster):
    cluster.start_worker(1)
    client = cluster.client().options(retries=3, retry_delay=0.01, retry_on=(KeyError,))
    counter = cluster.tmp_path / "count"
    with pytest.raises(ValueError):
        client.submit(fail_times, counter, 5, ValueError("not retried"), None).result(20)
    assert attempts(counter) == 2       # one call, and ours
    other = cluster.tmp_path / "other"
    assert client.submit(fail_times, other, 1, KeyError("retried"), "ok").result(20) == "ok"


def test_a_timed_out_attempt_is_retried(cluster):
    cluster.start_worker(1)
    client = cluster.client()
    job = client.options(timeout=1, retries=1, retry_delay=0.01).submit(
        hang_times, cluster.tmp_path / "count", 1, "second attempt")
    assert job.result(30) == "second attempt"
    assert cluster.status()["workers"][0]["timed_out"] == 1


def test_higher_priority_runs_first_then_fifo(cluster):
    cluster.start_worker(1)
    client = cluster.client()
    go, order = cluster.tmp_path / "go", cluster.tmp_path / "order"
    blocker = client.submit(wait_for_file, go)
    filler = client.submit(mark, order, "filler")    # prefetched while the blocker runs
    cluster.wait_for(lambda s: s["running"] == 1 and s["queued"] == 1, "the worker to hold both")
    plan = [("low", -5), ("a", 0), ("high", 10), ("b", 0), ("higher", 20), ("c", 0)]
    jobs = [client.options(priority=p).submit(mark, order, name) for name, p in plan]
    time.sleep(0.3)
    go.touch()
    for job in [blocker, filler, *jobs]:
        job.result(20)
    assert order.read_text().split() == ["filler", "higher", "high", "a", "b", "c", "low"]


def test_cancel_a_queued_job(cluster):
    cluster.start_worker(1)
    client = cluster.client()
    go, ran = cluster.tmp_path / "go", cluster.tmp_path / "ran"
    blocker = client.submit(wait_for_file, go)
    filler = client.submit(abs, -1)
    cluster.wait_for(lambda s: s["running"] == 1 and s["queued"] == 1, "the worker to hold both")
    queued = [client.submit(mark, ran, i) for i in range(3)]
    cluster.wait_for(lambda s: s["queued"] == 4, "the jobs to queue")
    assert all(f.cancel() for f in queued)
    assert all(f.cancelled() for f in queued)
    assert cluster.status()["queued"] == 1
    go.touch()
    assert blocker.result(10) is None and filler.result(10) == 1
    assert client.submit(abs, -2).result(10) == 2
    assert not ran.exists()


def test_cancel_a_prefetched_job_and_not_a_running_one(cluster):
    cluster.start_worker(1)
    client = cluster.client()
    go, ran = cluster.tmp_path / "go", cluster.tmp_path / "ran"
    running = client.submit(wait_for_file, go, "finished")
    prefetched = client.submit(mark, ran, "should not run")
    cluster.wait_for(lambda s: s["running"] == 1 and s["workers"][0]["queued"] == 1,
                     "the second job to be prefetched")
    assert prefetched.cancel() and prefetched.cancelled()
    assert not running.cancel() and not running.cancelled()
    go.touch()
    assert running.result(10) == "finished"
    assert client.submit(abs, -3).result(10) == 3
    assert not ran.exists()


def test_cancel_right_after_a_job_starts_leaves_it_running(cluster):
    cluster.start_worker(1)
    client = cluster.client()
    for i in range(3):
        started, go = cluster.tmp_path / f"started{i}", cluster.tmp_path / f"go{i}"
        job = client.submit(lambda s, g: (mark(s), wait_for_file(g, "finished"))[1], started, go)
        wait_for_file(started)      # before the worker has reported it running
        assert not job.cancel()
        go.touch()
        assert job.result(10) == "finished"


def test_retries_do_not_wait_for_an_idle_worker_to_look_again(cluster):
    cluster.start_worker(1)
    client = cluster.client()
    time.sleep(0.3)     # the worker is now waiting in the broker for work
    start = time.monotonic()
    job = client.options(retries=3, retry_delay=0.01).submit(
        fail_times, cluster.tmp_path / "count", 3, RuntimeError("flaky"), "ok")
    assert job.result(20) == "ok"
    assert time.monotonic() - start < 3     # not one wait_slice (2 s) per retry


def test_force_cancel_kills_the_running_job(cluster):
    cluster.start_worker(1)
    client = cluster.client()
    started = cluster.tmp_path / "started"
    job = client.submit(lambda: (mark(started), time.sleep(60)))
    wait_for_file(started)
    assert client.cancel(job, force=True)
    assert job.cancelled()
    assert client.submit(abs, -4).result(10) == 4       # a fresh child took over
    assert cluster.status()["running"] == 0


def test_shutdown_with_cancel_futures_withdraws_queued_jobs(cluster):
    cluster.start_worker(1)
    client = cluster.client()
    go = cluster.tmp_path / "go"
    running = client.submit(wait_for_file, go, "done")
    queued = [client.submit(abs, -i) for i in range(10)]
    cluster.wait_for(lambda s: s["running"] == 1, "the first job to run")
    stopper = threading.Thread(target=client.shutdown, kwargs={"cancel_futures": True})
    stopper.start()
    cluster.wait_for(lambda s: s["queued"] == 0, "the queued jobs to go")
    go.touch()
    stopper.join(10)
    assert running.result(10) == "done"
    assert all(f.cancelled() for f in queued)


def test_a_crashed_client_has_its_queued_jobs_dropped(empty):
    address = empty.start_broker(env={"MPQUEUE_CLIENT_GRACE": "0.5"})
    empty.start_worker(1)
    script = f"""
import os, time
from mpqueue import Client
c = Client("{address}")
fs = [c.submit(time.sleep, 10) for _ in range(20)]
time.sleep(1)
os._exit(1)      # crash: no shutdown, no goodbye
"""
    result = python(script)
    assert result.returncode == 1, result.stderr
    status = empty.wait_for(lambda s: s["queued"] == 0 and s["clients"] == 0, "the jobs to be dropped")
    assert status["running"] <= 1      # the one already running finishes, unseen


def test_max_tasks_per_child_recycles_children(cluster):
    cluster.start_worker(1, "--max-tasks-per-child", "2")
    client = cluster.client()
    pids = [client.submit(os.getpid).result(10) for _ in range(6)]
    assert len(set(pids)) == 3
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4] == pids[5]


def test_a_child_over_the_memory_limit_is_recycled_after_its_job(cluster):
    # Measured only between jobs here: the one growing while running is in MATRIX.
    cluster.start_worker(1, "--max-memory-per-child", "200", env={"MPQUEUE_MEMORY_CHECK": "60"})
    client = cluster.client()

    def keep_memory():
        global kept
        kept = b"x" * (300 << 20)
        return os.getpid()

    first = client.submit(keep_memory).result(20)
    assert client.submit(os.getpid).result(10) != first


def test_ctrl_c_reaches_the_worker_not_the_jobs(empty):
    empty.start_broker()
    worker = empty.popen(["mpqueue", "worker", empty.address, "--procs", "1"], "worker",
                         start_new_session=True)
    empty.wait_for(lambda s: len(s["workers"]) == 1, "the worker")
    client = empty.client()
    started, go = empty.tmp_path / "started", empty.tmp_path / "go"
    job = client.submit(lambda: (mark(started), wait_for_file(go), "survived")[2])
    wait_for_file(started)
    os.killpg(worker.pid, signal.SIGINT)    # as Ctrl-C does, to the whole process group
    time.sleep(0.3)
    go.touch()
    assert job.result(10) == "survived"
    assert worker.wait(10) == 0


@pytest.mark.parametrize("options, error", [
    ({"timeout": 0}, ValueError), ({"timeout": -1}, ValueError), ({"retries": -1}, ValueError),
    ({"retries": 1.5}, ValueError), ({"retry_delay": -1}, ValueError),
    ({"retry_on": "ValueError"}, TypeError), ({"retry_on": (ValueError, int)}, TypeError),
    ({"priority": "high"}, TypeError), ({"tiemout": 3}, TypeError),
])
def test_bad_options_are_refused(cluster, options, error):
    client = cluster.client()
    with pytest.raises(error):
        client.options(**options)
    with pytest.raises(error):
        Client(cluster.address, **options)


def test_options_do_not_take_the_functions_keywords(cluster):
    cluster.start_worker(1)
    client = cluster.client()

    def f(timeout, priority=0, retries=0):
        return timeout, priority, retries

    assert client.options(timeout=5).submit(f, 1, priority=2, retries=3).result(10) == (1, 2, 3)
    assert list(client.options(priority=1).map(f, [7])) == [(7, 0, 0)]
