"""Failures a user can cause, with real signals: nothing else is lost or hangs."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import cloudpickle
import psutil
import pytest

from helpers import eventually, kill_tree, logs, wait_for_file
from mpqueue import BrokerUnavailable, ClusterShutdown

cloudpickle.register_pickle_by_value(sys.modules[__name__])




def started_then_wait(started: Path, go: Path, value):
    started.touch()
    return wait_for_file(go, value)


def die_once(marker: Path, value):
    """Kill this process the first time; succeed when re-run."""
    if not marker.exists():
        marker.touch()
        os._exit(3)
    return value


def test_a_job_whose_child_dies_once_is_rerun(cluster):
    cluster.start_worker(1)
    client = cluster.client()
    assert client.submit(die_once, cluster.tmp_path / "died", "second time lucky").result(30) \
        == "second time lucky"


def test_kill_9_of_a_worker_and_its_children_loses_no_job(cluster):
    go = cluster.tmp_path / "go"
    victim = cluster.start_worker(2)
    client = cluster.client()
    futures = [client.submit(wait_for_file, go, i) for i in range(4)]
    cluster.wait_for(lambda s: s["running"] == 2, "jobs to run on the victim")
    kill_tree(victim.pid)
    cluster.start_worker(2)
    go.touch()
    assert [f.result(30) for f in futures] == [0, 1, 2, 3]


def record_then_wait(ran: Path, go: Path):
    with open(ran, "a") as f:
        f.write("x")
    return wait_for_file(go, ran.stat().st_size)


def test_kill_9_of_the_worker_alone_takes_its_children_down(cluster):
    ran, go = cluster.tmp_path / "ran", cluster.tmp_path / "go"
    victim = cluster.start_worker(1)
    client = cluster.client()
    job = client.submit(record_then_wait, ran, go)
    cluster.wait_for(lambda s: s["running"] == 1, "the job to run")
    orphans = psutil.Process(victim.pid).children(recursive=True)
    victim.kill()
    victim.wait()
    gone, alive = psutil.wait_procs(orphans, timeout=10)
    assert not alive, f"children outlived their worker: {alive}"
    cluster.start_worker(1)
    go.touch()
    assert job.result(20) == 2      # run again, and the first run never got past its start


def test_sigterm_is_a_warm_stop(cluster):
    started, go = cluster.tmp_path / "started", cluster.tmp_path / "go"
    worker = cluster.start_worker(1)
    client = cluster.client()
    running = client.submit(started_then_wait, started, go, "finished where it started")
    queued = [client.submit(abs, -i) for i in range(5)]
    wait_for_file(started, None)
    cluster.wait_for(lambda s: s["workers"][0]["queued"] >= 1, "a job to be prefetched")
    worker.send_signal(signal.SIGTERM)
    cluster.start_worker(1)
    # Its prefetched jobs went back at once: another worker runs them meanwhile.
    assert [f.result(20) for f in queued] == [0, 1, 2, 3, 4]
    assert worker.poll() is None, "a warm stop waits for the running job"
    go.touch()
    assert running.result(10) == "finished where it started"
    assert worker.wait(10) == 0
    assert "warm stop" in logs(worker)


def test_second_sigterm_is_a_cold_stop_and_the_job_runs_elsewhere(cluster):
    started, go = cluster.tmp_path / "started", cluster.tmp_path / "go"
    worker = cluster.start_worker(1)
    client = cluster.client()
    job = client.submit(started_then_wait, started, go, "done")
    wait_for_file(started, None)
    worker.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(10) == 0
    assert "cold stop" in logs(worker)
    go.touch()
    cluster.start_worker(1)
    assert job.result(20) == "done"
    assert cluster.status()["workers"][0]["lost"] == 0      # a cold stop is not the job's fault


def test_a_warm_stop_with_the_broker_gone_and_nothing_to_deliver_does_not_wait_for_it(cluster):
    worker = cluster.start_worker(1, env={"MPQUEUE_RECONNECT_TIMEOUT": "60"})
    assert cluster.client().submit(abs, -1).result(10) == 1
    # Its report was answered too (the client's result goes first): with a
    # result it does not know delivered, a warm stop waits to deliver it.
    cluster.wait_for(lambda s: s["workers"][0]["done"] == 1, "the report")
    cluster.broker.kill()
    cluster.broker.wait(10)
    time.sleep(0.5)         # its threads find the broker gone, and start reconnecting
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(10) in (0, 1)    # not the 60 s of its reconnect timeout
    assert "Traceback" not in logs(worker)


def test_a_silent_worker_is_presumed_lost_and_rejoins(empty):
    empty.start_broker(env={"MPQUEUE_HEARTBEAT_TIMEOUT": "1.5"})
    go = empty.tmp_path / "go"
    frozen = empty.start_worker(1)
    client = empty.client()
    job = client.submit(wait_for_file, go, "rescued")
    empty.wait_for(lambda s: s["running"] == 1, "the job to run")
    frozen.send_signal(signal.SIGSTOP)
    try:
        empty.wait_for(lambda s: not s["workers"], "the frozen worker to be dropped")
        empty.start_worker(1)
        go.touch()
        assert job.result(20) == "rescued"
    finally:
        frozen.send_signal(signal.SIGCONT)
    empty.wait_for(lambda s: len(s["workers"]) == 2, "the thawed worker to rejoin")
    assert "rejoining" in logs(frozen)


@pytest.mark.parametrize("garbage", [
    b"",                                        # connect and close
    os.urandom(4096),                           # noise
    b"\xff\xff\xff\xff" + b"x" * 100,           # a huge length header
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",       # the wrong protocol
    b"\x00\x00\x00\x14" + b"\x00" * 20,         # a plausible, wrong digest
])
def test_garbage_on_the_port_leaves_the_broker_serving(cluster, garbage):
    cluster.start_worker(1)
    host, port = cluster.address.split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(garbage)
        try:
            s.recv(1024)
        except OSError:
            pass
    half_open = socket.create_connection((host, int(port)), timeout=5)   # says nothing
    try:
        assert cluster.client().submit(abs, -5).result(10) == 5
    finally:
        half_open.close()


def test_silent_connections_hold_at_most_the_handshake_cap_of_threads(cluster):
    """A slowloris: MAX_HANDSHAKES + 200 sockets that connect and say nothing. The broker
    keeps no more than MAX_HANDSHAKES threads for them, refuses the rest at
    once, says so in one line, and serves again when they are gone."""
    from mpqueue.transport import MAX_HANDSHAKES

    cluster.start_worker(1)
    host, port = cluster.address.split(":")
    broker = psutil.Process(cluster.broker.pid)
    silent = [socket.create_connection((host, int(port)), timeout=5) for _ in range(MAX_HANDSHAKES + 200)]
    try:
        time.sleep(1)
        assert broker.num_threads() < MAX_HANDSHAKES + 40
    finally:
        for s in silent:
            s.close()
    assert logs(cluster.broker).count("handshakes under way already") == 1
    # Their threads see the close and end; then a client gets a slot again.
    eventually(lambda: broker.num_threads() < 40, "the handshake threads to end", timeout=20)
    assert cluster.client().submit(abs, -5).result(20) == 5


def test_shutdown_drains_running_jobs_and_fails_queued_ones(cluster):
    started, go = cluster.tmp_path / "started", cluster.tmp_path / "go"
    worker = cluster.start_worker(1)
    client = cluster.client()
    running = client.submit(started_then_wait, started, go, "drained")
    queued = [client.submit(abs, -i) for i in range(3)]
    wait_for_file(started, None)
    result = cluster.run("shutdown", cluster.address)
    assert result.returncode == 0, result.stderr
    time.sleep(0.3)
    assert worker.poll() is None and cluster.broker.poll() is None
    go.touch()
    assert running.result(10) == "drained"
    for f in queued:
        with pytest.raises(ClusterShutdown):
            f.result(10)
    assert worker.wait(10) == 0
    assert cluster.broker.wait(15) == 0


def test_a_broker_that_stays_dead_fails_futures_and_stops_workers_after_the_reconnect_timeout(cluster):
    go = cluster.tmp_path / "go"
    worker = cluster.start_worker(1, "--reconnect-timeout", "2")
    client = cluster.client(reconnect_timeout=2)
    job = client.submit(wait_for_file, go, 1)
    cluster.wait_for(lambda s: s["running"] == 1, "the job to run")
    cluster.broker.kill()
    with pytest.raises(BrokerUnavailable, match="could not reconnect within 2 s"):
        job.result(20)
    assert worker.wait(20) == 1
    assert "could not reconnect within 2 s" in logs(worker)
    assert "Traceback" not in logs(worker)
    with pytest.raises(BrokerUnavailable):
        client.submit(abs, 1)


#: A user's script on a private cluster: ``MARKS THREADED``. Its jobs leave a
#: file in MARKS and sleep; with THREADED, a thread runs before Client(),
#: which then starts its worker instead of forking it.
PRIVATE_SCRIPT = '''
import sys, threading, time
from pathlib import Path
from mpqueue import Client

marks, threaded = Path(sys.argv[1]), sys.argv[2] == "1"
if threaded:
    threading.Thread(target=time.sleep, args=(600,), daemon=True).start()

def job(i):
    (marks / str(i)).touch()
    time.sleep(600)

client = Client()
print(type(client._cluster.processes[0]).__name__, flush=True)
futures = [client.submit(job, i) for i in range(2)]
futures[0].result()
'''


@pytest.mark.parametrize("threaded", [False, True], ids=["forked worker", "started worker"])
def test_kill_9_of_a_client_takes_its_private_cluster_down(isolated, tmp_path, threaded):
    """The private cluster's broker dies with its client (it is in it); its
    worker and the worker's children must follow, however the worker began."""
    from helpers import tagged_processes

    script = tmp_path / "script.py"
    script.write_text(PRIVATE_SCRIPT)
    marks = tmp_path / "marks"
    marks.mkdir()
    client = psutil.Popen([sys.executable, str(script), str(marks), str(int(threaded))],
                          stdout=__import__("subprocess").PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == ("Popen" if threaded else "_Forked")
        eventually(lambda: len(list(marks.iterdir())) == 2, "both jobs to start", 30)
        assert len(tagged_processes(isolated)) >= 4     # the client, its worker, two children
        client.kill()
        client.wait(10)
        eventually(lambda: not tagged_processes(isolated), "the private cluster to die", 10)
    finally:
        client.stdout.close()
        kill_tree(client.pid)


PIPE_SCRIPT = '''
import subprocess, sys, time
from mpqueue import Client
reader = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
with Client() as client:
    assert client.submit(abs, -1).result(30) == 1
    reader.stdin.close()        # the reader sees the end of its input now, not when the cluster stops
    start = time.monotonic()
    reader.wait(20)
    print("reader done after %.1f s, the cluster still up: %s" % (time.monotonic() - start,
                                                                  client.submit(abs, -2).result(30)))
'''


def test_a_private_cluster_keeps_none_of_its_clients_open_files(isolated, tmp_path):
    """The forked worker (and its first children) must not hold the pipes,
    sockets and files the client had open when it forked."""
    script = tmp_path / "script.py"
    script.write_text(PIPE_SCRIPT)
    done = __import__("subprocess").run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("reader done after 0.") and done.stdout.strip().endswith("still up: 2"), done.stdout
