"""Multi-host, proven on one machine: the broker, two workers and a client each
in a network namespace of its own, with an address of its own.

::

                           namespace RUN-sw, bridge br0
           ┌───────────────┬───────┴───────┬───────────────┐
         v-br            v-a             v-b             v-c      veth ends on the bridge
           │               │               │               │
       RUN-br eth0     RUN-a eth0      RUN-b eth0      RUN-c eth0
       10.231.0.1      10.231.0.2      10.231.0.3      10.231.0.4
       broker          worker a        worker b        client; `mpqueue status`

Nothing is added to the root namespace: the test subnet exists only in these
namespaces, so it cannot clash with the machine's networks, and traffic stays
inside them. RUN is ``mpq`` and a random suffix, so that runs side by side, or
one left over from a killed run, never meet. A worker's link is cut with
``ip link set ... down`` at the switch's end (a cable pulled at the switch) or
at the host's own, which also takes away the host's route.

Jobs append ``x address start|end time`` to a log file (the namespaces share
the filesystem) and return ``(x * x, address)``, the address being the one the
job's own network namespace uses to reach the broker (``no-route`` while its
host's own link is down).

Timing settings are shortened for every process: heartbeats every 0.5 s, a
worker presumed lost after 3 s of silence.

Needs root and iproute2; skips, saying why, where namespaces cannot be made.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from helpers import kill_tree, read_line, wait_for_status

pytestmark = pytest.mark.netns      # every test here runs in network namespaces (`net`)

SUBNET = "10.231.0"
ADDRESSES = {"br": f"{SUBNET}.1", "a": f"{SUBNET}.2", "b": f"{SUBNET}.3", "c": f"{SUBNET}.4"}
HEARTBEAT_TIMEOUT = 3.0
MPQUEUE = [sys.executable, "-m", "mpqueue"]

# The client, run in namespace c. Each line on stdin, `FIRST N SECONDS`, maps
# the job over FIRST..FIRST+N-1; the results come back as one JSON line.
CLIENT = textwrap.dedent("""
    import json, socket, sys, time
    from mpqueue import Client

    ADDRESS, LOG = sys.argv[1], sys.argv[2]

    def job(x, seconds):
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((ADDRESS.rsplit(":", 1)[0], 9))   # a route lookup: nothing is sent
                me = s.getsockname()[0]
        except OSError:
            me = "no-route"     # this host's own link is down
        with open(LOG, "a") as f:
            f.write(f"{x} {me} start {time.time()}\\n")
        time.sleep(seconds)
        with open(LOG, "a") as f:
            f.write(f"{x} {me} end {time.time()}\\n")
        return x * x, me

    with Client(ADDRESS) as client:
        print("ready", flush=True)
        for line in sys.stdin:
            first, n, seconds = line.split()
            xs = range(int(first), int(first) + int(n))
            print(json.dumps(list(client.map(job, xs, [float(seconds)] * len(xs)))), flush=True)
""")


def find_ip() -> str | None:
    return shutil.which("ip") or next(
        (p for p in ("/usr/sbin/ip", "/sbin/ip") if os.access(p, os.X_OK)), None)


class Net:
    """The namespaces of one test, and the processes it runs in them."""

    def __init__(self, ip: str, tmp_path: Path):
        self.ip = ip
        self.tmp_path = tmp_path
        self.run_id = "mpq" + uuid.uuid4().hex[:8]
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.address: str | None = None     # the broker's HOST:PORT
        self.log = tmp_path / "jobs.log"
        self.log.touch()

    def ns(self, role: str) -> str:
        return f"{self.run_id}-{role}"

    def sh(self, *args: str) -> None:
        subprocess.run([self.ip, *args], check=True, capture_output=True, text=True, timeout=10)

    def build(self) -> None:
        switch = self._namespace("sw")
        self.sh("-n", switch, "link", "add", "br0", "type", "bridge")
        self.sh("-n", switch, "link", "set", "br0", "up")
        for role, address in ADDRESSES.items():
            ns = self._namespace(role)
            self.sh("-n", switch, "link", "add", f"v-{role}", "type", "veth",
                    "peer", "name", "eth0", "netns", ns)
            self.sh("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            self.sh("-n", ns, "link", "set", "eth0", "up")
            self.sh("-n", switch, "link", "set", f"v-{role}", "master", "br0", "up")

    def _namespace(self, role: str) -> str:
        name = self.ns(role)
        self.sh("netns", "add", name)
        self.namespaces.append(name)
        self.sh("-n", name, "link", "set", "lo", "up")
        return name

    def link(self, role: str, state: str, end: str = "switch") -> None:
        """Set a host's link ``up`` or ``down``, at the switch's end of its
        cable or at the host's own (which also takes the host's route away)."""
        if end == "switch":
            self.sh("-n", self.ns("sw"), "link", "set", f"v-{role}", state)
        else:
            self.sh("-n", self.ns(role), "link", "set", "eth0", state)

    def popen(self, role: str, command: list[str], name: str, **kwargs) -> subprocess.Popen:
        """Run ``command`` in a namespace; it inherits the test's environment
        (authkey, process tag, timing settings)."""
        log = open(self.tmp_path / f"{name}.log", "w+")
        proc = subprocess.Popen([self.ip, "netns", "exec", self.ns(role), *command], stderr=log, **kwargs)
        proc.log = log
        self.procs.append(proc)
        return proc

    def start_broker(self) -> None:
        broker = self.popen("br", [*MPQUEUE, "broker", "--host", ADDRESSES["br"], "--port", "0"],
                            "broker", stdout=subprocess.PIPE)
        line = read_line(broker.stdout, 15)
        assert "listening on" in line, line + logs(broker)
        self.address = line.rsplit("listening on", 1)[1].split()[0]
        assert self.address.startswith(ADDRESSES["br"] + ":")

    def start_workers(self) -> dict[str, subprocess.Popen]:
        workers = {role: self.popen(role, [*MPQUEUE, "worker", self.address, "--procs", "2"],
                                    f"worker-{role}") for role in ("a", "b")}
        self.wait_for(lambda s: len(s["workers"]) == 2, "both workers to register")
        return workers

    def start_client(self) -> subprocess.Popen:
        script = self.tmp_path / "client.py"
        script.write_text(CLIENT)
        client = self.popen("c", [sys.executable, str(script), self.address, str(self.log)], "client",
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert read_line(client.stdout, 15).strip() == "ready", logs(client)
        return client

    def status(self, *args: str) -> subprocess.CompletedProcess:
        """``mpqueue status`` as a user on the client's host types it."""
        return subprocess.run([self.ip, "netns", "exec", self.ns("c"), *MPQUEUE, "status", self.address,
                               *args], capture_output=True, text=True, timeout=30)

    def status_json(self) -> dict:
        result = self.status("--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def wait_for(self, predicate, what: str, timeout: float = 20) -> dict:
        return wait_for_status(self.status_json, predicate, what, timeout)

    def job_log(self) -> list[tuple[int, str, str, float]]:
        """``(x, address, "start" or "end", time)`` for every line jobs wrote."""
        return [(int(x), address, event, float(t))
                for x, address, event, t in map(str.split, self.log.read_text().splitlines())]

    def close(self) -> None:
        """Kill every process started here, with its children, then delete
        the namespaces (their veth pairs and the bridge go with them)."""
        try:
            for proc in reversed(self.procs):
                if proc.poll() is None:
                    kill_tree(proc.pid)     # `ip netns exec` execs: this is the command
            for proc in self.procs:
                proc.wait(10)
                proc.log.close()
                for stream in (proc.stdin, proc.stdout):
                    if stream:
                        stream.close()
        finally:
            left = []
            for ns in reversed(self.namespaces):
                result = subprocess.run([self.ip, "netns", "del", ns], capture_output=True, text=True)
                if result.returncode:
                    left.append(f"{ns}: {result.stderr.strip()}")
            assert not left, "namespaces left behind: " + "; ".join(left)


def logs(proc: subprocess.Popen) -> str:
    proc.log.flush()
    proc.log.seek(0)
    return proc.log.read()


def run_jobs(client: subprocess.Popen, first: int, n: int, seconds: float, timeout: float = 30) -> list:
    """Map the job over ``first..first+n-1`` in the client: ``[[x * x, address], ...]``."""
    send_jobs(client, first, n, seconds)
    return receive_results(client, timeout)


def send_jobs(client: subprocess.Popen, first: int, n: int, seconds: float) -> None:
    client.stdin.write(f"{first} {n} {seconds}\n".encode())
    client.stdin.flush()


def receive_results(client: subprocess.Popen, timeout: float = 30) -> list:
    return json.loads(read_line(client.stdout, timeout))


@pytest.fixture
def net(isolated, tmp_path, monkeypatch):
    """The namespaces above, with nothing running yet; everything is removed after."""
    if not sys.platform.startswith("linux"):
        pytest.skip("network namespaces are Linux only")
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    ip = find_ip()
    if ip is None:
        pytest.skip("no `ip` command (iproute2) to create network namespaces")
    monkeypatch.setenv("MPQUEUE_HEARTBEAT_TIMEOUT", str(HEARTBEAT_TIMEOUT))
    monkeypatch.setenv("MPQUEUE_HEARTBEAT_INTERVAL", "0.5")
    n = Net(ip, tmp_path)
    try:
        try:
            n.build()
        except subprocess.CalledProcessError as e:
            pytest.skip(f"cannot create the test network: `{' '.join(e.cmd)}` failed: {e.stderr.strip()}")
        yield n
    finally:
        n.close()


def test_jobs_spread_over_both_hosts_and_status_shows_their_addresses(net):
    net.start_broker()
    net.start_workers()
    client = net.start_client()

    results = run_jobs(client, 0, 12, 0.3)

    assert [r[0] for r in results] == [x * x for x in range(12)]
    assert {r[1] for r in results} == {ADDRESSES["a"], ADDRESSES["b"]}
    status = net.status_json()
    assert sorted(w["address"] for w in status["workers"]) == [ADDRESSES["a"], ADDRESSES["b"]]
    assert all(w["done"] > 0 for w in status["workers"])
    # Host names are alike in every namespace: only the address tells them apart.
    assert len({w["host"] for w in status["workers"]}) == 1
    table = net.status()
    assert table.returncode == 0, table.stderr
    assert "ADDRESS" in table.stdout
    assert ADDRESSES["a"] in table.stdout and ADDRESSES["b"] in table.stdout


@pytest.mark.parametrize("end", ["switch", "host"])
def test_cut_link_reruns_jobs_on_other_host_and_worker_rejoins(net, end):
    net.start_broker()
    workers = net.start_workers()
    client = net.start_client()
    by_address = {w["address"]: w["id"] for w in net.status_json()["workers"]}
    a = by_address[ADDRESSES["a"]]

    # 8 jobs of 1.5 s on 2 + 2 processes: a worker holds at most 4 (2 running,
    # 2 prefetched), so worker a gets some. Cut its link while they run.
    send_jobs(client, 100, 8, 1.5)
    net.wait_for(lambda s: any(w["id"] == a and w["running"] for w in s["workers"]),
                 "worker a to run jobs")
    net.link("a", "down", end)
    cut = time.time()
    net.wait_for(lambda s: a not in {w["id"] for w in s["workers"]}, "worker a to be presumed lost")
    lost_after = time.time() - cut
    results = receive_results(client)

    assert lost_after < HEARTBEAT_TIMEOUT + 2, lost_after
    assert "presumed lost" in logs(net.procs[0])
    assert [r[0] for r in results] == [x * x for x in range(100, 108)]
    # Every job that had not ended on a when its link was cut ran again on b.
    events = net.job_log()
    ended_on_a = {x for x, address, event, t in events
                  if address == ADDRESSES["a"] and event == "end" and t < cut}
    cut_short = {x for x, address, event, t in events if address == ADDRESSES["a"]} - ended_on_a
    assert cut_short, events
    for x in cut_short:
        assert results[x - 100][1] == ADDRESSES["b"], (x, results)
        assert any(e[:3] == (x, ADDRESSES["b"], "start") and e[3] > cut for e in events), (x, events)

    # Plugged back in, the worker finds it was presumed lost, rejoins, and
    # takes jobs again.
    net.link("a", "up", end)
    restored = time.monotonic()
    status = net.wait_for(lambda s: a in {w["id"] for w in s["workers"]}, "worker a to rejoin", timeout=30)
    rejoined_after = time.monotonic() - restored
    assert {w["id"]: w["address"] for w in status["workers"]}[a] == ADDRESSES["a"]
    assert workers["a"].poll() is None
    assert "rejoining" in logs(workers["a"]), rejoined_after
    first = 200
    while True:
        results = run_jobs(client, first, 8, 0.2)
        assert [r[0] for r in results] == [x * x for x in range(first, first + 8)]
        if ADDRESSES["a"] in {r[1] for r in results}:
            break
        assert time.monotonic() - restored < 30, "worker a ran no jobs after it rejoined"
        first += 8


def test_busy_worker_rejoins_while_its_jobs_still_run(net):
    """A worker with every process busy does not ask for jobs; it must still
    learn that it was presumed lost, and rejoin, before its jobs end."""
    net.start_broker()
    workers = net.start_workers()
    client = net.start_client()
    a = {w["address"]: w["id"] for w in net.status_json()["workers"]}[ADDRESSES["a"]]

    # Jobs of 60 s: each worker holds 4 (2 running, 2 prefetched) and is full.
    # The test ends long before they do; teardown kills them.
    send_jobs(client, 300, 8, 60)
    net.wait_for(lambda s: any(w["id"] == a and (w["running"], w["queued"]) == (2, 2)
                               for w in s["workers"]), "worker a to be full")
    net.link("a", "down")
    net.wait_for(lambda s: a not in {w["id"] for w in s["workers"]}, "worker a to be presumed lost")
    net.link("a", "up")

    net.wait_for(lambda s: any(w["id"] == a and w["running"] == 2 for w in s["workers"]),
                 "worker a to rejoin with its 2 jobs running")
    assert "rejoining" in logs(workers["a"])
    assert not [e for e in net.job_log() if e[2] == "end"]


OFFER = """
import os, socket, sys
from mpqueue import handshake
host, port = sys.argv[1].rsplit(":", 1)
address = (host, int(port))
conn, offered = handshake.open_connection(socket.create_connection(address), address,
                                          os.environ["MPQUEUE_AUTHKEY"].encode(), None)
conn.close()
print("offered" if offered else "not offered")
"""


def test_the_local_socket_is_offered_on_the_brokers_host_only(net):
    """A peer on another host cannot reach the broker's local socket, and
    must not try: whoever holds that name on its own host is not the broker."""
    net.start_broker()
    said = {}
    for role in ("br", "c"):
        result = subprocess.run([net.ip, "netns", "exec", net.ns(role), sys.executable, "-c", OFFER,
                                 net.address], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        said[role] = result.stdout.strip()
    assert said == {"br": "offered", "c": "not offered"}


# -- code and versions (docs/multihost.md) -----------------------------------------
#
# Each host has a directory of its own, its HOME: the client's project (its
# own modules) is there only, and nothing is copied by hand.

CODE_CLIENT = """
import importlib, json, sys
import mpqueue, mylib, helpers_here

with mpqueue.Client(sys.argv[1]) as client:
    print("ready", flush=True)
    for line in sys.stdin:
        name, n = line.split()
        if name == "reload":
            importlib.reload(helpers_here)
            importlib.reload(mylib)
            print("[]", flush=True)
            continue
        out = []
        for future in [client.submit(getattr(mylib, name), x) for x in range(int(n))]:
            try:
                out.append(future.result(60))
            except Exception as e:
                out.append([type(e).__name__, str(e)])
        print(json.dumps(out), flush=True)
"""

MYLIB = f"""
import socket, time
import fakedist, helpers_here

def me():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("{ADDRESSES['br']}", 9))     # a route lookup: nothing is sent
        return s.getsockname()[0]

def f(x):
    time.sleep(0.3)
    return [helpers_here.scale(x), me()]

def with_fakedist(x):
    time.sleep(0.3)
    return [fakedist.VALUE, me()]
"""


def fake_site(path: Path, version: str) -> Path:
    """A directory where `fakedist` is installed at ``version`` (its own metadata)."""
    info = path / f"fakedist-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fakedist\nVersion: {version}\n")
    (info / "RECORD").write_text("fakedist.py,,\n")
    (path / "fakedist.py").write_text("VALUE = 7\n")
    return path


def host_env(home: Path, site: Path) -> dict:
    env = {**os.environ, "HOME": str(home)}
    env.pop("XDG_CACHE_HOME", None)     # each host's own ~/.cache
    env["PYTHONPATH"] = str(site)
    return env


def start_code_client(net: Net, project: Path, scale: str, site: Path) -> subprocess.Popen:
    project.mkdir(parents=True)
    (project / "helpers_here.py").write_text(f"def scale(x):\n    return {scale}\n")
    (project / "mylib.py").write_text(MYLIB)
    (project / "client.py").write_text(CODE_CLIENT)
    client = net.popen("c", [sys.executable, "client.py", net.address], f"client-{project.name}",
                       cwd=project, env=host_env(project.parent, site), stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE)
    assert read_line(client.stdout, 30).strip() == "ready", logs(client)
    return client


def ask(client: subprocess.Popen, line: str) -> None:
    client.stdin.write(f"{line}\n".encode())
    client.stdin.flush()


def start_host_workers(net: Net, sites: dict[str, Path]) -> None:
    for role, site in sites.items():
        home = net.tmp_path / f"host-{role}"
        home.mkdir()
        net.popen(role, [*MPQUEUE, "worker", net.address, "--procs", "2"], f"worker-{role}",
                  cwd=home, env=host_env(home, site))
    net.wait_for(lambda s: len(s["workers"]) == len(sites), "the workers to register")


def test_a_clients_own_modules_run_on_other_hosts_and_an_edit_travels(net):
    net.start_broker()
    site = fake_site(net.tmp_path / "site", "2.0")     # the same everywhere
    start_host_workers(net, {"a": site, "b": site})
    client = start_code_client(net, net.tmp_path / "host-c" / "project", "-x", site)
    other = start_code_client(net, net.tmp_path / "host-c" / "other", "x * 1000", site)

    ask(client, "f 8")
    ask(other, "f 8")       # the same module names, other code, at the same time
    results, theirs = receive_results(client, 60), receive_results(other, 60)
    assert [r[0] for r in results] == [-x for x in range(8)]
    assert [r[0] for r in theirs] == [x * 1000 for x in range(8)]
    assert {r[1] for r in results + theirs} == {ADDRESSES["a"], ADDRESSES["b"]}

    (net.tmp_path / "host-c" / "project" / "helpers_here.py").write_text("def scale(x):\n    return x + 100\n")
    ask(client, "reload 0")
    assert receive_results(client) == []
    ask(client, "f 8")
    assert [r[0] for r in receive_results(client, 60)] == [x + 100 for x in range(8)]
    for role in ("a", "b"):
        cached = list((net.tmp_path / f"host-{role}" / ".cache" / "mpqueue" / "code").glob("*.zip"))
        assert cached, f"nothing shipped to host {role}"
        assert not (net.tmp_path / f"host-{role}" / "mylib.py").exists()


def test_a_package_at_another_version_on_one_host_fails_its_jobs_naming_both(net):
    net.start_broker()
    start_host_workers(net, {"a": fake_site(net.tmp_path / "site-a", "2.0"),
                             "b": fake_site(net.tmp_path / "site-b", "1.0")})
    client = start_code_client(net, net.tmp_path / "host-c" / "project", "x",
                               fake_site(net.tmp_path / "site-c", "2.0"))
    ask(client, "with_fakedist 12")
    results = receive_results(client, 60)
    ran = [r for r in results if r[0] == 7]
    failed = [r for r in results if r[0] == "EnvironmentMismatch"]
    assert ran and failed and len(ran) + len(failed) == 12, results
    assert {r[1] for r in ran} == {ADDRESSES["a"]}
    assert all("fakedist 2.0 on the client, 1.0 on worker host" in r[1] for r in failed), failed
    by_address = {w["address"]: w["packages"] for w in net.status_json()["workers"]}
    assert by_address[ADDRESSES["a"]]["fakedist"] == "2.0"
    assert by_address[ADDRESSES["b"]]["fakedist"] == "1.0"


def test_an_unreachable_broker_says_what_to_check_within_its_bound(net):
    """From the client's host: a broker listening on loopback only, a name
    that resolves nowhere, a port whose packets are dropped."""
    broker = net.popen("br", [*MPQUEUE, "broker", "--port", "0"], "broker", stdout=subprocess.PIPE)
    line = read_line(broker.stdout, 15)
    assert "listening on 127.0.0.1:" in line, line + logs(broker)
    target = f"{ADDRESSES['br']}:{line.rsplit(':', 1)[1].split()[0]}"

    def status(address: str) -> tuple[str, float]:
        started = time.monotonic()
        result = subprocess.run([net.ip, "netns", "exec", net.ns("c"), *MPQUEUE, "status", address],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
        return result.stderr, time.monotonic() - started

    said, took = status(target)
    assert "Connection refused" in said and "unless started with --host" in said and took < 10, (said, took)
    said, took = status("no-such-host.invalid:5555")
    assert "cannot reach the broker at no-such-host.invalid:5555" in said and took < 10, (said, took)
    # Packets to the broker vanish (as a firewall that drops them does):
    # its link is cut, and the client still knows where to send them.
    mac = json.loads(subprocess.run([net.ip, "-j", "-n", net.ns("br"), "link", "show", "eth0"],
                                    capture_output=True, text=True, check=True).stdout)[0]["address"]
    net.sh("-n", net.ns("c"), "neigh", "replace", ADDRESSES["br"], "lladdr", mac, "dev", "eth0", "nud", "permanent")
    net.link("br", "down")
    said, took = status(target)
    assert "a firewall may be dropping port" in said and took < 20, (said, took)
