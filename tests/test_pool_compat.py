"""`mpqueue.Pool` against the behaviour `multiprocessing.pool.Pool` promises.

The cases follow CPython's own pool tests (``_TestPool`` and its neighbours
in ``Lib/test/_test_multiprocessing.py``), restated for a pool whose jobs run
on a real cluster; the last ones cover what is ours: the initializer on
shared workers, lazy imap, the bound of ``processes`` on a cluster, chunk
sizes. Where we differ from the stdlib on purpose, docs/migrating.md says so,
and the test says what we do instead.
"""

from __future__ import annotations

import concurrent.futures
import functools
import gc
import itertools
import multiprocessing
import multiprocessing.pool
import os
import pickle
import sys
import threading
import time
import weakref

import cloudpickle
import pytest

from mpqueue import Pool
from mpqueue.multiprocessing import AUTO_WINDOW_PER_PROC, FIXED_WINDOW, MAX_AUTO_CHUNK

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def sqr(x, wait=0.0):
    time.sleep(wait)
    return x * x


def mul(x, y):
    return x * y


def identity(x):
    return x


def raise_large_valueerror(wait):
    time.sleep(wait)
    raise ValueError("x" * 1024 ** 2)


def raising():
    raise KeyError("key")


def raise_with_comment():
    raise RuntimeError(123)  # some comment


def wait_for_file(path, value=None):
    while not path.exists():
        time.sleep(0.01)
    return value


class SayWhenError(ValueError):
    pass


def exception_throwing_generator(total, when):
    if when == -1:
        raise SayWhenError("Somebody said when")
    for i in range(total):
        if i == when:
            raise SayWhenError("Somebody said when")
        yield i


class Counted:
    pass


@pytest.fixture
def pool(cluster):
    """Four at a time on a two-process worker, as the stdlib's tests use Pool(4)."""
    cluster.start_worker(2)
    p = Pool(4, address=cluster.address)
    yield p
    p.terminate()
    p.join()


# -- the calls ---------------------------------------------------------------------------

def test_apply_map_starmap_imap_give_what_the_builtins_give(pool):
    assert pool.apply(sqr, (5,)) == 25
    assert pool.apply(sqr, (), {"x": 3}) == 9
    assert pool.map(sqr, range(10)) == [sqr(i) for i in range(10)]
    assert pool.map(sqr, range(100), chunksize=20) == [sqr(i) for i in range(100)]
    pairs = list(zip(range(100), range(99, -1, -1)))
    assert pool.starmap(mul, pairs[:10]) == list(itertools.starmap(mul, pairs[:10]))
    assert pool.starmap(mul, pairs, chunksize=20) == list(itertools.starmap(mul, pairs))
    assert pool.starmap_async(mul, pairs).get(30) == list(itertools.starmap(mul, pairs))
    assert pool.map_async(sqr, range(10)).get(30) == [sqr(i) for i in range(10)]

    assert list(pool.imap(sqr, range(10))) == [sqr(i) for i in range(10)]
    it = pool.imap(sqr, range(10))
    for i in range(10):
        assert next(it) == i * i
    with pytest.raises(StopIteration):
        next(it)
    it = pool.imap(sqr, range(1000), chunksize=100)
    assert [next(it) for _ in range(1000)] == [sqr(i) for i in range(1000)]
    with pytest.raises(StopIteration):
        next(it)
    assert sorted(pool.imap_unordered(sqr, range(10))) == [sqr(i) for i in range(10)]
    assert sorted(pool.imap_unordered(sqr, range(1000), chunksize=100)) == [sqr(i) for i in range(1000)]

    # Empty inputs do not stall (bpo-12157).
    assert pool.map(sqr, []) == []
    assert list(pool.imap(sqr, [])) == []
    assert list(pool.imap_unordered(sqr, [])) == []
    assert pool.map_async(sqr, [], chunksize=1).get(timeout=5) == []

    # Arguments and results are not kept alive (bpo-29861). The stdlib counts
    # live objects in a class attribute; a class sent by value has its
    # attributes overwritten by each copy that comes back, so weak
    # references do the counting here.
    objs = [Counted() for _ in range(10)]
    refs = [weakref.ref(o) for o in objs]
    results = pool.map(identity, objs)
    assert len(results) == 10 and all(type(r) is Counted for r in results)
    refs += [weakref.ref(r) for r in results]
    del objs, results
    gc.collect()
    time.sleep(0.1)
    assert {r() for r in refs} == {None}


def test_callbacks(pool, caplog):
    calls = []
    pool.map_async(int, ["1"], callback=calls.append, error_callback=calls.append).wait(30)
    assert calls == [[1]]
    pool.map_async(int, ["a"], callback=calls.append, error_callback=calls.append).wait(30)
    assert len(calls) == 2 and isinstance(calls[1], ValueError)

    seen = []
    result = pool.apply_async(raising, error_callback=seen.append)
    with pytest.raises(KeyError):
        result.get(30)
    assert len(seen) == 1 and isinstance(seen[0], KeyError)

    # A callback that raises is logged, and the result is ready all the same
    # (the stdlib's result thread dies of it, and the pool hangs).
    def bad_callback(value):
        raise ZeroDivisionError("in the callback")

    assert pool.apply_async(sqr, (3,), callback=bad_callback).get(30) == 9
    assert "exception calling callback" in caplog.text


def test_async_result_get_wait_ready_successful(pool):
    result = pool.apply_async(sqr, (7, 0.5))
    with pytest.raises(ValueError, match="not ready"):
        result.successful()
    assert not result.ready()
    started = time.monotonic()
    assert result.get() == 49
    assert 0.4 < time.monotonic() - started < 10
    assert result.ready() and result.successful()

    slow = pool.apply_async(sqr, (6, 30))
    started = time.monotonic()
    with pytest.raises(multiprocessing.TimeoutError):
        slow.get(timeout=0.3)
    assert 0.25 < time.monotonic() - started < 2
    slow.wait(0.1)
    assert not slow.ready()

    failed = pool.apply_async(raising)
    failed.wait(30)
    assert failed.ready() and not failed.successful()


# -- errors ------------------------------------------------------------------------------------

def test_an_input_that_raises_part_way(pool):
    """The input's exception is raised in the caller: by map; by imap after
    the results of the items before it (those of the chunk being read when
    it raised are lost, as in the stdlib)."""

    class SpecialIterable:
        def __iter__(self):
            return self

        def __next__(self):
            raise SayWhenError

        def __len__(self):
            return 1

    for call in ("map", "imap", "imap_unordered"):
        method = getattr(pool, call)

        def run(total, when, chunksize, expect):
            results = []
            with pytest.raises(SayWhenError) as info:
                for value in method(sqr, exception_throwing_generator(total, when), chunksize):
                    results.append(value)
            assert info.value.__cause__ is None     # raised here, not on the cluster
            if call == "imap_unordered":
                assert set(results) <= {i * i for i in range(total)}
            else:
                assert results == expect, call

        run(1, -1, 1, [])
        run(1, -1, 1, [])   # again: nothing was left in a bad state
        if call == "map":
            run(10, 3, 1, [])
        else:
            run(10, 3, 1, [0, 1, 4])
            run(20, 7, 2, [i * i for i in range(6)])
            run(20, 7, 4, [i * i for i in range(4)])
        for _ in range(2):
            with pytest.raises(SayWhenError):
                list(method(sqr, SpecialIterable(), 1))


def test_what_cannot_be_pickled_fails_its_call_and_nothing_else(pool):
    class A:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    # bpo-19425: an argument that does not pickle raises what pickling
    # raised, without a hang.
    with pytest.raises(RuntimeError, match="cannot pickle"):
        pool.map(sqr, [A()] * 10)
    with pytest.raises(RuntimeError, match="cannot pickle"):
        pool.apply(sqr, (A(),))

    # A result that does not pickle: the stdlib raises MaybeEncodingError;
    # we raise the PicklingError every mpqueue job raises (docs/migrating.md).
    # Either way the pool keeps its processes.
    for _ in range(5):
        seen = []
        result = pool.apply_async(threading.Lock, error_callback=seen.append)
        with pytest.raises(pickle.PicklingError, match="result"):
            result.get(30)
        assert isinstance(seen[0], pickle.PicklingError)
    assert pool.map(sqr, [1, 2]) == [1, 4]


def test_remote_traceback_is_chained_with_the_failing_line(pool, capsys):
    with pytest.raises(RuntimeError) as info:
        pool.apply(raise_with_comment)
    exc = info.value
    assert type(exc) is RuntimeError and exc.args == (123,)
    assert type(exc.__cause__) is multiprocessing.pool.RemoteTraceback
    assert "raise RuntimeError(123)  # some comment" in exc.__cause__.tb
    try:
        raise exc
    except RuntimeError:
        sys.excepthook(*sys.exc_info())
    assert "raise RuntimeError(123)  # some comment" in capsys.readouterr().err

    with pytest.raises(ZeroDivisionError) as info:
        pool.map(lambda x: 1 / x, [1, 0], chunksize=1)     # the lambda's line
    assert "1 / x, [1, 0], chunksize=1)     # the lambda's line" in info.value.__cause__.tb

    # An exception from the input is not a remote one.
    with pytest.raises(SayWhenError) as info:
        pool.map(sqr, exception_throwing_generator(1, -1), 1)
    assert type(info.value) is SayWhenError and info.value.__cause__ is None


def test_map_raises_only_once_every_job_has_finished(cluster):
    cluster.start_worker(2)
    started = time.monotonic()
    with pytest.raises(ValueError):
        with Pool(2, address=cluster.address) as p:
            try:
                p.map(raise_large_valueerror, [0, 1])
            finally:
                p.close()
                p.join()
    assert time.monotonic() - started > 0.9


# -- the pool's life ------------------------------------------------------------------------

def test_bad_sizes_and_arguments_are_refused_before_anything_starts():
    for processes in (-1, 0):
        with pytest.raises(ValueError):
            Pool(processes)
    for value in (0, -1, 0.5, "12"):
        with pytest.raises(ValueError):
            Pool(3, maxtasksperchild=value)
    with pytest.raises(TypeError):
        Pool(1, initializer="not callable")


def test_closed_and_terminated_pools_refuse_work(cluster):
    cluster.start_worker(1)
    with Pool(2, address=cluster.address) as p:
        assert p.map_async(sqr, range(10)).get(30) == [sqr(i) for i in range(10)]
        with pytest.raises(ValueError, match="still running"):
            p.join()
    p.join()
    with pytest.raises(ValueError):
        p.map_async(sqr, range(10))
    with pytest.raises(ValueError):     # bpo-35477: entering a pool that is not running
        with p:
            pass

    p = Pool(2, address=cluster.address)
    result = p.map_async(sqr, range(5))
    p.close()
    for call in (lambda: p.apply(sqr, (1,)), lambda: p.imap(sqr, [1]), lambda: p.starmap(mul, [])):
        with pytest.raises(ValueError, match="Pool not running"):
            call()
    p.join()
    assert result.get(0) == [sqr(i) for i in range(5)]     # close() lets submitted work finish


def test_terminate_withdraws_and_kills_at_once(cluster):
    cluster.start_worker(2)
    p = Pool(3, address=cluster.address)
    result = p.map_async(time.sleep, [60] * 10_000, chunksize=1)
    cluster.wait_for(lambda s: s["running"] == 2, "two jobs to run")
    started = time.monotonic()
    p.terminate()
    p.join()
    assert time.monotonic() - started < 5
    # The stdlib leaves such a result unfinished forever; ours fails.
    with pytest.raises(concurrent.futures.CancelledError):
        result.get(5)
    cluster.wait_for(lambda s: s["running"] == 0 and s["queued"] == 0, "the jobs to be gone")


def test_maxtasksperchild_is_accepted_and_not_enforced(cluster):
    cluster.start_worker(2)
    with pytest.warns(RuntimeWarning, match="maxtasksperchild"):
        p = Pool(3, maxtasksperchild=1, address=cluster.address)
    results = [p.apply_async(sqr, (i, 0.1)) for i in range(6)]
    p.close()
    p.join()    # bpo-10332: closing before the tasks completed must not hang join()
    assert [r.get(0) for r in results] == [sqr(i) for i in range(6)]


def test_private_local_cluster_runs_and_stops(isolated):
    from helpers import tagged_processes
    with Pool(2) as p:
        assert p.map(sqr, range(10)) == [sqr(i) for i in range(10)]
        assert tagged_processes(isolated), "the private cluster should be running"
        slow = p.map_async(time.sleep, [60] * 100, chunksize=1)
        started = time.monotonic()
    p.join()
    assert time.monotonic() - started < 10
    with pytest.raises(concurrent.futures.CancelledError):
        slow.get(1)
    # The isolated fixture proves nothing is left behind.


def test_a_dropped_running_pool_warns_and_is_terminated(isolated):
    p = Pool(1)
    assert p.apply(sqr, (3,)) == 9
    with pytest.warns(ResourceWarning, match="unclosed running multiprocessing pool"):
        del p
        gc.collect()
    # Its private cluster stops in the background; the isolated fixture waits for that.


# -- what is ours ------------------------------------------------------------------------------

INIT_VALUE = None


def set_init_value(log, value):
    global INIT_VALUE
    INIT_VALUE = value
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")


def read_init_value(_):
    time.sleep(0.01)
    return INIT_VALUE, os.getpid()


def read_init_value_plus_one(_):
    time.sleep(0.01)
    return INIT_VALUE + 1


def test_initializer_runs_before_the_first_job_in_each_process(cluster, tmp_path):
    """An importable initializer runs once per process; one sent by value,
    once per process and function, so its globals are set where they are read."""
    (tmp_path / "initmod.py").write_text(
        "import os\n"
        "VALUE = None\n"
        "def init(log, value):\n"
        "    global VALUE\n"
        "    VALUE = value\n"
        "    with open(log, 'a') as f:\n"
        "        f.write(f'{os.getpid()}\\n')\n"
        "def work(x):\n"
        "    return VALUE + x\n"
        "def other(x):\n"
        "    return VALUE * x\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import initmod
        cluster.start_worker(2, env={"PYTHONPATH": str(tmp_path)})
        log = tmp_path / "imported.log"
        with Pool(2, initializer=initmod.init, initargs=(log, 10), address=cluster.address) as p:
            assert p.map(initmod.work, range(40), chunksize=1) == [10 + x for x in range(40)]
            assert p.apply(initmod.other, (3,)) == 30
        pids = log.read_text().split()
        assert 1 <= len(pids) <= 2 and len(set(pids)) == len(pids), pids
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("initmod", None)

    log = tmp_path / "by-value.log"
    with Pool(2, initializer=set_init_value, initargs=(log, 42), address=cluster.address) as p:
        values = p.map(read_init_value, range(40), chunksize=1)
        assert {v for v, _ in values} == {42}
        assert p.map(read_init_value_plus_one, range(10), chunksize=1) == [43] * 10
    pids = log.read_text().split()
    assert all(pids.count(pid) <= 2 for pid in pids), pids
    assert {pid for _, pid in values} <= {int(pid) for pid in pids}


def settled(read: list, timeout: float = 15) -> int:
    """How many items the feeder has read, once it stops reading."""
    deadline = time.monotonic() + timeout
    while True:
        before = len(read)
        time.sleep(0.2)
        if len(read) == before:
            return before
        assert time.monotonic() < deadline, "the input is read without end"


def test_imap_reads_an_endless_input_only_a_window_ahead(cluster):
    cluster.start_worker(2)
    pool = Pool(address=cluster.address)    # no bound on the jobs out: only the window holds it
    # (imap, chunksize, most items read ahead): the window's chunks, and the
    # one the consumer is in; the window is 2 jobs per process (of 2 here)
    # with chunks sized by time, or FIXED_WINDOW jobs of the given size.
    for method, chunksize, most in ((pool.imap, None, (AUTO_WINDOW_PER_PROC * 2 + 1) * MAX_AUTO_CHUNK),
                                    (pool.imap_unordered, 1, FIXED_WINDOW + 1)):
        read = []

        def numbers():
            for i in itertools.count():
                read.append(i)
                yield i

        it = method(sqr, numbers(), chunksize)
        results = list(itertools.islice(it, 50))
        if method == pool.imap:
            assert results == [i * i for i in range(50)]
        else:
            assert len(set(results)) == 50
        assert settled(read) <= 50 + most
        del it      # a dropped iterator stops its feed
    pool.close()
    started = time.monotonic()
    pool.join()
    assert time.monotonic() - started < 10


def test_processes_bounds_the_pools_jobs_on_a_cluster(cluster, tmp_path):
    cluster.start_worker(4)
    release = tmp_path / "release"
    with Pool(2, address=cluster.address) as p:
        result = p.map_async(wait_for_file, [release] * 8, chunksize=1)
        cluster.wait_for(lambda s: s["running"] == 2, "two jobs to run")
        time.sleep(0.3)     # time enough for more to be sent, were they allowed
        status = cluster.status()
        assert (status["running"], status["queued"]) == (2, 0), status
        release.touch()
        assert result.get(30) == [None] * 8


def test_chunksize_is_honoured_and_chosen_when_absent(cluster):
    cluster.start_worker(2)
    with Pool(2, address=cluster.address) as p:
        assert p.map(identity, range(1000), chunksize=100) == list(range(1000))
        assert cluster.status()["done"] == 10
        assert p.map(identity, range(20_000)) == list(range(20_000))
        jobs = cluster.status()["done"] - 10
        # One job per item would be 20,000; the stdlib's len / (4 * processes) is 8.
        assert jobs <= 50, jobs
        assert list(p.imap(identity, range(20_000))) == list(range(20_000))
        jobs = cluster.status()["done"] - 10 - jobs
        assert jobs <= 50, jobs


def test_apply_async_calls_back_once_each_in_a_thread_of_the_pool(cluster):
    """A burst of apply_async calls (which the feeder sends in batches): each
    gets its own result or exception, its callback or error_callback runs
    once, in a thread of the pool's, and every thread waiting on a result
    wakes when it is set."""
    cluster.start_worker(2)
    with Pool(address=cluster.address) as p:   # no bound: the burst goes out at once
        seen = []

        def record(value_or_error):
            seen.append((value_or_error, threading.get_ident()))

        results = [p.apply_async(sqr, (i,), callback=record, error_callback=record) if i % 10 else
                   p.apply_async(raising, callback=record, error_callback=record)
                   for i in range(2000)]
        for i, result in enumerate(results):
            if i % 10:
                assert result.get(30) == i * i
            else:
                with pytest.raises(KeyError):
                    result.get(30)
        assert sorted(v for v, _ in seen if not isinstance(v, KeyError)) == [
            i * i for i in range(2000) if i % 10]
        assert sum(isinstance(v, KeyError) for v, _ in seen) == 200
        assert threading.get_ident() not in {thread for _, thread in seen}

        slow = p.apply_async(sqr, (3, 0.5))
        for timeout in (0, -1, 0.01):
            slow.wait(timeout)
            assert not slow.ready()
        values = []
        waiters = [threading.Thread(target=lambda: values.append(slow.get(30))) for _ in range(4)]
        for waiter in waiters:
            waiter.start()
        for waiter in waiters:
            waiter.join(30)
        assert values == [9] * 4 and slow.ready() and slow.successful()


def test_terminate_calls_back_once_for_each_call(cluster):
    """terminate() amid a burst: each result gets one callback or one
    error_callback. (An apply_async whose job was out, but whose input the
    feeder had not yet found ended, used to get a CancelledError from the
    terminate, and then another as its job was withdrawn.)"""
    cluster.start_worker(2)
    for _ in range(5):
        p = Pool(2, address=cluster.address)
        calls: list = []

        def record(i, value_or_error, calls=calls):
            calls.append((i, value_or_error))

        results = [p.apply_async(sqr, (i, 0.01), callback=functools.partial(record, i),
                                 error_callback=functools.partial(record, i)) for i in range(200)]
        time.sleep(0.2)
        p.terminate()
        p.join()
        for result in results:      # a job that finished as it was withdrawn may still be coming
            result.wait(10)
        time.sleep(0.2)             # time for a second callback, were there one
        assert all(result.ready() for result in results)
        assert sorted(i for i, _ in calls) == list(range(200))
        for i, value_or_error in calls:
            assert value_or_error == i * i or isinstance(value_or_error, concurrent.futures.CancelledError)
