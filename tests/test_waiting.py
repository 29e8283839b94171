"""A thread waiting on a result collects it itself, and calls with nothing to
return wait in the broker: none of that may hold anyone up.

The broker and the clients here wait 10 s per call (``MPQUEUE_WAIT_SLICE``)
rather than 2: a call left waiting by mistake would show as a 10 s delay, far
from the few milliseconds each of these takes.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time

from helpers import python
from mpqueue import Client

SLOW = {"MPQUEUE_WAIT_SLICE": "10"}


def start(empty, procs: int = 1) -> str:
    address = empty.start_broker(env=SLOW)
    empty.start_worker(procs, env=SLOW)
    return address


CANCEL_WHILE_WAITING = """
import sys, threading, time, concurrent.futures
from mpqueue import Client
c = Client(sys.argv[1])
blocker = c.submit(time.sleep, 3)          # the worker's only child is busy
time.sleep(0.5)
f = c.submit(abs, -1)                      # prefetched, not started
out = {}
def wait():
    try:
        f.result()
        out["how"] = "result"
    except concurrent.futures.CancelledError:
        out["how"] = "cancelled"
    out["at"] = time.monotonic()
waiter = threading.Thread(target=wait)
waiter.start()
time.sleep(0.5)                            # it waits in the broker now
asked = time.monotonic()
print(f.cancel(), flush=True)
waiter.join(30)
print(out["how"], round(out["at"] - asked, 2), flush=True)
c.shutdown(cancel_futures=True)
"""


def test_a_cancel_wakes_the_thread_waiting_on_that_result(empty):
    address = start(empty)
    out = python(CANCEL_WHILE_WAITING, env=SLOW, args=[address])
    assert out.returncode == 0, out.stderr
    cancelled, line = out.stdout.splitlines()
    how, after = line.split()
    assert cancelled == "True" and how == "cancelled"
    assert float(after) < 5, f"the waiting thread got CancelledError {after} s after cancel()"


TIMEOUT_WITH_BROKER_GONE = """
import sys, time, concurrent.futures
from mpqueue import Client
c = Client(sys.argv[1])
f = c.submit(time.sleep, 60)
print("waiting", flush=True)
sys.stdin.readline()                       # the broker is killed now
start = time.monotonic()
try:
    f.result(timeout=1)
except concurrent.futures.TimeoutError:
    print("TimeoutError", round(time.monotonic() - start, 2), flush=True)
c.shutdown(wait=False)
"""


def test_result_keeps_its_timeout_while_the_broker_is_gone(empty):
    address = start(empty)
    client = subprocess.Popen([sys.executable, "-c", TIMEOUT_WITH_BROKER_GONE, address],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, **SLOW, "MPQUEUE_RECONNECT_TIMEOUT": "30"})
    try:
        assert client.stdout.readline() == "waiting\n"
        empty.broker.kill()
        empty.broker.wait()
        client.stdin.write("go\n")
        client.stdin.flush()
        how, after = client.stdout.readline().split()
        assert how == "TimeoutError"
        assert float(after) < 5, f"result(timeout=1) returned after {after} s"
    finally:
        client.kill()
        client.wait()


STOPPED_CLIENT = """
import sys, time
from mpqueue import Client
def big(n):
    import time
    time.sleep(1)
    return b"x" * n
c = Client(sys.argv[1])
f = c.submit(big, 64 << 20)
print("submitted", flush=True)
print(len(f.result()), flush=True)
c.shutdown()
"""


def test_a_client_that_stops_reading_holds_up_no_other(empty):
    address = start(empty, procs=2)
    stopped = subprocess.Popen([sys.executable, "-c", STOPPED_CLIENT, address], stdout=subprocess.PIPE,
                               text=True, env={**os.environ, **SLOW})
    try:
        assert stopped.stdout.readline() == "submitted\n"
        os.kill(stopped.pid, signal.SIGSTOP)   # Ctrl-Z: it waits in the broker, and reads nothing
        time.sleep(2)                          # its 64 MiB result is sent to it meanwhile
        other = Client(address)
        try:
            futures = [other.submit(abs, -i) for i in range(10)]
            done, _ = concurrent.futures.wait(futures, timeout=8)
            assert len(done) == 10, "another client's jobs waited for the stopped one"
            assert other.submit(abs, -5).result(timeout=5) == 5
        finally:
            other.shutdown(wait=False, cancel_futures=True)
        os.kill(stopped.pid, signal.SIGCONT)
        assert stopped.stdout.readline() == f"{64 << 20}\n"
        assert stopped.wait(30) == 0
    finally:
        if stopped.poll() is None:
            os.kill(stopped.pid, signal.SIGCONT)
            stopped.kill()
            stopped.wait()


def test_shutdown_right_after_a_result_returns_at_once(empty):
    address = start(empty)
    out = python("""
import sys, time
from mpqueue import Client
c = Client(sys.argv[1])
for i in range(5):
    assert c.submit(abs, -i).result() == i
start = time.monotonic()
c.shutdown()
print(round(time.monotonic() - start, 2))
""", env=SLOW, args=[address])
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) < 5, f"shutdown() took {out.stdout.strip()} s"
