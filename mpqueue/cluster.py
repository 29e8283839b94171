"""The processes of a cluster that this process starts or sizes.

`LocalCluster` is the private broker and worker of a `Client()` with no
address (and of `Pool()`, and of the joblib backend); `stop_process` is the
ladder that stops one of them; `usable_cpus` and `cluster_procs` count the
cores here and the processes of a cluster's workers.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys

from .config import SETTINGS, format_address
from .errors import BrokerUnavailable, MpqueueError
from .transport import connect


def usable_cpus() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cluster_procs(address: tuple[str, int], authkey: bytes) -> int:
    """How many processes the cluster's workers have now, all told."""
    broker, _ = connect(address, authkey)
    try:
        return sum(w["procs"] for w in broker.status()["workers"])
    finally:
        broker.close()


class LocalCluster:
    """A private broker and worker, as subprocesses, for a `Client` with no address.

    They get a fresh random authkey, listen on loopback only, and hold a pipe
    from this process on their stdin: should this process die without
    stopping them, they see the pipe close and exit. They run in a session
    of their own: Ctrl-C in the terminal signals its foreground process
    group, and they must not take it as theirs (the broker would stop at
    once, under a client still using it); the client decides what Ctrl-C
    means, and stops them.
    """

    def __init__(self, procs: int | None = None):
        self.authkey = secrets.token_hex(32).encode()
        env = dict(os.environ, MPQUEUE_AUTHKEY=self.authkey.decode(), MPQUEUE_LOG_LEVEL="WARNING")
        # Let the worker import what this script can: its directory first.
        path = [os.path.abspath(sys.path[0] or os.curdir)]
        if env.get("PYTHONPATH"):
            path.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(path)
        command = [sys.executable, "-m", "mpqueue"]
        self.processes: list[subprocess.Popen] = []
        # Reserve a port (bound, not listening: the broker can bind it too, no
        # one else can) so that broker and worker start at the same time.
        with socket.socket() as reservation:
            reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            reservation.bind(("127.0.0.1", 0))
            self.address = reservation.getsockname()
            port = str(self.address[1])
            self.broker = self._start(command + ["broker", "--port", port, "--lifeline"], env,
                                      stdout=subprocess.PIPE)
            worker = command + ["worker", format_address(self.address), "--lifeline"]
            if procs:
                worker += ["--procs", str(procs)]
            self._start(worker, env)
            line = self.broker.stdout.readline().decode() if self.broker.stdout else ""
        if "listening on" not in line:
            self.stop()
            raise BrokerUnavailable(f"the local broker did not start: {line.strip() or 'no output'}")

    def _start(self, command: list[str], env: dict, **kwargs) -> subprocess.Popen:
        process = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, start_new_session=True, **kwargs)
        self.processes.append(process)
        return process

    def stop(self) -> None:
        """Shut the cluster down: ask (the shutdown event), wait, terminate, kill.

        The broker exits once its worker has left; then the worker is told
        to stop through its lifeline: one that had not joined the broker yet
        (a cluster stopped as soon as it started) would otherwise wait for a
        broker that is gone.
        """
        if getattr(self, "address", None) is not None:
            try:
                _, event = connect(self.address, self.authkey)
                event.set()
                event.close()
            except MpqueueError:
                pass
        for process in self.processes:      # the broker, then the worker
            if process is not self.broker and process.stdin:
                process.stdin.close()
            stop_process(process, SETTINGS.child_grace + 3)
            if process.stdin and not process.stdin.closed:
                process.stdin.close()
            if process.stdout:
                process.stdout.close()


def stop_process(process: subprocess.Popen, grace: float) -> None:
    """The shutdown ladder for a process already asked to stop: wait, terminate, kill."""
    for step in (None, process.terminate, process.kill):
        if step is not None:
            step()
        try:
            process.wait(grace)
            return
        except subprocess.TimeoutExpired:
            pass
