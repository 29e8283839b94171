"""The broker: every job's state, served to workers and clients over TCP.

::

    submit ─▶ queue ─fetch─▶ held by a worker ─report─▶ results of its client ─collect/ack─▶ gone
              ▲  ▲                 │
              │  └── re-queued ────┤  worker lost (connection closed, heartbeats stopped),
              │                    │  or its child died with attempts left
              └─ delayed ◀─────────┘  raised or timed out with retries left (backoff)

The queue is a heap: higher priority first, then submission order. Cancelling
removes a queued job at once. For one a worker holds, only the worker knows
whether it has started: the broker asks it through the worker's control call
and waits for the answer (dropped if not started; if started, its child is
killed only when forced).

Dispatch is a lease, never a bare ``Queue.get()``: the broker records which
worker holds which job, a job is done only when its result arrives, and the
jobs of a worker that disappears go back to the queue. A result leaves only
once its client acknowledges it on its next `collect`, so a client that dies
while a reply is in flight loses nothing the broker could still give it.

Each connection is served by its own thread of the manager server; one lock
guards all state. A `fetch` or `collect` with nothing to return is parked (see
`_Parked`): the call that makes it answerable sends the answer, and a timer
thread answers the ones whose wait ran out, so nothing here ever polls, and
no thread wakes only to pass a job or a result on. Payloads are opaque bytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import heapq
import itertools
import logging
import random
import signal
import threading
import time
import uuid
from collections import deque
from typing import Callable

from .config import SETTINGS, Settings
from .connection import MAX_MESSAGE
from .errors import ConfigError
from .journal import Journal
from .protocol import BATCH_BYTES, Delivery, Options, Outcome, Status, Submission, Task
from .transport import DEFERRED, BrokerServer

log = logging.getLogger("mpqueue.broker")

#: A job whose process dies this many times (or retries + 1, if more) fails
#: with WorkerLost.
MAX_DEATHS = 3
#: Most results handed to a client in one `collect` (and BATCH_BYTES of them
#: at most, as for a `fetch`).
COLLECT_BATCH = 1000
#: Once a backlog of this many jobs or more has drained, the broker gives its
#: freed memory back to the system (`Broker.release_memory`).
TRIM_AFTER = 10_000


@dataclasses.dataclass(slots=True, eq=False)
class _Job:
    task: Task
    options: Options
    client: str
    seq: int
    worker: str | None = None   # the session holding its lease, if any
    attempts: int = 0           # times handed to a worker and not given back
    deaths: int = 0             # times the process running it died
    queued: bool = False        # in the queue now (not leased, not backing off)


@dataclasses.dataclass(eq=False)
class _Worker:
    id: str
    host: str
    pid: int
    procs: int
    address: str | None = None  # IP address its connection came from
    versions: dict = dataclasses.field(default_factory=dict)  # its mpqueue, Python, cloudpickle
    held: set = dataclasses.field(default_factory=set)      # job ids leased to it
    running: set = dataclasses.field(default_factory=set)   # as of its newest report
    running_version: int = 0
    withdraw: list = dataclasses.field(default_factory=list)   # (job id, force) to ask it
    done: int = 0
    failed: int = 0
    lost: int = 0
    timed_out: int = 0
    retried: int = 0
    last_seen: float = dataclasses.field(default_factory=time.time)
    last_seen_mono: float = dataclasses.field(default_factory=time.monotonic)


@dataclasses.dataclass(slots=True, eq=False)
class _Parked:
    """A `fetch` or `collect` call waiting for something to return.

    Its connection's thread has gone back to reading (it returned
    `DEFERRED`); the call that queues a job or finishes a result sends the
    answer through ``reply`` once its own changes are committed. That spares
    a thread wakeup per job at each end, which is most of what a round trip
    costs on a busy machine.
    """
    reply: Callable[[tuple], None]      # sends ("#RETURN", value) or ("#ERROR", exc) on its connection
    deadline: float                     # answered empty then
    worker: _Worker | None = None       # a fetch: whose, and how many jobs at most
    max_jobs: int = 0
    urgent: bool = False                # a collect a thread waits on (`Broker.collect`)


@dataclasses.dataclass(eq=False)
class _Client:
    jobs: dict = dataclasses.field(default_factory=dict)     # its seq -> job id, unfinished
    results: deque = dataclasses.field(default_factory=deque)  # (number, Delivery, created), not yet acked
    numbers: itertools.count = dataclasses.field(default_factory=lambda: itertools.count(1))
    max_seq: int = 0            # its highest job number received: a batch sent again is skipped
    withdrawn: set = dataclasses.field(default_factory=set)  # its job numbers cancelled: a cancel asked again says so
    gone_since: float | None = None
    woken: bool = False         # its parked collects return, even empty (a cancel)
    kicked: tuple | None = None  # (kind, by whom) of a kick that found nothing parked (`Broker.collect`)
    #: Its parked collect calls, answered from the end: urgent ones (a thread
    #: waiting on a result, which saves a handoff) are put there.
    collectors: list = dataclasses.field(default_factory=list)


def _first_id() -> int:
    """Where a broker starts numbering jobs: the clock, in microseconds.

    Ids go up by one from there; a broker handing out fewer than a million a
    second never reuses an id of an earlier run of itself, even one whose
    journal was restored from an older copy (or lost its last writes). So a
    worker that rejoins still running a job can never name another job.
    """
    return time.time_ns() // 1000


def _max_deaths(job: _Job) -> int:
    return max(MAX_DEATHS, job.options.retries + 1)


class Broker:
    """All queue state. Public methods are called through the transport, one
    thread per connection; the first argument of each is the caller's session
    id, which also tells `connection_closed` whose connection ended.

    With a `Journal`, every call that changes jobs, results or sessions
    commits its changes before it returns, and the state it holds is loaded
    back at start."""

    def __init__(self, settings: Settings = SETTINGS, journal: Journal | None = None):
        self.settings = settings
        self._journal = journal
        #: Which broker this is: the journal's, or this process's own. A
        #: worker rejoining a different one holds nothing it would know.
        self.id = uuid.uuid4().hex
        self._dirty: set[int] = set()                  # jobs whose attempts changed, for the journal
        self.shutdown_event = threading.Event()
        self._lock = threading.Lock()
        self._fetchers: deque[_Parked] = deque()       # parked fetch calls, oldest first
        self._recheck_fetchers = False                 # a worker left or rejoined: look at them
        self._nudged: set[str] = set()                 # clients with new results (or woken) in this call
        self._outgoing: list = []                      # (reply, message) to send once this call commits
        self._timer = threading.Condition(self._lock)  # the timer thread waits here
        self._timer_at: float | None = None            # when it wakes next
        self._control = threading.Condition(self._lock)  # workers' control calls wait here
        self._answered = threading.Condition(self._lock)  # cancels wait here for workers' answers
        self._answers: dict[int, bool] = {}             # job id -> withdrawn? (awaited ones only)
        self._awaited: dict[int, bool] = {}            # job id -> force, of cancels waiting
        self._local = threading.local()                # session of this connection
        self._connections: dict[str, int] = {}
        self._jobs: dict[int, _Job] = {}
        self._queue: list[tuple[int, int]] = []        # heap of (-priority, id); stale ids skipped
        self._queued = 0
        self._delayed: list[tuple[float, int]] = []    # heap of (due, id): retries backing off
        self._functions: dict[bytes, list] = {}        # digest -> [blob, jobs using it]
        self._workers: dict[str, _Worker] = {}
        self._clients: dict[str, _Client] = {}
        self._ids = itertools.count(_first_id())
        self._done = 0
        self._failed = 0
        self._drain_deadline: float | None = None
        self._backlog = 0                              # most jobs held since memory was last released
        if journal is not None:
            self._restore(journal.load())
        threading.Thread(target=self._run_timer, name="timer", daemon=True).start()

    def _restore(self, state: dict) -> None:
        """Take back a journal's state: every job queued, results waiting for their clients."""
        self.id = state["id"]
        self._ids = itertools.count(max(state["next_id"], _first_id()))
        self._functions = {fn: [blob, 0] for fn, blob in state["functions"].items()}
        now = time.monotonic()
        for session, (max_seq, last_number) in state["clients"].items():
            client = self._client(session)
            client.max_seq = max_seq
            client.numbers = itertools.count(last_number + 1)
        for job_id, session, seq, fn, payload, chunked, opts, attempts, deaths in state["jobs"]:
            task = Task(job_id, fn, payload, chunked, opts.timeout, opts.retry_on, 0)
            job = self._jobs[job_id] = _Job(task, opts, session, seq, attempts=attempts, deaths=deaths)
            self._functions[fn][1] += 1
            self._client(session).jobs[seq] = job_id
            self._push(job)
        wall = time.time()
        for session, number, delivery, created in state["results"]:
            # Their age, in this process's monotonic clock, for the TTL.
            self._client(session).results.append((number, delivery, now - max(0.0, wall - created)))
        for client in self._clients.values():
            client.gone_since = now     # until it reconnects
        log.info("journal %s: %d jobs queued again, %d results waiting for %d clients",
                 self._journal.path, len(self._jobs), len(state["results"]), len(self._clients))

    @contextlib.contextmanager
    def _changing(self):
        """Hold the lock for a call that changes state; answer the parked calls
        it made answerable, commit it all to the journal, then (lock released)
        send those answers."""
        outgoing = []
        try:
            with self._lock:
                try:
                    yield
                finally:
                    self._answer_parked()
                    if self._journal is not None:
                        self._journal.attempts((job.attempts, job.deaths, i) for i in self._dirty
                                               if (job := self._jobs.get(i)) is not None)
                        self._journal.commit()
                    self._dirty.clear()
                    outgoing, self._outgoing = self._outgoing, []
        finally:
            for reply, message in outgoing:
                reply(message)

    # -- parked calls -------------------------------------------------------

    def _park(self, wait: float, worker: _Worker | None = None, max_jobs: int = 0,
              urgent: bool = False) -> object:
        """Park this connection's call for up to ``wait`` s; returns `DEFERRED`."""
        parked = _Parked(self._local.reply, time.monotonic() + min(wait, self.settings.wait_slice),
                         worker, max_jobs, urgent)
        self._wake_timer(parked.deadline)
        if parked.worker is not None:
            self._fetchers.append(parked)
        elif parked.urgent:     # answered first (from the end)
            self._clients[self._local.session].collectors.append(parked)
        else:
            self._clients[self._local.session].collectors.insert(0, parked)
        return DEFERRED

    def _wake_timer(self, at: float) -> None:
        """The timer thread must act at ``at``: wake it if it sleeps past that."""
        if self._timer_at is None or at < self._timer_at:
            self._timer.notify()

    def _answer(self, parked: _Parked, value, error: bool = False) -> None:
        self._outgoing.append((parked.reply, ("#ERROR" if error else "#RETURN", value)))

    def _answer_parked(self) -> None:
        """Answer the parked calls that can be now (lock held)."""
        closing = self.shutdown_event.is_set()
        if self._fetchers and (self._queued or self._recheck_fetchers or closing):
            self._recheck_fetchers = False
            waiting: deque[_Parked] = deque()
            for parked in self._fetchers:
                worker = self._workers.get(parked.worker.id)
                if closing:
                    self._answer(parked, None)
                elif worker is None:
                    self._answer(parked, LookupError(f"worker {parked.worker.id} is not registered"), True)
                elif worker is not parked.worker:
                    # It registered again meanwhile: this call's connection is
                    # a dead one it left. Lease nothing on it.
                    self._answer(parked, ([], {}))
                elif self._queued and (leased := self._lease(worker, parked.max_jobs))[0]:
                    self._answer(parked, leased)
                else:
                    waiting.append(parked)
            self._fetchers = waiting
        for session in self._nudged:
            client = self._clients.get(session)
            if client is None or not client.collectors:
                continue
            if client.woken:
                client.woken = False
                for parked in client.collectors:
                    self._answer(parked, self._batch(client))
                client.collectors.clear()
            elif client.results:
                self._answer(client.collectors.pop(), self._batch(client))
        self._nudged.clear()

    def _run_timer(self) -> None:
        """Queue retries when due, and answer parked calls whose wait ran out."""
        while True:
            try:
                self._expire()
            except Exception:   # a bug of ours, or the journal failing: say so, go on
                log.exception("internal error in the broker's timer")
                time.sleep(1)
            with self._lock:
                times = [p.deadline for p in self._fetchers]
                times += [p.deadline for c in self._clients.values() for p in c.collectors]
                if self._delayed:
                    times.append(self._delayed[0][0])
                self._timer_at = min(times, default=None)
                self._timer.wait(None if self._timer_at is None else max(0.0, self._timer_at - time.monotonic()))
                self._timer_at = None

    def _expire(self) -> None:
        """Queue the retries now due; answer the parked calls whose wait ran out."""
        with self._changing():
            now = time.monotonic()
            self._promote_due()
            for parked in [p for p in self._fetchers if p.deadline <= now]:
                self._fetchers.remove(parked)
                self._answer(parked, ([], {}))
            for client in self._clients.values():
                for parked in [p for p in client.collectors if p.deadline <= now]:
                    client.collectors.remove(parked)
                    self._answer(parked, self._batch(client))

    # -- sessions ---------------------------------------------------------

    def _bind(self, session: str) -> None:
        """Remember that this connection serves ``session`` (caller holds the lock)."""
        if getattr(self._local, "session", None) != session:
            self._local.session = session
            self._connections[session] = self._connections.get(session, 0) + 1
            client = self._clients.get(session)
            if client is not None:
                client.gone_since = None

    def connection_closed(self) -> None:
        """Called by the server when a connection ends, in that connection's thread."""
        session = getattr(self._local, "session", None)
        if session is None:
            return
        with self._changing():
            reply = self._local.reply
            self._fetchers = deque(p for p in self._fetchers if p.reply is not reply)
            client = self._clients.get(session)
            if client is not None:
                client.collectors = [p for p in client.collectors if p.reply is not reply]
            left = self._connections[session] - 1
            if left:
                self._connections[session] = left
                return
            # Its last connection: the process is gone (or its network is).
            del self._connections[session]
            worker = self._workers.get(session)
            if worker is not None:
                log.warning("worker %s (%s pid %d) disconnected", worker.id, worker.host, worker.pid)
                self._lose_worker(worker, died=True)
            client = self._clients.get(session)
            if client is not None:
                client.gone_since = time.monotonic()

    def connection_opened(self, peer: str | None, reply: Callable[[tuple], None]) -> None:
        """Called by the server when a connection is authenticated, in that
        connection's thread, with the peer's IP address (hostnames can be alike:
        containers, cloned machines; addresses on one network are not), or
        "local" for one on our local socket (`handshake`), and how
        to answer a call of this connection later (`_Parked`)."""
        self._local.peer = peer
        self._local.reply = reply

    def register(self, session: str, kind: str, info: dict) -> dict:
        """A worker or client introduces itself."""
        with self._changing():
            self._bind(session)
            if kind == "worker":
                address = getattr(self._local, "peer", None)
                versions = {k: info.get(k) for k in ("version", "python", "cloudpickle")}
                old = self._workers.pop(session, None)
                self._recheck_fetchers = True   # its parked fetch, if any, is on a connection it left
                self._workers[session] = _Worker(session, info["host"], info["pid"], info["procs"],
                                                 address=address, versions=versions)
                log.info("worker %s joined from %s (%s) pid %d with %d procs",
                         session, info["host"], address, info["pid"], info["procs"])
                running = info.get("running", ())
                new = info.get("broker_id", self.id) != self.id
                if not new:
                    self._lease_back(self._workers[session], old, running, info.get("finished", ()))
                return {"heartbeat_interval": self.settings.heartbeat_interval, "broker_id": self.id,
                        "new": new, "unknown": [i for i in running if new or i not in self._jobs],
                        "max_payload": int(self.settings.max_payload)}
            # A client reconnecting to a broker that restarted without its
            # session (no journal, or it expired) is told so, and not taken on.
            known = session in self._clients
            if not known and info.get("resume"):
                return {"known": False}
            client = self._client(session)
            # Jobs it had sent (and we confirmed) that this broker has neither
            # queued nor finished: lost with a journal's last writes, or with
            # a journal restored from an older copy.
            finished = {delivery.seq for _, delivery, _ in client.results}
            missing = [seq for seq in info.get("pending", ())
                       if seq not in client.jobs and seq not in finished and seq not in client.withdrawn]
            return {"heartbeat_interval": self.settings.heartbeat_interval, "known": known,
                    "missing": missing, "max_payload": int(self.settings.max_payload)}

    def _lease_back(self, worker: _Worker, old: _Worker | None, running, finished) -> None:
        """A worker rejoining still runs these jobs, or holds the results of
        these ``finished`` ones, on their way: leave them with it (already
        counted as an attempt), not queued for another, which would run them
        again.

        ``old`` is its previous registration, if this broker still had it
        (its connections broke, the broker did not restart): the other jobs
        that worker held, it dropped unstarted.
        """
        kept = {*running, *finished}
        if old is not None:
            for job_id in old.held:
                job = self._jobs.get(job_id)
                if job is None or job.worker != worker.id:
                    continue
                if job_id in kept:
                    worker.held.add(job_id)
                else:
                    job.attempts -= 1
                    self._dirty.add(job_id)
                    self._requeue(job)
            # Withdraw requests it may never have got (sent on a dead
            # connection) are asked again; cancels waiting on jobs just
            # queued again look again.
            worker.withdraw = [(i, force) for i, force in self._awaited.items() if i in worker.held]
            self._answered.notify_all()
        for job_id in kept:
            job = self._jobs.get(job_id)
            if job is not None and job.queued:
                self._unqueue(job)
                job.worker = worker.id
                worker.held.add(job_id)
        worker.running.update(i for i in running if i in worker.held)

    def unregister(self, session: str) -> None:
        """A worker leaves cleanly; anything it still holds goes back to the queue."""
        with self._changing():
            worker = self._workers.get(session)
            if worker is not None:
                self._lose_worker(worker, died=False)

    def _client(self, session: str) -> _Client:
        client = self._clients.get(session)
        if client is None:
            client = self._clients[session] = _Client()
        return client

    def _lose_worker(self, worker: _Worker, died: bool) -> None:
        """Take back every job a worker held.

        If it died, each counts a death: it cannot be told whether a job had
        started (its report may be a second old), and a job that kills its
        worker must not be handed on forever.
        """
        del self._workers[worker.id]
        self._recheck_fetchers = True
        self._answered.notify_all()     # cancels waiting on its answers look again
        for job_id in worker.held:
            job = self._jobs.get(job_id)
            if job is None or job.worker != worker.id:
                continue
            self._dirty.add(job_id)
            if died:
                job.deaths += 1
                worker.lost += 1
                if job.deaths >= _max_deaths(job):
                    self._finish(job, Status.LOST, {
                        "pid": worker.pid, "host": worker.host, "exitcode": None,
                        "signal": None, "reason": f"worker {worker.id} was lost"})
                    continue
            else:
                job.attempts -= 1   # never started
            self._requeue(job)

    # -- the queue --------------------------------------------------------

    def _push(self, job: _Job) -> None:
        heapq.heappush(self._queue, (-job.options.priority, job.task.id))
        job.queued = True
        self._queued += 1

    def _unqueue(self, job: _Job) -> None:
        """Take a job out of the queue's count; its heap entry goes stale."""
        if job.queued:
            job.queued = False
            self._queued -= 1

    def _requeue(self, job: _Job) -> None:
        job.worker = None
        self._push(job)

    def _retry_later(self, job: _Job, worker: _Worker | None) -> None:
        """Back off exponentially, with jitter, before the next attempt."""
        if worker is not None:
            worker.retried += 1
        job.worker = None
        tries = job.attempts - job.deaths
        delay = job.options.retry_delay * 2 ** (tries - 1) * random.uniform(0.5, 1.5)
        due = time.monotonic() + min(self.settings.retry_delay_cap, delay)
        heapq.heappush(self._delayed, (due, job.task.id))
        self._wake_timer(due)       # it queues the job when due

    def _promote_due(self) -> None:
        """Queue the delayed jobs now due."""
        now = time.monotonic()
        while self._delayed and self._delayed[0][0] <= now:
            _, job_id = heapq.heappop(self._delayed)
            job = self._jobs.get(job_id)
            if job is not None and job.worker is None and not job.queued:
                self._push(job)

    def _pop(self) -> _Job | None:
        while self._queue:
            _, job_id = heapq.heappop(self._queue)
            job = self._jobs.get(job_id)
            if job is not None and job.queued:
                self._unqueue(job)
                if job_id in self._awaited:
                    # Queued again while a cancel waits on it: the cancel
                    # withdraws it when it looks again; never lease it.
                    self._answered.notify_all()
                    continue
                return job
        return None

    def submit(self, session: str, submissions: list[Submission], functions: dict[bytes, bytes]) -> None:
        """Queue jobs. ``functions`` holds the pickled function of every digest they use."""
        with self._changing():
            self._bind(session)
            client = self._client(session)
            closed = self.shutdown_event.is_set()
            # A client sends a batch again when its broker went away during
            # the call: what the broker took before that is not queued twice.
            submissions = [sub for sub in submissions if sub.seq > client.max_seq]
            if not submissions:
                return
            client.max_seq = submissions[-1].seq
            self._backlog = max(self._backlog, len(self._jobs) + len(submissions))
            jobs = []
            for sub in submissions:
                self._functions.setdefault(sub.fn, [functions[sub.fn], 0])[1] += 1
                opts = sub.options
                task = Task(next(self._ids), sub.fn, sub.payload, sub.chunked, opts.timeout, opts.retry_on, 0)
                job = _Job(task, opts, session, sub.seq)
                self._jobs[task.id] = job
                client.jobs[sub.seq] = task.id
                jobs.append(job)
            if self._journal is not None:
                self._journal.submitted(session, client.max_seq, task.id + 1, [
                    (j.task.id, j.seq, j.task.fn, j.task.payload, j.task.chunked, j.options) for j in jobs],
                    {fn: self._functions[fn][0] for fn in {j.task.fn for j in jobs}})
            for job in jobs:
                if closed:
                    self._finish(job, Status.SHUTDOWN, b"")
                else:
                    self._push(job)

    def fetch(self, session: str, max_jobs: int, wait: float):
        """Lease up to ``max_jobs`` jobs to a worker; with none queued, park the
        call (`_Parked`) until one is, for up to ``wait`` s.

        Returns ``(tasks, functions)``, or None once the cluster is shutting down.
        """
        with self._changing():
            self._bind(session)
            worker = self._seen(session)
            if self.shutdown_event.is_set():
                return None
            self._promote_due()
            leased = self._lease(worker, max_jobs)
            if leased[0] or wait <= 0:
                return leased
            return self._park(wait, worker, max_jobs)

    def _lease(self, worker: _Worker, max_jobs: int) -> tuple[list[Task], dict[bytes, bytes]]:
        """Queued jobs for a worker: ``(tasks, functions)``.

        No more than its share of the queue: a worker whose last jobs were
        short asks for many, and must not take a burst of long ones alone.
        And about `BATCH_BYTES` of arguments and functions at most.
        """
        max_jobs = min(max_jobs, -(-self._queued // len(self._workers)))
        tasks, functions, size = [], {}, 0
        while len(tasks) < max_jobs and size < BATCH_BYTES:
            job = self._pop()
            if job is None:
                break
            job.worker = worker.id
            job.attempts += 1
            self._dirty.add(job.task.id)
            worker.held.add(job.task.id)
            tasks.append(job.task._replace(attempt=job.attempts))
            size += len(job.task.payload)
            if job.task.fn not in functions:
                functions[job.task.fn] = self._functions[job.task.fn][0]
                size += len(functions[job.task.fn])
        return tasks, functions

    def report(self, session: str, outcomes: list[Outcome], running: tuple[int, list[int]]) -> None:
        """A worker's finished jobs, and (version, ids) of the jobs its children run now."""
        with self._changing():
            self._bind(session)
            worker = self._workers.get(session)
            if worker is not None:
                self._touch(worker)
                if running[0] >= worker.running_version:
                    worker.running_version, worker.running = running[0], set(running[1])
            for outcome in outcomes:
                job = self._jobs.get(outcome.id)
                if job is None:
                    continue    # finished already: a duplicate from a re-run
                self._dirty.add(outcome.id)
                holder = self._workers.get(job.worker) if job.worker else None
                if holder is not None:
                    holder.held.discard(job.task.id)
                self._unqueue(job)      # in case it was re-queued meanwhile
                job.worker = None
                if self._again(job, outcome, worker):
                    continue
                if worker is not None:
                    if outcome.status is Status.OK:
                        worker.done += 1
                    else:
                        worker.failed += 1
                self._finish(job, outcome.status, outcome.payload)

    def _again(self, job: _Job, outcome: Outcome, worker: _Worker | None) -> bool:
        """Decide whether a failed attempt is tried again; if so, arrange it."""
        status, opts = outcome.status, job.options
        if status is Status.LOST:
            job.deaths += 1
            if worker is not None:
                worker.lost += 1
            if outcome.retryable and job.deaths < _max_deaths(job):
                if worker is not None:
                    worker.retried += 1
                self._requeue(job)
                return True
        elif status is Status.TIMEOUT:
            if worker is not None:
                worker.timed_out += 1
            if opts.retry_timeouts and job.attempts - job.deaths <= opts.retries:
                self._retry_later(job, worker)
                return True
        elif status is Status.ERROR:
            if outcome.retryable and job.attempts - job.deaths <= opts.retries:
                self._retry_later(job, worker)
                return True
        elif status is Status.CANCELLED:
            # The broker forgets a job when its withdrawal is agreed, so one
            # still here was not withdrawn after all: it goes back.
            job.attempts -= 1
            self._requeue(job)
            return True
        return False

    def release(self, session: str, job_ids: list[int]) -> None:
        """A stopping worker gives back jobs it fetched but never started."""
        with self._changing():
            self._bind(session)
            worker = self._workers.get(session)
            for job_id in job_ids:
                job = self._jobs.get(job_id)
                if job is not None and job.worker == session:
                    if worker is not None:
                        worker.held.discard(job_id)
                    job.attempts -= 1
                    self._dirty.add(job_id)
                    self._requeue(job)

    def _seen(self, session: str) -> _Worker:
        worker = self._workers.get(session)
        if worker is None:
            raise LookupError(f"worker {session} is not registered")
        self._touch(worker)
        return worker

    @staticmethod
    def _touch(worker: _Worker) -> None:
        worker.last_seen = time.time()
        worker.last_seen_mono = time.monotonic()

    # -- results ----------------------------------------------------------

    def _finish(self, job: _Job, status: Status, payload) -> None:
        """The job is over: hand its result to its client (if still there)."""
        self._forget(job)
        if status is Status.OK:
            self._done += 1
        else:
            self._failed += 1
        client = self._clients.get(job.client)
        if client is None:
            return      # its client is gone: nobody to tell
        number, delivery = next(client.numbers), Delivery(job.seq, status, payload, job.attempts)
        if self._journal is not None:
            self._journal.result(job.client, number, delivery, time.time())
        client.results.append((number, delivery, time.monotonic()))
        self._nudged.add(job.client)

    def collect(self, session: str, ack: int, wait: float, urgent: bool = False,
                kick: str | None = None) -> list[tuple[int, Delivery]]:
        """Drop this client's results numbered up to ``ack`` (it has them), then
        return the next ones; with none, park the call (`_Parked`) until there
        are, for up to ``wait`` s.

        A client has two kinds of collect: its collect thread's, and an
        ``urgent`` one from a thread waiting on a result, answered first. A
        ``kick`` answers parked collects of the client at once: "waiting", the
        urgent ones (their result was settled elsewhere: taken by the collect
        thread, or cancelled); "closing", all of them. If none is parked, it
        answers the next such call from another connection as it comes.
        """
        with self._changing():
            self._bind(session)
            client = self._clients.get(session) if kick else self._client(session)
            if client is None:
                return []       # a kick after its goodbye: nothing to get out
            results = client.results
            if results and results[0][0] <= ack:
                while results and results[0][0] <= ack:
                    results.popleft()
                if self._journal is not None:
                    self._journal.acknowledged(session, ack)
            kicked = (client.kicked is not None and client.kicked[1] is not self._local.reply
                      and (urgent or client.kicked[0] == "closing"))
            if kicked:
                client.kicked = None
            if kick:
                targets = [p for p in client.collectors if p.urgent or kick == "closing"]
                for parked in targets:
                    client.collectors.remove(parked)
                    self._answer(parked, self._batch(client))
                client.kicked = None if targets else (kick, self._local.reply)
            if results or client.woken or kicked or wait <= 0:
                client.woken = False
                return self._batch(client)
            return self._park(wait, urgent=urgent)

    @staticmethod
    def _batch(client: _Client) -> list[tuple[int, Delivery]]:
        batch, size = [], 0
        for number, delivery, _ in client.results:
            if len(batch) >= COLLECT_BATCH or size >= BATCH_BYTES:
                break
            batch.append((number, delivery))
            payload = delivery.payload
            size += len(payload) if isinstance(payload, bytes) else 0
        return batch

    def goodbye(self, session: str) -> None:
        """A client leaves: its queued jobs are dropped and its results discarded."""
        with self._changing():
            client = self._clients.get(session)
            if client is not None:
                for parked in client.collectors:
                    self._answer(parked, [])
                self._drop_client(session)

    def _drop_client(self, session: str) -> None:
        client = self._clients.pop(session)
        for job_id in list(client.jobs.values()):
            self._withdraw(self._jobs[job_id])
        if self._journal is not None:
            self._journal.client_gone(session)

    def _withdraw(self, job: _Job) -> None:
        """Drop a job its client no longer wants; if a worker holds it, ask it
        to drop the job too unless it has started (the answer is not awaited)."""
        worker = self._workers.get(job.worker) if job.worker else None
        if worker is not None:
            if job.task.id in worker.running:
                return      # it finishes; _finish() finds no client
            worker.held.discard(job.task.id)
            worker.withdraw.append((job.task.id, False))
            self._control.notify_all()
        self._unqueue(job)
        self._forget(job)

    def _forget(self, job: _Job) -> None:
        del self._jobs[job.task.id]
        self._answered.notify_all()     # a cancel waiting on it: it is over
        entry = self._functions[job.task.fn]
        entry[1] -= 1
        if entry[1] == 0:
            del self._functions[job.task.fn]
        if self._journal is not None:
            self._journal.forgotten(job.task.id)
            if entry[1] == 0:
                self._journal.unused(job.task.fn)
        client = self._clients.get(job.client)
        if client is not None:
            client.jobs.pop(job.seq, None)

    def cancel(self, session: str, seqs: list[int], force: bool) -> list[bool]:
        """Withdraw this client's jobs: True for each one that will not complete.

        A job not yet started is always withdrawn; a running one only with
        ``force`` (its child is killed). A finished one cannot be.
        """
        with self._changing():
            self._bind(session)
            client = self._client(session)
            verdicts: dict[int, bool] = {}
            asked: dict[int, int] = {}      # job id -> seq, for jobs workers hold
            for seq in seqs:
                job = self._jobs.get(client.jobs.get(seq, 0))
                worker = self._workers.get(job.worker) if job is not None and job.worker else None
                if job is None:
                    verdicts[seq] = seq in client.withdrawn
                elif worker is None:
                    self._unqueue(job)
                    self._forget(job)
                    verdicts[seq] = True
                elif job.task.id in worker.running and not force:
                    verdicts[seq] = False
                elif job.task.id in self._awaited or job.task.id in asked:
                    verdicts[seq] = False   # another cancel of it is under way
                else:
                    worker.withdraw.append((job.task.id, force))
                    asked[job.task.id] = seq
            if asked:
                self._control.notify_all()
                verdicts.update(self._await_answers(asked, force))
            client.withdrawn.update(seq for seq, withdrawn in verdicts.items() if withdrawn)
            if any(verdicts.values()):
                # Its collect call may be waiting for exactly these jobs.
                client.woken = True
                self._nudged.add(session)
            return [verdicts[seq] for seq in seqs]

    def _await_answers(self, asked: dict[int, int], force: bool) -> dict[int, bool]:
        """Wait for workers to say whether they withdrew these jobs.

        No cutoff: a worker acts on a request whenever it gets it, so giving up
        early would leave the two disagreeing. A worker that stops answering
        is lost within the heartbeat timeout, which ends the wait.
        """
        self._awaited.update(dict.fromkeys(asked, force))
        try:
            while any(i not in self._answers and (job := self._jobs.get(i)) is not None
                      and job.worker in self._workers for i in asked):
                self._answered.wait()
        finally:
            for job_id in asked:
                del self._awaited[job_id]
        verdicts = {}
        for job_id, seq in asked.items():
            withdrawn = self._answers.pop(job_id, None)
            job = self._jobs.get(job_id)
            if job is not None and (withdrawn or (withdrawn is None and job.worker is None)):
                holder = self._workers.get(job.worker) if job.worker else None
                if holder is not None:
                    holder.held.discard(job_id)
                self._unqueue(job)
                self._forget(job)
                verdicts[seq] = True
            else:
                verdicts[seq] = False
        return verdicts

    def control(self, session: str, wait: float, answers: dict[int, bool]) -> list | None:
        """A worker's control channel. It brings its answers to earlier
        withdraw requests, then blocks until there are new ones, a list of
        ``(job id, force)``, or the cluster shuts down (None), or ``wait`` ends."""
        with self._lock:
            if answers:
                self._answers.update((i, a) for i, a in answers.items() if i in self._awaited)
                self._answered.notify_all()
            deadline = time.monotonic() + min(wait, self.settings.wait_slice)
            worker = self._workers.get(session)
            while True:
                if self.shutdown_event.is_set():
                    return None
                if self._workers.get(session) is not worker:
                    return []       # registered again: not on this (old) connection
                if worker is not None and worker.withdraw:
                    requests, worker.withdraw = worker.withdraw, []
                    return requests
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                self._control.wait(remaining)

    # -- upkeep -----------------------------------------------------------

    def tick(self) -> bool:
        """Expire silent workers and departed clients, and drain on shutdown.

        Called about once per heartbeat interval by the broker's main thread.
        Returns True once a shutdown has fully drained and the broker may exit.
        """
        now = time.monotonic()
        with self._changing():
            for worker in list(self._workers.values()):
                if now - worker.last_seen_mono > self.settings.heartbeat_timeout:
                    log.warning("worker %s (%s pid %d) silent for %.0f s; presumed lost",
                                worker.id, worker.host, worker.pid, now - worker.last_seen_mono)
                    self._lose_worker(worker, died=True)
            ttl = now - self.settings.result_ttl
            for session, client in list(self._clients.items()):
                expired = []
                while client.results and client.results[0][2] < ttl:
                    expired.append(client.results.popleft()[0])
                if expired:
                    log.info("%d results of client %s expired uncollected", len(expired), session[:12])
                    if self._journal is not None:
                        self._journal.expired(session, expired)
                # With a journal, a client that went away keeps its jobs and
                # results (until they expire), and its session for as long:
                # it may be coming back after a broker restart.
                if self._journal is None:
                    gone = client.gone_since is not None and now - client.gone_since > self.settings.client_grace
                else:
                    gone = (client.gone_since is not None and now - client.gone_since > self.settings.result_ttl
                            and not (client.jobs or client.results))
                if gone:
                    self._drop_client(session)
            if not self.shutdown_event.is_set():
                return False
            self._control.notify_all()     # control calls see the event (parked fetches: _answer_parked)
            if self._workers:
                return False
            for job in [j for j in self._jobs.values() if j.worker is None]:
                self._unqueue(job)
                self._finish(job, Status.SHUTDOWN, b"")
            if self._jobs:
                return False
            if self._drain_deadline is None:
                self._drain_deadline = now + self.settings.drain_timeout
            waiting = [c for c in self._clients.values() if c.results and c.gone_since is None]
            return not waiting or now > self._drain_deadline

    def release_memory(self) -> None:
        """Give memory back to the system once a backlog of `TRIM_AFTER` jobs
        or more has drained. Python returns what it frees to the C allocator,
        which keeps most of it: a broker that carried 2 M jobs would hold a few
        hundred MB for good. Outside the lock: trimming a large heap takes a while."""
        with self._lock:
            if self._backlog < TRIM_AFTER or self._jobs:
                return
            self._backlog = 0
            # Emptied, they keep their size (a dict never shrinks): new ones.
            # With no job left, what the heaps still hold is stale.
            self._jobs, self._queue, self._delayed = {}, [], []
            for client in self._clients.values():
                client.jobs = {}
        try:
            ctypes.CDLL(None).malloc_trim(0)    # glibc's; elsewhere there is nothing to do
        except (OSError, AttributeError):
            pass

    def status(self) -> dict:
        """Counts for `mpqueue status`: queued = not started, running = in a child now."""
        with self._lock:
            backing_off = sum(1 for _, i in self._delayed
                              if (job := self._jobs.get(i)) is not None and job.worker is None
                              and not job.queued)
            workers = [{
                "id": w.id, "host": w.host, "address": w.address, "pid": w.pid, "procs": w.procs,
                "running": len(w.running), "queued": len(w.held - w.running),
                "done": w.done, "failed": w.failed, "lost": w.lost,
                "timed_out": w.timed_out, "retried": w.retried, **w.versions,
                "last_seen": w.last_seen,
            } for w in self._workers.values()]
            return {
                "workers": workers,
                "queued": self._queued + backing_off + sum(w["queued"] for w in workers),
                "running": sum(w["running"] for w in workers),
                "done": self._done,
                "failed": self._failed,
                "clients": len(self._clients),
                "results": sum(len(c.results) for c in self._clients.values()),   # not yet collected
                "shutting_down": self.shutdown_event.is_set(),
            }


def serve(address: tuple[str, int], authkey: bytes, on_ready: Callable[[tuple[str, int]], None],
          settings: Settings = SETTINGS, journal: str | None = None) -> None:
    """Run a broker until shutdown drains it, or until SIGTERM/SIGINT.

    The manager server runs in this process (its threads serve connections);
    this thread waits on the cluster's shutdown event and does the upkeep.
    With ``journal`` (a path), state is kept in, and first loaded from, that
    SQLite file.
    """
    def stop(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
    # A payload and a batch's others in one message; in SQLite, one value.
    ceiling = min(MAX_MESSAGE - 4 * BATCH_BYTES, 950 * 2**20 if journal else MAX_MESSAGE)
    if settings.max_payload > ceiling:
        raise ConfigError(f"MPQUEUE_MAX_PAYLOAD={settings.max_payload:.0f} is over the most this "
                          f"broker can carry in one message or store in its journal ({ceiling} bytes)")
    broker = Broker(settings, Journal(journal) if journal else None)
    server = BrokerServer(broker, address, authkey)
    server.start()
    try:
        on_ready(server.address)
        while not broker.tick():
            broker.release_memory()
            if broker.shutdown_event.is_set():
                time.sleep(0.1)     # draining: a few ticks, then we exit
            else:
                broker.shutdown_event.wait(settings.heartbeat_interval)
        log.info("shut down")
    except KeyboardInterrupt:
        log.info("stopped")
