"""The broker's local socket: processes on its host reach it without TCP.

On Linux the broker also listens on a Unix socket with a random name in the
abstract namespace (`listen`). To a peer that connected from its own host (a
loopback address, or the address it was reached at), the handshake's "ok"
names it, with who holds it: ``"local": [name, pid, identity]``, the
identity being the kernel's boot id and the process's start time. The peer
makes its connections there instead (`connect`), with the same handshake: a
loopback TCP message costs several times what a Unix socket's does
(benchmarks/hops.py, on a small VM: 30-150 us of the sender's time in
send() against 4), and every job crosses four of them. The name is no
secret (/proc/net/unix lists it), and it is free again once the broker
exits: so before sending anything, the peer checks that the process holding
it (SO_PEERCRED) has the broker's pid and identity. Any doubt, and it stays
on TCP.
"""

from __future__ import annotations

import os
import secrets
import socket
import ssl
import struct
import sys

from .config import SETTINGS
from .connection import Connection
from .errors import MpqueueError
from .handshake import open_connection

_PEERCRED = struct.Struct("3i")    # SO_PEERCRED: pid, uid, gid


def listen() -> tuple[socket.socket, list] | tuple[None, None]:
    """The broker's local socket, listening, and its offer ``[name, pid,
    identity]``; (None, None) where there is none (not Linux, or turned off
    with MPQUEUE_LOCAL_SOCKET=0, or this process's identity is unknown)."""
    identity = process_identity(os.getpid())
    if not (SETTINGS.local_socket and sys.platform.startswith("linux") and identity is not None):
        return None, None
    name = "mpqueue-" + secrets.token_hex(16)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind("\0" + name)
    sock.listen(512)
    return sock, [name, os.getpid(), identity]


#: Brokers (by address) whose local socket this process reaches: (name, pid, identity).
_local_sockets: dict[tuple[str, int], tuple[str, int, str]] = {}
#: Local sockets found not to be what they should: not tried again.
_unreachable: set[str] = set()


def connect(address: tuple[str, int], authkey: bytes,
            tls: ssl.SSLContext | None = None) -> Connection:
    """Connect and run the handshake (TLS first, with ``tls``), within
    ``SETTINGS.connect_timeout``: over the broker's local socket if this
    process reaches it (see the module docstring), else over TCP. Raises
    mpqueue's errors for a refusal."""
    address = (address[0], address[1])     # a list, once it crossed a pickle
    local = _local_sockets.get(address)
    if local is not None:
        conn = _connect_local(local, address, authkey, tls)
        if conn is not None:
            return conn
        _local_sockets.pop(address, None)   # gone: the broker restarted, with a new name
    sock = socket.create_connection(address, timeout=SETTINGS.connect_timeout)
    conn, offered = open_connection(sock, address, authkey, tls)
    if offered is not None and offered[0] not in _unreachable:
        try:
            local_conn = _connect_local(offered, address, authkey, tls)
        except BaseException:
            conn.close()
            raise
        if local_conn is None:
            _unreachable.add(offered[0])
        else:
            _local_sockets[address] = offered
            conn.close()
            return local_conn
    return conn


def _connect_local(local: tuple[str, int, str], address: tuple[str, int], authkey: bytes,
                   tls: ssl.SSLContext | None) -> Connection | None:
    """A connection over the local socket ``local`` (name, pid, identity) of
    the broker at ``address``. None if it is not there (the broker is gone, or
    we are in another network namespace), or is not held by the broker (another
    process took the name, or we cannot tell: another pid namespace)."""
    name, pid, identity = local
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(SETTINGS.connect_timeout)
        sock.connect("\0" + name)
        holder = peer_pid(sock)
        if holder == pid and process_identity(holder) == identity:
            return open_connection(sock, address, authkey, tls)[0]
    except (OSError, EOFError, MpqueueError):
        pass    # it closed mid-handshake, say: gone, or going
    sock.close()
    return None


def peer_pid(sock: socket.socket) -> int:
    """The pid of the process at the other end of a Unix socket (Linux); 0
    if it is in a pid namespace we cannot see."""
    return _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))[0]


def process_identity(pid: int) -> str | None:
    """What tells a process apart from any other, on any host and at any time:
    the kernel's boot id and the process's start time. None if unknown."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # Field 22, counted after the command name (which may hold spaces and parentheses).
    return f"{boot}/{stat[stat.rindex(b')') + 2:].split()[19].decode()}"
