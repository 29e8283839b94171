"""Benchmark `mpqueue.shared` against a ``multiprocessing.Manager()`` on the same operations.

Run from the repository root::

    python benchmarks/shared.py                 # median of 3 repetitions
    python benchmarks/shared.py --reps 5 --ops 5000
    python benchmarks/shared.py --only counter,lock     # --help lists the operations

Progress goes to stderr, the table to stdout.

Both sides run two jobs at once, each doing ``--ops`` operations in a loop,
and the figure is the operations of both over the wall time from their
common start to the last one's end. Both jobs wait for the same start time
(a ``time.monotonic()`` reading, comparable across the processes of one
host), so their loops overlap; each opens its objects and does one
operation before then, so no connection is made in the timed part.

mpqueue runs as in bench.py: a broker and one worker with ``--procs 2``,
subprocesses of this interpreter, and a `Client` here that submits the two
jobs. The baseline is one ``multiprocessing.Manager()`` (a server process)
and a ``multiprocessing.Pool(2)`` whose two processes get the manager's
proxies as arguments. Both sides talk over a Unix socket: the manager's
default, and the local socket mpqueue's processes use on the broker's host.
The two sides alternate which goes first.

Operations (one "op" each):

counter     mpqueue: ``shared.Counter(name).add(1)``, both jobs on one counter
            (one round trip). Manager: ``with lock: value.value += 1`` on a
            manager ``Value("i")`` and ``Lock``, the stdlib's way to add
            atomically (four round trips: acquire, get, set, release).
dict        ``d[key] = value`` then ``d[key]``, with a distinct key and
            value per op (``"job1:42"`` -> ``(42, "payload-42")``), both jobs
            on one dict: two round trips on both sides.
lock        ``lock.acquire()`` then ``lock.release()``, each job on its own
            lock (uncontended): two round trips on both sides.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench import Cluster, format_table, log, median, run_with_timeout, warmup_job  # noqa: E402

import mpqueue  # noqa: E402

OPERATIONS = ["counter", "dict", "lock"]
#: Seconds between sending the jobs and their common start: time for both to reach their loops.
LEAD = 0.5


def _wait_until(start_at: float) -> None:
    time.sleep(max(0.0, start_at - time.monotonic()))


# -- the mpqueue jobs (pickled by value with this module's __main__) -------------------------

def mpqueue_job(operation: str, job: int, ops: int, start_at: float, run: str) -> tuple[float, float]:
    """One job's loop on `mpqueue.shared`: (its start, its end), in time.monotonic()."""
    from mpqueue import shared
    if operation == "counter":
        counter = shared.Counter(f"counter-{run}")
        return _timed(operation, job, ops, start_at, (lambda: counter.add(1), lambda: counter.add(1)))
    if operation == "dict":
        return _timed(operation, job, ops, start_at, shared.Dict(f"dict-{run}"))
    return _timed(operation, job, ops, start_at, shared.Lock(f"lock-{run}-{job}"))


# -- the manager jobs (run in the Pool's forked processes) --------------------------------------

def manager_job(operation: str, job: int, ops: int, start_at: float, objects: tuple) -> tuple[float, float]:
    """One job's loop on the manager's proxies: (its start, its end)."""
    if operation == "counter":
        value, lock = objects

        def add(n: int) -> None:
            with lock:
                value.value += n
        return _timed(operation, job, ops, start_at, (lambda: add(0), lambda: add(1)))
    if operation == "dict":
        return _timed(operation, job, ops, start_at, objects[0])
    return _timed(operation, job, ops, start_at, objects[job])


def _timed(operation: str, job: int, ops: int, start_at: float, target) -> tuple[float, float]:
    """The loop both systems run, once warmed up by one operation, from
    ``start_at``: (its start, its end). ``target``: for "counter", (warm-up,
    add one) functions; for "dict", a dict; else a lock."""
    if operation == "counter":
        warm, add = target
        warm()
        _wait_until(start_at)
        start = time.monotonic()
        for _ in range(ops):
            add()
    elif operation == "dict":
        target[f"job{job}:warm"] = 0
        _wait_until(start_at)
        start = time.monotonic()
        for i in range(ops):
            key = f"job{job}:{i}"
            target[key] = (i, f"payload-{i}")
            target[key]
    else:
        target.acquire()
        target.release()
        _wait_until(start_at)
        start = time.monotonic()
        for _ in range(ops):
            target.acquire()
            target.release()
    return start, time.monotonic()


def ops_per_s(spans: list[tuple[float, float]], start_at: float, ops: int) -> float:
    starts, ends = zip(*spans)
    if min(starts) < start_at - 0.001:
        raise RuntimeError("a job started before the common start")
    return len(spans) * ops / (max(ends) - start_at)


def run_mpqueue(client: mpqueue.Client, operation: str, ops: int, run: str) -> float:
    start_at = time.monotonic() + LEAD
    futures = [client.submit(mpqueue_job, operation, job, ops, start_at, run) for job in range(2)]
    spans = run_with_timeout(lambda: [f.result(300) for f in futures], 310, f"mpqueue {operation}")
    return ops_per_s(spans, start_at, ops)


def run_manager(pool, manager, operation: str, ops: int) -> float:
    if operation == "counter":
        objects = (manager.Value("i", 0), manager.Lock())
    elif operation == "dict":
        objects = (manager.dict(),)
    else:
        objects = (manager.Lock(), manager.Lock())
    start_at = time.monotonic() + LEAD
    results = [pool.apply_async(manager_job, (operation, job, ops, start_at, objects)) for job in range(2)]
    spans = [r.get(300) for r in results]
    if operation == "counter" and objects[0].value != 2 * ops:
        raise RuntimeError(f"the manager's counter ended at {objects[0].value}, not {2 * ops}")
    return ops_per_s(spans, start_at, ops)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each operation (default 3)")
    parser.add_argument("--ops", type=int, default=3000, help="operations per job (default 3000)")
    parser.add_argument("--only", metavar="NAMES", type=lambda text: text.split(","),
                        help=f"run only these operations, comma-separated, of: {', '.join(OPERATIONS)}")
    args = parser.parse_args()
    selected = args.only or OPERATIONS
    if set(selected) - set(OPERATIONS):
        parser.error(f"unknown operation(s) {', '.join(sorted(set(selected) - set(OPERATIONS)))}; "
                     f"choose from {', '.join(OPERATIONS)}")
    os.environ.pop("MPQUEUE_ADDRESS", None)
    raw: dict[str, dict[str, list[float]]] = {"mpqueue": {}, "manager": {}}
    # The manager and the Pool fork before the Client starts its threads.
    manager = multiprocessing.Manager()
    pool = multiprocessing.Pool(2)
    cluster = client = None
    logdir = tempfile.mkdtemp(prefix="mpqueue-shared-bench-")
    try:
        pool.map(warmup_job, [0.05] * 4)
        cluster = Cluster(logdir)
        cluster.start()
        cluster.wait_for_worker()
        client = mpqueue.Client(cluster.address, authkey=cluster.authkey)
        run_with_timeout(lambda: [f.result(60) for f in [client.submit(warmup_job, 0.2) for _ in range(4)]],
                         90, "mpqueue warm-up")
        sides = [("mpqueue", lambda op, rep: run_mpqueue(client, op, args.ops, f"{op}-{rep}")),
                 ("manager", lambda op, rep: run_manager(pool, manager, op, args.ops))]
        for operation in selected:
            for rep in range(args.reps):
                for name, run in (sides if rep % 2 == 0 else sides[::-1]):
                    figure = run(operation, rep)
                    raw[name].setdefault(operation, []).append(figure)
                    log(f"{operation} rep {rep + 1} {name}: {figure:,.0f} ops/s")
    finally:
        if client is not None:
            client.shutdown(wait=True)
        if cluster is not None:
            cluster.stop()
            for problem in cluster.problems:
                log(f"PROBLEM: {problem}")
        pool.close()
        pool.join()
        manager.shutdown()
    labels = {"counter": "Counter.add / with lock: v.value += 1", "dict": "Dict set + get, distinct keys",
              "lock": "Lock acquire + release, uncontended"}
    rows = [(labels[op], "ops/s, 2 jobs", median(raw["mpqueue"][op]), median(raw["manager"][op]), "higher",
             "{:,.0f}") for op in selected]
    print(f"mpqueue.shared vs multiprocessing.Manager(), 2 jobs at once, {args.ops:,} ops each, "
          f"median of {args.reps} rep(s); ratio = mpqueue / manager")
    print(format_table(rows, ("mpqueue", "manager")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
