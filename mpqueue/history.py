"""Every job's story: each attempt and how it ended, the job's final state,
and the totals the broker counts.

::

    worker report / lost worker / cancel / shutdown ──▶ BrokerState
        an attempt over ──▶ Attempt, on the job (`_Job.story`)
        the job over ────▶ Record ──▶ History (the last N, in memory) ──▶ `mpqueue jobs`
                                  └──▶ journal rows (``--journal``): they survive a restart

The broker never unpickles a job's payload, so what an attempt's end says
comes as plain values: the child's pid and times and, for an exception, its
type, message and traceback as text (`protocol.Outcome`); for a process that
died, the `protocol.Failure` the worker built. Times are the wall clock, in
seconds: a worker's own for the attempts it ran, the broker's for what the
broker decides (a lost worker, a cancel).

Every job ends in exactly one of the final `State` s; the meaning of each,
and of every field shown: docs/observability.md.

The broker keeps attempts and records as plain tuples in the fields' order
of `Attempt` and `Record` (rows): a NamedTuple costs ten times as much to
make, and a no-op job pays for two. They become NamedTuples when asked for.
"""

from __future__ import annotations

import dataclasses
import enum
from collections import deque
from typing import Any, Container, Iterable, Iterator, NamedTuple

from .protocol import Failure, Raised, Status

#: Finished jobs the broker keeps by default (``mpqueue broker --history N``).
KEEP = 10_000


class End(str, enum.Enum):
    """How one attempt ended."""
    RESULT = "result"           # the function returned
    RAISED = "raised"           # the function raised (detail: type and message)
    TIMEOUT = "timeout"         # killed at the job's timeout
    CANCELLED = "cancelled"     # withdrawn by its client while a worker held it
    DIED = "died"               # its process died (detail: signal name or exit code)
    MEMORY = "memory"           # killed for growing past --max-memory-per-child (detail: RSS seen > limit)
    LOST = "lost"               # the broker lost its worker (connection closed, or silent)
    STOPPED = "stopped"         # its worker stopped cold and gave it back: not charged
    RUNNING = "running"         # not over: the attempt of a job running now, as `mpqueue jobs` shows it


class State(str, enum.Enum):
    """Where a job is: in flight, then exactly one of the final states."""
    QUEUED = "queued"           # waiting for a worker
    HELD = "held"               # fetched by a worker, not started
    RUNNING = "running"         # in a worker's child now
    RETRYING = "retrying"       # an attempt failed; the next waits out its backoff
    DONE = "done"               # final: it returned a result
    FAILED = "failed"           # final: it raised, on its last try
    TIMED_OUT = "timed_out"     # final: its last try ran past its timeout
    LOST = "lost"               # final: its process or its worker died too often
    CANCELLED = "cancelled"     # final: withdrawn by its client, or its client left
    SHUTDOWN = "shutdown"       # final: the cluster shut down before it ran


FINAL = frozenset({State.DONE, State.FAILED, State.TIMED_OUT, State.LOST, State.CANCELLED, State.SHUTDOWN})

#: A job's final state, by the status its last attempt reported.
FINAL_BY_STATUS = {Status.OK: State.DONE, Status.ERROR: State.FAILED, Status.TIMEOUT: State.TIMED_OUT,
                   Status.LOST: State.LOST, Status.SHUTDOWN: State.SHUTDOWN}


class Attempt(NamedTuple):
    """One attempt at a job: where it ran and how it ended."""
    worker: str | None          # the worker's id
    host: str
    pid: int | None             # the process that ran it (a worker's child)
    started: float | None       # wall clock; None: the broker never saw it start
    ended: float | None
    end: End
    detail: str = ""            # "ValueError: bad input", "SIGSEGV", "exit code 3", "412 MiB > 400 MiB"...
    traceback: str = ""         # RAISED: the remote traceback (clipped: `protocol.RAISED_TRACEBACK`)

    @property
    def cause(self) -> str:
        """One line: how it ended, e.g. ``raised ValueError: bad input``."""
        return cause_of(self)


class Record(NamedTuple):
    """A job, as `mpqueue jobs` shows it: finished (kept in `History`) or in flight."""
    id: int
    function: str               # its module-qualified name, "" if the client did not say
    state: State
    submitted: float            # wall clock
    finished: float | None
    attempts: tuple[Attempt, ...]
    cause: str                  # one line: why it ended (or why it waits), "" if it did well

    def as_dict(self) -> dict:
        """Plain JSON: the journal's row and `jobs --json` both."""
        return {**self._asdict(), "state": self.state.value,
                "attempts": [{**a._asdict(), "end": a.end.value} for a in self.attempts]}

    @classmethod
    def from_dict(cls, info: dict) -> "Record":
        attempts = tuple(Attempt(**{**a, "end": End(a["end"])}) for a in info["attempts"])
        return cls(**{**info, "state": State(info["state"]), "attempts": attempts})

    @classmethod
    def from_row(cls, row: tuple) -> "Record":
        """A record kept as a row: its attempts made `Attempt` s too."""
        return cls(row[0], row[1], row[2], row[3], row[4], tuple(Attempt._make(a) for a in row[5]), row[6])


def attempt_row(worker: str | None, host: str, pid: int | None, started: float | None, ended: float | None,
                end: End, detail: str = "", traceback: str = "") -> tuple:
    """An `Attempt`, as the broker keeps it (a row)."""
    return (worker, host, pid, started, ended, end, detail, traceback)


def cause_of(attempt: tuple) -> str:
    """How an attempt (a row, or an `Attempt`) ended, in one line:
    ``raised ValueError: bad input``; "" for a result."""
    end, detail = attempt[5], attempt[6]
    if end is End.RESULT:
        return ""
    return f"{end.value} {detail}".rstrip()


@dataclasses.dataclass(slots=True)
class Counters:
    """Totals since the broker started, cheap to read (metrics later).

    Jobs: submitted, done (a result), failed (no result: raised, timed out,
    lost or shut down), cancelled. Attempts: retried (tried again after a
    failure), lost (their process or worker died), timed_out.
    """
    submitted: int = 0
    done: int = 0
    failed: int = 0
    cancelled: int = 0
    retried: int = 0
    lost: int = 0
    timed_out: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class History:
    """The last ``keep`` finished jobs, as rows of `Record` fields, oldest first."""

    def __init__(self, keep: int = KEEP):
        self.keep = keep
        self._rows: deque[tuple] = deque(maxlen=keep)
        #: Keep a job that is over (a row of `Record`): the oldest kept goes
        #: if there are ``keep`` already. The deque's own method: once per job.
        self.add = self._rows.append

    def get(self, job_id: int) -> Record | None:
        """A kept job (a walk from the newest: asked for by a person, now and then)."""
        for row in reversed(self._rows):
            if row[0] == job_id:
                return Record.from_row(row)
        return None

    def newest(self, states: Container[State] | None = None) -> Iterator[Record]:
        """The kept jobs, newest first; with ``states``, only those in one of
        them, picked from the rows before any is made a `Record` (a walk of
        the ring for a few failures, under the broker's lock, each second
        the dashboard is open)."""
        rows: Iterable[tuple] = reversed(self._rows)
        if states is not None:
            rows = (row for row in rows if row[2] in states)
        return (Record.from_row(row) for row in rows)

    def __len__(self) -> int:
        return len(self._rows)


def reported(worker: str | None, host: str, status: Status, payload: Any, pid: int | None,
             started: float | None, ended: float | None, raised: Raised | None) -> Attempt:
    """The attempt a worker reported: its result, what it raised, or how its process ended."""
    if status is Status.OK:
        return Attempt(worker, host, pid, started, ended, End.RESULT)
    if status is Status.ERROR:
        kind, message, tb = raised or ("", "", "")
        kind = kind.rpartition(".")[2]
        return Attempt(worker, host, pid, started, ended, End.RAISED,
                       _line(f"{kind}: {message}" if message else kind), tb)
    if status is Status.CANCELLED:
        return Attempt(worker, host, pid, started, ended, End.CANCELLED, "by its client")
    failure = payload if isinstance(payload, Failure) else Failure(pid, host)
    if status is Status.TIMEOUT:
        return Attempt(worker, failure.host or host, failure.pid, started, ended, End.TIMEOUT,
                       f"after {failure.timeout:g} s" if failure.timeout is not None else "")
    if failure.rss is not None:
        return Attempt(worker, failure.host or host, failure.pid, started, ended, End.MEMORY,
                       f"{failure.rss >> 20} MiB" + (f" > {failure.limit >> 20} MiB" if failure.limit else ""))
    if failure.signal or failure.exitcode is not None:
        return Attempt(worker, failure.host or host, failure.pid, started, ended, End.DIED,
                       failure.signal or f"exit code {failure.exitcode}")
    return Attempt(worker, failure.host or host, failure.pid, started, ended, End.LOST, failure.reason)


def _line(text: str, most: int = 200) -> str:
    """The first line of ``text``, at most ``most`` characters."""
    first = text.strip().split("\n", 1)[0]
    return first if len(first) <= most else first[:most - 1] + "~"

