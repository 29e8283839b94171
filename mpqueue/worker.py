"""The worker: leases jobs from the broker and runs them in its process pool.

::

    fetch thread ──broker.fetch()──▶ inbox ──▶ idle children (ProcessPool)
    main thread ◀── results, deaths, deadlines ◀──────┘   (and starts the next jobs)
    report thread ◀── outbox ◀───┘   (results, and which jobs run now)
         └──broker.report(): results in batches, and a heartbeat when idle

Four threads, each blocking on its own thing: the fetch thread in the broker
(it asks for at most as many jobs as the worker has room for: see `capacity`),
and hands what it gets to idle children itself, sparing a wakeup of the main
thread; the main thread on its children's pipes, sentinels and deadlines; the
report thread on its outbox; and the control thread in the broker until
there are jobs to withdraw (cancelled: dropped if not started, their child
killed if they were) or the cluster's shutdown event is set. The pool is
used under the lock, except while the main thread waits on it.

Stopping: the first SIGTERM or Ctrl-C (or the cluster's shutdown) is a warm
stop: no more fetching, running jobs finish and their results are delivered.
A second one is a cold stop: running jobs are killed. Either way the worker
then unregisters, and the broker re-queues whatever it still held: nothing
is lost.

The threads of every process, and the path of a job through them:
docs/internals.md.
"""

from __future__ import annotations

import enum
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections import OrderedDict, deque

from . import __version__, shm
from .config import SETTINGS, format_address
from .errors import BrokerUnavailable
from .handshake import VERSIONS
from .pool import Load, ProcessPool
from .protocol import Task, WorkerHello, batch_length, payload_size, unwrap_function
from .shipping import Header, bundle_path, installed, store
from .transport import Reconnecting, connect, reach_broker

log = logging.getLogger("mpqueue.worker")

class Stop(enum.IntEnum):
    """How far a worker has gone in stopping; each level includes those below."""
    NONE = 0    # serving
    WARM = 1    # fetching no more; running jobs finish and are delivered
    COLD = 2    # running jobs are killed


#: Prefetch at most this many jobs per proc, however short they are.
MAX_PREFETCH = 64


def capacity(procs: int, job_seconds: float | None) -> int:
    """How many jobs a worker holds at once: one running per proc, plus a prefetch.

    The prefetch covers about ``SETTINGS.prefetch_seconds`` of work per proc:
    one job each when jobs are long (so an idle host is never starved by a busy
    one), up to `MAX_PREFETCH` each when they are so short that a round trip to
    the broker per few jobs would leave the children idle.
    """
    if not job_seconds:
        return 2 * procs
    per_proc = int(SETTINGS.prefetch_seconds / job_seconds)
    return procs * (1 + max(1, min(MAX_PREFETCH, per_proc)))


def refill(procs: int, capacity: int) -> int:
    """The least room worth a fetch: half the prefetch, at least one job.

    Asking as soon as one job finishes costs the broker a call per job or two
    when the worker gets a core only now and then (many workers on few cores)
    or when the broker is far: a call costs the broker about 90 us of CPU, a
    no-op job 15. Waiting until half the prefetch has run asks for many at
    once, while the other half (about ``prefetch_seconds / 2`` of work) keeps
    the children busy during the round trip. With long jobs the prefetch is
    one job per proc, and a worker of one proc still asks at once.
    """
    return max(1, (capacity - procs) // 2)


class Worker:
    def __init__(self, address: tuple[str, int], authkey: bytes, procs: int, *,
                 max_tasks_per_child: int | None = None, max_memory_per_child: int | None = None,
                 reconnect_timeout: float = SETTINGS.reconnect_timeout, fork_first: bool = False):
        self.address = address
        self._fork_first = fork_first       # the pool's first children: see `ProcessPool`
        self._authkey = authkey     # the children's, for `mpqueue.shared`
        self.procs = procs
        self.max_tasks_per_child = max_tasks_per_child
        self.max_memory_per_child = max_memory_per_child
        self.id = uuid.uuid4().hex[:12]
        self.broker, _ = connect(address, authkey)
        self._link = Reconnecting(address, self._rejoin, reconnect_timeout, self.broker)
        self._lock = threading.Condition()
        self._inbox: deque = deque()        # (task, function bytes), fetched, not started
        self._in_hand = 0                   # fetched and not yet finished
        self._capacity = capacity(procs, None)
        self._outbox: list = []             # outcomes not yet reported
        self._reporting_now: list = []      # outcomes the report thread is sending
        self._running: tuple[int, list[int]] = (0, [])  # (version, ids of the jobs children run now)
        self._requests: list = []           # (job id, force): withdraw, from the broker
        self._answers: dict[int, bool] = {}  # job id -> withdrawn?, for the broker
        self._drop_on_arrival: set[int] = set()   # withdrawn while on their way to us
        self._finished: deque = deque(maxlen=4096)  # ids of recently finished jobs
        self._solo: set[int] = set()        # in a batch whose child died: run alone
        self._prepared: OrderedDict[bytes, None] = OrderedDict()  # functions whose code is here (`_prepare`)
        self._packages: dict[str, str | None] = {}      # this host's versions of packages jobs asked for
        self._packages_new: dict[str, str | None] = {}  # of those, the ones the broker has not heard of
        self._shm_tag: str | None = None    # set when registered on the broker's host: large results via `shm`
        self._stop = Stop.NONE
        self._stopped = threading.Event()   # set with _stop: ends the wait for a broker at start
        self._reporting = False
        self._fetcher_waits = False         # the fetch thread waits for room
        self._heartbeat = SETTINGS.heartbeat_interval
        self._load = Load()                     # the children's CPU and RSS: read by the report thread
        self._load_at = 0.0                     # when it reads them next (monotonic)
        self._max_payload = int(SETTINGS.max_payload)    # the broker's, once registered
        self._broker_id: str | None = None     # which broker we registered with
        self._orphans: set[int] = set()         # running jobs the broker no longer knows: not reported
        self._failure: BrokerUnavailable | None = None
        self._pool: ProcessPool | None = None  # once serving; the fetch thread starts jobs on it
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    def run(self) -> int:
        """Serve until stopped. Returns the process exit code."""
        # The pool first: its processes start while a broker starting at
        # the same time (a local cluster's) gets ready.
        pool = ProcessPool(self.procs, self.max_tasks_per_child, self.max_memory_per_child,
                           link=(self.address, self._authkey), fork_first=self._fork_first)
        self._install_signals()
        try:
            reach_broker(self.address, self._register, abandoned=self._stopped)
        except BaseException as e:
            pool.close()
            if isinstance(e, BrokerUnavailable) and self._stopped.is_set():
                log.info("worker %s stopped before it joined a broker", self.id)
                return 0
            raise
        log.info("worker %s serving %s with %d procs", self.id, format_address(self.address), self.procs)
        self._reporting = True
        reporter = threading.Thread(target=self._guard, args=(self._report_loop,), name="report")
        reporter.start()
        # These two may be blocked in the broker when we stop: they are not
        # waited for. What the fetcher leases late, unregister() gives back.
        for loop in (self._fetch_loop, self._control_loop):
            threading.Thread(target=self._guard, args=(loop,), name=loop.__name__, daemon=True).start()
        try:
            self._serve(pool)
        finally:
            with self._lock:
                self._pool = None       # the fetch thread starts no more jobs
            if self._stop is Stop.COLD or self._failure:
                pool.kill_busy()
            with self._lock:
                self._reporting = False
                self._lock.notify_all()
                delivered = not self._outbox and not self._reporting_now
            if delivered:
                self._link.abandon()    # a broker that went away is not waited for
            reporter.join()
            pool.close()
        if self._failure is not None:
            log.error("%s; stopping", self._failure)
            return 1
        try:
            self.broker.unregister(self.id)   # the broker re-queues anything left
        except BrokerUnavailable:
            pass
        log.info("worker %s stopped", self.id)
        return 0

    def _serve(self, pool: ProcessPool) -> None:
        with self._lock:
            self._pool = pool
        while True:
            with self._lock:
                stop = self._stop
                if stop is Stop.COLD:
                    return                      # run() kills the busy children
                unstarted = [task.id for task, _ in self._inbox] if stop else []
                if stop:
                    self._inbox.clear()
                    if not pool.busy() and not unstarted:
                        return
                if self._requests:
                    self._withdraw(pool)
                self._start_jobs(pool)
                self._capacity = capacity(self.procs, pool.job_seconds)
            if unstarted:       # other workers can run them while ours finish
                try:
                    self.broker.release(self.id, unstarted)
                except BrokerUnavailable:
                    pass        # a broker that comes back has them queued again
                continue
            ready = pool.wait(self._wake_r)
            self._drain_wakeups()
            with self._lock:
                outcomes, again = pool.handle(ready)
            if again:
                with self._lock:
                    self._solo.update(task.id for task, _ in again)
                    self._inbox.extendleft(reversed(again))
            if outcomes:
                with self._lock:
                    self._finished.extend(o.id for o in outcomes)
                    self._in_hand -= len(outcomes)
                    if self._orphans:
                        _drop_files([o for o in outcomes if o.id in self._orphans])
                        outcomes = [o for o in outcomes if o.id not in self._orphans]
                        self._orphans.difference_update(self._finished)
                    self._note_running(pool)
                    running = self._running
                    # Gone idle: report from here at once, sparing the latency
                    # of a handoff; while busy, the report thread batches.
                    direct = (not self._inbox and not pool.busy() and not self._outbox
                              and batch_length(outcomes, _size) == len(outcomes))
                    if not direct:
                        self._outbox.extend(outcomes)
                    room = self._capacity - self._in_hand >= refill(self.procs, self._capacity)
                    if (self._fetcher_waits and room) or not direct:   # room for a fetch, or a report
                        self._lock.notify_all()
                if direct and outcomes:
                    self._report_now(outcomes, running)

    def _start_jobs(self, pool: ProcessPool) -> bool:
        """Give idle children jobs from the inbox (lock held). Returns whether
        one of them has a deadline for the main thread to watch."""
        idle = pool.idle()
        started = []
        while idle and self._inbox:
            child = idle.pop()
            child.run(self._take_batch(pool, child), self._max_payload, self._shm_tag)
            started.append(child)
        self._note_running(pool)
        return any(c.deadline() is not None for c in started) or bool(started and pool.max_memory)

    def _note_running(self, pool: ProcessPool) -> None:
        """Record which jobs run now (lock held), versioned so that the broker
        keeps the newest when two threads report at once."""
        ids = [i for c in pool.busy() for i in c.ids()]
        if ids != self._running[1]:
            self._running = (self._running[0] + 1, ids)

    def _report_now(self, outcomes: list, running: tuple[int, list[int]]) -> None:
        with self._lock:
            broker_id = self._broker_id
            packages, self._packages_new = self._packages_new, {}
        try:
            self.broker.report(self.id, outcomes, running, packages or None)
        except BrokerUnavailable:
            self._hold(outcomes, broker_id, packages)   # the report thread delivers them after a reconnect

    def _hold(self, outcomes: list, broker_id: str | None, packages: dict) -> None:
        """Keep what a report could not deliver, unless it is for a broker that
        is gone for good (we rejoined a new one meanwhile: told it all)."""
        with self._lock:
            if broker_id == self._broker_id:
                self._outbox[:0] = outcomes
                self._packages_new = {**packages, **self._packages_new}
                self._lock.notify_all()
            else:
                _drop_files(outcomes)

    def _take_batch(self, pool: ProcessPool, child) -> list:
        """The next jobs for one child: several of one function if it is short."""
        first = self._inbox.popleft()
        if first[0].id in self._solo:
            self._solo.discard(first[0].id)
            return [first]
        batch = [first]
        size = pool.batch_size(first[0], len(self._inbox) + 1, child)
        while len(batch) < size and self._inbox:
            task = self._inbox[0][0]
            if task.fn != first[0].fn or task.timeout is not None or task.id in self._solo:
                break
            batch.append(self._inbox.popleft())
        return batch

    # -- threads ------------------------------------------------------------

    def _guard(self, loop) -> None:
        try:
            loop()
        except BrokerUnavailable as e:
            with self._lock:
                self._failure = self._failure or e
                self._stop = Stop.COLD
        except Exception as e:     # a bug of ours: stop, loudly, rather than limp on
            log.exception("internal error in the %s thread", threading.current_thread().name)
            with self._lock:
                self._failure = self._failure or BrokerUnavailable(f"internal error: {e!r}")
                self._stop = Stop.COLD
        finally:
            self._wake()

    def _register(self, running: list[int] | tuple = (), finished: list[int] | tuple = ()) -> None:
        versions = {"version": __version__, "python": VERSIONS["python"], "cloudpickle": VERSIONS["cloudpickle"]}
        reply = self.broker.register(self.id, WorkerHello(socket.gethostname(), os.getpid(), self.procs, versions,
                                                          self._broker_id, tuple(running), tuple(finished)))
        self._heartbeat = reply.heartbeat_interval     # the broker's timeout is what counts
        self._max_payload = reply.max_payload
        # Where the broker's /dev/shm is ours too, large results go through it (`shm`).
        self._shm_tag = shm.tag(self.id, reply.shm_probe) if shm.shares(reply.shm_probe) else None
        with self._lock:
            # A different broker than before (restarted without its journal):
            # the job ids we hold mean nothing to it, or another job.
            new = reply.new and self._broker_id is not None
            if new:
                _drop_files(self._outbox)
                dropped, self._outbox = len(self._outbox), []
                self._finished.clear()
                self._drop_on_arrival.clear()
                self._solo.clear()
            self._broker_id = reply.broker_id    # under the lock: _hold() compares it
            self._packages_new = dict(self._packages)   # all of them, to a broker that may not know
        if new:
            log.warning("the broker at %s is a new one: dropping %d results it cannot want",
                        format_address(self.address), dropped)
        if reply.unknown:
            # Jobs the broker no longer has (it restarted without a journal,
            # or they were finished elsewhere): nobody wants their results.
            log.info("stopping %d running jobs the broker no longer knows", len(reply.unknown))
            with self._lock:
                self._orphans.update(reply.unknown)
                self._requests.extend((job_id, True) for job_id in reply.unknown)
            self._wake()

    def _rejoin(self) -> None:
        """Register again, with a broker that restarted or that presumed us lost.

        Jobs fetched and not started are dropped: that broker has queued them
        again. Running ones are named, so that it leaves them with us, and so
        are finished ones whose results we still hold: queued again, they
        would run again, though their results are on the way.
        """
        with self._lock:
            self._in_hand -= len(self._inbox)
            self._inbox.clear()
            running = list(self._running[1])
            finished = [o.id for o in self._outbox + self._reporting_now]
            self._lock.notify_all()
        self._register(running, finished)
        log.info("rejoined the broker with %d jobs running and %d results to deliver",
                 len(running), len(finished))

    def _fetch_loop(self) -> None:
        while True:
            with self._lock:
                # Even short of room (`refill`), ask every wait slice (for
                # what room there is, if none without waiting): a worker the
                # broker presumed lost, its link cut and restored, learns it
                # here and rejoins while its jobs run.
                full_until = time.monotonic() + SETTINGS.wait_slice
                while (not self._stop and self._capacity - self._in_hand < refill(self.procs, self._capacity)
                       and (left := full_until - time.monotonic()) > 0):
                    self._fetcher_waits = True
                    self._lock.wait(left)
                self._fetcher_waits = False
                if self._stop:
                    return
                room = max(0, self._capacity - self._in_hand)
            try:
                reply = self._link.call(self.broker.fetch, self.id, room, SETTINGS.wait_slice if room else 0)
            except LookupError:
                if self._stop:
                    return
                log.warning("the broker presumed this worker lost (silent too long); rejoining")
                self._link.call(self._rejoin)
                continue
            if reply is None:
                return      # the cluster is shutting down: the watch thread stops us
            tasks, functions = reply
            self._prepare(functions)
            if tasks:
                tasks = [self._arguments(t) for t in tasks]
                with self._lock:
                    arrived = [t for t in tasks if t.id not in self._drop_on_arrival]
                    self._drop_on_arrival.difference_update(t.id for t in tasks)
                    self._inbox.extend((t, functions[t.fn]) for t in arrived)
                    self._in_hand += len(arrived)
                    # Start them here, sparing the main thread a wakeup, unless
                    # stopping (the main thread gives them back) or before it serves.
                    wake = self._stop or self._pool is None or self._start_jobs(self._pool)
                if wake:
                    self._wake()

    def _prepare(self, functions: dict[bytes, bytes]) -> None:
        """Before their jobs start: fetch the shipped code new functions need,
        and note this host's versions of the packages they ask for (shown by
        `mpqueue status`). The children compare versions (`shipping.check`)."""
        for key, blob in functions.items():
            if key in self._prepared:
                continue
            try:
                header = Header.from_dict(unwrap_function(blob)[0])
            except ValueError:
                continue    # the child says what is wrong with it
            if header.code is not None and not os.path.exists(bundle_path(header.code)):
                data = self._link.call(self.broker.code, bytes.fromhex(header.code))
                try:
                    if data is None:
                        log.warning("the broker no longer has the code shipped with a job (%s): it restarted "
                                    "without its journal?", header.code)
                    else:
                        store(header.code, data)
                except (OSError, ValueError) as e:
                    log.warning("cannot keep the code shipped with a job in %s: %s", bundle_path(header.code), e)
            versions = installed(header.requires)
            with self._lock:
                new = {dist: v for dist, v in versions.items() if self._packages.get(dist, "") != v}
                self._packages.update(new)
                self._packages_new.update(new)
            self._prepared[key] = None
            if len(self._prepared) > 4096:
                self._prepared.popitem(last=False)

    def _arguments(self, task: Task) -> Task:
        """A task whose arguments its client left in shared memory on the
        broker's host (`shm`): as it is if we are on that host, else with the
        bytes, from the broker."""
        path = shm.path_of(task.payload)
        if path is None or os.path.exists(path):
            return task
        data = self._link.call(self.broker.payload, self.id, path)
        return task if data is None else task._replace(payload=data)

    def _withdraw(self, pool: ProcessPool) -> None:
        """Answer the broker's withdraw requests (with the lock held).

        Not started: dropped (yes). Running: killed only if forced (yes), else
        left alone (no). Finished: no. Not arrived yet: dropped on arrival (yes).
        """
        inbox = {task.id for task, _ in self._inbox}
        for job_id, force in self._requests:
            if job_id in inbox:
                withdrawn = True
            elif any(job_id in c.ids() for c in pool.busy()):
                withdrawn = force and pool.withdraw(job_id)
            elif job_id in self._finished:
                withdrawn = False
            else:
                self._drop_on_arrival.add(job_id)
                withdrawn = True
            self._answers[job_id] = withdrawn
        dropped = {i for i, _ in self._requests if i in inbox}
        self._inbox = deque(item for item in self._inbox if item[0].id not in dropped)
        self._in_hand -= len(dropped)
        self._requests = []
        self._lock.notify_all()

    def _control_loop(self) -> None:
        answers: dict[int, bool] = {}
        while True:
            requests = self._link.call(self.broker.control, self.id, SETTINGS.wait_slice, answers)
            if requests is None:
                log.info("the cluster is shutting down: finishing running jobs")
                self.stop()
                return
            with self._lock:
                self._requests.extend(requests)
                self._wake()
                while any(job_id not in self._answers for job_id, _ in requests):
                    self._lock.wait()
                answers = {job_id: self._answers.pop(job_id)
                           for job_id in dict.fromkeys(job_id for job_id, _ in requests)}

    def _report_loop(self) -> None:
        beat = time.monotonic() + self._heartbeat
        while True:
            with self._lock:
                while not self._outbox and self._reporting and (wait := beat - time.monotonic()) > 0:
                    self._lock.wait(wait)
                if not self._reporting and not self._outbox:
                    # Stopping with everything reported: unregister() says
                    # the rest, and a broker that is gone is not waited for.
                    return
            # Each attempt takes the outbox afresh: after a reconnect to a new
            # broker it was emptied, and what it held must not reach that one.
            self._link.call(self._report_outbox)
            beat = time.monotonic() + self._heartbeat

    def _report_outbox(self) -> None:
        with self._lock:
            cut = batch_length(self._outbox, _size)
            outcomes, self._outbox = self._outbox[:cut], self._outbox[cut:]
            self._reporting_now = outcomes
            running, broker_id = self._running, self._broker_id
            packages, self._packages_new = self._packages_new, {}
            pids = [c.pid for c in self._pool.children] if self._pool else []
        load = None
        if time.monotonic() >= self._load_at:   # once a heartbeat, however often it reports
            load = self._load.sample(pids)
            self._load_at = time.monotonic() + self._heartbeat
        try:
            self.broker.report(self.id, outcomes, running, packages or None, load)
        except BrokerUnavailable:
            self._hold(outcomes, broker_id, packages)
            raise
        finally:
            with self._lock:
                self._reporting_now = []

    # -- signals and wakeups --------------------------------------------------

    def stop(self, cold: bool = False) -> None:
        """Stop warm (running jobs finish) or cold (they are killed). Any thread."""
        with self._lock:
            self._stop = max(self._stop, Stop.COLD if cold else Stop.WARM)
            self._lock.notify_all()
        self._stopped.set()
        if cold:
            self._link.abandon()
        self._wake()

    def _install_signals(self) -> None:
        def on_signal(signum, frame):
            cold = self._stop is not Stop.NONE
            self.stop(cold)
            how = "cold stop: killing running jobs" if cold else "warm stop: finishing running jobs"
            log.info("%s received; %s", signal.Signals(signum).name, how)
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass    # already full of wakeups

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass


def _drop_files(outcomes: list) -> None:
    """Outcomes no broker will get: their shared-memory files (`shm`) go."""
    for outcome in outcomes:
        if (path := shm.path_of(outcome.payload)) is not None:
            shm.remove(path)


def _size(outcome) -> int:
    """An outcome's payload bytes, for cutting reports into messages."""
    return payload_size(outcome.payload)
