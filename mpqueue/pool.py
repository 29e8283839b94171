"""The worker's process pool: children it supervises one by one.

::

    worker main thread ──(Task, function bytes)──▶ child pipe ──▶ child: fn(*args)
                       ◀──(id, Status, bytes)──────────────────────┘
                       ◀── process sentinel ready: the child died ──▶ replace it

``multiprocessing.Pool`` hangs forever when a child is killed, and
``ProcessPoolExecutor`` breaks and fails every pending job. Here each child has
its own pipe and is watched through its process sentinel, so a dead child
(segfault, ``os._exit``, SIGKILL, OOM kill) costs only the job it was running,
which is reported as `Status.LOST` naming the signal, and a fresh child takes
its place.

Children are started with the *forkserver* method, explicitly: they are forked
from a small single-threaded server process rather than from the worker, which
runs threads (forking a threaded process can copy a lock held by another
thread), and each starts in milliseconds, without re-importing.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import sys
import time
from collections import OrderedDict
from multiprocessing.connection import wait

from .config import SETTINGS
from .protocol import Outcome, Status, Task, dumps, loads, pack_exception

#: How many unpickled functions a child keeps, most recently used first.
FUNCTION_CACHE = 32


class Child:
    """One supervised child process and the job it is running, if any."""

    def __init__(self, ctx):
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=_child_main, args=(child_conn,), daemon=True,
                                   name="mpqueue-child")
        self.process.start()
        child_conn.close()
        self.pid = self.process.pid
        self.task: Task | None = None
        self.started = 0.0

    def run(self, task: Task, function: bytes) -> None:
        self.conn.send((task, function))
        self.task = task
        self.started = time.monotonic()


class ProcessPool:
    """``procs`` children, replaced as they die. Used from one thread only."""

    def __init__(self, procs: int):
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(["mpqueue.pool"])
        self.children = [Child(self._ctx) for _ in range(procs)]
        #: Moving average of how long a job takes here, pipe round trip
        #: included; None until one has finished.
        self.job_seconds: float | None = None

    def idle(self) -> list[Child]:
        return [c for c in self.children if c.task is None]

    def busy(self) -> list[Child]:
        return [c for c in self.children if c.task is not None]

    def wait(self, timeout: float | None, wakeup: int) -> list[Outcome]:
        """Wait for children to finish jobs or die, or for ``wakeup`` to be readable.

        Returns the outcomes of finished jobs, dead children's included.
        """
        by_conn = {c.conn: c for c in self.children}
        by_sentinel = {c.process.sentinel: c for c in self.children}
        outcomes = []
        for ready in wait([*by_conn, *by_sentinel, wakeup], timeout):
            child = by_conn.get(ready)
            if child is not None:
                try:
                    job_id, status, payload = child.conn.recv()
                except (EOFError, OSError):
                    continue    # it died; its sentinel tells the rest
                outcomes.append(Outcome(job_id, Status(status), payload))
                child.task = None
                took = time.monotonic() - child.started
                self.job_seconds = took if self.job_seconds is None else 0.8 * self.job_seconds + 0.2 * took
            child = by_sentinel.get(ready)
            if child is not None:
                outcomes.extend(self._replace(child))
        return outcomes

    def _replace(self, child: Child) -> list[Outcome]:
        child.process.join()
        task = child.task
        lost = []
        if task is not None:
            lost.append(Outcome(task.id, Status.LOST, {
                "pid": child.pid, "exitcode": child.process.exitcode,
                "signal": signal_name(child.process.exitcode), "host": os.uname().nodename,
                "reason": "the process running the job died"}))
        child.conn.close()
        self.children[self.children.index(child)] = Child(self._ctx)
        return lost

    def kill_busy(self) -> None:
        """Cold stop: kill the children running jobs, without replacing them."""
        for child in self.busy():
            child.process.kill()

    def close(self) -> None:
        """Ask every child to exit, then terminate and kill the ones that don't."""
        for child in self.children:
            try:
                child.conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + SETTINGS.child_grace
        for child in self.children:
            child.process.join(max(0.0, deadline - time.monotonic()))
        for child in self.children:
            if child.process.is_alive():
                child.process.terminate()
                child.process.join(SETTINGS.child_grace)
            if child.process.is_alive():
                child.process.kill()
                child.process.join()
            child.conn.close()


def signal_name(exitcode: int | None) -> str | None:
    """``SIGSEGV`` for an exit code of -11; None for a normal exit."""
    if exitcode is None or exitcode >= 0:
        return None
    try:
        return signal.Signals(-exitcode).name
    except ValueError:
        return f"signal {-exitcode}"


# -- inside the child ---------------------------------------------------------

def _die_with_parent() -> None:
    """Have the kernel kill this child when its parent, the forkserver, exits.

    The forkserver exits when the worker does, even on ``kill -9``; without
    this a child in the middle of a long job would outlive them both.
    """
    if sys.platform.startswith("linux"):
        import ctypes
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:   # the parent was already gone
            os._exit(1)


def _child_main(conn) -> None:
    # Ctrl-C in the worker's terminal reaches the whole process group; the
    # worker decides what happens to the jobs, not the signal.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    functions: OrderedDict[bytes, object] = OrderedDict()
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        task, blob = message
        status, payload = _execute(task, blob, functions)
        conn.send((task.id, int(status), payload))


def _execute(task: Task, blob: bytes, functions: OrderedDict) -> tuple[Status, bytes]:
    try:
        fn = functions.get(task.fn)
        if fn is None:
            fn = _load_function(blob)
            functions[task.fn] = fn
            if len(functions) > FUNCTION_CACHE:
                functions.popitem(last=False)
        else:
            functions.move_to_end(task.fn)
        args = loads(task.payload)
        if task.chunked:
            result = [fn(*a) for a in args]
        else:
            result = fn(*args[0], **args[1])
    except BaseException as exc:
        return Status.ERROR, pack_exception(exc)
    try:
        return Status.OK, dumps(result)
    except BaseException as exc:
        err = pickle.PicklingError(f"cannot pickle the result of the job: {exc}")
        err.__cause__ = exc
        return Status.ERROR, pack_exception(err)


def _load_function(blob: bytes):
    try:
        return loads(blob)
    except ImportError as exc:
        raise type(exc)(
            f"{exc} (on this worker). Functions from your own modules are pickled by "
            "reference: install the module where the workers run, or send it by value "
            "with cloudpickle.register_pickle_by_value(module)", name=exc.name) from exc
