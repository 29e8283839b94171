"""Every job's story, as `mpqueue jobs` tells it: the right cause for each
case of the crash matrix, a history that survives a kill -9 of a --journal
broker, and logs that parse as JSON, one object a line."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import time

import cloudpickle
import pytest

from helpers import eventually, logs
from mpqueue import Client, JobTimeout, WorkerLost

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def returns(x):
    return x


def raises():
    raise ValueError("bad input")


def hangs():
    time.sleep(60)


def kills_itself():
    os.kill(os.getpid(), signal.SIGKILL)


def segfaults():
    ctypes.string_at(0)


def hogs_memory():
    block = b"x" * (300 << 20)      # written, so resident
    time.sleep(30)
    return len(block)


def jobs(cluster, *args: str) -> list[dict]:
    result = cluster.run("jobs", cluster.address, "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def job_of(cluster, function) -> dict:
    """The newest job of ``function`` that `mpqueue jobs` lists."""
    name = function.__qualname__
    (found, *_) = [j for j in jobs(cluster, "--limit", "100") if j["function"].endswith("." + name)]
    return found


@pytest.mark.parametrize("function, options, error, state, cause, tries", [
    (raises, {}, ValueError, "failed", "raised ValueError: bad input", 1),
    (hangs, {"timeout": 1}, JobTimeout, "timed_out", "timeout after 1 s", 1),
    (kills_itself, {}, WorkerLost, "lost", "died SIGKILL", 3),
    (segfaults, {}, WorkerLost, "lost", "died SIGSEGV", 3),
    (hogs_memory, {}, WorkerLost, "lost", "memory ", 1),
    (hangs, {}, None, "cancelled", "cancelled by its client", 1),
], ids=["raise", "timeout", "sigkill", "segfault", "memory", "cancel"])
def test_jobs_shows_how_each_failure_ended(cluster, function, options, error, state, cause, tries):
    worker = cluster.start_worker(1, "--max-memory-per-child", "100")
    client = cluster.client()
    future = client.options(**options).submit(function)
    cancel = error is None
    if cancel:
        cluster.wait_for(lambda s: s["running"] == 1, "the job to run")
        assert client.cancel(future, force=True)
    else:
        with pytest.raises(error):
            future.result(60)
    eventually(lambda: job_of(cluster, function)["state"] == state, f"the job to end {state}", timeout=20)
    job = job_of(cluster, function)
    assert job["cause"].startswith(cause) and len(job["attempts"]) == tries
    last = job["attempts"][-1]
    assert last["host"] and last["started"] <= last["ended"] and last["worker"]
    if not cancel:      # reported by the worker: the child's pid (a cancel is the broker's to see)
        assert last["pid"] not in (None, worker.pid)
    table = cluster.run("jobs", cluster.address).stdout.splitlines()
    assert table[0].split() == ["ID", "FUNCTION", "STATE", "TRIES", "TIME", "WORKER", "CAUSE"]
    row = next(line for line in table if line.startswith(str(job["id"])))
    assert state in row.split() and max(map(len, table)) <= 80
    story = cluster.run("jobs", cluster.address, str(job["id"]))
    assert story.returncode == 0 and f"job {job['id']}" in story.stdout
    if function is raises:
        assert "Traceback" in story.stdout and "ValueError: bad input" in story.stdout


def test_jobs_lists_newest_first_filters_and_says_what_is_running(cluster):
    cluster.start_worker(1)
    client = cluster.client()
    assert [f.result(30) for f in [client.submit(returns, i) for i in range(3)]] == [0, 1, 2]
    with pytest.raises(ValueError):
        client.submit(raises).result(30)
    running = client.submit(hangs)
    cluster.wait_for(lambda s: s["running"] == 1, "the job to run")
    listed = jobs(cluster)
    assert [j["state"] for j in listed] == ["running", "failed", "done", "done", "done"]
    finished = [j["finished"] for j in listed[1:]]
    assert finished == sorted(finished, reverse=True)      # newest first: by when each ended
    assert [j["state"] for j in jobs(cluster, "--running")] == ["running"]
    assert [j["state"] for j in jobs(cluster, "--failed")] == ["failed"]
    assert len(jobs(cluster, "--limit", "2")) == 2
    counters = cluster.status()["counters"]
    assert (counters["submitted"], counters["done"], counters["failed"]) == (5, 3, 1)
    client.cancel(running, force=True)
    missing = cluster.run("jobs", cluster.address, "12345")
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "no job 12345" in missing.stderr


def test_history_survives_a_kill_9_of_a_journal_broker(empty):
    journal = str(empty.tmp_path / "journal.db")
    empty.start_broker("--journal", journal)
    empty.start_worker(1)
    with Client(empty.address) as client:
        assert client.submit(returns, 7).result(30) == 7
        with pytest.raises(ValueError):
            client.submit(raises).result(30)
    before = jobs(empty)
    assert [j["state"] for j in before] == ["failed", "done"]
    port = empty.address.rsplit(":", 1)[1]
    empty.broker.kill()
    empty.broker.wait(10)
    empty.start_broker("--journal", journal, "--port", port)
    assert jobs(empty) == before
    assert "2 finished jobs' history" in logs(empty.broker)


def test_json_logs_are_one_object_a_line(empty):
    empty.start_broker("--log-format", "json")
    worker = empty.start_worker(1, "--log-format", "json", "--log-level", "info")
    client = empty.client()
    with pytest.raises(WorkerLost):
        client.submit(kills_itself).result(60)
    client.shutdown()
    worker.send_signal(signal.SIGTERM)
    worker.wait(20)
    lines = {name: [json.loads(line) for line in logs(proc).splitlines() if line.strip()]
             for name, proc in (("broker", empty.broker), ("worker", worker))}
    for line in lines["broker"] + lines["worker"]:
        assert {"time", "level", "logger", "message"} <= set(line)
    broker_events = [line.get("event") for line in lines["broker"]]
    assert {"worker_joined", "job_requeued", "worker_left"} <= set(broker_events)
    died = [line for line in lines["worker"] if line.get("event") == "child_died"]
    assert len(died) == 3 and all(line["signal"] == "SIGKILL" for line in died)
