"""The broker's durable state: a SQLite database in WAL mode.

With ``mpqueue broker --journal PATH``, every change the broker makes to a
job, a result or a client's session is written here within the call that
made it, and committed (one transaction per call, so per batch of submits,
fetches or results) before the broker answers. A broker killed and restarted
on the same file comes back with every job that was submitted and not yet
delivered:

* queued jobs are queued again, in their order;
* jobs a worker held are queued again too: their lease is counted as an
  attempt (a worker that reconnects still running one takes it back);
* results wait for their client, under the numbers it acknowledges them by;
* each client's highest job number, so that a batch a client sends again
  after a reconnect is not queued twice, and its last result's number, so
  that numbering goes on where the acknowledgements it holds left off;
* the story of the last finished jobs (`history`), for `mpqueue jobs`:
  one row each, written with the call that finished them.

Commits use ``synchronous=NORMAL``: they survive the broker process dying
(``kill -9``, a crash), not the machine losing power. The file is never
closed on purpose: every commit is complete on its own, and a call served
while the broker exits must not be answered as if it were stored.

A job's arguments of `shm.THRESHOLD` (1 MiB) or more are not written into
SQLite but into a side file, ``PATH-payloads/JOB_ID``, before the commit
that names it, and removed after the commit that forgets the job: so a
kill -9 finds every file a committed job names. Not synced either: after a
power loss the row may have reached the disk before its file's bytes did,
which `load` finds by the size the row keeps, and fails that job. The copy
is the kernel's (``sendfile`` from the client's `shm` file), a page-cache
write; in SQLite a 1 MiB blob went through the WAL and again into the
database at the next checkpoint, with an ``fsync``, under the broker's lock.

Payloads stay opaque bytes, as everywhere in the broker. The few plain
values of ours stored with them (options, failure details) are pickled with
the standard library, in a file only the broker's user may read.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import pickle
import sqlite3
import uuid
from typing import Any, Iterable

from . import shm
from .errors import ConfigError
from .history import Record
from .protocol import Delivery, Failure, Options, Payload, Status

SCHEMA_VERSION = 1

#: What a job's row holds in place of arguments kept in a side file, followed
#: by their size (`Journal._arguments`).
_SIDE = b"MPQSIDE1:"

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value);
CREATE TABLE functions (digest BLOB PRIMARY KEY, blob BLOB NOT NULL);
CREATE TABLE clients (session TEXT PRIMARY KEY, max_seq INTEGER NOT NULL, last_number INTEGER NOT NULL);
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY, client TEXT NOT NULL, seq INTEGER NOT NULL, fn BLOB NOT NULL,
    payload BLOB NOT NULL, chunked INTEGER NOT NULL, options BLOB NOT NULL,
    attempts INTEGER NOT NULL, deaths INTEGER NOT NULL);
CREATE TABLE results (
    client TEXT NOT NULL, number INTEGER NOT NULL, seq INTEGER NOT NULL, status INTEGER NOT NULL,
    payload BLOB NOT NULL, attempts INTEGER NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (client, number)) WITHOUT ROWID;
"""

#: Tables that came after schema 1 (shipped code, shared objects, the
#: shared-memory files taken in, the jobs' history): tables more, nothing
#: changed, so a journal of schema 1 gets them where it lacks them.
_ADDED = """
CREATE TABLE IF NOT EXISTS code (digest BLOB PRIMARY KEY, zip BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS shared (name TEXT PRIMARY KEY, state BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS inlined (path TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS history (n INTEGER PRIMARY KEY, record TEXT NOT NULL);
"""


class Journal:
    """Write-through storage of the broker's jobs, results and sessions.

    The broker calls it with its own lock held, so one connection serves
    every thread. Changes accumulate in an open transaction until `commit`.
    """

    def __init__(self, path: str):
        self.path = path
        self._results: list[tuple] = []               # rows held back until `_flush`
        self._numbers: dict[str, int] = {}            # each client's last result number, likewise
        self._forgotten: list[tuple[int]] = []        # ids of jobs over, likewise
        self._side_dir = path + "-payloads"           # large arguments: `_arguments`
        self._sides: dict[int, str] = {}               # job id -> its side file
        self._unlink: list[str] = []                   # side files of forgotten jobs, once committed
        try:
            # Held open for the broker's life: a second broker on the same
            # file would hand out the same jobs.
            self._lock_fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._lock_fd)
                raise ConfigError(f"journal {path} is in use by another broker") from None
            os.makedirs(self._side_dir, mode=0o700, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level="DEFERRED")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            # Fold the log back into the database every ~40 MB rather than
            # every 4 MB: large payloads pass through it once, not twice.
            self._db.execute("PRAGMA wal_autocheckpoint=10000")
            tables = {row[0] for row in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if not tables:
                self._db.executescript(_SCHEMA + _ADDED)
                self._db.execute("INSERT INTO meta VALUES ('schema', ?), ('next_id', 1), ('id', ?)",
                                 (SCHEMA_VERSION, uuid.uuid4().hex))
                self._db.commit()
            elif "meta" not in tables:
                raise ConfigError(f"journal {path} is an SQLite database, but not an mpqueue journal")
            else:
                version = self._meta("schema")
                if version != SCHEMA_VERSION:
                    raise ConfigError(f"journal {path} has schema version {version}; this mpqueue "
                                      f"reads version {SCHEMA_VERSION}")
                self._db.executescript(_ADDED)
                (check,), = self._db.execute("PRAGMA quick_check").fetchall()
                if check != "ok":
                    raise ConfigError(f"journal {path} is damaged: {check}")
        except sqlite3.Error as e:
            raise ConfigError(f"cannot use journal {path}: {e}") from None
        except OSError as e:
            raise ConfigError(f"cannot open journal {path}: {e.strerror or e}") from None
        self._unpruned = 0      # history rows written since the table was last cut down to size

    def _meta(self, key: str) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    # -- reading it back at start -----------------------------------------

    def load(self) -> dict:
        """Everything stored: ``id`` (the journal's own), ``next_id``, ``functions`` {digest: blob},
        ``code`` {digest: zip}, ``shared`` {name: `SharedObjects.snapshot`}, ``inlined``
        (the shared-memory files whose bytes it took: `_inline`),
        ``clients`` {session: (max_seq, last_number)}, ``jobs`` (rows in id order),
        ``results`` (client, number, Delivery, created) in number order,
        ``history`` (`Record` s of finished jobs, oldest first), and
        ``lost`` {job id: the error it fails with}: the jobs whose side file
        is gone or damaged (`_side`). Side files no job names are removed."""
        try:
            lost: dict[int, OSError] = {}
            jobs = [(i, client, seq, fn, self._side(i, payload, lost), bool(chunked),
                     Options(*pickle.loads(options)), attempts, deaths)
                    for i, client, seq, fn, payload, chunked, options, attempts, deaths
                    in self._db.execute("SELECT * FROM jobs ORDER BY id")]
            self._remove_orphans()
            results = [(client, number, Delivery(seq, Status(status), _payload(pickle.loads(payload)),
                                                 attempts), created)
                       for client, number, seq, status, payload, attempts, created
                       in self._db.execute("SELECT * FROM results ORDER BY client, number")]
            return {
                "id": self._meta("id"),
                "next_id": self._meta("next_id"),
                "functions": dict(self._db.execute("SELECT digest, blob FROM functions")),
                "code": dict(self._db.execute("SELECT digest, zip FROM code")),
                "shared": {name: pickle.loads(state) for name, state
                           in self._db.execute("SELECT name, state FROM shared")},
                "inlined": [path for path, in self._db.execute("SELECT path FROM inlined")],
                "clients": {session: (max_seq, last_number) for session, max_seq, last_number
                            in self._db.execute("SELECT session, max_seq, last_number FROM clients")},
                "jobs": jobs,
                "results": results,
                "lost": lost,
                "history": [Record.from_dict(json.loads(text)) for text,
                            in self._db.execute("SELECT record FROM history ORDER BY n")],
            }
        except (sqlite3.Error, pickle.UnpicklingError, TypeError, ValueError, KeyError, OSError) as e:
            raise ConfigError(f"cannot read journal {self.path}: {e}") from None

    def _side(self, job_id: int, stored: bytes, lost: dict[int, OSError]) -> bytes:
        """A job's arguments as stored: read from its side file if they are
        in one (`_arguments`). One that is gone, or shorter or longer than
        the row says, is noted in ``lost``: deleted by hand, or, after the
        machine lost power, not yet on the disk when the row was."""
        if not stored.startswith(_SIDE):
            return stored
        side = os.path.join(self._side_dir, str(job_id))
        size = int(stored[len(_SIDE):])
        try:
            with open(side, "rb") as f:
                data = f.read()
        except OSError as e:
            lost[job_id] = type(e)(f"the job's arguments, kept in {side} next to the journal, "
                                   f"are gone ({e.strerror}); the job did not run")
            return b""
        if len(data) != size:
            lost[job_id] = OSError(f"the job's arguments, kept in {side} next to the journal, are "
                                   f"{len(data)} bytes, not {size} (cut short when the machine lost "
                                   "power?); the job did not run")
            return b""
        self._sides[job_id] = side
        return data

    def _remove_orphans(self) -> None:
        """Remove the side files no job names (`load`): a job's that was
        forgotten as the broker stopped, or that never got its row."""
        for name in os.listdir(self._side_dir):
            if not name.isdigit() or int(name) not in self._sides:
                shm.remove(os.path.join(self._side_dir, name))

    # -- changes ------------------------------------------------------------

    def submitted(self, session: str, max_seq: int, next_id: int, jobs: list,
                  functions: dict[bytes, bytes]) -> None:
        """New jobs: rows of (id, seq, fn, payload, chunked, options)."""
        self._flush()
        db = self._db
        db.executemany("INSERT OR IGNORE INTO functions VALUES (?, ?)", functions.items())
        db.executemany("INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, 0, 0)",
                       [(i, session, seq, fn, self._arguments(i, payload), chunked, _options_blob(options))
                        for i, seq, fn, payload, chunked, options in jobs])
        db.execute("INSERT INTO clients VALUES (?, ?, 0) ON CONFLICT(session) DO UPDATE SET max_seq = ?",
                   (session, max_seq, max_seq))
        db.execute("UPDATE meta SET value = ? WHERE key = 'next_id'", (next_id,))

    def _inline(self, payload: Payload) -> Payload:
        """The bytes themselves, for a payload a process left in shared memory
        (`shm`): the journal outlives the file, which is noted, for a restart
        to remove (`inlined_removed`). A file gone already stays a reference:
        the job fails saying so."""
        path = shm.path_of(payload)
        if path is None:
            return payload
        try:
            data = shm.read(path)
        except OSError:
            return payload
        self._db.execute("INSERT OR IGNORE INTO inlined VALUES (?)", (path,))
        return data

    def _arguments(self, job_id: int, payload: Payload) -> Payload:
        """What the journal stores of a job's arguments: those of `shm.THRESHOLD`
        bytes or more go to a side file (`_SIDE`, the row keeps its size), the
        rest, and any the side file fails for, into the row. A file of `shm`
        the side file copies is noted, as in `_inline`; one gone already stays
        a reference: the job fails saying so."""
        path = shm.path_of(payload)
        if path is None and memoryview(payload).nbytes < shm.THRESHOLD:
            return payload      # bytes, or a buffer that came out of band: SQLite takes either
        side = os.path.join(self._side_dir, str(job_id))
        try:
            fd = os.open(side, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                size = _copy(path, fd) if path is not None else _write(fd, payload)
            finally:
                os.close(fd)
        except OSError:             # no room, no directory: the row takes the bytes
            shm.remove(side)
            return self._inline(payload)
        if path is not None:
            self._db.execute("INSERT OR IGNORE INTO inlined VALUES (?)", (path,))
        self._sides[job_id] = side
        return _SIDE + str(size).encode()

    def inlined_removed(self) -> None:
        """The files noted by `_inline` are gone (removed at a restart)."""
        self._db.execute("DELETE FROM inlined")
        self._db.commit()

    def attempts(self, rows: Iterable[tuple[int, int, int]]) -> None:
        """Jobs' (attempts, deaths, id): leased, or given back."""
        self._flush()
        self._db.executemany("UPDATE jobs SET attempts = ?, deaths = ? WHERE id = ?", rows)

    def history(self, rows: list[tuple], keep: int) -> None:
        """Finished jobs' stories (rows of `Record`); the table keeps about the
        last ``keep`` (cut down once a tenth more have been written, not at every call)."""
        self._db.executemany("INSERT INTO history (record) VALUES (?)",
                             [(json.dumps(Record.from_row(row).as_dict()),) for row in rows])
        self._unpruned += len(rows)
        if self._unpruned > max(100, keep // 10):
            self._unpruned = 0
            self._db.execute("DELETE FROM history WHERE n <= (SELECT MAX(n) FROM history) - ?", (keep,))

    def forgotten(self, job_id: int) -> None:
        """A job is over: finished, cancelled, or its client gone (its row is
        deleted at the next `_flush`, its side file once that is committed)."""
        self._forgotten.append((job_id,))
        side = self._sides.pop(job_id, None)
        if side is not None:
            self._unlink.append(side)

    def _flush(self) -> None:
        """Write the rows `result` and `forgotten` hold back, a statement for
        all of them: a worker's report of N jobs is then three statements,
        not 3N (W1 spent 9-12 us a job on those alone). Holding them back
        changes nothing another statement sees, as every other change calls
        this first: results and jobs are different tables, and of each
        client's numbers, only the last is kept."""
        db = self._db
        if self._results:
            db.executemany("INSERT INTO results VALUES (?, ?, ?, ?, ?, ?, ?)", self._results)
            db.executemany("UPDATE clients SET last_number = ? WHERE session = ?",
                           [(number, session) for session, number in self._numbers.items()])
            self._results, self._numbers = [], {}
        if self._forgotten:
            db.executemany("DELETE FROM jobs WHERE id = ?", self._forgotten)
            self._forgotten = []

    def result(self, session: str, number: int, delivery: Delivery, created: float) -> None:
        """A finished job's result, waiting for its client (written at the
        next `_flush`)."""
        payload = delivery.payload
        if isinstance(payload, Failure):
            payload = payload.as_dict()     # as every version wrote it: see `_payload`
        elif isinstance(payload, bytes):
            payload = self._inline(payload)
        else:
            payload = payload.raw().tobytes()   # out of band (`protocol.Payload`): bytes, as ever
        self._results.append((session, number, delivery.seq, int(delivery.status),
                              pickle.dumps(payload, protocol=5), delivery.attempts, created))
        self._numbers[session] = number     # numbers only grow: the last one is the client's

    def shared(self, objects: dict[str, tuple | None]) -> None:
        """Shared objects as they are now, whole (None: deleted)."""
        self._flush()
        for name, snapshot in objects.items():
            if snapshot is None:
                self._db.execute("DELETE FROM shared WHERE name = ?", (name,))
            else:
                self._db.execute("INSERT OR REPLACE INTO shared VALUES (?, ?)",
                                 (name, pickle.dumps(snapshot, protocol=5)))

    def code(self, bundles: dict[bytes, bytes]) -> None:
        self._flush()
        self._db.executemany("INSERT OR IGNORE INTO code VALUES (?, ?)", bundles.items())

    def unused(self, fn: bytes) -> None:
        self._flush()
        self._db.execute("DELETE FROM functions WHERE digest = ?", (fn,))

    def acknowledged(self, session: str, number: int) -> None:
        """The client has its results numbered up to ``number``."""
        self._flush()
        self._db.execute("DELETE FROM results WHERE client = ? AND number <= ?", (session, number))

    def expired(self, session: str, numbers: list[int]) -> None:
        self._flush()
        self._db.executemany("DELETE FROM results WHERE client = ? AND number = ?",
                             [(session, n) for n in numbers])

    def client_gone(self, session: str) -> None:
        self._flush()
        self._db.execute("DELETE FROM results WHERE client = ?", (session,))
        self._db.execute("DELETE FROM clients WHERE session = ?", (session,))

    def commit(self) -> None:
        """Commit the changes so far, then remove the side files of the jobs
        they forgot (not before: a broker killed in between would find jobs
        without their arguments)."""
        self._flush()
        if self._db.in_transaction:
            self._db.commit()
        if self._unlink:
            for side in self._unlink:
                shm.remove(side)
            self._unlink = []


def _copy(path: str, fd: int) -> int:
    """Copy the file ``path`` into ``fd`` in the kernel; how many bytes."""
    with open(path, "rb") as source:
        size = os.fstat(source.fileno()).st_size
        done = 0
        while done < size:
            sent = os.sendfile(fd, source.fileno(), done, size - done)
            if sent == 0:
                raise OSError(f"{path} shrank while being copied")
            done += sent
    return size


def _write(fd: int, data: Payload) -> int:
    """Write all of ``data`` to ``fd``; how many bytes."""
    view = memoryview(data).cast("B")
    size = view.nbytes
    while view:
        view = view[os.write(fd, view):]
    return size


@functools.lru_cache(maxsize=64)
def _options_blob(options: Options) -> bytes:
    """A job's options as stored: the same few values for most jobs, so
    pickled once each."""
    return pickle.dumps(tuple(options))


def _payload(stored: Any) -> Any:
    """A result's payload as stored: bytes, or a `Failure` as a dict (the
    format of every version so far, so a journal moves between versions
    either way without a schema change)."""
    return Failure.from_dict(stored) if isinstance(stored, dict) else stored
