"""What one hop costs on this machine: a Unix socket against loopback TCP.

Run from the repository root::

    python benchmarks/hops.py

Two processes play ping-pong with 60-byte messages, over a Unix socket pair
and then over a loopback TCP connection (``TCP_NODELAY``), ``--trips`` times
each: the median round trip, and the median time the sender spends in
``send()``. Every job crosses four broker connections (client to broker to
worker and back), which is why processes on the broker's host use its local
(Unix) socket: see docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time


def connected_pair(kind: str) -> tuple[socket.socket, socket.socket]:
    if kind == "unix":
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b = server.accept()[0]
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return a, b


def ping_pong(kind: str, trips: int) -> tuple[float, float]:
    """(median round trip, median send) in microseconds."""
    a, b = connected_pair(kind)
    pid = os.fork()
    if pid == 0:                # the echo
        a.close()
        while data := b.recv(100):
            b.sendall(data)
        os._exit(0)
    b.close()
    message = b"x" * 60
    rounds, sends = [], []
    try:
        for _ in range(trips):
            t0 = time.perf_counter_ns()
            a.sendall(message)
            t1 = time.perf_counter_ns()
            a.recv(100)
            rounds.append(time.perf_counter_ns() - t0)
            sends.append(t1 - t0)
    finally:
        a.close()
        os.waitpid(pid, 0)
    return statistics.median(rounds) / 1000, statistics.median(sends) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trips", type=int, default=3000)
    trips = parser.parse_args().trips
    print(f"{'hop':12s} {'round trip (us)':>16s} {'send (us)':>10s}")
    for kind, name in (("unix", "Unix socket"), ("tcp", "loopback TCP")):
        rtt, send = ping_pong(kind, trips)
        print(f"{name:12s} {rtt:16.1f} {send:10.1f}")


if __name__ == "__main__":
    main()
