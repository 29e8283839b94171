"""``mpqueue broker --dashboard PORT``: the cluster over HTTP, for a browser
and for Prometheus.

::

    browser / scraper ──GET, token──▶ ThreadingHTTPServer (threads of the broker's process)
         /               dashboard.html, the page: it fetches the two below every second
         /api/status     Broker.status()  ─┐ a snapshot, taken under the broker's lock,
         /api/jobs       Broker.jobs(...) ─┘ shared by every request for SNAPSHOT_AGE seconds
         /metrics        metrics.prometheus(status), made with no lock held

The server's threads never touch the broker's state but through `Broker.
status` and `Broker.jobs`, which hold its lock for a walk of the workers
and of a few kept jobs; however many pages and scrapers ask, that happens
at most once per `SNAPSHOT_AGE` per kind of question, so the job path waits
on the dashboard for a fraction of a millisecond a second.

Every path needs the token, a digest of the authkey (`token`), as the
query parameter ``token`` or an ``Authorization: Bearer`` header, compared in
constant time; without it the answer is 401. With ``tls`` (the broker's
certificate and key) it serves HTTPS. Who may bind where is the broker's
rule: the dashboard listens on the broker's host (docs/security.md).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from .config import TLSFiles
from .metrics import prometheus

log = logging.getLogger("mpqueue.broker")

#: How long one snapshot of the broker's state answers every request for it.
SNAPSHOT_AGE = 0.5
#: The most jobs /api/jobs lists at once.
MAX_JOBS = 200
#: Connections served at once; past this, a new one is closed at once.
MAX_CONNECTIONS = 64
#: A connection silent this long (no request, or a TLS handshake unfinished) is closed.
IDLE_TIMEOUT = 15.0


def token(authkey: bytes) -> str:
    """The dashboard's token: it opens the dashboard and nothing else (the
    authkey cannot be worked back from it)."""
    return hmac.new(authkey, b"mpqueue dashboard", hashlib.sha256).hexdigest()[:32]


class Dashboard:
    """The HTTP server of a broker's dashboard, serving in daemon threads."""

    def __init__(self, broker: Any, address: tuple[str, int], authkey: bytes, tls: TLSFiles | None = None):
        self.broker = broker
        self.token = token(authkey).encode()
        self.page = resources.files(__package__).joinpath("dashboard.html").read_bytes()
        self._snapshots: dict[tuple, tuple[float, Any]] = {}
        self._snapshot_lock = threading.Lock()
        self.server = _Server(address, self)
        self.scheme = "http"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(tls.cert, tls.key)    # browsers bring no certificate: no mutual TLS here
            # The handshake in the request's thread, not in accept(): a slow peer holds up no one.
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True,
                                                     do_handshake_on_connect=False)
            self.scheme = "https"

    @property
    def url(self) -> str:
        """The page's address, with the token."""
        host, port = str(self.server.server_address[0]), self.server.server_address[1]
        if host in ("0.0.0.0", "::"):       # every address: loopback is one of them
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return f"{self.scheme}://{where}/?token={self.token.decode()}"

    def start(self) -> None:
        threading.Thread(target=self.server.serve_forever, name="dashboard", daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def allowed(self, query: dict[str, list[str]], authorization: str | None) -> bool:
        given = query.get("token", [""])[0]
        if authorization and authorization.startswith("Bearer "):
            given = authorization.removeprefix("Bearer ").strip()
        return hmac.compare_digest(given.encode(), self.token)

    def snapshot(self, key: tuple, take: Callable[[], Any]) -> Any:
        """What ``take()`` returned for ``key`` within `SNAPSHOT_AGE` s, else
        its answer now: many viewers cost the broker's lock what one does.
        Older answers are dropped as new ones come (a script asking for each
        of its jobs by id would otherwise grow this for ever)."""
        with self._snapshot_lock:
            now = time.monotonic()
            taken = self._snapshots.get(key)
            if taken is None or now - taken[0] > SNAPSHOT_AGE:
                for old in [k for k, (at, _) in self._snapshots.items() if now - at > SNAPSHOT_AGE]:
                    del self._snapshots[old]
                taken = self._snapshots[key] = (now, take())
            return taken[1]

    def status(self) -> dict:
        return self.snapshot(("status",), self.broker.status)

    def jobs(self, query: dict[str, list[str]]) -> list[dict]:
        """`mpqueue jobs --json`'s list: ``limit``, ``failed``, ``running`` and ``id`` as its options."""
        def flag(name: str) -> bool:
            return query.get(name, [""])[0] in ("1", "true", "yes")
        try:
            limit = min(MAX_JOBS, max(1, int(query.get("limit", ["20"])[0])))
            job_id = int(query["id"][0]) if "id" in query else None
        except ValueError:
            raise BadQuery("limit and id are numbers") from None
        key = ("jobs", limit, flag("failed"), flag("running"), job_id)
        return self.snapshot(key, lambda: self.broker.jobs(limit, flag("failed"), flag("running"), job_id))


class BadQuery(ValueError):
    """A query the dashboard's API cannot read: answered 400."""


class _Server(ThreadingHTTPServer):
    """The standard library's server, on IPv6 too, with its `Dashboard`.
    At most `MAX_CONNECTIONS` at once, each closed after `IDLE_TIMEOUT` s of
    silence: the port answers anyone (the token is checked per request), and
    connections that say nothing must not take the broker's threads and
    file descriptors, which its workers and clients need."""

    daemon_threads = True
    request_queue_size = 128    # the stdlib's 5 drops a burst of connections for seconds

    def __init__(self, address: tuple[str, int], dashboard: Dashboard):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.dashboard = dashboard
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, _Handler)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)      # too many at once: closed, as the broker's own port does
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address) -> None:
        """A peer that reset, or spoke plain HTTP to HTTPS: the debug log, not
        a traceback on stderr (which would break --log-format json)."""
        log.debug("dashboard connection from %s failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    """One request: the token first, then the path."""

    server: _Server
    server_version = "mpqueue-dashboard"
    protocol_version = "HTTP/1.1"       # keep-alive: a page polling each second reuses its connection
    timeout = IDLE_TIMEOUT              # a silent connection (or TLS handshake) is closed after this

    def do_GET(self) -> None:
        dashboard = self.server.dashboard
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if not dashboard.allowed(query, self.headers.get("Authorization")):
            self._send(401, b"401: the dashboard needs its token: ?token=... or Authorization: Bearer ..., "
                            b"as the broker printed at start (docs/observability.md)\n", "text/plain",
                       {"WWW-Authenticate": 'Bearer realm="mpqueue"'})
            return
        try:
            if url.path == "/":
                self._send(200, dashboard.page, "text/html")
            elif url.path == "/metrics":
                self._send(200, prometheus(dashboard.status()).encode(), "text/plain; version=0.0.4")
            elif url.path == "/api/status":
                self._send(200, json.dumps(dashboard.status()).encode(), "application/json")
            elif url.path == "/api/jobs":
                self._send(200, json.dumps(dashboard.jobs(query)).encode(), "application/json")
            else:
                self._send(404, b"404: no such page: /, /metrics, /api/status, /api/jobs\n", "text/plain")
        except BadQuery as e:
            self._send(400, f"400: {e}\n".encode(), "text/plain")

    def _send(self, code: int, body: bytes, kind: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind + "; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Requests to the debug log, not to stderr (a scraper asks every few
        seconds), the token taken out."""
        dashboard = self.server.dashboard
        log.debug("dashboard %s: %s", self.address_string(),
                  (format % args).replace(dashboard.token.decode(), "TOKEN"))
