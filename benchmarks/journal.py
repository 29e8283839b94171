"""What the durable broker costs: the same workloads on a broker in memory and
on one with ``--journal``, side by side.

Run from the repository root::

    python benchmarks/journal.py            # median of 3 repetitions
    python benchmarks/journal.py --reps 5

Two clusters run at once, each a broker and a worker with 2 procs (as in
bench.py); the workloads alternate between them, so that a busy moment of
the machine falls on both. The journal lives in a temporary directory on
this machine's disk. Workloads: W1 (10,000 no-op jobs, one submit each,
then gather), W1 map (1,000,000 no-op items through ``mpqueue.Pool.map``),
W2 (sequential round trips) and W4 (100 jobs with a distinct 1 MiB argument
each) from bench.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench  # noqa: E402
import cloudpickle  # noqa: E402
from bench import (  # noqa: E402
    FULL,
    WORKLOADS,
    Cluster,
    MpqueueRunner,
    format_table,
    log,
    median,
    run_with_timeout,
    warmup_job,
)

import mpqueue  # noqa: E402

cloudpickle.register_pickle_by_value(bench)     # its job functions, for the workers

SHOWN = [("W1", "jobs_per_s", "throughput (jobs/s)", "higher", "{:,.0f}"),
         ("W1map", "items_per_s", "Pool.map, auto chunks (items/s)", "higher", "{:,.0f}"),
         ("W2", "median_ms", "median latency (ms)", "lower", "{:.3f}"),
         ("W4", "mb_per_s", "argument bandwidth (MB/s)", "higher", "{:,.1f}")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    p = dict(FULL, reps=args.reps)
    workdir = tempfile.mkdtemp(prefix="mpqueue-journal-bench-")
    systems = {"memory": (), "journal": ("--journal", os.path.join(workdir, "journal.db"))}
    clusters, clients, raw = {}, [], {name: {} for name in systems}
    try:
        runners = []
        for name, broker_args in systems.items():
            logdir = os.path.join(workdir, name)
            os.mkdir(logdir)
            cluster = clusters[name] = Cluster(logdir, broker_args)
            cluster.start()
            cluster.wait_for_worker()
            client = mpqueue.Client(cluster.address, authkey=cluster.authkey)
            clients.append(client)
            run_with_timeout(lambda: [f.result(60) for f in [client.submit(warmup_job, 0.2) for _ in range(4)]],
                             90, "warm-up")
            runner = MpqueueRunner(client, cluster)
            runner.name = name
            runners.append(runner)
        for workload, fn in WORKLOADS:
            if workload not in {w for w, *_ in SHOWN}:
                continue
            for rep in range(p["reps"]):
                for runner in (runners if rep % 2 == 0 else runners[::-1]):
                    result = fn(runner, p)
                    raw[runner.name].setdefault(workload, []).append(result)
                    log(f"{workload} rep {rep + 1} {runner.name}: "
                        + ", ".join(f"{k} {v:.3f}" for k, v in result.items() if isinstance(v, float)))
    finally:
        for client in clients:
            client.shutdown(wait=True)
        for cluster in clusters.values():
            cluster.stop()
    rows = [(workload, label, median([r[key] for r in raw["journal"][workload]]),
             median([r[key] for r in raw["memory"][workload]]), better, fmt)
            for workload, key, label, better, fmt in SHOWN]
    print(f"mpqueue broker with --journal vs in memory, median of {p['reps']} rep(s); ratio = journal / memory")
    print(format_table(rows, ("journal", "memory")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
