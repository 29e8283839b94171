"""Real processes, real sockets: a broker on port 0 and workers as subprocesses.

Every test runs with its own authkey, config directory and a process tag in
its environment, inherited by everything it starts (brokers, workers, their
forkservers and children, local clusters). On teardown, after the fixtures
have stopped what they started, the tag proves no process was left behind,
even one re-parented to init after a ``kill -9``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

# Whatever a test leaves reconnecting to a broker it killed gives up soon:
# set before mpqueue reads its settings, for this process and all it starts.
os.environ["MPQUEUE_RECONNECT_TIMEOUT"] = "3"

from helpers import TAG, kill_tree, read_line, tagged_processes, wait_for_status  # noqa: E402
from mpqueue import Client  # noqa: E402
from mpqueue.client import open_clients  # noqa: E402


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """Own authkey, config and cache dirs and tag; no process may outlive the test."""
    tag = uuid.uuid4().hex
    monkeypatch.setenv(TAG, tag)
    monkeypatch.setenv("MPQUEUE_AUTHKEY", "key-" + tag)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))     # shipped code, per test
    monkeypatch.delenv("MPQUEUE_ADDRESS", raising=False)
    yield tag
    for client in open_clients():
        client.shutdown(wait=False)     # one a test left open would be `mpqueue.shared`'s default
    deadline = time.monotonic() + 10
    while (left := tagged_processes(tag)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for proc in left:
        proc.kill()
    assert not left, "processes left behind: " + ", ".join(
        f"{p.pid} {' '.join(p.cmdline())}" for p in left)


class Cluster:
    """Starts brokers, workers and clients for one test, and stops them all."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen] = []
        self.clients: list[Client] = []
        self.address: str | None = None
        self.broker: subprocess.Popen | None = None

    def start_broker(self, *args: str, env: dict | None = None) -> str:
        self.broker = self.popen(["mpqueue", "broker", "--port", "0", *args], "broker",
                                 stdout=subprocess.PIPE, env=env)
        line = read_line(self.broker.stdout, 15)
        assert "listening on" in line, line
        self.broker_line = line
        self.address = line.rsplit("listening on", 1)[1].split()[0]
        return self.address

    def start_worker(self, procs: int = 2, *args: str, address: str | None = None,
                     env: dict | None = None, wait: bool = True) -> subprocess.Popen:
        before = len(self.status()["workers"]) if wait else 0
        proc = self.popen(["mpqueue", "worker", address or self.address, "--procs", str(procs), *args],
                          "worker", env=env)
        if wait:
            self.wait_for(lambda s: len(s["workers"]) > before, "worker to register")
        return proc

    def popen(self, command: list[str], name: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
        log = open(self.tmp_path / f"{name}-{len(self.procs)}.log", "w+")
        proc = subprocess.Popen(command, stderr=log, env=None if env is None else {**os.environ, **env},
                                **kwargs)
        proc.log = log
        self.procs.append(proc)
        return proc

    def client(self, **kwargs) -> Client:
        client = Client(self.address, **kwargs)
        self.clients.append(client)
        return client

    def run(self, *args: str, timeout: float = 30, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run an ``mpqueue`` command as a user types it."""
        return subprocess.run(["mpqueue", *args], capture_output=True, text=True, timeout=timeout,
                              env=None if env is None else {**os.environ, **env})

    def status(self) -> dict:
        result = self.run("status", self.address, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def wait_for(self, predicate, what: str, timeout: float = 20) -> dict:
        return wait_for_status(self.status, predicate, what, timeout)

    def close(self) -> None:
        for client in self.clients:
            client.shutdown(wait=False, cancel_futures=True)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                kill_tree(proc.pid)
            proc.wait(10)
            proc.log.close()
            if proc.stdout:
                proc.stdout.close()
        for client in self.clients:
            client.shutdown(wait=True)


@pytest.fixture
def cluster(tmp_path):
    """A broker on port 0 and nothing else yet; start workers with start_worker()."""
    c = Cluster(tmp_path)
    c.start_broker()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def empty(tmp_path):
    """A Cluster helper with nothing started."""
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()


