"""How the broker scales: many workers, many queued jobs.

Run from the repository root::

    python benchmarks/scale.py              # 50 workers
    python benchmarks/scale.py --workers 20 --queued 50000

Two measurements, on one broker subprocess (``python -m mpqueue broker``):

memory      The broker's RSS before and after queuing ``--queued`` jobs whose
            argument pickles to ~100 bytes, with no worker connected: bytes of
            broker memory per queued job.
W1 scale    10,000 no-op jobs (one ``submit`` each, then gather) with one
            worker of 2 procs, then again with ``--workers`` workers of 1 proc
            each connected at once: jobs/s for both, and their ratio. The
            broker must keep W1-level throughput with many workers.

Every process it starts is stopped in ``finally`` (shutdown, then wait,
terminate, kill) and checked for by PID at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import time

import psutil

from mpqueue import Client

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(command: list[str], env: dict, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mpqueue", *command], env=env, cwd=ROOT, **kwargs)


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            for p in [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]:
                p.kill()
            process.wait()


def workers_registered(address: str, env: dict) -> int:
    out = subprocess.run([sys.executable, "-m", "mpqueue", "status", address, "--json"],
                         env=env, capture_output=True, text=True, cwd=ROOT)
    return len(json.loads(out.stdout)["workers"]) if out.returncode == 0 else 0


def wait_for_workers(address: str, env: dict, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while workers_registered(address, env) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"fewer than {n} workers registered after {timeout} s")
        time.sleep(0.5)


def w1(client: Client, jobs: int = 10_000) -> float:
    client.submit(abs, -1).result(60)
    start_time = time.perf_counter()
    futures = [client.submit(abs, -i) for i in range(jobs)]
    for f in futures:
        f.result(120)
    return jobs / (time.perf_counter() - start_time)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=50)
    parser.add_argument("--queued", type=int, default=100_000)
    args = parser.parse_args()
    key = secrets.token_hex(16)
    env = dict(os.environ, MPQUEUE_AUTHKEY=key, MPQUEUE_LOG_LEVEL="WARNING")
    env.pop("MPQUEUE_ADDRESS", None)
    processes: list[subprocess.Popen] = []
    try:
        broker = start(["broker", "--port", "0"], env, stdout=subprocess.PIPE)
        processes.append(broker)
        address = broker.stdout.readline().decode().rsplit("listening on", 1)[1].split()[0]
        rss = psutil.Process(broker.pid).memory_info().rss

        # Memory per queued job: no worker yet, so everything stays queued.
        with Client(address, authkey=key) as client:
            argument = os.urandom(60)   # pickles, with the call's tuple, to ~100 bytes
            futures = [client.submit(len, argument) for _ in range(args.queued)]
            deadline = time.monotonic() + 60
            while (json.loads(subprocess.run(
                    [sys.executable, "-m", "mpqueue", "status", address, "--json"], env=env,
                    capture_output=True, text=True, cwd=ROOT).stdout)["queued"] < args.queued):
                if time.monotonic() > deadline:
                    raise RuntimeError("jobs did not all reach the broker")
                time.sleep(0.2)
            per_job = (psutil.Process(broker.pid).memory_info().rss - rss) / args.queued
            client.shutdown(cancel_futures=True)
        del futures

        one = start(["worker", address, "--procs", "2"], env)
        processes.append(one)
        wait_for_workers(address, env, 1)
        broker_cpu = psutil.Process(broker.pid)
        with Client(address, authkey=key) as client:
            before = sum(broker_cpu.cpu_times()[:2])
            single = w1(client)
            single_cpu = sum(broker_cpu.cpu_times()[:2]) - before
        stop([one])

        many = [start(["worker", address, "--procs", "1"], env) for _ in range(args.workers)]
        processes.extend(many)
        wait_for_workers(address, env, args.workers)
        with Client(address, authkey=key) as client:
            before = sum(broker_cpu.cpu_times()[:2])
            spread = w1(client)
            spread_cpu = sum(broker_cpu.cpu_times()[:2]) - before
        stop(many)     # workers first: they unregister from a live broker
    finally:
        stop(processes[::-1])
    print(f"broker memory per queued job (~100-byte argument): {per_job:,.0f} bytes "
          f"({args.queued:,} jobs queued)")
    print(f"W1 with 1 worker x 2 procs:    {single:>9,.0f} jobs/s, broker CPU {single_cpu * 100:.0f} us/job")
    print(f"W1 with {args.workers} workers x 1 proc: {spread:>9,.0f} jobs/s, broker CPU "
          f"{spread_cpu * 100:.0f} us/job ({spread / single:.2f}x the throughput)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
