"""A large payload's frame cut short by a dropped connection (`connection`'s
out-of-band frames): only the connection that carried it is lost; its
process reconnects and sends or fetches again, and every job runs once,
with the right result. Other clients do not notice.

A relay (a process of its own) stands between one process and the broker.
It passes everything, until the first time a connection has carried
``CUT`` bytes in the direction it watches: then it drops that connection,
both ways, in the middle of the frame (a megabyte payload whose frame was
half sent). The process behind it has a /dev/shm of its own, as a process
on another host has, so its payloads cross the relay as bytes; the broker
has no local socket, so every process stays on TCP.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import cloudpickle
from test_shm import ours, own_dev_shm

from helpers import eventually, logs, read_line

cloudpickle.register_pickle_by_value(sys.modules[__name__])

CUT = 512 << 10
NO_LOCAL_SOCKET = {"MPQUEUE_LOCAL_SOCKET": "0"}

RELAY = textwrap.dedent("""
    import socket, sys, threading
    broker = (sys.argv[1], int(sys.argv[2]))
    watched, cut = sys.argv[3], int(sys.argv[4])     # "up" (to the broker) or "down"
    server = socket.create_server(("127.0.0.1", 0))
    print(server.getsockname()[1], flush=True)
    done = threading.Lock()     # held once the cut is made: one cut per relay

    def pump(src, dst, watch, pair):
        passed = 0
        try:
            while data := src.recv(1 << 16):
                if watch and passed + len(data) > cut and done.acquire(blocking=False):
                    dst.sendall(data[:cut - passed])
                    print("cut", flush=True)
                    break
                passed += len(data)
                dst.sendall(data)
        except OSError:
            pass
        for s in pair:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    while True:
        near, _ = server.accept()
        far = socket.create_connection(broker)
        for s in (near, far):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=pump, args=(near, far, watched == "up", (near, far)), daemon=True).start()
        threading.Thread(target=pump, args=(far, near, watched == "down", (near, far)), daemon=True).start()
""")

def size_and_tail(data: bytes, ledger: str) -> tuple[int, bytes]:
    """The job: notes that it ran (its argument's last bytes) in ``ledger``."""
    with open(ledger, "a") as f:
        f.write(data[-8:].hex() + "\n")
    return len(data), data[-8:]


# Submits N jobs, each taking a distinct 1 MiB, then says how many came back right.
CLIENT = textwrap.dedent("""
    import os, sys
    from mpqueue import Client
    address, n, ledger = sys.argv[1], int(sys.argv[2]), sys.argv[3]

    def size_and_tail(data, ledger):
        with open(ledger, "a") as f:
            f.write(data[-8:].hex() + "\\n")
        return len(data), data[-8:]

    with Client(address) as client:
        blobs = [os.urandom(1 << 20) for _ in range(n)]
        futures = [client.submit(size_and_tail, blob, ledger) for blob in blobs]
        ok = [f.result(60) == (len(b), b[-8:]) for f, b in zip(futures, blobs)]
        print(sum(ok), "of", len(ok), "right", flush=True)
""")


def start_relay(cluster, watched: str) -> tuple[subprocess.Popen, str]:
    host, port = cluster.address.rsplit(":", 1)
    relay = cluster.popen([sys.executable, "-c", RELAY, host, port, watched, str(CUT)], "relay",
                          stdout=subprocess.PIPE)
    return relay, f"127.0.0.1:{read_line(relay.stdout, 15).strip()}"


def runs(ledger) -> list[str]:
    return ledger.read_text().split() if ledger.exists() else []


def test_a_clients_submit_cut_mid_payload_is_sent_again_and_runs_once(empty, tmp_path):
    empty.start_broker(env=NO_LOCAL_SOCKET)
    empty.start_worker(2)
    relay, through = start_relay(empty, "up")
    ledger = tmp_path / "ledger"
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    client = empty.popen(own_dev_shm(f"{sys.executable} {script} {through} 4 {ledger}"), "client",
                         stdout=subprocess.PIPE)
    other = empty.client()      # on the broker's host, straight to it

    assert [other.submit(size_and_tail, os.urandom(1 << 20), str(tmp_path / "other")).result(60)[0]
            for _ in range(3)] == [1 << 20] * 3
    assert read_line(client.stdout, 60).strip() == "4 of 4 right", logs(client)
    assert read_line(relay.stdout, 5).strip() == "cut"
    assert "reconnecting" in logs(client), logs(client)
    said = logs(empty.broker)
    assert "closed the connection from" in said and "bytes into a message of" in said, said
    done = runs(ledger)
    assert len(done) == len(set(done)) == 4, done        # the batch cut short was not queued
    assert len(runs(tmp_path / "other")) == 3
    eventually(lambda: not ours({os.getpid()}), "the other client's payload files to go")


def test_a_workers_fetch_cut_mid_payload_fetches_again_and_every_job_ends(empty, tmp_path):
    empty.start_broker(env=NO_LOCAL_SOCKET)
    relay, through = start_relay(empty, "down")
    # Behind the relay, and unable to see the client's files in /dev/shm:
    # the broker sends it each job's MiB (`Broker.payload`).
    empty.popen(own_dev_shm(f"{sys.executable} -m mpqueue worker {through} --procs 2"), "worker")
    empty.wait_for(lambda s: len(s["workers"]) == 1, "the worker to register")
    client = empty.client()
    ledger = tmp_path / "ledger"

    blobs = [os.urandom(1 << 20) for _ in range(6)]
    futures = [client.submit(size_and_tail, blob, str(ledger)) for blob in blobs]

    assert [f.result(60) for f in futures] == [(len(b), b[-8:]) for b in blobs]
    assert read_line(relay.stdout, 5).strip() == "cut"
    worker = empty.procs[-1]
    assert "bytes into a message of" in logs(worker) and "reconnected" in logs(worker), logs(worker)
    assert set(runs(ledger)) == {b[-8:].hex() for b in blobs}
    assert len(empty.status()["workers"]) == 1
    eventually(lambda: not ours({os.getpid()}), "the payload files to go")
