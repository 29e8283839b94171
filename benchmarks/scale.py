"""How the broker scales: many workers, each on a host of its own, and many queued jobs.

Run from the repository root, as root (for the network namespaces)::

    python benchmarks/scale.py              # 50 workers, 30 s idle windows
    python benchmarks/scale.py --workers 20 --queued 50000 --idle 10

Four measurements, on one broker subprocess (``python -m mpqueue broker``):

memory      The broker's RSS before and after queuing ``--queued`` jobs whose
            argument pickles to ~100 bytes, with no worker connected: bytes of
            broker memory per queued job. (On loopback: no namespaces needed.)
CPU per job 10,000 no-op jobs (W1: one ``submit`` each, then gather) with one
            worker of 1 proc, then with ``--workers`` workers of ``--procs``
            procs (1) each: the broker's CPU time (user + system, from
            psutil) over the run, per job, and their ratio. With 50 workers and their 50 children
            on a 2-core machine, wall-clock jobs/s is set by the machine, not
            by the broker; its CPU per job is what tells whether more workers
            cost it more per job. Printed with the jobs/s for reference.
idle cost   The broker's CPU over ``--idle`` seconds with no worker, then
            with ``--workers`` idle workers connected: the difference per
            worker, in percent of one core.
capacity    Jobs of ``time.sleep(T)`` for T = 10 ms, 100 ms and 1 s over the
            ``--workers`` workers (about 8 s of them each, after a warm-up): the broker's CPU
            per job again. Sleeping jobs leave the cores to the broker and
            keep every worker busy as real jobs of that length would; the
            broker's cost per job depends on their length (a worker holds
            fewer of long jobs, so fetches and reports carry fewer), not on
            what they do. One broker core carries 1 / (CPU per job) jobs/s,
            hence T / (CPU per job) busy worker processes.

The last two run over TCP between network namespaces, as on real hosts::

                            namespace RUN-sw, bridge br0
            ┌──────────────┬───────┴──────┬──────────────┬─── ... ───┐
          v-br           v-c           v-w1           v-w2          v-wN
            │              │              │              │              │
        RUN-br eth0    RUN-c eth0    RUN-w1 eth0    RUN-w2 eth0    RUN-wN eth0
        10.232.0.1     10.232.0.2    10.232.1.1     10.232.1.2     10.232.x.y
        broker         client        worker 1       worker 2       worker N

One namespace per worker: each worker has an address and TCP connections of
its own, as on N hosts, and none reaches the broker's local (Unix) socket,
which only processes in the broker's namespace are offered. A namespace costs
one veth pair and no CPU; fewer namespaces with several workers each would
look the same to the broker (one connection per worker thread either way),
but N hosts is the case we claim. The broker listens on its bridge address
(``--host``), so it needs an authkey: a fresh one, in ``$MPQUEUE_AUTHKEY``
of every process. The client runs this script again (``--client``) in its
namespace. Nothing is added to the root namespace, and traffic stays inside
these namespaces. Without root or iproute2 the namespace measurements are
skipped, saying why.

Every process it starts is stopped in ``finally`` (by PID: terminate, wait,
kill), and every namespace it made is deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import time

import psutil
from netns import ROOT, Namespaces, stop

from mpqueue import Client

MPQUEUE = [sys.executable, "-m", "mpqueue"]
BROKER_IP, CLIENT_IP = "10.232.0.1", "10.232.0.2"
SLEEPS = (0.01, 0.1, 1.0)       # job lengths of the capacity measurement, in seconds


def worker_ip(i: int) -> str:
    """Worker ``i``'s address (from 0), on the /16 the bridge joins."""
    return f"10.232.{1 + i // 250}.{1 + i % 250}"


def cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def w1(client: Client, jobs: int, seconds: float = 0.0) -> float:
    """W1: ``jobs`` no-op jobs (or of ``time.sleep(seconds)``), one submit
    each, then all gathered: jobs/s."""
    start_time = time.perf_counter()
    futures = [client.submit(time.sleep, seconds) if seconds else client.submit(abs, -i) for i in range(jobs)]
    for f in futures:
        f.result(300)
    return jobs / (time.perf_counter() - start_time)


def client_main(address: str, jobs: int, seconds: float) -> int:
    """``--client``: warm up, say ``ready``, run W1 on a line from stdin, print jobs/s.

    The warm-up is a W1 of a fifth as many jobs, so that every worker has run
    the function and measured its time: until then a worker prefetches 2 jobs
    per proc and runs the function's first job alone. The timed run is the
    steady state, with 1 worker and with many alike."""
    with Client(address) as client:
        w1(client, max(1, jobs // 5), seconds)
        print("ready", flush=True)
        sys.stdin.readline()
        print(json.dumps(w1(client, jobs, seconds)), flush=True)
    return 0


class Net(Namespaces):
    """The namespaces of one run, and the processes it starts in them."""

    def __init__(self, ip: str, env: dict):
        super().__init__(ip, env, "mpqs")

    def build(self, workers: int) -> None:
        switch = self.add("sw")
        self.sh("-n", switch, "link", "add", "br0", "type", "bridge")
        self.sh("-n", switch, "link", "set", "br0", "up")
        hosts = {"br": BROKER_IP, "c": CLIENT_IP, **{f"w{i}": worker_ip(i) for i in range(workers)}}
        for role, address in hosts.items():
            ns = self.add(role)
            self.sh("-n", switch, "link", "add", f"v-{role}", "type", "veth",
                    "peer", "name", "eth0", "netns", ns)
            self.sh("-n", ns, "addr", "add", f"{address}/16", "dev", "eth0")
            self.sh("-n", ns, "link", "set", "eth0", "up")
            self.sh("-n", switch, "link", "set", f"v-{role}", "master", "br0", "up")

    def workers(self, address: str, n: int, procs: int = 1) -> list[subprocess.Popen]:
        return [self.popen(f"w{i}", [*MPQUEUE, "worker", address, "--procs", str(procs)]) for i in range(n)]

    def registered(self, address: str) -> int:
        out = subprocess.run([self.ip, "netns", "exec", self.ns("c"), *MPQUEUE, "status", address, "--json"],
                             env=self.env, capture_output=True, text=True, cwd=ROOT)
        return len(json.loads(out.stdout)["workers"]) if out.returncode == 0 else 0

    def wait_for_workers(self, address: str, n: int, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while self.registered(address) != n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{n} workers did not register within {timeout} s")
            time.sleep(0.5)


def broker_cpu_per_job(net: Net, address: str, broker: psutil.Process, jobs: int,
                       seconds: float = 0.0) -> tuple[float, float]:
    """W1 (of ``time.sleep(seconds)`` jobs, if given) from a client in
    namespace c: (jobs/s, broker CPU seconds per job)."""
    client = net.popen("c", [sys.executable, os.path.abspath(__file__), "--client", address,
                             "--jobs", str(jobs), "--seconds", str(seconds)],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        if client.stdout.readline().strip() != "ready":
            raise RuntimeError("the client did not get ready")
        before = cpu(broker)
        client.stdin.write("go\n")
        client.stdin.flush()
        rate = json.loads(client.stdout.readline())
        used = cpu(broker) - before
        client.stdin.close()
        client.wait(60)
    finally:
        stop([client])
    return rate, used / jobs


def idle_cpu(broker: psutil.Process, seconds: float) -> float:
    """The broker's CPU over ``seconds``, as a fraction of one core."""
    before = cpu(broker)
    time.sleep(seconds)
    return (cpu(broker) - before) / seconds


def namespaces(args: argparse.Namespace, env: dict) -> dict | None:
    """CPU per job and idle cost in namespaces; None (saying why) where they cannot be made."""
    ip = shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip") if os.access(p, os.X_OK)), None)
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or ip is None:
        print("skipping the namespace measurements: they need Linux, root and iproute2 (`ip`)")
        return None
    net = Net(ip, env)
    try:
        try:
            net.build(args.workers)
        except subprocess.CalledProcessError as e:
            print(f"skipping the namespace measurements: `{' '.join(e.cmd)}` failed: {e.stderr.strip()}")
            return None
        broker_proc = net.popen("br", [*MPQUEUE, "broker", "--host", BROKER_IP, "--port", "0"],
                                stdout=subprocess.PIPE, text=True)
        address = broker_proc.stdout.readline().rsplit("listening on", 1)[1].split()[0]
        broker = psutil.Process(broker_proc.pid)
        time.sleep(1)
        alone = idle_cpu(broker, args.idle)

        one = net.workers(address, 1)
        net.wait_for_workers(address, 1)
        single = broker_cpu_per_job(net, address, broker, args.jobs)
        stop(one)

        many = net.workers(address, args.workers, args.procs)
        net.wait_for_workers(address, args.workers)
        time.sleep(2)       # their first heartbeats and fetches settle
        idle = idle_cpu(broker, args.idle)
        spread = broker_cpu_per_job(net, address, broker, args.jobs)
        sleeping = {t: broker_cpu_per_job(net, address, broker, round(args.workers * args.procs * 8 / t), t)
                    for t in SLEEPS}
        stop(many)      # workers first: they unregister from a live broker
    finally:
        net.close()
    return {"single": single, "spread": spread, "alone": alone, "idle": idle, "sleeping": sleeping}


def memory_per_job(queued: int, env: dict) -> float:
    """Bytes of broker RSS per queued job (~100-byte argument), no worker connected."""
    broker = subprocess.Popen([*MPQUEUE, "broker", "--port", "0"], env=env, cwd=ROOT, stdout=subprocess.PIPE)
    try:
        address = broker.stdout.readline().decode().rsplit("listening on", 1)[1].split()[0]
        rss = psutil.Process(broker.pid).memory_info().rss
        with Client(address) as client:
            argument = os.urandom(60)   # pickles, with the call's tuple, to ~100 bytes
            futures = [client.submit(len, argument) for _ in range(queued)]
            deadline = time.monotonic() + 60
            while (json.loads(subprocess.run(
                    [*MPQUEUE, "status", address, "--json"], env=env,
                    capture_output=True, text=True, cwd=ROOT).stdout)["queued"] < queued):
                if time.monotonic() > deadline:
                    raise RuntimeError("jobs did not all reach the broker")
                time.sleep(0.2)
            per_job = (psutil.Process(broker.pid).memory_info().rss - rss) / queued
            client.shutdown(cancel_futures=True)
        del futures
    finally:
        stop([broker])
    return per_job


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=50)
    parser.add_argument("--procs", type=int, default=1, help="procs of each of the --workers workers")
    parser.add_argument("--queued", type=int, default=100_000)
    parser.add_argument("--jobs", type=int, default=10_000, help="W1's jobs per run")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of each idle window")
    parser.add_argument("--client", metavar="ADDRESS", help=argparse.SUPPRESS)   # the run in namespace c
    parser.add_argument("--seconds", type=float, default=0.0, help=argparse.SUPPRESS)  # its jobs' sleep
    args = parser.parse_args()
    if args.client:
        return client_main(args.client, args.jobs, args.seconds)
    env = dict(os.environ, MPQUEUE_AUTHKEY=secrets.token_hex(16), MPQUEUE_LOG_LEVEL="WARNING")
    env.pop("MPQUEUE_ADDRESS", None)
    os.environ.update(MPQUEUE_AUTHKEY=env["MPQUEUE_AUTHKEY"])   # this process's clients

    per_job = memory_per_job(args.queued, env)
    print(f"broker memory per queued job (~100-byte argument): {per_job:,.0f} bytes "
          f"({args.queued:,} jobs queued)")
    found = namespaces(args, env)
    if found is None:
        return 0
    (rate1, cpu1), (rate_n, cpu_n) = found["single"], found["spread"]
    print(f"W1, {args.jobs:,} jobs, 1 worker x 1 proc:   {rate1:>7,.0f} jobs/s, "
          f"broker CPU {cpu1 * 1e6:.0f} us/job")
    shape = f"{args.workers} workers x {args.procs} proc{'s' if args.procs > 1 else ''}"
    print(f"W1, {args.jobs:,} jobs, {shape}: {rate_n:>7,.0f} jobs/s, broker CPU "
          f"{cpu_n * 1e6:.0f} us/job ({cpu_n / cpu1:.2f}x the CPU per job of 1 worker)")
    per_worker = (found["idle"] - found["alone"]) / args.workers
    print(f"idle broker over {args.idle:.0f} s: {found['alone'] * 100:.3f}% of a core alone, "
          f"{found['idle'] * 100:.3f}% with {args.workers} idle workers: {per_worker * 100:.4f}% per worker")
    for t, (rate, used) in found["sleeping"].items():
        print(f"jobs of {t * 1000:,.0f} ms, {shape}: {rate:>6,.0f} jobs/s, "
              f"broker CPU {used * 1e6:.0f} us/job: one broker core carries {1 / used:,.0f} jobs/s, "
              f"{t / used:,.0f} busy worker procs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
