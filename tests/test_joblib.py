"""The "mpqueue" joblib backend, through joblib's public API only."""

from __future__ import annotations

import os
import sys
import time

import cloudpickle
import pytest

joblib = pytest.importorskip("joblib")
from joblib import Parallel, delayed, effective_n_jobs, parallel_config  # noqa: E402

import mpqueue.joblib  # noqa: E402,F401  (registers the backend)
from mpqueue import Client  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def square_and_pid(x):
    return x * x, os.getpid()


def fails_on_seven(x):
    if x == 7:
        raise KeyError(f"no {x} here")  # the failing line
    return x


def test_parallel_runs_on_the_cluster(cluster):
    cluster.start_worker(2)
    with parallel_config(backend="mpqueue", address=cluster.address):
        out = Parallel()(delayed(square_and_pid)(i) for i in range(1000))
    assert [square for square, _ in out] == [i * i for i in range(1000)]
    assert os.getpid() not in {pid for _, pid in out}
    status = cluster.status()
    assert 0 < status["done"] < 1000, "joblib should batch the calls into fewer jobs"
    assert status["clients"] == 0, "the backend's client should be closed after the call"


def test_n_jobs_counts_the_cluster_processes(cluster):
    cluster.start_worker(2)
    cluster.start_worker(3)
    with parallel_config(backend="mpqueue", address=cluster.address):
        assert effective_n_jobs(-1) == 5
        assert effective_n_jobs(-2) == 4
        assert effective_n_jobs(2) == 2
        with pytest.raises(ValueError):
            effective_n_jobs(0)
        out = Parallel(n_jobs=-1, return_as="generator")(delayed(abs)(-i) for i in range(50))
        assert list(out) == list(range(50))
        out = Parallel(n_jobs=-1, return_as="generator_unordered")(delayed(abs)(-i) for i in range(50))
        assert sorted(out) == list(range(50))


def test_an_exception_in_a_task_reaches_the_caller(cluster):
    cluster.start_worker(2)
    with parallel_config(backend="mpqueue", address=cluster.address):
        with pytest.raises(KeyError, match="no 7 here") as info:
            Parallel(n_jobs=-1, batch_size=1)(delayed(fails_on_seven)(i) for i in range(20))
    assert "the failing line" in str(info.value.__cause__)
    # The remaining calls were withdrawn or finished: nothing is left on the cluster.
    cluster.wait_for(lambda s: s["queued"] == 0 and s["running"] == 0, "the queue to drain")


def test_a_client_of_yours_and_job_options(cluster, tmp_path):
    cluster.start_worker(2)
    with Client(cluster.address) as client:
        with parallel_config(backend="mpqueue", client=client):
            assert Parallel()(delayed(abs)(-i) for i in range(10)) == list(range(10))
            assert Parallel()(delayed(abs)(-i) for i in range(10)) == list(range(10))
        assert client.submit(abs, -3).result(10) == 3   # still open: it is yours
    with parallel_config(backend="mpqueue", address=cluster.address, timeout=0.5):
        started = time.monotonic()
        with pytest.raises(mpqueue.JobTimeout):
            Parallel(n_jobs=2)(delayed(time.sleep)(30) for _ in range(2))
        assert time.monotonic() - started < 10
