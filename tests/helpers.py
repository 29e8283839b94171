"""What the tests share that is not a fixture: waiting, logs, processes.

Jobs may use the job-side helpers here (`wait_for_file`): this module is
pickled by value, so workers need not import it.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import psutil

cloudpickle.register_pickle_by_value(sys.modules[__name__])

TAG = "MPQTEST_TAG"     # not MPQUEUE_*: mpqueue warns of names it does not know


def wait_for_file(path: Path, value=None):
    """In a job: block until ``path`` exists (the test's go signal), then return ``value``."""
    while not path.exists():
        time.sleep(0.01)
    return value


def eventually(predicate, what: str = "a condition", timeout: float = 10) -> None:
    """In a test: poll ``predicate()`` until it holds; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def tagged_processes(tag: str) -> list[psutil.Process]:
    """The live processes with ``tag`` in their environment, and this
    process's descendants: a process forked from this one (a private
    cluster's worker) shows the environment this one was started with,
    before the test set its tag."""
    found = []
    ours = {p.pid for p in psutil.Process().children(recursive=True)}
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if (proc.pid in ours or proc.environ().get(TAG) == tag) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def kill_tree(pid: int, sig=signal.SIGKILL) -> None:
    """Send ``sig`` to a process and every descendant it has now."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def wait_for_status(status, predicate, what: str, timeout: float = 20) -> dict:
    """Poll ``status()`` until ``predicate`` holds of what it returns; fail,
    showing the last status, after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        current = status()
        if predicate(current):
            return current
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; status: {current}")
        time.sleep(0.1)


def read_line(stream, timeout: float) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, f"no output within {timeout} s"
    return stream.readline().decode()


def logs(proc: subprocess.Popen) -> str:
    proc.log.flush()
    proc.log.seek(0)
    return proc.log.read()


def python(code: str, env: dict | None = None, timeout: float = 60,
           args: list[str] = ()) -> subprocess.CompletedProcess:
    """Run a user script (with ``args`` as its sys.argv[1:]) in a fresh interpreter."""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, env=None if env is None else {**os.environ, **env})

