"""The worker's process pool: children it supervises one by one.

::

    worker main thread ──[Task…], {digest: function}──▶ child pipe ──▶ child: fn(*args)…
                       ◀──[(id, Status, bytes, retryable, started, ended, Raised)…], seconds──┘
                       ◀── process sentinel ready: the child died ──▶ replace it

``multiprocessing.Pool`` hangs forever when a child is killed, and
``ProcessPoolExecutor`` breaks and fails every pending job. Here each child has
its own pipe and is watched through its process sentinel, so a dead child
(segfault, ``os._exit``, SIGKILL, OOM kill) costs only the job it was running,
which is reported as `Status.LOST` naming the signal, and a fresh child takes
its place.

Jobs of a function known to be short go to a child in batches, one pipe
message each way per batch, so tiny jobs do not each pay a round trip. A job
with a timeout always runs alone (its clock starts when it does).

Children are started with the *forkserver* method, explicitly: they are forked
from a small single-threaded server process rather than from the worker, which
runs threads (forking a threaded process can copy a lock held by another
thread), and each starts in milliseconds, without re-importing. (A private
cluster's worker forks its first ones itself, before it has threads:
``fork_first``.)

Who owns what, in the worker and its children: docs/internals.md.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import socket
import sys
import time
from collections import OrderedDict
from multiprocessing.connection import wait
from typing import Any

import psutil

from . import shared, shipping, shm
from .config import SETTINGS
from .connection import BadMessage, Connection
from .errors import EnvironmentMismatch
from .protocol import (
    Failure,
    Outcome,
    Payload,
    Raised,
    Status,
    Task,
    Warned,
    dumps_payload,
    loads,
    out_of_band,
    pack_exception,
    signal_name,
    too_large,
    unwrap_function,
)

log = logging.getLogger("mpqueue.worker")

#: How many unpickled functions a child keeps, most recently used first.
FUNCTION_CACHE = 32
#: A child is given a batch of jobs of one function when that function is
#: known to be short: about this much work per batch, at most MAX_BATCH jobs.
BATCH_SECONDS = 0.005
MAX_BATCH = 64

Item = tuple[Task, bytes]   # a task and its pickled function


class Child:
    """One supervised child process and the batch of jobs it is running, if any."""

    def __init__(self, ctx, link: tuple | None = None):
        ours, theirs = socket.socketpair()
        self.conn = Connection(ours.detach())
        self.process = ctx.Process(target=_child_main, args=(theirs, link), daemon=True,
                                   name="mpqueue-child")
        self.process.start()
        theirs.close()
        self.pid = self.process.pid
        self.batch: list[Item] = []
        self.started = 0.0                  # monotonic, for its deadline
        self.began = 0.0                    # the wall clock's time then, for the job's history
        self.jobs = 0                       # jobs finished in this child
        self.ending: Outcome | None = None  # what to report when it dies: we killed it
        self.kill_at: float | None = None   # SIGKILL if still alive then

    def run(self, batch: list[Item], max_payload: int, shm_tag: str | None = None) -> None:
        """Start a batch; a result that pickles to over ``max_payload`` bytes
        fails its job. With ``shm_tag`` (the worker is on its broker's host),
        a large result goes through shared memory (`shm`)."""
        self.batch = batch
        self.started = time.monotonic()
        self.began = time.time()
        try:
            self.conn.send(([task for task, _ in batch], {task.fn: blob for task, blob in batch}, max_payload,
                            shm_tag))
        except OSError:
            pass    # it just died: its sentinel will say so, and the batch is handled then

    @property
    def task(self) -> Task | None:
        """The job it runs, when it runs one alone (jobs with a timeout always are)."""
        return self.batch[0][0] if len(self.batch) == 1 else None

    def ids(self) -> list[int]:
        return [task.id for task, _ in self.batch]

    def deadline(self) -> float | None:
        if self.ending is not None:
            return self.kill_at
        task = self.task
        if task is not None and task.timeout is not None:
            return self.started + task.timeout
        return None

    def end(self, outcome: Outcome) -> None:
        """Kill it for a reason of ours (SIGTERM now, SIGKILL after a grace)."""
        if self.ending is None:
            self.ending = outcome
            self.process.terminate()
            self.kill_at = time.monotonic() + SETTINGS.child_grace


class ProcessPool:
    """``procs`` children, replaced as they die. Used under one lock, except `wait`.

    ``max_tasks`` recycles a child after that many jobs; ``max_memory`` (bytes
    of RSS) recycles one found over it between jobs and kills one that grows
    past it while running, failing that job.

    ``fork_first``: the first children are forked from this process, which
    must have a single thread (the worker of a private cluster, itself forked
    from its client: `cluster.LocalCluster`). They are ready in a millisecond,
    where the forkserver first needs a new interpreter (two, with its
    resource tracker) to start and import this module; only their
    replacements come from it, started when the first one is needed.
    """

    def __init__(self, procs: int, max_tasks: int | None = None, max_memory: int | None = None,
                 link: tuple | None = None, fork_first: bool = False):
        self._ctx = multiprocessing.get_context("forkserver")
        self.link = link    # (address, authkey) of the broker, for the jobs' `mpqueue.shared`
        # `mpqueue worker` has started it already, with this same list (cli._start_forkserver).
        self._ctx.set_forkserver_preload(["mpqueue.pool"])
        self.max_tasks = max_tasks
        self.max_memory = max_memory
        first: Any = self._ctx
        if fork_first:
            _forget_inherited_forkserver()
            first = multiprocessing.get_context("fork")
        self.children = [Child(first, self.link) for _ in range(procs)]
        self._retiring: list[Child] = []    # asked to exit; reaped when they do
        self._next_memory_check = 0.0
        #: Moving averages of how long a job takes in its child, as the
        #: child clocks it: over all jobs, and per function. Not the time
        #: until its result reaches us: on a host with more processes than
        #: cores that includes waits for a core, which made a no-op job look
        #: like 5 ms there, and the worker fetch and batch a few jobs at a time.
        self.job_seconds: float | None = None
        self.fn_seconds: dict[bytes, float] = {}

    def idle(self) -> list[Child]:
        return [c for c in self.children if not c.batch]

    def busy(self) -> list[Child]:
        return [c for c in self.children if c.batch]

    def batch_size(self, task: Task, waiting: int, child: Child) -> int:
        """How many jobs like ``task`` to give ``child`` at once (``waiting`` in all)."""
        seconds = self.fn_seconds.get(task.fn)
        if task.timeout is not None or seconds is None:
            return 1
        fair = -(-waiting // max(1, len(self.idle())))
        size = min(MAX_BATCH, fair, int(BATCH_SECONDS / max(seconds, 1e-6)))
        if self.max_tasks:
            size = min(size, self.max_tasks - child.jobs)
        return max(1, size)

    def withdraw(self, job_id: int) -> bool:
        """Kill the child running ``job_id``, if one is; its outcome will say CANCELLED."""
        for child in self.children:
            if job_id in child.ids():
                child.end(Outcome(job_id, Status.CANCELLED, b""))
                return True
        return False

    def wait(self, wakeup: int) -> list:
        """Block until a child has finished jobs or died, a deadline is due, or
        ``wakeup`` (a file descriptor) is readable. Returns what is ready, for
        `handle`. Touches nothing: another thread may start jobs on idle
        children meanwhile (their pipes are watched already), provided it makes
        ``wakeup`` readable when a job it starts has a deadline."""
        now = time.monotonic()
        deadlines = [d for c in self.children if (d := c.deadline()) is not None]
        if self.max_memory and self.busy():
            deadlines.append(self._next_memory_check)
        timeout = max(0.0, min(deadlines) - now) if deadlines else None
        # A child being killed may still send results; they no longer count.
        watched = [c.conn for c in self.children if c.ending is None]
        watched += [c.process.sentinel for c in self.children + self._retiring]
        return wait([*watched, wakeup], timeout)

    def handle(self, ready: list) -> tuple[list[Outcome], list[Item]]:
        """Take what `wait` found ready. Returns the outcomes of finished jobs
        (those of jobs whose child died or was killed included), and the jobs
        to run again, one at a time: the rest of a batch whose child died."""
        by_conn = {c.conn: c for c in self.children if c.ending is None}
        by_sentinel = {c.process.sentinel: c for c in self.children + self._retiring}
        outcomes: list[Outcome] = []
        again: list[Item] = []
        for ready_one in ready:
            child = by_conn.get(ready_one)
            if child is not None:
                try:
                    results, seconds = child.conn.recv()
                except BadMessage as e:
                    # The pipe is out of step: the child goes, failing its
                    # job. (A result over the limit fails in the child, before this.)
                    if child.batch:
                        child.end(Outcome(child.ids()[0], Status.LOST, Failure.unreadable(child.pid, e)))
                    continue
                except (EOFError, OSError):
                    continue    # it died; its sentinel tells the rest
                pid = child.pid
                outcomes.extend(Outcome(i, Status(status), payload, retryable, pid, started, ended, raised)
                                for i, status, payload, retryable, started, ended, raised in results)
                self._finished(child, seconds)
            child = by_sentinel.get(ready_one)
            if child is not None:
                lost, rerun = self._reap(child)
                outcomes.extend(lost)
                again.extend(rerun)
        self._enforce_deadlines()
        return outcomes, again

    def _finished(self, child: Child, seconds: float) -> None:
        """A child sent its batch's results; its jobs took ``seconds`` in all."""
        took = seconds / len(child.batch)
        self.job_seconds = took if self.job_seconds is None else 0.8 * self.job_seconds + 0.2 * took
        fn = child.batch[0][0].fn
        previous = self.fn_seconds.get(fn)
        if previous is None and len(self.fn_seconds) >= 1024:
            self.fn_seconds.clear()
        self.fn_seconds[fn] = took if previous is None else 0.8 * previous + 0.2 * took
        child.jobs += len(child.batch)
        child.batch = []
        if (self.max_tasks and child.jobs >= self.max_tasks) or \
                (self.max_memory and _rss(child) > self.max_memory):
            try:
                child.conn.send(None)
            except OSError:
                pass    # already dead: reaped all the same
            self._retiring.append(child)
            self.children[self.children.index(child)] = Child(self._ctx, self.link)

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        check_memory = self.max_memory and now >= self._next_memory_check
        if check_memory:
            self._next_memory_check = now + SETTINGS.memory_check
        for child in self.busy():
            task = child.task
            if child.kill_at is not None:
                if now >= child.kill_at:
                    child.process.kill()
                    child.kill_at = None    # the sentinel follows
            elif task is not None and task.timeout is not None and now >= child.started + task.timeout:
                log.warning("job %d ran past its timeout of %g s: killing pid %d", task.id, task.timeout, child.pid,
                            extra={"event": "timeout_kill", "job": task.id, "pid": child.pid})
                child.end(Outcome(task.id, Status.TIMEOUT,
                                  Failure.timed_out(child.pid, task.timeout, task.attempt), True))
            elif check_memory and self.max_memory and (rss := _rss(child)) > self.max_memory:
                child.process.kill()
                job_id = child.ids()[0]
                log.warning("pid %d running job %d grew to %d MiB, past --max-memory-per-child of %d MiB: killed",
                            child.pid, job_id, rss >> 20, self.max_memory >> 20,
                            extra={"event": "memory_kill", "job": job_id, "pid": child.pid, "rss": rss})
                child.ending = Outcome(job_id, Status.LOST, Failure.too_big(child.pid, rss, self.max_memory))

    def _reap(self, child: Child) -> tuple[list[Outcome], list[Item]]:
        child.process.join()
        child.conn.close()
        if child in self._retiring:
            self._retiring.remove(child)
            return [], []
        self.children[self.children.index(child)] = Child(self._ctx, self.link)
        if not child.batch:
            return [], []
        ended = time.time()
        if child.ending is None:
            exitcode = child.process.exitcode
            how = signal_name(exitcode) or f"exit code {exitcode}"
            log.warning("pid %d died (%s) running job %s", child.pid, how, ", ".join(map(str, child.ids())),
                        extra={"event": "child_died", "jobs": child.ids(), "pid": child.pid, "exitcode": exitcode,
                               "signal": signal_name(exitcode)})
        if child.task is not None:      # it ran one job: that job is the one
            outcome = child.ending or Outcome(child.task.id, Status.LOST,
                                              Failure.died(child.pid, child.process.exitcode), True)
            return [outcome._replace(pid=child.pid, started=child.began, ended=ended)], []
        # A batch: no telling which job did it. Each runs again, alone, and is
        # charged only if it does it again; a job we withdrew stays withdrawn.
        ending = child.ending if child.ending and child.ending.status is Status.CANCELLED else None
        rerun = [item for item in child.batch if ending is None or item[0].id != ending.id]
        if ending is None:
            return [], rerun
        return [ending._replace(pid=child.pid, started=child.began, ended=ended)], rerun

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
        everyone = self.children + self._retiring
        deadline = time.monotonic() + SETTINGS.child_grace
        for child in everyone:
            child.process.join(max(0.0, deadline - time.monotonic()))
        for child in everyone:
            if child.process.is_alive():
                child.process.terminate()
                child.process.join(SETTINGS.child_grace)
            if child.process.is_alive():
                child.process.kill()
                child.process.join()
            child.conn.close()


class Load:
    """The CPU and memory of a pool's children, read with psutil, for the
    worker's heartbeat (`mpqueue status --watch`, the dashboard).

    Read once a heartbeat, not per job: a reading costs two reads of /proc
    per child. A child's CPU % is its CPU time since the previous reading
    over the time between them (psutil's ``cpu_percent``), so the
    `psutil.Process` of each child is kept from one reading to the next; a
    child new since then counts from its first reading on."""

    def __init__(self) -> None:
        self._processes: dict[int, psutil.Process] = {}

    def sample(self, pids: list[int]) -> tuple[float, int]:
        """(CPU % of one core, summed; RSS in bytes, summed) of these children."""
        known, self._processes = self._processes, {}
        cpu, rss = 0.0, 0
        for pid in pids:
            try:
                process = known.get(pid) or psutil.Process(pid)
                with process.oneshot():
                    cpu += process.cpu_percent(None)
                    rss += process.memory_info().rss
            except psutil.Error:
                continue    # gone since: its replacement is read next time
            self._processes[pid] = process
        return round(cpu, 1), rss


def _rss(child: Child) -> int:
    try:
        return psutil.Process(child.pid).memory_info().rss
    except psutil.NoSuchProcess:
        return 0


# -- inside the child ---------------------------------------------------------

def _forget_inherited_forkserver() -> None:
    """In a process forked from one that ran a forkserver: that one is its
    parent's, not its own (it could not ask its state: it is not its child).
    This process starts one of its own when it first needs one."""
    from multiprocessing import forkserver
    server: Any = forkserver._forkserver     # its private state, which typeshed does not declare
    if server._forkserver_alive_fd is not None:
        os.close(server._forkserver_alive_fd)
    server._forkserver_alive_fd = server._forkserver_address = server._forkserver_pid = None


def _die_with_worker() -> None:
    """Have the kernel kill this child when the worker is gone, even by ``kill -9``.

    The forkserver (our parent) exits once every holder of its "alive" pipe
    has; it hands each child a copy, which would keep it, and so us, running
    after the worker died. We close ours, so the forkserver exits with the
    worker, and ask for SIGKILL when our parent exits.
    """
    from multiprocessing import forkserver
    server: Any = forkserver._forkserver     # its private state, which typeshed does not declare
    if server._forkserver_alive_fd is not None:
        os.close(server._forkserver_alive_fd)
        server._forkserver_alive_fd = None
    if sys.platform.startswith("linux"):
        import ctypes
        PR_SET_PDEATHSIG = 1
        parent = os.getppid()
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:      # it was already gone
            os._exit(1)


def _child_main(sock: socket.socket, link: tuple | None = None) -> None:
    conn = Connection(sock.detach())
    shared._worker_link = link      # jobs reach their broker's shared objects with it
    # Ctrl-C in the worker's terminal reaches the whole process group; the
    # worker decides what happens to the jobs, not the signal.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_worker()
    functions: OrderedDict[bytes, object] = OrderedDict()
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return      # the worker is gone
        if message is None:
            return
        tasks, blobs, max_payload, shm_tag = message
        results = []
        began = time.perf_counter()
        for task in tasks:
            started = time.time()
            status, payload, retryable, raised = _execute(task, blobs[task.fn], functions, max_payload, shm_tag)
            results.append((task.id, int(status), payload, retryable, started, time.time(), raised))
        try:
            conn.send((results, time.perf_counter() - began))
        except OSError:
            return


def _execute(task: Task, blob: bytes, functions: OrderedDict, max_payload: int,
             shm_tag: str | None = None) -> tuple[Status, Payload, bool, Raised | None]:
    """Run one job: its status, payload, whether it may be retried, and what
    it raised as text (`Raised`), for the broker's history."""
    shared._job = (task.id, task.attempt)
    try:
        fn, warning = _function(task.fn, blob, functions)
        args = _load(task.payload, "arguments")
        if task.chunked:
            result = [fn(*a) for a in args]
        else:
            result = fn(*args[0], **args[1])
    except EnvironmentMismatch as exc:
        return _failed(exc, task, False)    # running it again changes nothing
    except BaseException as exc:
        return _failed(exc, task, _retryable(exc, task.retry_on))
    del args
    try:
        pickled: bytes | bytearray = dumps_payload(result if warning is None else Warned(result, warning))[0]
    except BaseException as exc:
        err = pickle.PicklingError(f"cannot pickle the result of the job: {exc}")
        err.__cause__ = exc
        return _failed(err, task, False)
    del result
    error = too_large("the job's result pickles", len(pickled), max_payload)
    if error is not None:
        return _failed(error, task, False)
    if shm_tag is not None and len(pickled) >= shm.THRESHOLD:
        # Held by the worker until the broker has it: the worker is its owner.
        pickled = shm.write(pickled, shm_tag, owner=os.getppid()) or pickled
    return Status.OK, out_of_band(pickled), False, None


def _failed(exc: BaseException, task: Task, retryable: bool) -> tuple[Status, Payload, bool, Raised]:
    packed, raised = pack_exception(exc, task.attempt)
    return Status.ERROR, packed, retryable, raised


def _retryable(exc: BaseException, retry_on: bytes | None) -> bool:
    if retry_on is None:
        return True
    try:
        return isinstance(exc, loads(retry_on))
    except Exception:
        return False


def _function(key: bytes, blob: bytes, functions: OrderedDict) -> tuple[Any, str | None]:
    """The job's function, unpickled once per process (most recent first),
    and the warning to send with its results. The code shipped with it comes
    first on ``sys.path``, and the package versions it needs are compared."""
    found = functions.get(key)
    if found is not None:
        fn, code, warning = found
        if not shipping.activate(code):
            functions.move_to_end(key)
            return fn, warning
        functions.clear()       # unpickled from another bundle's modules: dropped
    header, pickled = unwrap_function(blob)
    wanted = shipping.Header.from_dict(header)
    if shipping.activate(wanted.code):
        functions.clear()
    warning = shipping.check(wanted)
    functions[key] = (_load(pickled, "function"), wanted.code, warning)
    if len(functions) > FUNCTION_CACHE:
        functions.popitem(last=False)
    return functions[key][0], warning


def _load(pickled: Payload, what: str) -> Any:
    """Unpickle the job's function or arguments (read in place from shared
    memory if its client left them there: `shm`)."""
    try:
        path = shm.path_of(pickled)
        return loads(pickled) if path is None else shm.load(path)
    except ImportError as exc:
        raise type(exc)(
            f"{exc} (on this worker, {socket.gethostname()}, unpickling the job's {what}). Your own "
            "modules travel with the job; an installed package must be installed on the workers too; "
            "Client(ship=[...]) ships a module the client has not imported", name=exc.name) from exc
