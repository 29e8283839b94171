"""The broker's state machine: jobs, the queue, leases, results and sessions.

::

    submit ─▶ queue ─fetch─▶ held by a worker ─report─▶ results of its client ─collect/ack─▶ gone
              ▲  ▲                 │
              │  └── re-queued ────┤  worker lost (connection closed, heartbeats stopped),
              │                    │  or its child died with attempts left
              └─ delayed ◀─────────┘  raised or timed out with retries left (backoff)

Everything the broker decides is decided here, and nothing here waits:
`BrokerState` holds no lock, starts no thread, touches no socket and reads
no clock. Each method takes the time (``now``, a monotonic reading) and
returns its answer; what else must happen because of it (answer a parked
call, write journal rows, wake the workers' control calls or the cancels
waiting on them, wake the timer earlier) collects in an `Effects`, which the
shell (`broker.Broker`) takes once per call with `settle` and carries out.
So a test drives it with a fake clock (``tests/unit``), and the concurrency
around it is all in one place: see docs/internals.md.

The queue is a heap: higher priority first, then submission order. Dispatch
is a lease, never a bare "take from the queue": a job is done only when its
outcome arrives, and the jobs of a worker that disappears go back to the
queue. A result leaves only once its client acknowledges it on its next
`collect`. Payloads are opaque bytes.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import random
from collections import deque
from typing import Any, Callable, Iterable, Iterator

from . import shm
from .config import SETTINGS, Settings
from .history import (
    FINAL_BY_STATUS,
    KEEP,
    Counters,
    End,
    History,
    Record,
    State,
    attempt_row,
    cause_of,
    reported,
)
from .metrics import Throughput
from .objects import SharedObjects
from .protocol import (
    BATCH_BYTES,
    ClientHello,
    ClientWelcome,
    Delivery,
    Failure,
    Kick,
    Options,
    Outcome,
    Status,
    Submission,
    Task,
    WorkerHello,
    WorkerWelcome,
    pack_exception,
    payload_size,
    unwrap_function,
)

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

#: The final states `mpqueue jobs --failed` shows.
_FAILED = frozenset({State.FAILED, State.TIMED_OUT, State.LOST, State.SHUTDOWN})

#: What `fetch` and `collect` return for a call they parked: its answer goes
#: out later, in the `Effects` of the call that makes it answerable.
PARKED: Any = object()
#: What `withdrawals` returns when a worker has no request yet: its control
#: call waits for `Effects.wake_control`.
NOTHING_YET: Any = object()

#: How a parked call is answered: opaque here (the shell's reply function for
#: the call's connection), handed back in `Effects.answers`.
Reply = Any
Answer = tuple[str, Any]        # ("#RETURN", value) or ("#ERROR", exception)


@dataclasses.dataclass(slots=True, eq=False)
class Effects:
    """What must happen once a call's changes are made, in this order: wake
    the threads waiting in the broker, write the journal rows and commit,
    then (lock released) send the answers."""
    answers: list[tuple[Reply, Answer]] = dataclasses.field(default_factory=list)
    journal: list[tuple[str, tuple]] = dataclasses.field(default_factory=list)  # (Journal method, args)
    wake_control: bool = False      # workers have withdraw requests, or the cluster closes
    wake_cancels: bool = False      # cancels waiting on workers' answers must look again
    timer_at: float | None = None   # a new deadline: the timer thread must act by then
    remove: list[str] = dataclasses.field(default_factory=list)  # payload files no job needs (`shm`)


#: What `settle` hands over when a call requires nothing more (never filled).
NO_EFFECTS = Effects()


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
    released: int = 0           # its attempts up to this one lost their shared objects: refused
    submitted: float = 0.0      # monotonic, as every time below
    started: float | None = None    # when a worker's report first had it running (this attempt)
    story: list[tuple] | None = None    # its attempts over so far (`history.attempt_row` s)


@dataclasses.dataclass(eq=False)
class _Worker:
    id: str
    host: str
    pid: int
    procs: int
    last_seen: float                # monotonic
    address: str | None = None      # IP address its connection came from
    versions: dict = dataclasses.field(default_factory=dict)    # its mpqueue, Python, cloudpickle
    packages: dict = dataclasses.field(default_factory=dict)    # its versions of the packages jobs needed
    held: set[int] = dataclasses.field(default_factory=set)     # job ids leased to it
    running: set[int] = dataclasses.field(default_factory=set)  # as of its newest report
    running_version: int = 0
    withdraw: list[tuple[int, bool]] = dataclasses.field(default_factory=list)  # (job id, force) to ask it
    done: int = 0
    failed: int = 0
    lost: int = 0
    timed_out: int = 0
    retried: int = 0
    load: tuple[float, int] | None = None   # its children's CPU % and RSS, as of its last heartbeat


@dataclasses.dataclass(slots=True, eq=False)
class _Parked:
    """A `fetch` or `collect` call waiting for something to return.

    Its connection's thread has gone back to reading; the call that queues a
    job or finishes a result answers it (`Effects.answers`). That spares a
    thread wakeup per job at each end, which is most of what a round trip
    costs on a busy machine.
    """
    reply: Reply
    deadline: float                     # answered empty then
    worker: _Worker | None = None       # a fetch: whose, and how many jobs at most
    max_jobs: int = 0
    urgent: bool = False                # a collect a thread waits on (`BrokerState.collect`)


@dataclasses.dataclass(eq=False)
class _Client:
    jobs: dict[int, int] = dataclasses.field(default_factory=dict)   # its seq -> job id, unfinished
    #: (number, Delivery, created), not yet acknowledged
    results: deque[tuple[int, Delivery, float]] = dataclasses.field(default_factory=deque)
    numbers: Iterator[int] = dataclasses.field(default_factory=lambda: itertools.count(1))
    max_seq: int = 0            # its highest job number received: a batch sent again is skipped
    withdrawn: set[int] = dataclasses.field(default_factory=set)  # its job numbers cancelled
    gone_since: float | None = None
    woken: bool = False         # its parked collects return, even empty (a cancel)
    kicked: tuple[Kick, Reply] | None = None  # a kick that found nothing parked, and its call's reply
    #: Its parked collect calls, answered from the end: urgent ones (a thread
    #: waiting on a result, which saves a handoff) are put there.
    collectors: list[_Parked] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(eq=False)
class PendingCancel:
    """A cancel waiting for workers to say whether they withdrew jobs they hold."""
    session: str
    seqs: list[int]
    verdicts: dict[int, bool]
    asked: dict[int, int]       # job id -> seq


def max_deaths(options: Options) -> int:
    return max(MAX_DEATHS, options.retries + 1)


#: The cause of a job that ended without an attempt, by its final state.
_NEVER_RAN = {State.SHUTDOWN: "the cluster shut down before it ran"}


def _function_name(blob: bytes) -> str:
    """The name its client gave a job's function, in the JSON header of its
    blob (never unpickled here); "" if it gave none."""
    try:
        return str(unwrap_function(blob)[0].get("name", ""))
    except (ValueError, AttributeError):
        return ""


class BrokerState:
    """All queue state, and every rule about it.

    ``closing()`` says whether the cluster is shutting down (the shutdown
    event, which clients set without the broker's lock). ``durable``: a
    journal is kept, so changes are recorded in `Effects.journal`.
    ``first_id``: where job ids start (see `broker._first_id`). ``rng``: the
    jitter of retry backoffs. ``history``: how many finished jobs to keep
    (`history.History`). ``epoch``: the wall clock's time at monotonic 0, so
    that the history's times read as dates (the broker's own clock).
    """

    def __init__(self, settings: Settings = SETTINGS, *, broker_id: str, first_id: int,
                 durable: bool = False, closing: Callable[[], bool] = lambda: False,
                 rng: random.Random | None = None, history: int = KEEP, epoch: float = 0.0):
        self.settings = settings
        self.id = broker_id     # a worker rejoining a different one holds nothing it would know
        self.durable = durable
        self.closing = closing
        self._rng = rng or random.Random()
        self.out = Effects()
        self._dirty: set[int] = set()                  # jobs whose attempts changed, for the journal
        self.shared = SharedObjects()                  # `mpqueue.shared`'s objects
        self.shm_probe = ""                            # `shm.probe`: a file of the broker's /dev/shm
        self._holders_check_at: float | None = None    # after a restore: release holders not back by then
        self._fetchers: deque[_Parked] = deque()       # parked fetch calls, oldest first
        self._recheck_fetchers = False                 # a worker left or rejoined: look at them
        self._nudged: set[str] = set()                 # clients with new results (or woken) in this call
        self._answers: dict[int, bool] = {}            # job id -> withdrawn? (awaited ones only)
        self._awaited: dict[int, bool] = {}            # job id -> force, of cancels waiting
        self._connections: dict[str, int] = {}
        self._jobs: dict[int, _Job] = {}
        self._queue: list[tuple[int, int]] = []        # heap of (-priority, id); stale ids skipped
        self._queued = 0
        self._arrival_share = 0                        # `_share` of the queue after the latest submit
        self._by_priority: dict[int, int] = {}         # priority -> jobs queued, for the dashboard
        self._delayed: list[tuple[float, int]] = []    # heap of (due, id): retries backing off
        self._functions: dict[bytes, list] = {}        # digest -> [blob, jobs using it]
        self._code: dict[bytes, bytes] = {}            # digest -> a bundle of shipped code (`shipping`)
        self._workers: dict[str, _Worker] = {}
        self._clients: dict[str, _Client] = {}
        self._ids = itertools.count(first_id)
        self.epoch = epoch
        self.history = History(history)
        self.counters = Counters()
        self.throughput = Throughput()
        self._finished_now: list[tuple] = []           # rows of `Record`, for the journal (durable only)
        self._drain_deadline: float | None = None
        self._backlog = 0                              # most jobs held since memory was last released

    def restore(self, state: dict, now: float, wall: float) -> tuple[int, int, int]:
        """Take back a journal's state (`Journal.load`): every job queued,
        results waiting for their clients, and the jobs whose arguments it
        lost failed with the error it gives. ``wall``: time.time() at ``now``.
        Returns how many jobs, results and clients it took back."""
        self.id = state["id"]
        self._ids = itertools.count(max(state["next_id"], next(self._ids)))
        self._functions = {fn: [blob, 0, _function_name(blob)] for fn, blob in state["functions"].items()}
        for record in state.get("history", ()):
            self.history.add(record)
        self._code = dict(state.get("code", {}))
        self.shared.restore(state.get("shared", {}))
        if self.shared.holder_groups():
            # Holders of locks get as long as a worker has to rejoin, or a
            # client to reconnect; then what they held is released.
            self._holders_check_at = now + max(self.settings.heartbeat_timeout, self.settings.client_grace)
            self._wake_timer(self._holders_check_at)
        for session, (max_seq, last_number) in state["clients"].items():
            client = self._client(session)
            client.max_seq = max_seq
            client.numbers = itertools.count(last_number + 1)
        lost = state.get("lost", {})
        for job_id, session, seq, fn, payload, chunked, opts, attempts, deaths in state["jobs"]:
            task = Task(job_id, fn, payload, chunked, opts.timeout, opts.retry_on, 0)
            job = self._jobs[job_id] = _Job(task, opts, session, seq, attempts=attempts, deaths=deaths,
                                            submitted=now)
            self._functions[fn][1] += 1
            self._client(session).jobs[seq] = job_id
            if job_id not in lost:
                self._push(job)
        for session, number, delivery, created in state["results"]:
            # Their age, in the monotonic clock, for the TTL.
            self._client(session).results.append((number, delivery, now - max(0.0, wall - created)))
        for job_id, error in lost.items():     # numbered after the results taken back
            self._finish(self._jobs[job_id], Status.ERROR, pack_exception(error)[0], now)
        for client in self._clients.values():
            client.gone_since = now     # until it reconnects
        return len(self._jobs), len(state["results"]), len(self._clients)

    def _record(self, name: str, *args: Any) -> None:
        """A journal row to write (`Journal` method ``name``)."""
        if self.durable:
            self.out.journal.append((name, args))

    def settle(self) -> Effects:
        """End a call: answer the parked calls it made answerable, and hand
        over everything the shell must do."""
        if self._fetchers or self._nudged:
            self._answer_parked()
        shared = self.shared
        if shared.answers:
            self.out.answers.extend(shared.answers)
            shared.answers = []
        if shared.changed:
            if self.durable:
                self.out.journal.append(("shared", ({name: shared.snapshot(name) for name in shared.changed},)))
            shared.changed = set()
        if self._finished_now:
            self.out.journal.append(("history", (self._finished_now, self.history.keep)))
            self._finished_now = []
        if self._dirty:
            if self.durable:
                self.out.journal.append(("attempts", ([(job.attempts, job.deaths, i) for i in self._dirty
                                                       if (job := self._jobs.get(i)) is not None],)))
            self._dirty.clear()
        effects = self.out
        if not (effects.answers or effects.journal or effects.wake_control or effects.wake_cancels
                or effects.timer_at is not None or effects.remove):
            return NO_EFFECTS   # most calls: spares an allocation
        self.out = Effects()
        return effects

    # -- parked calls -------------------------------------------------------

    def _park(self, reply: Reply, wait: float, now: float, session: str, worker: _Worker | None = None,
              max_jobs: int = 0, urgent: bool = False) -> Any:
        parked = _Parked(reply, now + min(wait, self.settings.wait_slice), worker, max_jobs, urgent)
        self._wake_timer(parked.deadline)
        if parked.worker is not None:
            self._fetchers.append(parked)
        elif parked.urgent:     # answered first (from the end)
            self._clients[session].collectors.append(parked)
        else:
            self._clients[session].collectors.insert(0, parked)
        return PARKED

    def _wake_timer(self, at: float) -> None:
        if self.out.timer_at is None or at < self.out.timer_at:
            self.out.timer_at = at

    def _answer(self, parked: _Parked, value: Any, error: bool = False) -> None:
        self.out.answers.append((parked.reply, ("#ERROR" if error else "#RETURN", value)))

    def _answer_parked(self) -> None:
        closing = self.closing()
        if self._fetchers and (self._queued or self._recheck_fetchers or closing):
            self._recheck_fetchers = False
            # Each parked fetch gets the share taken before the first of them.
            # Taken anew after each lease, it shrank down the line: of 500
            # jobs, 50 workers got 10, 9, ..., 2, 1 and left a third of them
            # to calls of a job or two, each costing the broker more than a job.
            share = self._share()
            waiting: deque[_Parked] = deque()
            for parked in self._fetchers:
                assert parked.worker is not None
                worker = self._workers.get(parked.worker.id)
                if closing:
                    self._answer(parked, None)
                elif worker is None:
                    self._answer(parked, LookupError(f"worker {parked.worker.id} is not registered"), True)
                elif worker is not parked.worker:
                    # It registered again meanwhile: this call's connection is
                    # a dead one it left. Lease nothing on it.
                    self._answer(parked, ([], {}))
                elif self._queued and (leased := self._lease(worker, min(parked.max_jobs, share)))[0]:
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

    def next_deadline(self) -> float | None:
        """When `expire` has something to do next, if ever."""
        times = [p.deadline for p in self._fetchers]
        times += [p.deadline for c in self._clients.values() for p in c.collectors]
        if self._delayed:
            times.append(self._delayed[0][0])
        for at in (self.shared.next_deadline(), self._holders_check_at):
            if at is not None:
                times.append(at)
        return min(times, default=None)

    def expire(self, now: float) -> None:
        """Queue the retries now due; answer the parked calls whose wait ran out."""
        self._promote_due(now)
        self.shared.expire(now)
        if self._holders_check_at is not None and now >= self._holders_check_at:
            self._holders_check_at = None
            for group in self.shared.holder_groups():
                if not self._group_alive(group):
                    log.info("releasing the shared locks of %s: it did not come back after the restart", group)
                    self.shared.group_ended(group)
        for parked in [p for p in self._fetchers if p.deadline <= now]:
            self._fetchers.remove(parked)
            self._answer(parked, ([], {}))
        for client in self._clients.values():
            for parked in [p for p in client.collectors if p.deadline <= now]:
                client.collectors.remove(parked)
                self._answer(parked, self._batch(client))

    # -- sessions ---------------------------------------------------------

    def connected(self, session: str) -> None:
        """A connection serves ``session`` from now on."""
        self._connections[session] = self._connections.get(session, 0) + 1
        client = self._clients.get(session)
        if client is not None:
            client.gone_since = None

    def connection_closed(self, session: str, reply: Reply, now: float) -> None:
        """A connection of ``session`` ended; ``reply`` answered its parked calls."""
        self._fetchers = deque(p for p in self._fetchers if p.reply is not reply)
        self.shared.connection_closed(reply)
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
            log.warning("worker %s (%s pid %d) disconnected; presumed lost", worker.id, worker.host, worker.pid,
                        extra={"event": "worker_lost", "worker": worker.id, "host": worker.host})
            self._lose_worker(worker, now, "its connection closed")
        client = self._clients.get(session)
        if client is not None:
            client.gone_since = now
        elif worker is None:
            # A job's process or a lone `mpqueue.shared` user: gone for good,
            # most often by ending well (it has no goodbye to say).
            self.shared.group_ended(f"client:{session}", failed=False)

    def register(self, session: str, hello: WorkerHello | ClientHello, peer: str | None,
                 now: float) -> WorkerWelcome | ClientWelcome:
        """A worker or client introduces itself; ``peer``: its address (`Caller.peer`)."""
        if isinstance(hello, WorkerHello):
            old = self._workers.pop(session, None)
            self._recheck_fetchers = True   # its parked fetch, if any, is on a connection it left
            worker = self._workers[session] = _Worker(session, hello.host, hello.pid, hello.procs,
                                                      now, address=peer, versions=dict(hello.versions))
            log.info("worker %s joined from %s (%s) pid %d with %d procs",
                     session, hello.host, peer, hello.pid, hello.procs,
                     extra={"event": "worker_joined", "worker": session, "host": hello.host})
            new = hello.broker_id is not None and hello.broker_id != self.id
            if not new:
                self._lease_back(worker, old, hello.running, hello.finished)
            return WorkerWelcome(self.settings.heartbeat_interval, self.id, new,
                                 [i for i in hello.running if new or i not in self._jobs],
                                 int(self.settings.max_payload), self.shm_probe)
        # A client reconnecting to a broker that restarted without its
        # session (no journal, or it expired) is told so, and not taken on.
        known = session in self._clients
        if not known and hello.resume:
            return ClientWelcome(False)
        client = self._client(session)
        # Jobs it had sent (and we confirmed) that this broker has neither
        # queued nor finished: lost with a journal's last writes, or with
        # a journal restored from an older copy.
        finished = {delivery.seq for _, delivery, _ in client.results}
        missing = [seq for seq in hello.pending
                   if seq not in client.jobs and seq not in finished and seq not in client.withdrawn]
        return ClientWelcome(known, missing, int(self.settings.max_payload), self.shm_probe)

    def _lease_back(self, worker: _Worker, old: _Worker | None, running: Iterable[int],
                    finished: Iterable[int]) -> None:
        """A worker rejoining still runs these jobs, or holds the results of
        these ``finished`` ones, on their way: leave them with it (already
        counted as an attempt), not queued for another, which would run them
        again.

        ``old`` is its previous registration, if this broker still had it
        (its connections broke, the broker did not restart): the other jobs
        that worker held, it dropped unstarted.
        """
        running = list(running)
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
            self.out.wake_cancels = True
        for job_id in kept:
            job = self._jobs.get(job_id)
            if job is not None and job.queued:
                self._unqueue(job)
                job.worker = worker.id
                worker.held.add(job_id)
        worker.running.update(i for i in running if i in worker.held)

    def unregister(self, session: str, now: float) -> None:
        """A worker leaves cleanly; anything it still holds goes back to the queue."""
        worker = self._workers.get(session)
        if worker is not None:
            log.info("worker %s (%s pid %d) left", worker.id, worker.host, worker.pid,
                     extra={"event": "worker_left", "worker": worker.id, "host": worker.host})
            self._lose_worker(worker, now)

    def _client(self, session: str) -> _Client:
        client = self._clients.get(session)
        if client is None:
            client = self._clients[session] = _Client()
        return client

    def _lose_worker(self, worker: _Worker, now: float, died: str = "") -> None:
        """Take back every job a worker held.

        If it ``died`` (why, as a clause), each counts a death: it cannot be
        told whether a job had started (its report may be a second old), and a
        job that kills its worker must not be handed on forever. If it left,
        each is given back uncharged; the ones it ran (a cold stop killed
        them) say so in their history.
        """
        del self._workers[worker.id]
        self._recheck_fetchers = True
        self.out.wake_cancels = True     # cancels waiting on its answers look again
        for job_id in worker.held:
            job = self._jobs.get(job_id)
            if job is None or job.worker != worker.id:
                continue
            self._dirty.add(job_id)
            if died:
                job.deaths += 1
                worker.lost += 1
                self.counters.lost += 1
                self._attempted(job, worker, now, End.LOST, f"worker {worker.id} {died}")
                if job.deaths >= max_deaths(job.options):
                    self._finish(job, Status.LOST, Failure.worker_lost(worker.pid, worker.host, worker.id),
                                 now)
                    continue
                self._requeued(job, f"its worker {worker.id} was lost ({died})", None)
            else:
                job.attempts -= 1   # never started, or killed by its worker's cold stop
                if job_id in worker.running:
                    self._attempted(job, worker, now, End.STOPPED, "by its worker's cold stop")
                    self._requeued(job, f"its worker {worker.id} stopped before it finished", None, False)
            self._requeue(job)

    def _attempted(self, job: _Job, worker: _Worker | None, now: float, end: End, detail: str = "") -> None:
        """An attempt the broker saw end (not reported by its worker): into the job's story."""
        started = None if job.started is None else job.started + self.epoch
        attempt = attempt_row(worker.id if worker else job.worker, worker.host if worker else "", None, started,
                              now + self.epoch, end, detail)
        if job.story is None:
            job.story = [attempt]
        else:
            job.story.append(attempt)

    def _requeued(self, job: _Job, why: str, worker: _Worker | None, charged: bool = True,
                  delay: float = 0.0) -> None:
        """Say in the log that a job goes back to the queue (after ``why``,
        in ``delay`` s), and count it as retried if the failure was ``charged``
        to it (to ``worker``, the one that ran it, if still registered)."""
        if charged:
            self.counters.retried += 1
            if worker is not None:
                worker.retried += 1
        log.info("job %d re-queued%s: %s (%d attempt(s) so far)", job.task.id,
                 f" for {delay:.2f} s from now" if delay else "", why, len(job.story or ()),
                 extra={"event": "job_requeued", "job": job.task.id, "why": why})

    # -- the queue --------------------------------------------------------

    def _push(self, job: _Job) -> None:
        priority = job.options.priority
        heapq.heappush(self._queue, (-priority, job.task.id))
        job.queued = True
        self._queued += 1
        self._by_priority[priority] = self._by_priority.get(priority, 0) + 1

    def _unqueue(self, job: _Job) -> None:
        """Take a job out of the queue's count; its heap entry goes stale."""
        if job.queued:
            job.queued = False
            self._queued -= 1
            if not self._queued:
                self._arrival_share = 0
            priority = job.options.priority
            if (left := self._by_priority[priority] - 1):
                self._by_priority[priority] = left
            else:
                del self._by_priority[priority]

    def _requeue(self, job: _Job) -> None:
        self._attempt_over(job)
        self._push(job)

    def _attempt_over(self, job: _Job, failed: bool = True) -> None:
        """A job's attempt ended, however: what it held of the shared objects
        goes, and its calls are refused from now on, even if the attempt is
        alive after all (a worker presumed lost that rejoins)."""
        job.worker = None
        job.started = None
        if job.released < job.attempts:
            job.released = job.attempts
            self.shared.group_ended(f"job:{job.task.id}", failed)

    def backoff(self, job: _Job) -> float:
        """Seconds before the next attempt of a job that raised or timed out:
        exponential in its tries, with jitter, capped."""
        tries = job.attempts - job.deaths
        delay = job.options.retry_delay * 2 ** (tries - 1) * self._rng.uniform(0.5, 1.5)
        return min(self.settings.retry_delay_cap, delay)

    def _retry_later(self, job: _Job, worker: _Worker | None, now: float) -> None:
        delay = self.backoff(job)
        self._requeued(job, f"it {cause_of(job.story[-1])}" if job.story else "it failed", worker, delay=delay)
        self._attempt_over(job)
        due = now + delay
        heapq.heappush(self._delayed, (due, job.task.id))
        self._wake_timer(due)       # it queues the job when due

    def _promote_due(self, now: float) -> None:
        """Queue the delayed jobs now due."""
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
                    self.out.wake_cancels = True
                    continue
                return job
        return None

    def submit(self, session: str, submissions: list[Submission], functions: dict[bytes, bytes],
               now: float, code: dict[bytes, bytes] | None = None) -> None:
        """Queue jobs. ``functions`` holds the pickled function of every digest
        they use; ``code``, bundles of shipped code they need that the client
        has not sent before. Bundles are kept as long as the broker runs."""
        if code:
            new = {key: data for key, data in code.items() if key not in self._code}
            self._code.update(new)
            if new:
                self._record("code", new)
        client = self._client(session)
        closed = self.closing()
        # A client sends a batch again when its broker went away during
        # the call: what the broker took before that is not queued twice.
        submissions = [sub for sub in submissions if sub.seq > client.max_seq]
        if not submissions:
            return
        client.max_seq = submissions[-1].seq
        self._backlog = max(self._backlog, len(self._jobs) + len(submissions))
        jobs = []
        self.counters.submitted += len(submissions)
        for sub in submissions:
            entry = self._functions.get(sub.fn)
            if entry is None:
                blob = functions[sub.fn]
                entry = self._functions[sub.fn] = [blob, 0, _function_name(blob)]
            entry[1] += 1
            opts = sub.options
            task = Task(next(self._ids), sub.fn, sub.payload, sub.chunked, opts.timeout, opts.retry_on, 0)
            job = _Job(task, opts, session, sub.seq, submitted=now)
            self._jobs[task.id] = job
            client.jobs[sub.seq] = task.id
            jobs.append(job)
        self._record("submitted", session, client.max_seq, task.id + 1, [
            (j.task.id, j.seq, j.task.fn, j.task.payload, j.task.chunked, j.options) for j in jobs],
            {fn: self._functions[fn][0] for fn in {j.task.fn for j in jobs}})
        for job in jobs:
            if closed:
                self._finish(job, Status.SHUTDOWN, b"", now)
            else:
                self._push(job)
        self._arrival_share = -(-self._queued // max(1, len(self._workers)))

    def fetch(self, session: str, reply: Reply, max_jobs: int, wait: float, now: float) -> Any:
        """Lease up to ``max_jobs`` jobs to a worker; with none queued, park the
        call until one is, for up to ``wait`` s (returns `PARKED`).

        Returns ``(tasks, functions)``, or None once the cluster is shutting down.
        """
        worker = self._seen(session, now)
        if self.closing():
            return None
        self._promote_due(now)
        leased = self._lease(worker, min(max_jobs, self._share()))
        if leased[0] or wait <= 0:
            return leased
        return self._park(reply, wait, now, session, worker, max_jobs)

    def _share(self) -> int:
        """The most jobs one fetch may take: queued jobs divided by registered
        workers, rounded up, and no less than that share was when the latest
        submit landed. A worker whose last jobs were short asks for many, and
        must not take a burst of long ones alone. But as the queue drains
        between two submits, a share of what is left shrinks to a job or two
        per call: with 50 workers and a submit of 1,385 jobs (a share of 28),
        the last 143 took about 80 fetches, and as many reports."""
        return max(self._arrival_share, -(-self._queued // max(1, len(self._workers))))

    def _lease(self, worker: _Worker, max_jobs: int) -> tuple[list[Task], dict[bytes, bytes]]:
        """Up to ``max_jobs`` queued jobs for a worker (the caller caps it at
        its `_share`): ``(tasks, functions)``, with about `BATCH_BYTES` of
        arguments and functions at most.
        """
        tasks: list[Task] = []
        functions: dict[bytes, bytes] = {}
        size = 0
        while len(tasks) < max_jobs and size < BATCH_BYTES:
            job = self._pop()
            if job is None:
                break
            job.worker = worker.id
            job.attempts += 1
            self._dirty.add(job.task.id)
            worker.held.add(job.task.id)
            tasks.append(job.task._replace(attempt=job.attempts))
            size += payload_size(job.task.payload)
            if job.task.fn not in functions:
                functions[job.task.fn] = self._functions[job.task.fn][0]
                size += len(functions[job.task.fn])
        return tasks, functions

    def payload_files(self) -> set[str]:
        """The shared-memory files (`shm`) the jobs and results held here refer to."""
        files = {path for job in self._jobs.values() if (path := shm.path_of(job.task.payload)) is not None}
        files.update(path for client in self._clients.values() for _, delivery, _ in client.results
                     if (path := shm.path_of(delivery.payload)) is not None)
        return files

    def _drop_payload(self, payload: Any) -> None:
        """A result no one will read: its shared-memory file (`shm`), if any, goes."""
        if (path := shm.path_of(payload)) is not None:
            self.out.remove.append(path)

    def code(self, key: bytes) -> bytes | None:
        """A bundle of shipped code, for a worker that lacks it."""
        return self._code.get(key)

    def report(self, session: str, outcomes: list[Outcome], running: tuple[int, list[int]],
               now: float, packages: dict[str, str | None] | None = None,
               load: tuple[float, int] | None = None) -> None:
        """A worker's finished jobs, and (version, ids) of the jobs its children
        run now; ``packages``, its versions of packages jobs asked for, if new;
        ``load``, its children's CPU % and RSS, sampled once a heartbeat.

        A result reported twice (sent again after a reconnect, or from a
        worker presumed lost) counts once: the first one wins."""
        worker = self._workers.get(session)
        if worker is not None:
            worker.last_seen = now
            if packages:
                worker.packages.update(packages)
            if load is not None:
                worker.load = load
            if running[0] >= worker.running_version:
                now_running = set(running[1])
                for job_id in now_running.difference(worker.running):     # started since its last report
                    job = self._jobs.get(job_id)
                    if job is not None and job.started is None:
                        job.started = now
                worker.running_version, worker.running = running[0], now_running
        for outcome in outcomes:
            job = self._jobs.get(outcome.id)
            if job is None:
                self._drop_payload(outcome.payload)
                continue    # finished already: a duplicate from a re-run
            self._dirty.add(outcome.id)
            holder = self._workers.get(job.worker) if job.worker else None
            if holder is not None:
                holder.held.discard(job.task.id)
            host = worker.host if worker else ""
            attempt: tuple
            if outcome.status is Status.OK:     # most: a `history.attempt_row`, spared the call
                attempt = (session, host, outcome.pid, outcome.started, outcome.ended, End.RESULT, "", "")
            else:
                attempt = reported(session, host, outcome.status, outcome.payload, outcome.pid, outcome.started,
                                   outcome.ended, outcome.raised)
            if job.story is None:
                job.story = [attempt]
            else:
                job.story.append(attempt)
            self._unqueue(job)      # in case it was re-queued meanwhile
            # Its code ran to the end (a result, or an exception): what it took is its own.
            self._attempt_over(job, failed=outcome.status not in (Status.OK, Status.ERROR))
            if self._again(job, outcome, worker, now):
                continue
            if worker is not None:
                if outcome.status is Status.OK:
                    worker.done += 1
                else:
                    worker.failed += 1
            self._finish(job, outcome.status, outcome.payload, now)

    def _again(self, job: _Job, outcome: Outcome, worker: _Worker | None, now: float) -> bool:
        """Decide whether a failed attempt is tried again; if so, arrange it."""
        status, opts = outcome.status, job.options
        if status is Status.LOST:
            job.deaths += 1
            self.counters.lost += 1
            if worker is not None:
                worker.lost += 1
            if outcome.retryable and job.deaths < max_deaths(opts):
                self._requeued(job, f"its process {cause_of(job.story[-1])}" if job.story else "its process died",
                               worker)
                self._requeue(job)
                return True
        elif status is Status.TIMEOUT:
            self.counters.timed_out += 1
            if worker is not None:
                worker.timed_out += 1
            if opts.retry_timeouts and job.attempts - job.deaths <= opts.retries:
                self._retry_later(job, worker, now)
                return True
        elif status is Status.ERROR:
            if outcome.retryable and job.attempts - job.deaths <= opts.retries:
                self._retry_later(job, worker, now)
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
        worker = self._workers.get(session)
        for job_id in job_ids:
            job = self._jobs.get(job_id)
            if job is not None and job.worker == session:
                if worker is not None:
                    worker.held.discard(job_id)
                job.attempts -= 1
                self._dirty.add(job_id)
                self._requeue(job)

    def _seen(self, session: str, now: float) -> _Worker:
        worker = self._workers.get(session)
        if worker is None:
            raise LookupError(f"worker {session} is not registered")
        worker.last_seen = now
        return worker

    # -- results ----------------------------------------------------------

    def _finish(self, job: _Job, status: Status, payload: Any, now: float) -> None:
        """The job is over: hand its result to its client (if still there)."""
        if status is Status.OK:
            self.counters.done += 1
        else:
            self.counters.failed += 1
        self._close(job, FINAL_BY_STATUS[status], now)
        self._forget(job)
        client = self._clients.get(job.client)
        if client is None:
            self._drop_payload(payload)
            return      # its client is gone: nobody to tell
        number, delivery = next(client.numbers), Delivery(job.seq, status, payload, job.attempts)
        self._record("result", job.client, number, delivery)
        client.results.append((number, delivery, now))
        self._nudged.add(job.client)

    def collect(self, session: str, reply: Reply, ack: int, wait: float, now: float, urgent: bool = False,
                kick: Kick | None = None) -> Any:
        """Drop this client's results numbered up to ``ack`` (it has them), then
        return the next ones; with none, park the call until there are, for
        up to ``wait`` s (returns `PARKED`).

        A client has two kinds of collect: its collect thread's, and an
        ``urgent`` one from a thread waiting on a result, answered first. A
        ``kick`` answers parked collects of the client at once: WAITING, the
        urgent ones (their result was settled elsewhere: taken by the collect
        thread, or cancelled); CLOSING, all of them. If none is parked, it
        answers the next such call from another connection as it comes.
        """
        client = self._clients.get(session) if kick else self._client(session)
        if client is None:
            return []       # a kick after its goodbye: nothing to get out
        results = client.results
        if results and results[0][0] <= ack:
            while results and results[0][0] <= ack:
                self._drop_payload(results.popleft()[1].payload)
            self._record("acknowledged", session, ack)
        kicked = (client.kicked is not None and client.kicked[1] is not reply
                  and (urgent or client.kicked[0] is Kick.CLOSING))
        if kicked:
            client.kicked = None
        if kick:
            targets = [p for p in client.collectors if p.urgent or kick is Kick.CLOSING]
            for parked in targets:
                client.collectors.remove(parked)
                self._answer(parked, self._batch(client))
            client.kicked = None if targets else (kick, reply)
        if results or client.woken or kicked or wait <= 0:
            client.woken = False
            return self._batch(client)
        return self._park(reply, wait, now, session, urgent=urgent)

    @staticmethod
    def _batch(client: _Client) -> list[tuple[int, Delivery]]:
        batch: list[tuple[int, Delivery]] = []
        size = 0
        for number, delivery, _ in client.results:
            if len(batch) >= COLLECT_BATCH or size >= BATCH_BYTES:
                break
            batch.append((number, delivery))
            size += payload_size(delivery.payload)
        return batch

    def goodbye(self, session: str, now: float) -> None:
        """A client leaves: its queued jobs are dropped and its results discarded."""
        client = self._clients.get(session)
        if client is not None:
            for parked in client.collectors:
                self._answer(parked, [])
            self._drop_client(session, now, failed=False)

    def _drop_client(self, session: str, now: float, failed: bool = True) -> None:
        """Forget a client: it said goodbye, or (``failed``) it was gone too long."""
        client = self._clients.pop(session)
        self.shared.group_ended(f"client:{session}", failed)
        for _, delivery, _ in client.results:
            self._drop_payload(delivery.payload)
        why = "as its client was gone too long" if failed else "as its client left"
        for job_id in list(client.jobs.values()):
            self._withdraw(self._jobs[job_id], now, why)
        self._record("client_gone", session)

    def _withdraw(self, job: _Job, now: float, why: str) -> None:
        """Drop a job its client no longer wants (``why``); if a worker holds
        it, ask it to drop the job too unless it has started (the answer is
        not awaited)."""
        worker = self._workers.get(job.worker) if job.worker else None
        if worker is not None:
            if job.task.id in worker.running:
                return      # it finishes; _finish() finds no client
            worker.held.discard(job.task.id)
            worker.withdraw.append((job.task.id, False))
            self.out.wake_control = True
        self._unqueue(job)
        self._cancelled(job, now, why)
        self._forget(job)

    def _close(self, job: _Job, state: State, now: float, cause: str = "") -> None:
        """Keep the story of a job that is over, in its final ``state``. Its
        ``cause`` defaults to how its last attempt ended."""
        story = job.story or ()
        if not cause and state is not State.DONE:
            cause = cause_of(story[-1]) if story else _NEVER_RAN.get(state, "")
        row = (job.task.id, self._functions[job.task.fn][2], state, job.submitted + self.epoch, now + self.epoch,
               story, cause)
        self.history.add(row)
        if self.durable:
            self._finished_now.append(row)

    def _cancelled(self, job: _Job, now: float, why: str) -> None:
        """A job its client withdrew (or left) is over: the attempt it was
        running, if any, ends with it."""
        holder = self._workers.get(job.worker) if job.worker else None
        if holder is not None and job.task.id in holder.running:
            self._attempted(job, holder, now, End.CANCELLED, why)
        self.counters.cancelled += 1
        self._close(job, State.CANCELLED, now, f"cancelled {why}")

    def _forget(self, job: _Job) -> None:
        del self._jobs[job.task.id]
        path = shm.path_of(job.task.payload)
        if path is not None:
            self.out.remove.append(path)
        if job.worker is not None:
            self._attempt_over(job)
        if self._awaited:
            self.out.wake_cancels = True    # a cancel waiting on it: it is over
        entry = self._functions[job.task.fn]
        entry[1] -= 1
        if entry[1] == 0:
            del self._functions[job.task.fn]
        self._record("forgotten", job.task.id)
        if entry[1] == 0:
            self._record("unused", job.task.fn)
        client = self._clients.get(job.client)
        if client is not None:
            client.jobs.pop(job.seq, None)

    # -- shared objects (`objects.SharedObjects`) -------------------------------

    def shared_open(self, name: str, kind: str, params: tuple) -> int:
        """Make or find a shared object: its generation."""
        return self.shared.open(name, kind, params)

    def shared_call(self, who: tuple, name: str, generation: int, op: str, args: tuple, reply: Reply,
                    wait: float, now: float) -> Any:
        """One operation on a shared object for ``who``: ``("job", id, attempt,
        thread)`` from a job's process, ``("client", session, thread)`` from
        anywhere else. Returns ``(done, value)`` or `PARKED`."""
        if who[0] == "job":
            _, job_id, attempt, thread = who
            job = self._jobs.get(job_id)
            if job is None or job.worker is None or job.attempts != attempt or attempt <= job.released:
                raise RuntimeError(f"job {job_id} attempt {attempt} is over for the broker (cancelled, timed "
                                   "out, or its worker presumed lost): its calls to shared objects are refused")
            owner = (f"job:{job_id}", thread)
        else:
            owner = (f"client:{who[1]}", who[2])
        wait = min(wait, self.settings.wait_slice)
        result = self.shared.call(owner, name, generation, op, args, reply, wait, now)
        if result is None:
            self._wake_timer(now + wait)
            return PARKED
        return result

    def _group_alive(self, group: str) -> bool:
        """Whether a holder of shared locks is still there (after a restore)."""
        kind, _, key = group.partition(":")
        if kind == "job":
            job = self._jobs.get(int(key))
            return job is not None and job.worker is not None
        return key in self._connections

    # -- cancelling ---------------------------------------------------------

    def cancel(self, session: str, seqs: list[int], force: bool, now: float) -> list[bool] | PendingCancel:
        """Withdraw this client's jobs: True for each one that will not complete.

        A job not yet started is always withdrawn; a running one only with
        ``force`` (its child is killed). A finished one cannot be. For jobs a
        worker holds, only the worker knows whether they started: it is asked
        (`withdrawals`), and the answer is a `PendingCancel`, which `awaiting`
        says when to `conclude`.
        """
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
                self._cancelled(job, now, "by its client")
                self._forget(job)
                verdicts[seq] = True
            elif job.task.id in worker.running and not force:
                verdicts[seq] = False
            elif job.task.id in self._awaited or job.task.id in asked:
                verdicts[seq] = False   # another cancel of it is under way
            else:
                worker.withdraw.append((job.task.id, force))
                asked[job.task.id] = seq
        pending = PendingCancel(session, seqs, verdicts, asked)
        if not asked:
            return self.conclude(pending, now)
        self.out.wake_control = True
        self._awaited.update(dict.fromkeys(asked, force))
        return pending

    def awaiting(self, pending: PendingCancel) -> bool:
        """Whether a cancel still waits for a worker's answer.

        No cutoff: a worker acts on a request whenever it gets it, so giving up
        early would leave the two disagreeing. A worker that stops answering
        is lost within the heartbeat timeout, which ends the wait.
        """
        return any(i not in self._answers and (job := self._jobs.get(i)) is not None
                   and job.worker in self._workers for i in pending.asked)

    def conclude(self, pending: PendingCancel, now: float) -> list[bool]:
        """The verdicts of a cancel, once the workers asked have answered (or are gone)."""
        verdicts = pending.verdicts
        for job_id in pending.asked:
            self._awaited.pop(job_id, None)
        for job_id, seq in pending.asked.items():
            withdrawn = self._answers.pop(job_id, None)
            job = self._jobs.get(job_id)
            if job is not None and (withdrawn or (withdrawn is None and job.worker is None)):
                holder = self._workers.get(job.worker) if job.worker else None
                if holder is not None:
                    holder.held.discard(job_id)
                self._unqueue(job)
                self._cancelled(job, now, "by its client")
                self._forget(job)
                verdicts[seq] = True
            else:
                verdicts[seq] = False
        client = self._clients.get(pending.session)
        if client is not None:
            client.withdrawn.update(seq for seq, withdrawn in verdicts.items() if withdrawn)
            if any(verdicts.values()):
                # Its collect call may be waiting for exactly these jobs.
                client.woken = True
                self._nudged.add(pending.session)
        return [verdicts[seq] for seq in pending.seqs]

    def worker(self, session: str) -> _Worker | None:
        return self._workers.get(session)

    def answered(self, answers: dict[int, bool]) -> None:
        """A worker's answers to withdraw requests: job id -> withdrawn?"""
        if answers:
            self._answers.update((i, a) for i, a in answers.items() if i in self._awaited)
            self.out.wake_cancels = True

    def withdrawals(self, session: str, worker: _Worker | None) -> Any:
        """What a worker's control call returns now: ``(job id, force)``
        requests, None once the cluster shuts down, [] if ``worker`` (its
        registration when the call came) is no longer current, or
        `NOTHING_YET`."""
        if self.closing():
            return None
        if self._workers.get(session) is not worker:
            return []       # registered again: not on this (old) connection
        if worker is not None and worker.withdraw:
            requests, worker.withdraw = worker.withdraw, []
            return requests
        return NOTHING_YET

    # -- upkeep -----------------------------------------------------------

    def tick(self, now: float) -> bool:
        """Expire silent workers and departed clients and old results, take
        a reading of the throughput, and drain on shutdown. Returns True once
        a shutdown has fully drained and the broker may exit."""
        self.throughput.sample(now, self.counters.done + self.counters.failed)
        for worker in list(self._workers.values()):
            if now - worker.last_seen > self.settings.heartbeat_timeout:
                why = f"silent for {now - worker.last_seen:.0f} s"
                log.warning("worker %s (%s pid %d) %s; presumed lost", worker.id, worker.host, worker.pid, why,
                            extra={"event": "worker_lost", "worker": worker.id, "host": worker.host})
                self._lose_worker(worker, now, why)
        ttl = now - self.settings.result_ttl
        for session, client in list(self._clients.items()):
            expired = []
            while client.results and client.results[0][2] < ttl:
                number, delivery, _ = client.results.popleft()
                expired.append(number)
                self._drop_payload(delivery.payload)
            if expired:
                log.info("%d results of client %s expired uncollected", len(expired), session[:12])
                self._record("expired", session, expired)
            # With a journal, a client that went away keeps its jobs and
            # results (until they expire), and its session for as long:
            # it may be coming back after a broker restart.
            if not self.durable:
                gone = client.gone_since is not None and now - client.gone_since > self.settings.client_grace
            else:
                gone = (client.gone_since is not None and now - client.gone_since > self.settings.result_ttl
                        and not (client.jobs or client.results))
            if gone:
                self._drop_client(session, now)
        if not self.closing():
            return False
        self.out.wake_control = True     # control calls see it (parked fetches: _answer_parked)
        if self._workers:
            return False
        for job in [j for j in self._jobs.values() if j.worker is None]:
            self._unqueue(job)
            self._finish(job, Status.SHUTDOWN, b"", now)
        if self._jobs:
            return False
        if self._drain_deadline is None:
            self._drain_deadline = now + self.settings.drain_timeout
        waiting = [c for c in self._clients.values() if c.results and c.gone_since is None]
        return not waiting or now > self._drain_deadline

    def trim(self) -> bool:
        """Once a backlog of `TRIM_AFTER` jobs or more has drained, drop the
        emptied containers (a dict never shrinks) and say so: the shell then
        gives the memory back to the system."""
        if self._backlog < TRIM_AFTER or self._jobs:
            return False
        self._backlog = 0
        # With no job left, what the heaps still hold is stale.
        self._jobs, self._queue, self._delayed = {}, [], []
        for client in self._clients.values():
            client.jobs = {}
        return True

    def jobs(self, now: float, limit: int = 20, failed: bool = False, running: bool = False,
             job_id: int | None = None) -> list[dict]:
        """Jobs for `mpqueue jobs`, as `Record.as_dict`, newest first: the one
        numbered ``job_id`` (in flight or kept), or up to ``limit`` of the
        jobs in flight and those kept, by when they last changed; with
        ``failed`` or ``running``, only finished jobs that did not succeed,
        or jobs running now (either, with both)."""
        if job_id is not None:
            job = self._jobs.get(job_id)
            found = self._in_flight(job, now) if job is not None else self.history.get(job_id)
            return [] if found is None else [found.as_dict()]
        records: list[Record] = []
        if running:
            ids = [i for worker in self._workers.values() for i in worker.running if i in self._jobs]
            records += [self._in_flight(self._jobs[i], now) for i in ids]
        if failed:
            records += itertools.islice(self.history.newest(_FAILED), limit)
        if not (failed or running):
            records += [self._in_flight(job, now) for job in itertools.islice(reversed(self._jobs.values()), limit)]
            records += itertools.islice(self.history.newest(), limit)
        records.sort(key=_last_change, reverse=True)
        return [r.as_dict() for r in records[:limit]]

    def _in_flight(self, job: _Job, now: float) -> Record:
        """A job not over yet, as `jobs` shows it: where it is, and its story so far."""
        story = list(job.story or ())
        holder = self._workers.get(job.worker) if job.worker else None
        if holder is not None:
            if job.task.id in holder.running:
                started = None if job.started is None else job.started + self.epoch
                story.append(attempt_row(holder.id, holder.host, None, started, None, End.RUNNING))
                state = State.RUNNING
            else:
                state = State.HELD
        else:
            state = State.QUEUED if job.queued else State.RETRYING
        cause = f"after {cause_of(story[-1])}" if state in (State.QUEUED, State.RETRYING) and story else ""
        return Record.from_row((job.task.id, self._functions[job.task.fn][2], state, job.submitted + self.epoch,
                                None, story, cause))

    def status(self, now: float, wall: float) -> dict:
        """Counts for `mpqueue status`: queued = not started, running = in a
        child now. ``wall``: time.time() at ``now``."""
        backing_off = sum(1 for _, i in self._delayed
                          if (job := self._jobs.get(i)) is not None and job.worker is None
                          and not job.queued)
        workers = [{
            "id": w.id, "host": w.host, "address": w.address, "pid": w.pid, "procs": w.procs,
            "running": len(w.running), "queued": len(w.held - w.running),
            "done": w.done, "failed": w.failed, "lost": w.lost,
            "timed_out": w.timed_out, "retried": w.retried, **w.versions, "packages": dict(w.packages),
            "last_seen": wall - (now - w.last_seen),
            "cpu": w.load and w.load[0], "rss": w.load and w.load[1],
        } for w in self._workers.values()]
        return {
            "workers": workers,
            "queued": self._queued + backing_off + sum(w["queued"] for w in workers),
            "by_priority": {str(p): n for p, n in sorted(self._by_priority.items(), reverse=True)},
            "running": sum(w["running"] for w in workers),
            "done": self.counters.done,
            "failed": self.counters.failed,
            "counters": self.counters.as_dict(),
            "history": len(self.history),
            "clients": len(self._clients),
            "results": sum(len(c.results) for c in self._clients.values()),   # not yet collected
            "shutting_down": self.closing(),
            "shared": self.shared.listing(),
            "throughput": self.throughput.rates(now, self.counters.done + self.counters.failed),
        }


def _last_change(record: Record) -> float:
    """When a job last changed: it finished, its newest attempt started, or it was submitted."""
    if record.finished is not None:
        return record.finished
    started = [a.started for a in record.attempts if a.started is not None]
    return max(started, default=record.submitted)
