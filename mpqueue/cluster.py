"""The processes of a cluster that this process starts or sizes.

`LocalCluster` is the private broker and worker of a `Client()` with no
address (and of `Pool()`, and of the joblib backend); `stop_process` is the
ladder that stops a process; `usable_cpus` and `cluster_procs` count the
cores here and the processes of a cluster's workers.
"""

from __future__ import annotations

import gc
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import types

from .config import SETTINGS, format_address
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
    """A private broker and worker for a `Client` with no address (and for
    `Pool()`, and the joblib backend).

    The broker runs in this process: the same `Broker` and `BrokerServer` as
    `mpqueue broker`, in threads, on loopback, with a fresh random authkey.
    The worker is a process of its own (jobs never run here): forked from
    this one while it has a single thread, so that it needs no interpreter to
    start nor modules to import, and forks its first children at once
    (`ProcessPool`'s ``fork_first``). A process with threads already (a
    second private cluster, a notebook's kernel) is not forked, whatever its
    threads hold: the worker is started as ``python -m mpqueue worker``, as on
    any host, which takes a few tenths of a second longer.

    The worker dies with this process, even by ``kill -9``: a forked one by
    ``PR_SET_PDEATHSIG``, a started one when the pipe it holds on its stdin
    closes; either way its children follow (`pool`). It runs in a session of
    its own: Ctrl-C in the terminal signals its foreground process group,
    and the worker must not take it as its own; the client decides what
    Ctrl-C means (`Client._interrupted`), and stops it.
    """

    def __init__(self, procs: int | None = None):
        self.authkey = secrets.token_hex(32).encode()
        self.processes: list = []      # the worker's: a subprocess.Popen, or a `_Forked`
        listening = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.address = listening.getsockname()
        # Before any thread of ours starts: the worker connects meanwhile,
        # and waits in the listening socket's backlog.
        forked = _single_threaded() and sys.platform.startswith("linux")
        if forked:
            self.processes.append(_fork_worker(self.address, self.authkey, procs, listening))
        try:
            # Imported here (while a forked worker imports its own modules): a
            # client of a remote cluster needs none of the broker.
            from .broker import Broker
            from .transport import BrokerServer

            self.broker = Broker(SETTINGS)
            self._server = BrokerServer(self.broker, listening, self.authkey)
        except BaseException:       # a bad $MPQUEUE_TLS_*, say: no worker left waiting
            listening.close()
            for process in self.processes:
                stop_process(process, 1.0)
            raise
        self._server.start()
        broker_log = logging.getLogger("mpqueue.broker")
        if broker_log.level == logging.NOTSET:      # as quiet as a broker process of ours
            broker_log.setLevel(logging.WARNING)
        self._upkeep = threading.Thread(target=self.broker.upkeep, name="mpqueue-broker", daemon=True)
        self._upkeep.start()
        if not forked:
            self.processes.append(_start_worker(self.address, self.authkey, procs))

    def stop(self) -> None:
        """Shut the cluster down: set its shutdown event, so that the worker
        finishes its running jobs and leaves; wait for it (then terminate,
        kill: `stop_process`); then close the broker.

        A worker that had not joined the broker yet (a cluster stopped as soon
        as it started) is told through its lifeline (a started one) or
        SIGTERM (a forked one) once the broker has drained: it would otherwise
        wait for a broker that is gone.
        """
        self.broker.shutdown_event.set()
        self._upkeep.join(SETTINGS.child_grace + 3)     # drained: the worker has left, or never came
        for process in self.processes:
            if process.stdin:
                process.stdin.close()
            stop_process(process, SETTINGS.child_grace + 3)
        self._server.close()
        self.broker.close()


def _single_threaded() -> bool:
    """Whether this process has one thread, counting those Python did not
    start (a library's thread pool): the one case where fork is safe."""
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def _fork_worker(address: tuple[str, int], authkey: bytes, procs: int | None,
                 listening: socket.socket) -> "_Forked":
    """Fork the worker (this process has a single thread). In the child: a
    session of its own, death with this process, and the worker's loop; it
    leaves by ``os._exit``, running nothing this process registered."""
    parent = os.getpid()
    for stream in (sys.stdout, sys.stderr):     # or what they hold is written twice
        if stream is not None:
            stream.flush()
    pid = os.fork()
    if pid:
        return _Forked(pid)
    code = 1
    try:
        os.setsid()
        if _die_with(parent):
            listening.close()
            _let_go_of_descriptors()
            gc.freeze()     # this process's objects are not ours to collect (nor their finalizers to run)
            code = _run_worker(address, authkey, procs)
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def _let_go_of_descriptors() -> None:
    """Point every descriptor the client had open, past stdin, stdout and
    stderr, at /dev/null (fork copies them all, close-on-exec or not): a pipe
    to a program the client feeds would never see its end while the cluster
    runs, a lock held by an open file never be released. Pointed, not closed:
    a Python object of the client's that still holds one could otherwise
    close a descriptor of the worker's that took its number."""
    null = os.open(os.devnull, os.O_RDWR)
    try:
        for fd in [int(name) for name in os.listdir("/proc/self/fd")]:
            if fd > 2 and fd != null:
                try:
                    os.fstat(fd)        # the directory listed is closed already
                    os.dup2(null, fd)
                except OSError:
                    pass
    finally:
        os.close(null)
    signal.set_wakeup_fd(-1)            # the client's event loop's, if any


def _die_with(parent: int) -> bool:
    """Have the kernel SIGKILL this process when ``parent`` (that forked it,
    from its one thread) exits. False if it has already."""
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    return os.getppid() == parent


def _run_worker(address: tuple[str, int], authkey: bytes, procs: int | None) -> int:
    """The forked worker's loop, as `mpqueue worker` runs it; its exit code."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)   # its children are reaped by waiting on them
    # The client's script is this process's main module: multiprocessing would
    # run it again in each child the forkserver starts (a script without an
    # `if __name__ == "__main__"` guard would start a cluster there). The
    # worker has none of its own, as under `python -m mpqueue worker`.
    sys.modules["__main__"] = types.ModuleType("__main__")
    for name in ("mpqueue.worker", "mpqueue.pool"):
        logger = logging.getLogger(name)    # this process's logging, as its parent set it up
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)
    from .worker import Worker

    # No reconnecting: its broker is gone only with the process that forked it.
    worker = Worker(address, authkey, procs or usable_cpus(), reconnect_timeout=0, fork_first=True)
    try:
        return worker.run()
    except KeyboardInterrupt:
        return 130


def _start_worker(address: tuple[str, int], authkey: bytes, procs: int | None) -> subprocess.Popen:
    """Start the worker as ``python -m mpqueue worker``, with a pipe from
    this process on its stdin (``--lifeline``)."""
    env = dict(os.environ, MPQUEUE_AUTHKEY=authkey.decode(), MPQUEUE_LOG_LEVEL="WARNING")
    # Let the worker import what this script can: its directory first.
    path = [os.path.abspath(sys.path[0] or os.curdir)]
    if env.get("PYTHONPATH"):
        path.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(path)
    command = [sys.executable, "-m", "mpqueue", "worker", format_address(address), "--lifeline"]
    if procs:
        command += ["--procs", str(procs)]
    return subprocess.Popen(command, env=env, stdin=subprocess.PIPE, start_new_session=True)


class _Forked:
    """A forked worker, as much of `subprocess.Popen` as `stop_process` and
    callers use."""

    args = ["worker"]
    stdin = stdout = None

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:   # reaped by someone else (SIGCHLD ignored, a child watcher)
                self.returncode = 0
                return 0
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            time.sleep(0.005)
        return code

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)


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
