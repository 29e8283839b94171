"""Where things are (addresses, the authkey, TLS files) and how long we wait for them.

Every timeout and interval of the system lives in `SETTINGS`, so that a reader
can see the whole timing model in one place and a test can shorten it through
the environment (``MPQUEUE_HEARTBEAT_TIMEOUT=2`` and the like).
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import secrets
import socket
import stat
import sys
from pathlib import Path

from .errors import ConfigError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5555


@dataclasses.dataclass(frozen=True)
class Settings:
    #: A worker reports to the broker at least this often, even when idle.
    heartbeat_interval: float = 1.0
    #: A worker silent for this long is presumed dead and its jobs re-queued.
    #: (A worker whose connection closes is noticed at once; this catches the
    #: ones that vanish without a FIN: a cut link, a frozen host.)
    heartbeat_timeout: float = 10.0
    #: A blocking broker call (fetch, collect) returns after this long with
    #: nothing, so the caller can notice shutdown and the broker can notice a
    #: caller that went away while it waited.
    wait_slice: float = 2.0
    #: TCP connect and authentication handshake limit.
    connect_timeout: float = 5.0
    #: How long a worker or command keeps retrying a broker that is not up yet.
    broker_wait: float = 30.0
    #: A client whose connections closed is forgotten (queued jobs dropped,
    #: results discarded) after this grace.
    client_grace: float = 5.0
    #: After ``mpqueue shutdown``, the broker waits at most this long for
    #: connected clients to collect their last results.
    drain_timeout: float = 30.0
    #: A child we kill gets SIGTERM, then SIGKILL this long after (and one
    #: asked to exit at a worker's stop gets this long before SIGTERM).
    child_grace: float = 2.0
    #: Longest backoff between two attempts of a job that raised or timed out.
    retry_delay_cap: float = 30.0
    #: With --max-memory-per-child, how often a worker measures the children
    #: running jobs (between jobs it measures every time).
    memory_check: float = 0.25
    #: A worker or client whose broker went away tries to reconnect for this
    #: long (with backoff) before it gives up.
    reconnect_timeout: float = 60.0
    #: A result its client has not collected is dropped after this long.
    result_ttl: float = 86400.0
    #: A worker prefetches about this much work per proc (by its measured job
    #: time): one job when jobs are long, many when they are tiny.
    prefetch_seconds: float = 0.02
    #: The largest job a client may send (its function and arguments,
    #: pickled) and the largest result a job may return, in bytes: a larger
    #: one fails its own job with `PayloadTooLarge`, and nothing else. The
    #: broker's value holds for the cluster: it tells its workers and clients.
    #: 900 MiB stays under SQLite's limit of 10^9 bytes on one value (a
    #: --journal broker stores payloads) and under the 1 GiB a message may
    #: carry (`connection.MAX_MESSAGE`) with a batch's other payloads.
    max_payload: float = 900 * 2**20
    #: 1: a broker on Linux also listens on a local (Unix) socket, which the
    #: processes on its host use instead of TCP (`local`). 0: it does
    #: not, and all traffic crosses TCP (for a proxy in between, say).
    local_socket: float = 1.0

    @classmethod
    def from_env(cls) -> "Settings":
        """Defaults, overridden by ``MPQUEUE_<FIELD>`` environment variables."""
        changes = {}
        for field in dataclasses.fields(cls):
            name = "MPQUEUE_" + field.name.upper()
            value = os.environ.get(name)
            if value is not None:
                try:
                    changes[field.name] = float(value)
                except ValueError:
                    sys.stderr.write(f"mpqueue: ignoring {name}={value!r}: not a number\n")
        return cls(**changes)


SETTINGS = Settings.from_env()


def parse_address(address: str | None) -> tuple[str, int]:
    """``HOST:PORT``, ``HOST`` (port 5555) or ``tcp://HOST:PORT``; None means
    ``$MPQUEUE_ADDRESS``, else the default. An IPv6 address takes brackets
    (``[::1]:5555``)."""
    if address is None:
        address = os.environ.get("MPQUEUE_ADDRESS") or f"{DEFAULT_HOST}:{DEFAULT_PORT}"
    given = address
    address = address.strip().removeprefix("tcp://").rstrip("/")
    if address.startswith("[") and "]" in address:             # [IPv6] or [IPv6]:PORT
        host, _, rest = address[1:].partition("]")
        port = rest.removeprefix(":") if rest.startswith(":") else (None if not rest else "x")
    elif address.count(":") == 1:
        host, port = address.split(":")
    elif ":" not in address:
        host, port = address, None
    else:                               # a bare IPv6 address and a port, as before
        host, _, port = address.rpartition(":")
    if port is None:
        port = str(DEFAULT_PORT)
    if not port.isdigit() or int(port) > 65535 or "/" in host:
        raise ConfigError(f"address {given!r} is not HOST:PORT (or HOST, for port {DEFAULT_PORT})")
    return host or DEFAULT_HOST, int(port)


def format_address(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"


def authkey_path() -> Path:
    """The per-user file that holds the generated authkey (mode 0600)."""
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "mpqueue" / "authkey"


def resolve_authkey(authkey: bytes | str | None = None, *, create: bool = False) -> bytes:
    """The authkey to use: explicit, else ``$MPQUEUE_AUTHKEY``, else the key file.

    With ``create`` (the broker), a missing key file is made with a fresh random
    key. There is deliberately no built-in default: anyone holding the key can
    run code on every worker.
    """
    if authkey is None:
        authkey = os.environ.get("MPQUEUE_AUTHKEY") or None
    if authkey is not None:
        return authkey.encode() if isinstance(authkey, str) else bytes(authkey)
    path = authkey_path()
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        if not create:
            raise ConfigError(
                f"no authkey: copy the key file from the broker's host (`scp -p BROKERHOST:"
                f"~/.config/mpqueue/authkey {path}`) or set MPQUEUE_AUTHKEY to the same key; on "
                "the broker's host, `mpqueue broker` writes one") from None
    else:
        if mode & 0o077:
            # Like ssh with a private key: whoever reads it can run code on every worker.
            raise ConfigError(f"the key file {path} is readable by others (mode {mode:04o}): "
                              f"run `chmod 600 {path}`")
        return path.read_bytes().strip()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.token_hex(32).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key + b"\n")
    return key


def is_loopback(host: str) -> bool:
    """Whether ``host`` names loopback addresses only: a broker there is off the network."""
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False
    return all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


TLS_VARIABLES = {"cert": "MPQUEUE_TLS_CERT", "key": "MPQUEUE_TLS_KEY", "ca": "MPQUEUE_TLS_CA"}
#: The other variables mpqueue reads, beside SETTINGS' MPQUEUE_<FIELD> ones.
OTHER_VARIABLES = ("MPQUEUE_ADDRESS", "MPQUEUE_AUTHKEY", "MPQUEUE_LOG_LEVEL", *TLS_VARIABLES.values())
_warned_unknown = False


def warn_unknown_variables() -> None:
    """Say once per process, on stderr, which ``$MPQUEUE_*`` variables are none
    of ours: a misspelt ``MPQUEUE_ADRESS`` would otherwise be ignored without a word."""
    global _warned_unknown
    if _warned_unknown:
        return
    _warned_unknown = True
    known = {*OTHER_VARIABLES, *("MPQUEUE_" + field.name.upper() for field in dataclasses.fields(Settings))}
    for name in sorted(os.environ):
        if name.startswith("MPQUEUE_") and name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            sys.stderr.write(f"mpqueue: ignoring {name}, which is no setting of mpqueue's"
                             + (f": did you mean {close[0]}?\n" if close else "\n"))


@dataclasses.dataclass(frozen=True)
class TLSFiles:
    """Mutual TLS: this process's certificate and private key, and the CA
    certificate that signed every member's (PEM files)."""
    cert: str
    key: str
    ca: str


def resolve_tls() -> TLSFiles | None:
    """The TLS files from ``$MPQUEUE_TLS_CERT``, ``_KEY`` and ``_CA``; None: no TLS.

    The commands' ``--tls-*`` options set these variables, so that a process
    and everything it connects agree. It takes all three or none: a peer
    without a certificate cannot take part in mutual TLS.
    """
    paths = {field: os.environ.get(name) or None for field, name in TLS_VARIABLES.items()}
    if not any(paths.values()):
        return None
    files: dict[str, str] = {}
    for field, name in TLS_VARIABLES.items():
        path = paths[field]
        if path is None:
            raise ConfigError(f"TLS needs all of --tls-cert, --tls-key and --tls-ca "
                              f"(or MPQUEUE_TLS_CERT, _KEY and _CA): {name} is not set")
        if not os.path.isfile(path):
            raise ConfigError(f"{name}={path}: no such file")
        files[field] = path
    return TLSFiles(**files)
