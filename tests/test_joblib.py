"""The "mpqueue" joblib backend, through joblib's public API only."""

from __future__ import annotations

import importlib
import os
import sys
import time
from types import SimpleNamespace

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


def fails_to_set_up(what):
    raise LookupError(f"cannot set up {what}")  # the initializer's line


# A module the workers import, as a user's would be installed there: its
# globals are the process's, shared by the initializer and the tasks. (This
# file's functions travel by value, each with a private copy of its globals.)
SETUP_MODULE = """
import os
import time

state = None

def set_up(value, log):
    global state
    state = value
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\\n")

def read_state(i):
    time.sleep(0.01)    # long enough that both processes take part
    return state, os.getpid()
"""


@pytest.fixture
def workers_module(tmp_path, monkeypatch):
    """`SETUP_MODULE`, importable here and by workers started with ``env``."""
    path = tmp_path / "importable"
    path.mkdir()
    (path / "jl_setup.py").write_text(SETUP_MODULE)
    monkeypatch.syspath_prepend(str(path))
    yield SimpleNamespace(module=importlib.import_module("jl_setup"), env={"PYTHONPATH": str(path)},
                          log=tmp_path / "initialized")
    sys.modules.pop("jl_setup", None)


@pytest.mark.parametrize("given_to", ["Parallel", "parallel_config"])
def test_the_initializer_runs_once_per_process_and_call(cluster, workers_module, given_to):
    cluster.start_worker(2, env=workers_module.env)
    init = dict(initializer=workers_module.module.set_up, initargs=("ready", str(workers_module.log)))
    config, per_call = (init, {}) if given_to == "parallel_config" else ({}, init)
    with parallel_config(backend="mpqueue", address=cluster.address, **config):
        for _ in range(2):  # the second call initializes again
            out = Parallel(n_jobs=2, batch_size=1, **per_call)(
                delayed(workers_module.module.read_state)(i) for i in range(60))
            assert {state for state, _ in out} == {"ready"}, "a task ran before the initializer"
            initialized = sorted(int(pid) for pid in workers_module.log.read_text().split())
            workers_module.log.unlink()
            assert initialized == sorted({pid for _, pid in out}), "once in each process, per call"
            assert len(initialized) == 2


def test_parallel_keywords_override_parallel_config(cluster, workers_module):
    cluster.start_worker(2, env=workers_module.env)
    with parallel_config(backend="mpqueue", address=cluster.address,
                         initializer=workers_module.module.set_up, initargs=("config", os.devnull)):
        out = Parallel(n_jobs=2, initargs=("call", os.devnull))(
            delayed(workers_module.module.read_state)(i) for i in range(10))
    assert {state for state, _ in out} == {"call"}


def test_an_initializer_that_raises_fails_the_call(cluster):
    cluster.start_worker(2)
    started = time.monotonic()
    with parallel_config(backend="mpqueue", address=cluster.address):
        with pytest.raises(LookupError, match="cannot set up the database") as info:
            Parallel(n_jobs=2, initializer=fails_to_set_up, initargs=("the database",))(
                delayed(square_and_pid)(i) for i in range(20))
    assert time.monotonic() - started < 10
    assert "the initializer's line" in str(info.value.__cause__)
    cluster.wait_for(lambda s: s["queued"] == 0 and s["running"] == 0, "the queue to drain")
    with pytest.raises(TypeError, match="initializer must be a callable"):
        parallel_config(backend="mpqueue", initializer="not a function")


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


def inner_parallel(i):
    """A task that runs a Parallel call of its own, as nested joblib code does."""
    return sum(Parallel(n_jobs=2)(delayed(abs)(-j) for j in range(i)))


def test_a_task_may_run_a_parallel_call_of_its_own(cluster):
    cluster.start_worker(2)
    with parallel_config(backend="mpqueue", address=cluster.address):
        assert Parallel(n_jobs=2)(delayed(inner_parallel)(i) for i in range(6)) == \
            [sum(range(i)) for i in range(6)]
