"""Who may talk to a broker: the handshake, TLS, and what the broker refuses.

The handshake is checked on the wire, spoken by hand from its description in
docs/security.md, so that a change to it shows here. `.ci/run` also runs this
file on the oldest and newest Python we support: the handshake and the
pickles that follow it are where versions differ.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import select
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path

import cloudpickle
import psutil
import pytest

import mpqueue
from helpers import logs, python
from mpqueue import AuthenticationError, Client
from mpqueue import local as wire
from mpqueue.handshake import PROTOCOL

cloudpickle.register_pickle_by_value(sys.modules[__name__])
VERSIONS = {"mpqueue": mpqueue.__version__, "python": "%d.%d" % sys.version_info[:2],
            "cloudpickle": cloudpickle.__version__, "protocol": PROTOCOL}
REPO = Path(__file__).resolve().parent.parent
#: An interpreter of another minor version, for the version handshake.
OTHER_PYTHON = Path.home() / ".pyenv/versions" / (
    "3.13.0" if sys.version_info[:2] == (3, 10) else "3.10.13") / "bin/python"


def host_port(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


def send_frame(sock: socket.socket, message: dict) -> bytes:
    data = json.dumps(message).encode()
    sock.sendall(struct.pack("!i", len(data)) + data)
    return data


def read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "the broker closed the connection"
        data += chunk
    return data


def read_frame(sock: socket.socket) -> bytes:
    size, = struct.unpack("!i", read_exactly(sock, 4))
    return read_exactly(sock, size)


def handshake(address: str, *, digest: str = "sha256", versions: dict = VERSIONS):
    """The peer's side of the handshake, by hand: (socket, hello, challenge, verdict)."""
    sock = socket.create_connection(host_port(address), timeout=5)
    hello = send_frame(sock, {"hello": "mpqueue", **versions, "nonce": secrets.token_hex(32)})
    challenge = read_frame(sock)
    key = os.environ["MPQUEUE_AUTHKEY"].encode()
    send_frame(sock, {"proof": hmac.new(key, b"mpqueue client\0" + hello + b"\0" + challenge,
                                        digest).hexdigest()})
    return sock, hello, challenge, json.loads(read_frame(sock))


def log_lines(proc: subprocess.Popen, text: str) -> list[str]:
    return [line for line in logs(proc).splitlines() if text in line]


def wait_for_log(proc: subprocess.Popen, text: str, count: int = 1, timeout: float = 10) -> list[str]:
    deadline = time.monotonic() + timeout
    while len(lines := log_lines(proc, text)) < count:
        assert time.monotonic() < deadline, f"{count} x {text!r} not in the log:\n{logs(proc)}"
        time.sleep(0.05)
    return lines


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_the_handshake_is_mutual_hmac_sha256_on_the_wire(cluster):
    sock, hello, challenge, verdict = handshake(cluster.address)
    with sock:
        assert set(json.loads(challenge)) == {"nonce"} and len(json.loads(challenge)["nonce"]) == 64
        assert verdict["ok"] is True
        key = os.environ["MPQUEUE_AUTHKEY"].encode()
        expected = hmac.new(key, b"mpqueue broker\0" + hello + b"\0" + challenge, "sha256").hexdigest()
        assert hmac.compare_digest(verdict["proof"], expected), "the broker's proof is not HMAC-SHA256"
    # The same exchange with HMAC-MD5 (or SHA-1) is refused.
    for digest in ("md5", "sha1"):
        sock, *_, verdict = handshake(cluster.address, digest=digest)
        sock.close()
        assert verdict == {"refused": "authkey"}
    assert len(wait_for_log(cluster.broker, "wrong authkey", 2)) == 2


def test_versions_that_would_break_pickles_are_refused(cluster):
    other_major = {**VERSIONS, "cloudpickle": "%d.0.0" % (int(VERSIONS["cloudpickle"].split(".")[0]) + 1)}
    sock, *_, verdict = handshake(cluster.address, versions=other_major)
    sock.close()
    assert verdict == {"refused": "version", **VERSIONS}
    line, = wait_for_log(cluster.broker, "version mismatch")
    assert f"cloudpickle {other_major['cloudpickle']}" in line and f"cloudpickle {VERSIONS['cloudpickle']}" in line
    # Another minor or patch release of cloudpickle, or of mpqueue, is fine.
    for versions in ({**VERSIONS, "cloudpickle": VERSIONS["cloudpickle"].split(".")[0] + ".0.0"},
                     {**VERSIONS, "mpqueue": "0.0.1"}):
        sock, *_, verdict = handshake(cluster.address, versions=versions)
        sock.close()
        assert verdict["ok"] is True


def test_another_message_protocol_is_refused_at_either_end(cluster, monkeypatch):
    """A peer whose messages differ (an older mpqueue of the same version
    number) is refused with a version mismatch, not met with a TypeError at
    its first call."""
    older = {k: v for k, v in VERSIONS.items() if k != "protocol"}
    sock, *_, verdict = handshake(cluster.address, versions=older)
    sock.close()
    assert verdict == {"refused": "version", **VERSIONS}
    line, = wait_for_log(cluster.broker, "version mismatch")
    assert "(protocol 1)" in line and f"(protocol {PROTOCOL})" in line

    # A broker that speaks the handshake but not this protocol: it says no versions.
    from mpqueue import VersionMismatch
    from mpqueue import handshake as hs
    server = socket.create_server(("127.0.0.1", 0))
    key = os.environ["MPQUEUE_AUTHKEY"].encode()

    def old_broker():
        conn, _ = server.accept()
        with conn:
            challenge = hs._send_frame(conn, {"nonce": "ab" * 32})
            hello, _ = hs._recv_frame(conn, time.monotonic() + 5)
            hs._recv_frame(conn, time.monotonic() + 5)
            hs._send_frame(conn, {"ok": True, "proof": hs._proof(key, b"broker", hello, challenge)})
            conn.recv(1)

    threading.Thread(target=old_broker, daemon=True).start()
    with pytest.raises(VersionMismatch, match=r"runs an older mpqueue \(protocol 1\)"):
        Client("127.0.0.1:%d" % server.getsockname()[1])
    server.close()


def raises(x):
    raise KeyError(x)


def test_jobs_pickles_and_status_versions_through_the_handshake(cluster):
    cluster.start_worker(1)
    client = cluster.client()
    offset = 10
    assert client.submit(lambda x: x + offset, 5).result(10) == 15    # a closure: cloudpickle
    with pytest.raises(KeyError, match="remote"):
        client.submit(raises, "remote").result(10)
    worker, = cluster.status()["workers"]
    assert (worker["version"], worker["python"], worker["cloudpickle"]) == (
        VERSIONS["mpqueue"], VERSIONS["python"], VERSIONS["cloudpickle"])
    table = cluster.run("status", cluster.address, "--wide")
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()[1:3]     # then the packages jobs needed
    assert header.split()[-4:] == ["VERSION", "PYTHON", "CLOUDPICKLE", "SEEN"]
    assert row.split()[-4:-1] == [VERSIONS["mpqueue"], VERSIONS["python"], VERSIONS["cloudpickle"]]


LEGACY_PEERS = """
import multiprocessing.connection, multiprocessing.managers, os
host, port = os.environ["BROKER"].rsplit(":", 1)
address, key = (host, int(port)), os.environ["MPQUEUE_AUTHKEY"].encode()
for name, connect in [
        ("Client", lambda: multiprocessing.connection.Client(address, authkey=key)),
        ("BaseManager", lambda: multiprocessing.managers.BaseManager(address, key).connect())]:
    try:
        connect()
        print(name, "connected")
    except Exception as e:
        print(name, "refused:", type(e).__name__)
"""


def test_legacy_multiprocessing_peers_are_refused(cluster):
    """The stdlib's own handshake (HMAC-MD5 up to 3.11) gets nowhere, and the broker goes on."""
    result = python(LEGACY_PEERS, env={"BROKER": cluster.address})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [["Client", "refused:"], ["BaseManager", "refused:"]]
    refused = wait_for_log(cluster.broker, "refused a connection", 2)
    assert len(refused) == 2 and "Traceback" not in logs(cluster.broker)
    cluster.start_worker(1)
    assert cluster.client().submit(abs, -3).result(10) == 3


def test_wrong_key_is_one_line_at_each_end(cluster):
    line = one_line_error(cluster.run("status", cluster.address, env={"MPQUEUE_AUTHKEY": "wrong"}))
    assert "different authkeys" in line
    broker_line, = wait_for_log(cluster.broker, "wrong authkey")
    assert "refused a connection from 127.0.0.1:" in broker_line


def other_python() -> Path:
    if not os.access(OTHER_PYTHON, os.X_OK):
        pytest.skip(f"{OTHER_PYTHON} is not installed (pyenv)")
    if subprocess.run([OTHER_PYTHON, "-c", "import cloudpickle, click, psutil"],
                      capture_output=True).returncode != 0:
        pytest.skip(f"{OTHER_PYTHON} lacks mpqueue's dependencies: .ci/run installs them")
    return OTHER_PYTHON


MISMATCHED_CLIENT = """
import sys, mpqueue
try:
    mpqueue.Client(sys.argv[1])
except mpqueue.VersionMismatch as e:
    print(e)
"""


def test_a_client_and_a_worker_on_another_python_are_refused(cluster):
    other = other_python()
    theirs = subprocess.run([other, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                            capture_output=True, text=True).stdout.strip()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([other, "-c", MISMATCHED_CLIENT, cluster.address], capture_output=True,
                            text=True, timeout=30, env=env)
    assert result.returncode == 0, result.stderr
    assert f"Python {VERSIONS['python']}" in result.stdout and f"Python {theirs}" in result.stdout
    worker = subprocess.run([other, "-m", "mpqueue", "worker", cluster.address, "--procs", "1"],
                            capture_output=True, text=True, timeout=30, env=env)
    line = one_line_error(worker)
    assert line.startswith("Error: ") and f"Python {theirs}" in line and f"Python {VERSIONS['python']}" in line
    lines = wait_for_log(cluster.broker, "version mismatch", 2)
    assert all(f"Python {theirs}" in line and f"Python {VERSIONS['python']}" in line for line in lines)
    assert cluster.status()["workers"] == []


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A CA with a broker and a member certificate, and a stranger from another CA."""
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.crt", "-days", "2",
                "-subj", f"/CN=mpqueue test {ca}")
    for name, ca in (("broker", "ca"), ("member", "ca"), ("stranger", "other-ca")):
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
                "-CAcreateserial", "-out", f"{name}.crt", "-days", "2")
    return {p.stem + p.suffix.replace(".", "_"): p for p in d.iterdir()}


def tls_args(pki, name: str, ca: str = "ca") -> list[str]:
    return ["--tls-cert", str(pki[f"{name}_crt"]), "--tls-key", str(pki[f"{name}_key"]),
            "--tls-ca", str(pki[f"{ca}_crt"])]


NO_TLS_ENV = {"MPQUEUE_TLS_CERT": "", "MPQUEUE_TLS_KEY": "", "MPQUEUE_TLS_CA": ""}


@pytest.fixture
def tls_broker(empty, pki):
    empty.start_broker(*tls_args(pki, "broker"))
    return empty


def test_tls_end_to_end(tls_broker, pki, monkeypatch):
    for name, path in (("CERT", "member_crt"), ("KEY", "member_key"), ("CA", "ca_crt")):
        monkeypatch.setenv(f"MPQUEUE_TLS_{name}", str(pki[path]))
    assert "TLS with certificate" in logs(tls_broker.broker)
    tls_broker.start_worker(1)                           # the variables, for worker and status
    offset = 1
    assert tls_broker.client().submit(lambda x: x + offset, 1).result(10) == 2
    blob = os.urandom(300 << 10)        # out of band both ways, in TLS records
    assert tls_broker.client().submit(lambda b: b[::-1], blob).result(10) == blob[::-1]
    result = tls_broker.run("status", tls_broker.address, "--json", *tls_args(pki, "member"),
                            env=NO_TLS_ENV)                 # the options
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["workers"]) == 1
    result = tls_broker.run("shutdown", tls_broker.address, *tls_args(pki, "member"), env=NO_TLS_ENV)
    assert result.returncode == 0, result.stderr
    assert tls_broker.broker.wait(20) == 0
    assert "refused" not in logs(tls_broker.broker)


NO_CERTIFICATE = """
import os, socket, ssl
host, port = os.environ["BROKER"].rsplit(":", 1)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname = False
context.load_verify_locations(os.environ["CA"])
try:
    with context.wrap_socket(socket.create_connection((host, int(port)), timeout=5)) as s:
        print("read", s.recv(1024))
except (ssl.SSLError, ConnectionError) as e:
    print("refused:", e)
"""


def test_tls_refuses_peers_without_the_cluster_certificate(tls_broker, pki):
    broker = tls_broker.broker
    # Plain TCP: told the broker wants TLS, in one line.
    line = one_line_error(tls_broker.run("status", tls_broker.address))
    assert "requires TLS" in line
    wait_for_log(broker, "it does not use TLS")
    # No client certificate (a peer with the CA only).
    result = python(NO_CERTIFICATE, env={"BROKER": tls_broker.address, "CA": str(pki["ca_crt"])})
    assert result.stdout.startswith("refused:") or result.stdout == "read b''\n", result
    wait_for_log(broker, "TLS handshake failed", 1)
    # A certificate from another CA.
    line = one_line_error(tls_broker.run("status", tls_broker.address, *tls_args(pki, "stranger"),
                                         env=NO_TLS_ENV))
    assert "TLS" in line
    wait_for_log(broker, "TLS handshake failed", 2)
    # A client that does not trust the broker's CA refuses the broker.
    line = one_line_error(tls_broker.run("status", tls_broker.address,
                                         *tls_args(pki, "member", ca="other-ca"), env=NO_TLS_ENV))
    assert "CERTIFICATE_VERIFY_FAILED" in line
    # Half of the settings is an error of ours, not a plaintext connection.
    line = one_line_error(tls_broker.run("status", tls_broker.address, "--tls-ca", str(pki["ca_crt"]),
                                         env=NO_TLS_ENV))
    assert "MPQUEUE_TLS_CERT is not set" in line
    # Through all of it, the broker served on.
    assert "Traceback" not in logs(broker)
    result = tls_broker.run("status", tls_broker.address, *tls_args(pki, "member"), env=NO_TLS_ENV)
    assert result.returncode == 0, result.stderr


def test_a_tls_client_to_a_plain_broker_is_one_line(cluster, pki):
    line = one_line_error(cluster.run("status", cluster.address, *tls_args(pki, "member"),
                                      env=NO_TLS_ENV))
    assert "TLS" in line
    wait_for_log(cluster.broker, "it uses TLS, and this broker does not")


def test_a_broker_off_loopback_needs_a_configured_key(empty, monkeypatch, tmp_path):
    monkeypatch.delenv("MPQUEUE_AUTHKEY")
    line = one_line_error(empty.run("broker", "--host", "0.0.0.0", "--port", "0", timeout=15))
    assert "refusing to listen on 0.0.0.0" in line and "MPQUEUE_AUTHKEY" in line
    assert not (tmp_path / "config" / "mpqueue" / "authkey").exists()
    # With a key of one's own it listens, and warns that the traffic is in the clear.
    empty.start_broker("--host", "0.0.0.0", env={"MPQUEUE_AUTHKEY": "chosen"})
    assert "without TLS" in logs(empty.broker)


def test_half_open_connections_neither_block_real_clients_nor_stay(empty):
    empty.start_broker(env={"MPQUEUE_CONNECT_TIMEOUT": "2"})
    empty.start_worker(1)
    start, first_drop = time.monotonic(), None
    flood = [socket.create_connection(host_port(empty.address), timeout=5) for _ in range(500)]
    try:
        for s in flood:
            read_frame(s)           # the broker's nonce: each is being handshaken now
        with Client(empty.address) as client:
            assert client.submit(abs, -7).result(10) == 7
        for s in flood:             # still open: the job did not wait for them to go
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.recv(1)
        # Then each is dropped, connect_timeout after it was accepted.
        for s in flood:
            s.settimeout(max(0.1, start + 6 - time.monotonic()))
            assert s.recv(1) == b""
            first_drop = first_drop or time.monotonic()
        assert first_drop - start > 1.9
    finally:
        for s in flood:
            s.close()
    assert len(wait_for_log(empty.broker, "no handshake within 2 s", 500)) == 500
    with Client(empty.address) as client:
        assert client.submit(abs, -8).result(10) == 8


@pytest.mark.parametrize("message", [
    struct.pack("!i", -1) + struct.pack("!Q", 1 << 40),     # says a terabyte follows
    struct.pack("!i", 14) + b"\x80\x05not a pickle",         # does not unpickle
], ids=["oversize", "malformed"])
def test_a_bad_message_after_the_handshake_closes_that_connection_only(cluster, message):
    cluster.start_worker(1)
    client = cluster.client()
    assert client.submit(abs, -1).result(10) == 1
    sock, *_, verdict = handshake(cluster.address)
    with sock:
        assert verdict["ok"] is True
        request = cloudpickle.dumps((None, "accept_connection", ("bad",), {}))
        sock.sendall(struct.pack("!i", len(request)) + request)
        read_frame(sock)            # ('#RETURN', None): served now
        sock.sendall(message)
        ready, _, _ = select.select([sock], [], [], 5)
        assert ready and sock.recv(1) == b"", "the broker should close this connection"
    wait_for_log(cluster.broker, "closed the connection from")
    assert client.submit(abs, -2).result(10) == 2       # the client's connections are untouched
    assert "Traceback" not in logs(cluster.broker)


def test_processes_on_the_brokers_host_use_its_local_socket_unless_it_is_off(empty):
    empty.start_broker()
    empty.start_worker(1)
    client = empty.client()
    assert client.submit(abs, -1).result(10) == 1
    assert [w["address"] for w in empty.status()["workers"]] == ["local"]
    # Only a peer that proved the key learns it: the name, and the pid that must hold it.
    sock, *_, verdict = handshake(empty.address)
    sock.close()
    assert verdict["local"][1] == empty.broker.pid
    mine = {c.laddr for c in psutil.Process().net_connections("unix")}
    assert "\0" + verdict["local"][0] not in mine     # ours are its peers, unnamed

    empty.start_broker(env={"MPQUEUE_LOCAL_SOCKET": "0"})
    empty.start_worker(1)
    assert Client(empty.address).submit(abs, -2).result(10) == 2
    assert [w["address"] for w in empty.status()["workers"]] == ["127.0.0.1"]
    sock, *_, verdict = handshake(empty.address)
    sock.close()
    assert "local" not in verdict


def test_whoever_takes_a_gone_brokers_local_socket_name_is_sent_nothing(cluster):
    """The name of a broker's local socket is free again once it exits. A
    process that knew it must not take whoever binds it next for the broker:
    it would hand that process its handshake, then its pickles."""
    address, key = host_port(cluster.address), os.environ["MPQUEUE_AUTHKEY"].encode()
    wire.connect(address, key).close()       # learns the local socket, and uses it
    name = wire._local_sockets[address][0]
    cluster.broker.kill()
    cluster.broker.wait(10)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as squatter:
        squatter.bind("\0" + name)
        squatter.listen(8)
        cluster.start_broker("--port", str(address[1]))
        wire.connect(address, key).close()   # tries the name it knew, then TCP
        squatter.settimeout(5)
        conn = squatter.accept()[0]
        with conn:
            conn.settimeout(5)
            assert conn.recv(1024) == b"", "it should have closed without a word"
    cluster.start_worker(1)
    assert cluster.client().submit(abs, -3).result(10) == 3


def test_the_local_socket_is_trusted_only_if_its_holder_is_the_broker_itself(cluster):
    """A pid number can come round again (pid reuse, or another pid
    namespace): the process holding the name must also have the broker's
    start time, on the same boot."""
    address, key = host_port(cluster.address), os.environ["MPQUEUE_AUTHKEY"].encode()
    sock, *_, verdict = handshake(cluster.address)
    sock.close()
    name, pid, identity = verdict["local"]
    assert pid == cluster.broker.pid and identity == wire.process_identity(pid)
    conn = wire._connect_local((name, pid, identity), address, key, None)
    assert conn is not None
    conn.close()
    assert wire._connect_local((name, pid, identity + "0"), address, key, None) is None
    time.sleep(0.5)
    assert "refused" not in logs(cluster.broker)     # it closed at once: no warning for that


def test_a_wrong_key_traceback_shows_no_internals_of_ours(cluster):
    """The client's error, printed as Python prints it, is our one refusal:
    no chained AttributeError from the stdlib's per-thread connection lookup."""
    with pytest.raises(AuthenticationError) as info:
        Client(cluster.address, authkey="not-the-key")
    printed = "".join(traceback.format_exception(info.value))
    assert "ForkAwareLocal" not in printed and "During handling" not in printed


def test_the_dashboard_serves_https_with_the_brokers_certificate(empty, pki):
    empty.start_broker(*tls_args(pki, "broker"), "--dashboard", "0")
    url = empty.broker.stdout.readline().decode().strip()   # printed with the first line
    assert url.startswith("https://127.0.0.1:"), url
    context = ssl.create_default_context(cafile=str(pki["ca_crt"]))
    context.check_hostname = False      # the test's certificate names no address; its chain is checked
    # Python 3.13's default context is X.509-strict, which wants a keyUsage
    # the test's throwaway CA (openssl req -x509 as is) does not carry.
    context.verify_flags &= ~getattr(ssl, "VERIFY_X509_STRICT", 0)
    base, token = url.split("/?token=")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{base}/metrics", context=context, timeout=10)
    assert refused.value.code == 401
    request = urllib.request.Request(f"{base}/metrics", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, context=context, timeout=10) as answer:
        assert b"mpqueue_jobs_submitted_total 0" in answer.read()
