"""How processes reach the broker: ``multiprocessing.managers`` over TCP.

The broker serves two objects with the standard library's manager `Server`:
the `Broker` (all queue state) and the cluster's shutdown `threading.Event`.
Workers, clients and commands talk to them through `BaseProxy` subclasses.

Two departures from a plain ``BaseManager``, and why:

* Our own Listener/Client pair is registered under the serializer name
  ``"mpqueue"``, so every socket gets ``TCP_NODELAY`` (without it the first
  request on a new connection stalls ~40 ms on Nagle's algorithm), keepalive,
  and a bounded connect and authentication handshake (a silent peer cannot
  hold a server thread or a caller forever).
* Both objects are published under fixed ids. A process reaches them with one
  authenticated connection per thread: no ``create``/``incref`` round trips,
  and no ``decref`` finalizer that would dial a possibly dead broker at exit.

The server runs in the broker's own process (no ``BaseManager.start()``), so
nothing it serves needs to be picklable under spawn or forkserver.
"""

from __future__ import annotations

import multiprocessing
import socket
import struct
import threading
from multiprocessing import connection, managers, util

from .config import SETTINGS, format_address
from .errors import AuthenticationError, BrokerUnavailable

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


def _recv_timeout(conn: connection.Connection, seconds: float) -> None:
    """Bound (or, with 0, unbound) blocking reads on a connection's socket.

    `Connection` reads its file descriptor directly, so a Python-level socket
    timeout would not apply; ``SO_RCVTIMEO`` does.
    """
    sock = socket.socket(fileno=conn.fileno())
    try:
        sec = int(seconds)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                        struct.pack("ll", sec, int((seconds - sec) * 1e6)))
    finally:
        sock.detach()


class Listener(connection.Listener):
    def __init__(self, address, backlog=16):
        # The stdlib server asks for a backlog of 16; fifty workers starting at
        # once would see refused connections.
        super().__init__(address, family="AF_INET", backlog=max(backlog, 512))

    def accept(self):
        conn = super().accept()
        sock = socket.socket(fileno=conn.fileno())
        try:
            _tune(sock)
        finally:
            sock.detach()
        # The server authenticates in this connection's own thread; bound it.
        _recv_timeout(conn, SETTINGS.connect_timeout)
        return conn


def Client(address, authkey=None):
    """Connect and authenticate, within ``SETTINGS.connect_timeout``."""
    sock = socket.create_connection(address, timeout=SETTINGS.connect_timeout)
    sock.settimeout(None)
    _tune(sock)
    conn = connection.Connection(sock.detach())
    try:
        _recv_timeout(conn, SETTINGS.connect_timeout)
        if authkey is not None:
            connection.answer_challenge(conn, authkey)
            connection.deliver_challenge(conn, authkey)
        _recv_timeout(conn, 0)
    except BaseException:
        conn.close()
        raise
    return conn


managers.listener_client[SERIALIZER] = (Listener, Client)


class BrokerServer(managers.Server):
    """The manager server, publishing the broker and its shutdown event."""

    def __init__(self, broker, address: tuple[str, int], authkey: bytes):
        super().__init__({}, address, authkey, SERIALIZER)
        self.broker = broker
        self.id_to_obj[BROKER_ID] = (broker, BROKER_METHODS, None)
        self.id_to_obj[EVENT_ID] = (broker.shutdown_event, EVENT_METHODS, None)
        # serve_client() loops until this is set; we never set it: the process
        # exits when the broker is done.
        self.stop_event = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self.accepter, name="accepter", daemon=True).start()

    def serve_client(self, conn):
        # Authenticated: from here on a connection may idle as long as it likes.
        _recv_timeout(conn, 0)
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
        except multiprocessing.AuthenticationError:
            self._drop_connection()
            raise AuthenticationError(
                f"authentication with the broker at {format_address(self._token.address)} "
                "failed: this process and the broker hold different authkeys "
                "(check MPQUEUE_AUTHKEY)") from None
        except (OSError, EOFError) as e:
            self._drop_connection()
            raise BrokerUnavailable(
                f"cannot reach the broker at {format_address(self._token.address)}: "
                f"{e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__}"
            ) from None

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

    Connections are made lazily, one per thread, on first use.
    """
    def proxy(cls, ident):
        token = managers.Token(cls.__name__, tuple(address), ident)
        p = cls(token, SERIALIZER, authkey=authkey, incref=False)
        # BaseProxy shares one connection per thread among all proxies to an
        # address; ours each need their own, or two clients in one thread
        # would speak for each other's session.
        p._tls = util.ForkAwareLocal()
        return p
    return proxy(BrokerProxy, BROKER_ID), proxy(EventProxy, EVENT_ID)
