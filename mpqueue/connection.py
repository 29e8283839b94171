"""The connection every mpqueue message travels on: to and from the broker,
and between a worker and its children.

It is ``multiprocessing.connection.Connection`` with the same wire format (a
4-byte length, or -1 and an 8-byte one, then a pickle), plus one frame of
our own for large payloads, sent and received without the copies the
standard class makes of a large message:

* sending, the pickler writes to a list of pieces, and it hands over any
  other ``bytes`` of 64 KiB or more by reference rather than copying them
  into its buffer; the pieces go out in one ``writev``;
* a payload that travels as a ``pickle.PickleBuffer`` (an argument or result
  of `protocol.OUT_OF_BAND` bytes or more) is not pickled at all: protocol 5
  leaves it out of band, and the frame carries it after the pickle, written
  from the payload's own memory in the same ``writev``::

      -2 (4 bytes), the pickle's length (8), N (4), N lengths (8 each),
      the pickle, then the N buffers

* receiving, the pickle is read into one buffer of its exact size, and each
  out-of-band buffer into one of its own, preallocated, in one ``readv``;
  the message is unpickled around them, and each arrives as a
  ``PickleBuffer`` over its buffer, which the next hop sends out of band in
  turn. So a broker or a worker passing a payload on never copies,
  unpickles or pickles it: the kernel's copies are the only ones.

It ends (EOFError) on a message it cannot take: one over MAX_MESSAGE, one
whose header makes no sense, or one that does not unpickle. The stream is
out of step after any of them, so the connection closes; others are not
affected.

A receiver waits for a message in ``poll()``, not in ``read()``: a reader
blocked in ``read()`` on a Unix socket is also woken each time its peer
consumes what it sent (the kernel wakes the socket's writers without telling
them apart from readers), so every call would cost its caller a wakeup more,
about 50-100 us each on a small VM. ``poll()`` wakes for input only.

`TLSConnection` is the same over an ``ssl.SSLSocket``, and `tls_context` the
mutual-TLS configuration both ends use (`handshake` sets it up).
"""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import select
import socket
import ssl
import struct
from multiprocessing import connection
from typing import Callable

from .config import TLSFiles
from .errors import ConfigError

broker_log = logging.getLogger("mpqueue.broker")    # the broker's refusals, in its log

#: A message announcing more than this closes the connection (it is not
#: read): a bad length cannot make us allocate gigabytes.
MAX_MESSAGE = 1 << 30
_SHORT = struct.Struct("!i")
_LONG = struct.Struct("!iQ")
_BUFFERS = struct.Struct("!QI")     # after -2: the pickle's length, how many buffers follow it
_SIZE = struct.Struct("!Q")
_IOV_MAX = 512      # pieces per writev (the system's limit is at least 1024)
#: More out-of-band buffers than this in one message is a bad header (a
#: batch holds at most `protocol.BATCH_BYTES` of payloads of 64 KiB or more).
_MAX_BUFFERS = 1 << 16


#: How much memory it has freed a broker or worker keeps for the payloads to
#: come (`keep_freed_memory`): a few batches' worth (`protocol.BATCH_BYTES`).
KEEP_FREED = 64 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3     # glibc's mallopt() parameters
_MMAP_THRESHOLD_MAX = 32 << 20                      # the most glibc takes, on 64-bit


def keep_freed_memory() -> None:
    """Have glibc serve payload buffers from its heap, and keep up to
    `KEEP_FREED` bytes of what is freed instead of giving it back at once.

    For the broker and the worker, whose buffers come and go a megabyte at
    a time: a buffer in memory fresh from the kernel costs a page fault per
    4 KiB (256 per MiB, about 0.3 ms here: more than receiving into it), and
    glibc, left to itself, maps such buffers afresh each time and hands back
    all but 2 MiB of a freed heap's top. Not for a client or a job's process:
    that is the user's memory, and `--max-memory-per-child` counts it. The
    broker still trims its heap once a large backlog has drained
    (`Broker.release_memory`). Nothing is done where glibc is not.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
    mallopt(_M_TRIM_THRESHOLD, KEEP_FREED)


class BadMessage(EOFError):
    """A message this end cannot take (over MAX_MESSAGE, or not unpickling):
    the stream is out of step after it, so the connection is done. An
    EOFError, like the peer closing, for callers that need not tell them apart."""


class _Pieces(list):
    """A pickler's output, as the pieces it wrote (see the module docstring)."""

    write = list.append     # the C method itself: no Python call per piece


def _message(obj) -> list:
    """A message's pieces: its header, its pickle, then its out-of-band
    buffers as they are (see the module docstring)."""
    pieces = _Pieces()
    buffers: list[pickle.PickleBuffer] = []
    # buffers.append returns None: every PickleBuffer goes out of band.
    pickle.Pickler(pieces, 5, buffer_callback=buffers.append).dump(obj)
    size = sum(map(len, pieces))
    if buffers:
        raw = [buffer.raw() for buffer in buffers]
        header = _SHORT.pack(-2) + _BUFFERS.pack(size, len(raw)) + struct.pack(f"!{len(raw)}Q", *map(len, raw))
        return [header, *pieces, *raw]
    return [_SHORT.pack(size) if size <= 0x7fffffff else _LONG.pack(-1, size), *pieces]


def _advance(views: list[memoryview], sent: int) -> list[memoryview]:
    """What is left of ``views`` once ``sent`` bytes of them went."""
    while views and sent >= len(views[0]):
        sent -= len(views.pop(0))
    if sent:
        views[0] = views[0][sent:]
    return views


class Connection(connection.Connection):
    peer: str | None = None     # set by the broker, for its log
    host: str | None = None     # set by the broker: the peer's IP address, or "local"
    #: Whether one thread may send while another reads (`send_nowait` works).
    concurrent_send = True
    _poller = None
    # The stdlib class's own, which typeshed does not declare.
    _handle: int
    _check_closed: Callable[[], None]
    _check_readable: Callable[[], None]
    _check_writable: Callable[[], None]

    def send(self, obj) -> None:
        self._check_closed()
        self._check_writable()
        self._send_pieces(_message(obj))

    def send_nowait(self, obj) -> list[memoryview]:
        """Send as much of a message as the socket takes now, without
        blocking; return the rest, for `send_rest` (empty if all went)."""
        self._check_closed()
        views = [memoryview(p) for p in _message(obj)]
        sock = socket.socket(fileno=self._handle)
        try:
            sent = sock.sendmsg(views[:_IOV_MAX], [], socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        finally:
            sock.detach()
        return _advance(views, sent)

    def send_rest(self, views: list[memoryview]) -> None:
        self._send_pieces(views)

    def recv(self):
        self._check_closed()
        self._check_readable()
        self._poll(None)
        size, = _SHORT.unpack(self._read(_SHORT.size, first=True))
        sizes = ()
        if size == -1:
            size, = _SIZE.unpack(self._read(_SIZE.size))
        elif size == -2:
            size, count = _BUFFERS.unpack(self._read(_BUFFERS.size))
            if count <= _MAX_BUFFERS:
                sizes = struct.unpack(f"!{count}Q", self._read(_SIZE.size * count))
            else:
                size = -2
        if size < 0:
            why = "a message whose header makes no sense"
        elif size + sum(sizes) > MAX_MESSAGE:
            why = f"a message over {MAX_MESSAGE} bytes"
        else:
            try:
                message, *buffers = self._read_all((size, *sizes))
            except OSError as e:    # the peer went, mid-message: a payload cut short
                if self.peer is not None:
                    broker_log.warning("closed the connection from %s: %s", self.peer, e)
                raise
            try:
                return pickle.loads(message, buffers=map(pickle.PickleBuffer, buffers))
            except Exception as e:
                why = f"a message that does not unpickle ({type(e).__name__})"
        if self.peer is not None:
            broker_log.warning("closed the connection from %s: %s", self.peer, why)
        raise BadMessage(why)

    def _send_pieces(self, pieces: list) -> None:
        if len(pieces) <= _IOV_MAX:
            # Mostly all of it goes at once: views only for what did not.
            sent = os.writev(self._handle, pieces)
            if sent == sum(map(len, pieces)):
                return
        else:
            sent = 0
        views = _advance([memoryview(p) for p in pieces], sent)
        while views:
            views = _advance(views, os.writev(self._handle, views[:_IOV_MAX]))

    def _read(self, size: int, first: bool = False) -> bytearray:
        """Exactly ``size`` bytes. EOFError if the peer closed before the
        ``first`` bytes of a message, OSError if it did within one."""
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        while got < size:
            n = self._read_into([view[got:]])
            if not n:
                if first and got == 0:
                    raise EOFError
                raise OSError("got end of file during message")
            got += n
        return buf

    def _read_all(self, sizes: tuple[int, ...]) -> list[bytearray]:
        """Buffers of exactly ``sizes`` bytes, filled from the stream in turn
        (one ``readv`` when it holds them all). OSError if the peer closed
        before they were."""
        buffers = [bytearray(size) for size in sizes]
        views = [memoryview(b) for b in buffers if b]
        got = 0
        while views:
            n = self._read_into(views[:_IOV_MAX])
            if not n:
                raise OSError(f"the connection ended {got:,} bytes into a message of {sum(sizes):,}")
            got += n
            views = _advance(views, n)
        return buffers

    def _poll(self, timeout: float | None) -> bool:
        """Whether a message starts to arrive within ``timeout`` s (None:
        wait for one). A poll() object of our own, not the stdlib's selector
        made afresh at each call: `recv` waits here (see the module docstring)."""
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(self._handle, select.POLLIN)
        return bool(self._poller.poll(None if timeout is None else max(0.0, timeout) * 1000))

    def _read_into(self, views: list[memoryview]) -> int:
        return os.readv(self._handle, views)


class TLSConnection(Connection):
    """A `Connection` over an `ssl.SSLSocket`. The stdlib class reads and writes
    its file descriptor directly (os.read/os.write), which would bypass TLS.
    OpenSSL does not allow one thread to write an SSL object while another
    reads it: the broker sends on it only from the thread that reads it."""

    concurrent_send = False

    def __init__(self, sock: socket.socket):     # an ssl.SSLSocket
        super().__init__(sock.fileno())
        self._sock = sock

    def _close(self):
        self._sock.close()

    def _send_pieces(self, pieces):
        if sum(map(len, pieces)) <= 1 << 16:
            pieces = [b"".join(pieces)]     # one TLS record for a short message
        for piece in pieces:
            self._sock.sendall(piece)

    def _read_into(self, views):
        return self._sock.recv_into(views[0])

    def _poll(self, timeout):
        # Bytes TLS has decrypted already are not readable on the descriptor.
        return self._sock.pending() > 0 or super()._poll(timeout)


def tls_context(files: TLSFiles, server: bool) -> ssl.SSLContext:
    """Mutual TLS: present our certificate, and require the peer's, signed by the CA.

    Host names are not checked: every certificate the cluster's own CA signs
    is a member, at whatever address it is reached.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_cert_chain(files.cert, files.key)
        context.load_verify_locations(files.ca)
    except OSError as e:        # ssl.SSLError too
        raise ConfigError(f"cannot use the TLS files {files.cert}, {files.key}, {files.ca}: "
                          f"{e.strerror or e}") from None
    return context
