"""Large payloads through shared memory, between processes of the broker's host.

A client on the broker's host writes a job's arguments of `THRESHOLD` bytes
or more once, into a file under ``/dev/shm``, and sends its name in their
place (`write`); the broker passes the name on, and the job's process on
that host reads the file in place (`load`). A large result goes back the
same way, written by the job's process when its worker is on the broker's
host. A process that cannot see the file (on another host) asks the broker
for the bytes (`Broker.payload`). So a payload crosses no socket on one
host, and the broker holds none of it in memory.

Who removes a file: the broker, when nobody needs it any more (the job
forgotten: finished, withdrawn, its client gone; the result acknowledged,
expired, or without a client). A file whose owner (the process that holds
the reference until the broker has it) has died, and that no job or result
of its broker refers to, is removed by that broker when it sweeps (`sweep`,
at its start and then every few seconds), or by any broker on the host once
its own broker has died too: so nothing stays in ``/dev/shm`` after a
``kill -9`` of any process, once a broker runs on the host, and no broker
removes a file another live broker may still hand on (two brokers on one
host: the result of a worker that has left, waiting for its client). A
broker with a journal copies the bytes into it (durability first), and
removes those files when it starts again from it.

File names: ``mpqueue-NAME-TOKEN-BROKER-OWNER-WRITER.N``: NAME the first
12 characters of the client's session or the worker's id, TOKEN and BROKER
the random token and pid of the broker's probe file
(``mpqueue-TOKEN-BROKER-BROKER.probe``: `tag`), then the owner's and the
writer's pids.
"""
from __future__ import annotations

import itertools
import mmap
import os
import pickle
import secrets
from typing import Any, Iterable

#: Payloads this large or larger go through shared memory.
THRESHOLD = 1 << 20
DIRECTORY = "/dev/shm"
_PREFIX = b"MPQSHM1:"
_counter = itertools.count()


def available() -> bool:
    return os.path.isdir(DIRECTORY) and os.access(DIRECTORY, os.W_OK)


def tag(name: str, probe_path: str) -> str:
    """What `write` names files with: whose they are (a client's session, a
    worker's id) and which broker's (the one whose `probe` this is: its
    random token, and its pid)."""
    _, broker, token = _parse(os.path.basename(probe_path)) or (0, 0, "0")
    return f"{name[:12]}-{token}-{broker}"


def write(data: bytes | bytearray, tag: str, owner: int | None = None) -> bytes | None:
    """Store ``data``: the reference to send instead, or None if it cannot be
    stored (no room: the caller sends the bytes themselves). ``tag`` is from
    `tag`; ``owner`` is the process that holds the reference until a broker
    has it (the writer by default; a job's process writes for its worker)."""
    owner = os.getpid() if owner is None else owner
    path = os.path.join(DIRECTORY, f"mpqueue-{tag}-{owner}-{os.getpid()}.{next(_counter)}")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError:         # /dev/shm full
        remove(path)
        return None
    return _PREFIX + path.encode()


def probe() -> str:
    """A file in this host's /dev/shm, made by a broker: a client or worker
    that sees it shares that /dev/shm (not only the host: a container may
    have one of its own), and may leave payloads there. Empty if there is
    no /dev/shm to use."""
    if not available():
        return ""
    path = os.path.join(DIRECTORY, f"mpqueue-{secrets.token_hex(6)}-{os.getpid()}-{os.getpid()}.probe")
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError:
        return ""
    return path


def shares(probe_path: str) -> bool:
    """Whether this process sees the broker's /dev/shm (`probe`)."""
    return bool(probe_path) and os.path.exists(probe_path)


def path_of(payload: Any) -> str | None:
    """The file a payload refers to, or None for a payload of bytes (a
    reference is short ``bytes``: never a `protocol.Payload` out of band)."""
    if type(payload) is not bytes or not payload.startswith(_PREFIX):
        return None
    return payload[len(_PREFIX):].decode()


def load(path: str) -> Any:
    """Unpickle a payload from its file, read in place."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise FileNotFoundError(f"the job's arguments in {path} are gone (removed by the broker: the job "
                                "was withdrawn, or its broker restarted)") from None
    try:
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mm:
            return pickle.loads(mm)
    finally:
        os.close(fd)


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def mapped(path: str) -> pickle.PickleBuffer:
    """A payload file's bytes, mapped rather than read: a `protocol.Payload`
    the transport sends straight from the page cache. Mapped copy-on-write,
    which copies nothing unless written, because a Payload is writable.
    ValueError if the file is empty."""
    with open(path, "rb") as f:
        return pickle.PickleBuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY))


def remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def orphans(probe_path: str) -> list[str]:
    """The payload files on this host whose owner has died, and that are the
    broker's whose `probe` this is, or a dead broker's: candidates for
    removal, unless one of the broker's jobs or results still refers to one
    (`sweep`). A live owner's file may be on its way to a broker, and another
    live broker's may be what it still hands on (two private clusters in one
    process have the same pid, not the same token): they stay."""
    mine = _parse(os.path.basename(probe_path))
    try:
        names = os.listdir(DIRECTORY)
    except OSError:
        return []
    return [os.path.join(DIRECTORY, name) for name in names
            if (found := _parse(name)) is not None and not _alive(found[0])
            and ((mine is not None and found[2] == mine[2]) or not _alive(found[1]))]


def is_payload_file(path: str) -> bool:
    """Whether ``path`` names a payload file (`write`, `probe`): what a
    broker agrees to read for a process that cannot (`Broker.payload`)."""
    return os.path.dirname(path) == DIRECTORY and _parse(os.path.basename(path)) is not None


def _parse(name: str) -> tuple[int, int, str] | None:
    """(owner pid, broker pid, broker token) of a payload or probe file by
    its name, None for another file."""
    parts = name.split("-")
    if parts[0] != "mpqueue":
        return None
    if (len(parts) == 6 and parts[2].isalnum() and all(p.isdigit() for p in parts[3:5])
            and parts[5].partition(".")[0].isdigit()):
        return int(parts[4]), int(parts[3]), parts[2]
    if len(parts) == 4 and parts[1].isalnum() and parts[2].isdigit() and parts[3] == f"{parts[2]}.probe":
        return int(parts[2]), int(parts[2]), parts[1]
    return None


def sweep(candidates: Iterable[str], referenced: Iterable[str]) -> int:
    """Remove the `orphans` that no job or result refers to; how many."""
    keep = set(referenced)
    gone = [path for path in candidates if path not in keep]
    for path in gone:
        remove(path)
    return len(gone)


def _alive(pid: int) -> bool:
    """Whether a process runs (a zombie does not: it only waits to be reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except (OSError, IndexError):
        return True
