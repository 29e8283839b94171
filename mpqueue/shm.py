"""Large job arguments through shared memory, between processes of the broker's host.

A client on the broker's host writes an argument payload of `THRESHOLD`
bytes or more once, into a file under ``/dev/shm``, and sends its name in
its place (`reference`); the broker passes the name on, and a job's process
on that host reads the file in place (`load`). A worker on another host
cannot see the file: it asks the broker for the bytes (`Broker.payload`).
So the payload crosses no socket on one host, and the broker holds none of
it in memory.

Who removes a file: the broker, when it forgets the job (finished,
withdrawn, its client gone). A file no job of a live broker references and
whose writer has died is removed by any broker on the host when it sweeps
(`sweep`, at its start and then every few seconds): so nothing stays in
``/dev/shm`` after a ``kill -9`` of any process, once a broker runs on the
host (the one killed, started again, or another).
A broker with a journal copies the bytes into it (durability first), and
removes those files when it starts again from it. File names: ``mpqueue-SESSION-PID-N``,
SESSION the first 12 digits of the client's session, PID the writer's.
"""

from __future__ import annotations

import itertools
import mmap
import os
import pickle
from typing import Any, Iterable

#: Payloads this large or larger go through shared memory.
THRESHOLD = 1 << 20
DIRECTORY = "/dev/shm"
_PREFIX = b"MPQSHM1:"
_counter = itertools.count()


def available() -> bool:
    return os.path.isdir(DIRECTORY) and os.access(DIRECTORY, os.W_OK)


def write(data: bytes, session: str) -> bytes | None:
    """Store ``data`` for a job of the client ``session``: the reference to
    send instead, or None if it cannot be stored (no room: the caller sends
    the bytes themselves)."""
    path = os.path.join(DIRECTORY, f"mpqueue-{session[:12]}-{os.getpid()}-{next(_counter)}")
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


def path_of(payload: bytes) -> str | None:
    """The file a payload refers to, or None for a payload of bytes."""
    if not payload.startswith(_PREFIX):
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


def remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def sweep(referenced: Iterable[str]) -> int:
    """Remove the files on this host whose writer has died and that no job
    of this broker refers to. How many it removed. (A live writer's file may
    be on its way to a broker: it stays, until that writer is gone.)"""
    keep = set(referenced)
    removed = 0
    try:
        names = os.listdir(DIRECTORY)
    except OSError:
        return 0
    for name in names:
        parts = name.split("-")
        path = os.path.join(DIRECTORY, name)
        if len(parts) != 4 or parts[0] != "mpqueue" or not parts[2].isdigit() or path in keep:
            continue
        if not _alive(int(parts[2])):
            remove(path)
            removed += 1
    return removed


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
