"""W4 across hosts: 100 distinct 1 MiB arguments over a veth link, against a
plain socket pair over the same link, in the same run.

Run as root from the repository root::

    python benchmarks/crosshost.py              # 3 repetitions, medians
    python benchmarks/crosshost.py --reps 5 --json

Two network namespaces joined by one veth pair (the approach of
``tests/test_multihost.py``, without its bridge), with addresses that exist
only inside them::

    RUN-br  10.232.0.1  the broker; the "near" client, beside it
    RUN-w   10.232.0.2  one worker (--procs 2); the "far" client

Each process in ``RUN-w`` mounts a ``/dev/shm`` of its own (a tmpfs in its own
mount namespace): like a process on another host, it cannot see the broker's
files, so payloads cross the link. Per repetition, interleaved:

ceiling   a plain TCP socket pair, br -> w: the same 100 x 1 MiB (distinct
          ``bytes``, made before timing) sent with ``sendall`` from a process
          in br, received with ``recv_into`` one preallocated buffer by a
          process in w, which answers one byte after the last: MB/s.
W4 near   the client in br: it writes each argument into the broker's
          ``/dev/shm``, and the worker, which cannot see the file, has the
          broker send the bytes (``Broker.payload``): they cross the link once.
W4 far    the client in w, with a ``/dev/shm`` of its own (not the worker's):
          the arguments cross the link twice, client -> broker -> worker.

W4 is ``bench.py``'s: submit 100 jobs, each ``len`` of a distinct 1 MiB
``bytes``, then wait for all; MB/s (10^6 bytes) of arguments, and the CPU
time the client, the broker and the worker (with its pool) spent on it:
the copies a MiB costs on each hop show there. Before the
first repetition, each client moves the same amount once, untimed (see
``bench.w4_bandwidth``). Traffic goes only between the namespaces' own
addresses. Namespaces and processes are removed in ``finally``; without root
or iproute2 it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import textwrap
import time

import psutil
from netns import ROOT, Namespaces

ADDRESSES = {"br": "10.232.0.1", "w": "10.232.0.2"}
CEILING_PORT = 7411
JOBS, SIZE = 100, 1 << 20

# Runs in a namespace; each line on stdin is a command, each answer one line of JSON.
#   w4                  W4 through the broker at argv[1]: {"mb_per_s": ..., "cpu_s": its own CPU time}
#   socket HOST PORT    the ceiling's sending end: {"mb_per_s": ...}
DRIVER = textwrap.dedent("""
    import json, os, socket, sys, time
    from mpqueue import Client

    JOBS, SIZE = int(sys.argv[2]), int(sys.argv[3])

    def blobs():
        return [os.urandom(SIZE) for _ in range(JOBS)]

    def w4(client):
        args = blobs()
        start, cpu = time.perf_counter(), time.process_time()
        futures = [client.submit(len, blob) for blob in args]
        results = [f.result(300) for f in futures]
        wall = time.perf_counter() - start
        assert results == [SIZE] * JOBS, results
        return {"mb_per_s": JOBS * SIZE / wall / 1e6, "cpu_s": time.process_time() - cpu}

    def send(host, port):
        args = blobs()
        with socket.create_connection((host, int(port))) as s:
            start = time.perf_counter()
            for blob in args:
                s.sendall(blob)
            assert s.recv(1) == b"k"
            return {"mb_per_s": JOBS * SIZE / (time.perf_counter() - start) / 1e6}

    with Client(sys.argv[1]) as client:
        list(client.map(len, blobs()))      # the warm-up
        print("ready", flush=True)
        for line in sys.stdin:
            command, *args = line.split()
            print(json.dumps(w4(client) if command == "w4" else send(*args)), flush=True)
""")

# The ceiling's receiving end: per connection, JOBS x SIZE into one buffer, then b"k".
RECEIVER = textwrap.dedent("""
    import socket, sys
    JOBS, SIZE = int(sys.argv[2]), int(sys.argv[3])
    server = socket.create_server((sys.argv[1], int(sys.argv[4])))
    print("ready", flush=True)
    buf = bytearray(SIZE)
    view = memoryview(buf)
    while True:
        conn, _ = server.accept()
        with conn:
            for _ in range(JOBS):
                got = 0
                while got < SIZE:
                    n = conn.recv_into(view[got:])
                    if not n:
                        raise SystemExit("the sender closed early")
                    got += n
            conn.sendall(b"k")
""")


class Net(Namespaces):
    """The two namespaces, and every process started in them."""

    def __init__(self, ip: str, env: dict):
        super().__init__(ip, env, "mpqb")

    def build(self) -> None:
        for role in ADDRESSES:
            self.add(role)
        self.sh("-n", self.ns("br"), "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
                "netns", self.ns("w"))
        for role, address in ADDRESSES.items():
            self.sh("-n", self.ns(role), "addr", "add", f"{address}/24", "dev", "eth0")
            self.sh("-n", self.ns(role), "link", "set", "eth0", "up")

    def popen(self, role: str, command: list[str], **kwargs) -> subprocess.Popen:
        """``command`` in a namespace; in w, with a /dev/shm of its own."""
        if role == "w":
            command = ["sh", "-c", 'mount -t tmpfs tmpfs /dev/shm && exec "$@"', "sh", *command]
        return super().popen(role, command, **kwargs)


def read_json(proc: subprocess.Popen) -> dict:
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"process {proc.pid} ended without answering")
    return json.loads(line)


def ask(proc: subprocess.Popen, command: str) -> dict:
    proc.stdin.write(command.encode() + b"\n")
    proc.stdin.flush()
    return read_json(proc)


def cpu_seconds(proc: subprocess.Popen) -> float:
    """The CPU time of a process and its children (a worker's pool) so far."""
    root = psutil.Process(proc.pid)
    total = 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += sum(p.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def expect_ready(proc: subprocess.Popen, what: str) -> None:
    line = proc.stdout.readline().decode().strip()
    if line != "ready":
        raise RuntimeError(f"{what} did not start: {line!r}")


def wait_for_worker(net: Net, address: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run([net.ip, "netns", "exec", net.ns("br"), sys.executable, "-m", "mpqueue", "status",
                              address, "--json"], env=net.env, capture_output=True, text=True, cwd=ROOT)
        if out.returncode == 0 and json.loads(out.stdout)["workers"]:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"no worker registered after {timeout} s: {out.stderr}")
        time.sleep(0.3)


def measure(net: Net, reps: int) -> tuple[dict[str, list[float]], dict[str, list[dict]]]:
    """MB/s of each run, and for W4 the CPU seconds each process spent."""
    broker = net.popen("br", [sys.executable, "-m", "mpqueue", "broker", "--host", ADDRESSES["br"], "--port", "0"],
                       stdout=subprocess.PIPE)
    address = broker.stdout.readline().decode().rsplit("listening on", 1)[1].split()[0]
    worker = net.popen("w", [sys.executable, "-m", "mpqueue", "worker", address, "--procs", "2"])
    wait_for_worker(net, address)
    receiver = net.popen("w", [sys.executable, "-c", RECEIVER, ADDRESSES["w"], str(JOBS), str(SIZE),
                               str(CEILING_PORT)], stdout=subprocess.PIPE)
    expect_ready(receiver, "the ceiling's receiver")
    clients = {}
    for name, role in (("W4 near", "br"), ("W4 far", "w")):
        clients[name] = net.popen(role, [sys.executable, "-c", DRIVER, address, str(JOBS), str(SIZE)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        expect_ready(clients[name], f"the client of {name}")
    figures: dict[str, list[float]] = {"ceiling": [], "W4 near": [], "W4 far": []}
    cpu: dict[str, list[dict]] = {name: [] for name in clients}
    for rep in range(reps):
        figures["ceiling"].append(ask(clients["W4 near"], f"socket {ADDRESSES['w']} {CEILING_PORT}")["mb_per_s"])
        for name, client in clients.items():
            before = cpu_seconds(broker), cpu_seconds(worker)
            answer = ask(client, "w4")
            figures[name].append(answer["mb_per_s"])
            cpu[name].append({"client": answer["cpu_s"], "broker": cpu_seconds(broker) - before[0],
                              "worker": cpu_seconds(worker) - before[1]})
        print(f"rep {rep + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in figures.items()), file=sys.stderr)
    for client in clients.values():
        client.stdin.close()
        client.wait(30)
    return figures, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="also print every figure as JSON")
    args = parser.parse_args()
    ip = shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip") if os.access(p, os.X_OK)), None)
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or ip is None:
        print("skipped: needs Linux, root and iproute2 (`ip`) to make network namespaces", file=sys.stderr)
        return 0
    env = dict(os.environ, MPQUEUE_AUTHKEY=secrets.token_hex(16), MPQUEUE_LOG_LEVEL="WARNING")
    env.pop("MPQUEUE_ADDRESS", None)
    net = Net(ip, env)
    try:
        try:
            net.build()
        except subprocess.CalledProcessError as e:
            print(f"skipped: cannot make the namespaces: `{' '.join(e.cmd)}` failed: {e.stderr.strip()}",
                  file=sys.stderr)
            return 0
        figures, cpu = measure(net, args.reps)
    finally:
        net.close()
    ceiling = statistics.median(figures["ceiling"])
    print(f"{'':10} {'median MB/s':>12} {'x ceiling':>10}   runs")
    for name, values in figures.items():
        runs = ", ".join(f"{v:,.0f}" for v in values)
        print(f"{name:10} {statistics.median(values):>12,.0f} {statistics.median(values) / ceiling:>10.2f}   {runs}")
    print("CPU ms per W4 run (medians): " + "; ".join(
        f"{name}: " + ", ".join(f"{role} {statistics.median(run[role] for run in runs) * 1e3:.0f}"
                                for role in ("client", "broker", "worker"))
        for name, runs in cpu.items()) + " (worker: with its pool)")
    if args.json:
        print(json.dumps({"mb_per_s": figures, "cpu_s": cpu}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
