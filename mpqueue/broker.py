"""The broker's shell: the lock, the timer, parked calls and the journal
around `state.BrokerState`, served to workers and clients over TCP.

::

    connection threads ──call(caller, ...)──▶ Broker ──lock──▶ BrokerState ──▶ Effects
                                                │                                │
        timer thread ──expire(now)──────────────┤      wake control calls and cancels,
        main thread ──tick(now), once a second──┘      journal rows + commit, then (lock
                                                       released) answers to parked calls

Every decision is `BrokerState`'s; this module only makes it safe to call
from many threads and carries out what it returns. Each connection is served
by its own thread of the manager server (`transport`), which hands every
call a `Caller`: the connection's session, its peer and how to answer it
later. One lock guards all state. A `fetch` or `collect` with nothing to
return is parked: the call that makes it answerable sends the answer, and
the timer thread answers the ones whose wait ran out, so nothing here ever
polls, and no thread wakes only to pass a job or a result on. Two kinds of
call do wait here, on conditions of the lock: a worker's `control` call,
until there is a job to withdraw, and a `cancel`, until the workers asked
have answered. Who owns what, per process and thread: docs/internals.md.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
import uuid
from typing import Any

from . import shm
from .config import SETTINGS, Settings
from .history import KEEP
from .journal import Journal
from .protocol import (
    ClientHello,
    ClientWelcome,
    Delivery,
    Kick,
    Outcome,
    Payload,
    Submission,
    WorkerHello,
    WorkerWelcome,
)
from .state import NO_EFFECTS, NOTHING_YET, PARKED, BrokerState, Effects, PendingCancel
from .transport import DEFERRED, Caller

log = logging.getLogger("mpqueue.broker")

#: How often a broker removes shared-memory payload files left by dead processes (`shm.sweep`).
SWEEP_INTERVAL = 5.0
#: The most jobs one `jobs` call lists (`mpqueue jobs --limit`).
MAX_JOBS_LISTED = 10_000


def _first_id() -> int:
    """Where a broker starts numbering jobs: the clock, in microseconds.

    Ids go up by one from there; a broker handing out fewer than a million a
    second never reuses an id of an earlier run of itself, even one whose
    journal was restored from an older copy (or lost its last writes). So a
    worker that rejoins still running a job can never name another job.
    """
    return time.time_ns() // 1000


class _Changing:
    """`Broker._changing`, as a class: a generator-based context manager
    costs each call about 2 us more (a generator, its frame, three calls),
    a tenth of what the broker spends on a shared object's operation. One
    per broker, shared by all threads: it holds no state of a call."""

    __slots__ = ("_broker",)

    def __init__(self, broker: Broker):
        self._broker = broker

    def __enter__(self) -> BrokerState:
        broker = self._broker
        broker._lock.acquire()
        return broker._state

    def __exit__(self, *exc_info) -> None:
        broker = self._broker
        effects = None
        try:
            try:
                effects = broker._state.settle()
                if effects is not NO_EFFECTS:
                    broker._wake(effects)
                if broker._journal is not None:
                    broker._write(effects)
            finally:
                broker._lock.release()
        finally:
            if effects is not None:
                for reply, message in effects.answers:
                    reply(message)
                for path in effects.remove:
                    shm.remove(path)


class Broker:
    """All queue state, behind one lock. Public methods are called through
    the transport, one thread per connection, with the connection's `Caller`;
    the first argument of each is the caller's session id. (Called directly,
    without a caller, a call cannot be parked: pass ``wait=0``.)

    With a `Journal`, every call that changes jobs, results or sessions
    commits its changes before it returns, and the state it holds is loaded
    back at start."""

    def __init__(self, settings: Settings = SETTINGS, journal: Journal | None = None, history: int = KEEP):
        self.settings = settings
        self._journal = journal
        self.shutdown_event = threading.Event()
        self._state = BrokerState(settings, broker_id=uuid.uuid4().hex, first_id=_first_id(),
                                  durable=journal is not None, closing=self.shutdown_event.is_set,
                                  history=history, epoch=time.time() - time.monotonic())
        self._lock = threading.Lock()
        self._timer = threading.Condition(self._lock)     # the timer thread waits here
        self._timer_at: float | None = None               # when it wakes next
        self._control = threading.Condition(self._lock)   # workers' control calls wait here
        self._answered = threading.Condition(self._lock)  # cancels wait here for workers' answers
        self._changer = _Changing(self)
        self._state.shm_probe = shm.probe()     # removed by a sweep once this process is gone
        if journal is not None:
            stored = journal.load()
            counts = self._state.restore(stored, time.monotonic(), time.time())
            self._write(self._state.settle())   # the jobs failed for their lost arguments
            for path in stored["inlined"]:      # the jobs' arguments are in the journal now
                shm.remove(path)
            journal.inlined_removed()
            log.info("journal %s: %d jobs queued again, %d results waiting for %d clients, %d finished jobs' history",
                     journal.path, *counts, len(self._state.history))
            for error in stored["lost"].values():
                log.error("journal %s: a job failed: %s", journal.path, error)
        self._closed = False
        self._timer_thread = threading.Thread(target=self._run_timer, name="timer", daemon=True)
        self._timer_thread.start()

    @property
    def id(self) -> str:
        return self._state.id

    @property
    def shm_probe(self) -> str:
        return self._state.shm_probe

    def _changing(self) -> _Changing:
        """Hold the lock for a call that changes state; carry out what it
        made necessary (`Effects`), then, lock released, send the answers to
        the parked calls it made answerable. ``with self._changing() as state:``"""
        return self._changer

    def _wake(self, effects: Effects) -> None:
        """Wake the threads waiting in the broker that must look again (lock held)."""
        if effects.wake_control:
            effects.wake_control = False
            self._control.notify_all()
        if effects.wake_cancels:
            effects.wake_cancels = False
            self._answered.notify_all()
        if effects.timer_at is not None:
            if self._timer_at is None or effects.timer_at < self._timer_at:
                self._timer.notify()
            effects.timer_at = None

    def _write(self, effects: Effects) -> None:
        """Write a call's journal rows and commit them (lock held)."""
        assert self._journal is not None
        for name, args in effects.journal:
            if name == "result":    # stored with the wall clock's time: it outlives this process
                args = (*args, time.time())
            getattr(self._journal, name)(*args)
        self._journal.commit()

    @staticmethod
    def _bind(caller: Caller | None, session: str, state: BrokerState) -> None:
        """Remember that this connection serves ``session`` (lock held)."""
        if caller is not None and caller.session != session:
            caller.session = session
            state.connected(session)

    @staticmethod
    def _parked(result: Any, caller: Caller | None) -> Any:
        if result is PARKED:
            if caller is None:
                raise ValueError("a call made without a connection cannot wait: pass wait=0")
            return DEFERRED
        return result

    def _run_timer(self) -> None:
        """Queue retries when due, and answer parked calls whose wait ran out."""
        while not self._closed:
            try:
                with self._changing() as state:
                    state.expire(time.monotonic())
            except Exception:   # a bug of ours, or the journal failing: say so, go on
                log.exception("internal error in the broker's timer")
                time.sleep(1)
            with self._lock:
                if self._closed:
                    return
                at = self._timer_at = self._state.next_deadline()
                self._timer.wait(None if at is None else max(0.0, at - time.monotonic()))
                self._timer_at = None

    # -- sessions ---------------------------------------------------------

    def connection_closed(self, caller: Caller) -> None:
        """Called by the server when a connection ends, in that connection's thread."""
        if caller.session is None:
            return
        with self._changing() as state:
            state.connection_closed(caller.session, caller.reply, time.monotonic())

    def register(self, session: str, hello: WorkerHello | ClientHello, *,
                 caller: Caller | None = None) -> WorkerWelcome | ClientWelcome:
        """A worker or client introduces itself."""
        with self._changing() as state:
            self._bind(caller, session, state)
            return state.register(session, hello, caller.peer if caller else None, time.monotonic())

    def unregister(self, session: str, *, caller: Caller | None = None) -> None:
        """A worker leaves cleanly; anything it still holds goes back to the queue."""
        with self._changing() as state:
            state.unregister(session, time.monotonic())

    # -- jobs ---------------------------------------------------------------

    def submit(self, session: str, submissions: list[Submission], functions: dict[bytes, bytes],
               code: dict[bytes, bytes] | None = None, *, caller: Caller | None = None) -> None:
        """Queue jobs. ``functions`` holds the pickled function of every digest
        they use; ``code``, the bundles of shipped code they need that the
        client has not sent before (`shipping`)."""
        with self._changing() as state:
            self._bind(caller, session, state)
            state.submit(session, submissions, functions, time.monotonic(), code)

    def payload(self, session: str, path: str, *, caller: Caller | None = None) -> Payload | None:
        """A job's arguments or result a process of this host left in shared
        memory (`shm`), for one that cannot see the file; None if it is not
        such a file (the name is checked, not looked up among the jobs: that
        would take the lock for a walk of all of them, per task)."""
        if not shm.is_payload_file(path):
            return None
        try:
            return shm.mapped(path)
        except (OSError, ValueError):
            return None

    def sweep_payloads(self) -> None:
        """Remove shared-memory payload files of this host that no job here
        refers to and whose writer died (`shm.sweep`). Called by the main
        thread at start and then every few seconds."""
        candidates = shm.orphans(self.shm_probe)     # most often none: then the jobs need no look
        if not candidates:
            return
        with self._lock:
            referenced = self._state.payload_files()
        removed = shm.sweep(candidates, referenced)
        if removed:
            log.info("removed %d payload files of processes gone from %s", removed, shm.DIRECTORY)

    def code(self, key: bytes, *, caller: Caller | None = None) -> bytes | None:
        """A bundle of shipped code, for a worker that lacks it; None if unknown."""
        with self._lock:
            return self._state.code(key)

    def fetch(self, session: str, max_jobs: int, wait: float, *, caller: Caller | None = None) -> Any:
        """Lease up to ``max_jobs`` jobs to a worker; with none queued, park the
        call until one is, for up to ``wait`` s.

        Returns ``(tasks, functions)``, or None once the cluster is shutting down.
        """
        with self._changing() as state:
            self._bind(caller, session, state)
            return self._parked(state.fetch(session, caller and caller.reply, max_jobs, wait,
                                            time.monotonic()), caller)

    def report(self, session: str, outcomes: list[Outcome], running: tuple[int, list[int]],
               packages: dict[str, str | None] | None = None, load: tuple[float, int] | None = None, *,
               caller: Caller | None = None) -> None:
        """A worker's finished jobs, (version, ids) of the jobs its children run
        now, its versions of packages jobs asked for, when new, and its
        children's CPU % and RSS, once a heartbeat."""
        with self._changing() as state:
            self._bind(caller, session, state)
            state.report(session, outcomes, running, time.monotonic(), packages, load)

    def release(self, session: str, job_ids: list[int], *, caller: Caller | None = None) -> None:
        """A stopping worker gives back jobs it fetched but never started."""
        with self._changing() as state:
            self._bind(caller, session, state)
            state.release(session, job_ids)

    # -- results ------------------------------------------------------------

    def collect(self, session: str, ack: int, wait: float, urgent: bool = False, kick: Kick | None = None, *,
                caller: Caller | None = None) -> list[tuple[int, Delivery]]:
        """Drop this client's results numbered up to ``ack``, then return the
        next ones; with none, park the call until there are, for up to
        ``wait`` s. See `BrokerState.collect`."""
        with self._changing() as state:
            self._bind(caller, session, state)
            return self._parked(state.collect(session, caller and caller.reply, ack, wait, time.monotonic(),
                                              urgent, kick), caller)

    def goodbye(self, session: str, *, caller: Caller | None = None) -> None:
        """A client leaves: its queued jobs are dropped and its results discarded."""
        with self._changing() as state:
            state.goodbye(session, time.monotonic())

    # -- shared objects (`mpqueue.shared`) ---------------------------------------

    def shared_open(self, session: str, name: str, kind: str, params: tuple, *,
                    caller: Caller | None = None) -> int:
        """Make or find the shared object ``name``: its generation, for `shared`."""
        with self._changing() as state:
            self._bind(caller, session, state)
            return state.shared_open(name, kind, params)

    def shared(self, session: str, who: tuple, name: str, generation: int, op: str, args: tuple,
               wait: float, *, caller: Caller | None = None) -> Any:
        """One operation on a shared object: ``(done, value)``. One that must
        wait (a held lock, an empty queue) is parked for up to ``wait`` s,
        then answered ``(False, None)``. See `BrokerState.shared_call`."""
        with self._changing() as state:
            self._bind(caller, session, state)
            return self._parked(state.shared_call(who, name, generation, op, args, caller and caller.reply,
                                                  wait, time.monotonic()), caller)

    def shared_delete(self, session: str, name: str, *, caller: Caller | None = None) -> bool:
        """Remove a shared object; whether there was one."""
        with self._changing() as state:
            return state.shared.delete(name)

    # -- cancelling ---------------------------------------------------------

    def cancel(self, session: str, seqs: list[int], force: bool, *,
               caller: Caller | None = None) -> list[bool]:
        """Withdraw this client's jobs: True for each one that will not complete.
        For jobs workers hold, wait for their answers (`BrokerState.awaiting`)."""
        with self._changing() as state:
            self._bind(caller, session, state)
            verdicts = state.cancel(session, seqs, force, time.monotonic())
            if not isinstance(verdicts, PendingCancel):
                return verdicts
            pending = verdicts
            try:
                self._wake(state.out)       # the workers' control calls, now: we wait for them
                while state.awaiting(pending):
                    self._answered.wait()
            finally:
                verdicts = state.conclude(pending, time.monotonic())
            return verdicts

    def control(self, session: str, wait: float, answers: dict[int, bool], *,
                caller: Caller | None = None) -> list | None:
        """A worker's control channel. It brings its answers to earlier
        withdraw requests, then blocks until there are new ones, a list of
        ``(job id, force)``, or the cluster shuts down (None), or ``wait`` ends."""
        with self._lock:
            state = self._state
            state.answered(answers)
            self._wake(state.out)
            deadline = time.monotonic() + min(wait, self.settings.wait_slice)
            worker = state.worker(session)
            while True:
                requests = state.withdrawals(session, worker)
                if requests is not NOTHING_YET:
                    return requests
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                self._control.wait(remaining)

    # -- upkeep -----------------------------------------------------------

    def upkeep(self) -> None:
        """Until a shutdown has drained: `tick` about once per heartbeat
        interval, `release_memory`, and `sweep_payloads` every `SWEEP_INTERVAL`.
        The broker's main thread (`mpqueue broker`), or a thread of the
        process a private cluster's broker runs in (`cluster.LocalCluster`)."""
        next_sweep = 0.0
        while not self.tick():
            self.release_memory()
            if time.monotonic() >= next_sweep:
                self.sweep_payloads()
                next_sweep = time.monotonic() + SWEEP_INTERVAL
            if self.shutdown_event.is_set():
                time.sleep(0.1)     # draining: a few ticks, then we are done
            else:
                self.shutdown_event.wait(self.settings.heartbeat_interval)

    def close(self) -> None:
        """End the timer thread and remove the /dev/shm probe: for a broker in
        a process that goes on (a private cluster's); a broker process just
        exits. (After a kill -9, the next broker's sweep removes the probe.)"""
        with self._lock:
            self._closed = True
            self._timer.notify()
        self._timer_thread.join()
        shm.remove(self.shm_probe)

    def tick(self) -> bool:
        """Expire silent workers and departed clients, and drain on shutdown.

        Called about once per heartbeat interval by the broker's main thread.
        Returns True once a shutdown has fully drained and the broker may exit.
        """
        with self._changing() as state:
            return state.tick(time.monotonic())

    def release_memory(self) -> None:
        """Give memory back to the system once a large backlog has drained
        (`BrokerState.trim`). Python returns what it frees to the C allocator,
        which keeps most of it: a broker that carried 2 M jobs would hold a few
        hundred MB for good. Outside the lock: trimming a large heap takes a while."""
        with self._lock:
            if not self._state.trim():
                return
        try:
            ctypes.CDLL(None).malloc_trim(0)    # glibc's; elsewhere there is nothing to do
        except (OSError, AttributeError):
            pass

    def jobs(self, limit: int = 20, failed: bool = False, running: bool = False, job_id: int | None = None, *,
             caller: Caller | None = None) -> list[dict]:
        """Jobs for `mpqueue jobs`: see `BrokerState.jobs`. At most
        `MAX_JOBS_LISTED`: they are made under the lock the job path needs."""
        with self._lock:
            return self._state.jobs(time.monotonic(), min(limit, MAX_JOBS_LISTED), failed, running, job_id)

    def status(self, *, caller: Caller | None = None) -> dict:
        """Counts for `mpqueue status`: queued = not started, running = in a child now."""
        with self._lock:
            return self._state.status(time.monotonic(), time.time())
