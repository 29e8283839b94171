"""The messages that cross processes, and the one place that calls cloudpickle.

::

    client ──submit(Submission…, functions)──▶ broker ──fetch()──▶ worker ──pipe──▶ child
    client ◀──collect(ack)── Delivery… ◀── broker ◀──report(Outcome…)── worker ◀──pipe── child

User data (functions, arguments, results, exceptions) is pickled with
cloudpickle by the client and the child, and travels as opaque ``bytes``
through the broker and the worker, which never unpickle it: a bad payload
cannot crash them, and user code need not be importable there. The message
tuples themselves hold only plain types and are pickled by the transport.
A payload of `OUT_OF_BAND` bytes or more travels as a ``pickle.PickleBuffer``
over the bytearray it was pickled into (`Payload`), which the transport
sends beside the message's pickle and receives into a bytearray of its own:
it is never copied into a pickle or out of one on the way (`connection`).
The hops each message makes, thread by thread: docs/internals.md.
"""

from __future__ import annotations

import enum
import hashlib
import io
import json
import linecache
import os
import pickle
import re
import signal
import socket
import sys
import traceback
import types
from typing import Any, Callable, NamedTuple, Union

import cloudpickle

from .errors import PayloadTooLarge, RemoteError, RemoteTraceback

PROTOCOL = pickle.HIGHEST_PROTOCOL

#: A message that carries several payloads (jobs submitted or leased, results
#: reported or collected) takes no more of them once it holds this many
#: bytes. With ``max_payload`` for one payload, that bounds every message
#: under `connection.MAX_MESSAGE`.
BATCH_BYTES = 8 << 20

#: A payload this large or larger travels out of band (`out_of_band`). Below
#: it, copying it into the message's pickle costs less than a buffer of its own.
OUT_OF_BAND = 64 << 10

#: A job's arguments, result or exception, pickled: ``bytes``, or from
#: `OUT_OF_BAND` bytes up a ``PickleBuffer`` over a writable buffer. Writable,
#: because pickle hands the receiver of a writable one the very PickleBuffer
#: the transport read it into, which the next hop sends out of band in turn;
#: a read-only one would arrive as a memoryview, which does not pickle.
Payload = Union[bytes, pickle.PickleBuffer]


class Kick(enum.Enum):
    """Which of a client's collect calls parked in the broker to answer at once
    (`Broker.collect`)."""
    WAITING = "waiting"     # the urgent ones: their result was settled elsewhere
    CLOSING = "closing"     # all of them: the client is closing


class Status(enum.IntEnum):
    OK = 0         #: payload: the pickled return value
    ERROR = 1      #: payload: `pack_exception` of what the function raised
    LOST = 2       #: payload: a `Failure`: the process (or worker) that died, and why
    SHUTDOWN = 3   #: payload: empty; the cluster shut down before the job ran
    TIMEOUT = 4    #: payload: a `Failure` naming the timeout; the worker killed the attempt
    CANCELLED = 5  #: payload: empty; withdrawn (never delivered: the client knows)


class Options(NamedTuple):
    """Per-job options, as plain values the broker and worker can read."""
    timeout: float | None = None    # seconds per attempt, once running
    retries: int = 0                # re-runs after an exception or a timeout
    retry_delay: float = 0.1        # first backoff; doubles per attempt, with jitter
    priority: int = 0               # higher runs first
    retry_on: bytes | None = None   # pickled tuple of exception types; None: all
    retry_timeouts: bool = True     # whether a timeout counts as retryable


class Submission(NamedTuple):
    """A job as the client sends it to the broker."""
    seq: int          # the client's own number for the job
    fn: bytes         # digest of the pickled function (sent alongside, once per batch)
    payload: Payload  # pickled (args, kwargs), or a pickled list of argument tuples
    chunked: bool     # payload is a chunk: call fn(*a) for each a, return the list
    options: Options


class Task(NamedTuple):
    """A job as the broker hands it to a worker, and the worker to a child."""
    id: int
    fn: bytes
    payload: Payload
    chunked: bool
    timeout: float | None
    retry_on: bytes | None
    attempt: int      # 1 for the first run


class Failure(NamedTuple):
    """Why an attempt failed for a reason of the system, not of the job's
    code: the payload of `Status.LOST` and `Status.TIMEOUT`.

    Each kind is built by one constructor below, and read in one place
    (``client._failure``, which turns it into `WorkerLost` or `JobTimeout`).
    A journal stores it as a dict (`as_dict`, `from_dict`): the format older
    versions wrote and read.
    """
    pid: int | None
    host: str
    exitcode: int | None = None
    signal: str | None = None       # "SIGKILL" for an exitcode of -9
    reason: str = ""                # LOST: what happened, as a clause
    timeout: float | None = None    # TIMEOUT: the limit it ran past
    attempt: int | None = None      # TIMEOUT: the attempt killed
    rss: int | None = None          # LOST for memory: the bytes of RSS seen
    limit: int | None = None        # LOST for memory: the worker's --max-memory-per-child

    @classmethod
    def died(cls, pid: int | None, exitcode: int | None) -> "Failure":
        """The process running the job died on its own (or was killed by another)."""
        return cls(pid, _host(), exitcode, signal_name(exitcode), "the process running the job died")

    @classmethod
    def unreadable(cls, pid: int | None, error: BaseException) -> "Failure":
        """The worker could not read the job's result off the pipe: the process goes."""
        return cls(pid, _host(), None, None, f"the worker could not read the job's result ({error})")

    @classmethod
    def too_big(cls, pid: int | None, rss: int, limit: int) -> "Failure":
        """The worker killed the process for growing past --max-memory-per-child."""
        return cls(pid, _host(), -9, "SIGKILL",
                   f"the process running the job grew to {rss >> 20} MiB, past the "
                   f"worker's --max-memory-per-child of {limit >> 20} MiB", rss=rss, limit=limit)

    @classmethod
    def timed_out(cls, pid: int | None, timeout: float, attempt: int) -> "Failure":
        """The worker killed the attempt at its timeout."""
        return cls(pid, _host(), timeout=timeout, attempt=attempt)

    @classmethod
    def worker_lost(cls, pid: int, host: str, worker_id: str) -> "Failure":
        """The broker lost the worker holding the job (its connection, or its heartbeats)."""
        return cls(pid, host, reason=f"worker {worker_id} was lost")

    def as_dict(self) -> dict:
        return self._asdict()

    @classmethod
    def from_dict(cls, info: dict) -> "Failure":
        """One stored as a dict, by this version or an older one (which had
        fewer keys: pid, host, exitcode, signal, reason or timeout)."""
        return cls(info.get("pid"), info.get("host", ""), info.get("exitcode"), info.get("signal"),
                   info.get("reason", ""), info.get("timeout"), info.get("attempt"), info.get("rss"),
                   info.get("limit"))


def signal_name(exitcode: int | None) -> str | None:
    """``SIGSEGV`` for an exit code of -11; None for a normal exit."""
    if exitcode is None or exitcode >= 0:
        return None
    try:
        return signal.Signals(-exitcode).name
    except ValueError:
        return f"signal {-exitcode}"


def _host() -> str:
    return os.uname().nodename


class Raised(NamedTuple):
    """What a job raised, as plain text: the broker keeps it in the job's
    history (`history`) without unpickling the exception."""
    type: str           # module-qualified: "builtins.ValueError"
    message: str
    traceback: str      # clipped to RAISED_TRACEBACK characters


#: The most of a traceback a `Raised` carries: its start and its end, which say the most.
RAISED_TRACEBACK = 8192


class Outcome(NamedTuple):
    """How one attempt at a task ended, as the worker reports it."""
    id: int
    status: Status
    payload: Any      # a Payload for OK and ERROR, a Failure for LOST and TIMEOUT
    retryable: bool = False   # ERROR: it matched retry_on; LOST: another attempt may help
    pid: int | None = None          # the child that ran it
    started: float | None = None    # when it started and ended there (the worker's wall clock)
    ended: float | None = None
    raised: Raised | None = None    # ERROR: what it raised, as text


class WorkerHello(NamedTuple):
    """A worker introducing itself to the broker (`Broker.register`)."""
    host: str
    pid: int
    procs: int
    versions: dict[str, str]        # "version" (mpqueue's), "python", "cloudpickle"
    broker_id: str | None = None    # the broker it was registered with, if any: rejoining
    running: tuple[int, ...] = ()   # rejoining: jobs its children run now
    finished: tuple[int, ...] = ()  # rejoining: jobs whose results it holds, not yet reported


class WorkerWelcome(NamedTuple):
    """The broker's answer to a `WorkerHello`."""
    heartbeat_interval: float       # report at least this often
    broker_id: str
    new: bool                       # not the broker named in the hello: the ids it held mean nothing
    unknown: list[int]              # running jobs this broker does not know: stop them
    max_payload: int                # the cluster's limit on a result (`too_large`)
    shm_probe: str = ""             # a file the broker made in its /dev/shm: seen here, large results go there


class ClientHello(NamedTuple):
    """A client introducing itself to the broker (`Broker.register`)."""
    pid: int
    version: str
    resume: bool = False            # reconnecting: if unknown, say so rather than start afresh
    pending: tuple[int, ...] = ()   # reconnecting: the job numbers it had sent and waits on


class ClientWelcome(NamedTuple):
    """The broker's answer to a `ClientHello`."""
    known: bool                     # the broker had this session
    missing: list[int] = []         # of the pending jobs, those it has neither queued nor finished
    max_payload: int = 0            # the cluster's limit on a job's function and arguments
    shm_probe: str = ""             # as `WorkerWelcome.shm_probe`, for large arguments


class Delivery(NamedTuple):
    """A finished job, as the broker hands it to its client."""
    seq: int
    status: Status
    payload: Any
    attempts: int


def out_of_band(pickled: bytes | bytearray) -> Payload:
    """A pickle as it goes into a message (`Payload`): a bytearray from
    `OUT_OF_BAND` bytes up, wrapped for the transport to send it out of band
    as it is; anything else as bytes."""
    if type(pickled) is bytearray and len(pickled) >= OUT_OF_BAND:
        return pickle.PickleBuffer(pickled)
    return bytes(pickled)


def payload_size(payload: Any) -> int:
    """How many bytes a payload holds (none, for a `Failure`)."""
    if type(payload) is bytes:
        return len(payload)
    return payload.raw().nbytes if type(payload) is pickle.PickleBuffer else 0


def batch_length(items: list, size: Callable[[Any], int]) -> int:
    """How many of ``items``, from the first, go in one message: they stop
    once they hold `BATCH_BYTES` (one at least)."""
    total = 0
    for n, item in enumerate(items):
        if total >= BATCH_BYTES:
            return n
        total += size(item)
    return len(items)


def too_large(what: str, size: int, limit: int) -> PayloadTooLarge | None:
    """The error for a payload of ``size`` bytes over ``limit``, or None.
    ``what`` says what pickles to that size ("the job's result pickles")."""
    if size <= limit:
        return None
    return PayloadTooLarge(
        f"{what} to {_mib(size)}, over the cluster's limit of {_mib(limit)} "
        "(max_payload): pass a file path or a shared store's key instead of the data",
        size=size, limit=limit)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


class _Pickler(cloudpickle.Pickler):
    """cloudpickle's, refusing what cannot work on another process of the
    cluster, and noting the modules of the functions, classes and modules it
    pickles (``modules``): what the other side must import (`shipping`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.modules: set[str] = set()

    def reducer_override(self, obj):
        if isinstance(obj, _NAMED):
            module = obj.__name__ if isinstance(obj, types.ModuleType) else getattr(obj, "__module__", None)
            if isinstance(module, str):
                self.modules.add(module)
        managers = sys.modules.get("multiprocessing.managers")     # no proxy without it
        if managers is not None and isinstance(obj, managers.BaseProxy):
            raise TypeError(
                f"a multiprocessing manager proxy ({type(obj).__name__}) does not work on the "
                "cluster: its manager serves one host, under a key the workers do not hold; send "
                "the values themselves, and gather what jobs return")
        return super().reducer_override(obj)


class Wrapper:
    """A callable that runs ``self.fn``. The client finds the source lines of a
    remote traceback through the job function's code and globals; these point
    it at the user's function rather than at the wrapper."""

    fn: Callable

    @property
    def __wrapped__(self) -> Callable:
        return self.fn

    @property
    def __code__(self):
        return getattr(self.fn, "__code__", None)

    @property
    def __globals__(self) -> dict:
        return getattr(self.fn, "__globals__", {})


_NAMED = (type, types.FunctionType, types.BuiltinFunctionType, types.ModuleType)


def dumps(obj: Any) -> bytes:
    return dumps_noting(obj)[0]


def dumps_noting(obj: Any) -> tuple[bytes, set[str]]:
    """The pickle, and the modules it names (see `_Pickler`)."""
    buffer = io.BytesIO()
    pickler = _Pickler(buffer, protocol=PROTOCOL)
    pickler.dump(obj)
    return buffer.getvalue(), pickler.modules


def dumps_payload(obj: Any) -> tuple[bytearray, set[str]]:
    """As `dumps_noting`, for a job's arguments or result: into a bytearray,
    which travels out of band as it is (`out_of_band`). It costs what a
    BytesIO does: the pickler writes its frames, and large ``bytes``, to it once."""
    buffer = bytearray()
    pickler = _Pickler(types.SimpleNamespace(write=buffer.extend), protocol=PROTOCOL)
    pickler.dump(obj)
    return buffer, pickler.modules


_FUNCTION_MAGIC = b"MPQF"


def wrap_function(header: dict, pickled: bytes) -> bytes:
    """A pickled function as it travels: behind a JSON header (`shipping.Header`)
    that the worker reads without unpickling anything of the user's."""
    text = json.dumps(header, sort_keys=True).encode()
    return _FUNCTION_MAGIC + len(text).to_bytes(4, "big") + text + pickled


def unwrap_function(blob: bytes) -> tuple[dict, bytes]:
    """``(header, pickled function)``; a bare pickle (from a journal an older
    version wrote) has an empty header."""
    if not blob.startswith(_FUNCTION_MAGIC):
        return {}, blob
    end = 8 + int.from_bytes(blob[4:8], "big")
    return json.loads(blob[8:end]), blob[end:]


class Warned(NamedTuple):
    """A job's result, and a warning for the client to give with it (a
    package version that differs, with ``on_mismatch="warn"``)."""
    value: Any
    warning: str


loads = pickle.loads


def digest(blob: bytes) -> bytes:
    return hashlib.blake2b(blob, digest_size=16).digest()


def where() -> str:
    return f"{socket.gethostname()} pid {os.getpid()}"


def pack_exception(exc: BaseException, attempt: int = 1) -> tuple[bytes, Raised]:
    """Pickle what a job raised, keeping its text even if the object won't
    pickle; and that text, for the broker (`Raised`)."""
    type_name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    try:
        message = str(exc)
    except Exception:
        message = "<str() of the exception failed>"
    try:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except Exception:
        tb = f"{type_name}: {message}\n(the traceback could not be formatted)\n"
    try:
        blob = dumps(exc)
        pickle.loads(blob)      # one that will not load here will not load there
    except Exception:
        blob = None
    if blob is not None and len(blob) > BATCH_BYTES:
        blob = None     # an exception holding a big payload: its text will do
    message, clipped = _clip(message), _clip(tb)
    return (pickle.dumps((blob, type_name, message, clipped, f"{where()}, attempt {attempt}"), protocol=PROTOCOL),
            Raised(type_name, message, _clip(tb, RAISED_TRACEBACK)))


def _clip(text: str, most: int = 1 << 16) -> str:
    """At most ``most`` characters of ``text``: its start and end, which say the most."""
    if len(text) <= most:
        return text
    half = most // 2
    return f"{text[:half]}\n... ({len(text) - most:,} characters left out) ...\n{text[-half:]}"


_DYNAMIC_FRAME = re.compile(r'^(  File )"<dynamic-code>", line (\d+), in (.+)$', re.MULTILINE)


def restore_sources(tb: str, find_file: Callable[[str], str | None]) -> str:
    """Put file names and source lines back into a remote traceback.

    cloudpickle (3.1 and later) names all code it sends by value
    ``<dynamic-code>``, so the worker cannot show the lines of a lambda or of
    a function from ``__main__``. ``find_file`` maps a frame's function name to
    the file it came from; the lines are read here, where that file is.
    """
    def restore(match: re.Match) -> str:
        filename = find_file(match.group(3))
        if filename is None:
            return match.group(0)
        line = linecache.getline(filename, int(match.group(2))).strip()
        frame = f'{match.group(1)}"{filename}", line {match.group(2)}, in {match.group(3)}'
        return f"{frame}\n    {line}" if line else frame
    return _DYNAMIC_FRAME.sub(restore, tb)


def unpack_exception(data: bytes, find_file: Callable[[str], str | None] | None = None) -> BaseException:
    """The job's exception, with the remote traceback chained as ``__cause__``.

    Falls back to `RemoteError` when the exception could not be pickled on the
    worker or cannot be rebuilt here (a class missing locally, an ``__init__``
    that does not accept its own ``args``).
    """
    blob, type_name, message, tb, host = pickle.loads(data)
    if find_file is not None:
        tb = restore_sources(tb, find_file)
    exc = None
    if blob is not None:
        try:
            exc = pickle.loads(blob)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        exc = RemoteError(type_name, message, tb)
    exc.__cause__ = RemoteTraceback(f'\n"""\nOn {host}:\n{tb}"""')
    return exc
