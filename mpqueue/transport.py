"""How processes reach the broker: ``multiprocessing.managers`` over TCP.

The broker serves two objects with the standard library's manager `Server`:
the `Broker` (all queue state) and the cluster's shutdown `threading.Event`.
Workers, clients and commands talk to them through `BaseProxy` subclasses.

Three departures from a plain ``BaseManager``, and why:

* Our own Listener/Client pair is registered under the serializer name
  ``"mpqueue"``, so every socket gets ``TCP_NODELAY`` (without it the first
  request on a new connection stalls ~40 ms on Nagle's algorithm) and
  keepalive, and so that our handshake replaces multiprocessing's.
* The handshake: multiprocessing's is HMAC-MD5 on 3.10 and 3.11 (and 3.12+
  still accept it), and says nothing of versions. Ours is a mutual
  HMAC-SHA256 challenge-response over fresh nonces that also carries the
  versions pickles depend on, inside mutual TLS if configured. The broker
  runs it in the connection's own thread, and both ends within
  ``SETTINGS.connect_timeout``: a silent peer holds up no one. Each message
  is a 4-byte length and JSON (nothing is unpickled before it succeeds)::

      peer                                         broker
      [TLS handshake: each checks the other's certificate against the CA]
                                 <- {"nonce": Nb}       sent at once
      {"hello": "mpqueue", "mpqueue": "0.1.0", "python": "3.11",
       "cloudpickle": "3.1.3", "nonce": Np} ->
      {"proof": HMAC(key, "mpqueue client" hello challenge)} ->
           <- {"ok": true, "proof": HMAC(key, "mpqueue broker" hello challenge)}
              or {"refused": "authkey"}, {"refused": "version", its versions}

  (hello and challenge: the exact bytes of those two messages.) Without
  TLS, a peer sends its hello at once too; a TLS broker answers a plain one
  with {"refused": "tls"}.
* Both objects are published under fixed ids. A process reaches them with one
  authenticated connection per thread: no ``create``/``incref`` round trips,
  and no ``decref`` finalizer that would dial a possibly dead broker at exit.

The server runs in the broker's own process (no ``BaseManager.start()``), so
nothing it serves needs to be picklable under spawn or forkserver.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import io
import json
import logging
import secrets
import socket
import ssl
import struct
import sys
import threading
import time
from multiprocessing import connection, managers, util

import cloudpickle

from . import __version__
from .config import SETTINGS, TLSFiles, format_address, resolve_tls
from .errors import AuthenticationError, BrokerUnavailable, ConfigError, MpqueueError, VersionMismatch

log = logging.getLogger("mpqueue")
broker_log = logging.getLogger("mpqueue.broker")    # the broker's refusals, in its log

SERIALIZER = "mpqueue"
BROKER_ID = "broker"
EVENT_ID = "shutdown_event"

BROKER_METHODS = ("register", "unregister", "fetch", "report", "release", "control",
                  "submit", "cancel", "collect", "goodbye", "status")
EVENT_METHODS = ("is_set", "set", "wait")


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


#: A handshake message: a 4-byte big-endian length, then that many bytes of
#: UTF-8 JSON, at most _MAX_FRAME. Nothing is unpickled before the handshake.
_FRAME = struct.Struct("!i")
_MAX_FRAME = 1024
_TLS_RECORD = b"\x16"       # the first byte a TLS client sends (a handshake record)
#: After the handshake, a message announcing more than this closes the
#: connection (it is not read): a bad length cannot make us allocate gigabytes.
MAX_MESSAGE = 1 << 30

#: What a process tells the broker about itself when it connects. Pickles made
#: with one Python minor version or cloudpickle major version may not load
#: under another, so the broker refuses those mismatches; mpqueue's own
#: version is for the messages only.
VERSIONS = {"mpqueue": __version__, "python": "%d.%d" % sys.version_info[:2],
            "cloudpickle": cloudpickle.__version__}


class _Refused(Exception):
    """A connection failed the handshake; the text says why, for the broker's log."""


def _describe(versions: dict) -> str:
    return (f"Python {versions['python']}, cloudpickle {versions['cloudpickle']}, "
            f"mpqueue {versions['mpqueue']}")


def _compatible(versions: dict) -> bool:
    return (versions["python"] == VERSIONS["python"]
            and versions["cloudpickle"].split(".")[0] == VERSIONS["cloudpickle"].split(".")[0])


def _proof(authkey: bytes, side: bytes, hello: bytes, challenge: bytes) -> str:
    """HMAC-SHA256 over both nonces (in the two messages) and which side proves:
    one side's proof is never valid as the other's."""
    return hmac.new(authkey, b"mpqueue " + side + b"\0" + hello + b"\0" + challenge,
                    hashlib.sha256).hexdigest()


def _timeout(sock: socket.socket, deadline: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    sock.settimeout(left)


def _peek(sock: socket.socket, deadline: float) -> bytes:
    """The first byte the peer sent, left unread."""
    _timeout(sock, deadline)
    first = sock.recv(1, socket.MSG_PEEK)
    if not first:
        raise EOFError
    return first


def _send_frame(sock: socket.socket, message: dict) -> bytes:
    data = json.dumps(message).encode()
    sock.sendall(_FRAME.pack(len(data)) + data)
    return data


def _recv_frame(sock: socket.socket, deadline: float) -> tuple[bytes, dict]:
    """One handshake message, as its bytes (what the proofs cover) and its object."""
    def exactly(n):
        data = b""
        while len(data) < n:
            _timeout(sock, deadline)
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data
    size, = _FRAME.unpack(exactly(_FRAME.size))
    if not 0 < size <= _MAX_FRAME:
        raise _Refused("not an mpqueue handshake")
    data = exactly(size)
    try:
        message = json.loads(data)
    except ValueError:
        message = None
    if not isinstance(message, dict):
        raise _Refused("not an mpqueue handshake")
    return data, message


def _accept(sock: socket.socket, authkey: bytes, tls: ssl.SSLContext | None) -> connection.Connection:
    """The broker's side of a new connection's handshake, within SETTINGS.connect_timeout.

    With ``tls``, a TLS handshake first (which checks the peer's certificate).
    Then we send our nonce at once, without waiting: a legacy multiprocessing
    client (HMAC-MD5) expects its own challenge format and gives up on ours.
    Raises `_Refused` with the reason, having closed the socket.
    """
    deadline = time.monotonic() + SETTINGS.connect_timeout
    try:
        _tune(sock)
        if tls is not None:
            if _peek(sock, deadline) != _TLS_RECORD:
                # Read its hello first: closing on unread data would reset the
                # connection, and it might not see our answer.
                sock.recv(_MAX_FRAME + _FRAME.size)
                _send_frame(sock, {"refused": "tls"})
                raise _Refused("it does not use TLS, and this broker requires it")
            _timeout(sock, deadline)
            sock = tls.wrap_socket(sock, server_side=True)     # bounded by that timeout
        challenge = _send_frame(sock, {"nonce": secrets.token_hex(32)})
        if tls is None and _peek(sock, deadline) == _TLS_RECORD:
            raise _Refused("it uses TLS, and this broker does not (see --tls-cert)")
        hello, theirs = _recv_frame(sock, deadline)
        if theirs.get("hello") != "mpqueue":
            raise _Refused("not an mpqueue handshake")
        _, answer = _recv_frame(sock, deadline)
        if not hmac.compare_digest(str(answer.get("proof")).encode(),
                                   _proof(authkey, b"client", hello, challenge).encode()):
            _send_frame(sock, {"refused": "authkey"})
            raise _Refused("wrong authkey")
        theirs = {name: str(theirs.get(name)) for name in VERSIONS}
        if not _compatible(theirs):
            _send_frame(sock, {"refused": "version", **VERSIONS})
            raise _Refused(f"version mismatch: it runs {_describe(theirs)}; "
                           f"this broker runs {_describe(VERSIONS)}")
        _send_frame(sock, {"ok": True, "proof": _proof(authkey, b"broker", hello, challenge)})
        sock.settimeout(None)
        return _TLSConnection(sock) if tls is not None else _Connection(sock.detach())
    except BaseException as e:
        sock.close()
        if isinstance(e, TimeoutError):
            raise _Refused(f"no handshake within {SETTINGS.connect_timeout:g} s") from None
        if isinstance(e, ssl.SSLError):
            reason = getattr(e, "verify_message", None) or e.reason or e
            raise _Refused(f"TLS handshake failed ({reason})") from None
        if isinstance(e, (EOFError, ConnectionError)):
            raise _Refused("it closed the connection during the handshake") from None
        if isinstance(e, OSError):
            raise _Refused(f"handshake failed ({e.strerror or e})") from None
        raise


def Client(address: tuple[str, int], authkey: bytes,
           tls: ssl.SSLContext | None = None) -> connection.Connection:
    """Connect and run the handshake (TLS first, with ``tls``), within
    ``SETTINGS.connect_timeout``. Raises mpqueue's errors for a refusal."""
    where = format_address(address)
    deadline = time.monotonic() + SETTINGS.connect_timeout
    sock = socket.create_connection(address, timeout=SETTINGS.connect_timeout)
    try:
        _tune(sock)
        mine = {"hello": "mpqueue", **VERSIONS, "nonce": secrets.token_hex(32)}
        if tls is None:
            hello = _send_frame(sock, mine)     # at once: a TLS broker answers it with a refusal
            challenge, message = _recv_frame(sock, deadline)
            if message.get("refused") == "tls":
                raise ConfigError(
                    f"the broker at {where} requires TLS: give this process the cluster's "
                    "certificates (--tls-cert, --tls-key, --tls-ca, or MPQUEUE_TLS_CERT, _KEY, _CA)")
        else:
            _timeout(sock, deadline)
            sock = tls.wrap_socket(sock, server_hostname=address[0])
            # Read first: with TLS 1.3 the broker checks our certificate after
            # our handshake returns, and its refusal arrives here.
            challenge, _ = _recv_frame(sock, deadline)
            hello = _send_frame(sock, mine)
        _send_frame(sock, {"proof": _proof(authkey, b"client", hello, challenge)})
        _, verdict = _recv_frame(sock, deadline)
        if verdict.get("refused") == "authkey":
            raise AuthenticationError(
                f"authentication with the broker at {where} failed: this process and the broker "
                "hold different authkeys (check MPQUEUE_AUTHKEY)")
        if verdict.get("refused") == "version":
            theirs = {name: str(verdict.get(name)) for name in VERSIONS}
            raise VersionMismatch(
                f"the broker at {where} runs {_describe(theirs)}, and this process runs "
                f"{_describe(VERSIONS)}: pickles do not cross Python minor versions or cloudpickle "
                "major versions; install the same ones on every host")
        if not hmac.compare_digest(str(verdict.get("proof")).encode(),
                                   _proof(authkey, b"broker", hello, challenge).encode()):
            raise AuthenticationError(f"the process at {where} could not prove it holds the "
                                      "authkey: it is not the broker you meant")
        sock.settimeout(None)
        return _TLSConnection(sock) if tls is not None else _Connection(sock.detach())
    except BaseException as e:
        sock.close()
        # A TLS refusal, not a broker closing mid-handshake (which may be busy, or restarting).
        if isinstance(e, ssl.SSLError) and not isinstance(e, ssl.SSLEOFError):
            raise AuthenticationError(
                f"TLS with the broker at {where} failed ({e.reason or e}): both ends need TLS, "
                "with certificates signed by the same CA") from None
        if isinstance(e, _Refused):
            raise BrokerUnavailable(f"the process at {where} is not an mpqueue broker") from None
        raise


class Listener:
    """Accepts TCP connections for the manager server and hands over the raw
    socket: the handshake runs in the connection's own thread (`BrokerServer.
    handle_request`), so a peer that says nothing holds up no one else."""

    def __init__(self, address: tuple[str, int], backlog: int = 16):
        # The stdlib server asks for a small backlog; fifty workers starting at
        # once would see refused connections.
        self._socket = socket.create_server(address, backlog=max(backlog, 512))
        self.address = self._socket.getsockname()[:2]

    def accept(self) -> socket.socket:
        return self._socket.accept()[0]

    def close(self) -> None:
        self._socket.close()


managers.listener_client[SERIALIZER] = (Listener, Client)


class _Connection(connection.Connection):
    """A `Connection` that ends (EOFError) on a message it cannot take: one over
    MAX_MESSAGE, or one that does not unpickle. The stream is out of step after
    either, so the connection closes; others are not affected."""

    peer: str | None = None     # set by the broker, for its log

    def recv(self):
        self._check_closed()
        self._check_readable()
        buf = self._recv_bytes(MAX_MESSAGE)
        if buf is None:
            why = f"a message over {MAX_MESSAGE} bytes"
        else:
            try:
                return connection._ForkingPickler.loads(buf.getbuffer())
            except Exception as e:
                why = f"a message that does not unpickle ({type(e).__name__})"
        if self.peer is not None:
            broker_log.warning("closed the connection from %s: %s", self.peer, why)
        raise EOFError(why)


class _TLSConnection(_Connection):
    """A `Connection` over an `ssl.SSLSocket`. The stdlib class reads and writes
    its file descriptor directly (os.read/os.write), which would bypass TLS."""

    def __init__(self, sock: ssl.SSLSocket):
        super().__init__(sock.fileno())
        self._sock = sock

    def _close(self):
        self._sock.close()

    def _send(self, buf):
        self._sock.sendall(buf)

    def _recv(self, size):
        buf = io.BytesIO()
        remaining = size
        while remaining > 0:
            chunk = self._sock.recv(min(remaining, 1 << 18))
            if not chunk:
                if remaining == size:
                    raise EOFError
                raise OSError("got end of file during message")
            buf.write(chunk)
            remaining -= len(chunk)
        return buf

    def _poll(self, timeout):
        # Bytes TLS has decrypted already are not readable on the descriptor.
        return self._sock.pending() > 0 or bool(connection.wait([self], timeout))


def _tls_context(files: TLSFiles, server: bool) -> ssl.SSLContext:
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


class BrokerServer(managers.Server):
    """The manager server, publishing the broker and its shutdown event."""

    def __init__(self, broker, address: tuple[str, int], authkey: bytes):
        files = resolve_tls()
        self.tls = None if files is None else _tls_context(files, server=True)
        super().__init__({}, address, authkey, SERIALIZER)
        self.broker = broker
        self.id_to_obj[BROKER_ID] = (broker, BROKER_METHODS, None)
        self.id_to_obj[EVENT_ID] = (broker.shutdown_event, EVENT_METHODS, None)
        # serve_client() loops until this is set; we never set it: the process
        # exits when the broker is done.
        self.stop_event = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self.accepter, name="accepter", daemon=True).start()

    def handle_request(self, sock: socket.socket) -> None:
        """A new connection, in its own thread: our handshake, then its one request.

        This replaces the stdlib method (whose body 3.12 moved to
        ``_handle_request``), which runs multiprocessing's own challenge:
        HMAC-MD5 on 3.11, still accepted by 3.12+. The one request our proxies
        make on a new connection is ``accept_connection``, which serves the
        connection until it closes.
        """
        try:
            peer = format_address(sock.getpeername())
        except OSError:         # gone already
            sock.close()
            return
        try:
            conn = _accept(sock, self.authkey, self.tls)
        except _Refused as e:
            broker_log.warning("refused a connection from %s: %s", peer, e)
            return
        conn.peer = peer
        try:
            _, funcname, args, kwds = conn.recv()
            if funcname != "accept_connection":
                raise ValueError(f"it asked for {funcname!r}")
            self.accept_connection(conn, *args, **kwds)
        except (SystemExit, EOFError):  # serve_client() exits when its connection ends
            pass
        except Exception as e:
            broker_log.warning("closed the connection from %s: %s", peer, e)
        finally:
            conn.close()

    def serve_client(self, conn):
        sock = socket.socket(fileno=conn.fileno())
        try:
            peer = sock.getpeername()[0]
        except OSError:
            peer = None     # already gone; serving it will end at once
        finally:
            sock.detach()
        self.broker.connection_opened(peer)
        try:
            super().serve_client(conn)
        finally:
            self.broker.connection_closed()


class _Proxy(managers.BaseProxy):
    """Turns transport failures into mpqueue's own errors."""

    def _callmethod(self, methodname, args=(), kwds={}):
        try:
            return super()._callmethod(methodname, args, kwds)
        except (KeyboardInterrupt, SystemExit):
            self._drop_connection()     # a call cut short leaves it mid-message
            raise
        except MpqueueError:
            raise       # a refusal in our handshake (Client): it says what is wrong
        except (OSError, EOFError) as e:
            self._drop_connection()
            reason = (e.strerror if isinstance(e, OSError) and e.strerror
                      else "the connection closed" if isinstance(e, EOFError) else type(e).__name__)
            raise BrokerUnavailable(
                f"cannot reach the broker at {format_address(self._token.address)}: {reason}") from None

    def _drop_connection(self):
        conn = getattr(self._tls, "connection", None)
        if conn is not None:
            del self._tls.connection
            conn.close()

    def close(self) -> None:
        """Close this thread's connection to the broker."""
        self._drop_connection()


def _proxy_type(name: str, methods: tuple[str, ...]) -> type:
    def method(methodname):
        def call(self, *args):
            return self._callmethod(methodname, args)
        call.__name__ = methodname
        return call
    namespace = {m: method(m) for m in methods}
    namespace["_exposed_"] = methods
    return type(name, (_Proxy,), namespace)


BrokerProxy = _proxy_type("BrokerProxy", BROKER_METHODS)
EventProxy = _proxy_type("EventProxy", EVENT_METHODS)


def connect(address: tuple[str, int], authkey: bytes):
    """Proxies for the broker and the shutdown event at ``address``.

    Connections are made lazily, one per thread, on first use, with TLS if
    ``$MPQUEUE_TLS_*`` say so (`resolve_tls`).
    """
    files = resolve_tls()
    tls = None if files is None else _tls_context(files, server=False)

    def proxy(cls, ident):
        token = managers.Token(cls.__name__, tuple(address), ident)
        p = cls(token, SERIALIZER, authkey=authkey, incref=False)
        p._Client = functools.partial(Client, tls=tls)
        # BaseProxy shares one connection per thread among all proxies to an
        # address; ours each need their own, or two clients in one thread
        # would speak for each other's session.
        p._tls = util.ForkAwareLocal()
        return p
    return proxy(BrokerProxy, BROKER_ID), proxy(EventProxy, EVENT_ID)


def reach_broker(address: tuple[str, int], first_call, wait: float = SETTINGS.broker_wait,
                 abandoned: threading.Event | None = None):
    """Make ``first_call()`` succeed, retrying with backoff while the broker is not up."""
    deadline = time.monotonic() + wait
    delay = 0.05
    said = abandoned is not None    # a reconnect has said so already
    while True:
        try:
            return first_call()
        except AuthenticationError:
            raise
        except BrokerUnavailable as e:
            if time.monotonic() + delay > deadline or (abandoned is not None and abandoned.is_set()):
                raise BrokerUnavailable(
                    f"no broker at {format_address(address)} after {wait:.0f} s ({e})") from None
            if not said:
                log.info("waiting for the broker at %s (up to %.0f s)...", format_address(address), wait)
                said = True
            if abandoned is not None:
                abandoned.wait(delay)
            else:
                time.sleep(delay)
            delay = min(delay * 2, 1.0)


class Reconnecting:
    """Calls to the broker that outlive it going away, for all threads of a process.

    A call that fails because the broker is unreachable waits for the process
    to reconnect, then is made again: so every call made through `call` must
    be safe to repeat (the broker makes them so: a batch of jobs sent again is
    not queued twice, a result reported twice counts once). One thread
    reconnects: it retries with backoff for up to ``timeout`` seconds, then
    calls ``rejoin()`` (which registers again) before the others go on. If
    that fails, every caller gets the same error from then on.
    """

    def __init__(self, address: tuple[str, int], rejoin, timeout: float):
        self.address = address
        self._rejoin = rejoin
        self._timeout = timeout
        self._cond = threading.Condition()
        self._generation = 0
        self._busy = False
        self._failure: BaseException | None = None
        self._abandoned = threading.Event()

    def call(self, method, *args):
        while True:
            with self._cond:
                if self._failure is not None:
                    raise self._failure
                seen = self._generation
            try:
                return method(*args)
            except AuthenticationError:
                raise
            except BrokerUnavailable as e:
                self._recover(seen, e)

    def abandon(self) -> None:
        """Stop reconnecting (a cold stop): waiting callers get BrokerUnavailable."""
        self._abandoned.set()

    def _recover(self, seen: int, error: BrokerUnavailable) -> None:
        with self._cond:
            while True:
                if self._failure is not None:
                    raise self._failure
                if self._generation != seen:
                    return      # another thread reconnected meanwhile
                if not self._busy:
                    self._busy = True
                    break
                self._cond.wait()
        where = format_address(self.address)
        failure = None
        try:
            if self._abandoned.is_set():
                raise BrokerUnavailable(f"lost the broker at {where} ({error}) while stopping")
            log.warning("%s; reconnecting for up to %.0f s", error, self._timeout)
            reach_broker(self.address, self._rejoin, self._timeout, self._abandoned)
            log.info("reconnected to the broker at %s", where)
        except AuthenticationError as e:
            failure = e
            raise
        except BrokerUnavailable as e:
            failure = BrokerUnavailable(f"lost the broker at {where} and could not reconnect "
                                        f"within {self._timeout:.0f} s ({error})")
            raise failure from e
        except Exception as e:      # rejoin refused: nothing to go back to
            failure = e
            raise
        finally:
            with self._cond:
                self._busy = False
                self._failure = failure
                self._generation += failure is None
                self._cond.notify_all()
