"""How processes reach the broker: ``multiprocessing.managers`` over TCP.

The broker serves two objects with the standard library's manager `Server`:
the `Broker` (all queue state) and the cluster's shutdown `threading.Event`.
Workers, clients and commands talk to them through `BaseProxy` subclasses.

Four departures from a plain ``BaseManager``, and why:

* Our own Listener/Client pair is registered under the serializer name
  ``"mpqueue"``, so every socket gets ``TCP_NODELAY`` (without it the first
  request on a new connection stalls ~40 ms on Nagle's algorithm) and
  keepalive, and so that our handshake (`handshake`: TLS, mutual
  HMAC-SHA256, versions) replaces multiprocessing's HMAC-MD5 one.
* Both objects are published under fixed ids. A process reaches them with one
  authenticated connection per thread: no ``create``/``incref`` round trips,
  and no ``decref`` finalizer that would dial a possibly dead broker at exit.
* Calls made through `Reconnecting` outlive the broker going away: they wait
  for the process to reconnect, and are made again.
* On Linux the broker also listens on a local (Unix) socket, which processes
  on its host use instead of TCP (see `local`).

The server runs in the broker's own process (no ``BaseManager.start()``), so
nothing it serves needs to be picklable under spawn or forkserver. Every
override of the manager's internals is in this module; the broker sees a
connection only as the `Caller` its calls are handed. The broker's threads:
docs/internals.md.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import queue
import socket
import threading
import time
import traceback
from multiprocessing import managers, util
from typing import Any, Callable

from . import local
from .config import SETTINGS, format_address, is_loopback, resolve_tls
from .connection import tls_context
from .errors import AuthenticationError, BrokerUnavailable, MpqueueError
from .handshake import Refused, accept

log = logging.getLogger("mpqueue")
broker_log = logging.getLogger("mpqueue.broker")

SERIALIZER = "mpqueue"
BROKER_ID = "broker"
EVENT_ID = "shutdown_event"

BROKER_METHODS = ("register", "unregister", "fetch", "report", "release", "control",
                  "submit", "code", "payload", "cancel", "collect", "goodbye", "status", "jobs",
                  "shared_open", "shared", "shared_delete")
EVENT_METHODS = ("is_set", "set", "wait")

#: What a broker method returns for a call it parked: its answer is sent later.
DEFERRED = object()


@dataclasses.dataclass(eq=False)
class Caller:
    """One connection, as the broker sees it: handed to each of its calls
    (the ``caller`` keyword), in place of any per-thread state."""
    peer: str | None                    # its IP address, or "local" (our local socket)
    reply: Callable[[tuple], None]      # answers a parked call later: ("#RETURN", value) or ("#ERROR", exc)
    session: str | None = None          # the session it serves, once the broker has seen one

#: Connections that may be in their handshake at once. Past this, a new one
#: is closed at once: each holds a thread (about 30 KB) until it
#: authenticates, or for ``connect_timeout`` if it says nothing. High enough
#: that a few hundred silent sockets do not keep real peers out.
MAX_HANDSHAKES = 1024
#: The refusals past MAX_HANDSHAKES are logged at most once in this many seconds.
REFUSALS_LOGGED_EVERY = 10.0


class Listener:
    """Accepts TCP connections for the manager server and hands over the raw
    socket: the handshake runs in the connection's own thread (`BrokerServer.
    handle_request`), so a peer that says nothing holds up no one else."""

    def __init__(self, address: tuple[str, int] | socket.socket, backlog: int = 16):
        # The stdlib server asks for a small backlog; fifty workers starting at
        # once would see refused connections. A socket is one listening
        # already (a private cluster's: `cluster.LocalCluster`).
        self._socket = (address if isinstance(address, socket.socket)
                        else socket.create_server(address, backlog=max(backlog, 512)))
        self.address = self._socket.getsockname()[:2]

    def accept(self) -> socket.socket:
        return self._socket.accept()[0]

    def close(self) -> None:
        _hang_up(self._socket)


managers.listener_client[SERIALIZER] = (Listener, local.connect)   # type: ignore[attr-defined]  # not in typeshed


class BrokerServer(managers.Server):
    """The manager server, publishing the broker and its shutdown event."""

    # The stdlib server's own attributes, as typeshed does not declare them.
    listener: Listener
    authkey: bytes
    id_to_obj: dict[str, Any]

    def __init__(self, broker, address: tuple[str, int] | socket.socket, authkey: bytes):
        files = resolve_tls()
        self.tls = None if files is None else tls_context(files, server=True)
        super().__init__({}, address, authkey, SERIALIZER)   # type: ignore[arg-type]  # our Listener takes a socket too
        # Our local socket, if any, and its offer to peers on this host (`local`).
        self.local: socket.socket | None
        self.local_offer: list | None
        self.local, self.local_offer = local.listen()
        self.broker = broker
        self.id_to_obj[BROKER_ID] = (broker, BROKER_METHODS, None)
        self.id_to_obj[EVENT_ID] = (broker.shutdown_event, EVENT_METHODS, None)
        # serve_client() loops until this is set; we never set it: the process
        # exits when the broker is done.
        self.stop_event = threading.Event()
        self._handshakes = threading.BoundedSemaphore(MAX_HANDSHAKES)
        self._refused = 0                   # past MAX_HANDSHAKES, since last logged
        self._refused_logged = 0.0
        self._closed = False
        self._threads: set[threading.Thread] = set()    # accepters and connections: `close` ends them
        self._served: set[int] = set()      # the sockets (fds) of connections past the handshake
        self._lock = threading.Lock()       # for the two sets above, and _closed

    def start(self) -> None:
        self._spawn(self._accept, self.listener.accept, name="accepter")
        if self.local is not None:
            self._spawn(self._accept, lambda: self.local.accept()[0], name="local accepter")

    def close(self) -> None:
        """Stop accepting, hang up on every peer, and wait for the threads
        serving them to end: for a broker in a process that goes on (a
        private cluster's); a broker process just exits."""
        with self._lock:
            self._closed = True
            for fd in self._served:     # closed by their threads, which hold the lock to do it
                _hang_up(socket.socket(fileno=fd), close=False)
        self.listener.close()
        if self.local is not None:
            _hang_up(self.local)
        with self._lock:
            threads = list(self._threads)
        for thread in threads:      # one in a handshake ends within connect_timeout
            thread.join()

    def _spawn(self, target, *args, name: str | None = None) -> bool:
        """Run ``target(*args)`` in a thread that `close` waits for; False
        (and no thread) once closed."""
        def run():
            try:
                target(*args)
            finally:
                with self._lock:
                    self._threads.discard(thread)
        thread = threading.Thread(target=run, name=name, daemon=True)
        with self._lock:
            if self._closed:
                return False
            self._threads.add(thread)
        thread.start()
        return True

    def _accept(self, accept_one) -> None:
        """Hand each new connection to a thread of its own (the stdlib's
        accepter, which spins when accept() keeps failing), unless
        `MAX_HANDSHAKES` are under way already."""
        while not self._closed:
            try:
                sock = accept_one()
            except OSError:
                if not self._closed:
                    time.sleep(0.1)     # out of file descriptors, say: not a busy loop
                continue
            if not self._handshakes.acquire(blocking=False):
                sock.close()
                self._refused += 1
                now = time.monotonic()
                if now - self._refused_logged >= REFUSALS_LOGGED_EVERY:
                    broker_log.warning(
                        "refused %d connection(s): %d handshakes under way already (peers that "
                        "connect and say nothing are dropped after %g s)",
                        self._refused, MAX_HANDSHAKES, SETTINGS.connect_timeout)
                    self._refused, self._refused_logged = 0, now
                continue
            if not self._spawn(self.handle_request, sock):
                sock.close()
                self._handshakes.release()

    def handle_request(self, sock: socket.socket) -> None:  # type: ignore[override]  # our Listener hands a socket
        """A new connection, in its own thread: our handshake, then its one request.

        This replaces the stdlib method (whose body 3.12 moved to
        ``_handle_request``), which runs multiprocessing's own challenge:
        HMAC-MD5 on 3.11, still accepted by 3.12+. The one request our proxies
        make on a new connection is ``accept_connection``, which serves the
        connection until it closes.
        """
        try:
            conn = self._handshake(sock)
        finally:
            self._handshakes.release()
        if conn is None:
            return
        with self._lock:
            if self._closed:
                conn.close()
                return
            self._served.add(conn.fileno())     # until serve_client closes it, under the lock
        try:
            _, funcname, args, kwds = conn.recv()
            if funcname != "accept_connection":
                raise ValueError(f"it asked for {funcname!r}")
            self.accept_connection(conn, *args, **kwds)
        except (SystemExit, EOFError):  # serve_client() exits when its connection ends
            pass
        except Exception as e:
            broker_log.warning("closed the connection from %s: %s", conn.peer, e)
        finally:
            with self._lock:
                self._close(conn)

    def _close(self, conn) -> None:
        """Close a served connection (lock held): `close` no longer knows it."""
        if not conn.closed:
            self._served.discard(conn.fileno())
            conn.close()

    def _handshake(self, sock: socket.socket):
        """Our handshake on a new connection: the authenticated `Connection`,
        or None (refused, or gone)."""
        on_local = sock.family == socket.AF_UNIX
        try:
            if on_local:
                host, peer = "local", f"pid {local.peer_pid(sock)} on this host"
            else:
                address = sock.getpeername()
                host, peer = address[0], format_address(address)
        except OSError:         # gone already
            sock.close()
            return None
        try:
            conn = accept(sock, self.authkey, self.tls, None if on_local else self.local_offer)
        except Refused as e:
            # A local peer that closes at once found the socket not what it
            # expected (another pid namespace, say), and went to TCP.
            level = logging.DEBUG if on_local and e.closed else logging.WARNING
            broker_log.log(level, "refused a connection from %s: %s", peer, e)
            return None
        conn.peer, conn.host = peer, host
        return conn

    def serve_client(self, conn):
        """Answer this connection's calls, one at a time, until it closes.

        This replaces the stdlib loop for one reason: a call may return
        `DEFERRED`, which means it is parked in the broker and will be answered
        later, by whichever thread makes its answer possible (see
        `Broker.fetch`), through the ``reply`` function handed to the broker
        here. This thread goes back to reading at once.

        ``reply`` never blocks its caller on this peer, which may not be
        reading (stopped, or its network down): what the socket does not take
        at once is sent by a thread of its own. Over TLS, which allows no
        second thread on the connection, this thread waits for the answer
        and sends it itself.
        """
        lock = threading.Lock()     # one sender at a time, and none after close

        def send(message, rest=None) -> None:
            with lock:
                if conn.closed:
                    return
                try:
                    try:
                        if rest is not None:
                            conn.send_rest(rest)
                        else:
                            conn.send(message)
                    except (OSError, EOFError):
                        raise
                    except Exception:       # the answer does not pickle (nothing was sent)
                        conn.send(("#UNSERIALIZABLE", traceback.format_exc()))
                except (OSError, EOFError):
                    pass    # it is gone: its thread finds out when it reads

        def reply(message) -> None:
            with lock:
                if conn.closed:
                    return
                try:
                    rest = conn.send_nowait(message)
                except (OSError, EOFError):
                    return
                except Exception:
                    rest = None
            if rest is None or rest:
                threading.Thread(target=send, args=(message, rest), daemon=True).start()

        answers: queue.SimpleQueue = queue.SimpleQueue()
        # The peer's IP address (hostnames can be alike: containers, cloned
        # machines; addresses on one network are not), or "local".
        caller = Caller(conn.host, reply if conn.concurrent_send else answers.put)
        methods: dict[tuple[str, str], Callable] = {}   # (ident, name): what it calls, looked up once
        try:
            while True:
                try:
                    request = conn.recv()
                except (EOFError, OSError):
                    return
                try:
                    ident, methodname, args, kwds = request
                    function = methods.get((ident, methodname))
                    if function is None:
                        function = methods[ident, methodname] = self._method(ident, methodname, caller)
                except Exception:
                    send(("#TRACEBACK", traceback.format_exc()))
                    continue
                try:
                    result = function(*args, **kwds)
                except Exception as e:
                    send(("#ERROR", e))
                else:
                    if result is not DEFERRED:
                        send(("#RETURN", result))
                    elif not conn.concurrent_send:
                        send(answers.get())
        finally:
            self.broker.connection_closed(caller)
            with lock, self._lock:
                self._close(conn)

    def _method(self, ident: str, methodname: str, caller: Caller) -> Callable:
        """What a call of ``methodname`` on the object ``ident`` calls, for
        this connection: the broker's methods are given its `Caller`."""
        obj, exposed, _ = self.id_to_obj[ident]
        if methodname not in exposed:
            raise AttributeError(f"method {methodname!r} is not exposed")
        function = getattr(obj, methodname)
        return functools.partial(function, caller=caller) if obj is self.broker else function


def _hang_up(sock: socket.socket, close: bool = True) -> None:
    """Shut down a socket that another thread may be blocked on, and close it
    (or, ``close=False``, leave its file descriptor to its owner): close()
    alone would not wake that thread (in accept() or recv(), on Linux)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass    # not connected, or gone already
    if close:
        sock.close()
    else:
        sock.detach()


class _Proxy(managers.BaseProxy):
    """Turns transport failures into mpqueue's own errors."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The stdlib registers every proxy to incref in a forked child, which
        # would make each child of a process holding one (a user's
        # multiprocessing.Pool) dial the broker for a call it refuses. A
        # forked child opens its own connections, on first use.
        for key in [k for k in list(util._afterfork_registry) if k[1] == id(self)]:
            util._afterfork_registry.pop(key, None)

    def _callmethod(self, methodname, args=(), kwds=None):
        try:
            return super()._callmethod(methodname, args, kwds or {})
        except (KeyboardInterrupt, SystemExit):
            self._drop_connection()     # a call cut short leaves it mid-message
            raise
        except MpqueueError as e:
            # A refusal in our handshake: it says what is wrong. It came up
            # while the stdlib handled finding no connection for this thread
            # yet, an AttributeError of its internals a traceback need not show.
            e.__suppress_context__ = True
            raise
        except (OSError, EOFError) as e:
            self._drop_connection()
            raise _unreachable(self._token.address, e) from None

    def _drop_connection(self):
        conn = getattr(self._tls, "connection", None)
        if conn is not None:
            del self._tls.connection
            conn.close()

    def close(self) -> None:
        """Close this thread's connection to the broker."""
        self._drop_connection()


def _unreachable(address: tuple[str, int], error: OSError | EOFError) -> BrokerUnavailable:
    """Why the broker at ``address`` cannot be reached, with what to check."""
    host = address[0]
    reason = (error.strerror if isinstance(error, OSError) and error.strerror
              else "the connection closed" if isinstance(error, EOFError) else str(error) or type(error).__name__)
    hint = ""
    if isinstance(error, ConnectionRefusedError) and not is_loopback(host):
        hint = (f"; is a broker listening on {host}? `mpqueue broker` listens on 127.0.0.1 only, "
                "unless started with --host")
    elif isinstance(error, TimeoutError):
        hint = f"; nothing answered: a firewall may be dropping port {address[1]}"
    unavailable = BrokerUnavailable(f"cannot reach the broker at {format_address(address)}: {reason}{hint}")
    unavailable.unresolved = isinstance(error, socket.gaierror)
    return unavailable


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
    tls = None if files is None else tls_context(files, server=False)

    def proxy(cls, ident):
        token = managers.Token(cls.__name__, tuple(address), ident)
        p = cls(token, SERIALIZER, authkey=authkey, incref=False)
        p._Client = functools.partial(local.connect, tls=tls)
        # BaseProxy shares one connection per thread among all proxies to an
        # address; ours each need their own, or two clients in one thread
        # would speak for each other's session.
        p._tls = util.ForkAwareLocal()
        return p
    return proxy(BrokerProxy, BROKER_ID), proxy(EventProxy, EVENT_ID)


def reach_broker(address: tuple[str, int], first_call, wait: float = SETTINGS.broker_wait,
                 abandoned: threading.Event | None = None, said: bool = False,
                 reconnecting: bool = False):
    """Make ``first_call()`` succeed, retrying with backoff while the broker is
    not up, until ``wait`` s have passed or ``abandoned`` is set. ``said``:
    the caller has logged that it waits already.

    A `BrokerUnavailable` with a true ``final`` attribute is not retried: the
    broker is up, and said something that another try would not change.
    Nor, unless ``reconnecting`` (to a broker reached before: the name
    resolved then, and the resolver may be down a moment), is a host name
    that does not resolve: it is a mistake to say at once, not to wait out.
    """
    deadline = time.monotonic() + wait
    delay = 0.05
    while True:
        try:
            return first_call()
        except AuthenticationError:
            raise
        except BrokerUnavailable as e:
            if e.final or (e.unresolved and not reconnecting):
                raise
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

    After a reconnect, each other thread's first call drops the connection it
    held (to the broker that went away) before calling: a stale connection
    would fail, and set off a second reconnect and rejoin for nothing. The
    thread that reconnected keeps the fresh connection its rejoin opened: it
    may be the process's only one, and the broker takes a worker whose last
    connection closes for dead (its running jobs would be charged a death).
    """

    def __init__(self, address: tuple[str, int], rejoin, timeout: float, proxy: "_Proxy"):
        self.address = address
        self._rejoin = rejoin
        self._timeout = timeout
        self._proxy = proxy
        self._local = threading.local()
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
            if getattr(self._local, "generation", 0) != seen:
                self._proxy.close()
                self._local.generation = seen
            try:
                return method(*args)
            except AuthenticationError:
                raise
            except BrokerUnavailable as e:
                self._recover(seen, e)

    def abandon(self) -> None:
        """Stop reconnecting (a stop with nothing left to deliver): waiting
        callers get BrokerUnavailable."""
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
        stopping = f"lost the broker at {where} ({error}) while stopping"
        failure: BaseException | None = None
        try:
            if self._abandoned.is_set():
                raise BrokerUnavailable(stopping)
            log.warning("%s; reconnecting for up to %.0f s", error, self._timeout)
            reach_broker(self.address, self._rejoin, self._timeout, self._abandoned, said=True,
                         reconnecting=True)
            log.info("reconnected to the broker at %s", where)
        except AuthenticationError as e:
            failure = e
            raise
        except BrokerUnavailable as e:
            if e.final:
                failure = e
                raise
            if self._abandoned.is_set():
                gave_up = BrokerUnavailable(stopping)
            else:
                gave_up = BrokerUnavailable(f"lost the broker at {where} and could not reconnect "
                                            f"within {self._timeout:.0f} s ({error})")
            failure = gave_up
            raise gave_up from e
        except Exception as e:      # refused (versions): nothing to go back to
            failure = e
            raise
        finally:
            with self._cond:
                self._busy = False
                self._failure = failure
                if failure is None:
                    self._generation += 1
                    self._local.generation = self._generation   # its connection is the fresh one
                self._cond.notify_all()
