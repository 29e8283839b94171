"""The connection every message travels on, between two real processes."""

from __future__ import annotations

import socket
import subprocess
import sys

from mpqueue.connection import Connection

#: An echo that takes its time, as a busy broker would: the caller is asleep
#: in recv() when the echo takes its call, and again when the answer comes.
ECHO = """
import sys, time
from mpqueue.connection import Connection
conn = Connection(int(sys.argv[1]))
try:
    while True:
        time.sleep(0.0005)
        message = conn.recv()
        time.sleep(0.0005)
        conn.send(message)
except EOFError:
    pass
"""


def voluntary_switches() -> int:
    """How often this thread has gone to sleep (blocked) so far."""
    with open("/proc/thread-self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))


def test_a_call_over_a_unix_socket_wakes_its_caller_once():
    """A reader blocked in read() on a Unix socket is also woken when its
    peer reads what it sent: a call would cost two wakeups, not one."""
    ours, theirs = socket.socketpair()
    echo = subprocess.Popen([sys.executable, "-c", ECHO, str(theirs.fileno())], pass_fds=[theirs.fileno()])
    theirs.close()
    conn = Connection(ours.detach())
    try:
        conn.send("warm up")
        assert conn.recv() == "warm up"
        trips = 300
        before = voluntary_switches()
        for i in range(trips):
            conn.send(("call", i))
            assert conn.recv() == ("call", i)
        per_trip = (voluntary_switches() - before) / trips
    finally:
        conn.close()
        echo.wait(10)
    assert per_trip < 1.4, f"{per_trip:.2f} sleeps per call"
