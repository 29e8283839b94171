"""How a connection to the broker is opened: TLS, then a mutual HMAC-SHA256
challenge-response that also carries the versions pickles depend on.

multiprocessing's own handshake is HMAC-MD5 on 3.10 and 3.11 (and 3.12+
still accept it), and says nothing of versions. Ours runs, on the broker's
side, in the connection's own thread, and on both ends within
``SETTINGS.connect_timeout``: a silent peer holds up no one. Each message is
a 4-byte length and JSON (nothing is unpickled before it succeeds)::

    peer                                         broker
    [TLS handshake: each checks the other's certificate against the CA]
                               <- {"nonce": Nb}       sent at once
    {"hello": "mpqueue", "mpqueue": "0.1.0", "python": "3.11",
     "cloudpickle": "3.1.3", "nonce": Np} ->
    {"proof": HMAC(key, "mpqueue client" hello challenge)} ->
         <- {"ok": true, "proof": HMAC(key, "mpqueue broker" hello challenge)}
            or {"refused": "authkey"}, {"refused": "version", its versions}

(hello and challenge: the exact bytes of those two messages.) Without TLS, a
peer sends its hello at once too; a TLS broker answers a plain one with
{"refused": "tls"}. After the handshake, messages are multiprocessing's
(length-prefixed pickles of the manager protocol), through `connection.Connection`,
whose own frame carries large payloads beside the pickle.

**The local socket.** To a peer that connected from the broker's own host (a
loopback address, or the address it was reached at), the broker's "ok" also
offers its local socket, ``"local": [name, pid, identity]``; `local` says
what a peer does with it.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import secrets
import socket
import ssl
import struct
import sys
import time

import cloudpickle

from . import __version__
from .config import SETTINGS, format_address
from .connection import Connection, TLSConnection
from .errors import AuthenticationError, BrokerUnavailable, ConfigError, VersionMismatch


def tune(sock: socket.socket) -> None:
    if sock.family == socket.AF_UNIX:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)



#: UTF-8 JSON, at most _MAX_FRAME. Nothing is unpickled before the handshake.
_FRAME = struct.Struct("!i")
_MAX_FRAME = 1024
_TLS_RECORD = b"\x16"       # the first byte a TLS client sends (a handshake record)

#: The format of the messages and broker methods after the handshake: it
#: changes when one changes in a way an older peer would misread (2: the
#: shipped code and shared objects; 3: large payloads out of band, and a
#: worker's outcomes carry the pid, times and exception text of each
#: attempt, for the jobs' history).
PROTOCOL = "3"

#: What a process tells the broker about itself when it connects, and the
#: broker answers with. Pickles made with one Python minor version or
#: cloudpickle major version may not load under another, and messages of
#: one protocol not under another, so both ends refuse those mismatches;
#: mpqueue's own version is for the messages only.
VERSIONS = {"mpqueue": __version__, "python": "%d.%d" % sys.version_info[:2],
            "cloudpickle": cloudpickle.__version__, "protocol": PROTOCOL}


class Refused(Exception):
    """A connection failed the handshake; the text says why, for the broker's log.
    ``closed``: the peer just closed it (as one that finds our local socket not
    what it expected does)."""

    def __init__(self, why: str, closed: bool = False):
        super().__init__(why)
        self.closed = closed


def _describe(versions: dict) -> str:
    protocol = versions.get("protocol")
    return (f"Python {versions['python']}, cloudpickle {versions['cloudpickle']}, "
            f"mpqueue {versions['mpqueue']} (protocol {protocol if protocol not in (None, 'None') else 1})")


def _compatible(versions: dict) -> bool:
    return (versions["python"] == VERSIONS["python"]
            and versions["cloudpickle"].split(".")[0] == VERSIONS["cloudpickle"].split(".")[0]
            and versions.get("protocol") == PROTOCOL)


def _mismatch(where: str, theirs: dict) -> VersionMismatch:
    return VersionMismatch(
        f"the broker at {where} runs {_describe(theirs)}, and this process runs "
        f"{_describe(VERSIONS)}: pickles do not cross Python minor versions or cloudpickle "
        "major versions, nor messages mpqueue protocols; install the same ones on every host")


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
        raise Refused("not an mpqueue handshake")
    data = exactly(size)
    try:
        message = json.loads(data)
    except ValueError:
        message = None
    if not isinstance(message, dict):
        raise Refused("not an mpqueue handshake")
    return data, message


def accept(sock: socket.socket, authkey: bytes, tls: ssl.SSLContext | None,
           local: list | None = None) -> Connection:
    """The broker's side of a new connection's handshake, within SETTINGS.connect_timeout.

    With ``tls``, a TLS handshake first (which checks the peer's certificate).
    ``local``: our local socket, ``[name, pid, identity]``, offered to a TCP
    peer on this host (see the module docstring).
    Then we send our nonce at once, without waiting: a legacy multiprocessing
    client (HMAC-MD5) expects its own challenge format and gives up on ours.
    Raises `Refused` with the reason, having closed the socket.
    """
    deadline = time.monotonic() + SETTINGS.connect_timeout
    try:
        tune(sock)
        if tls is not None:
            if _peek(sock, deadline) != _TLS_RECORD:
                # Read its hello first: closing on unread data would reset the
                # connection, and it might not see our answer.
                sock.recv(_MAX_FRAME + _FRAME.size)
                _send_frame(sock, {"refused": "tls"})
                raise Refused("it does not use TLS, and this broker requires it")
            _timeout(sock, deadline)
            sock = tls.wrap_socket(sock, server_side=True)     # bounded by that timeout
        challenge = _send_frame(sock, {"nonce": secrets.token_hex(32)})
        if tls is None and _peek(sock, deadline) == _TLS_RECORD:
            raise Refused("it uses TLS, and this broker does not (see --tls-cert)")
        hello, theirs = _recv_frame(sock, deadline)
        if theirs.get("hello") != "mpqueue":
            raise Refused("not an mpqueue handshake")
        _, answer = _recv_frame(sock, deadline)
        if not hmac.compare_digest(str(answer.get("proof")).encode(),
                                   _proof(authkey, b"client", hello, challenge).encode()):
            _send_frame(sock, {"refused": "authkey"})
            raise Refused("wrong authkey")
        theirs = {name: str(theirs.get(name)) for name in VERSIONS}
        if not _compatible(theirs):
            _send_frame(sock, {"refused": "version", **VERSIONS})
            raise Refused(f"version mismatch: it runs {_describe(theirs)}; "
                           f"this broker runs {_describe(VERSIONS)}")
        ok = {"ok": True, "proof": _proof(authkey, b"broker", hello, challenge), **VERSIONS}
        if local is not None and sock.family != socket.AF_UNIX and _on_this_host(sock):
            ok["local"] = local
        _send_frame(sock, ok)
        sock.settimeout(None)
        return TLSConnection(sock) if tls is not None else Connection(sock.detach())
    except BaseException as e:
        sock.close()
        if isinstance(e, TimeoutError):
            raise Refused(f"no handshake within {SETTINGS.connect_timeout:g} s") from None
        if isinstance(e, ssl.SSLError):
            reason = getattr(e, "verify_message", None) or e.reason or e
            raise Refused(f"TLS handshake failed ({reason})") from None
        if isinstance(e, (EOFError, ConnectionError)):
            raise Refused("it closed the connection during the handshake", closed=True) from None
        if isinstance(e, OSError):
            raise Refused(f"handshake failed ({e.strerror or e})") from None
        raise


def _on_this_host(sock: socket.socket) -> bool:
    """Whether a TCP peer connected from this host (and network namespace)."""
    try:
        host = sock.getpeername()[0]
        return ipaddress.ip_address(host).is_loopback or host == sock.getsockname()[0]
    except (OSError, ValueError):
        return False


def open_connection(sock: socket.socket, address: tuple[str, int], authkey: bytes,
                    tls: ssl.SSLContext | None) -> tuple[Connection, tuple[str, int, str] | None]:
    """Our side of the handshake on a connected socket: the connection, and
    the local socket the broker offers, if it does."""
    where = format_address(address)
    deadline = time.monotonic() + SETTINGS.connect_timeout
    try:
        tune(sock)
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
            raise _mismatch(where, {name: str(verdict.get(name)) for name in VERSIONS})
        if not hmac.compare_digest(str(verdict.get("proof")).encode(),
                                   _proof(authkey, b"broker", hello, challenge).encode()):
            raise AuthenticationError(f"the process at {where} could not prove it holds the "
                                      "authkey: it is not the broker you meant")
        if verdict.get("protocol") != PROTOCOL:     # an older broker, which did not check it
            raise VersionMismatch(
                f"the broker at {where} runs an older mpqueue (protocol 1), and this process runs "
                f"{_describe(VERSIONS)}: its messages differ; install the same mpqueue on every host")
        sock.settimeout(None)
        offered = verdict.get("local")
        if not (isinstance(offered, list) and len(offered) == 3 and sock.family != socket.AF_UNIX):
            offered = None
        conn = TLSConnection(sock) if tls is not None else Connection(sock.detach())
        return conn, (str(offered[0]), int(offered[1]), str(offered[2])) if offered else None
    except BaseException as e:
        sock.close()
        # A TLS refusal, not a broker closing mid-handshake (which may be busy, or restarting).
        if isinstance(e, ssl.SSLError) and not isinstance(e, ssl.SSLEOFError):
            raise AuthenticationError(
                f"TLS with the broker at {where} failed ({e.reason or e}): both ends need TLS, "
                "with certificates signed by the same CA") from None
        if isinstance(e, Refused):
            raise BrokerUnavailable(f"the process at {where} is not an mpqueue broker") from None
        raise
